//! A real Bazel over `grpcs://` against the real binary with its default
//! mutual-TLS development PKI (threat T1 with a real client).
//!
//! Debian's Bazel 4.2.3 needs netty-tcnative for any `grpcs://` (see
//! docs on the Bazel client): the jar on the boot class path and a copy of the
//! JNI library, under the name netty looks for, on `java.library.path`.
//! The package paths can be overridden with `NETTY_TCNATIVE_JAR` and
//! `NETTY_TCNATIVE_SO`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bazel::{
    assert_all_hits, assert_cold, assert_no_server_errors, assert_same_outputs, BazelRun, BazelWorkspace,
};
use crate::common::ServerProcess;

/// `action_id` of the CAS uploads Bazel makes for its build event stream.
const BES_UPLOAD: &str = "bes-upload";
/// gRPC `PERMISSION_DENIED`.
const PERMISSION_DENIED: i32 = 7;

/// Where Debian's libnetty-tcnative-java puts the jar.
fn netty_jar() -> PathBuf {
    std::env::var_os("NETTY_TCNATIVE_JAR").map_or_else(|| "/usr/share/java/netty-tcnative.jar".into(), PathBuf::from)
}

/// Where Debian's libnetty-tcnative-jni puts the JNI library
/// (`/usr/lib/<multiarch triplet>/jni/`).
fn netty_so() -> PathBuf {
    if let Some(path) = std::env::var_os("NETTY_TCNATIVE_SO") {
        return path.into();
    }
    let found = std::fs::read_dir("/usr/lib")
        .ok()
        .and_then(|entries| entries.flatten().map(|e| e.path().join("jni/libnetty-tcnative.so")).find(|p| p.is_file()));
    found.unwrap_or_else(|| {
        panic!("libnetty-tcnative.so not found under /usr/lib/*/jni: run tests/setup.sh (or set NETTY_TCNATIVE_SO)")
    })
}

/// The Bazel startup flags that make `grpcs://` work, with the JNI library
/// copied (not linked: netty resolves links to the original name) into `dir`.
pub(crate) fn netty_tcnative_startup_flags(dir: &Path) -> Vec<String> {
    let jar = netty_jar();
    assert!(jar.is_file(), "{} not found: run tests/setup.sh (or set NETTY_TCNATIVE_JAR)", jar.display());
    std::fs::copy(netty_so(), dir.join("libnetty_tcnative.so")).expect("copying libnetty-tcnative.so");
    vec![
        format!("--host_jvm_args=-Xbootclasspath/a:{}", jar.display()),
        format!("--host_jvm_args=-Djava.library.path={}:/usr/share/bazel/", dir.display()),
    ]
}

/// The dev PKI of a server started without TLS options.
pub(crate) struct DevPkiFlags {
    pub(crate) dir: PathBuf,
    port: u16,
}

impl DevPkiFlags {
    pub(crate) fn of(server: &ServerProcess) -> Self {
        assert_eq!(server.scheme(), "grpcs", "the server must default to mutual TLS");
        let dir = server.pki_dir();
        assert!(dir.join("ca.pem").is_file(), "no dev PKI in {}", dir.display());
        DevPkiFlags { dir, port: server.addr().port() }
    }

    /// The flags `provcache serve` prints for `client` (writer, reader).
    pub(crate) fn client(&self, client: &str, read_only: bool) -> Vec<String> {
        let flags = provcache::access::pki::bazel_flags(
            &self.dir.join("ca.pem"),
            &self.dir.join(format!("{client}.pem")),
            &self.dir.join(format!("{client}.key")),
            self.port,
            read_only,
        );
        flags.split(' ').map(str::to_string).collect()
    }

    /// Server authentication only: the CA, but no client certificate.
    fn anonymous(&self) -> Vec<String> {
        vec![
            format!("--remote_cache=grpcs://127.0.0.1:{}", self.port),
            format!("--tls_certificate={}", self.dir.join("ca.pem").display()),
        ]
    }
}

/// A read-only client's build whose only failures are the denied CAS
/// uploads of its build event stream, which make Bazel exit with 38 after
/// "Build completed successfully". Returns how many denied uploads Bazel's
/// gRPC log holds (uploads still running when Bazel closes it are missing).
fn assert_only_bep_uploads_denied(run: &BazelRun) -> usize {
    let calls = calls_of(run);
    let mut denied = 0;
    for call in &calls {
        assert_ne!(call.method(), "UpdateActionResult", "a read-only client wrote a result: {call:?}");
        let bes = call.metadata.as_ref().is_some_and(|m| m.action_id == BES_UPLOAD);
        match (call.method(), call.code()) {
            (_, 0) | ("GetActionResult", 5) => {}
            ("Write", PERMISSION_DENIED) if bes => denied += 1,
            _ => panic!("unexpected status for a read-only client: {call:?}"),
        }
    }
    assert_eq!(run.exit_code, Some(38), "denied BEP uploads fail the command:\n{}", run.stderr);
    assert!(run.stderr.contains("Build completed successfully"), "{}", run.stderr);
    assert!(run.stderr.contains("Unable to write all BEP events"), "{}", run.stderr);
    assert!(run.stderr.contains("Error while uploading artifact"), "{}", run.stderr);
    denied
}

/// Runs `provcache verify-build` with a dev PKI client's certificate.
pub(crate) fn verify_build_as(
    server: &ServerProcess,
    pki: &DevPkiFlags,
    client: &str,
    invocation: &str,
    extra: &[&str],
) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["verify-build", "--server", &server.url(), "--invocation", invocation])
        .arg("--ca")
        .arg(pki.dir.join("ca.pem"))
        .arg("--cert")
        .arg(pki.dir.join(format!("{client}.pem")))
        .arg("--key")
        .arg(pki.dir.join(format!("{client}.key")))
        .arg("--policy")
        .arg(pki.dir.join("trust-policy.toml"))
        .args(extra)
        .output()
        .expect("running verify-build")
}

pub(crate) fn refs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

fn calls_of(run: &BazelRun) -> Vec<crate::bazel::GrpcCall> {
    if run.grpc_log.exists() {
        run.grpc_calls()
    } else {
        Vec::new()
    }
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_over_mtls_writer_fills_reader_hits_anonymous_is_refused() {
    let started = Instant::now();
    let mut server = ServerProcess::start(Vec::<String>::new());
    let pki = DevPkiFlags::of(&server);
    let jni = tempfile::tempdir().unwrap();
    let mut ws = BazelWorkspace::new();
    ws.set_startup_flags(netty_tcnative_startup_flags(jni.path()));

    // A client without a certificate is refused before the first action.
    let anonymous = ws.run_build(&refs(&pki.anonymous()));
    eprintln!("no client certificate: bazel exit code {:?} in {:.1?}", anonymous.exit_code, anonymous.elapsed);
    assert_ne!(anonymous.exit_code, Some(0), "a client without a certificate must fail:\n{}", anonymous.stderr);
    assert_eq!(anonymous.exit_code, Some(34), "Bazel's remote-error exit code expected:\n{}", anonymous.stderr);
    let succeeded: Vec<_> = calls_of(&anonymous).into_iter().filter(|c| c.code() == 0).collect();
    assert!(succeeded.is_empty(), "calls without a certificate succeeded: {succeeded:?}");

    // The read-only reader on an empty cache builds everything locally and
    // stores no result. But Bazel also uploads the files its build event
    // stream names (outputs, its own profile) to the CAS, action_id
    // "bes-upload": CAS writes the reader may not make. Bazel then fails the
    // command with exit code 38 although every action succeeded. That is the
    // dev policy as written (readers have no cas:write); a read-only client
    // that writes a BEP file or talks to a BES must keep the stream's files
    // local (--experimental_build_event_upload_strategy=local).
    // That is why the printed reader flags keep the stream's files local.
    const KEEP_LOCAL: &str = "--experimental_build_event_upload_strategy=local";
    let printed_reader = pki.client("reader", true);
    assert!(printed_reader.iter().any(|f| f == KEEP_LOCAL), "{printed_reader:?}");
    let reader_flags: Vec<String> = printed_reader.iter().filter(|f| *f != KEEP_LOCAL).cloned().collect();
    let keep_bep_local = refs(&printed_reader);
    let reader_cold = ws.run_build(&refs(&reader_flags));
    let denied = assert_only_bep_uploads_denied(&reader_cold);
    assert!(denied > 0, "Bazel's gRPC log holds no denied bes-upload Write");
    let spawns = reader_cold.spawns();
    assert_eq!(spawns.len(), ws.action_count(), "every action ran");
    assert!(spawns.iter().all(|s| s.exit_code == 0 && !s.remote_cache_hit), "{spawns:?}");
    eprintln!("read-only reader, cold: {denied} bes-upload Write(s) denied, exit code 38 (every action succeeded)");

    // The same cold build with the stream's files kept local succeeds.
    ws.clean();
    let reader_local = ws.build(&keep_bep_local);
    assert_cold(&ws, &reader_local);
    let counts = reader_local.call_counts();
    assert_eq!(counts.get("Write"), None, "{counts:?}");
    assert_eq!(counts.get("UpdateActionResult"), None, "{counts:?}");

    // The writer, with the reader's leftovers cleaned away, starts cold (the
    // reader stored nothing) and fills the cache.
    ws.clean();
    let writer = ws.build(&refs(&pki.client("writer", false)));
    assert_cold(&ws, &writer);
    let counts = writer.call_counts();
    assert_eq!(counts.get("UpdateActionResult"), Some(&ws.action_count()), "{counts:?}");

    // A developer's fresh checkout, read-only, gets every action from the cache.
    ws.fresh_output_base();
    let reader = ws.build(&keep_bep_local);
    assert_all_hits(&ws, &reader);
    assert_same_outputs(&writer, &reader);

    // An auditor holding only the trust policy and the auditor certificate
    // audits the reader's build: every hit came from the writer build.
    let audit = verify_build_as(&server, &pki, "auditor", &reader.run.invocation_id, &["--json"]);
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(
        audit.status.code(),
        Some(0),
        "verify-build over mTLS:\n{stdout}\n{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let hits = report["hits"].as_array().unwrap();
    assert_eq!(hits.len(), ws.action_count(), "{stdout}");
    for h in hits {
        assert_eq!(h["writer"], "spiffe://provcache.dev/writer", "{h}");
        assert_eq!(h["claims"]["origin_invocation_id"], writer.run.invocation_id.as_str(), "{h}");
    }
    // The reader's certificate has no audit:read: the audit cannot run (exit 2).
    let denied = verify_build_as(&server, &pki, "reader", &reader.run.invocation_id, &[]);
    assert_eq!(denied.status.code(), Some(2), "{}", String::from_utf8_lossy(&denied.stderr));

    // Without the printed KEEP_LOCAL flag every action is a hit as well, but
    // the upload of Bazel's own profile (a build tool log) is denied: exit 38.
    ws.clean();
    let reader_printed = ws.run_build(&refs(&reader_flags));
    let denied = assert_only_bep_uploads_denied(&reader_printed);
    let spawns = reader_printed.spawns();
    assert_eq!(spawns.len(), ws.action_count());
    assert!(spawns.iter().all(|s| s.remote_cache_hit), "{spawns:?}");
    eprintln!(
        "read-only reader, warm, without {KEEP_LOCAL}: all hits, exit code 38 ({denied} denied bes-upload Write(s) logged)"
    );

    ws.shutdown();
    assert_no_server_errors(&server);
    server.stop();
    eprintln!("Bazel over mTLS: {:.1?} in all", started.elapsed());
}

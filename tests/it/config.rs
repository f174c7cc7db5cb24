//! `provcache serve --config` and `--check-config` on the real binary, and
//! its JSON logs (docs/configuration.md).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use provcache::access::pki::DevClient;
use provcache::proto::reapi;

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::{sha, update, with_request_metadata, write_atomically, ServerProcess};

fn provcache(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("running provcache")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn a_misspelt_key_stops_serve_with_a_message_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write(tmp.path(), "provcache.toml", "plaintext_insecure = true\nmax_sise = \"1GiB\"\n");
    let data = tmp.path().join("data");
    for extra in [&[][..], &["--check-config"][..]] {
        let mut args = vec!["serve", "--config", &config, "--listen", "127.0.0.1:0", "--data-dir"];
        args.push(data.to_str().unwrap());
        args.extend_from_slice(extra);
        let out = provcache(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: serve accepted a misspelt key: {stderr}");
        assert!(stderr.contains("unknown field `max_sise`"), "{stderr}");
        assert!(stderr.contains(&config), "the message names the file: {stderr}");
        assert!(stderr.contains("line 2"), "the message names the line: {stderr}");
    }
    assert!(!data.exists(), "nothing was created");
}

/// A plaintext server on a port of 127.0.0.1 the OS picks.
const PLAINTEXT: [&str; 3] = ["--plaintext-insecure", "--listen", "127.0.0.1:0"];

/// Runs `serve` and `serve --check-config` with `args` and `data` as the
/// data directory: both must refuse with status 2 and one message
/// containing every one of `expected`, creating nothing.
fn both_refuse(data: &Path, args: &[&str], expected: &[&str]) {
    for extra in [&[][..], &["--check-config"][..]] {
        let mut all = vec!["serve", "--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        all.extend_from_slice(extra);
        let out = provcache(&all);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: not refused: {stderr}");
        for e in expected {
            assert!(stderr.contains(e), "{extra:?}: {e:?} missing from: {stderr}");
        }
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
    }
    assert!(!data.exists(), "nothing was created");
}

#[test]
fn a_signing_key_its_trust_policy_does_not_hold_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("a")).unwrap();
    let (_, policy) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("b")).unwrap();
    let (key, policy) = (key.to_str().unwrap(), policy.to_str().unwrap());
    let args = [&PLAINTEXT[..], &["--signing-key", key, "--trust-policy", policy]].concat();
    both_refuse(&tmp.path().join("data"), &args, &["--signing-key", key, "is not in the trust policy", policy]);
}

#[test]
fn a_mistyped_signing_key_path_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, policy) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("keys")).unwrap();
    let typo = format!("{}.typo", key.display());
    let args = [&PLAINTEXT[..], &["--signing-key", &typo, "--trust-policy", policy.to_str().unwrap()]].concat();
    both_refuse(&tmp.path().join("data"), &args, &["--signing-key", &typo]);
}

#[test]
fn a_data_dir_that_cannot_be_created_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Path::new(&write(tmp.path(), "a-file", "")).join("data");
    let path = data.to_str().unwrap();
    both_refuse(&data, &PLAINTEXT, &["data_dir (--data-dir)", path, "is not a directory"]);
}

#[test]
fn plaintext_without_an_authorization_policy_is_refused_on_a_non_loopback_address() {
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--plaintext-insecure", "--listen", "0.0.0.0:0"];
    let expected = ["--plaintext-insecure", "0.0.0.0:0", "not a loopback address", "--authz-policy"];
    both_refuse(&tmp.path().join("data"), &args, &expected);
}

#[test]
fn plaintext_without_an_authorization_policy_on_loopback_starts_with_one_loud_warning() {
    let server = ServerProcess::start_plaintext();
    let log = server.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("EVERY caller")).collect();
    assert_eq!(warnings.len(), 1, "one warning: {log}");
    assert!(warnings[0].contains("WARN") && warnings[0].contains("can read and write"), "{log}");
    assert!(warnings[0].contains("--authz-policy"), "it says how to name a policy: {log}");
}

#[test]
fn an_own_tls_pki_without_signing_flags_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = provcache::access::pki::ensure_dev_pki(&tmp.path().join("own-pki")).unwrap();
    let args = own_pki_args(&pki, &pki.server_cert);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    both_refuse(&tmp.path().join("data"), &args, &["--signing-key", "--trust-policy", "provcache keygen"]);
}

/// `serve` arguments for an operator's own PKI (made like the development
/// one) with `cert` as the server certificate, and no signing flags.
fn own_pki_args(pki: &provcache::access::pki::DevPki, cert: &Path) -> Vec<String> {
    let mut args = vec!["--listen".to_owned(), "127.0.0.1:0".to_owned()];
    for (flag, path) in [
        ("--tls-cert", cert),
        ("--tls-key", &pki.server_key),
        ("--client-ca", &pki.ca_cert),
        ("--authz-policy", &pki.policy),
    ] {
        args.extend([flag.to_owned(), path.to_str().unwrap().to_owned()]);
    }
    args.extend(["--trust-domain".to_owned(), "provcache.dev".to_owned()]);
    args
}

#[test]
fn check_config_validates_and_prints_the_effective_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let policy = write(
        tmp.path(),
        "policy.toml",
        "[[rules]]\nname = \"all\"\nprincipals = [\"ci\"]\ninstances = [\"*\"]\npermissions = [\"ac:read\"]\n",
    );
    let good = format!(
        "data_dir = {:?}\nplaintext_insecure = true\nplaintext_principal = \"ci\"\npolicy = {policy:?}\n\
         max_size = \"64MiB\"\nserver_id = \"from-file\"\n",
        data.to_str().unwrap()
    );
    let config = write(tmp.path(), "good.toml", &good);
    let out = provcache(&["serve", "--config", &config, "--check-config", "--server-id", "from-flag"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("max_size = 67108864"), "{stdout}");
    assert!(stdout.contains("server_id = \"from-flag\""), "a flag overrides the file: {stdout}");
    assert!(stdout.contains("shutdown_timeout = \"30s\""), "defaults are shown: {stdout}");
    assert!(!data.exists(), "--check-config creates nothing");

    // The environment sits between the flag and the file.
    let out = Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["serve", "--check-config"])
        .env("PROVCACHE_CONFIG", &config)
        .env("PROVCACHE_SERVER_ID", "from-env")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("server_id = \"from-env\""));

    // A policy the file references is checked too.
    let bad_policy = write(tmp.path(), "bad-policy.toml", "[[rules]]\nname = \"x\"\nprincipal = [\"ci\"]\n");
    let bad = write(tmp.path(), "bad.toml", &good.replace(&policy, &bad_policy));
    let out = provcache(&["serve", "--config", &bad, "--check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("bad-policy.toml") && stderr.contains("principal"), "{stderr}");

    // So is a signing key.
    let key = write(tmp.path(), "signing.key", "not a key\n");
    let trust = write(tmp.path(), "trust.toml", "");
    let out =
        provcache(&["serve", "--config", &config, "--check-config", "--signing-key", &key, "--trust-policy", &trust]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("signing key"), "{stderr}");
    assert!(!stderr.contains("not a key"), "no key material in messages: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_principal_and_the_invocation_id() {
    let tmp = tempfile::tempdir().unwrap();
    let principal = "spiffe://example.org/dev/reader";
    let policy = write(
        tmp.path(),
        "policy.toml",
        &format!(
            "[[rules]]\nname = \"readers\"\nprincipals = [{principal:?}]\ninstances = [\"*\"]\n\
             permissions = [\"ac:read\", \"cas:read\"]\n"
        ),
    );
    let config = write(tmp.path(), "provcache.toml", &format!("log_format = \"json\"\npolicy = {policy:?}\n"));
    let server =
        ServerProcess::start(["--config", &config, "--plaintext-insecure", "--plaintext-principal", principal]);
    let mut c = server.clients().await;

    let invocation = "9f2c3d1e-json-log-test";
    let metadata = reapi::RequestMetadata { tool_invocation_id: invocation.into(), ..Default::default() };
    let request = update("", &sha(b"action"), reapi::ActionResult::default());
    let request = with_request_metadata(tonic::Request::new(request), &metadata);
    let status = c.ac.update_action_result(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = server.log();
        let found = log.lines().find(|l| l.contains("call refused")).map(str::to_owned);
        if let Some(line) = found {
            break line;
        }
        assert!(Instant::now() < deadline, "no \"call refused\" line in the log:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let event: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    assert_eq!(event["level"], "INFO", "{event}");
    assert_eq!(event["fields"]["permission"], "ac:write", "{event}");
    assert_eq!(event["span"]["rpc"], "ActionCache/UpdateActionResult", "{event}");
    assert_eq!(event["span"]["principal"], principal, "{event}");
    assert_eq!(event["span"]["invocation"], invocation, "{event}");

    // Every line of the log is JSON, the startup lines included.
    for l in server.log().lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "not JSON: {l}");
    }
}

#[test]
fn the_authorization_policy_is_authz_policy_and_the_old_environment_variable_still_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = write(
        tmp.path(),
        "authz.toml",
        "[[rules]]\nname = \"all\"\nprincipals = [\"ci\"]\ninstances = [\"*\"]\npermissions = [\"ac:read\"]\n",
    );
    let data = tmp.path().join("data");
    let base = ["serve", "--check-config", "--plaintext-insecure", "--plaintext-principal", "ci", "--data-dir"];
    let expected = format!("authz_policy = {policy:?}");
    for (flag, env) in [(true, None), (false, Some("PROVCACHE_AUTHZ_POLICY")), (false, Some("PROVCACHE_POLICY"))] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_provcache"));
        cmd.args(base).arg(&data).env_remove("PROVCACHE_AUTHZ_POLICY").env_remove("PROVCACHE_POLICY");
        if flag {
            cmd.args(["--authz-policy", &policy]);
        }
        if let Some(var) = env {
            cmd.env(var, &policy);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{env:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&expected), "{env:?}: {stdout}");
    }
}

#[test]
fn keygen_prints_a_verify_only_entry_for_rotation_unless_asked_for_active() {
    let tmp = tempfile::tempdir().unwrap();
    for (extra, state) in [(&[][..], "verify_only"), (&["--state", "active"][..], "active")] {
        let key = tmp.path().join(format!("{state}.key"));
        let mut args = vec!["keygen", "--out", key.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = provcache(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(&format!("state = \"{state}\"")), "{stdout}");
    }
}

/// `provcache ARGS` must fail with `code` and one line on stderr,
/// `error: ...` (or `prefix`), containing each of `expected`; returns it.
fn fails_with_one_line(args: &[&str], code: i32, expected: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_provcache"));
    let out = cmd.args(args).env("NO_COLOR", "1").env("RUST_BACKTRACE", "1").env_remove("RUST_LOG").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    for e in expected {
        assert!(last.contains(e), "{args:?}: {e:?} missing from the last line of: {stderr}");
    }
    assert!(!stderr.contains("Caused by") && !stderr.contains("backtrace"), "{args:?}: one line: {stderr}");
    assert_eq!(stderr.matches("os error").count(), usize::from(last.contains("os error")), "once: {stderr}");
    last.to_owned()
}

#[test]
fn a_mistyped_client_key_of_verify_build_is_named_with_its_flag_and_path() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = provcache::access::pki::ensure_dev_pki(&tmp.path().join("pki")).unwrap();
    let (_, trust) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("keys")).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let typo = tmp.path().join("auditor.kye");
    let (ca, cert, key, trust) =
        (path(&pki.ca_cert), path(&pki.client_cert(DevClient::Auditor)), path(&typo), path(&trust));
    let args = ["verify-build", "--server", "grpcs://127.0.0.1:1", "--invocation", "x", "--trust-policy", &trust];
    let args = [&args[..], &["--ca", &ca, "--cert", &cert, "--key", &key]].concat();
    let line = fails_with_one_line(&args, 2, &["--key", &key, "No such file or directory"]);
    assert!(line.starts_with("verify-build: the audit could not run: --key "), "{line}");
    let args = ["verify-build", "--server", "grpcs://127.0.0.1:1", "--invocation", "x", "--trust-policy", &key];
    fails_with_one_line(&args, 2, &["--trust-policy", &key, "No such file or directory"]);
}

#[test]
fn keygen_refuses_an_output_path_it_cannot_use_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let missing_dir = tmp.path().join("no-such-dir").join("signing.key");
    let out = missing_dir.to_str().unwrap();
    fails_with_one_line(&["keygen", "--out", out], 2, &["error: --out", out, "does not exist"]);
    let existing = write(tmp.path(), "signing.key", "keep me");
    fails_with_one_line(&["keygen", "--out", &existing], 2, &["error: --out", &existing, "exists already"]);
    assert_eq!(std::fs::read_to_string(&existing).unwrap(), "keep me");
}

#[test]
fn a_missing_tls_certificate_is_refused_naming_the_flag_the_path_and_the_os_error_once() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = provcache::access::pki::ensure_dev_pki(&tmp.path().join("own-pki")).unwrap();
    let typo = tmp.path().join("server.pme");
    let garbage = write(tmp.path(), "garbage.pem", "not a certificate\n");
    let typo_str = typo.to_str().unwrap();
    for (cert, expected) in [
        (typo.as_path(), &["tls_cert (--tls-cert)", typo_str, "No such file or directory"][..]),
        (Path::new(&garbage), &["--tls-cert", &garbage][..]),
    ] {
        let args = own_pki_args(&pki, cert);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        both_refuse(&tmp.path().join("data"), &args, expected);
    }
}

#[test]
fn listen_takes_a_bare_port_for_every_interface_and_localhost_for_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let check = |listen: &str| {
        let rule = "[[rules]]\nname = \"ci\"\nprincipals = [\"plaintext\"]\ninstances = [\"*\"]\npermissions = [\"ac:read\"]\n";
        let policy = write(tmp.path(), "authz.toml", rule);
        let args = ["serve", "--check-config", "--plaintext-insecure", "--authz-policy", &policy, "--listen", listen];
        let out = provcache(&[&args[..], &["--data-dir", data.to_str().unwrap()]].concat());
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{listen}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        stdout
    };
    assert!(check(":8980").contains("listen = \"0.0.0.0:8980\""));
    assert!(check("localhost:8980").contains("listen = \"127.0.0.1:8980\""));
    let out = provcache(&["serve", "--check-config", "--listen", "cache.example.org:8980"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--listen") && stderr.contains("localhost:PORT"), "{stderr}");
}

#[test]
fn a_port_in_use_is_one_error_line_and_status_1_even_with_rust_backtrace() {
    let server = ServerProcess::start_plaintext();
    let tmp = tempfile::tempdir().unwrap();
    let (addr, data) = (server.addr().to_string(), tmp.path().join("data"));
    let args = ["serve", "--plaintext-insecure", "--listen", &addr, "--data-dir", data.to_str().unwrap()];
    let line = fails_with_one_line(&args, 1, &["error: listening on", &addr, "in use"]);
    assert!(line.starts_with("error: "), "{line}");
}

#[test]
fn a_data_dir_held_by_another_server_is_said_once_naming_the_directory_and_the_lock() {
    let server = ServerProcess::start_plaintext();
    let dir = server.data_dir().to_str().unwrap().to_owned();
    let lock = provcache::server::db_path(server.data_dir()).join("LOCK");
    let args = ["serve", "--plaintext-insecure", "--listen", "127.0.0.1:0", "--data-dir", &dir];
    let expected =
        format!("data directory {dir} is in use by another provcache process (RocksDB lock {})", lock.display());
    let line = fails_with_one_line(&args, 1, &["error: ", &expected, "--data-dir"]);
    let out = Command::new(env!("CARGO_BIN_EXE_provcache")).args(args).env("NO_COLOR", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("in use").count(), 1, "said once: {stderr}");
    assert!(!stderr.contains("lock file"), "not the raw RocksDB text: {stderr}");
    assert!(line.contains("stop that server"), "{line}");
}

#[test]
fn a_runtime_failure_to_create_the_development_keys_names_the_path_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let dev = write(&data, "dev-pki", "a file where the development PKI goes");
    let args = ["serve", "--plaintext-insecure", "--listen", "127.0.0.1:0", "--data-dir", data.to_str().unwrap()];
    fails_with_one_line(&args, 1, &["error: ", &dev, "os error"]);
}

/// Polls the health service until `service` reports `expected` (the server
/// notices a changed key file within seconds); panics after a minute.
async fn wait_for_health(health: &mut HealthClient<tonic::transport::Channel>, service: &str, expected: ServingStatus) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = HealthCheckRequest { service: service.into() };
        let status = health.check(request).await.unwrap().into_inner().status();
        if status == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{service} stayed {status:?}, not {expected:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_action_cache_is_not_serving_while_its_signing_key_is_unusable_and_serving_once_it_is_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, trust) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("keys")).unwrap();
    let (key_arg, trust_arg) = (key.to_str().unwrap(), trust.to_str().unwrap());
    let server = ServerProcess::start(["--plaintext-insecure", "--signing-key", key_arg, "--trust-policy", trust_arg]);
    let mut health = HealthClient::new(server.channel().await);
    let (ac, cas) =
        ("build.bazel.remote.execution.v2.ActionCache", "build.bazel.remote.execution.v2.ContentAddressableStorage");
    wait_for_health(&mut health, ac, ServingStatus::Serving).await;

    let good = std::fs::read(&key).unwrap();
    write_atomically(&key, b"not a key\n");
    wait_for_health(&mut health, ac, ServingStatus::NotServing).await;
    let request = HealthCheckRequest { service: cas.into() };
    assert_eq!(health.check(request).await.unwrap().into_inner().status(), ServingStatus::Serving, "reads go on");

    write_atomically(&key, &good);
    wait_for_health(&mut health, ac, ServingStatus::Serving).await;
}

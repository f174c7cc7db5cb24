//! End to end with a real Bazel client (Debian's `bazel-bootstrap`, Bazel
//! 4.2.3) against the real `provcache` binary.
//!
//! These tests are `#[ignore]`d so that a plain `cargo test` stays fast; the
//! full suite (`tests/run-all.sh`, i.e. `cargo test --release --
//! --include-ignored`) runs them after `tests/setup.sh` installed Bazel.
//!
//! The Bazel half of the harness, reused by the other `bazel_*` suites (the
//! server is [`ServerProcess`] from `common`):
//! - [`BazelWorkspace`] is a temporary workspace of genrules with a private
//!   Bazel output root; [`BazelWorkspace::build`] returns what Bazel did
//!   (execution log, build events, the gRPC calls it made) and the bytes of
//!   every output. Bazel servers are shut down on drop.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use provcache::proto::google::rpc;
use provcache::proto::reapi;
use serde::Deserialize;

use crate::common::{sha, tail, ServerProcess};

/// Upper bound for one Bazel command; far above what these small builds need.
const BAZEL_TIMEOUT: Duration = Duration::from_secs(300);
/// The workspace name, which fixes the execution root's directory name.
const WORKSPACE_NAME: &str = "provcache_e2e";

/// Small genrules: a chain a → b, a 4.6 MB output, a few independent ones (an
/// empty output, one that writes stderr) and one genrule with several outputs,
/// one of them random bytes (so equal bytes after a rebuild can only come from
/// the cache).
const BUILD_FILE: &str = r#"
genrule(name = "a", outs = ["a.txt"], cmd = "echo step-a > $@")
genrule(name = "b", srcs = [":a"], outs = ["b.txt"], cmd = "cat $(location :a) > $@; echo step-b >> $@")
genrule(name = "big", outs = ["big.txt"], cmd = "seq 1 700000 > $@")
genrule(name = "one", outs = ["one.txt"], cmd = "echo one > $@")
genrule(name = "empty", outs = ["empty.txt"], cmd = "touch $@")
genrule(name = "noisy", outs = ["noisy.txt"], cmd = "echo noisy-stderr >&2; echo noisy > $@")
genrule(
    name = "multi",
    outs = ["m1.txt", "m2.txt", "m3.bin"],
    cmd = "echo m1 > $(location m1.txt); echo m2 > $(location m2.txt); head -c 3000 /dev/urandom > $(location m3.bin)",
)
"#;

/// One Bazel-using test at a time: each runs its own Bazel server (a JVM) and
/// these machines have two cores.
static BAZEL_SERIAL: Mutex<()> = Mutex::new(());

thread_local! {
    static HOLDS_BAZEL_SERIAL: Cell<bool> = const { Cell::new(false) };
}

struct SerialGuard(Option<MutexGuard<'static, ()>>);

fn bazel_serial() -> SerialGuard {
    if HOLDS_BAZEL_SERIAL.get() {
        return SerialGuard(None);
    }
    let guard = BAZEL_SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    HOLDS_BAZEL_SERIAL.set(true);
    SerialGuard(Some(guard))
}

impl Drop for SerialGuard {
    fn drop(&mut self) {
        if self.0.is_some() {
            HOLDS_BAZEL_SERIAL.set(false);
        }
    }
}

/// A temporary Bazel workspace with a private output root.
pub struct BazelWorkspace {
    bazel: OsString,
    workspace: PathBuf,
    user_root: PathBuf,
    logs: PathBuf,
    output_base: PathBuf,
    output_bases: usize,
    /// Output bases whose Bazel server may be running.
    running: Vec<PathBuf>,
    startup_flags: Vec<String>,
    salt: String,
    runs: usize,
    root: Option<tempfile::TempDir>,
    _serial: SerialGuard,
}

impl BazelWorkspace {
    /// A workspace holding [`BUILD_FILE`]. The Bazel binary is `$BAZEL` or
    /// `bazel`. Every action gets a fresh random `SALT` in its environment,
    /// so the first build is cold.
    pub fn new() -> Self {
        let serial = bazel_serial();
        let bazel = std::env::var_os("BAZEL").unwrap_or_else(|| "bazel".into());
        let root = tempfile::Builder::new().prefix("bzl").tempdir().expect("creating the Bazel temp dir");
        let workspace = root.path().join("ws");
        let user_root = root.path().join("root");
        let logs = root.path().join("logs");
        for dir in [&workspace, &user_root, &logs] {
            fs::create_dir(dir).unwrap();
        }
        fs::write(workspace.join("WORKSPACE"), format!("workspace(name = \"{WORKSPACE_NAME}\")\n")).unwrap();
        fs::write(workspace.join("BUILD"), BUILD_FILE).unwrap();
        let mut ws = BazelWorkspace {
            bazel,
            workspace,
            user_root,
            logs,
            output_base: PathBuf::new(),
            output_bases: 0,
            running: Vec::new(),
            startup_flags: Vec::new(),
            salt: uuid::Uuid::new_v4().to_string(),
            runs: 0,
            root: Some(root),
            _serial: serial,
        };
        ws.fresh_output_base();
        ws
    }

    /// The number of actions (spawns) a full build of the workspace runs.
    pub fn action_count(&self) -> usize {
        BUILD_FILE.matches("genrule(").count()
    }

    /// Extra startup options (e.g. the JVM flags for TLS); Bazel restarts its
    /// server when they change.
    #[allow(dead_code)]
    pub fn set_startup_flags<I, S>(&mut self, flags: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.startup_flags = flags.into_iter().map(Into::into).collect();
    }

    /// Switches to a new, empty output base (as a different machine would
    /// have) and shuts down the Bazel server of the previous one.
    pub fn fresh_output_base(&mut self) {
        self.shutdown();
        self.output_bases += 1;
        self.output_base = self.root().join(format!("ob{}", self.output_bases));
    }

    fn root(&self) -> &Path {
        self.root.as_ref().unwrap().path()
    }

    /// `bazel <startup options>` for `output_base`, in the workspace.
    fn command(&self, output_base: &Path) -> Command {
        let mut cmd = Command::new(&self.bazel);
        cmd.current_dir(&self.workspace)
            .arg(format!("--output_user_root={}", self.user_root.display()))
            .arg(format!("--output_base={}", output_base.display()))
            .arg("--nohome_rc")
            .arg("--max_idle_secs=120")
            .arg("--host_jvm_args=-Xmx1g")
            .args(&self.startup_flags)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `bazel <startup options> ARGS` in the workspace without judging
    /// the outcome. `name` names the stdout/stderr files in the logs directory.
    fn run_raw(&mut self, name: &str, args: &[String]) -> (Option<i32>, String, String) {
        self.runs += 1;
        let stdout_path = self.logs.join(format!("{:02}-{name}.stdout", self.runs));
        let stderr_path = self.logs.join(format!("{:02}-{name}.stderr", self.runs));
        let mut cmd = self.command(&self.output_base);
        cmd.args(args).stdout(fs::File::create(&stdout_path).unwrap()).stderr(fs::File::create(&stderr_path).unwrap());
        if !self.running.contains(&self.output_base) {
            self.running.push(self.output_base.clone());
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {:?} ({e}): run tests/setup.sh to install Bazel", self.bazel);
        });
        let deadline = Instant::now() + BAZEL_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
        let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
        match status {
            Some(status) => (status.code(), stdout, stderr),
            None => {
                panic!("bazel {args:?} timed out after {BAZEL_TIMEOUT:?}\n{}", self.describe(&stdout, &stderr))
            }
        }
    }

    /// Bazel's console output and the end of its server log, for failure
    /// messages.
    fn describe(&self, stdout: &str, stderr: &str) -> String {
        let java_log = fs::read_to_string(self.output_base.join("java.log")).unwrap_or_default();
        format!(
            "---- bazel stdout ----\n{}\n---- bazel stderr ----\n{}\n---- java.log (end) ----\n{}",
            tail(stdout, 100),
            tail(stderr, 150),
            tail(&java_log, 40)
        )
    }

    /// Runs a Bazel command (`clean`, `info`, ...) and asserts it succeeded.
    pub fn run(&mut self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let (code, stdout, stderr) = self.run_raw(&args[0].clone(), &args);
        assert_eq!(code, Some(0), "bazel {args:?} failed\n{}", self.describe(&stdout, &stderr));
        stdout
    }

    /// `bazel clean`: drops the outputs and the local action cache, keeps the
    /// server.
    pub fn clean(&mut self) {
        self.run(&["clean"]);
    }

    /// `bazel build //...` with the standard flags plus `flags` (the remote
    /// cache URL, TLS options, instance name, ...), whatever the outcome.
    pub fn run_build(&mut self, flags: &[&str]) -> BazelRun {
        let invocation_id = uuid::Uuid::new_v4().to_string();
        let n = self.runs + 1;
        let exec_log = self.logs.join(format!("{n:02}-build.exec.json"));
        let bep = self.logs.join(format!("{n:02}-build.bep.json"));
        let grpc_log = self.logs.join(format!("{n:02}-build.grpc.bin"));
        let mut args: Vec<String> = [
            "build",
            "--color=no",
            "--curses=no",
            // No bazel-* convenience symlinks: one left by another output base
            // would be a package under //... .
            "--symlink_prefix=/",
            "--nosandbox_debug",
            "--incompatible_strict_action_env",
            "--remote_timeout=30",
            "--remote_retries=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--action_env=SALT={}", self.salt));
        args.push(format!("--invocation_id={invocation_id}"));
        args.push(format!("--execution_log_json_file={}", exec_log.display()));
        args.push(format!("--build_event_json_file={}", bep.display()));
        args.push(format!("--experimental_remote_grpc_log={}", grpc_log.display()));
        args.extend(flags.iter().map(|s| s.to_string()));
        args.push("//...".into());
        let started = Instant::now();
        let (exit_code, stdout, stderr) = self.run_raw("build", &args);
        let elapsed = started.elapsed();
        let execroot = self.output_base.join("execroot").join(WORKSPACE_NAME);
        BazelRun { args, exit_code, stdout, stderr, invocation_id, exec_log, bep, grpc_log, execroot, elapsed }
    }

    /// [`BazelWorkspace::run_build`], asserting success; reads the execution
    /// log and every output (checking each against the digest Bazel logged).
    pub fn build(&mut self, flags: &[&str]) -> Build {
        let run = self.run_build(flags);
        assert_eq!(
            run.exit_code,
            Some(0),
            "bazel build failed: {:?}\n{}",
            run.args,
            self.describe(&run.stdout, &run.stderr)
        );
        let spawns = run.spawns();
        let mut outputs = BTreeMap::new();
        for spawn in &spawns {
            assert_eq!(spawn.exit_code, 0, "{spawn:?}");
            for out in &spawn.actual_outputs {
                let bytes = fs::read(run.execroot.join(&out.path))
                    .unwrap_or_else(|e| panic!("reading the output {}: {e}", out.path));
                let digest = out.digest.as_ref().unwrap_or_else(|| panic!("no digest logged for {}", out.path));
                let actual = sha(&bytes);
                assert_eq!(
                    (actual.hash.as_str(), actual.size_bytes.to_string()),
                    (digest.hash.as_str(), digest.size_bytes.clone()),
                    "{} does not match the digest in the execution log",
                    out.path
                );
                outputs.insert(out.path.clone(), bytes);
            }
        }
        let build = Build { run, spawns, outputs };
        let (hits, spawns) = build.hits();
        eprintln!(
            "bazel build in {:.1?}: {hits}/{spawns} remote cache hits; calls {:?}",
            build.run.elapsed,
            build.call_counts()
        );
        build
    }

    /// `bazel shutdown` for every output base that may have a server, so no
    /// JVM outlives the test.
    pub fn shutdown(&mut self) {
        for base in std::mem::take(&mut self.running) {
            let result = self.command(&base).arg("shutdown").output();
            if std::thread::panicking() {
                continue;
            }
            let out = result.unwrap_or_else(|e| panic!("running {:?} shutdown: {e}", self.bazel));
            assert!(
                out.status.success(),
                "bazel shutdown failed for {}: {}\n{}",
                base.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for BazelWorkspace {
    fn drop(&mut self) {
        self.shutdown();
        let Some(root) = self.root.take() else { return };
        if std::thread::panicking() {
            // Keep the workspace, Bazel's output bases and logs for a post-mortem.
            eprintln!("---- Bazel workspace and logs kept in {} ----", root.path().display());
            let _ = root.keep();
        } else {
            // Bazel leaves read-only directories behind; make them removable.
            make_writable(root.path());
            let _ = root.close();
        }
    }
}

fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    if meta.is_dir() {
        let mut perms = meta.permissions();
        perms.set_mode(perms.mode() | 0o700);
        let _ = fs::set_permissions(path, perms);
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                make_writable(&entry.path());
            }
        }
    }
}

/// One `bazel build`, successful or not.
#[derive(Debug)]
pub struct BazelRun {
    pub args: Vec<String>,
    /// None when killed by a signal.
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// `--invocation_id`: Bazel sends it as `tool_invocation_id` in every
    /// call's RequestMetadata and as the BEP `started.uuid`.
    pub invocation_id: String,
    pub exec_log: PathBuf,
    pub bep: PathBuf,
    pub grpc_log: PathBuf,
    execroot: PathBuf,
    /// Wall time of the `bazel build` command.
    pub elapsed: Duration,
}

/// A spawn from the execution log (`--execution_log_json_file`).
#[allow(dead_code)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spawn {
    #[serde(default)]
    pub mnemonic: String,
    #[serde(default)]
    pub progress_message: String,
    #[serde(default)]
    pub runner: String,
    #[serde(default)]
    pub remote_cache_hit: bool,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub listed_outputs: Vec<String>,
    #[serde(default)]
    pub actual_outputs: Vec<LoggedFile>,
}

#[derive(Debug, Deserialize)]
pub struct LoggedFile {
    pub path: String,
    pub digest: Option<LoggedDigest>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoggedDigest {
    pub hash: String,
    /// An int64 in proto JSON, hence a string.
    pub size_bytes: String,
}

/// One remote call from `--experimental_remote_grpc_log`: a stream of
/// length-delimited entries. Only the fields read here are declared (numbers
/// as Bazel 4.2.3 writes them); the rest are skipped.
#[derive(Clone, PartialEq, Message)]
pub struct GrpcCall {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<reapi::RequestMetadata>,
    #[prost(message, optional, tag = "2")]
    pub status: Option<rpc::Status>,
    #[prost(string, tag = "3")]
    pub method_name: String,
}

impl GrpcCall {
    /// The gRPC status code (0 = OK).
    pub fn code(&self) -> i32 {
        self.status.as_ref().map_or(0, |s| s.code)
    }

    /// The method without its service, e.g. `GetActionResult`.
    pub fn method(&self) -> &str {
        self.method_name.rsplit('/').next().unwrap_or_default()
    }
}

impl BazelRun {
    /// The spawns of the execution log: concatenated JSON objects.
    pub fn spawns(&self) -> Vec<Spawn> {
        let text = fs::read_to_string(&self.exec_log)
            .unwrap_or_else(|e| panic!("reading the execution log {}: {e}", self.exec_log.display()));
        serde_json::Deserializer::from_str(&text)
            .into_iter::<Spawn>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("parsing the execution log {}: {e}", self.exec_log.display()))
    }

    /// The build event stream (`--build_event_json_file`).
    pub fn build_events(&self) -> Vec<serde_json::Value> {
        let text = fs::read_to_string(&self.bep).unwrap_or_else(|e| panic!("reading {}: {e}", self.bep.display()));
        serde_json::Deserializer::from_str(&text)
            .into_iter::<serde_json::Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("parsing {}: {e}", self.bep.display()))
    }

    /// The remote calls Bazel logged, in order. Calls still running when the
    /// command ends (the build-event uploads, action_id "bes-upload") can be
    /// missing: Bazel closes the log first.
    pub fn grpc_calls(&self) -> Vec<GrpcCall> {
        let data = fs::read(&self.grpc_log).unwrap_or_else(|e| panic!("reading {}: {e}", self.grpc_log.display()));
        let mut buf = data.as_slice();
        let mut calls = Vec::new();
        while !buf.is_empty() {
            calls.push(GrpcCall::decode_length_delimited(&mut buf).expect("decoding the remote gRPC log"));
        }
        calls
    }
}

/// A successful build: its spawns and the bytes of every output.
#[derive(Debug)]
pub struct Build {
    pub run: BazelRun,
    pub spawns: Vec<Spawn>,
    /// Output path (relative to the execution root) → contents.
    pub outputs: BTreeMap<String, Vec<u8>>,
}

impl Build {
    pub fn remote_cache_hits(&self) -> usize {
        self.spawns.iter().filter(|s| s.remote_cache_hit).count()
    }

    /// `(remote cache hits, spawns)`.
    pub fn hits(&self) -> (usize, usize) {
        (self.remote_cache_hits(), self.spawns.len())
    }

    /// How many calls of each method Bazel made.
    pub fn call_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for call in self.run.grpc_calls() {
            *counts.entry(call.method().to_string()).or_insert(0) += 1;
        }
        counts
    }
}

// ---------------------------------------------------------------------------
// Checks shared by the tests
// ---------------------------------------------------------------------------

/// Every spawn ran locally and missed the cache; every remote call succeeded
/// except GetActionResult's NOT_FOUND misses.
pub(crate) fn assert_cold(ws: &BazelWorkspace, build: &Build) {
    assert_eq!(build.hits(), (0, ws.action_count()), "a cold build must miss every action");
    for call in build.run.grpc_calls() {
        let expected = if call.method() == "GetActionResult" { 5 } else { 0 };
        assert_eq!(call.code(), expected, "unexpected status from the cache: {call:?}");
    }
    assert_metadata(build);
}

/// Every spawn was a remote cache hit, and no call failed.
pub(crate) fn assert_all_hits(ws: &BazelWorkspace, build: &Build) {
    assert_eq!(build.hits(), (ws.action_count(), ws.action_count()), "every action must be a remote cache hit");
    for spawn in &build.spawns {
        assert_eq!(spawn.runner, "remote cache hit", "{spawn:?}");
    }
    for call in build.run.grpc_calls() {
        assert_eq!(call.code(), 0, "unexpected status from the cache: {call:?}");
    }
    assert_metadata(build);
}

/// Every call carried RequestMetadata with this build's invocation id.
fn assert_metadata(build: &Build) {
    let calls = build.run.grpc_calls();
    assert!(!calls.is_empty(), "Bazel made no remote calls: is the remote cache flag missing?");
    for call in &calls {
        let md = call.metadata.as_ref().unwrap_or_else(|| panic!("no request metadata: {call:?}"));
        assert_eq!(md.tool_invocation_id, build.run.invocation_id, "{call:?}");
        assert_eq!(md.tool_details.as_ref().map(|t| t.tool_name.as_str()), Some("bazel"));
    }
}

pub(crate) fn assert_same_outputs(first: &Build, second: &Build) {
    assert_eq!(
        first.outputs.keys().collect::<Vec<_>>(),
        second.outputs.keys().collect::<Vec<_>>(),
        "the builds produced different output files"
    );
    for (path, bytes) in &first.outputs {
        assert!(second.outputs[path] == *bytes, "{path} differs between the builds");
    }
}

pub(crate) fn assert_no_server_errors(server: &ServerProcess) {
    let errors = server.error_lines();
    assert!(errors.is_empty(), "the server logged errors:\n{}", errors.join("\n"));
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_cold_build_then_every_action_is_a_remote_cache_hit() {
    let mut server = ServerProcess::start_plaintext();
    let mut ws = BazelWorkspace::new();

    let cold = ws.build(&[&server.remote_cache_flag()]);
    assert_cold(&ws, &cold);
    let calls = cold.call_counts();
    assert_eq!(calls.get("UpdateActionResult"), Some(&ws.action_count()), "{calls:?}");
    assert!(calls.get("Write").is_some_and(|&n| n > 0), "{calls:?}");
    let started = cold.run.build_events().into_iter().find_map(|e| e.get("started").cloned());
    assert_eq!(started.and_then(|s| s["uuid"].as_str().map(String::from)), Some(cold.run.invocation_id.clone()));

    ws.clean();
    let warm = ws.build(&[&server.remote_cache_flag()]);
    assert_all_hits(&ws, &warm);
    assert_same_outputs(&cold, &warm);
    let calls = warm.call_counts();
    assert_eq!(calls.get("GetActionResult"), Some(&ws.action_count()), "{calls:?}");
    assert_eq!(calls.get("UpdateActionResult"), None, "a fully cached build uploads nothing: {calls:?}");
    assert!(warm.run.stderr.contains("noisy-stderr"), "a cache hit replays the action's stderr");

    // The cache survives a restart of the server on the same data directory.
    server.restart();
    ws.clean();
    let after_restart = ws.build(&[&server.remote_cache_flag()]);
    assert_all_hits(&ws, &after_restart);
    assert_same_outputs(&cold, &after_restart);

    ws.shutdown();
    assert_no_server_errors(&server);
    server.stop();
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_instance_names_isolate_caches() {
    let server = ServerProcess::start_plaintext();
    let mut ws = BazelWorkspace::new();
    let cache = server.remote_cache_flag();

    let cold = ws.build(&[&cache, "--remote_instance_name=some/instance"]);
    assert_cold(&ws, &cold);
    ws.clean();
    let warm = ws.build(&[&cache, "--remote_instance_name=some/instance"]);
    assert_all_hits(&ws, &warm);
    assert_same_outputs(&cold, &warm);

    // Same actions, other instances: nothing is shared.
    for other in ["--remote_instance_name=other/instance", "--remote_instance_name="] {
        ws.clean();
        let isolated = ws.build(&[&cache, other]);
        assert_eq!(isolated.hits(), (0, ws.action_count()), "{other} must not see some/instance's results");
    }

    ws.shutdown();
    assert_no_server_errors(&server);
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_read_only_client_gets_all_hits_from_a_fresh_output_base() {
    let server = ServerProcess::start_plaintext();
    let mut ws = BazelWorkspace::new();
    let cache = server.remote_cache_flag();
    let read_only = "--remote_upload_local_results=false";

    // A read-only client on an empty cache builds everything locally...
    let reader_cold = ws.build(&[&cache, read_only]);
    assert_cold(&ws, &reader_cold);
    let calls = reader_cold.call_counts();
    assert_eq!(calls.get("UpdateActionResult"), None, "a read-only client must not write results: {calls:?}");
    // It still uploads blobs: the outputs its build event stream names go to
    // the CAS (RequestMetadata action_id "bes-upload").
    for call in reader_cold.run.grpc_calls().iter().filter(|c| c.method() == "Write") {
        assert_eq!(call.metadata.as_ref().unwrap().action_id, "bes-upload", "{call:?}");
    }

    // ...and leaves nothing behind: the writer, on its own machine, starts cold.
    ws.fresh_output_base();
    let writer = ws.build(&[&cache]);
    assert_cold(&ws, &writer);

    // A developer's fresh checkout, read-only, gets everything from the cache.
    ws.fresh_output_base();
    let reader = ws.build(&[&cache, read_only]);
    assert_all_hits(&ws, &reader);
    assert_same_outputs(&writer, &reader);

    ws.shutdown();
    assert_no_server_errors(&server);
}

//! `provcache serve --config` and `--check-config` on the real binary, and
//! its JSON logs (docs/configuration.md).

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use provcache::proto::reapi;

use crate::common::{sha, update, with_request_metadata, ServerProcess};

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

/// Runs `serve` and `serve --check-config` with `args` (plaintext, a port
/// the OS picks, `data` as the data directory): both must refuse with
/// status 2 and one message containing every one of `expected`, creating nothing.
fn both_refuse(data: &Path, args: &[&str], expected: &[&str]) {
    for extra in [&[][..], &["--check-config"][..]] {
        let mut all = vec!["serve", "--plaintext-insecure", "--listen", "127.0.0.1:0", "--data-dir"];
        all.push(data.to_str().unwrap());
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
    let args = ["--signing-key", key, "--trust-policy", policy];
    both_refuse(&tmp.path().join("data"), &args, &["--signing-key", key, "is not in the trust policy", policy]);
}

#[test]
fn a_mistyped_signing_key_path_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, policy) = provcache::access::pki::ensure_dev_signing(&tmp.path().join("keys")).unwrap();
    let typo = format!("{}.typo", key.display());
    let args = ["--signing-key", &typo, "--trust-policy", policy.to_str().unwrap()];
    both_refuse(&tmp.path().join("data"), &args, &["--signing-key", &typo]);
}

#[test]
fn a_data_dir_that_cannot_be_created_stops_serve_and_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let data = Path::new(&write(tmp.path(), "a-file", "")).join("data");
    let path = data.to_str().unwrap();
    both_refuse(&data, &[], &["data_dir (--data-dir)", path, "is not a directory"]);
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

//! What the real binary writes to its log: no colour codes off a terminal,
//! one `principal=` per call, TLS handshake failures, the access log.

use crate::common::*;

/// The server with `NO_COLOR` emptied (colours would be allowed) and stderr
/// to a file: still no escape code, because stderr is not a terminal.
#[tokio::test]
async fn a_log_that_is_not_a_terminal_has_no_colour_codes() {
    let mut server = ServerProcess::start_with_env(["--plaintext-insecure"], vec![("NO_COLOR".into(), "".into())]);
    server
        .clients()
        .await
        .caps
        .get_capabilities(provcache::proto::reapi::GetCapabilitiesRequest::default())
        .await
        .unwrap();
    server.stop();
    let log = server.log();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\u{1b}'), "an ESC byte in a log written to a file:\n{log}");
}

/// Polls the server's log until `found` holds (the server writes it from
/// another process); the log, or a panic naming what was missing.
async fn wait_for_log(server: &ServerProcess, what: &str, found: impl Fn(&str) -> bool) -> String {
    for _ in 0..200 {
        let log = server.log();
        if found(&log) {
            return log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("no {what} in the log:\n{}", server.log());
}

/// The reader may read instance "a" only: a read of "b" passes the
/// transport's check (some instance) and is refused by the handler, so the
/// call is authorized twice and its refusal is logged in the request span.
#[tokio::test]
async fn the_request_span_names_the_principal_once() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.toml");
    let reader = "spiffe://provcache.dev/reader";
    let rule = format!(
        "[[rules]]\nname = \"a\"\nprincipals = [\"{reader}\"]\ninstances = [\"a\"]\npermissions = [\"ac:read\"]\n"
    );
    std::fs::write(&policy, rule).unwrap();
    let mut server = ServerProcess::start(["--authz-policy".to_string(), policy.display().to_string()]);
    let mut c = Clients::new(server.dev_channel("reader").await);
    assert_eq!(c.lookup("b", &sha(b"action")).await.unwrap_err(), tonic::Code::PermissionDenied);
    let log = wait_for_log(&server, "call refused", |l| l.contains("call refused")).await;
    server.stop();
    let line = log.lines().find(|l| l.contains("call refused")).unwrap();
    assert_eq!(line.matches("principal=").count(), 1, "{line}");
    assert!(line.contains(reader), "{line}");
}

#[tokio::test]
async fn a_client_of_an_unknown_ca_leaves_a_warning_with_its_address_and_the_reason() {
    let mut server = ServerProcess::start(Vec::<String>::new());
    let certs = tempfile::tempdir().unwrap();
    let foreign = CertFiles::sign(
        &other_ca(),
        &client_params("writer", vec![uri("spiffe://provcache.dev/writer")]),
        certs.path(),
        "x",
    );
    let refused = match tls_channel(server.addr(), &server.pki_dir(), Some(&foreign)).await {
        Err(_) => true,
        Ok(ch) => Clients::new(ch)
            .caps
            .get_capabilities(provcache::proto::reapi::GetCapabilitiesRequest::default())
            .await
            .is_err(),
    };
    assert!(refused);
    let log = wait_for_log(&server, "handshake warning", |l| l.contains("TLS handshake failed")).await;
    server.stop();
    let line = log.lines().find(|l| l.contains("TLS handshake failed")).unwrap();
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("reason=\"unknown_ca\""), "{line}");
}

#[tokio::test]
async fn the_access_log_has_one_line_per_finished_call_only_when_asked() {
    for on in [false, true] {
        let args: Vec<String> = if on { vec!["--access-log".into()] } else { vec![] };
        let mut server = ServerProcess::start(args);
        let mut c = Clients::new(server.dev_channel("reader").await);
        assert_eq!(c.lookup("main", &sha(b"action")).await.unwrap_err(), tonic::Code::NotFound);
        if on {
            wait_for_log(&server, "access line", |l| l.contains("call finished")).await;
        }
        server.stop();
        let log = server.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("provcache::access")).collect();
        if !on {
            assert!(lines.is_empty(), "{log}");
            continue;
        }
        assert_eq!(lines.len(), 1, "{log}");
        let line = lines[0];
        for part in [
            " INFO ",
            "rpc=\"ActionCache/GetActionResult\"",
            "instance=\"main\"",
            "principal=\"spiffe://provcache.dev/reader\"",
            "code=\"NOT_FOUND\"",
            "duration_ms=",
            "bytes_in=",
            "bytes_out=",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
    }
}

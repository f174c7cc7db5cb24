//! `--metrics-listen` and the standard gRPC health service.

use std::time::Duration;

use provcache::proto::reapi;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::*;

const AC: &str = "build.bazel.remote.execution.v2.ActionCache";
const BS: &str = "google.bytestream.ByteStream";

/// The value of one series (name with its labels, exactly as exposed); 0 if absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

async fn scrape(server: &TestServer) -> String {
    let (status, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert!(status.contains("200"), "{status}");
    body
}

#[tokio::test]
async fn counters_move_after_real_calls() {
    let server = TestServer::start_opts(TestOptions {
        metrics: true,
        max_size: Some(256 * 1024),
        touch_interval: Some(Duration::ZERO),
        ..Default::default()
    })
    .await;
    let mut c = server.clients().await;
    let before = scrape(&server).await;
    let hit_series =
        format!("provcache_grpc_requests_total{{service=\"{AC}\",method=\"GetActionResult\",code=\"OK\"}}");
    assert_eq!(value(&before, &hit_series), 0.0);

    // A miss, then a stored result and a hit.
    let action = upload_action(&mut c, "", "metrics").await;
    assert_eq!(c.lookup("", &action).await.unwrap_err(), Code::NotFound);
    let out = c.upload("", &[b"output"]).await.remove(0);
    let result = reapi::ActionResult { output_files: vec![output("o", &out)], ..Default::default() };
    c.update_result("", &action, result).await.unwrap();
    c.lookup("", &action).await.unwrap();
    // 40 KiB through ByteStream, both ways; then enough more to evict.
    let data = noise(40 * 1024, 7);
    let d = sha(&data);
    c.write(&format!("uploads/7c5c2c0e-8a55-4d4e-9b1e-0d6f7f1a2b3c/blobs/{}", rn(&d)), &data, 16 * 1024).await.unwrap();
    assert_eq!(c.read(&format!("blobs/{}", rn(&d)), 0, 0).await.unwrap(), data);
    for i in 0..10 {
        c.upload("", &[&noise(32 * 1024, 100 + i)]).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let m = scrape(&server).await;
    assert_eq!(value(&m, &hit_series), 1.0, "{m}");
    let miss =
        format!("provcache_grpc_requests_total{{service=\"{AC}\",method=\"GetActionResult\",code=\"NOT_FOUND\"}}");
    assert_eq!(value(&m, &miss), 1.0);
    assert_eq!(value(&m, "provcache_action_cache_lookups_total{result=\"hit\"}"), 1.0);
    assert_eq!(value(&m, "provcache_action_cache_lookups_total{result=\"miss\"}"), 1.0);
    let count = format!("provcache_grpc_request_duration_seconds_count{{service=\"{AC}\",method=\"GetActionResult\"}}");
    assert_eq!(value(&m, &count), 2.0);
    let received = format!("provcache_grpc_received_bytes_total{{service=\"{BS}\",method=\"Write\"}}");
    assert!(value(&m, &received) > 40.0 * 1024.0, "{m}");
    let sent = format!("provcache_grpc_sent_bytes_total{{service=\"{BS}\",method=\"Read\"}}");
    assert!(value(&m, &sent) > 40.0 * 1024.0);
    assert_eq!(
        value(&m, &format!("provcache_grpc_requests_in_flight{{service=\"{AC}\",method=\"GetActionResult\"}}")),
        0.0
    );
    assert_eq!(value(&m, "provcache_verifications_total{outcome=\"verified\"}"), 1.0);
    assert_eq!(value(&m, "provcache_verification_failures_total{reason=\"unsigned\"}"), 0.0);
    assert!(m.contains("provcache_verification_failures_total{reason="), "every reason is exposed");
    assert_eq!(value(&m, "provcache_signatures_total"), 1.0);
    assert!(value(&m, "provcache_stored_bytes{kind=\"blob\"}") > 0.0);
    assert!(value(&m, "provcache_stored_bytes{kind=\"blob\"}") <= 256.0 * 1024.0);
    assert!(value(&m, "provcache_stored_records{kind=\"blob\"}") > 0.0);
    assert!(value(&m, "provcache_evictions_total{kind=\"blob\"}") > 0.0, "{m}");
    assert_eq!(value(&m, "provcache_max_size_bytes"), 256.0 * 1024.0);
    server.stop().await;
}

#[tokio::test]
async fn denied_calls_are_counted_by_permission_and_reason() {
    let server = TestServer::start_opts(TestOptions { tls: true, metrics: true, ..Default::default() }).await;
    let mut reader = server.dev_clients("reader").await;
    let err = reader
        .ac
        .update_action_result(reapi::UpdateActionResultRequest {
            action_digest: Some(sha(b"a")),
            action_result: Some(Default::default()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // Capabilities asks whether the reader may write: a probe, not a denial.
    reader.caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap();
    let m = scrape(&server).await;
    assert_eq!(
        value(&m, "provcache_denied_calls_total{permission=\"ac:write\",reason=\"permission_denied\"}"),
        1.0,
        "{m}"
    );
    let code = format!(
        "provcache_grpc_requests_total{{service=\"{AC}\",method=\"UpdateActionResult\",code=\"PERMISSION_DENIED\"}}"
    );
    assert_eq!(value(&m, &code), 1.0);
    server.stop().await;
}

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start_opts(TestOptions { tls: true, metrics: true, ..Default::default() }).await;
    let mut health = HealthClient::new(server.dev_channel("reader").await);
    for service in ["", AC, "build.bazel.remote.execution.v2.ContentAddressableStorage", BS] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status(), ServingStatus::Serving, "{service:?}");
    }
    let err = health.check(HealthCheckRequest { service: "no.such.Service".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let (status, body) = http_get(server.metrics_addr.unwrap(), "/healthz").await;
    assert!(status.contains("200") && body.contains("SERVING"), "{status} {body}");
    let (status, _) = http_get(server.metrics_addr.unwrap(), "/nothing").await;
    assert!(status.contains("404"), "{status}");
    server.stop().await;
}

#[tokio::test]
async fn dashboard_metrics_have_their_usual_names_and_move_with_real_calls() {
    let server = TestServer::start_opts(TestOptions { tls: true, metrics: true, ..Default::default() }).await;
    let mut c = server.dev_clients("reader").await;
    let handled = format!(
        "grpc_server_handled_total{{grpc_type=\"unary\",grpc_service=\"{AC}\",grpc_method=\"GetActionResult\",grpc_code=\"NotFound\"}}"
    );
    let failures = "provcache_tls_handshake_failures_total{reason=\"unknown_ca\"}";
    let before = scrape(&server).await;
    assert_eq!(c.lookup("", &sha(b"dashboards")).await.unwrap_err(), Code::NotFound);
    let certs = tempfile::tempdir().unwrap();
    let foreign =
        CertFiles::sign(&other_ca(), &client_params("w", vec![uri("spiffe://provcache.dev/w")]), certs.path(), "x");
    if let Ok(ch) = tls_channel(server.addr, &server.pki_dir(), Some(&foreign)).await {
        Clients::new(ch).caps.get_capabilities(reapi::GetCapabilitiesRequest::default()).await.unwrap_err();
    }
    let m = scrape(&server).await;
    assert_eq!(value(&m, &handled) - value(&before, &handled), 1.0, "{m}");
    let started = format!(
        "grpc_server_started_total{{grpc_type=\"unary\",grpc_service=\"{AC}\",grpc_method=\"GetActionResult\"}}"
    );
    assert!(value(&m, &started) >= 1.0, "{m}");
    let seconds = format!(
        "grpc_server_handling_seconds_count{{grpc_type=\"unary\",grpc_service=\"{AC}\",grpc_method=\"GetActionResult\"}}"
    );
    assert!(value(&m, &seconds) >= 1.0, "{m}");
    assert!(value(&m, failures) > value(&before, failures), "{m}");
    for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds", "process_max_fds"] {
        assert!(value(&m, name) > 0.0, "{name} in {m}");
    }
    assert!(value(&m, "process_start_time_seconds") > 1.6e9, "{m}");
    let version = format!("provcache_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&m, &version), 1.0, "{m}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for which in ["server", "client_ca"] {
        let series = format!("provcache_tls_certificate_expiry_timestamp_seconds{{certificate=\"{which}\"}}");
        assert!(value(&m, &series) > now, "{series} in {m}");
    }
    assert!(m.contains("provcache_grpc_requests_total{"), "provcache's own stay");
    server.stop().await;
}

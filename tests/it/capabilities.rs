use provcache::proto::reapi::{self, compressor, digest_function};
use tonic::Code;

use crate::common::*;

#[tokio::test]
async fn capabilities_advertise_a_cache_with_real_limits() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    let caps = c
        .caps
        .get_capabilities(reapi::GetCapabilitiesRequest { instance_name: String::new() })
        .await
        .unwrap()
        .into_inner();
    let cache = caps.cache_capabilities.unwrap();
    assert_eq!(
        cache.digest_functions,
        vec![digest_function::Value::Sha256 as i32, digest_function::Value::Blake3 as i32]
    );
    assert_eq!(cache.max_batch_total_size_bytes, 4 * 1024 * 1024);
    assert_eq!(cache.supported_compressors, vec![compressor::Value::Zstd as i32]);
    assert_eq!(cache.supported_batch_update_compressors, vec![compressor::Value::Zstd as i32]);
    assert_ne!(cache.symlink_absolute_path_strategy, 0);
    assert!(cache.action_cache_update_capabilities.unwrap().update_enabled);
    assert!(caps.execution_capabilities.is_none());
    let low = caps.low_api_version.unwrap();
    let high = caps.high_api_version.unwrap();
    assert_eq!((low.major, low.minor), (2, 0));
    assert_eq!(high.major, 2);
}

#[tokio::test]
async fn bad_instance_names_are_invalid_arguments() {
    let server = TestServer::start().await;
    let mut c = server.clients().await;
    for bad in ["a/blobs", "/x", "x//y"] {
        let err =
            c.caps.get_capabilities(reapi::GetCapabilitiesRequest { instance_name: bad.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
    }
}

#[tokio::test]
async fn execution_is_unimplemented() {
    let server = TestServer::start().await;
    let mut exec = reapi::execution_client::ExecutionClient::new(server.channel().await);
    let err =
        exec.execute(reapi::ExecuteRequest { action_digest: Some(sha(b"x")), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let err = exec.wait_execution(reapi::WaitExecutionRequest { name: "op".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

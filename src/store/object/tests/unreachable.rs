//! A bucket that cannot be reached: every request fails as a network error
//! would, so the backends' answers to an outage can be checked.

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

use crate::cache::resource::InstanceName;
use crate::store::object::{Bucket, ObjectBlobs, ObjectOptions, Op};
use crate::store::BlobStore;

#[derive(Debug)]
struct Unreachable;

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Unreachable")
    }
}

fn refused<T>() -> Result<T> {
    Err(object_store::Error::Generic { store: "S3", source: "connection refused".into() })
}

#[async_trait]
impl ObjectStore for Unreachable {
    async fn put_opts(&self, _: &Path, _: PutPayload, _: PutOptions) -> Result<PutResult> {
        refused()
    }

    async fn put_multipart_opts(&self, _: &Path, _: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        refused()
    }

    async fn get_opts(&self, _: &Path, _: GetOptions) -> Result<GetResult> {
        refused()
    }

    fn delete_stream(&self, _: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        Box::pin(futures::stream::once(async { refused() }))
    }

    fn list(&self, _: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        Box::pin(futures::stream::once(async { refused() }))
    }

    async fn list_with_delimiter(&self, _: Option<&Path>) -> Result<ListResult> {
        refused()
    }

    async fn copy_opts(&self, _: &Path, _: &Path, _: CopyOptions) -> Result<()> {
        refused()
    }
}

#[tokio::test]
async fn an_unreachable_bucket_is_unavailable_and_counted_never_absent() {
    let bucket = Bucket::new(std::sync::Arc::new(Unreachable), ObjectOptions::default());
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let err = blobs.contains(&InstanceName::default(), &[super::digest(b"x")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("object store head of cas/"), "{err}");
    let head = stats.snapshot().op(Op::Head);
    assert_eq!((head.requests, head.errors), (1, 1));
}

#[test]
fn a_refused_or_unsupported_request_is_internal_and_says_what_to_fix_not_unavailable() {
    use crate::store::object::bucket::failed;
    let key = Path::from("cas/x");
    let source = || "403 Forbidden".into();
    let denied =
        failed(Op::Get, &key, object_store::Error::PermissionDenied { path: "cas/x".into(), source: source() });
    assert_eq!(denied.code(), tonic::Code::Internal);
    assert!(denied.to_string().contains("check the credentials and the bucket policy"), "{denied}");
    let unauthenticated =
        failed(Op::Get, &key, object_store::Error::Unauthenticated { path: "cas/x".into(), source: source() });
    assert_eq!(unauthenticated.code(), tonic::Code::Internal);
    let unsupported = failed(Op::Put, &key, object_store::Error::NotSupported { source: "no conditional put".into() });
    assert_eq!(unsupported.code(), tonic::Code::Internal);
    assert!(unsupported.to_string().contains("not supported by this object store"), "{unsupported}");
    let down = failed(Op::Get, &key, object_store::Error::Generic { store: "S3", source: "connection refused".into() });
    assert_eq!(down.code(), tonic::Code::Unavailable, "a transport failure stays retryable");
}

#[tokio::test]
async fn while_the_probe_gets_no_answer_requests_fail_at_once_without_being_sent() {
    let health = std::sync::Arc::new(crate::observe::store_health::StoreHealth::default());
    let (_, bucket, _) = super::bucket();
    let bucket = bucket.with_health(health.clone());
    let stats = bucket.stats();
    let blobs = ObjectBlobs::new(bucket);
    let i = InstanceName::default();
    health.record(false);
    let err = blobs.contains(&i, &[super::digest(b"x")]).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.to_string().contains("unavailable (the health probe gets no answer)"), "{err}");
    assert_eq!(stats.snapshot().op(Op::Head).requests, 0, "nothing waits on a store known down");
    health.record(true);
    assert_eq!(blobs.contains(&i, &[super::digest(b"x")]).await.unwrap(), vec![false], "recovery needs no restart");
}

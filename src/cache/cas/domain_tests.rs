//! The CAS and upload rules, run against the in-memory store: no server,
//! no disk.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::*;
use crate::cache::resource::WriteResource;
use crate::cache::upload::{Uploads, WriteOutcome, WRITE_PIECE};
use crate::limits::{LimitHits, Limits};
use crate::store::memory::MemoryStore;

fn instance() -> InstanceName {
    InstanceName::parse("main").unwrap()
}

fn digest(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

fn cas() -> (MemoryStore, Cas) {
    let store = MemoryStore::new(Some(10 << 20));
    (store.clone(), Cas::new(Arc::new(store)))
}

fn enforcer() -> Enforcer {
    Enforcer::new(Arc::new(Limits::default()), Arc::new(LimitHits::default()), "tester")
}

async fn read_all(cas: &Cas, d: Digest, offset: u64, limit: u64) -> Result<Vec<Bytes>> {
    let mut pieces = cas.read(&instance(), d, offset, limit, None).await?;
    let mut out = Vec::new();
    while let Some(piece) = pieces.next().await {
        out.push(piece?);
    }
    Ok(out)
}

#[tokio::test]
async fn find_missing_names_only_absent_blobs_and_never_the_empty_one() {
    let (_, cas) = cas();
    let (here, gone, empty) = (digest(b"here"), digest(b"gone"), digest(b""));
    cas.put(&instance(), here, Bytes::from_static(b"here")).await.unwrap();
    let missing = cas.find_missing(&instance(), vec![here, gone, empty, gone]).await.unwrap();
    assert_eq!(missing, vec![gone]);
    assert!(cas.contains(&instance(), here).await.unwrap());
    let other = InstanceName::parse("other").unwrap();
    assert_eq!(cas.find_missing(&other, vec![here]).await.unwrap(), vec![here], "instances are separate");
}

#[tokio::test]
async fn a_stored_blob_reads_back_and_bytes_that_do_not_match_their_digest_are_refused() {
    let (store, cas) = cas();
    let d = digest(b"data");
    cas.put(&instance(), d, Bytes::from_static(b"data")).await.unwrap();
    assert_eq!(cas.get(&instance(), d, 100).await.unwrap().unwrap(), &b"data"[..]);
    let wrong = cas.put(&instance(), digest(b"other"), Bytes::from_static(b"bytes")).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::InvalidArgument);
    assert!(!store.holds(&instance(), digest(b"other")));
    assert_eq!(cas.get(&instance(), digest(b"absent"), 100).await.unwrap(), None);
}

#[tokio::test]
async fn a_stored_blob_that_does_not_match_its_digest_is_data_loss_and_removed() {
    let (store, cas) = cas();
    let (a, b) = (digest(b"aaaa"), digest(b"bbbb"));
    for d in [a, b] {
        store.insert_unchecked(&instance(), d, Bytes::from_static(b"rot!"));
    }
    let whole = cas.get(&instance(), a, 100).await.unwrap_err();
    assert_eq!(whole.code(), tonic::Code::DataLoss);
    assert!(!store.holds(&instance(), a), "removed, so the client uploads it again");
    let ranged = read_all(&cas, b, 1, 2).await.unwrap_err();
    assert_eq!(ranged.code(), tonic::Code::DataLoss);
    assert!(!store.holds(&instance(), b));
}

#[tokio::test]
async fn a_ranged_read_returns_exactly_the_range_and_an_empty_range_one_empty_piece() {
    let (_, cas) = cas();
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    let d = digest(&data);
    cas.put(&instance(), d, Bytes::from(data.clone())).await.unwrap();
    assert_eq!(read_all(&cas, d, 10, 20).await.unwrap().concat(), &data[10..30]);
    assert_eq!(read_all(&cas, d, 990, 0).await.unwrap().concat(), &data[990..], "limit 0: to the end");
    assert_eq!(read_all(&cas, d, 1000, 0).await.unwrap(), vec![Bytes::new()]);
    assert_eq!(read_all(&cas, digest(b""), 0, 0).await.unwrap(), vec![Bytes::new()]);
    assert_eq!(read_all(&cas, d, 1001, 0).await.unwrap_err().code(), tonic::Code::OutOfRange);
    assert_eq!(read_all(&cas, digest(b"absent"), 0, 0).await.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn a_blob_that_can_never_fit_is_refused_before_upload() {
    let (_, cas) = cas();
    assert_eq!(cas.check_fits(11 << 20).unwrap_err().code(), tonic::Code::ResourceExhausted);
    assert!(cas.check_fits(10 << 20).is_ok());
}

/// Feeds `data` to a new upload of `claimed` in three writes, the last one
/// finishing it.
async fn upload(store: &MemoryStore, claimed: Digest, data: &[u8]) -> Result<Option<WriteOutcome>> {
    let uploads = Uploads::new(Arc::new(store.clone()), &Limits::default());
    let resource = WriteResource { instance: instance(), upload_id: "u1".into(), digest: claimed, compressor: None };
    let limits = enforcer();
    let session = uploads.session(&resource, &limits)?;
    let mut session = session.lock().await;
    let third = data.len() / 3;
    let mut outcome = None;
    for (i, part) in [&data[..third], &data[third..2 * third], &data[2 * third..]].into_iter().enumerate() {
        let offset = session.committed();
        outcome = uploads.feed(&mut session, offset, Bytes::copy_from_slice(part), i == 2, &limits).await?;
    }
    assert_eq!(uploads.len(), 0, "a finished or failed upload leaves the table");
    Ok(outcome)
}

#[tokio::test]
async fn an_upload_is_stored_when_its_digest_matches_and_leaves_nothing_when_it_does_not() {
    let store = MemoryStore::new(None);
    let data: Vec<u8> = (0..WRITE_PIECE * 2 + 77).map(|i| (i % 251) as u8).collect();
    let d = digest(&data);
    let outcome = upload(&store, d, &data).await.unwrap();
    assert_eq!(outcome, Some(WriteOutcome::Complete(data.len() as i64)));
    assert_eq!(Cas::new(Arc::new(store.clone())).get(&instance(), d, u64::MAX).await.unwrap().unwrap(), data);

    let mut tampered = data.clone();
    tampered[WRITE_PIECE + 5] ^= 1;
    let claimed = digest(&tampered);
    let refused = upload(&store, claimed, &data).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(!store.holds(&instance(), claimed), "the aborted upload stored nothing");
}

/// An upload of `data` (more than one piece, so the store's writer is open
/// before the end) into `store`, fed all but its last byte.
async fn started_upload(
    store: Arc<dyn crate::store::BlobStore>,
    data: &[u8],
) -> (Uploads, WriteResource, Arc<tokio::sync::Mutex<crate::cache::upload::Session>>) {
    let uploads = Uploads::new(store, &Limits::default());
    let resource =
        WriteResource { instance: instance(), upload_id: "u2".into(), digest: digest(data), compressor: None };
    let session = uploads.session(&resource, &enforcer()).unwrap();
    let head = Bytes::copy_from_slice(&data[..data.len() - 1]);
    uploads.feed(&mut *session.lock().await, 0, head, false, &enforcer()).await.unwrap();
    (uploads, resource, session)
}

#[tokio::test]
async fn an_upload_whose_commit_finds_the_store_unavailable_is_dropped_so_the_client_restarts_at_zero() {
    let store = Arc::new(crate::store::replica::faults::FaultyBlobs::default());
    let data: Vec<u8> = (0..WRITE_PIECE * 2 + 9).map(|i| (i % 241) as u8).collect();
    let (uploads, resource, session) = started_upload(store.clone(), &data).await;
    let last = Bytes::copy_from_slice(&data[data.len() - 1..]);
    let offset = (data.len() - 1) as i64;

    store.faults.switch_off(true);
    let error = uploads.feed(&mut *session.lock().await, offset, last, true, &enforcer()).await.unwrap_err();

    assert_eq!(error.code(), tonic::Code::Unavailable, "the client must see a retryable error");
    assert_eq!(uploads.progress(&resource, "tester"), None, "QueryWriteStatus must answer NOT_FOUND");
    store.faults.switch_off(false);
    let again = uploads.session(&resource, &enforcer()).unwrap();
    let whole = Bytes::from(data.clone());
    let outcome = uploads.feed(&mut *again.lock().await, 0, whole, true, &enforcer()).await.unwrap();
    assert_eq!(outcome, Some(WriteOutcome::Complete(data.len() as i64)));
    assert!(store.inner.holds(&instance(), resource.digest));
}

#[tokio::test]
async fn a_resumed_write_the_server_holds_no_bytes_of_is_aborted_so_the_client_asks_and_restarts() {
    let store = MemoryStore::new(None);
    let uploads = Uploads::new(Arc::new(store.clone()), &Limits::default());
    let data = b"the first half went to another replica";
    let resource =
        WriteResource { instance: instance(), upload_id: "u3".into(), digest: digest(data), compressor: None };
    let session = uploads.session(&resource, &enforcer()).unwrap();
    let rest = Bytes::copy_from_slice(&data[10..]);

    let error = uploads.feed(&mut *session.lock().await, 10, rest, true, &enforcer()).await.unwrap_err();

    assert_eq!(error.code(), tonic::Code::Aborted, "Bazel retries ABORTED, not INVALID_ARGUMENT");
    assert_eq!(uploads.progress(&resource, "tester"), None, "QueryWriteStatus must answer NOT_FOUND");
    assert!(!store.holds(&instance(), resource.digest));
}

#[tokio::test]
async fn a_batch_over_a_slow_store_runs_its_blobs_at_once_and_answers_each_in_request_order() {
    let store = Arc::new(crate::store::replica::faults::FaultyBlobs::default());
    let cas = Cas::new(store.clone());
    let texts: Vec<Vec<u8>> = (0..20).map(|i| format!("batched blob {i}").into_bytes()).collect();
    let mut blobs: Vec<BatchBlob> = texts
        .iter()
        .map(|t| BatchBlob { digest: Ok(digest(t)), data: Bytes::copy_from_slice(t), compressor: None })
        .collect();
    let liar = BatchBlob { digest: Ok(digest(b"claimed")), data: Bytes::from_static(b"other"), compressor: None };
    blobs.insert(3, liar);
    store.faults.slow(true);

    let stored = cas.batch_update(&instance(), blobs, &enforcer()).await.unwrap();
    let mut digests: Vec<Digest> = texts.iter().map(|t| digest(t)).collect();
    digests.insert(5, digest(b"never stored"));
    let read = cas.batch_read(&instance(), &digests, false).await.unwrap();

    let codes: Vec<Option<tonic::Code>> = stored.iter().map(|r| r.as_ref().err().map(|e| e.code())).collect();
    let mut expected = vec![None; 21];
    expected[3] = Some(tonic::Code::InvalidArgument);
    assert_eq!(codes, expected);
    assert_eq!(read[5].as_ref().unwrap_err().code(), tonic::Code::NotFound);
    let found: Vec<Vec<u8>> = read.into_iter().filter_map(|r| r.ok()).map(|(data, _)| data.to_vec()).collect();
    assert_eq!(found, texts, "blobs come back in request order");
    assert_eq!(store.faults.most_at_once(), 16, "a batch must neither run sequentially nor unbounded");
}

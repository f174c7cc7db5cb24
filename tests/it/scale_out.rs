//! Stateless replicas over one bucket (issue 16): real `provcache serve
//! --store s3://...` processes, each with its own data directory, on a real
//! SeaweedFS (tests/setup.sh installs it). What one replica acknowledges,
//! every other one sees; what the bucket holds is never trusted; what a
//! crash leaves half-written never becomes visible.
//!
//! One SeaweedFS serves the suite, a bucket per test; only the outage test
//! starts (and stops) its own.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore as _, ObjectStoreExt as _, PutPayload};
use provcache::proto::google::bytestream::{QueryWriteStatusRequest, WriteResponse};
use provcache::proto::reapi;
use provcache::provenance::signing::SigningKey;
use provcache::provenance::trust::KeyState;
use provcache::store::object::client;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use crate::common::*;

/// The key prefix every replica of a test shares inside its bucket.
pub(crate) const PREFIX: &str = "replicas";
/// How long the AC copy of a replica lives in these tests (`[storage] ac_ttl`).
pub(crate) const AC_TTL: Duration = Duration::from_secs(1);
/// Bound on waiting for a change to reach every replica (TTL, policy reload).
pub(crate) const SETTLE: Duration = Duration::from_secs(15);

/// Repeats `$check` (an async bool) until it holds, failing after [`SETTLE`].
macro_rules! until {
    ($what:expr, $check:expr) => {{
        let start = Instant::now();
        while !$check.await {
            assert!(start.elapsed() < SETTLE, "not within {SETTLE:?}: {}", $what);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }};
}

/// Two signing keys in files and one trust policy file all replicas read.
pub(crate) struct Keys {
    dir: tempfile::TempDir,
    pub(crate) keys: [SigningKey; 2],
}

impl Keys {
    /// Keys 1 and 2, both active in the shared trust policy.
    pub(crate) fn new() -> Keys {
        let keys = Keys { dir: tempfile::tempdir().unwrap(), keys: [generate(), generate()] };
        for (i, key) in keys.keys.iter().enumerate() {
            write_atomically(&keys.key_file(i), &pem(key));
        }
        keys.set_policy(1, [KeyState::Active, KeyState::Active]);
        keys
    }

    pub(crate) fn key_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("key{}.pem", i + 1))
    }

    pub(crate) fn policy_file(&self) -> PathBuf {
        self.dir.path().join("trust-policy.toml")
    }

    /// Rewrites the shared trust policy with each key's state.
    pub(crate) fn set_policy(&self, version: u64, states: [KeyState; 2]) {
        let entries = [("key-1", &self.keys[0], states[0]), ("key-2", &self.keys[1], states[1])];
        write_atomically(&self.policy_file(), policy_toml(version, &entries).as_bytes());
    }
}

fn generate() -> SigningKey {
    SigningKey::generate().unwrap()
}

/// Replica `i` (signing with key `i`) of `bucket`: plaintext gRPC, its own
/// data directory, the shared prefix and trust policy, a short AC TTL.
fn replica(bucket: &Bucket, keys: &Keys, i: usize) -> ServerProcess {
    replica_with(bucket, keys, i, ["--plaintext-insecure".to_owned()])
}

/// Replica `i` of `bucket` as [`replica`] makes it, but reached the way
/// `access` says (`--plaintext-insecure`, or an mTLS PKI and its policy).
pub(crate) fn replica_with(
    bucket: &Bucket,
    keys: &Keys,
    i: usize,
    access: impl IntoIterator<Item = String>,
) -> ServerProcess {
    let config = keys.dir.path().join("replica.toml");
    let text = format!("store = {:?}\n\n[storage]\nac_ttl = \"{}ms\"\n", bucket.url(PREFIX), AC_TTL.as_millis());
    std::fs::write(&config, text).unwrap();
    let (key, policy) = (keys.key_file(i), keys.policy_file());
    let args = access.into_iter().chain([
        "--config".to_owned(),
        config.display().to_string(),
        "--signing-key".to_owned(),
        key.display().to_string(),
        "--trust-policy".to_owned(),
        policy.display().to_string(),
    ]);
    ServerProcess::start_with_env(args, bucket.env())
}

/// Replicas A and B of a new bucket on the shared SeaweedFS.
fn two_replicas(test: &str) -> (Bucket, Keys, ServerProcess, ServerProcess) {
    let bucket = Seaweed::shared().bucket(test);
    let keys = Keys::new();
    let a = replica(&bucket, &keys, 0);
    let b = replica(&bucket, &keys, 1);
    (bucket, keys, a, b)
}

/// Every key under `dir` (e.g. `cas`, `ac`) of the replicas' prefix.
pub(crate) async fn keys_under(bucket: &Bucket, dir: &str) -> Vec<String> {
    let store = bucket.store(PREFIX);
    let listed: Vec<_> = store.list(Some(&ObjectPath::from(dir))).try_collect().await.unwrap();
    listed.into_iter().map(|m| m.location.to_string()).collect()
}

pub(crate) fn blob_name(d: &reapi::Digest) -> String {
    format!("blobs/{}", rn(d))
}

#[tokio::test]
async fn the_seaweedfs_harness_stores_lists_and_returns_an_object_through_the_client() {
    let bucket = Seaweed::shared().bucket("harness");
    let scoped = bucket.store("some/prefix");
    let path = ObjectPath::from("dir/object");
    scoped.put(&path, PutPayload::from_static(b"hello bucket")).await.unwrap();
    let got = scoped.get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from_static(b"hello bucket"));
    // The prefix is a real key prefix in the bucket, seen from its root.
    let root = bucket.store("");
    let listed: Vec<_> = root.list(None).try_collect().await.unwrap();
    let names: Vec<String> = listed.iter().map(|m| m.location.to_string()).collect();
    assert_eq!(names, ["some/prefix/dir/object"]);
    let err = scoped.get(&ObjectPath::from("dir/absent")).await.unwrap_err();
    assert!(matches!(err, object_store::Error::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_stopped_seaweedfs_refuses_requests_and_after_a_restart_serves_what_it_held() {
    let mut seaweed = Seaweed::start();
    let bucket = seaweed.bucket("restart");
    let path = ObjectPath::from("kept");
    bucket.store("").put(&path, PutPayload::from_static(b"kept across restarts")).await.unwrap();
    seaweed.stop();
    assert!(bucket.store("").get(&path).await.is_err(), "a stopped store answers nothing");
    seaweed.restart();
    let got = bucket.store("").get(&path).await.unwrap().bytes().await.unwrap();
    assert_eq!(got, Bytes::from_static(b"kept across restarts"));
}

#[tokio::test]
async fn a_missing_bucket_stops_serve_with_one_message_naming_it_and_the_endpoint() {
    let bucket = Bucket { name: "provcache-no-such-bucket".into(), ..Seaweed::shared().bucket("exists") };
    let settings = bucket.settings(PREFIX);
    assert!(client::check_bucket(&Seaweed::shared().bucket("exists").store(PREFIX), &settings).await.is_ok());
    let msg = client::check_bucket(&bucket.store(PREFIX), &settings).await.unwrap_err().to_string();
    assert!(msg.contains("s3://provcache-no-such-bucket/replicas"), "{msg}");
    assert!(msg.contains(&format!("endpoint {}", bucket.endpoint)), "{msg}");

    let data = tempfile::tempdir().unwrap();
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["serve", "--plaintext-insecure", "--listen", "127.0.0.1:0", "--store", &bucket.url(PREFIX)])
        .arg("--data-dir")
        .arg(data.path())
        .envs(bucket.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while serve.try_wait().unwrap().is_none() {
        if start.elapsed() > SETTLE {
            serve.kill().unwrap();
            panic!("serve started on a bucket that does not exist");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = serve.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("s3://provcache-no-such-bucket/replicas") && stderr.contains(&bucket.endpoint), "{stderr}");
    assert!(!stderr.contains(DUMMY_SECRET), "no credential in the message: {stderr}");
}

#[tokio::test]
async fn a_blob_written_through_a_is_found_and_read_through_b() {
    let (_bucket, _keys, a, b) = two_replicas("blob-a-to-b");
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let data = noise(3 << 20, 16);
    let small = b"a small blob".as_slice();
    let d = sha(&data);
    assert_eq!(ca.write(&format!("uploads/1/{}", blob_name(&d)), &data, 1 << 20).await.unwrap(), data.len() as i64);
    let ds = ca.upload("", &[small]).await.remove(0);
    assert!(cb.missing("", &[d.clone(), ds.clone()]).await.is_empty(), "B sees what A acknowledged");
    assert_eq!(cb.read(&blob_name(&d), 0, 0).await.unwrap(), data);
    assert_eq!(cb.read(&blob_name(&ds), 0, 0).await.unwrap(), small);
    assert_eq!(cb.read(&blob_name(&d), 1000, 10).await.unwrap(), &data[1000..1010], "a ranged read through B");
}

#[tokio::test]
async fn an_ac_entry_written_through_a_is_a_verified_hit_through_b() {
    let (_bucket, _keys, a, b) = two_replicas("ac-a-to-b");
    let mut ca = a.clients().await;
    let (action, out) = ca.store_entry("", "replicated").await;
    let hit = b.clients().await.lookup("", &action).await.expect("B serves A's entry");
    assert_eq!(hit.output_files[0].digest.as_ref(), Some(&out));
    let other = upload_action(&mut ca, "", "never-written").await;
    assert_eq!(b.clients().await.lookup("", &other).await.unwrap_err(), Code::NotFound);
}

#[tokio::test]
async fn an_ac_object_altered_in_the_bucket_is_a_miss_on_every_replica_once_ac_ttl_passes() {
    let (bucket, _keys, a, b) = two_replicas("ac-tamper");
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let (action, _) = ca.store_entry("", "tampered").await;
    ca.lookup("", &action).await.expect("a hit on A before");
    cb.lookup("", &action).await.expect("a hit on B before");

    let ac = keys_under(&bucket, "ac").await;
    assert_eq!(ac.len(), 1, "one AC object for one entry: {ac:?}");
    let store = bucket.store(PREFIX);
    let path = ObjectPath::from(ac[0].as_str());
    let mut bytes = store.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    store.put(&path, PutPayload::from(bytes)).await.unwrap();

    until!("A misses the altered entry", async { ca.lookup("", &action).await == Err(Code::NotFound) });
    until!("B misses the altered entry", async { cb.lookup("", &action).await == Err(Code::NotFound) });
    tokio::time::sleep(AC_TTL * 2).await;
    assert_eq!(ca.lookup("", &action).await.unwrap_err(), Code::NotFound, "and it stays a miss");
}

/// Runs verify-build over `invocation` against `server`, with `client`'s
/// extra arguments (an mTLS identity, `--reader`), until it has audited
/// `hits` hits (the hit log is written after the reply).
pub(crate) async fn audit_invocation(
    server: &ServerProcess,
    keys: &Keys,
    invocation: &str,
    hits: usize,
    client: &[String],
) -> String {
    let expected = format!("{hits} cache hits audited: {hits} verified, 0 failed");
    let start = Instant::now();
    loop {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_provcache"))
            .args(["verify-build", "--server", &server.url(), "--invocation", invocation, "--policy"])
            .arg(keys.policy_file())
            .args(client)
            .output()
            .await
            .expect("running verify-build");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && stdout.contains(&expected) {
            return stdout;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(start.elapsed() < SETTLE, "verify-build against {}: {}\n{stdout}\n{stderr}", server.url(), out.status);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn verify_build_sees_every_hit_of_an_invocation_served_half_by_a_and_half_by_b_on_either_replica() {
    let (_bucket, keys, a, b) = two_replicas("audit-halves");
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let invocation = "build-served-by-two-replicas";
    for i in 0..4 {
        let salt = format!("half-{i}");
        let (action, _) = ca.store_entry("", &salt).await;
        let reader = if i % 2 == 0 { &mut ca } else { &mut cb };
        reader.lookup_as("", &action, &request_metadata(invocation, "Genrule", &salt)).await.unwrap();
    }
    for server in [&a, &b] {
        let report = audit_invocation(server, &keys, invocation, 4, &[]).await;
        assert!(report.contains(invocation), "{report}");
    }
}

#[tokio::test]
async fn kill9_of_a_in_the_middle_of_a_40_mib_upload_leaves_no_cas_object_and_b_reports_it_missing() {
    let (bucket, _keys, mut a, b) = two_replicas("kill-mid-upload");
    let mut ca = a.clients().await;
    // The control: an acknowledged blob is under cas/, so the listing can see one.
    let small = ca.upload("", &[b"acknowledged before the crash"]).await.remove(0);
    let listed = keys_under(&bucket, "cas").await;
    assert!(listed.iter().any(|k| k.contains(&small.hash)), "the acknowledged blob is in the bucket: {listed:?}");

    let data = noise(40 << 20, 40);
    let d = sha(&data);
    let requests = write_requests(&format!("uploads/crash/{}", blob_name(&d)), &data, 1 << 20, 0, true);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut bs = ca.bs.clone();
    let upload = tokio::spawn(async move { bs.write(ReceiverStream::new(rx)).await.map(|r| r.into_inner()) });
    for request in requests.into_iter().take(20) {
        tx.send(request).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.kill9();
    drop(tx);
    let outcome: Result<WriteResponse, tonic::Status> = upload.await.unwrap();
    assert!(outcome.is_err(), "half an upload is never acknowledged: {outcome:?}");

    let listed = keys_under(&bucket, "cas").await;
    assert!(!listed.iter().any(|k| k.contains(&d.hash)), "no object of the interrupted upload: {listed:?}");
    let mut cb = b.clients().await;
    assert_eq!(cb.missing("", std::slice::from_ref(&d)).await, vec![d.clone()], "B reports it missing");
    assert!(cb.missing("", &[small]).await.is_empty(), "and still has the acknowledged one");
}

#[tokio::test]
async fn an_entry_signed_by_a_retired_key_hits_everywhere_while_trusted_then_misses_everywhere() {
    let (_bucket, keys, a, b) = two_replicas("key-rotation");
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let (by_key_1, _) = ca.store_entry("", "signed-by-a").await;
    let (by_key_2, _) = cb.store_entry("", "signed-by-b").await;
    cb.lookup("", &by_key_1).await.expect("B trusts key 1, which signed A's entry");
    ca.lookup("", &by_key_2).await.expect("A trusts key 2, which signed B's entry");

    // Key 1 is retired from the trust policy every replica reads.
    keys.set_policy(2, [KeyState::Revoked, KeyState::Active]);
    until!("A misses the key-1 entry", async { ca.lookup("", &by_key_1).await == Err(Code::NotFound) });
    until!("B misses the key-1 entry", async { cb.lookup("", &by_key_1).await == Err(Code::NotFound) });
    cb.lookup("", &by_key_2).await.expect("key 2's entries still hit on B");
    ca.lookup("", &by_key_2).await.expect("key 2's entries still hit on A");
}

#[tokio::test]
async fn with_the_object_store_down_writes_fail_unavailable_cached_hits_are_served_and_writes_resume_after() {
    let mut seaweed = Seaweed::start();
    let bucket = seaweed.bucket("outage");
    let keys = Keys::new();
    let a = replica(&bucket, &keys, 0);
    let mut c = a.clients().await;
    let (action, out) = c.store_entry("", "before-the-outage").await;
    c.lookup("", &action).await.expect("a hit before the outage");
    assert_eq!(c.read(&blob_name(&out), 0, 0).await.unwrap(), b"output of before-the-outage");

    seaweed.stop();
    // A batch answers per blob (REAPI): the blob's status is UNAVAILABLE.
    let refused = c.batch_update("", &[b"written during the outage"]).await;
    assert_eq!(refused.unwrap(), vec![Code::Unavailable as i32], "a batched write during the outage");
    // A stream fails as a whole, and says why.
    let data = b"streamed during the outage";
    let status = c.write(&format!("uploads/outage/{}", blob_name(&sha(data))), data, 8).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("object store"), "the message names the object store: {status:?}");
    assert_eq!(c.read(&blob_name(&out), 0, 0).await.unwrap(), b"output of before-the-outage", "a local blob");
    c.lookup("", &action).await.expect("an entry cached on A is still a hit");

    seaweed.restart();
    until!("writes succeed again without restarting A", async {
        c.batch_update("", &[b"written after the outage"]).await.is_ok_and(|codes| codes == [0])
    });
}

#[tokio::test]
async fn a_resumable_upload_begun_on_a_is_unknown_to_b_until_it_is_committed() {
    let (_bucket, _keys, a, b) = two_replicas("resumable");
    let (mut ca, mut cb) = (a.clients().await, b.clients().await);
    let data = noise((2 << 20) + 77, 7);
    let d = sha(&data);
    let name = format!("uploads/resume-across/{}", blob_name(&d));
    let half = 1 << 20;
    let first = write_requests(&name, &data[..half], 64 << 10, 0, false);
    assert!(ca.bs.write(futures::stream::iter(first)).await.is_err(), "a write without finish_write is not done");
    let query = || QueryWriteStatusRequest { resource_name: name.clone() };
    let err = cb.bs.query_write_status(query()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "B knows nothing of A's session: {err:?}");

    let rest = write_requests(&name, &data[half..], 64 << 10, half as i64, true);
    ca.bs.write(futures::stream::iter(rest)).await.unwrap();
    let status = cb.bs.query_write_status(query()).await.expect("the committed blob is complete on B").into_inner();
    assert!(status.complete, "{status:?}");
    assert_eq!(status.committed_size, data.len() as i64);
}

#[test]
#[ignore = "needs Bazel: run tests/setup.sh, then cargo test --release -- --include-ignored"]
fn bazel_builds_through_replica_a_then_every_action_is_a_remote_hit_through_replica_b() {
    let (_bucket, _keys, a, b) = two_replicas("bazel");
    let mut ws = crate::bazel::BazelWorkspace::new();
    let writer = ws.build(&[&a.remote_cache_flag()]);
    assert_eq!(writer.remote_cache_hits(), 0, "the first build is cold");
    ws.clean();
    ws.fresh_output_base();
    let reader = ws.build(&[&b.remote_cache_flag(), "--remote_upload_local_results=false"]);
    let (hits, spawns) = reader.hits();
    assert_eq!(hits, spawns, "every action of the build through B is a remote cache hit");
    assert_eq!(spawns, ws.action_count());
}

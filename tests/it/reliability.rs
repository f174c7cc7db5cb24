//! Crash and fault tests against the real `provcache` binary
//! (docs/threat-model.md, reliability scenarios R1, R3, R6, R7, R8). Each test
//! asserts its scenario's pass criterion; R4, R5 are in `bytestream.rs` and
//! R10 in `provenance.rs`.

use std::collections::HashSet;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use provcache::proto::prov::audit_client::AuditClient;
use provcache::proto::prov::GetStoredEntryRequest;
use provcache::proto::reapi;
use provcache::provenance::signing::canonical_bytes;
use provcache::provenance::trust::TrustPolicy;
use provcache::provenance::verify::{verify_served, Expected};
use tonic::Code;

use crate::common::*;

const MIB: usize = 1024 * 1024;
/// Bound for a server to exit by itself at a crash point.
const EXIT_WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// Runs blocking process control (start, kill, wait) off the async workers.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// A test blob, regenerated from its seed when needed (so hundreds of
/// megabytes need not stay in memory).
#[derive(Clone, Copy, Debug)]
struct Blob {
    seed: u64,
    len: usize,
}

impl Blob {
    fn data(&self) -> Vec<u8> {
        noise(self.len, self.seed)
    }
}

/// Uploads `data` with ByteStream Write in 64 KiB messages; `Ok` means the
/// server acknowledged it (a WriteResponse).
async fn upload(c: &mut Clients, data: &[u8]) -> Result<(), tonic::Status> {
    let d = sha(data);
    let resource = format!("uploads/{}/blobs/{}", uuid::Uuid::new_v4(), rn(&d));
    let committed = c.write(&resource, data, 64 * 1024).await?;
    assert_eq!(committed, data.len() as i64, "committed_size of an acknowledged upload");
    Ok(())
}

/// The ByteStream Read resource name of a blob.
fn blob_name(d: &reapi::Digest) -> String {
    format!("blobs/{}", rn(d))
}

/// A result whose one output file holds `contents` (uploaded first). It is
/// already canonical, so `canonical_bytes` of it is what the server stores.
async fn result_with_output(c: &mut Clients, contents: &[u8], exit_code: i32) -> reapi::ActionResult {
    reapi::ActionResult { exit_code, ..c.result_with_output("", contents).await }
}

fn expected(action: &reapi::Digest) -> Expected {
    Expected { instance: String::new(), digest_function: 0, action_digest: action.clone() }
}

/// The trust policy of a server started on the dev signing key.
fn dev_policy(server: &ServerProcess) -> TrustPolicy {
    TrustPolicy::load(&server.pki_dir().join("trust-policy.toml")).unwrap()
}

/// Asserts a served result verifies independently of the server.
fn assert_signed(policy: &TrustPolicy, result: &reapi::ActionResult, action: &reapi::Digest, what: &str) {
    if let Err(reason) = verify_served(policy, result, &expected(action), SystemTime::now()) {
        panic!("{what}: a served entry does not verify ({reason:?}): {result:?}");
    }
}

/// The current entry and the history of an action, through the Audit service.
async fn stored_entries(
    server: &ServerProcess,
    action: &reapi::Digest,
) -> (Option<reapi::ActionResult>, Vec<reapi::ActionResult>) {
    let mut audit = AuditClient::new(server.channel().await);
    let reply = audit
        .get_stored_entry(GetStoredEntryRequest { action_digest: Some(action.clone()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    (reply.current.and_then(|e| e.result), reply.history.into_iter().filter_map(|e| e.result).collect())
}

/// Checks every blob in `attempted` after a restart: an acknowledged blob
/// reads back whole and right; any other reads back whole and right or is
/// NOT_FOUND; FindMissingBlobs agrees with Read for every one.
async fn check_blobs(server: &ServerProcess, attempted: &[Blob], acked: &HashSet<u64>) -> usize {
    let mut c = server.clients().await;
    let digests: Vec<reapi::Digest> = attempted.iter().map(|b| sha(&b.data())).collect();
    let mut missing = HashSet::new();
    for part in digests.chunks(500) {
        missing.extend(c.missing("", part).await.into_iter().map(|d| d.hash));
    }
    let mut present = 0;
    for (blob, d) in attempted.iter().zip(&digests) {
        let is_missing = missing.contains(&d.hash);
        match c.read(&blob_name(d), 0, 0).await {
            Ok(bytes) => {
                assert!(bytes == blob.data(), "blob {blob:?} read back {} wrong or torn bytes", bytes.len());
                assert!(!is_missing, "FindMissingBlobs reports {blob:?} missing, but Read serves it");
                present += 1;
            }
            Err(s) if s.code() == Code::NotFound => {
                assert!(!acked.contains(&blob.seed), "acknowledged blob {blob:?} was lost");
                assert!(is_missing, "Read says NOT_FOUND for {blob:?}, FindMissingBlobs says present");
            }
            Err(s) => panic!("reading {blob:?} after a restart: {s:?}"),
        }
    }
    present
}

// ---------------------------------------------------------------- R1

/// Concurrent ByteStream uploaders (and one no-WAL uploader of blobs above
/// 64 MiB); the server is killed with SIGKILL in the middle, three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r1_kill9_during_concurrent_uploads_loses_no_acknowledged_blob() {
    const UPLOADERS: u64 = 16;
    let no_wal_size = provcache::store::rocks::NO_WAL_THRESHOLD as usize + MIB + 7;
    let mut server = ServerProcess::start_plaintext();
    let attempted: Arc<Mutex<Vec<Blob>>> = Arc::default();
    let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
    for round in 0..3u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let acked_before = acked.lock().unwrap().len();
        let mut tasks = Vec::new();
        for w in 0..UPLOADERS {
            let (attempted, acked, stop) = (attempted.clone(), acked.clone(), stop.clone());
            let mut c = server.clients().await;
            tasks.push(tokio::spawn(async move {
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let seed = (round << 40) | (w << 20) | i;
                    let len = match (w, i % 4) {
                        (0, _) => no_wal_size,
                        (_, 0) => 2 * MIB + (seed % 1000) as usize,
                        (_, 1) => MIB + 1 + (seed % 5000) as usize,
                        _ => 1 + (seed % 200_000) as usize,
                    };
                    let blob = Blob { seed, len };
                    attempted.lock().unwrap().push(blob);
                    match upload(&mut c, &blob.data()).await {
                        Ok(()) => {
                            acked.lock().unwrap().insert(seed);
                        }
                        Err(_) => break, // the server is gone
                    }
                }
            }));
        }
        // A reader meanwhile: whatever it is served is whole and right.
        let reader = {
            let (attempted, acked, stop) = (attempted.clone(), acked.clone(), stop.clone());
            let mut c = server.clients().await;
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let blob = {
                        let a = attempted.lock().unwrap();
                        if a.is_empty() {
                            None
                        } else {
                            Some(a[(i * 7919) % a.len()])
                        }
                    };
                    i += 1;
                    let Some(blob) = blob.filter(|b| b.len < 4 * MIB) else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    };
                    let data = blob.data();
                    let was_acked = acked.lock().unwrap().contains(&blob.seed);
                    match c.read(&blob_name(&sha(&data)), 0, 0).await {
                        Ok(bytes) => assert!(bytes == data, "served wrong or torn bytes for {blob:?}"),
                        Err(s) if s.code() == Code::NotFound => {
                            assert!(!was_acked, "acknowledged {blob:?} not found while the server runs")
                        }
                        Err(_) => break, // the server is gone
                    }
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.lock().unwrap().len() < acked_before + 20 {
            assert!(Instant::now() < deadline, "uploads make no progress");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100 + 300 * round)).await;
        blocking(|| server.kill9());
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(60), t).await.expect("an uploader hangs").unwrap();
        }
        tokio::time::timeout(Duration::from_secs(60), reader).await.expect("the reader hangs").unwrap();
        blocking(|| server.start_again());
        let attempted_now = attempted.lock().unwrap().clone();
        let acked_now = acked.lock().unwrap().clone();
        let present = check_blobs(&server, &attempted_now, &acked_now).await;
        eprintln!(
            "r1 round {round}: {} uploads attempted, {} acknowledged, {present} present after kill -9",
            attempted_now.len(),
            acked_now.len()
        );
    }
    // The restarted server takes new uploads.
    let mut c = server.clients().await;
    let blob = Blob { seed: 99, len: 3 * MIB + 1 };
    upload(&mut c, &blob.data()).await.unwrap();
    assert_eq!(c.read(&blob_name(&sha(&blob.data())), 0, 0).await.unwrap(), blob.data());
    blocking(|| server.stop());
}

// ---------------------------------------------------------------- R3

/// For each crash point of UpdateActionResult (src/failpoint.rs), the server
/// aborts there twice: once replacing an existing entry, once writing a new
/// one. After a restart each key holds nothing, or a fully valid signed entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_a_crash_at_each_step_of_update_action_result_leaves_no_entry_or_a_signed_one() {
    if !cfg!(feature = "failpoints") {
        eprintln!("SKIP r3: the crash points need `cargo test --features failpoints` (tests/run-all.sh uses it)");
        return;
    }
    for point in provcache::failpoint::POINTS {
        let mut server = ServerProcess::start_plaintext();
        let mut c = server.clients().await;
        // `old` already has an entry (v1); `new` has none.
        let old = upload_action(&mut c, "", &format!("old {point}")).await;
        let v1 = result_with_output(&mut c, b"v1", 0).await;
        c.ac.update_action_result(update("", &old, v1.clone())).await.unwrap();
        let v2 = result_with_output(&mut c, b"v2", 1).await;
        let new = upload_action(&mut c, "", &format!("new {point}")).await;
        let n1 = result_with_output(&mut c, b"n1", 0).await;
        blocking(|| server.stop());

        server.set_env("PROVCACHE_FAILPOINT", Some(point));
        for (action, result) in [(&old, &v2), (&new, &n1)] {
            blocking(|| server.start_again());
            let mut c = server.clients().await;
            let answer = c.ac.update_action_result(update("", action, result.clone())).await;
            assert!(answer.is_err(), "{point}: the server answered instead of crashing: {answer:?}");
            let status = blocking(|| server.wait_for_exit(EXIT_WAIT));
            assert_eq!(status.signal(), Some(6), "{point}: the server did not abort at the crash point: {status}");
        }
        server.set_env("PROVCACHE_FAILPOINT", None);
        blocking(|| server.start_again());

        let policy = dev_policy(&server);
        let mut c = server.clients().await;
        let committed = point == "ac-after-commit";
        let got = c.lookup("", &old).await.unwrap_or_else(|code| panic!("{point}: the old entry is gone: {code:?}"));
        assert_signed(&policy, &got, &old, point);
        let want = if committed { &v2 } else { &v1 };
        assert_eq!(canonical_bytes(&got), canonical_bytes(want), "{point}: the old action holds the wrong result");
        match c.lookup("", &new).await {
            Ok(got) => {
                assert!(committed, "{point}: an entry before its commit: {got:?}");
                assert_signed(&policy, &got, &new, point);
                assert_eq!(canonical_bytes(&got), canonical_bytes(&n1), "{point}");
            }
            Err(code) => {
                assert_eq!(code, Code::NotFound, "{point}");
                assert!(!committed, "{point}: a committed (synced) entry was lost");
            }
        }
        // Every stored record, current and history, is whole and signed.
        for action in [&old, &new] {
            let (current, history) = stored_entries(&server, action).await;
            for r in current.iter().chain(&history) {
                assert_signed(&policy, r, action, point);
            }
            assert_eq!(history.last(), current.as_ref(), "{point}: the newest history record is the current entry");
        }
        // And the server takes the write it crashed on.
        c.ac.update_action_result(update("", &new, n1.clone())).await.unwrap();
        assert_signed(&policy, &c.lookup("", &new).await.unwrap(), &new, point);
        blocking(|| server.stop());
    }
}

// ---------------------------------------------------------------- R6

/// Two writers on two connections race UpdateActionResult for one action,
/// round after round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn r6_racing_writers_leave_one_of_their_results_signed_and_both_in_history() {
    let mut server = ServerProcess::start_plaintext();
    let policy = dev_policy(&server);
    let (mut a, mut b) = (server.clients().await, server.clients().await);
    let mut winners = [0, 0];
    for round in 0..40 {
        let action = upload_action(&mut a, "", &format!("race {round}")).await;
        let ra = result_with_output(&mut a, format!("a {round}").as_bytes(), 0).await;
        let rb = result_with_output(&mut b, format!("b {round}").as_bytes(), 1).await;
        let (x, y) = tokio::join!(
            a.ac.update_action_result(update("", &action, ra)),
            b.ac.update_action_result(update("", &action, rb))
        );
        let (reply_a, reply_b) = (x.unwrap().into_inner(), y.unwrap().into_inner());
        let current = a.lookup("", &action).await.unwrap();
        assert_signed(&policy, &current, &action, "r6");
        if current == reply_a {
            winners[0] += 1;
        } else if current == reply_b {
            winners[1] += 1;
        } else {
            panic!("round {round}: the entry is neither writer's result: {current:?}");
        }
        let (stored, history) = stored_entries(&server, &action).await;
        assert_eq!(stored.as_ref(), Some(&current));
        assert_eq!(history.len(), 2, "round {round}: both writes are kept in history");
        assert!(history.contains(&reply_a) && history.contains(&reply_b), "round {round}: {history:?}");
        assert_eq!(history.last(), Some(&current), "round {round}: the newest history record is the current entry");
        for r in &history {
            assert_signed(&policy, r, &action, "r6 history");
        }
    }
    eprintln!("r6: writer a won {} rounds, writer b {}", winners[0], winners[1]);
    blocking(|| server.stop());
}

// ---------------------------------------------------------------- R7

/// A tmpfs mounted for one test, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Tmpfs(at.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The data directory on a small tmpfs filled by uploads; a ballast file
/// is deleted to give space back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r7_a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let fs_dir = tmp.path().join("fs");
    std::fs::create_dir(&fs_dir).unwrap();
    // RocksDB resumes writes once free space reaches its largest memtable
    // (32 MiB) and its memtables can be flushed: the ballast frees more.
    let _fs = match Tmpfs::mount(&fs_dir, "320m") {
        Ok(fs) => fs,
        Err(why) => {
            eprintln!("SKIP r7: cannot mount a small filesystem here (needs root): {why}");
            return;
        }
    };
    let ballast = fs_dir.join("ballast");
    std::fs::write(&ballast, vec![1u8; 160 * MIB]).unwrap();
    let data_dir = fs_dir.join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let mut server = ServerProcess::start_in(&data_dir, ["--plaintext-insecure"]);
    let policy = dev_policy(&server);
    let mut c = server.clients().await;
    let action = upload_action(&mut c, "", "before the disk fills").await;
    let result = result_with_output(&mut c, b"written with space", 0).await;
    let reply = c.ac.update_action_result(update("", &action, result)).await.unwrap().into_inner();

    // Fill the filesystem.
    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2000u64 {
        let blob = Blob { seed: 7_000_000 + i, len: 256 * 1024 };
        match upload(&mut c, &blob.data()).await {
            Ok(()) => acked.push(blob),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "a write on a full disk: {s:?}");
                refused = Some(blob);
                break;
            }
        }
    }
    let refused = refused.expect("the filesystem filled up within 2000 uploads of 256 KiB");
    eprintln!("r7: {} uploads acknowledged before the disk was full", acked.len());

    // Other writes are refused the same way: streamed, batched, Action Cache.
    let big = Blob { seed: 8_000_000, len: 2 * MIB + 3 };
    let s = upload(&mut c, &big.data()).await.expect_err("a streamed upload on a full disk");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    let small = Blob { seed: 8_000_001, len: 1000 }.data();
    let codes = c.batch_update("", &[&small]).await.unwrap();
    assert_eq!(codes, [Code::ResourceExhausted as i32], "a batched upload on a full disk");
    let full_result = reapi::ActionResult { exit_code: 7, ..output_result(&sha(b"written with space")) };
    let s = c.ac.update_action_result(update("", &action, full_result)).await.expect_err("an AC write on a full disk");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    // Reads keep working, and nothing partial is visible.
    for blob in &acked {
        assert_eq!(c.read(&blob_name(&sha(&blob.data())), 0, 0).await.unwrap(), blob.data(), "{blob:?}");
    }
    assert_eq!(c.lookup("", &action).await.unwrap(), reply);
    for blob in [refused, big] {
        let d = sha(&blob.data());
        assert_eq!(c.missing("", std::slice::from_ref(&d)).await, vec![d.clone()], "{blob:?}");
        assert_eq!(c.read(&blob_name(&d), 0, 0).await.unwrap_err().code(), Code::NotFound, "{blob:?}");
    }
    assert_eq!(c.missing("", &[sha(&small)]).await.len(), 1);

    // Space returns: writes recover by themselves, within a bound.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    loop {
        match upload(&mut c, &refused.data()).await {
            Ok(()) => break,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(data_dir.join("db").join("LOG")).unwrap_or_default();
                    let lines: Vec<&str> =
                        log.lines().filter(|l| l.contains("rror") || l.contains("space")).take(40).collect();
                    panic!("writes did not recover within 60 s of space returning; RocksDB LOG:\n{}", lines.join("\n"));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    eprintln!("r7: writes recovered {:?} after space returned", started.elapsed());
    upload(&mut c, &big.data()).await.unwrap();
    assert_eq!(c.read(&blob_name(&sha(&big.data())), 0, 0).await.unwrap(), big.data());
    let again = result_with_output(&mut c, b"written after recovery", 2).await;
    c.ac.update_action_result(update("", &action, again.clone())).await.unwrap();
    let got = c.lookup("", &action).await.unwrap();
    assert_signed(&policy, &got, &action, "r7");
    assert_eq!(canonical_bytes(&got), canonical_bytes(&again));
    for blob in &acked {
        assert_eq!(c.read(&blob_name(&sha(&blob.data())), 0, 0).await.unwrap(), blob.data(), "{blob:?}");
    }
    blocking(|| server.stop());
}

// ---------------------------------------------------------------- R8

/// Blobs of three storage shapes (in the LSM tree, in blob files, several
/// chunks) and a few Action Cache entries.
async fn write_corpus(c: &mut Clients, seed: u64) -> (Vec<Blob>, Vec<(reapi::Digest, reapi::ActionResult)>) {
    let mut blobs = Vec::new();
    for i in 0..60u64 {
        let len = match i % 3 {
            0 => 100 + (i as usize * 37) % 3000,
            1 => 100_000 + i as usize,
            _ => MIB + 500 + i as usize,
        };
        let blob = Blob { seed: seed + i, len };
        upload(c, &blob.data()).await.unwrap();
        blobs.push(blob);
    }
    let mut entries = Vec::new();
    for i in 0..10 {
        let action = upload_action(c, "", &format!("corpus {seed} {i}")).await;
        let result = result_with_output(c, format!("output {seed} {i}").as_bytes(), 0).await;
        let reply = c.ac.update_action_result(update("", &action, result)).await.unwrap().into_inner();
        entries.push((action, reply));
    }
    (blobs, entries)
}

/// After damage at rest: no wrong bytes, ever. Returns how many blobs and
/// entries are still served.
async fn check_no_wrong_bytes(
    server: &ServerProcess,
    blobs: &[Blob],
    entries: &[(reapi::Digest, reapi::ActionResult)],
) -> (usize, usize) {
    let policy = dev_policy(server);
    let mut c = server.clients().await;
    let mut served = (0, 0);
    for blob in blobs {
        let data = blob.data();
        let d = sha(&data);
        for (offset, limit) in [(0, 0), (blob.len as i64 / 2, 0), (1, 10)] {
            match c.read(&blob_name(&d), offset, limit).await {
                Ok(bytes) => {
                    let end = if limit == 0 { blob.len } else { offset as usize + limit as usize };
                    assert!(bytes == data[offset as usize..end], "wrong bytes served for {blob:?} at {offset}");
                    if offset == 0 {
                        served.0 += 1;
                    }
                }
                Err(s) => assert!(matches!(s.code(), Code::NotFound | Code::DataLoss), "reading {blob:?}: {s:?}"),
            }
        }
    }
    for (action, reply) in entries {
        match c.lookup("", action).await {
            Ok(got) => {
                assert_signed(&policy, &got, action, "r8");
                assert_eq!(&got, reply, "a different result served for {action:?}");
                served.1 += 1;
            }
            Err(code) => assert!(matches!(code, Code::NotFound | Code::DataLoss), "looking up {action:?}: {code:?}"),
        }
    }
    (served.0, served.1)
}

/// A crash, then the write-ahead log loses its tail (a torn last write).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r8_a_truncated_wal_tail_starts_and_serves_no_wrong_bytes() {
    let mut server = ServerProcess::start_plaintext();
    let mut c = server.clients().await;
    let (blobs, entries) = write_corpus(&mut c, 1 << 32).await;
    blocking(|| server.kill9());
    let db = server.data_dir().join("db");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let wal = logs.last().expect("a write-ahead log after a crash");
    let len = std::fs::metadata(wal).unwrap().len();
    assert!(len > 1_000_000, "the corpus is in the WAL ({len} bytes)");
    let file = std::fs::OpenOptions::new().write(true).open(wal).unwrap();
    file.set_len(len * 2 / 3 + 13).unwrap();
    drop(file);

    blocking(|| server.start_again());
    let (blobs_served, entries_served) = check_no_wrong_bytes(&server, &blobs, &entries).await;
    eprintln!("r8 wal: {blobs_served}/{} blobs and {entries_served}/{} entries survive", blobs.len(), entries.len());
    assert!(blobs_served > 0, "the log's intact head is recovered");
    assert!(blobs_served < blobs.len(), "the truncation cut off committed records");
    let mut c = server.clients().await;
    let blob = Blob { seed: 5, len: 2 * MIB };
    upload(&mut c, &blob.data()).await.unwrap();
    assert_eq!(c.read(&blob_name(&sha(&blob.data())), 0, 0).await.unwrap(), blob.data());
    blocking(|| server.stop());
}

/// Flips a byte of every table file: in its first data block (`from_end`
/// false), or in the index and properties blocks near its end, which
/// RocksDB reads when it opens the file (`from_end` true); and a byte in
/// the middle of every blob file.
async fn corrupt_tables_then_check(seed: u64, from_end: bool) {
    let mut server = ServerProcess::start_plaintext();
    let mut c = server.clients().await;
    let (blobs, entries) = write_corpus(&mut c, seed).await;
    blocking(|| server.stop()); // flushes: everything is in table and blob files now
    let db = server.data_dir().join("db");
    let tables = {
        let store =
            provcache::store::rocks::RocksStore::open(&db, &provcache::store::rocks::StoreOptions::default()).unwrap();
        store.sst_files_for_tests().unwrap()
    };
    let flip = |path: &Path, at: u64| {
        let mut bytes = std::fs::read(path).unwrap();
        let at = (at as usize).min(bytes.len() - 1);
        bytes[at] ^= 0x5a;
        std::fs::write(path, bytes).unwrap();
    };
    let mut damaged = Vec::new();
    for (cf, name) in &tables {
        let path = db.join(name);
        let len = std::fs::metadata(&path).unwrap().len();
        // The first data block starts at offset 0; the footer is the last
        // 53 bytes, the index and properties blocks are before it.
        flip(&path, if from_end { len.saturating_sub(300) } else { 5 });
        damaged.push(format!("{cf}:{name}"));
    }
    for entry in std::fs::read_dir(&db).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "blob") {
            let len = std::fs::metadata(&path).unwrap().len();
            flip(&path, len / 2);
            damaged.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    for cf in ["cas", "chunks", "ac", "ac_history", "meta", "lru", "atime", "usage"] {
        assert!(damaged.iter().any(|d| d.starts_with(&format!("{cf}:"))), "no table file of {cf}: {tables:?}");
    }

    blocking(|| server.start_again());
    let repaired = server.log().contains("the store was repaired");
    // Damaged data blocks are met by reads; damaged index or properties
    // blocks make RocksDB refuse to open, and RocksStore::open repairs the store.
    assert_eq!(repaired, from_end, "repaired at start");
    let (blobs_served, entries_served) = check_no_wrong_bytes(&server, &blobs, &entries).await;
    eprintln!(
        "r8 sst (from_end {from_end}): damaged {damaged:?}; {blobs_served}/{} blobs and {entries_served}/{} entries \
         still served",
        blobs.len(),
        entries.len()
    );
    assert!(blobs_served < blobs.len(), "the damage reached some blob");
    // The damaged store still takes writes.
    let mut c = server.clients().await;
    let blob = Blob { seed: seed + 999, len: 3000 };
    match upload(&mut c, &blob.data()).await {
        Ok(()) => assert_eq!(c.read(&blob_name(&sha(&blob.data())), 0, 0).await.unwrap(), blob.data()),
        // A write whose existence check meets a damaged block fails; it never succeeds wrongly.
        Err(s) => assert_eq!(s.code(), Code::DataLoss, "{s:?}"),
    }
    blocking(|| server.stop());
}

/// Damaged data blocks: the server starts (reads meet them later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r8_corrupted_sst_data_blocks_start_and_serve_no_wrong_bytes() {
    corrupt_tables_then_check(2 << 32, false).await;
}

/// Damaged index and properties blocks, which RocksDB reads at open: the
/// store is repaired at start instead of keeping the server down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r8_corrupted_sst_index_blocks_start_and_serve_no_wrong_bytes() {
    corrupt_tables_then_check(3 << 32, true).await;
}

// ---------------------------------------------------------------- shutdown and backup

/// SIGTERM while many uploads stream: calls in flight complete (the drain),
/// the process exits 0, and every acknowledged blob is there after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_during_uploads_drains_calls_in_flight_and_loses_no_acknowledged_blob() {
    const UPLOADERS: u64 = 8;
    let mut server = ServerProcess::start_plaintext();
    let attempted: Arc<Mutex<Vec<Blob>>> = Arc::default();
    // Seed → when its upload was acknowledged.
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..UPLOADERS {
        let (attempted, acked) = (attempted.clone(), acked.clone());
        let mut c = server.clients().await;
        tasks.push(tokio::spawn(async move {
            for i in 0u64.. {
                let blob = Blob { seed: (w << 20) | i, len: 4 * MIB + (i as usize % 1000) };
                attempted.lock().unwrap().push(blob);
                match upload(&mut c, &blob.data()).await {
                    Ok(()) => acked.lock().unwrap().push((blob.seed, Instant::now())),
                    Err(_) => break, // refused: the server is going away
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.lock().unwrap().len() < 2 * UPLOADERS as usize {
        assert!(Instant::now() < deadline, "uploads make no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sigterm_at = Instant::now();
    let status = blocking(|| server.stop()); // SIGTERM; asserts a clean exit
    assert!(status.success());
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("an uploader hangs").unwrap();
    }
    let log = server.log();
    assert!(log.contains("draining calls in flight"), "no drain in the log:\n{log}");
    assert!(log.contains("every call in flight completed"), "calls were cut off:\n{log}");
    let acked_now: Vec<(u64, Instant)> = acked.lock().unwrap().clone();
    let during_drain = acked_now.iter().filter(|(_, at)| *at > sigterm_at).count();
    assert!(during_drain > 0, "no upload in flight at SIGTERM completed (of {})", acked_now.len());

    blocking(|| server.start_again());
    let attempted_now = attempted.lock().unwrap().clone();
    let acked_set: HashSet<u64> = acked_now.iter().map(|(s, _)| *s).collect();
    let present = check_blobs(&server, &attempted_now, &acked_set).await;
    eprintln!(
        "sigterm: {} uploads attempted, {} acknowledged ({during_drain} while draining), {present} present",
        attempted_now.len(),
        acked_now.len()
    );
    blocking(|| server.stop());
}

/// `provcache backup` of a stopped server, restored into a new data
/// directory: the blobs and signed entries of the moment of the backup are
/// served (and verify), later writes are not; a running server's directory
/// is refused with a message saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_then_restore_serves_what_was_stored_at_the_backup() {
    let mut server = ServerProcess::start_plaintext();
    let mut c = server.clients().await;
    let (blobs, entries) = write_corpus(&mut c, 7 << 32).await;
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = server.data_dir().to_path_buf();
    let backup = |dest: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_provcache"))
            .arg("backup")
            .arg("--data-dir")
            .arg(&data_dir)
            .arg(dest)
            .output()
            .unwrap()
    };

    let refused = backup(&tmp.path().join("while-running"));
    assert!(!refused.status.success(), "a running server's storage was backed up");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("is in use by another provcache process"), "{err}");
    assert!(!tmp.path().join("while-running").exists());

    blocking(|| server.stop());
    let dest = tmp.path().join("backup");
    let made = backup(&dest);
    assert!(made.status.success(), "backup failed: {}", String::from_utf8_lossy(&made.stderr));
    let out = String::from_utf8_lossy(&made.stdout);
    assert!(out.contains("10 Action Cache entries"), "{out}");

    // Written after the backup: absent from the restored copy.
    blocking(|| server.start_again());
    let mut c = server.clients().await;
    let later = Blob { seed: 7 << 33, len: 5000 };
    upload(&mut c, &later.data()).await.unwrap();
    blocking(|| server.stop());

    let restored = tmp.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::rename(&dest, restored.join("db")).unwrap();
    let pki = restored.join("dev-pki");
    std::fs::create_dir(&pki).unwrap();
    for entry in std::fs::read_dir(server.data_dir().join("dev-pki")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), pki.join(entry.file_name())).unwrap();
    }
    let mut again = ServerProcess::start_in(&restored, ["--plaintext-insecure"]);
    let acked: HashSet<u64> = blobs.iter().map(|b| b.seed).collect();
    assert_eq!(check_blobs(&again, &blobs, &acked).await, blobs.len());
    let policy = dev_policy(&again);
    let mut c = again.clients().await;
    for (action, reply) in &entries {
        let got = c.lookup("", action).await.expect("a backed-up entry is a hit");
        assert_signed(&policy, &got, action, "restored");
        assert_eq!(&got, reply);
    }
    let later_name = blob_name(&sha(&later.data()));
    assert_eq!(c.read(&later_name, 0, 0).await.unwrap_err().code(), Code::NotFound);
    blocking(|| again.stop());
}

//! `provcache bench --soak DURATION`: a crash-soak. It starts the server
//! itself (this same binary, `serve --plaintext-insecure` on 127.0.0.1),
//! drives a mixed load (ByteStream uploads, Action Cache updates, reads of
//! both), kills the server with SIGKILL at irregular intervals and restarts
//! it on the same data directory, and checks invariants all along:
//!
//! - every acknowledged blob reads back whole and right (never NOT_FOUND,
//!   never wrong or torn bytes), also after every restart;
//! - every Action Cache entry served verifies with the trust policy, names
//!   one of the results written for that action, and is complete (every
//!   blob it references is in the CAS); an action with an acknowledged
//!   write is never a miss.
//!
//! Calls that fail while the server is down are counted, not violations.
//! It stops by itself after DURATION and reports figures and violations
//! (and exits non-zero if there were any).

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;
use tonic::Code;

use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use crate::proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use crate::provenance::signing::canonical_bytes;
use crate::provenance::trust::TrustPolicy;
use crate::provenance::verify::{verify_served, Expected};
use crate::tools::bench::{pseudo_random_bytes as blob, sha};

/// Soak parameters.
#[derive(Clone, Debug)]
pub struct SoakParams {
    /// How long the soak runs.
    pub duration: Duration,
    /// Mean time between two `kill -9`s (each interval is 0.5x to 1.5x this).
    pub kill_every: Duration,
    /// Concurrent load loops.
    pub concurrency: usize,
    /// The data directory (created if missing; a fresh one is best).
    pub data_dir: PathBuf,
    /// The `provcache` binary to run as the server.
    pub exe: PathBuf,
    /// Once this many bytes of blobs are acknowledged, uploads stay small
    /// (bounds the disk a long soak uses).
    pub byte_budget: u64,
}

/// What a soak did.
#[derive(Debug, Default)]
pub struct SoakReport {
    /// Wall time.
    pub elapsed: Duration,
    /// `kill -9` + restart cycles.
    pub kills: u64,
    /// Blobs acknowledged by the server.
    pub blobs_acked: u64,
    /// Their bytes.
    pub bytes_acked: u64,
    /// Action Cache writes acknowledged.
    pub ac_acked: u64,
    /// Reads whose result was checked (blobs and Action Cache lookups).
    pub reads_checked: u64,
    /// Checks of every (or a sample of) acknowledged item after restarts.
    pub restart_checks: u64,
    /// Calls that failed because the server was down or restarting.
    pub outage_errors: u64,
    /// Invariant violations (the first few are in `examples`).
    pub violations: u64,
    /// The first violations.
    pub examples: Vec<String>,
}

impl std::fmt::Display for SoakReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "soak: {:.0}s, {} kill -9 + restart cycles", self.elapsed.as_secs_f64(), self.kills)?;
        writeln!(
            f,
            "  acknowledged: {} blobs ({:.1} GB), {} Action Cache writes; {} reads checked; {} restart checks",
            self.blobs_acked,
            self.bytes_acked as f64 / 1e9,
            self.ac_acked,
            self.reads_checked,
            self.restart_checks
        )?;
        writeln!(f, "  calls failed during outages (expected): {}", self.outage_errors)?;
        write!(f, "  invariant violations: {}", self.violations)?;
        for e in &self.examples {
            write!(f, "\n    - {e}")?;
        }
        Ok(())
    }
}

/// Actions the load rewrites again and again (a small pool: many overwrites).
const ACTIONS: u64 = 200;

/// The shared record of what was attempted and acknowledged.
#[derive(Default)]
struct Ledger {
    /// (seed, len) of every acknowledged blob.
    blobs: Vec<(u64, usize)>,
    /// Per action index: canonical bytes of every result ever attempted.
    attempted: HashMap<u64, HashSet<Vec<u8>>>,
    /// Action indexes with at least one acknowledged write.
    acked_actions: HashSet<u64>,
}

struct Shared {
    ledger: Mutex<Ledger>,
    /// False while the server is being killed and restarted.
    up: AtomicBool,
    /// Incremented when a kill starts and when the restart is done: a call
    /// that saw it change failed because of the outage.
    epoch: AtomicU64,
    /// Bytes of blobs acknowledged (large uploads stop at the budget).
    bytes_acked: AtomicU64,
    byte_budget: u64,
    stop: AtomicBool,
    blobs_acked: AtomicU64,
    ac_acked: AtomicU64,
    reads_checked: AtomicU64,
    outage_errors: AtomicU64,
    violations: AtomicU64,
    examples: Mutex<Vec<String>>,
    policy: TrustPolicy,
}

impl Shared {
    fn violation(&self, what: String) {
        // The first ones in full; after that a count now and then, so a
        // persistent failure (a full disk, say) cannot flood the log.
        let n = self.violations.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 20 {
            eprintln!("soak VIOLATION: {what}");
        } else if n % 1000 == 0 {
            eprintln!("soak: {n} violations so far");
        }
        let mut ex = self.examples.lock().unwrap_or_else(|p| p.into_inner());
        if ex.len() < 20 {
            ex.push(what);
        }
    }
}

/// A small xorshift generator; each loop has its own.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn seed_from_clock() -> u64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1);
    nanos ^ (u64::from(std::process::id()) << 32) | 1
}

// ---------------------------------------------------------------- the server

struct Server {
    exe: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    addr: Option<SocketAddr>,
}

const LISTENING: &str = "provcache listening on grpc://";

impl Server {
    /// Starts the server; on the same port as before after the first start.
    fn start(&mut self) -> anyhow::Result<()> {
        let listen = self.addr.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:0".into());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_start(&listen) {
                Ok(()) => return Ok(()),
                // The port may linger briefly after a kill: retry.
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "soak: the server did not start; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(&mut self, listen: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut child = Command::new(&self.exe)
            .args(["serve", "--plaintext-insecure", "--listen", listen, "--data-dir"])
            .arg(&self.data_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {}", self.exe.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        loop {
            match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix(LISTENING) {
                        self.addr = Some(addr.trim().parse().context("the listening address")?);
                        self.child = Some(child);
                        return Ok(());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    bail!("the server exited before listening ({status}); see {}", self.log.display());
                }
            }
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status()?;
            if !status.success() {
                bail!("kill -TERM failed");
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("the server exited with {status} after SIGTERM; see {}", self.log.display());
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("the server did not exit within 60 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- the load

struct Clients {
    cas: ContentAddressableStorageClient<Channel>,
    ac: ActionCacheClient<Channel>,
    bs: ByteStreamClient<Channel>,
}

impl Clients {
    fn new(ch: Channel) -> Self {
        Clients {
            cas: ContentAddressableStorageClient::new(ch.clone()).max_decoding_message_size(16 << 20),
            ac: ActionCacheClient::new(ch.clone()).max_decoding_message_size(16 << 20),
            bs: ByteStreamClient::new(ch).max_decoding_message_size(16 << 20),
        }
    }

    async fn upload(&mut self, data: Bytes) -> Result<(), tonic::Status> {
        let d = sha(&data);
        let name = format!("uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), d.hash, d.size_bytes);
        let mut msgs = Vec::new();
        let mut offset = 0;
        loop {
            let end = (offset + 64 * 1024).min(data.len());
            msgs.push(WriteRequest {
                resource_name: if offset == 0 { name.clone() } else { String::new() },
                write_offset: offset as i64,
                finish_write: end == data.len(),
                data: data.slice(offset..end),
            });
            offset = end;
            if end == data.len() {
                break;
            }
        }
        let r = self.bs.write(futures::stream::iter(msgs)).await?.into_inner();
        if r.committed_size != data.len() as i64 {
            return Err(tonic::Status::internal(format!("committed_size {} for {}", r.committed_size, d.size_bytes)));
        }
        Ok(())
    }

    async fn read(&mut self, d: &reapi::Digest) -> Result<Vec<u8>, tonic::Status> {
        let req = ReadRequest { resource_name: format!("blobs/{}/{}", d.hash, d.size_bytes), ..Default::default() };
        let mut stream = self.bs.read(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream.message().await? {
            out.extend_from_slice(&msg.data);
        }
        Ok(out)
    }

    async fn batch_upload(&mut self, blobs: &[Bytes]) -> Result<(), tonic::Status> {
        let requests = blobs
            .iter()
            .map(|b| batch_update_blobs_request::Request { digest: Some(sha(b)), data: b.clone(), compressor: 0 })
            .collect();
        let resp = self
            .cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest { requests, ..Default::default() })
            .await?
            .into_inner();
        for r in resp.responses {
            if let Some(s) = r.status.filter(|s| s.code != 0) {
                return Err(tonic::Status::new(Code::from(s.code), s.message));
            }
        }
        Ok(())
    }

    async fn missing(&mut self, digests: Vec<reapi::Digest>) -> Result<Vec<reapi::Digest>, tonic::Status> {
        let req = reapi::FindMissingBlobsRequest { blob_digests: digests, ..Default::default() };
        Ok(self.cas.find_missing_blobs(req).await?.into_inner().missing_blob_digests)
    }
}

/// The Action and Command of action `index` (fixed per index).
fn action_blobs(index: u64) -> (Bytes, Bytes) {
    let command = reapi::Command {
        arguments: vec!["soak".into(), index.to_string()],
        output_files: vec!["out".into()],
        ..Default::default()
    };
    let command = Bytes::from(command.encode_to_vec());
    let action = reapi::Action { command_digest: Some(sha(&command)), ..Default::default() };
    (Bytes::from(action.encode_to_vec()), command)
}

fn action_digest(index: u64) -> reapi::Digest {
    sha(&action_blobs(index).0)
}

/// Whether a failed call is explained by the server being down: it failed
/// while the server was down, or a kill happened since it started (`epoch`
/// is the value then), or the connection itself failed.
fn outage(s: &tonic::Status, shared: &Shared, epoch: u64) -> bool {
    !shared.up.load(Ordering::Acquire)
        || shared.epoch.load(Ordering::Acquire) != epoch
        || matches!(s.code(), Code::Unavailable | Code::Cancelled)
}

/// Checks a served Action Cache entry: signed, one of the results written
/// for this action, complete.
async fn check_served(c: &mut Clients, shared: &Shared, index: u64, result: &reapi::ActionResult, epoch: u64) {
    let action = action_digest(index);
    let expected = Expected { instance: String::new(), digest_function: 0, action_digest: action.clone() };
    if let Err(reason) = verify_served(&shared.policy, result, &expected, SystemTime::now()) {
        shared.violation(format!("action {index}: a served entry does not verify ({reason:?})"));
        return;
    }
    let canonical = canonical_bytes(result);
    let known =
        shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).attempted.get(&index).map(|s| s.contains(&canonical));
    if known != Some(true) {
        shared.violation(format!("action {index}: the served result is none of the results written for it"));
    }
    let referenced: Vec<reapi::Digest> = result.output_files.iter().filter_map(|f| f.digest.clone()).collect();
    match c.missing(referenced).await {
        Ok(m) if m.is_empty() => {}
        Ok(m) => shared.violation(format!("action {index}: a served entry references missing blobs {m:?}")),
        Err(s) if outage(&s, shared, epoch) => {
            shared.outage_errors.fetch_add(1, Ordering::Relaxed);
        }
        Err(s) => shared.violation(format!("action {index}: FindMissingBlobs failed: {s}")),
    }
}

async fn check_blob(c: &mut Clients, shared: &Shared, seed: u64, len: usize) -> Result<(), tonic::Status> {
    let data = blob(seed, len);
    match c.read(&sha(&data)).await {
        Ok(bytes) if bytes == data[..] => Ok(()),
        Ok(bytes) => {
            shared.violation(format!("blob seed {seed}: {} wrong or torn bytes served (size {len})", bytes.len()));
            Ok(())
        }
        Err(s) if s.code() == Code::NotFound => {
            shared.violation(format!("acknowledged blob seed {seed} (size {len}) is NOT_FOUND"));
            Ok(())
        }
        Err(s) => Err(s),
    }
}

async fn check_action(c: &mut Clients, shared: &Shared, index: u64, epoch: u64) -> Result<(), tonic::Status> {
    let req = reapi::GetActionResultRequest { action_digest: Some(action_digest(index)), ..Default::default() };
    match c.ac.get_action_result(req).await {
        Ok(r) => {
            check_served(c, shared, index, &r.into_inner(), epoch).await;
            Ok(())
        }
        Err(s) if s.code() == Code::NotFound => {
            shared.violation(format!("action {index} has an acknowledged write but is a miss"));
            Ok(())
        }
        Err(s) => Err(s),
    }
}

async fn one_op(c: &mut Clients, shared: &Shared, rng: &mut Rng, worker: u64, epoch: u64) -> Result<(), tonic::Status> {
    match rng.below(10) {
        0..=3 => {
            let large = shared.bytes_acked.load(Ordering::Relaxed) < shared.byte_budget;
            let len = match rng.below(20) {
                // Several chunks, streamed through `pending`.
                0..=1 if large => (1 << 20) + rng.below(2 << 20) as usize,
                // One chunk, stored in one batch.
                2..=3 if large => 1 + rng.below(1 << 20) as usize,
                _ => 1 + rng.below(64 * 1024) as usize,
            };
            let seed = rng.next();
            c.upload(blob(seed, len)).await?;
            shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).blobs.push((seed, len));
            shared.blobs_acked.fetch_add(1, Ordering::Relaxed);
            shared.bytes_acked.fetch_add(len as u64, Ordering::Relaxed);
        }
        4..=5 => {
            let index = rng.below(ACTIONS);
            let (action, command) = action_blobs(index);
            let out = blob(rng.next(), 1 + rng.below(4096) as usize);
            c.batch_upload(&[action.clone(), command, out.clone()]).await?;
            let result = reapi::ActionResult {
                output_files: vec![reapi::OutputFile {
                    path: "out".into(),
                    digest: Some(sha(&out)),
                    ..Default::default()
                }],
                exit_code: (worker * 1000 + rng.below(1000)) as i32,
                ..Default::default()
            };
            shared
                .ledger
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .attempted
                .entry(index)
                .or_default()
                .insert(canonical_bytes(&result));
            let req = reapi::UpdateActionResultRequest {
                action_digest: Some(sha(&action)),
                action_result: Some(result),
                ..Default::default()
            };
            c.ac.update_action_result(req).await?;
            shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).acked_actions.insert(index);
            shared.ac_acked.fetch_add(1, Ordering::Relaxed);
        }
        6..=7 => {
            let pick = {
                let l = shared.ledger.lock().unwrap_or_else(|p| p.into_inner());
                (!l.blobs.is_empty()).then(|| l.blobs[rng.below(l.blobs.len() as u64) as usize])
            };
            if let Some((seed, len)) = pick {
                check_blob(c, shared, seed, len).await?;
                shared.reads_checked.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            let index = rng.below(ACTIONS);
            let acked = shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).acked_actions.contains(&index);
            let req = reapi::GetActionResultRequest { action_digest: Some(action_digest(index)), ..Default::default() };
            match c.ac.get_action_result(req).await {
                Ok(r) => check_served(c, shared, index, &r.into_inner(), epoch).await,
                Err(s) if s.code() == Code::NotFound && acked => {
                    shared.violation(format!("action {index} has an acknowledged write but is a miss"))
                }
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(s),
            }
            shared.reads_checked.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

async fn load_loop(channel: Channel, shared: Arc<Shared>, worker: u64) {
    let mut c = Clients::new(channel);
    let mut rng = Rng(seed_from_clock() ^ worker.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    while !shared.stop.load(Ordering::Relaxed) {
        let epoch = shared.epoch.load(Ordering::Acquire);
        if let Err(s) = one_op(&mut c, &shared, &mut rng, worker, epoch).await {
            if outage(&s, &shared, epoch) {
                shared.outage_errors.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                shared.violation(format!("a call failed while the server was up: {s}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// After a restart: up to `sample` acknowledged blobs (all if 0) and every
/// acknowledged action must read back. Returns false on an outage.
async fn check_after_restart(channel: Channel, shared: &Shared, sample: usize, seed: u64) -> bool {
    let mut c = Clients::new(channel);
    let (mut blobs, actions): (Vec<(u64, usize)>, Vec<u64>) = {
        let l = shared.ledger.lock().unwrap_or_else(|p| p.into_inner());
        (l.blobs.clone(), l.acked_actions.iter().copied().collect())
    };
    if sample > 0 && blobs.len() > sample {
        let mut rng = Rng(seed | 1);
        for i in 0..sample {
            let j = i + rng.below((blobs.len() - i) as u64) as usize;
            blobs.swap(i, j);
        }
        blobs.truncate(sample);
    }
    for (seed, len) in blobs {
        if check_blob(&mut c, shared, seed, len).await.is_err() {
            return false;
        }
    }
    let epoch = shared.epoch.load(Ordering::Acquire);
    for index in actions {
        if check_action(&mut c, shared, index, epoch).await.is_err() {
            return false;
        }
    }
    true
}

/// Runs the soak.
pub async fn run(p: &SoakParams) -> anyhow::Result<SoakReport> {
    std::fs::create_dir_all(&p.data_dir)?;
    let mut server = Server {
        exe: p.exe.clone(),
        data_dir: p.data_dir.clone(),
        log: p.data_dir.with_extension("server.log"),
        child: None,
        addr: None,
    };
    tokio::task::block_in_place(|| server.start())?;
    let addr = server.addr.context("no address")?;
    let policy = TrustPolicy::load(&p.data_dir.join("dev-pki").join("trust-policy.toml"))?;
    let shared = Arc::new(Shared {
        ledger: Mutex::default(),
        up: AtomicBool::new(true),
        epoch: AtomicU64::new(0),
        bytes_acked: AtomicU64::new(0),
        byte_budget: p.byte_budget,
        stop: AtomicBool::new(false),
        blobs_acked: AtomicU64::new(0),
        ac_acked: AtomicU64::new(0),
        reads_checked: AtomicU64::new(0),
        outage_errors: AtomicU64::new(0),
        violations: AtomicU64::new(0),
        examples: Mutex::default(),
        policy,
    });
    // One lazily (re)connecting channel per loop: after a restart on the same
    // port each reconnects by itself.
    let endpoint = Channel::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .tcp_nodelay(true);
    let mut loops = Vec::new();
    for w in 0..p.concurrency.max(1) {
        loops.push(tokio::spawn(load_loop(endpoint.connect_lazy(), shared.clone(), w as u64)));
    }

    let start = Instant::now();
    let mut report = SoakReport::default();
    let mut rng = Rng(seed_from_clock());
    let mut last_print = Instant::now();
    loop {
        let left = p.duration.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let ms = p.kill_every.as_millis() as u64;
        let wait = Duration::from_millis(ms / 2 + rng.below(ms.max(1)));
        tokio::time::sleep(wait.min(left)).await;
        if start.elapsed() >= p.duration {
            break;
        }
        shared.up.store(false, Ordering::Release);
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        tokio::task::block_in_place(|| server.kill9());
        report.kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
        tokio::task::block_in_place(|| server.start())?;
        shared.epoch.fetch_add(1, Ordering::AcqRel);
        shared.up.store(true, Ordering::Release);
        // Right after the restart, before new load hides anything.
        if check_after_restart(endpoint.connect_lazy(), &shared, 300, rng.next()).await {
            report.restart_checks += 1;
        }
        if last_print.elapsed() > Duration::from_secs(60) {
            last_print = Instant::now();
            eprintln!(
                "soak: {:.0}s, {} kills, {} blobs and {} AC writes acknowledged, {} violations",
                start.elapsed().as_secs_f64(),
                report.kills,
                shared.blobs_acked.load(Ordering::Relaxed),
                shared.ac_acked.load(Ordering::Relaxed),
                shared.violations.load(Ordering::Relaxed)
            );
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = tokio::time::timeout(Duration::from_secs(120), l).await;
    }
    // A clean stop and start, then everything acknowledged is checked.
    shared.up.store(false, Ordering::Release);
    tokio::task::block_in_place(|| server.stop())?;
    tokio::task::block_in_place(|| server.start())?;
    shared.up.store(true, Ordering::Release);
    if !check_after_restart(endpoint.connect_lazy(), &shared, 0, 0).await {
        shared.violation("the final check could not reach the restarted server".into());
    }
    report.restart_checks += 1;
    tokio::task::block_in_place(|| server.stop())?;

    report.elapsed = start.elapsed();
    report.blobs_acked = shared.blobs_acked.load(Ordering::Relaxed);
    report.bytes_acked = shared.bytes_acked.load(Ordering::Relaxed);
    report.ac_acked = shared.ac_acked.load(Ordering::Relaxed);
    report.reads_checked = shared.reads_checked.load(Ordering::Relaxed);
    report.outage_errors = shared.outage_errors.load(Ordering::Relaxed);
    report.violations = shared.violations.load(Ordering::Relaxed);
    report.examples = shared.examples.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(report)
}

/// A fresh data directory for a soak under the system temp directory.
pub fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("provcache-soak-{}-{}", std::process::id(), seed_from_clock() % 1_000_000))
}

/// Whether `path` looks like a directory a soak may delete afterwards.
pub fn is_soak_dir(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("provcache-soak-"))
}

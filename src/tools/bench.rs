//! `provcache bench`: a load generator that drives a running server through
//! its real gRPC API and prints throughput, latency percentiles and its own
//! CPU time. Blobs are generated before the timed part; every response is
//! checked.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;

use crate::cache::digest::{Digest, DigestFunction};
use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use crate::proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};

pub use crate::tools::client::{connect, Target};

/// Latency samples and counters of one run.
#[derive(Default)]
struct Stats {
    latencies_us: std::sync::Mutex<Vec<u32>>,
    ops: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

fn cpu_seconds() -> f64 {
    process_cpu_seconds(None).unwrap_or(0.0)
}

/// CPU seconds (user + system) a process has used: this one, or the server
/// whose pid `bench --server-pid` was given (Linux; `None` elsewhere). The
/// server's CPU per call is the figure that holds across machines and load,
/// where throughput and latency move with whatever else runs.
fn process_cpu_seconds(pid: Option<u32>) -> Option<f64> {
    // utime + stime from /proc/PID/stat, in clock ticks of 1/100 s.
    let path = pid.map_or_else(|| "/proc/self/stat".to_string(), |pid| format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    let after = stat.rsplit_once(')').map(|(_, s)| s).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Some((tick(11)? + tick(12)?) / 100.0)
}

/// A bench report.
#[derive(Debug, Clone)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Operations per second.
    pub ops_per_sec: f64,
    /// Payload megabytes (10^6) per second.
    pub mb_per_sec: f64,
    /// Latency percentiles in milliseconds: p50, p99, p99.9.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Operations completed.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// The bench client's own CPU seconds.
    pub client_cpu_s: f64,
    /// The server's CPU seconds over the timed part (with `--server-pid`).
    pub server_cpu_s: Option<f64>,
    /// Wall time.
    pub elapsed_s: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:<14} {:>10.0} req/s {:>9.1} MB/s  p50 {:>7.3} ms  p99 {:>7.3} ms  p99.9 {:>7.3} ms  \
             ops {} errors {}  client cpu {:.1}s / {:.1}s",
            self.scenario,
            self.ops_per_sec,
            self.mb_per_sec,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.ops,
            self.errors,
            self.client_cpu_s,
            self.elapsed_s
        )?;
        if let (Some(cpu), true) = (self.server_cpu_s, self.ops > 0) {
            write!(f, "  server cpu {:.1} us/call", cpu * 1e6 / self.ops as f64)?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// Runs `op` from `concurrency` tasks for `duration`; `op(worker, iteration)`
/// returns the payload bytes it moved.
async fn drive<F, Fut>(name: &str, p: &Params, op: F) -> Report
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<u64>> + Send,
{
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let op = Arc::new(op);
    let (concurrency, duration) = (p.concurrency, p.duration);
    let cpu0 = cpu_seconds();
    let server_cpu0 = p.server_pid.and_then(|pid| process_cpu_seconds(Some(pid)));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (stats, stop, op) = (stats.clone(), stop.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::with_capacity(100_000);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match op(w, i).await {
                    Ok(n) => {
                        local.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                        stats.ops.fetch_add(1, Ordering::Relaxed);
                        stats.bytes.fetch_add(n, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if stats.errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("bench {w}: {e:#}");
                        }
                    }
                }
                i += 1;
            }
            stats.latencies_us.lock().unwrap().extend(local);
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *stats.latencies_us.lock().unwrap());
    lat.sort_unstable();
    let ops = stats.ops.load(Ordering::Relaxed);
    Report {
        scenario: name.to_string(),
        ops_per_sec: ops as f64 / elapsed,
        mb_per_sec: stats.bytes.load(Ordering::Relaxed) as f64 / elapsed / 1e6,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        ops,
        errors: stats.errors.load(Ordering::Relaxed),
        client_cpu_s: cpu_seconds() - cpu0,
        server_cpu_s: server_cpu0.and_then(|c0| Some(process_cpu_seconds(p.server_pid)? - c0)),
        elapsed_s: elapsed,
    }
}

/// Deterministic pseudo-random bytes (xorshift), for load and tests.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// The SHA-256 digest of `data`, as a REAPI message.
pub(crate) fn sha(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Sha256, data).to_proto()
}

/// Stores `n` action results through the server's real write path (Action,
/// Command and an output uploaded first) and returns their action digests.
pub async fn prefill(ch: &Channel, instance: &str, n: usize, run_id: u64) -> anyhow::Result<Vec<reapi::Digest>> {
    let mut cas = ContentAddressableStorageClient::new(ch.clone());
    let ac = ActionCacheClient::new(ch.clone());
    let mut digests = Vec::with_capacity(n);
    for batch_start in (0..n).step_by(200) {
        let mut reqs = Vec::new();
        let mut pending = Vec::new();
        for i in batch_start..(batch_start + 200).min(n) {
            let command = reapi::Command {
                arguments: vec!["bench".into(), format!("{run_id}-{i}")],
                output_files: vec!["out".into()],
                ..Default::default()
            };
            let cmd_bytes = Bytes::from(command.encode_to_vec());
            let action = reapi::Action { command_digest: Some(sha(&cmd_bytes)), ..Default::default() };
            let act_bytes = Bytes::from(action.encode_to_vec());
            let out = pseudo_random_bytes(run_id ^ (i as u64) << 1, 64);
            for b in [&cmd_bytes, &act_bytes, &out] {
                reqs.push(batch_update_blobs_request::Request { digest: Some(sha(b)), data: b.clone(), compressor: 0 });
            }
            pending.push((sha(&act_bytes), sha(&out)));
        }
        let resp = cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: reqs,
                digest_function: 0,
            })
            .await?
            .into_inner();
        if resp.responses.iter().any(|r| r.status.as_ref().is_some_and(|s| s.code != 0)) {
            bail!("prefill upload failed: {:?}", resp.responses.iter().find(|r| r.status.as_ref().unwrap().code != 0));
        }
        // The batch's updates in parallel: a large prefill is bound by
        // round trips otherwise.
        let updates = pending.into_iter().map(|(action, out)| {
            let mut ac = ac.clone();
            let instance = instance.to_string();
            async move {
                ac.update_action_result(reapi::UpdateActionResultRequest {
                    instance_name: instance,
                    action_digest: Some(action.clone()),
                    action_result: Some(reapi::ActionResult {
                        output_files: vec![reapi::OutputFile {
                            path: "out".into(),
                            digest: Some(out),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await?;
                Ok::<_, anyhow::Error>(action)
            }
        });
        digests.extend(futures::future::try_join_all(updates).await?);
    }
    Ok(digests)
}

/// The stored result of `key` as a client would send it in an update: the
/// signed envelope the server attached is left out (the server attaches its
/// own).
pub(crate) async fn result_to_send(
    ch: &Channel,
    instance: &str,
    key: &reapi::Digest,
) -> anyhow::Result<reapi::ActionResult> {
    let mut result = ActionCacheClient::new(ch.clone())
        .get_action_result(reapi::GetActionResultRequest {
            instance_name: instance.to_string(),
            action_digest: Some(key.clone()),
            ..Default::default()
        })
        .await?
        .into_inner();
    result.execution_metadata = None;
    Ok(result)
}

/// Scenario parameters.
#[derive(Clone, Debug)]
pub struct Params {
    /// Concurrent request loops.
    pub concurrency: usize,
    /// Timed duration per scenario.
    pub duration: Duration,
    /// Working-set size for Action Cache scenarios.
    pub keys: usize,
    /// ac-hit reads only the first this many of `keys` (None: all).
    pub working_set: Option<usize>,
    /// A pause between the prefill and the timed part.
    pub settle: Duration,
    /// Blob size for write/read scenarios.
    pub size: usize,
    /// ByteStream message size for writes.
    pub chunk: usize,
    /// Connections to spread load over.
    pub connections: usize,
    /// The server's process id, to report its CPU per call (Linux).
    pub server_pid: Option<u32>,
    /// A directory on the server's data file system: `big-write` then also
    /// measures that file system's synced sequential write speed, the other
    /// physical limit of a big write (goal G6).
    pub disk_dir: Option<std::path::PathBuf>,
}

/// Runs one named scenario.
pub async fn run(target: &Target, scenario: &str, p: &Params) -> anyhow::Result<Report> {
    let mut channels = Vec::new();
    for _ in 0..p.connections.max(1) {
        channels.push(connect(target).await?);
    }
    let run_id = u64::from(std::process::id()) << 32 ^ Instant::now().elapsed().as_nanos() as u64 ^ rand_seed();
    let instance = target.instance.clone();
    let ch = move |w: usize| channels[w % channels.len()].clone();
    match scenario {
        "ac-hit" => {
            let mut keys = prefill(&ch(0), &instance, p.keys, run_id).await?;
            keys.truncate(p.working_set.unwrap_or(usize::MAX).max(1));
            let keys = Arc::new(keys);
            tokio::time::sleep(p.settle).await;
            Ok(drive("ac-hit", p, move |w, i| {
                let mut client = ActionCacheClient::new(ch(w));
                let key = keys[((w as u64 * 7919 + i) % keys.len() as u64) as usize].clone();
                let instance = instance.clone();
                async move {
                    let r = client
                        .get_action_result(reapi::GetActionResultRequest {
                            instance_name: instance,
                            action_digest: Some(key),
                            ..Default::default()
                        })
                        .await?
                        .into_inner();
                    if r.output_files.len() != 1 {
                        bail!("unexpected result");
                    }
                    Ok(0)
                }
            })
            .await)
        }
        "ac-update" => {
            let keys = Arc::new(prefill(&ch(0), &instance, p.keys, run_id).await?);
            let mut template = Vec::new();
            for k in keys.iter() {
                template.push(result_to_send(&ch(0), &instance, k).await?);
            }
            let template = Arc::new(template);
            Ok(drive("ac-update", p, move |w, i| {
                let mut client = ActionCacheClient::new(ch(w));
                let idx = ((w as u64 * 7919 + i) % keys.len() as u64) as usize;
                let (key, result) = (keys[idx].clone(), template[idx].clone());
                let instance = instance.clone();
                async move {
                    client
                        .update_action_result(reapi::UpdateActionResultRequest {
                            instance_name: instance,
                            action_digest: Some(key),
                            action_result: Some(result),
                            ..Default::default()
                        })
                        .await?;
                    Ok(0)
                }
            })
            .await)
        }
        "find-missing" => {
            let digests: Arc<Vec<reapi::Digest>> =
                Arc::new((0..100).map(|i| sha(&pseudo_random_bytes(run_id + i, 32))).collect());
            Ok(drive("find-missing", p, move |w, _| {
                let mut client = ContentAddressableStorageClient::new(ch(w));
                let digests = digests.clone();
                let instance = instance.clone();
                async move {
                    let r = client
                        .find_missing_blobs(reapi::FindMissingBlobsRequest {
                            instance_name: instance,
                            blob_digests: digests.to_vec(),
                            digest_function: 0,
                        })
                        .await?
                        .into_inner();
                    if r.missing_blob_digests.len() != 100 {
                        bail!("unexpected FindMissingBlobs answer");
                    }
                    Ok(0)
                }
            })
            .await)
        }
        "write" => {
            // Unique blobs, made before the timed part.
            let per_worker = 64usize;
            let blobs: Arc<Vec<Bytes>> = Arc::new(
                (0..p.concurrency * per_worker)
                    .map(|i| pseudo_random_bytes(run_id.wrapping_add(i as u64 * 31), p.size))
                    .collect(),
            );
            let digests: Arc<Vec<reapi::Digest>> = Arc::new(blobs.iter().map(|b| sha(b)).collect());
            let counter = Arc::new(AtomicU64::new(0));
            let (size, chunk) = (p.size, p.chunk);
            Ok(drive(&format!("write-{}k", size / 1024), p, move |w, _| {
                let mut client = ByteStreamClient::new(ch(w));
                let n = counter.fetch_add(1, Ordering::Relaxed) as usize;
                // Past the pre-made set, vary one byte per round so each write is unique.
                let mut data = blobs[n % blobs.len()].clone();
                let mut digest = digests[n % blobs.len()].clone();
                if n >= blobs.len() {
                    let mut v = data.to_vec();
                    v[..8].copy_from_slice(&(n as u64).to_le_bytes());
                    data = Bytes::from(v);
                    digest = sha(&data);
                }
                let instance = instance.clone();
                async move {
                    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
                    let name = format!("{prefix}uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), digest.hash, size);
                    let msgs = write_messages(name, data, chunk);
                    let r = client.write(futures::stream::iter(msgs)).await?.into_inner();
                    if r.committed_size != size as i64 {
                        bail!("committed {} of {size}", r.committed_size);
                    }
                    Ok(size as u64)
                }
            })
            .await)
        }
        "read" => {
            let data = pseudo_random_bytes(run_id, p.size);
            let digest = sha(&data);
            let mut bs = ByteStreamClient::new(ch(0));
            let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
            let name = format!("{prefix}uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), digest.hash, p.size);
            bs.write(futures::stream::iter(write_messages(name, data, 1 << 20))).await?;
            let size = p.size;
            Ok(drive(&format!("read-{}k", size / 1024), p, move |w, _| {
                let mut client = ByteStreamClient::new(ch(w));
                let name = format!("{prefix}blobs/{}/{}", digest.hash, size);
                async move {
                    let mut s = client
                        .read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 })
                        .await?
                        .into_inner();
                    let mut n = 0;
                    while let Some(m) = s.message().await? {
                        n += m.data.len();
                    }
                    if n != size {
                        bail!("read {n} of {size}");
                    }
                    Ok(size as u64)
                }
            })
            .await)
        }
        "big-write" => {
            let disk = match &p.disk_dir {
                Some(dir) => Some(synced_write_speed(dir, p.size).await?),
                None => None,
            };
            let (report, _, sha_mb_s) = big_write(&ch(0), &instance, p.size, p.chunk, run_id).await?;
            if let Some(disk_mb_s) = disk {
                let limit = sha_mb_s.min(disk_mb_s);
                eprintln!(
                    "big-write: synced sequential write into {}: {disk_mb_s:.0} MB/s; G6 = {:.0} / min(SHA-256 \
                     {sha_mb_s:.0}, disk {disk_mb_s:.0}) = {:.2}",
                    p.disk_dir.as_ref().map_or(String::new(), |d| d.display().to_string()),
                    report.mb_per_sec,
                    report.mb_per_sec / limit
                );
            }
            Ok(report)
        }
        "big-read" => {
            let (_, digest, _) = big_write(&ch(0), &instance, p.size, p.chunk, run_id).await?;
            big_read(&ch(0), &instance, &digest).await
        }
        other => {
            bail!("unknown scenario {other:?} (ac-hit, ac-update, find-missing, write, read, big-write, big-read)")
        }
    }
}

pub(crate) fn rand_seed() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

pub(crate) fn write_messages(name: String, data: Bytes, chunk: usize) -> Vec<WriteRequest> {
    let mut msgs = Vec::with_capacity(data.len() / chunk + 1);
    let mut off = 0;
    loop {
        let end = (off + chunk).min(data.len());
        msgs.push(WriteRequest {
            resource_name: if off == 0 { name.clone() } else { String::new() },
            write_offset: off as i64,
            finish_write: end == data.len(),
            data: data.slice(off..end),
        });
        off = end;
        if off == data.len() {
            return msgs;
        }
    }
}

/// The file system's synced sequential write speed in MB/s: `size` bytes
/// written in 1 MiB blocks to a temporary file in `dir`, then fdatasync, the
/// way the server's data reaches the disk. The file is removed.
async fn synced_write_speed(dir: &std::path::Path, size: usize) -> anyhow::Result<f64> {
    use std::io::Write as _;
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let block = pseudo_random_bytes(rand_seed(), 1 << 20);
        let path = dir.join(format!(".provcache-disk-probe-{}", std::process::id()));
        let mut file = std::fs::File::create_new(&path)
            .with_context(|| format!("--disk-dir: cannot create {}", path.display()))?;
        let t = Instant::now();
        let written = (|| {
            let mut left = size;
            while left > 0 {
                let n = left.min(block.len());
                file.write_all(&block[..n])?;
                left -= n;
            }
            file.sync_data()
        })();
        let secs = t.elapsed().as_secs_f64();
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        written.with_context(|| format!("writing {}", path.display()))?;
        Ok(size as f64 / secs / 1e6)
    })
    .await?
}

/// One big blob streamed with ByteStream; the client generates and hashes the
/// data up front (one pass) and then streams a repeated block, so neither side
/// holds the blob. Also measures single-core SHA-256 speed (MB/s, returned
/// last) for comparison.
async fn big_write(
    ch: &Channel,
    instance: &str,
    size: usize,
    chunk: usize,
    seed: u64,
) -> anyhow::Result<(Report, reapi::Digest, f64)> {
    let block = pseudo_random_bytes(seed, chunk);
    let blocks = size.div_ceil(chunk);
    let sha_start = Instant::now();
    let mut h = DigestFunction::Sha256.hasher();
    for i in 0..blocks {
        let len = chunk.min(size - i * chunk);
        h.update(&block[..len]);
    }
    let hash = h.finalize();
    let sha_mb_s = size as f64 / sha_start.elapsed().as_secs_f64() / 1e6;
    let digest = Digest { function: DigestFunction::Sha256, hash, size: size as u64 }.to_proto();
    let written = digest.clone();
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    let name = format!("{prefix}uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), digest.hash, size);
    let stream = futures::stream::iter((0..blocks).map(move |i| {
        let len = chunk.min(size - i * chunk);
        WriteRequest {
            resource_name: if i == 0 { name.clone() } else { String::new() },
            write_offset: (i * chunk) as i64,
            finish_write: i + 1 == blocks,
            data: block.slice(..len),
        }
    }));
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let r = ByteStreamClient::new(ch.clone()).max_decoding_message_size(64 << 20).write(stream).await?.into_inner();
    let secs = t.elapsed().as_secs_f64();
    if r.committed_size != size as i64 {
        bail!("committed {} of {size}", r.committed_size);
    }
    let mb_s = size as f64 / secs / 1e6;
    eprintln!(
        "big-write: {} MiB in {secs:.2}s = {mb_s:.0} MB/s; single-core SHA-256 here: {sha_mb_s:.0} MB/s; ratio {:.2}",
        size >> 20,
        mb_s / sha_mb_s
    );
    Ok((single("big-write", size, secs, cpu_seconds() - cpu0), written, sha_mb_s))
}

pub(crate) fn single(name: &str, size: usize, secs: f64, cpu: f64) -> Report {
    Report {
        scenario: name.into(),
        ops_per_sec: 1.0 / secs,
        mb_per_sec: size as f64 / secs / 1e6,
        p50_ms: secs * 1000.0,
        p99_ms: secs * 1000.0,
        p999_ms: secs * 1000.0,
        ops: 1,
        errors: 0,
        client_cpu_s: cpu,
        server_cpu_s: None,
        elapsed_s: secs,
    }
}

/// Streams a whole blob back, hashing it, and checks the digest.
async fn big_read(ch: &Channel, instance: &str, digest: &reapi::Digest) -> anyhow::Result<Report> {
    let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
    let name = format!("{prefix}blobs/{}/{}", digest.hash, digest.size_bytes);
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let mut s = ByteStreamClient::new(ch.clone())
        .max_decoding_message_size(64 << 20)
        .read(ReadRequest { resource_name: name, read_offset: 0, read_limit: 0 })
        .await?
        .into_inner();
    let mut h = DigestFunction::Sha256.hasher();
    let mut n = 0usize;
    while let Some(m) = s.message().await? {
        n += m.data.len();
        h.update(&m.data);
    }
    let secs = t.elapsed().as_secs_f64();
    if n as i64 != digest.size_bytes || hex::encode(h.finalize()) != digest.hash {
        bail!("read back {n} bytes that do not match {}", digest.hash);
    }
    Ok(single("big-read", n, secs, cpu_seconds() - cpu0))
}

/// A process's resident and peak resident memory in MiB (VmRSS, VmHWM),
/// from /proc (Linux); `None` elsewhere or when it cannot be read.
pub fn process_memory_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// How the attacker's rounds ended, by gRPC code.
#[derive(Debug, Default)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
struct Rounds(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

impl Rounds {
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    fn add(&self, outcome: &crate::tools::attack::domain::Round) {
        let code = match outcome {
            Ok(()) => "done".to_string(),
            Err(s) => format!("{:?}", s.code()),
        };
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1;
    }
}

impl std::fmt::Display for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rounds = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let parts: Vec<String> = rounds.iter().map(|(code, n)| format!("{code} {n}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Who attacks in `provcache bench --attacker`, and how.
#[derive(Debug, Clone, Copy)]
pub struct Attacker<'a> {
    /// The attacker's server and identity (its own client certificate, so
    /// that per-identity limits tell it from the honest client).
    pub target: &'a Target,
    /// One of [`crate::tools::attack::domain::KINDS`].
    pub kind: &'a str,
    /// Concurrent attack loops.
    pub loops: usize,
}

/// `provcache bench --attacker KIND`: runs the honest `scenario` alone, then
/// again while the attacker's loops repeat the attack `kind`
/// ([`crate::tools::attack::domain::KINDS`]), and prints the honest figures of both
/// runs, how the attacker's rounds ended and, given the server's pid, its
/// memory after each run. The attacker runs on its own connection; an
/// attack whose harm accumulates stops after its rounds (see
/// [`crate::tools::attack::domain::Attack::max_rounds`]).
#[cfg(feature = "server")]
pub async fn run_under_attack(
    target: &Target,
    scenario: &str,
    p: &Params,
    attacker: &Attacker<'_>,
    server_pid: Option<u32>,
) -> anyhow::Result<()> {
    let (kind, attackers) = (attacker.kind, attacker.loops);
    let memory = || match server_pid.and_then(process_memory_mib) {
        Some((rss, hwm)) => format!("server RSS {rss:.0} MiB, peak {hwm:.0} MiB"),
        None => String::new(),
    };
    let quiet = run(target, scenario, p).await?;
    println!("without attacker: {quiet}  {}", memory());
    let ch = connect(attacker.target).await?;
    let attack = crate::tools::attack::domain::Attack::prepare(kind, &ch, &attacker.target.instance).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(Rounds::default());
    let loops: Vec<_> = (0..attackers.max(1))
        .map(|_| {
            let (attack, stop, rounds) = (attack.clone(), stop.clone(), rounds.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && attack.max_rounds().is_none_or(|max| n < max) {
                    rounds.add(&attack.once().await);
                    n += 1;
                }
            })
        })
        .collect();
    // Let the attack take hold before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loud = run(target, scenario, p).await?;
    println!("with {kind} x{attackers}: {loud}  {}", memory());
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        // A round an unfixed server takes long over is not waited for.
        if tokio::time::timeout(Duration::from_secs(30), l).await.is_err() {
            eprintln!("an attacker round was still running after 30 s; abandoned");
        }
    }
    println!("attacker rounds: {rounds}");
    Ok(())
}

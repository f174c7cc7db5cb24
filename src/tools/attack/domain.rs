//! Attacks through the domain: inline names, amplifying Directory blobs, half-finished uploads, ranged reads.
//!
//! Each attack is set up once against a server (through its real write
//! path, as the attacker would) and then repeated with [`InlineNames::once`]
//! and the like, so a test can assert the server's bound after one round and
//! `provcache bench --attacker` can loop it while honest load runs. Every
//! round returns the gRPC outcome the attacker saw: a fixed server refuses
//! most rounds (naming the limit), where an unfixed one did the work.

use bytes::Bytes;
use prost::Message;
use tonic::transport::Channel;

use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest, WriteRequest};
use crate::proto::reapi::{
    self, action_cache_client::ActionCacheClient, batch_update_blobs_request,
    content_addressable_storage_client::ContentAddressableStorageClient,
};
use crate::tools::bench::{pseudo_random_bytes, sha};

/// Messages of up to this size (the server accepts 8 MiB).
const MAX_MESSAGE: usize = 16 << 20;

/// The attacks `provcache bench --attacker` knows.
pub const KINDS: &[&str] = &["inline-names", "directory-amplification", "half-uploads", "ranged-reads"];

/// How one attack round ended for the attacker.
pub type Round = Result<(), tonic::Status>;

fn prefixed(instance: &str, rest: &str) -> String {
    if instance.is_empty() {
        rest.to_string()
    } else {
        format!("{instance}/{rest}")
    }
}

fn resource(d: &reapi::Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

fn unique() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Uploads small blobs with one BatchUpdateBlobs.
async fn upload(ch: &Channel, instance: &str, blobs: &[Bytes]) -> anyhow::Result<Vec<reapi::Digest>> {
    let digests: Vec<reapi::Digest> = blobs.iter().map(|b| sha(b)).collect();
    let requests = blobs
        .iter()
        .zip(&digests)
        .map(|(b, d)| batch_update_blobs_request::Request { digest: Some(d.clone()), data: b.clone(), compressor: 0 })
        .collect();
    let resp = ContentAddressableStorageClient::new(ch.clone())
        .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests,
            digest_function: 0,
        })
        .await?
        .into_inner();
    if let Some(bad) = resp.responses.iter().find(|r| r.status.as_ref().is_some_and(|s| s.code != 0)) {
        anyhow::bail!("upload refused: {:?}", bad.status);
    }
    Ok(digests)
}

/// Streams one blob with ByteStream in 1 MiB messages.
pub async fn write_blob(ch: &Channel, instance: &str, data: Bytes) -> anyhow::Result<reapi::Digest> {
    let d = sha(&data);
    let name = prefixed(instance, &format!("uploads/{}/blobs/{}", unique(), resource(&d)));
    let step = 1 << 20;
    let msgs: Vec<WriteRequest> = (0..data.len().div_ceil(step).max(1))
        .map(|i| {
            let (from, to) = (i * step, ((i + 1) * step).min(data.len()));
            WriteRequest {
                resource_name: if i == 0 { name.clone() } else { String::new() },
                write_offset: from as i64,
                finish_write: to == data.len(),
                data: data.slice(from..to),
            }
        })
        .collect();
    ByteStreamClient::new(ch.clone()).write(futures::stream::iter(msgs)).await?;
    Ok(d)
}

/// Stores an action whose result lists `outputs` output files (all the same
/// small blob), through the real write path. Returns the action digest and
/// the result as sent.
pub async fn store_result(
    ch: &Channel,
    instance: &str,
    outputs: usize,
) -> anyhow::Result<(reapi::Digest, reapi::ActionResult)> {
    let (action, result) = result_with_outputs(ch, instance, outputs).await?;
    ActionCacheClient::new(ch.clone())
        .max_encoding_message_size(MAX_MESSAGE)
        .update_action_result(reapi::UpdateActionResultRequest {
            instance_name: instance.into(),
            action_digest: Some(action.clone()),
            action_result: Some(result.clone()),
            ..Default::default()
        })
        .await?;
    Ok((action, result))
}

/// An Action (stored) and a result listing `outputs` output files whose
/// blob is stored, not yet sent.
pub async fn result_with_outputs(
    ch: &Channel,
    instance: &str,
    outputs: usize,
) -> anyhow::Result<(reapi::Digest, reapi::ActionResult)> {
    let salt = unique();
    let command = reapi::Command { arguments: vec!["attack".into(), salt], ..Default::default() };
    let command = Bytes::from(command.encode_to_vec());
    let action = reapi::Action { command_digest: Some(sha(&command)), ..Default::default() };
    let action = Bytes::from(action.encode_to_vec());
    let out = pseudo_random_bytes(outputs as u64, 32);
    let digests = upload(ch, instance, &[command, action, out]).await?;
    let result = reapi::ActionResult {
        output_files: (0..outputs)
            .map(|i| reapi::OutputFile {
                path: format!("out/file-{i:07}"),
                digest: Some(digests[2].clone()),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    Ok((digests[1].clone(), result))
}

/// Attack 1: GetActionResult asking to inline many names that match none
/// of a result's many outputs (outputs × names comparisons on an unfixed
/// server, on an async worker that never yields).
#[derive(Debug, Clone)]
pub struct InlineNames {
    ch: Channel,
    instance: String,
    action: reapi::Digest,
    names: Vec<String>,
}

impl InlineNames {
    /// Stores a result with `outputs` output files and makes `names` names
    /// that match none of them.
    pub async fn prepare(ch: &Channel, instance: &str, outputs: usize, names: usize) -> anyhow::Result<Self> {
        let (action, _) = store_result(ch, instance, outputs).await?;
        let names = (0..names).map(|i| format!("out/none-{i:07}")).collect();
        Ok(InlineNames { ch: ch.clone(), instance: instance.into(), action, names })
    }

    /// The same attack made by the caller of `ch` (another identity).
    pub fn via(mut self, ch: &Channel) -> Self {
        self.ch = ch.clone();
        self
    }

    /// The action whose result is attacked.
    pub fn action(&self) -> &reapi::Digest {
        &self.action
    }

    /// One GetActionResult asking to inline every name.
    pub async fn once(&self) -> Round {
        ActionCacheClient::new(self.ch.clone())
            .max_encoding_message_size(MAX_MESSAGE)
            .max_decoding_message_size(MAX_MESSAGE)
            .get_action_result(reapi::GetActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(self.action.clone()),
                inline_output_files: self.names.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }
}

/// A Directory blob of `bytes` bytes that is nothing but empty FileNodes
/// (two bytes each, some 60 times that decoded).
pub fn empty_file_nodes(bytes: usize) -> Bytes {
    Bytes::from([0x0a, 0x00].repeat(bytes / 2))
}

/// A Tree blob of `bytes` bytes that is nothing but empty child Directories.
pub fn empty_children(bytes: usize) -> Bytes {
    Bytes::from([0x12, 0x00].repeat(bytes / 2))
}

/// Attack 3: GetTree of a Directory made of empty FileNodes, which an
/// unfixed server decodes whole, at some 60 times its size, on every call.
#[derive(Debug, Clone)]
pub struct DirectoryAmplification {
    ch: Channel,
    instance: String,
    /// The amplifying Directory.
    pub root: reapi::Digest,
}

impl DirectoryAmplification {
    /// Uploads the amplifying Directory of `bytes` bytes.
    pub async fn prepare(ch: &Channel, instance: &str, bytes: usize) -> anyhow::Result<Self> {
        let root = write_blob(ch, instance, empty_file_nodes(bytes)).await?;
        Ok(DirectoryAmplification { ch: ch.clone(), instance: instance.into(), root })
    }

    /// One GetTree of it, read to the end.
    pub async fn once(&self) -> Round {
        let mut stream = ContentAddressableStorageClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .get_tree(reapi::GetTreeRequest {
                instance_name: self.instance.clone(),
                root_digest: Some(self.root.clone()),
                ..Default::default()
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    }
}

/// A zstd frame that needs a window of `2^window_log` bytes, carrying
/// `bytes` zeros, left unfinished (no last block, no checksum): what a
/// half-finished compressed upload sends.
#[cfg(feature = "server")]
pub fn unfinished_zstd_frame(window_log: u32, bytes: usize) -> Bytes {
    use std::io::Write;
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).expect("zstd encoder");
    enc.window_log(window_log).expect("a valid window log");
    enc.include_checksum(false).expect("zstd parameter");
    enc.write_all(&vec![0u8; bytes]).expect("in memory");
    enc.flush().expect("in memory");
    Bytes::from(std::mem::take(enc.get_mut()))
}

/// Attack 4: compressed uploads that send a little and never finish; an
/// unfixed server keeps each one, with its buffer and zstd window, for an
/// hour, in one pool shared by every writer.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub struct HalfUploads {
    ch: Channel,
    instance: String,
    /// The size each upload claims.
    pub size: u64,
    frame: Bytes,
}

#[cfg(feature = "server")]
impl HalfUploads {
    /// Uploads claiming `size` bytes, each sending a frame with a
    /// `2^window_log`-byte window that decompresses to `sent` bytes.
    pub fn new(ch: &Channel, instance: &str, size: u64, window_log: u32, sent: usize) -> Self {
        let frame = unfinished_zstd_frame(window_log, sent);
        HalfUploads { ch: ch.clone(), instance: instance.into(), size, frame }
    }

    /// Starts one half-finished upload under a fresh upload id. A server
    /// that keeps the session answers INVALID_ARGUMENT (the stream ended
    /// without finish_write, resumable); a refusal is any other status.
    pub async fn once(&self) -> Round {
        let digest = sha(&pseudo_random_bytes(rand_u64(), 16));
        let digest = reapi::Digest { size_bytes: self.size as i64, ..digest };
        let name =
            prefixed(&self.instance, &format!("uploads/{}/compressed-blobs/zstd/{}", unique(), resource(&digest)));
        let msg = WriteRequest { resource_name: name, write_offset: 0, finish_write: false, data: self.frame.clone() };
        match ByteStreamClient::new(self.ch.clone()).write(futures::stream::iter([msg])).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::InvalidArgument && s.message().contains("without finish_write") => {
                Ok(())
            }
            Err(s) => Err(s),
        }
    }
}

/// Attack 6: 1-byte ranged reads of a large blob, each of which an unfixed
/// server answers by re-hashing the whole blob.
#[derive(Debug, Clone)]
pub struct RangedReads {
    ch: Channel,
    instance: String,
    /// The large blob.
    pub digest: reapi::Digest,
}

impl RangedReads {
    /// Uploads a blob of `size` bytes.
    pub async fn prepare(ch: &Channel, instance: &str, size: usize) -> anyhow::Result<Self> {
        let digest = write_blob(ch, instance, pseudo_random_bytes(rand_u64(), size)).await?;
        Ok(RangedReads { ch: ch.clone(), instance: instance.into(), digest })
    }

    /// Reads of a blob already stored.
    pub fn of(ch: &Channel, instance: &str, digest: reapi::Digest) -> Self {
        RangedReads { ch: ch.clone(), instance: instance.into(), digest }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, tonic::Status> {
        let name = prefixed(&self.instance, &format!("blobs/{}", resource(&self.digest)));
        let mut stream = ByteStreamClient::new(self.ch.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .read(ReadRequest { resource_name: name, read_offset: offset as i64, read_limit: len as i64 })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.message().await? {
            out.extend_from_slice(&m.data);
        }
        Ok(out)
    }

    /// One 1-byte read at a random offset.
    pub async fn once(&self) -> Round {
        let offset = rand_u64() % self.digest.size_bytes.max(1) as u64;
        self.read(offset, 1).await.map(|_| ())
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    u64::from_le_bytes(b)
}

/// One of the attacks, set up and ready to repeat.
#[derive(Debug, Clone)]
pub enum Attack {
    /// See [`InlineNames`].
    InlineNames(InlineNames),
    /// See [`DirectoryAmplification`].
    DirectoryAmplification(DirectoryAmplification),
    /// See [`HalfUploads`].
    HalfUploads(HalfUploads),
    /// See [`RangedReads`].
    RangedReads(RangedReads),
}

impl Attack {
    /// Sets up the attack `kind` (one of [`KINDS`]) at the scale of the
    /// issue's reports, shrunk to what one bench run can afford.
    #[cfg(feature = "server")]
    pub async fn prepare(kind: &str, ch: &Channel, instance: &str) -> anyhow::Result<Self> {
        Ok(match kind {
            "inline-names" => Attack::InlineNames(InlineNames::prepare(ch, instance, 2_000, 200_000).await?),
            "directory-amplification" => {
                Attack::DirectoryAmplification(DirectoryAmplification::prepare(ch, instance, 16 << 20).await?)
            }
            "half-uploads" => Attack::HalfUploads(HalfUploads::new(ch, instance, 4 << 20, 21, 896 << 10)),
            "ranged-reads" => Attack::RangedReads(RangedReads::prepare(ch, instance, 256 << 20).await?),
            other => anyhow::bail!("unknown attacker {other:?} ({})", KINDS.join(", ")),
        })
    }

    /// How many rounds one attacker loop makes before it stops, when the
    /// attack's harm accumulates: an unfixed server keeps every
    /// half-finished upload for an hour, and the bench must not take a
    /// shared machine's memory without end.
    pub fn max_rounds(&self) -> Option<u64> {
        match self {
            Attack::HalfUploads(_) => Some(750),
            _ => None,
        }
    }

    /// One round.
    pub async fn once(&self) -> Round {
        match self {
            Attack::InlineNames(a) => a.once().await,
            Attack::DirectoryAmplification(a) => a.once().await,
            #[cfg(feature = "server")]
            Attack::HalfUploads(a) => a.once().await,
            #[cfg(not(feature = "server"))]
            Attack::HalfUploads(_) => Ok(()),
            Attack::RangedReads(a) => a.once().await,
        }
    }
}

//! `provcache bench --write-request FILE`: one request body, framed as a gRPC
//! message, for a load generator that costs less than the server (`h2load
//! -d FILE`). What the request needs (an Action Cache entry, a blob) is
//! stored through the server's real write path first, so every call of the
//! load is the kind named: a verified hit, a FindMissingBlobs of 100
//! digests, an UpdateActionResult or a ByteStream read of `--size` bytes.
//! tests/bench/server-cpu.sh uses it for the server's CPU per call.

use anyhow::bail;
use prost::Message;

use super::bench::{prefill, pseudo_random_bytes, rand_seed, result_to_send, sha, write_messages, Target};
use crate::proto::bytestream::{byte_stream_client::ByteStreamClient, ReadRequest};
use crate::proto::reapi;

/// Writes the request body of `kind` (a bench scenario name: `ac-hit`,
/// `find-missing`, `ac-update` or `read`) to `path` and returns the gRPC
/// method path the load generator sends it to.
pub async fn write_request(target: &Target, kind: &str, size: usize, path: &std::path::Path) -> anyhow::Result<String> {
    let ch = super::bench::connect(target).await?;
    let instance = target.instance.clone();
    let seed = rand_seed();
    let (method, request) = match kind {
        "ac-hit" => {
            let key = prefill(&ch, &instance, 1, seed).await?.remove(0);
            let request = reapi::GetActionResultRequest {
                instance_name: instance,
                action_digest: Some(key),
                ..Default::default()
            };
            ("ActionCache/GetActionResult", request.encode_to_vec())
        }
        "ac-update" => {
            let key = prefill(&ch, &instance, 1, seed).await?.remove(0);
            let result = result_to_send(&ch, &instance, &key).await?;
            let request = reapi::UpdateActionResultRequest {
                instance_name: instance,
                action_digest: Some(key),
                action_result: Some(result),
                ..Default::default()
            };
            ("ActionCache/UpdateActionResult", request.encode_to_vec())
        }
        "find-missing" => {
            let digests = (0..100).map(|i| sha(&pseudo_random_bytes(seed + i, 32))).collect();
            let request =
                reapi::FindMissingBlobsRequest { instance_name: instance, blob_digests: digests, digest_function: 0 };
            ("ContentAddressableStorage/FindMissingBlobs", request.encode_to_vec())
        }
        "read" => {
            let data = pseudo_random_bytes(seed, size);
            let digest = sha(&data);
            let prefix = if instance.is_empty() { String::new() } else { format!("{instance}/") };
            let name = format!("{prefix}uploads/{}/blobs/{}/{}", uuid::Uuid::new_v4(), digest.hash, digest.size_bytes);
            let messages = write_messages(name, data, 64 * 1024);
            ByteStreamClient::new(ch).write(futures::stream::iter(messages)).await?;
            let request = ReadRequest {
                resource_name: format!("{prefix}blobs/{}/{}", digest.hash, digest.size_bytes),
                ..Default::default()
            };
            return finish(path, "/google.bytestream.ByteStream/Read", request.encode_to_vec());
        }
        other => bail!("--write-request takes one of ac-hit, ac-update, find-missing, read as --scenario, not {other}"),
    };
    finish(path, &format!("/build.bazel.remote.execution.v2.{method}"), request)
}

/// Frames `request` as one uncompressed gRPC message (flag byte, then the
/// length as u32 big-endian) into `path`.
fn finish(path: &std::path::Path, method: &str, request: Vec<u8>) -> anyhow::Result<String> {
    let mut body = vec![0u8];
    body.extend_from_slice(&(request.len() as u32).to_be_bytes());
    body.extend_from_slice(&request);
    std::fs::write(path, body)?;
    Ok(method.to_string())
}

//! The REAPI clients of one channel and the Action Cache and CAS calls the
//! suites make with them, so that each suite states what it asserts rather
//! than how a request is built.

use prost::Message;
use provcache::proto::bytestream::byte_stream_client::ByteStreamClient;
use provcache::proto::bytestream::{ReadRequest, WriteRequest};
use provcache::proto::reapi::action_cache_client::ActionCacheClient;
use provcache::proto::reapi::capabilities_client::CapabilitiesClient;
use provcache::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use provcache::proto::reapi::{self, batch_update_blobs_request};
use provcache::service::REQUEST_METADATA_HEADER;
use tonic::metadata::BinaryMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::{sha, MAX_MSG};

/// The REAPI clients of one connection, with message limits above the
/// server's so that oversized calls are refused by the server under test.
#[derive(Clone)]
pub struct Clients {
    /// ContentAddressableStorage, for calls the helpers below do not make.
    pub cas: ContentAddressableStorageClient<Channel>,
    /// ActionCache, likewise.
    pub ac: ActionCacheClient<Channel>,
    /// ByteStream, likewise.
    pub bs: ByteStreamClient<Channel>,
    /// Capabilities.
    pub caps: CapabilitiesClient<Channel>,
}

impl Clients {
    /// The four clients, sharing `ch` (one connection).
    pub fn new(ch: Channel) -> Self {
        Clients {
            cas: ContentAddressableStorageClient::new(ch.clone())
                .max_decoding_message_size(MAX_MSG)
                .max_encoding_message_size(MAX_MSG),
            ac: ActionCacheClient::new(ch.clone()).max_decoding_message_size(MAX_MSG),
            bs: ByteStreamClient::new(ch.clone()).max_decoding_message_size(MAX_MSG),
            caps: CapabilitiesClient::new(ch),
        }
    }

    /// BatchUpdateBlobs of `blobs`: the per-blob status codes, or the call's
    /// own refusal.
    pub async fn batch_update(&mut self, instance: &str, blobs: &[&[u8]]) -> Result<Vec<i32>, Status> {
        let request = reapi::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests: blobs
                .iter()
                .map(|b| batch_update_blobs_request::Request {
                    digest: Some(sha(b)),
                    data: bytes::Bytes::copy_from_slice(b),
                    compressor: 0,
                })
                .collect(),
            digest_function: 0,
        };
        let reply = self.cas.batch_update_blobs(request).await?.into_inner();
        Ok(reply.responses.iter().map(|r| r.status.as_ref().map_or(-1, |s| s.code)).collect())
    }

    /// Uploads blobs with BatchUpdateBlobs and asserts every one succeeded.
    pub async fn upload(&mut self, instance: &str, blobs: &[&[u8]]) -> Vec<reapi::Digest> {
        let codes = self.batch_update(instance, blobs).await.unwrap();
        for code in &codes {
            assert_eq!(*code, 0, "a blob of the batch was refused: {codes:?}");
        }
        blobs.iter().map(|b| sha(b)).collect()
    }

    /// Uploads a protobuf message and returns its digest.
    pub async fn upload_msg<M: Message>(&mut self, instance: &str, m: &M) -> reapi::Digest {
        self.upload(instance, &[&m.encode_to_vec()]).await.remove(0)
    }

    /// Writes a blob with ByteStream in `chunk`-byte messages.
    pub async fn write(&mut self, resource: &str, data: &[u8], chunk: usize) -> Result<i64, Status> {
        let msgs = write_requests(resource, data, chunk, 0, true);
        self.bs.write(futures::stream::iter(msgs)).await.map(|r| r.into_inner().committed_size)
    }

    /// Reads a whole blob with ByteStream.
    pub async fn read(&mut self, resource: &str, offset: i64, limit: i64) -> Result<Vec<u8>, Status> {
        let request = ReadRequest { resource_name: resource.into(), read_offset: offset, read_limit: limit };
        let mut stream = self.bs.read(request).await?.into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream.message().await? {
            out.extend_from_slice(&msg.data);
        }
        Ok(out)
    }

    /// FindMissingBlobs, or the call's refusal.
    pub async fn find_missing(
        &mut self,
        instance: &str,
        digests: &[reapi::Digest],
    ) -> Result<Vec<reapi::Digest>, Status> {
        let request = reapi::FindMissingBlobsRequest {
            instance_name: instance.into(),
            blob_digests: digests.to_vec(),
            digest_function: 0,
        };
        Ok(self.cas.find_missing_blobs(request).await?.into_inner().missing_blob_digests)
    }

    /// FindMissingBlobs, which must be answered.
    pub async fn missing(&mut self, instance: &str, digests: &[reapi::Digest]) -> Vec<reapi::Digest> {
        self.find_missing(instance, digests).await.unwrap()
    }

    /// GetActionResult, or the whole refusal (its message matters to some
    /// tests).
    pub async fn get_result(&mut self, instance: &str, action: &reapi::Digest) -> Result<reapi::ActionResult, Status> {
        self.ac.get_action_result(get(instance, action)).await.map(tonic::Response::into_inner)
    }

    /// GetActionResult: `Ok` on a hit, the status code otherwise.
    pub async fn lookup(&mut self, instance: &str, action: &reapi::Digest) -> Result<reapi::ActionResult, Code> {
        self.get_result(instance, action).await.map_err(|s| s.code())
    }

    /// GetActionResult sent with `meta` as the client's RequestMetadata (the
    /// claims a hit record keeps): `Ok` on a hit, the status code otherwise.
    pub async fn lookup_as(
        &mut self,
        instance: &str,
        action: &reapi::Digest,
        meta: &reapi::RequestMetadata,
    ) -> Result<reapi::ActionResult, Code> {
        let request = with_request_metadata(tonic::Request::new(get(instance, action)), meta);
        self.ac.get_action_result(request).await.map(tonic::Response::into_inner).map_err(|s| s.code())
    }

    /// UpdateActionResult: the stored result the server answers with, or the
    /// refusal.
    pub async fn update_result(
        &mut self,
        instance: &str,
        action: &reapi::Digest,
        result: reapi::ActionResult,
    ) -> Result<reapi::ActionResult, Status> {
        self.ac.update_action_result(update(instance, action, result)).await.map(tonic::Response::into_inner)
    }

    /// Uploads `contents` and returns a result whose one output file
    /// (`out.txt`) holds them.
    pub async fn result_with_output(&mut self, instance: &str, contents: &[u8]) -> reapi::ActionResult {
        let out = self.upload(instance, &[contents]).await.remove(0);
        output_result(&out)
    }

    /// Stores a complete entry: an Action for `salt`, its output
    /// (`output of SALT`) and the result naming it. Returns the action and
    /// the output digests.
    pub async fn store_entry(&mut self, instance: &str, salt: &str) -> (reapi::Digest, reapi::Digest) {
        let action = upload_action(self, instance, salt).await;
        let out = self.upload(instance, &[format!("output of {salt}").as_bytes()]).await.remove(0);
        self.update_result(instance, &action, output_result(&out)).await.unwrap();
        (action, out)
    }
}

/// The messages of one ByteStream Write of `data`, in `chunk`-byte pieces
/// starting at `start`; the last one finishes the write when `finish`.
pub fn write_requests(resource: &str, data: &[u8], chunk: usize, start: i64, finish: bool) -> Vec<WriteRequest> {
    let mut msgs = Vec::new();
    let mut offset = 0usize;
    loop {
        let end = (offset + chunk).min(data.len());
        let last = end == data.len();
        msgs.push(WriteRequest {
            resource_name: if msgs.is_empty() { resource.to_string() } else { String::new() },
            write_offset: start + offset as i64,
            finish_write: last && finish,
            data: bytes::Bytes::copy_from_slice(&data[offset..end]),
        });
        offset = end;
        if last {
            break;
        }
    }
    msgs
}

/// Uploads an Action with its Command and returns the action digest.
pub async fn upload_action(c: &mut Clients, instance: &str, salt: &str) -> reapi::Digest {
    let [action, _, _] = upload_action_parts(c, instance, salt).await;
    action
}

/// Uploads an Action for `salt`, its Command and its (empty) input root;
/// returns the three digests, in that order.
pub async fn upload_action_parts(c: &mut Clients, instance: &str, salt: &str) -> [reapi::Digest; 3] {
    let command = reapi::Command {
        arguments: vec!["echo".into(), salt.into()],
        output_files: vec!["out.txt".into()],
        ..Default::default()
    };
    let command_digest = c.upload_msg(instance, &command).await;
    let input_root = c.upload_msg(instance, &reapi::Directory::default()).await;
    let action = reapi::Action {
        command_digest: Some(command_digest.clone()),
        input_root_digest: Some(input_root.clone()),
        ..Default::default()
    };
    [c.upload_msg(instance, &action).await, command_digest, input_root]
}

/// An UpdateActionResult request.
pub fn update(instance: &str, action: &reapi::Digest, result: reapi::ActionResult) -> reapi::UpdateActionResultRequest {
    reapi::UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    }
}

/// A GetActionResult request.
pub fn get(instance: &str, action: &reapi::Digest) -> reapi::GetActionResultRequest {
    reapi::GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

/// An output file entry.
pub fn output(path: &str, d: &reapi::Digest) -> reapi::OutputFile {
    reapi::OutputFile { path: path.into(), digest: Some(d.clone()), ..Default::default() }
}

/// A result whose one output file, `out.txt`, is the blob `d`.
pub fn output_result(d: &reapi::Digest) -> reapi::ActionResult {
    reapi::ActionResult { output_files: vec![output("out.txt", d)], ..Default::default() }
}

/// RequestMetadata carrying a build's invocation id and an action's claims.
pub fn request_metadata(invocation: &str, mnemonic: &str, target: &str) -> reapi::RequestMetadata {
    reapi::RequestMetadata {
        tool_invocation_id: invocation.into(),
        action_mnemonic: mnemonic.into(),
        target_id: target.into(),
        ..Default::default()
    }
}

/// `request` with `meta` in the binary header REAPI clients send it in.
pub fn with_request_metadata<T>(mut request: tonic::Request<T>, meta: &reapi::RequestMetadata) -> tonic::Request<T> {
    request.metadata_mut().insert_bin(REQUEST_METADATA_HEADER, BinaryMetadataValue::from_bytes(&meta.encode_to_vec()));
    request
}

//! ByteStream: streamed reads and resumable, hash-checked writes of CAS blobs.

use std::pin::Pin;

use futures::{Stream, StreamExt};

use crate::access::gate::{Peer, Permission};
use crate::cache::resource::{parse_read, parse_write};
use crate::cache::upload::WriteOutcome;
use crate::error::Error;
use crate::proto::bytestream::{self, byte_stream_server::ByteStream};

use super::Context;

/// The ByteStream service.
#[derive(Debug, Clone)]
pub struct ByteStreamService(pub Context);

type ReadStream = Pin<Box<dyn Stream<Item = Result<bytestream::ReadResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ByteStream for ByteStreamService {
    type ReadStream = ReadStream;

    async fn read(
        &self,
        request: tonic::Request<bytestream::ReadRequest>,
    ) -> Result<tonic::Response<Self::ReadStream>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let res = parse_read(&req.resource_name).map_err(Error::from)?;
        self.0.gate.authorize(&peer, &res.instance, Permission::CasRead)?;
        if req.read_offset < 0 {
            return Err(Error::OutOfRange(format!("read_offset {} is negative", req.read_offset)).into());
        }
        if req.read_limit < 0 {
            return Err(Error::InvalidArgument(format!("read_limit {} is negative", req.read_limit)).into());
        }
        if res.compressor.is_some() && req.read_limit != 0 {
            return Err(Error::InvalidArgument("read_limit must be 0 for compressed-blobs reads".into()).into());
        }
        let pieces = self
            .0
            .cas
            .read(&res.instance, res.digest, req.read_offset as u64, req.read_limit as u64, res.compressor)
            .await?;
        let stream = pieces.map(|r| r.map(|data| bytestream::ReadResponse { data }).map_err(tonic::Status::from));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn write(
        &self,
        request: tonic::Request<tonic::Streaming<bytestream::WriteRequest>>,
    ) -> Result<tonic::Response<bytestream::WriteResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let mut stream = request.into_inner();
        let Some(mut msg) = stream.message().await? else {
            return Err(Error::InvalidArgument("Write stream ended before its first message".into()).into());
        };
        let name = msg.resource_name.clone();
        let res = parse_write(&name).map_err(Error::from)?;
        let caller = self.0.gate.authorize(&peer, &res.instance, Permission::CasWrite)?;
        let limits = self.0.enforcer(&caller.principal);
        let compressed = res.compressor.is_some();
        self.0.cas.check_fits(res.digest.size)?;

        // Already stored: end the write early, as the spec allows.
        if self.0.cas.contains(&res.instance, res.digest).await?
            && self.0.uploads.existing(&res, &caller.principal).is_none()
        {
            let committed = if compressed { -1 } else { res.digest.size as i64 };
            return Ok(tonic::Response::new(bytestream::WriteResponse { committed_size: committed }));
        }

        let session = self.0.uploads.session(&res, &limits)?;
        let Ok(mut session) = session.try_lock_owned() else {
            return Err(Error::Aborted(format!("upload {name} is already being written by another stream")).into());
        };
        loop {
            if !msg.resource_name.is_empty() && msg.resource_name != name {
                return Err(Error::InvalidArgument(format!(
                    "resource_name changed within one Write stream (from {name:?} to {:?})",
                    msg.resource_name
                ))
                .into());
            }
            let outcome =
                self.0.uploads.feed(&mut session, msg.write_offset, msg.data, msg.finish_write, &limits).await?;
            if let Some(WriteOutcome::Complete(committed)) = outcome {
                return Ok(tonic::Response::new(bytestream::WriteResponse { committed_size: committed }));
            }
            msg = match stream.message().await? {
                Some(m) => m,
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "Write stream for {name} ended without finish_write after {} bytes; \
                         ask QueryWriteStatus and resume",
                        session.committed()
                    ))
                    .into())
                }
            };
        }
    }

    async fn query_write_status(
        &self,
        request: tonic::Request<bytestream::QueryWriteStatusRequest>,
    ) -> Result<tonic::Response<bytestream::QueryWriteStatusResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let res = parse_write(&req.resource_name).map_err(Error::from)?;
        let caller = self.0.gate.authorize(&peer, &res.instance, Permission::CasWrite)?;
        if let Some(committed) = self.0.uploads.progress(&res, &caller.principal) {
            return Ok(tonic::Response::new(bytestream::QueryWriteStatusResponse {
                committed_size: committed,
                complete: false,
            }));
        }
        if self.0.cas.contains(&res.instance, res.digest).await? {
            let committed = if res.compressor.is_some() { -1 } else { res.digest.size as i64 };
            return Ok(tonic::Response::new(bytestream::QueryWriteStatusResponse {
                committed_size: committed,
                complete: true,
            }));
        }
        Err(Error::NotFound(format!("no upload in progress for {}", req.resource_name)).into())
    }
}

//! ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs,
//! BatchReadBlobs, GetTree.

use std::pin::Pin;

use futures::{Stream, StreamExt};

use crate::access::gate::{Peer, Permission};
use crate::cache::cas::{parse_digest, BatchBlob};
use crate::cache::digest::{Digest, DigestFunction};
use crate::cache::resource::{Compressor, InstanceName};
use crate::error::{rpc_status, Error};
use crate::proto::reapi::{self, compressor, content_addressable_storage_server::ContentAddressableStorage};

use super::Context;

/// The ContentAddressableStorage service.
#[derive(Debug, Clone)]
pub struct CasService(pub Context);

type TreeStream = Pin<Box<dyn Stream<Item = Result<reapi::GetTreeResponse, tonic::Status>> + Send>>;

fn parse_all(function: DigestFunction, digests: &[reapi::Digest]) -> Result<Vec<Digest>, Error> {
    digests
        .iter()
        .enumerate()
        .map(|(i, d)| {
            Digest::from_proto(function, Some(d)).map_err(|e| Error::InvalidArgument(format!("digest #{i}: {e}")))
        })
        .collect()
}

fn compressor_of(value: i32) -> Result<Option<Compressor>, Error> {
    match compressor::Value::try_from(value) {
        Ok(compressor::Value::Identity) => Ok(None),
        Ok(compressor::Value::Zstd) => Ok(Some(Compressor::Zstd)),
        _ => Err(Error::InvalidArgument(format!("compressor {value} is not supported (IDENTITY and ZSTD are)"))),
    }
}

#[tonic::async_trait]
impl ContentAddressableStorage for CasService {
    type GetTreeStream = TreeStream;

    async fn find_missing_blobs(
        &self,
        request: tonic::Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<tonic::Response<reapi::FindMissingBlobsResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let function = DigestFunction::from_proto(req.digest_function).map_err(Error::from)?;
        let digests = parse_all(function, &req.blob_digests)?;
        self.0.gate.authorize(&peer, &instance, Permission::CasRead)?;
        let missing = self.0.cas.find_missing(&instance, digests).await?;
        Ok(tonic::Response::new(reapi::FindMissingBlobsResponse {
            missing_blob_digests: missing.iter().map(Digest::to_proto).collect(),
        }))
    }

    async fn batch_update_blobs(
        &self,
        request: tonic::Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<tonic::Response<reapi::BatchUpdateBlobsResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let function = DigestFunction::from_proto(req.digest_function).map_err(Error::from)?;
        let caller = self.0.gate.authorize(&peer, &instance, Permission::CasWrite)?;
        let limits = self.0.enforcer(&caller.principal);
        let echo: Vec<Option<reapi::Digest>> = req.requests.iter().map(|r| r.digest.clone()).collect();
        let blobs = req
            .requests
            .into_iter()
            .map(|r| {
                let digest = Digest::from_proto(function, r.digest.as_ref()).map_err(Error::from);
                match compressor_of(r.compressor) {
                    Ok(compressor) => BatchBlob { digest, data: r.data, compressor },
                    Err(e) => BatchBlob { digest: Err(e), data: r.data, compressor: None },
                }
            })
            .collect();
        let results = self.0.cas.batch_update(&instance, blobs, &limits).await?;
        Ok(tonic::Response::new(reapi::BatchUpdateBlobsResponse {
            responses: echo
                .into_iter()
                .zip(results)
                .map(|(digest, r)| reapi::batch_update_blobs_response::Response {
                    digest,
                    status: Some(rpc_status(&r)),
                })
                .collect(),
        }))
    }

    async fn batch_read_blobs(
        &self,
        request: tonic::Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<tonic::Response<reapi::BatchReadBlobsResponse>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let function = DigestFunction::from_proto(req.digest_function).map_err(Error::from)?;
        let digests = parse_all(function, &req.digests)?;
        self.0.gate.authorize(&peer, &instance, Permission::CasRead)?;
        let zstd = req.acceptable_compressors.contains(&(compressor::Value::Zstd as i32));
        let results = self.0.cas.batch_read(&instance, &digests, zstd).await?;
        let responses = digests
            .iter()
            .zip(results)
            .map(|(d, r)| {
                let (data, compressor, status) = match r {
                    Ok((data, c)) => {
                        let c = match c {
                            Some(Compressor::Zstd) => compressor::Value::Zstd as i32,
                            None => compressor::Value::Identity as i32,
                        };
                        (data, c, rpc_status(&Ok(())))
                    }
                    Err(e) => (Default::default(), 0, rpc_status(&Err(e))),
                };
                reapi::batch_read_blobs_response::Response {
                    digest: Some(d.to_proto()),
                    data,
                    status: Some(status),
                    compressor,
                }
            })
            .collect();
        Ok(tonic::Response::new(reapi::BatchReadBlobsResponse { responses }))
    }

    async fn get_tree(
        &self,
        request: tonic::Request<reapi::GetTreeRequest>,
    ) -> Result<tonic::Response<Self::GetTreeStream>, tonic::Status> {
        let peer = Peer::of(&request);
        let req = request.into_inner();
        let instance = InstanceName::parse(&req.instance_name).map_err(Error::from)?;
        let root = parse_digest(req.digest_function, req.root_digest.as_ref())?;
        if req.page_size < 0 {
            return Err(Error::InvalidArgument(format!("page_size {} is negative", req.page_size)).into());
        }
        let caller = self.0.gate.authorize(&peer, &instance, Permission::CasRead)?;
        let limits = self.0.enforcer(&caller.principal);
        let pages =
            self.0.cas.clone().get_tree(instance, root, req.page_size as usize, &req.page_token, limits).await?;
        let stream = tokio_stream::wrappers::ReceiverStream::new(pages).map(|page| {
            page.map(|(directories, next_page_token)| reapi::GetTreeResponse { directories, next_page_token })
                .map_err(tonic::Status::from)
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

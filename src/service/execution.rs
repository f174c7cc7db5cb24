//! Execution: provcache is a cache only, so every call is UNIMPLEMENTED.

use std::pin::Pin;

use futures::Stream;

use crate::proto::google::longrunning::Operation;
use crate::proto::reapi::{self, execution_server::Execution};

const MESSAGE: &str = "provcache is a remote cache only; remote execution is not offered";

/// The Execution service.
#[derive(Debug, Clone, Default)]
pub struct ExecutionService;

type OperationStream = Pin<Box<dyn Stream<Item = Result<Operation, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OperationStream;
    type WaitExecutionStream = OperationStream;

    async fn execute(
        &self,
        _: tonic::Request<reapi::ExecuteRequest>,
    ) -> Result<tonic::Response<Self::ExecuteStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(MESSAGE))
    }

    async fn wait_execution(
        &self,
        _: tonic::Request<reapi::WaitExecutionRequest>,
    ) -> Result<tonic::Response<Self::WaitExecutionStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(MESSAGE))
    }
}

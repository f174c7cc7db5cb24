//! The domain error type and its single mapping to `tonic::Status`.

use tonic::{Code, Status};

use crate::cache::digest::DigestError;
use crate::cache::resource::ResourceError;
#[cfg(feature = "server")]
use crate::store::StoreErrorKind;

/// An error classified by the gRPC status a client must see.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed (permanent; clients do not retry).
    #[error("{0}")]
    InvalidArgument(String),
    /// The thing asked for does not exist (for the Action Cache: a miss).
    #[error("{0}")]
    NotFound(String),
    /// Something the request depends on is missing (Action, Command, outputs).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A read past the end of a blob.
    #[error("{0}")]
    OutOfRange(String),
    /// Out of space, or over a limit the client can wait out.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server cannot serve this now (for example no signing key).
    #[error("{0}")]
    Unavailable(String),
    /// A conflicting concurrent operation.
    #[error("{0}")]
    Aborted(String),
    /// Stored data is corrupt.
    #[error("{0}")]
    DataLoss(String),
    /// The caller's identity could not be established.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller lacks a permission.
    #[error("{0}")]
    PermissionDenied(String),
    /// The storage backend failed (its kind decides the code).
    #[cfg(feature = "server")]
    #[error("storage error: {0}")]
    Storage(#[from] crate::store::StoreError),
    /// A bug or an unexpected condition.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthand for results of domain operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code for this error.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Aborted(_) => Code::Aborted,
            Error::DataLoss(_) => Code::DataLoss,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            #[cfg(feature = "server")]
            Error::Storage(e) => match e.kind() {
                StoreErrorKind::NoSpace => Code::ResourceExhausted,
                // A block or record failed its checksum: stored data is
                // damaged (threat model R8), which clients may treat as a miss.
                StoreErrorKind::Corruption => Code::DataLoss,
                StoreErrorKind::Unavailable | StoreErrorKind::Locked => Code::Unavailable,
                StoreErrorKind::Conflict => Code::Aborted,
                StoreErrorKind::Other => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
        }
    }
}

impl From<DigestError> for Error {
    fn from(e: DigestError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<ResourceError> for Error {
    fn from(e: ResourceError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<prost::DecodeError> for Error {
    fn from(e: prost::DecodeError) -> Self {
        Error::InvalidArgument(format!("undecodable protobuf: {e}"))
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Internal(format!("worker task failed: {e}"))
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let code = e.code();
        if matches!(code, Code::Internal | Code::DataLoss) {
            tracing::error!(error = %e, "request failed");
        }
        let message = match &e {
            #[cfg(feature = "server")]
            Error::Storage(inner) if code == Code::ResourceExhausted => format!("out of space: {inner}"),
            #[cfg(feature = "server")]
            Error::Storage(inner) if code == Code::Aborted => {
                format!("a concurrent write got there first; retry: {inner}")
            }
            other => other.to_string(),
        };
        Status::new(code, message)
    }
}

/// Converts to a `google.rpc.Status` for per-item batch results.
pub fn rpc_status(result: &Result<()>) -> crate::proto::google::rpc::Status {
    match result {
        Ok(()) => crate::proto::google::rpc::Status { code: 0, message: String::new(), details: vec![] },
        Err(e) => crate::proto::google::rpc::Status { code: e.code() as i32, message: e.to_string(), details: vec![] },
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn a_storage_failure_gets_the_code_its_kind_implies_and_no_space_says_so() {
        let status = |kind| Status::from(Error::Storage(StoreError::new(kind, "disk said no")));
        let full = status(StoreErrorKind::NoSpace);
        assert_eq!((full.code(), full.message()), (Code::ResourceExhausted, "out of space: disk said no"));
        assert_eq!(status(StoreErrorKind::Corruption).code(), Code::DataLoss);
        assert_eq!(status(StoreErrorKind::Unavailable).code(), Code::Unavailable);
        let conflict = status(StoreErrorKind::Conflict);
        assert_eq!(
            (conflict.code(), conflict.message()),
            (Code::Aborted, "a concurrent write got there first; retry: disk said no")
        );
        let other = status(StoreErrorKind::Other);
        assert_eq!((other.code(), other.message()), (Code::Internal, "storage error: disk said no"));
    }
}

//! Generated protocol types. Modules mirror the protobuf packages because the
//! generated code refers across packages by relative paths.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod build {
    pub mod bazel {
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
}

pub mod provcache {
    pub mod v1 {
        tonic::include_proto!("provcache.v1");
        pub mod storage {
            tonic::include_proto!("provcache.v1.storage");
        }
    }
}

/// The Remote Execution API v2 package.
pub use build::bazel::remote::execution::v2 as reapi;
/// The ByteStream package.
pub use google::bytestream;
/// provcache's own provenance messages.
pub use provcache::v1 as prov;

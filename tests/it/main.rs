//! Integration tests against real servers on 127.0.0.1:0.

mod common;

mod action_cache;
mod audit_trail;
mod bazel;
mod bazel_audit;
mod bazel_provenance;
mod bazel_tls;
mod bytestream;
mod capabilities;
mod cas;
mod config;
mod eviction;
mod limits_domain;
mod logs;
mod metrics;
mod mtls;
mod notify;
mod provenance;
mod proxy;
mod reliability;
mod reload;
mod scale_out;
mod scale_out_security;
mod verify_build;

//! Attack shapes against a running server, for the denial-of-service tests
//! and `provcache bench --attacker` (docs/operations.md, "Limits"). Each one
//! reproduces a hostile caller's pattern at a chosen scale, so the tests can
//! assert the server's bound and the bench can measure honest latency while
//! it runs. Only ever aimed at a server of the caller's own (loopback).

pub mod domain;
pub mod transport;

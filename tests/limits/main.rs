//! The transport-limit suite, in a test process of its own. Its memory
//! bounds are read from this process's /proc/self/status, which the other
//! integration suites would inflate if they ran alongside (as they do in
//! `tests/it`, whose tests share one process): a neighbour's large upload
//! once pushed a bounded attack over its bound.

// The shared harness; this suite uses only part of what it re-exports.
#[allow(unused_imports)]
#[path = "../it/common/mod.rs"]
mod common;
mod limits_transport;

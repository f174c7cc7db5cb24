//! The transport-limit suite, in a test process of its own. Its memory
//! bounds are read from this process's /proc/self/status, which the other
//! integration suites would inflate if they ran alongside (as they do in
//! `tests/it`, whose tests share one process): in CI, with the other suites
//! running alongside, the stalled-streams test once measured 98 MiB against
//! its 96 MiB bound, though alone it grows 36-47 MiB.

// The shared harness; this suite uses only part of what it re-exports.
#[allow(unused_imports)]
#[path = "../it/common/mod.rs"]
mod common;
mod limits_transport;

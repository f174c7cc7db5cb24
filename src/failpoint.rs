//! Crash points for the crash tests (docs/threat-model.md R3).
//!
//! Only a binary built with the `failpoints` cargo feature has them: the
//! integration tests build it that way (`cargo test --features failpoints`,
//! as `tests/run-all.sh` does). There, `PROVCACHE_FAILPOINT=<name>` in the
//! environment makes the process abort (no unwinding, no flush, like a power
//! cut of the process) the moment it reaches the point of that name. In a
//! normal build [`crash_point`] is an empty function and the environment
//! variable is never read.

/// The crash points, in the order an UpdateActionResult reaches them.
pub const POINTS: [&str; 4] = ["ac-after-prepare", "ac-after-sign", "ac-before-commit", "ac-after-commit"];

/// Aborts the process if it was started with `PROVCACHE_FAILPOINT=<point>`.
#[cfg(feature = "failpoints")]
pub fn crash_point(point: &str) {
    static CHOSEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    debug_assert!(POINTS.contains(&point), "unknown crash point {point}");
    if CHOSEN.get_or_init(|| std::env::var("PROVCACHE_FAILPOINT").ok()).as_deref() == Some(point) {
        eprintln!("PROVCACHE_FAILPOINT: aborting at {point}");
        std::process::abort();
    }
}

/// Aborts the process at a crash point (only in a `failpoints` build).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn crash_point(_point: &str) {}

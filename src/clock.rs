//! The one time source the server's time-dependent rules read (certificate
//! expiry, key validity windows, signing times), injected so tests can move
//! time instead of waiting for it.

use std::sync::Arc;
use std::time::SystemTime;

/// A clock: the access gate and the provenance notary each hold one.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The system clock, for everything but tests.
pub fn system_clock() -> Clock {
    Arc::new(SystemTime::now)
}

//! The subcommands beside `serve`: the auditor's `verify-build`
//! ([`verify_build`]), a REAPI client for scripts ([`client`]), the load
//! generator ([`bench`], and [`bench_request`] for leaner ones), the soak test ([`soak`]) and the attack shapes the
//! tests and `bench --attacker` share ([`attack`]).

pub mod attack;
pub mod bench;
#[cfg(feature = "server")]
pub mod bench_object;
pub mod bench_request;
pub mod client;
pub mod soak;
pub mod verify_build;

//! Certificate → identity, in each identity mode: arbitrary DER is refused
//! or yields an identity, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provcache::access::identity::{identify, IdentityMode};

fuzz_target!(|data: &[u8]| {
    for mode in [IdentityMode::spiffe(["provcache.dev"]), IdentityMode::DnsSan, IdentityMode::CommonName] {
        if let Ok(identity) = identify(data, &mode) {
            assert!(!identity.principal.is_empty(), "an empty principal");
        }
    }
});

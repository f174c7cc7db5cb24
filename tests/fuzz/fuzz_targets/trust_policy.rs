//! The trust-policy file (TOML): refused or accepted, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provcache::provenance::trust::TrustPolicy;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(policy) = TrustPolicy::from_toml(text) {
            for key in &policy.keys {
                let _ = policy.key_by_id(&key.key_id);
                let _ = key.in_scope("main");
                let _ = key.in_window(std::time::SystemTime::UNIX_EPOCH);
            }
            let _ = policy.writer_revoked("spiffe://provcache.dev/writer", std::time::SystemTime::now());
            let _ = policy.quarantined("", "00", 1);
        }
    }
});

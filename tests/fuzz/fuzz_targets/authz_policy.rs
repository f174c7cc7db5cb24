//! The authorization policy file (TOML), then a decision with it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provcache::access::gate::Permission;
use provcache::access::policy::Policy;
use provcache::cache::resource::InstanceName;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(policy) = Policy::parse(text) {
            for instance in ["", "main", "dev/x"] {
                let instance = InstanceName::parse(instance).unwrap();
                for permission in [Permission::AcRead, Permission::AcWrite, Permission::CasRead, Permission::CasWrite] {
                    let _ = policy.check("spiffe://provcache.dev/writer", &instance, permission);
                }
            }
        }
    }
});

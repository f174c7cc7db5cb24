//! Envelope and statement verification (the server's `verify_stored` and
//! verify-build's `verify_served`) on hostile input: arbitrary envelope
//! bytes, a valid envelope with bytes flipped, arbitrary canonical bytes,
//! and arbitrary served results. Never a panic; and a valid signed entry
//! with any byte changed never verifies as a different result.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use provcache::proto::prov::{ActionResultStatement, Envelope};
use provcache::proto::reapi::ActionResult;
use provcache::provenance::trust::TrustPolicy;
use provcache::provenance::verify::{verify_served, verify_stored, Expected};

/// The golden vector `valid` (tests/vectors/valid): a correctly signed entry.
const POLICY: &str = include_str!("../../vectors/valid/policy.toml");
const ENVELOPE: &[u8] = include_bytes!("../../vectors/valid/envelope.binpb");
const CANONICAL: &[u8] = include_bytes!("../../vectors/valid/canonical.binpb");

struct Valid {
    policy: TrustPolicy,
    expected: Expected,
    now: SystemTime,
}

fn valid() -> &'static Valid {
    static VALID: OnceLock<Valid> = OnceLock::new();
    VALID.get_or_init(|| {
        let policy = TrustPolicy::from_toml(POLICY).expect("the vector's policy");
        let envelope = Envelope::decode(ENVELOPE).expect("the vector's envelope");
        let statement = ActionResultStatement::decode(envelope.payload.as_ref()).expect("its statement");
        let signed_at = statement.signed_at.as_ref().expect("signed_at");
        let now = UNIX_EPOCH + Duration::from_secs(signed_at.seconds as u64 + 60);
        let expected = Expected {
            instance: statement.instance_name.clone(),
            digest_function: statement.digest_function,
            action_digest: statement.action_digest.clone().expect("action digest"),
        };
        verify_stored(&policy, &[ENVELOPE], CANONICAL, &expected, now).expect("the valid vector verifies");
        Valid { policy, expected, now }
    })
}

fuzz_target!(|data: &[u8]| {
    let v = valid();
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        // Arbitrary envelope bytes.
        0 => {
            let _ = verify_stored(&v.policy, &[rest], CANONICAL, &v.expected, v.now);
        }
        // The valid envelope with bytes changed: (u16 position, u8 xor) triples.
        1 => {
            let mut envelope = ENVELOPE.to_vec();
            for t in rest.chunks_exact(3) {
                let at = u16::from_le_bytes([t[0], t[1]]) as usize % envelope.len();
                envelope[at] ^= t[2];
            }
            let changed = envelope != ENVELOPE;
            if verify_stored(&v.policy, &[&envelope], CANONICAL, &v.expected, v.now).is_ok() && changed {
                // Only changes outside the signed payload and signature (for
                // example the key-id hint) may keep it valid; the payload
                // must be exactly the signed one.
                let e = Envelope::decode(envelope.as_slice()).expect("it verified, so it decodes");
                let original = Envelope::decode(ENVELOPE).unwrap();
                assert_eq!(e.payload, original.payload, "a changed payload verified");
            }
        }
        // Arbitrary canonical result bytes under the valid envelope.
        2 => {
            if verify_stored(&v.policy, &[ENVELOPE], rest, &v.expected, v.now).is_ok() {
                assert_eq!(rest, CANONICAL, "different result bytes verified");
            }
        }
        // An arbitrary served result (verify-build's path).
        _ => {
            if let Ok(result) = ActionResult::decode(rest) {
                let _ = verify_served(&v.policy, &result, &v.expected, v.now);
            }
        }
    }
});

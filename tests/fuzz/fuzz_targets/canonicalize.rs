//! ActionResult normalisation: any decodable result canonicalises without a
//! panic, canonicalisation is idempotent, and its bytes decode back to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use provcache::proto::reapi::ActionResult;
use provcache::provenance::signing::{canonical_bytes, canonicalize, envelopes, strip_envelopes};

fuzz_target!(|data: &[u8]| {
    let Ok(result) = ActionResult::decode(data) else { return };
    let canon = canonicalize(&result);
    assert_eq!(canonicalize(&canon), canon, "canonicalize is idempotent");
    assert!(envelopes(&canon).is_empty(), "no envelope survives canonicalisation");
    let bytes = canonical_bytes(&result);
    assert_eq!(ActionResult::decode(bytes.as_slice()).expect("canonical bytes decode"), canon);
    let mut stripped = result.clone();
    strip_envelopes(&mut stripped);
    assert!(envelopes(&stripped).is_empty());
});

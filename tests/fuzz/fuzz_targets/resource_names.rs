//! ByteStream resource names and instance names: parse without panicking,
//! and whatever parses is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use provcache::cache::resource::{parse_read, parse_write, InstanceName};

fuzz_target!(|data: &[u8]| {
    let name = String::from_utf8_lossy(data);
    if let Ok(r) = parse_read(&name) {
        // The instance it names is itself a valid instance name.
        InstanceName::parse(r.instance.as_str()).expect("a parsed instance re-parses");
    }
    if let Ok(w) = parse_write(&name) {
        InstanceName::parse(w.instance.as_str()).expect("a parsed instance re-parses");
    }
    let _ = InstanceName::parse(&name);
});

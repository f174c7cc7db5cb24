//! Signing keys and trust policies on disk, for the suites whose servers
//! (in this process or spawned) a test rotates or revokes keys of.

use std::path::Path;
use std::time::{Duration, SystemTime};

use provcache::provenance::signing::SigningKey;
use provcache::provenance::trust::{render_key_entry, KeyState};

/// Writes a file by renaming a fully written temporary file over it, as an
/// operator's tooling would, so the server never reads half a file.
pub fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A trust policy listing `keys` (name, key, state), valid from a day ago for a day.
pub fn policy_toml(version: u64, keys: &[(&str, &SigningKey, KeyState)]) -> String {
    let now = SystemTime::now();
    let day = Duration::from_secs(24 * 3600);
    let mut text = format!("policy_version = {version}\nclock_skew = \"5m\"\n\n");
    for (name, key, state) in keys {
        text.push_str(&render_key_entry(name, &key.verifying_key(), *state, now - day, now + day));
        text.push('\n');
    }
    text
}

/// The key as the PKCS#8 PEM file `--signing-key` reads.
pub fn pem(key: &SigningKey) -> Vec<u8> {
    key.to_pkcs8_pem().unwrap().as_bytes().to_vec()
}

//! Every object key this backend reads or writes, built in this one place.
//!
//! Relative to the operator's prefix (the store handed in is already scoped):
//!
//! ```text
//! cas/<instance>/<function>/<hash[0..2]>/<hash>-<size>         a blob (write-once, content-addressed)
//! ac/<instance>/<function>/<hash>-<size>                        an action's current entry
//! ac-history/<instance>/<function>/<hash>-<size>/<nanos:020>    one stored version of an action
//! hits/<invocation>/<sequence:020>                              one chained hit record
//! tmp/<random>                                                  a blob being re-dated (see blobs.rs)
//! ```
//!
//! Instance names and invocation ids are chosen by clients, so they are
//! written as the lower-case hex of their bytes (`_` when empty, which hex
//! never produces): no value can hold a `/`, escape its segment or collide
//! with another. A name over 160 bytes is written as `~` and the SHA-256 of
//! its bytes instead, to keep keys under S3's 1024 bytes (such a hit-log
//! folder cannot be turned back into its invocation id). Numbers are zero-padded to 20 digits so that the bucket's
//! lexicographic listing is their numeric order. `function` is
//! [`DigestFunction::name`](crate::cache::digest::DigestFunction::name).

use object_store::path::Path;
use sha2::{Digest as _, Sha256};

use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;

/// Longest name written as hex; a longer one is hashed, since S3 keys stop
/// at 1024 bytes and an instance name alone may be 1024.
const MAX_HEX_NAME: usize = 160;

/// A client-chosen name as one safe, collision-free path segment.
fn segment(name: &str) -> String {
    match name.len() {
        0 => "_".to_string(),
        n if n <= MAX_HEX_NAME => hex::encode(name.as_bytes()),
        _ => format!("~{}", hex::encode(Sha256::digest(name.as_bytes()))),
    }
}

/// `<instance>/<function>/`, shared by the CAS and AC layouts.
fn scope(instance: &InstanceName, digest: &Digest) -> String {
    format!("{}/{}", segment(instance.as_str()), digest.function.name())
}

fn digest_name(digest: &Digest) -> String {
    format!("{}-{}", digest.hash_hex(), digest.size)
}

/// The key of a blob.
pub fn blob(instance: &InstanceName, digest: &Digest) -> Path {
    let hash = digest.hash_hex();
    Path::from(format!("cas/{}/{}/{}", scope(instance, digest), &hash[..2], digest_name(digest)))
}

/// The key of an action's current entry.
pub fn action(instance: &InstanceName, action: &Digest) -> Path {
    Path::from(format!("ac/{}/{}", scope(instance, action), digest_name(action)))
}

/// The folder of an action's stored versions.
pub fn history_dir(instance: &InstanceName, action: &Digest) -> Path {
    Path::from(format!("ac-history/{}/{}", scope(instance, action), digest_name(action)))
}

/// The key of one stored version of an action.
pub fn history(instance: &InstanceName, action: &Digest, at_nanos: u64) -> Path {
    history_dir(instance, action).join(number(at_nanos))
}

/// The folder every action's history lives under (for retention).
pub fn history_root() -> Path {
    Path::from("ac-history")
}

/// The folder of an invocation's hit records.
pub fn hits_dir(invocation: &str) -> Path {
    Path::from(format!("hits/{}", segment(invocation)))
}

/// The key of one hit record.
pub fn hit(invocation: &str, sequence: u64) -> Path {
    hits_dir(invocation).join(number(sequence))
}

/// The folder every invocation's hit log lives under (for retention).
pub fn hits_root() -> Path {
    Path::from("hits")
}

/// The invocation id a hit-log folder (`hits/<segment>`) was made from.
pub fn invocation_of(dir: &Path) -> Option<String> {
    match dir.filename()? {
        "_" => Some(String::new()),
        hashed if hashed.starts_with('~') => None,
        hexed => String::from_utf8(hex::decode(hexed).ok()?).ok(),
    }
}

/// A unique scratch key (for copying a blob onto itself via a detour).
pub fn scratch(random: u64) -> Path {
    Path::from(format!("tmp/{random:016x}"))
}

/// A zero-padded number: its text order is its numeric order.
pub fn number(n: u64) -> String {
    format!("{n:020}")
}

/// The number at the end of a key written by [`history`] or [`hit`].
pub fn number_of(key: &Path) -> Option<u64> {
    let text = key.filename()?;
    (text.len() == 20).then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::digest::DigestFunction;

    #[test]
    fn client_chosen_names_cannot_leave_their_segment_or_collide() {
        let digest = Digest::of(DigestFunction::Sha256, b"x");
        let slashy = InstanceName::parse("a/b").unwrap();
        let key = blob(&slashy, &digest).to_string();
        assert!(key.starts_with(&format!("cas/{}/sha256/", hex::encode("a/b"))), "{key}");
        assert_ne!(hit("", 1), hit("_", 1), "the empty id and a literal underscore differ");
        assert_eq!(hit("../x", 7).to_string(), format!("hits/{}/00000000000000000007", hex::encode("../x")));
        assert_eq!(invocation_of(&hits_dir("inv/1")), Some("inv/1".to_string()));
        assert_eq!(invocation_of(&hits_dir("")), Some(String::new()));
        assert_eq!(number_of(&history(&slashy, &digest, 42)), Some(42));
    }
}

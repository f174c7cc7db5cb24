//! Digests, parsed once at the edge: a digest function, a 32-byte hash and a size.

use std::fmt;

use crate::proto::reapi;

/// The digest functions provcache accepts. Only collision-resistant ones: a
/// weak function would let a client poison the CAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256, the REAPI default.
    Sha256,
    /// BLAKE3 (256-bit output).
    Blake3,
}

/// Why a digest or digest function was refused. Every variant maps to
/// `INVALID_ARGUMENT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The request carried no digest where one is required.
    #[error("missing digest")]
    Missing,
    /// A function provcache does not accept (MD5, SHA-1, ...), or an unknown value.
    #[error("digest function {0} is not supported (this server accepts SHA256 and BLAKE3)")]
    UnsupportedFunction(String),
    /// The hash does not have the function's length.
    #[error("digest hash {hash:?} has {got} characters; {function} needs {expected} lowercase hex characters")]
    BadLength {
        /// The offending hash (truncated).
        hash: String,
        /// The function in use.
        function: &'static str,
        /// Expected number of hex characters.
        expected: usize,
        /// Number of characters received.
        got: usize,
    },
    /// The hash has a character outside `[0-9a-f]`.
    #[error("digest hash {0:?} is not lowercase hex")]
    NotLowercaseHex(String),
    /// `size_bytes` below zero.
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    /// The data does not hash to the digest.
    #[error("data does not match digest {expected}: its {what} is {actual}")]
    Mismatch {
        /// The digest the client claimed.
        expected: String,
        /// "size" or "hash".
        what: &'static str,
        /// What the data really has.
        actual: String,
    },
}

impl DigestFunction {
    /// Every function this server accepts, in the order advertised.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// Resolves a request's `digest_function` field. Unset (`UNKNOWN`) means
    /// SHA-256: both accepted functions have 64-character hashes, and REAPI
    /// infers SHA-256 from that length.
    pub fn from_proto(value: i32) -> Result<Self, DigestError> {
        use reapi::digest_function::Value;
        match Value::try_from(value) {
            Ok(Value::Unknown | Value::Sha256) => Ok(DigestFunction::Sha256),
            Ok(Value::Blake3) => Ok(DigestFunction::Blake3),
            Ok(other) => Err(DigestError::UnsupportedFunction(other.as_str_name().to_string())),
            Err(_) => Err(DigestError::UnsupportedFunction(format!("value {value}"))),
        }
    }

    /// The REAPI enum value.
    pub fn to_proto(self) -> i32 {
        use reapi::digest_function::Value;
        match self {
            DigestFunction::Sha256 => Value::Sha256 as i32,
            DigestFunction::Blake3 => Value::Blake3 as i32,
        }
    }

    /// Lowercase name, as used in ByteStream resource names.
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// One byte identifying the function inside storage keys (the REAPI enum value).
    pub fn storage_code(self) -> u8 {
        self.to_proto() as u8
    }

    /// The inverse of [`DigestFunction::storage_code`].
    pub fn from_storage_code(code: u8) -> Option<Self> {
        Self::from_proto(code as i32).ok().filter(|f| f.storage_code() == code)
    }

    /// A fresh incremental hasher.
    pub fn hasher(self) -> Hasher {
        match self {
            DigestFunction::Sha256 => Hasher::Sha256(<sha2::Sha256 as sha2::Digest>::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The digest of the empty blob, which is always present.
    pub fn empty(self) -> Digest {
        Digest::of(self, b"")
    }
}

/// An incremental hasher for one [`DigestFunction`].
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// BLAKE3 state.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => sha2::Digest::update(h, data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The 32-byte hash of everything fed.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => sha2::Digest::finalize(h).into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// A validated content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The function the hash was made with.
    pub function: DigestFunction,
    /// The raw hash.
    pub hash: [u8; 32],
    /// The blob's size in bytes.
    pub size: u64,
}

/// The value of one lowercase hex character; uppercase is refused, as REAPI asks.
fn lower_hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Digest {
    /// Parses a hex hash and a size for `function`.
    pub fn parse(function: DigestFunction, hash: &str, size: i64) -> Result<Self, DigestError> {
        if hash.len() != 64 {
            return Err(DigestError::BadLength {
                hash: truncate(hash),
                function: function.name(),
                expected: 64,
                got: hash.len(),
            });
        }
        // One pass over the bytes (FindMissingBlobs parses thousands per call).
        let mut raw = [0u8; 32];
        for (out, pair) in raw.iter_mut().zip(hash.as_bytes().chunks_exact(2)) {
            match (lower_hex_value(pair[0]), lower_hex_value(pair[1])) {
                (Some(high), Some(low)) => *out = high << 4 | low,
                _ => return Err(DigestError::NotLowercaseHex(truncate(hash))),
            }
        }
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        Ok(Digest { function, hash: raw, size: size as u64 })
    }

    /// Parses a protobuf digest; `None` is [`DigestError::Missing`].
    pub fn from_proto(function: DigestFunction, digest: Option<&reapi::Digest>) -> Result<Self, DigestError> {
        let d = digest.ok_or(DigestError::Missing)?;
        Self::parse(function, &d.hash, d.size_bytes)
    }

    /// The protobuf form.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest { hash: self.hash_hex(), size_bytes: self.size as i64 }
    }

    /// The digest of `data`.
    pub fn of(function: DigestFunction, data: &[u8]) -> Self {
        let mut h = function.hasher();
        h.update(data);
        Digest { function, hash: h.finalize(), size: data.len() as u64 }
    }

    /// Checks that `data` is the blob this digest names.
    pub fn verify(&self, data: &[u8]) -> Result<(), DigestError> {
        if data.len() as u64 != self.size {
            return Err(DigestError::Mismatch {
                expected: self.to_string(),
                what: "size",
                actual: data.len().to_string(),
            });
        }
        let actual = Digest::of(self.function, data);
        if actual.hash != self.hash {
            return Err(DigestError::Mismatch { expected: self.to_string(), what: "hash", actual: actual.hash_hex() });
        }
        Ok(())
    }

    /// Lowercase hex of the hash.
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// Whether this is the empty blob (always present, never stored).
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && *self == self.function.empty()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.function {
            DigestFunction::Sha256 => write!(f, "{}/{}", self.hash_hex(), self.size),
            other => write!(f, "{}/{}/{}", other.name(), self.hash_hex(), self.size),
        }
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn empty_blob_digests_are_the_published_ones() {
        assert_eq!(DigestFunction::Sha256.empty().hash_hex(), EMPTY_SHA256);
        assert_eq!(
            DigestFunction::Blake3.empty().hash_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert!(DigestFunction::Sha256.empty().is_empty_blob());
    }

    #[test]
    fn malformed_hashes_are_refused_with_a_reason() {
        let f = DigestFunction::Sha256;
        assert!(matches!(Digest::parse(f, "abc", 1), Err(DigestError::BadLength { got: 3, .. })));
        let upper = EMPTY_SHA256.to_uppercase();
        assert!(matches!(Digest::parse(f, &upper, 0), Err(DigestError::NotLowercaseHex(_))));
        let not_hex = format!("{}g", &EMPTY_SHA256[..63]);
        assert!(matches!(Digest::parse(f, &not_hex, 0), Err(DigestError::NotLowercaseHex(_))));
        assert!(matches!(Digest::parse(f, EMPTY_SHA256, -1), Err(DigestError::NegativeSize(-1))));
        assert!(Digest::parse(f, EMPTY_SHA256, 0).is_ok());
    }

    #[test]
    fn weak_functions_are_refused() {
        use reapi::digest_function::Value;
        for v in [Value::Md5, Value::Sha1, Value::Murmur3, Value::Vso, Value::Sha384] {
            assert!(DigestFunction::from_proto(v as i32).is_err(), "{v:?}");
        }
        assert_eq!(DigestFunction::from_proto(0).unwrap(), DigestFunction::Sha256);
        assert_eq!(DigestFunction::from_proto(Value::Blake3 as i32).unwrap(), DigestFunction::Blake3);
    }

    #[test]
    fn verify_names_size_and_hash_mismatches() {
        let d = Digest::of(DigestFunction::Sha256, b"hello");
        assert!(d.verify(b"hello").is_ok());
        assert!(matches!(d.verify(b"hell"), Err(DigestError::Mismatch { what: "size", .. })));
        assert!(matches!(d.verify(b"jello"), Err(DigestError::Mismatch { what: "hash", .. })));
    }
}

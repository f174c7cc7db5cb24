//! Instance names and the ByteStream resource-name grammar (REAPI v2):
//!
//! ```text
//! read:  [{instance}/]blobs/[{function}/]{hash}/{size}
//!        [{instance}/]compressed-blobs/{compressor}/[{function}/]{hash}/{size}
//! write: [{instance}/]uploads/{uuid}/blobs/[{function}/]{hash}/{size}[/{anything}]
//!        [{instance}/]uploads/{uuid}/compressed-blobs/{compressor}/[{function}/]{hash}/{size}[/{anything}]
//! ```
//!
//! The function segment is omitted for SHA-256 and present (`blake3`) for BLAKE3.

use std::fmt;

use crate::cache::digest::{Digest, DigestError, DigestFunction};

/// Path segments that can never be part of an instance name, because they
/// would make resource names ambiguous.
pub const RESERVED_SEGMENTS: [&str; 7] =
    ["blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"];

const MAX_INSTANCE_NAME_LEN: usize = 1024;

/// A validated instance name. The empty name is the default instance.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceName(String);

/// Why an instance or resource name was refused (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    /// Bad instance name.
    #[error("invalid instance name {name:?}: {why}")]
    BadInstance {
        /// The name received (truncated).
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The resource name does not follow the grammar.
    #[error("invalid resource name {name:?}: {why}")]
    Malformed {
        /// The name received (truncated).
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// The digest inside the resource name is malformed.
    #[error("invalid resource name {name:?}: {source}")]
    BadDigest {
        /// The name received (truncated).
        name: String,
        /// The digest problem.
        source: DigestError,
    },
}

impl InstanceName {
    /// Validates an instance name: `/`-separated non-empty segments, none of
    /// them reserved, no leading or trailing slash.
    pub fn parse(name: &str) -> Result<Self, ResourceError> {
        let bad = |why| ResourceError::BadInstance { name: truncate(name), why };
        if name.is_empty() {
            return Ok(InstanceName(String::new()));
        }
        if name.len() > MAX_INSTANCE_NAME_LEN {
            return Err(bad("longer than 1024 bytes"));
        }
        for segment in name.split('/') {
            if segment.is_empty() {
                return Err(bad("empty path segment (leading, trailing or double '/')"));
            }
            if RESERVED_SEGMENTS.contains(&segment) {
                return Err(bad("contains a reserved segment (blobs, uploads, compressed-blobs, ...)"));
            }
            if segment == "." || segment == ".." {
                return Err(bad("contains a '.' or '..' segment"));
            }
            if segment.chars().any(|c| c.is_control()) {
                return Err(bad("contains a control character"));
            }
        }
        Ok(InstanceName(name.to_string()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn from_segments(full: &str, segments: &[&str]) -> Result<Self, ResourceError> {
        if segments.iter().any(|s| s.is_empty()) {
            return Err(ResourceError::Malformed {
                name: truncate(full),
                why: "empty path segment (leading or double '/')".into(),
            });
        }
        let joined = segments.join("/");
        Self::parse(&joined).map_err(|e| match e {
            ResourceError::BadInstance { why, .. } => {
                ResourceError::Malformed { name: truncate(full), why: format!("instance name: {why}") }
            }
            other => other,
        })
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(default instance)")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// The compressors provcache speaks for `compressed-blobs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compressor {
    /// Zstandard.
    Zstd,
}

/// A parsed ByteStream download name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResource {
    /// The instance.
    pub instance: InstanceName,
    /// The blob.
    pub digest: Digest,
    /// `Some` for `compressed-blobs` reads.
    pub compressor: Option<Compressor>,
}

/// A parsed ByteStream upload name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteResource {
    /// The instance.
    pub instance: InstanceName,
    /// The client's upload id (any non-empty segment, usually a UUID).
    pub upload_id: String,
    /// The blob being written.
    pub digest: Digest,
    /// `Some` for `compressed-blobs` uploads.
    pub compressor: Option<Compressor>,
}

/// Parses a download resource name.
pub fn parse_read(name: &str) -> Result<ReadResource, ResourceError> {
    let segments: Vec<&str> = name.split('/').collect();
    let Some(pos) = segments.iter().position(|s| *s == "blobs" || *s == "compressed-blobs") else {
        return Err(malformed(name, "expected a 'blobs' or 'compressed-blobs' segment"));
    };
    let instance = InstanceName::from_segments(name, &segments[..pos])?;
    let (digest, compressor, rest) = parse_blob_part(name, &segments[pos..])?;
    if !rest.is_empty() {
        return Err(malformed(name, "unexpected segments after the size"));
    }
    Ok(ReadResource { instance, digest, compressor })
}

/// Parses an upload resource name.
pub fn parse_write(name: &str) -> Result<WriteResource, ResourceError> {
    let segments: Vec<&str> = name.split('/').collect();
    let Some(pos) = segments.iter().position(|s| *s == "uploads") else {
        return Err(malformed(name, "expected an 'uploads' segment"));
    };
    let instance = InstanceName::from_segments(name, &segments[..pos])?;
    let upload_id = match segments.get(pos + 1) {
        Some(id) if !id.is_empty() && !RESERVED_SEGMENTS.contains(id) => id.to_string(),
        _ => return Err(malformed(name, "expected an upload id after 'uploads'")),
    };
    let (digest, compressor, _metadata) = parse_blob_part(name, &segments[pos + 2..])?;
    Ok(WriteResource { instance, upload_id, digest, compressor })
}

/// Parses `blobs/[fn/]hash/size...` or `compressed-blobs/comp/[fn/]hash/size...`,
/// returning the segments left after the size.
fn parse_blob_part<'a>(
    name: &str,
    segments: &'a [&'a str],
) -> Result<(Digest, Option<Compressor>, &'a [&'a str]), ResourceError> {
    let mut rest = segments;
    let compressor = match rest.first() {
        Some(&"blobs") => {
            rest = &rest[1..];
            None
        }
        Some(&"compressed-blobs") => {
            let c = match rest.get(1) {
                Some(&"zstd") => Compressor::Zstd,
                Some(other) => {
                    return Err(malformed(name, &format!("unsupported compressor {other:?} (supported: zstd)")))
                }
                None => return Err(malformed(name, "expected a compressor after 'compressed-blobs'")),
            };
            rest = &rest[2..];
            Some(c)
        }
        _ => return Err(malformed(name, "expected 'blobs' or 'compressed-blobs'")),
    };
    let function = match rest.first() {
        Some(&"blake3") => {
            rest = &rest[1..];
            DigestFunction::Blake3
        }
        Some(seg) if seg.len() != 64 && rest.get(1).is_some_and(|next| next.len() == 64) => {
            return Err(malformed(
                name,
                &format!("unsupported digest function {seg:?} (supported: SHA-256, which is written without a segment, and blake3)"),
            ));
        }
        _ => DigestFunction::Sha256,
    };
    let (Some(hash), Some(size)) = (rest.first(), rest.get(1)) else {
        return Err(malformed(name, "expected {hash}/{size}"));
    };
    let size: i64 = size.parse().map_err(|_| malformed(name, &format!("size {size:?} is not a decimal integer")))?;
    let digest = Digest::parse(function, hash, size)
        .map_err(|source| ResourceError::BadDigest { name: truncate(name), source })?;
    Ok((digest, compressor, &rest[2..]))
}

fn malformed(name: &str, why: &str) -> ResourceError {
    ResourceError::Malformed { name: truncate(name), why: why.to_string() }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn read_default_instance() {
        let r = parse_read(&format!("blobs/{H}/0")).unwrap();
        assert_eq!(r.instance.as_str(), "");
        assert_eq!(r.digest.function, DigestFunction::Sha256);
        assert_eq!(r.compressor, None);
    }

    #[test]
    fn read_multi_segment_instance() {
        let r = parse_read(&format!("team/a/b/blobs/{H}/12")).unwrap();
        assert_eq!(r.instance.as_str(), "team/a/b");
        assert_eq!(r.digest.size, 12);
    }

    #[test]
    fn read_blake3_and_compressed() {
        let r = parse_read(&format!("x/compressed-blobs/zstd/blake3/{H}/5")).unwrap();
        assert_eq!(r.digest.function, DigestFunction::Blake3);
        assert_eq!(r.compressor, Some(Compressor::Zstd));
        assert_eq!(r.instance.as_str(), "x");
    }

    #[test]
    fn read_rejects_trailing_and_bad_parts() {
        assert!(parse_read(&format!("blobs/{H}/0/extra")).is_err());
        assert!(parse_read(&format!("blobs/{H}")).is_err());
        assert!(parse_read(&format!("blobs/{H}/-1")).is_err());
        assert!(parse_read(&format!("blobs/{H}/ten")).is_err());
        assert!(parse_read(&format!("compressed-blobs/gzip/{H}/0")).is_err());
        assert!(parse_read(&format!("blobs/md5/{H}/0")).is_err());
        assert!(parse_read(&format!("/blobs/{H}/0")).is_err(), "leading slash is an empty instance segment");
        assert!(parse_read(&format!("a//b/blobs/{H}/0")).is_err());
        assert!(parse_read("nothing-here").is_err());
        assert!(parse_read(&format!("blobs/{}/0", H.to_uppercase())).is_err());
    }

    #[test]
    fn write_forms() {
        let w = parse_write(&format!("uploads/u-1/blobs/{H}/0")).unwrap();
        assert_eq!(w.upload_id, "u-1");
        assert_eq!(w.instance.as_str(), "");
        let w = parse_write(&format!("main/uploads/u-2/blobs/{H}/7/some/metadata")).unwrap();
        assert_eq!(w.instance.as_str(), "main");
        assert_eq!(w.digest.size, 7);
        let w = parse_write(&format!("i/uploads/u/compressed-blobs/zstd/blake3/{H}/9")).unwrap();
        assert_eq!(w.compressor, Some(Compressor::Zstd));
        assert_eq!(w.digest.function, DigestFunction::Blake3);
    }

    #[test]
    fn write_rejects_malformed() {
        assert!(parse_write(&format!("blobs/{H}/0")).is_err());
        assert!(parse_write(&format!("uploads/blobs/{H}/0")).is_err());
        assert!(parse_write(&format!("uploads/u/{H}/0")).is_err());
        assert!(parse_write(&format!("uploads/u/blobs/{H}")).is_err());
    }

    #[test]
    fn instance_names() {
        assert!(InstanceName::parse("").is_ok());
        assert!(InstanceName::parse("main").is_ok());
        assert!(InstanceName::parse("dev/x").is_ok());
        for bad in ["/main", "main/", "a//b", "a/blobs", "uploads", "a/../b", "compressed-blobs/x"] {
            assert!(InstanceName::parse(bad).is_err(), "{bad}");
        }
    }
}

//! The signing half of docs/signing.md: the statement, the canonical
//! ActionResult, DSSE pre-authentication encoding, and the secret key. This is
//! the only module that touches the secret key; verification lives in
//! [`crate::provenance::trust`] and needs nothing but public keys.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, VerifyingKey};
use prost::Message;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::proto::prov::{self, ActionResultStatement, Envelope, OriginMetadata, VerificationStatus};
use crate::proto::reapi::{self, ActionResult};

/// `ActionResultStatement.statement_type` of every statement this version signs.
pub const STATEMENT_TYPE: &str = "provcache/action-result/v1";
/// The DSSE payload type of an encoded [`ActionResultStatement`].
pub const PAYLOAD_TYPE: &str = "application/vnd.provcache.action-result-statement.v1+proto";
/// DSSE payload type of a signed hit record (proto/provcache/v1/audit.proto):
/// distinct from the statement's, so neither can be passed off as the other.
pub const HIT_RECORD_PAYLOAD_TYPE: &str = "application/vnd.provcache.hit-record.v1+proto";
/// DSSE payload type of the signed list of blobs an entry references
/// (`ReferencesStatement` in proto/provcache/v1/storage.proto), so the
/// completeness check never trusts an unsigned list.
pub const REFERENCES_PAYLOAD_TYPE: &str = "application/vnd.provcache.referenced-blobs.v1+proto";
/// Type URL of the DSSE envelope in `auxiliary_metadata`.
pub const ENVELOPE_TYPE_URL: &str = "type.googleapis.com/io.intoto.Envelope";
/// Type URL of the `Any` that carries a [`VerificationStatus`] (flag mode).
pub const STATUS_TYPE_URL: &str = "type.googleapis.com/provcache.v1.VerificationStatus";
/// Longest client-claim string kept in a statement; longer ones are cut (at a
/// character boundary) so a client header cannot push the payload over the
/// verifier's size cap.
pub const MAX_CLAIM_BYTES: usize = 1024;

/// DSSE v1 pre-authentication encoding: the exact bytes that are signed.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let header = format!("DSSEv1 {} {} {} ", payload_type.len(), payload_type, payload.len());
    let mut out = Vec::with_capacity(header.len() + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// The key id: lowercase hex SHA-256 of the 32 raw public key bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Why a signing key could not be loaded, generated or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("cannot read signing key {}: {source}", path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a PKCS#8 PEM Ed25519 private key.
    #[error("signing key {} is not a PKCS#8 PEM Ed25519 private key: {detail}", path.display())]
    Invalid {
        /// The key file (empty when parsing a string).
        path: PathBuf,
        /// What the parser said.
        detail: String,
    },
    /// The key file could not be written (it is never overwritten).
    #[error("cannot write signing key {}: {source}", path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The operating system gave no randomness.
    #[error("no operating-system randomness for a new key: {0}")]
    Random(String),
    /// The key could not be encoded as PKCS#8.
    #[error("cannot encode the signing key as PKCS#8: {0}")]
    Encode(String),
}

/// The server's Ed25519 signing key. `Debug` never prints the secret, and the
/// secret is zeroized on drop (ed25519-dalek's `zeroize` feature).
pub struct SigningKey {
    inner: ed25519_dalek::SigningKey,
    key_id: String,
}

impl SigningKey {
    fn from_inner(inner: ed25519_dalek::SigningKey) -> Self {
        let key_id = key_id(&inner.verifying_key());
        SigningKey { inner, key_id }
    }

    /// A fresh key from operating-system randomness.
    pub fn generate() -> Result<Self, KeyError> {
        let mut secret = Zeroizing::new([0u8; 32]);
        getrandom::fill(secret.as_mut()).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self::from_inner(ed25519_dalek::SigningKey::from_bytes(&secret)))
    }

    /// Parses a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) Ed25519 key.
    pub fn from_pkcs8_pem(pem: &str) -> Result<Self, KeyError> {
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map(Self::from_inner)
            .map_err(|e| KeyError::Invalid { path: PathBuf::new(), detail: e.to_string() })
    }

    /// Loads a PKCS#8 PEM key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = std::fs::read_to_string(path)
            .map(Zeroizing::new)
            .map_err(|source| KeyError::Read { path: path.to_owned(), source })?;
        warn_if_readable_by_others(path);
        Self::from_pkcs8_pem(&pem).map_err(|e| match e {
            KeyError::Invalid { detail, .. } => KeyError::Invalid { path: path.to_owned(), detail },
            other => other,
        })
    }

    /// The PKCS#8 v1 PEM encoding of the secret key (RFC 8410 without the
    /// optional public key): OpenSSL 3.0 and most tools cannot read the v2
    /// form ed25519-dalek writes by default. [`Self::from_pkcs8_pem`] reads
    /// both, so keys written by earlier versions keep working.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let v1 = ed25519_dalek::pkcs8::KeypairBytes { secret_key: self.inner.to_bytes(), public_key: None };
        v1.to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))
    }

    /// Writes the key as PKCS#8 PEM to a new file with mode 0600. An existing
    /// file is never overwritten.
    pub fn write_pem(&self, path: &Path) -> Result<(), KeyError> {
        let pem = self.to_pkcs8_pem()?;
        let write_err = |source| KeyError::Write { path: path.to_owned(), source };
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(write_err)?;
        let written = file.write_all(pem.as_bytes()).and_then(|()| file.sync_all());
        if let Err(e) = written {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(write_err(e));
        }
        Ok(())
    }

    /// The key id of this key's public half.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.inner.verifying_key()
    }

    /// Encodes the statement once and signs its PAE: the envelope holds those
    /// exact payload bytes, which are never re-encoded afterwards.
    pub fn sign(&self, statement: &ActionResultStatement) -> Envelope {
        self.sign_payload(PAYLOAD_TYPE, Bytes::from(statement.encode_to_vec()))
    }

    /// Signs the PAE of any payload (hit records, reference lists): one key,
    /// several payload types, each bound into the signature by DSSE.
    pub fn sign_payload(&self, payload_type: &str, payload: Bytes) -> Envelope {
        let sig = self.inner.sign(&pae(payload_type, &payload));
        Envelope {
            payload,
            payload_type: payload_type.to_string(),
            signatures: vec![prov::Signature {
                sig: Bytes::copy_from_slice(&sig.to_bytes()),
                keyid: self.key_id.clone(),
            }],
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).field("secret", &"<redacted>").finish()
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "signing key file is accessible to group or others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

// ---------------------------------------------------------------- canonical ActionResult

/// `canon(result)` of docs/signing.md: envelopes removed, inlined bytes
/// cleared, and `execution_metadata` dropped if nothing else is left in it.
pub fn canonicalize(result: &ActionResult) -> ActionResult {
    let mut canon = result.clone();
    canon.stdout_raw = Bytes::new();
    canon.stderr_raw = Bytes::new();
    for file in &mut canon.output_files {
        file.contents = Bytes::new();
    }
    remove_any(&mut canon, ENVELOPE_TYPE_URL);
    canon
}

/// The prost encoding of [`canonicalize`]: what is hashed into the statement.
pub fn canonical_bytes(result: &ActionResult) -> Vec<u8> {
    canonicalize(result).encode_to_vec()
}

/// Removes every `auxiliary_metadata` entry with `type_url`, and the metadata
/// itself if it is left with every field at its default. Returns how many
/// entries were removed.
fn remove_any(result: &mut ActionResult, type_url: &str) -> usize {
    let Some(meta) = result.execution_metadata.as_mut() else { return 0 };
    let before = meta.auxiliary_metadata.len();
    meta.auxiliary_metadata.retain(|any| any.type_url != type_url);
    let removed = before - meta.auxiliary_metadata.len();
    if *meta == reapi::ExecutedActionMetadata::default() {
        result.execution_metadata = None;
    }
    removed
}

fn push_any(result: &mut ActionResult, type_url: &str, value: Vec<u8>) {
    let meta = result.execution_metadata.get_or_insert_with(Default::default);
    meta.auxiliary_metadata.push(prost_types::Any { type_url: type_url.to_string(), value });
}

// ---------------------------------------------------------------- envelopes in a result

/// The encoded envelopes carried by a result, in order (the raw `Any` values).
pub fn envelopes(result: &ActionResult) -> Vec<&[u8]> {
    result
        .execution_metadata
        .iter()
        .flat_map(|meta| meta.auxiliary_metadata.iter())
        .filter(|any| any.type_url == ENVELOPE_TYPE_URL)
        .map(|any| any.value.as_slice())
        .collect()
}

/// Attaches one envelope, encoded, as an `Any`.
pub fn attach_envelope(result: &mut ActionResult, envelope: &Envelope) {
    attach_envelope_bytes(result, envelope.encode_to_vec());
}

/// Attaches an already-encoded envelope as-is (the server's read path, which
/// never re-encodes what it stored).
pub fn attach_envelope_bytes(result: &mut ActionResult, encoded_envelope: Vec<u8>) {
    push_any(result, ENVELOPE_TYPE_URL, encoded_envelope);
}

/// Removes every envelope a client sent (a writer must not smuggle one in).
/// Returns how many were removed.
pub fn strip_envelopes(result: &mut ActionResult) -> usize {
    remove_any(result, ENVELOPE_TYPE_URL)
}

/// The type name of an `Any`'s type URL: what follows its last `/` (the
/// host part is free text anyone can choose).
fn type_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Removes, from a result a writer sent, every `Any` that could pass for the
/// server's own marks whatever the host part of its URL: DSSE envelopes
/// (`io.intoto.Envelope`) and every provcache message (`provcache.v1.*`,
/// such as a `VerificationStatus`). A copied envelope under
/// `example.com/io.intoto.Envelope` would otherwise be stored and served
/// beside the real one. Returns how many were removed.
pub fn strip_writer_marks(result: &mut ActionResult) -> usize {
    let Some(meta) = result.execution_metadata.as_mut() else { return 0 };
    let before = meta.auxiliary_metadata.len();
    meta.auxiliary_metadata.retain(|any| {
        let name = type_name(&any.type_url);
        name != "io.intoto.Envelope" && !name.starts_with("provcache.v1.")
    });
    let removed = before - meta.auxiliary_metadata.len();
    if *meta == reapi::ExecutedActionMetadata::default() {
        result.execution_metadata = None;
    }
    removed
}

/// Flag mode: marks a served result with why it failed verification,
/// replacing any status already present.
pub fn attach_status(result: &mut ActionResult, status: &VerificationStatus) {
    remove_any(result, STATUS_TYPE_URL);
    push_any(result, STATUS_TYPE_URL, status.encode_to_vec());
}

// ---------------------------------------------------------------- the statement

/// Everything that goes into an [`ActionResultStatement`].
#[derive(Debug, Clone)]
pub struct StatementParams<'a> {
    /// The instance the entry is written to.
    pub instance_name: &'a str,
    /// The request's digest function; unset (`UNKNOWN`) is recorded as SHA-256.
    pub digest_function: i32,
    /// The action digest (hash and size).
    pub action_digest: &'a reapi::Digest,
    /// The canonical ActionResult bytes ([`canonical_bytes`]) as stored.
    pub canonical_result: &'a [u8],
    /// From the Action blob in CAS.
    pub command_digest: &'a reapi::Digest,
    /// From the Action blob in CAS.
    pub input_root_digest: &'a reapi::Digest,
    /// Server clock.
    pub signed_at: SystemTime,
    /// The signing key's id.
    pub key_id: &'a str,
    /// This server's id.
    pub server_id: &'a str,
    /// The writer (from the certificate) and the client's claims.
    pub origin: OriginMetadata,
}

/// The effective digest function: `UNKNOWN` (unset) means SHA-256.
pub fn effective_digest_function(value: i32) -> i32 {
    if value == reapi::digest_function::Value::Unknown as i32 {
        reapi::digest_function::Value::Sha256 as i32
    } else {
        value
    }
}

/// Builds the statement to sign. Client claims longer than
/// [`MAX_CLAIM_BYTES`] are truncated.
pub fn build_statement(params: StatementParams<'_>) -> ActionResultStatement {
    let mut origin = params.origin;
    if let Some(claims) = origin.claims.as_mut() {
        for field in [
            &mut claims.tool_name,
            &mut claims.tool_version,
            &mut claims.tool_invocation_id,
            &mut claims.correlated_invocations_id,
            &mut claims.action_id,
            &mut claims.action_mnemonic,
            &mut claims.target_id,
            &mut claims.configuration_id,
        ] {
            let _ = truncate_utf8(field, MAX_CLAIM_BYTES);
        }
    }
    ActionResultStatement {
        statement_type: STATEMENT_TYPE.to_string(),
        instance_name: params.instance_name.to_string(),
        digest_function: effective_digest_function(params.digest_function),
        action_digest: Some(params.action_digest.clone()),
        action_result_sha256: Bytes::copy_from_slice(&Sha256::digest(params.canonical_result)),
        action_result_size: params.canonical_result.len() as i64,
        command_digest: Some(params.command_digest.clone()),
        input_root_digest: Some(params.input_root_digest.clone()),
        signed_at: Some(params.signed_at.into()),
        key_id: params.key_id.to_string(),
        server_id: params.server_id.to_string(),
        origin: Some(origin),
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary; returns whether
/// anything was cut.
pub(crate) fn truncate_utf8(s: &mut String, max: usize) -> bool {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    fn sample_result() -> ActionResult {
        ActionResult {
            output_files: vec![reapi::OutputFile {
                path: "out/hello".into(),
                digest: Some(reapi::Digest { hash: "ab".repeat(32), size_bytes: 6 }),
                is_executable: true,
                contents: Bytes::new(),
                node_properties: None,
            }],
            exit_code: 0,
            stdout_digest: Some(reapi::Digest { hash: "cd".repeat(32), size_bytes: 3 }),
            ..Default::default()
        }
    }

    fn test_key() -> SigningKey {
        SigningKey::from_inner(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]))
    }

    #[test]
    fn dsse_pae_matches_the_spec_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
    }

    #[test]
    fn key_id_is_sha256_of_the_raw_public_key() {
        let key = test_key();
        let raw = key.verifying_key().to_bytes();
        assert_eq!(key.key_id(), hex::encode(Sha256::digest(raw)));
        assert_eq!(key.key_id().len(), 64);
    }

    #[test]
    fn sign_covers_the_exact_payload_bytes() {
        let key = test_key();
        let statement = ActionResultStatement { statement_type: STATEMENT_TYPE.into(), ..Default::default() };
        let env = key.sign(&statement);
        assert_eq!(env.payload_type, PAYLOAD_TYPE);
        assert_eq!(env.payload, statement.encode_to_vec());
        assert_eq!(env.signatures.len(), 1);
        assert_eq!(env.signatures[0].keyid, key.key_id());
        let sig = ed25519_dalek::Signature::from_slice(&env.signatures[0].sig).unwrap();
        assert!(key.verifying_key().verify(&pae(PAYLOAD_TYPE, &env.payload), &sig).is_ok());
    }

    #[test]
    fn debug_does_not_print_the_secret() {
        let key = test_key();
        let shown = format!("{key:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode([7u8; 32])));
        assert!(!shown.contains("07, 07"));
    }

    #[test]
    fn pem_round_trip_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        let key = SigningKey::generate().unwrap();
        key.write_pem(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.key_id(), key.key_id());
        // Never overwrites.
        assert!(matches!(SigningKey::generate().unwrap().write_pem(&path), Err(KeyError::Write { .. })));
        assert_eq!(SigningKey::load(&path).unwrap().key_id(), key.key_id());
    }

    /// The `version` INTEGER of a PKCS#8 PEM key (0 is v1, 1 is v2), read from
    /// the DER (`30 len 02 01 version ...`; both forms are under 128 bytes),
    /// with whether the public key is present.
    fn pkcs8_version(pem: &str) -> (u8, bool) {
        let (_, doc) = ed25519_dalek::pkcs8::SecretDocument::from_pem(pem).unwrap();
        let der = doc.as_bytes();
        assert_eq!(der[2..4], [0x02, 0x01], "{der:02x?}");
        let info = ed25519_dalek::pkcs8::PrivateKeyInfoRef::try_from(der).unwrap();
        (der[4], info.public_key.is_some())
    }

    #[test]
    fn a_written_key_is_pkcs8_v1_and_reads_back() {
        let key = test_key();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{}", pem.as_str());
        assert_eq!(pkcs8_version(&pem), (0, false), "v1, without the public key");
        assert_eq!(SigningKey::from_pkcs8_pem(&pem).unwrap().key_id(), key.key_id());
    }

    #[test]
    fn a_pkcs8_v2_key_written_by_earlier_versions_still_reads() {
        let v2 = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .unwrap();
        assert_eq!(pkcs8_version(&v2), (1, true), "v2, with the public key");
        assert_eq!(SigningKey::from_pkcs8_pem(&v2).unwrap().key_id(), test_key().key_id());
    }

    #[test]
    fn openssl_reads_a_written_key_when_it_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signing.key");
        test_key().write_pem(&path).unwrap();
        let run = std::process::Command::new("openssl").arg("pkey").arg("-in").arg(&path).arg("-noout").output();
        match run {
            Err(e) => eprintln!("skipped: openssl is not runnable here ({e})"),
            Ok(out) => assert!(out.status.success(), "openssl pkey: {}", String::from_utf8_lossy(&out.stderr)),
        }
    }

    #[test]
    fn unreadable_or_invalid_key_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.key");
        let err = SigningKey::load(&missing).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }));
        assert!(err.to_string().contains("absent.key"), "{err}");

        let junk = dir.path().join("junk.key");
        std::fs::write(&junk, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = SigningKey::load(&junk).unwrap_err();
        assert!(matches!(err, KeyError::Invalid { .. }));
        assert!(err.to_string().contains("junk.key"), "{err}");
    }

    #[test]
    fn canonical_bytes_ignore_the_envelope_and_empty_metadata() {
        let sent = sample_result();
        let mut stored = sent.clone();
        attach_envelope(&mut stored, &test_key().sign(&ActionResultStatement::default()));
        assert_eq!(envelopes(&stored).len(), 1);
        // A result sent without metadata and the same read back with only the
        // envelope removed encode the same.
        let mut read_back = stored.clone();
        assert_eq!(strip_envelopes(&mut read_back), 1);
        assert_eq!(read_back.encode_to_vec(), sent.encode_to_vec());
        assert_eq!(canonical_bytes(&stored), sent.encode_to_vec());
        assert_eq!(canonical_bytes(&stored), canonical_bytes(&sent));

        // An explicitly empty metadata message is the same as none.
        let mut empty_meta = sent.clone();
        empty_meta.execution_metadata = Some(Default::default());
        assert_eq!(canonical_bytes(&empty_meta), canonical_bytes(&sent));
    }

    #[test]
    fn canonical_bytes_keep_other_metadata() {
        let mut with_worker = sample_result();
        with_worker.execution_metadata =
            Some(reapi::ExecutedActionMetadata { worker: "w1".into(), ..Default::default() });
        attach_envelope(&mut with_worker, &Envelope::default());
        let canon = canonicalize(&with_worker);
        let meta = canon.execution_metadata.as_ref().unwrap();
        assert_eq!(meta.worker, "w1");
        assert!(meta.auxiliary_metadata.is_empty());
        assert_ne!(canonical_bytes(&with_worker), canonical_bytes(&sample_result()));
    }

    #[test]
    fn inlined_bytes_do_not_change_canonical_bytes() {
        let plain = sample_result();
        let mut inlined = plain.clone();
        inlined.stdout_raw = Bytes::from_static(b"hi\n");
        inlined.stderr_raw = Bytes::from_static(b"warning\n");
        inlined.output_files[0].contents = Bytes::from_static(b"hello\n");
        assert_ne!(inlined.encode_to_vec(), plain.encode_to_vec());
        assert_eq!(canonical_bytes(&inlined), canonical_bytes(&plain));
    }

    #[test]
    fn writer_marks_are_stripped_whatever_the_host_of_their_type_url() {
        let mut result = sample_result();
        let any = |url: &str| prost_types::Any { type_url: url.into(), value: vec![1, 2, 3] };
        result.execution_metadata = Some(reapi::ExecutedActionMetadata {
            auxiliary_metadata: vec![
                any("type.googleapis.com/io.intoto.Envelope"),
                any("example.com/io.intoto.Envelope"),
                any("io.intoto.Envelope"),
                any("x.y/provcache.v1.VerificationStatus"),
                any("type.googleapis.com/provcache.v1.ActionResultStatement"),
                any("example.com/build.tool.Stats"),
                any("example.com/io.intoto.EnvelopeStats"),
            ],
            ..Default::default()
        });
        assert_eq!(strip_writer_marks(&mut result), 5);
        let kept: Vec<&str> = result
            .execution_metadata
            .as_ref()
            .unwrap()
            .auxiliary_metadata
            .iter()
            .map(|a| a.type_url.as_str())
            .collect();
        assert_eq!(kept, ["example.com/build.tool.Stats", "example.com/io.intoto.EnvelopeStats"]);

        let mut only_marks = sample_result();
        attach_envelope(&mut only_marks, &Envelope::default());
        assert_eq!(strip_writer_marks(&mut only_marks), 1);
        assert_eq!(only_marks, sample_result(), "empty metadata is removed, as canonicalisation does");
    }

    #[test]
    fn attach_status_replaces_an_earlier_status() {
        let mut result = sample_result();
        attach_status(&mut result, &VerificationStatus { reason: "unsigned".into(), detail: String::new() });
        attach_status(&mut result, &VerificationStatus { reason: "too_old".into(), detail: String::new() });
        let meta = result.execution_metadata.as_ref().unwrap();
        assert_eq!(meta.auxiliary_metadata.len(), 1);
        assert_eq!(meta.auxiliary_metadata[0].type_url, STATUS_TYPE_URL);
        let status = VerificationStatus::decode(meta.auxiliary_metadata[0].value.as_slice()).unwrap();
        assert_eq!(status.reason, "too_old");
    }

    #[test]
    fn statement_binds_the_canonical_bytes_and_defaults_to_sha256() {
        let digest = reapi::Digest { hash: "ef".repeat(32), size_bytes: 10 };
        let canon = canonical_bytes(&sample_result());
        let long_claim = "é".repeat(MAX_CLAIM_BYTES);
        let statement = build_statement(StatementParams {
            instance_name: "main",
            digest_function: 0,
            action_digest: &digest,
            canonical_result: &canon,
            command_digest: &digest,
            input_root_digest: &digest,
            signed_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000),
            key_id: "kid",
            server_id: "srv",
            origin: OriginMetadata {
                writer: None,
                claims: Some(prov::ClientClaims { tool_name: long_claim, ..Default::default() }),
            },
        });
        assert_eq!(statement.statement_type, STATEMENT_TYPE);
        assert_eq!(statement.digest_function, reapi::digest_function::Value::Sha256 as i32);
        assert_eq!(statement.action_result_sha256.as_ref(), Sha256::digest(&canon).as_slice());
        assert_eq!(statement.action_result_size, canon.len() as i64);
        assert_eq!(statement.signed_at.unwrap().seconds, 1_800_000_000);
        let tool = &statement.origin.unwrap().claims.unwrap().tool_name;
        assert!(tool.len() <= MAX_CLAIM_BYTES && tool.len() >= MAX_CLAIM_BYTES - 1);
    }
}

//! The trust policy (docs/signing.md, "Trust policy"): which public keys are
//! trusted, for which instances and when; which writers are revoked; which
//! actions are quarantined. One TOML file, shared by the server and
//! verify-build. Verification against it is in [`verify`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use ed25519_dalek::pkcs8::DecodePublicKey;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::provenance::signing::key_id;

pub use super::verify::{verify_served, verify_stored, Expected, Reason, Verified};

/// Why a trust policy was refused. Messages name the offending entry and field.
#[derive(Debug, thiserror::Error)]
pub enum TrustPolicyError {
    /// The file could not be read.
    #[error("cannot read trust policy {}: {source}", path.display())]
    Read {
        /// The policy file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Not TOML, or not this format (unknown or missing field, wrong type).
    #[error("trust policy is malformed: {0}")]
    Syntax(String),
    /// A field has a value the policy cannot use.
    #[error("trust policy: {field}: {detail}")]
    Field {
        /// Where: for example `keys[1] ("prod-2026-2").key_id`.
        field: String,
        /// What is wrong.
        detail: String,
    },
    /// An error inside a named file.
    #[error("{}: {inner}", path.display())]
    InFile {
        /// The policy file.
        path: PathBuf,
        /// The error.
        inner: Box<TrustPolicyError>,
    },
}

/// A key's state in the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Signs and verifies.
    Active,
    /// Verifies only (a key being rotated in or out).
    VerifyOnly,
    /// Compromised: nothing it signed is trusted.
    Revoked,
}

impl KeyState {
    /// Whether signatures by a key in this state are trusted.
    pub fn trusted(self) -> bool {
        matches!(self, KeyState::Active | KeyState::VerifyOnly)
    }
}

/// A `[[keys]]` entry, parsed and checked.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    /// Operator-chosen name (unique in the policy).
    pub name: String,
    /// Lowercase hex SHA-256 of the raw public key (recomputed on load).
    pub key_id: String,
    /// The public key.
    pub public_key: VerifyingKey,
    /// Its state.
    pub state: KeyState,
    /// Statements signed before this are refused.
    pub valid_from: SystemTime,
    /// Statements signed at or after this are refused.
    pub valid_until: SystemTime,
    /// Instance patterns (`"*"`, `"dev/*"`, exact names); `None` is every instance.
    pub instances: Option<Vec<String>>,
}

impl TrustedKey {
    /// Whether the key may vouch for entries of `instance`.
    pub fn in_scope(&self, instance: &str) -> bool {
        match &self.instances {
            None => true,
            Some(patterns) => patterns.iter().any(|p| instance_matches(p, instance)),
        }
    }

    /// Whether `signed_at` lies in `[valid_from, valid_until)`.
    pub fn in_window(&self, signed_at: SystemTime) -> bool {
        self.valid_from <= signed_at && signed_at < self.valid_until
    }
}

/// `"*"` matches everything, `"prefix*"` every instance starting with
/// `prefix`, anything else only itself.
fn instance_matches(pattern: &str, instance: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => instance.starts_with(prefix),
        None => pattern == instance,
    }
}

/// A `[[revoked_writers]]` entry: entries this writer made in `[from, to)`
/// (by `signed_at`) are refused.
#[derive(Clone, Debug)]
pub struct RevokedWriter {
    /// The writer principal (exact match).
    pub principal: String,
    /// Start of the window.
    pub from: SystemTime,
    /// End of the window (exclusive).
    pub to: SystemTime,
    /// Why (for humans).
    pub reason: String,
}

/// A `[[quarantined_actions]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantinedAction {
    /// The instance (exact match).
    pub instance: String,
    /// Lowercase hex hash.
    pub hash: String,
    /// Size in bytes.
    pub size: i64,
}

/// The parsed, checked trust policy.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    /// Monotonic version.
    pub policy_version: u64,
    /// Entries signed longer ago than this are refused.
    pub max_age: Option<Duration>,
    /// How far in the future `signed_at` may be.
    pub clock_skew: Duration,
    /// Poisoning cut-off: entries signed before it are refused.
    pub not_before: Option<SystemTime>,
    /// The keys.
    pub keys: Vec<TrustedKey>,
    /// Revoked writer windows.
    pub revoked_writers: Vec<RevokedWriter>,
    /// Quarantined actions.
    pub quarantined_actions: Vec<QuarantinedAction>,
}

// ---------------------------------------------------------------- file format

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    policy_version: u64,
    max_age: Option<String>,
    clock_skew: String,
    not_before: Option<String>,
    #[serde(default)]
    keys: Vec<KeyEntry>,
    #[serde(default)]
    revoked_writers: Vec<RevokedWriterEntry>,
    #[serde(default)]
    quarantined_actions: Vec<QuarantineEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key_id: String,
    public_key: String,
    state: KeyState,
    valid_from: String,
    valid_until: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    instances: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedWriterEntry {
    principal: String,
    from: String,
    to: String,
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineEntry {
    instance: String,
    action_digest: String,
}

fn field_err(field: impl Into<String>, detail: impl Into<String>) -> TrustPolicyError {
    TrustPolicyError::Field { field: field.into(), detail: detail.into() }
}

fn parse_time(field: &str, value: &str) -> Result<SystemTime, TrustPolicyError> {
    humantime::parse_rfc3339(value)
        .map_err(|e| field_err(field, format!("{value:?} is not an RFC 3339 UTC time like 2026-11-01T00:00:00Z: {e}")))
}

fn parse_duration(field: &str, value: &str) -> Result<Duration, TrustPolicyError> {
    humantime::parse_duration(value)
        .map_err(|e| field_err(field, format!("{value:?} is not a duration like \"30d\" or \"5m\": {e}")))
}

/// Parses a public key: PEM SubjectPublicKeyInfo, or base64 of the 32 raw bytes.
fn parse_public_key(field: &str, value: &str) -> Result<VerifyingKey, TrustPolicyError> {
    let trimmed = value.trim();
    let key = if trimmed.starts_with("-----BEGIN") {
        VerifyingKey::from_public_key_pem(trimmed)
            .map_err(|e| field_err(field, format!("not a PEM Ed25519 SubjectPublicKeyInfo: {e}")))?
    } else {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(trimmed)
            .map_err(|e| field_err(field, format!("not base64: {e}")))?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|raw: Vec<u8>| field_err(field, format!("{} bytes; an Ed25519 public key has 32", raw.len())))?;
        VerifyingKey::from_bytes(&raw).map_err(|_| field_err(field, "not a valid Ed25519 public key"))?
    };
    if key.is_weak() {
        return Err(field_err(field, "a weak (small-order) Ed25519 key"));
    }
    Ok(key)
}

fn check_pattern(field: &str, pattern: &str) -> Result<(), TrustPolicyError> {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if body.contains('*') {
        return Err(field_err(field, format!("{pattern:?}: '*' may only end a pattern (\"*\", \"dev/*\")")));
    }
    Ok(())
}

/// Parses `"<hash>/<size>"` (64 lowercase hex characters, a size >= 0).
fn parse_action_digest(field: &str, value: &str) -> Result<(String, i64), TrustPolicyError> {
    let bad = || field_err(field, format!("{value:?} is not \"<64 lowercase hex>/<size>\""));
    let (hash, size) = value.split_once('/').ok_or_else(bad)?;
    let size: i64 = size.parse().map_err(|_| bad())?;
    crate::cache::digest::Digest::parse(crate::cache::digest::DigestFunction::Sha256, hash, size)
        .map_err(|e| field_err(field, e.to_string()))?;
    Ok((hash.to_string(), size))
}

impl KeyEntry {
    fn check(self, index: usize) -> Result<TrustedKey, TrustPolicyError> {
        let at = |f: &str| format!("keys[{index}] ({:?}).{f}", self.name);
        if self.name.is_empty() {
            return Err(field_err(format!("keys[{index}].name"), "must not be empty"));
        }
        let public_key = parse_public_key(&at("public_key"), &self.public_key)?;
        let actual = key_id(&public_key);
        if self.key_id != actual {
            return Err(field_err(
                at("key_id"),
                format!("{:?} does not match the public key, whose key id is {actual}", self.key_id),
            ));
        }
        let valid_from = parse_time(&at("valid_from"), &self.valid_from)?;
        let valid_until = parse_time(&at("valid_until"), &self.valid_until)?;
        if valid_until <= valid_from {
            return Err(field_err(at("valid_until"), "must be after valid_from"));
        }
        if let Some(patterns) = &self.instances {
            if patterns.is_empty() {
                return Err(field_err(at("instances"), "is empty; omit it to allow every instance"));
            }
            for p in patterns {
                check_pattern(&at("instances"), p)?;
            }
        }
        Ok(TrustedKey {
            name: self.name,
            key_id: actual,
            public_key,
            state: self.state,
            valid_from,
            valid_until,
            instances: self.instances,
        })
    }
}

impl TrustPolicy {
    /// Parses and checks a policy from TOML text.
    pub fn from_toml(text: &str) -> Result<Self, TrustPolicyError> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| TrustPolicyError::Syntax(e.to_string()))?;
        let mut keys: Vec<TrustedKey> = Vec::with_capacity(file.keys.len());
        for (i, entry) in file.keys.into_iter().enumerate() {
            let key = entry.check(i)?;
            if let Some(other) = keys.iter().find(|k| k.name == key.name || k.key_id == key.key_id) {
                let what = if other.name == key.name { "name" } else { "key_id" };
                return Err(field_err(
                    format!("keys[{i}] ({:?}).{what}", key.name),
                    format!("duplicates key {:?}; list each key once", other.name),
                ));
            }
            keys.push(key);
        }
        let mut revoked_writers = Vec::with_capacity(file.revoked_writers.len());
        for (i, w) in file.revoked_writers.into_iter().enumerate() {
            let at = |f: &str| format!("revoked_writers[{i}] ({:?}).{f}", w.principal);
            if w.principal.is_empty() {
                return Err(field_err(format!("revoked_writers[{i}].principal"), "must not be empty"));
            }
            let from = parse_time(&at("from"), &w.from)?;
            let to = parse_time(&at("to"), &w.to)?;
            if to <= from {
                return Err(field_err(at("to"), "must be after from"));
            }
            revoked_writers.push(RevokedWriter { principal: w.principal, from, to, reason: w.reason });
        }
        let mut quarantined_actions = Vec::with_capacity(file.quarantined_actions.len());
        for (i, q) in file.quarantined_actions.into_iter().enumerate() {
            let (hash, size) =
                parse_action_digest(&format!("quarantined_actions[{i}].action_digest"), &q.action_digest)?;
            quarantined_actions.push(QuarantinedAction { instance: q.instance, hash, size });
        }
        Ok(TrustPolicy {
            policy_version: file.policy_version,
            max_age: file.max_age.as_deref().map(|v| parse_duration("max_age", v)).transpose()?,
            clock_skew: parse_duration("clock_skew", &file.clock_skew)?,
            not_before: file.not_before.as_deref().map(|v| parse_time("not_before", v)).transpose()?,
            keys,
            revoked_writers,
            quarantined_actions,
        })
    }

    /// Reads, parses and checks a policy file. Errors name the file.
    pub fn load(path: &Path) -> Result<Self, TrustPolicyError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| TrustPolicyError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| TrustPolicyError::InFile { path: path.to_owned(), inner: Box::new(e) })
    }

    /// The key with this id, whatever its state.
    pub fn key_by_id(&self, key_id: &str) -> Option<&TrustedKey> {
        self.keys.iter().find(|k| k.key_id == key_id)
    }

    /// Whether `principal` wrote during a revoked window at `signed_at`.
    pub fn writer_revoked(&self, principal: &str, signed_at: SystemTime) -> bool {
        self.revoked_writers.iter().any(|w| w.principal == principal && w.from <= signed_at && signed_at < w.to)
    }

    /// Whether the action is quarantined in this instance.
    pub fn quarantined(&self, instance: &str, hash: &str, size: i64) -> bool {
        self.quarantined_actions.iter().any(|q| q.instance == instance && q.hash == hash && q.size == size)
    }
}

/// Renders a `[[keys]]` entry for a new public key (used by `provcache keygen`),
/// with the public key as base64 of its 32 raw bytes.
pub fn render_key_entry(
    name: &str,
    public_key: &VerifyingKey,
    state: KeyState,
    valid_from: SystemTime,
    valid_until: SystemTime,
) -> String {
    #[derive(Serialize)]
    struct Keys {
        keys: Vec<KeyEntry>,
    }
    let entry = KeyEntry {
        name: name.to_string(),
        key_id: key_id(public_key),
        public_key: base64::engine::general_purpose::STANDARD.encode(public_key.as_bytes()),
        state,
        valid_from: humantime::format_rfc3339_seconds(valid_from).to_string(),
        valid_until: humantime::format_rfc3339_seconds(valid_until).to_string(),
        instances: Some(vec!["*".to_string()]),
    };
    // Serializing plain strings and an enum into TOML cannot fail.
    toml::to_string(&Keys { keys: vec![entry] }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_key(seed: u8) -> VerifyingKey {
        ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key()
    }

    fn b64(key: &VerifyingKey) -> String {
        base64::engine::general_purpose::STANDARD.encode(key.as_bytes())
    }

    fn policy_with_key(extra_key_line: &str) -> String {
        let key = test_key(1);
        format!(
            r#"
policy_version = 3
max_age = "30d"
clock_skew = "5m"
not_before = "2026-01-01T00:00:00Z"

[[keys]]
name = "prod-2026-2"
key_id = "{}"
public_key = "{}"
state = "active"
valid_from = "2026-08-01T00:00:00Z"
valid_until = "2027-02-01T00:00:00Z"
instances = ["*"]
{extra_key_line}

[[revoked_writers]]
principal = "spiffe://ci.example.com/runner-42"
from = "2026-08-20T10:00:00Z"
to = "2026-08-21T18:00:00Z"
reason = "runner compromised"

[[quarantined_actions]]
instance = ""
action_digest = "{}/142"
"#,
            key_id(&key),
            b64(&key),
            "a".repeat(64)
        )
    }

    #[test]
    fn the_documented_example_parses() {
        let p = TrustPolicy::from_toml(&policy_with_key("")).unwrap();
        assert_eq!(p.policy_version, 3);
        assert_eq!(p.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(p.clock_skew, Duration::from_secs(300));
        assert!(p.not_before.is_some());
        assert_eq!(p.keys.len(), 1);
        assert_eq!(p.keys[0].state, KeyState::Active);
        assert!(p.keys[0].in_scope("anything/at/all"));
        let inside = humantime::parse_rfc3339("2026-08-21T00:00:00Z").unwrap();
        let after = humantime::parse_rfc3339("2026-08-21T18:00:00Z").unwrap();
        assert!(p.writer_revoked("spiffe://ci.example.com/runner-42", inside));
        assert!(!p.writer_revoked("spiffe://ci.example.com/runner-42", after));
        assert!(!p.writer_revoked("spiffe://ci.example.com/runner-43", inside));
        assert!(p.quarantined("", &"a".repeat(64), 142));
        assert!(!p.quarantined("main", &"a".repeat(64), 142));
    }

    #[test]
    fn an_unknown_field_is_refused_by_name() {
        let err = TrustPolicy::from_toml(&policy_with_key("colour = \"blue\"")).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let top = format!("strict_mode = true\n{}", policy_with_key(""));
        let err = TrustPolicy::from_toml(&top).unwrap_err();
        assert!(err.to_string().contains("strict_mode"), "{err}");
    }

    #[test]
    fn a_key_id_mismatch_is_refused_naming_the_key() {
        let text = policy_with_key("").replace(&key_id(&test_key(1)), &key_id(&test_key(2)));
        let err = TrustPolicy::from_toml(&text).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("prod-2026-2") && msg.contains("key_id"), "{msg}");
        assert!(msg.contains(&key_id(&test_key(1))), "{msg}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (policy_with_key("").replace("\"30d\"", "\"thirty days\""), "max_age"),
            (policy_with_key("").replace("\"5m\"", "\"5 parsecs\""), "clock_skew"),
            (policy_with_key("").replace("2026-01-01T00:00:00Z", "yesterday"), "not_before"),
            (policy_with_key("").replace("\"active\"", "\"trusted\""), "trusted"),
            (policy_with_key("").replace("[\"*\"]", "[\"d*v\"]"), "instances"),
            (policy_with_key("").replace("[\"*\"]", "[]"), "instances"),
            (policy_with_key("").replace("2027-02-01T00:00:00Z", "2026-07-01T00:00:00Z"), "valid_until"),
            (policy_with_key("").replace("/142", "/x"), "quarantined_actions[0].action_digest"),
            (policy_with_key("").replace("2026-08-21T18:00:00Z", "2026-08-19T18:00:00Z"), "revoked_writers[0]"),
            (policy_with_key("").replace(&b64(&test_key(1)), "AAAA"), "public_key"),
        ];
        for (text, needle) in cases {
            let err = TrustPolicy::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "expected {needle:?} in {err}");
        }
        let err = TrustPolicy::from_toml("policy_version = 1\n").unwrap_err().to_string();
        assert!(err.contains("clock_skew"), "{err}");
    }

    #[test]
    fn a_pem_public_key_is_accepted() {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        let key = test_key(1);
        let pem = key.to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF).unwrap();
        let text = policy_with_key("").replace(&format!("\"{}\"", b64(&key)), &format!("'''\n{pem}'''"));
        let p = TrustPolicy::from_toml(&text).unwrap();
        assert_eq!(p.keys[0].public_key, key);
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let key = test_key(1);
        let dup = format!(
            "\n[[keys]]\nname = \"again\"\nkey_id = \"{}\"\npublic_key = \"{}\"\nstate = \"verify_only\"\n\
             valid_from = \"2026-08-01T00:00:00Z\"\nvalid_until = \"2027-02-01T00:00:00Z\"\n",
            key_id(&key),
            b64(&key)
        );
        let err = TrustPolicy::from_toml(&policy_with_key(&dup)).unwrap_err().to_string();
        assert!(err.contains("again") && err.contains("duplicates"), "{err}");
    }

    #[test]
    fn instance_patterns() {
        assert!(instance_matches("*", ""));
        assert!(instance_matches("dev/*", "dev/x"));
        assert!(!instance_matches("dev/*", "dev"));
        assert!(!instance_matches("dev/*", "main"));
        assert!(instance_matches("main", "main"));
        assert!(!instance_matches("main", "main/x"));
    }

    #[test]
    fn rendered_key_entries_load_back() {
        let key = test_key(3);
        let from = humantime::parse_rfc3339("2026-08-01T00:00:00Z").unwrap();
        let until = humantime::parse_rfc3339("2027-02-01T00:00:00Z").unwrap();
        let entry = render_key_entry("new \"key\"", &key, KeyState::VerifyOnly, from, until);
        assert!(entry.starts_with("[[keys]]"), "{entry}");
        let p = TrustPolicy::from_toml(&format!("policy_version = 1\nclock_skew = \"5m\"\n\n{entry}")).unwrap();
        assert_eq!(p.keys[0].name, "new \"key\"");
        assert_eq!(p.keys[0].public_key, key);
        assert_eq!(p.keys[0].state, KeyState::VerifyOnly);
        assert_eq!(p.keys[0].valid_until, until);
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trust.toml");
        std::fs::write(&path, "policy_version = \"three\"\n").unwrap();
        let err = TrustPolicy::load(&path).unwrap_err().to_string();
        assert!(err.contains("trust.toml") && err.contains("policy_version"), "{err}");
        let err = TrustPolicy::load(&dir.path().join("none.toml")).unwrap_err().to_string();
        assert!(err.contains("none.toml"), "{err}");
    }
}

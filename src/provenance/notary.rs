//! Signed provenance on the server: sign every Action Cache entry on write,
//! verify it on every read (docs/signing.md), count the outcomes.
//!
//! The signing key and the trust policy are reloaded from disk without a
//! restart, when they change and on SIGHUP ([`crate::access::reload`]): a
//! bad trust-policy file, or one with a lower `policy_version` (a rollback),
//! keeps the last good policy; an unreadable signing key means no Action
//! Cache writes (fail closed) until it is fixed, since a key file removed on
//! purpose must stop signing. Every outcome is logged and counted like other
//! reloads.
//!
//! The same key signs the per-invocation hit log ([`super::hit_log`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prost::Message as _;
use sha2::{Digest as _, Sha256};

use crate::access::gate::Caller;
use crate::access::reload::{self, Reload};
use crate::cache::action_result::PreparedResult;
use crate::cache::digest::Digest;
use crate::cache::resource::InstanceName;
use crate::clock::Clock;
use crate::error::{Error, Result};
use crate::proto::prov::storage::{ReferencedBlobs, ReferencesStatement, StoredActionEntry};
use crate::proto::prov::{ClientClaims, OriginMetadata, Writer};
use crate::proto::reapi;
use crate::provenance::signing::{self, SigningKey, StatementParams};
use crate::provenance::trust::TrustPolicy;
use crate::provenance::verify::{verify_references, verify_stored, Expected, Reason, Verified};

/// What the server does with an entry that fails verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Answer NOT_FOUND so the client rebuilds (the default).
    #[default]
    Reject,
    /// Serve it with a `VerificationStatus` attached (migration only; set
    /// only by server configuration, never by a request).
    Flag,
}

/// Counters of verification outcomes, by reason: the one place the metrics
/// endpoint and tests read them from.
#[derive(Debug, Default)]
pub struct VerificationCounters {
    verified: AtomicU64,
    cache_hits: AtomicU64,
    failed: [AtomicU64; Reason::ALL.len()],
    signed: AtomicU64,
    sign_refused: AtomicU64,
    policy_rollbacks_refused: AtomicU64,
}

impl VerificationCounters {
    /// Entries that verified (including verification-cache hits).
    pub fn verified(&self) -> u64 {
        self.verified.load(Ordering::Relaxed)
    }
    /// Verifications answered from the cache of verified entries.
    pub fn cache_hits(&self) -> u64 {
        self.cache_hits.load(Ordering::Relaxed)
    }
    /// Entries that failed for `reason`.
    pub fn failed(&self, reason: Reason) -> u64 {
        Reason::ALL.iter().position(|r| *r == reason).map(|i| self.failed[i].load(Ordering::Relaxed)).unwrap_or(0)
    }
    /// Entries signed.
    pub fn signed(&self) -> u64 {
        self.signed.load(Ordering::Relaxed)
    }
    /// Writes refused because no signing key was usable.
    pub fn sign_refused(&self) -> u64 {
        self.sign_refused.load(Ordering::Relaxed)
    }
    /// Trust-policy reloads refused because the file's `policy_version` was
    /// lower than the loaded one's (a rollback, say to before a revocation).
    pub fn policy_rollbacks_refused(&self) -> u64 {
        self.policy_rollbacks_refused.load(Ordering::Relaxed)
    }
    /// Records a failed verification.
    pub fn record_failure(&self, reason: Reason) {
        if let Some(i) = Reason::ALL.iter().position(|r| *r == reason) {
            self.failed[i].fetch_add(1, Ordering::Relaxed);
        }
    }
    /// Every (reason label, count) pair, for exposition.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        Reason::ALL.iter().zip(&self.failed).map(|(r, c)| (r.as_str(), c.load(Ordering::Relaxed))).collect()
    }
}

/// Where the key and the trust policy come from.
#[derive(Clone, Debug)]
pub struct ProvenanceConfig {
    /// The ed25519 signing key (PKCS#8 PEM).
    pub signing_key: PathBuf,
    /// The trust policy (TOML).
    pub trust_policy: PathBuf,
    /// Reject (default) or flag.
    pub mode: Mode,
    /// This server's id, recorded in every statement.
    pub server_id: String,
    /// Skip verification on reads. Only for measuring its cost (`bench`);
    /// never exposed as a normal option.
    pub verification_disabled: bool,
    /// Store entries without an envelope. Only for measuring signing's cost
    /// (`bench`); every such entry fails verification.
    pub signing_disabled: bool,
}

/// What an Action Cache entry is about: the request's instance, effective
/// digest function and action digest.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    /// The instance.
    pub instance: &'a InstanceName,
    /// The effective digest function (REAPI enum value; unset means SHA-256).
    pub digest_function: i32,
    /// The action digest.
    pub action: Digest,
}

/// Where a verified entry came from (from its signed statement).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The writer principal (server-attested).
    pub writer_principal: String,
    /// The writer's claimed invocation id (unverified).
    pub origin_invocation_id: String,
    /// When it was signed.
    pub signed_at: Option<SystemTime>,
    /// The verifying key's id.
    pub key_id: String,
    /// The entry's list of referenced blobs is signed with the statement's
    /// key and matches it (the completeness check may use the stored list;
    /// otherwise it derives the list from the result).
    pub references_signed: bool,
}

impl Origin {
    fn of(v: &Verified) -> Self {
        let origin = v.statement.origin.clone().unwrap_or_default();
        Origin {
            writer_principal: origin.writer.map(|w| w.principal).unwrap_or_default(),
            origin_invocation_id: origin.claims.map(|c| c.tool_invocation_id).unwrap_or_default(),
            signed_at: Some(v.signed_at),
            key_id: v.key_id.clone(),
            references_signed: false,
        }
    }
}

const VERIFIED_CACHE_MAX: usize = 200_000;

/// A cached successful verification: (policy generation, valid until, origin).
type CachedVerification = (u64, SystemTime, Arc<Origin>);

struct Loaded<T> {
    value: T,
    stamp: Option<(SystemTime, u64)>,
}

/// The `what` labels of the reload metric.
const TRUST_POLICY: &str = "trust_policy";
const SIGNING_KEY: &str = "signing_key";

/// The signer and verifier.
pub struct Provenance {
    config: ProvenanceConfig,
    signer: RwLock<Loaded<std::result::Result<Arc<SigningKey>, String>>>,
    trust: RwLock<Loaded<Arc<TrustPolicy>>>,
    generation: AtomicU64,
    /// SHA-256 of (key, stored value) → (policy generation, valid until, origin).
    verified: Mutex<HashMap<[u8; 32], CachedVerification>>,
    counters: VerificationCounters,
    clock: Clock,
}

impl std::fmt::Debug for Provenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provenance").field("config", &self.config).finish_non_exhaustive()
    }
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

impl Provenance {
    /// Loads the trust policy (which must be valid at start) and the signing
    /// key (an unusable key is reported, and AC writes then fail closed).
    pub fn new(config: ProvenanceConfig, clock: Clock) -> anyhow::Result<Self> {
        let trust = TrustPolicy::load(&config.trust_policy)
            .map_err(|e| anyhow::anyhow!("trust policy {}: {e}", config.trust_policy.display()))?;
        let signer = load_key(&config.signing_key);
        if let Err(e) = &signer {
            tracing::error!(error = %e, "no usable signing key: Action Cache writes will fail until it is fixed");
        }
        reload::register(TRUST_POLICY);
        reload::register(SIGNING_KEY);
        Ok(Provenance {
            signer: RwLock::new(Loaded { value: signer, stamp: stamp(&config.signing_key) }),
            trust: RwLock::new(Loaded { value: Arc::new(trust), stamp: stamp(&config.trust_policy) }),
            generation: AtomicU64::new(0),
            verified: Mutex::new(HashMap::new()),
            counters: VerificationCounters::default(),
            clock,
            config,
        })
    }

    /// The outcome counters.
    pub fn counters(&self) -> &VerificationCounters {
        &self.counters
    }

    /// The configured mode.
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// The trust policy in force.
    pub fn trust_policy(&self) -> Arc<TrustPolicy> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).value.clone()
    }

    /// Re-reads the trust policy and the signing key if their files changed.
    /// A bad policy keeps the last good one; the log says why.
    pub fn reload_if_changed(&self) {
        self.reload(false);
    }

    /// [`reload_if_changed`](Self::reload_if_changed), or with `force` even
    /// if the files look unchanged (SIGHUP).
    pub fn reload(&self, force: bool) {
        self.reload_trust(&self.config.trust_policy, force);
        self.reload_key(&self.config.signing_key, force);
    }

    fn reload_trust(&self, path: &std::path::Path, force: bool) {
        let now_stamp = stamp(path);
        if !force && self.trust.read().unwrap_or_else(|p| p.into_inner()).stamp == now_stamp {
            return;
        }
        let loaded = self.trust_policy().policy_version;
        match TrustPolicy::load(path) {
            // A rollback: an older policy may trust what a newer one
            // revoked. Equal versions are accepted (an edit that forgot
            // to bump the version must still take effect).
            Ok(policy) if policy.policy_version < loaded => {
                self.trust.write().unwrap_or_else(|p| p.into_inner()).stamp = now_stamp;
                self.counters.policy_rollbacks_refused.fetch_add(1, Ordering::Relaxed);
                reload::record(TRUST_POLICY, false);
                tracing::warn!(path = %path.display(), file_version = policy.policy_version,
                    loaded_version = loaded, "trust policy not reloaded: its policy_version is lower than the \
                    loaded one's (a rollback); keeping the loaded policy");
            }
            Ok(policy) => {
                let mut t = self.trust.write().unwrap_or_else(|p| p.into_inner());
                t.value = Arc::new(policy);
                t.stamp = now_stamp;
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.verified.lock().unwrap_or_else(|p| p.into_inner()).clear();
                reload::record(TRUST_POLICY, true);
                tracing::info!(path = %path.display(), "trust policy reloaded");
            }
            Err(e) => {
                self.trust.write().unwrap_or_else(|p| p.into_inner()).stamp = now_stamp;
                reload::record(TRUST_POLICY, false);
                tracing::warn!(path = %path.display(), error = %e,
                    "trust policy not reloaded; keeping the last good policy");
            }
        }
    }

    /// Re-reads the key when its file changed (or with `force`), and keeps
    /// trying while no key is usable. A failure is counted once per change.
    fn reload_key(&self, path: &std::path::Path, force: bool) {
        let key_stamp = stamp(path);
        let mut s = self.signer.write().unwrap_or_else(|p| p.into_inner());
        let changed = force || s.stamp != key_stamp;
        let was_usable = s.value.is_ok();
        if !changed && (was_usable || key_stamp.is_none()) {
            return;
        }
        s.value = load_key(path);
        s.stamp = key_stamp;
        match &s.value {
            Ok(k) => {
                reload::record(SIGNING_KEY, true);
                tracing::info!(key_id = k.key_id(), "signing key loaded");
            }
            Err(e) if changed || was_usable => {
                reload::record(SIGNING_KEY, false);
                tracing::error!(error = %e, "signing key unusable: Action Cache writes fail closed");
            }
            Err(_) => {}
        }
    }

    /// Starts a thread that reloads the files every `interval` and at once
    /// on SIGHUP.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) {
        reload::spawn_poller(self, interval);
    }

    /// Fails closed (UNAVAILABLE) when no signing key is usable. Checked
    /// before any work on an UpdateActionResult.
    pub fn require_signer(&self) -> Result<Arc<SigningKey>> {
        match &self.signer.read().unwrap_or_else(|p| p.into_inner()).value {
            Ok(k) => Ok(k.clone()),
            Err(e) => {
                self.counters.sign_refused.fetch_add(1, Ordering::Relaxed);
                Err(Error::Unavailable(format!("this server cannot sign Action Cache entries right now ({e})")))
            }
        }
    }

    /// The key that signs hit records, if one is usable (never counted as a
    /// refused write: the hit log then records unsigned).
    pub fn hit_signer(&self) -> Option<Arc<SigningKey>> {
        if self.config.signing_disabled {
            return None;
        }
        self.signer.read().unwrap_or_else(|p| p.into_inner()).value.as_ref().ok().cloned()
    }

    /// Signs the list of blobs an entry references (as it will be stored in
    /// `StoredActionEntry.referenced_blobs`), bound to the action and the
    /// canonical result, so the read path's completeness check never relies
    /// on an unsigned list. Returns the encoded envelope.
    pub fn sign_references(
        &self,
        signer: &SigningKey,
        subject: &Subject<'_>,
        canonical: &[u8],
        referenced_blobs: &[reapi::Digest],
    ) -> Vec<u8> {
        if self.config.signing_disabled {
            return Vec::new();
        }
        let list = ReferencedBlobs { blobs: referenced_blobs.to_vec() }.encode_to_vec();
        let statement = ReferencesStatement {
            instance_name: subject.instance.as_str().to_string(),
            digest_function: signing::effective_digest_function(subject.digest_function),
            action_digest: Some(subject.action.to_proto()),
            action_result_sha256: Sha256::digest(canonical).to_vec().into(),
            referenced_blobs_sha256: Sha256::digest(&list).to_vec().into(),
        };
        let envelope = signer.sign_payload(signing::REFERENCES_PAYLOAD_TYPE, statement.encode_to_vec().into());
        envelope.encode_to_vec()
    }

    /// Builds and signs the statement for a prepared result; returns the
    /// encoded envelope.
    pub fn sign(
        &self,
        signer: &SigningKey,
        subject: &Subject<'_>,
        prepared: &PreparedResult,
        canonical: &[u8],
        caller: &Caller,
        claims: Option<reapi::RequestMetadata>,
    ) -> Vec<u8> {
        if self.config.signing_disabled {
            return Vec::new();
        }
        let writer = Writer {
            principal: caller.principal.clone(),
            leaf_cert_sha256: caller.cert.as_ref().map(|c| c.leaf_sha256.to_vec()).unwrap_or_default().into(),
            cert_not_after: caller.cert.as_ref().map(|c| prost_types::Timestamp::from(c.not_after)),
            rule: caller.rule.clone(),
        };
        let claims = claims.map(|m| {
            let tool = m.tool_details.unwrap_or_default();
            ClientClaims {
                tool_name: tool.tool_name,
                tool_version: tool.tool_version,
                tool_invocation_id: m.tool_invocation_id,
                correlated_invocations_id: m.correlated_invocations_id,
                action_id: m.action_id,
                action_mnemonic: m.action_mnemonic,
                target_id: m.target_id,
                configuration_id: m.configuration_id,
            }
        });
        let action_digest = subject.action.to_proto();
        let command_digest = prepared.command_digest.to_proto();
        let input_root = prepared.input_root_digest.map(|d| d.to_proto()).unwrap_or_default();
        let statement = signing::build_statement(StatementParams {
            instance_name: subject.instance.as_str(),
            digest_function: subject.digest_function,
            action_digest: &action_digest,
            canonical_result: canonical,
            command_digest: &command_digest,
            input_root_digest: &input_root,
            signed_at: (self.clock)(),
            key_id: signer.key_id(),
            server_id: &self.config.server_id,
            origin: OriginMetadata { writer: Some(writer), claims },
        });
        self.counters.signed.fetch_add(1, Ordering::Relaxed);
        prost::Message::encode_to_vec(&signer.sign(&statement))
    }

    /// Read-path checks 1-8 for a stored entry, and whether its list of
    /// referenced blobs is signed ([`Origin::references_signed`]).
    /// `raw_key` and `raw_value` key the cache of verified entries, so a
    /// value copied elsewhere (or altered in any byte, its list included) is
    /// verified afresh, and hot reads pay for neither check.
    pub fn verify(
        &self,
        subject: &Subject<'_>,
        raw_key: &[u8],
        raw_value: &[u8],
        entry: &StoredActionEntry,
    ) -> std::result::Result<Arc<Origin>, Reason> {
        let (canonical, envelope) = (&entry.canonical_result[..], &entry.envelope[..]);
        if self.config.verification_disabled {
            return Ok(Arc::default());
        }
        let now = (self.clock)();
        let generation = self.generation.load(Ordering::Acquire);
        let mut h = Sha256::new();
        h.update((raw_key.len() as u64).to_be_bytes());
        h.update(raw_key);
        h.update(raw_value);
        let fingerprint: [u8; 32] = h.finalize().into();
        if let Some((g, until, origin)) = self.verified.lock().unwrap_or_else(|p| p.into_inner()).get(&fingerprint) {
            if *g == generation && now < *until {
                self.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
                self.counters.verified.fetch_add(1, Ordering::Relaxed);
                return Ok(origin.clone());
            }
        }
        let policy = self.trust_policy();
        let expected = Expected {
            instance: subject.instance.as_str().to_string(),
            digest_function: subject.digest_function,
            action_digest: subject.action.to_proto(),
        };
        let envelopes: Vec<&[u8]> = if envelope.is_empty() { vec![] } else { vec![envelope] };
        match verify_stored(&policy, &envelopes, canonical, &expected, now) {
            Ok(v) => {
                self.counters.verified.fetch_add(1, Ordering::Relaxed);
                let until = valid_until(&policy, &v);
                let mut origin = Origin::of(&v);
                let references =
                    verify_references(&policy, &entry.references_envelope, &expected, &v, &entry.referenced_blobs);
                origin.references_signed = match references {
                    Ok(()) => true,
                    // Data written before the list was signed.
                    Err(Reason::Unsigned) if entry.references_envelope.is_empty() => false,
                    Err(reason) => {
                        tracing::warn!(action = %subject.action, instance = %subject.instance, reason = reason.as_str(),
                            "the stored list of referenced blobs does not verify; deriving it from the signed result");
                        false
                    }
                };
                let origin = Arc::new(origin);
                let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                if cache.len() >= VERIFIED_CACHE_MAX {
                    cache.clear();
                }
                if self.generation.load(Ordering::Acquire) == generation {
                    cache.insert(fingerprint, (generation, until, origin.clone()));
                }
                Ok(origin)
            }
            Err(reason) => {
                self.counters.record_failure(reason);
                Err(reason)
            }
        }
    }
}

/// How long a successful verification stays valid as time passes: until the
/// entry becomes older than `max_age` (other checks do not depend on "now").
fn valid_until(policy: &TrustPolicy, v: &Verified) -> SystemTime {
    let far = SystemTime::now() + Duration::from_secs(3600);
    match policy.max_age {
        Some(age) => (v.signed_at + age).min(far),
        None => far,
    }
}

fn load_key(path: &std::path::Path) -> std::result::Result<Arc<SigningKey>, String> {
    SigningKey::load(path).map(Arc::new).map_err(|e| e.to_string())
}

impl Reload for Provenance {
    fn reload_now(&self, force: bool) {
        self.reload(force);
    }
}

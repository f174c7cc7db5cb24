//! The authorization policy and the gates that enforce it.
//!
//! A policy is a list of rules; a rule grants permissions to principals on
//! instances. Anything no rule grants is denied. The file format (TOML):
//!
//! ```toml
//! [[rules]]
//! name = "ci-writers"
//! principals = ["spiffe://provcache.dev/ci/*"]   # exact, or a trailing-* prefix
//! instances = ["", "dev/*"]                       # "" default instance, "*" any, "dev/*" under dev/
//! permissions = ["ac:read", "ac:write", "cas:read", "cas:write"]
//! ```
//!
//! [`MtlsGate`] authenticates a call from its verified client certificate
//! (identity, expiry and revocation re-checked on every call) and then asks
//! the policy; [`PlaintextGate`] serves an explicitly configured plaintext
//! listener under one fixed principal, still through the policy.
//!
//! A policy loaded from a file follows that file: both gates re-read it when
//! it changes or on SIGHUP, and a file that does not load keeps the last good
//! policy ([`crate::access::reload`]). Calls already authorized are not
//! re-checked; every new call sees the new policy.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::access::gate::{Caller, Gate, Peer, Permission};
use crate::access::identity::{identify, Identity, IdentityMode};
use crate::access::proxy::TrustedProxies;
use crate::access::reload::{self, Source, Stamp, Watched};
use crate::access::tls::ClientVerifier;
use crate::cache::resource::InstanceName;
use crate::clock::{system_clock, Clock};
use crate::error::Error;

/// A principal or instance pattern: exact, `*` (anything) or `prefix*`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(s: &str) -> Result<Self, &'static str> {
        match s.strip_suffix('*') {
            Some(prefix) if prefix.contains('*') => Err("'*' is only allowed at the end"),
            Some(prefix) => Ok(Pattern::Prefix(prefix.to_owned())),
            None if s.contains('*') => Err("'*' is only allowed at the end"),
            None => Ok(Pattern::Exact(s.to_owned())),
        }
    }

    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Exact(e) => e == s,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
        }
    }
}

/// One validated policy rule.
#[derive(Clone, Debug)]
struct Rule {
    name: String,
    principals: Vec<Pattern>,
    instances: Vec<Pattern>,
    permissions: Vec<Permission>,
}

/// An authorization policy: default deny, first granting rule wins.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The file it was loaded from, and that file's stamp before the read.
    origin: Option<(PathBuf, Stamp)>,
}

/// A refused authorization: names the principal, the instance and the
/// missing permission (`PERMISSION_DENIED`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{principal:?} lacks permission {permission} on {}", describe_instance(instance))]
pub struct Denied {
    /// Who asked.
    pub principal: String,
    /// The instance name (`""` is the default instance).
    pub instance: String,
    /// The permission no rule grants.
    pub permission: Permission,
}

fn describe_instance(instance: &str) -> String {
    if instance.is_empty() {
        "the default instance \"\"".to_owned()
    } else {
        format!("instance {instance:?}")
    }
}

/// Why a policy file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AccessPolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or missing key (the message
    /// names the key and its position).
    #[error("invalid policy{}: {message}", at(path))]
    Syntax {
        /// The file, when loaded from one.
        path: Option<String>,
        /// The parser's message.
        message: String,
    },
    /// A rule has a bad value.
    #[error("invalid policy{}: rule {rule:?}: {key}: {why}", at(path))]
    Rule {
        /// The file, when loaded from one.
        path: Option<String>,
        /// The rule's name (or its position).
        rule: String,
        /// The key with the bad value.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
}

fn at(path: &Option<String>) -> String {
    path.as_ref().map(|p| format!(" in {p}")).unwrap_or_default()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rules: Vec<RuleFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    principals: Vec<String>,
    instances: Vec<String>,
    permissions: Vec<String>,
}

impl Policy {
    /// Loads and validates a policy file.
    /// The policy remembers the file, so that a gate follows it.
    pub fn load(path: &Path) -> Result<Self, AccessPolicyError> {
        let stamp = reload::stamp(&[path.to_owned()]);
        let text = std::fs::read_to_string(path)
            .map_err(|source| AccessPolicyError::Read { path: path.display().to_string(), source })?;
        let policy = Self::parse_inner(&text, Some(path.display().to_string()))?;
        Ok(Policy { origin: Some((path.to_owned(), stamp)), ..policy })
    }

    /// Parses and validates a policy from TOML text.
    pub fn parse(text: &str) -> Result<Self, AccessPolicyError> {
        Self::parse_inner(text, None)
    }

    /// One rule, `name`, granting every permission on every instance to
    /// `principal` (a pattern, as in a file): the policy of a plaintext
    /// listener configured without one. Validated like a file's rule.
    pub fn grant_all(name: &str, principal: &str) -> Result<Self, AccessPolicyError> {
        let rule = RuleFile {
            name: name.to_owned(),
            principals: vec![principal.to_owned()],
            instances: vec!["*".to_owned()],
            permissions: Permission::ALL.iter().map(|p| p.as_str().to_owned()).collect(),
        };
        Self::validate(PolicyFile { rules: vec![rule] }, None)
    }

    fn parse_inner(text: &str, path: Option<String>) -> Result<Self, AccessPolicyError> {
        let file: PolicyFile = toml::from_str(text)
            .map_err(|e| AccessPolicyError::Syntax { path: path.clone(), message: e.to_string().trim().to_owned() })?;
        Self::validate(file, path)
    }

    fn validate(file: PolicyFile, path: Option<String>) -> Result<Self, AccessPolicyError> {
        let mut rules = Vec::with_capacity(file.rules.len());
        for (i, r) in file.rules.into_iter().enumerate() {
            let rule_err = |rule: &str, key, why: String| AccessPolicyError::Rule {
                path: path.clone(),
                rule: if rule.is_empty() { format!("#{}", i + 1) } else { rule.to_owned() },
                key,
                why,
            };
            if r.name.trim().is_empty() {
                return Err(rule_err("", "name", "must not be empty".into()));
            }
            if rules.iter().any(|x: &Rule| x.name == r.name) {
                return Err(rule_err(&r.name, "name", "duplicate rule name".into()));
            }
            let list = |key, values: Vec<String>, instance: bool| -> Result<Vec<Pattern>, AccessPolicyError> {
                if values.is_empty() {
                    return Err(rule_err(&r.name, key, "must not be empty".into()));
                }
                values
                    .iter()
                    .map(|v| {
                        let p = Pattern::parse(v).map_err(|why| rule_err(&r.name, key, format!("{v:?}: {why}")))?;
                        if instance {
                            if let Pattern::Exact(e) = &p {
                                InstanceName::parse(e).map_err(|e| rule_err(&r.name, key, e.to_string()))?;
                            }
                        } else if matches!(&p, Pattern::Exact(e) if e.is_empty()) {
                            return Err(rule_err(&r.name, key, "empty principal".into()));
                        }
                        Ok(p)
                    })
                    .collect()
            };
            let principals = list("principals", r.principals, false)?;
            let instances = list("instances", r.instances, true)?;
            if r.permissions.is_empty() {
                return Err(rule_err(&r.name, "permissions", "must not be empty".into()));
            }
            let permissions = r
                .permissions
                .iter()
                .map(|p| {
                    Permission::parse(p).ok_or_else(|| {
                        let known: Vec<&str> = Permission::ALL.iter().map(|p| p.as_str()).collect();
                        rule_err(
                            &r.name,
                            "permissions",
                            format!("unknown permission {p:?} (known: {})", known.join(", ")),
                        )
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule { name: r.name, principals, instances, permissions });
        }
        Ok(Policy { rules, origin: None })
    }

    /// The name of the first rule granting `permission` on `instance` to
    /// `principal`; otherwise [`Denied`].
    pub fn check(&self, principal: &str, instance: &InstanceName, permission: Permission) -> Result<&str, Denied> {
        self.rules
            .iter()
            .find(|r| {
                r.permissions.contains(&permission)
                    && r.principals.iter().any(|p| p.matches(principal))
                    && r.instances.iter().any(|p| p.matches(instance.as_str()))
            })
            .map(|r| r.name.as_str())
            .ok_or_else(|| Denied {
                principal: principal.to_owned(),
                instance: instance.as_str().to_owned(),
                permission,
            })
    }

    /// The name of the first rule granting `permission` to `principal` on
    /// any instance at all; otherwise [`Denied`] (naming the instance `*`).
    pub fn check_anywhere(&self, principal: &str, permission: Permission) -> Result<&str, Denied> {
        self.rules
            .iter()
            .find(|r| r.permissions.contains(&permission) && r.principals.iter().any(|p| p.matches(principal)))
            .map(|r| r.name.as_str())
            .ok_or_else(|| Denied { principal: principal.to_owned(), instance: "*".to_owned(), permission })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the policy has no rules (denies everything).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// The authorization policy file (`--authz-policy`), as a reloadable source.
#[derive(Debug)]
pub struct AuthzPolicyFile(pub PathBuf);

impl Source for AuthzPolicyFile {
    type Value = Policy;
    type Error = AccessPolicyError;
    const WHAT: &'static str = "authz_policy";

    fn paths(&self) -> Vec<PathBuf> {
        vec![self.0.clone()]
    }

    fn load(&self) -> Result<Policy, AccessPolicyError> {
        Policy::load(&self.0)
    }
}

/// The policy a gate asks: fixed (parsed from text), or following its file.
#[derive(Debug)]
enum HeldPolicy {
    Fixed(Arc<Policy>),
    File(Arc<Watched<AuthzPolicyFile>>),
}

impl HeldPolicy {
    /// Follows the policy's file, if it came from one, polling it and
    /// reloading it on SIGHUP.
    fn follow(policy: Arc<Policy>) -> Self {
        match policy.origin.clone() {
            Some((path, stamp)) => {
                let watched = Watched::with_value(AuthzPolicyFile(path), (*policy).clone(), stamp);
                reload::spawn_poller(&watched, reload::DEFAULT_POLL_INTERVAL);
                HeldPolicy::File(watched)
            }
            None => HeldPolicy::Fixed(policy),
        }
    }

    fn get(&self) -> Arc<Policy> {
        match self {
            HeldPolicy::Fixed(p) => p.clone(),
            HeldPolicy::File(w) => w.get(),
        }
    }

    fn file(&self) -> Option<&Arc<Watched<AuthzPolicyFile>>> {
        match self {
            HeldPolicy::Fixed(_) => None,
            HeldPolicy::File(w) => Some(w),
        }
    }

    /// `principal` checked against the policy in force (`anywhere`: on any
    /// instance, else on `instance`): the granting rule's name.
    fn check(&self, principal: &str, instance: Option<&InstanceName>, permission: Permission) -> Result<String, Error> {
        let policy = self.get();
        let rule = match instance {
            Some(instance) => policy.check(principal, instance, permission),
            None => policy.check_anywhere(principal, permission),
        };
        rule.map(str::to_owned).map_err(denied)
    }
}

/// How long a chain's revocation verdict is reused while the CRLs are
/// unchanged (a CRL reload invalidates it at once).
const RECHECK_AFTER: Duration = Duration::from_secs(60);
/// Bound on the per-leaf cache; it is cleared when full.
const CACHE_CAPACITY: usize = 4096;

struct CacheEntry {
    identity: Result<Identity, String>,
    /// CRL generation and time of the last chain check, and its verdict.
    checked: Option<(u64, SystemTime, Result<(), String>)>,
}

/// The gate for mutual-TLS listeners.
pub struct MtlsGate {
    policy: HeldPolicy,
    mode: IdentityMode,
    verifier: Arc<ClientVerifier>,
    clock: Clock,
    cache: Mutex<HashMap<[u8; 32], CacheEntry>>,
    proxies: TrustedProxies,
}

impl fmt::Debug for MtlsGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MtlsGate")
            .field("mode", &self.mode)
            .field("rules", &self.policy.get().len())
            .finish_non_exhaustive()
    }
}

impl MtlsGate {
    /// A gate over `policy` (followed if loaded from a file) that names
    /// callers with `mode` and re-checks revocation with the TLS layer's
    /// `verifier`.
    pub fn new(policy: Arc<Policy>, mode: IdentityMode, verifier: Arc<ClientVerifier>) -> Self {
        let policy = HeldPolicy::follow(policy);
        let cache = Mutex::new(HashMap::new());
        MtlsGate { policy, mode, verifier, clock: system_clock(), cache, proxies: TrustedProxies::default() }
    }

    /// Takes the caller's identity from the `x-forwarded-client-cert`
    /// header of calls made by these proxies (`access::proxy`).
    pub fn with_trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.proxies = proxies;
        self
    }

    /// The policy file this gate follows, if its policy came from one (to
    /// point it at another file).
    pub fn policy_file(&self) -> Option<&Arc<Watched<AuthzPolicyFile>>> {
        self.policy.file()
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Establishes who is calling: identity from the leaf, expiry and
    /// revocation re-checked now. Every failure is `UNAUTHENTICATED`.
    pub fn authenticate(&self, peer: &Peer) -> Result<Identity, Error> {
        let chain = match peer.certs.as_deref() {
            Some(chain) if !chain.is_empty() => chain,
            _ => return Err(Error::Unauthenticated("no client certificate".into())),
        };
        let leaf_hash: [u8; 32] = Sha256::digest(chain[0].as_ref()).into();
        let now = (self.clock)();

        let (identity, checked) = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if !cache.contains_key(&leaf_hash) && cache.len() >= CACHE_CAPACITY {
                cache.clear();
            }
            let entry = cache.entry(leaf_hash).or_insert_with(|| CacheEntry {
                identity: identify(&chain[0], &self.mode).map_err(|e| e.to_string()),
                checked: None,
            });
            (entry.identity.clone(), entry.checked.clone())
        };
        let identity = identity.map_err(Error::Unauthenticated)?;

        if identity.cert.not_after < now {
            return Err(Error::Unauthenticated(format!(
                "client certificate expired at {} ({:?})",
                humantime::format_rfc3339_seconds(identity.cert.not_after),
                identity.principal
            )));
        }

        let generation = self.verifier.generation();
        let verdict = match checked {
            Some((g, at, verdict)) if g == generation && now.duration_since(at).is_ok_and(|d| d < RECHECK_AFTER) => {
                verdict
            }
            _ => {
                let verdict = self.verifier.check_chain(chain, now).map_err(|e| e.to_string());
                let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = cache.get_mut(&leaf_hash) {
                    entry.checked = Some((generation, now, verdict.clone()));
                }
                verdict
            }
        };
        if let Err(why) = verdict {
            return Err(Error::Unauthenticated(format!(
                "client certificate of {:?} is not accepted: {why}",
                identity.principal
            )));
        }
        Ok(identity)
    }
}

impl Gate for MtlsGate {
    fn authorize(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> Result<Caller, Error> {
        let who = self.proxies.principal(self.authenticate(peer)?, peer, &self.mode)?;
        crate::access::gate::record_principal(&who.name);
        let rule = self.policy.check(&who.name, Some(instance), permission)?;
        Ok(Caller { rule, principal: who.name, cert: who.cert })
    }

    fn authorize_anywhere(&self, peer: &Peer, permission: Permission) -> Result<Caller, Error> {
        let who = self.proxies.principal(self.authenticate(peer)?, peer, &self.mode)?;
        crate::access::gate::record_principal(&who.name);
        let rule = self.policy.check(&who.name, None, permission)?;
        Ok(Caller { rule, principal: who.name, cert: who.cert })
    }
}

fn denied(d: Denied) -> Error {
    Error::PermissionDenied(d.to_string())
}

/// The gate for an explicitly configured plaintext listener: every caller is
/// the one configured principal, and the policy still decides.
#[derive(Debug)]
pub struct PlaintextGate {
    policy: HeldPolicy,
    principal: String,
}

impl PlaintextGate {
    /// A gate naming every caller `principal`, over `policy` (followed if
    /// loaded from a file).
    pub fn new(policy: Arc<Policy>, principal: impl Into<String>) -> Self {
        PlaintextGate { policy: HeldPolicy::follow(policy), principal: principal.into() }
    }

    /// The policy file this gate follows, if its policy came from one.
    pub fn policy_file(&self) -> Option<&Arc<Watched<AuthzPolicyFile>>> {
        self.policy.file()
    }
}

impl Gate for PlaintextGate {
    fn authorize(&self, _: &Peer, instance: &InstanceName, permission: Permission) -> Result<Caller, Error> {
        crate::access::gate::record_principal(&self.principal);
        let rule = self.policy.check(&self.principal, Some(instance), permission)?;
        Ok(Caller { principal: self.principal.clone(), rule, cert: None })
    }

    fn authorize_anywhere(&self, _: &Peer, permission: Permission) -> Result<Caller, Error> {
        crate::access::gate::record_principal(&self.principal);
        let rule = self.policy.check(&self.principal, None, permission)?;
        Ok(Caller { principal: self.principal.clone(), rule, cert: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = r#"
        [[rules]]
        name = "writers"
        principals = ["spiffe://provcache.dev/writer"]
        instances = ["*"]
        permissions = ["ac:read", "ac:write", "cas:read", "cas:write"]

        [[rules]]
        name = "dev-ci"
        principals = ["spiffe://provcache.dev/ci/*"]
        instances = ["dev/*"]
        permissions = ["ac:write", "cas:write"]

        [[rules]]
        name = "readers"
        principals = ["spiffe://provcache.dev/*"]
        instances = ["", "main"]
        permissions = ["ac:read", "cas:read"]
    "#;

    fn inst(s: &str) -> InstanceName {
        InstanceName::parse(s).unwrap()
    }

    #[test]
    fn empty_policy_denies_everything() {
        let p = Policy::parse("").unwrap();
        assert!(p.is_empty());
        for perm in Permission::ALL {
            assert!(p.check("spiffe://provcache.dev/writer", &inst(""), perm).is_err());
        }
    }

    #[test]
    fn rules_grant_by_principal_instance_and_permission() {
        let p = Policy::parse(POLICY).unwrap();
        let w = "spiffe://provcache.dev/writer";
        assert_eq!(p.check(w, &inst(""), Permission::AcWrite), Ok("writers"));
        assert_eq!(p.check(w, &inst("any/thing"), Permission::CasWrite), Ok("writers"));
        assert!(p.check(w, &inst(""), Permission::AuditRead).is_err());

        let ci = "spiffe://provcache.dev/ci/linux";
        assert_eq!(p.check(ci, &inst("dev/x"), Permission::AcWrite), Ok("dev-ci"));
        assert_eq!(p.check(ci, &inst("dev/x/y"), Permission::CasWrite), Ok("dev-ci"));
        // T9: a writer allowed only dev/* is denied on main (and on "dev" itself).
        assert!(p.check(ci, &inst("main"), Permission::AcWrite).is_err());
        assert!(p.check(ci, &inst("dev"), Permission::AcWrite).is_err());
        assert!(p.check(ci, &inst("devil"), Permission::AcWrite).is_err());
        assert_eq!(p.check(ci, &inst("main"), Permission::AcRead), Ok("readers"));

        let r = "spiffe://provcache.dev/reader";
        assert_eq!(p.check(r, &inst(""), Permission::AcRead), Ok("readers"));
        assert!(p.check(r, &inst(""), Permission::AcWrite).is_err());
        assert!(p.check(r, &inst("dev/x"), Permission::AcRead).is_err());
        // Another trust domain is not matched by the provcache.dev prefix.
        assert!(p.check("spiffe://other.dev/reader", &inst(""), Permission::AcRead).is_err());
    }

    #[test]
    fn denial_names_principal_instance_and_permission() {
        let p = Policy::parse(POLICY).unwrap();
        let d = p.check("spiffe://provcache.dev/reader", &inst(""), Permission::AcWrite).unwrap_err();
        let msg = d.to_string();
        assert!(msg.contains("spiffe://provcache.dev/reader"), "{msg}");
        assert!(msg.contains("ac:write"), "{msg}");
        assert!(msg.contains("default instance"), "{msg}");
        let d = p.check("spiffe://provcache.dev/reader", &inst("dev/x"), Permission::CasRead).unwrap_err();
        assert!(d.to_string().contains("\"dev/x\"") && d.to_string().contains("cas:read"), "{d}");
    }

    #[test]
    fn errors_name_the_bad_key() {
        let cases = [
            ("[[rules]]\nname='a'\nprincipal=['x']\ninstances=['*']\npermissions=['ac:read']", "principal"),
            ("[[rules]]\nname='a'\nprincipals=['x']\ninstances=['*']\npermissions=['ac:delete']", "ac:delete"),
            ("[[rules]]\nname='a'\nprincipals=['x']\ninstances=['*']\npermissions=[]", "permissions"),
            ("[[rules]]\nname='a'\nprincipals=['x*y']\ninstances=['*']\npermissions=['ac:read']", "principals"),
            ("[[rules]]\nname='a'\nprincipals=['x']\ninstances=['blobs']\npermissions=['ac:read']", "instances"),
            ("[[rules]]\nname='a'\nprincipals=['x']\npermissions=['ac:read']", "instances"),
            ("[[rule]]\nname='a'", "rule"),
            ("[[rules]]\nname='a'\nprincipals=['x']\ninstances=['*']\npermissions=['ac:read']\n[[rules]]\nname='a'\nprincipals=['x']\ninstances=['*']\npermissions=['ac:read']", "duplicate"),
        ];
        for (text, needle) in cases {
            let err = Policy::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
    }

    #[test]
    fn load_from_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, POLICY).unwrap();
        assert_eq!(Policy::load(&path).unwrap().len(), 3);
        std::fs::write(&path, "[[rules]]\nname = 1").unwrap();
        let err = Policy::load(&path).unwrap_err().to_string();
        assert!(err.contains("policy.toml"), "{err}");
        assert!(Policy::load(&dir.path().join("missing.toml")).is_err());
    }

    #[test]
    fn plaintext_gate_is_policy_checked() {
        let p = Arc::new(Policy::parse(POLICY).unwrap());
        let gate = PlaintextGate::new(p, "spiffe://provcache.dev/reader");
        let peer = Peer::default();
        let caller = gate.authorize(&peer, &inst(""), Permission::AcRead).unwrap();
        assert_eq!(caller.rule, "readers");
        assert_eq!(caller.cert, None);
        let err = gate.authorize(&peer, &inst(""), Permission::AcWrite).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
}

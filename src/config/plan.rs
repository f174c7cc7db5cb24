//! The validated plan of `provcache serve`: what complete [`Settings`] mean,
//! decided in one place for `serve` and `serve --check-config` alike.
//!
//! [`Plan::new`] makes the decisions (plaintext or mutual TLS, own or
//! development PKI, which policy, which identity mode, where the signing key
//! comes from), loading what both commands load (the authorization policy,
//! an own PKI's TLS files, an own signing key and trust policy) and refusing
//! settings that cannot work, such as a signing key its trust policy does not
//! hold as active or a data directory that cannot be written. It creates
//! nothing: the development PKI and signing key are written by `serve` when
//! it starts. [`Plan::check`] describes what `serve` would create or use.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::access::{mtls, plaintext, OPEN_PLAINTEXT_WARNING};
use super::checks::{own_signing, writable_data_dir};
use super::{Settings, StorageConfig, VerifyModeArg};
use crate::access::identity::IdentityMode;
use crate::access::policy::Policy;
use crate::access::proxy::TrustedProxies;
use crate::access::tls::TlsServer;
use crate::limits::Limits;
use crate::provenance::{Mode, ProvenanceConfig};
use crate::server::ServerOptions;
use crate::store::object::client::ObjectStoreSettings;
use crate::store::rocks::StoreOptions;

/// The refusal of an own TLS PKI without signing files: the development key
/// and its hot-reloaded trust policy would live in the data directory, where
/// whoever can write it could add a key and have forged entries served as
/// verified.
const OWN_PKI_NEEDS_SIGNING: &str = "with your own TLS PKI (--tls-cert, --tls-key, --client-ca), \
     signing_key (--signing-key) and trust_policy (--trust-policy) are required: the development signing key \
     and trust policy are for the development PKI only; create a key with `provcache keygen --out FILE \
     --state active` and put the entry it prints in the trust policy file (docs/signing.md)";

/// Everything `serve` starts from, validated, so that `serve` and
/// `--check-config` cannot disagree about what a configuration means.
#[derive(Debug)]
pub struct Plan {
    /// The gRPC listener's address.
    pub listen: SocketAddr,
    /// The metrics endpoint's address; `None` turns metrics off.
    pub metrics_listen: Option<SocketAddr>,
    /// Who may connect and what they may do.
    pub access: Access,
    /// How Action Cache entries are signed and verified.
    pub provenance: ProvenancePlan,
    /// Where and how data is kept.
    pub storage: Storage,
    /// What one caller may cost.
    pub limits: Limits,
    /// How long earlier statements and the hit log are kept for audits.
    pub history_retention: Duration,
    /// How long calls in flight may take to complete after shutdown begins.
    pub shutdown_timeout: Duration,
    /// Log every finished call (target `provcache::access`).
    pub access_log: bool,
}

/// How callers connect and are authorized.
#[derive(Debug)]
pub enum Access {
    /// Plaintext gRPC behind a trusted proxy: every caller is `principal`,
    /// checked against `policy`.
    Plaintext {
        /// The one principal of every call.
        principal: String,
        /// The configured policy, or one granting `principal` everything.
        policy: Policy,
        /// No policy was named: every caller may read and write (allowed
        /// on a loopback address only, with a warning at start).
        grants_all: bool,
    },
    /// Mutual TLS: the principal comes from the client certificate.
    Mtls {
        /// Whose certificates and which policy.
        pki: Pki,
        /// Where in the certificate the principal is.
        identity: IdentityMode,
        /// Whose forwarded client certificate header names the caller.
        proxies: TrustedProxies,
    },
}

/// The certificates of a mutual-TLS server, with the policy that goes with them.
#[derive(Debug)]
pub enum Pki {
    /// The operator's certificates, loaded and checked.
    Own {
        /// The server configuration and client verifier.
        tls: TlsServer,
        /// The configured authorization policy (required with an own PKI).
        policy: Policy,
    },
    /// The development PKI in `dir`, created by `serve` when missing.
    Development {
        /// Where the PKI lives (`DATA_DIR/dev-pki`).
        dir: PathBuf,
        /// CRL files or directories to check client certificates against.
        crls: Vec<PathBuf>,
        /// How often the CRLs are checked for changes.
        crl_reload_interval: Duration,
        /// The configured policy, or the development PKI's `policy.toml`
        /// when it exists already; `None`: that file, once `serve` writes it.
        policy: Option<Policy>,
    },
}

/// How Action Cache entries are signed and verified.
#[derive(Debug)]
pub struct ProvenancePlan {
    /// Where the signing key and the trust policy come from.
    pub signing: Signing,
    /// What a read does with an entry that fails verification.
    pub mode: Mode,
    /// This server's id, recorded in every signed statement.
    pub server_id: String,
    /// Reads skip verification (measurements only).
    pub verification_disabled: bool,
    /// Writes store entries unsigned (measurements only).
    pub signing_disabled: bool,
}

/// Where the signing key and the trust policy come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    /// The operator's files, loaded and checked: the key is an active key
    /// of the trust policy (unless signing is off).
    Own {
        /// The ed25519 signing key.
        key: PathBuf,
        /// The trust policy.
        trust_policy: PathBuf,
        /// The signing key's id, for `--check-config` to print.
        key_id: String,
    },
    /// The development key and trust policy in `dir`, created by `serve`
    /// when missing.
    Development {
        /// Where they live (`DATA_DIR/dev-pki`).
        dir: PathBuf,
    },
}

/// Where and how data is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Storage {
    /// The data directory.
    pub data_dir: PathBuf,
    /// fsync every commit.
    pub sync: bool,
    /// Bound on stored bytes; `None`: unbounded.
    pub max_size: Option<u64>,
    /// Memory for the block cache, in bytes.
    pub block_cache_bytes: usize,
    /// The shared object store (`store = "s3://..."` and `[storage]`);
    /// `None`: the data directory is the only store, as before replicas.
    pub object_store: Option<ObjectStoreSettings>,
}

impl Plan {
    /// Decides what `settings` mean and loads what both `serve` and
    /// `--check-config` load; refuses settings that cannot work. Creates nothing.
    pub fn new(settings: &Settings) -> anyhow::Result<Plan> {
        let s = settings;
        let dev_dir = s.data_dir.join("dev-pki");
        let access = if s.plaintext_insecure { plaintext(s)? } else { mtls(s, &dev_dir)? };
        let signing = match (&s.signing_key, &s.trust_policy) {
            (Some(key), Some(trust_policy)) => Signing::Own {
                key_id: own_signing(key, trust_policy, s.unsafe_no_sign)?,
                key: key.clone(),
                trust_policy: trust_policy.clone(),
            },
            _ if matches!(access, Access::Mtls { pki: Pki::Own { .. }, .. }) => anyhow::bail!(OWN_PKI_NEEDS_SIGNING),
            _ => Signing::Development { dir: dev_dir },
        };
        writable_data_dir(&s.data_dir)?;
        let object_store = s.store.as_deref().map(|url| object_store(url, &s.storage)).transpose()?;
        Ok(Plan {
            listen: s.listen,
            metrics_listen: s.metrics_listen,
            access,
            provenance: ProvenancePlan {
                signing,
                mode: match s.verify_mode {
                    VerifyModeArg::Reject => Mode::Reject,
                    VerifyModeArg::Flag => Mode::Flag,
                },
                server_id: s.server_id.clone(),
                verification_disabled: s.unsafe_no_verify,
                signing_disabled: s.unsafe_no_sign,
            },
            storage: Storage {
                data_dir: s.data_dir.clone(),
                sync: !s.unsafe_no_sync,
                max_size: s.max_size,
                block_cache_bytes: usize::try_from(s.block_cache).unwrap_or(usize::MAX),
                object_store,
            },
            limits: s.limits.clone(),
            history_retention: s.history_retention,
            shutdown_timeout: s.shutdown_timeout,
            access_log: s.access_log,
        })
    }

    /// The notes `--check-config` prints about what `serve` would create or
    /// use. Every refusal is [`Plan::new`]'s, so that `serve` makes it too.
    pub fn check(&self) -> anyhow::Result<Vec<String>> {
        let mut notes = Vec::new();
        if let Access::Mtls { pki: Pki::Development { dir, policy: None, .. }, .. } = &self.access {
            notes.push(format!("the development PKI will be created in {}", dir.display()));
        }
        match &self.provenance.signing {
            Signing::Own { key_id, .. } => notes.push(format!("signing key id {key_id}")),
            Signing::Development { dir } => {
                notes.push(format!("the development signing key and trust policy in {}", dir.display()))
            }
        }
        if let Some(o) = &self.storage.object_store {
            notes.push(format!("object store {} (checked when serve starts)", o.describe()));
        }
        Ok(notes)
    }

    /// The warnings `serve` logs at start (and `--check-config` prints)
    /// for settings that weaken access control or provenance.
    pub fn warnings(&self) -> Vec<&'static str> {
        let p = &self.provenance;
        let open = matches!(self.access, Access::Plaintext { grants_all: true, .. });
        [
            (open, OPEN_PLAINTEXT_WARNING),
            (p.signing_disabled, "signing of Action Cache entries is OFF (--unsafe-no-sign): for measurements only"),
            (
                p.verification_disabled,
                "verification of Action Cache reads is OFF (--unsafe-no-verify): for measurements only",
            ),
            (
                p.mode == Mode::Flag,
                "flag mode: results that fail verification are SERVED, marked with a VerificationStatus",
            ),
        ]
        .into_iter()
        .filter_map(|(on, warning)| on.then_some(warning))
        .collect()
    }

    /// The server's options, given the signing key and trust policy files
    /// (the development ones exist only once `serve` created them).
    pub fn server_options(&self, signing_key: PathBuf, trust_policy: PathBuf) -> ServerOptions {
        let p = &self.provenance;
        ServerOptions {
            data_dir: self.storage.data_dir.clone(),
            store: StoreOptions {
                sync: self.storage.sync,
                max_size: self.storage.max_size,
                block_cache_bytes: self.storage.block_cache_bytes,
                ..Default::default()
            },
            provenance: ProvenanceConfig {
                signing_key,
                trust_policy,
                mode: p.mode,
                server_id: p.server_id.clone(),
                verification_disabled: p.verification_disabled,
                signing_disabled: p.signing_disabled,
            },
            history_retention: self.history_retention,
            metrics: self.metrics_listen.is_some(),
            access_log: self.access_log,
            shutdown_timeout: self.shutdown_timeout,
            limits: self.limits.clone(),
            object_store: self.storage.object_store.clone(),
        }
    }
}

/// The object store's settings: the URL, then each `[storage]` setting
/// given over its default; timeouts must be positive.
fn object_store(url: &str, c: &StorageConfig) -> anyhow::Result<ObjectStoreSettings> {
    let mut o = ObjectStoreSettings::parse(url)?;
    if let Some(endpoint) = &c.endpoint {
        o = o.with_endpoint(endpoint)?;
    }
    o.region.clone_from(&c.region);
    o.path_style = c.path_style;
    for (setting, value) in [
        (&mut o.connect_timeout, c.connect_timeout),
        (&mut o.request_timeout, c.request_timeout),
        (&mut o.retry_backoff, c.retry_backoff),
        (&mut o.ac_ttl, c.ac_ttl),
        (&mut o.existence_ttl, c.existence_ttl),
        (&mut o.refresh_age, c.refresh_age),
    ] {
        *setting = value.unwrap_or(*setting);
    }
    o.max_retries = c.max_retries.unwrap_or(o.max_retries);
    if o.connect_timeout.is_zero() || o.request_timeout.is_zero() {
        anyhow::bail!("[storage] connect_timeout and request_timeout must be more than 0s");
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::access::gate::Permission;
    use crate::access::pki::DEV_TRUST_DOMAIN;
    use crate::cache::resource::InstanceName;
    use crate::config::access::PLAINTEXT_RULE;
    use crate::config::IdentityArg;
    use crate::config::{resolve, ServeConfig};

    fn settings(c: ServeConfig) -> Settings {
        resolve(c, None, None).unwrap()
    }

    fn in_dir(dir: &Path) -> ServeConfig {
        ServeConfig { data_dir: Some(dir.join("data")), ..Default::default() }
    }

    fn write_policy(dir: &Path, principal: &str) -> PathBuf {
        let path = dir.join("policy.toml");
        let text = format!(
            "[[rules]]\nname = \"r\"\nprincipals = [{principal:?}]\ninstances = [\"*\"]\npermissions = [\"ac:read\"]\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Certificates of an operator's own PKI (generated like the dev PKI, in another directory).
    fn own_pki(dir: &Path) -> ServeConfig {
        let pki = crate::access::pki::ensure_dev_pki(&dir.join("own-pki")).unwrap();
        let (key, trust) = crate::access::pki::ensure_dev_signing(&dir.join("own-keys")).unwrap();
        ServeConfig {
            tls_cert: Some(pki.server_cert),
            tls_key: Some(pki.server_key),
            client_ca: vec![pki.ca_cert],
            signing_key: Some(key),
            trust_policy: Some(trust),
            ..in_dir(dir)
        }
    }

    fn error(c: ServeConfig) -> String {
        format!("{:#}", Plan::new(&settings(c)).unwrap_err())
    }

    #[test]
    fn an_own_pki_without_a_policy_is_refused_naming_the_flag() {
        let tmp = tempfile::tempdir().unwrap();
        let msg = error(own_pki(tmp.path()));
        assert_eq!(msg, "authz_policy (--authz-policy) is required with your own PKI");
    }

    #[test]
    fn an_own_pki_without_signing_files_is_refused_naming_the_flags_and_keygen() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = write_policy(tmp.path(), "spiffe://example.org/ci");
        let c = ServeConfig { policy: Some(policy), trust_domain: vec!["example.org".into()], ..own_pki(tmp.path()) };
        let msg = error(ServeConfig { signing_key: None, trust_policy: None, ..c });
        assert_eq!(msg, OWN_PKI_NEEDS_SIGNING);
        assert!(msg.contains("--signing-key") && msg.contains("--trust-policy") && msg.contains("provcache keygen"));
    }

    #[test]
    fn an_own_pki_with_uri_san_needs_a_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = write_policy(tmp.path(), "spiffe://example.org/ci");
        let msg = error(ServeConfig { policy: Some(policy), ..own_pki(tmp.path()) });
        assert_eq!(msg, "identity uri-san needs at least one trust_domain (--trust-domain)");
    }

    #[test]
    fn an_own_pki_is_loaded_with_its_policy_and_trust_domains() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = write_policy(tmp.path(), "spiffe://example.org/ci");
        let c = ServeConfig { policy: Some(policy), trust_domain: vec!["example.org".into()], ..own_pki(tmp.path()) };
        let plan = Plan::new(&settings(c)).unwrap();
        let Access::Mtls { pki: Pki::Own { policy, .. }, identity, .. } = &plan.access else {
            panic!("not an own PKI: {:?}", plan.access)
        };
        assert_eq!(identity, &IdentityMode::spiffe(["example.org"]));
        assert!(policy.check("spiffe://example.org/ci", &InstanceName::default(), Permission::AcRead).is_ok());
    }

    #[test]
    fn other_identity_modes_need_no_trust_domain() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = write_policy(tmp.path(), "ci.example.org");
        let c = ServeConfig { policy: Some(policy), identity: Some(IdentityArg::DnsSan), ..own_pki(tmp.path()) };
        let plan = Plan::new(&settings(c)).unwrap();
        assert!(matches!(plan.access, Access::Mtls { identity: IdentityMode::DnsSan, .. }), "{:?}", plan.access);
    }

    #[test]
    fn the_development_pki_trusts_its_own_domain_and_is_not_created_by_planning() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan::new(&settings(in_dir(tmp.path()))).unwrap();
        let dev = tmp.path().join("data").join("dev-pki");
        let Access::Mtls { pki: Pki::Development { dir, policy: None, .. }, identity, .. } = &plan.access else {
            panic!("not the development PKI: {:?}", plan.access)
        };
        assert_eq!(dir, &dev);
        assert_eq!(identity, &IdentityMode::spiffe([DEV_TRUST_DOMAIN]));
        assert_eq!(plan.provenance.signing, Signing::Development { dir: dev.clone() });
        assert!(!tmp.path().join("data").exists(), "planning creates nothing");
        let notes = plan.check().unwrap();
        assert_eq!(
            notes,
            [
                format!("the development PKI will be created in {}", dev.display()),
                format!("the development signing key and trust policy in {}", dev.display()),
            ]
        );
    }

    #[test]
    fn configured_trust_domains_replace_the_development_one() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ServeConfig { trust_domain: vec!["example.org".into()], ..in_dir(tmp.path()) };
        let plan = Plan::new(&settings(c)).unwrap();
        assert!(
            matches!(&plan.access, Access::Mtls { identity, .. } if identity == &IdentityMode::spiffe(["example.org"])),
            "{:?}",
            plan.access
        );
    }

    #[test]
    fn plaintext_without_a_policy_grants_its_principal_everything_and_nobody_else_anything() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ServeConfig {
            plaintext_insecure: Some(true),
            plaintext_principal: Some("proxy".into()),
            ..in_dir(tmp.path())
        };
        let plan = Plan::new(&settings(c)).unwrap();
        let Access::Plaintext { principal, policy, grants_all: true } = &plan.access else {
            panic!("not open plaintext: {:?}", plan.access)
        };
        assert_eq!(principal, "proxy");
        let instance = InstanceName::parse("any/instance").unwrap();
        for permission in Permission::ALL {
            assert_eq!(policy.check("proxy", &instance, permission), Ok(PLAINTEXT_RULE));
            assert!(policy.check("someone-else", &instance, permission).is_err());
        }
    }

    #[test]
    fn plaintext_without_a_policy_is_refused_off_loopback_and_warned_about_on_it() {
        let tmp = tempfile::tempdir().unwrap();
        let open = |listen: &str| ServeConfig {
            plaintext_insecure: Some(true),
            listen: Some(listen.parse().unwrap()),
            ..in_dir(tmp.path())
        };
        let msg = error(open("0.0.0.0:8980"));
        assert!(msg.starts_with("plaintext_insecure (--plaintext-insecure) without authz_policy (--authz-policy)"));
        assert!(msg.contains("listen 0.0.0.0:8980, not a loopback address"), "{msg}");
        for loopback in ["127.0.0.1:8980", "[::1]:8980"] {
            let warnings = Plan::new(&settings(open(loopback))).unwrap().warnings();
            assert_eq!(warnings, [OPEN_PLAINTEXT_WARNING], "{loopback}");
        }
        let policy = write_policy(tmp.path(), "proxy");
        let plan = Plan::new(&settings(ServeConfig { policy: Some(policy), ..open("0.0.0.0:8980") })).unwrap();
        assert!(plan.warnings().is_empty(), "a named policy decides: {:?}", plan.warnings());
    }

    #[test]
    fn plaintext_with_a_policy_uses_it() {
        let tmp = tempfile::tempdir().unwrap();
        let policy = write_policy(tmp.path(), "proxy");
        let c = ServeConfig { plaintext_insecure: Some(true), policy: Some(policy), ..in_dir(tmp.path()) };
        let plan = Plan::new(&settings(c)).unwrap();
        let Access::Plaintext { policy, .. } = &plan.access else { panic!("not plaintext: {:?}", plan.access) };
        let instance = InstanceName::default();
        assert!(
            policy.check("plaintext", &instance, Permission::AcRead).is_err(),
            "the file replaces the grant-all rule"
        );
        assert!(policy.check("proxy", &instance, Permission::AcRead).is_ok());
        assert!(policy.check("proxy", &instance, Permission::AcWrite).is_err());
    }

    #[test]
    fn a_policy_that_does_not_load_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("missing.toml");
        let msg = error(ServeConfig { policy: Some(missing.clone()), ..in_dir(tmp.path()) });
        assert!(msg.starts_with(&format!("authorization policy {}", missing.display())), "{msg}");
    }

    #[test]
    fn without_a_store_the_data_directory_is_the_only_store() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan::new(&settings(in_dir(tmp.path()))).unwrap();
        assert_eq!(plan.storage.object_store, None);
        assert!(!plan.check().unwrap().iter().any(|n| n.contains("object store")));
    }

    #[test]
    fn a_store_takes_the_storage_table_over_the_defaults_and_check_config_describes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let file = ServeConfig::from_toml(
            "store = \"s3://build-cache/eu\"\n[storage]\nendpoint = \"http://127.0.0.1:8333\"\nregion = \"eu-1\"\n\
             ac_ttl = \"2s\"\nmax_retries = 1\n",
            "f",
        )
        .unwrap();
        let s = resolve(in_dir(tmp.path()), None, Some(file)).unwrap();
        let o = Plan::new(&s).unwrap().storage.object_store.unwrap();
        assert_eq!((o.bucket.as_str(), o.prefix.as_deref()), ("build-cache", Some("eu")));
        assert_eq!((o.endpoint.as_deref(), o.region.as_deref()), (Some("http://127.0.0.1:8333"), Some("eu-1")));
        assert_eq!((o.ac_ttl, o.max_retries), (Duration::from_secs(2), 1));
        assert_eq!(o.refresh_age, Duration::from_secs(86_400), "the default where the table says nothing");
        let notes = Plan::new(&s).unwrap().check().unwrap();
        let note = notes.iter().find(|n| n.starts_with("object store")).expect("a note on the object store");
        assert!(note.contains("s3://build-cache/eu at endpoint http://127.0.0.1:8333"), "{note}");
        assert!(note.contains("path-style") && note.contains("ac_ttl 2s"), "{note}");
    }

    #[test]
    fn bad_store_settings_are_refused_by_the_plan() {
        let tmp = tempfile::tempdir().unwrap();
        let with = |store: &str, table: &str| {
            let file = ServeConfig::from_toml(&format!("store = {store:?}\n[storage]\n{table}"), "f").unwrap();
            format!("{:#}", Plan::new(&resolve(in_dir(tmp.path()), None, Some(file)).unwrap()).unwrap_err())
        };
        assert!(with("s3://", "").contains("the bucket is missing"));
        assert!(with("gs://bucket", "").contains("expected s3://BUCKET"));
        assert!(with("s3://bucket", "endpoint = \"localhost:9000\"\n").contains("expected http://HOST"));
        assert!(with("s3://bucket", "request_timeout = \"0s\"\n").contains("more than 0s"));
        let file = ServeConfig::from_toml("[storage]\nregion = \"eu-1\"\n", "f").unwrap();
        let msg = resolve(in_dir(tmp.path()), None, Some(file)).unwrap_err().to_string();
        assert!(msg.contains("need store (--store s3://BUCKET/PREFIX)"), "{msg}");
    }

    #[test]
    fn warnings_name_each_weakened_check() {
        let tmp = tempfile::tempdir().unwrap();
        let plan = Plan::new(&settings(in_dir(tmp.path()))).unwrap();
        assert!(plan.warnings().is_empty());
        let c = ServeConfig {
            unsafe_no_sign: Some(true),
            unsafe_no_verify: Some(true),
            verify_mode: Some(VerifyModeArg::Flag),
            ..in_dir(tmp.path())
        };
        let warnings = Plan::new(&settings(c)).unwrap().warnings();
        assert_eq!(warnings.len(), 3);
        assert!(warnings[0].contains("--unsafe-no-sign") && warnings[1].contains("--unsafe-no-verify"));
        assert!(warnings[2].starts_with("flag mode"));
    }
}

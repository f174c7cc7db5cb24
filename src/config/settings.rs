//! The raw settings of `provcache serve`: one TOML file, environment
//! variables and flags layered into [`Settings`] (docs/configuration.md).
//!
//! [`ServeConfig`] is the partial form: every setting optional. clap fills
//! one from the flags and `PROVCACHE_<FLAG_NAME>` environment variables (a
//! flag wins over its variable), serde fills one from the file; [`resolve`]
//! layers them (flags and environment > file > defaults) and checks the
//! settings that go together, giving the complete [`Settings`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default size of RocksDB's block cache (`--block-cache`).
pub const DEFAULT_BLOCK_CACHE: u64 = 256 << 20;

/// Where the principal comes from in a client certificate.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityArg {
    /// Exactly one URI SAN, a SPIFFE ID in an accepted trust domain.
    UriSan,
    /// Exactly one DNS SAN.
    DnsSan,
    /// The subject common name (weak; only for CAs that cannot issue SANs).
    CommonName,
}

/// What to do with an Action Cache entry that fails verification.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyModeArg {
    /// A result that fails verification is a cache miss (NOT_FOUND).
    Reject,
    /// Serve it with a VerificationStatus attached (for migrations).
    Flag,
}

/// How log lines are written (to stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per event, with the request's span fields.
    Json,
}

/// Every `serve` setting, each optional: from flags and environment (clap)
/// or from the configuration file (serde). Field names are the file's keys;
/// flags are the same names in kebab case.
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Data directory: RocksDB in DIR/db; the development PKI and signing key
    /// in DIR/dev-pki (created on first run when no TLS or signing options are
    /// given). Default: provcache-data.
    #[arg(long, env = "PROVCACHE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on: IP:PORT, :PORT (every IPv4 interface) or
    /// localhost:PORT (port 0 picks a free port; the chosen address is
    /// printed). Default: 127.0.0.1:8980.
    #[arg(long, env = "PROVCACHE_LISTEN", value_parser = super::listen::parse_listen)]
    #[serde(default, deserialize_with = "super::listen::de_listen")]
    pub listen: Option<SocketAddr>,

    /// Server certificate chain (PEM). Without tls-cert/tls-key/client-ca the dev PKI is used.
    #[arg(long, env = "PROVCACHE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "PROVCACHE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that issue client certificates; repeatable
    /// (comma-separated in the environment variable).
    #[arg(long, env = "PROVCACHE_CLIENT_CA", value_delimiter = ',')]
    #[serde(default)]
    pub client_ca: Vec<PathBuf>,
    /// CRL files (PEM or DER) or directories of them; repeatable; reloaded when they change.
    #[arg(long, env = "PROVCACHE_CRL", value_delimiter = ',')]
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// How often the TLS files (server certificate and key, client CAs, CRLs)
    /// are checked for changes (0s: only on SIGHUP). Default: 2s.
    #[arg(long, env = "PROVCACHE_CRL_RELOAD_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub crl_reload_interval: Option<Duration>,
    /// Authorization policy (TOML): which principal may do what. Default: the
    /// dev PKI's policy.toml. Named `authz_policy` so it is never confused
    /// with the trust policy; `--policy`, `policy` and `PROVCACHE_POLICY` are
    /// the old spellings, still accepted.
    #[arg(long = "authz-policy", alias = "policy", env = "PROVCACHE_AUTHZ_POLICY")]
    #[serde(rename = "authz_policy", alias = "policy")]
    pub policy: Option<PathBuf>,
    /// `PROVCACHE_POLICY`, the old name of `PROVCACHE_AUTHZ_POLICY`: still
    /// read (below the new one) so an existing deployment keeps its policy.
    #[arg(long = "legacy-policy-env", hide = true, env = "PROVCACHE_POLICY")]
    #[serde(skip)]
    pub legacy_policy_env: Option<PathBuf>,
    /// Where the principal comes from in a client certificate. Default: uri-san.
    #[arg(long, env = "PROVCACHE_IDENTITY", value_enum)]
    pub identity: Option<IdentityArg>,
    /// SPIFFE trust domains accepted with identity uri-san; repeatable. Default with the dev PKI: provcache.dev.
    #[arg(long, env = "PROVCACHE_TRUST_DOMAIN", value_delimiter = ',')]
    #[serde(default)]
    pub trust_domain: Vec<String>,
    /// Principals of TLS-terminating proxies (Envoy) whose
    /// x-forwarded-client-cert header names the caller; repeatable. Default: none (off).
    #[arg(long = "trusted-proxy", env = "PROVCACHE_TRUSTED_PROXIES", value_delimiter = ',')]
    #[serde(default)]
    pub trusted_proxies: Vec<String>,

    /// ed25519 signing key (PKCS#8 PEM), kept outside the data directory in production.
    #[arg(long, env = "PROVCACHE_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Trust policy (TOML): which keys verify, revocations, max_age. Reloaded when it changes.
    #[arg(long, env = "PROVCACHE_TRUST_POLICY")]
    pub trust_policy: Option<PathBuf>,
    /// What to do with an Action Cache entry that fails verification: reject
    /// (a miss) or flag (serve, marked). Default: reject.
    #[arg(long, env = "PROVCACHE_VERIFY_MODE", value_enum)]
    pub verify_mode: Option<VerifyModeArg>,
    /// This server's id, recorded in every signed statement. Default: provcache.
    #[arg(long, env = "PROVCACHE_SERVER_ID")]
    pub server_id: Option<String>,
    /// How long earlier statements of an action, and the per-invocation hit
    /// log, are kept for audits. Default: 30d.
    #[arg(long, env = "PROVCACHE_HISTORY_RETENTION", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub history_retention: Option<Duration>,

    /// Serve PLAINTEXT gRPC, without TLS (only behind a trusted proxy that authenticates callers).
    #[arg(long, env = "PROVCACHE_PLAINTEXT_INSECURE", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub plaintext_insecure: Option<bool>,
    /// The principal every plaintext caller is treated as (checked against
    /// authz_policy; without one it is granted everything). Default: plaintext.
    #[arg(long, env = "PROVCACHE_PLAINTEXT_PRINCIPAL")]
    pub plaintext_principal: Option<String>,

    /// Bound on stored bytes (blobs plus Action Cache entries), e.g. 200GiB;
    /// least recently used ones are evicted to stay under it. Default: unbounded.
    #[arg(long, env = "PROVCACHE_MAX_SIZE", value_parser = crate::units::parse_size_with_unit)]
    #[serde(default, deserialize_with = "de_size_with_unit")]
    pub max_size: Option<u64>,

    /// Memory for RocksDB's block cache (index, filter and data blocks of
    /// Action Cache entries and blob records), e.g. 1GiB. Lookups of entries
    /// whose blocks are in it never wait for the disk. Default: 256MiB.
    #[arg(long, env = "PROVCACHE_BLOCK_CACHE", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "de_size")]
    pub block_cache: Option<u64>,

    /// Serve Prometheus metrics (GET /metrics) and a liveness probe (GET /healthz)
    /// over plain HTTP on this address, e.g. 127.0.0.1:9090. Default: off.
    #[arg(long, env = "PROVCACHE_METRICS_LISTEN", value_parser = super::listen::parse_listen)]
    #[serde(default, deserialize_with = "super::listen::de_listen")]
    pub metrics_listen: Option<SocketAddr>,

    /// On SIGTERM or Ctrl-C: how long calls in flight may take to complete
    /// before they are cut off (new connections are refused at once). Default: 30s.
    #[arg(long, env = "PROVCACHE_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "de_duration")]
    pub shutdown_timeout: Option<Duration>,

    /// Log format on stderr: text or json. Default: text.
    #[arg(long, env = "PROVCACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. info or warn,provcache=debug (RUST_LOG syntax; RUST_LOG
    /// is used when neither this flag nor PROVCACHE_LOG_LEVEL is set). Default: info.
    #[arg(long, env = "PROVCACHE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log one line per finished call (target provcache::access: method,
    /// instance, principal, status, duration, bytes). Default: off.
    #[arg(long, env = "PROVCACHE_ACCESS_LOG", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub access_log: Option<bool>,

    /// Do not fsync commits (benchmarks only: an acknowledged write can be lost on a crash).
    #[arg(long, hide = true, env = "PROVCACHE_UNSAFE_NO_SYNC", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub unsafe_no_sync: Option<bool>,
    /// Skip verification on reads (only to measure its cost).
    #[arg(long, hide = true, env = "PROVCACHE_UNSAFE_NO_VERIFY", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub unsafe_no_verify: Option<bool>,
    /// Store Action Cache entries unsigned (only to measure signing's cost;
    /// every such entry then fails verification).
    #[arg(long, hide = true, env = "PROVCACHE_UNSAFE_NO_SIGN", num_args = 0..=1, require_equals = true,
          default_missing_value = "true")]
    pub unsafe_no_sign: Option<bool>,

    /// Keep CAS blobs and Action Cache entries in an S3-compatible object
    /// store shared by several replicas, e.g. s3://build-cache/provcache; the
    /// data directory is then this replica's read-through cache. The other
    /// object-store settings are the file's `[storage]` table; credentials
    /// come from AWS_* variables. Default: none (the data directory is the store).
    #[arg(long, env = "PROVCACHE_STORE")]
    pub store: Option<String>,

    /// The limits that bound what one caller can cost (the file's `[limits]` table).
    #[command(flatten)]
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,

    /// How to reach the object store of `store` (the file's `[storage]` table).
    #[arg(skip)]
    #[serde(default)]
    pub storage: StorageConfig,
}

/// The file's `[storage]` table: how to reach the object store named by
/// `store` (docs/configuration.md). Every setting optional; the defaults are
/// those of `store::object::client`. No credentials: they are AWS_* variables.
#[derive(Deserialize, Serialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The S3 endpoint, `http(s)://HOST[:PORT]`, for stores other than AWS
    /// (default: AWS_ENDPOINT_URL, else AWS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The region (default: AWS_REGION).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Path-style addressing (default: on when an endpoint is given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_style: Option<bool>,
    /// Bound on opening a connection (default 5s).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<Duration>,
    /// Bound on one whole request, body included (default 10m).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<Duration>,
    /// Retries of a failed idempotent request (default 3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<usize>,
    /// First pause between retries, doubling (default 100ms).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_backoff: Option<Duration>,
    /// How long a replica serves its local copy of an Action Cache entry
    /// before reading the bucket again (default 10s).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ac_ttl: Option<Duration>,
    /// How long a replica remembers that a blob is in the bucket (default 60s).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub existence_ttl: Option<Duration>,
    /// Age after which a served object's last-modified is refreshed for the
    /// bucket's lifecycle rule (default 1d).
    #[serde(default, deserialize_with = "de_duration", serialize_with = "ser_some_duration")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_age: Option<Duration>,
}

impl StorageConfig {
    /// Every setting of `self`, and those it lacks from `lower`.
    fn or(self, lower: StorageConfig) -> StorageConfig {
        StorageConfig {
            endpoint: self.endpoint.or(lower.endpoint),
            region: self.region.or(lower.region),
            path_style: self.path_style.or(lower.path_style),
            connect_timeout: self.connect_timeout.or(lower.connect_timeout),
            request_timeout: self.request_timeout.or(lower.request_timeout),
            max_retries: self.max_retries.or(lower.max_retries),
            retry_backoff: self.retry_backoff.or(lower.retry_backoff),
            ac_ttl: self.ac_ttl.or(lower.ac_ttl),
            existence_ttl: self.existence_ttl.or(lower.existence_ttl),
            refresh_age: self.refresh_age.or(lower.refresh_age),
        }
    }
}

/// The complete settings of `serve`, defaults applied. Printed by
/// `--check-config` (as TOML that is itself a valid configuration file).
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Settings {
    /// See [`ServeConfig::data_dir`].
    pub data_dir: PathBuf,
    /// See [`ServeConfig::listen`].
    pub listen: SocketAddr,
    /// See [`ServeConfig::tls_cert`].
    pub tls_cert: Option<PathBuf>,
    /// See [`ServeConfig::tls_key`].
    pub tls_key: Option<PathBuf>,
    /// See [`ServeConfig::client_ca`].
    pub client_ca: Vec<PathBuf>,
    /// See [`ServeConfig::crl`].
    pub crl: Vec<PathBuf>,
    /// See [`ServeConfig::crl_reload_interval`].
    #[serde(serialize_with = "ser_duration")]
    pub crl_reload_interval: Duration,
    /// See [`ServeConfig::policy`].
    #[serde(rename = "authz_policy")]
    pub policy: Option<PathBuf>,
    /// See [`ServeConfig::identity`].
    pub identity: IdentityArg,
    /// See [`ServeConfig::trust_domain`].
    pub trust_domain: Vec<String>,
    /// See [`ServeConfig::trusted_proxies`].
    pub trusted_proxies: Vec<String>,
    /// See [`ServeConfig::signing_key`].
    pub signing_key: Option<PathBuf>,
    /// See [`ServeConfig::trust_policy`].
    pub trust_policy: Option<PathBuf>,
    /// See [`ServeConfig::verify_mode`].
    pub verify_mode: VerifyModeArg,
    /// See [`ServeConfig::server_id`].
    pub server_id: String,
    /// See [`ServeConfig::history_retention`].
    #[serde(serialize_with = "ser_duration")]
    pub history_retention: Duration,
    /// See [`ServeConfig::plaintext_insecure`].
    pub plaintext_insecure: bool,
    /// See [`ServeConfig::plaintext_principal`].
    pub plaintext_principal: String,
    /// See [`ServeConfig::max_size`] (bytes).
    pub max_size: Option<u64>,
    /// See [`ServeConfig::block_cache`] (bytes).
    pub block_cache: u64,
    /// See [`ServeConfig::metrics_listen`].
    pub metrics_listen: Option<SocketAddr>,
    /// See [`ServeConfig::shutdown_timeout`].
    #[serde(serialize_with = "ser_duration")]
    pub shutdown_timeout: Duration,
    /// See [`ServeConfig::log_format`].
    pub log_format: LogFormat,
    /// See [`ServeConfig::log_level`].
    pub log_level: String,
    /// See [`ServeConfig::access_log`].
    pub access_log: bool,
    /// See [`ServeConfig::unsafe_no_sync`].
    pub unsafe_no_sync: bool,
    /// See [`ServeConfig::unsafe_no_verify`].
    pub unsafe_no_verify: bool,
    /// See [`ServeConfig::unsafe_no_sign`].
    pub unsafe_no_sign: bool,
    /// See [`ServeConfig::store`].
    pub store: Option<String>,
    /// See [`ServeConfig::limits`] (a TOML table follows the plain values).
    pub limits: crate::limits::Limits,
    /// See [`ServeConfig::storage`] (only the settings given; the plan adds the defaults).
    pub storage: StorageConfig,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Malformed TOML, an unknown key or a bad value; the parser's message
    /// names the key, the line and the column.
    #[error("invalid configuration file {path}: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// Settings that do not fit together, or a bad value.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServeConfig {
    /// Parses a configuration file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text)
            .map_err(|e| ConfigError::Syntax { path: origin.to_owned(), message: e.to_string().trim().to_owned() })
    }

    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Every setting of `self`, and those it lacks from `lower`.
    pub fn or(self, lower: ServeConfig) -> ServeConfig {
        macro_rules! merge {
            ($($f:ident),* $(,)?) => {
                ServeConfig { $($f: Merge::merge(self.$f, lower.$f)),* }
            };
        }
        merge!(
            data_dir,
            listen,
            tls_cert,
            tls_key,
            client_ca,
            crl,
            crl_reload_interval,
            policy,
            legacy_policy_env,
            identity,
            trust_domain,
            trusted_proxies,
            signing_key,
            trust_policy,
            verify_mode,
            server_id,
            history_retention,
            plaintext_insecure,
            plaintext_principal,
            max_size,
            block_cache,
            metrics_listen,
            shutdown_timeout,
            log_format,
            log_level,
            access_log,
            unsafe_no_sync,
            unsafe_no_verify,
            unsafe_no_sign,
            store,
            limits,
            storage,
        )
    }
}

trait Merge {
    fn merge(self, lower: Self) -> Self;
}

impl<T> Merge for Option<T> {
    fn merge(self, lower: Self) -> Self {
        self.or(lower)
    }
}

impl Merge for StorageConfig {
    fn merge(self, lower: Self) -> Self {
        self.or(lower)
    }
}

impl Merge for crate::limits::LimitsConfig {
    fn merge(self, lower: Self) -> Self {
        self.or(lower)
    }
}

/// A list given at a higher level replaces the lower one (no appending).
impl<T> Merge for Vec<T> {
    fn merge(self, lower: Self) -> Self {
        if self.is_empty() {
            lower
        } else {
            self
        }
    }
}

/// Layers the settings — `cli` (flags, then `PROVCACHE_*` variables, as clap
/// parsed them) over `RUST_LOG` (`rust_log`, for the log filter only) over
/// `file` — applies the defaults and checks the settings that go together.
pub fn resolve(cli: ServeConfig, rust_log: Option<String>, file: Option<ServeConfig>) -> Result<Settings, ConfigError> {
    let mut c = cli;
    c.log_level = c.log_level.or(rust_log.filter(|s| !s.trim().is_empty()));
    let c = c.or(file.unwrap_or_default());
    let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));

    let own_pki = c.tls_cert.is_some() || c.tls_key.is_some() || !c.client_ca.is_empty();
    if own_pki && (c.tls_cert.is_none() || c.tls_key.is_none() || c.client_ca.is_empty()) {
        return invalid("tls_cert, tls_key and client_ca go together (--tls-cert, --tls-key, --client-ca)");
    }
    match (&c.signing_key, &c.trust_policy) {
        (Some(_), None) => return invalid("signing_key needs trust_policy (--trust-policy)"),
        (None, Some(_)) => {
            return invalid("trust_policy without signing_key: give both, or neither for the development key")
        }
        _ => {}
    }
    let plaintext = c.plaintext_insecure.unwrap_or(false);
    if c.plaintext_principal.is_some() && !plaintext {
        return invalid("plaintext_principal needs plaintext_insecure (--plaintext-insecure)");
    }
    if plaintext && !c.trusted_proxies.is_empty() {
        return invalid(
            "trusted_proxies needs mutual TLS (a proxy is trusted for its client certificate): \
             remove plaintext_insecure or trusted_proxies",
        );
    }
    if plaintext && own_pki {
        return invalid("plaintext_insecure serves without TLS: remove tls_cert, tls_key and client_ca");
    }
    if c.store.is_none() && c.storage != StorageConfig::default() {
        return invalid("the [storage] settings need store (--store s3://BUCKET/PREFIX)");
    }
    let log_level = c.log_level.unwrap_or_else(|| "info".to_owned());
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log_level) {
        return Err(ConfigError::Invalid(format!("log_level {log_level:?}: {e}")));
    }
    Ok(Settings {
        data_dir: c.data_dir.unwrap_or_else(|| PathBuf::from("provcache-data")),
        listen: c.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8980))),
        tls_cert: c.tls_cert,
        tls_key: c.tls_key,
        client_ca: c.client_ca,
        crl: c.crl,
        crl_reload_interval: c.crl_reload_interval.unwrap_or(Duration::from_secs(2)),
        policy: c.policy.or(c.legacy_policy_env),
        identity: c.identity.unwrap_or(IdentityArg::UriSan),
        trust_domain: c.trust_domain,
        trusted_proxies: c.trusted_proxies,
        signing_key: c.signing_key,
        trust_policy: c.trust_policy,
        verify_mode: c.verify_mode.unwrap_or(VerifyModeArg::Reject),
        server_id: c.server_id.unwrap_or_else(|| "provcache".to_owned()),
        history_retention: c.history_retention.unwrap_or(Duration::from_secs(30 * 24 * 3600)),
        plaintext_insecure: plaintext,
        plaintext_principal: c.plaintext_principal.unwrap_or_else(|| "plaintext".to_owned()),
        max_size: c.max_size,
        block_cache: c.block_cache.unwrap_or(DEFAULT_BLOCK_CACHE),
        metrics_listen: c.metrics_listen,
        shutdown_timeout: c.shutdown_timeout.unwrap_or(Duration::from_secs(30)),
        log_format: c.log_format.unwrap_or(LogFormat::Text),
        log_level,
        access_log: c.access_log.unwrap_or(false),
        unsafe_no_sync: c.unsafe_no_sync.unwrap_or(false),
        unsafe_no_verify: c.unsafe_no_verify.unwrap_or(false),
        unsafe_no_sign: c.unsafe_no_sign.unwrap_or(false),
        store: c.store,
        limits: c.limits.resolve()?,
        storage: c.storage,
    })
}

impl Settings {
    /// The settings as a TOML configuration file (paths only; no key material).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("settings are plain values")
    }
}

/// A duration such as `30s` or `30d` (humantime).
pub(crate) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map(Some).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

pub(crate) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// A duration that is set (`skip_serializing_if` leaves out the unset ones).
fn ser_some_duration<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_duration(d, s),
        None => s.serialize_none(),
    }
}

/// A size: a string such as `64MiB` or a number of bytes.
pub(crate) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size_by(d, crate::units::parse_size, 0)
}

/// A bound such as `max_size`: a string with a unit. A TOML integer is bytes
/// (`--check-config` prints it so) only from 1 MiB up: a smaller one, like
/// `200`, is a forgotten unit and refused.
fn de_size_with_unit<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    de_size_by(d, crate::units::parse_size_with_unit, 1 << 20)
}

/// A size as a TOML string, read by `parse` (the flags' parser), or a TOML
/// integer: bytes from `bare_bytes_from` up, read by `parse` below it.
fn de_size_by<'de, D: Deserializer<'de>>(
    d: D,
    parse: fn(&str) -> Result<u64, String>,
    bare_bytes_from: u64,
) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) if n >= bare_bytes_from => Ok(Some(n)),
        Size::Bytes(n) => parse(&n.to_string()).map(Some).map_err(serde::de::Error::custom),
        Size::Text(s) => parse(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

//! Limits that bound the work and memory any one caller can cause, before
//! and after authorization (docs/operations.md, "Limits").
//!
//! A security cache must stay up when a caller is hostile: every path's cost
//! is bounded by its input and by one of these settings. [`LimitsConfig`] is
//! the partial form (flags, `PROVCACHE_*` variables, the file's `[limits]`
//! table); [`Limits`] the resolved one with defaults. Whenever a limit refuses
//! or cuts off work, [`LimitHits::hit`] counts it (metric
//! `provcache_limit_hits{limit,principal}`) and logs it at info, at most once
//! per limit every few seconds, so an attack cannot flood the log either.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Every limit, each optional: from flags and environment (clap) or from the
/// configuration file's `[limits]` table (serde). Field names are the file's
/// keys; flags are the same names in kebab case.
#[derive(clap::Args, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    // ------------------------------------------------------------ transport
    /// HTTP/2 streams (concurrent calls) one connection may have open. Default: 128.
    #[arg(long, env = "PROVCACHE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Bytes of HTTP/2 request headers one call may send. Default: 16KiB.
    #[arg(long, env = "PROVCACHE_MAX_HEADER_LIST_SIZE", value_parser = crate::transport::units::parse_u32_size)]
    #[serde(default, deserialize_with = "crate::transport::units::de_u32_size")]
    pub max_header_list_size: Option<u32>,
    /// How often the server pings an HTTP/2 connection to find a dead peer. Default: 60s.
    #[arg(long, env = "PROVCACHE_HTTP2_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub http2_keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is closed. Default: 20s.
    #[arg(long, env = "PROVCACHE_HTTP2_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub http2_keepalive_timeout: Option<Duration>,
    /// Idle time before the kernel probes a TCP connection (SO_KEEPALIVE). Default: 60s.
    #[arg(long, env = "PROVCACHE_TCP_KEEPALIVE", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub tcp_keepalive: Option<Duration>,
    /// Longest a call with a single response (all but ByteStream Write, Read and
    /// GetTree's streams) may take before DEADLINE_EXCEEDED. Default: 120s.
    #[arg(long, env = "PROVCACHE_REQUEST_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub request_timeout: Option<Duration>,
    /// A call whose request stream sends nothing for this long is cut off
    /// (DEADLINE_EXCEEDED); uploads of any size work as long as bytes flow. Default: 60s.
    #[arg(long, env = "PROVCACHE_STREAM_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub stream_idle_timeout: Option<Duration>,
    /// Request bytes buffered in flight for all callers together (messages
    /// being received, before decoding). Default: 1GiB.
    #[arg(long, env = "PROVCACHE_MAX_REQUEST_BYTES", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "crate::config::de_size")]
    pub max_request_bytes: Option<u64>,
    /// The share of `max_request_bytes` one identity may hold. Default: 256MiB.
    #[arg(long, env = "PROVCACHE_MAX_REQUEST_BYTES_PER_IDENTITY", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "crate::config::de_size")]
    pub max_request_bytes_per_identity: Option<u64>,
    /// The share all callers without any permission hold together (health
    /// checks and the like). Default: 1MiB.
    #[arg(long, env = "PROVCACHE_MAX_REQUEST_BYTES_UNIDENTIFIED", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "crate::config::de_size")]
    pub max_request_bytes_unidentified: Option<u64>,
    /// A TLS handshake not finished in this time is dropped. Default: 5s.
    #[arg(long, env = "PROVCACHE_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub handshake_timeout: Option<Duration>,
    /// TLS handshakes in progress at once; further connections wait in the
    /// listen backlog. Default: 256.
    #[arg(long, env = "PROVCACHE_MAX_HANDSHAKES")]
    pub max_handshakes: Option<usize>,
    /// TLS handshakes in progress at once from one remote IP address; a
    /// further connection from it is closed at once. Default: 32.
    #[arg(long, env = "PROVCACHE_MAX_HANDSHAKES_PER_ADDRESS")]
    pub max_handshakes_per_address: Option<usize>,
    // ------------------------------------------------------------ domain
    /// Output file names one GetActionResult may ask to inline. Default: 10000.
    #[arg(long, env = "PROVCACHE_MAX_INLINE_NAMES")]
    pub max_inline_names: Option<usize>,
    /// Entries (files, directories, symlinks) in one Directory read from the
    /// CAS (GetTree, Trees of UpdateActionResult), counted before decoding. Default: 100000.
    #[arg(long, env = "PROVCACHE_MAX_DIRECTORY_NODES")]
    pub max_directory_nodes: Option<usize>,
    /// Directories and entries in one output directory's Tree read by
    /// UpdateActionResult, counted before decoding. Default: 500000.
    #[arg(long, env = "PROVCACHE_MAX_TREE_NODES")]
    pub max_tree_nodes: Option<usize>,
    /// Memory one GetTree call may use for the directories it tracks and
    /// buffers, e.g. 64MiB. Default: 64MiB.
    #[arg(long, env = "PROVCACHE_MAX_GET_TREE_MEMORY", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "crate::config::de_size")]
    pub max_get_tree_memory: Option<u64>,
    /// Outputs (files, directories, symlinks) one UpdateActionResult may list. Default: 50000.
    #[arg(long, env = "PROVCACHE_MAX_RESULT_OUTPUTS")]
    pub max_result_outputs: Option<usize>,
    /// CAS blobs one Action Cache result may reference, files inside its
    /// output directories included (each read checks them all). Default: 250000.
    #[arg(long, env = "PROVCACHE_MAX_REFERENCED_BLOBS")]
    pub max_referenced_blobs: Option<usize>,
    /// Unfinished ByteStream uploads one identity may hold at once. Default: 256.
    #[arg(long, env = "PROVCACHE_MAX_UPLOADS_PER_IDENTITY")]
    pub max_uploads_per_identity: Option<usize>,
    /// Unfinished ByteStream uploads into one instance at once. Default: 1024.
    #[arg(long, env = "PROVCACHE_MAX_UPLOADS_PER_INSTANCE")]
    pub max_uploads_per_instance: Option<usize>,
    /// How long an unfinished upload nobody writes is kept for resumption,
    /// e.g. 5m. Default: 5m.
    #[arg(long, env = "PROVCACHE_UPLOAD_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(default, deserialize_with = "crate::config::de_duration")]
    pub upload_idle_timeout: Option<Duration>,
    /// Largest zstd window (log2 of bytes) a compressed upload may need; a
    /// frame that needs more is refused. Default: 23 (8 MiB).
    #[arg(long, env = "PROVCACHE_ZSTD_WINDOW_LOG_MAX")]
    pub zstd_window_log_max: Option<u32>,
    /// Memory for the per-chunk hashes of verified blobs that let a ranged
    /// read check only the chunks it touches, e.g. 32MiB. Default: 32MiB.
    #[arg(long, env = "PROVCACHE_VERIFIED_CHUNK_CACHE", value_parser = crate::units::parse_size)]
    #[serde(default, deserialize_with = "crate::config::de_size")]
    pub verified_chunk_cache: Option<u64>,
    /// Hit-log records one reader principal may add to one invocation; the
    /// last one says `record_limit_reached`, later lookups are not recorded.
    /// Default: 1000000.
    #[arg(long, env = "PROVCACHE_MAX_HIT_RECORDS_PER_PRINCIPAL")]
    pub max_hit_records_per_principal: Option<u64>,
}

/// The resolved limits, defaults applied. Printed by `--check-config` as the
/// `[limits]` table.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Limits {
    // ------------------------------------------------------------ transport
    /// See [`LimitsConfig::max_concurrent_streams`].
    pub max_concurrent_streams: u32,
    /// See [`LimitsConfig::max_header_list_size`].
    pub max_header_list_size: u32,
    /// See [`LimitsConfig::http2_keepalive_interval`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub http2_keepalive_interval: Duration,
    /// See [`LimitsConfig::http2_keepalive_timeout`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub http2_keepalive_timeout: Duration,
    /// See [`LimitsConfig::tcp_keepalive`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub tcp_keepalive: Duration,
    /// See [`LimitsConfig::request_timeout`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub request_timeout: Duration,
    /// See [`LimitsConfig::stream_idle_timeout`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub stream_idle_timeout: Duration,
    /// See [`LimitsConfig::max_request_bytes`].
    pub max_request_bytes: u64,
    /// See [`LimitsConfig::max_request_bytes_per_identity`].
    pub max_request_bytes_per_identity: u64,
    /// See [`LimitsConfig::max_request_bytes_unidentified`].
    pub max_request_bytes_unidentified: u64,
    /// See [`LimitsConfig::handshake_timeout`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub handshake_timeout: Duration,
    /// See [`LimitsConfig::max_handshakes`].
    pub max_handshakes: usize,
    /// See [`LimitsConfig::max_handshakes_per_address`].
    pub max_handshakes_per_address: usize,
    // ------------------------------------------------------------ domain
    /// See [`LimitsConfig::max_inline_names`].
    pub max_inline_names: usize,
    /// See [`LimitsConfig::max_directory_nodes`].
    pub max_directory_nodes: usize,
    /// See [`LimitsConfig::max_tree_nodes`].
    pub max_tree_nodes: usize,
    /// See [`LimitsConfig::max_get_tree_memory`] (bytes).
    pub max_get_tree_memory: u64,
    /// See [`LimitsConfig::max_result_outputs`].
    pub max_result_outputs: usize,
    /// See [`LimitsConfig::max_referenced_blobs`].
    pub max_referenced_blobs: usize,
    /// See [`LimitsConfig::max_uploads_per_identity`].
    pub max_uploads_per_identity: usize,
    /// See [`LimitsConfig::max_uploads_per_instance`].
    pub max_uploads_per_instance: usize,
    /// See [`LimitsConfig::upload_idle_timeout`].
    #[serde(serialize_with = "crate::config::ser_duration")]
    pub upload_idle_timeout: Duration,
    /// See [`LimitsConfig::zstd_window_log_max`].
    pub zstd_window_log_max: u32,
    /// See [`LimitsConfig::verified_chunk_cache`] (bytes).
    pub verified_chunk_cache: u64,
    /// See [`LimitsConfig::max_hit_records_per_principal`].
    pub max_hit_records_per_principal: u64,
}

impl Default for Limits {
    fn default() -> Self {
        LimitsConfig::default().resolve().expect("the defaults are valid")
    }
}

/// zstd's smallest window (log2 of bytes): every frame may use this much.
pub const ZSTD_WINDOW_LOG_MIN: u32 = 10;
/// zstd's largest window on 64-bit machines.
pub const ZSTD_WINDOW_LOG_MAX: u32 = 31;

/// The limits as they apply to one caller: the domain checks a value against
/// a limit through it, and a refusal is counted for that caller's principal
/// ([`LimitHits`]) at the one place that decides it. Cheap to clone, so a
/// call's background work (a streamed GetTree) can carry it.
#[derive(Clone, Debug)]
pub struct Enforcer {
    limits: std::sync::Arc<Limits>,
    hits: std::sync::Arc<LimitHits>,
    principal: std::sync::Arc<str>,
}

impl Enforcer {
    /// The limits of `limits`, recorded in `hits`, for calls of `principal`.
    pub fn new(limits: std::sync::Arc<Limits>, hits: std::sync::Arc<LimitHits>, principal: &str) -> Self {
        Enforcer { limits, hits, principal: principal.into() }
    }

    /// Default limits and a private hit counter: for tools and unit tests
    /// that call the domain without a server.
    pub fn unlimited_for_tests(principal: &str) -> Self {
        Self::new(Default::default(), Default::default(), principal)
    }

    /// The limit values.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whose calls these are.
    pub fn principal(&self) -> &str {
        &self.principal
    }

    /// Ok when `value` is within `max`; otherwise INVALID_ARGUMENT naming
    /// `what` and the limit, counted as a hit. For requests that can never
    /// succeed as sent, so the client must not retry them.
    pub fn at_most(
        &self,
        limit: &'static str,
        what: impl std::fmt::Display,
        value: u64,
        max: u64,
    ) -> crate::error::Result<()> {
        if value <= max {
            return Ok(());
        }
        Err(self.refuse(
            limit,
            crate::error::Error::InvalidArgument(format!(
                "{what}: {value} is over the limit of {max} (limits.{limit})"
            )),
        ))
    }

    /// Counts a refusal by `limit` and returns `error` (whose message must
    /// name the limit) for the caller.
    pub fn refuse(&self, limit: &'static str, error: crate::error::Error) -> crate::error::Error {
        self.hits.hit(limit, &self.principal, &error);
        error
    }
}

impl LimitsConfig {
    /// Every limit of `self`, and those it lacks from `lower`.
    pub fn or(self, lower: LimitsConfig) -> LimitsConfig {
        macro_rules! merge {
            ($($f:ident),* $(,)?) => {
                LimitsConfig { $($f: self.$f.or(lower.$f)),* }
            };
        }
        merge!(
            // transport
            max_concurrent_streams,
            max_header_list_size,
            http2_keepalive_interval,
            http2_keepalive_timeout,
            tcp_keepalive,
            request_timeout,
            stream_idle_timeout,
            max_request_bytes,
            max_request_bytes_per_identity,
            max_request_bytes_unidentified,
            handshake_timeout,
            max_handshakes,
            max_handshakes_per_address,
            // domain
            max_inline_names,
            max_directory_nodes,
            max_tree_nodes,
            max_get_tree_memory,
            max_result_outputs,
            max_referenced_blobs,
            max_uploads_per_identity,
            max_uploads_per_instance,
            upload_idle_timeout,
            zstd_window_log_max,
            verified_chunk_cache,
            max_hit_records_per_principal,
        )
    }

    /// Applies the defaults and checks each value.
    pub fn resolve(self) -> Result<Limits, ConfigError> {
        let positive = |name: &str, v: u64| {
            if v == 0 {
                Err(ConfigError::Invalid(format!("limits.{name} must be at least 1")))
            } else {
                Ok(())
            }
        };
        let limits = Limits {
            // transport
            max_concurrent_streams: self.max_concurrent_streams.unwrap_or(128),
            max_header_list_size: self.max_header_list_size.unwrap_or(16 << 10),
            http2_keepalive_interval: self.http2_keepalive_interval.unwrap_or(Duration::from_secs(60)),
            http2_keepalive_timeout: self.http2_keepalive_timeout.unwrap_or(Duration::from_secs(20)),
            tcp_keepalive: self.tcp_keepalive.unwrap_or(Duration::from_secs(60)),
            request_timeout: self.request_timeout.unwrap_or(Duration::from_secs(120)),
            stream_idle_timeout: self.stream_idle_timeout.unwrap_or(Duration::from_secs(60)),
            max_request_bytes: self.max_request_bytes.unwrap_or(1 << 30),
            max_request_bytes_per_identity: self.max_request_bytes_per_identity.unwrap_or(256 << 20),
            max_request_bytes_unidentified: self.max_request_bytes_unidentified.unwrap_or(1 << 20),
            handshake_timeout: self.handshake_timeout.unwrap_or(Duration::from_secs(5)),
            max_handshakes: self.max_handshakes.unwrap_or(256),
            max_handshakes_per_address: self.max_handshakes_per_address.unwrap_or(32),
            // domain
            max_inline_names: self.max_inline_names.unwrap_or(10_000),
            max_directory_nodes: self.max_directory_nodes.unwrap_or(100_000),
            max_tree_nodes: self.max_tree_nodes.unwrap_or(500_000),
            max_get_tree_memory: self.max_get_tree_memory.unwrap_or(64 << 20),
            max_result_outputs: self.max_result_outputs.unwrap_or(50_000),
            max_referenced_blobs: self.max_referenced_blobs.unwrap_or(250_000),
            max_uploads_per_identity: self.max_uploads_per_identity.unwrap_or(256),
            max_uploads_per_instance: self.max_uploads_per_instance.unwrap_or(1024),
            upload_idle_timeout: self.upload_idle_timeout.unwrap_or(Duration::from_secs(300)),
            zstd_window_log_max: self.zstd_window_log_max.unwrap_or(23),
            verified_chunk_cache: self.verified_chunk_cache.unwrap_or(32 << 20),
            max_hit_records_per_principal: self.max_hit_records_per_principal.unwrap_or(1_000_000),
        };
        positive("max_concurrent_streams", limits.max_concurrent_streams.into())?;
        positive("max_header_list_size", limits.max_header_list_size.into())?;
        for (name, d) in [
            ("http2_keepalive_interval", limits.http2_keepalive_interval),
            ("http2_keepalive_timeout", limits.http2_keepalive_timeout),
            ("tcp_keepalive", limits.tcp_keepalive),
            ("request_timeout", limits.request_timeout),
            ("stream_idle_timeout", limits.stream_idle_timeout),
            ("handshake_timeout", limits.handshake_timeout),
        ] {
            positive(name, d.as_millis() as u64)?;
        }
        positive("max_request_bytes", limits.max_request_bytes)?;
        positive("max_request_bytes_per_identity", limits.max_request_bytes_per_identity)?;
        positive("max_request_bytes_unidentified", limits.max_request_bytes_unidentified)?;
        positive("max_handshakes", limits.max_handshakes as u64)?;
        positive("max_handshakes_per_address", limits.max_handshakes_per_address as u64)?;
        positive("max_inline_names", limits.max_inline_names as u64)?;
        positive("max_directory_nodes", limits.max_directory_nodes as u64)?;
        positive("max_tree_nodes", limits.max_tree_nodes as u64)?;
        positive("max_get_tree_memory", limits.max_get_tree_memory)?;
        positive("max_result_outputs", limits.max_result_outputs as u64)?;
        positive("max_referenced_blobs", limits.max_referenced_blobs as u64)?;
        positive("max_uploads_per_identity", limits.max_uploads_per_identity as u64)?;
        positive("max_uploads_per_instance", limits.max_uploads_per_instance as u64)?;
        positive("upload_idle_timeout", limits.upload_idle_timeout.as_millis() as u64)?;
        if !(ZSTD_WINDOW_LOG_MIN..=ZSTD_WINDOW_LOG_MAX).contains(&limits.zstd_window_log_max) {
            return Err(ConfigError::Invalid(format!(
                "limits.zstd_window_log_max must be between {ZSTD_WINDOW_LOG_MIN} and {ZSTD_WINDOW_LOG_MAX}"
            )));
        }
        positive("verified_chunk_cache", limits.verified_chunk_cache)?;
        positive("max_hit_records_per_principal", limits.max_hit_records_per_principal)?;
        Ok(limits)
    }
}

type Labels = Vec<(&'static str, String)>;

/// How often one limit may log a line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Counts every time a limit refused or cut off work, by limit and principal,
/// and logs it, rate-limited. Shared by every component that enforces a limit.
#[derive(Debug, Default)]
pub struct LimitHits {
    counts: Family<Labels, Counter>,
    last_logged: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl LimitHits {
    /// Records that `limit` refused or cut off work of `principal` (empty:
    /// an unauthenticated peer). `detail` says what was refused; it is logged
    /// at info at most once per limit every ten seconds, with the number of
    /// hits suppressed since the last line.
    pub fn hit(&self, limit: &'static str, principal: &str, detail: impl std::fmt::Display) {
        let who = if principal.is_empty() { "unauthenticated" } else { principal };
        self.counts.get_or_create(&vec![("limit", limit.to_owned()), ("principal", who.to_owned())]).inc();
        let now = Instant::now();
        let suppressed = {
            let mut last = self.last_logged.lock().unwrap_or_else(|p| p.into_inner());
            match last.get_mut(limit) {
                Some((at, n)) if now.duration_since(*at) < LOG_EVERY => {
                    *n += 1;
                    return;
                }
                Some((at, n)) => {
                    *at = now;
                    std::mem::take(n)
                }
                None => {
                    last.insert(limit, (now, 0));
                    0
                }
            }
        };
        tracing::info!(limit, principal = who, suppressed, "limit reached: {detail}");
    }

    /// How often `limit` was hit by `principal` (tests and diagnostics).
    pub fn count(&self, limit: &'static str, principal: &str) -> u64 {
        let who = if principal.is_empty() { "unauthenticated" } else { principal };
        self.counts.get_or_create(&vec![("limit", limit.to_owned()), ("principal", who.to_owned())]).get()
    }

    /// The counter family, for the metrics registry.
    pub fn family(&self) -> Family<Labels, Counter> {
        self.counts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_limit_is_refused_with_its_name() {
        let e = LimitsConfig { max_inline_names: Some(0), ..Default::default() }.resolve().unwrap_err();
        assert!(e.to_string().contains("limits.max_inline_names"), "{e}");
    }

    #[test]
    fn higher_settings_win_and_lower_ones_fill_gaps() {
        let cli = LimitsConfig { max_inline_names: Some(5), ..Default::default() };
        let file = LimitsConfig { max_inline_names: Some(7), max_concurrent_streams: Some(9), ..Default::default() };
        let l = cli.or(file).resolve().unwrap();
        assert_eq!((l.max_inline_names, l.max_concurrent_streams), (5, 9));
    }

    #[test]
    fn hits_are_counted_per_limit_and_principal_even_when_not_logged() {
        let hits = LimitHits::default();
        for _ in 0..3 {
            hits.hit("max_inline_names", "spiffe://x/reader", "too many names");
        }
        hits.hit("max_inline_names", "", "too many names");
        assert_eq!(hits.count("max_inline_names", "spiffe://x/reader"), 3);
        assert_eq!(hits.count("max_inline_names", ""), 1);
        assert_eq!(hits.count("max_concurrent_streams", "spiffe://x/reader"), 0);
    }
}

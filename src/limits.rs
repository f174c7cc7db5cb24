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
    /// HTTP/2 streams (concurrent calls) one connection may have open. Default: 64.
    #[arg(long, env = "PROVCACHE_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    // ------------------------------------------------------------ domain
    /// Output file names one GetActionResult may ask to inline. Default: 10000.
    #[arg(long, env = "PROVCACHE_MAX_INLINE_NAMES")]
    pub max_inline_names: Option<usize>,
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
    // ------------------------------------------------------------ domain
    /// See [`LimitsConfig::max_inline_names`].
    pub max_inline_names: usize,
    /// See [`LimitsConfig::max_hit_records_per_principal`].
    pub max_hit_records_per_principal: u64,
}

impl Default for Limits {
    fn default() -> Self {
        LimitsConfig::default().resolve().expect("the defaults are valid")
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
            // domain
            max_inline_names,
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
            max_concurrent_streams: self.max_concurrent_streams.unwrap_or(64),
            // domain
            max_inline_names: self.max_inline_names.unwrap_or(10_000),
            max_hit_records_per_principal: self.max_hit_records_per_principal.unwrap_or(1_000_000),
        };
        positive("max_concurrent_streams", limits.max_concurrent_streams.into())?;
        positive("max_inline_names", limits.max_inline_names as u64)?;
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

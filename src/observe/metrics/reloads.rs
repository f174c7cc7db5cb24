//! Reloads of configuration files without a restart
//! ([`crate::access::reload`]): `provcache_reloads_total{what, result}`, so
//! an alert can fire on a refused file that keeps an old policy, certificate
//! or key in force.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;

/// Encodes the reload counts, `result` being `ok` or `refused`.
pub(super) fn encode(e: &mut DescriptorEncoder) -> std::fmt::Result {
    let help =
        "Reloads of the policy, TLS and signing files, by file kind and result (refused: the last good one stays)";
    let mut m = e.encode_descriptor("reloads", help, None, ConstCounter::new(0u64).metric_type())?;
    for (what, ok, refused) in crate::access::reload::counts() {
        for (result, n) in [("ok", ok), ("refused", refused)] {
            ConstCounter::new(n).encode(m.encode_family(&[("what", what), ("result", result)])?)?;
        }
    }
    Ok(())
}

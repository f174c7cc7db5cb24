//! A replica's metrics (docs/scale-out.md): the object store's requests,
//! failures, latency and bytes, whether it answers, and how often the local
//! caches spared a trip to it. Read from the replica's own counters at
//! scrape time, like the rest of [`super::StateCollector`].

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter, gauge};
use crate::store::object::Op;
use crate::stores::Replica;

/// Encodes `replica`'s metrics.
pub(super) fn encode(e: &mut DescriptorEncoder, replica: &Replica) -> std::fmt::Result {
    let up = i64::from(replica.health.is_up());
    gauge(e, "object_store_up", "1 while the shared object store answers the replica's probe", &[("", "", up)])?;
    counter(
        e,
        "object_store_failed_probes",
        "Health probes of the object store that got no answer",
        &[("", "", replica.health.failed_probes() as i64)],
    )?;
    let s = replica.object_stats.snapshot();
    let per_op = |f: fn(&crate::store::object::OpSnapshot) -> u64| -> Vec<(&str, &str, i64)> {
        Op::ALL.iter().map(|op| ("operation", op.name(), f(&s.op(*op)) as i64)).collect()
    };
    counter(e, "object_store_requests", "Requests sent to the object store, by operation", &per_op(|o| o.requests))?;
    counter(
        e,
        "object_store_errors",
        "Object-store requests that failed (not a 404 or a lost create race), by operation",
        &per_op(|o| o.errors),
    )?;
    counter(
        e,
        "object_store_request_microseconds",
        "Total time of object-store requests in µs, by operation (divide by requests for the mean)",
        &per_op(|o| o.latency_us),
    )?;
    counter(
        e,
        "object_store_bytes",
        "Body bytes moved to and from the object store",
        &[("direction", "read", s.bytes_read as i64), ("direction", "written", s.bytes_written as i64)],
    )?;
    counter(
        e,
        "object_store_refreshes",
        "Objects whose age was renewed so that the bucket's lifecycle rules keep what is used",
        &[("", "", s.refreshes as i64)],
    )?;
    counter(
        e,
        "object_store_refreshes_skipped",
        "Refreshes skipped because the most allowed at once were running (a later use tries again)",
        &[("", "", s.refreshes_skipped as i64)],
    )?;
    let r = replica.replica_stats.snapshot();
    counter(
        e,
        "replica_cas_reads",
        "Blob reads by where they were answered: the local cache, a fill from the object store, or another reader's fill",
        &[
            ("source", "local", r.cas_local_hits as i64),
            ("source", "object_store", r.cas_remote_fills as i64),
            ("source", "shared_fill", r.cas_fills_shared as i64),
        ],
    )?;
    counter(
        e,
        "replica_action_cache_reads",
        "Action Cache entry reads by where they were answered: memory (within ac_ttl) or the object store",
        &[("source", "memory", r.ac_cache_hits as i64), ("source", "object_store", r.ac_remote_reads as i64)],
    )?;
    counter(
        e,
        "replica_served_while_store_unavailable",
        "Answers given from local state because the object store did not answer",
        &[("", "", r.served_while_remote_unavailable as i64)],
    )?;
    counter(
        e,
        "replica_corrupt_objects",
        "Blobs the object store returned that did not match their digest (never served)",
        &[("", "", r.corrupt_from_remote as i64)],
    )
}

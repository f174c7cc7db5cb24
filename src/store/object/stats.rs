//! What the bucket costs: requests, failures and latency per kind of
//! request, bytes moved and blobs re-dated, for the metrics module to export
//! (S3 bills per request, and a slow bucket is every replica's problem).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A kind of bucket request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// HEAD (existence and age).
    Head,
    /// GET (whole or streamed).
    Get,
    /// A single PUT.
    Put,
    /// Starting, finishing or aborting a multipart upload.
    Multipart,
    /// One LIST call (a listing may take several).
    List,
    /// DELETE.
    Delete,
    /// COPY (re-dating a blob).
    Copy,
}

impl Op {
    /// Every kind, in the order [`ObjectStatsSnapshot::ops`] reports them.
    pub const ALL: [Op; 7] = [Op::Head, Op::Get, Op::Put, Op::Multipart, Op::List, Op::Delete, Op::Copy];

    /// The label the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            Op::Head => "head",
            Op::Get => "get",
            Op::Put => "put",
            Op::Multipart => "multipart",
            Op::List => "list",
            Op::Delete => "delete",
            Op::Copy => "copy",
        }
    }
}

#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    latency_us: AtomicU64,
}

/// The bucket counters one process shares across its three backends.
#[derive(Debug, Default)]
pub struct ObjectStats {
    ops: [OpCounters; 7],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    refreshes: AtomicU64,
    refreshes_skipped: AtomicU64,
}

/// One kind of request's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSnapshot {
    /// Requests sent.
    pub requests: u64,
    /// Requests that failed (a 404 or a lost create race is not a failure).
    pub errors: u64,
    /// Their total latency, in µs.
    pub latency_us: u64,
}

/// Every counter at one moment, cheap to take at each scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectStatsSnapshot {
    /// Per kind of request, in [`Op::ALL`] order.
    pub ops: Vec<(Op, OpSnapshot)>,
    /// Body bytes read from the bucket.
    pub bytes_read: u64,
    /// Body bytes written to the bucket.
    pub bytes_written: u64,
    /// Objects whose age was refreshed so bucket lifecycle rules keep them.
    pub refreshes: u64,
    /// Refreshes skipped because as many as allowed were already running
    /// (a later use tries again).
    pub refreshes_skipped: u64,
}

impl ObjectStatsSnapshot {
    /// The counters of one kind of request.
    pub fn op(&self, op: Op) -> OpSnapshot {
        self.ops.iter().find(|(o, _)| *o == op).map(|(_, s)| *s).unwrap_or_default()
    }
}

impl ObjectStats {
    /// Counts one finished request of kind `op`.
    pub fn record(&self, op: Op, took: Duration, failed: bool) {
        let c = &self.ops[op as usize];
        c.requests.fetch_add(1, Relaxed);
        c.latency_us.fetch_add(took.as_micros() as u64, Relaxed);
        if failed {
            c.errors.fetch_add(1, Relaxed);
        }
    }

    /// Counts body bytes read.
    pub fn read(&self, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Relaxed);
    }

    /// Counts body bytes written.
    pub fn wrote(&self, bytes: u64) {
        self.bytes_written.fetch_add(bytes, Relaxed);
    }

    /// Counts one refreshed object.
    pub fn refreshed(&self) {
        self.refreshes.fetch_add(1, Relaxed);
    }

    /// Counts one refresh skipped for want of a free permit.
    pub fn refresh_skipped(&self) {
        self.refreshes_skipped.fetch_add(1, Relaxed);
    }

    /// Every counter now.
    pub fn snapshot(&self) -> ObjectStatsSnapshot {
        let ops = Op::ALL
            .iter()
            .map(|op| {
                let c = &self.ops[*op as usize];
                let s = OpSnapshot {
                    requests: c.requests.load(Relaxed),
                    errors: c.errors.load(Relaxed),
                    latency_us: c.latency_us.load(Relaxed),
                };
                (*op, s)
            })
            .collect();
        ObjectStatsSnapshot {
            ops,
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            refreshes: self.refreshes.load(Relaxed),
            refreshes_skipped: self.refreshes_skipped.load(Relaxed),
        }
    }
}

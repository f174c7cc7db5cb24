//! Prometheus metrics, served on their own HTTP listener (`--metrics-listen`).
//!
//! Request metrics come from one tower layer ([`layer`]); denied calls from a
//! decorator around the authorization gate ([`CountingGate`]); everything else
//! (stored bytes, evictions, verification outcomes, uploads) is read from the
//! components that already count it, at scrape time ([`StateCollector`]).
//! With metrics off the layer is a pass-through.
//!
//! Beside provcache's own (`provcache_*`), the names dashboards already know:
//! go-grpc-prometheus's `grpc_server_*`, the client libraries' `process_*`.

pub mod layer;
mod process;
mod reloads;
mod replica;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::access::gate::{Caller, Gate, Peer, Permission, SharedGate};
use crate::cache::resource::InstanceName;
use crate::cache::upload::Uploads;
use crate::error::Error;
use crate::provenance::Provenance;
use crate::store::rocks::RocksStore;
use crate::stores::Replica;

pub use layer::MetricsLayer;

/// Latency buckets, in seconds: from 100 µs (a cached Action Cache hit) to
/// minutes (a multi-gigabyte upload).
const LATENCY_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0,
];
/// Distinct gRPC paths tracked; further ones (only unknown methods) share one series.
const MAX_METHODS: usize = 64;

type Labels = Vec<(&'static str, String)>;

/// Every metric of a server.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    grpc: Arc<GrpcMetrics>,
    denied: Family<Labels, Counter>,
    serving: std::sync::atomic::AtomicBool,
}

/// Request metrics, by gRPC method.
#[derive(Debug)]
pub struct GrpcMetrics {
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    bytes_in: Family<Labels, Counter>,
    bytes_out: Family<Labels, Counter>,
    in_flight: Family<Labels, Gauge>,
    ac_lookups: Family<Labels, Counter>,
    /// go-grpc-prometheus's `grpc_server_started_total`.
    started: Family<Labels, Counter>,
    /// go-grpc-prometheus's `grpc_server_handled_total`.
    handled: Family<Labels, Counter>,
    /// go-grpc-prometheus's `grpc_server_handling_seconds`.
    handling: Family<Labels, Histogram>,
    methods: RwLock<HashMap<String, Arc<MethodMetrics>>>,
}

/// The handles of one method, resolved once so a call costs a few atomic
/// operations and no allocation.
#[derive(Debug)]
pub(crate) struct MethodMetrics {
    labels: Labels,
    requests: Family<Labels, Counter>,
    by_code: [OnceLock<Counter>; 17],
    latency: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    in_flight: Gauge,
    /// (hits, misses) for GetActionResult.
    ac_lookups: Option<(Counter, Counter)>,
    /// `grpc_type`, `grpc_service`, `grpc_method`.
    grpc_labels: Labels,
    started: Counter,
    handled: Family<Labels, Counter>,
    handled_by_code: [OnceLock<Counter>; 17],
    handling: Histogram,
}

impl MethodMetrics {
    fn start(&self) {
        self.in_flight.inc();
        self.started.inc();
    }

    fn finish(&self, code: i32, elapsed: Duration) {
        self.in_flight.dec();
        self.latency.observe(elapsed.as_secs_f64());
        self.handling.observe(elapsed.as_secs_f64());
        let i = code.clamp(0, 16) as usize;
        let by_code = |family: &Family<Labels, Counter>, labels: &Labels, name: &'static str, value: &str| {
            let mut l = labels.clone();
            l.push((name, value.to_string()));
            family.get_or_create(&l).clone()
        };
        self.by_code[i].get_or_init(|| by_code(&self.requests, &self.labels, "code", code_name(i as i32))).inc();
        self.handled_by_code[i]
            .get_or_init(|| by_code(&self.handled, &self.grpc_labels, "grpc_code", go_code_name(i as i32)))
            .inc();
        if let Some((hits, misses)) = &self.ac_lookups {
            match tonic::Code::from_i32(code) {
                tonic::Code::Ok => hits.inc(),
                tonic::Code::NotFound => misses.inc(),
                _ => 0,
            };
        }
    }
}

/// The code's canonical name (`NOT_FOUND`), as provcache's own metrics and logs spell it.
pub(crate) fn code_name(code: i32) -> &'static str {
    use tonic::Code::*;
    match tonic::Code::from_i32(code) {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The code's name as go-grpc-prometheus's `grpc_code` label spells it (Go's `codes.Code`).
fn go_code_name(code: i32) -> &'static str {
    use tonic::Code::*;
    match tonic::Code::from_i32(code) {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

/// go-grpc-prometheus's `grpc_type` of a method: which side streams.
fn grpc_type(service: &str, method: &str) -> &'static str {
    match (service, method) {
        ("google.bytestream.ByteStream", "Write") => "client_stream",
        ("google.bytestream.ByteStream", "Read")
        | ("build.bazel.remote.execution.v2.ContentAddressableStorage", "GetTree")
        | ("build.bazel.remote.execution.v2.Execution", "Execute" | "WaitExecution")
        | ("grpc.health.v1.Health", "Watch") => "server_stream",
        _ => "unary",
    }
}

impl GrpcMetrics {
    fn new() -> Self {
        GrpcMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            bytes_in: Family::default(),
            bytes_out: Family::default(),
            in_flight: Family::default(),
            ac_lookups: Family::default(),
            started: Family::default(),
            handled: Family::default(),
            handling: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            methods: RwLock::default(),
        }
    }

    /// The metrics of a request path (`/package.Service/Method`).
    pub(crate) fn method(&self, path: &str) -> Arc<MethodMetrics> {
        if let Some(m) = self.methods.read().unwrap_or_else(|p| p.into_inner()).get(path) {
            return m.clone();
        }
        let mut methods = self.methods.write().unwrap_or_else(|p| p.into_inner());
        let key = if methods.len() < MAX_METHODS { path } else { "/other/other" };
        if let Some(m) = methods.get(key) {
            return m.clone();
        }
        let (service, method) = key.trim_start_matches('/').split_once('/').unwrap_or(("unknown", "unknown"));
        let labels: Labels = vec![("service", service.to_string()), ("method", method.to_string())];
        let grpc_labels: Labels = vec![
            ("grpc_type", grpc_type(service, method).to_string()),
            ("grpc_service", service.to_string()),
            ("grpc_method", method.to_string()),
        ];
        let ac_lookups = (method == "GetActionResult").then(|| {
            let hit = self.ac_lookups.get_or_create(&vec![("result", "hit".to_string())]).clone();
            let miss = self.ac_lookups.get_or_create(&vec![("result", "miss".to_string())]).clone();
            (hit, miss)
        });
        let m = Arc::new(MethodMetrics {
            requests: self.requests.clone(),
            by_code: Default::default(),
            latency: self.latency.get_or_create(&labels).clone(),
            bytes_in: self.bytes_in.get_or_create(&labels).clone(),
            bytes_out: self.bytes_out.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            ac_lookups,
            labels,
            started: self.started.get_or_create(&grpc_labels).clone(),
            handled: self.handled.clone(),
            handled_by_code: Default::default(),
            handling: self.handling.get_or_create(&grpc_labels).clone(),
            grpc_labels,
        });
        methods.insert(key.to_string(), m.clone());
        m
    }
}

impl Metrics {
    /// A registry with the request metrics and the state of `store`,
    /// `provenance`, `uploads` and, for a replica, its object store.
    pub fn new(
        store: Arc<RocksStore>,
        provenance: Arc<Provenance>,
        uploads: Arc<Uploads>,
        limit_hits: Arc<crate::limits::LimitHits>,
        replica: Option<Replica>,
    ) -> Arc<Self> {
        let mut root = Registry::default();
        let grpc = Arc::new(GrpcMetrics::new());
        root.register("grpc_server_started", "RPCs started on the server", grpc.started.clone());
        root.register(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status",
            grpc.handled.clone(),
        );
        root.register(
            "grpc_server_handling_seconds",
            "Time from an RPC's request headers to the end of its response",
            grpc.handling.clone(),
        );
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("provcache");
        registry.register("grpc_requests", "gRPC calls answered, by method and status code", grpc.requests.clone());
        registry.register(
            "grpc_request_duration_seconds",
            "Time from a call's request headers to the end of its response",
            grpc.latency.clone(),
        );
        registry.register("grpc_received_bytes", "gRPC message bytes received, by method", grpc.bytes_in.clone());
        registry.register("grpc_sent_bytes", "gRPC message bytes sent, by method", grpc.bytes_out.clone());
        registry.register("grpc_requests_in_flight", "gRPC calls being answered", grpc.in_flight.clone());
        registry.register(
            "action_cache_lookups",
            "GetActionResult answers: hit (served) or miss (NOT_FOUND, including results that failed verification)",
            grpc.ac_lookups.clone(),
        );
        let denied = Family::<Labels, Counter>::default();
        registry.register(
            "denied_calls",
            "Calls refused by the authorization gate, by permission asked and reason",
            denied.clone(),
        );
        registry.register(
            "limit_hits",
            "Work refused or cut off by a limit (docs/operations.md, Limits), by limit and principal",
            limit_hits.family(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason (unknown_ca, expired, revoked, no_client_certificate, not_tls, ...)",
            crate::observe::tls::handshake_failures(),
        );
        registry.register_collector(Box::new(StateCollector { store, provenance, uploads, replica }));
        Arc::new(Metrics { registry: root, grpc, denied, serving: true.into() })
    }

    /// What `/healthz` answers: 200 while serving, 503 once shutting down.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, std::sync::atomic::Ordering::Relaxed);
    }

    /// The layer that measures every call.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer { metrics: Some(self.grpc.clone()), ..Default::default() }
    }

    /// Wraps a gate so that its denials are counted.
    pub fn gate(self: &Arc<Self>, inner: SharedGate) -> SharedGate {
        Arc::new(CountingGate { inner, metrics: self.clone() })
    }

    /// The text exposition (OpenMetrics).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Counts the denials of the gate it wraps.
struct CountingGate {
    inner: SharedGate,
    metrics: Arc<Metrics>,
}

impl Gate for CountingGate {
    fn authorize(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> Result<Caller, Error> {
        self.count(permission, self.inner.authorize(peer, instance, permission))
    }

    fn authorize_anywhere(&self, peer: &Peer, permission: Permission) -> Result<Caller, Error> {
        self.count(permission, self.inner.authorize_anywhere(peer, permission))
    }

    fn allows(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> bool {
        // A probe (Capabilities' update_enabled), not a refused call.
        self.inner.allows(peer, instance, permission)
    }
}

impl CountingGate {
    fn count(&self, permission: Permission, result: Result<Caller, Error>) -> Result<Caller, Error> {
        if let Err(e) = &result {
            let reason = match e {
                Error::Unauthenticated(_) => "unauthenticated",
                Error::PermissionDenied(_) => "permission_denied",
                _ => "error",
            };
            let labels = vec![("permission", permission.as_str().to_string()), ("reason", reason.to_string())];
            self.metrics.denied.get_or_create(&labels).inc();
        }
        result
    }
}

/// Reads, at each scrape, what other components count.
#[derive(Debug)]
struct StateCollector {
    store: Arc<RocksStore>,
    provenance: Arc<Provenance>,
    uploads: Arc<Uploads>,
    replica: Option<Replica>,
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, values: &[(&str, &str, i64)]) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, ConstGauge::new(0i64).metric_type())?;
    encode_values(m, values, |m, v| ConstGauge::new(v).encode(m))
}

fn counter_f64(e: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, ConstCounter::new(0.0f64).metric_type())?;
    ConstCounter::new(value).encode(m)
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, values: &[(&str, &str, i64)]) -> std::fmt::Result {
    let m = e.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    encode_values(m, values, |m, v| ConstCounter::new(v.max(0) as u64).encode(m))
}

/// Values given as (label name, label value, value); a single value with an
/// empty label name has no label.
fn encode_values(
    mut m: prometheus_client::encoding::MetricEncoder<'_>,
    values: &[(&str, &str, i64)],
    f: impl Fn(prometheus_client::encoding::MetricEncoder<'_>, i64) -> std::fmt::Result,
) -> std::fmt::Result {
    if let [("", _, n)] = values {
        return f(m, *n);
    }
    for (k, v, n) in values {
        f(m.encode_family(&[(*k, *v)])?, *n)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let u = self.store.usage();
        gauge(
            &mut e,
            "stored_bytes",
            "Accounted bytes stored: blobs and Action Cache values",
            &[("kind", "blob", u.blob_bytes as i64), ("kind", "action", u.action_bytes as i64)],
        )?;
        gauge(
            &mut e,
            "stored_records",
            "Blobs and Action Cache entries stored",
            &[("kind", "blob", u.blobs as i64), ("kind", "action", u.actions as i64)],
        )?;
        if let Some(max) = self.store.max_size() {
            gauge(&mut e, "max_size_bytes", "The size bound (--max-size)", &[("", "", max as i64)])?;
        }
        let ev = self.store.evictions();
        counter(
            &mut e,
            "evictions",
            "Records evicted to stay under --max-size",
            &[("kind", "blob", ev.blobs as i64), ("kind", "action", ev.actions as i64)],
        )?;
        counter(&mut e, "evicted_bytes", "Accounted bytes evicted", &[("", "", ev.bytes as i64)])?;
        gauge(
            &mut e,
            "uploads_in_progress",
            "ByteStream uploads in progress (resumable sessions)",
            &[("", "", self.uploads.len() as i64)],
        )?;

        let c = self.provenance.counters();
        counter(
            &mut e,
            "verifications",
            "Action Cache entries verified on read, by outcome",
            &[
                ("outcome", "verified", c.verified() as i64),
                ("outcome", "failed", c.by_reason().iter().map(|(_, n)| *n as i64).sum()),
            ],
        )?;
        counter(
            &mut e,
            "verification_cache_hits",
            "Verifications answered from the cache of verified entries",
            &[("", "", c.cache_hits() as i64)],
        )?;
        let reasons: Vec<(&str, &str, i64)> = c.by_reason().into_iter().map(|(r, n)| ("reason", r, n as i64)).collect();
        counter(&mut e, "verification_failures", "Action Cache entries that failed verification, by reason", &reasons)?;
        counter(&mut e, "signatures", "Action Cache entries signed", &[("", "", c.signed() as i64)])?;
        counter(
            &mut e,
            "signing_refused",
            "Action Cache writes refused for want of a usable signing key",
            &[("", "", c.sign_refused() as i64)],
        )?;
        if let Some(replica) = &self.replica {
            replica::encode(&mut e, replica)?;
        }
        reloads::encode(&mut e)?;
        gauge(
            &mut e,
            "build_info",
            "Always 1; the label is the version",
            &[("version", env!("CARGO_PKG_VERSION"), 1)],
        )?;
        let x = crate::observe::tls::expiry();
        let certs: Vec<(&str, &str, i64)> = [("server", x.server), ("client_ca", x.client_ca)]
            .into_iter()
            .filter_map(|(which, at)| Some(("certificate", which, at?)))
            .collect();
        if !certs.is_empty() {
            gauge(
                &mut e,
                "tls_certificate_expiry_timestamp_seconds",
                "When the earliest certificate of the server chain or of the client CAs expires (Unix time)",
                &certs,
            )?;
        }
        if let Some(at) = x.crl_next_update {
            gauge(
                &mut e,
                "crl_next_update_timestamp_seconds",
                "The earliest nextUpdate of the CRLs in use (Unix time): renew them before",
                &[("", "", at)],
            )?;
        }
        Ok(())
    }
}

/// The `process_*` metrics, without the `provcache_` prefix.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        process::encode(&mut e)
    }
}

/// Serves `GET /metrics` (and `GET /healthz`: 200 while serving) over
/// HTTP/1.1 on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use http_body_util::Full;
    use hyper::{Method, Response, StatusCode};

    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let metrics = metrics.clone();
                async move {
                    let (status, content_type, body) = match (req.method(), req.uri().path()) {
                        (&Method::GET, "/metrics") => (
                            StatusCode::OK,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            metrics.encode(),
                        ),
                        (&Method::GET, "/healthz") if metrics.serving.load(std::sync::atomic::Ordering::Relaxed) => {
                            (StatusCode::OK, "text/plain", "SERVING\n".to_string())
                        }
                        (&Method::GET, "/healthz") => {
                            (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "NOT_SERVING\n".to_string())
                        }
                        _ => (StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".to_string()),
                    };
                    let response = Response::builder()
                        .status(status)
                        .header(hyper::header::CONTENT_TYPE, content_type)
                        .body(Full::new(bytes::Bytes::from(body)))
                        .expect("a valid response");
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

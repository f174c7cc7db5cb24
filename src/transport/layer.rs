//! The tower layer in front of every gRPC service that bounds what a call
//! costs before its handler decides anything:
//!
//! - a call the caller could never be allowed (no permission the method
//!   needs on any instance, or no identity) is answered `PERMISSION_DENIED`
//!   or `UNAUTHENTICATED` at once, trailers-only, without reading its body;
//! - every request body is wrapped: the gRPC 5-byte prefix of each message
//!   is read and the message's declared length charged to the
//!   [`RequestBudget`] (the caller's share, then the global pool) before its
//!   bytes are pulled from HTTP/2; a message that can never fit is refused
//!   with `RESOURCE_EXHAUSTED` naming the limit;
//! - a request stream that sends nothing for `stream_idle_timeout` is cut
//!   (`DEADLINE_EXCEEDED`), and every call but ByteStream Write (whose
//!   length is the upload's) gets at most `request_timeout` to answer.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use tokio::time::{Instant, Sleep};
use tonic::Status;

use super::budget::{Refusal, RequestBudget, Reservation, Share};
use crate::access::gate::{Peer, Permission, SharedGate};
use crate::limits::{LimitHits, Limits};

/// The only method whose request is a stream of unbounded length.
const BYTESTREAM_WRITE: &str = "/google.bytestream.ByteStream/Write";

/// Longest a message waits for request budget before it is refused; a
/// stream waiting is making no progress either, so it is also bounded by
/// `stream_idle_timeout`.
const BUDGET_WAIT: Duration = Duration::from_secs(10);

/// The permission a method needs (on some instance), for refusing a call
/// before its body is read. `None`: no single permission (Capabilities needs
/// any one, Health none), so the call is only identified for the budget.
pub fn method_permission(path: &str) -> Option<Permission> {
    const AC: &str = "/build.bazel.remote.execution.v2.ActionCache/";
    const CAS: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/";
    const BS: &str = "/google.bytestream.ByteStream/";
    if let Some(m) = path.strip_prefix(AC) {
        return match m {
            "GetActionResult" => Some(Permission::AcRead),
            "UpdateActionResult" => Some(Permission::AcWrite),
            _ => None,
        };
    }
    if let Some(m) = path.strip_prefix(CAS) {
        return match m {
            "FindMissingBlobs" | "BatchReadBlobs" | "GetTree" => Some(Permission::CasRead),
            "BatchUpdateBlobs" => Some(Permission::CasWrite),
            _ => None,
        };
    }
    if let Some(m) = path.strip_prefix(BS) {
        return match m {
            "Read" => Some(Permission::CasRead),
            "Write" | "QueryWriteStatus" => Some(Permission::CasWrite),
            _ => None,
        };
    }
    path.starts_with("/provcache.v1.Audit/").then_some(Permission::AuditRead)
}

struct Shared {
    /// The gate the services use (refusals are logged and counted).
    gate: SharedGate,
    /// The bare gate, asked quietly who a caller is.
    probe: SharedGate,
    budget: Arc<RequestBudget>,
    hits: Arc<LimitHits>,
    request_timeout: Duration,
    idle_timeout: Duration,
}

/// See the module documentation.
#[derive(Clone)]
pub struct TransportLayer(Arc<Shared>);

impl std::fmt::Debug for TransportLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportLayer").field("budget", &self.0.budget).finish_non_exhaustive()
    }
}

impl TransportLayer {
    /// A layer refusing through `gate` (the services' gate, which logs and
    /// counts refusals), identifying callers of methods without a single
    /// permission through `probe` (the bare gate: asking it logs nothing),
    /// charging `budget`, and cutting calls by `limits`.
    pub fn new(
        gate: SharedGate,
        probe: SharedGate,
        budget: Arc<RequestBudget>,
        hits: Arc<LimitHits>,
        limits: &Limits,
    ) -> Self {
        TransportLayer(Arc::new(Shared {
            gate,
            probe,
            budget,
            hits,
            request_timeout: limits.request_timeout,
            idle_timeout: limits.stream_idle_timeout,
        }))
    }
}

impl<S> tower_layer::Layer<S> for TransportLayer {
    type Service = TransportService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TransportService { inner, shared: self.0.clone() }
    }
}

/// See [`TransportLayer`].
#[derive(Clone)]
pub struct TransportService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> std::fmt::Debug for TransportService<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportService").finish_non_exhaustive()
    }
}

/// The verified certificate chain and address of a call, from what tonic
/// put in the request's extensions.
fn peer_of<B>(req: &http::Request<B>) -> Peer {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let forwarded_client_cert = crate::access::proxy::forwarded_client_cert(req.headers());
    if let Some(tls) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() {
        return Peer { certs: tls.peer_certs(), remote_addr: tls.get_ref().remote_addr(), forwarded_client_cert };
    }
    let remote_addr = req.extensions().get::<TcpConnectInfo>().and_then(|i| i.remote_addr());
    Peer { certs: None, remote_addr, forwarded_client_cert }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> tower_service::Service<http::Request<tonic::body::Body>> for TransportService<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let shared = self.shared.clone();
        let peer = peer_of(&req);
        // The path and the principal are only needed when a call times out:
        // shared handles, not copies, on every call.
        let uri = req.uri().clone();
        let path = uri.path();
        let share = match method_permission(path) {
            Some(permission) => match shared.gate.authorize_anywhere(&peer, permission) {
                Ok(caller) => shared.budget.share(Some(&caller.principal)),
                // The body is never polled: the stream is reset unread.
                Err(e) => return Box::pin(std::future::ready(Ok(Status::from(e).into_http()))),
            },
            None => {
                let caller = Permission::ALL.iter().find_map(|p| shared.probe.authorize_anywhere(&peer, *p).ok());
                shared.budget.share(caller.as_ref().map(|c| c.principal.as_str()))
            }
        };
        let caller = share.clone();
        let req = req.map(|body| tonic::body::Body::new(BudgetedBody::new(body, share, shared.clone())));
        let fut = self.inner.call(req);
        if path == BYTESTREAM_WRITE {
            return Box::pin(fut);
        }
        Box::pin(async move {
            match tokio::time::timeout(shared.request_timeout, fut).await {
                Ok(result) => result,
                Err(_) => {
                    let detail = format!("{} took longer than {:?}", uri.path(), shared.request_timeout);
                    shared.hits.hit("request_timeout", caller.principal(), &detail);
                    Ok(Status::deadline_exceeded(format!("{detail} (limit request_timeout)")).into_http())
                }
            }
        })
    }
}

/// Where the parser is in a frame of request data.
enum Walk {
    /// Every byte of the frame is accounted for: pass it on.
    Done,
    /// A message of this many bytes begins: reserve them first.
    Reserve(u32),
}

/// A request body that charges each message to the budget before pulling
/// its bytes, and fails when the client sends nothing for the idle timeout.
struct BudgetedBody {
    inner: tonic::body::Body,
    shared: Arc<Shared>,
    share: Arc<Share>,
    /// The prefix of the next message, as far as received.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    reservation: Option<Reservation>,
    /// A data frame being accounted for, and how far.
    frame: Option<Bytes>,
    walked: usize,
    acquiring: Option<BoxFuture<Result<Reservation, Refusal>>>,
    idle: Pin<Box<Sleep>>,
    /// Whether the idle timer runs (reset when the wait for the client begins).
    waiting: bool,
    done: bool,
}

impl BudgetedBody {
    fn new(inner: tonic::body::Body, share: Arc<Share>, shared: Arc<Shared>) -> Self {
        let idle = Box::pin(tokio::time::sleep(shared.idle_timeout));
        BudgetedBody {
            inner,
            shared,
            share,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            reservation: None,
            frame: None,
            walked: 0,
            acquiring: None,
            idle,
            waiting: false,
            done: false,
        }
    }

    /// Accounts for the current frame's bytes from where it stopped.
    fn walk(&mut self) -> Walk {
        let data = self.frame.as_ref().expect("walk needs a frame");
        while self.walked < data.len() {
            let rest = &data[self.walked..];
            if self.remaining == 0 {
                let take = rest.len().min(5 - self.prefix_len);
                self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&rest[..take]);
                self.prefix_len += take;
                self.walked += take;
                if self.prefix_len == 5 {
                    self.prefix_len = 0;
                    let len = u32::from_be_bytes([self.prefix[1], self.prefix[2], self.prefix[3], self.prefix[4]]);
                    if len > 0 {
                        self.remaining = u64::from(len);
                        return Walk::Reserve(len);
                    }
                }
            } else {
                let take = (rest.len() as u64).min(self.remaining);
                self.walked += take as usize;
                self.remaining -= take;
                if self.remaining == 0 {
                    // The message is whole: tonic decodes it from here.
                    self.reservation = None;
                }
            }
        }
        Walk::Done
    }

    fn fail(&mut self, limit: &'static str, code: tonic::Code, detail: String) -> Status {
        self.shared.hits.hit(limit, self.share.principal(), &detail);
        self.done = true;
        self.frame = None;
        self.reservation = None;
        self.acquiring = None;
        Status::new(code, format!("{detail} (limit {limit})"))
    }
}

impl HttpBody for BudgetedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(acquiring) = &mut this.acquiring {
                match acquiring.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(reservation)) => {
                        this.acquiring = None;
                        this.reservation = Some(reservation);
                    }
                    Poll::Ready(Err(refusal)) => {
                        let status = this.fail(refusal.limit, tonic::Code::ResourceExhausted, refusal.detail);
                        return Poll::Ready(Some(Err(status)));
                    }
                }
            }
            if this.frame.is_some() {
                match this.walk() {
                    Walk::Done => {
                        let data = this.frame.take().expect("checked above");
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Walk::Reserve(len) => {
                        let (shared, share) = (this.shared.clone(), this.share.clone());
                        let wait = BUDGET_WAIT.min(shared.idle_timeout);
                        this.acquiring = Some(Box::pin(async move { shared.budget.reserve(&share, len, wait).await }));
                        continue;
                    }
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    this.waiting = false;
                    match frame.into_data() {
                        Ok(data) => {
                            this.frame = Some(data);
                            this.walked = 0;
                        }
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    this.reservation = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.reservation = None;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    let idle = this.shared.idle_timeout;
                    if !this.waiting {
                        this.waiting = true;
                        this.idle.as_mut().reset(Instant::now() + idle);
                    }
                    if this.idle.as_mut().poll(cx).is_ready() {
                        let detail = format!("the request stream sent nothing for {idle:?}");
                        let status = this.fail("stream_idle_timeout", tonic::Code::DeadlineExceeded, detail);
                        return Poll::Ready(Some(Err(status)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.frame.is_none() && self.acquiring.is_none() && self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::gate::AllowAll;
    use crate::limits::LimitsConfig;
    use futures::StreamExt;
    use http_body_util::BodyExt;

    const WHO: &str = "anonymous";

    fn shared(global: u64, per_identity: u64, idle: Duration) -> Arc<Shared> {
        let gate: SharedGate = Arc::new(AllowAll);
        Arc::new(Shared {
            gate: gate.clone(),
            probe: gate,
            budget: Arc::new(RequestBudget::new(global, per_identity, 1)),
            hits: Arc::new(LimitHits::default()),
            request_timeout: LimitsConfig::default().resolve().unwrap().request_timeout,
            idle_timeout: idle,
        })
    }

    /// A request body of `frames`, then silence (a stalled client).
    fn stalled_body(frames: Vec<&'static [u8]>) -> tonic::body::Body {
        let frames = frames.into_iter().map(|f| Ok::<_, Status>(Frame::data(Bytes::from_static(f))));
        let stream = futures::stream::iter(frames).chain(futures::stream::pending());
        tonic::body::Body::new(http_body_util::StreamBody::new(stream))
    }

    fn budgeted(shared: &Arc<Shared>, frames: Vec<&'static [u8]>) -> (BudgetedBody, Arc<Share>) {
        let share = shared.budget.share(Some(WHO));
        (BudgetedBody::new(stalled_body(frames), share.clone(), shared.clone()), share)
    }

    #[tokio::test]
    async fn a_message_is_charged_before_its_bytes_are_passed_on_and_released_once_whole() {
        let shared = shared(100, 50, Duration::from_secs(60));
        // One message of 40 bytes in two frames, the second with the next prefix.
        let (mut body, share) =
            budgeted(&shared, vec![&b"\0\0\0\0\x28 ten bytes"[..], &b"and the thirty other bytes!!!!\0\0\0\0\x05"[..]]);
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), 15);
        assert_eq!(share.in_use(), 40, "the whole declared message is charged");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second.len(), 35);
        assert_eq!(share.in_use(), 5, "the first message is released, the next one charged");
        assert_eq!(shared.budget.in_use(), 5);
    }

    #[tokio::test]
    async fn a_message_longer_than_the_share_is_refused_before_its_bytes_are_read() {
        let shared = shared(100, 50, Duration::from_secs(60));
        let (mut body, share) = budgeted(&shared, vec![&b"\0\0\0\0\x33 fifty-one bytes declared"[..]]);
        let status = body.frame().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("max_request_bytes_per_identity"), "{status:?}");
        assert_eq!(share.in_use(), 0);
        assert_eq!(shared.hits.count("max_request_bytes_per_identity", WHO), 1);
        assert!(body.frame().await.is_none(), "the body ends after the refusal");
    }

    #[tokio::test]
    async fn a_request_stream_that_stalls_is_cut_after_the_idle_timeout_and_its_budget_released() {
        let shared = shared(100, 50, Duration::from_millis(300));
        let (mut body, share) = budgeted(&shared, vec![&b"\0\0\0\0\x28 ten bytes"[..]]);
        body.frame().await.unwrap().unwrap();
        assert_eq!(share.in_use(), 40);
        let started = Instant::now();
        let status = body.frame().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(status.message().contains("stream_idle_timeout"), "{status:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(share.in_use(), 0);
        assert_eq!(shared.hits.count("stream_idle_timeout", WHO), 1);
    }

    #[tokio::test]
    async fn a_message_waits_for_budget_held_by_the_same_caller_then_is_refused() {
        // The wait for budget is bounded by the idle timeout.
        let shared = shared(100, 50, Duration::from_millis(300));
        let (mut holder, share) = budgeted(&shared, vec![&b"\0\0\0\0\x28 ten bytes"[..]]);
        holder.frame().await.unwrap().unwrap();
        let (mut waiter, _) = budgeted(&shared, vec![&b"\0\0\0\0\x14 twenty bytes"[..]]);
        let status = waiter.frame().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("waited"), "{status:?}");
        assert_eq!(share.in_use(), 40, "the holder keeps its reservation");
        drop(holder);
        assert_eq!(share.in_use(), 0);
    }

    #[test]
    fn every_method_that_reads_or_writes_data_names_its_permission() {
        let p = |m: &str| method_permission(m);
        assert_eq!(p("/build.bazel.remote.execution.v2.ActionCache/GetActionResult"), Some(Permission::AcRead));
        assert_eq!(p("/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"), Some(Permission::AcWrite));
        for m in ["FindMissingBlobs", "BatchReadBlobs", "GetTree"] {
            let path = format!("/build.bazel.remote.execution.v2.ContentAddressableStorage/{m}");
            assert_eq!(p(&path), Some(Permission::CasRead), "{m}");
        }
        assert_eq!(
            p("/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"),
            Some(Permission::CasWrite)
        );
        assert_eq!(p("/google.bytestream.ByteStream/Read"), Some(Permission::CasRead));
        assert_eq!(p("/google.bytestream.ByteStream/Write"), Some(Permission::CasWrite));
        assert_eq!(p("/google.bytestream.ByteStream/QueryWriteStatus"), Some(Permission::CasWrite));
        assert_eq!(p("/provcache.v1.Audit/ListInvocationHits"), Some(Permission::AuditRead));
        assert_eq!(p("/build.bazel.remote.execution.v2.Capabilities/GetCapabilities"), None);
        assert_eq!(p("/grpc.health.v1.Health/Check"), None);
    }
}

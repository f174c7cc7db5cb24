//! The one place requests are measured: a tower layer in front of every gRPC
//! service. It reads the method from the path and the status from the
//! `grpc-status` header (trailers-only answers) or trailer, counts body bytes
//! both ways, and records when the response body ends or is dropped, so a
//! streamed call's latency covers the whole stream. The same record makes the
//! access log's line ([`crate::observe::request_log::access_line`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::{GrpcMetrics, MethodMetrics};
use crate::observe::call::CallRecord;

/// Adds request metrics and the access log to a service; a pass-through
/// when both are off.
#[derive(Clone, Debug, Default)]
pub struct MetricsLayer {
    pub(super) metrics: Option<Arc<GrpcMetrics>>,
    pub(super) access_log: bool,
}

impl MetricsLayer {
    /// The layer, also logging every finished call when `on`.
    pub fn with_access_log(self, on: bool) -> Self {
        MetricsLayer { access_log: on, ..self }
    }
}

impl<S> tower_layer::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.metrics.clone(), access_log: self.access_log }
    }
}

/// See [`MetricsLayer`].
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Option<Arc<GrpcMetrics>>,
    access_log: bool,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ResBody> tower_service::Service<http::Request<tonic::body::Body>> for MetricsService<S>
where
    S: tower_service::Service<http::Request<tonic::body::Body>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: HttpBody<Data = Bytes> + Unpin + Send + 'static,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let call = req.extensions().get::<Arc<CallRecord>>().filter(|_| self.access_log).cloned();
        if self.metrics.is_none() && call.is_none() {
            let fut = self.inner.call(req);
            return Box::pin(async move { Ok(fut.await?.map(|inner| CountedBody { inner, recorder: None })) });
        }
        let method = self.metrics.as_ref().map(|m| m.method(req.uri().path()));
        let inbound = Recorder::new(method.clone(), call.clone(), true);
        let req = req.map(|inner| tonic::body::Body::new(CountedBody { inner, recorder: Some(inbound) }));
        if let Some(m) = &method {
            m.start();
        }
        let mut recorder = Recorder::new(method, call, false);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            recorder.code = grpc_status(response.headers());
            Ok(response.map(|inner| CountedBody { inner, recorder: Some(recorder) }))
        })
    }
}

/// Looked up by a prepared name: a `&str` key would be parsed on every call.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// Records one call when dropped: at the end of the response body, or earlier
/// if the call failed or the client went away.
struct Recorder {
    /// The method's metrics, when metrics are on.
    method: Option<Arc<MethodMetrics>>,
    /// The call's record, when the access log is on.
    call: Option<Arc<CallRecord>>,
    started: Instant,
    code: Option<i32>,
    /// Body bytes seen by this recorder.
    bytes: u64,
    /// Counts request bytes only (the inbound body's recorder).
    inbound: bool,
}

impl Recorder {
    fn new(method: Option<Arc<MethodMetrics>>, call: Option<Arc<CallRecord>>, inbound: bool) -> Self {
        Recorder { method, call, started: Instant::now(), code: None, bytes: 0, inbound }
    }

    fn bytes(&mut self, n: usize) {
        self.bytes += n as u64;
        match &self.method {
            Some(m) if self.inbound => m.bytes_in.inc_by(n as u64),
            Some(m) => m.bytes_out.inc_by(n as u64),
            None => 0,
        };
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if self.inbound {
            if let Some(call) = &self.call {
                call.bytes_in.fetch_add(self.bytes, std::sync::atomic::Ordering::Relaxed);
            }
            return;
        }
        // No status at all: the client cancelled (or the server broke the stream).
        let code = self.code.unwrap_or(tonic::Code::Cancelled as i32);
        let elapsed = self.started.elapsed();
        if let Some(m) = &self.method {
            m.finish(code, elapsed);
        }
        if let Some(call) = &self.call {
            crate::observe::request_log::access_line(call, code, elapsed, self.bytes);
        }
    }
}

/// A body that counts its data bytes and, for responses, the call's status.
pub struct CountedBody<B> {
    inner: B,
    recorder: Option<Recorder>,
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Some(rec) = &mut this.recorder {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        rec.bytes(data.len());
                    } else if let Some(trailers) = frame.trailers_ref() {
                        rec.code = grpc_status(trailers).or(rec.code);
                    }
                }
                Poll::Ready(None) => {
                    if !rec.inbound && rec.code.is_none() {
                        rec.code = Some(tonic::Code::Unknown as i32);
                    }
                    this.recorder = None;
                }
                Poll::Ready(Some(Err(_))) => {
                    if !rec.inbound {
                        rec.code = Some(tonic::Code::Internal as i32);
                    }
                    this.recorder = None;
                }
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A unary call's response: one message, then OK in the trailers.
    fn respond(
        _: http::Request<tonic::body::Body>,
    ) -> std::future::Ready<Result<http::Response<tonic::body::Body>, Infallible>> {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames = vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        std::future::ready(Ok(http::Response::new(tonic::body::Body::new(body))))
    }

    async fn call(
        svc: &mut impl Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<CountedBody<tonic::body::Body>>,
            Error = Infallible,
        >,
    ) {
        let req = http::Request::builder()
            .uri("/build.bazel.remote.execution.v2.ActionCache/GetActionResult")
            .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\x01x"))))
            .unwrap();
        let resp = svc.call(req).await.unwrap();
        http_body_util::BodyExt::collect(resp.into_body()).await.unwrap();
    }

    #[tokio::test]
    async fn records_code_latency_and_bytes_of_a_call() {
        let grpc = Arc::new(GrpcMetrics::new());
        let mut svc = MetricsLayer { metrics: Some(grpc.clone()), access_log: false }.layer(tower::service_fn(respond));
        call(&mut svc).await;
        let m = grpc.method("/build.bazel.remote.execution.v2.ActionCache/GetActionResult");
        assert_eq!(m.by_code[0].get().map(|c| c.get()), Some(1));

        assert_eq!(m.bytes_out.get(), 7);
        assert_eq!(m.in_flight.get(), 0);
        assert_eq!(m.ac_lookups.as_ref().unwrap().0.get(), 1, "a hit");
    }

    /// What the layer adds to a call (run with `--ignored --nocapture`).
    #[tokio::test]
    #[ignore = "a measurement"]
    async fn cost_per_call() {
        let grpc = Arc::new(GrpcMetrics::new());
        for on in [false, true, false, true] {
            let mut svc =
                MetricsLayer { metrics: on.then(|| grpc.clone()), access_log: false }.layer(tower::service_fn(respond));
            let n = 200_000;
            let t = std::time::Instant::now();
            for _ in 0..n {
                call(&mut svc).await;
            }
            eprintln!("metrics {}: {:?} per call", if on { "on " } else { "off" }, t.elapsed() / n);
        }
    }
}

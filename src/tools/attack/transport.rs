//! Attacks through the transport: stalled HTTP/2 streams, idle TLS handshakes.
//!
//! Each function reproduces a hostile client of issue 13 against a server
//! the caller runs (loopback), bounded in count and time, and reports what
//! the server did; the tests assert the server's bounds with it and the
//! measurements time an honest client ([`honest_call`]) while it runs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// The name the development server certificate is issued for.
const SERVER_NAME: &str = "localhost";

/// Zeros to send without allocating: message bytes are sent as slices of it.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A client's TLS material (PEM): the CA that issued the server's
/// certificate, and the client certificate and key (none: no certificate).
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// CA certificate(s).
    pub ca: Vec<u8>,
    /// Client certificate chain and its key.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Reads the CA and, when given, a client certificate and key.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> anyhow::Result<Self> {
        let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let identity = match identity {
            Some((cert, key)) => Some((read(cert)?, read(key)?)),
            None => None,
        };
        Ok(ClientTls { ca: read(ca)?, identity })
    }

    /// The development PKI's client `name` (`writer`, `reader`, ...) in `dir`.
    pub fn dev(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
        Self::from_files(&dir.join("ca.pem"), Some((&cert, &key)))
    }

    fn rustls(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&self.ca) {
            roots.add(ca.context("CA certificate")?)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.identity {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// A tonic channel to `addr` with this material, from `local` when given.
    pub async fn channel(&self, addr: SocketAddr, local: Option<IpAddr>) -> anyhow::Result<tonic::transport::Channel> {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca)).domain_name(SERVER_NAME);
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        let endpoint = Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls)?.local_address(local);
        Ok(endpoint.connect().await?)
    }
}

/// An honest client's GetCapabilities on a new connection (TCP, TLS, one
/// call), from `local` when given; returns how long it took.
pub async fn honest_call(
    addr: SocketAddr,
    tls: &ClientTls,
    local: Option<IpAddr>,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    use crate::proto::reapi::{capabilities_client::CapabilitiesClient, GetCapabilitiesRequest};
    let started = Instant::now();
    tokio::time::timeout(deadline, async {
        let channel = tls.channel(addr, local).await?;
        CapabilitiesClient::new(channel).get_capabilities(GetCapabilitiesRequest::default()).await?;
        anyhow::Ok(())
    })
    .await
    .with_context(|| format!("no answer within {deadline:?}"))??;
    Ok(started.elapsed())
}

/// Many streams on one HTTP/2 connection, each declaring a large gRPC
/// message and sending all of it but the last byte, then nothing.
#[derive(Clone, Debug)]
pub struct StalledStreams {
    /// The method, e.g. `/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs`.
    pub path: String,
    /// Streams to open, one after the other as the server allows.
    pub streams: usize,
    /// The declared message length (the attack: 8 MiB).
    pub declared: u32,
    /// How long the attack lasts; then every stream is dropped.
    pub duration: Duration,
}

/// What the server did to a [`StalledStreams`] attack.
#[derive(Clone, Debug, Default)]
pub struct StalledReport {
    /// Streams handed to HTTP/2 (the server may not have accepted them yet).
    pub opened: usize,
    /// Streams the server answered, by gRPC status name (`PermissionDenied`, ...).
    pub answered: BTreeMap<String, usize>,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS as the client saw it.
    pub max_concurrent_streams: usize,
}

/// Runs a [`StalledStreams`] attack on `addr` with the identity of `tls`.
pub async fn stalled_streams(
    addr: SocketAddr,
    tls: &ClientTls,
    attack: &StalledStreams,
) -> anyhow::Result<StalledReport> {
    let until = tokio::time::Instant::now() + attack.duration;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(SERVER_NAME)?;
    let io = tokio_rustls::TlsConnector::from(tls.rustls()?).connect(name, tcp).await?;
    let (mut send, mut connection) = h2::client::handshake(io).await?;
    let mut ping = connection.ping_pong().ok_or_else(|| anyhow::anyhow!("HTTP/2 ping unavailable"))?;
    let driver = tokio::spawn(connection);
    // The server's SETTINGS (its stream limit) precede its answer to a ping:
    // once the pong is back, the limit applies to the streams opened below.
    ping.ping(h2::Ping::opaque()).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut report = StalledReport::default();
    let mut open = Vec::new();
    for _ in 0..attack.streams {
        // Waits while the server's stream limit holds a stream back.
        send = match tokio::time::timeout_at(until, send.clone().ready()).await {
            Ok(ready) => ready?,
            Err(_) => break,
        };
        report.max_concurrent_streams = send.current_max_send_streams();
        let request = http::Request::post(format!("https://{SERVER_NAME}{}", attack.path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut stream) = send.send_request(request, false)?;
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&attack.declared.to_be_bytes());
        // A stream the server already closed refuses more data: its answer
        // is collected below all the same.
        let _ = (|| {
            stream.send_data(Bytes::from(prefix), false)?;
            let mut left = attack.declared.saturating_sub(1) as usize;
            while left > 0 {
                let n = left.min(ZEROS.len());
                stream.send_data(Bytes::from_static(&ZEROS[..n]), false)?;
                left -= n;
            }
            Ok::<_, h2::Error>(())
        })();
        open.push(stream);
        report.opened += 1;
        let tx = tx.clone();
        tokio::spawn(async move {
            let code = match response.await {
                Ok(response) => grpc_code(response).await,
                Err(e) => format!("reset ({e})"),
            };
            let _ = tx.send(code);
        });
    }
    drop(tx);
    while let Ok(Some(code)) = tokio::time::timeout_at(until, rx.recv()).await {
        *report.answered.entry(code).or_default() += 1;
    }
    drop(open);
    drop(send);
    driver.abort();
    Ok(report)
}

/// The gRPC status of a response: from its headers (trailers-only) or trailers.
async fn grpc_code(response: http::Response<h2::RecvStream>) -> String {
    let name = |v: Option<&http::HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
            .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
    };
    if let Some(code) = name(response.headers().get("grpc-status")) {
        return code;
    }
    let mut body = response.into_body();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
    }
    match body.trailers().await {
        Ok(Some(trailers)) => name(trailers.get("grpc-status")).unwrap_or_else(|| "no status".into()),
        Ok(None) => "no status".into(),
        Err(e) => format!("reset ({e})"),
    }
}

/// Many TCP connections that never send a ClientHello.
#[derive(Clone, Debug)]
pub struct IdleSockets {
    /// How many.
    pub count: usize,
    /// The local address to connect from (another loopback address, say).
    pub from: Option<IpAddr>,
    /// How long they are kept open at most.
    pub hold: Duration,
}

/// What the server did to an [`IdleSockets`] attack.
#[derive(Clone, Debug, Default)]
pub struct IdleReport {
    /// Sockets that connected.
    pub connected: usize,
    /// How long after connecting each socket the server closed it, for those
    /// it closed within the hold time.
    pub closed_after: Vec<Duration>,
}

/// Connects the sockets of `attack` to `addr`, sends nothing, and watches
/// for the server to close them. Calls `during` once every socket is
/// connected (the honest client's turn) and returns its result with the report.
pub async fn idle_handshakes<T>(
    addr: SocketAddr,
    attack: &IdleSockets,
    during: impl std::future::Future<Output = T>,
) -> anyhow::Result<(IdleReport, T)> {
    let mut sockets = Vec::with_capacity(attack.count);
    for _ in 0..attack.count {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(ip) = attack.from {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        sockets.push((socket.connect(addr).await?, Instant::now()));
    }
    let connected = sockets.len();
    let watchers: Vec<_> = sockets
        .into_iter()
        .map(|(mut tcp, since)| {
            let hold = attack.hold;
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                // Ok(0) is a FIN, Err a reset: either way the server closed it.
                match tokio::time::timeout(hold, tcp.read(&mut buf)).await {
                    Ok(_) => Some(since.elapsed()),
                    Err(_) => None,
                }
            })
        })
        .collect();
    let result = during.await;
    let mut report = IdleReport { connected, closed_after: Vec::new() };
    for w in watchers {
        if let Some(after) = w.await? {
            report.closed_after.push(after);
        }
    }
    Ok((report, result))
}

//! The TLS acceptor for tonic: accepts TCP connections and runs their
//! handshakes with the configuration of [`crate::access::tls`].
//!
//! [`tls_incoming`] runs handshakes concurrently: a slow or failing client
//! never holds up another, and failures are logged and counted, not yielded.
//! The limits (handshakes in flight, per address, the handshake timeout)
//! keep one client from taking every slot (docs/operations.md, "Limits").

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::limits::{LimitHits, Limits};

/// Limits of the acceptor (docs/operations.md, "Limits").
#[derive(Clone, Debug)]
pub struct IncomingOptions {
    /// A handshake not done in this time is dropped.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; further connections wait in the
    /// listen backlog.
    pub max_concurrent_handshakes: usize,
    /// Handshakes in progress at once from one remote IP address; a further
    /// connection from that address is closed at once, so idle sockets from
    /// one address cannot take every handshake slot.
    pub max_handshakes_per_address: usize,
    /// TCP keepalive idle time set on every accepted socket.
    pub tcp_keepalive: Option<Duration>,
    /// Where refusals by these limits are counted.
    pub hits: Option<Arc<LimitHits>>,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        IncomingOptions::from_limits(&Limits::default(), None)
    }
}

impl IncomingOptions {
    /// The acceptor limits of `limits`, counting refusals in `hits`.
    pub fn from_limits(limits: &Limits, hits: Option<Arc<LimitHits>>) -> Self {
        IncomingOptions {
            handshake_timeout: limits.handshake_timeout,
            max_concurrent_handshakes: limits.max_handshakes,
            max_handshakes_per_address: limits.max_handshakes_per_address,
            tcp_keepalive: Some(limits.tcp_keepalive),
            hits,
        }
    }

    fn hit(&self, limit: &'static str, detail: impl fmt::Display) {
        match &self.hits {
            Some(hits) => hits.hit(limit, "", detail),
            None => tracing::debug!(limit, "limit reached: {detail}"),
        }
    }
}

/// Accepts TCP connections and yields those whose TLS handshake succeeded,
/// for `tonic::transport::Server::serve_with_incoming_shutdown`. Never yields
/// an error. Accepting stops when the stream is dropped. Call it inside a
/// Tokio runtime: it spawns the accept loop.
pub fn tls_incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    tls_incoming_with(listener, config, IncomingOptions::default())
}

/// [`tls_incoming`] with explicit limits.
pub fn tls_incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    options: IncomingOptions,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, TlsAcceptor::from(config), options, tx));
    ReceiverStream::new(rx)
}

/// Sets TCP keepalive on an accepted socket, so the kernel finds a peer that
/// vanished without a FIN (HTTP/2 pings do the same one level up).
pub fn set_tcp_keepalive(tcp: &TcpStream, idle: Duration) -> io::Result<()> {
    socket2::SockRef::from(tcp).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle))
}

/// Handshakes in progress per remote address.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One handshake counted against its address until dropped.
struct AddressSlot(Arc<PerAddress>, IpAddr);

impl PerAddress {
    /// A slot for `ip`, or the number already in progress when it is at `max`.
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Result<AddressSlot, usize> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(AddressSlot(self.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    options: IncomingOptions,
    tx: mpsc::Sender<Result<TlsStream<TcpStream>, io::Error>>,
) {
    let limit = Arc::new(Semaphore::new(options.max_concurrent_handshakes.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let options = Arc::new(options);
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                options.hit(
                    "max_handshakes",
                    format_args!(
                        "{} TLS handshakes in progress; new connections wait",
                        options.max_concurrent_handshakes
                    ),
                );
                tokio::select! {
                    _ = tx.closed() => return,
                    permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                }
            }
        };
        let (tcp, addr) = tokio::select! {
            _ = tx.closed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let ip = addr.ip().to_canonical();
        let slot = match per_address.try_take(ip, options.max_handshakes_per_address.max(1)) {
            Ok(slot) => slot,
            Err(n) => {
                // Closed at once: its permit goes to the next connection.
                options.hit(
                    "max_handshakes_per_address",
                    format_args!("{ip} already has {n} TLS handshakes in progress; connection closed"),
                );
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%addr, error = %e, "cannot set TCP_NODELAY");
        }
        if let Some(idle) = options.tcp_keepalive {
            if let Err(e) = set_tcp_keepalive(&tcp, idle) {
                tracing::debug!(%addr, error = %e, "cannot set TCP keepalive");
            }
        }
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(options.handshake_timeout, acceptor.accept(tcp)).await;
            drop(slot);
            drop(permit);
            match result {
                Ok(Ok(tls)) => {
                    let _ = tx.send(Ok(tls)).await;
                }
                Ok(Err(e)) => crate::observe::tls::handshake_failed(addr, &e),
                Err(_) => options.hit(
                    "handshake_timeout",
                    format_args!("{addr} did not finish its TLS handshake in {:?}", options.handshake_timeout),
                ),
            }
        });
    }
}

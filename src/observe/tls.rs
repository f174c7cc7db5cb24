//! TLS seen from the operator's side: why a client could not connect, and
//! when the certificates in use expire.
//!
//! A failed handshake is logged at WARN with the peer and the reason (so
//! "why can't Bazel connect" has an answer in the log), at most once per
//! address every [`LOG_EVERY`] so a port scan cannot flood the log, and
//! always counted in `provcache_tls_handshake_failures_total{reason}`. The
//! acceptor has no metrics registry, so the counter and the expiry times are
//! process-wide, and the registry exposes them ([`handshake_failures`],
//! [`expiry`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};

/// After a logged failure, further ones from the same address are only
/// counted for this long (the next line says how many were left out).
pub const LOG_EVERY: Duration = Duration::from_secs(60);
/// Addresses remembered for [`LOG_EVERY`]; past it, failures from new
/// addresses are counted without a line until old entries expire.
const MAX_ADDRESSES: usize = 4096;

/// Labels of the handshake failure counter (`reason`).
pub type ReasonLabels = Vec<(&'static str, &'static str)>;

static FAILURES: LazyLock<Family<ReasonLabels, Counter>> = LazyLock::new(Family::default);
static LOGGED: LazyLock<Mutex<Throttle>> = LazyLock::new(Mutex::default);
static EXPIRY: Mutex<Expiry> = Mutex::new(Expiry { server: None, client_ca: None, crl_next_update: None });

/// The counter of failed handshakes by reason, for the metrics registry.
pub fn handshake_failures() -> Family<ReasonLabels, Counter> {
    FAILURES.clone()
}

/// Counts a failed handshake from `peer` and logs it (rate-limited).
pub fn handshake_failed(peer: SocketAddr, error: &io::Error) {
    let reason = reason(error);
    FAILURES.get_or_create(&vec![("reason", reason)]).inc();
    let admitted = LOGGED.lock().unwrap_or_else(|p| p.into_inner()).admit(peer.ip().to_canonical(), Instant::now());
    if let Some(left_out) = admitted {
        tracing::warn!(%peer, reason, hint = hint(reason), %error, left_out, "TLS handshake failed");
    }
}

/// Why a handshake failed, as a metric label.
fn reason(e: &io::Error) -> &'static str {
    use rustls::CertificateError as C;
    use rustls::Error as R;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<R>()) {
        Some(R::InvalidCertificate(C::UnknownIssuer)) => "unknown_ca",
        Some(R::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
        )) => "expired",
        Some(R::InvalidCertificate(C::Revoked)) => "revoked",
        Some(R::InvalidCertificate(_)) => "bad_certificate",
        Some(R::NoCertificatesPresented) => "no_client_certificate",
        Some(R::InvalidMessage(_) | R::InappropriateMessage { .. } | R::InappropriateHandshakeMessage { .. }) => {
            "not_tls"
        }
        Some(R::PeerIncompatible(_)) => "incompatible",
        Some(R::AlertReceived(_)) => "refused_by_client",
        Some(_) => "other",
        None if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
        None => "io",
    }
}

/// What an operator can do about a reason.
fn hint(reason: &str) -> &'static str {
    match reason {
        "unknown_ca" => "the client certificate is not issued by a configured client CA (--client-ca)",
        "expired" => "the client certificate is expired or not yet valid",
        "revoked" => "a configured CRL (--crl) revokes the client certificate",
        "no_client_certificate" => {
            "the client sent no certificate (Bazel: --tls_client_certificate and --tls_client_key)"
        }
        "not_tls" => "the client does not speak TLS (grpc:// instead of grpcs://?)",
        "refused_by_client" => "the client refused the server certificate (Bazel: --tls_certificate is its CA?)",
        "incompatible" => "no TLS version, cipher suite or ALPN protocol (h2) in common",
        _ => "the connection failed during the handshake",
    }
}

/// Which addresses were logged recently.
#[derive(Debug, Default)]
struct Throttle(HashMap<IpAddr, (Instant, u64)>);

impl Throttle {
    /// Whether a failure from `ip` at `now` gets a log line, and if so how
    /// many failures from it were left out since its last line.
    fn admit(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        if let Some((at, left_out)) = self.0.get_mut(&ip) {
            if now.duration_since(*at) < LOG_EVERY {
                *left_out += 1;
                return None;
            }
            let n = std::mem::take(left_out);
            *at = now;
            return Some(n);
        }
        if self.0.len() >= MAX_ADDRESSES {
            self.0.retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
            if self.0.len() >= MAX_ADDRESSES {
                return None;
            }
        }
        self.0.insert(ip, (now, 0));
        Some(0)
    }
}

/// When the certificates in use expire (Unix seconds): the earliest
/// `notAfter` of the server chain and of the client CAs, and the earliest
/// `nextUpdate` of the CRLs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// The server certificate chain.
    pub server: Option<i64>,
    /// The client CA certificates.
    pub client_ca: Option<i64>,
    /// The CRLs (none configured: `None`).
    pub crl_next_update: Option<i64>,
}

/// The expiry times last set, for the metrics registry.
pub fn expiry() -> Expiry {
    *EXPIRY.lock().unwrap_or_else(|p| p.into_inner())
}

/// The earliest `notAfter` of `certs` (Unix time), for the expiry gauges.
pub fn earliest_not_after(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs
        .iter()
        .filter_map(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
}

/// The earliest `nextUpdate` of `crls` (Unix time), for the CRL gauge.
pub fn earliest_next_update(crls: &[CertificateRevocationListDer<'_>]) -> Option<i64> {
    crls.iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c).ok())
        .filter_map(|(_, c)| c.next_update().map(|t| t.timestamp()))
        .min()
}

/// Sets the server certificate's expiry gauge: called each time a server
/// certificate is installed, at start and after a reload.
pub fn set_server_expiry(not_after: Option<i64>) {
    EXPIRY.lock().unwrap_or_else(|p| p.into_inner()).server = not_after;
}

/// Sets the client CAs' expiry and the CRLs' next-update gauges: called
/// each time a client CA set is installed, at start and after a reload.
pub fn set_client_trust_expiry(ca_not_after: Option<i64>, crl_next_update: Option<i64>) {
    let mut e = EXPIRY.lock().unwrap_or_else(|p| p.into_inner());
    e.client_ca = ca_not_after;
    e.crl_next_update = crl_next_update;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_address_per_window_with_the_count_left_out() {
        let mut t = Throttle::default();
        let (a, b) = (IpAddr::from([192, 0, 2, 1]), IpAddr::from([192, 0, 2, 2]));
        let t0 = Instant::now();
        assert_eq!(t.admit(a, t0), Some(0));
        assert_eq!(t.admit(a, t0 + Duration::from_secs(1)), None);
        assert_eq!(t.admit(a, t0 + Duration::from_secs(2)), None);
        assert_eq!(t.admit(b, t0 + Duration::from_secs(2)), Some(0), "another address has its own line");
        assert_eq!(t.admit(a, t0 + LOG_EVERY), Some(2));
    }

    #[test]
    fn a_scan_from_many_addresses_is_bounded() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        let lines = (0..MAX_ADDRESSES as u32 + 100).filter(|i| t.admit(IpAddr::from(i.to_be_bytes()), t0).is_some());
        assert_eq!(lines.count(), MAX_ADDRESSES);
        assert_eq!(t.admit(IpAddr::from([198, 51, 100, 1]), t0 + LOG_EVERY), Some(0), "old entries expire");
    }

    #[test]
    fn reasons_name_what_went_wrong() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        assert_eq!(
            reason(&tls(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))),
            "unknown_ca"
        );
        assert_eq!(reason(&tls(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked))), "revoked");
        assert_eq!(reason(&tls(rustls::Error::NoCertificatesPresented)), "no_client_certificate");
        assert_eq!(reason(&io::Error::from(io::ErrorKind::UnexpectedEof)), "closed");
    }
}

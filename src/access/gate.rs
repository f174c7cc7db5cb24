//! The one authorization gate every RPC passes: who is calling (from the
//! verified client certificate) and may they do this on this instance.
//!
//! `UNAUTHENTICATED` is for identity failures (no certificate, expired,
//! revoked); `PERMISSION_DENIED` for authorization failures.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use crate::cache::resource::InstanceName;
use crate::error::Error;

/// A permission a policy rule can grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Permission {
    /// GetActionResult.
    AcRead,
    /// UpdateActionResult.
    AcWrite,
    /// FindMissingBlobs, BatchReadBlobs, GetTree, ByteStream Read.
    CasRead,
    /// BatchUpdateBlobs, ByteStream Write and QueryWriteStatus.
    CasWrite,
    /// The audit service (hit log, stored entries).
    AuditRead,
}

impl Permission {
    /// Every permission, in policy-file spelling order.
    pub const ALL: [Permission; 5] =
        [Permission::AcRead, Permission::AcWrite, Permission::CasRead, Permission::CasWrite, Permission::AuditRead];

    /// The policy-file spelling (`ac:read`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::AcRead => "ac:read",
            Permission::AcWrite => "ac:write",
            Permission::CasRead => "cas:read",
            Permission::CasWrite => "cas:write",
            Permission::AuditRead => "audit:read",
        }
    }

    /// Parses the policy-file spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Facts about the verified client certificate of a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// SHA-256 of the leaf certificate (DER).
    pub leaf_sha256: [u8; 32],
    /// The leaf's `notAfter`.
    pub not_after: SystemTime,
}

/// An authenticated and authorized caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The identity (a SPIFFE ID by default).
    pub principal: String,
    /// The name of the policy rule that granted the permission.
    pub rule: String,
    /// The client certificate, absent on the explicit plaintext listener.
    pub cert: Option<CertInfo>,
}

/// What the gate sees of a call: the verified certificate chain (leaf first)
/// and the remote address.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// The client's certificate chain as verified by the TLS layer; `None` on
    /// the plaintext listener.
    pub certs: Option<Arc<Vec<rustls_pki_types::CertificateDer<'static>>>>,
    /// The remote socket address, when known.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The call's `x-forwarded-client-cert` header values: who a trusted
    /// proxy says the caller is (`access::proxy`); empty without the header.
    pub forwarded_client_cert: Vec<http::HeaderValue>,
}

impl Peer {
    /// Captures the peer of a request.
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        Peer {
            certs: request.peer_certs(),
            remote_addr: request.remote_addr(),
            forwarded_client_cert: crate::access::proxy::forwarded_client_cert(request.metadata().as_ref()),
        }
    }
}

/// Decides, for every call, who the caller is and whether they hold a
/// permission on an instance.
pub trait Gate: Send + Sync + 'static {
    /// Authenticates the caller and checks `permission` on `instance`.
    fn authorize(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> Result<Caller, Error>;

    /// Whether the caller would be allowed `permission` on `instance`, without
    /// failing the call (used for Capabilities' per-caller `update_enabled`).
    fn allows(&self, peer: &Peer, instance: &InstanceName, permission: Permission) -> bool {
        self.authorize(peer, instance, permission).is_ok()
    }

    /// Authenticates the caller and checks that some rule grants them
    /// `permission` on at least one instance. Lets the transport refuse a
    /// call before reading its body when the caller could never be allowed
    /// it, whatever instance the body names, and lets the audit service
    /// refuse consistently whatever the data. The default asks about the
    /// default instance only; gates with a policy answer for every instance.
    fn authorize_anywhere(&self, peer: &Peer, permission: Permission) -> Result<Caller, Error> {
        self.authorize(peer, &InstanceName::default(), permission)
    }
}

/// Records the caller's principal on the current request span (see
/// `request_log`), once a gate knows who is calling. Only the first
/// authorization of a call records it: the span's formatter appends every
/// record, and a call is often authorized more than once.
pub fn record_principal(principal: &str) {
    if crate::observe::call::note_principal(principal) {
        tracing::Span::current().record("principal", principal);
    }
}

/// A shared gate.
pub type SharedGate = Arc<dyn Gate>;

/// Grants everything to an anonymous caller, so tests of the layers below
/// authorization need no certificates. Never used by `serve`: a plaintext
/// server checks its callers as `--plaintext-principal` against a policy.
#[derive(Debug, Default)]
pub struct AllowAll;

impl Gate for AllowAll {
    fn authorize(&self, _: &Peer, _: &InstanceName, _: Permission) -> Result<Caller, Error> {
        Ok(Caller { principal: "anonymous".into(), rule: "allow-all".into(), cert: None })
    }
}

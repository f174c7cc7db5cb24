//! Who may connect and what they may do, as [`super::Plan::new`] decides it
//! from the settings: plaintext (refused without a policy off loopback) or
//! mutual TLS with an own or the development PKI, the authorization policy
//! and where in a certificate the principal is.

use std::path::Path;

use anyhow::Context as _;

use super::checks::readable_file;
use super::plan::{Access, Pki};
use super::{IdentityArg, Settings};
use crate::access::identity::IdentityMode;
use crate::access::pki::DEV_TRUST_DOMAIN;
use crate::access::policy::Policy;
use crate::access::proxy::TrustedProxies;
use crate::access::tls::{TlsServer, TlsSettings};

/// The rule a plaintext listener without a policy grants everything by.
pub(super) const PLAINTEXT_RULE: &str = "plaintext-all";

/// The one warning of a plaintext listener without a policy.
pub(super) const OPEN_PLAINTEXT_WARNING: &str =
    "plaintext without an authorization policy: EVERY caller that can reach \
     the listener can read and write (a development default, loopback addresses only); name a policy \
     with --authz-policy FILE (authz_policy, docs/access-control.md)";

/// Plaintext: the configured policy or, on a loopback address only, one
/// granting the principal everything: anybody who can connect is that
/// principal, so elsewhere it would open the cache to the network.
pub(super) fn plaintext(s: &Settings) -> anyhow::Result<Access> {
    let principal = s.plaintext_principal.clone();
    if let Some(path) = &s.policy {
        return Ok(Access::Plaintext { principal, policy: load_policy(path)?, grants_all: false });
    }
    if !s.listen.ip().is_loopback() {
        anyhow::bail!(
            "plaintext_insecure (--plaintext-insecure) without authz_policy (--authz-policy) on listen {}, \
             not a loopback address: every caller that reaches it could read and write the cache; name an \
             authorization policy with --authz-policy FILE (docs/access-control.md), or listen on 127.0.0.1",
            s.listen
        );
    }
    let policy = Policy::grant_all(PLAINTEXT_RULE, &principal)?;
    Ok(Access::Plaintext { principal, policy, grants_all: true })
}

/// Mutual TLS: an own PKI needs a policy (and, with uri-san, trust domains);
/// the development PKI brings both.
pub(super) fn mtls(s: &Settings, dev_dir: &Path) -> anyhow::Result<Access> {
    let own = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        _ => anyhow::bail!("tls_cert, tls_key and client_ca go together (--tls-cert, --tls-key, --client-ca)"),
    };
    let policy = match (&s.policy, own) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(_)) => anyhow::bail!("authz_policy (--authz-policy) is required with your own PKI"),
        (None, None) => Some(dev_dir.join("policy.toml")).filter(|p| p.exists()),
    };
    let policy = policy.as_deref().map(load_policy).transpose()?;
    let pki = match (own, policy) {
        (Some((cert, key)), Some(policy)) => {
            readable_file("tls_cert (--tls-cert)", cert)?;
            readable_file("tls_key (--tls-key)", key)?;
            s.client_ca.iter().try_for_each(|ca| readable_file("client_ca (--client-ca)", ca))?;
            let mut t = TlsSettings::new(cert.clone(), key.clone(), s.client_ca.clone(), s.crl.clone());
            t.crl_reload_interval = s.crl_reload_interval;
            Pki::Own { tls: tls_server(&t)?, policy }
        }
        (_, policy) => Pki::Development {
            dir: dev_dir.to_owned(),
            crls: s.crl.clone(),
            crl_reload_interval: s.crl_reload_interval,
            policy,
        },
    };
    let identity = identity_mode(s.identity, &s.trust_domain, matches!(pki, Pki::Development { .. }))?;
    let proxies = TrustedProxies::new(s.trusted_proxies.clone(), &identity)
        .map_err(|e| anyhow::anyhow!("trusted_proxies (--trusted-proxy): {e}"))?;
    Ok(Access::Mtls { pki, identity, proxies })
}

/// Where the principal is in a client certificate; uri-san needs trust
/// domains, which the development PKI supplies when none are configured.
fn identity_mode(arg: IdentityArg, trust_domains: &[String], development: bool) -> anyhow::Result<IdentityMode> {
    Ok(match arg {
        IdentityArg::UriSan if !trust_domains.is_empty() => IdentityMode::spiffe(trust_domains.iter().cloned()),
        IdentityArg::UriSan if development => IdentityMode::spiffe([DEV_TRUST_DOMAIN]),
        IdentityArg::UriSan => anyhow::bail!("identity uri-san needs at least one trust_domain (--trust-domain)"),
        IdentityArg::DnsSan => IdentityMode::DnsSan,
        IdentityArg::CommonName => IdentityMode::CommonName,
    })
}

/// Loads an authorization policy file; errors name it.
pub fn load_policy(path: &Path) -> anyhow::Result<Policy> {
    Policy::load(path).with_context(|| format!("authorization policy {}", path.display()))
}

/// Loads a TLS server's certificate, key, client CAs and CRLs; errors name
/// the flags (the file is in the message of the error itself).
pub fn tls_server(settings: &TlsSettings) -> anyhow::Result<TlsServer> {
    TlsServer::from_settings(settings).context("TLS files (--tls-cert, --tls-key, --client-ca, --crl)")
}

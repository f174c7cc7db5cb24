//! From a verified client leaf certificate to a principal (the caller's name
//! in the authorization policy).
//!
//! The TLS layer has already checked the chain, the validity period and the
//! revocation status. This module decides *who* the certificate names, and
//! refuses certificates that could be mistaken for someone else (threat T10):
//!
//! - the leaf must carry the `clientAuth` extended key usage explicitly (a
//!   serverAuth-only certificate, or one without the extension, is refused);
//! - the leaf must not be a CA certificate;
//! - in the default [`IdentityMode::UriSan`] mode the leaf must carry exactly
//!   one URI SAN, a SPIFFE ID in an allowed trust domain. The subject CN is
//!   never looked at unless [`IdentityMode::CommonName`] is configured.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::access::gate::CertInfo;

/// Longest principal accepted (SPIFFE limits IDs to 2048 bytes).
const MAX_PRINCIPAL_LEN: usize = 2048;

/// Where the principal is taken from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityMode {
    /// The default: exactly one URI SAN, a SPIFFE ID
    /// (`spiffe://<trust-domain>/<path>`) whose trust domain is in the list.
    UriSan {
        /// Allowed trust domains, e.g. `provcache.dev`.
        trust_domains: Vec<String>,
    },
    /// Exactly one DNS SAN; the principal is the DNS name in lower case.
    DnsSan,
    /// The subject common name (exactly one). Weak: only when configured
    /// explicitly, for CAs that cannot issue SANs.
    CommonName,
}

impl IdentityMode {
    /// The default mode for the given trust domains.
    pub fn spiffe<I: IntoIterator<Item = S>, S: Into<String>>(trust_domains: I) -> Self {
        IdentityMode::UriSan { trust_domains: trust_domains.into_iter().map(Into::into).collect() }
    }
}

/// The identity established from a leaf certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The principal, e.g. `spiffe://provcache.dev/writer`.
    pub principal: String,
    /// Facts about the leaf the gate re-checks on every call.
    pub cert: CertInfo,
}

/// Why a leaf certificate does not establish an identity (`UNAUTHENTICATED`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER does not parse as one X.509 certificate.
    #[error("client certificate is not a well-formed X.509 certificate: {0}")]
    Malformed(String),
    /// The extended key usage extension is absent or lacks `clientAuth`.
    #[error("client certificate does not allow client authentication (no clientAuth extended key usage)")]
    NotForClientAuth,
    /// The leaf is a CA certificate (basicConstraints CA=true).
    #[error("a CA certificate cannot be used as a client certificate")]
    CaAsLeaf,
    /// URI mode: no URI SAN (for example a CN-only certificate).
    #[error("client certificate has no URI SAN (a SPIFFE ID is required)")]
    NoUriSan,
    /// URI mode: more than one URI SAN, so the identity is ambiguous.
    #[error("client certificate has {0} URI SANs; exactly one is required")]
    MultipleUriSans(usize),
    /// URI mode: the URI SAN is not a well-formed SPIFFE ID.
    #[error("URI SAN {uri:?} is not a valid SPIFFE ID: {why}")]
    NotSpiffe {
        /// The URI SAN (truncated).
        uri: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// URI mode: the SPIFFE ID's trust domain is not allowed.
    #[error("trust domain {domain:?} of {uri:?} is not trusted")]
    UntrustedDomain {
        /// The trust domain found.
        domain: String,
        /// The URI SAN.
        uri: String,
    },
    /// DNS mode: no DNS SAN.
    #[error("client certificate has no DNS SAN")]
    NoDnsSan,
    /// DNS mode: more than one DNS SAN.
    #[error("client certificate has {0} DNS SANs; exactly one is required")]
    MultipleDnsSans(usize),
    /// CN mode: no usable common name (absent, several, or not a string).
    #[error("client certificate has no single common name")]
    NoCommonName,
    /// The chosen name is empty, too long or contains control characters.
    #[error("client certificate names an unusable principal")]
    BadPrincipal,
}

/// Establishes the identity named by a verified leaf certificate (DER).
pub fn identify(leaf_der: &[u8], mode: &IdentityMode) -> Result<Identity, IdentityError> {
    let (rest, cert) = X509Certificate::from_der(leaf_der).map_err(|e| IdentityError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IdentityError::Malformed("trailing data after the certificate".into()));
    }
    let malformed = |e: x509_parser::error::X509Error| IdentityError::Malformed(e.to_string());

    let eku = cert.extended_key_usage().map_err(malformed)?;
    if !eku.is_some_and(|e| e.value.client_auth) {
        return Err(IdentityError::NotForClientAuth);
    }
    if cert.basic_constraints().map_err(malformed)?.is_some_and(|bc| bc.value.ca) {
        return Err(IdentityError::CaAsLeaf);
    }

    let principal = match mode {
        IdentityMode::UriSan { trust_domains } => principal_from_uris(&uri_sans(&cert)?, trust_domains)?,
        IdentityMode::DnsSan => principal_from_dns(&dns_sans(&cert)?)?,
        IdentityMode::CommonName => usable(from_common_name(&cert)?)?,
    };

    let cert_info = CertInfo {
        leaf_sha256: Sha256::digest(leaf_der).into(),
        not_after: unix_to_system_time(cert.validity().not_after.timestamp()),
    };
    Ok(Identity { principal, cert: cert_info })
}

fn sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a GeneralName<'a>>, IdentityError> {
    let san = cert.subject_alternative_name().map_err(|e| IdentityError::Malformed(e.to_string()))?;
    Ok(san.map(|s| s.value.general_names.iter().collect()).unwrap_or_default())
}

fn uri_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, IdentityError> {
    let uris = sans(cert)?.into_iter().filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    Ok(uris.collect())
}

fn dns_sans<'a>(cert: &'a X509Certificate<'_>) -> Result<Vec<&'a str>, IdentityError> {
    let names = sans(cert)?.into_iter().filter_map(|n| match n {
        GeneralName::DNSName(d) => Some(*d),
        _ => None,
    });
    Ok(names.collect())
}

/// The principal named by a certificate's URI SANs (`uri-san` mode): exactly
/// one, a SPIFFE ID in one of `trust_domains`. Shared with the identities a
/// trusted proxy forwards (`access::proxy`), so both are named alike.
pub fn principal_from_uris(uris: &[&str], trust_domains: &[String]) -> Result<String, IdentityError> {
    let uri = match uris {
        [] => return Err(IdentityError::NoUriSan),
        [one] => *one,
        many => return Err(IdentityError::MultipleUriSans(many.len())),
    };
    let domain = spiffe_trust_domain(uri)?;
    if !trust_domains.iter().any(|d| d == domain) {
        return Err(IdentityError::UntrustedDomain { domain: domain.to_owned(), uri: truncate(uri) });
    }
    usable(uri.to_owned())
}

/// The principal named by a certificate's DNS SANs (`dns-san` mode): exactly
/// one, in lower case. Shared with forwarded identities like
/// [`principal_from_uris`].
pub fn principal_from_dns(names: &[&str]) -> Result<String, IdentityError> {
    match names {
        [] => Err(IdentityError::NoDnsSan),
        [one] => usable(one.to_ascii_lowercase()),
        many => Err(IdentityError::MultipleDnsSans(many.len())),
    }
}

/// Refuses a principal that is empty, too long or has control characters.
fn usable(principal: String) -> Result<String, IdentityError> {
    if principal.is_empty() || principal.len() > MAX_PRINCIPAL_LEN || principal.chars().any(char::is_control) {
        return Err(IdentityError::BadPrincipal);
    }
    Ok(principal)
}

fn from_common_name(cert: &X509Certificate<'_>) -> Result<String, IdentityError> {
    let mut cns = cert.subject().iter_common_name();
    match (cns.next(), cns.next()) {
        (Some(cn), None) => cn.as_str().map(str::to_owned).map_err(|_| IdentityError::NoCommonName),
        _ => Err(IdentityError::NoCommonName),
    }
}

/// Checks that `uri` is a SPIFFE ID and returns its trust domain.
///
/// A SPIFFE ID is `spiffe://<trust-domain>/<path>`: a lower-case trust domain
/// of `[a-z0-9._-]`, a non-empty path of non-empty segments of
/// `[A-Za-z0-9._-]` other than `.` and `..`, and no query, fragment, port or
/// user info.
pub fn spiffe_trust_domain(uri: &str) -> Result<&str, IdentityError> {
    let bad = |why| Err(IdentityError::NotSpiffe { uri: truncate(uri), why });
    let Some(rest) = uri.strip_prefix("spiffe://") else {
        return bad("scheme is not spiffe://");
    };
    let Some((domain, path)) = rest.split_once('/') else {
        return bad("no path after the trust domain");
    };
    if domain.is_empty() {
        return bad("empty trust domain");
    }
    if !domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)) {
        return bad("trust domain has characters other than a-z 0-9 . _ -");
    }
    if path.is_empty() {
        return bad("empty path");
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return bad("empty path segment");
        }
        if segment == "." || segment == ".." {
            return bad("'.' or '..' path segment");
        }
        if !segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return bad("path has characters other than A-Z a-z 0-9 . _ -");
        }
    }
    Ok(domain)
}

fn unix_to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};

    /// A test CA whose key signs leaves built from params.
    pub(crate) struct TestCa {
        pub issuer: Issuer<'static, KeyPair>,
        pub der: rustls_pki_types::CertificateDer<'static>,
    }

    impl TestCa {
        pub(crate) fn new(name: &str) -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let cert = params.self_signed(&key).unwrap();
            TestCa { issuer: Issuer::new(params, key), der: cert.der().clone() }
        }

        /// Signs `params` for a fresh key; returns (cert DER, key).
        pub(crate) fn sign(&self, params: &CertificateParams) -> (rustls_pki_types::CertificateDer<'static>, KeyPair) {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (cert.der().clone(), key)
        }
    }

    /// Leaf params with the given SANs and clientAuth EKU.
    pub(crate) fn client_params(sans: Vec<SanType>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "client");
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand_serial()));
        p
    }

    pub(crate) fn rand_serial() -> [u8; 16] {
        let mut s = [0u8; 16];
        getrandom::fill(&mut s).unwrap();
        s[0] &= 0x7f;
        s[0] |= 0x01;
        s
    }

    pub(crate) fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn mode() -> IdentityMode {
        IdentityMode::spiffe(["provcache.dev"])
    }

    #[test]
    fn one_uri_san_in_trusted_domain_is_the_principal() {
        let ca = TestCa::new("ca");
        let (der, _) = ca.sign(&client_params(vec![uri("spiffe://provcache.dev/writer")]));
        let id = identify(&der, &mode()).unwrap();
        assert_eq!(id.principal, "spiffe://provcache.dev/writer");
        assert_eq!(id.cert.leaf_sha256, <[u8; 32]>::from(Sha256::digest(&der)));
        // rcgen's default not_after is 4096-01-01.
        assert!(id.cert.not_after > SystemTime::now() + Duration::from_secs(1000 * 365 * 86400));
    }

    #[test]
    fn cn_only_certificate_is_refused_in_uri_mode_but_accepted_in_cn_mode() {
        let ca = TestCa::new("ca");
        let mut params = client_params(vec![]);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "spiffe://provcache.dev/writer");
        let (der, _) = ca.sign(&params);
        assert_eq!(identify(&der, &mode()), Err(IdentityError::NoUriSan));
        assert_eq!(identify(&der, &IdentityMode::DnsSan), Err(IdentityError::NoDnsSan));
        assert_eq!(identify(&der, &IdentityMode::CommonName).unwrap().principal, "spiffe://provcache.dev/writer");
    }

    #[test]
    fn two_uri_sans_are_refused() {
        let ca = TestCa::new("ca");
        let params = client_params(vec![uri("spiffe://provcache.dev/reader"), uri("spiffe://provcache.dev/writer")]);
        let (der, _) = ca.sign(&params);
        assert_eq!(identify(&der, &mode()), Err(IdentityError::MultipleUriSans(2)));
    }

    #[test]
    fn wrong_trust_domain_is_refused() {
        let ca = TestCa::new("ca");
        let (der, _) = ca.sign(&client_params(vec![uri("spiffe://evil.example/writer")]));
        let err = identify(&der, &mode()).unwrap_err();
        assert!(matches!(&err, IdentityError::UntrustedDomain { domain, .. } if domain == "evil.example"));
        assert!(err.to_string().contains("evil.example"), "{err}");
        // A domain that merely starts with the trusted one is another domain.
        let (der, _) = ca.sign(&client_params(vec![uri("spiffe://provcache.dev.evil/writer")]));
        assert!(matches!(identify(&der, &mode()), Err(IdentityError::UntrustedDomain { .. })));
    }

    #[test]
    fn non_spiffe_uri_is_refused() {
        let ca = TestCa::new("ca");
        for bad in [
            "https://provcache.dev/writer",
            "spiffe://provcache.dev",
            "spiffe://provcache.dev/",
            "spiffe://provcache.dev/a/../b",
            "spiffe://Provcache.dev/w",
            "spiffe://provcache.dev/w?x=1",
        ] {
            let (der, _) = ca.sign(&client_params(vec![uri(bad)]));
            assert!(matches!(identify(&der, &mode()), Err(IdentityError::NotSpiffe { .. })), "{bad}");
        }
    }

    #[test]
    fn server_auth_only_eku_is_refused() {
        let ca = TestCa::new("ca");
        let mut params = client_params(vec![uri("spiffe://provcache.dev/writer")]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (der, _) = ca.sign(&params);
        assert_eq!(identify(&der, &mode()), Err(IdentityError::NotForClientAuth));
        // No EKU extension at all is refused too: clientAuth must be explicit.
        params.extended_key_usages = vec![];
        let (der, _) = ca.sign(&params);
        assert_eq!(identify(&der, &mode()), Err(IdentityError::NotForClientAuth));
    }

    #[test]
    fn ca_certificate_as_leaf_is_refused() {
        let ca = TestCa::new("ca");
        let mut params = client_params(vec![uri("spiffe://provcache.dev/writer")]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let (der, _) = ca.sign(&params);
        assert_eq!(identify(&der, &mode()), Err(IdentityError::CaAsLeaf));
    }

    #[test]
    fn dns_mode_takes_the_single_dns_san() {
        let ca = TestCa::new("ca");
        let (der, _) = ca.sign(&client_params(vec![SanType::DnsName("CI-1.Example.com".try_into().unwrap())]));
        assert_eq!(identify(&der, &IdentityMode::DnsSan).unwrap().principal, "ci-1.example.com");
        let two = vec![
            SanType::DnsName("a.example.com".try_into().unwrap()),
            SanType::DnsName("b.example.com".try_into().unwrap()),
        ];
        let (der, _) = ca.sign(&client_params(two));
        assert_eq!(identify(&der, &IdentityMode::DnsSan), Err(IdentityError::MultipleDnsSans(2)));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert!(matches!(identify(b"\x30\x03\x02\x01\x01", &mode()), Err(IdentityError::Malformed(_))));
        assert!(matches!(identify(b"", &mode()), Err(IdentityError::Malformed(_))));
        let ca = TestCa::new("ca");
        let (der, _) = ca.sign(&client_params(vec![uri("spiffe://provcache.dev/writer")]));
        let mut trailing = der.to_vec();
        trailing.push(0);
        assert!(matches!(identify(&trailing, &mode()), Err(IdentityError::Malformed(_))));
    }
}

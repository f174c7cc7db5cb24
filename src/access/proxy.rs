//! Trusted-proxy mode: behind a TLS-terminating proxy (Envoy), every call
//! arrives over the proxy's own mTLS connection, so without this every
//! caller would be the proxy. A call whose verified client certificate names
//! a configured trusted proxy, and that carries Envoy's
//! `x-forwarded-client-cert` (XFCC) header, is made for the client the
//! header's last element names; the policy is checked for that principal.
//!
//! XFCC (Envoy's grammar): elements separated by `,`, one per proxy, the
//! last added by the proxy nearest to us; each element is `key=value` pairs
//! separated by `;`; keys are case-insensitive; a value holding `,` `;` or
//! `=` is double-quoted, with `\"` for a quote inside. The `URI=` (one per
//! URI SAN) and `DNS=` (one per DNS SAN) values of the last element name the
//! caller, exactly as a certificate's SANs would ([`identity`]). `Hash=`,
//! `Cert=`, `By=` and the rest are not checked: the server has nothing to
//! check them against.
//!
//! A malformed header from a trusted proxy is `UNAUTHENTICATED`, never the
//! proxy's own identity. A trusted proxy without the header acts as itself.
//! Anyone else's header is ignored: their own certificate decides.
//!
//! [`identity`]: crate::access::identity

use std::collections::HashSet;
use std::sync::Mutex;

use http::{HeaderMap, HeaderValue};

use crate::access::gate::{CertInfo, Peer};
use crate::access::identity::{principal_from_dns, principal_from_uris, Identity, IdentityMode};
use crate::error::Error;

/// Envoy's forwarded client certificate header.
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";

/// How many distinct callers' ignored headers are logged (once each).
const IGNORED_LOG_CAPACITY: usize = 1024;

/// The XFCC header's values in a request's headers (usually none or one).
pub fn forwarded_client_cert(headers: &HeaderMap) -> Vec<HeaderValue> {
    headers.get_all(XFCC_HEADER).iter().cloned().collect()
}

/// One XFCC element: the pairs one proxy added, keys in lower case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XfccElement {
    /// `(key, value)` in header order; keys repeat (one `URI=` per URI SAN).
    pub pairs: Vec<(String, String)>,
}

impl XfccElement {
    /// The non-empty values of `key` (lower case): Envoy writes `URI=` with
    /// nothing after it for a certificate without URI SANs.
    pub fn values<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.pairs.iter().filter(move |(k, v)| k == key && !v.is_empty()).map(|(_, v)| v.as_str())
    }
}

/// Why an XFCC header does not parse; names the byte offset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed x-forwarded-client-cert header: {0}")]
pub struct XfccError(String);

fn malformed<T>(at: usize, what: &str) -> Result<T, XfccError> {
    Err(XfccError(format!("{what} at byte {at}")))
}

/// Parses an XFCC header value into its elements (see the module
/// documentation for the grammar). Strict: anything else is an error.
pub fn parse_xfcc(header: &str) -> Result<Vec<XfccElement>, XfccError> {
    let bytes = header.as_bytes();
    let mut elements = Vec::new();
    let mut element = XfccElement::default();
    let mut at = 0;
    loop {
        let (key, next) = parse_key(bytes, at)?;
        let (value, next) = parse_value(header, next)?;
        element.pairs.push((key, value));
        match bytes.get(next) {
            None => break,
            Some(b';') => {}
            Some(b',') => elements.push(std::mem::take(&mut element)),
            Some(_) => return malformed(next, "expected ';' or ',' after a value"),
        }
        at = next + 1;
    }
    elements.push(element);
    Ok(elements)
}

/// A key (letters, digits, `-`, `_`) and its `=`; returns it in lower case
/// and the offset after the `=`.
fn parse_key(bytes: &[u8], start: usize) -> Result<(String, usize), XfccError> {
    let len = bytes[start..].iter().take_while(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b'_').count();
    let end = start + len;
    if len == 0 {
        return malformed(start, "expected a key");
    }
    if bytes.get(end) != Some(&b'=') {
        return malformed(end, "expected '=' after a key");
    }
    let key = String::from_utf8_lossy(&bytes[start..end]).to_ascii_lowercase();
    Ok((key, end + 1))
}

/// A bare or double-quoted value; returns it unescaped and the offset after it.
fn parse_value(header: &str, start: usize) -> Result<(String, usize), XfccError> {
    let bytes = header.as_bytes();
    if bytes.get(start) != Some(&b'"') {
        let len = bytes[start..].iter().take_while(|b| !matches!(b, b';' | b',')).count();
        let value = &header[start..start + len];
        if let Some(bad) = value.bytes().position(|b| matches!(b, b'"' | b'=' | b'\\') || !b.is_ascii_graphic()) {
            return malformed(start + bad, "a value with '\"', '=', '\\' or a space must be quoted");
        }
        return Ok((value.to_owned(), start + len));
    }
    let mut value = String::new();
    let mut chars = header[start + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, start + 1 + i + 1)),
            // `\"` and `\\` are escapes; any other backslash is kept as it is
            // (Envoy's Subject may hold RFC 4514 escapes such as `\,`).
            '\\' => match chars.clone().next() {
                Some((_, e @ ('"' | '\\'))) => {
                    chars.next();
                    value.push(e);
                }
                _ => value.push('\\'),
            },
            c => value.push(c),
        }
    }
    malformed(start, "unterminated quoted value")
}

/// Who a call is made for: the principal the policy is checked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The principal.
    pub name: String,
    /// The certificate the server itself verified for this principal; `None`
    /// for a forwarded identity, whose certificate only the proxy saw.
    pub cert: Option<CertInfo>,
}

/// The configured trusted proxies (`trusted_proxies`): whose
/// `x-forwarded-client-cert` header names the caller.
#[derive(Debug, Default)]
pub struct TrustedProxies {
    principals: Vec<String>,
    /// Callers whose ignored header was logged already.
    logged: Mutex<HashSet<String>>,
}

impl TrustedProxies {
    /// The proxies named by `principals`, as the policy names them under
    /// `mode`. Refuses names no certificate could carry in that mode (so a
    /// typo is an error at start, not a proxy that never matches) and the
    /// `common-name` mode, whose names XFCC does not forward.
    pub fn new(principals: Vec<String>, mode: &IdentityMode) -> Result<Self, String> {
        for p in &principals {
            let named = match mode {
                IdentityMode::UriSan { trust_domains } => principal_from_uris(&[p], trust_domains),
                IdentityMode::DnsSan => principal_from_dns(&[p]),
                IdentityMode::CommonName => {
                    return Err(
                        "identity common-name cannot be forwarded (XFCC carries SANs): use uri-san or dns-san".into()
                    )
                }
            };
            match named {
                Ok(n) if &n == p => {}
                Ok(n) => return Err(format!("{p:?} is not a principal as the policy names it (did you mean {n:?}?)")),
                Err(e) => return Err(format!("{p:?} is not a principal a client certificate can name: {e}")),
            }
        }
        Ok(TrustedProxies { principals, logged: Mutex::default() })
    }

    /// Whether the mode is off (no proxy configured).
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
    }

    /// Who `peer`'s call is for, given the identity of its verified client
    /// certificate: the forwarded client when the certificate is a trusted
    /// proxy's and the call carries the header; otherwise the certificate's.
    pub fn principal(&self, identity: Identity, peer: &Peer, mode: &IdentityMode) -> Result<Principal, Error> {
        let header = &peer.forwarded_client_cert;
        if header.is_empty() || !self.principals.contains(&identity.principal) {
            if !header.is_empty() {
                self.log_ignored(&identity.principal);
            }
            return Ok(Principal { name: identity.principal, cert: Some(identity.cert) });
        }
        let name = forwarded_principal(header, mode).map_err(|why| {
            Error::Unauthenticated(format!("{XFCC_HEADER} from trusted proxy {:?}: {why}", identity.principal))
        })?;
        Ok(Principal { name, cert: None })
    }

    fn log_ignored(&self, caller: &str) {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.len() < IGNORED_LOG_CAPACITY && logged.insert(caller.to_owned()) {
            tracing::debug!(
                caller,
                "{XFCC_HEADER} ignored: the caller is not a trusted proxy (logged once per caller)"
            );
        }
    }
}

/// The principal named by the last element of the header's values (joined
/// with `,`, as HTTP joins repeated header lines).
fn forwarded_principal(values: &[HeaderValue], mode: &IdentityMode) -> Result<String, String> {
    let texts = values.iter().map(|v| v.to_str().map_err(|_| "the header is not visible ASCII".to_owned()));
    let joined = texts.collect::<Result<Vec<_>, _>>()?.join(",");
    let elements = parse_xfcc(&joined).map_err(|e| e.to_string())?;
    let last = elements.last().expect("parse_xfcc returns at least one element");
    let named = match mode {
        IdentityMode::UriSan { trust_domains } => {
            principal_from_uris(&last.values("uri").collect::<Vec<_>>(), trust_domains)
        }
        IdentityMode::DnsSan => principal_from_dns(&last.values("dns").collect::<Vec<_>>()),
        IdentityMode::CommonName => return Err("identity common-name cannot be forwarded".into()),
    };
    named.map_err(|e| format!("the forwarded {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(e: &XfccElement) -> Vec<(&str, &str)> {
        e.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }

    #[test]
    fn envoys_documented_example_parses() {
        let h = "By=http://frontend.lyft.com;Hash=468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688;\
                 Subject=\"/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client\";URI=http://testclient.lyft.com";
        let elements = parse_xfcc(h).unwrap();
        assert_eq!(elements.len(), 1);
        assert_eq!(
            pairs(&elements[0]),
            [
                ("by", "http://frontend.lyft.com"),
                ("hash", "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"),
                ("subject", "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"),
                ("uri", "http://testclient.lyft.com"),
            ]
        );
    }

    #[test]
    fn several_elements_split_at_commas_outside_quotes() {
        let h = "By=spiffe://a/p1;URI=spiffe://a/first,\
                 By=spiffe://a/p2;Subject=\"CN=x,O=y;z\";URI=spiffe://a/second;DNS=b.example;DNS=c.example";
        let elements = parse_xfcc(h).unwrap();
        assert_eq!(elements.len(), 2);
        assert_eq!(elements[0].values("uri").collect::<Vec<_>>(), ["spiffe://a/first"]);
        assert_eq!(elements[1].values("subject").collect::<Vec<_>>(), ["CN=x,O=y;z"]);
        assert_eq!(elements[1].values("uri").collect::<Vec<_>>(), ["spiffe://a/second"]);
        assert_eq!(elements[1].values("dns").collect::<Vec<_>>(), ["b.example", "c.example"]);
    }

    #[test]
    fn quoted_values_unescape_quotes_and_backslashes_and_keep_other_escapes() {
        let h = r#"Subject="CN=a \"quoted\" name";By="back\\slash";Other="O=a\,b""#;
        let e = &parse_xfcc(h).unwrap()[0];
        assert_eq!(e.values("subject").next(), Some("CN=a \"quoted\" name"));
        assert_eq!(e.values("by").next(), Some("back\\slash"));
        assert_eq!(e.values("other").next(), Some("O=a\\,b"));
    }

    #[test]
    fn keys_are_case_insensitive_and_empty_values_are_no_value() {
        let e = &parse_xfcc("uRi=spiffe://a/x;DNS=;URI=").unwrap()[0];
        assert_eq!(e.values("uri").collect::<Vec<_>>(), ["spiffe://a/x"]);
        assert_eq!(e.values("dns").count(), 0);
    }

    #[test]
    fn malformed_headers_are_errors_naming_the_place() {
        for (bad, needle) in [
            ("", "expected a key"),
            ("URI", "expected '='"),
            ("=x", "expected a key"),
            ("URI=a,", "expected a key"),
            ("URI=a;;DNS=b", "expected a key"),
            ("URI=\"unterminated", "unterminated"),
            ("URI=\"a\"b", "expected ';' or ','"),
            ("URI=a=b", "must be quoted"),
            ("URI=a b", "must be quoted"),
            ("URI=a\"b\"", "must be quoted"),
            ("U RI=a", "expected '='"),
        ] {
            let err = parse_xfcc(bad).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("at byte"), "{bad:?}: {err}");
        }
    }

    fn spiffe() -> IdentityMode {
        IdentityMode::spiffe(["example.org"])
    }

    fn header(v: &str) -> Vec<HeaderValue> {
        vec![HeaderValue::from_str(v).unwrap()]
    }

    #[test]
    fn the_last_elements_uri_san_is_the_principal_as_a_certificates_would_be() {
        let h = header("URI=spiffe://example.org/far,By=spiffe://example.org/envoy;URI=spiffe://example.org/ci/writer");
        assert_eq!(forwarded_principal(&h, &spiffe()).unwrap(), "spiffe://example.org/ci/writer");
        // Repeated header lines are one list.
        let two = [header("URI=spiffe://example.org/a")[0].clone(), header("URI=spiffe://example.org/b")[0].clone()];
        assert_eq!(forwarded_principal(&two, &spiffe()).unwrap(), "spiffe://example.org/b");
        assert_eq!(
            forwarded_principal(&header("DNS=CI.Example.com"), &IdentityMode::DnsSan).unwrap(),
            "ci.example.com"
        );
    }

    #[test]
    fn a_forwarded_name_is_refused_where_a_certificates_would_be() {
        for (h, needle) in [
            ("URI=spiffe://evil.example/writer", "not trusted"),
            ("URI=https://example.org/writer", "not a valid SPIFFE ID"),
            ("URI=spiffe://example.org/a;URI=spiffe://example.org/b", "2 URI SANs"),
            ("Hash=abc;URI=", "no URI SAN"),
            ("URI=spiffe://example.org/writer,Hash=abc", "no URI SAN"),
        ] {
            let err = forwarded_principal(&header(h), &spiffe()).unwrap_err();
            assert!(err.contains(needle) && err.starts_with("the forwarded"), "{h:?}: {err}");
        }
    }

    #[test]
    fn configured_proxies_must_be_principals_of_the_identity_mode() {
        assert!(TrustedProxies::new(vec!["spiffe://example.org/envoy".into()], &spiffe()).is_ok());
        for (p, mode) in [
            ("spiffe://other.org/envoy", spiffe()),
            ("spiffe://example.org/*", spiffe()),
            ("", spiffe()),
            ("Envoy.example.org", IdentityMode::DnsSan),
            ("envoy.example.org", IdentityMode::CommonName),
        ] {
            assert!(TrustedProxies::new(vec![p.into()], &mode).is_err(), "{p:?}");
        }
    }
}

//! Client certificates and the mTLS channels made with them: the dev PKI's
//! clients, certificates the dev CA issues for new principals (the way an
//! operator does, through `provcache::access::pki`), and certificates shaped by hand
//! (rcgen) to be wrong in exactly one way.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A client certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// The certificate, PEM.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8).
    pub key: PathBuf,
}

impl CertFiles {
    /// One of the dev PKI's clients (`writer`, `reader`, `auditor`).
    pub fn dev(pki_dir: &Path, name: &str) -> Self {
        CertFiles { cert: pki_dir.join(format!("{name}.pem")), key: pki_dir.join(format!("{name}.key")) }
    }

    /// A new certificate from the dev CA in `pki_dir` for `principal`, valid
    /// for an hour, written to `prefix.pem` and `prefix.key`.
    pub fn issue(pki_dir: &Path, principal: &str, prefix: &Path) -> Self {
        let issued =
            provcache::access::pki::issue_client_cert(pki_dir, principal, prefix, Duration::from_secs(3600)).unwrap();
        CertFiles { cert: issued.cert, key: issued.key }
    }

    /// Signs `params` for a new P-256 key (PKCS#8) and writes `dir/name.pem`
    /// and `dir/name.key`.
    pub fn sign(issuer: &Issuer<'_, KeyPair>, params: &CertificateParams, dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        let files = CertFiles { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        fs::write(&files.cert, cert.pem()).unwrap();
        fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }

    /// The certificate's serial number (the DER INTEGER's content octets).
    pub fn serial(&self) -> Vec<u8> {
        let der = CertificateDer::from_pem_file(&self.cert).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        cert.raw_serial().to_vec()
    }
}

/// An mTLS channel to `addr`, trusting the CA in `pki_dir`, with a client
/// certificate or without one. The handshake's failure is returned: some
/// tests are about it.
pub async fn tls_channel(
    addr: SocketAddr,
    pki_dir: &Path,
    identity: Option<&CertFiles>,
) -> Result<Channel, tonic::transport::Error> {
    let ca = fs::read(pki_dir.join("ca.pem")).unwrap();
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(files) = identity {
        tls = tls.identity(Identity::from_pem(fs::read(&files.cert).unwrap(), fs::read(&files.key).unwrap()));
    }
    Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(tls)?.connect().await
}

/// The development CA in `pki_dir`, loaded from `ca.pem` and `ca.key`.
pub fn dev_ca(pki_dir: &Path) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&fs::read_to_string(pki_dir.join("ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&fs::read_to_string(pki_dir.join("ca.pem")).unwrap(), key).unwrap()
}

/// A CA the server has never heard of.
pub fn other_ca() -> Issuer<'static, KeyPair> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "some other CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.self_signed(&key).unwrap();
    Issuer::new(params, key)
}

fn random_serial() -> SerialNumber {
    let mut serial = *uuid::Uuid::new_v4().as_bytes();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&serial)
}

/// Client certificate parameters shaped like the dev PKI's: CN, the given
/// SANs, clientAuth, not a CA, valid from an hour ago for a day. A test
/// changes the one field it is about.
pub fn client_params(cn: &str, sans: Vec<SanType>) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.subject_alt_names = sans;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(24 * 3600);
    params
}

/// A URI subject alternative name (how a SPIFFE identity is carried).
pub fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

/// Replaces `dir/ca.crl.pem` atomically with a CRL of `issuer` revoking
/// `serials`.
pub fn write_crl(issuer: &Issuer<'_, KeyPair>, dir: &Path, serials: &[Vec<u8>], number: u64) {
    provcache::access::pki::write_crl(issuer, &dir.join("ca.crl.pem"), serials, number, Duration::from_secs(24 * 3600))
        .unwrap();
}

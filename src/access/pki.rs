//! The development PKI: a CA, a server certificate for 127.0.0.1 and three
//! client identities (writer, reader, auditor), created once in a directory,
//! plus a matching authorization policy. Also issues further client
//! certificates from that CA and prints the Bazel flags to use them.
//!
//! Client keys are PKCS#8 EC P-256 (`BEGIN PRIVATE KEY`): the only shapes
//! besides RSA that Bazel 4.2.3 accepts. Key files are created mode 0600 and
//! existing files are never overwritten.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::access::identity::{spiffe_trust_domain, IdentityError};
use crate::access::tls::TlsSettings;

/// The trust domain of the development identities.
pub const DEV_TRUST_DOMAIN: &str = "provcache.dev";
/// Validity of development leaf certificates.
pub const DEV_LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Validity of the development CA.
pub const DEV_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of `notBefore`, for clocks slightly behind.
const BACKDATE: Duration = Duration::from_secs(3600);

/// The client identities of the development PKI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DevClient {
    /// A CI writer: reads and writes the AC and the CAS.
    Writer,
    /// A developer: reads the AC and the CAS.
    Reader,
    /// An auditor: reads, and reads the audit service.
    Auditor,
}

impl DevClient {
    /// All development clients.
    pub const ALL: [DevClient; 3] = [DevClient::Writer, DevClient::Reader, DevClient::Auditor];

    /// The file stem (`writer`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DevClient::Writer => "writer",
            DevClient::Reader => "reader",
            DevClient::Auditor => "auditor",
        }
    }

    /// The SPIFFE ID in the certificate.
    pub fn spiffe_id(self) -> String {
        format!("spiffe://{DEV_TRUST_DOMAIN}/{}", self.name())
    }

    /// Permissions granted by the development policy.
    pub fn permissions(self) -> &'static [&'static str] {
        match self {
            DevClient::Writer => &["ac:read", "ac:write", "cas:read", "cas:write"],
            DevClient::Reader => &["ac:read", "cas:read"],
            DevClient::Auditor => &["ac:read", "cas:read", "audit:read"],
        }
    }
}

/// Why the PKI could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file to be created exists already.
    #[error("{0} exists already; not overwriting it")]
    Exists(PathBuf),
    /// Only one file of a certificate/key pair exists.
    #[error("{present} exists but {missing} does not; remove the other file to regenerate the pair")]
    HalfPair {
        /// The file found.
        present: PathBuf,
        /// The file missing.
        missing: PathBuf,
    },
    /// Leaf files exist but their CA does not.
    #[error("{0} exists but the CA (ca.pem, ca.key) does not; remove the directory to start over")]
    Orphan(PathBuf),
    /// The CA files do not hold a usable CA.
    #[error("cannot use the CA in {path}: {why}")]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The principal is not a SPIFFE ID.
    #[error("invalid principal: {0}")]
    BadPrincipal(#[from] IdentityError),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The files of a development PKI (absolute paths).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevPki {
    /// The directory holding everything.
    pub dir: PathBuf,
    /// The CA certificate (`--tls_certificate` for clients, client CA for
    /// the server).
    pub ca_cert: PathBuf,
    /// The CA key.
    pub ca_key: PathBuf,
    /// The server certificate (IP 127.0.0.1, ::1, DNS localhost).
    pub server_cert: PathBuf,
    /// The server key.
    pub server_key: PathBuf,
    /// The authorization policy for the three clients.
    pub policy: PathBuf,
}

impl DevPki {
    fn at(dir: PathBuf) -> Self {
        DevPki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            policy: dir.join("policy.toml"),
            dir,
        }
    }

    /// A client's certificate file.
    pub fn client_cert(&self, client: DevClient) -> PathBuf {
        self.dir.join(format!("{}.pem", client.name()))
    }

    /// A client's key file.
    pub fn client_key(&self, client: DevClient) -> PathBuf {
        self.dir.join(format!("{}.key", client.name()))
    }

    /// TLS settings for a server using this PKI (no CRLs).
    pub fn tls_settings(&self) -> TlsSettings {
        TlsSettings::new(self.server_cert.clone(), self.server_key.clone(), vec![self.ca_cert.clone()], vec![])
    }

    /// The Bazel flags for `client` against a server on 127.0.0.1:`port`.
    pub fn bazel_flags(&self, client: DevClient, port: u16) -> String {
        bazel_flags(
            &self.ca_cert,
            &self.client_cert(client),
            &self.client_key(client),
            port,
            !client.permissions().contains(&"ac:write"),
        )
    }
}

/// Ready-to-paste Bazel flags for a client certificate and key against a
/// server on 127.0.0.1:`port`. A `read_only` client also gets
/// `--remote_upload_local_results=false` (otherwise Bazel fails when the
/// server reports that it may not update the cache) and
/// `--experimental_build_event_upload_strategy=local`: Bazel otherwise uploads
/// the files its build event stream names (outputs, its own profile) to the
/// CAS, which a read-only identity may not do, and exits with 38 although
/// every action succeeded.
pub fn bazel_flags(ca: &Path, cert: &Path, key: &Path, port: u16, read_only: bool) -> String {
    let mut flags = format!(
        "--remote_cache=grpcs://127.0.0.1:{port} --tls_certificate={} --tls_client_certificate={} --tls_client_key={}",
        ca.display(),
        cert.display(),
        key.display()
    );
    if read_only {
        flags.push_str(" --remote_upload_local_results=false --experimental_build_event_upload_strategy=local");
    }
    flags
}

/// The development policy: writer, reader and auditor on every instance.
pub fn dev_policy_toml() -> String {
    let mut out = String::from(
        "# Development authorization policy written by provcache.\n\
         # Default deny: a permission no rule grants is refused.\n",
    );
    for client in DevClient::ALL {
        let perms: Vec<String> = client.permissions().iter().map(|p| format!("{p:?}")).collect();
        out.push_str(&format!(
            "\n[[rules]]\nname = \"dev-{}\"\nprincipals = [\"{}\"]\ninstances = [\"*\"]\npermissions = [{}]\n",
            client.name(),
            client.spiffe_id(),
            perms.join(", ")
        ));
    }
    out
}

/// Creates the development PKI in `dir` unless it exists; fills in missing
/// pieces signed by an existing CA. Never overwrites a file.
pub fn ensure_dev_pki(dir: &Path) -> Result<DevPki, PkiError> {
    create_private_dir(dir)?;
    let dir = dir.canonicalize().map_err(|source| PkiError::Io { path: dir.to_owned(), source })?;
    let pki = DevPki::at(dir);

    let leaves: Vec<(PathBuf, PathBuf)> = std::iter::once((pki.server_cert.clone(), pki.server_key.clone()))
        .chain(DevClient::ALL.iter().map(|c| (pki.client_cert(*c), pki.client_key(*c))))
        .collect();

    let ca = if pair_exists(&pki.ca_cert, &pki.ca_key)? {
        load_ca(&pki.ca_cert, &pki.ca_key)?
    } else {
        if let Some(orphan) = leaves.iter().flat_map(|(c, k)| [c, k]).find(|p| p.exists()) {
            return Err(PkiError::Orphan(orphan.clone()));
        }
        create_ca(&pki.ca_cert, &pki.ca_key)?
    };

    if !pair_exists(&pki.server_cert, &pki.server_key)? {
        let mut params = leaf_params("provcache server", DEV_LEAF_VALIDITY);
        params.subject_alt_names = vec![
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            SanType::DnsName("localhost".try_into()?),
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        issue(&params, &ca, &pki.server_cert, &pki.server_key)?;
    }
    for client in DevClient::ALL {
        let (cert, key) = (pki.client_cert(client), pki.client_key(client));
        if !pair_exists(&cert, &key)? {
            let params = client_params(&client.spiffe_id(), client.name(), DEV_LEAF_VALIDITY)?;
            issue(&params, &ca, &cert, &key)?;
        }
    }
    if !pki.policy.exists() {
        write_new(&pki.policy, dev_policy_toml().as_bytes(), 0o644)?;
    }
    Ok(pki)
}

/// A certificate and key written by [`issue_client_cert`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// `<prefix>.pem`.
    pub cert: PathBuf,
    /// `<prefix>.key` (PKCS#8 EC P-256, mode 0600).
    pub key: PathBuf,
}

/// Issues a client certificate for the SPIFFE ID `principal_uri` from the CA
/// in `ca_dir` (`ca.pem`, `ca.key`), valid for `validity`, written to
/// `<out_prefix>.pem` and `<out_prefix>.key` (never overwritten).
pub fn issue_client_cert(
    ca_dir: &Path,
    principal_uri: &str,
    out_prefix: &Path,
    validity: Duration,
) -> Result<IssuedCert, PkiError> {
    spiffe_trust_domain(principal_uri)?;
    let ca = load_ca(&ca_dir.join("ca.pem"), &ca_dir.join("ca.key"))?;
    let with_ext = |ext: &str| {
        let mut name = out_prefix.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    let out = IssuedCert { cert: with_ext(".pem"), key: with_ext(".key") };
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(PkiError::Exists(path.clone()));
        }
    }
    let cn = principal_uri.rsplit('/').next().unwrap_or("client");
    let params = client_params(principal_uri, cn, validity)?;
    issue(&params, &ca, &out.cert, &out.key)?;
    Ok(out)
}

fn pair_exists(cert: &Path, key: &Path) -> Result<bool, PkiError> {
    match (cert.exists(), key.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(PkiError::HalfPair { present: cert.to_owned(), missing: key.to_owned() }),
        (false, true) => Err(PkiError::HalfPair { present: key.to_owned(), missing: cert.to_owned() }),
    }
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

fn random_serial() -> SerialNumber {
    let mut serial = [0u8; 16];
    getrandom::fill(&mut serial).expect("the OS random number generator failed");
    serial[0] = (serial[0] & 0x7f) | 0x01; // positive, full length
    SerialNumber::from_slice(&serial)
}

fn named(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "provcache development");
    dn.push(DnType::CommonName, cn);
    dn
}

fn leaf_params(cn: &str, valid_for: Duration) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(cn);
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, valid_for);
    params
}

fn client_params(spiffe_id: &str, cn: &str, valid_for: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = leaf_params(cn, valid_for);
    params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

fn create_ca(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = named("provcache development CA");
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, DEV_CA_VALIDITY);
    let cert = params.self_signed(&key)?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issuer::new(params, key))
}

fn load_ca(cert_path: &Path, key_path: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| PkiError::Io { path: p.to_owned(), source });
    let bad = |path: &Path, e: rcgen::Error| PkiError::BadCa { path: path.to_owned(), why: e.to_string() };
    let key = KeyPair::from_pem(&read(key_path)?).map_err(|e| bad(key_path, e))?;
    Issuer::from_ca_cert_pem(&read(cert_path)?, key).map_err(|e| bad(cert_path, e))
}

/// Generates a P-256 key, signs `params` with `ca`, writes key then cert.
fn issue(
    params: &CertificateParams,
    ca: &Issuer<'_, KeyPair>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, ca)?;
    write_new(key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Writes a CRL signed by `ca` that revokes the certificates with `serials`
/// (key compromise, one second ago), numbered `number` and valid for
/// `valid_for`, to `path`. The file is replaced atomically: a hidden
/// temporary file in the same directory (the server's CRL reader ignores
/// hidden files), synced, then renamed, so a reloading server never sees half
/// a CRL.
pub fn write_crl(
    ca: &Issuer<'_, KeyPair>,
    path: &Path,
    serials: &[Vec<u8>],
    number: u64,
    valid_for: Duration,
) -> Result<(), PkiError> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::from_secs(60),
        next_update: now + valid_for,
        crl_number: SerialNumber::from(number.to_be_bytes().to_vec()),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: now - Duration::from_secs(1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = params.signed_by(ca)?.pem()?;
    let name = path.file_name().ok_or_else(|| PkiError::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, pem.as_bytes(), 0o644)?;
    std::fs::rename(&tmp, path).map_err(|source| PkiError::Io { path: path.to_owned(), source })
}

/// Creates `path` with `mode`; fails if it exists.
/// Creates `dir` (and missing parents) readable by its owner only: it holds
/// private keys and the trust policy, which whoever can write decides what
/// is served as verified.
fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io { path: dir.to_owned(), source })
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            PkiError::Io { path: path.to_owned(), source }
        }
    };
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The development signing key and trust policy in `dir` (`signing.key`,
/// `trust-policy.toml`), created once: an ed25519 key and a policy that
/// trusts it as `active` for ten years. Never overwrites a file.
pub fn ensure_dev_signing(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    use crate::provenance::signing::SigningKey;
    use crate::provenance::trust::{render_key_entry, KeyState};
    create_private_dir(dir)?;
    let key_path = dir.join("signing.key");
    let policy_path = dir.join("trust-policy.toml");
    if !key_path.exists() {
        SigningKey::generate()?.write_pem(&key_path)?;
    }
    if !policy_path.exists() {
        let key = SigningKey::load(&key_path)?;
        let now = std::time::SystemTime::now();
        let entry = render_key_entry(
            "dev-signing",
            &key.verifying_key(),
            KeyState::Active,
            now - Duration::from_secs(24 * 3600),
            now + DEV_CA_VALIDITY,
        );
        let text = format!(
            "# Development trust policy written by provcache: trusts dev-pki/signing.key.\n\
             # The same file drives `provcache verify-build`. See docs/signing.md.\n\
             policy_version = 1\nclock_skew = \"5m\"\n\n{entry}"
        );
        write_new(&policy_path, text.as_bytes(), 0o600)?;
    }
    Ok((key_path, policy_path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::access::gate::Permission;
    use crate::access::identity::{identify, IdentityMode};
    use crate::access::policy::Policy;
    use crate::cache::resource::InstanceName;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    #[test]
    fn the_development_signing_files_and_their_directory_are_private_to_their_owner() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("dev-pki");
        let (key, policy) = ensure_dev_signing(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "the directory");
        assert_eq!(mode(&key), 0o600, "the signing key");
        assert_eq!(mode(&policy), 0o600, "the trust policy");
        ensure_dev_pki(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700, "the PKI shares the directory");
    }

    #[test]
    fn dev_pki_has_the_promised_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(&tmp.path().join("pki")).unwrap();
        let mode = IdentityMode::spiffe([DEV_TRUST_DOMAIN]);
        for client in DevClient::ALL {
            let id = identify(&cert_der(&pki.client_cert(client)), &mode).unwrap();
            assert_eq!(id.principal, client.spiffe_id());
            let key = std::fs::read_to_string(pki.client_key(client)).unwrap();
            assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
            let pk = rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            assert!(matches!(pk, rustls_pki_types::PrivateKeyDer::Pkcs8(_)));
            let kp = KeyPair::from_pem(&key).unwrap();
            assert_eq!(kp.algorithm(), &rcgen::PKCS_ECDSA_P256_SHA256);
        }
        for key in [&pki.ca_key, &pki.server_key, &pki.client_key(DevClient::Reader)] {
            assert_eq!(std::fs::metadata(key).unwrap().permissions().mode() & 0o777, 0o600, "{}", key.display());
        }
        // The server certificate is for 127.0.0.1 and serverAuth only, so it is no client identity.
        let server = cert_der(&pki.server_cert);
        let (_, parsed) = x509_parser::parse_x509_certificate(&server).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap();
        assert!(san
            .value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::IPAddress(ip) if *ip == [127, 0, 0, 1])));
        assert!(identify(&server, &mode).is_err());

        let policy = Policy::load(&pki.policy).unwrap();
        let main = InstanceName::parse("main").unwrap();
        let w = DevClient::Writer.spiffe_id();
        let r = DevClient::Reader.spiffe_id();
        let a = DevClient::Auditor.spiffe_id();
        assert!(policy.check(&w, &main, Permission::AcWrite).is_ok());
        assert!(policy.check(&w, &InstanceName::default(), Permission::CasWrite).is_ok());
        assert!(policy.check(&w, &main, Permission::AuditRead).is_err());
        assert!(policy.check(&r, &main, Permission::AcRead).is_ok());
        assert!(policy.check(&r, &main, Permission::AcWrite).is_err());
        assert!(policy.check(&r, &main, Permission::CasWrite).is_err());
        assert!(policy.check(&a, &main, Permission::AuditRead).is_ok());
        assert!(policy.check(&a, &main, Permission::AcWrite).is_err());
    }

    #[test]
    fn ensure_is_idempotent_and_never_overwrites() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ensure_dev_pki(tmp.path()).unwrap();
        let before = std::fs::read(&first.ca_key).unwrap();
        let writer_before = std::fs::read(first.client_cert(DevClient::Writer)).unwrap();
        // Remove one client pair: it is re-issued by the existing CA, nothing else changes.
        std::fs::remove_file(first.client_cert(DevClient::Reader)).unwrap();
        std::fs::remove_file(first.client_key(DevClient::Reader)).unwrap();
        let second = ensure_dev_pki(tmp.path()).unwrap();
        assert_eq!(first, second);
        assert_eq!(std::fs::read(&second.ca_key).unwrap(), before);
        assert_eq!(std::fs::read(second.client_cert(DevClient::Writer)).unwrap(), writer_before);
        assert!(second.client_key(DevClient::Reader).exists());

        // A half pair is an error, not a silent overwrite.
        std::fs::remove_file(second.client_key(DevClient::Auditor)).unwrap();
        assert!(matches!(ensure_dev_pki(tmp.path()), Err(PkiError::HalfPair { .. })));
        // Leaves without their CA are an error too.
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("server.pem"), "x").unwrap();
        assert!(matches!(ensure_dev_pki(other.path()), Err(PkiError::Orphan(_))));
        assert!(!other.path().join("ca.pem").exists());
    }

    #[test]
    fn issue_client_cert_uses_the_ca_and_refuses_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(tmp.path()).unwrap();
        let prefix = tmp.path().join("ci-linux");
        let out = issue_client_cert(tmp.path(), "spiffe://provcache.dev/ci/linux", &prefix, Duration::from_secs(3600))
            .unwrap();
        assert_eq!(out.cert, tmp.path().join("ci-linux.pem"));
        let der = cert_der(&out.cert);
        let id = identify(&der, &IdentityMode::spiffe([DEV_TRUST_DOMAIN])).unwrap();
        assert_eq!(id.principal, "spiffe://provcache.dev/ci/linux");
        let hours = id.cert.not_after.duration_since(std::time::SystemTime::now()).unwrap().as_secs();
        assert!((3500..=3600).contains(&hours), "{hours}");
        // Signed by the dev CA: the TLS verifier accepts it.
        let verifier = crate::access::tls::ClientVerifier::new(std::slice::from_ref(&pki.ca_cert), &[], false).unwrap();
        verifier.check_chain(&[der], std::time::SystemTime::now()).unwrap();

        let again = issue_client_cert(tmp.path(), "spiffe://provcache.dev/ci/linux", &prefix, Duration::from_secs(60));
        assert!(matches!(again, Err(PkiError::Exists(_))));
        let bad = issue_client_cert(tmp.path(), "https://x/y", &tmp.path().join("z"), Duration::from_secs(60));
        assert!(matches!(bad, Err(PkiError::BadPrincipal(_))));
    }

    #[test]
    fn bazel_flags_are_ready_to_paste() {
        let pki = DevPki::at(PathBuf::from("/p"));
        assert_eq!(
            pki.bazel_flags(DevClient::Writer, 8980),
            "--remote_cache=grpcs://127.0.0.1:8980 --tls_certificate=/p/ca.pem \
             --tls_client_certificate=/p/writer.pem --tls_client_key=/p/writer.key"
        );
        let reader = pki.bazel_flags(DevClient::Reader, 1);
        assert!(
            reader.ends_with(
                "--tls_client_key=/p/reader.key --remote_upload_local_results=false \
                 --experimental_build_event_upload_strategy=local"
            ),
            "{reader}"
        );
        assert!(pki.bazel_flags(DevClient::Auditor, 1).contains("--remote_upload_local_results=false"));
    }
}

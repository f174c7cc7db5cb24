//! Every security property holds on each replica (issue 16): real
//! `provcache serve --store s3://...` processes over mutual TLS, sharing one
//! PKI, one authorization policy (a CI writer, a read-only developer, an
//! auditor) and one trust policy, on the suite's shared SeaweedFS. Who may
//! write is decided by each replica from the caller's certificate; the hit
//! log names the principal the serving replica attested; and nothing put
//! into the bucket behind the replicas' backs is served.

use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStoreExt as _, PutPayload};
use prost::Message as _;
use provcache::access::pki::{ensure_dev_pki, DevClient, DevPki};
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::cache::resource::InstanceName;
use provcache::proto::prov::storage::StoredActionEntry;
use provcache::proto::prov::{ActionResultStatement, Envelope};
use provcache::proto::reapi;
use provcache::provenance::signing::SigningKey;
use provcache::store::object::keys;
use tonic::Code;

use crate::common::*;
use crate::scale_out::{audit_invocation, blob_name, keys_under, replica_with, Keys, AC_TTL, PREFIX};

const WRITER: &str = "spiffe://provcache.dev/writer";
const READER: &str = "spiffe://provcache.dev/reader";

/// Replicas A and B of one bucket behind mutual TLS, with the PKI whose
/// CA issued their server certificate and every client's.
struct MtlsReplicas {
    bucket: Bucket,
    keys: Keys,
    pki: DevPki,
    _pki_dir: tempfile::TempDir,
    a: ServerProcess,
    b: ServerProcess,
}

impl MtlsReplicas {
    /// Two replicas of a new bucket, each signing with its own key, both
    /// trusting both keys and authorizing callers by the PKI's policy.
    fn start(test: &str) -> MtlsReplicas {
        let bucket = Seaweed::shared().bucket(test);
        let keys = Keys::new();
        let pki_dir = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(&pki_dir.path().join("pki")).unwrap();
        let a = replica_with(&bucket, &keys, 0, mtls_args(&pki));
        let b = replica_with(&bucket, &keys, 1, mtls_args(&pki));
        assert_eq!((a.scheme(), b.scheme()), ("grpcs", "grpcs"), "both replicas serve mutual TLS");
        MtlsReplicas { bucket, keys, pki, _pki_dir: pki_dir, a, b }
    }

    /// Clients of `replica` on a connection of their own, as the PKI's `client`.
    async fn clients(&self, replica: &ServerProcess, client: DevClient) -> Clients {
        let files = CertFiles::dev(&self.pki.dir, client.name());
        Clients::new(tls_channel(replica.addr(), &self.pki.dir, Some(&files)).await.unwrap())
    }

    /// verify-build's connection arguments as the PKI's auditor.
    fn auditor_args(&self) -> Vec<String> {
        let auditor = DevClient::Auditor;
        [
            ("--ca", self.pki.ca_cert.clone()),
            ("--cert", self.pki.client_cert(auditor)),
            ("--key", self.pki.client_key(auditor)),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
        .collect()
    }
}

/// `serve` arguments for an operator's own PKI: its server certificate,
/// its CA for client certificates, its policy and SPIFFE trust domain.
fn mtls_args(pki: &DevPki) -> Vec<String> {
    let path = |p: &std::path::Path| p.display().to_string();
    vec![
        "--tls-cert".into(),
        path(&pki.server_cert),
        "--tls-key".into(),
        path(&pki.server_key),
        "--client-ca".into(),
        path(&pki.ca_cert),
        "--authz-policy".into(),
        path(&pki.policy),
        "--trust-domain".into(),
        "provcache.dev".into(),
    ]
}

fn assert_denied(result: Result<impl std::fmt::Debug, tonic::Status>, permission: &str) {
    let status = result.expect_err("a read-only identity's write is refused");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(READER) && status.message().contains(permission), "{status:?}");
}

/// The object key of `action`'s current entry (default instance, SHA-256).
fn ac_key(action: &reapi::Digest) -> ObjectPath {
    let digest = Digest::from_proto(DigestFunction::Sha256, Some(action)).unwrap();
    keys::action(&InstanceName::parse("").unwrap(), &digest)
}

/// The stored entry signed again by `key`, as a forger holding that key
/// would sign it: the statement names `key`, both envelopes carry its
/// signature, everything else is the original's.
fn signed_again(entry: &[u8], key: &SigningKey) -> Vec<u8> {
    let mut entry = StoredActionEntry::decode(entry).unwrap();
    let decode = |bytes: &Bytes| Envelope::decode(bytes.as_ref()).unwrap();
    let mut statement = ActionResultStatement::decode(decode(&entry.envelope).payload).unwrap();
    statement.key_id = key.key_id().to_string();
    entry.envelope = key.sign(&statement).encode_to_vec().into();
    let references = decode(&entry.references_envelope);
    entry.references_envelope = key.sign_payload(&references.payload_type, references.payload).encode_to_vec().into();
    entry.encode_to_vec()
}

#[tokio::test]
async fn a_writers_entry_on_a_is_a_hit_for_a_reader_on_b_who_may_not_write_there_and_strangers_are_refused() {
    let r = MtlsReplicas::start("mtls-authz");
    let mut writer_a = r.clients(&r.a, DevClient::Writer).await;
    let (action, out) = writer_a.store_entry("", "ci-build").await;
    let mut reader_b = r.clients(&r.b, DevClient::Reader).await;
    let hit = reader_b.lookup("", &action).await.expect("the developer gets the CI entry through B");
    assert_eq!(hit.output_files[0].digest.as_ref(), Some(&out));
    assert_eq!(reader_b.read(&blob_name(&out), 0, 0).await.unwrap(), b"output of ci-build");

    // Every write of the read-only identity on B is refused and leaves nothing.
    let other = upload_action(&mut writer_a, "", "never-written").await;
    assert_denied(reader_b.update_result("", &other, output_result(&out)).await, "ac:write");
    let poison = b"a developer's poisoned output".as_slice();
    assert_denied(reader_b.batch_update("", &[poison]).await, "cas:write");
    let upload = format!("uploads/dev/{}", blob_name(&sha(poison)));
    assert_denied(reader_b.write(&upload, poison, 8).await, "cas:write");
    assert_eq!(writer_a.lookup("", &other).await.unwrap_err(), Code::NotFound, "no entry reached the bucket");
    assert_eq!(writer_a.missing("", &[sha(poison)]).await, [sha(poison)], "no blob reached the bucket");

    // The same write by the CI identity on B is accepted.
    let mut writer_b = r.clients(&r.b, DevClient::Writer).await;
    writer_b.update_result("", &other, output_result(&out)).await.expect("the writer may write through B");

    // A certificate from a CA the replicas do not know, naming the writer.
    let dir = tempfile::tempdir().unwrap();
    let stranger = CertFiles::sign(&other_ca(), &client_params("writer", vec![uri(WRITER)]), dir.path(), "stranger");
    for replica in [&r.a, &r.b] {
        let outcome = match tls_channel(replica.addr(), &r.pki.dir, Some(&stranger)).await {
            Ok(channel) => Clients::new(channel).lookup("", &action).await.map(|_| ()),
            Err(_) => Err(Code::Unavailable),
        };
        assert!(outcome.is_err_and(|c| c != Code::NotFound), "{} served a stranger: {outcome:?}", replica.url());
    }
}

#[tokio::test]
async fn a_hit_on_b_is_logged_under_b_s_attested_reader_and_verify_build_against_a_audits_it() {
    let r = MtlsReplicas::start("mtls-hit-log");
    let (action, _) = r.clients(&r.a, DevClient::Writer).await.store_entry("", "audited").await;
    let invocation = "developer-build-on-b";
    // The claims are the reader's; the principal is B's to attest.
    let claims = request_metadata(invocation, "Genrule", "//app:bin");
    let mut reader_b = r.clients(&r.b, DevClient::Reader).await;
    reader_b.lookup_as("", &action, &claims).await.expect("a hit on B");

    let mut args = r.auditor_args();
    args.extend(["--reader".to_owned(), READER.to_owned()]);
    let report = audit_invocation(&r.a, &r.keys, invocation, 1, &args).await;
    assert!(report.contains(invocation), "{report}");
}

#[tokio::test]
async fn an_entry_forged_in_the_bucket_by_an_untrusted_key_or_under_another_action_is_a_miss_on_every_replica() {
    let r = MtlsReplicas::start("mtls-forged-ac");
    let mut writer_a = r.clients(&r.a, DevClient::Writer).await;
    let (resigned, _) = writer_a.store_entry("", "signed-again-by-a-trusted-key").await;
    let (forged, _) = writer_a.store_entry("", "signed-again-by-a-stranger").await;
    let (original, _) = writer_a.store_entry("", "copied-elsewhere").await;
    let elsewhere = upload_action(&mut writer_a, "", "holds-a-copied-entry").await;

    let store = r.bucket.store(PREFIX);
    let read = |action: &reapi::Digest| {
        let (store, path) = (store.clone(), ac_key(action));
        async move { store.get(&path).await.unwrap().bytes().await.unwrap() }
    };
    let put = |action: &reapi::Digest, bytes: Vec<u8>| {
        let (store, path) = (store.clone(), ac_key(action));
        async move { store.put(&path, PutPayload::from(bytes)).await.unwrap() }
    };
    // The control: the same re-signing with a key both replicas trust is still a hit.
    put(&resigned, signed_again(&read(&resigned).await, &r.keys.keys[1])).await;
    put(&forged, signed_again(&read(&forged).await, &SigningKey::generate().unwrap())).await;
    put(&elsewhere, read(&original).await.to_vec()).await;
    tokio::time::sleep(AC_TTL * 2).await;

    for replica in [&r.a, &r.b] {
        let mut c = r.clients(replica, DevClient::Reader).await;
        let url = replica.url();
        c.lookup("", &resigned).await.unwrap_or_else(|e| panic!("{url}: a re-signed trusted entry misses: {e:?}"));
        assert_eq!(c.lookup("", &forged).await.unwrap_err(), Code::NotFound, "{url} served an untrusted signer");
        assert_eq!(c.lookup("", &elsewhere).await.unwrap_err(), Code::NotFound, "{url} served a copied entry");
        c.lookup("", &original).await.unwrap_or_else(|e| panic!("{url}: the copied entry's own action: {e:?}"));
    }
}

#[tokio::test]
async fn a_blob_altered_in_the_bucket_is_not_served_by_a_replica_that_had_not_cached_it_and_is_removed() {
    let r = MtlsReplicas::start("mtls-altered-blob");
    let mut writer_a = r.clients(&r.a, DevClient::Writer).await;
    let small = b"a small blob the bucket alters".as_slice();
    let large = noise(3 << 20, 61);
    let untouched = b"a blob nobody alters".as_slice();
    let digests = writer_a.upload("", &[small, &large, untouched]).await;

    let store = r.bucket.store(PREFIX);
    let cas = keys_under(&r.bucket, "cas").await;
    for d in &digests[..2] {
        let path = ObjectPath::from(cas.iter().find(|k| k.contains(&d.hash)).expect("the blob's object").as_str());
        let mut bytes = store.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        store.put(&path, PutPayload::from(bytes)).await.unwrap();
    }

    let mut reader_b = r.clients(&r.b, DevClient::Reader).await;
    for (d, (offset, limit)) in digests[..2].iter().zip([(0, 0), (1000, 10)]) {
        let status = reader_b.read(&blob_name(d), offset, limit).await.expect_err("altered bytes are never served");
        assert!(matches!(status.code(), Code::DataLoss | Code::NotFound), "{status:?}");
    }
    assert_eq!(reader_b.read(&blob_name(&digests[2]), 0, 0).await.unwrap(), untouched, "an intact blob is served");
    let cas = keys_under(&r.bucket, "cas").await;
    for d in &digests[..2] {
        assert!(!cas.iter().any(|k| k.contains(&d.hash)), "the altered object is removed: {cas:?}");
    }
    assert_eq!(reader_b.missing("", &digests[..2]).await, &digests[..2], "and reported missing");
}

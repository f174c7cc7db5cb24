//! A real server on 127.0.0.1:0 and real gRPC clients.
#![allow(dead_code)]

use std::sync::Arc;

use prost::Message;
use provcache::access::gate::{AllowAll, SharedGate};
use provcache::cache::digest::{Digest, DigestFunction};
use provcache::proto::bytestream::byte_stream_client::ByteStreamClient;
use provcache::proto::bytestream::WriteRequest;
use provcache::proto::reapi::action_cache_client::ActionCacheClient;
use provcache::proto::reapi::capabilities_client::CapabilitiesClient;
use provcache::proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use provcache::proto::reapi::{self, batch_update_blobs_request};
use provcache::server::{Cache, ServerOptions};
use provcache::store::{Store, StoreOptions};
use tonic::transport::Channel;

pub const MAX_MSG: usize = 64 << 20;

/// How to start a [`TestServer`].
#[derive(Default, Clone)]
pub struct TestOptions {
    /// Serve mutual TLS with the dev PKI (otherwise plaintext with `gate`).
    pub tls: bool,
    /// Authorization policy text for the TLS server (default: the dev policy).
    pub policy: Option<String>,
    /// CRL files the TLS server watches.
    pub crls: Vec<std::path::PathBuf>,
    /// The gate of a plaintext server (default: allow all).
    pub gate: Option<SharedGate>,
    /// Reject (default) or flag.
    pub mode: provcache::provenance::Mode,
    /// Injected clock.
    pub clock: Option<provcache::clock::Clock>,
    /// Signing key and trust policy paths (default: the dev ones).
    pub signing_key: Option<std::path::PathBuf>,
    /// See `signing_key`.
    pub trust_policy: Option<std::path::PathBuf>,
    /// `--max-size`.
    pub max_size: Option<u64>,
    /// How often a record's recency may be refreshed (default: the server's).
    pub touch_interval: Option<std::time::Duration>,
    /// Serve metrics on a second listener ([`TestServer::metrics_addr`]).
    pub metrics: bool,
    /// Limits (default: the server's defaults).
    pub limits: Option<provcache::limits::Limits>,
}

/// A server running in this process on a real socket.
#[allow(dead_code)]
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    /// The metrics endpoint, when started with `metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub dir: tempfile::TempDir,
    pub store: Arc<Store>,
    /// The server's signer and verifier: its counters and trust policy.
    pub provenance: Arc<provcache::provenance::Provenance>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Arc::new(AllowAll)).await
    }

    pub async fn start_with(gate: SharedGate) -> Self {
        Self::start_opts(TestOptions { gate: Some(gate), ..Default::default() }).await
    }

    /// Starts a server; with `tls` set, over mutual TLS with the dev PKI
    /// created in `DIR/dev-pki` and `policy` (default: the dev policy).
    pub async fn start_opts(opts: TestOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev-pki");
        let (signing_key, trust_policy) = provcache::access::pki::ensure_dev_signing(&dev).unwrap();
        let options = ServerOptions {
            data_dir: dir.path().to_path_buf(),
            store: StoreOptions {
                sync: false,
                max_size: opts.max_size,
                touch_interval: opts.touch_interval.unwrap_or(StoreOptions::default().touch_interval),
                ..Default::default()
            },
            provenance: provcache::provenance::ProvenanceConfig {
                signing_key: opts.signing_key.unwrap_or(signing_key),
                trust_policy: opts.trust_policy.unwrap_or(trust_policy),
                mode: opts.mode,
                server_id: "test".into(),
                verification_disabled: false,
                signing_disabled: false,
            },
            history_retention: std::time::Duration::from_secs(3600),
            metrics: opts.metrics,
            shutdown_timeout: std::time::Duration::from_secs(10),
            limits: opts.limits.clone().unwrap_or_default(),
        };
        let clock = opts.clock.clone().unwrap_or_else(|| Arc::new(std::time::SystemTime::now));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_addr = opts.metrics.then(|| metrics_listener.local_addr().unwrap());
        let start_metrics = |cache: &Cache| {
            if opts.metrics {
                cache.serve_metrics(metrics_listener).unwrap();
            }
        };
        let (store, provenance, task) = if opts.tls {
            let pki = provcache::access::pki::ensure_dev_pki(&dev).unwrap();
            let mut settings = pki.tls_settings();
            settings.crls = opts.crls.clone();
            settings.crl_reload_interval = std::time::Duration::from_millis(200);
            let tls = provcache::access::tls::TlsServer::from_settings(&settings).unwrap();
            let policy = match &opts.policy {
                Some(text) => provcache::access::policy::Policy::parse(text).unwrap(),
                None => provcache::access::policy::Policy::load(&pki.policy).unwrap(),
            };
            let gate = provcache::access::policy::MtlsGate::new(
                Arc::new(policy),
                provcache::access::identity::IdentityMode::spiffe(["provcache.dev"]),
                tls.verifier.clone(),
            )
            .with_clock(clock.clone());
            let cache = Cache::open_with_clock(&options, Arc::new(gate), clock).unwrap();
            start_metrics(&cache);
            let store = cache.context().cas.store().clone();
            let provenance = cache.context().provenance.clone();
            (store, provenance, tokio::spawn(cache.serve_tls(listener, tls.config.clone(), shutdown)))
        } else {
            let gate = opts.gate.unwrap_or_else(|| Arc::new(AllowAll));
            let cache = Cache::open_with_clock(&options, gate, clock).unwrap();
            start_metrics(&cache);
            let store = cache.context().cas.store().clone();
            let provenance = cache.context().provenance.clone();
            (store, provenance, tokio::spawn(cache.serve_plaintext(listener, shutdown)))
        };
        TestServer { addr, metrics_addr, dir, store, provenance, shutdown: Some(tx), task: Some(task) }
    }

    /// The dev PKI directory of this server.
    pub fn pki_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("dev-pki")
    }

    /// An mTLS channel with a client certificate (`name`.pem / `name`.key in
    /// the dev PKI, or any paths), or without one.
    pub async fn tls_channel(
        &self,
        identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    ) -> Result<Channel, tonic::transport::Error> {
        use tonic::transport::{Certificate, ClientTlsConfig, Identity};
        let ca = std::fs::read(self.pki_dir().join("ca.pem")).unwrap();
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()));
        }
        Channel::from_shared(format!("https://{}", self.addr)).unwrap().tls_config(tls)?.connect().await
    }

    /// Clients authenticated as one of the dev PKI's clients (writer, reader, auditor).
    pub async fn dev_clients(&self, name: &str) -> Clients {
        let dir = self.pki_dir();
        let ch =
            self.tls_channel(Some((dir.join(format!("{name}.pem")), dir.join(format!("{name}.key"))))).await.unwrap();
        Clients::new(ch)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.unwrap()
    }

    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await)
    }

    #[allow(dead_code)]
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

#[derive(Clone)]
pub struct Clients {
    pub cas: ContentAddressableStorageClient<Channel>,
    pub ac: ActionCacheClient<Channel>,
    pub bs: ByteStreamClient<Channel>,
    pub caps: CapabilitiesClient<Channel>,
}

impl Clients {
    pub fn new(ch: Channel) -> Self {
        Clients {
            cas: ContentAddressableStorageClient::new(ch.clone())
                .max_decoding_message_size(MAX_MSG)
                .max_encoding_message_size(MAX_MSG),
            ac: ActionCacheClient::new(ch.clone()).max_decoding_message_size(MAX_MSG),
            bs: ByteStreamClient::new(ch.clone()).max_decoding_message_size(MAX_MSG),
            caps: CapabilitiesClient::new(ch),
        }
    }

    /// Uploads blobs with BatchUpdateBlobs and asserts every one succeeded.
    pub async fn upload(&mut self, instance: &str, blobs: &[&[u8]]) -> Vec<reapi::Digest> {
        let digests: Vec<reapi::Digest> = blobs.iter().map(|b| sha(b)).collect();
        let resp = self
            .cas
            .batch_update_blobs(reapi::BatchUpdateBlobsRequest {
                instance_name: instance.into(),
                requests: blobs
                    .iter()
                    .zip(&digests)
                    .map(|(b, d)| batch_update_blobs_request::Request {
                        digest: Some(d.clone()),
                        data: bytes::Bytes::copy_from_slice(b),
                        compressor: 0,
                    })
                    .collect(),
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for r in &resp.responses {
            assert_eq!(r.status.as_ref().unwrap().code, 0, "{:?}", r.status);
        }
        digests
    }

    /// Uploads a protobuf message and returns its digest.
    pub async fn upload_msg<M: Message>(&mut self, instance: &str, m: &M) -> reapi::Digest {
        self.upload(instance, &[&m.encode_to_vec()]).await.remove(0)
    }

    /// Writes a blob with ByteStream in `chunk`-byte messages.
    pub async fn write(&mut self, resource: &str, data: &[u8], chunk: usize) -> Result<i64, tonic::Status> {
        let msgs = write_requests(resource, data, chunk, 0, true);
        self.bs.write(futures::stream::iter(msgs)).await.map(|r| r.into_inner().committed_size)
    }

    /// Reads a whole blob with ByteStream.
    pub async fn read(&mut self, resource: &str, offset: i64, limit: i64) -> Result<Vec<u8>, tonic::Status> {
        let mut stream = self
            .bs
            .read(provcache::proto::bytestream::ReadRequest {
                resource_name: resource.into(),
                read_offset: offset,
                read_limit: limit,
            })
            .await?
            .into_inner();
        let mut out = Vec::new();
        while let Some(msg) = stream.message().await? {
            out.extend_from_slice(&msg.data);
        }
        Ok(out)
    }

    pub async fn missing(&mut self, instance: &str, digests: &[reapi::Digest]) -> Vec<reapi::Digest> {
        self.cas
            .find_missing_blobs(reapi::FindMissingBlobsRequest {
                instance_name: instance.into(),
                blob_digests: digests.to_vec(),
                digest_function: 0,
            })
            .await
            .unwrap()
            .into_inner()
            .missing_blob_digests
    }
}

pub fn write_requests(resource: &str, data: &[u8], chunk: usize, start: i64, finish: bool) -> Vec<WriteRequest> {
    let mut msgs = Vec::new();
    let mut offset = 0usize;
    loop {
        let end = (offset + chunk).min(data.len());
        let last = end == data.len();
        msgs.push(WriteRequest {
            resource_name: if msgs.is_empty() { resource.to_string() } else { String::new() },
            write_offset: start + offset as i64,
            finish_write: last && finish,
            data: bytes::Bytes::copy_from_slice(&data[offset..end]),
        });
        offset = end;
        if last {
            break;
        }
    }
    msgs
}

pub fn sha(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Sha256, data).to_proto()
}

pub fn blake3(data: &[u8]) -> reapi::Digest {
    Digest::of(DigestFunction::Blake3, data).to_proto()
}

pub fn rn(d: &reapi::Digest) -> String {
    format!("{}/{}", d.hash, d.size_bytes)
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    provcache::tools::bench::pseudo_random_bytes(seed, len).to_vec()
}

/// Uploads an Action with its Command and returns the action digest.
pub async fn upload_action(c: &mut Clients, instance: &str, salt: &str) -> reapi::Digest {
    let command = reapi::Command {
        arguments: vec!["echo".into(), salt.into()],
        output_files: vec!["out.txt".into()],
        ..Default::default()
    };
    let command_digest = c.upload_msg(instance, &command).await;
    let input_root = c.upload_msg(instance, &reapi::Directory::default()).await;
    let action = reapi::Action {
        command_digest: Some(command_digest),
        input_root_digest: Some(input_root),
        ..Default::default()
    };
    c.upload_msg(instance, &action).await
}

/// An UpdateActionResult request.
pub fn update(instance: &str, action: &reapi::Digest, result: reapi::ActionResult) -> reapi::UpdateActionResultRequest {
    reapi::UpdateActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        action_result: Some(result),
        ..Default::default()
    }
}

/// A GetActionResult request.
pub fn get(instance: &str, action: &reapi::Digest) -> reapi::GetActionResultRequest {
    reapi::GetActionResultRequest {
        instance_name: instance.into(),
        action_digest: Some(action.clone()),
        ..Default::default()
    }
}

/// An output file entry.
pub fn output(path: &str, d: &reapi::Digest) -> reapi::OutputFile {
    reapi::OutputFile { path: path.into(), digest: Some(d.clone()), ..Default::default() }
}

//! The object-store client: the operator's `s3://BUCKET/PREFIX` and
//! `[storage]` settings turned into one `Arc<dyn ObjectStore>` scoped to the
//! prefix, and the start-up check that the bucket answers.
//!
//! Credentials never pass through these settings: they come from the
//! standard `AWS_*` variables (or the instance's role) that
//! `AmazonS3Builder::from_env` reads, so nothing here can print a secret.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use futures::StreamExt as _;
use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

/// Default bound on opening a connection to the object store.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one request. The client's timeout is the TOTAL time of
/// a request, streaming its body included, so it must let the largest GET
/// finish (a multi-GiB blob at ~10 MB/s takes minutes); a store that does
/// not answer at all is caught sooner by the connect timeout and the health
/// probe, which short-circuits requests while the store is down.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Default number of retries of a failed idempotent request.
pub const DEFAULT_MAX_RETRIES: usize = 3;
/// Default first pause between retries (it doubles up to 15 s).
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Default lifetime of a replica's local copy of an Action Cache entry: how
/// long an overwrite (or a tampered object) elsewhere may go unnoticed.
pub const DEFAULT_AC_TTL: Duration = Duration::from_secs(10);
/// Default lifetime of "this blob is in the bucket" in a replica's memory.
pub const DEFAULT_EXISTENCE_TTL: Duration = Duration::from_secs(60);
/// Default age after which a served blob's last-modified is refreshed, so
/// that the bucket's lifecycle rule acts as an LRU.
pub const DEFAULT_REFRESH_AGE: Duration = Duration::from_secs(86_400);

/// Where the shared object store is and how to talk to it, validated.
/// Holds no secret (see the module doc), so `Debug` is safe to log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStoreSettings {
    /// The bucket (from `s3://BUCKET/PREFIX`).
    pub bucket: String,
    /// The key prefix every object lives under, without slashes at either
    /// end; `None`: the bucket's root.
    pub prefix: Option<String>,
    /// The S3 endpoint (`http(s)://host:port`) for stores other than AWS;
    /// `None`: `AWS_ENDPOINT_URL` or AWS itself.
    pub endpoint: Option<String>,
    /// The region; `None`: `AWS_REGION` or the SDK's default.
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); `None`: on exactly when
    /// an endpoint is given (MinIO, Ceph, SeaweedFS need it).
    pub path_style: Option<bool>,
    /// Bound on opening a connection.
    pub connect_timeout: Duration,
    /// Bound on one request, its body's transfer included (see
    /// [`DEFAULT_REQUEST_TIMEOUT`]).
    pub request_timeout: Duration,
    /// Retries of a failed idempotent request before it is an error.
    pub max_retries: usize,
    /// First pause between retries.
    pub retry_backoff: Duration,
    /// See [`DEFAULT_AC_TTL`].
    pub ac_ttl: Duration,
    /// See [`DEFAULT_EXISTENCE_TTL`].
    pub existence_ttl: Duration,
    /// See [`DEFAULT_REFRESH_AGE`].
    pub refresh_age: Duration,
}

impl ObjectStoreSettings {
    /// Parses `s3://BUCKET/PREFIX` (prefix optional) with every other
    /// setting at its default; the error says what a valid URL looks like.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let usage = "expected s3://BUCKET or s3://BUCKET/PREFIX";
        if url.contains('@') {
            // Never repeat the URL: what precedes the @ may be a secret.
            bail!("store: credentials in the URL are refused (use AWS_* variables); {usage}");
        }
        let Some(rest) = url.strip_prefix("s3://") else { bail!("store {url:?}: {usage}") };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("store {url:?}: the bucket is missing; {usage}");
        }
        if !valid_bucket(bucket) {
            bail!("store {url:?}: bucket {bucket:?} is not a valid S3 bucket name (3-63 of a-z 0-9 . -)");
        }
        let prefix = prefix.trim_matches('/');
        let bad_segment = |p: &str| p.is_empty() || p == "." || p == ".." || p.contains(['?', '#']);
        if !prefix.is_empty() && prefix.split('/').any(bad_segment) {
            bail!("store {url:?}: prefix {prefix:?} must be non-empty path segments without . or ..");
        }
        Ok(ObjectStoreSettings {
            bucket: bucket.to_owned(),
            prefix: (!prefix.is_empty()).then(|| prefix.to_owned()),
            endpoint: None,
            region: None,
            path_style: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_retries: DEFAULT_MAX_RETRIES,
            retry_backoff: DEFAULT_RETRY_BACKOFF,
            ac_ttl: DEFAULT_AC_TTL,
            existence_ttl: DEFAULT_EXISTENCE_TTL,
            refresh_age: DEFAULT_REFRESH_AGE,
        })
    }

    /// Sets the endpoint after checking it is an `http(s)://` URL without
    /// credentials in it (they would end up in logs).
    pub fn with_endpoint(mut self, endpoint: &str) -> anyhow::Result<Self> {
        check_endpoint(endpoint, "storage endpoint")?;
        self.endpoint = Some(endpoint.trim_end_matches('/').to_owned());
        Ok(self)
    }

    /// `s3://BUCKET/PREFIX`, as the operator wrote it (normalized).
    pub fn url(&self) -> String {
        match &self.prefix {
            Some(p) => format!("s3://{}/{p}", self.bucket),
            None => format!("s3://{}", self.bucket),
        }
    }

    /// The endpoint requests go to: the setting, else `AWS_ENDPOINT_URL`
    /// (or `AWS_ENDPOINT`), else `None` (AWS).
    pub fn effective_endpoint(&self) -> Option<String> {
        self.endpoint.clone().or_else(|| {
            ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"].iter().find_map(|v| std::env::var(v).ok().filter(|e| !e.is_empty()))
        })
    }

    /// One line for `--check-config` and the start-up log: every effective
    /// setting, no secret (there is none here).
    pub fn describe(&self) -> String {
        let d = |d: Duration| humantime::format_duration(d).to_string();
        format!(
            "{} at {}, region {}, {} addressing, timeouts connect {} request {}, {} retries from {}, \
             ac_ttl {}, existence_ttl {}, refresh_age {}",
            self.url(),
            self.describe_endpoint(),
            self.region.as_deref().unwrap_or("from AWS_REGION"),
            if self.path_style.unwrap_or(self.effective_endpoint().is_some()) {
                "path-style"
            } else {
                "virtual-hosted"
            },
            d(self.connect_timeout),
            d(self.request_timeout),
            self.max_retries,
            d(self.retry_backoff),
            d(self.ac_ttl),
            d(self.existence_ttl),
            d(self.refresh_age),
        )
    }

    /// Where requests go, for messages: the endpoint or "AWS S3".
    fn describe_endpoint(&self) -> String {
        self.effective_endpoint().map_or_else(|| "AWS S3".to_owned(), |e| format!("endpoint {e}"))
    }
}

/// S3's bucket naming rules, enough to catch a typo before the first request.
fn valid_bucket(b: &str) -> bool {
    (3..=63).contains(&b.len())
        && b.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// An endpoint is `http://` or `https://` with a host and no user info.
fn check_endpoint(endpoint: &str, what: &str) -> anyhow::Result<()> {
    let Some(rest) = endpoint.strip_prefix("https://").or_else(|| endpoint.strip_prefix("http://")) else {
        bail!("{what} {endpoint:?}: expected http://HOST[:PORT] or https://HOST[:PORT]");
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        bail!("{what} {endpoint:?}: the host is missing");
    }
    if authority.contains('@') {
        bail!("{what}: credentials in the URL are refused (use AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)");
    }
    Ok(())
}

/// Builds the client: the `AWS_*` environment first, then the settings'
/// overrides, scoped to the prefix. Plain HTTP is allowed only towards an
/// `http://` endpoint the operator named. S3 request signing uses ring (the
/// only provider compiled in, as for tonic), and ring is installed as the
/// process's rustls provider for reqwest's TLS.
pub fn connect(settings: &ObjectStoreSettings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    connect_from(AmazonS3Builder::from_env(), settings)
}

/// [`connect`] from another starting point than the environment, for a
/// caller that holds its own credentials (a test against a local store
/// must not set process-wide variables).
pub fn connect_from(base: AmazonS3Builder, settings: &ObjectStoreSettings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    // Already installed (by the server or an earlier call) is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let endpoint = settings.effective_endpoint();
    if let Some(e) = &endpoint {
        check_endpoint(e, "object store endpoint")?;
    }
    let plain_http = endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
    let options = ClientOptions::new()
        .with_allow_http(plain_http)
        .with_connect_timeout(settings.connect_timeout)
        .with_timeout(settings.request_timeout);
    let retry = RetryConfig {
        backoff: BackoffConfig { init_backoff: settings.retry_backoff, ..Default::default() },
        max_retries: settings.max_retries,
        retry_timeout: settings.request_timeout * (settings.max_retries as u32 + 1),
    };
    let mut builder = base
        .with_bucket_name(&settings.bucket)
        .with_client_options(options)
        .with_retry(retry)
        .with_virtual_hosted_style_request(!settings.path_style.unwrap_or(endpoint.is_some()));
    if let Some(e) = &endpoint {
        builder = builder.with_endpoint(e);
    }
    if let Some(r) = &settings.region {
        builder = builder.with_region(r);
    }
    let store = builder.build().with_context(|| format!("object store {}", settings.url()))?;
    Ok(match &settings.prefix {
        Some(p) => Arc::new(PrefixStore::new(store, p.as_str())),
        None => Arc::new(store),
    })
}

/// One cheap request at start (a LIST of at most one key under the prefix)
/// so that a missing bucket, refused credentials or an unreachable endpoint
/// stop `serve` with one message naming the bucket, the endpoint and what to
/// check, instead of failing every later call.
pub async fn check_bucket(store: &Arc<dyn ObjectStore>, settings: &ObjectStoreSettings) -> anyhow::Result<()> {
    let first = store.list(None).next().await;
    let Some(Err(e)) = first else { return Ok(()) };
    let hint = match &e {
        object_store::Error::NotFound { .. } => "the bucket does not exist: create it, or fix the bucket name",
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            "the credentials were refused: check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)"
        }
        _ => "check that the endpoint is reachable, the bucket exists and the AWS_* credentials are accepted",
    };
    bail!("object store {} at {} does not answer: {hint} ({e})", settings.url(), settings.describe_endpoint())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_the_bucket_and_an_optional_prefix() {
        let s = ObjectStoreSettings::parse("s3://build-cache/replicas/eu/").unwrap();
        assert_eq!((s.bucket.as_str(), s.prefix.as_deref()), ("build-cache", Some("replicas/eu")));
        assert_eq!(s.url(), "s3://build-cache/replicas/eu");
        let s = ObjectStoreSettings::parse("s3://build-cache").unwrap();
        assert_eq!((s.prefix, s.ac_ttl, s.existence_ttl), (None, DEFAULT_AC_TTL, DEFAULT_EXISTENCE_TTL));
        assert_eq!(ObjectStoreSettings::parse("s3://build-cache/").unwrap().url(), "s3://build-cache");
    }

    #[test]
    fn a_bad_url_is_refused_saying_what_is_wrong() {
        for (url, needle) in [
            ("build-cache/x", "expected s3://BUCKET"),
            ("https://build-cache", "expected s3://BUCKET"),
            ("s3:///prefix", "the bucket is missing"),
            ("s3://key:secret@bucket/p", "credentials in the URL are refused"),
            ("s3://bucket:9000/p", "not a valid S3 bucket name"),
            ("s3://Build_Cache", "not a valid S3 bucket name"),
            ("s3://bucket/a//b", "prefix"),
            ("s3://bucket/a/../b", "prefix"),
        ] {
            let msg = ObjectStoreSettings::parse(url).unwrap_err().to_string();
            assert!(msg.contains(needle), "{url}: {msg}");
            assert!(!msg.contains("secret@"), "{url}: the message repeats a credential: {msg}");
        }
    }

    #[test]
    fn an_endpoint_must_be_an_http_url_without_credentials() {
        let s = ObjectStoreSettings::parse("s3://bucket").unwrap();
        assert_eq!(
            s.clone().with_endpoint("http://127.0.0.1:8333/").unwrap().endpoint.unwrap(),
            "http://127.0.0.1:8333"
        );
        let msg = s.clone().with_endpoint("127.0.0.1:8333").unwrap_err().to_string();
        assert!(msg.contains("expected http://HOST"), "{msg}");
        let msg = s.with_endpoint("https://AKIA:hunter2@s3.example").unwrap_err().to_string();
        assert!(msg.contains("credentials in the URL are refused") && !msg.contains("hunter2"), "{msg}");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_one_message_naming_bucket_and_endpoint() {
        // A port nobody listens on: the connection is refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = ObjectStoreSettings::parse("s3://no-such-bucket/p").unwrap();
        s = s.with_endpoint(&format!("http://127.0.0.1:{port}")).unwrap();
        s.region = Some("us-east-1".into());
        s.max_retries = 0;
        let store = connect(&s).unwrap();
        let msg = check_bucket(&store, &s).await.unwrap_err().to_string();
        assert!(msg.contains("s3://no-such-bucket/p"), "{msg}");
        assert!(msg.contains(&format!("endpoint http://127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("check that the endpoint is reachable"), "{msg}");
    }

    #[tokio::test]
    async fn plain_http_is_refused_unless_the_endpoint_says_http() {
        let mut s = ObjectStoreSettings::parse("s3://bucket").unwrap().with_endpoint("https://127.0.0.1:1").unwrap();
        s.region = Some("us-east-1".into());
        assert!(connect(&s).is_ok(), "an https endpoint connects lazily");
        s.endpoint = Some("ftp://127.0.0.1:1".into());
        assert!(connect(&s).unwrap_err().to_string().contains("expected http://HOST"));
    }
}

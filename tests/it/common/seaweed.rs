//! A real S3-compatible object store for the replica tests: SeaweedFS's
//! `weed server -s3` (installed by tests/setup.sh from PyPI) on free ports
//! of 127.0.0.1, with a bucket per test.
//!
//! One instance is shared by the suite ([`Seaweed::shared`]); a test that
//! stops the store (the outage test) starts its own ([`Seaweed::start`]).
//! Every instance is killed when its value is dropped, and a watchdog shell
//! kills it when the test process ends (the shared one is never dropped).

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::ObjectStore;
use provcache::store::object::client::{self, ObjectStoreSettings};

use super::process::tail;

/// How long `weed server` may take until its S3 gateway creates a bucket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The bucket and object of the readiness probe (never a test's bucket).
const PROBE_BUCKET: &str = "/provcache-ready-probe";
const PROBE_OBJECT: &str = "/provcache-ready-probe/probe";
/// The region the replicas are told (SeaweedFS accepts any).
const REGION: &str = "us-east-1";
/// Credentials SeaweedFS without an IAM configuration accepts: an access key
/// id and a secret that a message must never repeat (it is not a real one).
const DUMMY_KEY: &str = "provcache-test";
/// See [`DUMMY_KEY`].
pub const DUMMY_SECRET: &str = "provcache-test-secret";

/// The ports of one `weed server`: each component's HTTP and gRPC port.
#[derive(Clone, Copy, Debug)]
struct Ports {
    master: [u16; 2],
    volume: [u16; 2],
    filer: [u16; 2],
    s3: [u16; 2],
}

/// A running (or stopped) SeaweedFS with its data directory and ports, kept
/// across [`Seaweed::stop`] and [`Seaweed::restart`].
pub struct Seaweed {
    weed: PathBuf,
    dir: tempfile::TempDir,
    ports: Ports,
    child: Option<Child>,
    watchdog: Option<Child>,
    /// The readiness probe object exists (it is read back after a restart).
    probe_written: bool,
}

/// One test's bucket on a [`Seaweed`].
#[derive(Clone, Debug)]
pub struct Bucket {
    /// The bucket's name, unique in the test process.
    pub name: String,
    /// `http://127.0.0.1:PORT`, the S3 endpoint.
    pub endpoint: String,
}

impl Seaweed {
    /// The instance the suite shares, started on first use.
    pub fn shared() -> &'static Seaweed {
        static SHARED: OnceLock<Seaweed> = OnceLock::new();
        SHARED.get_or_init(Seaweed::start)
    }

    /// Starts a new `weed server` on free ports and a new directory, and
    /// waits until its S3 gateway creates buckets. Panics, saying to run
    /// tests/setup.sh, when SeaweedFS is not installed.
    pub fn start() -> Seaweed {
        let weed = weed_binary();
        let [m, mg, v, vg, f, fg, s, sg] = free_ports();
        let ports = Ports { master: [m, mg], volume: [v, vg], filer: [f, fg], s3: [s, sg] };
        let dir = tempfile::tempdir().expect("a directory for SeaweedFS");
        let mut seaweed = Seaweed { weed, dir, ports, child: None, watchdog: None, probe_written: false };
        seaweed.spawn();
        seaweed
    }

    /// A new bucket whose name starts with `hint` (letters, digits, dashes).
    pub fn bucket(&self, hint: &str) -> Bucket {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("{}-{}-{n}", hint.to_ascii_lowercase().replace('_', "-"), std::process::id());
        name.truncate(63);
        if let Err(e) = self.s3_request("PUT", &format!("/{name}"), b"", &[200]) {
            panic!("creating bucket {name}: {e}; SeaweedFS log:\n{}", self.log_tail());
        }
        Bucket { name, endpoint: self.endpoint() }
    }

    /// `http://127.0.0.1:PORT` of the S3 gateway (the same after a restart).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3[0])
    }

    /// Stops the server (SIGKILL: an outage, not a shutdown); its directory
    /// and ports stay for [`Seaweed::restart`].
    pub fn stop(&mut self) {
        for child in [self.child.take(), self.watchdog.take()].into_iter().flatten() {
            kill(child);
        }
    }

    /// Starts the server again on the same directory and ports, as after an
    /// outage: the buckets and objects written before are there.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "SeaweedFS is running");
        self.spawn();
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&fs::read_to_string(self.log_path()).unwrap_or_default(), 40)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("weed.log")
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let p = self.ports;
        let data = self.dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let child = Command::new(&self.weed)
            .args(["server", "-s3", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=0"])
            .args(["-master.volumeSizeLimitMB=64", "-master.telemetry=false"])
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-dir={}", data.display()))
            .args(port_flags("master", p.master))
            .args(port_flags("volume", p.volume))
            .args(port_flags("filer", p.filer))
            .args(port_flags("s3", p.s3))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.weed.display()));
        self.watchdog = Some(watchdog(child.id(), self.dir.path()));
        self.child = Some(child);
        self.wait_until_ready();
    }

    /// Waits until the S3 gateway serves a probe object from a volume (the
    /// master, a volume server and the filer are up then; after a restart,
    /// the volumes written before are loaded), bounded by [`START_TIMEOUT`].
    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("SeaweedFS exited at start ({status}); its log:\n{}", self.log_tail());
            }
            match self.probe() {
                Ok(()) => return,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.stop();
        panic!(
            "SeaweedFS's S3 gateway did not answer in {START_TIMEOUT:?} (last: {last}); its log:\n{}",
            self.log_tail()
        );
    }

    /// One readiness step: the first time, creates the probe bucket and
    /// object; then reads the object back.
    fn probe(&mut self) -> Result<(), String> {
        if !self.probe_written {
            self.s3_request("PUT", PROBE_BUCKET, b"", &[200, 409])?;
            self.s3_request("PUT", PROBE_OBJECT, b"probe", &[200])?;
            self.probe_written = true;
        }
        self.s3_request("GET", PROBE_OBJECT, b"", &[200])
    }

    /// One plain HTTP request to the S3 gateway, `Ok` when its status is one
    /// of `ok`. SeaweedFS has no authentication by default, so an unsigned
    /// request is accepted.
    fn s3_request(&self, method: &str, path: &str, body: &[u8], ok: &[u16]) -> Result<(), String> {
        let status = self.send(method, path, body).map_err(|e| format!("{method} {path}: {e}"))?;
        match ok.iter().any(|code| status.contains(&format!(" {code} "))) {
            true => Ok(()),
            false => Err(format!("{method} {path}: {status}")),
        }
    }

    /// Sends one request; the status line of the answer.
    fn send(&self, method: &str, path: &str, body: &[u8]) -> std::io::Result<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.ports.s3[0]));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let length = body.len();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.lines().next().unwrap_or_default().to_owned())
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!("---- SeaweedFS log ----\n{}", self.log_tail());
        }
        self.stop();
    }
}

impl Bucket {
    /// `s3://BUCKET/PREFIX` for `serve --store`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.name)
    }

    /// The environment a replica (or [`Bucket::store`]) reaches this
    /// bucket's server with: endpoint, region and dummy credentials.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_REGION", REGION),
            ("AWS_ACCESS_KEY_ID", DUMMY_KEY),
            ("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// A client of `s3://BUCKET/PREFIX` made as a replica makes it (with
    /// the dummy credentials instead of the process's environment): the
    /// test's own view of the bucket.
    pub fn store(&self, prefix: &str) -> Arc<dyn ObjectStore> {
        let credentials = AmazonS3Builder::new().with_access_key_id(DUMMY_KEY).with_secret_access_key(DUMMY_SECRET);
        client::connect_from(credentials, &self.settings(prefix)).expect("an object-store client")
    }

    /// The settings a replica would plan for `s3://BUCKET/PREFIX` here.
    pub fn settings(&self, prefix: &str) -> ObjectStoreSettings {
        let mut s = ObjectStoreSettings::parse(&self.url(prefix)).unwrap().with_endpoint(&self.endpoint).unwrap();
        s.region = Some(REGION.to_owned());
        s.max_retries = 0;
        s
    }
}

/// The venv's `weed`, where tests/setup.sh installs it.
fn weed_binary() -> PathBuf {
    let dir = std::env::var_os("PROVCACHE_SEAWEEDFS_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache"));
        cache.join("provcache").join("seaweedfs")
    });
    let weed = dir.join("bin").join("weed");
    assert!(weed.is_file(), "SeaweedFS is not installed ({} is missing): run tests/setup.sh", weed.display());
    weed
}

/// `N` distinct ports free now (all held until all are chosen), below
/// Linux's ephemeral range (32768 and up): a restart binds the same ports
/// again, and in between the suite's other connections and `127.0.0.1:0`
/// servers, which take ephemeral ports, must not be able to take one.
fn free_ports<const N: usize>() -> [u16; N] {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut seed = (u64::from(std::process::id()) << 32 ^ now.as_nanos() as u64) | 1;
    let mut held: Vec<TcpListener> = Vec::with_capacity(N);
    while held.len() < N {
        // xorshift: a different port on each try, from a per-process start.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20_000 + (seed % 12_000) as u16;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    std::array::from_fn(|i| held[i].local_addr().unwrap().port())
}

fn port_flags(component: &str, ports: [u16; 2]) -> [String; 2] {
    [format!("-{component}.port={}", ports[0]), format!("-{component}.port.grpc={}", ports[1])]
}

/// A shell that kills `pid` and removes `dir` once this test process is
/// gone, so that no SeaweedFS outlives the suite (the shared instance is
/// never dropped).
fn watchdog(pid: u32, dir: &std::path::Path) -> Child {
    let me = std::process::id();
    let dir = dir.display();
    let script = format!("while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null; rm -rf '{dir}'");
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the SeaweedFS watchdog")
}

fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

//! The real `provcache` binary as a child process on 127.0.0.1:0, for the
//! suites that need what only a process has: SIGTERM and SIGKILL, crash
//! points, restarts on the same data directory, another build of the binary,
//! its own memory and its log.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::certs::{tls_channel, CertFiles};
use super::clients::Clients;

/// How long the server may take to print its listening line, or to exit
/// after SIGTERM.
const SERVER_TIMEOUT: Duration = Duration::from_secs(60);
/// The prefix of the line `provcache serve` prints once it accepts calls.
const LISTENING: &str = "provcache listening on ";

/// The real `provcache` binary, serving on `127.0.0.1:0`.
pub struct ServerProcess {
    /// The binary: this build's, or another one to compare with.
    bin: PathBuf,
    child: Option<Child>,
    args: Vec<String>,
    data_dir: PathBuf,
    log_path: PathBuf,
    scheme: String,
    addr: SocketAddr,
    /// Extra environment variables for the server process.
    env: Vec<(String, String)>,
    /// Holds the log (and the data directory unless the caller gave one).
    _tmp: tempfile::TempDir,
}

impl ServerProcess {
    /// `serve --plaintext-insecure` on a new, empty data directory.
    pub fn start_plaintext() -> Self {
        Self::start(["--plaintext-insecure"])
    }

    /// `serve --listen 127.0.0.1:0 --data-dir <new temp dir> ARGS...`.
    pub fn start<I, S>(args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::start_binary(Path::new(env!("CARGO_BIN_EXE_provcache")), args)
    }

    /// Like [`ServerProcess::start`] with extra environment variables (for
    /// example the object store's `AWS_*`), kept for restarts.
    pub fn start_with_env<I, S>(args: I, env: Vec<(String, String)>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tmp = tempfile::tempdir().expect("creating the server's temp dir");
        let data_dir = tmp.path().join("data");
        fs::create_dir(&data_dir).unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_provcache"));
        Self::launch(bin, tmp, data_dir, args.into_iter().map(Into::into).collect(), env)
    }

    /// Like [`ServerProcess::start`] with another `provcache` binary (for
    /// example a build from before a change, to measure both).
    pub fn start_binary<I, S>(bin: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tmp = tempfile::tempdir().expect("creating the server's temp dir");
        let data_dir = tmp.path().join("data");
        fs::create_dir(&data_dir).unwrap();
        Self::launch(bin, tmp, data_dir, args.into_iter().map(Into::into).collect(), Vec::new())
    }

    /// Like [`ServerProcess::start`] on a data directory the caller prepared
    /// (and keeps).
    pub fn start_in<I, S>(data_dir: &Path, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tmp = tempfile::tempdir().expect("creating the server's temp dir");
        let bin = Path::new(env!("CARGO_BIN_EXE_provcache"));
        Self::launch(bin, tmp, data_dir.to_path_buf(), args.into_iter().map(Into::into).collect(), Vec::new())
    }

    fn launch(
        bin: &Path,
        tmp: tempfile::TempDir,
        data_dir: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> Self {
        let log_path = tmp.path().join("server.log");
        let mut server = ServerProcess {
            bin: bin.to_path_buf(),
            child: None,
            args,
            data_dir,
            log_path,
            scheme: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            env,
            _tmp: tmp,
        };
        server.spawn();
        server
    }

    /// Starts the server (again, after [`ServerProcess::stop`]) on its data
    /// directory with its arguments. The port changes.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path).unwrap();
        let mut child = Command::new(&self.bin)
            .arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting provcache");
        // Drain stdout for the child's whole life so it can never block on a
        // full pipe; hand the lines to the waiting test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);

        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix(LISTENING) {
                        let (scheme, addr) = url.trim().split_once("://").unwrap_or_else(|| {
                            panic!("no scheme in the listening line {line:?}");
                        });
                        self.scheme = scheme.to_string();
                        self.addr = addr.parse().unwrap_or_else(|e| panic!("bad address in {line:?}: {e}"));
                        return;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.take().map(|mut c| c.wait());
                    panic!("provcache exited before listening ({status:?}); its log:\n{}", self.log());
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!("provcache did not print its listening line in {SERVER_TIMEOUT:?}; log:\n{}", self.log());
                }
            }
        }
    }

    /// The URL Bazel dials: `grpc://127.0.0.1:PORT` (or `grpcs://...`).
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// `--remote_cache=<url>`.
    pub fn remote_cache_flag(&self) -> String {
        format!("--remote_cache={}", self.url())
    }

    /// Where the server listens now (the port changes on every start).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `grpc` (plaintext) or `grpcs` (mutual TLS, the default).
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The data directory, kept across restarts.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The development PKI and signing key the server created in its data
    /// directory (CA, clients, `trust-policy.toml`).
    pub fn pki_dir(&self) -> PathBuf {
        self.data_dir.join("dev-pki")
    }

    /// A plaintext channel of its own, with timeouts so that a server that
    /// died fails the test instead of hanging it.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .connect()
            .await
            .unwrap()
    }

    /// Clients on a plaintext connection of their own.
    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await)
    }

    /// An mTLS channel as one of the dev PKI's clients (writer, reader, auditor).
    pub async fn dev_channel(&self, name: &str) -> Channel {
        let pki = self.pki_dir();
        tls_channel(self.addr, &pki, Some(&CertFiles::dev(&pki, name))).await.unwrap()
    }

    /// The server's resident and peak resident memory (VmRSS, VmHWM), MiB.
    pub fn memory_mib(&self) -> (f64, f64) {
        let pid = self.child.as_ref().expect("the server is not running").id();
        provcache::tools::bench::process_memory_mib(pid).expect("the server's /proc status")
    }

    /// Everything the server wrote to stderr, over all its runs.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log lines at ERROR level.
    pub fn error_lines(&self) -> Vec<String> {
        self.log().lines().filter(|l| l.contains(" ERROR ")).map(str::to_string).collect()
    }

    /// Sends `signal` (`HUP`, ...) to the running server.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is not running").id().to_string();
        let sent = Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("running kill");
        assert!(sent.success(), "kill -{signal} {pid} failed");
    }

    /// Sends SIGTERM, waits for the server to drain and exit, and asserts it
    /// exited cleanly.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the server is not running");
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("running kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + SERVER_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("provcache did not exit within {SERVER_TIMEOUT:?} of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "provcache exited with {status} after SIGTERM; log:\n{}", self.log());
        status
    }

    /// Stops the server and starts it again on the same data directory with
    /// the same arguments. The port changes: use [`ServerProcess::url`] again.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts a server that was [`ServerProcess::stop`]ped (for example after
    /// editing its data directory), on the same data directory.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Sets (or with `None` removes) an environment variable for the next
    /// [`ServerProcess::start_again`].
    pub fn set_env(&mut self, name: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != name);
        if let Some(v) = value {
            self.env.push((name.to_string(), v.to_string()));
        }
    }

    /// Kills the server with SIGKILL (`kill -9`: no draining, no flush) and
    /// reaps it. Start it again with [`ServerProcess::start_again`].
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("the server is not running");
        let sent = Command::new("kill").args(["-KILL", &child.id().to_string()]).status().expect("running kill");
        assert!(sent.success(), "kill -KILL failed");
        let status = child.wait().unwrap();
        assert!(!status.success(), "provcache survived kill -9: {status}");
    }

    /// Waits for a server that is expected to end by itself (for example at a
    /// crash point) and returns how it ended.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the server is not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("provcache did not exit within {timeout:?}; log:\n{}", tail(&self.log(), 100));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- provcache server log ({}) ----\n{}", self.url(), tail(&self.log(), 200));
        }
    }
}

/// The last `lines` lines of `text`: enough of a log to see why.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

//! Running under systemd (docs/deploy/): `Type=notify` readiness, the real
//! binary started with `NOTIFY_SOCKET` pointing at a socket this test bound,
//! as systemd starts it; and the configuration the unit ships with.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use provcache::proto::reapi::GetCapabilitiesRequest;

use crate::common::*;

/// A generous bound for a datagram the server should have sent already.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// The next state the server told the socket.
fn next_state(socket: &UnixDatagram) -> String {
    socket.set_read_timeout(Some(RECEIVE_TIMEOUT)).unwrap();
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("no notification from the server");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A datagram socket bound at `path`, as systemd binds its notify socket.
fn bind(path: &Path) -> (UnixDatagram, Vec<(String, String)>) {
    let socket = UnixDatagram::bind(path).unwrap();
    let env = vec![("NOTIFY_SOCKET".to_string(), path.to_str().unwrap().to_string())];
    (socket, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_once_the_server_answers_calls_and_stopping_on_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let (socket, env) = bind(&tmp.path().join("notify"));
    let mut server = ServerProcess::start_with_env(["--plaintext-insecure"], env);

    assert_eq!(next_state(&socket), "READY=1");
    let mut c = server.clients().await;
    c.caps.get_capabilities(GetCapabilitiesRequest::default()).await.expect("a call after READY=1");

    tokio::task::block_in_place(|| server.stop());
    assert_eq!(next_state(&socket), "STOPPING=1");
}

#[test]
fn an_mtls_server_notifies_an_abstract_socket_named_with_a_leading_at() {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("provcache-notify-it-{}", std::process::id());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = UnixDatagram::bind_addr(&address).unwrap();
    let mut server =
        ServerProcess::start_with_env(Vec::<String>::new(), vec![("NOTIFY_SOCKET".to_string(), format!("@{name}"))]);

    assert_eq!(server.scheme(), "grpcs");
    assert_eq!(next_state(&socket), "READY=1");
    server.stop();
    assert_eq!(next_state(&socket), "STOPPING=1");
}

#[test]
fn a_server_that_cannot_open_its_data_directory_never_reports_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let (socket, env) = bind(&tmp.path().join("notify"));
    let holder = ServerProcess::start_plaintext();

    // A second server on the same data directory binds its port, then fails on RocksDB's lock.
    let out = Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["serve", "--listen", "127.0.0.1:0", "--plaintext-insecure", "--data-dir"])
        .arg(holder.data_dir())
        .envs(env)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a second server on a held data directory started");

    // It has exited: anything it sent is already queued.
    socket.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 256];
    let err = socket.recv(&mut buf).map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock, "a failed start sent a notification");
}

#[test]
fn the_configuration_shipped_with_the_systemd_unit_passes_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/deploy/provcache.toml");
    // Its data_dir is the unit's /var/lib/provcache; the check needs one it can write.
    let out = Command::new(env!("CARGO_BIN_EXE_provcache"))
        .args(["serve", "--check-config", "--config"])
        .arg(&shipped)
        .env("PROVCACHE_DATA_DIR", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("listen = \"127.0.0.1:8980\""), "{stdout}");
}

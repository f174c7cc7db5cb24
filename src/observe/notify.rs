//! Readiness for a systemd `Type=notify` service (sd_notify(3)). When the
//! service manager set `NOTIFY_SOCKET`, the server sends `READY=1` once it
//! serves (stores open, listeners bound), so `systemctl start` returns, and
//! units ordered after provcache start, only when its port accepts calls; and
//! `STOPPING=1` when a shutdown begins, so systemd shows it draining rather
//! than failing. Without `NOTIFY_SOCKET` (a shell, a container, most tests)
//! nothing is sent. The protocol is one datagram on a Unix socket: a few
//! lines of std instead of a libsystemd binding.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service: the path of its
/// socket, or an abstract socket's name after a leading `@`.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Tells the service manager the server now accepts calls.
pub fn ready() {
    notify("READY=1");
}

/// Tells the service manager the server is shutting down (draining calls in
/// flight), before it exits.
pub fn stopping() {
    notify("STOPPING=1");
}

/// Sends `state` when a service manager asked for it. A failure is logged,
/// never fatal: systemd then times the start out, which says more than a
/// server that refuses to run outside systemd would.
fn notify(state: &str) {
    let Some(socket) = std::env::var_os(NOTIFY_SOCKET) else {
        return;
    };
    match send(&socket, state) {
        Ok(()) => tracing::debug!(state, "notified the service manager"),
        Err(e) => tracing::warn!(
            state,
            socket = %socket.to_string_lossy(),
            "could not notify the service manager through {NOTIFY_SOCKET}: {e}"
        ),
    }
}

/// Sends `state` as one datagram to `socket`: an absolute path, or `@name`
/// for a Linux abstract socket (as systemd passes them).
pub fn send(socket: &OsStr, state: &str) -> io::Result<()> {
    let sender = UnixDatagram::unbound()?;
    match socket.as_bytes().split_first() {
        Some((b'/', _)) => sender.send_to(state.as_bytes(), socket).map(drop),
        Some((b'@', name)) => send_abstract(&sender, name, state),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "neither an absolute path nor an @abstract name")),
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(sender: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt as _;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sender.send_to_addr(state.as_bytes(), &address).map(drop)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract sockets exist on Linux only"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn a_state_reaches_a_socket_given_by_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        assert_eq!(received(&socket), "READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_state_reaches_an_abstract_socket_named_with_a_leading_at() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("provcache-notify-unit-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        send(OsStr::new(&format!("@{name}")), "STOPPING=1").unwrap();
        assert_eq!(received(&socket), "STOPPING=1");
    }

    #[test]
    fn a_relative_socket_path_is_refused() {
        let err = send(OsStr::new("notify.sock"), "READY=1").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}

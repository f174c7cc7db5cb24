//! The bodies of `provcache`'s subcommands; `main.rs` parses the command
//! line and dispatches here. Errors end the process with one line,
//! `error: ...`, and the exit status docs/configuration.md ("Exit codes")
//! documents: 2 for an argument or configuration that cannot be used
//! ([`Refused`]), 1 for a failure after that.

use std::path::{Path, PathBuf};

pub mod bench;
pub mod keys;
pub mod serve;
pub mod verify_build;

/// How a client command reaches the server.
#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// Server URL: grpcs://HOST:PORT (or grpc:// behind a trusted proxy).
    #[arg(long, default_value = "grpcs://127.0.0.1:8980")]
    server: String,
    /// CA certificate (PEM) that signed the server's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// REAPI instance name of every request (default: the default instance, "").
    /// verify-build also assumes it for --exec-log hits missing from the server's hit log.
    #[arg(long, default_value = "")]
    instance: String,
}

impl ClientArgs {
    /// The server to reach, with the client certificate when one is given;
    /// a file flag naming nothing readable is refused with its flag and path.
    pub fn target(self) -> anyhow::Result<provcache::tools::client::Target> {
        let tls = match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            (None, None, None) => None,
            _ => return Err(Refused("--ca, --cert and --key go together".into()).into()),
        };
        if let Some((ca, cert, key)) = &tls {
            readable("--ca", ca)?;
            readable("--cert", cert)?;
            readable("--key", key)?;
        }
        Ok(provcache::tools::client::Target { url: self.server, tls, instance: self.instance })
    }
}

/// An argument or configuration that cannot be used: the process exits
/// with status 2, as for the command line's own usage errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Refuses (status 2) a file flag whose file cannot be opened, naming the
/// flag, the path and the operating system's reason once.
pub fn readable(flag: &str, path: &Path) -> anyhow::Result<()> {
    provcache::config::readable_file(flag, path).map_err(|e| Refused(format!("{e:#}")).into())
}

/// Refuses (status 2) an output flag whose directory does not exist,
/// naming the flag and both paths.
pub fn in_existing_dir(flag: &str, path: &Path) -> anyhow::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if dir.is_dir() {
        return Ok(());
    }
    let why = format!(
        "{flag} {}: directory {} does not exist; create it or name another path",
        path.display(),
        dir.display()
    );
    Err(Refused(why).into())
}

/// The exit status of a command that failed with `e`: 2 when an argument
/// or the configuration was refused, 1 otherwise.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.chain().any(|c| c.is::<Refused>()) {
        2
    } else {
        1
    }
}

/// `e` and its causes on one line, joined with ": ", each said once (an
/// error that prints its source already is not followed by it again).
pub fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

/// The message for a RocksDB store that another process holds open, once
/// and naming the data directory and the lock file, when `e` is that.
pub fn in_use(e: &anyhow::Error, data_dir: &Path) -> Option<String> {
    let locked = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<provcache::error::Error>(),
            Some(provcache::error::Error::Storage(s)) if s.kind() == provcache::store::StoreErrorKind::Locked
        )
    });
    locked.then(|| {
        let lock = provcache::server::db_path(data_dir).join("LOCK");
        format!(
            "data directory {} is in use by another provcache process (RocksDB lock {})",
            data_dir.display(),
            lock.display()
        )
    })
}

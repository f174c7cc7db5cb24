//! The bodies of `provcache`'s subcommands; `main.rs` parses the command
//! line and dispatches here.

use std::path::PathBuf;

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
    /// The server to reach, with the client certificate when one is given.
    pub fn target(self) -> anyhow::Result<provcache::tools::client::Target> {
        let tls = match (self.ca, self.cert, self.key) {
            (Some(ca), Some(cert), Some(key)) => Some((ca, cert, key)),
            (None, None, None) => None,
            _ => anyhow::bail!("--ca, --cert and --key go together"),
        };
        Ok(provcache::tools::client::Target { url: self.server, tls, instance: self.instance })
    }
}

//! Connecting to a provcache server as a client (bench, verify-build).

use anyhow::{bail, Context as _};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Target {
    /// `grpc://host:port` or `grpcs://host:port`.
    pub url: String,
    /// CA, client certificate and key PEM files for `grpcs://`.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)>,
    /// Instance name to use.
    pub instance: String,
}

/// Connects one channel (TCP_NODELAY on).
pub async fn connect(target: &Target) -> anyhow::Result<Channel> {
    let (scheme, rest) = target.url.split_once("://").context("server URL needs a scheme (grpc:// or grpcs://)")?;
    let endpoint = match scheme {
        "grpc" => Channel::from_shared(format!("http://{rest}"))?,
        "grpcs" => {
            let (ca, cert, key) = target.tls.as_ref().context("grpcs:// needs --ca, --cert and --key")?;
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
                .identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?));
            Channel::from_shared(format!("https://{rest}"))?.tls_config(tls)?
        }
        other => bail!("unsupported scheme {other:?}"),
    };
    Ok(endpoint
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .connect()
        .await?)
}

//! Listen addresses as operators write them: `IP:PORT`, and the two short
//! forms other caches accept, `:PORT` (every IPv4 interface) and
//! `localhost:PORT` (127.0.0.1). No other host name is resolved: a listen
//! address that depends on DNS at start is refused instead.

use std::net::{Ipv4Addr, SocketAddr};

use serde::{Deserialize, Deserializer};

/// Parses `--listen` and `--metrics-listen` (and the file's keys).
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let short = |port: &str, ip: Ipv4Addr| port.parse::<u16>().ok().map(|p| SocketAddr::from((ip, p)));
    let addr = match text.rsplit_once(':') {
        Some(("", port)) => short(port, Ipv4Addr::UNSPECIFIED),
        Some((host, port)) if host.eq_ignore_ascii_case("localhost") => short(port, Ipv4Addr::LOCALHOST),
        _ => None,
    };
    addr.ok_or_else(|| {
        format!(
            "invalid listen address {text:?}: expected IP:PORT (127.0.0.1:8980, 0.0.0.0:8980, [::]:8980), \
             :PORT (every IPv4 interface) or localhost:PORT (127.0.0.1)"
        )
    })
}

/// The file's `listen` and `metrics_listen`, read as the flags are.
pub(crate) fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_forms_mean_every_ipv4_interface_and_loopback() {
        assert_eq!(parse_listen(":8980"), Ok(SocketAddr::from(([0, 0, 0, 0], 8980))));
        assert_eq!(parse_listen("localhost:8980"), Ok(SocketAddr::from(([127, 0, 0, 1], 8980))));
        assert_eq!(parse_listen("LOCALHOST:0"), Ok(SocketAddr::from(([127, 0, 0, 1], 0))));
        assert_eq!(parse_listen("[::1]:8980"), Ok("[::1]:8980".parse().unwrap()));
        assert_eq!(parse_listen("10.0.0.7:8980"), Ok("10.0.0.7:8980".parse().unwrap()));
    }

    #[test]
    fn other_host_names_and_bad_ports_are_refused_saying_what_is_accepted() {
        for bad in ["cache.example.org:8980", ":http", "localhost", "8980", ":99999"] {
            let msg = parse_listen(bad).unwrap_err();
            assert!(msg.contains(&format!("{bad:?}")) && msg.contains(":PORT"), "{msg}");
        }
    }
}

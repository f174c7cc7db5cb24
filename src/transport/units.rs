//! Parsing and printing of the transport limits' values (durations such as
//! `60s`, sizes such as `16KiB`) for flags and the `[limits]` table, so they
//! read the same as the rest of the configuration.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

/// A duration such as `30s` (humantime), from the configuration file.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map(Some).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
}

/// Prints a duration as `--check-config` shows it (`1m`, `20s`).
pub fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// A size: a string such as `64MiB` or a number of bytes.
pub fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(Some(n)),
        Size::Text(s) => crate::units::parse_size(&s).map(Some).map_err(serde::de::Error::custom),
    }
}

/// [`de_size`] for a value HTTP/2 carries in 32 bits.
pub fn de_u32_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match de_size(d)? {
        Some(n) => u32::try_from(n).map(Some).map_err(|_| serde::de::Error::custom(format!("{n} is over 4GiB"))),
        None => Ok(None),
    }
}

/// A size flag whose value HTTP/2 carries in 32 bits.
pub fn parse_u32_size(s: &str) -> Result<u32, String> {
    let n = crate::units::parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?} is over 4GiB"))
}

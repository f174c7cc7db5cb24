//! Sizes that HTTP/2 carries in 32 bits (header list size), for flags and
//! the `[limits]` table; they read as every other size of the configuration
//! (`crate::config`'s parsers), with a bound check on top.

use serde::Deserializer;

/// A size (`16KiB` or a number of bytes) for a value HTTP/2 carries in 32 bits.
pub fn de_u32_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    match crate::config::de_size(d)? {
        Some(n) => u32::try_from(n).map(Some).map_err(|_| serde::de::Error::custom(format!("{n} is over 4GiB"))),
        None => Ok(None),
    }
}

/// A size flag whose value HTTP/2 carries in 32 bits.
pub fn parse_u32_size(s: &str) -> Result<u32, String> {
    let n = crate::units::parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?} is over 4GiB"))
}

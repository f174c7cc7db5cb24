//! Human units on the command line and in configuration: sizes such as
//! `64MiB`, `200gib` or `1.5TiB`. One parser for every size, so that a size
//! reads the same in a flag, a variable and the configuration file.

/// Parses a size: a decimal number (fractions allowed) with an optional unit
/// `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of 1024; also `K`, `M`, `G`, `T`)
/// or `KB`, `MB`, `GB`, `TB` (powers of 1000), in any case. A bare number is
/// bytes. A fraction of a byte is rounded down.
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse(s, false)
}

/// Like [`parse_size`], but a bare number is refused: for a bound such as
/// `max_size`, where `200` meant as 200 GiB but read as 200 bytes makes a
/// cache that misses every read.
pub fn parse_size_with_unit(s: &str) -> Result<u64, String> {
    parse(s, true)
}

fn parse(s: &str, unit_required: bool) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    let not_a_size = || format!("{s:?} is not a size such as 512MiB, 20GiB or 1.5TiB");
    if num.is_empty() {
        return Err(not_a_size());
    }
    if unit.is_empty() && unit_required {
        return Err(format!("{s:?} has no unit: add a unit, e.g. {num}GiB ({num}B for bytes)"));
    }
    let mult = multiplier(unit).ok_or_else(|| {
        format!("unknown size unit {unit:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB; any case)")
    })?;
    let too_large = || format!("{s:?} is too large");
    if !num.contains('.') {
        let n: u64 = num.parse().map_err(|_| not_a_size())?;
        return n.checked_mul(mult).ok_or_else(too_large);
    }
    let n: f64 = num.parse().map_err(|_| not_a_size())?;
    let bytes = (n * mult as f64).floor();
    // 2^64 as f64 is exact; anything at or above it does not fit.
    if bytes >= u64::MAX as f64 {
        return Err(too_large());
    }
    Ok(bytes as u64)
}

/// Bytes per unit; `None` for an unknown unit.
fn multiplier(unit: &str) -> Option<u64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => 1 << 10,
        "mib" | "m" => 1 << 20,
        "gib" | "g" => 1 << 30,
        "tib" | "t" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::{parse_size, parse_size_with_unit};

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("200GiB"), Ok(200 << 30));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn units_are_read_in_any_case() {
        assert_eq!(parse_size("200gib"), Ok(200 << 30));
        assert_eq!(parse_size("200GIB"), Ok(200 << 30));
        assert_eq!(parse_size("16kib"), Ok(16 << 10));
        assert_eq!(parse_size("2gb"), Ok(2_000_000_000));
        assert_eq!(parse_size("5b"), Ok(5));
    }

    #[test]
    fn fractional_sizes_are_rounded_down_to_whole_bytes() {
        assert_eq!(parse_size("1.5TiB"), Ok(3 << 39));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert_eq!(parse_size("1.5B"), Ok(1));
        assert_eq!(parse_size("2.25 GB"), Ok(2_250_000_000));
        assert!(parse_size("1.2.3GiB").is_err());
        assert!(parse_size(".").is_err());
        assert!(parse_size("99999999999.5TiB").is_err());
    }

    #[test]
    fn a_bound_without_a_unit_is_refused_with_the_unit_to_add() {
        assert_eq!(
            parse_size_with_unit("200"),
            Err("\"200\" has no unit: add a unit, e.g. 200GiB (200B for bytes)".into())
        );
        assert_eq!(parse_size_with_unit("200B"), Ok(200));
        assert_eq!(parse_size_with_unit("1.5tib"), Ok(3 << 39));
    }
}

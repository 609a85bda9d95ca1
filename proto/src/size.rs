//! Human sizes for flags and output, shared by every binary: parsing `4G`, `512M`, `1TiB`, `4096` and printing `4.0 GiB`.
//!
//! Suffixes are binary (K = 1024): storage sizes here are always powers of
//! two of sectors and chunks, and `4G` meaning 4 GiB is what `truncate`,
//! `qemu-img` and `fio` do too.

/// Parses a byte count with an optional K/M/G/T/P suffix (binary units;
/// `k`, `KB`, `KiB` are all 1024). A fraction is allowed with a suffix
/// (`1.5G`) when the result is a whole number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(split);
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        other => {
            return Err(format!("unknown size suffix {other:?} in {text:?} (use K, M, G, T or P)"))
        }
    };
    if number.is_empty() {
        return Err(format!("{text:?} is not a size (examples: 4G, 512M, 1048576)"));
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(format!("{text:?} is not a size"));
    }
    let unit = 1u128 << shift;
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| format!("{text:?} is not a size"))?
    };
    let mut bytes = whole.checked_mul(unit).ok_or_else(|| format!("{text:?} is too large"))?;
    if !fraction.is_empty() {
        if fraction.len() > 18 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{text:?} is not a size"));
        }
        let denominator = 10u128.pow(fraction.len() as u32);
        let numerator: u128 = fraction.parse().map_err(|_| format!("{text:?} is not a size"))?;
        let part = numerator * unit;
        let (whole_bytes, leftover) = (part / denominator, part % denominator);
        if leftover > 0 {
            return Err(format!("{text:?} is not a whole number of bytes"));
        }
        bytes += whole_bytes;
    }
    u64::try_from(bytes).map_err(|_| format!("{text:?} is too large"))
}

/// `4294967296` → `4.0 GiB`; exact byte counts below 1 KiB.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("8kb"), Ok(8192));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size(" 2 G "), Ok(2 << 30));
        for bad in ["", "G", "-1G", "4X", "1.3B", "99999999999P", "1..2G", "abc"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4 << 30), "4.0 GiB");
        assert_eq!(format_size(1536 << 20), "1.5 GiB");
    }
}

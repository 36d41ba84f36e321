//! Byte sizes on the command line: `16G`, `512M`, `64KiB`, `4096`.
//!
//! Units are binary multiples (K = 1024), as in QEMU's `-m 16G`; an
//! optional `i` and `B` are accepted (`16GiB`, `16GB` mean the same).

use std::fmt;

/// A size in bytes parsed from the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The value in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// Parses `text` into bytes: digits, then optionally K, M, G, T, P or E
/// (binary multiples, any case, optionally followed by `i` and/or `B`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "{text:?}: expected a number, e.g. 4096, 512M or 16G"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?}: number too large"))?;
    let unit = unit.trim_start();
    let lower = unit.to_ascii_lowercase();
    let mut stem = lower.strip_suffix('b').unwrap_or(&lower);
    if stem.len() > 1 {
        stem = stem.strip_suffix('i').unwrap_or(stem);
    }
    let shift = match stem {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        "e" => 60,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G or T: binary multiples)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?}: more than 2^64-1 bytes"))
}

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        parse_size(s).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the value exactly: `64G`, `1536M`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
        for (u, shift) in UNITS {
            let m = 1u64 << shift;
            if self.0 >= m && self.0.is_multiple_of(m) {
                return write!(f, "{}{u}", self.0 / m);
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn units_are_binary_multiples() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("16G").unwrap(), 16 << 30);
        assert_eq!(parse_size("16g").unwrap(), 16 << 30);
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("16GB").unwrap(), 16 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size(" 2 M ").unwrap(), 2 << 20);
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for bad in [
            "",
            "G",
            "1.5G",
            "12X",
            "-1",
            "1Gx",
            "16i",
            "99999999999999999999",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_size("16E").unwrap_err().contains("2^64"));
        assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn display_round_trips() {
        for v in [0u64, 1, 4096, 64 << 30, 1536 << 20, (1 << 40) + 1] {
            let s = ByteSize(v).to_string();
            assert_eq!(parse_size(&s).unwrap(), v, "{s}");
        }
        assert_eq!(ByteSize(64 << 30).to_string(), "64G");
        assert_eq!(ByteSize(256 << 20).to_string(), "256M");
    }
}

//! Human-readable byte sizes: `10G`, `512MiB`, `4096` in; `10 GiB` out.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size in bytes that parses from and prints as a human-readable string.
/// Suffixes are binary (K = KiB = 1024); `B`, `iB` and case are optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason} (examples: 4096, 64K, 10G, 1.5TiB)")]
pub struct SizeError {
    pub input: String,
    pub reason: &'static str,
}

const UNITS: [&str; 7] = ["", "K", "M", "G", "T", "P", "E"];

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        if number.is_empty() {
            return Err(err("no number"));
        }
        let unit = unit.trim().to_ascii_uppercase();
        let unit = unit
            .strip_suffix("IB")
            .or_else(|| unit.strip_suffix('B'))
            .unwrap_or(&unit);
        let power = UNITS
            .iter()
            .position(|u| *u == unit)
            .ok_or_else(|| err("unknown unit"))?;
        let multiplier = 1u64 << (10 * power);
        let bytes = if let Some((whole, frac)) = number.split_once('.') {
            let whole: u64 = whole.parse().map_err(|_| err("bad number"))?;
            let digits = u32::try_from(frac.len()).map_err(|_| err("bad number"))?;
            let frac_value: u64 = frac.parse().map_err(|_| err("bad number"))?;
            let scale = 10u64
                .checked_pow(digits)
                .ok_or_else(|| err("too many digits"))?;
            let frac_bytes = u128::from(frac_value) * u128::from(multiplier) / u128::from(scale);
            whole
                .checked_mul(multiplier)
                .and_then(|w| w.checked_add(u64::try_from(frac_bytes).ok()?))
                .ok_or_else(|| err("too large"))?
        } else {
            let n: u64 = number.parse().map_err(|_| err("bad number"))?;
            n.checked_mul(multiplier).ok_or_else(|| err("too large"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl ByteSize {
    /// The largest unit (as a power of 1024) in which this size is a whole number.
    fn exact_power(self) -> usize {
        (0..UNITS.len())
            .rev()
            .find(|p| self.0.is_multiple_of(1u64 << (10 * p)))
            .unwrap_or(0)
    }
}

/// `10 GiB`, `1.5 GiB`; a size that one decimal would round also shows its
/// bytes (`64.0 MiB (67104768 B)`), so that no two sizes print alike.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut power = 0;
        while power + 1 < UNITS.len() && self.0 >= 1u64 << (10 * (power + 1)) {
            power += 1;
        }
        if power == 0 {
            return write!(f, "{} B", self.0);
        }
        let unit_bytes = 1u64 << (10 * power);
        let unit = UNITS[power];
        if self.0.is_multiple_of(unit_bytes) {
            return write!(f, "{} {unit}iB", self.0 / unit_bytes);
        }
        let value = self.0 as f64 / unit_bytes as f64;
        if u128::from(self.0) * 10 % u128::from(unit_bytes) == 0 {
            write!(f, "{value:.1} {unit}iB")
        } else {
            write!(f, "{value:.1} {unit}iB ({} B)", self.0)
        }
    }
}

/// The exact size in its largest whole unit (`64MiB`, `65532KiB`, `4097B`),
/// which parses back to the same value.
impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let power = self.exact_power();
        let text = match power {
            0 => format!("{}B", self.0),
            p => format!("{}{}iB", self.0 >> (10 * p), UNITS[p]),
        };
        s.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ByteSizeVisitor)
    }
}

/// Takes a whole number of bytes or a size string; anything else is
/// refused with what was expected.
struct ByteSizeVisitor;

impl serde::de::Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a size: a number of bytes or a string such as \"64K\" or \"10G\"")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<ByteSize, E> {
        Ok(ByteSize(n))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<ByteSize, E> {
        u64::try_from(n)
            .map(ByteSize)
            .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<ByteSize, E> {
        s.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses() {
        for (text, bytes) in [
            ("4096", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("1M", 1 << 20),
            ("10G", 10 << 30),
            ("10GiB", 10 << 30),
            ("10 GB", 10 << 30),
            ("1.5T", 3 << 39),
            ("512B", 512),
        ] {
            assert_eq!(text.parse::<ByteSize>().unwrap(), ByteSize(bytes), "{text}");
        }
    }

    #[test]
    fn rejects() {
        for text in ["", "G", "10X", "1.2.3G", "99999999999P", "-1"] {
            assert!(text.parse::<ByteSize>().is_err(), "{text}");
        }
    }

    #[test]
    fn deserializes_numbers_and_strings_and_says_what_else_it_wanted() {
        #[derive(Debug, Deserialize)]
        struct Config {
            size: ByteSize,
        }
        let parse = |text: &str| toml::from_str::<Config>(text).map(|c| c.size);
        assert_eq!(parse("size = 4096").unwrap(), ByteSize(4096));
        assert_eq!(parse("size = \"64K\"").unwrap(), ByteSize(64 << 10));
        for bad in ["size = true", "size = -1", "size = [1]"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains("expected a size: a number of bytes"),
                "{bad}: {err}"
            );
        }
        let err = parse("size = \"10X\"").unwrap_err().to_string();
        assert!(err.contains("invalid size \"10X\": unknown unit"), "{err}");
    }

    #[test]
    fn prints() {
        assert_eq!(ByteSize(512).to_string(), "512 B");
        assert_eq!(ByteSize(10 << 30).to_string(), "10 GiB");
        assert_eq!(ByteSize(3 << 29).to_string(), "1.5 GiB");
        assert_eq!(ByteSize(1 << 60).to_string(), "1 EiB");
        assert_eq!(ByteSize(64 << 20).to_string(), "64 MiB");
        assert_eq!(
            ByteSize((64 << 20) - 4096).to_string(),
            "64.0 MiB (67104768 B)"
        );
        assert_eq!(ByteSize(4097).to_string(), "4.0 KiB (4097 B)");
        let s = ByteSize(10 << 30).to_string().replace(' ', "");
        assert_eq!(s.parse::<ByteSize>().unwrap(), ByteSize(10 << 30));
    }

    #[test]
    fn serializes_exactly() {
        for bytes in [
            0,
            4097,
            (64 << 20) - 4096,
            3 << 29,
            10 << 30,
            1 << 60,
            u64::MAX,
        ] {
            let text = toml::to_string(&std::collections::BTreeMap::from([("s", ByteSize(bytes))]))
                .unwrap();
            let back: std::collections::BTreeMap<String, ByteSize> = toml::from_str(&text).unwrap();
            assert_eq!(back["s"], ByteSize(bytes), "{text}");
        }
    }
}

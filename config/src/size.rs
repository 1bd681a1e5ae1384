//! Byte sizes as operators write them: `268435456`, `"256Mi"`, `"1Gi"`, `"512Ki"`.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes; in TOML an integer or a string with an optional `Ki`, `Mi`, `Gi` or
/// `Ti` suffix (powers of 1024), in annotations the string form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The number of bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (digits, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)]
            .iter()
            .find_map(|(suf, sh)| t.strip_suffix(suf).map(|d| (d, *sh)))
            .unwrap_or((t, 0));
        let n: u64 = digits.trim().parse().map_err(|_| {
            format!(
                "{s:?} is not a size: a number of bytes with an optional Ki, Mi, Gi or Ti suffix"
            )
        })?;
        n.checked_mul(1u64 << shift)
            .map(ByteSize)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suf, sh) in [("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
            if self.0 != 0 && self.0.is_multiple_of(1u64 << sh) {
                return write!(f, "{}{suf}", self.0 >> sh);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes, or a string such as \"256Mi\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_suffix() {
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!(" 256Mi ".parse(), Ok(ByteSize(256 << 20)));
        assert_eq!("1Gi".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("512Ki".parse(), Ok(ByteSize(512 << 10)));
        assert_eq!("0".parse(), Ok(ByteSize(0)));
        for bad in ["", "Mi", "12MB", "-1", "1.5Gi", "99999999999Ti"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize(256 << 20).to_string(), "256Mi");
        assert_eq!(ByteSize(4097).to_string(), "4097");
    }
}

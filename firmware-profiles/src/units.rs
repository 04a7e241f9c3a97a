//! Human durations (`"500ms"`, `"5s"`, `"24h"`, `"180d"`) and sizes (`"16KiB"`, `"256MiB"`)
//! as they are written in profiles and configs.

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

/// A duration or size that cannot be read; the text is quoted back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("duration {0:?} has no unit (ms, s, m, h, d)")]
    DurationNoUnit(String),
    #[error("duration {0:?} does not start with a number")]
    DurationNoNumber(String),
    #[error("duration {text:?}: unknown unit {unit:?} (ms, s, m, h, d)")]
    DurationUnit { text: String, unit: String },
    #[error("duration {0:?} is out of range")]
    DurationRange(String),
    #[error("size {0:?} does not start with a whole number")]
    SizeNoNumber(String),
    #[error("size {text:?}: unknown unit {unit:?} (B, KiB, MiB, GiB)")]
    SizeUnit { text: String, unit: String },
    #[error("size {0:?} is out of range")]
    SizeRange(String),
}

/// A duration written as a number followed by `ms`, `s`, `m`, `h` or `d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| UnitError::DurationNoUnit(s.into()))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| UnitError::DurationNoNumber(s.into()))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" | "min" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            u => {
                return Err(UnitError::DurationUnit {
                    text: s.into(),
                    unit: u.into(),
                })
            }
        };
        if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
            return Err(UnitError::DurationRange(s.into()));
        }
        Ok(Dur(Duration::from_secs_f64(secs)))
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0.as_secs_f64()
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 86_400_000 == 0 && ms > 0 {
            write!(f, "{}d", ms / 86_400_000)
        } else if ms % 3_600_000 == 0 && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms % 60_000 == 0 && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A size in bytes written as a number with `B`, `KiB`, `MiB` or `GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, UnitError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| UnitError::SizeNoNumber(s.into()))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            u => {
                return Err(UnitError::SizeUnit {
                    text: s.into(),
                    unit: u.into(),
                })
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| UnitError::SizeRange(s.into()))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ByteSize::parse(&s).map_err(de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}B", self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("500ms").unwrap().0, Duration::from_millis(500));
        assert_eq!(Dur::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Dur::parse("24h").unwrap().0, Duration::from_secs(86400));
        assert_eq!(Dur::parse("180d").unwrap().to_string(), "180d");
        assert!(Dur::parse("5").is_err());
        assert!(Dur::parse("5 weeks").is_err());
        assert!(Dur::parse("s").is_err());
        assert!(Dur::parse("1e400s").is_err());
        // Config and profile errors quote these messages: they read as before.
        assert_eq!(
            Dur::parse("5 weeks").unwrap_err().to_string(),
            r#"duration "5 weeks": unknown unit "weeks" (ms, s, m, h, d)"#
        );
        assert_eq!(
            Dur::parse("5").unwrap_err().to_string(),
            r#"duration "5" has no unit (ms, s, m, h, d)"#
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("16KiB").unwrap().0, 16384);
        assert_eq!(ByteSize::parse("256MiB").unwrap().0, 256 << 20);
        assert!(ByteSize::parse("12XB").is_err());
        assert!(ByteSize::parse("99999999999999999999GiB").is_err());
        assert_eq!(
            ByteSize::parse("12XB").unwrap_err().to_string(),
            r#"size "12XB": unknown unit "XB" (B, KiB, MiB, GiB)"#
        );
    }
}

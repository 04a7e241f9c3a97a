//! The domain words every other module speaks: fault classes, signal kinds, device
//! states and decoded values.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Service class of a fault, from the device manual. It drives the SLA deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultClass {
    /// Remote guidance first, fixed within 24 h.
    Simple,
    /// Repair plan within 48 h, engineer on site per service area.
    Complex,
    /// Fixed within 72 h, engineer on site per service area.
    Major,
}

impl FaultClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultClass::Simple => "simple",
            FaultClass::Complex => "complex",
            FaultClass::Major => "major",
        }
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a signal asks of the service organisation; the ticket kinds of the backend API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// A technical fault of the device.
    Fault,
    /// Preventive maintenance or a part's service life reached.
    MaintenanceDue,
    /// A consumable to replace (oxygen cell, battery).
    Consumable,
    /// An always-on device stopped answering: the device may be fine, the watch is not.
    MonitoringLost,
}

impl SignalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::Fault => "fault",
            SignalKind::MaintenanceDue => "maintenance_due",
            SignalKind::Consumable => "consumable",
            SignalKind::MonitoringLost => "monitoring_lost",
        }
    }
}

impl fmt::Display for SignalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A device's state for the availability ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Available for clinical use (in use or not).
    Up,
    /// Unavailable because of a technical failure: counts against availability.
    Down,
    /// Planned maintenance: neither up nor down.
    Maintenance,
    /// No data: switched off, unplugged or unreachable. Never counted as down.
    Unknown,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Up => "up",
            DeviceState::Down => "down",
            DeviceState::Maintenance => "maintenance",
            DeviceState::Unknown => "unknown",
        }
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decoded point value. Only points a profile lists ever become a `Value`.
///
/// On the wire a number, a string or an array of strings (untagged). Decoding is written
/// out: serde's untagged derive buffers every value and tries each variant in turn, which
/// was a large share of the gateway's cost per reading.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    Num(f64),
    Text(String),
    /// A set of active codes (VM-12 technical alarms, module fault codes).
    Codes(Vec<String>),
}

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> serde::de::Visitor<'de> for ValueVisitor {
            type Value = Value;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a string or an array of strings")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
                Ok(Value::Num(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
                Ok(Value::Num(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
                Ok(Value::Num(v as f64))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
                Ok(Value::Text(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
                Ok(Value::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Value, A::Error> {
                let mut codes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
                while let Some(c) = seq.next_element::<String>()? {
                    codes.push(c);
                }
                Ok(Value::Codes(codes))
            }
        }
        d.deserialize_any(ValueVisitor)
    }
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Num(n) if n.is_finite() => Some(*n),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        match self {
            // A whole number is written as one (`16`, as the manuals and the backend's
            // example write a register value), not `16.0`.
            Value::Num(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
                serde_json::Value::from(*n as i64)
            }
            Value::Num(n) => serde_json::Number::from_f64(*n)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Text(s) => serde_json::Value::String(s.clone()),
            Value::Codes(c) => serde_json::Value::from(c.clone()),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Num(n) if n.is_nan() => f.write_str("NaN"),
            Value::Num(n) => write!(f, "{n}"),
            Value::Text(s) => f.write_str(s),
            Value::Codes(c) if c.is_empty() => f.write_str("-"),
            Value::Codes(c) => f.write_str(&c.join(",")),
        }
    }
}

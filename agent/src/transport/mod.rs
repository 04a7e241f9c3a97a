//! Device transports: the I/O half of reading a device. Each transport talks to one kind
//! of link (framed ASCII on a serial port, Modbus RTU/TCP, an MQTT broker), identifies the
//! device, picks the profile for its firmware and hands the profile what it read; the
//! profile's [`Snapshot`] is the only thing that leaves. Every request has a timeout and
//! every transport keeps [`Stats`] for remote diagnostics.
//!
//! [`link`] holds the link task that drives a transport, and the [`link::DeviceSource`]
//! trait a request/response transport implements to get it: a new polled transport is a
//! new module here with one `DeviceSource` impl, and a variant of
//! [`crate::device::Transport`] for its config keys.
//!
//! No transport can write to a device: the serial transport sends only `Q|` requests the
//! profile lists, the Modbus transport has no write call at all, and the MQTT source
//! subscribes and publishes only the commands its profile lists as diagnostics.

pub mod link;
pub mod modbus;
pub mod modbus_frame;
pub mod mqtt;
pub mod serial;

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tend_profiles::engine::DecodeError;
use tend_profiles::{Identity, Profile, SelectError, Snapshot};

/// What one read of a device produced: who it is, the profile chosen for its firmware,
/// and the listed points it reported.
#[derive(Debug, Clone)]
pub struct DeviceRead {
    pub identity: Identity,
    pub profile: Arc<Profile>,
    pub snapshot: Snapshot,
}

/// Counters a transport keeps for diagnostics (`transport` request of the hotline).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Requests sent (each retry counts).
    pub requests: u64,
    /// Requests that got no usable answer in time.
    pub timeouts: u64,
    /// Modbus exception replies by code.
    pub exceptions: BTreeMap<u8, u64>,
    /// Negative serial replies (`N|ERR=...`) by code.
    pub negative: BTreeMap<String, u64>,
    /// Connections or ports reopened after a timeout or a broken link.
    pub reconnects: u64,
    /// Serial: frames thrown away (bad checksum, cut short, oversize, stale answers).
    pub rejected_frames: u64,
    /// Serial: bytes received outside any frame.
    pub noise_bytes: u64,
    /// MQTT: messages dropped unparsed because they exceed the profile's size limit.
    pub oversize: u64,
    /// Round trip of the last answered request.
    #[serde(serialize_with = "ser_latency")]
    pub last_latency: Option<Duration>,
}

fn ser_latency<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1000.0)),
        None => s.serialize_none(),
    }
}

impl Stats {
    pub(crate) fn exception(&mut self, code: u8) {
        *self.exceptions.entry(code).or_default() += 1;
    }

    pub(crate) fn negative(&mut self, code: &str) {
        // Bounded key: a device could send anything after `ERR=`.
        let code: String = code.chars().take(24).collect();
        *self.negative.entry(code).or_default() += 1;
    }

    /// One line for a person: `3 requests, 0 timeouts, last 1.2 ms`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} request{}, {} timeout{}",
            self.requests,
            if self.requests == 1 { "" } else { "s" },
            self.timeouts,
            if self.timeouts == 1 { "" } else { "s" }
        );
        for (code, n) in &self.exceptions {
            s.push_str(&format!(", {n}× exception 0x{code:02X}"));
        }
        for (code, n) in &self.negative {
            s.push_str(&format!(", {n}× ERR={code}"));
        }
        if self.reconnects > 0 {
            s.push_str(&format!(", {} reconnect(s)", self.reconnects));
        }
        if self.rejected_frames > 0 {
            s.push_str(&format!(", {} frame(s) rejected", self.rejected_frames));
        }
        if self.noise_bytes > 0 {
            s.push_str(&format!(", {} noise byte(s)", self.noise_bytes));
        }
        if self.oversize > 0 {
            s.push_str(&format!(", {} oversize message(s) dropped", self.oversize));
        }
        if let Some(l) = self.last_latency {
            s.push_str(&format!(
                ", last latency {:.1} ms",
                l.as_secs_f64() * 1000.0
            ));
        }
        s
    }
}

/// Why a device could not be read. Messages say what failed in the words a field engineer
/// needs (timeout, exception, refused), never what the device sent beyond a short excerpt.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot open {target}: {reason}")]
    Open { target: String, reason: String },
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("timeout: {what} got no answer within {after:?}{detail}")]
    Timeout {
        what: String,
        after: Duration,
        /// Extra context (`; a corrupt frame was received`), may be empty.
        detail: String,
    },
    #[error("Modbus exception 0x{code:02X} ({name}) from unit {unit} reading {what}")]
    Exception {
        unit: u8,
        code: u8,
        name: &'static str,
        what: String,
    },
    #[error(
        "device still busy after {attempts} attempts ({what}); it is probably booting, retry later"
    )]
    Busy { attempts: u32, what: String },
    #[error("device refused {request}: N|ERR={code} ({meaning})")]
    Negative {
        request: String,
        code: String,
        meaning: &'static str,
    },
    #[error("I/O error on {target}: {reason}")]
    Io { target: String, reason: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("cannot identify the device: {0}")]
    Identify(DecodeError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("cannot decode the device's status: {0}")]
    Decode(DecodeError),
    #[error("MQTT: {0}")]
    Mqtt(String),
    #[error("{0}")]
    Config(String),
}

impl TransportError {
    /// True for errors in what the user asked for rather than in the device or the link.
    pub fn is_config(&self) -> bool {
        matches!(self, TransportError::Config(_))
    }
}

/// The read-only device request `name` of the profile, or a config error listing the
/// names the profile does have.
pub(crate) fn find_diagnostic<'p>(
    profile: &'p Profile,
    name: &str,
) -> Result<&'p tend_profiles::schema::DiagnosticDef, TransportError> {
    profile
        .doc
        .diagnostics
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| {
            TransportError::Config(format!(
                "profile {} lists no diagnostic `{name}` (it lists: {})",
                profile.id(),
                profile.diagnostic_names().collect::<Vec<_>>().join(", ")
            ))
        })
}

/// The profile timing a transport uses before the firmware (and so the profile) is known:
/// every profile of a model must be able to identify the device, so the first will do.
pub(crate) fn family_first(
    family: &[Arc<Profile>],
    model: &str,
) -> Result<Arc<Profile>, TransportError> {
    family
        .first()
        .cloned()
        .ok_or_else(|| TransportError::Config(format!("no profile for model `{model}`")))
}

/// Back-off before reopening a link that failed: grows to a minute, so a dead port is
/// retried without spinning.
pub(crate) fn reopen_backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(60))
}

/// A profile duration or a fallback.
pub(crate) fn dur(d: Option<tend_profiles::units::Dur>, fallback: Duration) -> Duration {
    d.map(|d| d.0).unwrap_or(fallback)
}

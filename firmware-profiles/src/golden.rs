//! Golden vectors: a profile's worked examples from the vendor manual (reply frames,
//! register blocks or a status document) and what they must decode to. A profile whose
//! vectors fail is refused when it loads.

use crate::engine::{
    firmware_major, replies_from_frames, DecodeError, Evaluation, FramesError, Identity, Profile,
    RuleState, Snapshot,
};
use crate::modbus::RegisterImage;
use crate::model::{DeviceState, FaultClass, Value};
use crate::schema::{GoldenDef, TransportKind};

/// Evaluation time of a vector that names none.
const DEFAULT_NOW: &str = "2026-11-28T10:15:00Z";

/// How a golden vector fails: what the profile makes of the example differs from what
/// the vector says.
#[derive(Debug, thiserror::Error)]
pub enum GoldenError {
    #[error("`now` is not an RFC 3339 time: {0}")]
    Now(jiff::Error),
    #[error(transparent)]
    Frames(#[from] FramesError),
    #[error("an MQTT golden vector needs `json`")]
    NoJson,
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("no identity reply in the vector")]
    NoIdentity,
    #[error("firmware {got:?}, expected {want:?}")]
    Firmware { got: String, want: String },
    #[error("firmware {firmware} is not covered by this profile ({family})")]
    NotCovered { firmware: String, family: String },
    #[error("serial {got:?}, expected {want:?}")]
    Serial { got: Option<String>, want: String },
    #[error("decoding problems: {}", .0.join("; "))]
    Issues(Vec<String>),
    #[error("reading `{0}` missing")]
    ReadingMissing(String),
    #[error("reading `{name}` is {got}, expected {want}")]
    Reading {
        name: String,
        got: Value,
        want: toml::Value,
    },
    #[error("signals {got:?}, expected {want:?}")]
    Signals { got: Vec<String>, want: Vec<String> },
    #[error("signal {0} missing")]
    SignalMissing(String),
    #[error("signal {code} has class {got:?}, expected {want}")]
    Class {
        code: String,
        got: Option<FaultClass>,
        want: FaultClass,
    },
    #[error("state {got}, expected {want}")]
    State { got: DeviceState, want: DeviceState },
    #[error("{0:?} appears in the decoded output")]
    Absent(String),
    /// Cannot happen for the engine's types; refused rather than checking `absent`
    /// against nothing.
    #[error("the decoded output cannot be written as JSON: {0}")]
    Output(#[from] serde_json::Error),
}

/// Runs one golden vector; `Err` says what differs.
pub fn run_golden(p: &Profile, g: &GoldenDef) -> Result<(), GoldenError> {
    let now: jiff::Timestamp = g
        .now
        .as_deref()
        .unwrap_or(DEFAULT_NOW)
        .parse()
        .map_err(GoldenError::Now)?;
    let (snap, identity) = decode(p, g)?;
    if let Some(want) = &g.firmware {
        check_identity(p, g, want, identity)?;
    }
    if !snap.issues.is_empty() {
        return Err(GoldenError::Issues(snap.issues.clone()));
    }
    let ev = p.evaluate(&snap, now, &mut RuleState::default());
    check_evaluation(g, &ev)?;
    let out = serde_json::to_string(&(&snap, &ev))?;
    match g.absent.iter().find(|a| out.contains(a.as_str())) {
        Some(a) => Err(GoldenError::Absent(a.clone())),
        None => Ok(()),
    }
}

/// What the profile decodes from the vector's example, and the identity read from it
/// when the example has one.
fn decode(
    p: &Profile,
    g: &GoldenDef,
) -> Result<(Snapshot, Option<Result<Identity, DecodeError>>), GoldenError> {
    Ok(match p.doc.transport.kind {
        TransportKind::Serial => {
            let frames: Vec<Vec<u8>> = g.frames.iter().map(|f| f.as_bytes().to_vec()).collect();
            let replies = replies_from_frames(&frames)?;
            let req = p.doc.identify.request.clone().unwrap_or_default();
            let identity = replies.get(&req).map(|info| p.identify_serial(info));
            (p.decode_serial(&replies), identity)
        }
        TransportKind::Modbus => {
            let mut image = RegisterImage::new();
            for r in &g.registers {
                image.insert(r.table, r.start, &r.words);
            }
            let identity =
                Some(p.identify_registers(&image)).filter(|i| i.is_ok() || g.firmware.is_some());
            (p.decode_registers(&image), identity)
        }
        TransportKind::Mqtt => {
            let json = g.json.as_deref().ok_or(GoldenError::NoJson)?;
            let identity = Some(p.identify_json(json.as_bytes()));
            (p.decode_json(json.as_bytes())?, identity)
        }
    })
}

/// The firmware (and serial number, when the vector names one) read from the example.
fn check_identity(
    p: &Profile,
    g: &GoldenDef,
    want: &str,
    identity: Option<Result<Identity, DecodeError>>,
) -> Result<(), GoldenError> {
    let got = identity.ok_or(GoldenError::NoIdentity)??;
    if got.firmware != want {
        return Err(GoldenError::Firmware {
            got: got.firmware,
            want: want.to_string(),
        });
    }
    if firmware_major(&got.firmware) != Some(p.firmware_major) {
        return Err(GoldenError::NotCovered {
            firmware: got.firmware,
            family: p.doc.device.firmware.clone(),
        });
    }
    if let Some(sn) = &g.serial {
        if got.serial.as_ref() != Some(sn) {
            return Err(GoldenError::Serial {
                got: got.serial,
                want: sn.clone(),
            });
        }
    }
    Ok(())
}

/// Readings, the exact set of signals, their classes and the device state.
fn check_evaluation(g: &GoldenDef, ev: &Evaluation) -> Result<(), GoldenError> {
    for (name, want) in &g.readings {
        let got = ev
            .readings
            .iter()
            .find(|r| &r.name == name)
            .map(|r| &r.value)
            .ok_or_else(|| GoldenError::ReadingMissing(name.clone()))?;
        if !reading_matches(got, want) {
            return Err(GoldenError::Reading {
                name: name.clone(),
                got: got.clone(),
                want: want.clone(),
            });
        }
    }
    if let Some(want) = &g.signals {
        let mut want = want.clone();
        want.sort();
        let got: Vec<String> = ev.signals.iter().map(|s| s.code.clone()).collect();
        if got != want {
            return Err(GoldenError::Signals { got, want });
        }
    }
    for (code, class) in &g.classes {
        let s = ev
            .signals
            .iter()
            .find(|s| &s.code == code)
            .ok_or_else(|| GoldenError::SignalMissing(code.clone()))?;
        if s.class != Some(*class) {
            return Err(GoldenError::Class {
                code: code.clone(),
                got: s.class,
                want: *class,
            });
        }
    }
    match g.state {
        Some(want) if ev.state != want => Err(GoldenError::State {
            got: ev.state,
            want,
        }),
        _ => Ok(()),
    }
}

/// A decoded value against the vector's TOML value, with float tolerance.
fn reading_matches(got: &Value, want: &toml::Value) -> bool {
    match (got, want) {
        (Value::Num(n), toml::Value::Integer(i)) => (n - *i as f64).abs() < 1e-6,
        (Value::Num(n), toml::Value::Float(f)) => {
            (n - f).abs() < 1e-4 || (n.is_nan() && f.is_nan())
        }
        (Value::Text(t), toml::Value::String(s)) => t == s,
        (Value::Codes(c), toml::Value::Array(a)) => {
            c.len() == a.len() && c.iter().zip(a).all(|(x, y)| y.as_str() == Some(x.as_str()))
        }
        _ => false,
    }
}

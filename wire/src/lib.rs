//! The agent↔gateway wire format, version 1: topic names, the records an agent sends,
//! the acknowledgements a gateway returns and the diagnostic exchange. JSON on MQTT.
//!
//! Acks name exactly the sequence ranges a gateway stored, never "everything up to N":
//! with a shared subscription any batch may land on any gateway.
//!
//! Sequence numbers count within an outbox *incarnation*, a random id the agent makes
//! with its outbox file: every batch names it and every ack names the one it
//! acknowledges, so an agent whose outbox was lost starts over at seq 1 without its
//! records being taken for duplicates. The field is required and the version stays 1:
//! a peer that does not send it is refused (malformed) rather than half understood, and
//! in a mixed fleet nothing is lost either way (a new gateway refuses an old agent's
//! batches, which stay in its outbox; a new agent ignores an old gateway's acks, which
//! name no incarnation, and keeps its records).
#![forbid(unsafe_code)]

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tend_profiles::{DeviceState, FaultClass, SignalKind, Value};

/// Wire format version carried in every message.
pub const VERSION: u32 = 1;
/// Largest message either side accepts; larger ones are refused before parsing.
pub const MAX_MESSAGE: usize = 4 << 20;

pub mod credentials;
#[doc(hidden)]
pub mod fuzzing;
pub mod seal;

pub use seal::{AgentKey, Purpose, SealError};

/// Topic names of DESIGN §3.
pub mod topic {
    pub const PREFIX: &str = "tend/v1";

    pub fn up(agent: &str) -> String {
        format!("{PREFIX}/{agent}/up")
    }
    pub fn ack(agent: &str) -> String {
        format!("{PREFIX}/{agent}/ack")
    }
    pub fn status(agent: &str) -> String {
        format!("{PREFIX}/{agent}/status")
    }
    pub fn diag_req(agent: &str) -> String {
        format!("{PREFIX}/{agent}/diag/req")
    }
    pub fn diag_resp(agent: &str) -> String {
        format!("{PREFIX}/{agent}/diag/resp")
    }

    /// What a topic is, for a subscriber of `tend/v1/+/...`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Parsed<'a> {
        Up(&'a str),
        Ack(&'a str),
        Status(&'a str),
        DiagReq(&'a str),
        DiagResp(&'a str),
    }

    pub fn parse(topic: &str) -> Option<Parsed<'_>> {
        let rest = topic.strip_prefix(PREFIX)?.strip_prefix('/')?;
        let (agent, kind) = rest.split_once('/')?;
        if !valid_agent_id(agent) {
            return None;
        }
        Some(match kind {
            "up" => Parsed::Up(agent),
            "ack" => Parsed::Ack(agent),
            "status" => Parsed::Status(agent),
            "diag/req" => Parsed::DiagReq(agent),
            "diag/resp" => Parsed::DiagResp(agent),
            _ => return None,
        })
    }

    /// Agent ids are topic levels: no wildcards, no separators, bounded.
    pub fn valid_agent_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 64
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    }
}

/// `online` / `offline`, retained on the status topic (offline is the last will).
pub const STATUS_ONLINE: &str = "online";
pub const STATUS_OFFLINE: &str = "offline";
/// The prefix of the status an agent leaves when it stops because it cannot go on
/// (`degraded: outbox cannot be written (disk full?)`).
pub const STATUS_DEGRADED: &str = "degraded: ";

/// `online`, `offline`, or `degraded: ` and a short printable reason.
pub fn valid_status(s: &str) -> bool {
    s == STATUS_ONLINE
        || s == STATUS_OFFLINE
        || s.strip_prefix(STATUS_DEGRADED).is_some_and(|why| {
            !why.is_empty() && why.len() <= 120 && why.chars().all(|c| !c.is_control())
        })
}

/// One record, numbered by the agent that made it durable.
///
/// On the wire one flat object: `seq`, `at`, `device`, `type` and the body's fields.
/// Decoding is written out (see [`Record`]'s `Deserialize`): `#[serde(flatten)]` over a
/// tagged enum made serde buffer and copy every record before decoding it again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    pub seq: u64,
    /// The agent's UTC time when the record was made.
    pub at: Timestamp,
    /// The device id of the agent's config (the fleet file uses the same id).
    pub device: String,
    #[serde(flatten)]
    pub body: RecordBody,
}

/// A record's key: the common fields and `readings` without an allocation, any other
/// key as it is.
enum RecordField {
    Seq,
    At,
    Device,
    Type,
    Readings,
    Other(String),
}

impl<'de> Deserialize<'de> for RecordField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldVisitor;
        impl serde::de::Visitor<'_> for FieldVisitor {
            type Value = RecordField;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RecordField, E> {
                Ok(match v {
                    "seq" => RecordField::Seq,
                    "at" => RecordField::At,
                    "device" => RecordField::Device,
                    "type" => RecordField::Type,
                    "readings" => RecordField::Readings,
                    other => RecordField::Other(other.to_string()),
                })
            }
        }
        d.deserialize_identifier(FieldVisitor)
    }
}

/// One pass over the record's fields: readings (nearly every record) are decoded in
/// place; any other body's fields are kept as JSON and decoded as [`RecordBody`] at the
/// end, with the same rules as the derived form (unknown fields ignored, `type` required).
impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RecordVisitor;
        impl<'de> serde::de::Visitor<'de> for RecordVisitor {
            type Value = Record;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a record object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Record, A::Error> {
                use serde::de::Error;
                let mut seq: Option<u64> = None;
                let mut at: Option<Timestamp> = None;
                let mut device: Option<String> = None;
                let mut kind: Option<String> = None;
                let mut readings: Option<Vec<WireReading>> = None;
                let mut rest = serde_json::Map::new();
                let dup = |k: &str| A::Error::custom(format_args!("duplicate field `{k}`"));
                while let Some(key) = map.next_key::<RecordField>()? {
                    match key {
                        RecordField::Seq if seq.is_some() => return Err(dup("seq")),
                        RecordField::Seq => seq = Some(map.next_value()?),
                        RecordField::At if at.is_some() => return Err(dup("at")),
                        RecordField::At => at = Some(map.next_value()?),
                        RecordField::Device if device.is_some() => return Err(dup("device")),
                        RecordField::Device => device = Some(map.next_value()?),
                        RecordField::Type if kind.is_some() => return Err(dup("type")),
                        RecordField::Type => kind = Some(map.next_value()?),
                        RecordField::Readings if readings.is_some() => return Err(dup("readings")),
                        RecordField::Readings
                            if kind.as_deref().is_none_or(|k| k == "readings") =>
                        {
                            readings = Some(map.next_value()?)
                        }
                        RecordField::Readings => {
                            let v: serde_json::Value = map.next_value()?;
                            rest.insert("readings".into(), v);
                        }
                        RecordField::Other(k) => {
                            let v: serde_json::Value = map.next_value()?;
                            rest.insert(k, v);
                        }
                    }
                }
                let seq = seq.ok_or_else(|| A::Error::missing_field("seq"))?;
                let at = at.ok_or_else(|| A::Error::missing_field("at"))?;
                let device = device.ok_or_else(|| A::Error::missing_field("device"))?;
                let kind = kind.ok_or_else(|| A::Error::missing_field("type"))?;
                let body = if kind == "readings" {
                    RecordBody::Readings {
                        readings: readings.ok_or_else(|| A::Error::missing_field("readings"))?,
                    }
                } else {
                    rest.insert("type".into(), serde_json::Value::String(kind));
                    RecordBody::deserialize(serde_json::Value::Object(rest))
                        .map_err(A::Error::custom)?
                };
                Ok(Record {
                    seq,
                    at,
                    device,
                    body,
                })
            }
        }
        d.deserialize_map(RecordVisitor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecordBody {
    /// The device was identified and a profile chosen.
    Identity {
        model: String,
        firmware: String,
        serial: Option<String>,
        profile: String,
    },
    /// Readings of one poll.
    Readings { readings: Vec<WireReading> },
    /// The device's availability state changed.
    State { from: DeviceState, to: DeviceState },
    /// A fault episode opened, changed class, or cleared.
    Episode(EpisodeEvent),
    /// The outbox was full and dropped readings (never states or episodes).
    Dropped {
        count: u64,
        first_seq: u64,
        last_seq: u64,
    },
}

impl RecordBody {
    /// Readings may be dropped when the outbox is full; nothing else may.
    pub fn is_droppable(&self) -> bool {
        matches!(self, RecordBody::Readings { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireReading {
    pub name: String,
    pub value: Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unit: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpisodeChange {
    Opened,
    ClassChanged,
    Cleared,
}

/// A change of one fault episode (a fault that clears and returns within the damping
/// time stays one episode; its `flaps` count is in the evidence when it clears). The episode id is derived from the episode alone, so a
/// ticket key made from it is the same on every gateway and after every restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeEvent {
    pub episode: String,
    pub change: EpisodeChange,
    pub code: String,
    pub kind: SignalKind,
    pub class: Option<FaultClass>,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    #[serde(default)]
    pub evidence: BTreeMap<String, serde_json::Value>,
    /// Whether the device was available when this changed.
    pub device_available: bool,
    pub opened_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub due: Option<String>,
    /// The episode as it opened, repeated on every change: with a shared subscription the
    /// gateway that sees a change first may not have seen the opening, and the ticket body
    /// (whose key is the episode's) must be the same whichever change builds it.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub opening: Option<Box<Opening>>,
}

/// What a fault episode looked like when it opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opening {
    pub class: Option<FaultClass>,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<String>,
    #[serde(default)]
    pub evidence: BTreeMap<String, serde_json::Value>,
    pub device_available: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub due: Option<String>,
    /// The profile family of the device (`aeris/av-500`) and the firmware it reported.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub firmware: Option<String>,
}

/// Longest outbox incarnation accepted (the agent makes 32 hex digits).
pub const MAX_INCARNATION: usize = 64;

/// An outbox incarnation is a key in the gateway's store and a log item: 1 to
/// [`MAX_INCARNATION`] ASCII letters and digits.
pub fn valid_incarnation(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_INCARNATION && id.chars().all(|c| c.is_ascii_alphanumeric())
}

/// What an agent publishes on `up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpBatch {
    pub v: u32,
    pub agent: String,
    /// The outbox incarnation the records' seqs belong to.
    pub incarnation: String,
    pub site: String,
    /// The agent's clock when it sent the batch: beside the gateway's clock at arrival,
    /// it tells how far off the agent's clock is (records carry the agent's time).
    pub sent_at: Timestamp,
    /// The oldest seq still in the agent's outbox when it sent the batch: everything
    /// below it was acknowledged and deleted and is never sent again, so the gateway may
    /// forget those seqs but for a watermark (its dedup stays bounded over months).
    /// Absent when the agent cannot say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest: Option<u64>,
    pub records: Vec<Record>,
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

/// What a gateway publishes on `ack`: exactly the ranges it stored durably.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub v: u32,
    /// The outbox incarnation the ranges belong to: an agent ignores an ack for another.
    pub incarnation: String,
    pub ranges: Vec<SeqRange>,
    /// The gateway's clock when it acknowledged: the agent's measure of gateway time,
    /// which a diagnostic request's expiry is judged by (the agent's own clock may be
    /// wrong).
    pub gateway_time: Timestamp,
}

/// Compresses sequence numbers (any order, duplicates allowed) into sorted ranges.
pub fn ranges_of(seqs: impl IntoIterator<Item = u64>) -> Vec<SeqRange> {
    let mut v: Vec<u64> = seqs.into_iter().collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<SeqRange> = Vec::new();
    for s in v {
        match out.last_mut() {
            Some(r) if r.last.checked_add(1) == Some(s) => r.last = s,
            _ => out.push(SeqRange { first: s, last: s }),
        }
    }
    out
}

/// A hotline diagnostic asked of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagRequest {
    pub v: u32,
    /// Unique per request; the agent answers an id once.
    pub id: String,
    pub device: String,
    pub request: String,
    /// By the gateway's clock; the agent judges it by the gateway time it has seen, so a
    /// request replayed later is refused whatever the agent's own clock says.
    pub expires_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagResponse {
    pub v: u32,
    pub id: String,
    pub device: String,
    pub request: String,
    pub ok: bool,
    #[serde(default)]
    pub answer: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("message of {0} bytes exceeds the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("wire version {0} is not supported (this build speaks {VERSION})")]
    Version(u32),
    #[error("invalid agent id {0:?}")]
    AgentId(String),
    #[error("invalid outbox incarnation {0:?}")]
    Incarnation(String),
}

fn check_incarnation(id: &str) -> Result<(), WireError> {
    if valid_incarnation(id) {
        Ok(())
    } else {
        Err(WireError::Incarnation(id.chars().take(80).collect()))
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    if bytes.len() > MAX_MESSAGE {
        return Err(WireError::TooLarge(bytes.len()));
    }
    serde_json::from_slice(bytes).map_err(|e| WireError::Malformed(e.to_string()))
}

fn check_version(v: u32) -> Result<(), WireError> {
    if v == VERSION {
        Ok(())
    } else {
        Err(WireError::Version(v))
    }
}

impl UpBatch {
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let b: UpBatch = decode(bytes)?;
        check_version(b.v)?;
        if !topic::valid_agent_id(&b.agent) {
            return Err(WireError::AgentId(b.agent.chars().take(80).collect()));
        }
        check_incarnation(&b.incarnation)?;
        Ok(b)
    }
}

impl Ack {
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let a: Ack = decode(bytes)?;
        check_version(a.v)?;
        check_incarnation(&a.incarnation)?;
        if a.ranges.iter().any(|r| r.first > r.last) {
            return Err(WireError::Malformed("ack range with first > last".into()));
        }
        Ok(a)
    }
}

impl DiagRequest {
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let r: DiagRequest = decode(bytes)?;
        check_version(r.v)?;
        Ok(r)
    }
}

impl DiagResponse {
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let r: DiagResponse = decode(bytes)?;
        check_version(r.v)?;
        Ok(r)
    }
}

/// A message that could not be written as JSON. The wire types hold plain data and maps
/// with string keys, so it does not happen for them; it is an error rather than empty
/// bytes so that nothing empty is ever published or stored in its place. It keeps the
/// text only, so that errors carrying it stay comparable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode a wire message: {0}")]
pub struct EncodeError(String);

/// Encodes any wire message.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, EncodeError> {
    serde_json::to_vec(msg).map_err(|e| EncodeError(e.to_string()))
}

/// `msg` encoded and sealed with `key` for `purpose` on `agent`'s topics.
pub fn encode_sealed<T: Serialize>(
    key: &AgentKey,
    purpose: Purpose,
    agent: &str,
    msg: &T,
) -> Result<Vec<u8>, EncodeError> {
    Ok(seal::seal(key, purpose, agent, &encode(msg)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts() -> Timestamp {
        "2026-11-28T02:15:02Z".parse().unwrap()
    }

    #[test]
    fn topics_round_trip() {
        assert_eq!(topic::up("agent-icu-a"), "tend/v1/agent-icu-a/up");
        assert_eq!(
            topic::parse("tend/v1/agent-icu-a/up"),
            Some(topic::Parsed::Up("agent-icu-a"))
        );
        assert_eq!(
            topic::parse(&topic::diag_resp("a1")),
            Some(topic::Parsed::DiagResp("a1"))
        );
        assert_eq!(topic::parse("tend/v1/+/up"), None);
        assert_eq!(topic::parse("tend/v1/a/b/up"), None);
        assert_eq!(topic::parse("tend/v2/a/up"), None);
        assert_eq!(topic::parse("tend/v1//up"), None);
    }

    #[test]
    fn batch_round_trip() {
        let b = UpBatch {
            v: VERSION,
            agent: "agent-icu-a".into(),
            incarnation: "9f1c2e4a7b3d5f60a1b2c3d4e5f60718".into(),
            site: "s-017-main".into(),
            sent_at: ts(),
            oldest: Some(7),
            records: vec![
                Record {
                    seq: 7,
                    at: ts(),
                    device: "icu7-vent".into(),
                    body: RecordBody::State {
                        from: DeviceState::Up,
                        to: DeviceState::Down,
                    },
                },
                Record {
                    seq: 8,
                    at: ts(),
                    device: "icu7-vent".into(),
                    body: RecordBody::Episode(EpisodeEvent {
                        episode: "agent-icu-a/icu7-vent/ALM1.4/1795832102000".into(),
                        change: EpisodeChange::Opened,
                        code: "ALM1.4".into(),
                        kind: SignalKind::Fault,
                        class: Some(FaultClass::Major),
                        description: "exhalation valve fault".into(),
                        action: None,
                        evidence: BTreeMap::from([("state".into(), serde_json::json!(4))]),
                        device_available: false,
                        opened_at: ts(),
                        due: None,
                        opening: None,
                    }),
                },
                Record {
                    seq: 9,
                    at: ts(),
                    device: "icu7-vent".into(),
                    body: RecordBody::Readings {
                        readings: vec![WireReading {
                            name: "battery".into(),
                            value: Value::Num(87.0),
                            unit: Some("%".into()),
                        }],
                    },
                },
            ],
        };
        let bytes = encode(&b).unwrap();
        assert_eq!(UpBatch::decode(&bytes).unwrap(), b);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("\"type\":\"episode\""), "{text}");
        assert!(!b.records[0].body.is_droppable());
        assert!(b.records[2].body.is_droppable());
    }

    /// The written-out decoders of `Record` and `Value` read what the derived forms
    /// wrote, in any key order, and refuse what the derived forms refused.
    #[test]
    fn records_decode_in_any_key_order_and_bad_ones_are_refused() {
        let record = |json: &str| serde_json::from_str::<Record>(json);
        let readings = record(
            r#"{"readings":[{"name":"ppeak","value":31.5,"unit":"cmH2O"},{"name":"mode","value":"VC"},{"name":"alarms","value":["A1","A7"]},{"name":"n","value":-4}],"device":"d","type":"readings","at":"2026-11-28T02:15:02Z","seq":9}"#,
        )
        .unwrap();
        assert_eq!(readings.seq, 9);
        assert_eq!(readings.at, ts());
        let RecordBody::Readings { readings: r } = &readings.body else {
            panic!("{readings:?}");
        };
        assert_eq!(r[0].value, Value::Num(31.5));
        assert_eq!(r[0].unit.as_deref(), Some("cmH2O"));
        assert_eq!(r[1].value, Value::Text("VC".into()));
        assert_eq!(r[2].value, Value::Codes(vec!["A1".into(), "A7".into()]));
        assert_eq!(r[3].value, Value::Num(-4.0));
        // Every body survives a round trip, and an unknown field is ignored as before.
        for body in [
            RecordBody::Identity {
                model: "aeris/av-500".into(),
                firmware: "5.2.1".into(),
                serial: None,
                profile: "aeris/av-500-5.x".into(),
            },
            RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
            RecordBody::Dropped {
                count: 3,
                first_seq: 1,
                last_seq: 5,
            },
            readings.body.clone(),
        ] {
            let r = Record {
                seq: 1,
                at: ts(),
                device: "d".into(),
                body,
            };
            let mut json = serde_json::to_value(&r).unwrap();
            json["extra"] = serde_json::json!({"nested": [1, 2]});
            assert_eq!(serde_json::from_value::<Record>(json).unwrap(), r);
        }
        let state_with_readings_field = record(
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"state","readings":7,"from":"up","to":"down"}"#,
        )
        .unwrap();
        assert!(matches!(
            state_with_readings_field.body,
            RecordBody::State { .. }
        ));
        for bad in [
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","readings":[]}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings"}"#,
            r#"{"seq":1,"seq":2,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[]}"#,
            r#"{"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[]}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"nonsense"}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"state","from":"up"}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[{"name":"x","value":true}]}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[{"name":"x","value":null}]}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[{"name":"x","value":[1]}]}"#,
            r#"{"seq":1,"at":"2026-11-28T02:15:02Z","device":"d","type":"readings","readings":[{"name":"x","value":{"a":1}}]}"#,
            r#"[1,"2026-11-28T02:15:02Z","d"]"#,
        ] {
            assert!(record(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_messages() {
        assert!(matches!(
            UpBatch::decode(b"{"),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            UpBatch::decode(b"null"),
            Err(WireError::Malformed(_))
        ));
        assert_eq!(
            UpBatch::decode(br#"{"v":2,"agent":"a","incarnation":"i1","site":"s","sent_at":"2026-12-02T00:00:00Z","records":[]}"#),
            Err(WireError::Version(2))
        );
        assert!(matches!(
            UpBatch::decode(br#"{"v":1,"agent":"a/#","incarnation":"i1","site":"s","sent_at":"2026-12-02T00:00:00Z","records":[]}"#),
            Err(WireError::AgentId(_))
        ));
        assert!(
            Ack::decode(br#"{"v":1,"incarnation":"i1","ranges":[{"first":5,"last":4}],"gateway_time":"2026-12-02T00:00:00Z"}"#).is_err()
        );
        assert!(Ack::decode(
            br#"{"v":1,"incarnation":"i1","ranges":[],"gateway_time":"2026-12-02T00:00:00Z"}"#
        )
        .is_ok());
        let huge = vec![b' '; MAX_MESSAGE + 1];
        assert_eq!(
            UpBatch::decode(&huge),
            Err(WireError::TooLarge(MAX_MESSAGE + 1))
        );
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(UpBatch::decode(deep.as_bytes()).is_err());
    }

    /// A batch or an ack without an incarnation, or with one that is no safe key, is
    /// refused before anyone acts on it.
    #[test]
    fn incarnation_is_required_and_checked() {
        assert!(matches!(
            UpBatch::decode(br#"{"v":1,"agent":"a","site":"s","records":[]}"#),
            Err(WireError::Malformed(_))
        ));
        assert!(matches!(
            Ack::decode(br#"{"v":1,"ranges":[],"gateway_time":"2026-12-02T00:00:00Z"}"#),
            Err(WireError::Malformed(_))
        ));
        let long = "a".repeat(MAX_INCARNATION + 1);
        for bad in ["", "a/b", "a b", "é", long.as_str()] {
            let b = format!(
                r#"{{"v":1,"agent":"a","incarnation":{},"site":"s","sent_at":"2026-12-02T00:00:00Z","records":[]}}"#,
                serde_json::json!(bad)
            );
            assert!(
                matches!(
                    UpBatch::decode(b.as_bytes()),
                    Err(WireError::Incarnation(_))
                ),
                "{bad:?}"
            );
            let a = format!(
                r#"{{"v":1,"incarnation":{},"ranges":[],"gateway_time":"2026-12-02T00:00:00Z"}}"#,
                serde_json::json!(bad)
            );
            assert!(
                matches!(Ack::decode(a.as_bytes()), Err(WireError::Incarnation(_))),
                "{bad:?}"
            );
        }
        assert!(valid_incarnation(&"f".repeat(MAX_INCARNATION)));
    }

    /// A value JSON cannot hold is an error, not an empty message.
    #[test]
    fn unencodable_is_an_error() {
        let bad = BTreeMap::from([((1u8, 2u8), "a map with tuple keys")]);
        let e = encode(&bad).unwrap_err();
        assert!(
            e.to_string().starts_with("cannot encode a wire message: "),
            "{e}"
        );
        // A reading that is not a number JSON knows still encodes.
        let r = WireReading {
            name: "x".into(),
            value: Value::Num(f64::NAN),
            unit: None,
        };
        assert!(!encode(&r).unwrap().is_empty());
    }

    #[test]
    fn ranges() {
        assert_eq!(ranges_of([]), vec![]);
        assert_eq!(
            ranges_of([5, 3, 4, 9, 10, 4, 12]),
            vec![
                SeqRange { first: 3, last: 5 },
                SeqRange { first: 9, last: 10 },
                SeqRange {
                    first: 12,
                    last: 12
                }
            ]
        );
        assert_eq!(
            ranges_of([u64::MAX, u64::MAX - 1]),
            vec![SeqRange {
                first: u64::MAX - 1,
                last: u64::MAX
            }]
        );
    }
}

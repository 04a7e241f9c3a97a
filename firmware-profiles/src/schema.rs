//! The profile file format: what a TOML profile may say, as serde types that refuse
//! unknown keys. Meaning across keys (a rule naming an unknown point, a Modbus point
//! without an address) is checked in `load`, which can name the line.

use crate::modbus::{MappedRange, RegType, Table, WordOrder};
use crate::model::{FaultClass, SignalKind};
use crate::serial_frame::Checksum;
use crate::units::{ByteSize, Dur};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One profile file: one device model, one firmware family.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileDoc {
    pub device: DeviceDef,
    pub transport: TransportDef,
    pub identify: IdentifyDef,
    #[serde(default, rename = "point")]
    pub points: Vec<PointDef>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleDef>,
    #[serde(default)]
    pub availability: AvailabilityDef,
    #[serde(default, rename = "diagnostic")]
    pub diagnostics: Vec<DiagnosticDef>,
    /// Fields the device sends that are known and deliberately dropped (clinical alarms).
    #[serde(default, rename = "ignored")]
    pub ignored: Vec<IgnoredDef>,
    #[serde(default, rename = "golden")]
    pub golden: Vec<GoldenDef>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeviceDef {
    /// `vendor/model`, the name an agent config uses, e.g. `aeris/av-500`.
    pub id: String,
    pub vendor: String,
    pub model: String,
    /// What the device is, in the backend's words: `ventilator`, `infusion_pump`, ...
    pub kind: String,
    /// Firmware family this profile covers: `"5.x"`.
    pub firmware: String,
    /// The vendor document this profile follows.
    pub manual: String,
    /// Always-on infrastructure: silence is a `monitoring_lost` signal, not just `unknown`.
    #[serde(default)]
    pub always_on: bool,
    /// How long silence lasts before `monitoring_lost` (always-on devices).
    pub silence_fault_after: Option<Dur>,
    /// Fields the device sends that are personal health information. No point may read
    /// them; tests assert they never leave the decoder.
    #[serde(default)]
    pub phi: Vec<String>,
    /// Points sent as evidence with every signal of this device.
    #[serde(default)]
    pub evidence: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// LIP-300 style framed ASCII request/response.
    Serial,
    /// Modbus RTU or TCP.
    Modbus,
    /// The device publishes JSON to an MQTT broker.
    Mqtt,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Even,
    Odd,
}

/// The keys of every transport kind in one struct; `load` checks that a kind has the
/// keys it needs. Not a serde tagged enum on `kind`: serde buffers such a table, and toml
/// then reports every error inside it at the table's start instead of the key's line
/// (`tests/invalid_profiles.rs` pins the precise lines).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransportDef {
    pub kind: TransportKind,
    // serial line (serial, Modbus RTU)
    pub baud: Option<u32>,
    #[serde(default)]
    pub other_bauds: Vec<u32>,
    pub data_bits: Option<u8>,
    pub parity: Option<Parity>,
    pub stop_bits: Option<u8>,
    /// Serial framing: checksum form to use once the firmware is known.
    pub checksum: Option<Checksum>,
    /// Serial framing: requests sent each poll (`INFO`, `STATUS`, `COUNTERS`).
    #[serde(default)]
    pub poll: Vec<String>,
    /// Negative reply meaning "booting, try later": `BUSY`.
    pub busy_reply: Option<String>,
    pub busy_retry: Option<Dur>,
    /// The device answers within this; longer is a timeout.
    pub reply_timeout: Option<Dur>,
    /// Quiet time between a reply and the next request.
    pub request_gap: Option<Dur>,
    // Modbus
    pub tcp_port: Option<u16>,
    pub default_unit: Option<u8>,
    /// Unit id ignored by the device (HM-2 answers any).
    #[serde(default)]
    pub any_unit: bool,
    pub max_registers: Option<u16>,
    pub busy_exception: Option<u8>,
    #[serde(default)]
    pub mapped: Vec<MappedRange>,
    pub max_connections: Option<u8>,
    pub idle_close: Option<Dur>,
    // MQTT
    pub status_topic: Option<String>,
    pub event_topic: Option<String>,
    pub lwt_topic: Option<String>,
    pub cmd_topic: Option<String>,
    pub reply_topic: Option<String>,
    pub max_payload: Option<ByteSize>,
    /// JSON pointer to the schema tag and the tag this profile decodes.
    pub schema_pointer: Option<String>,
    pub schema: Option<String>,
    /// Expected status period; silence is judged against it.
    pub status_interval: Option<Dur>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FirmwareFormat {
    /// `"2.4.1"` as text.
    Dotted,
    /// Three registers: major, minor, patch.
    MajorMinorPatch,
    /// One register: major × 100 + minor (`305` is 3.5).
    MajorX100Minor,
}

/// How to read the firmware version and serial number before the profile is known. Every
/// profile of one model must say the same here.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentifyDef {
    pub firmware_format: FirmwareFormat,
    // serial
    pub request: Option<String>,
    pub firmware_key: Option<String>,
    pub serial_key: Option<String>,
    // modbus
    pub firmware_table: Option<Table>,
    pub firmware_address: Option<u16>,
    pub serial_table: Option<Table>,
    pub serial_address: Option<u16>,
    pub serial_registers: Option<u16>,
    // json
    pub firmware_pointer: Option<String>,
    #[serde(default)]
    pub serial_pointers: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PointType {
    // Modbus register types
    U16,
    I16,
    U32,
    I32,
    F32,
    Ascii,
    // text sources (serial fields, JSON)
    /// Decimal number.
    Number,
    /// Hexadecimal bit mask.
    Hex,
    Text,
    /// `YYYY-MM-DD`, kept as text; date rules read it.
    Date,
    /// A list of codes (JSON array of strings or of objects).
    Codes,
    /// JSON `true`/`false` as 1/0.
    Bool,
}

impl PointType {
    pub fn reg_type(self) -> Option<RegType> {
        Some(match self {
            PointType::U16 => RegType::U16,
            PointType::I16 => RegType::I16,
            PointType::U32 => RegType::U32,
            PointType::I32 => RegType::I32,
            PointType::F32 => RegType::F32,
            PointType::Ascii => RegType::Ascii,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PointDef {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: PointType,
    pub unit: Option<String>,
    pub description: Option<String>,
    /// Published as a reading (default). Internal points (bit words) may say false.
    #[serde(default = "yes")]
    pub reading: bool,
    // modbus
    pub table: Option<Table>,
    pub address: Option<u16>,
    pub registers: Option<u16>,
    pub word_order: Option<WordOrder>,
    pub scale: Option<f64>,
    /// Read at most this often instead of at every poll (a counter of days, an interval
    /// setting); its last value stands in between. Modbus points only, and never a point
    /// that fault rules, fault evidence or availability read.
    pub read_every: Option<Dur>,
    // serial
    pub request: Option<String>,
    pub key: Option<String>,
    // json
    pub pointer: Option<String>,
    /// For `codes`: pointer inside each array element to the code.
    pub item: Option<String>,
    /// For `codes`: keep only elements whose `where_pointer` equals `where_equals`.
    pub where_pointer: Option<String>,
    pub where_equals: Option<String>,
    /// Text values renamed to the profile's words (`MON` → `monitoring`).
    #[serde(default)]
    pub map: BTreeMap<String, String>,
}

impl PointDef {
    /// The Modbus registers the point reads: table, first address and count (`None` for a
    /// point of another transport, or one missing its table or address).
    pub fn register_span(&self) -> Option<(Table, u16, u16)> {
        let rt = self.ty.reg_type()?;
        Some((
            self.table?,
            self.address?,
            rt.width(self.registers.unwrap_or(1)),
        ))
    }
}

/// The most registers one Modbus read may ask for: a reply carries at most 250 data bytes.
pub const MODBUS_MAX_REGISTERS: u16 = 125;

impl TransportDef {
    /// The registers one Modbus request of this device may ask for: its `max_registers`, or
    /// the protocol's limit.
    pub fn request_limit(&self) -> u16 {
        self.max_registers.unwrap_or(MODBUS_MAX_REGISTERS)
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// A bit field; each listed bit a signal, unlisted bits reported with their number.
    Bits,
    /// An error-code table with class ranges for unlisted codes.
    Codes,
    /// A value above/below a limit, optionally for a duration.
    Threshold,
    /// A value falling by more than `falls_by` within `window`.
    Rate,
    /// A value equal to `equals`.
    Equals,
    /// A date point plus `every` is the due date.
    DateDue,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BitDef {
    pub bit: u8,
    pub description: String,
    pub class: Option<FaultClass>,
    /// Listed by the manual but not a device fault (hospital gas supply).
    #[serde(default)]
    pub not_a_fault: bool,
    pub action: Option<String>,
    /// Bits that are levels of one condition (helium low, then critical) share a group:
    /// while any is set they are one signal, code `<prefix>.<group>`, at the class of the
    /// highest set bit, so a rise is the same episode escalated rather than a second one.
    #[serde(default)]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CodeDef {
    pub code: String,
    pub description: String,
    pub class: FaultClass,
    pub action: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RangeDef {
    pub from: i64,
    pub to: i64,
    pub class: FaultClass,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrefixDef {
    /// Code prefix, e.g. `T-1` for `T-1xx`.
    pub prefix: String,
    pub class: FaultClass,
}

/// One `[[rule]]`. The keys of every rule kind in one struct, checked per kind in `load`,
/// for the reason given at [`TransportDef`]: a tagged enum would report any error inside
/// a rule at the first `[[rule]]` with key `rule`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub kind: RuleKind,
    pub point: String,
    #[serde(default = "fault")]
    pub signal: SignalKind,
    pub code: Option<String>,
    pub code_prefix: Option<String>,
    pub description: Option<String>,
    pub class: Option<FaultClass>,
    pub action: Option<String>,
    // bits
    #[serde(default)]
    pub bits: Vec<BitDef>,
    pub unlisted_class: Option<FaultClass>,
    pub unlisted_description: Option<String>,
    // codes
    #[serde(default)]
    pub codes: Vec<CodeDef>,
    #[serde(default)]
    pub ranges: Vec<RangeDef>,
    #[serde(default)]
    pub prefixes: Vec<PrefixDef>,
    /// Class of a code no table entry, range or prefix covers: never silently dropped.
    pub otherwise_class: Option<FaultClass>,
    // threshold
    pub above: Option<f64>,
    pub below: Option<f64>,
    pub at_least: Option<f64>,
    /// Threshold against another point (AV-500: days since PM reaches the interval).
    pub at_least_point: Option<String>,
    #[serde(rename = "for")]
    pub for_: Option<Dur>,
    /// The value must come back past the limit by this much before the signal clears.
    pub hysteresis: Option<f64>,
    // rate
    pub falls_by: Option<f64>,
    pub window: Option<Dur>,
    // equals
    pub equals: Option<toml::Value>,
    // date_due
    pub every: Option<Dur>,
    /// Raise the signal this long before the due date.
    pub lead: Option<Dur>,
}

fn fault() -> SignalKind {
    SignalKind::Fault
}

/// A condition on the decoded data: a point's value, a signal code, or any active fault
/// of a class.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConditionDef {
    pub point: Option<String>,
    pub equals: Option<toml::Value>,
    pub signal: Option<String>,
    pub class: Option<FaultClass>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AvailabilityDef {
    #[serde(default)]
    pub down_when: Vec<ConditionDef>,
    #[serde(default)]
    pub maintenance_when: Vec<ConditionDef>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiagnosticDef {
    pub name: String,
    pub description: String,
    /// Serial: the request body, e.g. `Q|SELFTEST`.
    pub request: Option<String>,
    /// MQTT: the command, e.g. `errlog`, with fixed arguments.
    pub command: Option<String>,
    /// Where the device's manual declares this request read-only (document and
    /// section). Needed for an MQTT command of a model tend has no built-in manual for
    /// (`crate::manual`); the built-in list decides for the others.
    pub manual_ref: Option<String>,
    #[serde(default)]
    pub args: BTreeMap<String, toml::Value>,
    /// Modbus: a register dump.
    pub table: Option<Table>,
    pub start: Option<u16>,
    pub count: Option<u16>,
    /// Answer fields that are PHI and removed before the answer leaves the agent.
    #[serde(default)]
    pub drop_fields: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IgnoredDef {
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenRegisters {
    pub table: Table,
    pub start: u16,
    pub words: Vec<u16>,
}

/// A worked example from the manual and what it must decode to.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GoldenDef {
    pub name: String,
    /// Serial: complete reply frames, as sent on the wire.
    #[serde(default)]
    pub frames: Vec<String>,
    /// Modbus: register blocks.
    #[serde(default)]
    pub registers: Vec<GoldenRegisters>,
    /// MQTT: a status document.
    pub json: Option<String>,
    /// Evaluation time (date rules); default 2026-11-28T10:15:00Z.
    pub now: Option<String>,
    pub firmware: Option<String>,
    pub serial: Option<String>,
    #[serde(default)]
    pub readings: BTreeMap<String, toml::Value>,
    /// The exact set of active signal codes.
    pub signals: Option<Vec<String>>,
    #[serde(default)]
    pub classes: BTreeMap<String, FaultClass>,
    pub state: Option<crate::model::DeviceState>,
    /// Text that must not appear anywhere in the decoded output (PHI).
    #[serde(default)]
    pub absent: Vec<String>,
}

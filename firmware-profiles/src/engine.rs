//! The sans-IO engine: a profile turns what a device sent (reply frames, a register
//! image, a JSON document) into a snapshot of the points it lists — nothing else survives
//! decoding, which is how patient data stays at the bedside — and a snapshot plus the
//! time into readings, signals (faults, maintenance, consumables) and a device state.

use crate::modbus::{self, ReadRequest, RegisterImage, ScheduledRead, Table, WordOrder};
use crate::model::{DeviceState, FaultClass, SignalKind, Value};
use crate::schema::{
    BitDef, ConditionDef, FirmwareFormat, PointDef, PointType, ProfileDoc, RuleDef, RuleKind,
    TransportKind,
};
use crate::serial_frame::{self, FrameEvent, RejectReason, Reply, ReplyError};
use jiff::Timestamp;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// A checked profile, ready to decode. Built by [`crate::load`].
#[derive(Debug, Clone)]
pub struct Profile {
    pub doc: ProfileDoc,
    /// Where it was loaded from (a path, or `builtin:<file>`).
    pub source: String,
    /// The firmware major version this profile covers.
    pub firmware_major: u32,
}

/// The values of the points a profile lists, from one poll or one message.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub values: BTreeMap<String, Value>,
    /// Problems decoding listed points (a TALM that is not hex). Never carries unlisted data.
    pub issues: Vec<String>,
}

impl Snapshot {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Firmware and serial number as the device reports them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub firmware: String,
    pub serial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reading {
    pub name: String,
    pub value: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// Something the service organisation should know: a fault, maintenance due, a consumable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signal {
    /// Stable code: `ALM1.4`, `ERR.310`, `T-301`, `TURBINE_TEMP_HIGH`.
    pub code: String,
    pub kind: SignalKind,
    pub class: Option<FaultClass>,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Point values behind the signal.
    pub evidence: BTreeMap<String, serde_json::Value>,
    /// For maintenance: the due date (`YYYY-MM-DD`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub due: Option<String>,
}

/// What one snapshot means.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub readings: Vec<Reading>,
    /// Active signals, sorted by code.
    pub signals: Vec<Signal>,
    pub state: DeviceState,
}

/// Memory the time-based rules keep between snapshots of one device.
#[derive(Debug, Clone, Default)]
pub struct RuleState {
    thresholds: HashMap<usize, ThresholdState>,
    rates: HashMap<usize, RateWindow>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ThresholdState {
    /// When the value first crossed the limit, while it stays crossed.
    since: Option<Timestamp>,
    active: bool,
}

/// Per-bucket maxima over the rule's window: bounded memory at any poll rate.
#[derive(Debug, Clone, Default)]
struct RateWindow {
    buckets: VecDeque<(i64, f64)>,
}

const RATE_BUCKETS: i64 = 256;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message of {0} bytes is larger than the {1} bytes the device may send")]
    TooLarge(usize, u64),
    #[error("message is not valid JSON: {0}")]
    Json(String),
    #[error("message is not a JSON object")]
    NotObject,
    #[error("schema {found:?} is not the {want:?} this profile decodes")]
    Schema { found: Option<String>, want: String },
    #[error("firmware field missing or not understood")]
    NoFirmware,
    #[error("register {table:?} {address} was not read")]
    MissingRegister { table: Table, address: u16 },
    #[error("reply {0:?} missing")]
    MissingReply(String),
}

/// Parses `major.minor.patch` (or `major.minor`, `major`) into its major number.
pub fn firmware_major(fw: &str) -> Option<u32> {
    fw.trim().split('.').next()?.trim().parse().ok()
}

impl Profile {
    pub fn id(&self) -> &str {
        &self.doc.device.id
    }

    pub fn transport_kind(&self) -> TransportKind {
        self.doc.transport.kind
    }

    pub fn point(&self, name: &str) -> Option<&PointDef> {
        self.doc.points.iter().find(|p| p.name == name)
    }

    /// Names of the read-only device requests this profile lists for diagnostics.
    pub fn diagnostic_names(&self) -> impl Iterator<Item = &str> {
        self.doc.diagnostics.iter().map(|d| d.name.as_str())
    }

    // ---------- serial ----------

    /// Decodes reply bodies, keyed by request kind (`STATUS` → its fields).
    pub fn decode_serial(&self, replies: &BTreeMap<String, BTreeMap<String, String>>) -> Snapshot {
        let mut snap = Snapshot::default();
        for p in &self.doc.points {
            let (Some(req), Some(key)) = (&p.request, &p.key) else {
                continue;
            };
            let Some(raw) = replies.get(req).and_then(|f| f.get(key)) else {
                continue;
            };
            match parse_text(p, raw) {
                Ok(v) => {
                    snap.values.insert(p.name.clone(), v);
                }
                Err(e) => snap.issues.push(format!("{}: {e}", p.name)),
            }
        }
        snap
    }

    /// Identity from the fields of the identity reply (LIP-300 `INFO`).
    pub fn identify_serial(
        &self,
        info: &BTreeMap<String, String>,
    ) -> Result<Identity, DecodeError> {
        let id = &self.doc.identify;
        let fw = id
            .firmware_key
            .as_ref()
            .and_then(|k| info.get(k))
            .filter(|v| firmware_major(v).is_some())
            .ok_or(DecodeError::NoFirmware)?;
        Ok(Identity {
            firmware: fw.clone(),
            serial: id.serial_key.as_ref().and_then(|k| info.get(k)).cloned(),
        })
    }

    // ---------- Modbus ----------

    /// Coalesces spans within this device's request limit and mapped ranges. A gap is
    /// bridged only where the device maps registers and none of them is PHI
    /// (`device.phi`): a read never covers a register the profile may not read.
    fn plan(&self, spans: &[(Table, u16, u16)]) -> Vec<ReadRequest> {
        let phi: Vec<(Table, u16, u16)> = self
            .doc
            .device
            .phi
            .iter()
            .filter_map(|s| match crate::phi::PhiEntry::parse(s)? {
                crate::phi::PhiEntry::Registers { table, from, to } => Some((table, from, to)),
                _ => None,
            })
            .collect();
        modbus::plan_reads(
            spans,
            self.doc.transport.request_limit(),
            &modbus::carve(&self.doc.transport.mapped, &phi),
        )
    }

    /// The registers of the points read at the given `read_every` (`None`: every poll).
    fn spans(&self, every: Option<Duration>) -> Vec<(Table, u16, u16)> {
        let overlap = |(t, a, w): (Table, u16, u16), (u, b, v): (Table, u16, u16)| {
            t == u && (a as u32) < b as u32 + v as u32 && (b as u32) < a as u32 + w as u32
        };
        // A slow point sharing a register with a point read at another interval is read at
        // every poll: its words would otherwise come from reads made at different times.
        let interval = |p: &PointDef| {
            let every = p.read_every.map(|d| d.0);
            let shared = every.is_some()
                && p.register_span().is_some_and(|r| {
                    self.doc.points.iter().any(|q| {
                        q.read_every != p.read_every
                            && q.register_span().is_some_and(|s| overlap(r, s))
                    })
                });
            if shared {
                None
            } else {
                every
            }
        };
        self.doc
            .points
            .iter()
            .filter(|p| interval(p) == every)
            .filter_map(PointDef::register_span)
            .collect()
    }

    /// The fewest reads covering every listed point within the device's request limit.
    pub fn read_plan(&self) -> Vec<ReadRequest> {
        self.scan_plan().into_iter().map(|s| s.read).collect()
    }

    /// The reads of a poll and how often each is made: the points read at every poll
    /// coalesced together, then those of each `read_every`, coalesced among themselves
    /// (a slow point riding on a fast read would be read at every poll). A slow point a
    /// fast read already covers needs no read of its own.
    pub fn scan_plan(&self) -> Vec<ScheduledRead> {
        let mut out: Vec<ScheduledRead> = self
            .plan(&self.spans(None))
            .into_iter()
            .map(|read| ScheduledRead { read, every: None })
            .collect();
        let slow: std::collections::BTreeSet<Duration> = self
            .doc
            .points
            .iter()
            .filter_map(|p| p.read_every.map(|d| d.0))
            .collect();
        for every in slow {
            let spans: Vec<_> = self
                .spans(Some(every))
                .into_iter()
                .filter(|&(t, a, w)| {
                    !out.iter().any(|s| {
                        s.read.table == t
                            && s.read.start <= a
                            && a as u32 + w as u32 <= s.read.end()
                    })
                })
                .collect();
            out.extend(self.plan(&spans).into_iter().map(|read| ScheduledRead {
                read,
                every: Some(every),
            }));
        }
        out
    }

    /// The reads that identify the device (firmware and serial number).
    pub fn identify_reads(&self) -> Vec<ReadRequest> {
        let id = &self.doc.identify;
        let mut spans = Vec::new();
        if let (Some(t), Some(a)) = (id.firmware_table, id.firmware_address) {
            let w = match id.firmware_format {
                FirmwareFormat::MajorMinorPatch => 3,
                _ => 1,
            };
            spans.push((t, a, w));
        }
        if let (Some(t), Some(a), Some(n)) =
            (id.serial_table, id.serial_address, id.serial_registers)
        {
            spans.push((t, a, n));
        }
        // Never across a gap: these reads are made before the firmware, and so the
        // profile and its PHI, is known. Every profile of a family names the same identity
        // registers and checks them against its own PHI.
        modbus::plan_reads(&spans, self.doc.transport.request_limit(), &[])
    }

    pub fn identify_registers(&self, image: &RegisterImage) -> Result<Identity, DecodeError> {
        let id = &self.doc.identify;
        let (Some(t), Some(a)) = (id.firmware_table, id.firmware_address) else {
            return Err(DecodeError::NoFirmware);
        };
        let missing = DecodeError::MissingRegister {
            table: t,
            address: a,
        };
        let firmware = match id.firmware_format {
            FirmwareFormat::MajorMinorPatch => {
                let w = image.get(t, a, 3).ok_or(missing)?;
                format!("{}.{}.{}", w[0], w[1], w[2])
            }
            FirmwareFormat::MajorX100Minor => {
                let w = image.get(t, a, 1).ok_or(missing)?;
                format!("{}.{}", w[0] / 100, w[0] % 100)
            }
            FirmwareFormat::Dotted => return Err(DecodeError::NoFirmware),
        };
        let serial = match (id.serial_table, id.serial_address, id.serial_registers) {
            (Some(t), Some(a), Some(n)) => image.get(t, a, n).and_then(|w| {
                modbus::decode(modbus::RegType::Ascii, WordOrder::HighFirst, &w)
                    .and_then(|v| v.as_text().map(str::to_string))
            }),
            _ => None,
        };
        Ok(Identity { firmware, serial })
    }

    pub fn decode_registers(&self, image: &RegisterImage) -> Snapshot {
        let mut snap = Snapshot::default();
        for p in &self.doc.points {
            let (Some(rt), Some(t), Some(a)) = (p.ty.reg_type(), p.table, p.address) else {
                continue;
            };
            let Some(words) = image.get(t, a, rt.width(p.registers.unwrap_or(1))) else {
                continue;
            };
            let Some(mut v) = modbus::decode(rt, p.word_order.unwrap_or_default(), &words) else {
                continue;
            };
            if let (Value::Num(n), Some(s)) = (&mut v, p.scale) {
                *n *= s;
                // 0.1 °C steps: keep 425 × 0.1 printing as 42.5, not 42.500000000000004.
                *n = (*n * 1e6).round() / 1e6;
            }
            snap.values.insert(p.name.clone(), map_value(p, v));
        }
        snap
    }

    // ---------- JSON ----------

    fn parse_json(&self, payload: &[u8]) -> Result<serde_json::Value, DecodeError> {
        if let Some(max) = self.doc.transport.max_payload {
            if payload.len() as u64 > max.0 {
                return Err(DecodeError::TooLarge(payload.len(), max.0));
            }
        }
        let doc: serde_json::Value =
            serde_json::from_slice(payload).map_err(|e| DecodeError::Json(e.to_string()))?;
        if !doc.is_object() {
            return Err(DecodeError::NotObject);
        }
        Ok(doc)
    }

    /// True when the document carries this profile's schema tag.
    pub fn json_schema_matches(&self, doc: &serde_json::Value) -> bool {
        match (
            &self.doc.transport.schema_pointer,
            &self.doc.transport.schema,
        ) {
            (Some(p), Some(want)) => doc.pointer(p).and_then(|v| v.as_str()) == Some(want),
            _ => true,
        }
    }

    pub fn identify_json(&self, payload: &[u8]) -> Result<Identity, DecodeError> {
        let doc = self.parse_json(payload)?;
        let id = &self.doc.identify;
        let firmware = id
            .firmware_pointer
            .as_ref()
            .and_then(|p| doc.pointer(p))
            .and_then(|v| v.as_str())
            .filter(|v| firmware_major(v).is_some())
            .ok_or(DecodeError::NoFirmware)?
            .to_string();
        let serial = id
            .serial_pointers
            .iter()
            .find_map(|p| doc.pointer(p).and_then(|v| v.as_str()))
            .map(str::to_string);
        Ok(Identity { firmware, serial })
    }

    /// Decodes a status document. Only listed pointers are read; the rest of the document
    /// (patient, vitals) is dropped with it.
    pub fn decode_json(&self, payload: &[u8]) -> Result<Snapshot, DecodeError> {
        let doc = self.parse_json(payload)?;
        if !self.json_schema_matches(&doc) {
            let found = self
                .doc
                .transport
                .schema_pointer
                .as_ref()
                .and_then(|p| doc.pointer(p))
                .and_then(|v| v.as_str())
                .map(|s| s.chars().take(40).collect());
            return Err(DecodeError::Schema {
                found,
                want: self.doc.transport.schema.clone().unwrap_or_default(),
            });
        }
        let mut snap = Snapshot::default();
        for p in &self.doc.points {
            let Some(ptr) = &p.pointer else { continue };
            let Some(raw) = doc.pointer(ptr) else {
                continue;
            };
            match json_value(p, raw) {
                Ok(v) => {
                    snap.values.insert(p.name.clone(), map_value(p, v));
                }
                Err(e) => snap.issues.push(format!("{}: {e}", p.name)),
            }
        }
        Ok(snap)
    }

    // ---------- evaluation ----------

    /// Evaluates a snapshot taken at `now`. An empty snapshot means no data: state
    /// `unknown`, and time-based rules keep their memory.
    pub fn evaluate(&self, snap: &Snapshot, now: Timestamp, st: &mut RuleState) -> Evaluation {
        let readings = self
            .doc
            .points
            .iter()
            .filter(|p| p.reading)
            .filter_map(|p| {
                snap.values.get(&p.name).map(|v| Reading {
                    name: p.name.clone(),
                    value: v.clone(),
                    unit: p.unit.clone(),
                })
            })
            .collect();
        if snap.is_empty() {
            return Evaluation {
                readings,
                signals: Vec::new(),
                state: DeviceState::Unknown,
            };
        }
        let mut signals = Vec::new();
        for (i, r) in self.doc.rules.iter().enumerate() {
            self.eval_rule(i, r, snap, now, st, &mut signals);
        }
        signals.sort_by(|a, b| a.code.cmp(&b.code));
        signals.dedup_by(|a, b| a.code == b.code);
        let av = &self.doc.availability;
        let state = if av.down_when.iter().any(|c| cond_holds(c, snap, &signals)) {
            DeviceState::Down
        } else if av
            .maintenance_when
            .iter()
            .any(|c| cond_holds(c, snap, &signals))
        {
            DeviceState::Maintenance
        } else {
            DeviceState::Up
        };
        Evaluation {
            readings,
            signals,
            state,
        }
    }

    /// The `monitoring_lost` signal for an always-on device silent since `since`, if the
    /// silence has lasted longer than the profile allows.
    pub fn silence_signal(&self, since: Timestamp, now: Timestamp) -> Option<Signal> {
        let d = &self.doc.device;
        let limit = d.silence_fault_after?;
        if !d.always_on {
            return None;
        }
        let silent_s = now.duration_since(since).as_secs_f64();
        (silent_s > limit.as_secs_f64()).then(|| Signal {
            code: "MONITORING_LOST".into(),
            kind: SignalKind::MonitoringLost,
            class: Some(FaultClass::Complex),
            description: format!(
                "{} {} has not answered for more than {limit}: the device is unmonitored",
                d.vendor, d.model
            ),
            action: Some("Check the monitor's power and network connection on site.".into()),
            evidence: BTreeMap::from([(
                "silent_since".into(),
                serde_json::Value::String(since.to_string()),
            )]),
            due: None,
        })
    }

    fn evidence(&self, snap: &Snapshot, extra: &[&str]) -> BTreeMap<String, serde_json::Value> {
        self.doc
            .device
            .evidence
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .filter_map(|n| snap.values.get(n).map(|v| (n.to_string(), v.to_json())))
            .collect()
    }

    /// Adds the signals one rule raises on this snapshot to `out`.
    fn eval_rule(
        &self,
        idx: usize,
        r: &RuleDef,
        snap: &Snapshot,
        now: Timestamp,
        st: &mut RuleState,
        out: &mut Vec<Signal>,
    ) {
        let Some(v) = snap.values.get(&r.point) else {
            return;
        };
        let rule = RuleSignals {
            profile: self,
            rule: r,
            snap,
        };
        match r.kind {
            RuleKind::Bits => rule.bits(v, out),
            RuleKind::Codes => rule.codes(v, out),
            RuleKind::Threshold => out.extend(rule.threshold(v, now, idx, st)),
            RuleKind::Rate => out.extend(rule.rate(v, now, idx, st)),
            RuleKind::Equals => out.extend(rule.equals(v)),
            RuleKind::DateDue => out.extend(rule.date_due(v, now)),
        }
    }
}

/// One rule evaluated against one snapshot: builds the signals it raises, one method per
/// rule kind.
struct RuleSignals<'a> {
    profile: &'a Profile,
    rule: &'a RuleDef,
    snap: &'a Snapshot,
}

impl RuleSignals<'_> {
    fn signal(
        &self,
        code: String,
        class: Option<FaultClass>,
        description: String,
        action: Option<String>,
    ) -> Signal {
        Signal {
            code,
            kind: self.rule.signal,
            class,
            description,
            action,
            evidence: self.profile.evidence(self.snap, &[&self.rule.point]),
            due: None,
        }
    }

    /// The signal of a rule that names its own code (threshold, rate, equals, date).
    fn own(&self) -> Signal {
        let r = self.rule;
        self.signal(
            r.code.clone().unwrap_or_default(),
            r.class,
            r.description.clone().unwrap_or_default(),
            r.action.clone(),
        )
    }

    /// A bit field: each set bit a signal, except bits that are not faults; grouped bits
    /// are one signal per group, at the class of the highest set bit.
    fn bits(&self, v: &Value, out: &mut Vec<Signal>) {
        let r = self.rule;
        let Some(word) = v.as_f64() else { return };
        let word = word as u64;
        let prefix = r.code_prefix.as_deref().unwrap_or(&r.point);
        // Grouped bits: the set bit of the highest class stands for its group.
        let mut groups: Vec<(&str, &BitDef)> = Vec::new();
        for bit in 0..64u8 {
            if word & (1u64 << bit) == 0 {
                continue;
            }
            let code = format!("{prefix}.{bit}");
            match r.bits.iter().find(|b| b.bit == bit) {
                Some(b) if b.not_a_fault => {}
                Some(b) if b.group.is_some() => {
                    let g = b.group.as_deref().unwrap_or_default();
                    match groups.iter_mut().find(|(name, _)| *name == g) {
                        Some(slot) if b.class > slot.1.class => slot.1 = b,
                        Some(_) => {}
                        None => groups.push((g, b)),
                    }
                }
                Some(b) => {
                    out.push(self.signal(code, b.class, b.description.clone(), b.action.clone()))
                }
                None => out.push(self.signal(
                    code,
                    r.unlisted_class,
                    format!(
                        "{} bit {bit}",
                        r.unlisted_description
                            .as_deref()
                            .unwrap_or("unlisted technical alarm")
                    ),
                    r.action.clone(),
                )),
            }
        }
        for (g, b) in groups {
            let mut sig = self.signal(
                format!("{prefix}.{g}"),
                b.class,
                b.description.clone(),
                b.action.clone(),
            );
            sig.evidence.insert("bit".into(), serde_json::json!(b.bit));
            out.push(sig);
        }
    }

    /// An error-code point: each code a signal, classed by the table, else a range, else
    /// the longest matching prefix, else `otherwise_class`.
    fn codes(&self, v: &Value, out: &mut Vec<Signal>) {
        let r = self.rule;
        let codes: Vec<String> = match v {
            Value::Num(n) if *n == 0.0 || !n.is_finite() => Vec::new(),
            Value::Num(n) => vec![format!("{}", *n as i64)],
            Value::Text(t) if t.is_empty() || t == "0" => Vec::new(),
            Value::Text(t) => vec![t.clone()],
            Value::Codes(c) => c.clone(),
        };
        for c in codes {
            let code = match &r.code_prefix {
                Some(p) => format!("{p}.{c}"),
                None => c.clone(),
            };
            if let Some(def) = r.codes.iter().find(|d| d.code == c) {
                out.push(self.signal(
                    code,
                    Some(def.class),
                    def.description.clone(),
                    def.action.clone(),
                ));
                continue;
            }
            let num = c.parse::<i64>().ok();
            let class = num
                .and_then(|n| r.ranges.iter().find(|rg| rg.from <= n && n <= rg.to))
                .map(|rg| rg.class)
                .or_else(|| {
                    r.prefixes
                        .iter()
                        .filter(|p| c.starts_with(&p.prefix))
                        .max_by_key(|p| p.prefix.len())
                        .map(|p| p.class)
                })
                .or(r.otherwise_class);
            let what = r
                .unlisted_description
                .as_deref()
                .unwrap_or("unlisted error code");
            out.push(self.signal(code, class, format!("{what} {c}"), r.action.clone()));
        }
    }

    /// A value past a limit, for longer than `for` when given; it clears once the value
    /// is back past the hysteresis band.
    fn threshold(
        &self,
        v: &Value,
        now: Timestamp,
        idx: usize,
        st: &mut RuleState,
    ) -> Option<Signal> {
        let r = self.rule;
        let x = v.as_f64()?;
        let limit_point = r
            .at_least_point
            .as_ref()
            .and_then(|p| self.snap.values.get(p))
            .and_then(Value::as_f64);
        let (crossed, back) = threshold_test(r, x, limit_point);
        let ts = st.thresholds.entry(idx).or_default();
        if crossed {
            let since = *ts.since.get_or_insert(now);
            let held = now.duration_since(since).as_secs_f64();
            match r.for_ {
                Some(d) if held <= d.as_secs_f64() => {}
                _ => ts.active = true,
            }
        } else {
            ts.since = None;
            if back {
                ts.active = false;
            }
        }
        if !ts.active {
            return None;
        }
        let mut extra: Vec<&str> = Vec::new();
        if let Some(p) = &r.at_least_point {
            extra.push(p);
        }
        let mut s = self.own();
        s.evidence.extend(self.profile.evidence(self.snap, &extra));
        Some(s)
    }

    /// A value that fell by more than `falls_by` from its peak within `window`.
    fn rate(&self, v: &Value, now: Timestamp, idx: usize, st: &mut RuleState) -> Option<Signal> {
        let r = self.rule;
        let (Some(x), Some(fall), Some(win)) = (v.as_f64(), r.falls_by, r.window) else {
            return None;
        };
        let w = st.rates.entry(idx).or_default();
        let win_ms = (win.0.as_millis() as i64).max(RATE_BUCKETS);
        let bucket_ms = win_ms / RATE_BUCKETS;
        let t = now.as_millisecond();
        let b = t.div_euclid(bucket_ms);
        while w
            .buckets
            .front()
            .is_some_and(|(ob, _)| (b - ob) * bucket_ms > win_ms)
        {
            w.buckets.pop_front();
        }
        match w.buckets.back_mut() {
            Some((lb, m)) if *lb == b => *m = m.max(x),
            _ => w.buckets.push_back((b, x)),
        }
        let peak = w.buckets.iter().map(|(_, m)| *m).fold(f64::MIN, f64::max);
        if peak - x <= fall {
            return None;
        }
        let mut s = self.own();
        s.evidence
            .insert("window_peak".into(), serde_json::json!(peak));
        s.evidence
            .insert("window".into(), serde_json::json!(win.to_string()));
        Some(s)
    }

    fn equals(&self, v: &Value) -> Option<Signal> {
        let hit = self
            .rule
            .equals
            .as_ref()
            .is_some_and(|e| value_equals(v, e));
        hit.then(|| self.own())
    }

    /// A date point plus `every` is the due date; the signal rises `lead` before it.
    fn date_due(&self, v: &Value, now: Timestamp) -> Option<Signal> {
        let r = self.rule;
        let (Some(text), Some(every)) = (v.as_text(), r.every) else {
            return None;
        };
        let last = text.parse::<jiff::civil::Date>().ok()?;
        let days = (every.as_secs_f64() / 86400.0).round() as i64;
        let lead_days = r
            .lead
            .map(|l| (l.as_secs_f64() / 86400.0).round() as i64)
            .unwrap_or(0);
        let due = last.checked_add(jiff::Span::new().days(days)).ok()?;
        let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
        let warn_from = due.checked_sub(jiff::Span::new().days(lead_days)).ok()?;
        if today < warn_from {
            return None;
        }
        let mut s = self.own();
        s.due = Some(due.to_string());
        Some(s)
    }
}

/// (crossed now, back past the hysteresis band).
fn threshold_test(r: &RuleDef, x: f64, limit_point: Option<f64>) -> (bool, bool) {
    let h = r.hysteresis.unwrap_or(0.0);
    if let Some(a) = r.above {
        return (x > a, x <= a - h);
    }
    if let Some(b) = r.below {
        return (x < b, x >= b + h);
    }
    if let Some(l) = r.at_least.or(limit_point) {
        return (x >= l, x < l - h);
    }
    (false, true)
}

fn value_equals(v: &Value, e: &toml::Value) -> bool {
    match (v, e) {
        (Value::Num(n), toml::Value::Integer(i)) => *n == *i as f64,
        (Value::Num(n), toml::Value::Float(f)) => n == f,
        (Value::Text(t), toml::Value::String(s)) => t == s,
        _ => false,
    }
}

fn cond_holds(c: &ConditionDef, snap: &Snapshot, signals: &[Signal]) -> bool {
    if let (Some(p), Some(e)) = (&c.point, &c.equals) {
        return snap.values.get(p).is_some_and(|v| value_equals(v, e));
    }
    if let Some(code) = &c.signal {
        return signals.iter().any(|s| &s.code == code);
    }
    if let Some(class) = c.class {
        return signals
            .iter()
            .any(|s| s.kind == SignalKind::Fault && s.class == Some(class));
    }
    false
}

fn map_value(p: &PointDef, v: Value) -> Value {
    match v {
        Value::Text(t) => Value::Text(p.map.get(&t).cloned().unwrap_or(t)),
        other => other,
    }
}

/// Why a listed point's raw value was not understood; it becomes a snapshot issue.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
enum PointValueError {
    #[error("{0:?} is not a number")]
    NotNumber(String),
    #[error("{0:?} is not a hexadecimal mask")]
    NotHex(String),
    #[error("{0:?} is not a YYYY-MM-DD date")]
    NotDate(String),
    #[error("expected {expected}, got {got}")]
    JsonType {
        expected: &'static str,
        got: &'static str,
    },
    #[error("point type {0:?} cannot be read from JSON")]
    NotJson(PointType),
}

fn parse_text(p: &PointDef, raw: &str) -> Result<Value, PointValueError> {
    let raw = raw.trim();
    let shown: String = raw.chars().take(24).collect();
    match p.ty {
        PointType::Number => raw
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .map(Value::Num)
            .ok_or(PointValueError::NotNumber(shown)),
        PointType::Hex => {
            if raw.is_empty() || raw.len() > 16 {
                return Err(PointValueError::NotHex(shown));
            }
            u64::from_str_radix(raw, 16)
                .map(|n| Value::Num(n as f64))
                .map_err(|_| PointValueError::NotHex(shown))
        }
        PointType::Date => raw
            .parse::<jiff::civil::Date>()
            .map(|d| Value::Text(d.to_string()))
            .map_err(|_| PointValueError::NotDate(shown)),
        _ => Ok(map_value(p, Value::Text(raw.to_string()))),
    }
}

fn json_value(p: &PointDef, raw: &serde_json::Value) -> Result<Value, PointValueError> {
    use serde_json::Value as J;
    let expected = |expected: &'static str| PointValueError::JsonType {
        expected,
        got: match raw {
            J::Null => "null",
            J::Bool(_) => "a boolean",
            J::Number(_) => "a number",
            J::String(_) => "a string",
            J::Array(_) => "an array",
            J::Object(_) => "an object",
        },
    };
    match p.ty {
        PointType::Number => raw
            .as_f64()
            .map(Value::Num)
            .ok_or_else(|| expected("a number")),
        PointType::Bool => raw
            .as_bool()
            .map(|b| Value::Num(b as u8 as f64))
            .ok_or_else(|| expected("a boolean")),
        PointType::Text | PointType::Date => raw
            .as_str()
            .map(|s| Value::Text(s.chars().take(120).collect()))
            .ok_or_else(|| expected("a string")),
        PointType::Codes => {
            let arr = raw.as_array().ok_or_else(|| expected("an array"))?;
            let mut codes = Vec::new();
            for el in arr.iter().take(256) {
                if let (Some(wp), Some(we)) = (&p.where_pointer, &p.where_equals) {
                    if el.pointer(wp).and_then(|v| v.as_str()) != Some(we.as_str()) {
                        continue;
                    }
                }
                let code = match &p.item {
                    Some(ip) => el.pointer(ip),
                    None => Some(el),
                };
                if let Some(c) = code.and_then(|c| c.as_str()) {
                    codes.push(c.chars().take(32).collect());
                }
            }
            codes.sort();
            codes.dedup();
            Ok(Value::Codes(codes))
        }
        other => Err(PointValueError::NotJson(other)),
    }
}

/// Why a sequence of serial reply frames could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FramesError {
    #[error("negative reply ERR={0}")]
    Negative(String),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error(transparent)]
    Rejected(#[from] RejectReason),
}

/// Reads a sequence of serial reply frames (as on the wire) into reply fields by kind.
/// Used by golden vectors and `probe`.
pub fn replies_from_frames(
    frames: &[Vec<u8>],
) -> Result<BTreeMap<String, BTreeMap<String, String>>, FramesError> {
    let mut reader = serial_frame::FrameReader::new();
    let mut out = BTreeMap::new();
    for f in frames {
        for ev in reader.push(f) {
            match ev {
                FrameEvent::Frame(fr) => match serial_frame::parse_reply(&fr.body)? {
                    Reply::Answer { kind, fields } => {
                        out.insert(kind, fields);
                    }
                    Reply::Negative(code) => return Err(FramesError::Negative(code)),
                },
                FrameEvent::Rejected(r) => return Err(r.into()),
                FrameEvent::Noise(_) => {}
            }
        }
    }
    Ok(out)
}

/// Shared, immutable handle to a profile.
pub type ProfileRef = Arc<Profile>;

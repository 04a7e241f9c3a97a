//! Scripted scenarios: faults raised and cleared on a schedule, flapping, silence, boot,
//! helium boil-off, high temperatures and maintenance due, applied to the devices' shared
//! state while their front-ends keep serving.
//!
//! A scenario is a small TOML file:
//!
//! ```toml
//! name = "my test"
//! repeat = "6m"              # optional: start over every 6 minutes
//!
//! [[step]]
//! at = "30s"                 # from the start (of each cycle)
//! device = "lip300-a"        # a device name, or a prefix ending in `*` ("av500-*", "*")
//! action = "fault"           # see below
//! code = 310                 # the fault: bit/word, code, slot+code, sensor
//! for = "60s"                # optional: cleared again after this long
//! ```
//!
//! Actions: `fault` / `clear` (with `bit` and optional `word` (AV-500: 1 or 2), or an error
//! `code` (integer), or a VM-12 alarm `code = "T-301"` with optional `prio` and `text`, or
//! a VM-12 module `slot` with `code = "M-214"`, or an HM-2 `sensor` = `level`, `pressure`,
//! `cold_head`; `clear` without any of these clears every fault), `flap` (a fault toggled
//! `every` N for `for`), `silent` / `resume` (no answers; MQTT disconnect), `boot` (busy
//! for `for`, default 20 s), `boil_off` (HM-2 level falling `rate` points per minute),
//! `temperature` (`value` °C — HM-2: cold head K — until `for` ends), `maintenance_due` /
//! `maintenance_done`, and `set` (`field`, `value`: a device reading such as LIP-300
//! `mode`, AV-500 `state`, HM-2 `level`, VM-12 `state`).

use crate::av500::{Av500Config, Av500Handle, Av500State};
use crate::duration::parse_duration;
use crate::hm2::{Hm2Config, Hm2Handle, Hm2State};
use crate::lip300::{Lip300Config, Lip300Handle, Lip300State, Mode};
use crate::vm12::{self, MonitorState, Vm12Config, Vm12Handle, Vm12State};
use crate::Version;
use serde::Deserialize;
use std::fmt;
use std::time::{Duration, Instant};
use toml::{Spanned, Value};

/// A fault to raise or clear.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// A technical alarm bit (`word` 1 or 2 on the AV-500, else 1).
    Bit { word: u8, bit: u8 },
    /// An error code (LIP-300 ERR, AV-500 register 3).
    Code(u32),
    /// A VM-12 technical alarm.
    Alarm {
        code: String,
        prio: String,
        text: String,
    },
    /// A VM-12 module fault.
    Module { slot: u8, code: String },
    /// An HM-2 sensor failure (`level`, `pressure`, `cold_head`): NaN and alarm bit 6.
    Sensor(String),
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Bit { word, bit } => write!(f, "word={word} bit={bit}"),
            Fault::Code(c) => write!(f, "code={c}"),
            Fault::Alarm { code, .. } => write!(f, "code={code}"),
            Fault::Module { slot, code } => write!(f, "slot={slot} code={code}"),
            Fault::Sensor(s) => write!(f, "sensor={s}"),
        }
    }
}

/// One thing done to a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Fault(Fault),
    /// Clear one fault, or every fault.
    Clear(Option<Fault>),
    Silent,
    Resume,
    Boot(Duration),
    BootDone,
    /// HM-2 helium level falling this many points per minute (0 stops it).
    BoilOff(f64),
    Temperature(f64),
    TemperatureNormal,
    MaintenanceDue,
    MaintenanceDone,
    Set(String, Value),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Fault(x) => write!(f, "action=fault {x}"),
            Action::Clear(Some(x)) => write!(f, "action=clear {x}"),
            Action::Clear(None) => write!(f, "action=clear all"),
            Action::Silent => write!(f, "action=silent"),
            Action::Resume => write!(f, "action=resume"),
            Action::Boot(d) => write!(f, "action=boot for={}s", d.as_secs_f64()),
            Action::BootDone => write!(f, "action=boot-done"),
            Action::BoilOff(r) => write!(f, "action=boil_off rate={r}"),
            Action::Temperature(v) => write!(f, "action=temperature value={v}"),
            Action::TemperatureNormal => write!(f, "action=temperature value=normal"),
            Action::MaintenanceDue => write!(f, "action=maintenance_due"),
            Action::MaintenanceDone => write!(f, "action=maintenance_done"),
            Action::Set(k, v) => write!(f, "action=set field={k} value={v}"),
        }
    }
}

/// A step of a scenario after expansion (`for`, `flap`).
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub at: Duration,
    /// A device name or a prefix ending in `*`.
    pub device: String,
    pub action: Action,
    /// Line of the step in its file (1-based), for messages.
    pub line: usize,
}

/// A parsed scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub repeat: Option<Duration>,
    /// Sorted by `at`.
    pub steps: Vec<Step>,
    /// Where it came from (a path or `built-in demo`).
    pub source: String,
}

/// A scenario problem, naming file, line and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {}{message}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    repeat: Option<Spanned<Value>>,
    #[serde(default)]
    step: Vec<RawStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: Spanned<Value>,
    device: Spanned<String>,
    action: Spanned<String>,
    bit: Option<Spanned<i64>>,
    word: Option<Spanned<i64>>,
    code: Option<Spanned<Value>>,
    slot: Option<Spanned<i64>>,
    prio: Option<Spanned<String>>,
    text: Option<Spanned<String>>,
    sensor: Option<Spanned<String>>,
    every: Option<Spanned<Value>>,
    #[serde(rename = "for")]
    for_: Option<Spanned<Value>>,
    rate: Option<Spanned<Value>>,
    value: Option<Spanned<Value>>,
    field: Option<Spanned<String>>,
}

/// The built-in demo: faults on a schedule for all four devices, repeating every 6 min.
pub const DEMO: &str = r#"
name = "demo"
repeat = "6m"

# LIP-300: motor drive failure (major) for a minute
[[step]]
at = "20s"
device = "lip300-*"
action = "fault"
code = 310
for = "60s"

# HM-2: helium boil-off, 1 point per minute for 4 minutes (the early-warning rule)
[[step]]
at = "30s"
device = "hm2-*"
action = "boil_off"
rate = 1.0
for = "4m"

# AV-500: turbine running hot (above 65 °C for more than 60 s)
[[step]]
at = "45s"
device = "av500-*"
action = "temperature"
value = 68.5
for = "90s"

# VM-12: NIBP pump failure (major)
[[step]]
at = "1m"
device = "vm12-*"
action = "fault"
code = "T-301"
prio = "high"
text = "NIBP pump failure"
for = "75s"

# LIP-300: battery not charging, flapping
[[step]]
at = "2m"
device = "lip300-*"
action = "flap"
bit = 3
every = "15s"
for = "90s"

# VM-12: SpO2 module hardware fault
[[step]]
at = "2m30s"
device = "vm12-*"
action = "fault"
slot = 2
code = "M-214"
for = "60s"

# AV-500: turbine failure (major)
[[step]]
at = "3m"
device = "av500-*"
action = "fault"
word = 1
bit = 1
for = "45s"

# VM-12: goes off the network for a while
[[step]]
at = "3m30s"
device = "vm12-*"
action = "silent"
for = "30s"

# AV-500: reboots (exception 0x06 while booting)
[[step]]
at = "4m"
device = "av500-*"
action = "boot"
for = "20s"

# HM-2: stops answering for 40 s
[[step]]
at = "4m10s"
device = "hm2-*"
action = "silent"
for = "40s"

# maintenance falls due, and is done before the cycle repeats
[[step]]
at = "4m30s"
device = "lip300-*"
action = "maintenance_due"
for = "75s"

[[step]]
at = "4m40s"
device = "av500-*"
action = "maintenance_due"
for = "70s"

# the helium is topped up before the next cycle
[[step]]
at = "5m50s"
device = "hm2-*"
action = "set"
field = "level"
value = 71.5
"#;

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

struct Ctx<'a> {
    src: &'a str,
    file: &'a str,
}

impl Ctx<'_> {
    fn err<T>(
        &self,
        span: std::ops::Range<usize>,
        key: &str,
        message: impl Into<String>,
    ) -> Result<T, ScenarioError> {
        Err(ScenarioError {
            file: self.file.to_string(),
            line: line_of(self.src, span.start),
            key: Some(key.to_string()),
            message: message.into(),
        })
    }

    fn duration(&self, v: &Spanned<Value>, key: &str) -> Result<Duration, ScenarioError> {
        let parsed = match v.get_ref() {
            Value::String(s) => parse_duration(s),
            Value::Integer(i) if *i >= 0 => Ok(Duration::from_secs(*i as u64)),
            Value::Float(f) if *f >= 0.0 && f.is_finite() => Ok(Duration::from_secs_f64(*f)),
            other => Err(format!("expected a duration like \"30s\", got {other}")),
        };
        parsed.or_else(|m| self.err(v.span(), key, m))
    }

    fn number(&self, v: &Spanned<Value>, key: &str) -> Result<f64, ScenarioError> {
        match v.get_ref() {
            Value::Integer(i) => Ok(*i as f64),
            Value::Float(f) if f.is_finite() => Ok(*f),
            other => self.err(v.span(), key, format!("expected a number, got {other}")),
        }
    }

    fn small(&self, v: &Spanned<i64>, key: &str, max: i64) -> Result<u8, ScenarioError> {
        let n = *v.get_ref();
        if (0..=max).contains(&n) {
            Ok(n as u8)
        } else {
            self.err(v.span(), key, format!("{n} is out of range 0..={max}"))
        }
    }
}

fn default_prio(code: &str) -> &'static str {
    match code.as_bytes().get(2) {
        Some(b'1') => "low",
        Some(b'2') => "medium",
        _ => "high",
    }
}

fn fault_of(ctx: &Ctx<'_>, s: &RawStep, required: bool) -> Result<Option<Fault>, ScenarioError> {
    let action_span = s.action.span();
    if let Some(sensor) = &s.sensor {
        let name = sensor.get_ref().as_str();
        if !["level", "pressure", "cold_head"].contains(&name) {
            return ctx.err(
                sensor.span(),
                "sensor",
                format!("unknown sensor {name:?} (level, pressure, cold_head)"),
            );
        }
        return Ok(Some(Fault::Sensor(name.to_string())));
    }
    if let Some(slot) = &s.slot {
        let slot_n = ctx.small(slot, "slot", 255)?;
        return match s.code.as_ref().map(|c| (c, c.get_ref())) {
            Some((_, Value::String(code))) => Ok(Some(Fault::Module {
                slot: slot_n,
                code: code.clone(),
            })),
            Some((c, _)) => ctx.err(
                c.span(),
                "code",
                "a module fault needs a code like \"M-214\"",
            ),
            None if !required => Ok(Some(Fault::Module {
                slot: slot_n,
                code: String::new(),
            })),
            None => ctx.err(
                slot.span(),
                "code",
                "a module fault needs a code like \"M-214\"",
            ),
        };
    }
    if let Some(code) = &s.code {
        return match code.get_ref() {
            Value::Integer(i) if (0..=65535).contains(i) => Ok(Some(Fault::Code(*i as u32))),
            Value::String(c) => {
                if !(c.starts_with("T-") || c.starts_with("M-")) || c.len() < 3 {
                    return ctx.err(
                        code.span(),
                        "code",
                        format!("alarm code {c:?} should look like \"T-301\""),
                    );
                }
                let prio = s
                    .prio
                    .as_ref()
                    .map(|p| p.get_ref().clone())
                    .unwrap_or_else(|| default_prio(c).to_string());
                if !["low", "medium", "high"].contains(&prio.as_str()) {
                    let span = s.prio.as_ref().map(|p| p.span()).unwrap_or(code.span());
                    return ctx.err(
                        span,
                        "prio",
                        format!("prio {prio:?} is not low, medium or high"),
                    );
                }
                let text = s
                    .text
                    .as_ref()
                    .map(|t| t.get_ref().clone())
                    .unwrap_or_else(|| vm12::code_text(c).to_string());
                Ok(Some(Fault::Alarm {
                    code: c.clone(),
                    prio,
                    text,
                }))
            }
            other => ctx.err(
                code.span(),
                "code",
                format!("expected an error number or an alarm code, got {other}"),
            ),
        };
    }
    if let Some(bit) = &s.bit {
        let bit_n = ctx.small(bit, "bit", 31)?;
        let word = match &s.word {
            Some(w) => {
                let n = ctx.small(w, "word", 2)?;
                if n == 0 {
                    return ctx.err(w.span(), "word", "word is 1 or 2");
                }
                n
            }
            None => 1,
        };
        return Ok(Some(Fault::Bit { word, bit: bit_n }));
    }
    if required {
        ctx.err(
            action_span,
            "action",
            "a fault needs `bit` (and `word`), `code`, `slot` with `code`, or `sensor`",
        )
    } else {
        Ok(None)
    }
}

impl Scenario {
    /// The built-in demo scenario.
    pub fn demo() -> Scenario {
        match Scenario::parse(DEMO, "built-in demo") {
            Ok(s) => s,
            Err(e) => unreachable!("the built-in demo scenario is valid: {e}"),
        }
    }

    /// Reads and parses a scenario file.
    pub fn load(path: &std::path::Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            line: 0,
            key: None,
            message: format!("cannot read: {e}"),
        })?;
        Scenario::parse(&src, &file)
    }

    /// Parses scenario text; `file` names it in messages.
    pub fn parse(src: &str, file: &str) -> Result<Scenario, ScenarioError> {
        let ctx = Ctx { src, file };
        let raw: RawScenario = toml::from_str(src).map_err(|e| {
            let line = e.span().map(|s| line_of(src, s.start)).unwrap_or(0);
            ScenarioError {
                file: file.to_string(),
                line,
                key: None,
                message: e.message().trim().to_string(),
            }
        })?;
        let repeat = match &raw.repeat {
            Some(r) => {
                let d = ctx.duration(r, "repeat")?;
                if d.is_zero() {
                    return ctx.err(r.span(), "repeat", "repeat must be longer than 0");
                }
                Some(d)
            }
            None => None,
        };
        let mut steps = Vec::new();
        for s in &raw.step {
            let line = line_of(src, s.action.span().start);
            let at = ctx.duration(&s.at, "at")?;
            let device = s.device.get_ref().trim().to_string();
            if device.is_empty() || device[..device.len() - 1].contains('*') {
                return ctx.err(
                    s.device.span(),
                    "device",
                    "a device name, or a prefix ending in `*`",
                );
            }
            let for_ = match &s.for_ {
                Some(f) => Some((ctx.duration(f, "for")?, f.span())),
                None => None,
            };
            let push = |steps: &mut Vec<Step>, t: Duration, action: Action| {
                steps.push(Step {
                    at: t,
                    device: device.clone(),
                    action,
                    line,
                })
            };
            let no_for = |what: &str| -> Result<(), ScenarioError> {
                match &for_ {
                    Some((_, span)) => ctx.err(
                        span.clone(),
                        "for",
                        format!("`for` does not apply to {what}"),
                    ),
                    None => Ok(()),
                }
            };
            let name = s.action.get_ref().as_str();
            match name {
                "fault" => {
                    let f = fault_of(&ctx, s, true)?.unwrap_or(Fault::Code(0));
                    push(&mut steps, at, Action::Fault(f.clone()));
                    if let Some((d, _)) = for_ {
                        push(&mut steps, at + d, Action::Clear(Some(f)));
                    }
                }
                "clear" => {
                    no_for("clear")?;
                    push(&mut steps, at, Action::Clear(fault_of(&ctx, s, false)?));
                }
                "flap" => {
                    let f = fault_of(&ctx, s, true)?.unwrap_or(Fault::Code(0));
                    let Some(every) = &s.every else {
                        return ctx.err(s.action.span(), "every", "flap needs `every` (how often the fault toggles)");
                    };
                    let every_d = ctx.duration(every, "every")?;
                    if every_d < Duration::from_millis(100) {
                        return ctx.err(every.span(), "every", "flap `every` must be at least 100ms");
                    }
                    let total = for_.as_ref().map(|(d, _)| *d).unwrap_or(Duration::from_secs(60));
                    let mut t = Duration::ZERO;
                    let mut on = true;
                    while t < total {
                        let a = if on { Action::Fault(f.clone()) } else { Action::Clear(Some(f.clone())) };
                        push(&mut steps, at + t, a);
                        on = !on;
                        t += every_d;
                    }
                    push(&mut steps, at + total, Action::Clear(Some(f)));
                }
                "silent" => {
                    push(&mut steps, at, Action::Silent);
                    if let Some((d, _)) = for_ {
                        push(&mut steps, at + d, Action::Resume);
                    }
                }
                "resume" => {
                    no_for("resume")?;
                    push(&mut steps, at, Action::Resume);
                }
                "boot" => {
                    let d = for_.map(|(d, _)| d).unwrap_or(Duration::from_secs(20));
                    push(&mut steps, at, Action::Boot(d));
                    push(&mut steps, at + d, Action::BootDone);
                }
                "boil_off" => {
                    let Some(rate) = &s.rate else {
                        return ctx.err(s.action.span(), "rate", "boil_off needs `rate` (level points per minute)");
                    };
                    let r = ctx.number(rate, "rate")?;
                    push(&mut steps, at, Action::BoilOff(r));
                    if let Some((d, _)) = for_ {
                        push(&mut steps, at + d, Action::BoilOff(0.0));
                    }
                }
                "temperature" => {
                    let Some(v) = &s.value else {
                        return ctx.err(s.action.span(), "value", "temperature needs `value`");
                    };
                    push(&mut steps, at, Action::Temperature(ctx.number(v, "value")?));
                    if let Some((d, _)) = for_ {
                        push(&mut steps, at + d, Action::TemperatureNormal);
                    }
                }
                "maintenance_due" => {
                    push(&mut steps, at, Action::MaintenanceDue);
                    if let Some((d, _)) = for_ {
                        push(&mut steps, at + d, Action::MaintenanceDone);
                    }
                }
                "maintenance_done" => {
                    no_for("maintenance_done")?;
                    push(&mut steps, at, Action::MaintenanceDone);
                }
                "set" => {
                    no_for("set")?;
                    let Some(field) = &s.field else {
                        return ctx.err(s.action.span(), "field", "set needs `field` and `value`");
                    };
                    let Some(value) = &s.value else {
                        return ctx.err(s.action.span(), "value", "set needs `field` and `value`");
                    };
                    push(&mut steps, at, Action::Set(field.get_ref().clone(), value.get_ref().clone()));
                }
                other => {
                    return ctx.err(
                        s.action.span(),
                        "action",
                        format!(
                            "unknown action {other:?} (fault, clear, flap, silent, resume, boot, boil_off, \
                             temperature, maintenance_due, maintenance_done, set)"
                        ),
                    )
                }
            }
            if let Some(rep) = repeat {
                if let Some(last) = steps.iter().rev().find(|st| st.line == line) {
                    if last.at >= rep {
                        return ctx.err(
                            s.at.span(),
                            "at",
                            format!(
                                "this step runs until {:?}, not before `repeat` ({:?}) ends",
                                last.at, rep
                            ),
                        );
                    }
                }
            }
        }
        steps.sort_by_key(|s| s.at);
        Ok(Scenario {
            name: raw.name.unwrap_or_else(|| file.to_string()),
            repeat,
            steps,
            source: file.to_string(),
        })
    }

    /// Checks that every step names at least one of `devices` and that its action applies
    /// to each device it names.
    pub fn check(&self, devices: &[(String, Kind)]) -> Result<(), ScenarioError> {
        for step in &self.steps {
            let matched: Vec<&(String, Kind)> = devices
                .iter()
                .filter(|(n, _)| matches(&step.device, n))
                .collect();
            let err = |key: &str, message: String| ScenarioError {
                file: self.source.clone(),
                line: step.line,
                key: Some(key.to_string()),
                message,
            };
            if matched.is_empty() {
                let names: Vec<&str> = devices.iter().map(|(n, _)| n.as_str()).collect();
                return Err(err(
                    "device",
                    format!(
                        "{:?} names no device (devices: {})",
                        step.device,
                        names.join(", ")
                    ),
                ));
            }
            for (name, kind) in matched {
                kind.validate(&step.action)
                    .map_err(|m| err("action", format!("device {name}: {m}")))?;
            }
        }
        Ok(())
    }
}

/// Whether a step's device pattern names `device`.
pub fn matches(pattern: &str, device: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => device.starts_with(prefix),
        None => pattern == device,
    }
}

// ---------------------------------------------------------------- applying actions

/// A device model and firmware, for checking actions before running them.
#[derive(Debug, Clone)]
pub enum Kind {
    Lip300(Version),
    Av500(Version),
    Hm2(Version),
    Vm12(Version),
}

impl Kind {
    /// Applies `action` to a default state of this kind, to see whether it fits.
    pub fn validate(&self, action: &Action) -> Result<(), String> {
        let now = Instant::now();
        let today = jiff::civil::date(2026, 1, 1);
        match self {
            Kind::Lip300(v) => apply_lip300(
                &Lip300Config::new(*v, "LP3X-0000-0000"),
                &mut Lip300State::example(*v),
                action,
                now,
                today,
            ),
            Kind::Av500(v) => apply_av500(
                &Av500Config::new(*v, "X"),
                &mut Av500State::default(),
                action,
                now,
            ),
            Kind::Hm2(v) => apply_hm2(&Hm2Config::new(*v), &mut Hm2State::default(), action),
            Kind::Vm12(v) => apply_vm12(
                &Vm12Config::new(*v, "X", "h", 1),
                &mut Vm12State::example(*v),
                action,
            ),
        }
    }
}

fn value_f64(v: &Value) -> Result<f64, String> {
    match v {
        Value::Integer(i) => Ok(*i as f64),
        Value::Float(f) if f.is_finite() => Ok(*f),
        other => Err(format!("expected a number, got {other}")),
    }
}

fn value_uint<T: TryFrom<i64>>(v: &Value) -> Result<T, String> {
    match v {
        Value::Integer(i) => T::try_from(*i).map_err(|_| format!("{i} is out of range")),
        other => Err(format!("expected an integer, got {other}")),
    }
}

fn value_bool(v: &Value) -> Result<bool, String> {
    match v {
        Value::Boolean(b) => Ok(*b),
        Value::Integer(0) => Ok(false),
        Value::Integer(1) => Ok(true),
        other => Err(format!("expected true or false, got {other}")),
    }
}

fn value_str(v: &Value) -> Result<&str, String> {
    v.as_str()
        .ok_or_else(|| format!("expected a string, got {v}"))
}

fn unsupported(model: &str, a: &Action) -> Result<(), String> {
    Err(format!(
        "{model} has no `{}` in its manual",
        a.to_string().trim_start_matches("action=")
    ))
}

/// Applies an action to a LIP-300 state.
pub fn apply_lip300(
    cfg: &Lip300Config,
    s: &mut Lip300State,
    a: &Action,
    now: Instant,
    today: jiff::civil::Date,
) -> Result<(), String> {
    let width = if cfg.firmware.major >= 3 { 32 } else { 16 };
    match a {
        Action::Fault(Fault::Bit { word: 1, bit }) if u32::from(*bit) < width => s.talm |= 1 << bit,
        Action::Clear(Some(Fault::Bit { word: 1, bit })) if u32::from(*bit) < width => s.talm &= !(1 << bit),
        Action::Fault(Fault::Code(c)) => s.err = u16::try_from(*c).map_err(|_| "ERR is at most 65535")?,
        Action::Clear(Some(Fault::Code(_))) => s.err = 0,
        Action::Fault(Fault::Bit { bit, .. }) | Action::Clear(Some(Fault::Bit { bit, .. })) => {
            return Err(format!("TALM on firmware {} has bits 0..{width}, not word/bit {bit}", cfg.firmware))
        }
        Action::Clear(None) => {
            s.talm = 0;
            s.err = 0;
            if matches!(s.mode, Mode::Alarm | Mode::Failsafe) {
                s.mode = Mode::Infusing;
            }
        }
        Action::Silent => s.silent = true,
        Action::Resume => s.silent = false,
        Action::Boot(d) => s.busy_until = Some(now + *d),
        Action::BootDone => s.busy_until = None,
        Action::Temperature(t) => s.temp = *t,
        Action::TemperatureNormal => s.temp = 36.5,
        Action::MaintenanceDue => {
            s.lastpm = today
                .checked_sub(jiff::Span::new().days(181))
                .map_err(|e| e.to_string())?
                .to_string()
        }
        Action::MaintenanceDone => s.lastpm = today.to_string(),
        Action::Set(field, v) => match field.as_str() {
            "mode" => s.mode = value_str(v)?.parse()?,
            "pid" => s.pid = value_str(v)?.to_string(),
            "rate" => s.rate = value_f64(v)?,
            "vtbi" => s.vtbi = value_uint(v)?,
            "batt" | "battery" => s.batt = value_uint(v)?,
            "ac" => s.ac = value_bool(v)?,
            "talm" => s.talm = value_uint(v)?,
            "calm" => s.calm = value_uint(v)?,
            "err" => s.err = value_uint(v)?,
            "temp" => s.temp = value_f64(v)?,
            "lastpm" => s.lastpm = value_str(v)?.parse::<jiff::civil::Date>().map_err(|e| e.to_string())?.to_string(),
            "runh" => s.runh = value_uint(v)?,
            "pumpcyc" => s.pumpcyc = value_uint(v)?,
            "noise" => s.noise = value_str(v)?.parse()?,
            other => {
                return Err(format!(
                    "unknown LIP-300 field {other:?} (mode, pid, rate, vtbi, batt, ac, talm, calm, err, temp, lastpm, runh, pumpcyc, noise)"
                ))
            }
        },
        other => return unsupported("the LIP-300", other),
    }
    Ok(())
}

/// Applies an action to an AV-500 state.
pub fn apply_av500(
    _cfg: &Av500Config,
    s: &mut Av500State,
    a: &Action,
    now: Instant,
) -> Result<(), String> {
    match a {
        Action::Fault(Fault::Bit { word, bit }) | Action::Clear(Some(Fault::Bit { word, bit })) if *bit < 16 => {
            let w = if *word == 2 { &mut s.alarm_word2 } else { &mut s.alarm_word1 };
            if matches!(a, Action::Fault(_)) {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
        Action::Fault(Fault::Bit { bit, .. }) | Action::Clear(Some(Fault::Bit { bit, .. })) => {
            return Err(format!("alarm words have bits 0..16, not {bit}"))
        }
        Action::Fault(Fault::Code(c)) => s.error_code = u16::try_from(*c).map_err(|_| "error code is at most 65535")?,
        Action::Clear(Some(Fault::Code(_))) => s.error_code = 0,
        Action::Clear(None) => {
            s.alarm_word1 = 0;
            s.alarm_word2 = 0;
            s.error_code = 0;
            if s.device_state == crate::av500::device_state::FAILURE {
                s.device_state = crate::av500::device_state::VENTILATING;
            }
        }
        Action::Silent => s.silent = true,
        Action::Resume => s.silent = false,
        Action::Boot(d) => s.busy_until = Some(now + *d),
        Action::BootDone => s.busy_until = None,
        Action::Temperature(t) => s.turbine_temp_c = *t,
        Action::TemperatureNormal => s.turbine_temp_c = 42.0,
        Action::MaintenanceDue => s.days_since_pm = s.pm_interval_days,
        Action::MaintenanceDone => {
            s.days_since_pm = 0;
            s.alarm_word2 &= !(1 << 1);
        }
        Action::Set(field, v) => match field.as_str() {
            "state" => s.device_state = value_uint(v)?,
            "days_since_pm" => s.days_since_pm = value_uint(v)?,
            "pm_interval" => s.pm_interval_days = value_uint(v)?,
            "error" => s.error_code = value_uint(v)?,
            "alarm_word1" => s.alarm_word1 = value_uint(v)?,
            "alarm_word2" => s.alarm_word2 = value_uint(v)?,
            "operating_minutes" => s.operating_minutes = value_uint(v)?,
            "turbine_minutes" => s.turbine_minutes = value_uint(v)?,
            "turbine_temp" => s.turbine_temp_c = value_f64(v)?,
            "o2_cell" => s.o2_cell_pct = value_uint(v)?,
            "battery" => s.battery_pct = value_uint(v)?,
            "battery_health" => s.battery_health_pct = value_uint(v)?,
            "mains" => s.mains = value_bool(v)?,
            "o2_supply" => s.o2_supply_kpa = value_uint(v)?,
            "air_supply" => s.air_supply_kpa = value_uint(v)?,
            "turbine_rpm" => s.turbine_rpm = value_uint(v)?,
            other => {
                return Err(format!(
                    "unknown AV-500 field {other:?} (state, days_since_pm, pm_interval, error, alarm_word1, alarm_word2, \
                     operating_minutes, turbine_minutes, turbine_temp, o2_cell, battery, battery_health, mains, \
                     o2_supply, air_supply, turbine_rpm)"
                ))
            }
        },
        other => return unsupported("the AV-500", other),
    }
    Ok(())
}

/// Applies an action to an HM-2 state.
pub fn apply_hm2(_cfg: &Hm2Config, s: &mut Hm2State, a: &Action) -> Result<(), String> {
    let sensor = |s: &mut Hm2State, name: &str, failed: bool| match name {
        "level" => s.level_sensor_failed = failed,
        "pressure" => s.pressure_sensor_failed = failed,
        _ => s.cold_head_sensor_failed = failed,
    };
    match a {
        Action::Fault(Fault::Bit { word: 1, bit }) if *bit < 16 => {
            s.forced_alarms |= 1 << bit;
            if *bit == crate::hm2::alarm::COMPRESSOR_FAULT {
                s.compressor = 2;
            }
        }
        Action::Clear(Some(Fault::Bit { word: 1, bit })) if *bit < 16 => {
            s.forced_alarms &= !(1 << bit);
            if *bit == crate::hm2::alarm::COMPRESSOR_FAULT && s.compressor == 2 {
                s.compressor = 1;
            }
        }
        Action::Fault(Fault::Sensor(name)) => sensor(s, name, true),
        Action::Clear(Some(Fault::Sensor(name))) => sensor(s, name, false),
        Action::Clear(None) => {
            s.forced_alarms = 0;
            s.level_sensor_failed = false;
            s.pressure_sensor_failed = false;
            s.cold_head_sensor_failed = false;
            if s.compressor == 2 {
                s.compressor = 1;
            }
        }
        Action::Fault(f) | Action::Clear(Some(f)) => {
            return Err(format!("the HM-2 has alarm bits 0..16 (bit = N) and sensors, not {f}"))
        }
        Action::Silent => s.silent = true,
        Action::Resume => s.silent = false,
        Action::BoilOff(r) => s.boil_off_pct_per_min = *r,
        Action::Temperature(k) => s.cold_head_k = *k,
        Action::TemperatureNormal => s.cold_head_k = 4.2,
        Action::MaintenanceDue => s.adsorber_hours = 30_000,
        Action::MaintenanceDone => s.adsorber_hours = 0,
        Action::Set(field, v) => match field.as_str() {
            "level" => s.level_pct = value_f64(v)?,
            "pressure" => s.pressure_psi = value_f64(v)?,
            "cold_head" => s.cold_head_k = value_f64(v)?,
            "compressor" => {
                let c: u16 = value_uint(v)?;
                if c > 2 {
                    return Err("compressor is 0 (off), 1 (running) or 2 (fault)".into());
                }
                s.compressor = c;
            }
            "flow" => s.flow_l_min = value_f64(v)?,
            "compressor_hours" => s.compressor_hours = value_uint(v)?,
            "adsorber_hours" => s.adsorber_hours = value_uint(v)?,
            other => {
                return Err(format!(
                    "unknown HM-2 field {other:?} (level, pressure, cold_head, compressor, flow, compressor_hours, adsorber_hours)"
                ))
            }
        },
        other => return unsupported("the HM-2", other),
    }
    Ok(())
}

/// Applies an action to a VM-12 state.
pub fn apply_vm12(_cfg: &Vm12Config, s: &mut Vm12State, a: &Action) -> Result<(), String> {
    match a {
        Action::Fault(Fault::Alarm { code, prio, text }) => vm12::raise_alarm(s, code, prio, text),
        Action::Clear(Some(Fault::Alarm { code, .. })) => s.tech_alarms.retain(|x| &x.code != code),
        // 6.x keeps the module state too; its status simply has no modules list.
        Action::Fault(Fault::Module { slot, code }) => vm12::set_module(s, *slot, Some(code)),
        Action::Clear(Some(Fault::Module { slot, .. })) => vm12::set_module(s, *slot, None),
        Action::Fault(f) | Action::Clear(Some(f)) => {
            return Err(format!("the VM-12 has alarm codes (code = \"T-301\") and module faults, not {f}"))
        }
        Action::Clear(None) => {
            s.tech_alarms.clear();
            for m in &mut s.modules {
                if m.status == "fault" {
                    m.status = "ok".into();
                    m.code = None;
                }
            }
            if s.state == MonitorState::Fault {
                s.state = MonitorState::Monitoring;
            }
        }
        Action::Silent => s.silent = true,
        Action::Resume => s.silent = false,
        Action::Boot(_) => s.state = MonitorState::Booting,
        Action::BootDone => {
            if s.state == MonitorState::Booting {
                s.state = MonitorState::Monitoring;
            }
        }
        Action::Temperature(t) => s.board_temp_c = *t,
        Action::TemperatureNormal => s.board_temp_c = 41.5,
        Action::Set(field, v) => match field.as_str() {
            "state" => s.state = value_str(v)?.parse()?,
            "battery" => s.battery_pct = value_uint(v)?,
            "battery_health" => s.battery_health_pct = value_uint(v)?,
            "on_battery" => s.on_battery = value_bool(v)?,
            "board_temp" => s.board_temp_c = value_f64(v)?,
            "power_on_hours" => s.power_on_hours = value_uint(v)?,
            "nibp_cycles" => s.nibp_cycles = value_uint(v)?,
            other => {
                return Err(format!(
                    "unknown VM-12 field {other:?} (state, battery, battery_health, on_battery, board_temp, power_on_hours, nibp_cycles)"
                ))
            }
        },
        other => return unsupported("the VM-12", other),
    }
    Ok(())
}

// ---------------------------------------------------------------- running a scenario

/// A running device a scenario acts on.
#[derive(Debug)]
pub enum Target {
    Lip300(Lip300Handle),
    Av500(Av500Handle),
    Hm2(Hm2Handle),
    Vm12(Vm12Handle),
}

impl Target {
    pub fn kind(&self) -> Kind {
        match self {
            Target::Lip300(h) => Kind::Lip300(h.config().firmware),
            Target::Av500(h) => Kind::Av500(h.config().firmware),
            Target::Hm2(h) => Kind::Hm2(h.config().firmware),
            Target::Vm12(h) => Kind::Vm12(h.config().firmware),
        }
    }

    /// Applies `action` to the running device's state.
    pub fn apply(&self, action: &Action) -> Result<(), String> {
        let now = Instant::now();
        match self {
            Target::Lip300(h) => {
                let today = jiff::Timestamp::now()
                    .to_zoned(jiff::tz::TimeZone::UTC)
                    .date();
                h.update(|s| apply_lip300(h.config(), s, action, now, today))
            }
            Target::Av500(h) => h.update(|s| apply_av500(h.config(), s, action, now)),
            Target::Hm2(h) => h.update(|s| apply_hm2(h.config(), s, action)),
            Target::Vm12(h) => h.update(|s| apply_vm12(h.config(), s, action)),
        }
    }
}

/// Runs `scenario` against named targets until it ends (or forever when it repeats).
/// `on_step` sees every step applied to every device, with the outcome.
pub async fn run(
    scenario: &Scenario,
    targets: &[(String, Target)],
    mut on_step: impl FnMut(&Step, &str, &Result<(), String>),
) {
    let start = tokio::time::Instant::now();
    let mut cycle: u32 = 0;
    loop {
        let base = start + scenario.repeat.unwrap_or_default() * cycle;
        for step in &scenario.steps {
            tokio::time::sleep_until(base + step.at).await;
            for (name, target) in targets.iter().filter(|(n, _)| matches(&step.device, n)) {
                let r = target.apply(&step.action);
                on_step(step, name, &r);
            }
        }
        match scenario.repeat {
            Some(rep) => {
                tokio::time::sleep_until(base + rep).await;
                cycle = cycle.saturating_add(1);
            }
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds() -> Vec<(String, Kind)> {
        vec![
            ("lip300-a".into(), Kind::Lip300(Version::new(3, 1, 0))),
            ("lip300-b".into(), Kind::Lip300(Version::new(2, 4, 1))),
            ("av500-rtu-a".into(), Kind::Av500(Version::new(5, 2, 1))),
            ("av500-tcp-a".into(), Kind::Av500(Version::new(5, 2, 1))),
            ("hm2-a".into(), Kind::Hm2(Version::new(3, 5, 0))),
            ("vm12-a".into(), Kind::Vm12(Version::new(7, 4, 2))),
            ("vm12-b".into(), Kind::Vm12(Version::new(6, 9, 0))),
        ]
    }

    #[test]
    fn demo_parses_and_fits_every_device() {
        let d = Scenario::demo();
        assert_eq!(d.repeat, Some(Duration::from_secs(360)));
        assert!(d.steps.len() > 20);
        d.check(&kinds()).unwrap();
        assert!(d.steps.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn fault_with_for_expands_to_clear() {
        let s = Scenario::parse(
            "[[step]]\nat = \"30s\"\ndevice = \"lip300-a\"\naction = \"fault\"\nbit = 0\nfor = \"1m\"\n",
            "t.toml",
        )
        .unwrap();
        assert_eq!(s.steps.len(), 2);
        assert_eq!(s.steps[0].at, Duration::from_secs(30));
        assert_eq!(
            s.steps[0].action,
            Action::Fault(Fault::Bit { word: 1, bit: 0 })
        );
        assert_eq!(s.steps[1].at, Duration::from_secs(90));
        assert_eq!(
            s.steps[1].action,
            Action::Clear(Some(Fault::Bit { word: 1, bit: 0 }))
        );
        assert_eq!(s.steps[0].line, 4);
    }

    #[test]
    fn flap_toggles() {
        let s = Scenario::parse(
            "[[step]]\nat = 0\ndevice = \"av500-*\"\naction = \"flap\"\nword = 2\nbit = 4\nevery = \"10s\"\nfor = \"30s\"\n",
            "t.toml",
        )
        .unwrap();
        let kinds: Vec<_> = s
            .steps
            .iter()
            .map(|st| (st.at.as_secs(), matches!(st.action, Action::Fault(_))))
            .collect();
        assert_eq!(kinds, vec![(0, true), (10, false), (20, true), (30, false)]);
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = Scenario::parse(
            "name = \"x\"\n\n[[step]]\nat = \"5s\"\ndevice = \"hm2-a\"\naction = \"explode\"\n",
            "bad.toml",
        )
        .unwrap_err();
        assert_eq!(e.file, "bad.toml");
        assert_eq!(e.line, 6);
        assert_eq!(e.key.as_deref(), Some("action"));
        assert!(
            e.to_string()
                .starts_with("bad.toml:6: key `action`: unknown action"),
            "{e}"
        );

        let e = Scenario::parse(
            "[[step]]\nat = \"5 parsecs\"\ndevice = \"a\"\naction = \"silent\"\n",
            "b.toml",
        )
        .unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (2, Some("at")));

        let e = Scenario::parse(
            "[[step]]\nat = \"5s\"\ndevice = \"a\"\naction = \"silent\"\ncolour = 1\n",
            "c.toml",
        )
        .unwrap_err();
        assert_eq!(e.line, 5);
        assert!(e.message.contains("colour"), "{e}");

        let e = Scenario::parse("[[step]\n", "d.toml").unwrap_err();
        assert_eq!(e.line, 1);

        let e = Scenario::parse(
            "repeat = \"1m\"\n[[step]]\nat = \"50s\"\ndevice = \"a\"\naction = \"silent\"\nfor = \"20s\"\n",
            "e.toml",
        )
        .unwrap_err();
        assert_eq!(e.key.as_deref(), Some("at"));
    }

    #[test]
    fn check_against_devices() {
        let s = Scenario::parse(
            "[[step]]\nat = 1\ndevice = \"nope\"\naction = \"silent\"\n",
            "f.toml",
        )
        .unwrap();
        let e = s.check(&kinds()).unwrap_err();
        assert_eq!((e.line, e.key.as_deref()), (4, Some("device")));

        let s = Scenario::parse(
            "[[step]]\nat = 1\ndevice = \"hm2-a\"\naction = \"boot\"\n",
            "g.toml",
        )
        .unwrap();
        let e = s.check(&kinds()).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("action"));

        let s = Scenario::parse(
            "[[step]]\nat = 1\ndevice = \"lip300-b\"\naction = \"fault\"\nbit = 16\n",
            "h.toml",
        )
        .unwrap();
        assert!(s.check(&kinds()).is_err(), "2.x TALM has 16 bits");
        let s = Scenario::parse(
            "[[step]]\nat = 1\ndevice = \"lip300-a\"\naction = \"fault\"\nbit = 16\n",
            "h.toml",
        )
        .unwrap();
        s.check(&kinds()).unwrap();

        let s = Scenario::parse(
            "[[step]]\nat = 1\ndevice = \"lip300-*\"\naction = \"set\"\nfield = \"mode\"\nvalue = \"BROKEN\"\n",
            "i.toml",
        )
        .unwrap();
        let e = s.check(&kinds()).unwrap_err();
        assert!(e.message.contains("unknown LIP-300 mode"), "{e}");
    }

    #[test]
    fn actions_change_state() {
        let now = Instant::now();
        let today = jiff::civil::date(2026, 11, 28);
        let cfg = Lip300Config::v3();
        let mut s = Lip300State::example(cfg.firmware);
        apply_lip300(
            &cfg,
            &mut s,
            &Action::Fault(Fault::Bit { word: 1, bit: 16 }),
            now,
            today,
        )
        .unwrap();
        apply_lip300(&cfg, &mut s, &Action::Fault(Fault::Code(240)), now, today).unwrap();
        assert_eq!((s.talm, s.err), (1 << 16, 240));
        apply_lip300(&cfg, &mut s, &Action::MaintenanceDue, now, today).unwrap();
        assert_eq!(s.lastpm, "2026-05-31");
        apply_lip300(&cfg, &mut s, &Action::Clear(None), now, today).unwrap();
        assert_eq!((s.talm, s.err), (0, 0));

        let acfg = Av500Config::v4();
        let mut a = Av500State::default();
        apply_av500(
            &acfg,
            &mut a,
            &Action::Fault(Fault::Bit { word: 2, bit: 1 }),
            now,
        )
        .unwrap();
        assert_eq!(a.alarm_word2, 2);
        apply_av500(&acfg, &mut a, &Action::MaintenanceDue, now).unwrap();
        assert_eq!(a.days_since_pm, a.pm_interval_days);
        apply_av500(&acfg, &mut a, &Action::Boot(Duration::from_secs(20)), now).unwrap();
        assert!(a.is_busy(now));

        let hcfg = Hm2Config::v3();
        let mut h = Hm2State::default();
        apply_hm2(
            &hcfg,
            &mut h,
            &Action::Fault(Fault::Sensor("pressure".into())),
        )
        .unwrap();
        assert_eq!(crate::hm2::alarm_bits(&h), 1 << 6);
        apply_hm2(&hcfg, &mut h, &Action::BoilOff(1.0)).unwrap();
        assert_eq!(h.boil_off_pct_per_min, 1.0);

        let vcfg = Vm12Config::v7("h", 1);
        let mut v = Vm12State::example(vcfg.firmware);
        apply_vm12(
            &vcfg,
            &mut v,
            &Action::Fault(Fault::Module {
                slot: 2,
                code: "M-214".into(),
            }),
        )
        .unwrap();
        assert_eq!(v.modules[1].status, "fault");
        apply_vm12(
            &vcfg,
            &mut v,
            &Action::Set("state".into(), Value::String("service".into())),
        )
        .unwrap();
        assert_eq!(v.state, MonitorState::Service);
        assert!(apply_vm12(&vcfg, &mut v, &Action::MaintenanceDue).is_err());
    }
}

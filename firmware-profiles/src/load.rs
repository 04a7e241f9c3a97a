//! Loading profiles: TOML text to a checked [`Profile`], with every error naming file,
//! line and key; the set of profiles an agent knows; and firmware selection.

use crate::engine::{firmware_major, Profile};
pub use crate::golden::{run_golden, GoldenError};
use crate::locate::{line_of, line_of_path, KeyPath};
use crate::model::SignalKind;
use crate::schema::{
    ConditionDef, PointDef, PointType, ProfileDoc, RuleDef, RuleKind, TransportDef, TransportKind,
    MODBUS_MAX_REGISTERS,
};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A profile (or config) that cannot be used, and where it says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: key `{key}`: {message}")]
pub struct ProfileError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

/// Builds located errors for one file.
pub(crate) struct Ctx<'a> {
    file: &'a str,
    src: &'a str,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, path: &KeyPath, message: impl Into<String>) -> ProfileError {
        ProfileError {
            file: self.file.to_string(),
            line: line_of_path(self.src, path),
            key: path.to_string(),
            message: message.into(),
        }
    }

    /// `Ok` when `ok`, else the error `message` at `path`.
    pub(crate) fn require(
        &self,
        ok: bool,
        path: &KeyPath,
        message: impl Into<String>,
    ) -> Result<(), ProfileError> {
        if ok {
            Ok(())
        } else {
            Err(self.err(path, message))
        }
    }
}

/// Turns a serde/TOML error into a located one: the key is the text under the span when
/// the message is about a field, else the enclosing key. Configs use it too.
pub fn toml_error(file: &str, src: &str, e: &toml::de::Error) -> ProfileError {
    let span = e.span();
    let line = span.as_ref().map(|s| line_of(src, s.start)).unwrap_or(1);
    let mut msg = e.message().trim().to_string();
    if msg.is_empty() {
        // toml gives no text for some syntax errors, e.g. a control character in a comment.
        let at = span
            .as_ref()
            .and_then(|s| src.get(s.start..)?.chars().next());
        msg = match at {
            Some(c) => format!("invalid TOML: unexpected character {c:?}"),
            None => "invalid TOML".into(),
        };
    }
    let key = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let k = rest.split('`').next().unwrap_or("?");
        qualify(src, line, k)
    } else if let Some(rest) = msg.strip_prefix("missing field `") {
        rest.split('`').next().unwrap_or("?").to_string()
    } else {
        span.and_then(|s| src.get(s))
            .map(|t| {
                // The span of a value: take the key written before it on its line.
                t.lines().next().unwrap_or("").trim().to_string()
            })
            .map(|t| key_on_line(src, line).unwrap_or(t))
            .map(|k| qualify(src, line, &k))
            .unwrap_or_else(|| "?".into())
    };
    ProfileError {
        file: file.to_string(),
        line,
        key,
        message: msg,
    }
}

/// `section.key` when `line` (1-based) sits under a `[section]` or `[[section]]` header
/// and is not itself a header; else `key`.
fn qualify(src: &str, line: usize, key: &str) -> String {
    let Some(own) = src.lines().nth(line.saturating_sub(1)) else {
        return key.to_string();
    };
    if own.trim_start().starts_with('[') {
        return key.to_string();
    }
    let header = src
        .lines()
        .take(line.saturating_sub(1))
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last();
    match header {
        Some(h) => {
            let name = h.trim_matches(|c| c == '[' || c == ']').trim();
            if key.starts_with(&format!("{name}.")) || key.contains('[') {
                key.to_string()
            } else {
                format!("{name}.{key}")
            }
        }
        None => key.to_string(),
    }
}

fn key_on_line(src: &str, line: usize) -> Option<String> {
    let l = src.lines().nth(line.checked_sub(1)?)?.trim();
    if l.starts_with('[') {
        return Some(l.trim_matches(|c| c == '[' || c == ']').to_string());
    }
    let (k, _) = l.split_once('=')?;
    Some(k.trim().to_string())
}

/// Parses and checks one profile. `file` names it in errors.
pub fn parse_profile(file: &str, src: &str) -> Result<Profile, ProfileError> {
    let doc: ProfileDoc = toml::from_str(src).map_err(|e| toml_error(file, src, &e))?;
    let cx = Ctx { file, src };
    let major = validate(&cx, &doc)?;
    let profile = Profile {
        doc,
        source: file.to_string(),
        firmware_major: major,
    };
    for (i, g) in profile.doc.golden.iter().enumerate() {
        run_golden(&profile, g).map_err(|m| {
            cx.err(
                &KeyPath::root().key("golden").index(i).key("name"),
                format!("golden vector {:?} fails: {m}", g.name),
            )
        })?;
    }
    Ok(profile)
}

/// Checks what serde cannot: meaning across keys. Returns the firmware major version the
/// profile covers. Sections are checked in file order, so the first error is the first
/// problem a reader of the file meets.
fn validate(cx: &Ctx, d: &ProfileDoc) -> Result<u32, ProfileError> {
    let major = check_device(cx, d)?;
    check_transport(cx, &d.transport)?;
    check_identify(cx, d)?;
    let names = check_points(cx, d)?;
    crate::phi::check(cx, d, major)?;
    for (i, r) in d.rules.iter().enumerate() {
        check_rule(cx, &KeyPath::root().key("rule").index(i), r, &names)?;
    }
    check_availability(cx, d, &names)?;
    check_read_every(cx, d)?;
    check_diagnostics(cx, d)?;
    check_read_only(cx, d, major)?;
    Ok(major)
}

/// `[device]`: the id, the firmware family (returned as its major number) and the
/// silence limit of an always-on device.
fn check_device(cx: &Ctx, d: &ProfileDoc) -> Result<u32, ProfileError> {
    let dev = KeyPath::root().key("device");
    let parts: Vec<&str> = d.device.id.split('/').collect();
    if parts.len() != 2
        || parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
    {
        return Err(cx.err(
            &dev.key("id"),
            "must be `vendor/model` in lowercase, e.g. `aeris/av-500`",
        ));
    }
    let major = d
        .device
        .firmware
        .strip_suffix(".x")
        .and_then(|m| m.parse::<u32>().ok())
        .ok_or_else(|| {
            cx.err(
                &dev.key("firmware"),
                "must name a firmware family as `<major>.x`, e.g. `5.x`",
            )
        })?;
    if d.device.always_on && d.device.silence_fault_after.is_none() {
        return Err(cx.err(
            &dev.key("silence_fault_after"),
            "an always-on device needs the silence that raises monitoring_lost",
        ));
    }
    Ok(major)
}

/// `[transport]`: the keys each transport kind needs, and their limits.
fn check_transport(cx: &Ctx, t: &TransportDef) -> Result<(), ProfileError> {
    let tp = KeyPath::root().key("transport");
    let need = |ok: bool, key: &str, what: &str| {
        cx.require(
            ok,
            &tp.key(key),
            format!("a {what} transport needs `{key}`"),
        )
    };
    if t.reply_timeout.is_none() && t.kind != TransportKind::Mqtt {
        return Err(cx.err(
            &tp.key("reply_timeout"),
            "every request needs a timeout: set `reply_timeout`",
        ));
    }
    match t.kind {
        TransportKind::Serial => {
            need(t.baud.is_some(), "baud", "serial")?;
            need(t.checksum.is_some(), "checksum", "serial")?;
            need(!t.poll.is_empty(), "poll", "serial")?;
        }
        TransportKind::Modbus => {
            need(t.max_registers.is_some(), "max_registers", "modbus")?;
            need(
                t.baud.is_some() || t.tcp_port.is_some(),
                "tcp_port",
                "modbus",
            )?;
            if let Some(m) = t.max_registers {
                cx.require(
                    (1..=MODBUS_MAX_REGISTERS).contains(&m),
                    &tp.key("max_registers"),
                    "Modbus allows 1 to 125 registers per read",
                )?;
            }
        }
        TransportKind::Mqtt => {
            need(t.status_topic.is_some(), "status_topic", "mqtt")?;
            if let Some(topic) = &t.status_topic {
                cx.require(
                    topic.contains("{serial}"),
                    &tp.key("status_topic"),
                    "must contain `{serial}`",
                )?;
            }
            need(
                t.schema_pointer.is_some() == t.schema.is_some(),
                "schema",
                "mqtt",
            )?;
            need(t.max_payload.is_some(), "max_payload", "mqtt")?;
        }
    }
    Ok(())
}

/// `[identify]`: how the transport kind reads the firmware before the profile is known.
fn check_identify(cx: &Ctx, d: &ProfileDoc) -> Result<(), ProfileError> {
    let idp = KeyPath::root().key("identify");
    let id = &d.identify;
    match d.transport.kind {
        TransportKind::Serial => cx.require(
            id.request.is_some() && id.firmware_key.is_some(),
            &idp.key("firmware_key"),
            "a serial device is identified by `request` and `firmware_key`",
        ),
        TransportKind::Modbus => cx.require(
            id.firmware_table.is_some() && id.firmware_address.is_some(),
            &idp.key("firmware_address"),
            "a Modbus device is identified by `firmware_table` and `firmware_address`",
        ),
        TransportKind::Mqtt => cx.require(
            id.firmware_pointer.is_some(),
            &idp.key("firmware_pointer"),
            "an MQTT device is identified by `firmware_pointer`",
        ),
    }
}

/// `[[point]]` and `device.evidence`: unique names, each point readable on its transport
/// (PHI is checked in [`crate::phi`], over every field read). Returns the point names,
/// which rules and conditions refer to.
fn check_points<'d>(cx: &Ctx, d: &'d ProfileDoc) -> Result<BTreeSet<&'d str>, ProfileError> {
    let root = KeyPath::root();
    let mut names = BTreeSet::new();
    for (i, p) in d.points.iter().enumerate() {
        let pp = root.key("point").index(i);
        if !names.insert(p.name.as_str()) {
            return Err(cx.err(
                &pp.key("name"),
                format!("point `{}` is listed twice", p.name),
            ));
        }
        check_point(cx, &pp, p, d.transport.kind, d)?;
    }
    for (i, e) in d.device.evidence.iter().enumerate() {
        if !names.contains(e.as_str()) {
            return Err(cx.err(
                &root.key("device").key("evidence").index(i),
                format!("no point named `{e}`"),
            ));
        }
    }
    Ok(names)
}

/// `read_every` of a point: Modbus only, between 1 s and a day, and never on a point whose
/// value must be current: what a fault rule reads (a fault would wait for the next
/// read), fault evidence, and what availability is decided on.
fn check_read_every(cx: &Ctx, d: &ProfileDoc) -> Result<(), ProfileError> {
    let root = KeyPath::root();
    for (i, p) in d.points.iter().enumerate() {
        let Some(every) = p.read_every else {
            continue;
        };
        let at = root.key("point").index(i).key("read_every");
        cx.require(
            d.transport.kind == TransportKind::Modbus,
            &at,
            "only a Modbus point can be read less often than its device is polled",
        )?;
        cx.require(
            (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(&every.0),
            &at,
            format!("{every} is not between 1s and 1d"),
        )?;
        let name = p.name.as_str();
        let fault_rule = d.rules.iter().find(|r| {
            r.signal == SignalKind::Fault
                && (r.point == name || r.at_least_point.as_deref() == Some(name))
        });
        if let Some(r) = fault_rule {
            return Err(cx.err(
                &at,
                format!(
                    "`{name}` is read by fault rule {}: a fault must not wait for a slower read",
                    r.code
                        .as_deref()
                        .or(r.code_prefix.as_deref())
                        .unwrap_or("(unnamed)")
                ),
            ));
        }
        cx.require(
            !d.device.evidence.iter().any(|e| e == name),
            &at,
            format!("`{name}` is fault evidence (device.evidence), which must be current"),
        )?;
        let conds = d
            .availability
            .down_when
            .iter()
            .chain(&d.availability.maintenance_when);
        for c in conds {
            let by_signal = c.signal.as_deref().is_some_and(|s| {
                d.rules.iter().any(|r| {
                    (r.point == name || r.at_least_point.as_deref() == Some(name))
                        && may_raise(r, s)
                })
            });
            cx.require(
                c.point.as_deref() != Some(name) && !by_signal,
                &at,
                format!("`{name}` decides availability ([availability]), which must be current"),
            )?;
        }
    }
    Ok(())
}

/// Whether rule `r` may raise the signal code `s` (erring towards yes: a code table
/// without a prefix raises the device's own codes, any of them).
fn may_raise(r: &RuleDef, s: &str) -> bool {
    let prefix = r.code_prefix.as_deref().unwrap_or(&r.point);
    r.code.as_deref() == Some(s)
        || s.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
        || (r.kind == RuleKind::Codes && r.code_prefix.is_none())
        || r.codes.iter().any(|c| c.code == s)
}

/// `[availability]`: every condition well formed and naming a known point.
fn check_availability(
    cx: &Ctx,
    d: &ProfileDoc,
    names: &BTreeSet<&str>,
) -> Result<(), ProfileError> {
    let conds = [
        ("down_when", &d.availability.down_when),
        ("maintenance_when", &d.availability.maintenance_when),
    ];
    for (key, list) in conds {
        for (i, c) in list.iter().enumerate() {
            let cp = KeyPath::root().key("availability").key(key).index(i);
            check_condition(cx, &cp, c, names)?;
        }
    }
    Ok(())
}

/// `[[diagnostic]]`: unique names apart from the agent's built-ins, and a read-only
/// request in the transport's terms.
fn check_diagnostics(cx: &Ctx, d: &ProfileDoc) -> Result<(), ProfileError> {
    let t = &d.transport;
    let mut dnames = BTreeSet::new();
    for (i, g) in d.diagnostics.iter().enumerate() {
        let gp = KeyPath::root().key("diagnostic").index(i);
        if ["readings", "transport", "episodes", "outbox"].contains(&g.name.as_str()) {
            return Err(cx.err(
                &gp.key("name"),
                format!("`{}` is a built-in diagnostic of the agent", g.name),
            ));
        }
        if !dnames.insert(g.name.as_str()) {
            return Err(cx.err(
                &gp.key("name"),
                format!("diagnostic `{}` is listed twice", g.name),
            ));
        }
        let (ok, key) = match t.kind {
            TransportKind::Serial => (
                g.request.as_deref().is_some_and(|r| r.starts_with("Q|")),
                "request",
            ),
            TransportKind::Mqtt => (g.command.is_some(), "command"),
            TransportKind::Modbus => (
                g.table.is_some()
                    && g.start.is_some()
                    && g.count.is_some_and(|c| c >= 1 && c <= t.request_limit()),
                "count",
            ),
        };
        cx.require(ok, &gp.key(key), "a read-only request needs `request = \"Q|...\"` (serial), `command` (mqtt) or `table`, `start` and `count` within the device's limit (modbus)")?;
    }
    Ok(())
}

/// Requests that only read. For a model with a built-in manual ([`crate::manual`]),
/// every serial request (poll, identification, diagnostics) and every MQTT command is
/// one the manual declares read-only, with only the arguments it documents. For another
/// model an MQTT command must cite where its manual declares it read-only
/// (`manual_ref`); serial diagnostics are `Q|` queries there too (see
/// [`check_diagnostics`]). Modbus reads are read functions by construction.
fn check_read_only(cx: &Ctx, d: &ProfileDoc, major: u32) -> Result<(), ProfileError> {
    let root = KeyPath::root();
    let diag = |i: usize| root.key("diagnostic").index(i);
    let mut asked: Vec<(KeyPath, &str)> = Vec::new();
    match d.transport.kind {
        TransportKind::Serial => {
            for (i, r) in d.transport.poll.iter().enumerate() {
                asked.push((root.key("transport").key("poll").index(i), r));
            }
            if let Some(r) = &d.identify.request {
                asked.push((root.key("identify").key("request"), r));
            }
            for (i, g) in d.diagnostics.iter().enumerate() {
                if let Some(r) = &g.request {
                    asked.push((diag(i).key("request"), r.strip_prefix("Q|").unwrap_or(r)));
                }
            }
        }
        TransportKind::Mqtt => {
            for (i, g) in d.diagnostics.iter().enumerate() {
                if let Some(c) = &g.command {
                    asked.push((diag(i).key("command"), c));
                }
            }
        }
        TransportKind::Modbus => return Ok(()),
    }
    let Some(manual) = crate::manual::manual(&d.device.id) else {
        for (i, g) in d.diagnostics.iter().enumerate() {
            if g.command.is_some() {
                cx.require(
                    g.manual_ref.as_deref().is_some_and(|r| !r.trim().is_empty()),
                    &diag(i).key("manual_ref"),
                    "a device command needs `manual_ref`: where the device's manual declares it read-only",
                )?;
            }
        }
        return Ok(());
    };
    let (allowed, source) = manual.read_only_for(major);
    for (path, name) in asked {
        if !allowed.iter().any(|r| r.name == name) {
            let message = match source {
                Some(source) => format!(
                    "`{name}` is not a read-only request of {} ({source} declares {})",
                    manual.document,
                    allowed
                        .iter()
                        .map(|r| r.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => format!(
                    "`{name}`: {} declares no device requests for firmware {}",
                    manual.document, d.device.firmware
                ),
            };
            return Err(cx.err(&path, message));
        }
    }
    for (i, g) in d.diagnostics.iter().enumerate() {
        let Some(req) = allowed
            .iter()
            .find(|r| Some(r.name) == g.command.as_deref())
        else {
            continue;
        };
        if let Some(k) = g.args.keys().find(|k| !req.args.contains(&k.as_str())) {
            return Err(cx.err(
                &diag(i).key("args").key(k),
                format!(
                    "`{}` is not an argument {} documents for `{}`",
                    k, manual.document, req.name
                ),
            ));
        }
    }
    Ok(())
}

fn check_point(
    cx: &Ctx,
    pp: &KeyPath,
    p: &PointDef,
    kind: TransportKind,
    d: &ProfileDoc,
) -> Result<(), ProfileError> {
    match kind {
        TransportKind::Modbus => {
            let Some(rt) = p.ty.reg_type() else {
                return Err(cx.err(
                    &pp.key("type"),
                    "a Modbus point is one of u16, i16, u32, i32, f32, ascii",
                ));
            };
            let (Some(table), Some(addr)) = (p.table, p.address) else {
                return Err(cx.err(
                    &pp.key("address"),
                    "a Modbus point needs `table` and `address`",
                ));
            };
            if p.ty == PointType::Ascii && p.registers.is_none() {
                return Err(cx.err(
                    &pp.key("registers"),
                    "an ascii point needs its register count",
                ));
            }
            let width = rt.width(p.registers.unwrap_or(1));
            let end = addr as u32 + width as u32 - 1;
            let mapped = &d.transport.mapped;
            if !mapped.is_empty()
                && !mapped
                    .iter()
                    .any(|m| m.table == table && m.from <= addr && end <= m.to as u32)
            {
                return Err(cx.err(
                    &pp.key("address"),
                    format!("{table:?} {addr}..={end} is outside the device's mapped registers"),
                ));
            }
        }
        TransportKind::Serial => {
            if !matches!(
                p.ty,
                PointType::Number | PointType::Hex | PointType::Text | PointType::Date
            ) {
                return Err(cx.err(
                    &pp.key("type"),
                    "a serial field is number, hex, text or date",
                ));
            }
            let (Some(req), Some(_)) = (&p.request, &p.key) else {
                return Err(cx.err(&pp.key("key"), "a serial point needs `request` and `key`"));
            };
            if !d.transport.poll.contains(req) {
                return Err(cx.err(
                    &pp.key("request"),
                    format!("`{req}` is not in transport.poll, so it is never read"),
                ));
            }
        }
        TransportKind::Mqtt => {
            if p.ty.reg_type().is_some() || p.ty == PointType::Hex {
                return Err(cx.err(
                    &pp.key("type"),
                    "a JSON point is number, text, date, bool or codes",
                ));
            }
            match &p.pointer {
                Some(ptr) if ptr.starts_with('/') => {}
                _ => {
                    return Err(cx.err(
                        &pp.key("pointer"),
                        "a JSON point needs a `pointer` like `/power/battery_pct`",
                    ))
                }
            }
            if p.where_pointer.is_some() != p.where_equals.is_some() {
                return Err(cx.err(
                    &pp.key("where_equals"),
                    "`where_pointer` and `where_equals` go together",
                ));
            }
        }
    }
    Ok(())
}

/// One `[[rule]]`: its point exists, the keys its kind needs are there, and a fault rule
/// that names its own code has a service class.
fn check_rule(
    cx: &Ctx,
    rp: &KeyPath,
    r: &RuleDef,
    names: &BTreeSet<&str>,
) -> Result<(), ProfileError> {
    if !names.contains(r.point.as_str()) {
        return Err(cx.err(&rp.key("point"), format!("no point named `{}`", r.point)));
    }
    let rule = RuleCheck { cx, rp, r };
    match r.kind {
        RuleKind::Bits => rule.bits()?,
        RuleKind::Codes => rule.codes()?,
        RuleKind::Threshold => rule.threshold(names)?,
        RuleKind::Rate => rule.rate()?,
        RuleKind::Equals => rule.equals()?,
        RuleKind::DateDue => rule.date_due()?,
    }
    if matches!(
        r.kind,
        RuleKind::Threshold | RuleKind::Rate | RuleKind::Equals
    ) && r.signal == SignalKind::Fault
    {
        rule.need(
            r.class.is_some(),
            "class",
            "a fault rule needs its service `class`",
        )?;
    }
    Ok(())
}

/// One rule being checked, with the keys of its kind: one method per rule kind.
struct RuleCheck<'a> {
    cx: &'a Ctx<'a>,
    rp: &'a KeyPath,
    r: &'a RuleDef,
}

impl RuleCheck<'_> {
    /// `key` of this rule must be there (or right): else `what`, located at the key.
    fn need(&self, ok: bool, key: &str, what: &str) -> Result<(), ProfileError> {
        self.cx.require(ok, &self.rp.key(key), what)
    }

    fn bits(&self) -> Result<(), ProfileError> {
        let (cx, r) = (self.cx, self.r);
        self.need(
            r.unlisted_class.is_some(),
            "unlisted_class",
            "a bit field rule needs `unlisted_class` for bits the manual does not list",
        )?;
        let mut seen = BTreeSet::new();
        for (i, b) in r.bits.iter().enumerate() {
            let bp = self.rp.key("bits").index(i);
            if b.bit >= 64 || !seen.insert(b.bit) {
                return Err(cx.err(
                    &bp.key("bit"),
                    format!("bit {} is out of range or listed twice", b.bit),
                ));
            }
            if let Some(g) = &b.group {
                let ok = !g.is_empty()
                    && g.len() <= 32
                    && g.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && !g.chars().all(|c| c.is_ascii_digit());
                cx.require(
                    ok,
                    &bp.key("group"),
                    "a group is a name of letters, digits and '_' (not a bit number)",
                )?;
                cx.require(
                    !b.not_a_fault,
                    &bp.key("group"),
                    "a bit that is not a fault belongs to no group",
                )?;
            }
            cx.require(
                b.class.is_some() || b.not_a_fault,
                &bp.key("class"),
                "a listed bit needs its service class, or `not_a_fault = true`",
            )?;
        }
        Ok(())
    }

    fn codes(&self) -> Result<(), ProfileError> {
        let r = self.r;
        self.need(
            r.otherwise_class.is_some(),
            "otherwise_class",
            "a code table needs `otherwise_class`: an unknown code is never dropped",
        )?;
        for (i, rg) in r.ranges.iter().enumerate() {
            self.cx.require(
                rg.from <= rg.to,
                &self.rp.key("ranges").index(i).key("from"),
                "range `from` is after `to`",
            )?;
        }
        Ok(())
    }

    fn threshold(&self, names: &BTreeSet<&str>) -> Result<(), ProfileError> {
        let r = self.r;
        let limits = [
            r.above.is_some(),
            r.below.is_some(),
            r.at_least.is_some(),
            r.at_least_point.is_some(),
        ];
        self.need(
            limits.iter().filter(|b| **b).count() == 1,
            "above",
            "a threshold needs exactly one of `above`, `below`, `at_least`, `at_least_point`",
        )?;
        if let Some(p) = &r.at_least_point {
            self.need(
                names.contains(p.as_str()),
                "at_least_point",
                &format!("no point named `{p}`"),
            )?;
        }
        self.need(
            r.code.is_some(),
            "code",
            "a threshold rule needs the `code` of its signal",
        )?;
        self.need(
            r.hysteresis.is_none_or(|h| h >= 0.0),
            "hysteresis",
            "hysteresis cannot be negative",
        )
    }

    fn rate(&self) -> Result<(), ProfileError> {
        let r = self.r;
        self.need(
            r.falls_by.is_some_and(|f| f > 0.0),
            "falls_by",
            "a rate rule needs a positive `falls_by`",
        )?;
        self.need(
            r.window.is_some_and(|w| w.0.as_secs() > 0),
            "window",
            "a rate rule needs a `window`",
        )?;
        self.need(
            r.code.is_some(),
            "code",
            "a rate rule needs the `code` of its signal",
        )
    }

    fn equals(&self) -> Result<(), ProfileError> {
        let r = self.r;
        self.need(
            matches!(
                r.equals,
                Some(toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::String(_))
            ),
            "equals",
            "an equals rule needs a number or text in `equals`",
        )?;
        self.need(
            r.code.is_some(),
            "code",
            "an equals rule needs the `code` of its signal",
        )
    }

    fn date_due(&self) -> Result<(), ProfileError> {
        let r = self.r;
        self.need(
            r.every.is_some(),
            "every",
            "a date rule needs the interval `every`",
        )?;
        self.need(
            r.code.is_some(),
            "code",
            "a date rule needs the `code` of its signal",
        )
    }
}

fn check_condition(
    cx: &Ctx,
    cp: &KeyPath,
    c: &ConditionDef,
    names: &BTreeSet<&str>,
) -> Result<(), ProfileError> {
    let n = [c.point.is_some(), c.signal.is_some(), c.class.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if n != 1 {
        return Err(cx.err(
            cp,
            "a condition names exactly one of `point` (with `equals`), `signal` or `class`",
        ));
    }
    if let Some(p) = &c.point {
        if !names.contains(p.as_str()) {
            return Err(cx.err(&cp.key("point"), format!("no point named `{p}`")));
        }
        if c.equals.is_none() {
            return Err(cx.err(&cp.key("equals"), "a point condition needs `equals`"));
        }
    }
    Ok(())
}

/// The profiles shipped with tend, compiled in so an agent needs no files to start.
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "lumen/lip-300-2.x.toml",
        include_str!("../profiles/lumen/lip-300-2.x.toml"),
    ),
    (
        "lumen/lip-300-3.x.toml",
        include_str!("../profiles/lumen/lip-300-3.x.toml"),
    ),
    (
        "aeris/av-500-4.x.toml",
        include_str!("../profiles/aeris/av-500-4.x.toml"),
    ),
    (
        "aeris/av-500-5.x.toml",
        include_str!("../profiles/aeris/av-500-5.x.toml"),
    ),
    (
        "vistara/vm-12-6.x.toml",
        include_str!("../profiles/vistara/vm-12-6.x.toml"),
    ),
    (
        "vistara/vm-12-7.x.toml",
        include_str!("../profiles/vistara/vm-12-7.x.toml"),
    ),
    (
        "cryosense/hm-2-2.x.toml",
        include_str!("../profiles/cryosense/hm-2-2.x.toml"),
    ),
    (
        "cryosense/hm-2-3.x.toml",
        include_str!("../profiles/cryosense/hm-2-3.x.toml"),
    ),
];

/// Why no profile could be chosen for a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("no profile for model `{0}` (known: {1})")]
    UnknownModel(String, String),
    #[error("model `{model}` reports firmware {firmware}, which no profile covers (profiles exist for {covered}); add a profile for it rather than guess")]
    UnsupportedFirmware {
        model: String,
        firmware: String,
        covered: String,
    },
}

/// Every profile an agent knows, by model.
#[derive(Debug, Clone, Default)]
pub struct ProfileSet {
    by_model: BTreeMap<String, Vec<Arc<Profile>>>,
}

impl ProfileSet {
    /// The profiles shipped with tend.
    pub fn builtin() -> Result<Self, ProfileError> {
        let mut set = Self::default();
        for (name, src) in BUILTIN {
            set.add(parse_profile(&format!("builtin:{name}"), src)?)?;
        }
        Ok(set)
    }

    /// Adds a profile; a second profile for the same model and firmware family, or one whose
    /// identification differs from its siblings', is an error.
    pub fn add(&mut self, p: Profile) -> Result<(), ProfileError> {
        let list = self.by_model.entry(p.doc.device.id.clone()).or_default();
        if let Some(other) = list.iter().find(|o| o.firmware_major == p.firmware_major) {
            return Err(ProfileError {
                file: p.source.clone(),
                line: 1,
                key: "device.firmware".into(),
                message: format!(
                    "{} {} is already covered by {}",
                    p.doc.device.id, p.doc.device.firmware, other.source
                ),
            });
        }
        if let Some(other) = list.first() {
            if other.doc.identify != p.doc.identify
                || other.doc.transport.kind != p.doc.transport.kind
            {
                return Err(ProfileError {
                    file: p.source.clone(),
                    line: 1,
                    key: "identify".into(),
                    message: format!("identification must match {} (the firmware is read before the profile is known)", other.source),
                });
            }
        }
        list.push(Arc::new(p));
        list.sort_by_key(|p| p.firmware_major);
        Ok(())
    }

    /// Loads every `*.toml` under `dir` (recursively), replacing built-ins of the same
    /// model and firmware family.
    pub fn load_dir(&mut self, dir: &Path) -> Result<usize, ProfileError> {
        let mut files = Vec::new();
        collect_toml(dir, &mut files).map_err(|e| ProfileError {
            file: dir.display().to_string(),
            line: 0,
            key: "-".into(),
            message: e.to_string(),
        })?;
        files.sort();
        for f in &files {
            let p = load_file(f)?;
            if let Some(list) = self.by_model.get_mut(&p.doc.device.id) {
                list.retain(|o| o.firmware_major != p.firmware_major);
            }
            self.add(p)?;
        }
        Ok(files.len())
    }

    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.by_model.keys().map(String::as_str)
    }

    /// All profiles of a model, lowest firmware first. Any of them can identify the device.
    pub fn family(&self, model: &str) -> Result<&[Arc<Profile>], SelectError> {
        self.by_model.get(model).map(Vec::as_slice).ok_or_else(|| {
            SelectError::UnknownModel(model.into(), self.models().collect::<Vec<_>>().join(", "))
        })
    }

    /// The profile for the firmware a device reports.
    pub fn select(&self, model: &str, firmware: &str) -> Result<Arc<Profile>, SelectError> {
        let fam = self.family(model)?;
        let major = firmware_major(firmware);
        fam.iter()
            .find(|p| Some(p.firmware_major) == major)
            .cloned()
            .ok_or_else(|| SelectError::UnsupportedFirmware {
                model: model.into(),
                firmware: firmware.chars().take(32).collect(),
                covered: fam
                    .iter()
                    .map(|p| p.doc.device.firmware.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Profile>> {
        self.by_model.values().flatten()
    }
}

fn collect_toml(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect_toml(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "toml") {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads a TOML file (profile, config, fleet) as text: its name for error messages and
/// its contents. An unreadable or non-UTF-8 file is an error naming the file.
pub fn read_text(path: &Path) -> Result<(String, String), ProfileError> {
    let file = path.display().to_string();
    let io = |message: String| ProfileError {
        file: file.clone(),
        line: 0,
        key: "-".into(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| io(format!("cannot read: {e}")))?;
    let src = String::from_utf8(bytes).map_err(|e| io(format!("not UTF-8 text: {e}")))?;
    Ok((file, src))
}

/// Reads and checks one profile file.
pub fn load_file(path: &Path) -> Result<Profile, ProfileError> {
    let (file, src) = read_text(path)?;
    parse_profile(&file, &src)
}

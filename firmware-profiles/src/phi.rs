//! Personal health information: every field a profile reads, checked against the PHI a
//! profile declares (`device.phi`) and the PHI its model's manual names
//! ([`crate::manual`]); and removing PHI from a diagnostic answer before it leaves the
//! agent.
//!
//! A PHI entry is a field name as the device sends it (a serial key such as `PID`, a
//! JSON key such as `patient`, which covers everything under it), a JSON pointer
//! (`/patient/mrn`), or for a Modbus device a register range (`holding:3`,
//! `input:20-25`).

use crate::load::{Ctx, ProfileError};
use crate::locate::KeyPath;
use crate::manual;
use crate::modbus::Table;
use crate::schema::{FirmwareFormat, ProfileDoc, TransportKind};

/// One field a profile reads, in its transport's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldRead<'a> {
    /// A serial reply key (`MODE`).
    SerialKey(&'a str),
    /// A JSON pointer, absolute or relative to an array element (`item`).
    Pointer(&'a str),
    /// Registers `from..=to` of one table.
    Registers { table: Table, from: u16, to: u16 },
}

/// One declared PHI entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhiEntry<'a> {
    /// A key name: a serial key, or a JSON key at any depth.
    Name(&'a str),
    /// A JSON pointer and everything under it.
    Pointer(&'a str),
    /// Modbus registers `from..=to`.
    Registers { table: Table, from: u16, to: u16 },
}

impl<'a> PhiEntry<'a> {
    /// `holding:3`, `input:20-25`, `/patient/mrn` or a name; `None` for a register
    /// entry that does not parse.
    pub fn parse(s: &'a str) -> Option<Self> {
        if s.starts_with('/') {
            return Some(PhiEntry::Pointer(s));
        }
        let regs = |rest: &str, table| {
            let (from, to) = rest.split_once('-').unwrap_or((rest, rest));
            let (from, to) = (from.trim().parse().ok()?, to.trim().parse().ok()?);
            (from <= to).then_some(PhiEntry::Registers { table, from, to })
        };
        if let Some(rest) = s.strip_prefix("holding:") {
            return regs(rest, Table::Holding);
        }
        if let Some(rest) = s.strip_prefix("input:") {
            return regs(rest, Table::Input);
        }
        Some(PhiEntry::Name(s))
    }

    /// Whether reading `field` reads this PHI.
    pub fn covers(&self, field: &FieldRead) -> bool {
        match (*self, *field) {
            (PhiEntry::Name(n), FieldRead::SerialKey(k)) => n == k,
            (PhiEntry::Name(n), FieldRead::Pointer(p)) => segments(p).any(|s| s == n),
            (PhiEntry::Pointer(phi), FieldRead::Pointer(p)) => {
                // Reading the PHI, something under it, or the object that holds it.
                let under = |a: &str, b: &str| {
                    a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'))
                };
                under(p, phi) || under(phi, p)
            }
            (
                PhiEntry::Registers { table, from, to },
                FieldRead::Registers {
                    table: t,
                    from: f,
                    to: e,
                },
            ) => table == t && f <= to && from <= e,
            _ => false,
        }
    }
}

/// The unescaped reference tokens of a JSON pointer (RFC 6901: `~1` is `/`, `~0` `~`).
fn segments(pointer: &str) -> impl Iterator<Item = String> + '_ {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
}

/// Every field a profile reads, each with the key that says so: identification,
/// the schema tag, points (with their `item` and `where_pointer`), and Modbus register
/// dumps of diagnostics. Availability conditions and rules read points only.
pub fn fields_read(d: &ProfileDoc) -> Vec<(KeyPath, FieldRead<'_>)> {
    let mut out = Vec::new();
    let idp = KeyPath::root().key("identify");
    let id = &d.identify;
    let serial_keys = [
        ("firmware_key", &id.firmware_key),
        ("serial_key", &id.serial_key),
    ];
    for (name, k) in serial_keys {
        if let Some(k) = k {
            out.push((idp.key(name), FieldRead::SerialKey(k)));
        }
    }
    if let Some(p) = &id.firmware_pointer {
        out.push((idp.key("firmware_pointer"), FieldRead::Pointer(p)));
    }
    for (i, p) in id.serial_pointers.iter().enumerate() {
        out.push((idp.key("serial_pointers").index(i), FieldRead::Pointer(p)));
    }
    if let Some(p) = &d.transport.schema_pointer {
        let path = KeyPath::root().key("transport").key("schema_pointer");
        out.push((path, FieldRead::Pointer(p)));
    }
    if let (Some(table), Some(from)) = (id.firmware_table, id.firmware_address) {
        let width = match id.firmware_format {
            FirmwareFormat::MajorMinorPatch => 3,
            _ => 1,
        };
        out.push((idp.key("firmware_address"), registers(table, from, width)));
    }
    if let (Some(table), Some(from)) = (id.serial_table, id.serial_address) {
        let width = id.serial_registers.unwrap_or(1);
        out.push((idp.key("serial_address"), registers(table, from, width)));
    }
    points_read(d, &mut out);
    for (i, g) in d.diagnostics.iter().enumerate() {
        if let (Some(table), Some(start), Some(count)) = (g.table, g.start, g.count) {
            let gp = KeyPath::root().key("diagnostic").index(i);
            out.push((gp.key("start"), registers(table, start, count)));
        }
    }
    out
}

fn registers(table: Table, from: u16, width: u16) -> FieldRead<'static> {
    FieldRead::Registers {
        table,
        from,
        to: from.saturating_add(width.max(1) - 1),
    }
}

fn points_read<'d>(d: &'d ProfileDoc, out: &mut Vec<(KeyPath, FieldRead<'d>)>) {
    for (i, p) in d.points.iter().enumerate() {
        let pp = KeyPath::root().key("point").index(i);
        if let Some(k) = &p.key {
            out.push((pp.key("key"), FieldRead::SerialKey(k)));
        }
        for (name, ptr) in [
            ("pointer", &p.pointer),
            ("item", &p.item),
            ("where_pointer", &p.where_pointer),
        ] {
            if let Some(ptr) = ptr {
                out.push((pp.key(name), FieldRead::Pointer(ptr)));
            }
        }
        if let Some((table, addr, width)) = p.register_span() {
            out.push((pp.key("address"), registers(table, addr, width)));
        }
    }
}

/// Checks a profile's PHI: `device.phi` entries well formed for the transport, every
/// PHI field the model's manual names for this firmware listed in `device.phi`, and no
/// field the profile reads covered by `device.phi` or by the manual's list (of any
/// firmware of the model).
pub(crate) fn check(cx: &Ctx, d: &ProfileDoc, major: u32) -> Result<(), ProfileError> {
    let phi_key = KeyPath::root().key("device").key("phi");
    // (entry, where it is declared): the profile's own, then the manual's.
    let mut declared: Vec<(PhiEntry, String)> = Vec::new();
    for (i, s) in d.device.phi.iter().enumerate() {
        let entry = PhiEntry::parse(s).filter(|e| {
            d.transport.kind != TransportKind::Modbus || matches!(e, PhiEntry::Registers { .. })
        });
        let Some(entry) = entry else {
            return Err(cx.err(
                &phi_key.index(i),
                format!("`{s}`: a Modbus device's PHI is a register range, `holding:3` or `input:20-25`"),
            ));
        };
        declared.push((entry, "device.phi".to_string()));
    }
    if let Some(m) = manual::manual(&d.device.id) {
        for (field, source) in m.phi_for(Some(major)) {
            cx.require(
                d.device.phi.iter().any(|p| p == field),
                &phi_key,
                format!("omits `{field}`, which {source} names as personal health information"),
            )?;
        }
        for (field, source) in m.phi_for(None) {
            declared.push((PhiEntry::Name(field), source.to_string()));
        }
    }
    for (path, field) in fields_read(d) {
        if let Some((_, source)) = declared.iter().find(|(e, _)| e.covers(&field)) {
            let what = match field {
                FieldRead::SerialKey(k) | FieldRead::Pointer(k) => format!("`{k}`"),
                FieldRead::Registers { table, from, to } => {
                    format!("{table:?} registers {from}..={to}")
                }
            };
            return Err(cx.err(
                &path,
                format!("{what} is personal health information ({source}): it must never be read"),
            ));
        }
    }
    Ok(())
}

/// The field names to remove from a diagnostic answer of a device of `model`: the
/// diagnostic's `drop_fields`, the profile's `device.phi` names and the manual's PHI
/// fields for every firmware of the model.
/// A pointer entry strips its last key wherever it appears (more than it needs, never
/// less); register entries do not apply to a JSON answer.
pub fn answer_phi(model: &str, device_phi: &[String], drop_fields: &[String]) -> Vec<String> {
    let mut out: Vec<String> = drop_fields.to_vec();
    for entry in device_phi.iter().filter_map(|s| PhiEntry::parse(s)) {
        match entry {
            PhiEntry::Name(n) => out.push(n.to_string()),
            PhiEntry::Pointer(p) => out.extend(segments(p).last()),
            PhiEntry::Registers { .. } => {}
        }
    }
    out.extend(manual::phi_fields(model).into_iter().map(String::from));
    out.sort();
    out.dedup();
    out
}

/// Removes every object key named in `fields` from `answer`, at any depth (a `patient`
/// object nested in a result is PHI as much as one at the top).
pub fn strip_json(answer: &mut serde_json::Value, fields: &[String]) {
    match answer {
        serde_json::Value::Object(obj) => {
            obj.retain(|k, _| !fields.iter().any(|f| f == k));
            for v in obj.values_mut() {
                strip_json(v, fields);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                strip_json(v, fields);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_and_cover() {
        let name = PhiEntry::parse("patient").unwrap();
        assert!(name.covers(&FieldRead::Pointer("/patient/mrn")));
        assert!(name.covers(&FieldRead::Pointer("/data/patient")));
        assert!(!name.covers(&FieldRead::Pointer("/patients")));
        assert!(!name.covers(&FieldRead::SerialKey("PATIENT")));
        let ptr = PhiEntry::parse("/patient/mrn").unwrap();
        assert!(ptr.covers(&FieldRead::Pointer("/patient/mrn")));
        assert!(ptr.covers(&FieldRead::Pointer("/patient")));
        assert!(!ptr.covers(&FieldRead::Pointer("/patient/bed")));
        assert!(!ptr.covers(&FieldRead::Pointer("/patient/mrnx")));
        let regs = PhiEntry::parse("input:20-25").unwrap();
        let read = |from, to| FieldRead::Registers {
            table: Table::Input,
            from,
            to,
        };
        assert!(regs.covers(&read(25, 30)));
        assert!(regs.covers(&read(0, 20)));
        assert!(!regs.covers(&read(0, 19)));
        assert!(PhiEntry::parse("holding:9-3").is_none());
        assert!(PhiEntry::parse("input:x").is_none());
        assert!(PhiEntry::Name("a/b").covers(&FieldRead::Pointer("/a~1b")));
    }

    #[test]
    fn answer_phi_joins_the_three_lists() {
        let own = [
            "/ward/bed".to_string(),
            "input:3".to_string(),
            "nurse".into(),
        ];
        let got = answer_phi("acme/x", &own, &["token".to_string()]);
        assert_eq!(got, ["bed", "nurse", "token"]);
        let got = answer_phi("lumen/lip-300", &[], &[]);
        assert_eq!(got, ["PID"]);
    }

    #[test]
    fn strip_removes_phi_at_any_depth() {
        let mut v = serde_json::json!({
            "overall": "pass",
            "patient": {"mrn": "MRN1"},
            "items": {"ecg": "pass", "vitals": {"hr": 72}},
            "list": [{"pt_id": "x", "ok": 1}]
        });
        strip_json(&mut v, &answer_phi("vistara/vm-12", &[], &[]));
        assert_eq!(
            v,
            serde_json::json!({"overall": "pass", "items": {"ecg": "pass"}, "list": [{"ok": 1}]})
        );
    }
}

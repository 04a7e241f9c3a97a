//! Invalid profiles are refused with the file, the line and the key that is wrong.

use tend_profiles::load::BUILTIN;
use tend_profiles::{parse_profile, ProfileError};

fn builtin(name: &str) -> &'static str {
    BUILTIN.iter().find(|(n, _)| n.contains(name)).unwrap().1
}

fn line_of(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).unwrap() + 1
}

fn refuse(src: &str) -> ProfileError {
    parse_profile("test.toml", src).expect_err("profile should be refused")
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let src =
        builtin("av-500-5").replacen("max_registers = 32", "max_registers = 32\nmax_regs = 40", 1);
    let e = refuse(&src);
    assert_eq!(e.file, "test.toml");
    assert_eq!(e.key, "transport.max_regs");
    assert_eq!(e.line, line_of(&src, "max_regs = 40"));
    assert!(
        e.to_string()
            .starts_with(&format!("test.toml:{}: key `transport.max_regs`", e.line)),
        "{e}"
    );
}

#[test]
fn wrong_type_is_named() {
    let src = builtin("hm-2-3").replacen("max_registers = 64", "max_registers = \"many\"", 1);
    let e = refuse(&src);
    assert_eq!(e.line, line_of(&src, "max_registers = \"many\""));
    assert!(e.key.contains("max_registers"), "{e}");
}

#[test]
fn missing_section_is_named() {
    let src = builtin("hm-2-2");
    let start = src.find("[identify]").unwrap();
    let end = src[start..].find("[[point]]").unwrap() + start;
    let src = format!("{}{}", &src[..start], &src[end..]);
    let e = refuse(&src);
    assert_eq!(e.key, "identify", "{e}");
}

#[test]
fn rule_naming_an_unknown_point() {
    let src =
        builtin("av-500-4").replacen("point = \"alarm_word_2\"", "point = \"alarm_word_3\"", 1);
    let e = refuse(&src);
    assert_eq!(e.key, "rule[1].point");
    assert_eq!(e.line, line_of(&src, "point = \"alarm_word_3\""));
    assert!(e.message.contains("alarm_word_3"), "{e}");
}

#[test]
fn a_point_reading_phi_is_refused() {
    let src = builtin("lip-300-2").replacen(
        "[[point]]\nname = \"battery\"",
        "[[point]]\nname = \"patient\"\ntype = \"text\"\nrequest = \"STATUS\"\nkey = \"PID\"\n\n[[point]]\nname = \"battery\"",
        1,
    );
    let e = refuse(&src);
    assert!(e.key.ends_with(".key"), "{e}");
    assert_eq!(e.line, line_of(&src, "key = \"PID\""));
    assert!(e.message.contains("personal health information"), "{e}");

    let src = builtin("vm-12-7").replacen(
        "pointer = \"/temps/board_c\"",
        "pointer = \"/patient/name\"",
        1,
    );
    let e = refuse(&src);
    assert!(e.message.contains("personal health information"), "{e}");
    assert_eq!(e.line, line_of(&src, "pointer = \"/patient/name\""));
}

#[test]
fn bad_values_in_nested_tables() {
    let src = builtin("av-500-5").replacen(
        "{ bit = 9, description = \"EEPROM error\", class = \"major\"",
        "{ bit = 9, description = \"EEPROM error\", class = \"huge\"",
        1,
    );
    let e = refuse(&src);
    assert_eq!(e.line, line_of(&src, "class = \"huge\""));
    assert!(e.message.contains("huge"), "{e}");

    let src = builtin("av-500-5").replacen(
        "{ bit = 9, description = \"EEPROM error\", class = \"major\", ",
        "{ bit = 9, description = \"EEPROM error\", ",
        1,
    );
    let e = refuse(&src);
    assert_eq!(e.key, "rule[0].bits[9].class");
    assert_eq!(
        e.line,
        line_of(&src, "{ bit = 9, description = \"EEPROM error\"")
    );
}

#[test]
fn semantic_errors() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "av-500-5",
            "max_registers = 32",
            "max_registers = 300",
            "transport.max_registers",
        ),
        (
            "av-500-5",
            "reply_timeout = \"300ms\"\n",
            "",
            "transport.reply_timeout",
        ),
        (
            "av-500-5",
            "firmware = \"5.x\"",
            "firmware = \"five\"",
            "device.firmware",
        ),
        (
            "av-500-5",
            "id = \"aeris/av-500\"",
            "id = \"Aeris AV500\"",
            "device.id",
        ),
        (
            "av-500-5",
            "address = 15\n",
            "address = 25\n",
            "point[15].address",
        ),
        (
            "av-500-5",
            "otherwise_class = \"complex\"\n",
            "",
            "rule[2].otherwise_class",
        ),
        (
            "av-500-5",
            "name = \"status-registers\"",
            "name = \"readings\"",
            "diagnostic[1].name",
        ),
        (
            "lip-300-3",
            "poll = [\"STATUS\", \"COUNTERS\"]",
            "poll = [\"STATUS\"]",
            "point[6].request",
        ),
        (
            "vm-12-7",
            "status_topic = \"vistara/{serial}/status\"",
            "status_topic = \"vistara/status\"",
            "transport.status_topic",
        ),
        (
            "hm-2-2",
            "silence_fault_after = \"5m\"\n",
            "",
            "device.silence_fault_after",
        ),
        (
            "hm-2-2",
            "falls_by = 0.5",
            "falls_by = -1.0",
            "rule[2].falls_by",
        ),
        (
            "hm-2-2",
            "window = \"24h\"",
            "window = \"24 fortnights\"",
            "window",
        ),
    ];
    for (profile, from, to, key) in cases {
        let src = builtin(profile);
        assert!(src.contains(from), "{profile}: {from:?} not found");
        let bad = src.replacen(from, to, 1);
        let e = refuse(&bad);
        assert!(e.key.contains(key), "{profile} {from:?}->{to:?}: got {e}");
        assert!(e.line >= 1);
    }
}

#[test]
fn not_toml_at_all() {
    let e = refuse("this is [ not toml");
    assert_eq!(e.line, 1);
    let e = refuse("");
    assert_eq!(e.key, "device");
    let e = refuse("\u{0}\u{1}\u{2}");
    assert!(!e.message.is_empty());
}

/// Errors serde finds inside a rule or the transport name the key's own line. (Why
/// `RuleDef` and `TransportDef` are flat structs, not serde tagged enums: an internally
/// tagged enum buffers the table, and every error inside it is then reported at the
/// start of the `[[rule]]` array with key `rule`.)
#[test]
fn errors_inside_rules_and_transport_name_the_line() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "hm-2-2",
            "falls_by = 0.5",
            "falls_by = \"x\"",
            "rule.falls_by",
        ),
        (
            "hm-2-2",
            "window = \"24h\"",
            "window = \"24 fortnights\"",
            "rule.window",
        ),
        (
            "hm-2-2",
            "falls_by = 0.5",
            "falls_by = 0.5\nfals_by = 1",
            "rule.fals_by",
        ),
        (
            "lip-300-3",
            "baud = 9600",
            "baud = \"fast\"",
            "transport.baud",
        ),
    ];
    for (profile, from, to, key) in cases {
        let src = builtin(profile);
        assert!(src.contains(from), "{profile}: {from:?} not found");
        let bad = src.replacen(from, to, 1);
        let e = refuse(&bad);
        assert_eq!(&e.key, key, "{profile} {from:?}->{to:?}: got {e}");
        let written = to.lines().last().unwrap_or(to);
        assert_eq!(e.line, line_of(&bad, written), "{e}");
    }
}

/// One refusal: `from` replaced by `to` in a built-in profile (after `edit`, which may
/// rename the model) is refused at `key`, on the line where `at` is written, with a
/// message containing `says`.
fn refused_at(src: &str, from: &str, to: &str, key: &str, at: &str, says: &str) {
    assert!(src.contains(from), "{from:?} not found");
    let bad = src.replacen(from, to, 1);
    let e = refuse(&bad);
    assert_eq!(e.key, key, "{from:?}->{to:?}: got {e}");
    assert_eq!(e.line, line_of(&bad, at), "{e}");
    assert!(e.message.contains(says), "{from:?}->{to:?}: got {e}");
    assert!(
        e.to_string()
            .starts_with(&format!("test.toml:{}: key `{key}`", e.line)),
        "{e}"
    );
}

const PHI: &str = "personal health information";

#[test]
fn an_identity_pointer_reading_phi_is_refused() {
    let to = "serial_pointers = [\"/serial\", \"/patient/mrn\"]";
    refused_at(
        builtin("vm-12-7"),
        "serial_pointers = [\"/serial\", \"/sn\"]",
        to,
        "identify.serial_pointers[1]",
        to,
        PHI,
    );
}

#[test]
fn a_serial_identity_key_reading_phi_is_refused() {
    refused_at(
        builtin("lip-300-2"),
        "serial_key = \"SN\"",
        "serial_key = \"PID\"",
        "identify.serial_key",
        "serial_key = \"PID\"",
        PHI,
    );
}

#[test]
fn a_schema_pointer_reading_phi_is_refused() {
    refused_at(
        builtin("vm-12-6"),
        "schema_pointer = \"/schema\"",
        "schema_pointer = \"/pt_name\"",
        "transport.schema_pointer",
        "schema_pointer = \"/pt_name\"",
        PHI,
    );
}

#[test]
fn codes_items_and_conditions_reading_phi_are_refused() {
    refused_at(
        builtin("vm-12-7"),
        "item = \"/code\"",
        "item = \"/vitals\"",
        "point[5].item",
        "item = \"/vitals\"",
        PHI,
    );
    refused_at(
        builtin("vm-12-7"),
        "where_pointer = \"/status\"",
        "where_pointer = \"/patient/bed\"",
        "point[6].where_pointer",
        "where_pointer = \"/patient/bed\"",
        PHI,
    );
}

#[test]
fn the_manuals_phi_applies_when_device_phi_leaves_it_out() {
    // VS-IOT-12 §3 names `hr` (6.x): a 7.x profile may not read it either, though its
    // own device.phi lists only `patient` and `vitals`.
    refused_at(
        builtin("vm-12-7"),
        "pointer = \"/temps/board_c\"",
        "pointer = \"/hr\"",
        "point[4].pointer",
        "pointer = \"/hr\"",
        "VS-IOT-12 issue 3 §3",
    );
    // A known model's device.phi must list every PHI field its manual names.
    refused_at(
        builtin("lip-300-3"),
        "phi = [\"PID\"]",
        "phi = []",
        "device.phi",
        "phi = []",
        "omits `PID`, which LM-SDI-300 rev F §5",
    );
    refused_at(
        builtin("vm-12-7"),
        "phi = [\"patient\", \"vitals\"]",
        "phi = [\"patient\"]",
        "device.phi",
        "phi = [\"patient\"]",
        "omits `vitals`",
    );
}

#[test]
fn an_unknown_model_is_checked_against_its_own_phi_list() {
    let src = builtin("vm-12-6");
    // Without the golden vectors, whose `absent` list holds the heart rate.
    let src = &src[..src.find("[[golden]]").unwrap()];
    let other = src.replacen("id = \"vistara/vm-12\"", "id = \"acme/mon-1\"", 1);
    let reads_hr = other.replacen("pointer = \"/poh\"", "pointer = \"/hr\"", 1);
    let no_phi = reads_hr.replacen("phi = [\"pt_name\", \"pt_id\", \"hr\"]", "phi = []", 1);
    // Nothing says `hr` is PHI for this model: its own list is all there is.
    if let Err(e) = parse_profile("test.toml", &no_phi) {
        panic!("{e}");
    }
    refused_at(
        &reads_hr,
        "phi = [\"pt_name\", \"pt_id\", \"hr\"]",
        "phi = [\"hr\"]",
        "point[4].pointer",
        "pointer = \"/hr\"",
        "(device.phi)",
    );
}

#[test]
fn modbus_phi_is_a_register_range_and_no_read_may_cover_it() {
    let other = builtin("av-500-5").replacen("id = \"aeris/av-500\"", "id = \"acme/vent\"", 1);
    refused_at(
        &other,
        "phi = []",
        "phi = [\"holding:5\"]",
        "identify.serial_address",
        "serial_address = 3",
        PHI,
    );
    let bad = other.replacen("phi = []", "phi = [\"input:13\"]", 1);
    let e = refuse(&bad);
    assert!(
        e.key.starts_with("point[") && e.key.ends_with(".address"),
        "{e}"
    );
    assert!(e.message.contains("Input registers 13..=13"), "{e}");
    // A register dump of a diagnostic reads PHI as much as a point does.
    let bad = other.replacen("phi = []", "phi = [\"input:17-18\"]", 1);
    let e = refuse(&bad);
    assert_eq!(e.key, "diagnostic[1].start", "{e}");
    refused_at(
        &other,
        "phi = []",
        "phi = [\"patient_id\"]",
        "device.phi[0]",
        "phi = [\"patient_id\"]",
        "register range",
    );
}

#[test]
fn mqtt_commands_are_the_manuals_read_only_requests() {
    refused_at(
        builtin("vm-12-7"),
        "command = \"selftest\"",
        "command = \"factory_reset\"",
        "diagnostic[0].command",
        "command = \"factory_reset\"",
        "not a read-only request of VS-IOT-12 issue 3 (VS-IOT-12 issue 3 §5 declares selftest, errlog)",
    );
    refused_at(
        builtin("vm-12-7"),
        "args = { lines = 20 }",
        "args = { lines = 20, clear = true }",
        "diagnostic[1].args.clear",
        "args = { lines = 20, clear = true }",
        "not an argument",
    );
    // Firmware 6.x has no commands at all (VS-IOT-12 §5 is for 7.x).
    let with_cmd = format!(
        "{}\n[[diagnostic]]\nname = \"selftest\"\ndescription = \"x\"\ncommand = \"selftest\"\n",
        builtin("vm-12-6")
    );
    let e = refuse(&with_cmd);
    assert_eq!(e.key, "diagnostic[0].command", "{e}");
    assert!(
        e.message.contains("no device requests for firmware 6.x"),
        "{e}"
    );
}

#[test]
fn an_unknown_models_command_cites_its_manual() {
    let other = builtin("vm-12-7").replacen("id = \"vistara/vm-12\"", "id = \"acme/mon-1\"", 1);
    let e = refuse(&other);
    assert_eq!(e.key, "diagnostic[0].manual_ref", "{e}");
    assert_eq!(e.line, line_of(&other, "[[diagnostic]]"), "{e}");
    let cited = other
        .replacen(
            "command = \"selftest\"",
            "command = \"selftest\"\nmanual_ref = \"ACME-1 §5\"",
            1,
        )
        .replacen(
            "command = \"errlog\"",
            "command = \"errlog\"\nmanual_ref = \"ACME-1 §5\"",
            1,
        );
    assert!(parse_profile("test.toml", &cited).is_ok());
}

#[test]
fn serial_requests_are_the_manuals_read_only_requests() {
    refused_at(
        builtin("lip-300-3"),
        "request = \"Q|SELFTEST\"",
        "request = \"Q|CALIBRATE\"",
        "diagnostic[0].request",
        "request = \"Q|CALIBRATE\"",
        "not a read-only request of LM-SDI-300 rev F",
    );
    let e = refuse(&builtin("lip-300-3").replacen(
        "poll = [\"STATUS\", \"COUNTERS\"]",
        "poll = [\"STATUS\", \"COUNTERS\", \"RESET\"]",
        1,
    ));
    assert_eq!(e.key, "transport.poll[2]", "{e}");
    assert!(e.message.contains("`RESET`"), "{e}");
    refused_at(
        builtin("lip-300-2"),
        "request = \"INFO\"",
        "request = \"ZERO\"",
        "identify.request",
        "request = \"ZERO\"",
        "not a read-only request",
    );
}

#[test]
fn read_every_is_for_modbus_points_nothing_current_depends_on() {
    let av = builtin("av-500-5");
    let mains = "name = \"mains\"\ntype = \"u16\"\ntable = \"input\"\naddress = 12\n";
    let slow_mains = format!("{mains}read_every = \"2m\"\n");
    // A serial device answers one request for all its fields: nothing to read less often.
    refused_at(
        builtin("lip-300-3"),
        "key = \"MODE\"\n",
        "key = \"MODE\"\nread_every = \"1m\"\n",
        "point[0].read_every",
        "read_every = \"1m\"",
        "only a Modbus point",
    );
    refused_at(
        av,
        mains,
        &format!("{mains}read_every = \"500ms\"\n"),
        "point[12].read_every",
        "read_every = \"500ms\"",
        "500ms is not between 1s and 1d",
    );
    refused_at(
        av,
        mains,
        &format!("{mains}read_every = \"2d\"\n"),
        "point[12].read_every",
        "read_every = \"2d\"",
        "2d is not between 1s and 1d",
    );
    // A fault must never wait for a slower read: the point a fault rule reads, directly.
    refused_at(
        av,
        "name = \"error_code\"\n",
        "name = \"error_code\"\nread_every = \"10s\"\n",
        "point[5].read_every",
        "read_every = \"10s\"",
        "read by fault rule",
    );
    // Evidence and availability must be current too.
    let with_evidence = av.replacen("\"error_code\"]", "\"error_code\", \"mains\"]", 1);
    refused_at(
        &with_evidence,
        mains,
        &slow_mains,
        "point[12].read_every",
        "read_every = \"2m\"",
        "fault evidence",
    );
    let with_availability = av.replacen(
        "maintenance_when = [{ point = \"state\", equals = 3 }]",
        "maintenance_when = [{ point = \"mains\", equals = 3 }]",
        1,
    );
    refused_at(
        &with_availability,
        mains,
        &slow_mains,
        "point[12].read_every",
        "read_every = \"2m\"",
        "decides availability",
    );
    // Nor through a signal condition: PM_DUE is raised from pm_days and pm_interval.
    let pm_decides = av.replacen(
        "maintenance_when = [{ point = \"state\", equals = 3 }]",
        "maintenance_when = [{ point = \"state\", equals = 3 }, { signal = \"PM_DUE\" }]",
        1,
    );
    assert_ne!(pm_decides, av);
    let e = refuse(&pm_decides);
    assert_eq!(e.key, "point[0].read_every", "{e}");
    assert!(e.message.contains("`pm_days` decides availability"), "{e}");
    // A reading nothing else needs may be read once a minute.
    parse_profile("test.toml", &av.replacen(mains, &slow_mains, 1)).expect("a slow reading");
}

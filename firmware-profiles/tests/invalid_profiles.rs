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

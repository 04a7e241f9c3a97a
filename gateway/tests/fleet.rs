//! The fleet file: the DESIGN §4 example loads; every mistake is refused with file, line
//! and key.

use tend_gateway::fleet::{Fleet, ServiceArea};

const GOOD: &str = r#"
[[customer]]
id = "c-017"
name = "Jiangbei District Hospital"
contact_name = "Wang Lei"
contact_phone = "+86 23 6000 1234"

[[site]]
id = "s-017-main"
customer = "c-017"
name = "Main building"
address = "12 Jianxin Rd, Chongqing"
service_area = "same_city"        # same_city | other_city | remote

[[site]]
id = "s-017-east"
customer = "c-017"
name = "East campus"
address = "88 Wanzhou Rd"
service_area = "other_city"

[[device]]
id = "icu7-vent"                  # the id the agent's config uses
site = "s-017-main"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"           # warranty runs 2 years from acceptance
extended_warranty_until = "2028-03-01"   # optional

[[device]]
id = "mri-helium"
site = "s-017-east"
serial = "HM2-0042"
location = "MRI room 1"
accepted = 2022-06-15
kind = "helium_monitor"
"#;

fn refuse(src: &str) -> tend_profiles::ProfileError {
    Fleet::parse("fleet.toml", src).expect_err("should be refused")
}

fn line(src: &str, needle: &str) -> usize {
    src.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn design_example_loads() {
    let f = Fleet::parse("fleet.toml", GOOD).unwrap();
    assert_eq!(f.len(), 2);
    let e = f.device("icu7-vent").unwrap();
    assert_eq!(e.customer.name, "Jiangbei District Hospital");
    assert_eq!(e.site.service_area, ServiceArea::SameCity);
    assert_eq!(e.device.accepted.to_string(), "2025-03-01");
    assert_eq!(
        e.device.extended_warranty_until.map(|d| d.to_string()),
        Some("2028-03-01".into())
    );
    let m = f.device("mri-helium").unwrap();
    // A bare TOML date means the same as a quoted one.
    assert_eq!(m.device.accepted.to_string(), "2022-06-15");
    assert_eq!(m.device.kind.as_deref(), Some("helium_monitor"));
    assert_eq!(m.site.service_area, ServiceArea::OtherCity);
    assert!(f.device("nope").is_none());
    assert_eq!(f.devices().count(), 2);
    assert!(f.site("s-017-east").is_some() && f.customer("c-017").is_some());
}

#[test]
fn empty_fleet_is_valid() {
    assert!(Fleet::parse("fleet.toml", "").unwrap().is_empty());
}

#[test]
fn every_error_names_file_line_and_key() {
    // (replace this, with that, expect a key containing, on the line containing)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "location = \"ICU bed 7\"",
            "location = \"ICU bed 7\"\nroom = 3",
            "room",
            "room = 3",
        ),
        (
            "accepted = \"2025-03-01\"",
            "accepted = \"2025-02-30\"",
            "accepted",
            "2025-02-30",
        ),
        (
            "accepted = \"2025-03-01\"",
            "accepted = \"1 March\"",
            "accepted",
            "1 March",
        ),
        (
            "accepted = 2022-06-15",
            "accepted = 2022-06-15T10:00:00Z",
            "accepted",
            "2022-06-15T10",
        ),
        (
            "site = \"s-017-main\"",
            "site = \"s-999\"",
            "device[0].site",
            "s-999",
        ),
        (
            "customer = \"c-017\"\nname = \"East",
            "customer = \"c-018\"\nname = \"East",
            "site[1].customer",
            "c-018",
        ),
        (
            "id = \"s-017-east\"",
            "id = \"s-017-main\"",
            "site[1].id",
            "id = \"s-017-main\"\ncustomer = \"c-017\"\nname = \"East",
        ),
        (
            "id = \"mri-helium\"",
            "id = \"icu7-vent\"",
            "device[1].id",
            "id = \"icu7-vent\"\nsite = \"s-017-east\"",
        ),
        (
            "serial = \"HM2-0042\"",
            "serial = \"AV5C-21-004417\"",
            "device[1].serial",
            "serial = \"AV5C-21-004417\"\nlocation = \"MRI",
        ),
        (
            "service_area = \"other_city\"",
            "service_area = \"abroad\"",
            "service_area",
            "abroad",
        ),
        (
            "extended_warranty_until = \"2028-03-01\"",
            "extended_warranty_until = \"2024-03-01\"",
            "device[0].extended_warranty_until",
            "2024-03-01",
        ),
        (
            "serial = \"HM2-0042\"\n",
            "",
            "serial",
            "[[device]]\nid = \"mri",
        ),
        ("id = \"c-017\"", "id = \"\"", "customer[0].id", "id = \"\""),
    ];
    for (from, to, key, at) in cases {
        assert!(GOOD.contains(from), "{from}");
        let bad = GOOD.replacen(from, to, 1);
        let e = refuse(&bad);
        assert_eq!(e.file, "fleet.toml");
        assert!(e.key.contains(key), "{from:?} -> {to:?}: {e}");
        // `at` may span lines: the error names the first of them.
        let first = at.lines().next().unwrap();
        let want = if at.contains('\n') {
            bad.find(at).map(|p| bad[..p].lines().count() + 1).unwrap()
        } else {
            line(&bad, first)
        };
        assert_eq!(e.line, want, "{from:?} -> {to:?}: {e}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn load_reads_a_file_and_names_a_missing_one() {
    let dir = std::env::temp_dir().join(format!("tend-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("fleet.toml");
    std::fs::write(&p, GOOD).unwrap();
    assert_eq!(Fleet::load(&p).unwrap().len(), 2);
    let e = Fleet::load(&dir.join("missing.toml")).unwrap_err();
    assert!(e.file.ends_with("missing.toml") && e.message.contains("cannot read"));
    std::fs::remove_dir_all(&dir).unwrap();
}

//! SLA deadlines, warranty and clinical impact per service-backend-api.md.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use tend_gateway::fleet::{Fleet, ServiceArea};
use tend_gateway::sla::{
    clinical_impact, deadlines, effective_class, escalated_deadlines, rfc3339, warranty,
    ClinicalImpact, Deadlines, Terms, WarrantyStatus,
};

const SEED: Terms = Terms::SEED;
use tend_profiles::{FaultClass, SignalKind};

fn tz() -> TimeZone {
    TimeZone::get("Asia/Shanghai").unwrap()
}

const T0: &str = "2026-11-28T02:15:02Z"; // 10:15:02 in Shanghai

fn dl(
    kind: SignalKind,
    class: Option<FaultClass>,
    area: ServiceArea,
    due: Option<&str>,
) -> [Option<String>; 4] {
    let d: Deadlines = deadlines(T0.parse().unwrap(), kind, class, area, due, &tz(), &SEED);
    let j = d.to_json(&tz());
    [Some(j.respond_by), j.onsite_by, j.plan_by, j.resolve_by]
}

fn s(x: &str) -> Option<String> {
    Some(x.to_string())
}

#[test]
fn fault_deadlines_by_class_and_area() {
    use FaultClass::*;
    use ServiceArea::*;
    let respond = s("2026-11-28T11:15:02+08:00");
    let onsite = |area| match area {
        SameCity => s("2026-11-28T13:15:02+08:00"),
        OtherCity => s("2026-11-29T10:15:02+08:00"),
        Remote => s("2026-11-30T10:15:02+08:00"),
    };
    for area in [SameCity, OtherCity, Remote] {
        assert_eq!(
            dl(SignalKind::Fault, Some(Simple), area, None),
            [respond.clone(), None, None, s("2026-11-29T10:15:02+08:00")]
        );
        assert_eq!(
            dl(SignalKind::Fault, Some(Complex), area, None),
            [
                respond.clone(),
                onsite(area),
                s("2026-11-30T10:15:02+08:00"),
                None
            ]
        );
        assert_eq!(
            dl(SignalKind::Fault, Some(Major), area, None),
            [
                respond.clone(),
                onsite(area),
                None,
                s("2026-12-01T10:15:02+08:00")
            ]
        );
        // No class: complex. monitoring_lost: by its class, complex when none.
        assert_eq!(
            dl(SignalKind::Fault, None, area, None),
            dl(SignalKind::Fault, Some(Complex), area, None)
        );
        assert_eq!(
            dl(SignalKind::MonitoringLost, None, area, None),
            dl(SignalKind::Fault, Some(Complex), area, None)
        );
        assert_eq!(
            dl(SignalKind::MonitoringLost, Some(Major), area, None),
            dl(SignalKind::Fault, Some(Major), area, None)
        );
    }
}

#[test]
fn maintenance_and_consumables_by_due_date() {
    let area = ServiceArea::Remote;
    for kind in [SignalKind::MaintenanceDue, SignalKind::Consumable] {
        let resolve = |due| dl(kind, Some(FaultClass::Major), area, due)[3].clone();
        // Due later: the end of that day, local.
        assert_eq!(resolve(Some("2026-12-10")), s("2026-12-10T23:59:59+08:00"));
        assert_eq!(resolve(Some("2026-11-29")), s("2026-11-29T23:59:59+08:00"));
        // Due today, past, missing or unreadable: +24 h.
        for due in [Some("2026-11-28"), Some("2026-01-01"), None, Some("soon")] {
            assert_eq!(resolve(due), s("2026-11-29T10:15:02+08:00"), "{due:?}");
        }
        // A full time is taken as the instant.
        assert_eq!(
            resolve(Some("2026-12-02T00:00:00Z")),
            s("2026-12-02T08:00:00+08:00")
        );
        // Scheduled work: never an on-site or plan deadline, whatever the class.
        let d = dl(kind, Some(FaultClass::Major), area, Some("2026-12-10"));
        assert_eq!(d[0], s("2026-11-28T11:15:02+08:00"));
        assert_eq!((d[1].clone(), d[2].clone()), (None, None));
    }
}

#[test]
fn the_date_line_is_local() {
    // 17:00Z on the 28th is already the 29th in Shanghai: a due date of the 29th is today.
    let at: Timestamp = "2026-11-28T17:00:00Z".parse().unwrap();
    let d = deadlines(
        at,
        SignalKind::Consumable,
        None,
        ServiceArea::SameCity,
        Some("2026-11-29"),
        &tz(),
        &SEED,
    );
    assert_eq!(
        rfc3339(d.resolve_by.unwrap(), &tz()),
        "2026-11-30T01:00:00+08:00"
    );
    assert_eq!(rfc3339(at, &TimeZone::UTC), "2026-11-28T17:00:00+00:00");
}

#[test]
fn deadlines_are_elapsed_time_across_dst() {
    // Berlin springs forward on 2026-03-29 at 02:00 local (01:00Z): 24 h after 02:30
    // local on the 28th is 03:30 local on the 29th, not a wall-clock "same time tomorrow".
    let berlin = TimeZone::get("Europe/Berlin").unwrap();
    let at: Timestamp = "2026-03-28T01:30:00Z".parse().unwrap(); // 02:30+01:00
    let d = deadlines(
        at,
        SignalKind::Fault,
        Some(FaultClass::Simple),
        ServiceArea::SameCity,
        None,
        &berlin,
        &SEED,
    );
    assert_eq!(
        rfc3339(d.resolve_by.unwrap(), &berlin),
        "2026-03-29T03:30:00+02:00"
    );
}

const FLEET: &str = r#"
[[customer]]
id = "c"
name = "C"
contact_name = "N"
contact_phone = "1"
[[site]]
id = "s"
customer = "c"
name = "S"
address = "A"
service_area = "remote"
[[device]]
id = "plain"
site = "s"
serial = "1"
location = "L"
accepted = "2025-03-01"
[[device]]
id = "ext"
site = "s"
serial = "2"
location = "L"
accepted = "2025-03-01"
extended_warranty_until = "2028-03-01"
[[device]]
id = "leap"
site = "s"
serial = "3"
location = "L"
accepted = "2024-02-29"
"#;

#[test]
fn warranty_status() {
    let f = Fleet::parse("fleet.toml", FLEET).unwrap();
    let tz = tz();
    // Noon in Shanghai on the given day.
    let on = |day: &str| -> Timestamp { format!("{day}T04:00:00Z").parse().unwrap() };
    let w = |id: &str, day: &str| warranty(f.device(id).unwrap().device, on(day), &tz, &SEED);

    let x = w("plain", "2026-11-28");
    assert_eq!(
        (x.status, x.until.to_string(), x.billable),
        (WarrantyStatus::InWarranty, "2027-03-01".into(), false)
    );
    // The until day is covered; the day after is not.
    assert_eq!(w("plain", "2027-03-01").status, WarrantyStatus::InWarranty);
    let x = w("plain", "2027-03-02");
    assert_eq!(
        (x.status, x.until.to_string(), x.billable),
        (WarrantyStatus::Expired, "2027-03-01".into(), true)
    );
    // Before acceptance (a fault during commissioning): in warranty, not billable.
    assert_eq!(w("plain", "2025-01-01").status, WarrantyStatus::InWarranty);

    assert_eq!(w("ext", "2026-11-28").status, WarrantyStatus::InWarranty);
    let x = w("ext", "2027-03-02");
    assert_eq!(
        (x.status, x.until.to_string(), x.billable),
        (WarrantyStatus::Extended, "2028-03-01".into(), false)
    );
    assert_eq!(w("ext", "2028-03-01").status, WarrantyStatus::Extended);
    let x = w("ext", "2028-03-02");
    assert_eq!(
        (x.status, x.until.to_string(), x.billable),
        (WarrantyStatus::Expired, "2028-03-01".into(), true)
    );

    // Accepted on Feb 29: two years later is Feb 28.
    assert_eq!(w("leap", "2026-02-28").until.to_string(), "2026-02-28");
    assert_eq!(w("leap", "2026-03-01").status, WarrantyStatus::Expired);

    // The day is the configured zone's: 23:30Z on 2027-03-01 is March 2nd in Shanghai.
    let late: Timestamp = "2027-03-01T23:30:00Z".parse().unwrap();
    assert_eq!(
        warranty(f.device("plain").unwrap().device, late, &tz, &SEED).status,
        WarrantyStatus::Expired
    );
    assert_eq!(
        serde_json::to_value(w("plain", "2026-11-28")).unwrap(),
        serde_json::json!({"status": "in_warranty", "until": "2027-03-01", "billable": false})
    );
}

#[test]
fn clinical_impact_rule() {
    use FaultClass::*;
    for c in [Simple, Complex, Major] {
        assert_eq!(clinical_impact(false, c), ClinicalImpact::High);
    }
    assert_eq!(clinical_impact(true, Major), ClinicalImpact::Medium);
    assert_eq!(clinical_impact(true, Complex), ClinicalImpact::Medium);
    assert_eq!(clinical_impact(true, Simple), ClinicalImpact::Low);
    assert_eq!(effective_class(SignalKind::Consumable, None), Simple);
    assert_eq!(effective_class(SignalKind::MonitoringLost, None), Complex);
    assert_eq!(effective_class(SignalKind::Fault, Some(Major)), Major);
}

const CONTRACTS: &str = r#"
[[customer]]
id = "c"
name = "C"
contact_name = "N"
contact_phone = "1"
[[customer]]
id = "d"
name = "D"
contact_name = "N"
contact_phone = "2"
[[site]]
id = "s"
customer = "c"
name = "S"
address = "A"
service_area = "same_city"
[[device]]
id = "under-k"
site = "s"
serial = "1"
location = "L"
accepted = "2025-03-01"
[[device]]
id = "named"
site = "s"
serial = "2"
location = "L"
accepted = "2025-03-01"
contract = "gold"
[[contract]]
id = "k"
customer = "c"
start = "2026-01-01"
end = "2026-12-31"
availability_target = 0.99
warranty_months = 36
respond = "30m"
onsite = { same_city = "2h" }
major_fix = "48h"
pm_interval_days = 90
[[contract]]
id = "gold"
respond = "15m"
"#;

#[test]
fn contracts_set_the_terms_and_every_key_left_out_keeps_the_seed() {
    let f = Fleet::parse("fleet.toml", CONTRACTS).unwrap();
    let day = |d: &str| d.parse::<jiff::civil::Date>().unwrap();
    let e = f.device("under-k").unwrap();
    // In force: the customer's contract.
    let t = e.terms_on(day("2026-11-28"));
    assert_eq!(e.contract_on(day("2026-11-28")).unwrap().id, "k");
    assert_eq!(t.respond, jiff::SignedDuration::from_mins(30));
    assert_eq!(t.onsite_same_city, jiff::SignedDuration::from_hours(2));
    assert_eq!(t.onsite_other_city, SEED.onsite_other_city);
    assert_eq!(t.major_fix, jiff::SignedDuration::from_hours(48));
    assert_eq!(t.complex_plan, SEED.complex_plan);
    assert_eq!(
        (t.availability_target, t.warranty_months, t.pm_interval_days),
        (0.99, 36, 90)
    );
    // Outside its period: the seed's.
    assert_eq!(e.terms_on(day("2027-01-01")), SEED);
    assert!(e.contract_on(day("2025-12-31")).is_none());
    // A device naming a contract gets it, whoever's the customer's is.
    let g = f.device("named").unwrap();
    assert_eq!(g.contract_on(day("2026-11-28")).unwrap().id, "gold");
    assert_eq!(
        g.terms_on(day("2026-11-28")).respond,
        jiff::SignedDuration::from_mins(15)
    );
    assert_eq!(g.terms_on(day("2026-11-28")).major_fix, SEED.major_fix);

    // Deadlines and warranty follow the contract.
    let at: Timestamp = T0.parse().unwrap();
    let d = deadlines(
        at,
        SignalKind::Fault,
        Some(FaultClass::Major),
        ServiceArea::SameCity,
        None,
        &tz(),
        &t,
    );
    let j = d.to_json(&tz());
    assert_eq!(j.respond_by, "2026-11-28T10:45:02+08:00");
    assert_eq!(j.onsite_by.as_deref(), Some("2026-11-28T12:15:02+08:00"));
    assert_eq!(j.resolve_by.as_deref(), Some("2026-11-30T10:15:02+08:00"));
    let w = warranty(e.device, at, &tz(), &t);
    assert_eq!(w.until.to_string(), "2028-03-01");
}

#[test]
fn an_escalation_brings_the_new_class_deadlines_from_the_moment_it_rose() {
    let at: Timestamp = T0.parse().unwrap();
    let old = deadlines(
        at,
        SignalKind::Fault,
        Some(FaultClass::Complex),
        ServiceArea::SameCity,
        None,
        &tz(),
        &SEED,
    );
    assert!(old.plan_by.is_some() && old.resolve_by.is_none());
    // Helium low (complex) becomes critical (major) 10 hours later.
    let rose = at
        .checked_add(jiff::SignedDuration::from_hours(10))
        .unwrap();
    let new = escalated_deadlines(&old, rose, FaultClass::Major, ServiceArea::SameCity, &SEED);
    assert_eq!(new.respond_by, old.respond_by);
    assert_eq!(new.plan_by, None);
    assert_eq!(
        rfc3339(new.resolve_by.unwrap(), &tz()),
        "2026-12-01T20:15:02+08:00"
    );
    // The on-site promise already made was earlier: it stands.
    assert_eq!(new.onsite_by, old.onsite_by);
    // Simple → major at once: on site 3 h from the rise.
    let simple = deadlines(
        at,
        SignalKind::Fault,
        Some(FaultClass::Simple),
        ServiceArea::SameCity,
        None,
        &tz(),
        &SEED,
    );
    let new = escalated_deadlines(
        &simple,
        rose,
        FaultClass::Major,
        ServiceArea::SameCity,
        &SEED,
    );
    assert_eq!(
        rfc3339(new.onsite_by.unwrap(), &tz()),
        "2026-11-28T23:15:02+08:00"
    );
}

#[test]
fn bad_contracts_are_named_with_file_line_and_key() {
    let base = CONTRACTS.split("[[contract]]").next().unwrap().to_string();
    let cases: &[(&str, &str, &str)] = &[
        ("[[contract]]\nid = \"k\"\nrespond = \"-1h\"\n", "contract[0].respond", "negative"),
        ("[[contract]]\nid = \"k\"\nmajor_fix = \"0s\"\n", "contract[0].major_fix", "zero"),
        ("[[contract]]\nid = \"k\"\nonsite = { remote = \"2 weeks\" }\n", "contract[0].onsite.remote", "unit"),
        ("[[contract]]\nid = \"k\"\navailability_target = 99.5\n", "contract[0].availability_target", "0.995"),
        ("[[contract]]\nid = \"k\"\ncustomer = \"nobody\"\n", "contract[0].customer", "nobody"),
        ("[[contract]]\nid = \"k\"\nstart = \"2026-02-01\"\nend = \"2026-01-01\"\n", "contract[0].end", "before"),
        ("[[contract]]\nid = \"k\"\npm_interval_days = 0\n", "contract[0].pm_interval_days", "1 to 3660"),
        ("[[contract]]\nid = \"k\"\ncustomer = \"c\"\n[[contract]]\nid = \"k2\"\ncustomer = \"c\"\nstart = \"2027-01-01\"\n", "contract[1].start", "overlaps"),
        ("[[contract]]\nid = \"k\"\nfix = \"1h\"\n", "contract", "fix"),
    ];
    for (extra, key, words) in cases {
        let src = format!("{base}{extra}");
        let src = src.replace("contract = \"gold\"\n", "");
        let e = Fleet::parse("fleet.toml", &src).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(key) && text.contains(words) && text.contains("fleet.toml:"),
            "{extra}: {text}"
        );
        assert!(e.line > 0, "{text}");
    }
    // A device naming an unknown contract, or another customer's.
    let src = CONTRACTS.replace(
        "contract = \"gold\"",
        "contract = \"gold\"\nlast_maintenance = \"2024-01-01\"",
    );
    let e = Fleet::parse("fleet.toml", &src).unwrap_err();
    assert!(
        e.to_string().contains("device[1].last_maintenance")
            && e.to_string().contains("before the acceptance"),
        "{e}"
    );
    let src = CONTRACTS.replace("contract = \"gold\"", "contract = \"silver\"");
    let e = Fleet::parse("fleet.toml", &src).unwrap_err();
    assert!(
        e.to_string().contains("device[1].contract") && e.to_string().contains("silver"),
        "{e}"
    );
    let src = CONTRACTS.replace(
        "[[contract]]\nid = \"gold\"",
        "[[contract]]\nid = \"gold\"\ncustomer = \"d\"",
    );
    let e = Fleet::parse("fleet.toml", &src).unwrap_err();
    assert!(e.to_string().contains("customer \"d\"'s"), "{e}");
}

#[test]
fn a_class_that_falls_and_rises_again_cannot_push_a_deadline_out() {
    let at: Timestamp = T0.parse().unwrap();
    let h = |n: i64| at.checked_add(jiff::SignedDuration::from_hours(n)).unwrap();
    let complex = deadlines(
        at,
        SignalKind::Fault,
        Some(FaultClass::Complex),
        ServiceArea::SameCity,
        None,
        &tz(),
        &SEED,
    );
    // Lowered to simple at 40 h (the promises made stand), complex again at 41 h: the
    // plan is still due at 48 h, not 89 h.
    let again = escalated_deadlines(
        &complex,
        h(41),
        FaultClass::Complex,
        ServiceArea::SameCity,
        &SEED,
    );
    assert_eq!(again.plan_by, complex.plan_by);
    assert_eq!(again.onsite_by, complex.onsite_by);
    // Up to major: the fix counts from the rise, the on-site promise stays the earlier.
    let major = escalated_deadlines(
        &again,
        h(42),
        FaultClass::Major,
        ServiceArea::SameCity,
        &SEED,
    );
    assert_eq!(major.resolve_by, Some(h(42 + 72)));
    assert_eq!(major.plan_by, None);
    assert_eq!(major.onsite_by, complex.onsite_by);
}

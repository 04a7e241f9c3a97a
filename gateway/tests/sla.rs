//! SLA deadlines, warranty and clinical impact per service-backend-api.md.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use tend_gateway::fleet::{Fleet, ServiceArea};
use tend_gateway::sla::{
    clinical_impact, deadlines, effective_class, rfc3339, warranty, ClinicalImpact, Deadlines,
    WarrantyStatus,
};
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
    let d: Deadlines = deadlines(T0.parse().unwrap(), kind, class, area, due, &tz());
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
    let w = |id: &str, day: &str| warranty(f.device(id).unwrap().device, on(day), &tz);

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
        warranty(f.device("plain").unwrap().device, late, &tz).status,
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

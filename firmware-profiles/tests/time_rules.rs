//! Rules that need time: thresholds held for a duration with hysteresis, rate of change
//! over a window, and silence of an always-on device. Time is passed in, never read.

use jiff::Timestamp;
use tend_profiles::modbus::{RegisterImage, Table};
use tend_profiles::{DeviceState, ProfileSet, RuleState, Snapshot, Value};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_795_000_000 + s).unwrap()
}

fn codes(ev: &tend_profiles::Evaluation) -> Vec<&str> {
    ev.signals.iter().map(|s| s.code.as_str()).collect()
}

fn av500_with_turbine(tenths: i16) -> Snapshot {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("aeris/av-500", "5.0.0").unwrap();
    let mut img = RegisterImage::new();
    let mut words = vec![
        1u16,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        tenths as u16,
        80,
        100,
        95,
        1,
        400,
        400,
        0,
        0,
        0,
        0,
        0,
    ];
    words.truncate(20);
    img.insert(Table::Input, 0, &words);
    p.decode_registers(&img)
}

#[test]
fn av500_turbine_above_65_for_more_than_60_s() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("aeris/av-500", "5.0.0").unwrap();
    let mut st = RuleState::default();
    let hot = av500_with_turbine(660);
    // Hot at 0 s and still at 60 s: not more than 60 s yet.
    assert!(codes(&p.evaluate(&hot, t(0), &mut st)).is_empty());
    assert!(codes(&p.evaluate(&hot, t(60), &mut st)).is_empty());
    // 61 s: a cooling problem, class complex, the device still available.
    let ev = p.evaluate(&hot, t(61), &mut st);
    assert_eq!(codes(&ev), ["TURBINE_TEMP_HIGH"]);
    assert_eq!(
        ev.signals[0].class,
        Some(tend_profiles::FaultClass::Complex)
    );
    assert_eq!(
        ev.signals[0].evidence["turbine_temperature"],
        serde_json::json!(66)
    );
    assert_eq!(ev.state, DeviceState::Up);
    // 64.0 °C is below the limit but inside the 2 °C hysteresis: still active.
    assert_eq!(
        codes(&p.evaluate(&av500_with_turbine(640), t(70), &mut st)),
        ["TURBINE_TEMP_HIGH"]
    );
    // 62.9 °C clears it.
    assert!(codes(&p.evaluate(&av500_with_turbine(629), t(80), &mut st)).is_empty());
    // A dip below the limit restarts the 60 s.
    assert!(codes(&p.evaluate(&hot, t(100), &mut st)).is_empty());
    assert!(codes(&p.evaluate(&av500_with_turbine(640), t(130), &mut st)).is_empty());
    assert!(codes(&p.evaluate(&hot, t(140), &mut st)).is_empty());
    assert!(codes(&p.evaluate(&hot, t(200), &mut st)).is_empty());
    assert_eq!(
        codes(&p.evaluate(&hot, t(201), &mut st)),
        ["TURBINE_TEMP_HIGH"]
    );
}

fn vm12(board: f64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schema": "vistara.status/2", "serial": "VM12-1", "fw": "7.4.2", "state": "monitoring",
        "power": {"source": "mains", "battery_pct": 90, "battery_health_pct": 90},
        "temps": {"board_c": board}, "modules": [], "tech_alarms": [],
        "counters": {"power_on_hours": 1, "nibp_cycles": 1},
        "patient": {"name": "ZHANG San"}
    }))
    .unwrap()
}

#[test]
fn vm12_board_above_60_for_more_than_5_minutes() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("vistara/vm-12", "7.4.2").unwrap();
    let mut st = RuleState::default();
    let hot = p.decode_json(&vm12(61.0)).unwrap();
    for s in (0..=300).step_by(10) {
        assert!(
            codes(&p.evaluate(&hot, t(s), &mut st)).is_empty(),
            "at {s} s"
        );
    }
    assert_eq!(
        codes(&p.evaluate(&hot, t(310), &mut st)),
        ["BOARD_TEMP_HIGH"]
    );
    let cool = p.decode_json(&vm12(57.0)).unwrap();
    assert!(codes(&p.evaluate(&cool, t(320), &mut st)).is_empty());
}

fn hm2_level(p: &tend_profiles::Profile, level: f32) -> Snapshot {
    let bits = level.to_bits();
    let mut img = RegisterImage::new();
    // 3.x: low word first.
    img.insert(
        Table::Holding,
        0,
        &[
            bits as u16,
            (bits >> 16) as u16,
            0x999A,
            0x3F99,
            0x6666,
            0x4086,
            1,
            0,
            75,
            0,
            100,
            100,
            301,
        ],
    );
    p.decode_registers(&img)
}

#[test]
fn hm2_helium_falling_more_than_half_a_point_in_24_h() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("cryosense/hm-2", "3.1").unwrap();
    let mut st = RuleState::default();
    // 0.02 points an hour: 0.48 in 24 h, no warning, polled every minute for two days.
    for m in 0..(48 * 60) {
        let level = 75.0 - 0.02 * (m as f32 / 60.0);
        let ev = p.evaluate(&hm2_level(&p, level), t(m * 60), &mut st);
        assert!(
            !codes(&ev).contains(&"HELIUM_LOSS"),
            "slow loss flagged at minute {m}"
        );
    }
    // Then 0.04 points an hour: more than 0.5 within 24 h after about 12.5 h.
    let start = 48 * 60;
    let base = 75.0 - 0.02 * 48.0;
    let mut first = None;
    for m in 0..(24 * 60) {
        let level = base - 0.04 * (m as f32 / 60.0);
        let ev = p.evaluate(&hm2_level(&p, level), t((start + m) * 60), &mut st);
        if codes(&ev).contains(&"HELIUM_LOSS") {
            first.get_or_insert(m);
            assert_eq!(
                ev.state,
                DeviceState::Up,
                "an early warning is not downtime"
            );
        }
    }
    let first = first.expect("boil-off never flagged");
    // Over the last 24 h the level fell 0.02×(24−h) + 0.04×h > 0.5 ⇔ h > 1 h. Buckets are
    // 24 h / 256 ≈ 5.6 min wide and keep their maximum, so the window may reach up to one
    // bucket further back: flagged up to ~6 min early (never late).
    assert!((54..=61).contains(&first), "flagged after {first} minutes");
}

#[test]
fn hm2_silence_is_monitoring_lost_after_5_minutes() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("cryosense/hm-2", "2.1").unwrap();
    assert!(p.silence_signal(t(0), t(300)).is_none());
    let s = p.silence_signal(t(0), t(301)).unwrap();
    assert_eq!(s.kind, tend_profiles::SignalKind::MonitoringLost);
    assert_eq!(s.class, Some(tend_profiles::FaultClass::Complex));
    // A portable pump is never "monitoring lost".
    let pump = set.select("lumen/lip-300", "2.4.1").unwrap();
    assert!(pump.silence_signal(t(0), t(86_400)).is_none());
    // No data is unknown, not down.
    let ev = p.evaluate(&Snapshot::default(), t(400), &mut RuleState::default());
    assert_eq!(ev.state, DeviceState::Unknown);
}

#[test]
fn patient_fields_never_reach_a_snapshot() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("vistara/vm-12", "7.4.2").unwrap();
    let snap = p.decode_json(&vm12(40.0)).unwrap();
    let text = serde_json::to_string(&snap).unwrap();
    assert!(!text.contains("ZHANG"), "{text}");
    assert!(snap
        .values
        .values()
        .all(|v| !matches!(v, Value::Text(t) if t.contains("ZHANG"))));
}

#[test]
fn hostile_json_is_refused_cleanly() {
    let set = ProfileSet::builtin().unwrap();
    let p = set.select("vistara/vm-12", "7.4.2").unwrap();
    // Larger than the 16 KiB the manual allows: refused before parsing.
    let big = vec![b' '; 10 << 20];
    assert!(p
        .decode_json(&big)
        .unwrap_err()
        .to_string()
        .contains("larger"));
    // Deeply nested: serde_json's recursion limit answers, no stack overflow.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    let p16 = {
        let mut q = (*p).clone();
        q.doc.transport.max_payload = None;
        q
    };
    assert!(p16.decode_json(deep.as_bytes()).is_err());
    assert!(p
        .decode_json(b"{\"schema\": \"vistara.status/9\"}")
        .is_err());
    assert!(p.decode_json(b"[1,2]").is_err());
    assert!(p.decode_json(b"\xff\xfe").is_err());
    // Wrong types in listed fields become issues, not panics; other fields still decode.
    let odd = br#"{"schema":"vistara.status/2","fw":"7.0.0","state":5,"power":{"battery_pct":"x","source":"mains"},"tech_alarms":"T-301"}"#;
    let snap = p.decode_json(odd).unwrap();
    assert_eq!(
        snap.values.get("power_source"),
        Some(&Value::Text("mains".into()))
    );
    assert_eq!(snap.issues.len(), 3, "{:?}", snap.issues);
}

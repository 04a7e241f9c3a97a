//! Ticket bodies and keys: the backend document's example reproduced field for field, and
//! what each episode change becomes.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::json;
use std::collections::BTreeMap;
use tend_gateway::fleet::Fleet;
use tend_gateway::ticket::{
    build_ticket, decide, event_key, ticket_key, Action, DeviceFacts, DeviceIdentity, EventType,
    KnownTicket, TicketContext, MAX_KEY,
};
use tend_profiles::{FaultClass, ProfileSet, SignalKind};
use tend_wire::{EpisodeChange, EpisodeEvent, RecordBody};

const FLEET: &str = r#"
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
service_area = "same_city"

[[device]]
id = "icu7-vent"
site = "s-017-main"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"
"#;

const EPISODE: &str = "agent-icu-a/icu7-vent/ALM1.4/1795832102000";

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn shanghai() -> TimeZone {
    TimeZone::get("Asia/Shanghai").unwrap()
}

fn identity() -> DeviceIdentity {
    let rec = RecordBody::Identity {
        model: "aeris/av-500".into(),
        firmware: "5.2.0".into(),
        serial: Some("AV5C-21-004417".into()),
        profile: "aeris/av-500 5.x".into(),
    };
    DeviceIdentity::from_record(&rec).unwrap()
}

fn alm14(change: EpisodeChange) -> EpisodeEvent {
    EpisodeEvent {
        episode: EPISODE.into(),
        change,
        code: "ALM1.4".into(),
        kind: SignalKind::Fault,
        class: Some(FaultClass::Major),
        description: "exhalation valve fault".into(),
        action: Some("Replace the exhalation valve assembly; bring spare.".into()),
        evidence: BTreeMap::from([
            ("state".into(), json!(4)),
            ("alarm_word_1".into(), json!(16)),
            ("error_code".into(), json!(0)),
        ]),
        device_available: false,
        opened_at: ts("2026-11-28T02:15:02Z"),
        due: None,
        opening: None,
    }
}

struct World {
    fleet: Fleet,
    facts: DeviceFacts,
    tz: TimeZone,
}

impl World {
    fn new() -> World {
        let fleet = Fleet::parse("fleet.toml", FLEET).unwrap();
        let profiles = ProfileSet::builtin().unwrap();
        let facts = DeviceFacts::resolve(
            &fleet.device("icu7-vent").unwrap(),
            Some(&identity()),
            &profiles,
        );
        World {
            fleet,
            facts,
            tz: shanghai(),
        }
    }
    fn cx(&self) -> TicketContext<'_> {
        TicketContext {
            gateway: "gw-cq-1",
            agent: "agent-icu-a",
            entry: self.fleet.device("icu7-vent").unwrap(),
            facts: &self.facts,
            tz: &self.tz,
        }
    }
}

/// The example body of `service-backend-api.md`, copied verbatim.
const API_EXAMPLE: &str = r#"{
  "schema": "service-ticket/1",
  "kind": "fault",
  "customer": {"id": "c-017", "name": "Jiangbei District Hospital",
               "contact_name": "Wang Lei", "contact_phone": "+86 23 6000 1234"},
  "site": {"id": "s-017-main", "name": "Main building", "address": "12 Jianxin Rd, Chongqing",
           "service_area": "same_city"},
  "device": {"id": "icu7-vent", "kind": "ventilator", "vendor": "Aeris Respiratory",
             "model": "AV-500", "serial": "AV5C-21-004417", "firmware": "5.2.0",
             "location": "ICU bed 7"},
  "fault": {"code": "ALM1.4", "description": "exhalation valve fault", "class": "major",
            "device_available": false, "first_seen": "2026-11-28T10:15:02+08:00",
            "evidence": {"state": 4, "alarm_word_1": 16, "error_code": 0},
            "suggested_action": "Replace the exhalation valve assembly; bring spare."},
  "clinical_impact": "high",
  "warranty": {"status": "in_warranty", "until": "2027-03-01", "billable": false},
  "sla": {"respond_by": "2026-11-28T11:15:02+08:00", "onsite_by": "2026-11-28T13:15:02+08:00",
          "plan_by": null, "resolve_by": "2026-12-01T10:15:02+08:00"},
  "source": {"gateway": "gw-cq-1", "agent": "agent-icu-a", "detected_at": "2026-11-28T10:15:02+08:00"}
}"#;

#[test]
fn golden_api_example_field_for_field() {
    let w = World::new();
    let req = build_ticket(&w.cx(), &alm14(EpisodeChange::Opened));
    let got: serde_json::Value = serde_json::from_slice(&req.body_json().unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_str(API_EXAMPLE).unwrap();
    // Field by field first, so a failure names the field.
    for (k, v) in want.as_object().unwrap() {
        assert_eq!(&got[k], v, "field {k}");
    }
    assert_eq!(got, want);
    // Keys in the document's order (serde keeps struct order).
    let text = String::from_utf8(req.body_json().unwrap()).unwrap();
    let order = [
        "\"schema\"",
        "\"kind\"",
        "\"customer\"",
        "\"site\"",
        "\"device\"",
        "\"fault\"",
        "\"clinical_impact\"",
        "\"warranty\"",
        "\"sla\"",
        "\"source\"",
    ];
    let pos: Vec<usize> = order
        .iter()
        .map(|k| text.find(&format!("{k}:")).unwrap())
        .collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{text}");
    assert_eq!(req.idempotency_key, format!("tend-t:{EPISODE}"));
}

#[test]
fn the_same_episode_gives_the_same_key_and_body() {
    let w = World::new();
    let a = build_ticket(&w.cx(), &alm14(EpisodeChange::Opened));
    let b = build_ticket(&World::new().cx(), &alm14(EpisodeChange::Opened));
    assert_eq!(a.idempotency_key, b.idempotency_key);
    assert_eq!(a.body_json().unwrap(), b.body_json().unwrap());
}

#[test]
fn keys_are_valid_and_stable() {
    let valid = |k: &str| {
        !k.is_empty() && k.len() <= MAX_KEY && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
    };
    let long = "x".repeat(500);
    for ep in [
        EPISODE,
        "",
        "with space",
        "天津/vent/1",
        long.as_str(),
        "a\nb",
    ] {
        let k = ticket_key(ep);
        assert!(valid(&k), "{k}");
        assert_eq!(k, ticket_key(ep));
        for t in [
            EventType::FaultCleared,
            EventType::FaultRecurred,
            EventType::Escalated,
            EventType::Note,
        ] {
            let e = event_key(
                t,
                ep,
                Some(FaultClass::Major),
                Some(ts("2026-01-01T00:00:00Z")),
            );
            assert!(valid(&e), "{e}");
            assert_ne!(e, k);
        }
    }
    // Long ids are hashed (fixed length) and distinct ids stay distinct.
    assert_eq!(ticket_key(&long).len(), "tend-t#".len() + 64);
    assert_ne!(ticket_key(&long), ticket_key(&"x".repeat(501)));
    // A readable key and a hashed one never collide: different prefixes.
    assert!(ticket_key(&long).starts_with("tend-t#"));
    assert!(ticket_key("a").starts_with("tend-t:"));
    // Event keys tell apart what happened and when.
    let at1 = ts("2026-01-01T00:00:00Z");
    let at2 = ts("2026-01-01T00:00:01Z");
    assert_ne!(
        event_key(
            EventType::Escalated,
            EPISODE,
            Some(FaultClass::Major),
            Some(at1)
        ),
        event_key(
            EventType::Escalated,
            EPISODE,
            Some(FaultClass::Major),
            Some(at2)
        )
    );
    assert_ne!(
        event_key(EventType::FaultCleared, EPISODE, None, None),
        event_key(EventType::FaultRecurred, EPISODE, None, None)
    );
}

fn apply(known: &mut Vec<KnownTicket>, device: &str, actions: &[Action]) {
    for a in actions {
        match a {
            Action::Create(req) => known.push(KnownTicket::from_request(device, req)),
            Action::Attach {
                ticket_key,
                episode,
            } => known
                .iter_mut()
                .find(|t| &t.key == ticket_key)
                .unwrap()
                .episodes
                .push(episode.clone()),
            Action::SetClass {
                ticket_key,
                class,
                deadlines,
            } => {
                let t = known.iter_mut().find(|t| &t.key == ticket_key).unwrap();
                t.class = *class;
                if let Some(d) = deadlines {
                    t.deadlines = Some(*d);
                }
            }
            Action::Event(_) => {}
        }
    }
}

fn events(actions: &[Action]) -> Vec<(EventType, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some((e.body.kind, e.ticket_key.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn opened_then_replayed_then_cleared() {
    let w = World::new();
    let cx = w.cx();
    let mut known = Vec::new();
    let at = ts("2026-11-28T02:15:02Z");
    let a = decide(&cx, &alm14(EpisodeChange::Opened), at, &known);
    assert!(matches!(a.as_slice(), [Action::Create(_)]));
    apply(&mut known, "icu7-vent", &a);
    // The same record replayed: nothing.
    assert!(decide(&cx, &alm14(EpisodeChange::Opened), at, &known).is_empty());
    let mut cleared = alm14(EpisodeChange::Cleared);
    cleared.evidence = BTreeMap::from([
        ("state".into(), json!(0)),
        ("alarm_word_1".into(), json!(0)),
    ]);
    let c = decide(&cx, &cleared, ts("2026-11-28T02:41:10Z"), &known);
    let Action::Event(e) = &c[0] else {
        panic!("{c:?}")
    };
    assert_eq!(c.len(), 1);
    assert_eq!(e.ticket_key, known[0].key);
    // The API document's event example.
    assert_eq!(
        serde_json::to_value(&e.body).unwrap(),
        json!({"type": "fault_cleared", "at": "2026-11-28T10:41:10+08:00",
               "detail": {"code": "ALM1.4", "evidence": {"state": 0, "alarm_word_1": 0}}})
    );
    assert_eq!(
        e.idempotency_key,
        event_key(EventType::FaultCleared, EPISODE, None, None)
    );
}

#[test]
fn a_new_episode_while_the_ticket_is_open_recurs_on_it() {
    let w = World::new();
    let cx = w.cx();
    let mut known = Vec::new();
    let a = decide(
        &cx,
        &alm14(EpisodeChange::Opened),
        ts("2026-11-28T02:15:02Z"),
        &known,
    );
    apply(&mut known, "icu7-vent", &a);
    let mut again = alm14(EpisodeChange::Opened);
    again.episode = "agent-icu-a/icu7-vent/ALM1.4/1795840000000".into();
    again.opened_at = ts("2026-11-28T04:26:40Z");
    let r = decide(&cx, &again, again.opened_at, &known);
    assert_eq!(
        events(&r),
        vec![(EventType::FaultRecurred, known[0].key.clone())]
    );
    let Action::Event(e) = &r[0] else { panic!() };
    assert_eq!(e.body.detail["first_seen"], "2026-11-28T12:26:40+08:00");
    assert_eq!(e.body.detail["episode"], again.episode.as_str());
    apply(&mut known, "icu7-vent", &r);
    assert_eq!(known.len(), 1);
    assert_eq!(known[0].episodes.len(), 2);
    // Its clearing goes to the same ticket.
    let mut cl = again.clone();
    cl.change = EpisodeChange::Cleared;
    let c = decide(&cx, &cl, ts("2026-11-28T05:00:00Z"), &known);
    assert_eq!(
        events(&c),
        vec![(EventType::FaultCleared, known[0].key.clone())]
    );
    // Once the ticket is closed, a new episode opens a new ticket.
    known[0].open = false;
    let mut third = alm14(EpisodeChange::Opened);
    third.episode = "agent-icu-a/icu7-vent/ALM1.4/1795900000000".into();
    let n = decide(&cx, &third, ts("2026-11-29T00:00:00Z"), &known);
    let [Action::Create(req)] = n.as_slice() else {
        panic!("{n:?}")
    };
    assert_ne!(req.idempotency_key, known[0].key);
    // Another code on the same device is its own ticket even while the first is open.
    known[0].open = true;
    let mut other = alm14(EpisodeChange::Opened);
    other.episode = "agent-icu-a/icu7-vent/ALM1.2/1".into();
    other.code = "ALM1.2".into();
    assert!(matches!(
        decide(&cx, &other, ts("2026-11-29T00:00:00Z"), &known).as_slice(),
        [Action::Create(_)]
    ));
}

#[test]
fn class_rise_escalates_and_a_fall_is_a_note() {
    let w = World::new();
    let cx = w.cx();
    let mut known = Vec::new();
    let mut ev = alm14(EpisodeChange::Opened);
    ev.class = Some(FaultClass::Complex);
    ev.device_available = true;
    let a = decide(&cx, &ev, ev.opened_at, &known);
    let Action::Create(req) = &a[0] else { panic!() };
    assert_eq!(req.body.fault.class, FaultClass::Complex);
    let body = serde_json::to_value(&req.body).unwrap();
    assert_eq!(body["clinical_impact"], "medium");
    assert_eq!(body["sla"]["plan_by"], "2026-11-30T10:15:02+08:00");
    assert_eq!(body["sla"]["resolve_by"], serde_json::Value::Null);
    apply(&mut known, "icu7-vent", &a);

    ev.change = EpisodeChange::ClassChanged;
    ev.class = Some(FaultClass::Major);
    let up_at = ts("2026-11-28T03:00:00Z");
    let e = decide(&cx, &ev, up_at, &known);
    assert_eq!(
        events(&e),
        vec![(EventType::Escalated, known[0].key.clone())]
    );
    let Action::Event(er) = &e[0] else { panic!() };
    assert_eq!(er.body.detail["class"], "major");
    assert_eq!(er.body.detail["previous_class"], "complex");
    assert_eq!(er.body.at, "2026-11-28T11:00:00+08:00");
    // The major class's deadlines, from the moment it rose: fixed within 72 h of 11:00,
    // no plan any more, the earlier on-site promise kept.
    assert_eq!(
        er.body.detail["sla"]["resolve_by"],
        "2026-12-01T11:00:00+08:00"
    );
    assert_eq!(er.body.detail["sla"]["plan_by"], serde_json::Value::Null);
    assert_eq!(er.body.detail["sla"]["onsite_by"], body["sla"]["onsite_by"]);
    assert_eq!(
        er.body.detail["sla"]["respond_by"],
        body["sla"]["respond_by"]
    );
    apply(&mut known, "icu7-vent", &e);
    assert_eq!(known[0].class, FaultClass::Major);
    assert_eq!(
        known[0].deadlines.unwrap().resolve_by.unwrap(),
        ts("2026-12-01T03:00:00Z")
    );
    // Replayed: the class is already major, nothing.
    assert!(decide(&cx, &ev, up_at, &known).is_empty());

    ev.class = Some(FaultClass::Complex);
    let d = decide(&cx, &ev, ts("2026-11-28T04:00:00Z"), &known);
    assert_eq!(events(&d), vec![(EventType::Note, known[0].key.clone())]);
    // A fall keeps the promises made: no new deadlines.
    assert!(d.iter().any(|a| matches!(
        a,
        Action::SetClass {
            deadlines: None,
            ..
        }
    )));
    apply(&mut known, "icu7-vent", &d);
    // Up again: a second escalation with a key of its own.
    ev.class = Some(FaultClass::Major);
    let e2 = decide(&cx, &ev, ts("2026-11-28T05:00:00Z"), &known);
    let Action::Event(er2) = &e2[0] else { panic!() };
    assert_eq!(er2.body.kind, EventType::Escalated);
    assert_ne!(er2.idempotency_key, er.idempotency_key);
}

#[test]
fn a_clearing_without_a_ticket_opens_one_and_clears_it() {
    let w = World::new();
    let cx = w.cx();
    let ev = alm14(EpisodeChange::Cleared);
    let a = decide(&cx, &ev, ts("2026-11-28T03:00:00Z"), &[]);
    assert!(matches!(&a[0], Action::Create(_)));
    let key = ticket_key(EPISODE);
    assert_eq!(events(&a), vec![(EventType::FaultCleared, key)]);
    // A class change as the first thing seen: a ticket at the current class.
    let mut cc = alm14(EpisodeChange::ClassChanged);
    cc.class = Some(FaultClass::Simple);
    cc.device_available = true;
    let b = decide(&cx, &cc, ts("2026-11-28T03:00:00Z"), &[]);
    let [Action::Create(req)] = b.as_slice() else {
        panic!("{b:?}")
    };
    assert_eq!(req.body.fault.class, FaultClass::Simple);
    assert_eq!(req.body.clinical_impact.as_str(), "low");
}

#[test]
fn tickets_of_other_devices_are_ignored() {
    let w = World::new();
    let cx = w.cx();
    let mut known = Vec::new();
    let a = decide(
        &cx,
        &alm14(EpisodeChange::Opened),
        ts("2026-11-28T02:15:02Z"),
        &[],
    );
    apply(&mut known, "other-vent", &a);
    let mut again = alm14(EpisodeChange::Opened);
    again.episode = "x".into();
    assert!(matches!(
        decide(&cx, &again, ts("2026-11-28T03:00:00Z"), &known).as_slice(),
        [Action::Create(_)]
    ));
}

#[test]
fn device_facts_fall_back_and_fleet_overrides_win() {
    let src = FLEET.replace(
        "accepted = \"2025-03-01\"",
        "accepted = \"2025-03-01\"\nmodel = \"AV-500 ICU\"",
    );
    let fleet = Fleet::parse("fleet.toml", &src).unwrap();
    let profiles = ProfileSet::builtin().unwrap();
    let e = fleet.device("icu7-vent").unwrap();
    let f = DeviceFacts::resolve(&e, Some(&identity()), &profiles);
    assert_eq!(f.model.as_deref(), Some("AV-500 ICU"));
    assert_eq!(f.vendor.as_deref(), Some("Aeris Respiratory"));
    // No identity yet: only what the fleet says; nulls in the body, never a guess.
    let f = DeviceFacts::resolve(&e, None, &profiles);
    assert_eq!(f.kind, None);
    assert_eq!(f.firmware, None);
    // An unknown profile id: the agent's model id stands in for the model.
    let mut id = identity();
    id.model = "acme/x-1".into();
    let fleet = Fleet::parse("fleet.toml", FLEET).unwrap();
    let f = DeviceFacts::resolve(&fleet.device("icu7-vent").unwrap(), Some(&id), &profiles);
    assert_eq!(f.model.as_deref(), Some("acme/x-1"));
    assert_eq!(f.vendor, None);
}

#[test]
fn maintenance_ticket_body() {
    let w = World::new();
    let ev = EpisodeEvent {
        episode: "agent-icu-a/icu7-vent/PM/1".into(),
        change: EpisodeChange::Opened,
        code: "PM".into(),
        kind: SignalKind::MaintenanceDue,
        class: None,
        description: "preventive maintenance due".into(),
        action: None,
        evidence: BTreeMap::new(),
        device_available: true,
        opened_at: ts("2026-11-28T02:15:02Z"),
        due: Some("2026-12-10".into()),
        opening: None,
    };
    let req = build_ticket(&w.cx(), &ev);
    let b = serde_json::to_value(&req.body).unwrap();
    assert_eq!(b["kind"], "maintenance_due");
    assert_eq!(b["fault"]["class"], "simple");
    assert_eq!(b["fault"]["suggested_action"], serde_json::Value::Null);
    assert_eq!(b["clinical_impact"], "low");
    assert_eq!(
        b["sla"],
        json!({"respond_by": "2026-11-28T11:15:02+08:00", "onsite_by": null,
               "plan_by": null, "resolve_by": "2026-12-10T23:59:59+08:00"})
    );
}

/// With a shared subscription, one gateway may see an episode's opening and another only
/// its clearing or a class change. Both must build the very same body under the same key
/// (the backend answers 409 to a key reused with another body), so the body comes from the
/// opening the agent repeats on every change.
#[test]
fn any_change_carrying_the_opening_builds_the_opening_body() {
    let w = World::new();
    let mut opened = alm14(EpisodeChange::Opened);
    opened.class = Some(FaultClass::Complex);
    opened.opening = Some(Box::new(tend_wire::Opening {
        class: Some(FaultClass::Complex),
        description: opened.description.clone(),
        action: opened.action.clone(),
        evidence: opened.evidence.clone(),
        device_available: false,
        due: None,
        model: Some("aeris/av-500".into()),
        firmware: Some("5.2.0".into()),
    }));
    let from_opening = build_ticket(&w.cx(), &opened);

    // Later changes: the class rose, the evidence changed, the device came back.
    let mut raised = opened.clone();
    raised.change = EpisodeChange::ClassChanged;
    raised.class = Some(FaultClass::Major);
    raised.evidence.insert("alarm_word_1".into(), json!(48));
    let mut cleared = raised.clone();
    cleared.change = EpisodeChange::Cleared;
    cleared.device_available = true;
    cleared.evidence.insert("flaps".into(), json!(2));

    for later in [&raised, &cleared] {
        let req = build_ticket(&w.cx(), later);
        assert_eq!(req.idempotency_key, from_opening.idempotency_key);
        assert_eq!(
            req.body_json().unwrap(),
            from_opening.body_json().unwrap(),
            "{:?}",
            later.change
        );
    }

    // A gateway that first sees the class change opens the ticket as it opened, then
    // escalates it; one that first sees the clearing also escalates, then clears.
    let at = ts("2026-11-28T02:20:00Z");
    let a = decide(&w.cx(), &raised, at, &[]);
    assert!(matches!(&a[0], Action::Create(r) if r.body.fault.class == FaultClass::Complex));
    assert_eq!(
        events(&a).iter().map(|e| e.0).collect::<Vec<_>>(),
        [EventType::Escalated]
    );
    let b = decide(&w.cx(), &cleared, at, &[]);
    assert_eq!(
        events(&b).iter().map(|e| e.0).collect::<Vec<_>>(),
        [EventType::Escalated, EventType::FaultCleared]
    );
    // Without the opening (an older agent) the change itself is all there is.
    let mut old = cleared.clone();
    old.opening = None;
    let req = build_ticket(&w.cx(), &old);
    assert_eq!(req.body.fault.class, FaultClass::Major);
    assert!(req.body.fault.device_available);
}

//! Ingest against a real store on disk: a replayed batch is acknowledged again but applied
//! once; acks name exactly the batch's seqs; transitions that arrive late (an agent
//! replaying its outbox after an outage) fill the ledger's gap with what really happened;
//! a ticket is decided once per episode, also across a reopen of the store.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;
use tend_gateway::fleet::Fleet;
use tend_gateway::ingest::IngestContext;
use tend_gateway::store::{GatewayStore, RedbStore};
use tend_profiles::{DeviceState, FaultClass, ProfileSet, SignalKind};
use tend_wire::{EpisodeChange, EpisodeEvent, Record, RecordBody, SeqRange, UpBatch};

const FLEET: &str = r#"
[[customer]]
id = "c-1"
name = "Hospital"
contact_name = "Wang Lei"
contact_phone = "+86 23 6000 1234"

[[site]]
id = "s-1"
customer = "c-1"
name = "Main"
address = "12 Jianxin Rd"
service_area = "same_city"

[[device]]
id = "vent"
site = "s-1"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"
"#;

fn cx() -> IngestContext {
    IngestContext {
        gateway: "gw-1".into(),
        fleet: Fleet::parse("fleet.toml", FLEET).unwrap(),
        profiles: ProfileSet::builtin().unwrap(),
        tz: TimeZone::get("Asia/Shanghai").unwrap(),
    }
}

fn t0() -> Timestamp {
    "2026-11-02T00:00:00Z".parse().unwrap()
}

fn at(min: i64) -> Timestamp {
    t0() + SignedDuration::from_mins(min)
}

fn state(seq: u64, min: i64, from: DeviceState, to: DeviceState) -> Record {
    Record {
        seq,
        at: at(min),
        device: "vent".into(),
        body: RecordBody::State { from, to },
    }
}

fn episode(seq: u64, min: i64, change: EpisodeChange) -> Record {
    Record {
        seq,
        at: at(min),
        device: "vent".into(),
        body: RecordBody::Episode(EpisodeEvent {
            episode: "agent-1/vent/ALM1.4/1".into(),
            change,
            code: "ALM1.4".into(),
            kind: SignalKind::Fault,
            class: Some(FaultClass::Major),
            description: "exhalation valve fault".into(),
            action: None,
            evidence: BTreeMap::new(),
            device_available: false,
            opened_at: at(60),
            due: None,
            opening: None,
        }),
    }
}

fn batch(records: Vec<Record>) -> UpBatch {
    UpBatch {
        v: tend_wire::VERSION,
        agent: "agent-1".into(),
        incarnation: "i1".into(),
        site: "s-1".into(),
        records,
    }
}

#[test]
fn replay_is_acked_again_applied_once_and_fills_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let cx = cx();
    let now = at(24 * 60);
    let store = RedbStore::open(dir.path()).unwrap();

    // The agent's first batch: up at 0, the fault at 60 (down), its clearing at 90.
    let first = batch(vec![
        state(1, 0, DeviceState::Unknown, DeviceState::Up),
        state(2, 60, DeviceState::Up, DeviceState::Down),
        episode(3, 60, EpisodeChange::Opened),
        // seq 4 and 5 are still in the agent's outbox (the link was down).
        episode(6, 90, EpisodeChange::Cleared),
    ]);
    let a = store.apply(&first, &cx, now).unwrap();
    assert_eq!(
        a.stored,
        vec![
            SeqRange { first: 1, last: 3 },
            SeqRange { first: 6, last: 6 }
        ]
    );
    assert_eq!((a.new_records, a.duplicates), (4, 0));
    assert_eq!(a.tickets_opened.len(), 1);
    assert_eq!(a.events_queued, 1, "fault_cleared");

    // The same batch again (the ack was lost): acked again, nothing applied twice.
    let again = store.apply(&first, &cx, now).unwrap();
    assert_eq!(again.stored, a.stored);
    assert_eq!((again.new_records, again.duplicates), (0, 4));
    assert!(!again.has_jobs());
    assert_eq!(store.tickets().unwrap().len(), 1);
    assert_eq!(store.jobs().unwrap().len(), 2);

    // Before the replay, the ledger thinks the device was down from 60 until last heard.
    let before = store.ledger("vent").unwrap().totals(at(0), at(120));
    assert_eq!(before.down, SignedDuration::from_mins(30));

    // The late records: it was back up at 75 and went into maintenance at 80.
    drop(store);
    let store = RedbStore::open(dir.path()).unwrap(); // and across a reopen
    let late = batch(vec![
        state(4, 75, DeviceState::Down, DeviceState::Up),
        state(5, 80, DeviceState::Up, DeviceState::Maintenance),
        state(7, 100, DeviceState::Maintenance, DeviceState::Up),
        episode(3, 60, EpisodeChange::Opened), // a resend mixed in
    ]);
    let b = store.apply(&late, &cx, now).unwrap();
    assert_eq!((b.new_records, b.duplicates), (3, 1));
    assert!(!b.has_jobs(), "a replayed opening opens nothing");
    let t = store.ledger("vent").unwrap().totals(at(0), at(100));
    assert_eq!(t.up, SignedDuration::from_mins(60 + 5));
    assert_eq!(t.down, SignedDuration::from_mins(15));
    assert_eq!(t.maintenance, SignedDuration::from_mins(20));
    assert_eq!(store.records_stored().unwrap(), 7);
    for seq in 1..=7 {
        assert!(store.has_record("agent-1", seq).unwrap(), "seq {seq}");
    }
    // The live picture keeps the newest state, not the last to arrive.
    let live = store.device("vent").unwrap().unwrap();
    assert_eq!(live.state, DeviceState::Up);
    assert_eq!(live.state_since, Some(at(100)));
    assert!(live.open_episodes.is_empty());
    // The life record has every change in the agent's time order.
    let h = store.history("vent", 100).unwrap();
    let kinds: Vec<String> = h
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "state",
            "state",
            "episode",
            "ticket_opened",
            "state",
            "state",
            "episode",
            "ticket_event",
            "state"
        ]
    );
}

#[test]
fn records_of_a_device_outside_the_fleet_are_stored_without_tickets() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let mut r = episode(1, 60, EpisodeChange::Opened);
    r.device = "stray".into();
    let a = store.apply(&batch(vec![r]), &cx(), at(61)).unwrap();
    assert_eq!((a.new_records, a.unknown_device), (1, 1));
    assert!(store.tickets().unwrap().is_empty());
    assert!(store.device("stray").unwrap().is_some());
}

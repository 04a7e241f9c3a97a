//! Ingest against a real store on disk: a replayed batch is acknowledged again but applied
//! once; acks name exactly the batch's seqs; transitions that arrive late (an agent
//! replaying its outbox after an outage) fill the ledger's gap with what really happened;
//! a ticket is decided once per episode, also across a reopen of the store; a new outbox
//! incarnation is new, a conflicting version is counted once; a store of an older build
//! opens, a damaged one is refused naming the file.

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
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
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
        sent_at: t0(),
        oldest: None,
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
    // Sent now (replayed from the outbox): the records are old, the clock is right.
    let first = UpBatch {
        sent_at: now,
        ..first
    };
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

    // Before the replay, the ledger thinks the device was down from 60 on: last heard at
    // 90, and a device down and silent stays down.
    let before = store.ledger("vent").unwrap().totals(at(0), at(120));
    assert_eq!(before.down, SignedDuration::from_mins(60));

    // The late records: it was back up at 75 and went into maintenance at 80.
    drop(store);
    let store = RedbStore::open(dir.path()).unwrap(); // and across a reopen
    let late = batch(vec![
        state(4, 75, DeviceState::Down, DeviceState::Up),
        state(5, 80, DeviceState::Up, DeviceState::Maintenance),
        state(7, 100, DeviceState::Maintenance, DeviceState::Up),
        episode(3, 60, EpisodeChange::Opened), // a resend mixed in
    ]);
    let late = UpBatch {
        sent_at: now,
        ..late
    };
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

/// Incarnations and conflicts on disk: a new incarnation's seq 1 is new; a conflicting
/// version is counted once, also after a reopen; the agent's record survives the reopen.
#[test]
fn incarnations_and_conflicts_are_kept_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cx = cx();
    let store = RedbStore::open(dir.path()).unwrap();
    let up = state(1, 0, DeviceState::Unknown, DeviceState::Up);
    let a = store.apply(&batch(vec![up.clone()]), &cx, at(1)).unwrap();
    assert_eq!(a.new_records, 1);
    let mut other = batch(vec![state(1, 5, DeviceState::Unknown, DeviceState::Down)]);
    let c = store.apply(&other, &cx, at(2)).unwrap();
    assert_eq!((c.new_records, c.conflicts.clone()), (0, vec![1]));
    assert_eq!(c.stored, vec![SeqRange { first: 1, last: 1 }]);
    drop(store);

    let store = RedbStore::open(dir.path()).unwrap();
    let again = store.apply(&other, &cx, at(3)).unwrap();
    assert_eq!((again.duplicates, again.conflicts.len()), (1, 0));
    let agents = store.agents().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].conflicting_records, 1);
    assert_eq!(agents[0].last_conflict.as_ref().unwrap().at, at(2));
    assert_eq!(
        store.device("vent").unwrap().unwrap().state,
        DeviceState::Up
    );

    // The outbox was replaced: the same seq in a new incarnation is a new record.
    other.incarnation = "i2".into();
    let fresh = store.apply(&other, &cx, at(4)).unwrap();
    assert_eq!((fresh.new_records, fresh.conflicts.len()), (1, 0));
    assert_eq!(
        store.device("vent").unwrap().unwrap().state,
        DeviceState::Down
    );
    assert!(store.has_record_in("agent-1", "i1", 1).unwrap());
    assert!(store.has_record_in("agent-1", "i2", 1).unwrap());
    assert!(!store.has_record_in("agent-1", "i3", 1).unwrap());
    assert_eq!(store.records_stored().unwrap(), 2);
    let agents = store.agents().unwrap();
    assert_eq!(agents[0].incarnation.as_deref(), Some("i2"));
    assert_eq!(agents[0].incarnation_since, Some(at(4)));
}

/// A store written by a build before incarnations opens; its (agent, seq) dedup table,
/// which cannot tell incarnations apart, is dropped.
#[test]
fn a_store_from_before_incarnations_opens_and_drops_its_old_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let old: redb::TableDefinition<(&str, u64), ()> = redb::TableDefinition::new("seen");
    {
        let db = redb::Database::create(dir.path().join("gateway.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(old)
            .unwrap()
            .insert(("agent-1", 1), ())
            .unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(dir.path()).unwrap();
    assert_eq!(store.records_stored().unwrap(), 0);
    let a = store
        .apply(
            &batch(vec![state(1, 0, DeviceState::Unknown, DeviceState::Up)]),
            &cx(),
            at(1),
        )
        .unwrap();
    assert_eq!(a.new_records, 1);
    drop(store);
    let db = redb::Database::create(dir.path().join("gateway.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(txn.open_table(old).is_err(), "the old table is gone");
}

/// A file that is not a store, or one cut short, is refused naming the file.
#[test]
fn a_damaged_store_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.redb");
    std::fs::write(&file, vec![0x5au8; 64 << 10]).unwrap();
    let e = RedbStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, tend_gateway::store::StoreError::Damaged { .. }),
        "{e}"
    );
    assert!(e.to_string().contains(&file.display().to_string()), "{e}");

    std::fs::remove_file(&file).unwrap();
    let store = RedbStore::open(dir.path()).unwrap();
    let records = (1..=300)
        .map(|s| state(s, 0, DeviceState::Unknown, DeviceState::Up))
        .collect();
    store.apply(&batch(records), &cx(), at(1)).unwrap();
    drop(store);
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let e = RedbStore::open(dir.path()).unwrap_err();
    assert!(
        matches!(e, tend_gateway::store::StoreError::Damaged { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("move it aside"), "{e}");
}

/// Months of readings do not grow the dedup: what lies below each batch's `oldest` is
/// forgotten but for a watermark, and still counts as stored; a replay of it is a
/// duplicate.
#[test]
fn dedup_forgets_below_the_agents_oldest_record() {
    let dir = tempfile::tempdir().unwrap();
    let cx = cx();
    let store = RedbStore::open(dir.path()).unwrap();
    let reading = |seq: u64| Record {
        seq,
        at: at(1),
        device: "vent".into(),
        body: RecordBody::Readings {
            readings: Vec::new(),
        },
    };
    // Batches of 100 readings, each sent once the one before was acked and deleted.
    let send = |from: u64, to: u64| {
        for b in from..to {
            let mut batch = batch((b * 100 + 1..=b * 100 + 100).map(reading).collect());
            batch.oldest = Some(b * 100 + 1);
            let a = store.apply(&batch, &cx, at(2)).unwrap();
            assert_eq!(a.new_records, 100);
        }
    };
    let size = || {
        std::fs::metadata(dir.path().join("gateway.redb"))
            .unwrap()
            .len()
    };
    send(0, 100);
    let after_10k = size();
    send(100, 1_000);
    let after_100k = size();
    // Without forgetting, 90,000 more rows of ~74 bytes would add over 6 MB.
    assert!(
        after_100k < after_10k + (1 << 20),
        "the store grew from {after_10k} to {after_100k} bytes"
    );
    assert_eq!(store.records_stored().unwrap(), 100_000);
    assert_eq!(store.records_stored_of("agent-1").unwrap(), 100_000);
    assert_eq!(store.records_stored_of("agent-2").unwrap(), 0);
    assert!(store.has_record_in("agent-1", "i1", 1).unwrap());
    assert!(store.has_record("agent-1", 50_000).unwrap());
    assert!(store.has_record_in("agent-1", "i1", 100_000).unwrap());
    assert!(!store.has_record_in("agent-1", "i1", 100_001).unwrap());
    assert!(!store.has_record_in("agent-1", "other", 1).unwrap());

    // A replay of a forgotten batch: acknowledged, nothing applied.
    let mut old = batch((1..=100).map(reading).collect());
    old.oldest = Some(1);
    let a = store.apply(&old, &cx, at(3)).unwrap();
    assert_eq!((a.new_records, a.duplicates), (0, 100));
    assert_eq!(
        a.stored,
        vec![SeqRange {
            first: 1,
            last: 100
        }]
    );
    assert_eq!(store.records_stored().unwrap(), 100_000);
}

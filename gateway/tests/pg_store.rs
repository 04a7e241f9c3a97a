//! The shared store on a real PostgreSQL (a throwaway cluster per test binary, Debian's
//! `postgresql`): it answers as redb does for the same batches; several gateways on one
//! database apply every record once and decide one ticket per episode however their
//! batches interleave; the forwarder's jobs are each claimed by one gateway; schema
//! migrations run once when gateways start together; a database stopped mid-run fails
//! calls (nothing acknowledged) and the store carries on when it is back.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tend_gateway::app::Gateway;
use tend_gateway::backend::service_api::{ServiceApi, ServiceApiConfig};
use tend_gateway::diag::DiagClient;
use tend_gateway::fleet::Fleet;
use tend_gateway::forwarder::{self, ForwarderConfig};
use tend_gateway::ingest::IngestContext;
use tend_gateway::store::{
    Exclusion, ExclusionReason, ForwardState, GatewayStore, MaintenanceDone, PgConnect, PgStore,
    RedbStore,
};
use tend_gateway::trust::{Trust, TrustDir};
use tend_profiles::{DeviceState, FaultClass, ProfileSet, SignalKind};
use tend_testkit::postgres::Postgres;
use tend_wire::{EpisodeChange, EpisodeEvent, Record, RecordBody, UpBatch};
use tokio_util::sync::CancellationToken;

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
id = "vent-1"
site = "s-1"
serial = "AV5C-21-004417"
location = "ICU"
accepted = "2025-03-01"

[[device]]
id = "vent-2"
site = "s-1"
serial = "AV5C-21-004418"
location = "ICU"
accepted = "2025-03-01"

[[device]]
id = "vent-3"
site = "s-1"
serial = "AV5C-21-004419"
location = "ICU"
accepted = "2025-03-01"
"#;

/// One cluster for the whole binary; each test has its own database.
fn cluster() -> &'static Postgres {
    static PG: OnceLock<Postgres> = OnceLock::new();
    PG.get_or_init(Postgres::start)
}

fn database(name: &str) -> String {
    cluster().create_database(name)
}

fn open(db: &str) -> PgStore {
    let pg = cluster();
    let mut config = tend_gateway::store::pg_config(&pg.url(db)).unwrap();
    config.password(pg.password());
    PgStore::open(PgConnect { config, tls: None }).unwrap()
}

fn cx() -> IngestContext {
    IngestContext {
        gateway: "gw".into(),
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

fn state(device: &str, seq: u64, min: i64, from: DeviceState, to: DeviceState) -> Record {
    Record {
        seq,
        at: at(min),
        device: device.into(),
        body: RecordBody::State { from, to },
    }
}

fn episode(device: &str, seq: u64, min: i64, n: u32, change: EpisodeChange) -> Record {
    Record {
        seq,
        at: at(min),
        device: device.into(),
        body: RecordBody::Episode(EpisodeEvent {
            episode: format!("agent-1/{device}/ALM1.4/{n}"),
            change,
            code: "ALM1.4".into(),
            kind: SignalKind::Fault,
            class: Some(FaultClass::Major),
            description: "exhalation valve fault".into(),
            action: None,
            evidence: BTreeMap::new(),
            device_available: false,
            opened_at: at(min),
            due: None,
            opening: None,
        }),
    }
}

fn batch(agent: &str, incarnation: &str, records: Vec<Record>) -> UpBatch {
    UpBatch {
        v: tend_wire::VERSION,
        agent: agent.into(),
        incarnation: incarnation.into(),
        site: "s-1".into(),
        sent_at: at(24 * 60),
        oldest: None,
        records,
    }
}

/// The records of one agent over a day: per device, up, then faults opening and
/// clearing (the device down while open), a few each.
fn a_day() -> Vec<Record> {
    let mut out = Vec::new();
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq
    };
    for (d, device) in ["vent-1", "vent-2", "vent-3"].iter().enumerate() {
        let base = d as i64 * 7;
        out.push(state(
            device,
            next(),
            base,
            DeviceState::Unknown,
            DeviceState::Up,
        ));
        for n in 1..=3u32 {
            let open = base + 60 * n as i64;
            out.push(state(
                device,
                next(),
                open,
                DeviceState::Up,
                DeviceState::Down,
            ));
            out.push(episode(device, next(), open, n, EpisodeChange::Opened));
            out.push(episode(
                device,
                next(),
                open + 20,
                n,
                EpisodeChange::Cleared,
            ));
            out.push(state(
                device,
                next(),
                open + 20,
                DeviceState::Down,
                DeviceState::Up,
            ));
        }
    }
    out
}

/// What a store holds, in a form two stores can be compared by.
fn picture(s: &dyn GatewayStore) -> serde_json::Value {
    let tickets: Vec<serde_json::Value> = s
        .tickets()
        .unwrap()
        .iter()
        .map(|t| {
            serde_json::json!({
                "key": t.key, "device": t.device, "open": t.open, "class": t.class,
                "episodes": t.episodes, "body": t.body,
                "events": t.events.iter().map(|e| (e.kind.clone(), e.idempotency_key.clone())).collect::<Vec<_>>(),
            })
        })
        .collect();
    let jobs: Vec<(String, Option<String>)> = s
        .jobs()
        .unwrap()
        .into_iter()
        .map(|j| (j.ticket_key, j.event))
        .collect();
    let mut devices = serde_json::Map::new();
    for d in ["vent-1", "vent-2", "vent-3"] {
        let live = s.device(d).unwrap().map(|l| {
            serde_json::json!({"state": l.state, "since": l.state_since, "open": l.open_episodes.len()})
        });
        let totals = s.ledger(d).unwrap().totals(at(0), at(600));
        let history: Vec<String> = s
            .history(d, 1000)
            .unwrap()
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        devices.insert(
            d.into(),
            serde_json::json!({
                "live": live,
                "up_s": totals.up.as_secs(), "down_s": totals.down.as_secs(),
                "history": history,
            }),
        );
    }
    serde_json::json!({
        "records": s.records_stored().unwrap(),
        "of_agent": s.records_stored_of("agent-1").unwrap(),
        "tickets": tickets,
        "jobs": jobs,
        "devices": devices,
    })
}

#[test]
fn postgres_answers_as_redb_does_for_the_same_batches() {
    let db = database("same_as_redb");
    let pg = open(&db);
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path()).unwrap();
    let cx = cx();
    let records = a_day();
    // Out of order, with resends, a conflict, a second incarnation and a watermark: the
    // awkward paths of ingest.
    let mut batches: Vec<UpBatch> = records
        .chunks(4)
        .rev()
        .map(|c| batch("agent-1", "i1", c.to_vec()))
        .collect();
    batches.push(batch("agent-1", "i1", records[..6].to_vec()));
    let mut other = records[2].clone();
    other.at = at(333);
    batches.push(batch("agent-1", "i1", vec![other]));
    batches.push(batch(
        "agent-1",
        "i2",
        vec![state(
            "vent-1",
            1,
            500,
            DeviceState::Up,
            DeviceState::Maintenance,
        )],
    ));
    let mut forgetting = batch("agent-1", "i1", vec![]);
    forgetting.oldest = Some(5);
    batches.push(forgetting);

    for (i, b) in batches.iter().enumerate() {
        let now = at(24 * 60 + i as i64);
        let a = redb.apply(b, &cx, now).unwrap();
        let p = pg.apply(b, &cx, now).unwrap();
        assert_eq!(format!("{a:?}"), format!("{p:?}"), "batch {i}");
    }
    // And a group of batches in one transaction.
    let group: Vec<UpBatch> = records
        .chunks(3)
        .map(|c| batch("agent-2", "j1", c.to_vec()))
        .collect();
    let a = redb.apply_many(&group, &cx, at(2000)).unwrap();
    let p = pg.apply_many(&group, &cx, at(2000)).unwrap();
    assert_eq!(format!("{a:?}"), format!("{p:?}"));

    assert_eq!(picture(&redb), picture(&pg));
    assert!(pg.records_stored().unwrap() > 0);
    for (agent, inc, seq) in [
        ("agent-1", "i1", 3),
        ("agent-1", "i1", 4),
        ("agent-1", "i2", 1),
        ("agent-1", "i2", 2),
        ("agent-2", "j1", 9),
    ] {
        assert_eq!(
            redb.has_record_in(agent, inc, seq).unwrap(),
            pg.has_record_in(agent, inc, seq).unwrap(),
            "{agent}/{inc}/{seq}"
        );
        assert_eq!(
            redb.has_record(agent, seq).unwrap(),
            pg.has_record(agent, seq).unwrap()
        );
    }
    assert_eq!(
        format!("{:?}", redb.agents().unwrap()),
        format!("{:?}", pg.agents().unwrap())
    );
    // The life record pages the same way.
    let page = pg.history_page("vent-1", None, 4).unwrap();
    let before = pg.history_page("vent-1", Some(page[0].0), 100).unwrap();
    let all = pg.history_page("vent-1", None, 1000).unwrap();
    assert_eq!(before.len() + page.len(), all.len());
    assert_eq!(
        redb.history_page("vent-1", None, 1000).unwrap().len(),
        all.len()
    );
}

#[test]
fn tickets_jobs_exclusions_and_maintenance_behave_as_in_redb() {
    let db = database("the_rest");
    let pg = open(&db);
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path()).unwrap();
    let cx = cx();
    // Up, down, the fault opened: one ticket, its create job.
    let b = batch("agent-1", "i1", a_day()[..3].to_vec());
    redb.apply(&b, &cx, at(100)).unwrap();
    pg.apply(&b, &cx, at(100)).unwrap();
    for s in [&redb as &dyn GatewayStore, &pg] {
        let jobs = s.jobs().unwrap();
        assert_eq!(jobs.len(), 1, "the create job");
        let sent = tend_gateway::store::JobOutcome::Sent {
            ticket_id: "T-1".into(),
        };
        s.finish_job(&jobs[0], &sent, at(101)).unwrap();
        assert!(s.jobs().unwrap().is_empty());
        let key = jobs[0].ticket_key.clone();
        let t = s
            .update_ticket(&key, &mut |t| {
                t.backend_status = Some("acknowledged".into());
                Ok(vec![])
            })
            .unwrap()
            .unwrap();
        assert_eq!(t.ticket_id.as_deref(), Some("T-1"));
        assert_eq!(
            s.ticket(&key).unwrap().unwrap().backend_status.as_deref(),
            Some("acknowledged")
        );
        assert!(s
            .update_ticket("nope", &mut |_| Ok(vec![]))
            .unwrap()
            .is_none());

        let ex = Exclusion {
            id: 0,
            device: "vent-1".into(),
            from: at(10),
            to: at(20),
            reason: ExclusionReason::parse("customer_caused").unwrap(),
            note: "unplugged".into(),
            recorded_at: at(30),
        };
        let first = s.add_exclusion(ex.clone()).unwrap().unwrap();
        let overlap = Exclusion {
            from: at(15),
            to: at(25),
            ..ex.clone()
        };
        assert_eq!(s.add_exclusion(overlap).unwrap().unwrap_err().id, first.id);
        assert_eq!(s.exclusions("vent-1").unwrap().len(), 1);
        assert!(s
            .remove_exclusion("vent-1", first.id, at(40))
            .unwrap()
            .is_some());
        assert!(s
            .remove_exclusion("vent-1", first.id, at(41))
            .unwrap()
            .is_none());

        let m = MaintenanceDone {
            id: 0,
            device: "vent-2".into(),
            done_at: at(50),
            source: "ticket:T-9".into(),
            note: String::new(),
            recorded_at: at(51),
        };
        let m1 = s.record_maintenance(m.clone()).unwrap();
        let m2 = s.record_maintenance(m).unwrap();
        assert_eq!(
            m1.id, m2.id,
            "the same resolved ticket read twice is one maintenance"
        );
        assert_eq!(s.maintenance_done("vent-2").unwrap().len(), 1);
    }
    let kinds = |s: &dyn GatewayStore, d: &str| -> Vec<String> {
        s.history(d, 100)
            .unwrap()
            .iter()
            .map(|e| {
                serde_json::to_value(e).unwrap()["type"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(kinds(&redb, "vent-1"), kinds(&pg, "vent-1"));
    assert_eq!(kinds(&redb, "vent-2"), kinds(&pg, "vent-2"));
}

/// Three gateways on one database, each applying batches of the same agents as a shared
/// subscription hands them out: in any order, with resends landing on another gateway,
/// concurrently. Every record is stored once, each episode has one ticket with one
/// create job and one `fault_cleared` event, whatever the interleaving.
#[test]
fn three_gateways_store_each_record_once_and_decide_each_episode_once() {
    let db = database("three_gateways");
    let stores: Vec<Arc<PgStore>> = (0..3).map(|_| Arc::new(open(&db))).collect();
    let cx = Arc::new(cx());
    let agents = ["agent-1", "agent-2", "agent-3", "agent-4"];
    // agent-N reports devices of its own (the fleet's devices under other ids are strays:
    // only agent-1's are in the fleet, which is enough for tickets).
    let mut work: Vec<UpBatch> = Vec::new();
    for agent in agents {
        let records = a_day();
        for c in records.chunks(3) {
            let mut recs = c.to_vec();
            if agent != "agent-1" {
                for r in &mut recs {
                    r.device = format!("{agent}-{}", r.device);
                    if let RecordBody::Episode(e) = &mut r.body {
                        e.episode = format!("{agent}/{}", e.episode);
                    }
                }
            }
            work.push(batch(agent, "i1", recs));
        }
    }
    // Each agent sends its batches in order, the next once the last is acknowledged;
    // the broker hands each to any gateway, and half of them come again (the ack was
    // lost) to another gateway, while the agent already sends the next.
    let (to_gateways, inboxes): (Vec<_>, Vec<_>) = (0..3)
        .map(|_| std::sync::mpsc::channel::<(UpBatch, Option<std::sync::mpsc::Sender<()>>)>())
        .unzip();
    let gateways: Vec<_> = inboxes
        .into_iter()
        .zip(stores.iter().cloned())
        .map(|(inbox, s)| {
            let cx = cx.clone();
            std::thread::spawn(move || {
                for (b, ack) in inbox {
                    s.apply(&b, &cx, at(2000)).unwrap();
                    if let Some(ack) = ack {
                        let _ = ack.send(());
                    }
                }
            })
        })
        .collect();
    let senders: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, agent)| {
            let mine: Vec<UpBatch> = work.iter().filter(|b| b.agent == *agent).cloned().collect();
            let to: Vec<_> = to_gateways.clone();
            std::thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                for b in mine {
                    let g = (next() % 3) as usize;
                    let (ack, acked) = std::sync::mpsc::channel();
                    to[g].send((b.clone(), Some(ack))).unwrap();
                    if next() % 2 == 0 {
                        to[(g + 1 + (next() % 2) as usize) % 3]
                            .send((b, None))
                            .unwrap();
                    }
                    acked.recv().unwrap();
                }
            })
        })
        .collect();
    for h in senders {
        h.join().unwrap();
    }
    drop(to_gateways);
    for h in gateways {
        h.join().unwrap();
    }
    let total: usize = work.iter().map(|b| b.records.len()).sum();
    for s in &stores {
        assert_eq!(s.records_stored().unwrap() as usize, total);
        for agent in agents {
            assert_eq!(s.records_stored_of(agent).unwrap(), 39, "{agent}");
        }
    }
    let s = &stores[0];
    let tickets = s.tickets().unwrap();
    // agent-1's three devices, three episodes each (the strays open none). A fault that
    // recurs soon after is the same ticket's recurrence, so there are 3 to 9 tickets as
    // the batches happened to arrive; but every episode is in exactly one of them.
    assert!((3..=9).contains(&tickets.len()), "{}", tickets.len());
    let episodes: Vec<&String> = tickets.iter().flat_map(|t| &t.episodes).collect();
    assert_eq!(episodes.len(), 9, "{episodes:?}");
    assert_eq!(
        episodes.iter().collect::<BTreeSet<_>>().len(),
        9,
        "an episode in two tickets"
    );
    let jobs = s.jobs().unwrap();
    let creates: Vec<&String> = jobs
        .iter()
        .filter(|j| j.event.is_none())
        .map(|j| &j.ticket_key)
        .collect();
    assert_eq!(creates.len(), tickets.len(), "one create per ticket");
    assert_eq!(creates.iter().collect::<BTreeSet<_>>().len(), tickets.len());
    let events: Vec<&String> = jobs.iter().filter_map(|j| j.event.as_ref()).collect();
    let kept: usize = tickets.iter().map(|t| t.events.len()).sum();
    assert_eq!(events.len(), kept, "a job per event the tickets hold");
    assert_eq!(
        events.iter().collect::<BTreeSet<_>>().len(),
        kept,
        "no event twice"
    );
    // As one redb store that got them all in the agents' order.
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path()).unwrap();
    for b in &work {
        redb.apply(b, &cx, at(2000)).unwrap();
    }
    let summary = |s: &dyn GatewayStore| -> Vec<(String, bool, Vec<String>, usize)> {
        s.tickets()
            .unwrap()
            .into_iter()
            .map(|t| (t.key, t.open, t.episodes, t.events.len()))
            .collect()
    };
    assert_eq!(summary(s.as_ref()), summary(&redb));
    // Every gateway answers with the same figures.
    let p = picture(s.as_ref());
    for other in &stores[1..] {
        assert_eq!(picture(other.as_ref()), p);
    }
}

#[test]
fn each_ticket_s_jobs_are_claimed_by_one_gateway_until_its_lease_runs_out() {
    let db = database("claims");
    let a = open(&db);
    let b = open(&db);
    let keys: Vec<String> = (0..6).map(|i| format!("t-{i}")).collect();
    queue_jobs(&db, &keys);
    let long = Duration::from_secs(60);
    // A ticket whose jobs are gone (another gateway sent them and let go) is nobody's
    // to claim: a forwarder that read the outbox before must not send them again.
    assert!(a
        .claim_jobs(&["t-done".to_string()], "gw-a", long)
        .unwrap()
        .is_empty());
    let mine_a = a.claim_jobs(&keys[..4], "gw-a", long).unwrap();
    assert_eq!(mine_a.len(), 4);
    let mine_b = b.claim_jobs(&keys, "gw-b", long).unwrap();
    assert_eq!(mine_b.len(), 2, "{mine_b:?}");
    assert!(mine_a.is_disjoint(&mine_b));
    // Renewed by its holder.
    assert_eq!(a.claim_jobs(&keys, "gw-a", long).unwrap().len(), 4);
    // Gateway a stops renewing (killed): after its lease, b takes over.
    let short = Duration::from_millis(200);
    assert_eq!(a.claim_jobs(&keys[..1], "gw-a", short).unwrap().len(), 1);
    assert!(!b
        .claim_jobs(&keys[..1], "gw-b", long)
        .unwrap()
        .contains("t-0"));
    std::thread::sleep(Duration::from_millis(400));
    assert!(b
        .claim_jobs(&keys[..1], "gw-b", long)
        .unwrap()
        .contains("t-0"));
    // Claims race from many threads: each ticket goes to exactly one of them.
    let db = database("claims_race");
    let stores: Vec<Arc<PgStore>> = (0..4).map(|_| Arc::new(open(&db))).collect();
    let keys: Arc<Vec<String>> = Arc::new((0..200).map(|i| format!("k-{i}")).collect());
    queue_jobs(&db, &keys);
    let handles: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (s, keys) = (s.clone(), keys.clone());
            std::thread::spawn(move || s.claim_jobs(&keys, &format!("gw-{i}"), long).unwrap())
        })
        .collect();
    let won: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let sum: usize = won.iter().map(|w| w.len()).sum();
    let union: BTreeSet<&String> = won.iter().flatten().collect();
    assert_eq!(union.len(), sum, "no ticket claimed by two gateways");
    // Skipped rows are not lost: what nobody got in the race is claimable now.
    let rest = stores[0].claim_jobs(&keys, "gw-0", long).unwrap();
    assert_eq!(rest.len() + sum - won[0].len(), 200);
}

#[test]
fn one_gateway_leads_a_fleet_wide_duty_until_its_lease_runs_out() {
    let db = database("duties");
    let (a, b) = (open(&db), open(&db));
    let long = Duration::from_secs(60);
    assert!(a.lead("status-read-back", "gw-a", long).unwrap());
    assert!(!b.lead("status-read-back", "gw-b", long).unwrap());
    // Another duty is anybody's; the leader keeps its own by renewing it.
    assert!(b.lead("other", "gw-b", long).unwrap());
    assert!(a.lead("status-read-back", "gw-a", long).unwrap());
    // Gateway a stops renewing (killed): after its lease, b leads.
    assert!(a
        .lead("status-read-back", "gw-a", Duration::from_millis(200))
        .unwrap());
    assert!(!b.lead("status-read-back", "gw-b", long).unwrap());
    std::thread::sleep(Duration::from_millis(400));
    assert!(b.lead("status-read-back", "gw-b", long).unwrap());
    assert!(!a.lead("status-read-back", "gw-a", long).unwrap());
    // A store of one gateway: it always leads.
    let dir = tempfile::tempdir().unwrap();
    let redb = RedbStore::open(dir.path()).unwrap();
    assert!(redb.lead("status-read-back", "gw", long).unwrap());
}

/// A job in the shared outbox for each of `tickets`, as ingest queues a ticket's creation.
fn queue_jobs(db: &str, tickets: &[String]) {
    let values: Vec<String> = tickets.iter().map(|k| format!("('{k}')")).collect();
    cluster().query(
        db,
        &format!(
            "INSERT INTO outbox (ticket_key) VALUES {}",
            values.join(", ")
        ),
    );
}

#[test]
fn gateways_starting_together_migrate_the_schema_once() {
    let db = database("migrate_once");
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || open(&db))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let rows = cluster().query(
        &db,
        "SELECT version FROM tend_schema_version ORDER BY version",
    );
    assert_eq!(rows, ["1", "2", "3", "4"].map(String::from).to_vec());
    // A database of a newer schema than this build knows is refused, by name.
    cluster().query(&db, "INSERT INTO tend_schema_version (version) VALUES (99)");
    let pg = cluster();
    let mut config = tend_gateway::store::pg_config(&pg.url(&db)).unwrap();
    config.password(pg.password());
    let e = PgStore::open(PgConnect { config, tls: None }).unwrap_err();
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

#[test]
fn a_wrong_password_or_no_database_is_a_clear_error_without_the_password() {
    let pg = cluster();
    let mut config = tend_gateway::store::pg_config(&pg.url("postgres")).unwrap();
    config.password("not-the-password");
    let e = PgStore::open(PgConnect { config, tls: None }).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", pg.port())), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
    for (url, says) in [
        ("mysql://x@h/db", "not a postgres:// URL"),
        ("postgres://h/db", "names no user"),
        ("postgres://u@h", "names no database"),
    ] {
        let e = tend_gateway::store::pg_config(url).unwrap_err();
        assert!(e.contains(says), "{url}: {e}");
    }
}

/// The database stopped mid-run (its own cluster, so the other tests keep theirs): calls
/// fail with an error naming the database (ingest acknowledges nothing, the agent keeps
/// its records), and once it is back the same store carries on with nothing lost.
#[test]
fn a_database_stopped_mid_run_fails_calls_and_the_store_carries_on_when_it_is_back() {
    let pg = Postgres::start();
    let db = pg.create_database("restart");
    let mut config = tend_gateway::store::pg_config(&pg.url(&db)).unwrap();
    config.password(pg.password());
    let store = PgStore::open(PgConnect { config, tls: None }).unwrap();
    let cx = cx();
    let records = a_day();
    let (first, second) = records.split_at(10);
    store
        .apply(&batch("agent-1", "i1", first.to_vec()), &cx, at(100))
        .unwrap();
    pg.stop_server();
    let later = batch("agent-1", "i1", second.to_vec());
    let e = store.apply(&later, &cx, at(101)).unwrap_err();
    assert!(
        e.to_string().contains(&format!("127.0.0.1:{}", pg.port())),
        "{e}"
    );
    assert!(store.tickets().is_err());
    pg.start_server();
    // The agent resends what was not acknowledged.
    let a = store.apply(&later, &cx, at(102)).unwrap();
    assert_eq!(a.new_records as usize, second.len());
    assert_eq!(store.records_stored().unwrap() as usize, records.len());
    assert_eq!(store.tickets().unwrap().len(), 3);
}

/// `sslmode=require` in the URL: the store speaks TLS to the database and checks its
/// certificate against `ca_file` (the test CA here); a certificate from another CA is
/// refused, with a message that says so.
#[test]
fn tls_to_the_database_when_the_url_asks_for_it_checked_against_the_ca_file() {
    use tend_gateway::config::{StoreKind, StoreSection};
    use tend_testkit::certs::{CA_PEM, OTHER_CA_PEM};
    let pg = cluster();
    let db = database("tls");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    tend_testkit::config::write_secret(&pw, format!("{}\n", pg.password())).unwrap();
    std::fs::write(dir.path().join("ca.pem"), CA_PEM).unwrap();
    std::fs::write(dir.path().join("other.pem"), OTHER_CA_PEM).unwrap();
    let section = |ca: &str| StoreSection {
        kind: StoreKind::Postgres,
        url: Some(format!("{}?sslmode=require", pg.url(&db))),
        password_file: Some(pw.clone()),
        ca_file: Some(dir.path().join(ca)),
    };
    let connect = PgConnect::from_section(&section("ca.pem")).unwrap();
    assert!(connect.tls.is_some());
    let store = PgStore::open(connect).unwrap();
    assert_eq!(store.records_stored().unwrap(), 0);
    let tls = pg.query(
        &db,
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a ON a.pid = s.pid \
         WHERE s.ssl AND a.datname = 'tls' AND a.application_name = 'tend-gateway'",
    );
    assert_ne!(
        tls,
        vec!["0".to_string()],
        "the store's connection is not TLS"
    );
    let e = PgStore::open(PgConnect::from_section(&section("other.pem")).unwrap()).unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    // Without sslmode=require no TLS is asked for.
    let plain = StoreSection {
        url: Some(pg.url(&db)),
        ..section("ca.pem")
    };
    assert!(PgConnect::from_section(&plain).unwrap().tls.is_none());
}

/// Enrolments in the shared store: the newer state of an agent wins, whichever gateway
/// brings it and in whatever order (a new key over an old one, a revocation over the
/// enrolment it revokes, never an older state over a newer).
#[test]
fn the_newer_enrolment_of_an_agent_wins_in_the_shared_store() {
    use tend_gateway::trust::Enrolment;
    let db = database("trust");
    let (a, b) = (open(&db), open(&db));
    let e = |n: u8, at: i64, revoked: Option<i64>| Enrolment {
        agent: "agent-1".into(),
        key: tend_wire::AgentKey::from_hex(&format!("{n:02x}").repeat(32)).unwrap(),
        enrolled_at: at_s(at),
        revoked_at: revoked.map(at_s),
    };
    let first = e(1, 100, None);
    let revoked = e(1, 100, Some(200));
    let again = e(2, 300, None);
    a.keep_trust_entries(std::slice::from_ref(&first)).unwrap();
    b.keep_trust_entries(std::slice::from_ref(&revoked))
        .unwrap();
    a.keep_trust_entries(std::slice::from_ref(&first)).unwrap(); // an older state coming late changes nothing
    assert_eq!(b.trust_entries().unwrap(), vec![revoked.clone()]);
    b.keep_trust_entries(std::slice::from_ref(&again)).unwrap();
    a.keep_trust_entries(std::slice::from_ref(&revoked))
        .unwrap();
    assert_eq!(a.trust_entries().unwrap(), vec![again.clone()]);
    // Several agents in one call, each by the same rule.
    let other = Enrolment {
        agent: "agent-2".into(),
        ..first.clone()
    };
    b.keep_trust_entries(&[first.clone(), other.clone()])
        .unwrap();
    assert_eq!(a.trust_entries().unwrap(), vec![again.clone(), other]);
    // And the trust directory's merge follows the same rule.
    let dir = tempfile::tempdir().unwrap();
    let td = tend_gateway::trust::TrustDir::new(dir.path().join("trust"));
    assert!(td.merge(&first).unwrap());
    assert!(!td.merge(&first).unwrap());
    assert!(td.merge(&revoked).unwrap());
    assert!(!td.merge(&first).unwrap());
    assert!(td.merge(&again).unwrap());
    assert_eq!(td.entries().unwrap(), vec![again]);
}

fn at_s(s: i64) -> Timestamp {
    Timestamp::from_second(1_790_000_000 + s).unwrap()
}

/// One gateway's parts the forwarder needs, on its own store.
fn forwarding_gateway(id: &str, store: Arc<PgStore>, dir: &std::path::Path) -> Gateway {
    let (diag, _requests) = DiagClient::new(id);
    Gateway::new(
        store,
        cx(),
        diag,
        Trust::open(TrustDir::new(dir.join(id))).unwrap(),
        true,
        Duration::from_secs(5),
    )
}

/// Three forwarders on one database racing for the same jobs while ingest adds to the
/// same tickets. Caught two faults: a forwarder that read the outbox before another sent
/// a job and let go of its claim sent it again; and a sent job's outcome written over
/// the ticket from an older read, losing the recurrence ingest had just added to it (its
/// job then waited forever, and every later event of that ticket behind it).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_forwarders_on_one_database_send_each_ticket_and_event_once() {
    let db = database("three_forwarders");
    let tmp = tempfile::tempdir().unwrap();
    let backend = tend_testkit::backend_standin::spawn("fwd-token")
        .await
        .unwrap();
    let mut gateways = Vec::new();
    let mut running = Vec::new();
    for i in 0..3 {
        let id = format!("gw-{i}");
        let gw = forwarding_gateway(&id, Arc::new(open(&db)), tmp.path());
        let api = ServiceApi::new(ServiceApiConfig {
            timeout: Duration::from_secs(3),
            ..ServiceApiConfig::new(backend.url(), "fwd-token")
        })
        .unwrap();
        let stop = CancellationToken::new();
        running.push((
            stop.clone(),
            tokio::spawn(forwarder::run(
                gw.clone(),
                Box::new(api),
                ForwarderConfig {
                    status_poll: Duration::from_secs(3600),
                    min_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_secs(1),
                    gateway_id: id,
                },
                stop,
            )),
        ));
        gateways.push(gw);
    }
    // Faults opening and clearing on three ventilators, a batch at a time through
    // alternating gateways; after each, every forwarder wakes at once: they read the
    // same outbox and race for its jobs.
    let mut seq = 0u64;
    let mut next = || {
        seq += 1;
        seq
    };
    let mut episodes = 0;
    for n in 1..=30u32 {
        let mut records = Vec::new();
        for device in ["vent-1", "vent-2", "vent-3"] {
            let open = 60 * n as i64;
            records.push(episode(device, next(), open, n, EpisodeChange::Opened));
            records.push(episode(
                device,
                next(),
                open + 20,
                n,
                EpisodeChange::Cleared,
            ));
            episodes += 1;
        }
        let store = gateways[n as usize % 3].store.clone();
        let b = batch("agent-1", "i1", records);
        tokio::task::spawn_blocking(move || store.apply(&b, &cx(), at(2000)).unwrap())
            .await
            .unwrap();
        for gw in &gateways {
            gw.forwarder_wake.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store = gateways[0].store.clone();
    let all_sent = || {
        let store = store.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let t = store.tickets().unwrap();
                !t.is_empty()
                    && t.iter().all(|t| {
                        t.forward.state == ForwardState::Sent
                            && t.events
                                .iter()
                                .all(|e| e.forward.state == ForwardState::Sent)
                    })
            })
            .await
            .unwrap()
        }
    };
    let t = std::time::Instant::now();
    while !all_sent().await {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "not all forwarded in 60 s; jobs left: {:?}",
            cluster().query(&db, "SELECT ticket_key, event FROM outbox")
        );
        for gw in &gateways {
            gw.forwarder_wake.notify_one();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (stop, task) in running {
        stop.cancel();
        task.await.unwrap();
    }
    // Nobody was killed and the backend always answered: every request went out once.
    let mut sent: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in backend.requests() {
        assert!(r.status.is_some_and(|s| s < 300), "{r:#?}");
        *sent
            .entry((
                r.path.clone(),
                r.idempotency_key.clone().unwrap_or_default(),
            ))
            .or_default() += 1;
    }
    let twice: Vec<_> = sent.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    // What the gateways decided is what the backend holds: each ticket once, each of
    // its events (recurrences, clearances) once.
    let decided = tokio::task::spawn_blocking(move || store.tickets().unwrap())
        .await
        .unwrap();
    let in_tickets: usize = decided.iter().map(|t| t.episodes.len()).sum();
    assert_eq!(in_tickets, episodes, "every episode in one ticket");
    let creates = backend.requests().iter().filter(|r| r.is_create()).count();
    assert_eq!(creates, decided.len());
    let events: usize = decided.iter().map(|t| t.events.len()).sum();
    let received: usize = backend.tickets().iter().map(|t| t.events.len()).sum();
    assert!(
        events >= episodes,
        "{events} events for {episodes} episodes"
    );
    assert_eq!(received, events);
}

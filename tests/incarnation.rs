//! Outbox incarnations and damaged store files, with real processes (DESIGN "Trust": an
//! outbox has an incarnation; §5: a damaged store is named, never a panic).
//!
//! - An agent whose outbox is deleted starts again at seq 1 in a new incarnation, and
//!   every record it sends after the restart arrives (none dropped as a duplicate of what
//!   the old outbox sent under the same seqs); then its outbox is cut short: it is moved
//!   aside, a third incarnation starts, and its records arrive too.
//! - A batch (sealed with the enrolled agent's key) with a known (agent, incarnation,
//!   seq) and other content is a conflict: counted, shown on `GET /api/v1/agents`,
//!   acknowledged (the ack names the incarnation), not applied. A sealed batch without
//!   an incarnation is malformed.
//! - A truncated gateway store: the gateway exits non-zero with an error naming the file
//!   and what to do, and no panic.

mod common;

use common::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::path::Path;
use std::time::Duration;
use tend_agent::outbox::{Outbox, OutboxConfig};
use tend_gateway::store::{GatewayStore, RedbStore};
use tend_profiles::DeviceState;
use tend_wire::{
    encode_sealed, seal, topic, Ack, AgentKey, Purpose, Record, RecordBody, SeqRange, UpBatch,
    VERSION,
};

const AGENT: &str = "agent-inc";

/// The incarnation and the next seq of the outbox in `data`.
async fn outbox_state(data: &Path) -> (String, u64) {
    let ob = Outbox::open(OutboxConfig::new(data.join("outbox.redb")))
        .await
        .unwrap();
    let out = (ob.incarnation().to_string(), ob.stats().next_seq);
    ob.close().await.unwrap();
    out
}

/// Waits until the gateway has stored at least `n` records in all.
async fn until_records(gw: &GatewayProc, n: f64, agent_log: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while tokio::time::Instant::now() < deadline {
        let m = gw.metrics().await;
        if metric(&m, "tend_gateway_records_total") >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{n} records not stored within 90 s; agent log:\n{}\ngateway log:\n{}",
        tail(agent_log, 30),
        tail(&gw.log, 30)
    );
}

/// The files `name` was moved aside to in `dir`.
fn moved_aside(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("{name}.corrupt-");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_damaged_outbox_starts_a_new_incarnation_and_loses_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let sims = spawn_sims(2).await;
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-inc",
            broker: BrokerChoice::Embedded(free_port()),
            backend: None,
            fleet: &sims_fleet(&sims),
        },
    )
    .await;
    let agent_dir = dir.path().join("agent");
    let data = agent_dir.join("data");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let cfg = agent_dir.join("agent.toml");
    let log = agent_dir.join("agent.log");
    enrol_agent(&gw.config, AGENT, &agent_dir);
    let fast = sims_agent_toml(AGENT, &gw.broker_url, &sims, "100ms");
    std::fs::write(&cfg, &fast).unwrap();

    // The first outbox sends a good number of records.
    let mut agent = spawn_agent(agent_bin(), &cfg, &log);
    until_records(&gw, 200.0, &log).await;
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let (first, next1) = outbox_state(&data).await;

    // Re-imaged box: the outbox is gone. The new one starts at seq 1.
    std::fs::remove_file(data.join("outbox.redb")).unwrap();
    let before = metric(&gw.metrics().await, "tend_gateway_records_total");
    std::fs::write(&cfg, &fast).unwrap();
    agent = spawn_agent(agent_bin(), &cfg, &log);
    until_records(&gw, before + 40.0, &log).await;
    drain_agent(
        &mut agent,
        &cfg,
        &log,
        sims_agent_toml(AGENT, &gw.broker_url, &sims, "1h"),
        &gw,
        &sims[0].0,
        Duration::from_secs(90),
    )
    .await;
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let (second, next2) = outbox_state(&data).await;
    assert_ne!(first, second, "a new outbox is a new incarnation");
    assert!(
        next2 < next1,
        "the test needs the new outbox's seqs ({next2}) inside the old one's ({next1})"
    );
    let (_, agents) = gw.get("/api/v1/agents").await;
    let me = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == AGENT)
        .unwrap_or_else(|| panic!("{AGENT} not in {agents}"));
    assert_eq!(me["incarnation"], second.as_str(), "{me}");
    assert_eq!(me["conflicting_records"], 0, "{me}");

    // Then the outbox file is cut short: moved aside, and a third incarnation starts.
    let path = data.join("outbox.redb");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let before = metric(&gw.metrics().await, "tend_gateway_records_total");
    std::fs::write(&cfg, &fast).unwrap();
    agent = spawn_agent(agent_bin(), &cfg, &log);
    until_records(&gw, before + 40.0, &log).await;
    let aside = moved_aside(&data, "outbox.redb");
    assert_eq!(aside.len(), 1, "{aside:?}; agent log:\n{}", tail(&log, 20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("outbox file is damaged: moved it aside"),
        "{}",
        tail(&log, 20)
    );
    assert!(!text.contains("panicked"), "{}", tail(&log, 20));
    drain_agent(
        &mut agent,
        &cfg,
        &log,
        sims_agent_toml(AGENT, &gw.broker_url, &sims, "1h"),
        &gw,
        &sims[0].0,
        Duration::from_secs(90),
    )
    .await;
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let (third, next3) = outbox_state(&data).await;
    assert!(third != first && third != second);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "tend_gateway_conflicting_records_total"), 0.0);
    gw.kill().await;

    // Every record of the second and third outboxes is stored under its incarnation.
    let store = RedbStore::open(&gw.dir.join("data")).unwrap();
    for (inc, next) in [(&second, next2), (&third, next3)] {
        let missing: Vec<u64> = (1..next)
            .filter(|s| !store.has_record_in(AGENT, inc, *s).unwrap())
            .collect();
        assert!(
            missing.is_empty(),
            "incarnation {inc}: {} of {} records lost, first {:?}",
            missing.len(),
            next - 1,
            &missing[..missing.len().min(10)]
        );
        assert!(!store.has_record_in(AGENT, inc, next).unwrap());
    }
    let agents = store.agents().unwrap();
    assert_eq!(agents[0].incarnation.as_deref(), Some(third.as_str()));
    assert!(!gw.log_text().contains("panicked"));
}

/// A publisher on the embedded broker that also collects what arrives on `filter`,
/// logged in as the enrolled agent (user = client id = agent id) would be.
async fn client(
    url: &str,
    key: &AgentKey,
    filter: &str,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    let hostport = url.trim_start_matches("mqtt://");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let mut opts = MqttOptions::new(AGENT, host, port.parse::<u16>().unwrap());
    opts.set_credentials(AGENT, key.broker_password(AGENT));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (c, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::unbounded_channel();
    let c2 = c.clone();
    let filter = filter.to_string();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = subscribed_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
        .await
        .expect("not subscribed");
    (c, rx)
}

fn state(seq: u64, to: DeviceState) -> Record {
    Record {
        seq,
        at: jiff::Timestamp::now(),
        device: "vent-0".into(),
        body: RecordBody::State {
            from: DeviceState::Unknown,
            to,
        },
    }
}

/// A batch of `AGENT`'s, sealed with its key.
fn batch(key: &AgentKey, incarnation: &str, records: Vec<Record>) -> Vec<u8> {
    let b = UpBatch {
        v: VERSION,
        agent: AGENT.into(),
        incarnation: incarnation.into(),
        site: "s-main".into(),
        sent_at: jiff::Timestamp::now(),
        oldest: None,
        records,
    };
    encode_sealed(key, Purpose::Up, AGENT, &b).unwrap()
}

/// Publishes `payload` on the agent's `up` until an ack comes back (the gateway may not
/// have subscribed yet when it says it is ready; resends are what dedup is for).
async fn send(
    c: &AsyncClient,
    acks: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    key: &AgentKey,
    payload: &[u8],
) -> Ack {
    for _ in 0..20 {
        c.publish(topic::up(AGENT), QoS::AtLeastOnce, false, payload.to_vec())
            .await
            .unwrap();
        let got = tokio::time::timeout(Duration::from_millis(500), acks.recv()).await;
        if let Ok(Some(bytes)) = got {
            let body = seal::open(key, Purpose::Ack, AGENT, &bytes).expect("a sealed ack");
            return Ack::decode(body).unwrap();
        }
    }
    panic!("no ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seq_with_other_content_is_a_conflict_counted_shown_and_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let sims = spawn_sims(1).await;
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-conflict",
            broker: BrokerChoice::Embedded(free_port()),
            backend: None,
            fleet: &sims_fleet(&sims),
        },
    )
    .await;
    let agent_dir = dir.path().join("agent");
    let key = enrol_agent(&gw.config, AGENT, &agent_dir);
    let (c, mut acks) = client(&gw.broker_url, &key, &topic::ack(AGENT)).await;
    let up = topic::up(AGENT);
    let inc = "1c0ffee";

    // The first version of seqs 1..=2: the device is up.
    let first = batch(
        &key,
        inc,
        vec![state(1, DeviceState::Up), state(2, DeviceState::Up)],
    );
    let ack = send(&c, &mut acks, &key, &first).await;
    assert_eq!(ack.incarnation, inc);
    assert_eq!(ack.ranges, vec![SeqRange { first: 1, last: 2 }]);

    // Seq 2 again with other content (the device down), and a new seq 3.
    let other = batch(
        &key,
        inc,
        vec![
            Record {
                at: jiff::Timestamp::now() + jiff::SignedDuration::from_secs(5),
                ..state(2, DeviceState::Down)
            },
            state(3, DeviceState::Up),
        ],
    );
    for _ in 0..2 {
        // Sent twice: the second time it is a resend, not a second conflict.
        let ack = send(&c, &mut acks, &key, &other).await;
        assert_eq!(ack.incarnation, inc, "the ack names the incarnation");
        assert_eq!(ack.ranges, vec![SeqRange { first: 2, last: 3 }], "acked");
    }

    let m = gw.metrics().await;
    assert_eq!(metric(&m, "tend_gateway_conflicting_records_total"), 1.0);
    let (st, agents) = gw.get("/api/v1/agents").await;
    assert_eq!(st, 200);
    let me = agents
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == AGENT)
        .unwrap_or_else(|| panic!("{AGENT} not in {agents}"))
        .clone();
    assert_eq!(me["conflicting_records"], 1, "{me}");
    assert_eq!(me["last_conflict"]["seq"], 2, "{me}");
    assert_eq!(me["last_conflict"]["incarnation"], inc, "{me}");
    assert_eq!(me["incarnation"], inc, "{me}");
    // Not applied: the device is still up.
    let (_, d) = gw.get("/api/v1/devices/vent-0").await;
    assert_eq!(d["state"], "up", "{d}");

    // A sealed batch without an incarnation is malformed: refused, counted, never acked.
    let malformed = metric(&m, "tend_gateway_malformed_messages_total");
    let mut bare = serde_json::to_value(UpBatch {
        v: VERSION,
        agent: AGENT.into(),
        incarnation: inc.into(),
        site: "s-main".into(),
        sent_at: jiff::Timestamp::now(),
        oldest: None,
        records: vec![state(9, DeviceState::Down)],
    })
    .unwrap();
    bare.as_object_mut().unwrap().remove("incarnation");
    // Sealed with the agent's key: it passes the seal and is refused as malformed.
    let bare = seal::seal(&key, Purpose::Up, AGENT, bare.to_string().as_bytes());
    c.publish(&up, QoS::AtLeastOnce, false, bare).await.unwrap();
    until(
        "the bare batch counted",
        Duration::from_secs(10),
        || async {
            let m = gw.metrics().await;
            (metric(&m, "tend_gateway_malformed_messages_total") > malformed).then_some(())
        },
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), acks.recv())
            .await
            .is_err(),
        "a malformed batch was acked"
    );
    assert!(gw.alive());
    gw.kill().await;

    let store = RedbStore::open(&gw.dir.join("data")).unwrap();
    assert_eq!(store.records_stored().unwrap(), 3);
    assert!(!store.has_record(AGENT, 9).unwrap());
    let history = store.history("vent-0", 100).unwrap();
    assert!(
        history
            .iter()
            .all(|e| !serde_json::to_string(e).unwrap().contains("\"down\"")),
        "the conflicting version reached the life record: {history:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_gateway_store_gives_a_clear_error_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let sims = spawn_sims(1).await;
    let gw_dir = dir.path().join("gw");
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &gw_dir,
        &GatewaySpec {
            id: "gw-cut",
            broker: BrokerChoice::Embedded(free_port()),
            backend: None,
            fleet: &sims_fleet(&sims),
        },
    )
    .await;
    let key = enrol_agent(&gw.config, AGENT, &dir.path().join("agent"));
    let (c, mut acks) = client(&gw.broker_url, &key, &topic::ack(AGENT)).await;
    let records = (1..=200).map(|s| state(s, DeviceState::Up)).collect();
    send(&c, &mut acks, &key, &batch(&key, "a1", records)).await;
    gw.kill().await;

    let file = gw_dir.join("data/gateway.redb");
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
    let out = tokio::process::Command::new(gateway_bin())
        .arg("run")
        .arg("--config")
        .arg(&gw.config)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("the gateway did not exit")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("is damaged"), "{stderr}");
    assert!(stderr.contains("move it aside"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("gateway ready"));
}

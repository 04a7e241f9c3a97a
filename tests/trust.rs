//! The trust boundary across processes (DESIGN "Trust", issue 12): a real gateway, a real
//! agent polling real simulators, a real broker (the embedded one, and Mosquitto where the
//! attack is about the gateway's own checks), and an attacker on the broker. Agent
//! `agent-a` is the victim; `agent-b` is enrolled too and turns attacker with its own key.
//!
//! For each attack: it fails (no ticket, no store change, counted in
//! `tend_gateway_rejected_messages_total{reason}`), and the real records around it all
//! arrive exactly once (the real fault opens its ticket once):
//!
//! - forged batches naming a fleet device with a major fault: unsigned, sealed with a
//!   made-up key, and sealed by B as A on A's topic (`unsigned`, `bad_signature`), or
//!   naming A on B's own topic (`wrong_agent`); all taking A's next seqs in A's current
//!   incarnation (squatting). A control batch B seals for itself with the same kind of
//!   fault does open a ticket: the forged ones were refused for what they are, not for
//!   their content;
//! - a forged diagnostic answer with the right id while the real agent is held (SIGSTOP):
//!   the hotline gets the real answer, and the audit log records only that;
//! - `agent revoke` while both run: A's new batches are refused (`revoked`), and after a
//!   restart on the revoked key its login to the embedded broker (through Mosquitto: its
//!   resent batches); after `agent add` again and a restart with the new credentials,
//!   everything A kept arrives;
//! - anonymous and wrong-password logins to the embedded broker are refused, and so is
//!   an agent's password under another name; the enrolled agent's own login is not.

mod common;

use common::*;
use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tend_profiles::{DeviceState, FaultClass, SignalKind};
use tend_wire::{
    encode, encode_sealed, seal, topic, AgentKey, DiagRequest, DiagResponse, EpisodeChange,
    EpisodeEvent, Purpose, Record, RecordBody, UpBatch, VERSION,
};

const A: &str = "agent-a";
const B: &str = "agent-b";
/// The fleet device the forgeries say is down with a major fault (nobody polls it).
const TARGET: &str = "spare-9";
/// The fleet device of the control batch B seals for itself.
const CONTROL: &str = "spare-8";

/// `tend_gateway_rejected_messages_total{reason="..."}` in a `/metrics` text.
fn rejected(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("tend_gateway_rejected_messages_total{{reason=\"{reason}\"}}"),
    )
}

/// Waits until the gateway has counted `n` more refusals for `reason` than in `before`.
async fn until_rejected(gw: &GatewayProc, before: &str, reason: &str, n: f64) {
    let from = rejected(before, reason);
    let counted = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = gw.metrics().await;
            if rejected(&m, reason) >= from + n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    if counted.is_err() {
        let m = gw.metrics().await;
        let counts: Vec<&str> = m.lines().filter(|l| l.contains("rejected")).collect();
        panic!(
            "not {n} more refusals ({reason}) within 30 s: {counts:?}; gateway log:\n{}",
            tail(&gw.log, 30)
        );
    }
}

/// An attacker's MQTT client; dropped, its connection goes with it. (A connection left
/// reconnecting would fight the next client of the same login for the client id, each
/// throwing the other off the broker, and lose what that one publishes.)
struct Attacker {
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl std::ops::Deref for Attacker {
    type Target = AsyncClient;
    fn deref(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An MQTT client logged in as `login` (user = client id, as an agent logs in) that hands
/// over what arrives on `filters`.
async fn client(
    url: &str,
    login: (&str, String),
    filters: &[String],
) -> (
    Attacker,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    let hostport = url.trim_start_matches("mqtt://");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let mut opts = MqttOptions::new(login.0, host, port.parse::<u16>().unwrap());
    opts.set_credentials(login.0, login.1);
    opts.set_max_packet_size(8 << 20, 8 << 20);
    opts.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = AsyncClient::new(opts, 256);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (sub_tx, mut subscribed) = tokio::sync::mpsc::unbounded_channel();
    let (c2, filters) = (c.clone(), filters.to_vec());
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = c2.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                    if filters.is_empty() {
                        let _ = sub_tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
        .await
        .expect("the attacker's client did not connect");
    (Attacker { client: c, task }, rx)
}

/// A forged batch "from" `agent`: `TARGET` (or `device`) down with a major fault, under
/// seqs `first..first + n` of `incarnation`.
fn forged_batch(agent: &str, incarnation: &str, device: &str, first: u64, n: u64) -> UpBatch {
    let now = Timestamp::now();
    let mut records = vec![
        Record {
            seq: first,
            at: now,
            device: device.into(),
            body: RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
        },
        Record {
            seq: first + 1,
            at: now,
            device: device.into(),
            body: RecordBody::Episode(EpisodeEvent {
                episode: format!("{agent}/{device}/ALM1.4/{first}"),
                change: EpisodeChange::Opened,
                code: "ALM1.4".into(),
                kind: SignalKind::Fault,
                class: Some(FaultClass::Major),
                description: "exhalation valve fault".into(),
                action: None,
                evidence: BTreeMap::from([("alarm_word_1".to_string(), json!(16))]),
                device_available: false,
                opened_at: now,
                due: None,
                opening: None,
            }),
        },
    ];
    for seq in first + 2..first + n {
        records.push(Record {
            seq,
            at: now,
            device: device.into(),
            body: RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
        });
    }
    UpBatch {
        v: VERSION,
        agent: agent.into(),
        incarnation: incarnation.into(),
        site: "s-main".into(),
        sent_at: jiff::Timestamp::now(),
        oldest: None,
        records,
    }
}

/// Sends a signal to a process this test started (`STOP`, `CONT`).
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// The gateway (embedded broker or Mosquitto), the backend stand-in, four simulators and
/// agent A polling them every 100 ms; the fleet also lists `TARGET` and `CONTROL`.
struct Rig {
    dir: tempfile::TempDir,
    _mosquitto: Option<tokio::process::Child>,
    backend: tend_testkit::backend_standin::Backend,
    sims: Vec<(String, Sim)>,
    gw: GatewayProc,
    agent: tokio::process::Child,
    agent_dir: PathBuf,
    cfg: PathBuf,
    log: PathBuf,
}

impl Rig {
    async fn start(external: bool) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (mosquitto, broker) = if external {
            let port = free_port();
            let m = start_mosquitto(dir.path(), port).await;
            let url = format!("mqtt://127.0.0.1:{port}");
            (Some(m), BrokerChoice::External { url, group: None })
        } else {
            (None, BrokerChoice::Embedded(free_port()))
        };
        let backend = tend_testkit::backend_standin::spawn(BACKEND_TOKEN)
            .await
            .unwrap();
        let backend_url = backend.url();
        let sims = spawn_sims(4).await;
        let mut fleet = sims_fleet(&sims);
        for (id, serial) in [(TARGET, "AV5C-21-999999"), (CONTROL, "AV5C-21-999998")] {
            fleet.push_str(&format!(
                "\n[[device]]\nid = \"{id}\"\nsite = \"s-main\"\nserial = \"{serial}\"\nlocation = \"Store room\"\naccepted = \"2025-06-01\"\n"
            ));
        }
        let gw = GatewayProc::spawn(
            gateway_bin(),
            &dir.path().join("gw"),
            &GatewaySpec {
                id: "gw-trust",
                broker,
                backend: Some(&backend_url),
                fleet: &fleet,
            },
        )
        .await;
        let agent_dir = dir.path().join("agent");
        let cfg = agent_dir.join("agent.toml");
        let log = agent_dir.join("agent.log");
        enrol_agent(&gw.config, A, &agent_dir);
        std::fs::write(&cfg, sims_agent_toml(A, &gw.broker_url, &sims, "100ms")).unwrap();
        let agent = spawn_agent(agent_bin(), &cfg, &log);
        until_all_up_no_fault(&gw, sims.len(), Duration::from_secs(90)).await;
        Rig {
            dir,
            _mosquitto: mosquitto,
            backend,
            sims,
            gw,
            agent,
            agent_dir,
            cfg,
            log,
        }
    }

    /// The real fault of `vent-0`: raised until its ticket is at the backend, then cleared.
    async fn real_fault(&self) {
        let (id, sim) = &self.sims[0];
        sim.raise(0);
        until(
            "the real fault's ticket at the backend",
            Duration::from_secs(60),
            || async {
                self.backend
                    .tickets()
                    .into_iter()
                    .find(|t| t.body["device"]["id"] == json!(id))
            },
        )
        .await;
        sim.clear();
    }

    /// Neither a ticket nor a down state for `device` at the gateway, nor a ticket at the
    /// backend.
    async fn assert_untouched(&self, device: &str) {
        let (st, tickets) = self
            .gw
            .get(&format!("/api/v1/tickets?device={device}"))
            .await;
        assert_eq!(st, 200, "{tickets}");
        assert_eq!(tickets, json!([]), "a forged ticket for {device}");
        let (st, d) = self.gw.get(&format!("/api/v1/devices/{device}")).await;
        assert_eq!(st, 200, "{d}");
        assert_ne!(d["state"], "down", "{device} taken down by a forgery: {d}");
        // Never heard of at all: nothing in its life record.
        assert_eq!(d["open_faults"], json!([]), "{d}");
        assert_eq!(d["history"], json!([]), "{d}");
        assert!(d["last_seen"].is_null(), "{d}");
        assert!(self
            .backend
            .tickets()
            .iter()
            .all(|t| t.body["device"]["id"] != json!(device)));
    }

    /// The agent's last run (every record it kept acknowledged), then the checks on the
    /// stopped processes' files: A's records exactly once (`others` more records of other
    /// agents in the store), one ticket per episode, no conflict. Returns A's last seq.
    async fn finish(mut self, others: u64) -> u64 {
        until_all_up_no_fault(&self.gw, self.sims.len(), Duration::from_secs(60)).await;
        drain_agent(
            &mut self.agent,
            &self.cfg,
            &self.log,
            sims_agent_toml(A, &self.gw.broker_url, &self.sims, "1h"),
            &self.gw,
            &self.sims[0].0,
            Duration::from_secs(120),
        )
        .await;
        let m = self.gw.metrics().await;
        assert_eq!(metric(&m, "tend_gateway_conflicting_records_total"), 0.0);
        let _ = self.agent.start_kill();
        let _ = self.agent.wait().await;
        self.gw.kill().await;
        assert!(!self.gw.log_text().contains("panicked"));
        let gw_data = self.dir.path().join("gw/data");
        let max = assert_delivered(&self.agent_dir.join("data"), &gw_data, A, others == 0).await;
        {
            use tend_gateway::store::{GatewayStore, RedbStore};
            let store = RedbStore::open(&gw_data).unwrap();
            assert_eq!(store.records_stored().unwrap(), max + others);
        }
        let mut devices: Vec<&str> = self.sims.iter().map(|(id, _)| id.as_str()).collect();
        devices.extend([TARGET, CONTROL]);
        let figures = assert_one_ticket_per_episode(&gw_data, &self.backend, &devices, &[]);
        assert!(figures.tickets >= 1, "{figures:?}");
        max
    }
}

/// Forged batches: unsigned, sealed with a made-up key, sealed by B as A, and B's batch
/// naming A on B's topic; all squatting A's next seqs. Then B's control batch for itself.
/// Returns the first squatted seq.
async fn forged_batches(rig: &Rig, b_key: &AgentKey) -> u64 {
    let gw = &rig.gw;
    let login = (B, b_key.broker_password(B));
    let (attacker, mut seen) = client(&gw.broker_url, login, &[topic::up(A)]).await;
    // A's current incarnation and last seq, read off the wire as anyone on the broker can.
    let (incarnation, last) = loop {
        let (_, payload) = seen.recv().await.expect("A's batches");
        let (body, _) = seal::split(&payload).expect("A's batches are sealed");
        let b = UpBatch::decode(body).unwrap();
        if let Some(r) = b.records.last() {
            break (b.incarnation, r.seq);
        }
    };
    let first = last + 1;
    let squat = forged_batch(A, &incarnation, TARGET, first, 2000);
    let body = encode(&squat).unwrap();
    let made_up = AgentKey::from_bytes([0x5a; 32]);
    let before = gw.metrics().await;
    for (topic, payload) in [
        (topic::up(A), body.clone()),
        (topic::up(A), seal::seal(&made_up, Purpose::Up, A, &body)),
        (topic::up(A), seal::seal(b_key, Purpose::Up, A, &body)),
        (topic::up(B), seal::seal(b_key, Purpose::Up, B, &body)),
    ] {
        attacker
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    until_rejected(gw, &before, "unsigned", 1.0).await;
    until_rejected(gw, &before, "bad_signature", 2.0).await;
    until_rejected(gw, &before, "wrong_agent", 1.0).await;

    // The control: the same kind of fault, sealed by B for itself, opens a ticket.
    let control = forged_batch(B, "b1c0ffee", CONTROL, 1, 2);
    let payload = encode_sealed(b_key, Purpose::Up, B, &control).unwrap();
    attacker
        .publish(topic::up(B), QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    until(
        "the control batch's ticket",
        Duration::from_secs(30),
        || async {
            let (_, t) = gw.get(&format!("/api/v1/tickets?device={CONTROL}")).await;
            (t.as_array()?.len() == 1).then_some(())
        },
    )
    .await;
    rig.assert_untouched(TARGET).await;
    first
}

/// A forged answer to a pending diagnostic: the agent is held (SIGSTOP) while the
/// attacker, who sees the request go by, answers it unsigned and sealed with B's key.
async fn forged_diagnostic_answer(rig: &Rig, b_key: &AgentKey) {
    let gw = &rig.gw;
    let device = rig.sims[1].0.clone();
    let login = (B, b_key.broker_password(B));
    let (attacker, mut seen) = client(&gw.broker_url, login, &[topic::diag_req(A)]).await;
    let pid = rig.agent.id().unwrap();
    signal(pid, "STOP");
    let asked = {
        let (api, path) = (
            gw.api.clone(),
            format!("/api/v1/devices/{device}/diagnostics"),
        );
        tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{api}{path}"))
                .bearer_auth(API_TOKEN)
                .json(&json!({"request": "outbox"}))
                .send()
                .await
                .unwrap();
            let st = r.status().as_u16();
            (st, r.json::<serde_json::Value>().await.unwrap_or_default())
        })
    };
    let (_, payload) = tokio::time::timeout(Duration::from_secs(10), seen.recv())
        .await
        .expect("the request on the wire")
        .unwrap();
    let (body, _) = seal::split(&payload).expect("the request is sealed");
    let req: DiagRequest = serde_json::from_slice(body).unwrap();
    assert_eq!(req.device, device);
    let forged = DiagResponse {
        v: VERSION,
        id: req.id.clone(),
        device: device.clone(),
        request: req.request.clone(),
        ok: true,
        answer: json!({"forged": true, "records": 0, "next_seq": 1}),
        error: None,
    };
    let body = encode(&forged).unwrap();
    let before = gw.metrics().await;
    for payload in [body.clone(), seal::seal(b_key, Purpose::DiagResp, A, &body)] {
        attacker
            .publish(topic::diag_resp(A), QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    until_rejected(gw, &before, "unsigned", 1.0).await;
    until_rejected(gw, &before, "bad_signature", 1.0).await;
    signal(pid, "CONT");
    let (st, v) = asked.await.unwrap();
    assert!(
        !v.to_string().contains("forged"),
        "the hotline got the forged answer: {v}"
    );
    // The real answer, or a timeout if the held agent came back too late: never the
    // forgery.
    assert!(st == 200 || st == 504, "{st}: {v}");
    if st == 200 {
        assert!(v["answer"]["next_seq"].as_u64().unwrap() > 1, "{v}");
    }
    let audit = std::fs::read_to_string(gw.dir.join("data/audit.log")).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["device"] == json!(device))
        .collect();
    assert_eq!(lines.len(), 1, "{audit}");
    assert_eq!(lines[0]["status"], st, "{audit}");
    assert_eq!(lines[0]["outcome"] == "ok", st == 200, "{audit}");
}

async fn attacks(external: bool) {
    let rig = Rig::start(external).await;
    let b_key = enrol_agent(&rig.gw.config, B, &rig.dir.path().join("agent-b"));
    let first = forged_batches(&rig, &b_key).await;
    rig.real_fault().await;
    forged_diagnostic_answer(&rig, &b_key).await;
    let max = rig.finish(2).await;
    // A's real records took the seqs the forgeries squatted on.
    assert!(
        max > first,
        "A never reached the squatted seqs ({first}.., max {max})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_batches_and_answers_are_refused_on_the_embedded_broker_and_the_real_records_arrive_once(
) {
    attacks(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_batches_and_answers_are_refused_through_mosquitto_and_the_real_records_arrive_once()
{
    attacks(true).await;
}

/// `agent revoke` while the gateway and A run, a fault of A's device kept while it is
/// revoked, then `agent add` again and a restart on the new credentials.
async fn revocation(external: bool) {
    let mut rig = Rig::start(external).await;
    let a_old = read_credentials(&rig.agent_dir.join(format!("{A}.cred"))).key;
    // An observer on the broker (B's login), to see what A publishes.
    let b_key = enrol_agent(&rig.gw.config, B, &rig.dir.path().join("agent-b"));
    let login = (B, b_key.broker_password(B));
    let (_tap, mut seen) = client(&rig.gw.broker_url, login, &[topic::up(A)]).await;
    let before = rig.gw.metrics().await;
    revoke(gateway_bin(), &rig.gw.config, A);
    // Its batches (readings every 100 ms) are refused from now on.
    until_rejected(&rig.gw, &before, "revoked", 3.0).await;

    // A fault while revoked, kept in A's outbox. A restart (still on the revoked key)
    // sends everything unacknowledged again.
    let (id, sim) = &rig.sims[0];
    sim.raise(0);
    let _ = rig.agent.start_kill();
    let _ = rig.agent.wait().await;
    while seen.try_recv().is_ok() {}
    let restarted = rig.gw.metrics().await;
    rig.agent = spawn_agent(agent_bin(), &rig.cfg, &rig.log);
    if external {
        revoked_batches_refused(&rig, &a_old, &mut seen, &restarted).await;
    } else {
        // The embedded broker knows the trust store: the revoked agent gets no session.
        let refused = "tend_gateway_broker_refused_connections_total";
        let from = metric(&restarted, refused);
        until(
            "the revoked agent's login refused",
            Duration::from_secs(30),
            || async { (metric(&rig.gw.metrics().await, refused) > from).then_some(()) },
        )
        .await;
        // What the killed process published before it died may still be on its way to
        // the tap: let it land, then nothing more may come (the new process has no
        // session).
        tokio::time::sleep(Duration::from_millis(500)).await;
        while seen.try_recv().is_ok() {}
        let refused_logins = metric(&rig.gw.metrics().await, refused);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(seen.try_recv().is_err(), "a revoked agent published");
        assert!(metric(&rig.gw.metrics().await, refused) >= refused_logins);
    }
    let (_, tickets) = rig.gw.get(&format!("/api/v1/tickets?device={id}")).await;
    assert_eq!(tickets, json!([]), "a revoked agent's fault ticketed");
    assert!(rig.backend.tickets().is_empty());
    sim.clear();

    // Enrolled again: new credentials, the agent restarted on them.
    let _ = rig.agent.start_kill();
    let _ = rig.agent.wait().await;
    let a_new = enrol_agent(&rig.gw.config, A, &rig.agent_dir);
    assert!(a_new != a_old, "a new key");
    rig.agent = spawn_agent(agent_bin(), &rig.cfg, &rig.log);
    until(
        "the fault kept while revoked ticketed",
        Duration::from_secs(60),
        || async {
            rig.backend
                .tickets()
                .into_iter()
                .find(|t| t.body["device"]["id"] == json!(id))
        },
    )
    .await;
    rig.finish(0).await;
}

/// Through Mosquitto the revoked agent still publishes: every batch it sends after its
/// restart, up to and with the fault's opening (as seen on the wire, sealed with its old
/// key), is refused as `revoked`.
async fn revoked_batches_refused(
    rig: &Rig,
    a_old: &AgentKey,
    seen: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    restarted: &str,
) {
    let id = &rig.sims[0].0;
    let mut batches = 0.0;
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let (_, payload) = seen.recv().await.unwrap();
            batches += 1.0;
            let body = seal::open(a_old, Purpose::Up, A, &payload).expect("A's own seal");
            let b = UpBatch::decode(body).unwrap();
            let opened = b.records.iter().any(|r| {
                r.device == *id
                    && matches!(&r.body, RecordBody::Episode(e) if e.change == EpisodeChange::Opened)
            });
            if opened {
                return;
            }
        }
    })
    .await
    .expect("A sent its fault");
    until_rejected(&rig.gw, restarted, "revoked", batches).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_by_the_embedded_broker_and_after_enrolling_again_everything_it_kept_arrives(
) {
    revocation(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_agent_is_refused_through_mosquitto_and_after_enrolling_again_everything_it_kept_arrives(
) {
    revocation(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_refuses_anonymous_and_wrong_password_logins() {
    let dir = tempfile::tempdir().unwrap();
    let sims = spawn_sims(1).await;
    let gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-login",
            broker: BrokerChoice::Embedded(free_port()),
            backend: None,
            fleet: &sims_fleet(&sims),
        },
    )
    .await;
    let key = enrol_agent(&gw.config, A, &dir.path().join("agent"));
    let other = AgentKey::from_bytes([0x33; 32]);
    let hostport = gw.broker_url.trim_start_matches("mqtt://").to_string();
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let port: u16 = port.parse().unwrap();
    // Whether a CONNECT with `login` gets a session: the first ConnAck or error decides.
    let connects = |login: Option<(String, String)>| {
        let mut opts = MqttOptions::new(A, host, port);
        if let Some((u, p)) = login {
            opts.set_credentials(u, p);
        }
        async move {
            let (_c, mut el) = AsyncClient::new(opts, 8);
            let first = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(a))) => {
                            return a.code == rumqttc::ConnectReturnCode::Success
                        }
                        Ok(_) => continue,
                        Err(_) => return false,
                    }
                }
            })
            .await;
            first.expect("no answer to CONNECT")
        }
    };
    assert!(!connects(None).await, "anonymous login accepted");
    let wrong = other.broker_password(A);
    assert!(
        !connects(Some((A.into(), wrong))).await,
        "wrong password accepted"
    );
    assert!(
        !connects(Some((B.into(), key.broker_password(A)))).await,
        "A's password accepted for another user"
    );
    assert!(
        connects(Some((A.into(), key.broker_password(A)))).await,
        "the enrolled agent's login refused"
    );
    let refused = metric(
        &gw.metrics().await,
        "tend_gateway_broker_refused_connections_total",
    );
    assert!(refused >= 3.0, "refusals counted: {refused}");
    // Revoked: its own login is refused from then on.
    revoke(gateway_bin(), &gw.config, A);
    until(
        "the revoked agent's login refused",
        Duration::from_secs(30),
        || {
            let c = connects(Some((A.into(), key.broker_password(A))));
            async move { (!c.await).then_some(()) }
        },
    )
    .await;
}

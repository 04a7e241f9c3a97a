//! Attacks on a running `tend-agent` through its broker: whoever can publish on the
//! agent's topics (a shared broker, a stolen broker password) but does not hold the
//! agent's key. Forged, misaddressed and replayed acks while the gateway is away delete
//! nothing and do not make the agent's memory grow; replayed, expired and forged
//! diagnostic requests get no answer. What the agent refused shows in its `transport`
//! diagnostic. Real agent process, embedded broker, a simulated HM-2.

mod common;

use common::{fake_gateway, spawn_agent, wait_for, Store};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_devsim::hm2::{Hm2Config, Hm2Handle, Hm2Sim};
use tend_testkit::rss::{rss_kib, RssSampler};
use tend_testkit::trust::{credentials, open_batch, sealed_ack};
use tend_wire::seal::{open, seal};
use tend_wire::{
    encode, encode_sealed, topic, Ack, AgentKey, DiagRequest, DiagResponse, Purpose, SeqRange,
    VERSION,
};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);
/// The simulated device the diagnostics ask about.
const DEVICE: &str = "mri";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a client on the agent's topics saw.
#[derive(Default)]
struct Seen {
    /// Raw payloads on `ack`, as an eavesdropper records them.
    acks: Vec<Vec<u8>>,
    /// Outbox incarnations of the batches on `up` (opened with the agent's key).
    incarnations: Vec<String>,
    /// Answers on `diag/resp` that open with the agent's key, in order.
    answers: Vec<DiagResponse>,
    /// Statuses that open with the agent's key, in order.
    statuses: Vec<String>,
}

/// An MQTT client on one agent's topics: the hotline's side of diagnostics (it holds the
/// agent's key, as the gateway does), and the attacker's publishing.
struct Watcher {
    client: AsyncClient,
    agent: String,
    key: AgentKey,
    seen: Arc<Mutex<Seen>>,
    next_id: AtomicU64,
    _task: AbortOnDrop,
}

impl Watcher {
    /// Connects and returns once its subscriptions are in place.
    async fn start(port: u16, name: &str, agent: &str, key: &AgentKey) -> Watcher {
        let mut opts = MqttOptions::new(name, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (subscribed_tx, mut subscribed) = watch::channel(0usize);
        let task = {
            let (client, seen, agent, key) =
                (client.clone(), seen.clone(), agent.to_string(), key.clone());
            tokio::spawn(async move {
                let mut subacks = 0;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            for t in [
                                topic::ack(&agent),
                                topic::up(&agent),
                                topic::diag_resp(&agent),
                                topic::status(&agent),
                            ] {
                                client.try_subscribe(t, QoS::AtLeastOnce).unwrap();
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks += 1;
                            let _ = subscribed_tx.send(subacks);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let mut s = lock(&seen);
                            match topic::parse(&p.topic) {
                                Some(topic::Parsed::Ack(_)) => s.acks.push(p.payload.to_vec()),
                                Some(topic::Parsed::Up(_)) => {
                                    if let Some(b) = open_batch(&key, &agent, &p.payload) {
                                        s.incarnations.push(b.incarnation);
                                    }
                                }
                                Some(topic::Parsed::Status(_)) => {
                                    if let Ok(b) = open(&key, Purpose::Status, &agent, &p.payload) {
                                        s.statuses.push(String::from_utf8_lossy(b).into_owned());
                                    }
                                }
                                Some(topic::Parsed::DiagResp(_)) => {
                                    let body = open(&key, Purpose::DiagResp, &agent, &p.payload);
                                    if let Ok(Ok(r)) = body.map(DiagResponse::decode) {
                                        s.answers.push(r);
                                    }
                                }
                                _ => {}
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        tokio::time::timeout(WAIT, subscribed.wait_for(|n| *n >= 4))
            .await
            .expect("the watcher did not subscribe")
            .unwrap();
        Watcher {
            client,
            agent: agent.to_string(),
            key: key.clone(),
            seen,
            next_id: AtomicU64::new(0),
            _task: AbortOnDrop(task),
        }
    }

    fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&lock(&self.seen))
    }

    /// Spawns the agent and returns once it says `online` (after subscribing to its
    /// topics, so requests from then on reach it).
    async fn spawn_agent(&self, config: &Path, log: &Path) -> tokio::process::Child {
        let before = self.seen(|s| s.statuses.len());
        let agent = spawn_agent(config, log);
        tokio::time::timeout(WAIT, async {
            while !self.seen(|s| {
                s.statuses[before.min(s.statuses.len())..]
                    .iter()
                    .any(|x| x == "online")
            }) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the agent did not say online");
        agent
    }

    async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// A diagnostic request for the simulated device, sealed with `key`.
    fn request(
        &self,
        key: &AgentKey,
        id: &str,
        request: &str,
        expires_at: jiff::Timestamp,
    ) -> Vec<u8> {
        let req = DiagRequest {
            v: VERSION,
            id: id.into(),
            device: DEVICE.into(),
            request: request.into(),
            expires_at,
        };
        encode_sealed(key, Purpose::DiagReq, &self.agent, &req).unwrap()
    }

    /// The answers to request `id` so far.
    fn answers_to(&self, id: &str) -> usize {
        self.seen(|s| s.answers.iter().filter(|r| r.id == id).count())
    }

    /// Asks a diagnostic as the gateway would and waits for its answer.
    async fn diagnose(&self, request: &str) -> Value {
        let id = format!("ask-{}", self.next_id.fetch_add(1, Ordering::SeqCst));
        let expires = jiff::Timestamp::now() + Duration::from_secs(300);
        let req = self.request(&self.key, &id, request, expires);
        self.publish(&topic::diag_req(&self.agent), req).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer = self.seen(|s| s.answers.iter().find(|r| r.id == id).cloned());
            if let Some(r) = answer {
                assert!(r.ok, "the {request} diagnostic failed: {r:?}");
                return r.answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no answer to the {request} diagnostic"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The uplink's counters, from the `transport` diagnostic.
    async fn uplink_stats(&self) -> Value {
        let t = self.diagnose("transport").await;
        assert!(t["uplink"].is_object(), "no uplink stats in {t}");
        t["uplink"].clone()
    }

    /// Asks for the uplink's counters until `ok` holds of them; returns them.
    async fn uplink_stats_until(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let stats = self.uplink_stats().await;
            if ok(&stats) {
                return stats;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn rejected(stats: &Value, reason: &str) -> u64 {
    stats["rejected_messages"][reason].as_u64().unwrap_or(0)
}

/// An agent config polling the HM-2 at `hm2`, with its credentials in `<agent>.cred`.
fn write_config(dir: &Path, agent: &str, broker: &str, hm2: SocketAddr) -> std::path::PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "agent_id = \"{agent}\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"{broker}\"\ncredentials = \"{agent}.cred\"\nkeep_alive = \"5s\"\n\
             [[device]]\nid = \"{DEVICE}\"\nprofile = \"cryosense/hm-2\"\ntransport = \"modbus-tcp\"\naddress = \"{hm2}\"\npoll_interval = \"100ms\"\n"
        ),
    )
    .unwrap();
    config
}

async fn hm2() -> Hm2Handle {
    Hm2Sim::spawn_tcp(
        Hm2Config::v2(),
        "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
    )
    .await
    .unwrap()
}

async fn stop(mut agent: tokio::process::Child) {
    let pid = agent.id().unwrap();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let status = tokio::time::timeout(WAIT, agent.wait())
        .await
        .expect("the agent did not stop")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The outbox's records and oldest seq, from the `outbox` diagnostic.
async fn outbox(w: &Watcher) -> (u64, u64, String) {
    let o = w.diagnose("outbox").await;
    (
        o["records"].as_u64().unwrap(),
        o["oldest_seq"].as_u64().unwrap_or(0),
        o["incarnation"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_while_the_gateway_is_away_delete_nothing() {
    const FLOOD: u64 = 20_000;
    let agent_id = "agent-forged";
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let hm2 = hm2().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = credentials(dir.path(), agent_id);
    let config = write_config(dir.path(), agent_id, &broker.url(), hm2.addr());
    let log = dir.path().join("agent.log");
    let w = Watcher::start(broker.port(), "watcher-forged", agent_id, &key).await;

    // An eavesdropper records a genuine ack while the gateway is there.
    let store: Store = Arc::default();
    let gw = fake_gateway(broker.port(), store.clone(), Arc::default(), key.clone());
    let agent = w.spawn_agent(&config, &log).await;
    wait_for(&store, "first records", WAIT, |s| s.len() > 10).await;
    tokio::time::timeout(WAIT, async {
        while w.seen(|s| s.acks.is_empty()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("no ack seen");
    let captured = w.seen(|s| s.acks[0].clone());
    let old = Ack::decode(open(&key, Purpose::Ack, agent_id, &captured).unwrap()).unwrap();
    assert_eq!(old.ranges[0].first, 1, "the first ack names seq 1");
    stop(agent).await;
    gw.abort();

    // The outbox is reset (a new incarnation, seqs from 1 again) and the gateway is away.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let agent = w.spawn_agent(&config, &log).await;
    let pid = agent.id().unwrap();
    let (before, oldest, incarnation) = loop {
        let o = outbox(&w).await;
        if o.0 > 20 {
            break o;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(incarnation, old.incarnation);
    assert_eq!(oldest, 1);
    let all = vec![SeqRange {
        first: 1,
        last: 1_000_000_000,
    }];
    let ack_t = topic::ack(agent_id);

    // (a) Unsigned, naming every seq of the current incarnation.
    let unsigned = encode(&Ack {
        v: VERSION,
        incarnation: incarnation.clone(),
        ranges: all.clone(),
        gateway_time: jiff::Timestamp::now(),
    })
    .unwrap();
    w.publish(&ack_t, unsigned.clone()).await;
    // (b) Sealed with another agent's key.
    let other = AgentKey::generate().unwrap();
    w.publish(
        &ack_t,
        sealed_ack(&other, agent_id, &incarnation, all.clone()),
    )
    .await;
    // (c) The genuine ack recorded earlier, for the old incarnation's seqs 1...
    w.publish(&ack_t, captured).await;
    let stats = w
        .uplink_stats_until("the three forgeries are counted", |s| {
            rejected(s, "unsigned") >= 1
                && rejected(s, "bad_signature") >= 1
                && s["foreign_acks"].as_u64() >= Some(1)
        })
        .await;
    assert_eq!(rejected(&stats, "unsigned"), 1, "{stats}");
    assert_eq!(rejected(&stats, "bad_signature"), 1, "{stats}");
    assert_eq!(stats["foreign_acks"], 1, "{stats}");
    assert_eq!(stats["records_acked"], 0, "{stats}");
    let (records, oldest, _) = outbox(&w).await;
    assert!(records >= before, "records deleted: {records} < {before}");
    assert_eq!(oldest, 1, "the oldest record was deleted");

    // (d) A flood of unsigned acks, each with a long list of ranges: counted and
    // dropped, and the agent's memory stays near where it was.
    let (rss_before, _) = rss_kib(pid).unwrap();
    let sampler = RssSampler::start(vec![pid]);
    let big = encode(&Ack {
        v: VERSION,
        incarnation: incarnation.clone(),
        ranges: (0..100u64)
            .map(|i| SeqRange {
                first: i * 10 + 1,
                last: i * 10 + 5,
            })
            .collect(),
        gateway_time: jiff::Timestamp::now(),
    })
    .unwrap();
    for _ in 0..FLOOD {
        w.publish(&ack_t, big.clone()).await;
    }
    let stats = w
        .uplink_stats_until("the flood is counted", |s| rejected(s, "unsigned") > FLOOD)
        .await;
    let (peak, _) = sampler.peak(pid);
    drop(sampler);
    assert_eq!(rejected(&stats, "unsigned"), FLOOD + 1, "{stats}");
    assert_eq!(stats["records_acked"], 0, "{stats}");
    eprintln!("agent RSS: {rss_before} KiB before the flood, {peak} KiB at most during it");
    assert!(
        peak < 2 * rss_before + 30 * 1024,
        "the agent's memory grew from {rss_before} KiB to {peak} KiB under the flood"
    );
    let (records, oldest, _) = outbox(&w).await;
    assert!(records >= before, "records deleted: {records} < {before}");
    assert_eq!(oldest, 1, "the oldest record was deleted");
    // Counted every time, logged rarely: the flood did not flood the log.
    let logged = std::fs::read_to_string(&log)
        .unwrap()
        .matches("dropped a message not believed")
        .count();
    assert!(logged < 20, "{logged} log lines for the forgeries");

    // The gateway comes back: every record arrives, from seq 1, without a hole.
    let store: Store = Arc::default();
    let gw = fake_gateway(broker.port(), store.clone(), Arc::default(), key.clone());
    // The batches sent while nobody listened are sent again once their ack is overdue
    // (`ack_timeout`); newer ones may arrive first, so wait for seq 1 and no hole.
    wait_for(
        &store,
        "the backlog, from seq 1 without a hole",
        WAIT,
        |s| {
            let last = s.keys().next_back().copied().unwrap_or(0);
            s.len() as u64 >= records && s.contains_key(&1) && s.len() as u64 == last
        },
    )
    .await;
    stop(agent).await;
    gw.abort();
    let seqs: Vec<u64> = lock(&store).keys().copied().collect();
    assert_eq!(seqs[0], 1);
    assert_eq!(
        seqs.len() as u64,
        *seqs.last().unwrap(),
        "holes in the received seqs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_expired_and_forged_requests_get_no_answer() {
    let agent_id = "agent-replay";
    let broker = tend_devsim::broker::spawn_embedded().unwrap();
    let hm2 = hm2().await;
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = credentials(dir.path(), agent_id);
    let config = write_config(dir.path(), agent_id, &broker.url(), hm2.addr());
    let w = Watcher::start(broker.port(), "watcher-replay", agent_id, &key).await;
    let store: Store = Arc::default();
    let gw = fake_gateway(broker.port(), store.clone(), Arc::default(), key.clone());
    let agent = w.spawn_agent(&config, &dir.path().join("agent.log")).await;
    // The gateway's acks tell the agent the gateway's time.
    w.uplink_stats_until("an ack told the gateway's time", |s| {
        !s["clock_offset_s"].is_null()
    })
    .await;
    let req_t = topic::diag_req(agent_id);
    let later = || jiff::Timestamp::now() + Duration::from_secs(300);

    // Answered once; the same bytes again get nothing.
    let r1 = w.request(&key, "r1", "outbox", later());
    w.publish(&req_t, r1.clone()).await;
    tokio::time::timeout(WAIT, async {
        while w.answers_to("r1") == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("r1 was not answered");
    w.publish(&req_t, r1).await;
    w.uplink_stats_until("the replay is refused", |s| rejected(s, "replayed") == 1)
        .await;

    // Expired by the gateway's time.
    let expired = jiff::Timestamp::now() - Duration::from_secs(60);
    w.publish(&req_t, w.request(&key, "r2", "outbox", expired))
        .await;
    w.uplink_stats_until("the expired request is refused", |s| {
        rejected(s, "expired") == 1
    })
    .await;

    // Sealed with another key, unsigned, and with a garbled seal.
    let other = AgentKey::generate().unwrap();
    w.publish(&req_t, w.request(&other, "r3", "outbox", later()))
        .await;
    let good = w.request(&key, "r4", "outbox", later());
    let body = open(&key, Purpose::DiagReq, agent_id, &good)
        .unwrap()
        .to_vec();
    w.publish(&req_t, body.clone()).await;
    let mut garbled = good.clone();
    let n = garbled.len();
    garbled[n - 1] = b'x';
    w.publish(&req_t, garbled).await;
    // ... and a request sealed as an ack (the purpose is part of the seal).
    w.publish(&req_t, seal(&key, Purpose::Ack, agent_id, &body))
        .await;
    let stats = w
        .uplink_stats_until("the forgeries are refused", |s| {
            rejected(s, "bad_signature") == 2
                && rejected(s, "unsigned") == 1
                && rejected(s, "malformed_signature") == 1
        })
        .await;
    assert_eq!(rejected(&stats, "replayed"), 1, "{stats}");
    assert_eq!(rejected(&stats, "expired"), 1, "{stats}");

    // The stats answers above came after all of these: none of them was answered.
    assert_eq!(w.answers_to("r1"), 1);
    for id in ["r2", "r3", "r4"] {
        assert_eq!(w.answers_to(id), 0, "{id} was answered");
    }
    let answered: BTreeMap<String, usize> = w.seen(|s| {
        let mut m = BTreeMap::new();
        for r in &s.answers {
            *m.entry(r.id.clone()).or_default() += 1;
        }
        m
    });
    assert!(answered.values().all(|n| *n == 1), "{answered:?}");
    stop(agent).await;
    gw.abort();
}

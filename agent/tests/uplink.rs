//! The uplink against the embedded rumqttd broker on real sockets: a fake gateway (an MQTT
//! client of the test) receives the batches and acks what it chooses; a TCP proxy between
//! the agent and the broker is cut and restored to test reconnects, because rumqttd
//! cannot be stopped. TLS goes through a TLS-terminating proxy in front of the broker.
//! Every message is sealed with the agent's key, as the gateway and the agent seal them.

use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_agent::uplink::{
    diag_handler, DiagHandler, RecordSource, Uplink, UplinkConfig, UplinkError, UplinkStatus,
};
use tend_testkit::certs::{CA_PEM, CLIENT_CERT_PEM, CLIENT_KEY_PEM, OTHER_CA_PEM};
use tend_testkit::config::write_secret;
use tend_testkit::tls_proxy::tls_proxy;
use tend_wire::seal::{open, seal};
use tend_wire::{
    encode, encode_sealed, ranges_of, topic, AgentKey, DiagRequest, DiagResponse, Purpose, Record,
    RecordBody, SeqRange, WireReading, VERSION,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Each agent's key, made on first use: what its credentials file would hold and the
/// gateway's trust store would know.
fn key_of(agent: &str) -> AgentKey {
    static KEYS: std::sync::OnceLock<Mutex<BTreeMap<String, AgentKey>>> =
        std::sync::OnceLock::new();
    lock(KEYS.get_or_init(Mutex::default))
        .entry(agent.to_string())
        .or_insert_with(|| AgentKey::generate().unwrap())
        .clone()
}

/// A status payload's text if it is sealed with the agent's key, else a marker that
/// matches no status.
fn status_text(agent: &str, payload: &[u8]) -> String {
    match open(&key_of(agent), Purpose::Status, agent, payload) {
        Ok(body) => String::from_utf8_lossy(body).into_owned(),
        Err(e) => format!("not sealed ({e}): {}", String::from_utf8_lossy(payload)),
    }
}

// ---------------------------------------------------------------------------------------
// An in-memory record source.

#[derive(Default)]
struct Mem {
    records: BTreeMap<u64, Record>,
    next: u64,
}

#[derive(Clone, Default)]
struct MemSource(Arc<Mutex<Mem>>);

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl MemSource {
    fn append(&self, n: usize) -> Vec<u64> {
        let mut m = lock(&self.0);
        (0..n)
            .map(|_| {
                m.next += 1;
                let seq = m.next;
                m.records.insert(
                    seq,
                    Record {
                        seq,
                        at: Timestamp::now(),
                        device: "icu7-vent".into(),
                        body: RecordBody::Readings {
                            readings: vec![WireReading {
                                name: "battery".into(),
                                value: tend_profiles::Value::Num(seq as f64),
                                unit: Some("%".into()),
                            }],
                        },
                    },
                );
                seq
            })
            .collect()
    }
    fn seqs(&self) -> BTreeSet<u64> {
        lock(&self.0).records.keys().copied().collect()
    }
    fn len(&self) -> usize {
        lock(&self.0).records.len()
    }
}

/// The in-memory source's incarnation.
const MEM_INCARNATION: &str = "mem0";

impl RecordSource for MemSource {
    type Error = Never;
    fn incarnation(&self) -> &str {
        MEM_INCARNATION
    }
    fn pending(
        &self,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, Never> {
        let m = lock(&self.0);
        let start = after.map_or(0, |a| a + 1);
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in m.records.range(start..).map(|(_, r)| r) {
            let len = encode(r).unwrap().len();
            if out.len() >= max || (!out.is_empty() && bytes + len > max_bytes) {
                break;
            }
            bytes += len;
            out.push(r.clone());
        }
        Ok(out)
    }
    async fn ack(&self, ranges: &[SeqRange]) -> Result<u64, Never> {
        let mut m = lock(&self.0);
        let before = m.records.len();
        m.records
            .retain(|s, _| !ranges.iter().any(|r| r.first <= *s && *s <= r.last));
        Ok((before - m.records.len()) as u64)
    }
}

// ---------------------------------------------------------------------------------------
// The fake gateway: subscribes to every agent's up, status and diag/resp.

#[derive(Default)]
struct Seen {
    /// Seqs of each batch received, in order.
    batches: Vec<Vec<u64>>,
    /// Status payloads with their retain flag, in order.
    statuses: Vec<(String, bool)>,
    diag: Vec<DiagResponse>,
    /// Batches and answers that did not open with the agent's key (or did not parse).
    bad_batches: usize,
    bad_answers: usize,
}

impl Seen {
    fn all_seqs(&self) -> BTreeSet<u64> {
        self.batches.iter().flatten().copied().collect()
    }
    fn times_seen(&self, seq: u64) -> usize {
        self.batches.iter().flatten().filter(|s| **s == seq).count()
    }
}

struct Gateway {
    client: AsyncClient,
    seen: Arc<Mutex<Seen>>,
    auto_ack: Arc<AtomicBool>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Gateway {
    /// Connects and returns once its subscriptions are in place.
    async fn start(broker: SocketAddr, id: &str, auto_ack: bool) -> Gateway {
        let mut opts = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(8 << 20, 8 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 1024);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let auto = Arc::new(AtomicBool::new(auto_ack));
        let (subscribed_tx, mut subscribed) = watch::channel(0usize);
        let task = {
            let client = client.clone();
            let seen = seen.clone();
            let auto = auto.clone();
            tokio::spawn(async move {
                let mut subacks = 0;
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            for t in ["tend/v1/+/up", "tend/v1/+/status", "tend/v1/+/diag/resp"] {
                                client.try_subscribe(t, QoS::AtLeastOnce).unwrap();
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subacks += 1;
                            let _ = subscribed_tx.send(subacks);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => match topic::parse(&p.topic) {
                            Some(topic::Parsed::Up(agent)) => {
                                match tend_testkit::trust::open_batch(
                                    &key_of(agent),
                                    agent,
                                    &p.payload,
                                ) {
                                    Some(b) => {
                                        assert_eq!(b.agent, agent);
                                        let seqs: Vec<u64> =
                                            b.records.iter().map(|r| r.seq).collect();
                                        lock(&seen).batches.push(seqs.clone());
                                        if auto.load(Ordering::SeqCst) {
                                            let ack = tend_testkit::trust::sealed_ack(
                                                &key_of(agent),
                                                agent,
                                                &b.incarnation,
                                                ranges_of(seqs),
                                            );
                                            client
                                                .try_publish(
                                                    topic::ack(agent),
                                                    QoS::AtLeastOnce,
                                                    false,
                                                    ack,
                                                )
                                                .unwrap();
                                        }
                                    }
                                    None => lock(&seen).bad_batches += 1,
                                }
                            }
                            Some(topic::Parsed::Status(agent)) => lock(&seen)
                                .statuses
                                .push((status_text(agent, &p.payload), p.retain)),
                            Some(topic::Parsed::DiagResp(agent)) => {
                                let body =
                                    open(&key_of(agent), Purpose::DiagResp, agent, &p.payload);
                                match body.map(DiagResponse::decode) {
                                    Ok(Ok(r)) => lock(&seen).diag.push(r),
                                    _ => lock(&seen).bad_answers += 1,
                                }
                            }
                            _ => {}
                        },
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        tokio::time::timeout(WAIT, subscribed.wait_for(|n| *n >= 3))
            .await
            .expect("the fake gateway did not subscribe")
            .unwrap();
        Gateway {
            client,
            seen,
            auto_ack: auto,
            _task: AbortOnDrop(task),
        }
    }

    fn seen<R>(&self, f: impl FnOnce(&Seen) -> R) -> R {
        f(&lock(&self.seen))
    }

    async fn ack(&self, agent: &str, ranges: Vec<SeqRange>) {
        self.ack_in(agent, MEM_INCARNATION, ranges).await;
    }

    async fn ack_in(&self, agent: &str, incarnation: &str, ranges: Vec<SeqRange>) {
        let ack = tend_testkit::trust::sealed_ack(&key_of(agent), agent, incarnation, ranges);
        self.raw(&topic::ack(agent), ack).await;
    }

    async fn raw(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// A TCP proxy the test can cut (every connection closed, new ones refused) and restore,
// or stall (the connections open now stay open but carry nothing more, like a pulled
// cable; new ones work).

struct Proxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    stall: watch::Sender<u64>,
    _task: AbortOnDrop,
}

impl Proxy {
    async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (open, _) = watch::channel(true);
        let open_rx = open.subscribe();
        let (stall, _) = watch::channel(0u64);
        let stall_rx = stall.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    continue;
                };
                let mut open = open_rx.clone();
                if !*open.borrow_and_update() {
                    drop(down);
                    continue;
                }
                let mut stall = stall_rx.clone();
                let born = *stall.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let stalled = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => false,
                        _ = open.wait_for(|o| !*o) => false,
                        _ = stall.wait_for(|g| *g > born) => true,
                    };
                    if stalled {
                        // Silence: nothing is forwarded, nothing is closed.
                        let _ = open.wait_for(|o| !*o).await;
                    }
                    // Both sockets close here: the agent sees its connection drop, the
                    // broker a client gone without DISCONNECT (so it fires the will).
                });
            }
        });
        Proxy {
            addr,
            open,
            stall,
            _task: AbortOnDrop(task),
        }
    }
    fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
    fn cut(&self) {
        self.open.send_replace(false);
    }
    fn restore(&self) {
        self.open.send_replace(true);
    }
    fn stall(&self) {
        self.stall.send_modify(|g| *g += 1);
    }
}

// ---------------------------------------------------------------------------------------

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn test_config(agent: &str, broker: String) -> UplinkConfig {
    let mut cfg = UplinkConfig::new(agent, "s-017-main", broker, key_of(agent));
    cfg.keep_alive = Duration::from_secs(1);
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(300);
    cfg
}

fn no_diag() -> DiagHandler {
    diag_handler(|_req: DiagRequest| async { Err("no diagnostics here".into()) })
}

/// A running uplink: its stats, the notify to poke, and a way to stop it.
struct Running {
    status: UplinkStatus,
    notify: Arc<Notify>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), UplinkError>>,
}

impl Running {
    fn start<S: RecordSource>(cfg: UplinkConfig, source: S, diag: DiagHandler) -> Running {
        let notify = Arc::new(Notify::new());
        let uplink = Uplink::new(cfg, source, diag, notify.clone());
        let status = uplink.status();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(uplink.run(async move {
            let _ = stopped.await;
        }));
        Running {
            status,
            notify,
            stop: Some(stop),
            task,
        }
    }
    async fn stop(mut self) -> Result<(), UplinkError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the uplink did not stop")
            .unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn broker() -> tend_devsim::broker::EmbeddedBroker {
    tend_devsim::broker::spawn_embedded().expect("embedded broker")
}

fn range(first: u64, last: u64) -> SeqRange {
    SeqRange { first, last }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_leave_only_on_the_gateways_ack() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-acks", false).await;
    let agent = "agent-acks";
    let source = MemSource::default();
    source.append(120);
    let mut cfg = test_config(agent, b.url());
    cfg.batch_max_records = 25;
    cfg.max_in_flight_batches = 2;
    cfg.ack_timeout = Duration::from_secs(60);
    let up = Running::start(cfg, source.clone(), no_diag());

    // Two batches go out, then the window is full.
    wait_until("two batches arrive", || gw.seen(|s| s.batches.len() >= 2)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gw.seen(|s| s.batches.clone()),
        vec![(1..=25).collect::<Vec<_>>(), (26..=50).collect()]
    );
    // PUBACKs came long ago; nothing left the outbox.
    assert_eq!(source.len(), 120);

    // An ack naming records never sent deletes nothing; nor does one for another
    // incarnation of the outbox, even naming what was sent.
    gw.ack(agent, vec![range(51, 120)]).await;
    gw.ack_in(agent, "another0", vec![range(1, 50)]).await;
    wait_until("the foreign ack is counted", || {
        up.status.snapshot().foreign_acks == 1
    })
    .await;
    assert_eq!(source.len(), 120);
    // Part of the first batch: exactly those seqs go.
    gw.ack(agent, vec![range(1, 10), range(20, 25)]).await;
    let expect: BTreeSet<u64> = (11..=19).chain(26..=120).collect();
    wait_until("the partial ack is applied", || source.seqs() == expect).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(source.seqs(), expect, "unsent records were deleted");
    assert_eq!(gw.seen(|s| s.batches.len()), 2, "the window is still full");

    // The second batch completes: one more goes out.
    gw.ack(agent, vec![range(26, 50)]).await;
    wait_until("a third batch arrives", || {
        gw.seen(|s| s.batches.len() == 3)
    })
    .await;
    assert_eq!(
        gw.seen(|s| s.batches[2].clone()),
        (51..=75).collect::<Vec<_>>()
    );

    // From now on the gateway acks everything; the rest of the first batch too.
    gw.auto_ack.store(true, Ordering::SeqCst);
    gw.ack(agent, vec![range(11, 19), range(51, 75)]).await;
    up.notify.notify_one();
    wait_until("the outbox is empty", || source.len() == 0).await;
    assert_eq!(gw.seen(|s| s.all_seqs()), (1..=120).collect());

    // New records go at once after a poke.
    source.append(5);
    up.notify.notify_one();
    wait_until("new records are acked", || source.len() == 0).await;
    assert_eq!(gw.seen(|s| s.all_seqs()), (1..=125).collect());
    let stats = up.status.snapshot();
    assert_eq!(stats.records_acked, 125);
    assert_eq!(stats.connects, 1);
    assert!(stats.connected);
    assert_eq!(gw.seen(|s| s.bad_batches), 0);
    up.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_batches_are_sent_again_from_the_oldest() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-resend", false).await;
    let agent = "agent-resend";
    let source = MemSource::default();
    source.append(30);
    let mut cfg = test_config(agent, b.url());
    cfg.batch_max_records = 10;
    cfg.max_in_flight_batches = 2;
    cfg.ack_timeout = Duration::from_millis(400);
    let up = Running::start(cfg, source.clone(), no_diag());

    wait_until("the first batch is sent three times", || {
        gw.seen(|s| s.times_seen(1) >= 3)
    })
    .await;
    // Never past the window: the third batch was never sent.
    assert!(
        gw.seen(|s| s.all_seqs()) == (1..=20).collect(),
        "{:?}",
        gw.seen(|s| s.all_seqs())
    );
    assert_eq!(source.len(), 30);
    assert!(up.status.snapshot().resends >= 2);

    // Acking the first batch moves the window on; records 11.. are still resent.
    gw.ack(agent, vec![range(1, 10)]).await;
    wait_until("records 21..30 go out", || {
        gw.seen(|s| s.all_seqs().contains(&30))
    })
    .await;
    assert_eq!(source.seqs(), (11..=30).collect());
    gw.auto_ack.store(true, Ordering::SeqCst);
    wait_until("the outbox is empty", || source.len() == 0).await;
    up.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_loses_nothing_and_the_will_says_offline() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-cut", true).await;
    let proxy = Proxy::start(b.addr()).await;
    let agent = "agent-cut";
    let source = MemSource::default();
    source.append(50);
    let mut cfg = test_config(agent, proxy.url());
    cfg.batch_max_records = 10;
    cfg.max_in_flight_batches = 3;
    cfg.ack_timeout = Duration::from_secs(60);
    let up = Running::start(cfg, source.clone(), no_diag());

    wait_until("the first 50 are acked", || source.len() == 0).await;
    assert_eq!(
        gw.seen(|s| s.statuses.last().cloned()),
        Some(("online".to_string(), false))
    );

    // The gateway stops acking: these stay in flight when the connection goes.
    gw.auto_ack.store(false, Ordering::SeqCst);
    source.append(20);
    up.notify.notify_one();
    wait_until("51..70 arrive", || gw.seen(|s| s.all_seqs().contains(&70))).await;
    assert_eq!(gw.seen(|s| s.times_seen(51)), 1);

    proxy.cut();
    wait_until("the broker publishes the will", || {
        gw.seen(|s| s.statuses.last().map(|x| x.0.clone())) == Some("offline".into())
    })
    .await;
    wait_until("the uplink notices", || !up.status.snapshot().connected).await;
    // Records made while cut off wait in the outbox.
    source.append(30);
    up.notify.notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(source.len(), 50);
    assert!(!gw.seen(|s| s.all_seqs().contains(&71)));

    gw.auto_ack.store(true, Ordering::SeqCst);
    proxy.restore();
    wait_until("everything is acked after the reconnect", || {
        source.len() == 0
    })
    .await;
    assert_eq!(gw.seen(|s| s.all_seqs()), (1..=100).collect());
    // The batches in flight at the cut went again after the reconnect.
    assert!(gw.seen(|s| s.times_seen(51)) >= 2);
    assert_eq!(
        gw.seen(|s| s.statuses.last().cloned()),
        Some(("online".to_string(), false))
    );
    let stats = up.status.snapshot();
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert!(stats.connected);
    assert!(stats.last_error.is_some());
    up.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_detected_and_the_status_ends_online() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-stall", true).await;
    let proxy = Proxy::start(b.addr()).await;
    let agent = "agent-stall";
    let source = MemSource::default();
    source.append(10);
    let mut cfg = test_config(agent, proxy.url());
    cfg.batch_max_records = 5;
    cfg.ack_timeout = Duration::from_secs(60);
    let up = Running::start(cfg, source.clone(), no_diag());
    wait_until("the first records are acked", || source.len() == 0).await;

    gw.auto_ack.store(false, Ordering::SeqCst);
    source.append(10);
    up.notify.notify_one();
    wait_until("11..20 arrive", || gw.seen(|s| s.all_seqs().contains(&20))).await;
    gw.auto_ack.store(true, Ordering::SeqCst);
    proxy.stall();
    source.append(10);
    up.notify.notify_one();
    // Only the keep-alive can tell this connection is dead.
    wait_until("everything is acked on a new connection", || {
        source.len() == 0
    })
    .await;
    assert_eq!(gw.seen(|s| s.all_seqs()), (1..=30).collect());
    assert!(up.status.snapshot().reconnects >= 1);

    // The stalled connection's will may fire at the broker after the new connection
    // said `online`; the status must still end `online`.
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_until("the status is online again", || {
        gw.seen(|s| s.statuses.last().map(|x| x.0.clone())) == Some("online".into())
    })
    .await;
    assert_eq!(
        retained_status(b.addr(), agent).await.as_deref(),
        Some("online")
    );
    up.stop().await.unwrap();
}

/// A fresh subscriber to the agent's status topic: the retained message it gets first.
async fn retained_status(broker: SocketAddr, agent: &str) -> Option<String> {
    let mut opts = MqttOptions::new(
        format!("peek-{agent}"),
        broker.ip().to_string(),
        broker.port(),
    );
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let t = topic::status(agent);
    let found = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(&t, QoS::AtLeastOnce).await.unwrap();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == t => {
                    assert!(p.retain, "a status message to a new subscriber is retained");
                    return status_text(agent, &p.payload);
                }
                Ok(_) => {}
                Err(e) => panic!("peek: {e}"),
            }
        }
    })
    .await
    .ok();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_is_retained_and_offline_follows_a_clean_stop() {
    let b = broker();
    let agent = "agent-status";
    let source = MemSource::default();
    let up = Running::start(test_config(agent, b.url()), source, no_diag());
    wait_until("connected", || up.status.snapshot().connected).await;
    // The online publish follows the CONNACK closely; give it a moment.
    let mut status = None;
    for _ in 0..20 {
        status = retained_status(b.addr(), agent).await;
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status.as_deref(), Some("online"));

    // A late `offline` (as an old connection's will would be) is corrected at once.
    let gw = Gateway::start(b.addr(), "gw-status", false).await;
    let offline = seal(&key_of(agent), Purpose::Status, agent, b"offline");
    gw.client
        .publish(topic::status(agent), QoS::AtLeastOnce, true, offline)
        .await
        .unwrap();
    wait_until("the agent says online after the offline", || {
        gw.seen(|s| {
            let last = |v: &str| s.statuses.iter().rposition(|x| x.0 == v);
            matches!((last("offline"), last("online")), (Some(off), Some(on)) if on > off)
        })
    })
    .await;
    assert_eq!(
        retained_status(b.addr(), agent).await.as_deref(),
        Some("online")
    );
    up.stop().await.unwrap();
    assert_eq!(
        retained_status(b.addr(), agent).await.as_deref(),
        Some("offline")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_round_trip_and_malformed_messages_are_ignored() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-diag", true).await;
    let agent = "agent-diag";
    let source = MemSource::default();
    let diag = diag_handler(|req: DiagRequest| async move {
        match req.request.as_str() {
            "outbox" => Ok(serde_json::json!({"records": 0, "device": req.device})),
            "slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(serde_json::Value::Null)
            }
            other => Err(format!("`{other}` is not listed").into()),
        }
    });
    let mut cfg = test_config(agent, b.url());
    cfg.diag_timeout = Duration::from_millis(300);
    let up = Running::start(cfg, source.clone(), diag);
    wait_until("connected", || up.status.snapshot().connected).await;
    // The subscriptions follow the CONNACK; wait for `online`, published after them.
    wait_until("online", || gw.seen(|s| !s.statuses.is_empty())).await;

    // Garbage first, sealed so that it reaches the parser: none of it may stop the uplink.
    let key = key_of(agent);
    let ack_t = topic::ack(agent);
    let req_t = topic::diag_req(agent);
    let bad_acks: [Vec<u8>; 4] = [
        b"{not json".to_vec(),
        br#"{"v":1,"incarnation":"mem0","ranges":[{"first":9,"last":3}],"gateway_time":"2026-12-02T00:00:00Z"}"#.to_vec(),
        br#"{"v":7,"incarnation":"mem0","ranges":[],"gateway_time":"2026-12-02T00:00:00Z"}"#.to_vec(),
        vec![0xff, 0xfe, 0x00],
    ];
    let bad_requests: [Vec<u8>; 3] = [
        b"[]".to_vec(),
        br#"{"v":1,"id":"x"}"#.to_vec(),
        vec![b'{'; 100_000],
    ];
    for a in &bad_acks {
        gw.raw(&ack_t, seal(&key, Purpose::Ack, agent, a)).await;
    }
    for r in &bad_requests {
        gw.raw(&req_t, seal(&key, Purpose::DiagReq, agent, r)).await;
    }
    // The same unsealed, and sealed with another agent's key or for another purpose:
    // refused before they are parsed, and counted apart.
    for a in &bad_acks {
        gw.raw(&ack_t, a.clone()).await;
    }
    for r in &bad_requests {
        gw.raw(&req_t, r.clone()).await;
    }
    let other = key_of("agent-diag-other");
    gw.raw(&ack_t, seal(&other, Purpose::Ack, agent, &bad_acks[0]))
        .await;
    gw.raw(&req_t, seal(&key, Purpose::Ack, agent, &bad_requests[1]))
        .await;

    let ask = |id: &str, request: &str| DiagRequest {
        v: VERSION,
        id: id.into(),
        device: "icu7-vent".into(),
        request: request.into(),
        expires_at: Timestamp::now() + Duration::from_secs(300),
    };
    let sealed = |req: &DiagRequest| encode_sealed(&key, Purpose::DiagReq, agent, req).unwrap();
    gw.raw(&req_t, sealed(&ask("r1", "outbox"))).await;
    gw.raw(&req_t, sealed(&ask("r2", "selftest"))).await;
    gw.raw(&req_t, sealed(&ask("r3", "slow"))).await;
    wait_until("three answers", || gw.seen(|s| s.diag.len() >= 3)).await;
    let answers: BTreeMap<String, DiagResponse> =
        gw.seen(|s| s.diag.iter().map(|r| (r.id.clone(), r.clone())).collect());
    let r1 = &answers["r1"];
    assert!(r1.ok);
    assert_eq!(r1.request, "outbox");
    assert_eq!(r1.device, "icu7-vent");
    assert_eq!(r1.answer["device"], "icu7-vent");
    let r2 = &answers["r2"];
    assert!(!r2.ok);
    assert!(r2.error.as_deref().unwrap().contains("not listed"));
    let r3 = &answers["r3"];
    assert!(!r3.ok);
    assert!(
        r3.error.as_deref().unwrap().contains("no answer within"),
        "{r3:?}"
    );

    // Still the same connection, and records still flow.
    source.append(10);
    up.notify.notify_one();
    wait_until("records are acked", || source.len() == 0).await;
    let stats = up.status.snapshot();
    assert_eq!(stats.connects, 1, "{stats:?}");
    assert_eq!(stats.malformed_messages, 7, "{stats:?}");
    assert_eq!(
        stats.rejected_messages,
        BTreeMap::from([("bad_signature", 2), ("unsigned", 7)]),
        "{stats:?}"
    );
    assert_eq!(stats.diag_requests, 3);
    assert_eq!(gw.seen(|s| s.bad_answers), 0);
    up.stop().await.unwrap();
}

/// Requests are judged by the gateway's clock as its acks tell it, never by the agent's
/// own: here the gateway's clock is an hour behind the agent's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_once_and_only_before_its_expiry_by_gateway_time() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-replay", false).await;
    let agent = "agent-replay";
    let key = key_of(agent);
    let diag =
        diag_handler(
            |req: DiagRequest| async move { Ok(serde_json::json!({ "asked": req.request })) },
        );
    let up = Running::start(test_config(agent, b.url()), MemSource::default(), diag);
    wait_until("online", || gw.seen(|s| !s.statuses.is_empty())).await;
    let req_t = topic::diag_req(agent);
    let ask = |id: &str, expires_at: Timestamp| {
        let req = DiagRequest {
            v: VERSION,
            id: id.into(),
            device: "icu7-vent".into(),
            request: "outbox".into(),
            expires_at,
        };
        encode_sealed(&key, Purpose::DiagReq, agent, &req).unwrap()
    };
    let rejected = |reason: &str| {
        let stats = up.status.snapshot();
        stats.rejected_messages.get(reason).copied().unwrap_or(0)
    };
    let answered = || -> Vec<String> { gw.seen(|s| s.diag.iter().map(|r| r.id.clone()).collect()) };
    let later = || Timestamp::now() + Duration::from_secs(300);

    // Before any ack the agent knows no gateway time: the id alone decides.
    let r1 = ask("r1", later());
    gw.raw(&req_t, r1.clone()).await;
    wait_until("r1 is answered", || answered() == ["r1"]).await;
    gw.raw(&req_t, r1).await;
    wait_until("the replay is refused", || rejected("replayed") == 1).await;

    // The gateway's clock, an hour behind, from an ack (it names nothing).
    let hour = Duration::from_secs(3600);
    let behind = Timestamp::now() - hour;
    let ack = tend_wire::Ack {
        v: VERSION,
        incarnation: MEM_INCARNATION.into(),
        ranges: vec![],
        gateway_time: behind,
    };
    gw.raw(
        &topic::ack(agent),
        encode_sealed(&key, Purpose::Ack, agent, &ack).unwrap(),
    )
    .await;
    wait_until("the gateway's clock is known", || {
        up.status
            .snapshot()
            .clock_offset_s
            .is_some_and(|o| o >= 3599)
    })
    .await;
    // Expired by the gateway's clock: refused. Past by the agent's own clock but not by
    // the gateway's: answered.
    gw.raw(&req_t, ask("r2", behind - Duration::from_secs(60)))
        .await;
    wait_until("the expired request is refused", || {
        rejected("expired") == 1
    })
    .await;
    gw.raw(&req_t, ask("r3", behind + Duration::from_secs(1800)))
        .await;
    wait_until("r3 is answered", || answered().len() == 2).await;

    // A request altered on the way (its id changed) does not open.
    let forged = String::from_utf8(ask("r4", later()))
        .unwrap()
        .replacen("\"r4\"", "\"r5\"", 1);
    gw.raw(&req_t, forged.into_bytes()).await;
    wait_until("the altered request is refused", || {
        rejected("bad_signature") == 1
    })
    .await;
    // One more good request: answered, and only those three ever were.
    gw.raw(&req_t, ask("r6", later())).await;
    wait_until("r6 is answered", || answered().len() == 3).await;
    assert_eq!(answered(), ["r1", "r3", "r6"]);
    let stats = up.status.snapshot();
    assert_eq!(stats.diag_requests, 3, "{stats:?}");
    assert_eq!(
        stats.rejected_messages,
        BTreeMap::from([("bad_signature", 1), ("expired", 1), ("replayed", 1)]),
        "{stats:?}"
    );
    assert_eq!(gw.seen(|s| s.bad_answers), 0);
    up.stop().await.unwrap();
}

/// Without `username` the agent logs in to an embedded broker that checks logins (as the
/// gateway's does) as itself, with the password its key derives; with another key it
/// is refused and keeps trying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_username_the_agent_logs_in_as_itself_with_its_key() {
    use tend_mqtt::broker::{BrokerAccess, BrokerLimits};
    let agent = "agent-login";
    let password = key_of(agent).broker_password(agent);
    let access = BrokerAccess {
        login: Some(Arc::new(move |client: &str, user: &str, pw: &str| {
            client == agent && user == agent && pw == password
        })),
        ..BrokerAccess::default()
    };
    let limits = BrokerLimits {
        max_payload: 1 << 20,
        max_inflight: 100,
        max_outgoing_packets: 100,
        max_segment_size: 1 << 20,
    };
    let b = tend_mqtt::broker::start("127.0.0.1:0".parse().unwrap(), &limits, &access).unwrap();
    let url = format!("mqtt://{}", b.addr);

    let up = Running::start(
        test_config(agent, url.clone()),
        MemSource::default(),
        no_diag(),
    );
    wait_until("connected with its own login", || {
        up.status.snapshot().connected
    })
    .await;
    up.stop().await.unwrap();
    assert_eq!(access.refused.load(Ordering::SeqCst), 0);

    // The same agent with a key that is not its own.
    let mut cfg = test_config(agent, url);
    cfg.key = AgentKey::generate().unwrap();
    let up = Running::start(cfg, MemSource::default(), no_diag());
    wait_until("attempts are refused", || {
        up.status.snapshot().connect_failures >= 2
    })
    .await;
    let stats = up.status.snapshot();
    assert_eq!(stats.connects, 0, "{stats:?}");
    assert!(access.refused.load(Ordering::SeqCst) >= 2);
    up.stop().await.unwrap();
}

/// A reading record of device `icu7-vent`: battery at `i`.
fn battery_reading(i: u32) -> (String, Timestamp, RecordBody) {
    (
        "icu7-vent".to_string(),
        Timestamp::now(),
        RecordBody::Readings {
            readings: vec![WireReading {
                name: "battery".into(),
                value: tend_profiles::Value::Num(f64::from(i)),
                unit: None,
            }],
        },
    )
}

/// The agent's real outbox in a fresh folder (kept as long as the folder).
async fn real_outbox() -> (tempfile::TempDir, tend_agent::outbox::Outbox) {
    use tend_agent::outbox::{Outbox, OutboxConfig};
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(OutboxConfig::new(dir.path().join("outbox.redb")))
        .await
        .unwrap();
    (dir, outbox)
}

/// Appends a record that is not a reading (an empty drop report); returns its seq.
async fn append_drop_report(outbox: &tend_agent::outbox::Outbox) -> u64 {
    let empty = RecordBody::Dropped {
        count: 0,
        first_seq: 0,
        last_seq: 0,
    };
    outbox
        .append("icu7-vent", Timestamp::now(), empty)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_outbox_drains_on_acks() {
    let (_dir, outbox) = real_outbox().await;
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-outbox", true).await;
    let agent = "agent-outbox";
    let items: Vec<_> = (0..2000).map(battery_reading).collect();
    let seqs = outbox.append_many(items).await.unwrap();
    let mut cfg = test_config(agent, b.url());
    cfg.batch_max_records = 300;
    cfg.max_in_flight_batches = 4;
    let up = Running::start(cfg, outbox.clone(), no_diag());
    wait_until("the outbox drains", || outbox.stats().records == 0).await;
    let want: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(gw.seen(|s| s.all_seqs()), want);

    // Appends while running go out after the poke.
    let more = append_drop_report(&outbox).await;
    up.notify.notify_one();
    wait_until("the new record is acked", || outbox.stats().records == 0).await;
    assert!(gw.seen(|s| s.all_seqs().contains(&more)));
    up.stop().await.unwrap();
    outbox.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_wait_for_the_linger_and_a_record_that_may_not_wait_takes_them_along() {
    let (_dir, outbox) = real_outbox().await;
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-linger", true).await;
    let mut cfg = test_config("agent-linger", b.url());
    cfg.linger = Duration::from_secs(10);
    let up = Running::start(cfg, outbox.clone(), no_diag());
    wait_until("connected", || up.status.snapshot().connected).await;
    // Three commits of readings, each poked as the recorder does: none is sent yet.
    let mut seqs = BTreeSet::new();
    for i in 0..3 {
        let commit = outbox.append_soon(vec![battery_reading(i)]).unwrap();
        seqs.extend(commit.await.unwrap());
        up.notify.notify_one();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        gw.seen(|s| s.batches.is_empty()),
        "readings went before the linger"
    );
    // A record that is not a reading goes at once and takes them along, in one batch.
    seqs.insert(append_drop_report(&outbox).await);
    up.notify.notify_one();
    wait_until("the batch arrives", || gw.seen(|s| !s.batches.is_empty())).await;
    let first: BTreeSet<u64> = gw.seen(|s| s.batches[0].iter().copied().collect());
    assert_eq!(first, seqs);
    // Once that batch is acked (an ack makes the uplink look at the outbox again, and
    // what waits then goes along), a lone reading waits for its linger to end.
    wait_until("the ack", || up.status.snapshot().acks_received == 1).await;
    let last = outbox
        .append_soon(vec![battery_reading(3)])
        .unwrap()
        .await
        .unwrap();
    up.notify.notify_one();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        gw.seen(|s| s.batches.len()),
        1,
        "the lone reading went before the linger"
    );
    wait_until("the lone reading arrives", || {
        gw.seen(|s| s.all_seqs().contains(&last[0]))
    })
    .await;
    assert_eq!(gw.seen(|s| s.batches.len()), 2);
    up.stop().await.unwrap();
    outbox.close().await.unwrap();
}

#[tokio::test]
async fn a_bad_configuration_is_an_error_before_connecting() {
    let cfg = UplinkConfig::new("agent-x", "s", "http://127.0.0.1:1", key_of("agent-x"));
    let err = tend_agent::uplink::run(
        cfg,
        MemSource::default(),
        no_diag(),
        Arc::new(Notify::new()),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, UplinkError::Broker { .. }), "{err}");
}

#[tokio::test]
async fn an_unreachable_broker_is_retried_until_shutdown() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let up = Running::start(
        test_config("agent-away", format!("mqtt://127.0.0.1:{port}")),
        MemSource::default(),
        no_diag(),
    );
    wait_until("a few attempts failed", || {
        up.status.snapshot().connect_failures >= 3
    })
    .await;
    let stats = up.status.snapshot();
    assert!(!stats.connected);
    assert!(stats.last_error.is_some());
    up.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// TLS, with the test certificates of `tend_testkit::certs`.

/// Writes the test PEMs into `dir` and points `cfg` at them.
fn with_tls_files(cfg: &mut UplinkConfig, dir: &std::path::Path, ca: &str, client: bool) {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    cfg.ca_file = Some(write("ca.pem", ca));
    if client {
        cfg.client_cert = Some(write("client.pem", CLIENT_CERT_PEM));
        let key = dir.join("client.key");
        write_secret(&key, CLIENT_KEY_PEM).unwrap();
        cfg.client_key = Some(key);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_client_certificate_delivers() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-tls", true).await;
    let (addr, _proxy) = tls_proxy(b.addr(), true).await;
    let dir = tempfile::tempdir().unwrap();
    let source = MemSource::default();
    source.append(40);
    let mut cfg = test_config("agent-tls", format!("mqtts://127.0.0.1:{}", addr.port()));
    with_tls_files(&mut cfg, dir.path(), CA_PEM, true);
    let up = Running::start(cfg, source.clone(), no_diag());
    wait_until("the records are acked over TLS", || source.len() == 0).await;
    assert_eq!(gw.seen(|s| s.all_seqs()), (1..=40).collect());
    up.stop().await.unwrap();

    // By name too: the server certificate is for localhost.
    source.append(1);
    let mut cfg = test_config("agent-tls", format!("mqtts://localhost:{}", addr.port()));
    with_tls_files(&mut cfg, dir.path(), CA_PEM, true);
    let up = Running::start(cfg, source.clone(), no_diag());
    wait_until("acked via localhost", || source.len() == 0).await;
    up.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_refuses_an_unknown_server_and_is_refused_without_a_client_certificate() {
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-tls-bad", true).await;
    let dir = tempfile::tempdir().unwrap();
    let source = MemSource::default();
    source.append(3);

    // The server's certificate is not from the configured CA.
    let (addr, _proxy) = tls_proxy(b.addr(), false).await;
    let mut cfg = test_config(
        "agent-tls-bad",
        format!("mqtts://127.0.0.1:{}", addr.port()),
    );
    with_tls_files(&mut cfg, dir.path(), OTHER_CA_PEM, false);
    let up = Running::start(cfg, source.clone(), no_diag());
    wait_until("attempts fail", || {
        up.status.snapshot().connect_failures >= 2
    })
    .await;
    let err = up.status.snapshot().last_error.unwrap_or_default();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    up.stop().await.unwrap();

    // The server wants a client certificate and gets none.
    let (addr, _proxy2) = tls_proxy(b.addr(), true).await;
    let mut cfg = test_config(
        "agent-tls-bad",
        format!("mqtts://127.0.0.1:{}", addr.port()),
    );
    with_tls_files(&mut cfg, dir.path(), CA_PEM, false);
    let up = Running::start(cfg, source.clone(), no_diag());
    wait_until("attempts fail", || {
        up.status.snapshot().connect_failures >= 2
    })
    .await;
    assert!(!up.status.snapshot().connected);
    up.stop().await.unwrap();

    assert_eq!(source.len(), 3);
    assert!(gw.seen(|s| s.batches.is_empty()));
}

/// A shared buffer the test's log subscriber writes into.
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One current-thread runtime, so that the thread-local log subscriber sees every task.
#[tokio::test]
async fn the_password_is_sent_from_its_file_and_never_logged() {
    let logs = LogBuf::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // A "broker" that reads the CONNECT and refuses it (return code 5, not authorized).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (connect_tx, mut connects) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
    let _server = AbortOnDrop(tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // The CONNECT is short: read until its remaining length is in.
            while got < 2 || got < 2 + usize::from(buf[1]) {
                match s.read(&mut buf[got..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            let _ = connect_tx.send(buf[..got].to_vec());
            let _ = s.write_all(&[0x20, 0x02, 0x00, 0x05]).await;
        }
    }));

    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("mqtt.pw");
    write_secret(&pw, "s3cret-pw\n").unwrap();
    let mut cfg = test_config("agent-pw", format!("mqtt://127.0.0.1:{port}"));
    cfg.username = Some("agent-pw-user".into());
    cfg.password_file = Some(pw);
    let up = Running::start(cfg, MemSource::default(), no_diag());
    let connect = tokio::time::timeout(WAIT, connects.recv())
        .await
        .unwrap()
        .unwrap();
    // CONNECT ends with the username and the password, each length-prefixed; the file's
    // newline is not part of it.
    assert!(
        connect.ends_with(b"\x00\x0dagent-pw-user\x00\x09s3cret-pw"),
        "{connect:?}"
    );
    wait_until("attempts fail", || {
        up.status.snapshot().connect_failures >= 2
    })
    .await;
    let stats = up.status.snapshot();
    up.stop().await.unwrap();
    let logged = String::from_utf8_lossy(&lock(&logs.0)).into_owned();
    assert!(logged.contains("cannot connect"), "{logged}");
    assert!(!logged.contains("s3cret"), "{logged}");
    assert!(!format!("{stats:?}").contains("s3cret"));
}

/// Not a pass/fail test: how fast a one-hour backlog (DESIGN §5: 180,000 records) drains
/// from the real outbox through the embedded broker to a gateway that acks at once.
/// `cargo test --release -p tend-agent --test uplink -- --ignored --nocapture backlog`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement; run by hand in release"]
async fn backlog_drain_measurement() {
    const N: usize = 180_000;
    let (_dir, outbox) = real_outbox().await;
    for chunk in 0..N / 10_000 {
        let items: Vec<_> = (0..10_000)
            .map(|i| {
                (
                    format!("dev-{}", i % 50),
                    Timestamp::now(),
                    RecordBody::Readings {
                        readings: ["pressure", "flow", "battery"]
                            .iter()
                            .map(|n| WireReading {
                                name: (*n).into(),
                                value: tend_profiles::Value::Num((chunk * 10_000 + i) as f64),
                                unit: Some("kPa".into()),
                            })
                            .collect(),
                    },
                )
            })
            .collect();
        outbox.append_many(items).await.unwrap();
    }
    let b = broker();
    let gw = Gateway::start(b.addr(), "gw-backlog", true).await;
    let cfg = test_config("agent-backlog", b.url());
    let started = std::time::Instant::now();
    let up = Running::start(cfg, outbox.clone(), no_diag());
    wait_until("the backlog drains", || outbox.stats().records == 0).await;
    let took = started.elapsed();
    let stats = up.status.snapshot();
    eprintln!(
        "drained {N} records in {took:?} ({:.0} records/s): {} batches, {} records sent, {} resends",
        N as f64 / took.as_secs_f64(),
        stats.batches_sent,
        stats.records_sent,
        stats.resends
    );
    assert_eq!(gw.seen(|s| s.all_seqs().len()), N);
    up.stop().await.unwrap();
}

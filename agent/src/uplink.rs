//! The agent's uplink (DESIGN §2 "Uplink", §3): sends the outbox to the gateway over
//! MQTT 3.1.1 and answers the gateway's diagnostic requests.
//!
//! - One MQTT connection at a time, clean session, QoS 1. The client id is the agent id,
//!   so a new connection takes over a half-open old one at the broker instead of both
//!   living side by side. Last will `offline` (retained) on `tend/v1/<agent>/status`;
//!   `online` (retained) is published after every connect, and again whenever the
//!   status reads `offline` while connected (an old connection's will fired late);
//!   `offline` before a clean shutdown (a clean DISCONNECT discards the will).
//! - Records are read from a [`RecordSource`] (the [`Outbox`]) oldest first and published
//!   as [`UpBatch`]es on `up`, at most `max_in_flight_batches` of them unacknowledged.
//!   A record leaves the outbox only when the gateway's application-level [`Ack`] names
//!   its seq and the outbox's incarnation: the broker's PUBACK proves nothing, a broker
//!   may lose what it acknowledged, and an ack for another incarnation (an older outbox
//!   of this agent, or a forgery) is counted and ignored.
//! - After every (re)connect, and whenever the oldest batch in flight has waited
//!   `ack_timeout` for its ack, sending starts again from the oldest record still in the
//!   outbox. Duplicates on the wire are fine (the gateway dedups by agent, incarnation and
//!   seq); loss is not.
//! - Every connection gets a fresh rumqttc event loop, polled in a task of its own: a
//!   `poll()` cancelled half-way through the handshake drops the connection and fires the
//!   will, and rumqttc's own reconnect would replay its in-flight publishes on top of
//!   ours. Reconnects wait an exponential back-off with jitter between `reconnect_min`
//!   and `reconnect_max`.
//! - Diagnostic requests on `diag/req` go to the [`DiagHandler`] (whoever runs the agent
//!   answers them), with a timeout; the answer goes out on `diag/resp` with the request's
//!   id.
//! - Every message is sealed with the agent's key (`tend_wire::seal`): batches, answers
//!   and the status by this agent, acks and diagnostic requests by a gateway of its
//!   fleet. A message on `ack`, `diag/req` or `status` whose seal does not open is
//!   counted (`rejected_messages` in the stats, by reason), logged at most once a minute
//!   per reason, and dropped: it never deletes a record and never runs a diagnostic.
//! - A diagnostic request is answered once per id, and only before its expiry by the
//!   gateway's clock, as the gateway times in its acks tell it (never by this agent's own
//!   clock, which may be wrong): a recorded request replayed later gets no answer.
//! - Malformed messages on `ack` and `diag/req` are logged (a short prefix only) and
//!   ignored. The key and password never appear in a log or an error.

use crate::outbox::{Outbox, OutboxError};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use serde::Serialize;
use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_mqtt::backoff::random_u64;
use tend_mqtt::{
    Backoff, BrokerAuth, BrokerUrl, ClientSettings, ClientTls, OptionsError, UrlError,
    MQTT_MAX_PACKET,
};
use tend_wire::seal::{open, seal};
use tend_wire::{
    encode_sealed, topic, Ack, AgentKey, DiagRequest, DiagResponse, Purpose, Record, SeqRange,
    UpBatch, MAX_MESSAGE, STATUS_OFFLINE, STATUS_ONLINE, VERSION,
};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A boxed, sendable future (what a [`DiagHandler`] returns).
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Why a [`DiagHandler`] gives no answer: whatever error its owner has; its text is shown
/// to the hotline.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// Answers one diagnostic request: `Ok(answer)` or `Err(why)` (shown to the hotline).
/// The uplink fills in the response's id, device and request itself, so a handler cannot
/// get the correlation wrong, and bounds the wait with `diag_timeout`.
pub type DiagHandler =
    Arc<dyn Fn(DiagRequest) -> BoxFuture<Result<serde_json::Value, HandlerError>> + Send + Sync>;

/// Wraps an async closure as a [`DiagHandler`].
pub fn diag_handler<F, Fut>(f: F) -> DiagHandler
where
    F: Fn(DiagRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<serde_json::Value, HandlerError>> + Send + 'static,
{
    Arc::new(move |req| Box::pin(f(req)))
}

/// Diagnostic requests answered at the same time; more are refused at once ("busy")
/// rather than queued, so a flood of requests cannot pile up tasks.
const MAX_DIAG_CONCURRENT: usize = 16;
/// A connection that lasted this long resets the back-off to `reconnect_min`.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// How often the outbox is looked at even without a poke of `notify`: a safety net for a
/// poke that went to another waiter of a shared `Notify`.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// [`UplinkConfig::linger`] by default: readings reach the gateway within about a second
/// of their commit, which is how often a device is polled anyway.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(1);
/// The largest `[uplink] linger` the config takes.
pub const MAX_LINGER: Duration = Duration::from_secs(10);
/// Bytes of a malformed payload that may appear in a log.
const LOG_PREFIX: usize = 32;
/// Room for the MQTT header and topic around a payload of [`MAX_MESSAGE`].
const PACKET_SLACK: usize = 1024;
/// Diagnostic request ids remembered as answered (until their expiry passes); past this,
/// new requests are refused as busy rather than the memory growing.
const MAX_ANSWERED: usize = 4096;

/// Where and how to send. [`UplinkConfig::new`] fills in defaults.
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Topic level and MQTT client id; must be a valid agent id (`[A-Za-z0-9._-]`, ≤ 64).
    pub agent_id: String,
    /// The agent's key (from its credentials file): seals what it sends, opens what the
    /// gateway sends.
    pub key: AgentKey,
    pub site_id: String,
    /// `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (8883).
    pub broker: String,
    /// PEM CA bundle for `mqtts://`; without it the system's roots are used.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key for mutual TLS (both or neither).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// An external broker's user; without it the agent logs in as itself with the
    /// password derived from its key (what an embedded broker checks).
    pub username: Option<String>,
    /// File holding the password (one trailing newline is ignored).
    pub password_file: Option<PathBuf>,
    /// MQTT keep-alive; whole seconds, at least 1 s (0 disables it).
    pub keep_alive: Duration,
    pub batch_max_records: usize,
    /// Cap on the records' JSON in one batch (clamped to half of the wire's message
    /// limit). A single record larger than this still goes, alone.
    pub batch_max_bytes: usize,
    pub max_in_flight_batches: usize,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// When the oldest batch in flight has had no ack for this long, everything not
    /// acknowledged is sent again from the oldest.
    pub ack_timeout: Duration,
    /// The longest newly committed readings wait for company before they are sent: one
    /// batch a second instead of one per outbox commit (a link polling its units in turn
    /// commits ten times a second), so a tenth of the batches, acks and deletions. Records
    /// that are not readings (states, fault episodes) go at once and take the waiting
    /// readings along; a backlog is sent as fast as acks come. Zero: everything at once.
    pub linger: Duration,
    /// How long a diagnostic handler may take before the answer is "timed out".
    pub diag_timeout: Duration,
}

impl UplinkConfig {
    pub fn new(
        agent_id: impl Into<String>,
        site_id: impl Into<String>,
        broker: impl Into<String>,
        key: AgentKey,
    ) -> Self {
        UplinkConfig {
            agent_id: agent_id.into(),
            key,
            site_id: site_id.into(),
            broker: broker.into(),
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password_file: None,
            keep_alive: Duration::from_secs(30),
            batch_max_records: 1000,
            batch_max_bytes: 256 * 1024,
            max_in_flight_batches: 8,
            reconnect_min: Duration::from_secs(1),
            // 15 s, so an outage's backlog (seconds to send) is in well within 30 s of the
            // gateway's return; jitter still spreads many agents over 7.5–15 s.
            reconnect_max: Duration::from_secs(15),
            ack_timeout: Duration::from_secs(30),
            diag_timeout: Duration::from_secs(15),
            linger: DEFAULT_LINGER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink: {0}")]
    Config(String),
    #[error("uplink: {0}")]
    Broker(#[from] UrlError),
    /// A credential or TLS setting that cannot work, or a file behind it that cannot be
    /// read (named in the message).
    #[error("uplink: {0}")]
    Options(#[from] OptionsError),
    #[error("uplink: the outbox failed: {0}")]
    Source(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("uplink: {0}")]
    Encode(#[from] tend_wire::EncodeError),
}

/// Where the uplink reads records and deletes acknowledged ones. [`Outbox`] is the real
/// one; tests use an in-memory one.
pub trait RecordSource: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;
    /// The incarnation the seqs count within: named in every batch, and acks must name it.
    fn incarnation(&self) -> &str;
    /// Oldest first, seq > `after`, at most `max` records and about `max_bytes` of JSON.
    fn pending(
        &self,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, Self::Error>;
    /// The oldest seq still held (acknowledged ones are gone), if the source can say
    /// cheaply: batches carry it, so the gateway can forget what lies below.
    fn oldest(&self) -> Option<u64> {
        None
    }

    /// Whether a record that must not wait for the linger (a state, a fault episode) was
    /// committed since the last call. A source that cannot tell says yes: nothing waits.
    fn urgent(&self) -> bool {
        true
    }
    /// Deletes exactly these seqs (ranges may name seqs already gone); returns how many
    /// were deleted.
    fn ack(&self, ranges: &[SeqRange]) -> impl Future<Output = Result<u64, Self::Error>> + Send;
}

impl RecordSource for Outbox {
    type Error = OutboxError;
    fn incarnation(&self) -> &str {
        Outbox::incarnation(self)
    }
    fn pending(
        &self,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        Outbox::pending(self, after, max, max_bytes)
    }
    fn ack(&self, ranges: &[SeqRange]) -> impl Future<Output = Result<u64, OutboxError>> + Send {
        // The deletion rides along with the outbox's next commit: an fsync per ack would
        // cost more than everything else the agent does, and one lost to a crash only
        // means a resend the gateway dedups.
        std::future::ready(Outbox::ack_later(self, ranges))
    }
    fn oldest(&self) -> Option<u64> {
        self.stats().oldest_seq
    }
    fn urgent(&self) -> bool {
        self.take_urgent()
    }
}

/// What the uplink has done, for the `outbox` / `transport` diagnostics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UplinkStats {
    pub connected: bool,
    /// Successful connects (CONNACK) since start.
    pub connects: u64,
    /// Successful connects after the first one.
    pub reconnects: u64,
    /// Connection attempts that failed before CONNACK.
    pub connect_failures: u64,
    pub batches_sent: u64,
    pub records_sent: u64,
    /// Times sending started again from the oldest record because an ack was late.
    pub resends: u64,
    pub acks_received: u64,
    /// Records the outbox deleted on acks.
    pub records_acked: u64,
    pub in_flight_batches: usize,
    /// Malformed messages on `ack` or `diag/req`, ignored.
    pub malformed_messages: u64,
    /// Acks for another outbox incarnation, ignored: nothing was deleted on them.
    pub foreign_acks: u64,
    /// Messages on `ack`, `diag/req` or `status` not believed, by reason (`unsigned`,
    /// `bad_signature`, `malformed_signature`, `expired`, `replayed`): dropped.
    pub rejected_messages: std::collections::BTreeMap<&'static str, u64>,
    /// This agent's clock minus the gateway's, as of the last ack (seconds; positive when
    /// the agent's clock is ahead). Transit time makes it a little high.
    pub clock_offset_s: Option<i64>,
    pub diag_requests: u64,
    /// Records larger than one MQTT message can carry; they stay in the outbox unsent.
    pub oversized_records: u64,
    pub last_connected_at: Option<jiff::Timestamp>,
    /// Said on the status topic at shutdown instead of `offline`, when set.
    pub parting_status: Option<String>,
    pub last_error: Option<String>,
}

/// Shared handle to the live [`UplinkStats`].
#[derive(Debug, Clone, Default)]
pub struct UplinkStatus(Arc<Mutex<UplinkStats>>);

impl UplinkStatus {
    pub fn snapshot(&self) -> UplinkStats {
        self.lock().clone()
    }
    /// What the agent says on its status topic when it stops, instead of `offline`
    /// (`degraded: ...` when it stops because it cannot record).
    pub fn set_parting_status(&self, status: &str) {
        self.update(|s| s.parting_status = Some(status.to_string()));
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, UplinkStats> {
        // Plain counters, each update complete under the lock: a panicked holder cannot
        // leave them half-written.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn update(&self, f: impl FnOnce(&mut UplinkStats)) {
        f(&mut self.lock())
    }
}

/// Runs the uplink until `shutdown` resolves. See [`Uplink`] to read its stats too.
pub async fn run<S: RecordSource>(
    cfg: UplinkConfig,
    source: S,
    diag: DiagHandler,
    notify: Arc<Notify>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), UplinkError> {
    Uplink::new(cfg, source, diag, notify).run(shutdown).await
}

/// The uplink, before it runs: [`Uplink::status`] gives the stats handle.
pub struct Uplink<S> {
    cfg: UplinkConfig,
    source: S,
    diag: DiagHandler,
    notify: Arc<Notify>,
    status: UplinkStatus,
}

impl<S: RecordSource> Uplink<S> {
    /// `notify` is poked after each append to the outbox so records go out at once.
    pub fn new(cfg: UplinkConfig, source: S, diag: DiagHandler, notify: Arc<Notify>) -> Self {
        Uplink {
            cfg,
            source,
            diag,
            notify,
            status: UplinkStatus::default(),
        }
    }

    pub fn status(&self) -> UplinkStatus {
        self.status.clone()
    }

    /// Connects, sends and answers until `shutdown` resolves; returns an error only for
    /// a bad configuration (checked before the first connect) or a failing outbox.
    /// Connection trouble is retried for ever.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), UplinkError> {
        let opts = mqtt_options(&self.cfg)?;
        let agent = &self.cfg.agent_id;
        let key = self.cfg.key.clone();
        let mut runner = Runner {
            limits: Limits::of(&self.cfg),
            topics: Topics::of(agent),
            online: seal(&key, Purpose::Status, agent, STATUS_ONLINE.as_bytes()),
            offline: seal(&key, Purpose::Status, agent, STATUS_OFFLINE.as_bytes()),
            key,
            gateway_clock: None,
            answered: std::collections::HashMap::new(),
            refusal_log: tend_mqtt::LogLimit::per_minute(),
            agent: self.cfg.agent_id.clone(),
            site: self.cfg.site_id.clone(),
            diag_timeout: self.cfg.diag_timeout,
            source: self.source,
            diag: self.diag,
            notify: self.notify,
            status: self.status,
            diag_tasks: JoinSet::new(),
            max_published: None,
        };
        tokio::pin!(shutdown);
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            match runner.session(&opts, shutdown.as_mut()).await? {
                End::Shutdown => return Ok(()),
                End::Lost { connected } => {
                    if connected && started.elapsed() >= STABLE_CONNECTION {
                        attempt = 0;
                    }
                }
            }
            let policy = Backoff {
                min: self.cfg.reconnect_min,
                max: self.cfg.reconnect_max,
                factor: 2,
                // A random point in the upper half: agents cut off together do not all
                // come back at once.
                jitter: 0.5,
            };
            let delay = policy.delay(attempt, random_u64());
            attempt = attempt.saturating_add(1);
            tracing::debug!(?delay, "uplink: reconnecting after a pause");
            tokio::select! {
                _ = shutdown.as_mut() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

/// Sizes, clamped to what can work.
struct Limits {
    max_records: usize,
    max_bytes: usize,
    max_in_flight: usize,
    ack_timeout: Duration,
    linger: Duration,
}

impl Limits {
    fn of(cfg: &UplinkConfig) -> Limits {
        Limits {
            max_records: cfg.batch_max_records.max(1),
            // Half the message limit leaves room for the batch envelope, so a batch of
            // several records never exceeds what the gateway accepts.
            max_bytes: cfg.batch_max_bytes.clamp(1, MAX_MESSAGE / 2),
            max_in_flight: cfg.max_in_flight_batches.max(1),
            ack_timeout: cfg.ack_timeout.max(Duration::from_millis(100)),
            linger: cfg.linger.min(MAX_LINGER),
        }
    }
}

struct Topics {
    up: String,
    ack: String,
    status: String,
    diag_req: String,
    diag_resp: String,
}

impl Topics {
    fn of(agent: &str) -> Topics {
        Topics {
            up: topic::up(agent),
            ack: topic::ack(agent),
            status: topic::status(agent),
            diag_req: topic::diag_req(agent),
            diag_resp: topic::diag_resp(agent),
        }
    }
}

enum End {
    Shutdown,
    Lost { connected: bool },
}

/// A batch published and not yet fully acknowledged.
struct InFlight {
    /// Its seqs not acknowledged yet, ascending.
    seqs: Vec<u64>,
    sent_at: Instant,
}

/// The state that outlives one connection.
struct Runner<S> {
    limits: Limits,
    topics: Topics,
    key: AgentKey,
    /// The sealed status payloads.
    online: Vec<u8>,
    offline: Vec<u8>,
    /// The latest gateway time an ack told, and when it came: the gateway's clock now is
    /// that plus the time since.
    gateway_clock: Option<(jiff::Timestamp, Instant)>,
    /// Diagnostic request ids answered, with their expiry (gateway time).
    answered: std::collections::HashMap<String, jiff::Timestamp>,
    refusal_log: tend_mqtt::LogLimit,
    agent: String,
    site: String,
    diag_timeout: Duration,
    source: S,
    diag: DiagHandler,
    notify: Arc<Notify>,
    status: UplinkStatus,
    /// Dropped with the runner, which aborts answers still being worked on.
    diag_tasks: JoinSet<()>,
    /// Highest seq ever published by this process: acks are clipped to it, so that a
    /// confused gateway cannot delete records that were never sent.
    max_published: Option<u64>,
}

/// The state of one connection's sending.
struct Sending {
    in_flight: VecDeque<InFlight>,
    /// Highest seq published on this connection since the last restart from the oldest.
    cursor: Option<u64>,
    /// The outbox may hold records past the cursor: set by pokes, acks, resends and the
    /// idle tick, cleared when the outbox has nothing more. Events that cannot change
    /// that (PUBACKs, pings) then cost no outbox read.
    more: bool,
}

/// Why a connection ended while connected.
enum Stop {
    Shutdown,
    Lost(String),
}

impl<S: RecordSource> Runner<S> {
    async fn session<F: Future<Output = ()>>(
        &mut self,
        opts: &MqttOptions,
        mut shutdown: Pin<&mut F>,
    ) -> Result<End, UplinkError> {
        let (client, mut eventloop) = AsyncClient::new(opts.clone(), 64);
        // Records and acks are small and frequent: Nagle's delay is pure latency here.
        eventloop.network_options.set_tcp_nodelay(true);
        let (tx, mut events) = mpsc::unbounded_channel();
        let _poller = AbortOnDrop(spawn_poller(eventloop, tx));

        // The handshake: the poller owns it, so leaving here never cancels a poll.
        loop {
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(End::Shutdown),
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let why = e.to_string();
                        tracing::warn!(error = %why, "uplink: cannot connect to the broker");
                        self.status.update(|s| {
                            s.connect_failures += 1;
                            s.last_error = Some(why);
                        });
                        return Ok(End::Lost { connected: false });
                    }
                    None => return Ok(End::Lost { connected: false }),
                }
            }
        }

        tracing::info!("uplink: connected");
        self.status.update(|s| {
            if s.connects > 0 {
                s.reconnects += 1;
            }
            s.connects += 1;
            s.connected = true;
            s.last_connected_at = Some(jiff::Timestamp::now());
        });
        let stop = self.connected(&client, &mut events, shutdown).await;
        self.status.update(|s| {
            s.connected = false;
            s.in_flight_batches = 0;
        });
        match stop? {
            Stop::Shutdown => {
                // A clean DISCONNECT discards the will, so say `offline` (or why the agent
                // stops, `degraded: ...`) ourselves first; the broker handles this
                // connection's packets in order.
                let parting = match self.status.snapshot().parting_status {
                    Some(why) => seal(&self.key, Purpose::Status, &self.agent, why.as_bytes()),
                    None => self.offline.clone(),
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    client.publish(&self.topics.status, QoS::AtLeastOnce, true, parting),
                )
                .await;
                let _ = tokio::time::timeout(Duration::from_secs(1), client.disconnect()).await;
                // Give the poller the moment it needs to write both out.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(ev) = events.recv().await {
                        if ev.is_err() {
                            break;
                        }
                    }
                })
                .await;
                tracing::info!("uplink: disconnected");
                Ok(End::Shutdown)
            }
            Stop::Lost(why) => {
                tracing::warn!(error = %why, "uplink: connection lost");
                self.status.update(|s| s.last_error = Some(why));
                Ok(End::Lost { connected: true })
            }
        }
    }

    /// Runs one connection after its CONNACK until it fails or `shutdown` resolves.
    async fn connected<F: Future<Output = ()>>(
        &mut self,
        client: &AsyncClient,
        events: &mut mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
        mut shutdown: Pin<&mut F>,
    ) -> Result<Stop, UplinkError> {
        // Clean session: subscriptions are made again on every connection. The broker
        // handles them before the publishes that follow, so no ack can be missed. The
        // agent also listens to its own status: the will of an older connection that the
        // broker noticed dead only now says `offline` after this one said `online`.
        for t in [&self.topics.ack, &self.topics.diag_req, &self.topics.status] {
            if let Err(e) = client.subscribe(t, QoS::AtLeastOnce).await {
                return Ok(Stop::Lost(closed_reason(events, e)));
            }
        }
        if let Err(e) = client
            .publish(
                &self.topics.status,
                QoS::AtLeastOnce,
                true,
                self.online.clone(),
            )
            .await
        {
            return Ok(Stop::Lost(closed_reason(events, e)));
        }
        // After every connect, everything not acknowledged goes again from the oldest.
        let mut sending = Sending {
            in_flight: VecDeque::new(),
            cursor: None,
            more: true,
        };
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Readings committed and waiting for company until then (see `linger`).
        let mut hold: Option<Instant> = None;
        loop {
            if let Err(e) = self.fill(client, &mut sending).await? {
                return Ok(Stop::Lost(closed_reason(events, e)));
            }
            let ack_deadline = sending
                .in_flight
                .iter()
                .map(|b| b.sent_at)
                .min()
                .map(|t| t + self.limits.ack_timeout);
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(Stop::Shutdown),
                ev = events.recv() => match ev {
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        self.incoming(client, &mut sending, &p.topic, &p.payload).await?;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ok(Stop::Lost(e.to_string())),
                    None => return Ok(Stop::Lost("the MQTT event loop stopped".into())),
                },
                _ = self.notify.notified() => {
                    if self.limits.linger.is_zero() || self.source.urgent() {
                        sending.more = true;
                        hold = None;
                    } else if hold.is_none() {
                        hold = Some(Instant::now() + self.limits.linger);
                    }
                }
                _ = sleep_until_opt(hold) => {
                    hold = None;
                    sending.more = true;
                }
                // The safety net for a lost poke; a hold already waits for one.
                _ = idle.tick(), if hold.is_none() => sending.more = true,
                _ = sleep_until_opt(ack_deadline) => {
                    tracing::info!(
                        in_flight = sending.in_flight.len(),
                        "uplink: no ack in time; sending again from the oldest record"
                    );
                    sending.in_flight.clear();
                    sending.cursor = None;
                    sending.more = true;
                    self.status.update(|s| s.resends += 1);
                }
            }
        }
    }

    /// Publishes batches while the window has room and the outbox has records. The outer
    /// error is the outbox's (fatal), the inner one the connection's.
    async fn fill(
        &mut self,
        client: &AsyncClient,
        sending: &mut Sending,
    ) -> Result<Result<(), rumqttc::ClientError>, UplinkError> {
        while sending.more && sending.in_flight.len() < self.limits.max_in_flight {
            let mut records = self
                .source
                .pending(
                    sending.cursor,
                    self.limits.max_records,
                    self.limits.max_bytes,
                )
                .map_err(|e| UplinkError::Source(Box::new(e)))?;
            let Some(last) = records.last().map(|r| r.seq) else {
                sending.more = false;
                break;
            };
            let mut batch = UpBatch {
                v: VERSION,
                agent: self.agent.clone(),
                incarnation: self.source.incarnation().to_string(),
                site: self.site.clone(),
                sent_at: jiff::Timestamp::now(),
                oldest: self.source.oldest(),
                records: Vec::new(),
            };
            // Only a lone record can be too large (see Limits); it cannot be sent and it
            // must not be lost, so it stays in the outbox and the cursor moves past it.
            let payload = loop {
                batch.records = std::mem::take(&mut records);
                let payload = encode_sealed(&self.key, Purpose::Up, &self.agent, &batch)?;
                if payload.len() <= MAX_MESSAGE {
                    break Some(payload);
                }
                records = std::mem::take(&mut batch.records);
                if records.len() <= 1 {
                    break None;
                }
                records.truncate(records.len() / 2);
            };
            let Some(payload) = payload else {
                tracing::error!(
                    seq = last,
                    limit = MAX_MESSAGE,
                    "uplink: a record is larger than one message may be; it stays in the outbox unsent"
                );
                self.status.update(|s| s.oversized_records += 1);
                sending.cursor = Some(last);
                continue;
            };
            let seqs: Vec<u64> = batch.records.iter().map(|r| r.seq).collect();
            let last = seqs.last().copied().unwrap_or(last);
            if let Err(e) = client
                .publish(&self.topics.up, QoS::AtLeastOnce, false, payload)
                .await
            {
                return Ok(Err(e));
            }
            sending.cursor = Some(last);
            self.max_published = self.max_published.max(Some(last));
            let n = seqs.len() as u64;
            sending.in_flight.push_back(InFlight {
                seqs,
                sent_at: Instant::now(),
            });
            let in_flight = sending.in_flight.len();
            self.status.update(|s| {
                s.batches_sent += 1;
                s.records_sent += n;
                s.in_flight_batches = in_flight;
            });
        }
        Ok(Ok(()))
    }

    async fn incoming(
        &mut self,
        client: &AsyncClient,
        sending: &mut Sending,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), UplinkError> {
        if topic == self.topics.ack {
            let Some(body) = self.believe(Purpose::Ack, payload) else {
                return Ok(());
            };
            match Ack::decode(body) {
                Ok(ack) => self.acked(sending, ack).await?,
                Err(e) => self.malformed("ack", body, &e),
            }
        } else if topic == self.topics.diag_req {
            let Some(body) = self.believe(Purpose::DiagReq, payload) else {
                return Ok(());
            };
            match DiagRequest::decode(body) {
                Ok(req) => match self.admit(&req) {
                    Ok(()) => self.diagnose(client, req),
                    Err(reason) => self.reject(reason),
                },
                Err(e) => self.malformed("diagnostic request", body, &e),
            }
        } else if topic == self.topics.status
            && open(&self.key, Purpose::Status, &self.agent, payload).ok()
                == Some(STATUS_OFFLINE.as_bytes())
        {
            // Connected, so that is stale (an old connection's will, or a retained
            // leftover): say `online` again. If this fails the connection is going and
            // the poller reports why.
            tracing::debug!("uplink: the status says offline while connected; correcting");
            let _ = client
                .publish(
                    &self.topics.status,
                    QoS::AtLeastOnce,
                    true,
                    self.online.clone(),
                )
                .await;
        }
        Ok(())
    }

    /// The body of a gateway's message sealed for `purpose` with this agent's key, or
    /// `None` after counting why not.
    fn believe<'a>(&self, purpose: Purpose, payload: &'a [u8]) -> Option<&'a [u8]> {
        match open(&self.key, purpose, &self.agent, payload) {
            Ok(body) => Some(body),
            Err(e) => {
                self.reject(e.as_str());
                None
            }
        }
    }

    fn reject(&self, reason: &'static str) {
        self.status
            .update(|s| *s.rejected_messages.entry(reason).or_default() += 1);
        if self.refusal_log.allow(reason) {
            tracing::warn!(
                reason,
                "uplink: dropped a message not believed; more for this reason are counted in the transport diagnostic and logged at most once a minute"
            );
        }
    }

    /// The gateway's clock now, as far as its acks tell.
    fn gateway_now(&self) -> Option<jiff::Timestamp> {
        let (at, seen) = self.gateway_clock?;
        let since = jiff::SignedDuration::try_from(seen.elapsed()).ok()?;
        at.checked_add(since).ok()
    }

    /// Whether a (sealed) diagnostic request may be answered: not answered before, and not
    /// expired by the gateway's clock. Before the first ack of this run the expiry cannot
    /// be judged (the agent's own clock is not trusted), and the id alone decides.
    fn admit(&mut self, req: &DiagRequest) -> Result<(), &'static str> {
        let now = self.gateway_now();
        if let Some(now) = now {
            if req.expires_at <= now {
                return Err("expired");
            }
            self.answered.retain(|_, expiry| *expiry > now);
        }
        if self.answered.contains_key(&req.id) {
            return Err("replayed");
        }
        if self.answered.len() >= MAX_ANSWERED {
            return Err("too_many_requests");
        }
        self.answered.insert(req.id.clone(), req.expires_at);
        Ok(())
    }

    fn malformed(&self, what: &str, payload: &[u8], err: &tend_wire::WireError) {
        let prefix = String::from_utf8_lossy(&payload[..payload.len().min(LOG_PREFIX)]);
        let err: String = err.to_string().chars().take(120).collect();
        tracing::warn!(
            len = payload.len(),
            prefix = ?prefix,
            error = %err,
            "uplink: ignoring a malformed {what}"
        );
        self.status.update(|s| s.malformed_messages += 1);
    }

    async fn acked(&mut self, sending: &mut Sending, ack: Ack) -> Result<(), UplinkError> {
        // A sealed ack is the gateway's word on its clock, whatever its incarnation.
        let later = self.gateway_now().is_none_or(|now| ack.gateway_time > now);
        if later {
            self.gateway_clock = Some((ack.gateway_time, Instant::now()));
            let offset = jiff::Timestamp::now().as_second() - ack.gateway_time.as_second();
            self.status.update(|s| s.clock_offset_s = Some(offset));
        }
        if ack.incarnation != self.source.incarnation() {
            // Acks of a replaced outbox (a gateway answering what the old file sent) or a
            // forgery: their seqs mean other records here. Not logged each time: a flood
            // of them must not flood the log.
            tracing::debug!(incarnation = %ack.incarnation, "uplink: ignoring an ack for another outbox incarnation");
            self.status.update(|s| s.foreign_acks += 1);
            return Ok(());
        }
        let ranges = clip(ack.ranges, self.max_published);
        if ranges.is_empty() {
            tracing::debug!("uplink: an ack names nothing this agent has sent");
            return Ok(());
        }
        let deleted = self
            .source
            .ack(&ranges)
            .await
            .map_err(|e| UplinkError::Source(Box::new(e)))?;
        for b in sending.in_flight.iter_mut() {
            b.seqs.retain(|s| !covered(&ranges, *s));
        }
        sending.in_flight.retain(|b| !b.seqs.is_empty());
        sending.more = true;
        let in_flight = sending.in_flight.len();
        self.status.update(|s| {
            s.acks_received += 1;
            s.records_acked += deleted;
            s.in_flight_batches = in_flight;
        });
        Ok(())
    }

    fn diagnose(&mut self, client: &AsyncClient, req: DiagRequest) {
        self.status.update(|s| s.diag_requests += 1);
        while self.diag_tasks.try_join_next().is_some() {}
        let client = client.clone();
        let topic = self.topics.diag_resp.clone();
        let (key, agent) = (self.key.clone(), self.agent.clone());
        if self.diag_tasks.len() >= MAX_DIAG_CONCURRENT {
            let resp = response(&req, Err(Unanswered::Busy));
            let sent = match encode_sealed(&key, Purpose::DiagResp, &agent, &resp) {
                Ok(payload) => client
                    .try_publish(topic, QoS::AtLeastOnce, false, payload)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "uplink: cannot send a busy answer");
            }
            return;
        }
        let handler = self.diag.clone();
        let timeout = self.diag_timeout;
        self.diag_tasks.spawn(async move {
            let answer = match tokio::time::timeout(timeout, handler(req.clone())).await {
                Ok(a) => a.map_err(Unanswered::Handler),
                Err(_) => Err(Unanswered::Timeout(timeout)),
            };
            let resp = response(&req, answer);
            // If this connection is gone by now the answer is lost, and the hotline
            // reports a timeout: a diagnostic is asked again, not queued.
            let sent = match encode_sealed(&key, Purpose::DiagResp, &agent, &resp) {
                Ok(payload) => client
                    .publish(topic, QoS::AtLeastOnce, false, payload)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
                tracing::debug!(error = %e, "uplink: cannot send a diagnostic answer");
            }
        });
    }
}

/// Why a diagnostic request got no answer; the text goes back in the response.
#[derive(Debug, thiserror::Error)]
enum Unanswered {
    #[error("the agent is busy with other diagnostics")]
    Busy,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Handler(HandlerError),
}

fn response(req: &DiagRequest, answer: Result<serde_json::Value, Unanswered>) -> DiagResponse {
    let (ok, answer, error) = match answer {
        Ok(a) => (true, a, None),
        Err(e) => (false, serde_json::Value::Null, Some(e.to_string())),
    };
    DiagResponse {
        v: VERSION,
        id: req.id.clone(),
        device: req.device.clone(),
        request: req.request.clone(),
        ok,
        answer,
        error,
    }
}

/// The ranges cut to seqs ≤ `max` (nothing when nothing was published), sorted and
/// merged where they overlap or touch, so that [`covered`] is one binary search even for
/// an ack with very many ranges.
fn clip(mut ranges: Vec<SeqRange>, max: Option<u64>) -> Vec<SeqRange> {
    let Some(max) = max else {
        return Vec::new();
    };
    ranges.retain(|r| r.first <= r.last && r.first <= max);
    for r in &mut ranges {
        r.last = r.last.min(max);
    }
    ranges.sort_unstable();
    let mut merged: Vec<SeqRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(m) if r.first <= m.last.saturating_add(1) => m.last = m.last.max(r.last),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether `seq` is in one of the sorted, disjoint `ranges` that [`clip`] makes.
fn covered(ranges: &[SeqRange], seq: u64) -> bool {
    let end = ranges.partition_point(|r| r.first <= seq);
    end > 0 && ranges[end - 1].last >= seq
}

fn closed_reason(
    events: &mut mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    e: rumqttc::ClientError,
) -> String {
    // The client only fails when the event loop is gone; its error says why.
    while let Ok(ev) = events.try_recv() {
        if let Err(err) = ev {
            return err.to_string();
        }
    }
    format!("the MQTT event loop stopped ({e})")
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Polls one connection's event loop until it fails, handing every event over. The
/// channel is unbounded so that the poller never waits for the session while the session
/// waits for the poller (a publish blocks until the poller takes it).
fn spawn_poller(
    mut eventloop: EventLoop,
    tx: mpsc::UnboundedSender<Result<Event, ConnectionError>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let ev = eventloop.poll().await;
            let failed = ev.is_err();
            if tx.send(ev).is_err() || failed {
                // Polling again would make rumqttc reconnect on its own; a new session
                // with a new event loop does that instead.
                return;
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Everything about the connection that can be checked before connecting.
fn mqtt_options(cfg: &UplinkConfig) -> Result<MqttOptions, UplinkError> {
    if !topic::valid_agent_id(&cfg.agent_id) {
        return Err(UplinkError::Config(format!(
            "agent id {:?} is not a valid topic level",
            cfg.agent_id
        )));
    }
    let url = BrokerUrl::parse(&cfg.broker)?;
    let tls = ClientTls {
        ca_file: cfg.ca_file.clone(),
        client_cert: cfg.client_cert.clone(),
        client_key: cfg.client_key.clone(),
    };
    let auth = BrokerAuth {
        username: cfg.username.clone(),
        password_file: cfg.password_file.clone(),
        tls: tls.clone(),
    };
    let settings = ClientSettings {
        client_id: cfg.agent_id.clone(),
        keep_alive: cfg.keep_alive,
        // Any incoming packet MQTT allows is read, and a payload over MAX_MESSAGE is then
        // refused by the decoders: with a smaller limit, one oversize message retained on
        // the ack or diag/req topic would end the connection at every reconnect, and no
        // ack could ever arrive again.
        max_incoming: MQTT_MAX_PACKET,
        max_outgoing: MAX_MESSAGE + PACKET_SLACK,
    };
    let mut opts = if cfg.username.is_some() || cfg.password_file.is_some() {
        tend_mqtt::mqtt_options(&url, &auth, &settings)?
    } else {
        // The embedded broker's login: the agent as itself, with the password derived
        // from its key.
        let login = tend_mqtt::Credentials {
            username: cfg.agent_id.clone(),
            password: cfg.key.broker_password(&cfg.agent_id),
        };
        auth.check(&url)?;
        tend_mqtt::options::options_with(&url, Some(login), &tls, &settings)?
    };
    opts.set_last_will(LastWill::new(
        topic::status(&cfg.agent_id),
        seal(
            &cfg.key,
            Purpose::Status,
            &cfg.agent_id,
            STATUS_OFFLINE.as_bytes(),
        ),
        QoS::AtLeastOnce,
        true,
    ));
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_are_clipped_to_what_was_sent() {
        let r = |first, last| SeqRange { first, last };
        assert_eq!(clip(vec![r(1, 5)], None), vec![]);
        assert_eq!(
            clip(vec![r(20, 30), r(1, 5), r(8, 12), r(6, 4)], Some(10)),
            vec![r(1, 5), r(8, 10)]
        );
        assert_eq!(
            clip(
                vec![r(4, 6), r(1, 3), r(2, 2), r(9, 9), r(10, u64::MAX)],
                Some(u64::MAX)
            ),
            vec![r(1, 6), r(9, u64::MAX)]
        );
        let ranges = clip(vec![r(1, 100), r(3, 4), r(200, 300)], Some(1000));
        assert!(covered(&ranges, 50));
        assert!(covered(&ranges, 4));
        assert!(covered(&ranges, 200));
        assert!(!covered(&ranges, 150));
        assert!(!covered(&ranges, 0));
        assert!(!covered(&[], 0));
    }

    #[test]
    fn config_checks() {
        use tend_mqtt::{SecretError, TlsError};
        let key = AgentKey::from_bytes([1; tend_wire::seal::KEY_LEN]);
        let mut cfg = UplinkConfig::new("agent-1", "site", "mqtt://127.0.0.1:1883", key);
        assert!(mqtt_options(&cfg).is_ok());
        cfg.agent_id = "a/b".into();
        assert!(matches!(mqtt_options(&cfg), Err(UplinkError::Config(_))));
        cfg.agent_id = "agent-1".into();
        cfg.password_file = Some("/nonexistent".into());
        assert!(matches!(
            mqtt_options(&cfg),
            Err(UplinkError::Options(OptionsError::PasswordWithoutUser))
        ));
        cfg.username = Some("u".into());
        assert!(matches!(
            mqtt_options(&cfg),
            Err(UplinkError::Options(OptionsError::Secret(
                SecretError::Unreadable { .. }
            )))
        ));
        cfg.password_file = None;
        cfg.ca_file = Some("/nonexistent".into());
        assert!(matches!(
            mqtt_options(&cfg),
            Err(UplinkError::Options(
                OptionsError::TlsFilesWithoutTls { .. }
            ))
        ));
        cfg.broker = "mqtts://127.0.0.1".into();
        assert!(matches!(
            mqtt_options(&cfg),
            Err(UplinkError::Options(OptionsError::Tls(
                TlsError::Unreadable {
                    what: "CA file",
                    ..
                }
            )))
        ));
        cfg.keep_alive = Duration::from_millis(300);
        cfg.ca_file = None;
        cfg.broker = "mqtt://h".into();
        // Sub-second keep-alive is rounded up instead of tripping rumqttc's assert.
        assert_eq!(
            mqtt_options(&cfg).unwrap().keep_alive(),
            Duration::from_secs(1)
        );
        // Credentials in the URL are refused without echoing them.
        cfg.broker = "mqtt://user:s3cret@h:1883".into();
        let e = mqtt_options(&cfg).unwrap_err();
        assert!(matches!(e, UplinkError::Broker(_)), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}

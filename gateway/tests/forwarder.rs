//! The forwarder against the backend stand-in, over real HTTP on TCP: agent records go
//! through `GatewayStore::apply` into the outbox, the forwarder sends them.
//!
//! Proves: one ticket per episode with the stored body byte for byte and its events after
//! it, in order; retries through 503, 429 (no earlier than Retry-After), a hanging
//! request, a refused connection and wrong credentials never open a second ticket nor lose
//! one; a ticket the backend refuses for good is kept with the backend's reason and not
//! resent, while the tickets queued after it go through; a restarted forwarder sends
//! nothing twice; the backend's status is read back. Also the stand-in's own API.

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tend_gateway::app::Gateway;
use tend_gateway::backend::service_api::{ServiceApi, ServiceApiConfig};
use tend_gateway::backend::{BoxFuture, Reply, StatusRead, TicketBackend};
use tend_gateway::diag::DiagClient;
use tend_gateway::fleet::Fleet;
use tend_gateway::forwarder::{self, ForwarderConfig};
use tend_gateway::ingest::IngestContext;
use tend_gateway::metrics::OutcomeLabel;
use tend_gateway::store::{ForwardState, RedbStore, TicketRecord};
use tend_gateway::trust::{Trust, TrustDir};
use tend_profiles::{FaultClass, ProfileSet, SignalKind};
use tend_testkit::backend_standin::{self, Backend, Received, Scripted};
use tend_wire::{EpisodeChange, EpisodeEvent, Opening, Record, RecordBody, UpBatch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "fwd-test-token-5e1a77";
const AGENT: &str = "agent-icu-a";

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

[[device]]
id = "ward3-pump"
site = "s-017-main"
serial = "LP3B-2403-0457"
location = "Ward 3 bed 12"
accepted = "2023-01-10"
"#;

/// Generous: these only bound how long a broken test hangs.
const PATIENCE: Duration = Duration::from_secs(20);

fn gateway(dir: &Path) -> Gateway {
    let store = RedbStore::open(dir).unwrap();
    let cx = IngestContext {
        gateway: "gw-test".into(),
        fleet: Fleet::parse("fleet.toml", FLEET).unwrap(),
        profiles: ProfileSet::builtin().unwrap(),
        tz: TimeZone::get("Asia/Shanghai").unwrap(),
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
    };
    let (diag, _requests) = DiagClient::new("gw-test");
    Gateway::new(
        Arc::new(store),
        cx,
        diag,
        Trust::open(TrustDir::new(dir.join("trust"))).unwrap(),
        true,
        Duration::from_secs(5),
    )
}

/// How a test reaches the stand-in and paces the forwarder.
struct Config {
    api: ServiceApiConfig,
    pace: ForwarderConfig,
}

/// Short backoffs so retries happen within a test.
fn config(backend: &Backend, token: &str) -> Config {
    Config {
        api: ServiceApiConfig {
            timeout: Duration::from_secs(3),
            ..ServiceApiConfig::new(backend.url(), token)
        },
        pace: ForwarderConfig {
            status_poll: Duration::from_secs(3600),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            ..ForwarderConfig::default()
        },
    }
}

struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

fn start(gw: &Gateway, cfg: Config) -> Running {
    let api = ServiceApi::new(cfg.api).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(forwarder::run(
        gw.clone(),
        Box::new(api),
        cfg.pace,
        stop.clone(),
    ));
    Running { stop, task }
}

fn episode(
    device: &str,
    code: &str,
    n: u64,
    change: EpisodeChange,
    class: FaultClass,
    opened_at: Timestamp,
) -> EpisodeEvent {
    let description = format!("{code} fault");
    let action = Some("Check and replace the part.".to_string());
    let evidence = BTreeMap::from([("state".into(), json!(4)), ("error_code".into(), json!(7))]);
    EpisodeEvent {
        episode: format!("{AGENT}/{device}/{code}/{n}"),
        change,
        code: code.into(),
        kind: SignalKind::Fault,
        class: Some(class),
        description: description.clone(),
        action: action.clone(),
        evidence: evidence.clone(),
        device_available: false,
        opened_at,
        due: None,
        // As the agent sends it: the episode as it opened, on every change.
        opening: Some(
            Opening {
                class: Some(class),
                description,
                action,
                evidence,
                device_available: false,
                due: None,
                model: Some("aeris/av-500".into()),
                firmware: Some("5.2.0".into()),
            }
            .into(),
        ),
    }
}

/// The same change of an episode that opened with another class.
fn opened_as(mut ev: EpisodeEvent, class: FaultClass) -> EpisodeEvent {
    if let Some(o) = ev.opening.as_mut() {
        o.class = Some(class);
    }
    ev
}

fn t(s: &str) -> Timestamp {
    s.parse().unwrap()
}

/// Applies records (seq, agent time, device, change) as one batch and wakes the forwarder.
fn feed(gw: &Gateway, records: Vec<(u64, Timestamp, EpisodeEvent)>) -> Vec<String> {
    let batch = UpBatch {
        v: tend_wire::VERSION,
        agent: AGENT.into(),
        incarnation: "f0".into(),
        site: "s-017-main".into(),
        sent_at: Timestamp::now(),
        oldest: None,
        records: records
            .into_iter()
            .map(|(seq, at, ev)| Record {
                seq,
                at,
                device: ev.episode.split('/').nth(1).unwrap().to_string(),
                body: RecordBody::Episode(ev),
            })
            .collect(),
    };
    let applied = gw.store.apply(&batch, &gw.cx, Timestamp::now()).unwrap();
    gw.forwarder_wake.notify_one();
    applied.tickets_opened
}

fn ticket(gw: &Gateway, key: &str) -> TicketRecord {
    gw.store.ticket(key).unwrap().expect("ticket in the store")
}

fn attempts(gw: &Gateway, outcome: &str) -> u64 {
    gw.metrics
        .forward_attempts
        .get_or_create(&OutcomeLabel {
            outcome: outcome.into(),
        })
        .get()
}

/// Polls `f` until it gives `Some`, or panics naming `what`.
async fn until<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    until_else(what, f, String::new).await
}

/// [`until`], and on timeout the panic shows `state()`.
async fn until_else<T>(
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    state: impl Fn() -> String,
) -> T {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting for: {what}\n{}", state());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the store and the backend hold, for a failure message.
fn state(gw: &Gateway, backend: &Backend) -> String {
    let reqs: Vec<String> = backend
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{:?} {} {} {:?} {:?}",
                r.time, r.method, r.path, r.idempotency_key, r.status
            )
        })
        .collect();
    format!(
        "store tickets: {:#?}\njobs: {:?}\nbackend requests:\n{}",
        gw.store.tickets().unwrap(),
        gw.store.jobs().unwrap(),
        reqs.join("\n")
    )
}

async fn sent(gw: &Gateway, key: &str) -> TicketRecord {
    until(&format!("ticket {key} sent"), || {
        let t = ticket(gw, key);
        (t.forward.state == ForwardState::Sent).then_some(t)
    })
    .await
}

fn ticket_count(b: &Backend) -> usize {
    b.tickets().len()
}

fn creates_of(reqs: &[Received], key: &str) -> Vec<Received> {
    reqs.iter()
        .filter(|r| r.is_create() && r.idempotency_key.as_deref() == Some(key))
        .cloned()
        .collect()
}

/// Every request carried the right token, the posts as JSON with a key.
fn assert_well_formed(reqs: &[Received]) {
    for r in reqs {
        assert!(
            r.authorized,
            "{} {} without the right token",
            r.method, r.path
        );
        if r.method == "POST" {
            assert_eq!(r.content_type.as_deref(), Some("application/json"));
            assert!(r.idempotency_key.is_some(), "{} without a key", r.path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opened_then_cleared_is_one_ticket_then_one_event() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let fwd = start(&gw, config(&backend, TOKEN));

    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    let stored = sent(&gw, key).await;
    let id = stored.ticket_id.clone().expect("ticket id stored");

    feed(
        &gw,
        vec![(
            2,
            t("2026-11-28T02:41:10Z"),
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Cleared,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let stored = until("fault_cleared sent", || {
        let t = ticket(&gw, key);
        (t.events.len() == 1 && t.events[0].forward.state == ForwardState::Sent).then_some(t)
    })
    .await;
    fwd.stop().await;

    // The backend has exactly one ticket, with the stored body byte for byte.
    let tickets = backend.tickets();
    assert_eq!(tickets.len(), 1);
    let b = &tickets[0];
    assert_eq!(b.id, id);
    assert_eq!(&b.key, key);
    assert_eq!(b.body, stored.body);
    let reqs = backend.requests();
    let creates = creates_of(&reqs, key);
    assert_eq!(creates.len(), 1);
    assert_eq!(
        creates[0].raw_body,
        serde_json::to_vec(&stored.body).unwrap()
    );
    assert_eq!(creates[0].status, Some(201));

    // Then exactly one fault_cleared on that ticket id, after the ticket.
    assert_eq!(b.events.len(), 1);
    assert_eq!(b.events[0].kind, "fault_cleared");
    assert_eq!(b.events[0].key, stored.events[0].idempotency_key);
    assert_eq!(b.events[0].body, stored.events[0].body);
    let events: Vec<&Received> = reqs.iter().filter(|r| r.event_for().is_some()).collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_for(), Some(id.as_str()));
    assert_eq!(events[0].status, Some(201));
    assert_eq!(
        events[0].raw_body,
        serde_json::to_vec(&stored.events[0].body).unwrap()
    );
    assert!(events[0].at >= creates[0].at);
    assert_eq!(reqs.len(), 2, "{reqs:#?}");
    assert_well_formed(&reqs);

    // The store says sent, the outbox is empty, the metrics agree.
    assert_eq!(stored.forward.state, ForwardState::Sent);
    assert_eq!(stored.forward.attempts, 1);
    assert!(stored.forward.sent_at.is_some());
    assert_eq!(stored.events[0].forward.state, ForwardState::Sent);
    assert!(gw.store.jobs().unwrap().is_empty());
    assert_eq!(attempts(&gw, "sent"), 2);
    assert_eq!(attempts(&gw, "retry"), 0);
    assert_eq!(gw.metrics.forward_queue.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_503_then_success_is_still_one_ticket_and_the_backend_is_paused() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    backend.script([
        Scripted::Status(503),
        Scripted::Status(503),
        Scripted::Status(503),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    // Two tickets, A queued before B.
    let keys = feed(
        &gw,
        vec![
            (
                1,
                opened,
                episode(
                    "icu7-vent",
                    "ALM1.4",
                    1,
                    EpisodeChange::Opened,
                    FaultClass::Major,
                    opened,
                ),
            ),
            (
                2,
                opened,
                episode(
                    "ward3-pump",
                    "E07",
                    1,
                    EpisodeChange::Opened,
                    FaultClass::Complex,
                    opened,
                ),
            ),
        ],
    );
    let (a, b) = (&keys[0], &keys[1]);
    let cfg = config(&backend, TOKEN);
    let min = cfg.pace.min_backoff;
    let fwd = start(&gw, cfg);
    let ta = sent(&gw, a).await;
    sent(&gw, b).await;
    fwd.stop().await;

    assert_eq!(backend.tickets().len(), 2);
    let reqs = backend.requests();
    assert_well_formed(&reqs);
    // A is retried with the same key and body; B waits while the backend is paused.
    let order: Vec<(&str, Option<u16>)> = reqs
        .iter()
        .map(|r| (r.idempotency_key.as_deref().unwrap(), r.status))
        .collect();
    assert_eq!(
        order,
        vec![
            (a.as_str(), Some(503)),
            (a.as_str(), Some(503)),
            (a.as_str(), Some(503)),
            (a.as_str(), Some(201)),
            (b.as_str(), Some(201)),
        ]
    );
    let body = serde_json::to_vec(&ta.body).unwrap();
    assert!(creates_of(&reqs, a).iter().all(|r| r.raw_body == body));
    // Never faster than the shortest backoff.
    for w in reqs[..4].windows(2) {
        assert!(w[1].at.duration_since(w[0].at) >= min, "retried too soon");
    }
    assert_eq!(ta.forward.attempts, 4);
    assert!(ta.forward.last_error.as_deref().unwrap().starts_with("503"));
    assert_eq!(ticket(&gw, b).forward.attempts, 1);
    assert_eq!(attempts(&gw, "retry"), 3);
    assert_eq!(attempts(&gw, "sent"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_retried_no_earlier_than_retry_after() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    backend.script([Scripted::TooMany { retry_after_s: 2 }]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let fwd = start(&gw, config(&backend, TOKEN));
    let stored = sent(&gw, &keys[0]).await;
    fwd.stop().await;

    let reqs = backend.requests();
    let statuses: Vec<Option<u16>> = reqs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![Some(429), Some(201)]);
    let gap = reqs[1].at.duration_since(reqs[0].at);
    assert!(gap >= Duration::from_secs(2), "retried after {gap:?}");
    assert_eq!(backend.tickets().len(), 1);
    assert_eq!(stored.forward.attempts, 2);
    assert!(stored
        .forward
        .last_error
        .as_deref()
        .unwrap()
        .starts_with("429"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_hanging_past_the_timeout_is_retried_into_one_ticket() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    backend.script([Scripted::Hang(Duration::from_secs(10))]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let mut cfg = config(&backend, TOKEN);
    cfg.api.timeout = Duration::from_millis(300);
    let fwd = start(&gw, cfg);
    let stored = sent(&gw, &keys[0]).await;
    fwd.stop().await;

    let reqs = backend.requests();
    let creates = creates_of(&reqs, &keys[0]);
    assert_eq!(creates.len(), 2, "{reqs:#?}");
    assert_eq!(creates[1].status, Some(201));
    assert_eq!(creates[0].raw_body, creates[1].raw_body);
    assert_eq!(backend.tickets().len(), 1);
    assert_eq!(stored.forward.attempts, 2);
    let err = stored.forward.last_error.unwrap();
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(attempts(&gw, "retry"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_refused_for_good_is_kept_and_the_next_one_delivered() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let reason = "fault.code E-BAD is not in the service catalogue";
    backend.refuse_code("E-BAD", reason);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    // The refused ticket (with a clearing queued behind it) before a good one.
    let keys = feed(
        &gw,
        vec![
            (
                1,
                opened,
                episode(
                    "ward3-pump",
                    "E-BAD",
                    1,
                    EpisodeChange::Opened,
                    FaultClass::Complex,
                    opened,
                ),
            ),
            (
                2,
                t("2026-11-28T02:20:00Z"),
                episode(
                    "ward3-pump",
                    "E-BAD",
                    1,
                    EpisodeChange::Cleared,
                    FaultClass::Complex,
                    opened,
                ),
            ),
            (
                3,
                t("2026-11-28T02:21:00Z"),
                episode(
                    "icu7-vent",
                    "ALM1.4",
                    1,
                    EpisodeChange::Opened,
                    FaultClass::Major,
                    opened,
                ),
            ),
        ],
    );
    let (bad, good) = (&keys[0], &keys[1]);
    let fwd = start(&gw, config(&backend, TOKEN));
    sent(&gw, good).await;
    let refused = until("the refusal stored", || {
        let t = ticket(&gw, bad);
        (t.forward.state == ForwardState::Failed).then_some(t)
    })
    .await;
    // Wake it again and give it time: the refused ticket must not be resent.
    gw.forwarder_wake.notify_one();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fwd.stop().await;

    assert_eq!(
        refused.forward.last_error.as_deref(),
        Some(format!("400: {reason}").as_str())
    );
    assert!(refused.ticket_id.is_none());
    let reqs = backend.requests();
    let tries = creates_of(&reqs, bad);
    assert_eq!(tries.len(), 1, "{reqs:#?}");
    assert_eq!(tries[0].status, Some(400));
    // Its clearing waits (kept in the outbox, never sent without a ticket).
    assert!(reqs.iter().all(|r| r.event_for().is_none()));
    let jobs = gw.store.jobs().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(&jobs[0].ticket_key, bad);
    assert!(jobs[0].event.is_some());
    let shown = gw.store.tickets().unwrap();
    let shown = shown.iter().find(|t| &t.key == bad).unwrap();
    assert_eq!(shown.forward.state, ForwardState::Failed);
    assert_eq!(shown.events[0].forward.state, ForwardState::Pending);
    // The good one is at the backend; the refused one is not.
    let at_backend = backend.tickets();
    assert_eq!(at_backend.len(), 1);
    assert_eq!(&at_backend[0].key, good);
    assert_eq!(attempts(&gw, "failed"), 1);
    assert_eq!(attempts(&gw, "sent"), 1);
    assert_eq!(gw.metrics.forward_queue.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_forwarder_sends_nothing_twice() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opened = t("2026-11-28T02:15:02Z");
    let records = vec![
        (
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        ),
        (
            2,
            t("2026-11-28T02:41:10Z"),
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Cleared,
                FaultClass::Major,
                opened,
            ),
        ),
    ];
    let late = (
        3,
        t("2026-11-28T03:00:00Z"),
        episode(
            "ward3-pump",
            "E07",
            1,
            EpisodeChange::Opened,
            FaultClass::Complex,
            opened,
        ),
    );
    let (first, second) = {
        let gw = gateway(dir.path());
        let fwd = start(&gw, config(&backend, TOKEN));
        let keys = feed(&gw, records.clone());
        until("ticket and event sent", || {
            gw.store.jobs().unwrap().is_empty().then_some(())
        })
        .await;
        // A second ticket is being retried when the forwarder stops.
        backend.rule(|r| (r.code() == Some("E07")).then_some(Scripted::Status(503)));
        let late_keys = feed(&gw, vec![late.clone()]);
        until("a 503 stored", || {
            (ticket(&gw, &late_keys[0]).forward.attempts >= 1).then_some(())
        })
        .await;
        fwd.stop().await;
        backend.clear_rules();
        (keys[0].clone(), late_keys[0].clone())
        // Every handle on the store is gone here.
    };
    let before = backend.requests().len();
    assert!(before >= 3);
    assert_eq!(ticket_count(&backend), 1);

    // A new gateway process: the store reopened from disk, the agent replays its batch.
    let gw = gateway(dir.path());
    assert_eq!(ticket(&gw, &first).forward.state, ForwardState::Sent);
    let replay = feed(&gw, records);
    assert!(replay.is_empty());
    let fwd = start(&gw, config(&backend, TOKEN));
    sent(&gw, &second).await;
    gw.forwarder_wake.notify_one();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fwd.stop().await;

    // Only the pending ticket went out, once; nothing sent before was sent again.
    let reqs = backend.requests();
    assert_eq!(reqs.len(), before + 1, "{:#?}", &reqs[before..]);
    assert_eq!(
        reqs[before].idempotency_key.as_deref(),
        Some(second.as_str())
    );
    assert_eq!(reqs[before].status, Some(201));
    assert_eq!(backend.tickets().len(), 2);
    assert_eq!(creates_of(&reqs, &first).len(), 1);
    assert_eq!(reqs.iter().filter(|r| r.event_for().is_some()).count(), 1);
    assert!(gw.store.jobs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_lose_nothing_and_the_fixed_token_delivers() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let key = &keys[0];
    let cfg = config(&backend, "not-the-token");
    let slow = cfg.pace.max_backoff;
    let fwd = start(&gw, cfg);
    until("two refusals stored", || {
        (ticket(&gw, key).forward.attempts >= 2).then_some(())
    })
    .await;
    fwd.stop().await;

    let reqs = backend.requests();
    assert!(reqs.iter().all(|r| !r.authorized && r.status == Some(401)));
    // Retried slowly: the longest backoff between tries.
    assert!(reqs[1].at.duration_since(reqs[0].at) >= slow);
    assert!(backend.tickets().is_empty());
    let kept = ticket(&gw, key);
    assert_eq!(kept.forward.state, ForwardState::Pending);
    assert!(kept.forward.attempts >= 2);
    let err = kept.forward.last_error.unwrap();
    assert!(err.starts_with("401"), "{err}");
    assert!(!err.contains("not-the-token"));
    assert_eq!(gw.store.jobs().unwrap().len(), 1);
    assert!(attempts(&gw, "retry") >= 2);

    // The token fixed, a new run delivers it.
    let fwd = start(&gw, config(&backend, TOKEN));
    let stored = sent(&gw, key).await;
    fwd.stop().await;
    let tickets = backend.tickets();
    assert_eq!(tickets.len(), 1);
    assert_eq!(tickets[0].body, stored.body);
    assert!(backend.requests().last().unwrap().authorized);
    assert!(gw.store.jobs().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalation_clearing_and_recurrence_follow_the_ticket_in_order() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    // Everything is queued before the ticket exists at the backend.
    backend.script([Scripted::Status(503), Scripted::Status(502)]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let first = t("2026-11-28T02:15:02Z");
    let again = t("2026-11-28T05:00:00Z");
    let ep = |n, change, class, opened| episode("icu7-vent", "ALM1.4", n, change, class, opened);
    let keys = feed(
        &gw,
        vec![
            (
                1,
                first,
                ep(1, EpisodeChange::Opened, FaultClass::Complex, first),
            ),
            (
                2,
                t("2026-11-28T02:30:00Z"),
                opened_as(
                    ep(1, EpisodeChange::ClassChanged, FaultClass::Major, first),
                    FaultClass::Complex,
                ),
            ),
            (
                3,
                t("2026-11-28T03:00:00Z"),
                opened_as(
                    ep(1, EpisodeChange::Cleared, FaultClass::Major, first),
                    FaultClass::Complex,
                ),
            ),
            (
                4,
                again,
                ep(2, EpisodeChange::Opened, FaultClass::Major, again),
            ),
            (
                5,
                t("2026-11-28T05:10:00Z"),
                ep(2, EpisodeChange::Cleared, FaultClass::Major, again),
            ),
        ],
    );
    assert_eq!(keys.len(), 1, "one ticket for both episodes");
    let key = &keys[0];
    let fwd = start(&gw, config(&backend, TOKEN));
    let stored = until_else(
        "all four events sent",
        || {
            let t = ticket(&gw, key);
            (t.events.len() == 4
                && t.events
                    .iter()
                    .all(|e| e.forward.state == ForwardState::Sent))
            .then_some(t)
        },
        || state(&gw, &backend),
    )
    .await;
    fwd.stop().await;

    let want = [
        "escalated",
        "fault_cleared",
        "fault_recurred",
        "fault_cleared",
    ];
    let kinds: Vec<&str> = stored.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, want);
    let tickets = backend.tickets();
    assert_eq!(tickets.len(), 1);
    let kinds: Vec<&str> = tickets[0].events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, want);
    let keys_sent: Vec<&str> = tickets[0].events.iter().map(|e| e.key.as_str()).collect();
    let keys_stored: Vec<&str> = stored
        .events
        .iter()
        .map(|e| e.idempotency_key.as_str())
        .collect();
    assert_eq!(keys_sent, keys_stored);

    // No event before the ticket was created; each event sent once.
    let reqs = backend.requests();
    assert_well_formed(&reqs);
    let created = reqs
        .iter()
        .position(|r| r.status == Some(201) && r.is_create())
        .unwrap();
    assert_eq!(created, 2, "{reqs:#?}");
    let events: Vec<&Received> = reqs.iter().filter(|r| r.event_for().is_some()).collect();
    assert_eq!(events.len(), 4);
    assert!(events
        .iter()
        .all(|r| r.status == Some(201) && r.at >= reqs[created].at));
    assert!(reqs[..created].iter().all(Received::is_create));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_down_then_back_gets_the_ticket_once() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    backend.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let fwd = start(&gw, config(&backend, TOKEN));
    let refused = until("two refused connections", || {
        let t = ticket(&gw, &keys[0]);
        (t.forward.attempts >= 2).then_some(t)
    })
    .await;
    let err = refused.forward.last_error.unwrap();
    assert!(err.starts_with("no answer"), "{err}");
    assert_eq!(refused.forward.state, ForwardState::Pending);
    backend.restart().await.unwrap();
    let stored = sent(&gw, &keys[0]).await;
    fwd.stop().await;
    assert_eq!(backend.tickets().len(), 1);
    assert_eq!(backend.requests().len(), 1);
    assert!(stored.forward.attempts >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backends_status_is_read_back() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let key = &keys[0];
    let mut cfg = config(&backend, TOKEN);
    cfg.pace.status_poll = Duration::from_millis(100);
    let fwd = start(&gw, cfg);
    let id = sent(&gw, key).await.ticket_id.unwrap();
    until("status open read back", || {
        (ticket(&gw, key).backend_status.as_deref() == Some("open")).then_some(())
    })
    .await;
    assert!(backend.set_status(&id, "engineer_dispatched"));
    until("engineer_dispatched read back", || {
        let t = ticket(&gw, key);
        (t.backend_status.as_deref() == Some("engineer_dispatched") && t.open).then_some(())
    })
    .await;
    assert!(backend.set_status(&id, "closed"));
    until("closed read back", || {
        let t = ticket(&gw, key);
        (t.backend_status.as_deref() == Some("closed") && !t.open).then_some(())
    })
    .await;
    // A closed ticket is no longer read.
    let reads = |b: &Backend| b.requests().iter().filter(|r| r.method == "GET").count();
    let n = reads(&backend);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(reads(&backend), n);
    fwd.stop().await;
    let reqs = backend.requests();
    assert_well_formed(&reqs);
    assert!(reqs
        .iter()
        .filter(|r| r.method == "GET")
        .all(|r| r.path == format!("/api/v1/tickets/{id}") && r.status == Some(200)));
}

/// The stand-in itself, spoken to directly: what the API document says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standin_speaks_the_api() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    let http = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", backend.url());
    let post = |path: &str, key: Option<&str>, token: Option<&str>, body: &Value| {
        let mut r = http
            .post(url(path))
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(k) = key {
            r = r.header("Idempotency-Key", k);
        }
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    };
    async fn answer(r: reqwest::RequestBuilder) -> (u16, Value) {
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
    let body = json!({"schema": "service-ticket/1", "kind": "fault", "fault": {"code": "X1"}});
    let tickets = "/api/v1/tickets";

    // Credentials.
    let (s, _) = answer(post(tickets, Some("k1"), None, &body)).await;
    assert_eq!(s, 401);
    let (s, _) = answer(post(tickets, Some("k1"), Some("wrong"), &body)).await;
    assert_eq!(s, 401);
    // Key and body checks.
    let (s, v) = answer(post(tickets, None, Some(TOKEN), &body)).await;
    assert_eq!(s, 400);
    assert!(v["error"].as_str().unwrap().contains("Idempotency-Key"));
    let (s, _) = answer(post(tickets, Some(&"k".repeat(129)), Some(TOKEN), &body)).await;
    assert_eq!(s, 400);
    let (s, _) = answer(post(
        tickets,
        Some("k1"),
        Some(TOKEN),
        &json!({"kind": "fault"}),
    ))
    .await;
    assert_eq!(s, 400);
    let wrong_kind = json!({"schema": "service-ticket/1", "kind": "repair"});
    let (s, _) = answer(post(tickets, Some("k1"), Some(TOKEN), &wrong_kind)).await;
    assert_eq!(s, 400);
    let no_type = http
        .post(url(tickets))
        .bearer_auth(TOKEN)
        .header("Idempotency-Key", "k1")
        .body(body.to_string());
    assert_eq!(answer(no_type).await.0, 400);
    // Created, then the same again (keys in another order: same JSON), then another body.
    let (s, v) = answer(post(tickets, Some("k1"), Some(TOKEN), &body)).await;
    assert_eq!(
        (s, &v),
        (201, &json!({"ticket_id": "T-2026-000001", "created": true}))
    );
    let reordered = r#"{"fault": {"code": "X1"}, "kind": "fault", "schema": "service-ticket/1"}"#;
    let again = http
        .post(url(tickets))
        .bearer_auth(TOKEN)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", "k1")
        .body(reordered);
    let (s, v) = answer(again).await;
    assert_eq!(
        (s, &v),
        (
            200,
            &json!({"ticket_id": "T-2026-000001", "created": false})
        )
    );
    let other = json!({"schema": "service-ticket/1", "kind": "fault", "fault": {"code": "X2"}});
    let (s, v) = answer(post(tickets, Some("k1"), Some(TOKEN), &other)).await;
    assert_eq!(s, 409);
    assert!(v["error"].is_string());
    let (s, v) = answer(post(tickets, Some("k2"), Some(TOKEN), &other)).await;
    assert_eq!((s, v["ticket_id"].as_str()), (201, Some("T-2026-000002")));

    // Events.
    let ev = json!({"type": "fault_cleared", "at": "2026-11-28T10:41:10+08:00", "detail": {}});
    let events = "/api/v1/tickets/T-2026-000001/events";
    let (s, _) = answer(post(
        "/api/v1/tickets/T-2026-999999/events",
        Some("e1"),
        Some(TOKEN),
        &ev,
    ))
    .await;
    assert_eq!(s, 404);
    let (s, _) = answer(post(
        events,
        Some("e1"),
        Some(TOKEN),
        &json!({"type": "reopened"}),
    ))
    .await;
    assert_eq!(s, 400);
    let (s, _) = answer(post(events, None, Some(TOKEN), &ev)).await;
    assert_eq!(s, 400);
    assert_eq!(
        answer(post(events, Some("e1"), Some(TOKEN), &ev)).await.0,
        201
    );
    assert_eq!(
        answer(post(events, Some("e1"), Some(TOKEN), &ev)).await.0,
        200
    );
    let note = json!({"type": "note", "at": "2026-11-28T10:42:00+08:00", "detail": {}});
    assert_eq!(
        answer(post(events, Some("e1"), Some(TOKEN), &note)).await.0,
        409
    );
    assert_eq!(
        answer(post(events, Some("e2"), Some(TOKEN), &note)).await.0,
        201
    );

    // Reading a ticket.
    let get = |id: &str, token: &str| {
        http.get(url(&format!("/api/v1/tickets/{id}")))
            .bearer_auth(token.to_string())
    };
    let (s, v) = answer(get("T-2026-000001", TOKEN)).await;
    assert_eq!(s, 200);
    assert_eq!(v["ticket_id"], "T-2026-000001");
    assert_eq!(v["status"], "open");
    assert!(v["updated_at"]
        .as_str()
        .unwrap()
        .parse::<Timestamp>()
        .is_ok());
    assert!(backend.set_status("T-2026-000001", "acknowledged"));
    assert!(!backend.set_status("T-2026-999999", "closed"));
    assert_eq!(
        answer(get("T-2026-000001", TOKEN)).await.1["status"],
        "acknowledged"
    );
    assert_eq!(answer(get("T-2026-999999", TOKEN)).await.0, 404);
    assert_eq!(answer(get("T-2026-000001", "wrong")).await.0, 401);

    // Scripts come first, in order; then rules; then normal handling.
    backend.script([
        Scripted::Status(500),
        Scripted::TooMany { retry_after_s: 7 },
        Scripted::TooManyUntil(t("2026-11-28T02:15:02Z")),
    ]);
    backend.refuse_code("X9", "no X9 here");
    let r1 = http
        .get(url("/api/v1/tickets/T-2026-000001"))
        .send()
        .await
        .unwrap();
    assert_eq!(r1.status().as_u16(), 500);
    let r2 = http
        .get(url("/api/v1/tickets/T-2026-000001"))
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status().as_u16(), 429);
    assert_eq!(r2.headers()["retry-after"], "7");
    let r3 = http
        .get(url("/api/v1/tickets/T-2026-000001"))
        .send()
        .await
        .unwrap();
    assert_eq!(r3.headers()["retry-after"], "Sat, 28 Nov 2026 02:15:02 GMT");
    let x9 = json!({"schema": "service-ticket/1", "kind": "fault", "fault": {"code": "X9"}});
    let (s, v) = answer(post(tickets, Some("k9"), Some(TOKEN), &x9)).await;
    assert_eq!((s, v["error"].as_str()), (400, Some("no X9 here")));
    backend.clear_rules();
    assert_eq!(
        answer(post(tickets, Some("k9"), Some(TOKEN), &x9)).await.0,
        201
    );

    // The record: every request, its status; the token is nowhere in it.
    let reqs = backend.requests();
    assert!(reqs.iter().all(|r| r.status.is_some()));
    assert!(!format!("{reqs:?}").contains(TOKEN));
    assert!(!format!("{backend:?}").contains(TOKEN));
    let stored = backend.ticket_by_key("k1").unwrap();
    assert_eq!(stored.id, "T-2026-000001");
    let kinds: Vec<&str> = stored.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["fault_cleared", "note"]);
    assert_eq!(backend.tickets().len(), 3);
    assert!(
        backend
            .wait_for(Duration::from_secs(1), |b| b.requests().len() == reqs.len())
            .await
    );
}

/// With no backoff at all a pause is over before the forwarder even looks at the clock
/// again (as on a slow machine): it must retry at once, not sleep until the idle wake-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_over_before_the_forwarder_sleeps_does_not_stall_it() {
    let backend = backend_standin::spawn(TOKEN).await.unwrap();
    backend.script([
        Scripted::Status(503),
        Scripted::Status(503),
        Scripted::Status(503),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let opened = t("2026-11-28T02:15:02Z");
    let keys = feed(
        &gw,
        vec![(
            1,
            opened,
            episode(
                "icu7-vent",
                "ALM1.4",
                1,
                EpisodeChange::Opened,
                FaultClass::Major,
                opened,
            ),
        )],
    );
    let mut cfg = config(&backend, TOKEN);
    cfg.pace.min_backoff = Duration::ZERO;
    cfg.pace.max_backoff = Duration::ZERO;
    let fwd = start(&gw, cfg);
    // Well within the 30 s idle wake-up.
    let stored = until_else(
        "the ticket sent",
        || {
            let t = ticket(&gw, &keys[0]);
            (t.forward.state == ForwardState::Sent).then_some(t)
        },
        || state(&gw, &backend),
    )
    .await;
    fwd.stop().await;
    assert_eq!(stored.forward.attempts, 4);
    assert_eq!(backend.tickets().len(), 1);
}

/// A ticket system in memory, behind the forwarder's only view of a backend: creates
/// answer as scripted (then accepted), events are accepted, statuses read as set.
#[derive(Default)]
struct Memory {
    creates: std::sync::Mutex<std::collections::VecDeque<Reply<String>>>,
    /// What was asked, in order: `create <key>`, `event <ticket id> <key>`, `status <id>`.
    calls: std::sync::Mutex<Vec<(Timestamp, String)>>,
    /// (key, document) of every event accepted.
    events: std::sync::Mutex<Vec<(String, Value)>>,
    status: std::sync::Mutex<String>,
}

struct MemoryBackend(Arc<Memory>);

impl Memory {
    fn called(&self, what: String) {
        self.calls.lock().unwrap().push((Timestamp::now(), what));
    }

    fn calls(&self) -> Vec<(Timestamp, String)> {
        self.calls.lock().unwrap().clone()
    }
}

impl TicketBackend for MemoryBackend {
    fn location(&self) -> &str {
        "memory"
    }

    fn create_ticket<'a>(
        &'a self,
        key: &'a str,
        _document: &'a Value,
    ) -> BoxFuture<'a, Reply<String>> {
        self.0.called(format!("create {key}"));
        let next = self.0.creates.lock().unwrap().pop_front();
        Box::pin(async move { next.unwrap_or_else(|| Reply::Accepted("MEM-1".into())) })
    }

    fn add_event<'a>(
        &'a self,
        ticket_id: &'a str,
        key: &'a str,
        document: &'a Value,
    ) -> BoxFuture<'a, Reply<()>> {
        self.0.called(format!("event {ticket_id} {key}"));
        self.0
            .events
            .lock()
            .unwrap()
            .push((key.to_string(), document.clone()));
        Box::pin(async { Reply::Accepted(()) })
    }

    fn ticket_status<'a>(&'a self, ticket_id: &'a str) -> BoxFuture<'a, Reply<StatusRead>> {
        self.0.called(format!("status {ticket_id}"));
        let status = self.0.status.lock().unwrap().clone();
        Box::pin(async move { Reply::Accepted(StatusRead::bare(&status)) })
    }
}

/// The forwarder driven through the backend trait alone: a pause the backend asks for is
/// honoured, refused credentials wait the longest backoff, the event waits for its ticket's
/// id, and the status read back closes the ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarder_needs_nothing_but_the_backend_trait() {
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(dir.path());
    let memory = Arc::new(Memory::default());
    *memory.status.lock().unwrap() = "closed".into();
    memory.creates.lock().unwrap().extend([
        Reply::RetryLater {
            retry_after: Some(Duration::from_millis(300)),
            reason: "busy".into(),
        },
        Reply::Unauthorized {
            retry_after: None,
            reason: "401 Unauthorized".into(),
        },
    ]);
    let opened = t("2026-11-28T02:15:02Z");
    let ev = |seq, at, change| {
        (
            seq,
            at,
            episode("icu7-vent", "ALM1.4", 1, change, FaultClass::Major, opened),
        )
    };
    let keys = feed(
        &gw,
        vec![
            ev(1, opened, EpisodeChange::Opened),
            ev(2, t("2026-11-28T02:41:10Z"), EpisodeChange::Cleared),
        ],
    );
    let key = &keys[0];
    let pace = ForwarderConfig {
        status_poll: Duration::from_millis(50),
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(400),
        ..ForwarderConfig::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(forwarder::run(
        gw.clone(),
        Box::new(MemoryBackend(memory.clone())),
        pace.clone(),
        stop.clone(),
    ));
    let stored = until("ticket closed by the status read", || {
        let t = ticket(&gw, key);
        (!t.open
            && t.events
                .iter()
                .all(|e| e.forward.state == ForwardState::Sent))
        .then_some(t)
    })
    .await;
    stop.cancel();
    task.await.unwrap();

    assert_eq!(stored.ticket_id.as_deref(), Some("MEM-1"));
    assert_eq!(stored.backend_status.as_deref(), Some("closed"));
    assert_eq!(stored.forward.state, ForwardState::Sent);
    assert_eq!(stored.forward.attempts, 3);
    let calls = memory.calls();
    let what: Vec<&str> = calls.iter().map(|(_, w)| w.as_str()).collect();
    let event_key = &stored.events[0].idempotency_key;
    assert_eq!(
        what[..4],
        [
            format!("create {key}"),
            format!("create {key}"),
            format!("create {key}"),
            format!("event MEM-1 {event_key}"),
        ]
    );
    assert!(what[4..].iter().all(|w| *w == "status MEM-1"), "{what:?}");
    // Not before the backend's Retry-After, then not before the longest backoff.
    let gap = |i: usize| Duration::try_from(calls[i + 1].0.duration_since(calls[i].0)).unwrap();
    assert!(gap(0) >= Duration::from_millis(300), "{:?}", gap(0));
    assert!(gap(1) >= pace.max_backoff, "{:?}", gap(1));
    // The event went as stored.
    let events = memory.events.lock().unwrap().clone();
    assert_eq!(
        events,
        vec![(event_key.clone(), stored.events[0].body.clone())]
    );
    assert_eq!(attempts(&gw, "retry"), 2);
    assert_eq!(attempts(&gw, "sent"), 2);
    assert!(gw.store.jobs().unwrap().is_empty());
}

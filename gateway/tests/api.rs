//! The hotline API over a real socket (127.0.0.1:0): token, devices, detail, availability,
//! tickets, diagnostics with a fake agent, audit log, metrics, OpenAPI, page, retry, and
//! the terminal client against the same server.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_gateway::api;
use tend_gateway::app::Gateway;
use tend_gateway::audit::{Audit, AuditEntry};
use tend_gateway::cli::{self, ApiTarget, HotlineCommand};
use tend_gateway::diag::DiagClient;
use tend_gateway::fleet::Fleet;
use tend_gateway::ingest::IngestContext;
use tend_gateway::ledger::month_window;
use tend_gateway::metrics::Metrics;
use tend_gateway::store::{GatewayStore, JobOutcome, RedbStore};
use tend_gateway::trust::{Trust, TrustDir};
use tend_profiles::{DeviceState, FaultClass, ProfileSet, SignalKind, Value as PValue};
use tend_testkit::config::write_secret;
use tend_wire::{
    DiagRequest, DiagResponse, EpisodeChange, EpisodeEvent, Record, RecordBody, UpBatch,
    WireReading,
};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "hotline-secret-7f3a9c";

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

[[site]]
id = "s-017-wanzhou"
customer = "c-017"
name = "Wanzhou branch"
address = "8 Taibai Rd, Wanzhou"
service_area = "other_city"

[[site]]
id = "s-017-hills"
customer = "c-017"
name = "Hill clinic"
address = "Chengkou county"
service_area = "remote"

[[device]]
id = "icu7-vent"
site = "s-017-main"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"

[[device]]
id = "ward3-pump"
site = "s-017-wanzhou"
serial = "LP3B-2403-0457"
location = "Ward 3 bed 12"
accepted = "2025-06-01"

[[device]]
id = "xr-monitor"
site = "s-017-hills"
serial = "VM12-7-000123"
location = "Exam room"
accepted = "2024-01-10"
last_maintenance = "2026-10-01"
"#;

const AGENT: &str = "agent-icu-a";

fn shanghai() -> TimeZone {
    TimeZone::get("Asia/Shanghai").unwrap()
}

fn mins(m: i64) -> SignedDuration {
    SignedDuration::from_secs(m * 60)
}

fn local(t: Timestamp) -> String {
    t.to_zoned(shanghai())
        .strftime("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// The gateway under test, its server and a fake agent.
struct World {
    _dir: tempfile::TempDir,
    base: String,
    gw: Gateway,
    audit_path: PathBuf,
    token_file: PathBuf,
    /// Every request the fake agent received.
    sent: Arc<Mutex<Vec<(String, DiagRequest)>>>,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    http: reqwest::Client,
    /// Start of the constructed history (whole seconds, 3 h before the test began).
    t0: Timestamp,
    /// When the history was stored.
    now: Timestamp,
}

fn rec(seq: u64, at: Timestamp, device: &str, body: RecordBody) -> Record {
    Record {
        seq,
        at,
        device: device.into(),
        body,
    }
}

fn reading(name: &str, v: f64, unit: &str) -> WireReading {
    WireReading {
        name: name.into(),
        value: PValue::Num(v),
        unit: Some(unit.into()),
    }
}

fn episode(id: &str, code: &str, class: FaultClass, at: Timestamp, available: bool) -> RecordBody {
    RecordBody::Episode(EpisodeEvent {
        episode: id.into(),
        change: EpisodeChange::Opened,
        code: code.into(),
        kind: SignalKind::Fault,
        class: Some(class),
        description: format!("{code} fault"),
        action: Some(format!("see manual for {code}")),
        evidence: BTreeMap::from([("state".into(), json!(4))]),
        device_available: available,
        opened_at: at,
        due: None,
        opening: None,
    })
}

impl World {
    async fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn GatewayStore> =
            Arc::new(RedbStore::open(&dir.path().join("data")).unwrap());
        let cx = Arc::new(IngestContext {
            gateway: "gw-test".into(),
            fleet: Fleet::parse("fleet.toml", FLEET).unwrap(),
            profiles: ProfileSet::builtin().unwrap(),
            tz: shanghai(),
            clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
        });
        let (diag, mut rx) = DiagClient::new("gw-test");
        let gw = Gateway {
            store: store.clone(),
            cx: cx.clone(),
            metrics: Arc::new(Metrics::new()),
            diag: diag.clone(),
            agents: Arc::default(),
            forwarder_wake: Arc::new(tokio::sync::Notify::new()),
            backend_configured: false,
            diag_timeout: Duration::from_millis(500),
            trust: Trust::open(TrustDir::new(dir.path().join("trust"))).unwrap(),
            refusal_log: Arc::new(tend_mqtt::LogLimit::per_minute()),
        };

        let now = Timestamp::now();
        let t0 = Timestamp::from_second(now.as_second() - 3 * 3600).unwrap();
        let records = vec![
            rec(
                1,
                t0,
                "icu7-vent",
                RecordBody::Identity {
                    model: "aeris/av-500".into(),
                    firmware: "5.2.0".into(),
                    serial: Some("AV5C-21-004417".into()),
                    profile: "aeris/av-500 5.x".into(),
                },
            ),
            rec(
                2,
                t0,
                "icu7-vent",
                RecordBody::State {
                    from: DeviceState::Unknown,
                    to: DeviceState::Up,
                },
            ),
            rec(
                3,
                t0 + mins(60),
                "icu7-vent",
                RecordBody::State {
                    from: DeviceState::Up,
                    to: DeviceState::Down,
                },
            ),
            rec(
                4,
                t0 + mins(60),
                "icu7-vent",
                episode(
                    "agent-icu-a/icu7-vent/ALM1.4/1",
                    "ALM1.4",
                    FaultClass::Major,
                    t0 + mins(60),
                    false,
                ),
            ),
            rec(
                5,
                t0 + mins(66),
                "icu7-vent",
                RecordBody::Readings {
                    readings: vec![
                        reading("turbine_temperature", 42.5, "°C"),
                        reading("battery_health", 95.0, "%"),
                    ],
                },
            ),
            rec(
                6,
                t0,
                "ward3-pump",
                RecordBody::Identity {
                    model: "lumen/lip-300".into(),
                    firmware: "3.1.0".into(),
                    serial: Some("LP3B-2403-0457".into()),
                    profile: "lumen/lip-300 3.x".into(),
                },
            ),
            rec(
                7,
                t0,
                "ward3-pump",
                RecordBody::State {
                    from: DeviceState::Unknown,
                    to: DeviceState::Up,
                },
            ),
            rec(
                8,
                t0 + mins(30),
                "ward3-pump",
                episode(
                    "agent-icu-a/ward3-pump/E12/1",
                    "E12",
                    FaultClass::Complex,
                    t0 + mins(30),
                    true,
                ),
            ),
            rec(
                9,
                t0 + mins(90),
                "lab-spare",
                RecordBody::State {
                    from: DeviceState::Unknown,
                    to: DeviceState::Up,
                },
            ),
        ];
        let batch = UpBatch {
            v: tend_wire::VERSION,
            agent: AGENT.into(),
            incarnation: "a0".into(),
            site: "s-017-main".into(),
            sent_at: now,
            oldest: None,
            records,
        };
        let applied = store.apply(&batch, &cx, now).unwrap();
        assert_eq!(applied.tickets_opened.len(), 2, "{applied:?}");
        gw.set_agent_status(AGENT, "online", now);

        // The fake agent: answers `selftest` with an error, never answers `transport`,
        // answers everything else.
        let sent: Arc<Mutex<Vec<(String, DiagRequest)>>> = Arc::default();
        let log = sent.clone();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                let req = out.request.clone();
                log.lock().unwrap().push((out.agent.clone(), req.clone()));
                let (ok, error) = match req.request.as_str() {
                    "transport" => continue,
                    "selftest" => (false, Some("device busy: self-test running".to_string())),
                    _ => (true, None),
                };
                diag.answer(
                    &out.agent,
                    DiagResponse {
                        v: tend_wire::VERSION,
                        id: req.id.clone(),
                        device: req.device.clone(),
                        request: req.request.clone(),
                        ok,
                        answer: json!({ "echo": req.request, "device": req.device }),
                        error,
                    },
                );
            }
        });

        let audit_path = dir.path().join("data").join("audit.log");
        let audit = Audit::open(&audit_path).unwrap();
        let token_file = dir.path().join("api.token");
        write_secret(&token_file, format!("{TOKEN}\n")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(api::serve(
            listener,
            api::router(gw.clone(), TOKEN.to_string(), audit),
            shutdown.clone(),
        ));
        World {
            _dir: dir,
            base: format!("http://{addr}"),
            gw,
            audit_path,
            token_file,
            sent,
            shutdown,
            server,
            http: reqwest::Client::new(),
            t0,
            now,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.get_q(path, &[]).await
    }

    async fn get_q(&self, path: &str, q: &[(&str, String)]) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .query(q)
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn diag(&self, device: &str, request: &str) -> (u16, Value) {
        self.post_raw(
            &format!("/api/v1/devices/{device}/diagnostics"),
            serde_json::to_vec(&json!({ "request": request })).unwrap(),
        )
        .await
    }

    fn sent(&self) -> Vec<(String, DiagRequest)> {
        self.sent.lock().unwrap().clone()
    }

    fn audit(&self) -> Vec<AuditEntry> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Whether the constructed history lies in the current month (not so in the first
    /// three hours of a month), so this month's figures are the history's.
    fn history_in_this_month(&self) -> bool {
        self.t0 >= month_window(Timestamp::now(), &shanghai()).0
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.server.await.unwrap().unwrap();
    }
}

fn approx(v: &Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
    assert!((got - want).abs() < 1e-9, "got {got}, want {want}");
}

#[tokio::test]
async fn token_is_required_and_checked() {
    let w = World::start().await;
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/icu7-vent",
        "/api/v1/tickets",
        "/api/v1/openapi.json",
    ] {
        let r = w.http.get(w.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without token");
        let body: Value = r.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
        let r = w
            .http
            .get(w.url(path))
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
        let r = w
            .http
            .get(w.url(path))
            .header("authorization", format!("Basic {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with another scheme");
        let (status, _) = w.get(path).await;
        assert_eq!(status, 200, "{path} with the token");
    }
    // A refused diagnostic is on record, without any token.
    let r = w
        .http
        .post(w.url("/api/v1/devices/icu7-vent/diagnostics"))
        .bearer_auth("guess")
        .json(&json!({"request": "readings"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(w.sent().is_empty());
    let audit = w.audit();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "unauthorized");
    assert_eq!(
        audit[0].request.as_deref(),
        Some("POST /api/v1/devices/icu7-vent/diagnostics")
    );
    assert_eq!(audit[0].status, 401);
    let text = std::fs::read_to_string(&w.audit_path).unwrap();
    assert!(!text.contains("guess") && !text.contains(TOKEN), "{text}");
    w.stop().await;
}

#[tokio::test]
async fn device_list_has_every_fleet_device_and_the_strays() {
    let w = World::start().await;
    let before = Timestamp::now();
    let (status, list) = w.get("/api/v1/devices").await;
    let after = Timestamp::now();
    assert_eq!(status, 200);
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["icu7-vent", "ward3-pump", "xr-monitor", "lab-spare"]);

    let vent = &list[0];
    assert_eq!(vent["serial"], "AV5C-21-004417");
    assert_eq!(vent["site"], "s-017-main");
    assert_eq!(vent["in_fleet"], true);
    assert_eq!(vent["state"], "down");
    assert_eq!(
        vent["last_seen"]
            .as_str()
            .unwrap()
            .parse::<Timestamp>()
            .unwrap(),
        w.t0 + mins(66)
    );
    assert_eq!(vent["open_faults"], 1);
    assert_eq!(vent["model"], "AV-500");
    assert_eq!(vent["kind"], "ventilator");
    assert_eq!(vent["location"], "ICU bed 7");
    assert_eq!(vent["agent"], AGENT);
    assert_eq!(vent["agent_status"], "online");
    if w.history_in_this_month() {
        // Up 1 h, then down, heard until 66 min, and silent since: a broken device that
        // falls silent stays down, so its down time runs to now.
        let down_at = |now: Timestamp| now.duration_since(w.t0 + mins(60)).as_secs_f64();
        let a = vent["availability"].as_f64().unwrap();
        assert!(
            3600.0 / (3600.0 + down_at(after)) - 1e-9 <= a
                && a <= 3600.0 / (3600.0 + down_at(before)) + 1e-9,
            "{a}"
        );
        // The month's budget counts the rest of the month as usable:
        // 0.005 × (up + down + rest of month) − down; the flag is the budget's status.
        let (_, month_end) = month_window(before, &shanghai());
        let allowed = vent["downtime_allowed_s"].as_f64().unwrap();
        let want = 0.005 * (3600.0 + month_end.duration_since(w.t0 + mins(60)).as_secs_f64());
        assert!((allowed - want).abs() < 1e-6, "{allowed} vs {want}");
        let left = vent["downtime_budget_s"].as_f64().unwrap();
        assert!(
            (allowed - down_at(after)).max(0.0) - 1e-6 <= left
                && left <= (allowed - down_at(before)).max(0.0) + 1e-6,
            "{left}"
        );
        let status = if down_at(before) > allowed {
            "breached"
        } else {
            "at_risk"
        };
        assert_eq!(vent["budget_status"], status, "2 h down of {allowed} s");
        assert!(vent["coverage"].as_f64().unwrap() > 0.0);
    }

    let pump = &list[1];
    assert_eq!(pump["state"], "up");
    assert_eq!(pump["open_faults"], 1);
    assert_eq!(pump["model"], "LIP-300");
    assert_eq!(pump["budget_status"], "ok");

    let monitor = &list[2];
    assert_eq!(monitor["state"], "unknown");
    assert_eq!(monitor["last_seen"], Value::Null);
    assert_eq!(monitor["open_faults"], 0);
    assert_eq!(monitor["serial"], "VM12-7-000123");
    assert_eq!(monitor["availability"], Value::Null);
    assert_eq!(monitor["budget_status"], "ok");
    assert_eq!(monitor["agent"], Value::Null);
    assert!(monitor["downtime_budget_s"].is_number());

    let stray = &list[3];
    assert_eq!(stray["in_fleet"], false);
    assert_eq!(stray["site"], "s-017-main");
    assert_eq!(stray["state"], "up");
    w.stop().await;
}

#[tokio::test]
async fn device_detail_with_readings_faults_and_history() {
    let w = World::start().await;
    let (status, d) = w.get("/api/v1/devices/icu7-vent").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["id"], "icu7-vent");
    assert_eq!(d["state"], "down");
    let readings = d["readings"].as_array().unwrap();
    assert_eq!(readings.len(), 2);
    let t = readings
        .iter()
        .find(|r| r["name"] == "turbine_temperature")
        .unwrap();
    assert_eq!(t["value"], 42.5);
    assert_eq!(t["unit"], "°C");
    assert_eq!(
        t["time"].as_str().unwrap().parse::<Timestamp>().unwrap(),
        w.t0 + mins(66)
    );
    let faults = d["open_faults"].as_array().unwrap();
    assert_eq!(faults.len(), 1);
    let f = &faults[0];
    assert_eq!(f["episode"], "agent-icu-a/icu7-vent/ALM1.4/1");
    assert_eq!(f["code"], "ALM1.4");
    assert_eq!(f["kind"], "fault");
    assert_eq!(f["class"], "major");
    assert_eq!(f["device_available"], false);
    assert_eq!(f["evidence"]["state"], 4);
    assert_eq!(f["suggested_action"], "see manual for ALM1.4");
    assert_eq!(
        f["opened_at"]
            .as_str()
            .unwrap()
            .parse::<Timestamp>()
            .unwrap(),
        w.t0 + mins(60)
    );
    assert_eq!(d["identity"]["firmware"], "5.2.0");
    assert_eq!(d["identity"]["profile"], "aeris/av-500 5.x");
    assert_eq!(
        d["diagnostics"],
        json!([
            "readings",
            "transport",
            "episodes",
            "outbox",
            "identity-registers",
            "status-registers"
        ])
    );
    let tickets = d["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 1);
    assert!(tickets[0].as_str().unwrap().starts_with("tend-t:"));
    assert_eq!(d["fleet"]["service_area"], "same_city");
    assert_eq!(d["fleet"]["contact_phone"], "+86 23 6000 1234");
    let types: Vec<&str> = d["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["type"].as_str().unwrap())
        .collect();
    for t in ["identified", "state", "episode", "ticket_opened"] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }

    // The pump's profile lists its own requests.
    let (_, p) = w.get("/api/v1/devices/ward3-pump").await;
    assert_eq!(
        p["diagnostics"],
        json!([
            "readings",
            "transport",
            "episodes",
            "outbox",
            "selftest",
            "counters"
        ])
    );
    // A fleet device never heard of: known, empty.
    let (status, m) = w.get("/api/v1/devices/xr-monitor").await;
    assert_eq!(status, 200);
    assert_eq!(m["state"], "unknown");
    assert_eq!(m["readings"], json!([]));
    assert_eq!(m["open_faults"], json!([]));
    assert_eq!(m["identity"], Value::Null);

    let (status, e) = w.get("/api/v1/devices/no-such-device").await;
    assert_eq!(status, 404);
    assert!(
        e["error"].as_str().unwrap().contains("no-such-device"),
        "{e}"
    );
    let (status, e) = w.get("/api/v1/nothing-here").await;
    assert_eq!(status, 404);
    assert!(e["error"].is_string());
    w.stop().await;
}

#[tokio::test]
async fn availability_report_is_exact() {
    let w = World::start().await;
    let t0 = w.t0;
    let path = "/api/v1/devices/icu7-vent/availability";
    let q = |from: Timestamp, to: Timestamp| vec![("from", local(from)), ("to", local(to))];

    let (status, r) = w.get_q(path, &q(t0, t0 + mins(66))).await;
    assert_eq!(status, 200, "{r}");
    let keys: Vec<&String> = r.as_object().unwrap().keys().collect();
    let mut want = [
        "device",
        "from",
        "to",
        "up_s",
        "down_s",
        "maintenance_s",
        "unknown_s",
        "excluded_s",
        "availability",
        "coverage",
        "target",
        "downtime_allowed_s",
        "downtime_budget_s",
        "budget_status",
    ];
    want.sort();
    let mut keys_sorted: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    keys_sorted.sort();
    assert_eq!(keys_sorted, want);
    assert_eq!(r["device"], "icu7-vent");
    assert_eq!(
        r["from"].as_str().unwrap().parse::<Timestamp>().unwrap(),
        t0
    );
    approx(&r["up_s"], 3600.0);
    approx(&r["down_s"], 360.0);
    approx(&r["maintenance_s"], 0.0);
    approx(&r["unknown_s"], 0.0);
    approx(&r["availability"], 3600.0 / 3960.0);
    approx(&r["coverage"], 1.0);
    approx(&r["target"], 0.995);
    // 0.005 × 3960 s = 19.8 s allowed, 360 s used: nothing left.
    approx(&r["downtime_budget_s"], 0.0);

    // The first hour alone: 0.005 × 3600 = 18 s of budget.
    let (_, r) = w.get_q(path, &q(t0, t0 + mins(60))).await;
    approx(&r["availability"], 1.0);
    approx(&r["downtime_budget_s"], 18.0);

    // Two hours: silent for the last 54 min, but down when last heard: down all along.
    let (_, r) = w.get_q(path, &q(t0, t0 + mins(120))).await;
    approx(&r["unknown_s"], 0.0);
    approx(&r["down_s"], 3600.0);
    approx(&r["coverage"], 1.0);
    approx(&r["availability"], 0.5);
    assert_eq!(r["budget_status"], "breached");

    // Nothing known: availability null.
    let (_, r) = w.get_q(path, &q(t0 - mins(60), t0)).await;
    assert_eq!(r["availability"], Value::Null);
    approx(&r["unknown_s"], 3600.0);

    // Default: this month so far, from the first at 00:00 in Shanghai.
    let before = Timestamp::now();
    let (status, r) = w.get(path).await;
    let after = Timestamp::now();
    assert_eq!(status, 200);
    let from: Timestamp = r["from"].as_str().unwrap().parse().unwrap();
    let to: Timestamp = r["to"].as_str().unwrap().parse().unwrap();
    assert_eq!(from, month_window(before, &shanghai()).0);
    let start = from.to_zoned(shanghai());
    assert_eq!((start.day(), start.hour(), start.minute()), (1, 0, 0));
    // The whole month: its elapsed part measured, the rest in the budget (the same
    // window as the device list's, so both show one budget).
    assert_eq!(to, month_window(before, &shanghai()).1);
    if w.history_in_this_month() {
        let a = r["availability"].as_f64().unwrap();
        let down = after.duration_since(t0 + mins(60)).as_secs_f64();
        assert!(
            a >= 3600.0 / (3600.0 + down) - 1e-9 && a < 3600.0 / 3960.0,
            "{a}"
        );
    }

    // Bad input.
    for (query, needle) in [
        (vec![("from", "yesterday".to_string())], "from="),
        (vec![("to", "2026-13-01T00:00:00Z".to_string())], "to="),
        (q(t0 + mins(10), t0), "before"),
        (q(t0, t0), "before"),
    ] {
        let (status, e) = w.get_q(path, &query).await;
        assert_eq!(status, 400, "{query:?}: {e}");
        assert!(e["error"].as_str().unwrap().contains(needle), "{e}");
    }
    // A '+' left unencoded in the query arrives as a space: the message says so.
    let r = w
        .http
        .get(w.url(&format!("{path}?from=2026-11-01T00:00:00+08:00")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"].as_str().unwrap().contains("%2B"), "{e}");

    let (status, _) = w
        .get_q("/api/v1/devices/nope/availability", &q(t0, t0 + mins(1)))
        .await;
    assert_eq!(status, 404);
    w.stop().await;
}

#[tokio::test]
async fn tickets_with_deadlines_and_forwarding_state() {
    let w = World::start().await;
    let (status, list) = w.get("/api/v1/tickets").await;
    assert_eq!(status, 200);
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 2);
    // Oldest detection first: the pump's (t0+30 min), then the vent's (t0+60 min).
    let pump = &list[0];
    let vent = &list[1];
    assert_eq!(vent["device"], "icu7-vent");
    assert!(vent["key"].as_str().unwrap().starts_with("tend-t:"));
    assert_eq!(vent["ticket_id"], Value::Null);
    assert_eq!(vent["kind"], "fault");
    assert_eq!(vent["class"], "major");
    assert_eq!(vent["code"], "ALM1.4");
    assert_eq!(vent["open"], true);
    let detected = w.t0 + mins(60);
    assert_eq!(
        vent["detected_at"]
            .as_str()
            .unwrap()
            .parse::<Timestamp>()
            .unwrap(),
        detected
    );
    // Major, same city: respond 1 h, on site 3 h, fixed 72 h.
    assert_eq!(vent["sla"]["respond_by"], local(detected + mins(60)));
    assert_eq!(vent["sla"]["onsite_by"], local(detected + mins(180)));
    assert_eq!(vent["sla"]["plan_by"], Value::Null);
    assert_eq!(vent["sla"]["resolve_by"], local(detected + mins(72 * 60)));
    assert_eq!(vent["forwarding"]["state"], "pending");
    assert_eq!(vent["forwarding"]["attempts"], 0);
    assert_eq!(vent["forwarding"]["error"], Value::Null);
    assert_eq!(
        vent["forwarding"]["detail"],
        "no backend configured: kept by the gateway"
    );
    assert_eq!(vent["events"], json!([]));
    // Complex, other city: on site 24 h, plan 48 h.
    let detected = w.t0 + mins(30);
    assert_eq!(pump["device"], "ward3-pump");
    assert_eq!(pump["class"], "complex");
    assert_eq!(pump["sla"]["onsite_by"], local(detected + mins(24 * 60)));
    assert_eq!(pump["sla"]["plan_by"], local(detected + mins(48 * 60)));
    assert_eq!(pump["sla"]["resolve_by"], Value::Null);

    let (_, l) = w
        .get_q("/api/v1/tickets", &[("device", "icu7-vent".into())])
        .await;
    assert_eq!(l.as_array().unwrap().len(), 1);
    assert_eq!(l[0]["device"], "icu7-vent");
    let (_, l) = w.get_q("/api/v1/tickets", &[("open", "true".into())]).await;
    assert_eq!(l.as_array().unwrap().len(), 2);
    let (_, l) = w
        .get_q("/api/v1/tickets", &[("open", "false".into())])
        .await;
    assert_eq!(l, json!([]));
    let (status, e) = w
        .get_q("/api/v1/tickets", &[("open", "maybe".into())])
        .await;
    assert_eq!(status, 400);
    assert!(e["error"].as_str().unwrap().contains("open"), "{e}");
    w.stop().await;
}

#[tokio::test]
async fn diagnostics_round_trip_refusals_timeout_and_audit() {
    let w = World::start().await;

    // A built-in, answered.
    let (status, r) = w.diag("icu7-vent", "readings").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        r,
        json!({"device": "icu7-vent", "request": "readings",
               "answer": {"echo": "readings", "device": "icu7-vent"}})
    );
    let sent = w.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, AGENT);
    assert_eq!(sent[0].1.device, "icu7-vent");
    assert_eq!(sent[0].1.request, "readings");

    // Listed by the ventilator's profile.
    let (status, _) = w.diag("icu7-vent", "identity-registers").await;
    assert_eq!(status, 200);
    assert_eq!(w.sent().len(), 2);

    // The pump's `selftest` is not the ventilator's: refused, nothing sent.
    let (status, e) = w.diag("icu7-vent", "selftest").await;
    assert_eq!(status, 400, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("selftest") && msg.contains("identity-registers"),
        "{msg}"
    );
    assert_eq!(w.sent().len(), 2, "a refused request reached the agent");

    // The agent answers with an error: 502 with its message.
    let (status, e) = w.diag("ward3-pump", "selftest").await;
    assert_eq!(status, 502, "{e}");
    assert!(e["error"].as_str().unwrap().contains("device busy"), "{e}");
    assert_eq!(w.sent().len(), 3);

    // The agent never answers: 504 after diag_timeout.
    let (status, e) = w.diag("icu7-vent", "transport").await;
    assert_eq!(status, 504, "{e}");
    assert!(e["error"].as_str().unwrap().contains(AGENT), "{e}");
    assert_eq!(w.sent().len(), 4);

    // Unknown device, never-heard device, bad bodies: nothing sent.
    let (status, _) = w.diag("no-such-device", "readings").await;
    assert_eq!(status, 404);
    let (status, e) = w.diag("xr-monitor", "readings").await;
    assert_eq!(status, 409, "{e}");
    let (status, e) = w.diag("xr-monitor", "errlog").await;
    assert_eq!(status, 400, "{e}");
    let path = "/api/v1/devices/icu7-vent/diagnostics";
    let (status, e) = w.post_raw(path, b"{".to_vec()).await;
    assert_eq!(status, 400);
    assert!(e["error"].as_str().unwrap().contains("JSON"), "{e}");
    let (status, _) = w.post_raw(path, br#"{"request": 5}"#.to_vec()).await;
    assert_eq!(status, 400);
    let (status, _) = w.post_raw(path, b"null".to_vec()).await;
    assert_eq!(status, 400);
    let huge = format!(r#"{{"request": "{}"}}"#, "x".repeat(100_000));
    let (status, _) = w.post_raw(path, huge.into_bytes()).await;
    assert_eq!(status, 413);
    assert_eq!(w.sent().len(), 4);

    // One audit line per call, with device, request, outcome and caller; no token.
    let audit = w.audit();
    let statuses: Vec<u16> = audit.iter().map(|a| a.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 400, 502, 504, 404, 409, 400, 400, 400, 400, 413]
    );
    assert!(audit.iter().all(|a| a.action == "diagnostic"));
    assert!(audit.iter().all(|a| a
        .remote
        .as_deref()
        .is_some_and(|r| r.starts_with("127.0.0.1:"))));
    assert_eq!(audit[0].device.as_deref(), Some("icu7-vent"));
    assert_eq!(audit[0].request.as_deref(), Some("readings"));
    assert_eq!(audit[0].outcome, "ok");
    assert!(audit[2].outcome.starts_with("refused"), "{:?}", audit[2]);
    assert!(audit[3].outcome.contains("device busy"));
    assert_eq!(audit[4].outcome, "timeout");
    let text = std::fs::read_to_string(&w.audit_path).unwrap();
    assert!(!text.contains(TOKEN));

    // Counted by outcome.
    let metrics = w
        .http
        .get(w.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        r#"tend_gateway_diagnostics_total{outcome="ok"} 2"#,
        r#"tend_gateway_diagnostics_total{outcome="error"} 1"#,
        r#"tend_gateway_diagnostics_total{outcome="timeout"} 1"#,
        r#"tend_gateway_diagnostics_total{outcome="refused"} 8"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    w.stop().await;
}

#[tokio::test]
async fn metrics_openapi_and_page_without_surprises() {
    let w = World::start().await;
    let r = w.http.get(w.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    let text = r.text().await.unwrap();
    assert!(text.contains("tend_gateway_"), "{text}");
    // Fleet devices by state: the vent down, the pump up, the monitor never heard of.
    for line in [
        r#"tend_gateway_devices{state="down"} 1"#,
        r#"tend_gateway_devices{state="up"} 1"#,
        r#"tend_gateway_devices{state="unknown"} 1"#,
        r#"tend_gateway_devices{state="maintenance"} 0"#,
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    if w.history_in_this_month() {
        // The pump and the monitor have all their budget; the vent has spent 2 h of it.
        assert!(
            text.contains(r#"tend_gateway_devices_budget{status="ok"} 2"#),
            "{text}"
        );
    }

    let (status, doc) = w.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.0"));
    for p in [
        "/api/v1/devices",
        "/api/v1/devices/{id}",
        "/api/v1/devices/{id}/availability",
        "/api/v1/devices/{id}/diagnostics",
        "/api/v1/tickets",
        "/api/v1/agents",
        "/api/v1/openapi.json",
        "/api/v1/sla",
        "/api/v1/customers/{id}/availability",
        "/api/v1/devices/{id}/availability/exclusions",
        "/api/v1/devices/{id}/availability/exclusions/{n}",
        "/api/v1/devices/{id}/maintenance",
        "/api/v1/devices/{id}/history",
        "/api/v1/reports/monthly",
        "/metrics",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }

    let r = w.http.get(w.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("sessionStorage") && html.contains("/api/v1/devices"));
    assert!(!html.contains(TOKEN));
    w.stop().await;
}

#[tokio::test]
async fn failed_ticket_is_shown_and_retried() {
    let w = World::start().await;
    let (_, list) = w
        .get_q("/api/v1/tickets", &[("device", "icu7-vent".into())])
        .await;
    let key = list[0]["key"].as_str().unwrap().to_string();
    assert!(key.contains('/'), "{key}");
    let retry = |k: String| {
        let w = &w;
        async move {
            let r = w
                .http
                .post(format!(
                    "{}/api/v1/tickets/{}/retry",
                    w.base,
                    k.replace('/', "%2F")
                ))
                .bearer_auth(TOKEN)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    // Pending: nothing to retry.
    let (status, e) = retry(key.clone()).await;
    assert_eq!(status, 409, "{e}");
    let (status, _) = retry("tend-t:none".into()).await;
    assert_eq!(status, 404);

    // The backend refuses it for good.
    let job =
        w.gw.store
            .jobs()
            .unwrap()
            .into_iter()
            .find(|j| j.ticket_key == key && j.event.is_none())
            .unwrap();
    w.gw.store
        .finish_job(
            &job,
            &JobOutcome::Failed {
                error: "400: {\"error\":\"unknown serial\"}".into(),
            },
            w.now,
        )
        .unwrap();
    let (_, list) = w
        .get_q("/api/v1/tickets", &[("device", "icu7-vent".into())])
        .await;
    let f = &list[0]["forwarding"];
    assert_eq!(f["state"], "failed");
    assert_eq!(f["attempts"], 1);
    assert!(f["error"].as_str().unwrap().contains("unknown serial"));
    assert!(f.get("detail").is_none());

    let (status, r) = retry(key.clone()).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["ticket"]["forwarding"]["state"], "pending");
    // The key sent with its '/' as is works too (nothing failed now: 409, not 404).
    let r = w
        .http
        .post(format!("{}/api/v1/tickets/{key}/retry", w.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);

    let audit = w.audit();
    let retries: Vec<&AuditEntry> = audit
        .iter()
        .filter(|a| a.action == "retry_ticket")
        .collect();
    assert_eq!(retries.len(), 4);
    assert_eq!(retries[2].status, 200);
    assert_eq!(retries[2].request.as_deref(), Some(key.as_str()));
    assert_eq!(retries[2].device.as_deref(), Some("icu7-vent"));
    w.stop().await;
}

#[tokio::test]
async fn terminal_client_prints_tables_and_explains_errors() {
    let w = World::start().await;
    let target = ApiTarget {
        config: None,
        api: Some(w.base.clone()),
        token_file: Some(w.token_file.clone()),
    };
    let out = cli::output(&target, &HotlineCommand::Devices, false)
        .await
        .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("DEVICE"), "{out}");
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[1].starts_with("icu7-vent") && lines[1].contains("down"),
        "{out}"
    );

    let out = cli::output(
        &target,
        &HotlineCommand::Tickets {
            device: None,
            open: true,
        },
        false,
    )
    .await
    .unwrap();
    assert!(out.contains("ALM1.4") || out.contains("icu7-vent"), "{out}");
    assert!(out.contains("pending"), "{out}");
    assert!(
        out.contains(&local(w.t0 + mins(120)).replacen('T', " ", 1)),
        "respond_by missing: {out}"
    );

    let out = cli::output(
        &target,
        &HotlineCommand::Diag {
            id: "icu7-vent".into(),
            request: "readings".into(),
        },
        true,
    )
    .await
    .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["answer"]["echo"], "readings");

    let out = cli::output(
        &target,
        &HotlineCommand::Device {
            id: "icu7-vent".into(),
        },
        false,
    )
    .await
    .unwrap();
    assert!(
        out.contains("turbine_temperature") && out.contains("identity-registers"),
        "{out}"
    );

    let e = cli::output(
        &target,
        &HotlineCommand::Availability {
            id: "icu7-vent".into(),
            from: Some("garbage".into()),
            to: None,
        },
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, 1);
    assert!(e.message.starts_with("400: "), "{e}");

    let wrong = w.token_file.with_file_name("wrong.token");
    write_secret(&wrong, "not-the-token").unwrap();
    let bad = ApiTarget {
        token_file: Some(wrong.clone()),
        ..target.clone()
    };
    let e = cli::output(&bad, &HotlineCommand::Devices, false)
        .await
        .unwrap_err();
    assert_eq!(e.code, 1);
    assert_eq!(
        e.message,
        format!("401: wrong token from {}", wrong.display())
    );
    w.stop().await;
}

impl World {
    async fn post_json(&self, path: &str, body: Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(&body).unwrap())
            .await
    }

    async fn delete(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .delete(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get_text(&self, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
        let r = self
            .http
            .get(self.url(path))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, r.text().await.unwrap(), headers)
    }
}

#[tokio::test]
async fn exclusions_are_checked_audited_and_not_downtime() {
    let w = World::start().await;
    let t0 = w.t0;
    let path = "/api/v1/devices/icu7-vent/availability/exclusions";
    async fn report(w: &World) -> Value {
        let window = [("from", local(w.t0)), ("to", local(w.t0 + mins(120)))];
        w.get_q("/api/v1/devices/icu7-vent/availability", &window)
            .await
            .1
    }
    let r = report(&w).await;
    approx(&r["down_s"], 3600.0);
    approx(&r["excluded_s"], 0.0);

    // A power cut in the ward the customer caused: 30 of the 60 minutes down.
    let (st, ex) = w
        .post_json(
            path,
            json!({"from": local(t0 + mins(60)), "to": local(t0 + mins(90)),
                   "reason": "customer_caused", "note": "power cut in ICU 7"}),
        )
        .await;
    assert_eq!(st, 201, "{ex}");
    assert_eq!(ex["reason"], "customer_caused");
    let id = ex["id"].as_u64().unwrap();
    let r = report(&w).await;
    approx(&r["down_s"], 1800.0);
    approx(&r["excluded_s"], 1800.0);
    approx(&r["up_s"], 3600.0);
    approx(&r["coverage"], 1.0);
    let (_, list) = w.get(path).await;
    assert_eq!(list.as_array().unwrap().len(), 1);

    // Bad requests, each named.
    let cases = [
        (
            json!({"from": local(t0 + mins(80)), "to": local(t0 + mins(100)), "reason": "planned"}),
            409,
            "overlaps exclusion",
        ),
        (
            json!({"from": local(t0 + mins(100)), "to": local(t0 + mins(110)), "reason": "because"}),
            400,
            "reason \"because\"",
        ),
        (
            json!({"from": local(t0 + mins(110)), "to": local(t0 + mins(100)), "reason": "planned"}),
            400,
            "must be before",
        ),
        (
            json!({"from": local(t0), "to": local(Timestamp::now() + mins(60)), "reason": "planned"}),
            400,
            "future",
        ),
        (
            json!({"from": "2024-01-01T00:00:00+08:00", "to": "2024-01-02T00:00:00+08:00", "reason": "planned"}),
            400,
            "life began",
        ),
        (
            json!({"from": local(t0), "reason": "planned"}),
            400,
            "to is missing",
        ),
        (
            json!({"from": local(t0), "to": local(t0 + mins(1)), "reason": "planned", "by": "me"}),
            400,
            "unknown field",
        ),
        (
            json!({"from": 5, "to": local(t0 + mins(1)), "reason": "planned"}),
            400,
            "expected a string",
        ),
        (
            json!({"from": "yesterday", "to": local(t0 + mins(1)), "reason": "planned"}),
            400,
            "RFC 3339",
        ),
    ];
    for (body, status, words) in cases {
        let (st, e) = w.post_json(path, body.clone()).await;
        assert_eq!(st, status, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(words), "{body}: {e}");
    }
    let (st, e) = w.post_raw(path, b"{not json".to_vec()).await;
    assert_eq!(st, 400, "{e}");
    let (st, _) = w
        .post_json(
            "/api/v1/devices/lab-spare/availability/exclusions",
            json!({"from": local(t0), "to": local(t0 + mins(1)), "reason": "planned"}),
        )
        .await;
    assert_eq!(st, 404, "not in the fleet");
    // Nothing of that changed the figures.
    approx(&report(&w).await["excluded_s"], 1800.0);

    // Taken back: down again.
    let (st, e) = w.delete(&format!("{path}/{id}")).await;
    assert_eq!(st, 200, "{e}");
    approx(&report(&w).await["down_s"], 3600.0);
    let (st, _) = w.delete(&format!("{path}/{id}")).await;
    assert_eq!(st, 404);
    let (st, _) = w.delete(&format!("{path}/seven")).await;
    assert_eq!(st, 400);

    // Audited: every attempt with its outcome; the life record has both lines.
    let audit = w.audit();
    let ex_lines: Vec<&AuditEntry> = audit
        .iter()
        .filter(|a| a.action == "exclude_availability")
        .collect();
    assert_eq!(ex_lines.len(), 1 + 9 + 1 + 1, "{ex_lines:#?}");
    assert_eq!(ex_lines[0].status, 201);
    assert!(ex_lines[0]
        .request
        .as_deref()
        .unwrap()
        .contains("power cut"));
    assert!(ex_lines.iter().any(|a| a.status == 409));
    let rm: Vec<u16> = audit
        .iter()
        .filter(|a| a.action == "remove_exclusion")
        .map(|a| a.status)
        .collect();
    assert_eq!(rm, [200, 404, 400]);
    let (_, h) = w.get("/api/v1/devices/icu7-vent/history").await;
    let types: Vec<&str> = h["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert!(
        types.contains(&"excluded") && types.contains(&"exclusion_removed"),
        "{types:?}"
    );
    w.stop().await;
}

#[tokio::test]
async fn maintenance_history_pages_customer_and_monthly_report() {
    let w = World::start().await;
    // Maintenance: the seed's 182 days from acceptance (2025-03-01), none done, no
    // contract: shown, not ticketed.
    let (st, m) = w.get("/api/v1/devices/icu7-vent/maintenance").await;
    assert_eq!(st, 200, "{m}");
    assert_eq!(m["interval_days"], 182);
    assert_eq!(m["counted_from"], "acceptance");
    assert_eq!(m["next_due"], "2025-08-30");
    assert_eq!(m["ticketed"], false);
    let done_at = Timestamp::now() - mins(60);
    let (st, d) = w
        .post_json(
            "/api/v1/devices/icu7-vent/maintenance",
            json!({"at": local(done_at), "note": "6-month PM, valve replaced"}),
        )
        .await;
    assert_eq!(st, 201, "{d}");
    let (_, m) = w.get("/api/v1/devices/icu7-vent/maintenance").await;
    let day = done_at.to_zoned(shanghai()).date();
    assert_eq!(m["last_done"], day.to_string());
    assert_eq!(
        m["next_due"],
        day.checked_add(jiff::ToSpan::days(182))
            .unwrap()
            .to_string()
    );
    assert_eq!(m["overdue"], false);
    for (body, words) in [
        (json!({"at": local(Timestamp::now() + mins(60))}), "future"),
        (json!({"at": "2024-01-01T00:00:00+08:00"}), "accepted"),
        (json!({"when": "now"}), "unknown field"),
    ] {
        let (st, e) = w
            .post_json("/api/v1/devices/icu7-vent/maintenance", body.clone())
            .await;
        assert_eq!(st, 400, "{body}: {e}");
        assert!(e["error"].as_str().unwrap().contains(words), "{body}: {e}");
    }
    assert!(w
        .audit()
        .iter()
        .any(|a| a.action == "record_maintenance" && a.status == 201));
    // Maintenance done before tend kept records, from the fleet file: counted from it.
    let (_, m) = w.get("/api/v1/devices/xr-monitor/maintenance").await;
    assert_eq!(m["last_done"], "2026-10-01");
    assert_eq!(m["counted_from"], "last_maintenance");
    assert_eq!(m["next_due"], "2027-04-01");

    // The life record, paged from the newest back, without gaps or repeats.
    let (_, all) = w.get("/api/v1/devices/icu7-vent/history?limit=1000").await;
    let all: Vec<Value> = all["entries"].as_array().unwrap().clone();
    assert!(all.len() >= 5, "{all:?}");
    let mut pages = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let q = match &before {
            Some(b) => format!("/api/v1/devices/icu7-vent/history?limit=2&before={b}"),
            None => "/api/v1/devices/icu7-vent/history?limit=2".to_string(),
        };
        let (st, p) = w.get(&q).await;
        assert_eq!(st, 200, "{p}");
        let entries = p["entries"].as_array().unwrap().clone();
        assert!(entries.len() <= 2);
        pages.insert(0, entries);
        match p["next_before"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => break,
        }
    }
    let joined: Vec<Value> = pages.into_iter().flatten().collect();
    assert_eq!(joined, all);
    for bad in ["limit=0", "limit=100000", "limit=x", "before=nonsense"] {
        let (st, _) = w
            .get(&format!("/api/v1/devices/icu7-vent/history?{bad}"))
            .await;
        assert_eq!(st, 400, "{bad}");
    }
    let (st, _) = w.get("/api/v1/devices/nope/history").await;
    assert_eq!(st, 404);

    // A customer's availability: its three devices summed.
    let q = [("from", local(w.t0)), ("to", local(w.t0 + mins(120)))];
    let (st, c) = w.get_q("/api/v1/customers/c-017/availability", &q).await;
    assert_eq!(st, 200, "{c}");
    assert_eq!(c["devices"], 3);
    assert_eq!(c["by_device"].as_array().unwrap().len(), 3);
    // Vent up 60 min then down (and silent: still down); pump up, last heard at 30 min;
    // monitor never heard.
    approx(&c["up_s"], 3600.0 + 1800.0);
    approx(&c["down_s"], 3600.0);
    approx(&c["unknown_s"], 5400.0 + 7200.0);
    approx(&c["availability"], 5400.0 / 9000.0);
    approx(&c["coverage"], 9000.0 / 21_600.0);
    let (st, _) = w.get("/api/v1/customers/nobody/availability").await;
    assert_eq!(st, 404);
    for (q, words) in [
        ("period=contract", "no contract is in force"),
        ("period=year", "month or contract"),
    ] {
        let (st, e) = w
            .get(&format!("/api/v1/customers/c-017/availability?{q}"))
            .await;
        assert_eq!(st, 400, "{q}: {e}");
        assert!(e["error"].as_str().unwrap().contains(words), "{q}: {e}");
    }

    // The monthly report of this month, in three formats.
    let month = Timestamp::now()
        .to_zoned(shanghai())
        .strftime("%Y-%m")
        .to_string();
    let (st, r) = w
        .get(&format!(
            "/api/v1/reports/monthly?customer=c-017&month={month}"
        ))
        .await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["month"], month);
    let devs = r["devices"].as_array().unwrap();
    assert_eq!(devs.len(), 3);
    let vent = devs.iter().find(|d| d["id"] == "icu7-vent").unwrap();
    assert!(vent["timeline"].as_array().unwrap().len() >= 2, "{vent:#}");
    if w.history_in_this_month() {
        assert_eq!(vent["tickets"].as_array().unwrap().len(), 1, "{vent:#}");
        assert_eq!(vent["maintenance"]["done"].as_array().unwrap().len(), 1);
    }
    let (st, csv, h) = w
        .get_text(&format!(
            "/api/v1/reports/monthly?customer=c-017&month={month}&format=csv"
        ))
        .await;
    assert_eq!(st, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/csv"));
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("month,customer,device,"));
    let (st, html, h) = w
        .get_text(&format!(
            "/api/v1/reports/monthly?customer=c-017&month={month}&format=html"
        ))
        .await;
    assert_eq!(st, 200);
    assert!(h["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(html.contains("Monthly service report") && html.contains("<svg"));
    assert!(html.contains("@page { size: A4;"));
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; style-src 'sha256-"),
        "{csp}"
    );
    for (q, status) in [
        ("customer=c-017&month=2026-13", 400),
        ("customer=c-017&month=November", 400),
        ("month=2026-11", 400),
        ("customer=nobody&month=2026-11", 404),
        ("customer=c-017&month=2026-11&format=pdf", 400),
    ] {
        let (st, e) = w.get(&format!("/api/v1/reports/monthly?{q}")).await;
        assert_eq!(st, status, "{q}: {e}");
    }
    w.stop().await;
}

//! A stand-in for the service backend: a real HTTP server on 127.0.0.1 that implements the
//! ticket API (`service-backend-api.md`) to the letter, for end-to-end tests, reliability
//! tests and benchmarks of the forwarder.
//!
//! It checks the bearer token (401 when missing or wrong), the Idempotency-Key (1–128
//! printable ASCII characters), the body's `schema`, `kind` and event `type`; it answers
//! 201 the first time a key is used, 200 when the same key comes again with the same body
//! (compared as parsed JSON) and 409 when it comes with another body; 404 for an event on
//! an unknown ticket. Tickets get sequential ids (`T-2026-000001`, ...).
//!
//! Tests can script what the next requests get ([`Backend::script`]: a status, a 429 with
//! `Retry-After`, a request that hangs past the client's timeout) and add rules that pick
//! requests by content ([`Backend::rule`], [`Backend::refuse_code`]). Every request is
//! recorded ([`Backend::requests`]) with when it came, its key, whether its credentials
//! were right, its body and the status answered. The token itself is never kept: only a
//! SHA-256 of the expected `Authorization` header.

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// SHA-256 of `bytes` in lowercase hex: the expected `Authorization` header is kept only
/// as this hash.
fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The body schema the backend accepts.
pub const SCHEMA: &str = "service-ticket/1";
/// Ticket kinds the backend accepts.
pub const KINDS: [&str; 4] = ["fault", "maintenance_due", "consumable", "monitoring_lost"];
/// Event types the backend accepts.
pub const EVENT_TYPES: [&str; 6] = [
    "fault_cleared",
    "fault_recurred",
    "escalated",
    "sla_at_risk",
    "sla_missed",
    "note",
];
/// Ticket statuses the backend reports.
pub const STATUSES: [&str; 7] = [
    "open",
    "acknowledged",
    "engineer_dispatched",
    "on_site",
    "plan_agreed",
    "resolved",
    "closed",
];
/// Largest body accepted; larger ones get 413.
pub const MAX_BODY: usize = 1 << 20;
/// Ticket ids are this prefix and a six-digit sequence number.
pub const ID_PREFIX: &str = "T-2026-";

/// What a scripted or rule-picked request gets instead of normal handling.
#[derive(Debug, Clone, PartialEq)]
pub enum Scripted {
    /// This status with `{"error": "scripted <status>"}`.
    Status(u16),
    /// This status with `{"error": <error>}` (e.g. a 400 with the backend's reason).
    Error { status: u16, error: String },
    /// 429 with `Retry-After: <retry_after_s>`.
    TooMany { retry_after_s: u64 },
    /// 429 with `Retry-After: <HTTP date>` (RFC 9110 IMF-fixdate).
    TooManyUntil(Timestamp),
    /// Sleeps this long (meant to be longer than the client's timeout), then answers 503.
    Hang(Duration),
}

impl Scripted {
    /// A 400 with the backend's error text.
    pub fn bad_request(error: &str) -> Scripted {
        Scripted::Error {
            status: 400,
            error: error.to_string(),
        }
    }
}

/// One request as the stand-in received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// When it arrived (monotonic).
    pub at: Instant,
    /// When it arrived (wall clock).
    pub time: Timestamp,
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub idempotency_key: Option<String>,
    /// Whether `Authorization: Bearer <the right token>` was present.
    pub authorized: bool,
    pub content_type: Option<String>,
    /// The exact body bytes.
    pub raw_body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON.
    pub body: Option<Value>,
    /// The status answered; `None` while the request is still being answered (or when the
    /// client went away before a hanging answer).
    pub status: Option<u16>,
}

impl Received {
    /// `POST /api/v1/tickets`.
    pub fn is_create(&self) -> bool {
        self.method == "POST" && self.path == "/api/v1/tickets"
    }

    /// The ticket id of `POST /api/v1/tickets/{id}/events`.
    pub fn event_for(&self) -> Option<&str> {
        if self.method != "POST" {
            return None;
        }
        match route(&self.path) {
            Route::Events(id) => Some(id),
            _ => None,
        }
    }

    /// `fault.code` of a ticket body, or `detail.code` of an event body.
    pub fn code(&self) -> Option<&str> {
        let b = self.body.as_ref()?;
        b.pointer("/fault/code")
            .or_else(|| b.pointer("/detail/code"))
            .and_then(Value::as_str)
    }
}

/// An event stored on a ticket.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    pub key: String,
    /// Its `type`.
    pub kind: String,
    pub body: Value,
    pub received: Timestamp,
}

/// A ticket as the stand-in holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTicket {
    pub id: String,
    /// The Idempotency-Key that created it.
    pub key: String,
    pub body: Value,
    /// `open` until a test changes it with [`Backend::set_status`].
    pub status: String,
    pub created: Timestamp,
    pub updated_at: Timestamp,
    /// Events in the order they were accepted.
    pub events: Vec<StoredEvent>,
    /// Every status with the time it was set, oldest first (v1.1's `history`).
    pub history: Vec<(String, Timestamp)>,
}

type Rule = Arc<dyn Fn(&Received) -> Option<Scripted> + Send + Sync>;

#[derive(Default)]
struct Data {
    requests: Vec<Received>,
    script: VecDeque<Scripted>,
    rules: Vec<Rule>,
    tickets: Vec<StoredTicket>,
    /// ticket key → index in `tickets`.
    by_key: HashMap<String, usize>,
    /// event key → (ticket index, event index).
    event_keys: HashMap<String, (usize, usize)>,
    /// Answer ticket reads as a v1 backend: no `history`.
    v1: bool,
}

struct Shared {
    /// SHA-256 of the expected `Authorization` header value.
    auth_hash: String,
    data: Mutex<Data>,
    /// Woken after every answered request.
    changed: Notify,
    /// Cancelled when the server stops (ends hanging answers early).
    stopping: Mutex<CancellationToken>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Server {
    stop: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

/// A running stand-in backend. Dropping it stops the server.
pub struct Backend {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Mutex<Option<Server>>,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend").field("addr", &self.addr).finish()
    }
}

/// Starts a stand-in backend on `127.0.0.1` (a free port) that accepts `token`.
pub async fn spawn(token: &str) -> std::io::Result<Backend> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        auth_hash: sha256_hex(format!("Bearer {token}").as_bytes()),
        data: Mutex::new(Data::default()),
        changed: Notify::new(),
        stopping: Mutex::new(CancellationToken::new()),
    });
    let server = serve(listener, shared.clone());
    Ok(Backend {
        addr,
        shared,
        server: Mutex::new(Some(server)),
    })
}

fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) -> Server {
    let stop = CancellationToken::new();
    *shared.stopping.lock().unwrap_or_else(|p| p.into_inner()) = stop.clone();
    let app = Router::new()
        .fallback(handle)
        .layer(DefaultBodyLimit::disable())
        .with_state(shared);
    let signal = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await
    });
    Server { stop, task }
}

impl Backend {
    /// `http://127.0.0.1:PORT`, the base URL the forwarder is given.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Queues what the next requests get, in order, before any rule or normal handling.
    pub fn script(&self, responses: impl IntoIterator<Item = Scripted>) {
        self.shared.lock().script.extend(responses);
    }

    /// Adds a rule consulted for every request not taken by the script: the first rule
    /// that returns `Some` decides the answer.
    pub fn rule(&self, f: impl Fn(&Received) -> Option<Scripted> + Send + Sync + 'static) {
        self.shared.lock().rules.push(Arc::new(f));
    }

    /// Every ticket (and event) whose `fault.code` (`detail.code`) is `code` gets a 400
    /// with `error`.
    pub fn refuse_code(&self, code: &str, error: &str) {
        let code = code.to_string();
        let answer = Scripted::bad_request(error);
        self.rule(move |r| (r.code() == Some(code.as_str())).then(|| answer.clone()));
    }

    pub fn clear_rules(&self) {
        self.shared.lock().rules.clear();
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.lock().requests.clone()
    }

    /// Every ticket, in creation order.
    pub fn tickets(&self) -> Vec<StoredTicket> {
        self.shared.lock().tickets.clone()
    }

    pub fn ticket(&self, id: &str) -> Option<StoredTicket> {
        self.shared
            .lock()
            .tickets
            .iter()
            .find(|t| t.id == id)
            .cloned()
    }

    /// The ticket created with Idempotency-Key `key`.
    pub fn ticket_by_key(&self, key: &str) -> Option<StoredTicket> {
        let d = self.shared.lock();
        d.by_key.get(key).map(|&i| d.tickets[i].clone())
    }

    /// Changes a ticket's status as an engineer would (`acknowledged`, `closed`, ...).
    /// False when there is no such ticket.
    pub fn set_status(&self, id: &str, status: &str) -> bool {
        self.set_status_at(id, status, Timestamp::now())
    }

    /// Changes a ticket's status as of `at` (its history keeps the time).
    pub fn set_status_at(&self, id: &str, status: &str, at: Timestamp) -> bool {
        let mut d = self.shared.lock();
        match d.tickets.iter_mut().find(|t| t.id == id) {
            Some(t) => {
                t.status = status.to_string();
                t.updated_at = at;
                t.history.push((status.to_string(), at));
                true
            }
            None => false,
        }
    }

    /// Answers ticket reads as a v1 backend (status only, no history) when `on`.
    pub fn set_v1(&self, on: bool) {
        self.shared.lock().v1 = on;
    }

    /// Waits until `pred` holds (checked after every request and every 50 ms); false when
    /// `timeout` passed first.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Backend) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            if pred(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
                changed,
            )
            .await;
        }
    }

    /// Stops serving (new connections are refused; answers in progress end, hanging ones
    /// at once with 503). What the backend holds is kept for [`Backend::restart`].
    pub async fn stop(&self) {
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(s) = server {
            s.stop.cancel();
            let _ = s.task.await;
        }
    }

    /// Serves again on the same address with everything it held (a backend that went
    /// down and came back).
    pub async fn restart(&self) -> std::io::Result<()> {
        self.stop().await;
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let server = serve(listener, self.shared.clone());
        *self.server.lock().unwrap_or_else(|p| p.into_inner()) = Some(server);
        Ok(())
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(s) = self.server.lock().unwrap_or_else(|p| p.into_inner()).take() {
            s.stop.cancel();
        }
    }
}

enum Route<'a> {
    Tickets,
    Ticket(&'a str),
    Events(&'a str),
    Other,
}

fn route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/api/v1/tickets") else {
        return Route::Other;
    };
    if rest.is_empty() {
        return Route::Tickets;
    }
    let Some(rest) = rest.strip_prefix('/') else {
        return Route::Other;
    };
    match rest.split_once('/') {
        None if !rest.is_empty() => Route::Ticket(rest),
        Some((id, "events")) if !id.is_empty() => Route::Events(id),
        _ => Route::Other,
    }
}

/// An answer before it becomes a response.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    body: Option<Value>,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: Some(body),
        }
    }

    fn error(status: u16, error: impl Into<String>) -> Answer {
        Answer::json(status, json!({ "error": error.into() }))
    }

    fn empty(status: u16) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: None,
        }
    }

    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut b = Response::builder().status(status);
        if let Some(ra) = self
            .retry_after
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            b = b.header(header::RETRY_AFTER, ra);
        }
        let resp = match self.body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        resp.unwrap_or_else(|_| Response::new(Body::empty()))
    }
}

fn scripted_answer(s: &Scripted) -> Answer {
    match s {
        Scripted::Status(status) => Answer::error(*status, format!("scripted {status}")),
        Scripted::Error { status, error } => Answer::error(*status, error.clone()),
        Scripted::TooMany { retry_after_s } => Answer {
            retry_after: Some(retry_after_s.to_string()),
            ..Answer::error(429, "too many requests")
        },
        Scripted::TooManyUntil(t) => Answer {
            retry_after: jiff::fmt::rfc2822::DateTimePrinter::new()
                .timestamp_to_rfc9110_string(t)
                .ok(),
            ..Answer::error(429, "too many requests")
        },
        Scripted::Hang(_) => Answer::error(503, "took too long"),
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let authorized = headers
        .get(header::AUTHORIZATION)
        .is_some_and(|v| sha256_hex(v.as_bytes()) == shared.auth_hash);
    let rec = Received {
        at: Instant::now(),
        time: Timestamp::now(),
        method: method.as_str().to_string(),
        path: uri.path().to_string(),
        idempotency_key: text(header::HeaderName::from_static("idempotency-key")),
        authorized,
        content_type: text(header::CONTENT_TYPE),
        body: serde_json::from_slice(&body).ok(),
        raw_body: body.to_vec(),
        status: None,
    };

    let (index, hang, answer) = {
        let mut d = shared.lock();
        let index = d.requests.len();
        let picked = match d.script.pop_front() {
            Some(s) => Some(s),
            None => d.rules.iter().find_map(|r| r(&rec)),
        };
        let (hang, answer) = match picked {
            Some(Scripted::Hang(t)) => (Some(t), None),
            Some(s) => (None, Some(scripted_answer(&s))),
            None => (None, Some(d.answer(&rec))),
        };
        let mut rec = rec;
        rec.status = answer.as_ref().map(|a| a.status);
        d.requests.push(rec);
        (index, hang, answer)
    };
    let answer = match (hang, answer) {
        (Some(t), _) => {
            let stopping = shared
                .stopping
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            tokio::select! {
                _ = tokio::time::sleep(t) => {}
                _ = stopping.cancelled() => {}
            }
            let a = scripted_answer(&Scripted::Hang(t));
            shared.lock().requests[index].status = Some(a.status);
            a
        }
        (None, Some(a)) => a,
        (None, None) => Answer::empty(500),
    };
    shared.changed.notify_waiters();
    answer.into_response()
}

/// 1–128 printable ASCII characters.
fn valid_key(k: &str) -> bool {
    (1..=128).contains(&k.len()) && k.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

impl Data {
    /// Normal handling, per the API.
    fn answer(&mut self, r: &Received) -> Answer {
        if !r.authorized {
            return Answer::error(401, "missing or wrong bearer token");
        }
        if r.raw_body.len() > MAX_BODY {
            return Answer::error(413, "body too large");
        }
        match (r.method.as_str(), route(&r.path)) {
            ("POST", Route::Tickets) => self.create(r),
            ("POST", Route::Events(id)) => self.event(id, r),
            ("GET", Route::Ticket(id)) => match self.tickets.iter().find(|t| t.id == id) {
                Some(t) => {
                    let mut v = json!({
                        "ticket_id": t.id,
                        "status": t.status,
                        "updated_at": t.updated_at.to_string(),
                    });
                    if !self.v1 {
                        v["history"] = t
                            .history
                            .iter()
                            .map(|(s, at)| json!({"status": s, "at": at.to_string()}))
                            .collect();
                    }
                    Answer::json(200, v)
                }
                None => Answer::error(404, format!("no ticket {id}")),
            },
            (_, Route::Other) => Answer::error(404, "no such resource"),
            _ => Answer::empty(405),
        }
    }

    /// The checks common to both POSTs: Content-Type, key, a JSON object.
    fn checked(r: &Received) -> Result<(&str, &Value), Answer> {
        let json_type = r
            .content_type
            .as_deref()
            .and_then(|c| c.split(';').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("application/json"));
        if !json_type {
            return Err(Answer::error(400, "Content-Type must be application/json"));
        }
        let key = match r.idempotency_key.as_deref() {
            Some(k) if valid_key(k) => k,
            Some(_) => {
                return Err(Answer::error(
                    400,
                    "Idempotency-Key must be 1-128 printable ASCII characters",
                ))
            }
            None => return Err(Answer::error(400, "Idempotency-Key is required")),
        };
        match &r.body {
            Some(b @ Value::Object(_)) => Ok((key, b)),
            _ => Err(Answer::error(400, "the body must be a JSON object")),
        }
    }

    fn create(&mut self, r: &Received) -> Answer {
        let (key, body) = match Self::checked(r) {
            Ok(x) => x,
            Err(a) => return a,
        };
        if body.get("schema").and_then(Value::as_str) != Some(SCHEMA) {
            return Answer::error(400, format!("schema must be {SCHEMA:?}"));
        }
        match body.get("kind").and_then(Value::as_str) {
            Some(k) if KINDS.contains(&k) => {}
            _ => return Answer::error(400, format!("kind must be one of {KINDS:?}")),
        }
        if let Some(&i) = self.by_key.get(key) {
            let t = &self.tickets[i];
            return if &t.body == body {
                Answer::json(200, json!({"ticket_id": t.id, "created": false}))
            } else {
                Answer::error(
                    409,
                    format!("Idempotency-Key {key} was used before with a different body"),
                )
            };
        }
        let id = format!("{ID_PREFIX}{:06}", self.tickets.len() + 1);
        self.by_key.insert(key.to_string(), self.tickets.len());
        self.tickets.push(StoredTicket {
            id: id.clone(),
            key: key.to_string(),
            body: body.clone(),
            status: "open".into(),
            created: r.time,
            updated_at: r.time,
            events: Vec::new(),
            history: vec![("open".into(), r.time)],
        });
        Answer::json(201, json!({"ticket_id": id, "created": true}))
    }

    fn event(&mut self, id: &str, r: &Received) -> Answer {
        let Some(ti) = self.tickets.iter().position(|t| t.id == id) else {
            return Answer::error(404, format!("no ticket {id}"));
        };
        let (key, body) = match Self::checked(r) {
            Ok(x) => x,
            Err(a) => return a,
        };
        let kind = match body.get("type").and_then(Value::as_str) {
            Some(k) if EVENT_TYPES.contains(&k) => k.to_string(),
            _ => return Answer::error(400, format!("type must be one of {EVENT_TYPES:?}")),
        };
        if let Some(&(t, e)) = self.event_keys.get(key) {
            let same = t == ti && &self.tickets[t].events[e].body == body;
            return if same {
                Answer::json(200, json!({"ticket_id": id, "created": false}))
            } else {
                Answer::error(
                    409,
                    format!("Idempotency-Key {key} was used before with a different body"),
                )
            };
        }
        let t = &mut self.tickets[ti];
        self.event_keys
            .insert(key.to_string(), (ti, t.events.len()));
        t.events.push(StoredEvent {
            key: key.to_string(),
            kind,
            body: body.clone(),
            received: r.time,
        });
        t.updated_at = r.time;
        Answer::json(201, json!({"ticket_id": id, "created": true}))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_hex_is_the_standard_digest() {
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

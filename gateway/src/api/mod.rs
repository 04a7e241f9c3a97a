//! The hotline HTTP API (DESIGN §4 "Hotline API"), its page and `/metrics`.
//!
//! | method and path | token | what |
//! |---|---|---|
//! | `GET /` | no | the hotline page (it asks for the token and keeps it in `sessionStorage`) |
//! | `GET /favicon.ico` | no | the page's icon |
//! | `GET /metrics` | no | Prometheus/OpenMetrics text |
//! | `GET /api/v1/openapi.json` | yes | this API described in OpenAPI 3.0 |
//! | `GET /api/v1/devices` | yes | every fleet device (and any device heard of that the fleet lacks) |
//! | `GET /api/v1/devices/{id}` | yes | one device with live readings, open faults, history |
//! | `GET /api/v1/devices/{id}/availability?from=&to=` | yes | the availability report |
//! | `GET /api/v1/tickets?device=&open=` | yes | tickets with deadlines and forwarding state |
//! | `POST /api/v1/tickets/{key}/retry` | yes | requeue a ticket the backend refused (audited) |
//! | `POST /api/v1/devices/{id}/diagnostics` | yes | run a read-only diagnostic (audited) |
//! | `GET /api/v1/agents` | yes | every agent: status, outbox incarnation, conflicting records, clock offset and skew |
//! | service level | yes | SLA figures, customers' availability, exclusions, maintenance, the paged life record ([`service`]) |
//!
//! Every `/api/v1` call needs `Authorization: Bearer <token>`, the OpenAPI document
//! included (DESIGN §4 says every `/api/v1` call); a missing or wrong token is a 401 with a
//! JSON error. The token is compared in constant time (both sides hashed, then compared
//! without early exit) and never logged. Errors are JSON `{"error": "..."}`.
//!
//! After a few wrong tokens from one address ([`crate::refusals`]), that address is
//! answered 429 with `Retry-After`, its token not looked at, for a wait that doubles with
//! each further wrong one; a right token forgives. Every refusal counts in
//! `tend_gateway_auth_failures_total`; refused actions (not reads) go into the audit log
//! as one line per address a minute with their count.
//!
//! Ticket keys contain `/` (`tend-t:<agent>/<device>/<code>/<ms>`); the retry path takes
//! the key percent-encoded (`%2F`) or as is.
//!
//! A diagnostic is checked against the device's allowed names (the agent's built-ins and
//! the profile's `[[diagnostic]]`s) before anything is sent; every call, refused ones
//! included, is appended to the audit log (and made durable) before it is answered.
//!
//! Request bodies are limited to 64 KiB; bad JSON is a 400 with the parser's message.
//!
//! Every answer carries a Content-Security-Policy, `X-Frame-Options: DENY`,
//! `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer` ([`crate::page`]).

use crate::app::Gateway;
use crate::audit::{Audit, AuditEntry};
use crate::diag::{self, DiagError};
use crate::fleet::DeviceEntry;
use crate::ledger::{month_window, AvailabilityReport};
use crate::metrics::{Metrics, StateLabel, StatusLabel};
use crate::refusals::Backoff;
use crate::serve::Limits;
use crate::sla::Terms;
use crate::store::{AgentRecord, DeviceLive, ForwardState, Forwarding, StoreError, TicketRecord};
use crate::ticket::{sha256_hex, DeviceFacts, DeviceIdentity};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub mod service;

/// The OpenAPI 3.0 description served on `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");
pub use crate::page::PAGE;
/// Largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;
/// How many life-record entries a device's detail carries.
pub const HISTORY_LIMIT: usize = 200;
/// The content type of `/metrics` (prometheus-client writes OpenMetrics text).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone)]
struct ApiState {
    gw: Gateway,
    /// SHA-256 of the token, hex: compared with the caller's the same way.
    token_hash: String,
    audit: Audit,
    /// Wrong tokens by caller address.
    backoff: Arc<Mutex<Backoff>>,
}

impl ApiState {
    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        // Only counts are kept: a panic elsewhere cannot leave them inconsistent.
        self.backoff.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The hotline router. Serve it with [`serve`] (which provides the caller's address for
/// the audit log).
pub fn router(gw: Gateway, token: String, audit: Audit) -> Router {
    let state = ApiState {
        gw,
        token_hash: sha256_hex(token.as_bytes()),
        audit,
        backoff: Arc::default(),
    };
    let api = Router::new()
        .route("/openapi.json", get(openapi))
        .route("/devices", get(list_devices))
        .route("/devices/:id", get(device_detail))
        .route("/devices/:id/availability", get(availability))
        .route(
            "/devices/:id/availability/exclusions",
            get(service::exclusions).post(service::add_exclusion),
        )
        .route(
            "/devices/:id/availability/exclusions/:n",
            axum::routing::delete(service::remove_exclusion),
        )
        .route(
            "/devices/:id/maintenance",
            get(service::maintenance).post(service::add_maintenance),
        )
        .route("/devices/:id/history", get(service::history))
        .route("/devices/:id/timeline", get(service::timeline))
        .route(
            "/customers/:id/availability",
            get(service::customer_availability),
        )
        .route("/sla", get(service::sla))
        .route("/reports/monthly", get(service::monthly_report))
        .route("/devices/:id/diagnostics", post(diagnostics))
        .route("/tickets", get(tickets))
        .route("/tickets/*rest", post(retry))
        .route("/agents", get(agents))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(page))
        .route("/favicon.ico", get(crate::page::favicon))
        .route("/metrics", get(metrics))
        .nest("/api/v1", api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // CSP, frame, nosniff and referrer headers on every answer, refusals included.
        .layer(middleware::map_response(crate::page::security_headers))
        .with_state(state)
}

/// Serves `router` over plain HTTP on `listener` with the default [`Limits`] until
/// `shutdown` is cancelled, then lets the requests in flight finish. The gateway itself
/// serves through [`crate::serve::serve`] with the config's limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    crate::serve::serve(listener, router, None, Limits::default(), shutdown).await
}

// ---------- errors ----------

/// A JSON error answer: `{"error": message}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "hotline API: store read failed");
        match &e {
            // The shared database is unreachable (or refused): a passing condition the
            // hotline should show as such, naming where the store is (never a secret).
            StoreError::Database { store, what, .. } if store.starts_with("postgres") => {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the fleet's database {store} cannot be used now ({what}); agents keep their records until it is back"),
                )
            }
            _ => ApiError::internal(format!(
                "the gateway's store could not be read: {}",
                e.what()
            )),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

fn path_error(e: PathRejection) -> ApiError {
    ApiError::bad_request(format!("bad path: {}", e.body_text()))
}

type ApiResult = Result<Response, ApiError>;

/// Runs store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("internal error: {e}")))
}

fn remote_of(c: &Option<ConnectInfo<SocketAddr>>) -> Option<String> {
    c.as_ref().map(|ConnectInfo(a)| a.to_string())
}

/// At most `n` characters of `s` (for what callers send that goes into the audit log).
fn clip(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

// ---------- authentication ----------

/// Constant-time equality of two equal-length strings (both are SHA-256 hex here).
/// Equal, in time independent of where they differ (`subtle`).
fn same(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn auth(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a);
    // Without a known caller (a router served without ConnectInfo) all share one entry.
    let ip = remote.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| a.ip());
    let now = Instant::now();
    // What a refusal puts on record: actions only, not reads.
    let action = (req.method() != Method::GET && req.method() != Method::HEAD).then(|| {
        clip(
            &format!("{} /api/v1{}", req.method(), req.uri().path()),
            256,
        )
    });
    let waiting = st.backoff().wait(ip, now);
    if let Some(wait) = waiting {
        // Not even looked at: a guesser gets no answer about its token while it waits.
        st.gw.metrics.auth_failures.inc();
        if let Some(request) = action {
            let refusal = refusal(request, remote, "too many wrong tokens", 429);
            on_record(&st, ip, refusal, now).await;
        }
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many wrong tokens from this address; retry in {secs} s"),
        )
        .into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return resp;
    }
    let ok = bearer(req.headers()).is_some_and(|t| same(&sha256_hex(t.as_bytes()), &st.token_hash));
    if ok {
        st.backoff().accepted(ip);
        return next.run(req).await;
    }
    st.gw.metrics.auth_failures.inc();
    let message = if req.headers().contains_key(header::AUTHORIZATION) {
        // Only a token presented counts towards the back-off: the page asks without one.
        st.backoff().wrong(ip, now);
        "wrong token"
    } else {
        "missing Authorization: Bearer <token>"
    };
    if let Some(request) = action {
        on_record(&st, ip, refusal(request, remote, message, 401), now).await;
    }
    let mut resp = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The audit line of one refused action, without the token.
fn refusal(request: String, remote: Option<SocketAddr>, message: &str, status: u16) -> AuditEntry {
    AuditEntry {
        at: Timestamp::now(),
        action: "unauthorized".into(),
        device: None,
        request: Some(request),
        outcome: format!("refused: {message}"),
        status,
        remote: remote.map(|a| a.to_string()),
        count: None,
    }
}

/// A refused action is still a hotline action: on record, through the audit log's
/// per-address tally (one line a minute at most, not one fsync per request). Only
/// counted here when nothing is due, so a flood costs no disk and no thread.
async fn on_record(st: &ApiState, ip: IpAddr, entry: AuditEntry, now: Instant) {
    let write = st.audit.count_refusal(ip, entry.status, now);
    if write.is_nothing() {
        return;
    }
    let audit = st.audit.clone();
    let written = tokio::task::spawn_blocking(move || audit.write_refusal(entry, write, now));
    if let Ok(Err(e)) = written.await {
        tracing::error!(error = %e, "audit log could not be written");
    }
}

// ---------- static things ----------

async fn page(State(st): State<ApiState>) -> Response {
    crate::page::page_response(st.gw.cx.tz.iana_name().unwrap_or("UTC"))
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such path; see /api/v1/openapi.json")
}

// ---------- devices ----------

/// The availability target of a device at `at`: its contract's, else the seed's.
pub(crate) fn target_of(gw: &Gateway, id: &str, at: Timestamp) -> f64 {
    gw.cx
        .fleet
        .device(id)
        .map_or(Terms::SEED, |e| e.terms_at(at, &gw.cx.tz))
        .availability_target
}

/// The availability report of a device over `[from, to)` as of `now`, against its
/// contract's target: the one computation behind every figure the hotline shows.
pub(crate) fn device_report(
    gw: &Gateway,
    id: &str,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<AvailabilityReport, StoreError> {
    // The terms of the window's own time: now while it runs, its last instant once past
    // (its end is the next period's first instant, perhaps another contract's).
    let at = if now < to {
        now.max(from)
    } else {
        to.checked_sub(jiff::SignedDuration::from_nanos(1))
            .unwrap_or(to)
            .max(from)
    };
    let target = target_of(gw, id, at);
    Ok(gw.store.ledger(id)?.report(id, from, to, now, target))
}

/// The month's availability of a device: the calendar month containing `now` in the
/// configured zone, its elapsed part measured, the rest counted as future in the budget.
/// The availability endpoint's default window is the same month, so both show one budget.
fn month_figures(gw: &Gateway, id: &str, now: Timestamp) -> Result<AvailabilityReport, StoreError> {
    let (from, to) = month_window(now, &gw.cx.tz);
    device_report(gw, id, from, to, now)
}

/// The fields a device has in the list (and in its detail).
fn summary(
    gw: &Gateway,
    id: &str,
    entry: Option<DeviceEntry<'_>>,
    live: Option<&DeviceLive>,
    now: Timestamp,
) -> Result<Map<String, Value>, StoreError> {
    let identity = live.and_then(|d| d.identity.as_ref());
    let model = match entry {
        Some(e) => {
            let ident = identity.map(|i| DeviceIdentity {
                model: i.model.clone(),
                firmware: i.firmware.clone(),
                serial: i.serial.clone(),
                profile: i.profile.clone(),
            });
            let facts = DeviceFacts::resolve(&e, ident.as_ref(), &gw.cx.profiles);
            (facts.model, facts.kind)
        }
        None => (identity.map(|i| i.model.clone()), None),
    };
    let m = month_figures(gw, id, now)?;
    let agent = live.map(|d| d.agent.clone());
    let agent_status = agent
        .as_deref()
        .and_then(|a| gw.agent_status(a))
        .map(|s| s.status);
    let state = live.map_or("unknown", |d| d.state.as_str());
    let mut o = Map::new();
    o.insert("id".into(), json!(id));
    o.insert(
        "serial".into(),
        json!(entry
            .map(|e| e.device.serial.clone())
            .or_else(|| identity.and_then(|i| i.serial.clone()))),
    );
    o.insert(
        "site".into(),
        json!(entry
            .map(|e| e.site.id.clone())
            .or_else(|| live.map(|d| d.site_reported.clone()))),
    );
    o.insert("in_fleet".into(), json!(entry.is_some()));
    o.insert("state".into(), json!(state));
    o.insert(
        "state_since".into(),
        json!(live.and_then(|d| d.state_since)),
    );
    o.insert("last_seen".into(), json!(live.and_then(|d| d.last_seen)));
    o.insert(
        "open_faults".into(),
        json!(live.map_or(0, |d| d.open_episodes.len())),
    );
    o.insert("model".into(), json!(model.0));
    o.insert("kind".into(), json!(model.1));
    o.insert(
        "location".into(),
        json!(entry.map(|e| e.device.location.clone())),
    );
    o.insert("agent".into(), json!(agent));
    o.insert("agent_status".into(), json!(agent_status));
    o.insert("availability".into(), json!(m.availability));
    o.insert("coverage".into(), json!(m.coverage));
    o.insert("target".into(), json!(m.target));
    o.insert("budget_status".into(), json!(m.budget_status));
    o.insert("downtime_budget_s".into(), json!(m.downtime_budget_s));
    o.insert("downtime_allowed_s".into(), json!(m.downtime_allowed_s));
    Ok(o)
}

/// Every fleet device, then every device heard of that the fleet lacks, by id.
fn all_summaries(gw: &Gateway, now: Timestamp) -> Result<Vec<Map<String, Value>>, StoreError> {
    let mut live: HashMap<String, DeviceLive> = gw
        .store
        .devices()?
        .into_iter()
        .map(|d| (d.id.clone(), d))
        .collect();
    let mut out = Vec::new();
    for e in gw.cx.fleet.devices() {
        let d = live.remove(&e.device.id);
        out.push(summary(gw, &e.device.id, Some(e), d.as_ref(), now)?);
    }
    let mut rest: Vec<DeviceLive> = live.into_values().collect();
    rest.sort_by(|a, b| a.id.cmp(&b.id));
    for d in rest {
        out.push(summary(gw, &d.id, None, Some(&d), now)?);
    }
    Ok(out)
}

async fn list_devices(State(st): State<ApiState>) -> ApiResult {
    let gw = st.gw.clone();
    let list = blocking(move || all_summaries(&gw, Timestamp::now())).await??;
    Ok(Json(Value::Array(list.into_iter().map(Value::Object).collect())).into_response())
}

fn episode_json(ev: &tend_wire::EpisodeEvent) -> Value {
    json!({
        "episode": ev.episode,
        "code": ev.code,
        "kind": ev.kind,
        "class": ev.class,
        "description": ev.description,
        "opened_at": ev.opened_at,
        "last_change": ev.change,
        "device_available": ev.device_available,
        "evidence": ev.evidence,
        "suggested_action": ev.action,
        "due": ev.due,
    })
}

fn detail(gw: &Gateway, id: &str, now: Timestamp) -> Result<Option<Value>, ApiError> {
    let entry = gw.cx.fleet.device(id);
    let live = gw.store.device(id)?;
    if entry.is_none() && live.is_none() {
        return Ok(None);
    }
    let mut o = summary(gw, id, entry, live.as_ref(), now)?;
    let readings: Vec<Value> = live
        .iter()
        .flat_map(|d| d.readings.values())
        .map(|r| json!({ "name": r.name, "value": r.value, "unit": r.unit, "time": r.time }))
        .collect();
    let faults: Vec<Value> = live
        .iter()
        .flat_map(|d| d.open_episodes.values())
        .map(episode_json)
        .collect();
    let identity = live.as_ref().and_then(|d| d.identity.as_ref()).map(|i| {
        json!({
            "model": i.model,
            "firmware": i.firmware,
            "serial": i.serial,
            "profile": i.profile,
            "at": i.at,
        })
    });
    let profile_diags = live
        .as_ref()
        .map(|d| gw.profile_diagnostics(d))
        .unwrap_or_default();
    let tickets: Vec<String> = gw
        .store
        .tickets()?
        .into_iter()
        .filter(|t| t.device == id)
        .map(|t| t.key)
        .collect();
    let history = gw.store.history(id, HISTORY_LIMIT)?;
    let fleet = entry.map(|e| {
        json!({
            "site_name": e.site.name,
            "address": e.site.address,
            "service_area": e.site.service_area,
            "customer": e.customer.id,
            "customer_name": e.customer.name,
            "contact_name": e.customer.contact_name,
            "contact_phone": e.customer.contact_phone,
            "accepted": e.device.accepted.to_string(),
            "extended_warranty_until": e.device.extended_warranty_until.map(|d| d.to_string()),
        })
    });
    o.insert("open_faults".into(), Value::Array(faults));
    o.insert("readings".into(), Value::Array(readings));
    o.insert("identity".into(), identity.unwrap_or(Value::Null));
    o.insert("diagnostics".into(), json!(diag::allowed(&profile_diags)));
    o.insert("tickets".into(), json!(tickets));
    o.insert(
        "dropped_readings".into(),
        json!(live.as_ref().map_or(0, |d| d.dropped_readings)),
    );
    o.insert("fleet".into(), fleet.unwrap_or(Value::Null));
    o.insert("history".into(), json!(history));
    if entry.is_some() {
        o.insert(
            "maintenance".into(),
            service::maintenance_json(gw, id, now)?,
        );
    }
    Ok(Some(Value::Object(o)))
}

async fn device_detail(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let gw = st.gw.clone();
    let idc = id.clone();
    match blocking(move || detail(&gw, &idc, Timestamp::now())).await?? {
        Some(v) => Ok(Json(v).into_response()),
        None => Err(unknown_device(&id)),
    }
}

fn unknown_device(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no device {:?}: not in the fleet and never heard of",
        clip(id, 128)
    ))
}

fn known_device(gw: &Gateway, id: &str) -> Result<bool, StoreError> {
    Ok(gw.cx.fleet.device(id).is_some() || gw.store.device(id)?.is_some())
}

fn parse_time(name: &str, s: &str) -> Result<Timestamp, ApiError> {
    s.trim().parse::<Timestamp>().map_err(|e| {
        let hint = if s.contains(' ') {
            " (a '+' in a query string must be written %2B)"
        } else {
            ""
        };
        ApiError::bad_request(format!(
            "{name}={:?} is not an RFC 3339 timestamp like 2026-11-01T00:00:00+08:00{hint}: {e}",
            clip(s, 64)
        ))
    })
}

async fn availability(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let q = service::query(q)?;
    let now = Timestamp::now();
    let tz = &st.gw.cx.tz;
    let today = now.to_zoned(tz.clone()).date();
    let contract = st
        .gw
        .cx
        .fleet
        .device(&id)
        .and_then(|e| e.contract_on(today));
    let (from, to) = availability_window(&q, contract, now, tz)?;
    let explicit = q.contains_key("from") || q.contains_key("to");
    if explicit && from >= to {
        return Err(ApiError::bad_request(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    let gw = st.gw.clone();
    let report = blocking(move || -> Result<_, ApiError> {
        if !known_device(&gw, &id)? {
            return Err(unknown_device(&id));
        }
        Ok(device_report(&gw, &id, from, to, now)?)
    })
    .await??;
    Ok(Json(report).into_response())
}

/// The window of a contract: its first day's start to the end of its last day, in the
/// gateway's zone (an open end: the contract has none, so neither has the window: now).
fn contract_window(
    c: &crate::fleet::Contract,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> Result<(Timestamp, Timestamp), ApiError> {
    let day = |d: jiff::civil::Date| {
        d.to_zoned(tz.clone())
            .map(|z| z.timestamp())
            .map_err(|e| ApiError::bad_request(format!("contract {}: {e}", c.id)))
    };
    let from = match c.start {
        Some(s) => day(s)?,
        None => {
            return Err(ApiError::bad_request(format!(
                "contract {} has no start: give from and to",
                c.id
            )))
        }
    };
    let to = match c.end.and_then(|e| e.tomorrow().ok()) {
        Some(e) => day(e)?,
        None => now.max(from),
    };
    Ok((from, to))
}

/// The window of an availability query: `period=contract` (the window of `contract`,
/// the one in force now), else [`window_query`].
fn availability_window(
    q: &HashMap<String, String>,
    contract: Option<&crate::fleet::Contract>,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> Result<(Timestamp, Timestamp), ApiError> {
    match q.get("period").map(String::as_str) {
        None | Some("") | Some("month") => window_query(q, now, tz),
        Some("contract") => {
            if q.contains_key("from") || q.contains_key("to") {
                return Err(ApiError::bad_request(
                    "period=contract sets the window: leave out from and to",
                ));
            }
            let c = contract.ok_or_else(|| {
                ApiError::bad_request(
                    "period=contract: no contract is in force (the seed's terms apply)",
                )
            })?;
            contract_window(c, now, tz)
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "period={:?}: month or contract",
            clip(other, 32)
        ))),
    }
}

/// `from` and `to` of a query (RFC 3339). Without them: this calendar month in the
/// gateway's zone, whole (its elapsed part is measured, the rest enters the budget);
/// with only `to`: from the start of its month; with only `from`: to now.
fn window_query(
    q: &HashMap<String, String>,
    now: Timestamp,
    tz: &jiff::tz::TimeZone,
) -> Result<(Timestamp, Timestamp), ApiError> {
    let to = q.get("to").map(|s| parse_time("to", s)).transpose()?;
    let from = q.get("from").map(|s| parse_time("from", s)).transpose()?;
    Ok(match (from, to) {
        (None, None) => month_window(now, tz),
        (None, Some(to)) => (month_window(to, tz).0, to),
        (Some(from), None) => (from, now),
        (Some(from), Some(to)) => (from, to),
    })
}

// ---------- tickets ----------

const NO_BACKEND: &str = "no backend configured: kept by the gateway";

fn forwarding_json(f: &Forwarding, backend: bool) -> Value {
    let mut o = json!({
        "state": f.state,
        "attempts": f.attempts,
        "error": f.last_error,
        "next_attempt": f.next_attempt,
        "sent_at": f.sent_at,
    });
    if !backend && f.state == ForwardState::Pending {
        o["detail"] = json!(NO_BACKEND);
    }
    o
}

fn ticket_json(t: &TicketRecord, backend: bool, now: Timestamp, tz: &jiff::tz::TimeZone) -> Value {
    let events: Vec<Value> = t
        .events
        .iter()
        .map(|e| {
            json!({
                "key": e.idempotency_key,
                "type": e.kind,
                "forwarding": forwarding_json(&e.forward, backend),
            })
        })
        .collect();
    json!({
        "key": t.key,
        "ticket_id": t.ticket_id,
        "device": t.device,
        "agent": t.agent,
        "kind": t.kind,
        "class": t.class,
        "code": t.code,
        "description": t.body.pointer("/fault/description"),
        "open": t.open,
        "backend_status": t.backend_status,
        "detected_at": t.detected_at,
        "created_at": t.created_at,
        "sla": deadlines_json(t, tz),
        "sla_status": t.sla_status(now),
        "status_history": t.status_history,
        "status_read_at": t.status_read_at,
        "warranty": t.body.get("warranty"),
        "episodes": t.episodes,
        "forwarding": forwarding_json(&t.forward, backend),
        "events": events,
    })
}

/// The deadlines that apply now (after an escalation, the new class's), RFC 3339 in the
/// gateway's zone, with where the class's deadlines count from; the body's `sla` for a
/// ticket that has none stored.
fn deadlines_json(t: &TicketRecord, tz: &jiff::tz::TimeZone) -> Value {
    match t.current_deadlines() {
        Some(d) => {
            let f = |x: Option<Timestamp>| x.map(|x| crate::sla::rfc3339(x, tz));
            json!({
                "respond_by": crate::sla::rfc3339(d.respond_by, tz),
                "onsite_by": f(d.onsite_by),
                "plan_by": f(d.plan_by),
                "resolve_by": f(d.resolve_by),
                "class_from": crate::sla::rfc3339(d.class_from, tz),
            })
        }
        None => t.body.get("sla").cloned().unwrap_or(Value::Null),
    }
}

async fn tickets(
    State(st): State<ApiState>,
    q: Result<Query<HashMap<String, String>>, QueryRejection>,
) -> ApiResult {
    let q = service::query(q)?;
    let open = match q.get("open").map(String::as_str) {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "open={:?}: must be true or false",
                clip(other, 32)
            )))
        }
    };
    let device = q.get("device").filter(|d| !d.is_empty()).cloned();
    let gw = st.gw.clone();
    let list = blocking(move || gw.store.tickets()).await??;
    let backend = st.gw.backend_configured;
    let now = Timestamp::now();
    let out: Vec<Value> = list
        .iter()
        .filter(|t| device.as_ref().is_none_or(|d| &t.device == d))
        .filter(|t| open.is_none_or(|o| t.open == o))
        .map(|t| ticket_json(t, backend, now, &st.gw.cx.tz))
        .collect();
    Ok(Json(Value::Array(out)).into_response())
}

/// Every agent heard of (on its status topic or in a batch): its status, its outbox
/// incarnation, and the records that conflicted with stored ones.
async fn agents(State(st): State<ApiState>) -> ApiResult {
    let gw = st.gw.clone();
    let stored = blocking(move || gw.store.agents()).await??;
    let mut all: BTreeMap<String, AgentRecord> =
        stored.into_iter().map(|a| (a.id.clone(), a)).collect();
    let statuses = st
        .gw
        .agents
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for id in statuses.keys() {
        all.entry(id.clone())
            .or_insert_with(|| AgentRecord::new(id));
    }
    let out: Vec<Value> = all
        .into_values()
        .map(|a| {
            let status = statuses.get(&a.id);
            json!({
                "id": a.id,
                "status": status.map(|s| s.status.as_str()),
                "status_since": status.map(|s| s.since),
                "incarnation": a.incarnation,
                "incarnation_since": a.incarnation_since,
                "conflicting_records": a.conflicting_records,
                "last_conflict": a.last_conflict,
                "clock_offset_s": a.clock_offset_s,
                "clock_skewed": a.clock_skewed,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)).into_response())
}

async fn retry(
    State(st): State<ApiState>,
    remote: Option<ConnectInfo<SocketAddr>>,
    rest: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(rest) = rest.map_err(path_error)?;
    let Some(key) = rest.strip_suffix("/retry").filter(|k| !k.is_empty()) else {
        return Err(not_found().await);
    };
    let key = key.to_string();
    let gw = st.gw.clone();
    let k = key.clone();
    let result = blocking(
        move || -> Result<(StatusCode, Value, Option<String>), ApiError> {
            let Some(t) = gw.store.ticket(&k)? else {
                return Ok((
                    StatusCode::NOT_FOUND,
                    json!({ "error": format!("no ticket {:?}", clip(&k, 200)) }),
                    None,
                ));
            };
            let failed = t.forward.state == ForwardState::Failed
                || t.events
                    .iter()
                    .any(|e| e.forward.state == ForwardState::Failed);
            if !failed {
                return Ok((
                    StatusCode::CONFLICT,
                    json!({ "error": format!(
                    "nothing to retry: the ticket is {} and none of its events failed",
                    format!("{:?}", t.forward.state).to_lowercase()
                ) }),
                    Some(t.device),
                ));
            }
            gw.store.requeue(&k)?;
            let after = gw.store.ticket(&k)?;
            let v = after
                .map(|t| ticket_json(&t, gw.backend_configured, Timestamp::now(), &gw.cx.tz))
                .unwrap_or(Value::Null);
            Ok((
                StatusCode::OK,
                json!({ "requeued": true, "ticket": v }),
                Some(t.device),
            ))
        },
    )
    .await??;
    let (status, body, device) = result;
    if status == StatusCode::OK {
        st.gw.forwarder_wake.notify_one();
    }
    let outcome = match status {
        StatusCode::OK => "requeued".to_string(),
        _ => format!("refused: {}", body["error"].as_str().unwrap_or_default()),
    };
    let entry = AuditEntry {
        at: Timestamp::now(),
        action: "retry_ticket".into(),
        device,
        request: Some(clip(&key, 256)),
        outcome,
        status: status.as_u16(),
        remote: remote_of(&remote),
        count: None,
    };
    write_audit(&st.audit, entry).await?;
    Ok((status, Json(body)).into_response())
}

async fn write_audit(audit: &Audit, entry: AuditEntry) -> Result<(), ApiError> {
    let a = audit.clone();
    match blocking(move || a.append(&entry)).await? {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::error!(error = %e, path = %audit.path().display(), "audit log could not be written");
            Err(ApiError::internal(
                "the audit log could not be written; the action's result is withheld",
            ))
        }
    }
}

// ---------- diagnostics ----------

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DiagBody {
    request: String,
}

/// Why a diagnostic request's body says nothing usable.
#[derive(Debug, thiserror::Error)]
enum BadDiagBody {
    #[error("the body must be JSON like {{\"request\": \"readings\"}}: {0}")]
    NotJson(#[source] serde_json::Error),
    /// Too large, or not readable: axum's text and status.
    #[error("{}", .0.body_text())]
    Unreadable(#[source] BytesRejection),
}

impl BadDiagBody {
    fn status(&self) -> StatusCode {
        match self {
            BadDiagBody::NotJson(_) => StatusCode::BAD_REQUEST,
            BadDiagBody::Unreadable(e) => e.status(),
        }
    }
}

/// How a diagnostic call ended, before it is audited and answered.
struct DiagOutcome {
    status: StatusCode,
    /// `ok`, `error`, `timeout`, `refused` (the metrics label).
    label: &'static str,
    /// The audit log's outcome text.
    outcome: String,
    body: Value,
}

impl DiagOutcome {
    fn refused(status: StatusCode, message: String) -> Self {
        DiagOutcome {
            status,
            label: "refused",
            outcome: format!("refused: {message}"),
            body: json!({ "error": message }),
        }
    }
}

async fn diagnostics(
    State(st): State<ApiState>,
    remote: Option<ConnectInfo<SocketAddr>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => return path_error(e).into_response(),
    };
    // What the caller asked for, as far as it can be read (for the audit log).
    let parsed = match body {
        Ok(b) => serde_json::from_slice::<DiagBody>(&b).map_err(BadDiagBody::NotJson),
        Err(e) => Err(BadDiagBody::Unreadable(e)),
    };
    let request = parsed.as_ref().ok().map(|b| clip(&b.request, 128));
    let out = run_diagnostic(&st.gw, &id, parsed).await;
    Metrics::outcome(&st.gw.metrics.diagnostics, out.label);
    let entry = AuditEntry {
        at: Timestamp::now(),
        action: "diagnostic".into(),
        device: Some(clip(&id, 128)),
        request,
        outcome: clip(&out.outcome, 512),
        status: out.status.as_u16(),
        remote: remote_of(&remote),
        count: None,
    };
    if let Err(e) = write_audit(&st.audit, entry).await {
        return e.into_response();
    }
    (out.status, Json(out.body)).into_response()
}

async fn run_diagnostic(
    gw: &Gateway,
    id: &str,
    parsed: Result<DiagBody, BadDiagBody>,
) -> DiagOutcome {
    let g = gw.clone();
    let idc = id.to_string();
    let looked = blocking(move || -> Result<_, StoreError> {
        let live = g.store.device(&idc)?;
        let in_fleet = g.cx.fleet.device(&idc).is_some();
        let listed = live
            .as_ref()
            .map(|d| g.profile_diagnostics(d))
            .unwrap_or_default();
        Ok((in_fleet, live, listed))
    })
    .await;
    let (in_fleet, live, listed) = match looked.and_then(|r| r.map_err(ApiError::from)) {
        Ok(x) => x,
        Err(e) => {
            return DiagOutcome {
                status: e.status,
                label: "error",
                outcome: format!("error: {}", e.message),
                body: json!({ "error": e.message }),
            }
        }
    };
    if !in_fleet && live.is_none() {
        return DiagOutcome::refused(StatusCode::NOT_FOUND, unknown_device(id).message);
    }
    let req = match parsed {
        Ok(b) => b.request,
        Err(bad) => return DiagOutcome::refused(bad.status(), bad.to_string()),
    };
    let allowed = diag::allowed(&listed);
    if !allowed.iter().any(|a| a == &req) {
        let why = if live.as_ref().is_none_or(|d| d.identity.is_none()) {
            " (the device has not been identified yet, so only the built-ins are known)"
        } else {
            ""
        };
        let e = DiagError::NotListed {
            device: id.to_string(),
            request: clip(&req, 128),
            allowed: allowed.join(", "),
        };
        return DiagOutcome::refused(StatusCode::BAD_REQUEST, format!("{e}{why}"));
    }
    let Some(live) = live else {
        return DiagOutcome::refused(
            StatusCode::CONFLICT,
            format!("no agent has reported {id:?} yet: nobody to ask"),
        );
    };
    let timeout = gw.diag_timeout;
    match gw.diag.ask(&live.agent, id, &req, timeout).await {
        Ok(resp) if resp.ok => DiagOutcome {
            status: StatusCode::OK,
            label: "ok",
            outcome: "ok".into(),
            body: json!({ "device": id, "request": req, "answer": resp.answer }),
        },
        Ok(resp) => {
            let err = resp
                .error
                .unwrap_or_else(|| "the agent gave no reason".into());
            DiagOutcome {
                status: StatusCode::BAD_GATEWAY,
                label: "error",
                outcome: format!("error: {err}"),
                body: json!({
                    "error": format!("agent {:?}: {err}", live.agent),
                    "device": id,
                    "request": req,
                    "answer": resp.answer,
                }),
            }
        }
        Err(DiagError::Timeout { agent, .. }) => {
            let status = gw
                .agent_status(&agent)
                .map(|s| format!(" (agent {} since {})", s.status, s.since))
                .unwrap_or_default();
            let message = format!(
                "agent {agent:?} did not answer within {}{status}",
                human_duration(timeout)
            );
            DiagOutcome {
                status: StatusCode::GATEWAY_TIMEOUT,
                label: "timeout",
                outcome: "timeout".into(),
                body: json!({ "error": message }),
            }
        }
        Err(e) => DiagOutcome {
            status: StatusCode::SERVICE_UNAVAILABLE,
            label: "error",
            outcome: format!("error: {e}"),
            body: json!({ "error": e.to_string() }),
        },
    }
}

fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

// ---------- metrics ----------

/// Sets the `devices` gauges (fleet devices by state) and `devices_budget` (by this
/// month's budget status) from the store.
pub fn refresh_gauges(gw: &Gateway, now: Timestamp) -> Result<(), StoreError> {
    let mut counts: HashMap<&'static str, i64> = ["up", "down", "maintenance", "unknown"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    let mut budgets: HashMap<&'static str, i64> = ["ok", "at_risk", "breached"]
        .into_iter()
        .map(|s| (s, 0))
        .collect();
    for e in gw.cx.fleet.devices() {
        let live = gw.store.device(&e.device.id)?;
        let state = live.as_ref().map_or("unknown", |d| d.state.as_str());
        *counts.entry(state).or_default() += 1;
        let status = month_figures(gw, &e.device.id, now)?.budget_status;
        *budgets.entry(status.as_str()).or_default() += 1;
    }
    for (state, n) in counts {
        gw.metrics
            .devices
            .get_or_create(&StateLabel {
                state: state.to_string(),
            })
            .set(n);
    }
    for (status, n) in budgets {
        gw.metrics
            .devices_budget
            .get_or_create(&StatusLabel {
                status: status.to_string(),
            })
            .set(n);
    }
    Ok(())
}

async fn metrics(State(st): State<ApiState>) -> Response {
    let gw = st.gw.clone();
    let text = blocking(move || {
        if let Err(e) = refresh_gauges(&gw, Timestamp::now()) {
            tracing::warn!(error = %e, "metrics: device gauges not refreshed");
        }
        gw.metrics.render()
    })
    .await;
    match text {
        Ok(text) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_equality() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        let h = sha256_hex(b"secret");
        assert!(same(&h, &sha256_hex(b"secret")));
        assert!(!same(&h, &sha256_hex(b"secret ")));
    }

    #[test]
    fn bearer_header() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  abc "),
        );
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn openapi_is_json_with_every_path() {
        let v: Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(v["openapi"].as_str().map(|s| &s[..2]), Some("3."));
        for p in [
            "/api/v1/devices",
            "/api/v1/devices/{id}",
            "/api/v1/devices/{id}/availability",
            "/api/v1/devices/{id}/diagnostics",
            "/api/v1/tickets",
            "/api/v1/tickets/{key}/retry",
            "/api/v1/agents",
            "/api/v1/openapi.json",
            "/metrics",
        ] {
            assert!(v["paths"].get(p).is_some(), "{p} missing");
        }
    }

    #[test]
    fn page_has_no_external_resources() {
        // The SVG namespace is a name, not something loaded: the one URL allowed.
        let page = PAGE.replace("\"http://www.w3.org/2000/svg\"", "\"svg-namespace\"");
        for bad in ["http://", "https://", "//cdn", "<link", "src=", "url("] {
            assert!(!page.contains(bad), "page contains {bad}");
        }
    }
}

//! The service-level part of the hotline API: SLA figures, a customer's availability,
//! exclusions, maintenance, the paged life record.
//!
//! | method and path | what |
//! |---|---|
//! | `GET /api/v1/sla?customer=&from=&to=` | per deadline kind: met, missed, at risk, pending, the rate met |
//! | `GET /api/v1/customers/{id}/availability?from=&to=` | a customer's devices summed, and each device |
//! | `GET /api/v1/devices/{id}/availability/exclusions` | the device's exclusions |
//! | `POST /api/v1/devices/{id}/availability/exclusions` | exclude `{"from", "to", "reason", "note"}` (audited) |
//! | `DELETE /api/v1/devices/{id}/availability/exclusions/{n}` | take exclusion `n` back (audited) |
//! | `GET /api/v1/devices/{id}/maintenance` | the schedule from the contract and the maintenance done |
//! | `POST /api/v1/devices/{id}/maintenance` | record maintenance done `{"at", "note"}` (audited) |
//! | `GET /api/v1/devices/{id}/history?before=&limit=` | a page of the life record, newest last |
//! | `GET /api/v1/devices/{id}/timeline?from=&to=` | the device's states as stretches (default: this month) |
//! | `GET /api/v1/reports/monthly?customer=&month=YYYY-MM&format=json\|csv\|html` | the monthly report ([`crate::report`]) |

use super::{
    blocking, clip, device_report, known_device, path_error, remote_of, unknown_device,
    window_query, write_audit, ApiError, ApiResult, ApiState,
};
use crate::app::Gateway;
use crate::audit::AuditEntry;
use crate::ledger::{Budget, BudgetStatus};
use crate::service_watch::schedule_of;
use crate::sla_watch::{DeadlineKind, SlaState};
use crate::store::{Exclusion, ExclusionReason, HistoryCursor, MaintenanceDone, StoreError};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;

/// Most life-record entries in one page.
pub const MAX_HISTORY_PAGE: usize = 1000;
/// Longest note kept with an exclusion or a maintenance.
pub const MAX_NOTE: usize = 1000;

pub(super) type QueryMap = Result<Query<HashMap<String, String>>, QueryRejection>;

pub(super) fn query(q: QueryMap) -> Result<HashMap<String, String>, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))
}

fn ordered(from: Timestamp, to: Timestamp) -> Result<(), ApiError> {
    if from >= to {
        return Err(ApiError::bad_request(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    Ok(())
}

// ---------- SLA ----------

/// Met and missed deadlines of `customer`'s tickets (all customers without it) whose due
/// time falls in `[from, to)`, as of `now`.
pub fn sla_figures(
    gw: &Gateway,
    customer: Option<&str>,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<Value, StoreError> {
    let mut counts: HashMap<(DeadlineKind, SlaState), u64> = HashMap::new();
    for t in gw.store.tickets()? {
        if let Some(c) = customer {
            let owner = gw
                .cx
                .fleet
                .device(&t.device)
                .map(|e| e.customer.id.as_str());
            if owner != Some(c) {
                continue;
            }
        }
        let promises = t.promises();
        let status = promises.judge(&t.status_history, now);
        for kind in DeadlineKind::ALL {
            if promises.due(kind).is_some_and(|d| from <= d && d < to) {
                *counts.entry((kind, status.get(kind))).or_default() += 1;
            }
        }
    }
    let n = |k, s| counts.get(&(k, s)).copied().unwrap_or(0);
    let mut per_kind = serde_json::Map::new();
    let (mut met_all, mut missed_all) = (0, 0);
    for kind in DeadlineKind::ALL {
        let (met, missed) = (n(kind, SlaState::Met), n(kind, SlaState::Missed));
        met_all += met;
        missed_all += missed;
        per_kind.insert(
            kind.as_str().into(),
            json!({
                "met": met,
                "missed": missed,
                "at_risk": n(kind, SlaState::AtRisk),
                "pending": n(kind, SlaState::Pending),
                "rate": rate(met, missed),
            }),
        );
    }
    Ok(json!({
        "customer": customer,
        "from": from,
        "to": to,
        "deadlines": per_kind,
        "met": met_all,
        "missed": missed_all,
        "rate": rate(met_all, missed_all),
    }))
}

/// met ÷ (met + missed); null when nothing was decided.
fn rate(met: u64, missed: u64) -> Option<f64> {
    (met + missed > 0).then(|| met as f64 / (met + missed) as f64)
}

pub(super) async fn sla(State(st): State<ApiState>, q: QueryMap) -> ApiResult {
    let q = query(q)?;
    let now = Timestamp::now();
    let (from, to) = window_query(&q, now, &st.gw.cx.tz)?;
    ordered(from, to)?;
    let customer = q.get("customer").filter(|c| !c.is_empty()).cloned();
    if let Some(c) = &customer {
        if st.gw.cx.fleet.customer(c).is_none() {
            return Err(unknown_customer(c));
        }
    }
    let gw = st.gw.clone();
    let v = blocking(move || sla_figures(&gw, customer.as_deref(), from, to, now)).await??;
    Ok(Json(v).into_response())
}

fn unknown_customer(id: &str) -> ApiError {
    ApiError::not_found(format!("no customer {:?} in the fleet", clip(id, 128)))
}

// ---------- a customer's availability ----------

/// A customer's devices over `[from, to)` as of `now`: the sums and each device's report.
pub fn customer_figures(
    gw: &Gateway,
    customer: &str,
    from: Timestamp,
    to: Timestamp,
    now: Timestamp,
) -> Result<Value, StoreError> {
    let mut reports = Vec::new();
    for e in gw.cx.fleet.devices() {
        if e.customer.id == customer {
            reports.push(device_report(gw, &e.device.id, from, to, now)?);
        }
    }
    let sum = |f: fn(&crate::ledger::AvailabilityReport) -> f64| reports.iter().map(f).sum::<f64>();
    let (up, down) = (sum(|r| r.up_s), sum(|r| r.down_s));
    let (maint, unknown, excluded) = (
        sum(|r| r.maintenance_s),
        sum(|r| r.unknown_s),
        sum(|r| r.excluded_s),
    );
    let budget = Budget::sum(reports.iter().map(|r| Budget {
        allowed: r.downtime_allowed_s,
        spent: r.down_s,
    }));
    let known = up + down + maint + excluded;
    let count = |s: BudgetStatus| reports.iter().filter(|r| r.budget_status == s).count();
    Ok(json!({
        "customer": customer,
        "from": from,
        "to": to,
        "devices": reports.len(),
        "up_s": up,
        "down_s": down,
        "maintenance_s": maint,
        "unknown_s": unknown,
        "excluded_s": excluded,
        "availability": (up + down > 0.0).then(|| up / (up + down)),
        "coverage": (known + unknown > 0.0).then(|| known / (known + unknown)),
        "downtime_allowed_s": budget.allowed,
        "downtime_budget_s": budget.remaining(),
        "budget_status": budget.status(),
        "devices_by_budget": {
            "ok": count(BudgetStatus::Ok),
            "at_risk": count(BudgetStatus::AtRisk),
            "breached": count(BudgetStatus::Breached),
        },
        "by_device": reports,
    }))
}

pub(super) async fn customer_availability(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let q = query(q)?;
    if st.gw.cx.fleet.customer(&id).is_none() {
        return Err(unknown_customer(&id));
    }
    let now = Timestamp::now();
    let tz = &st.gw.cx.tz;
    let today = now.to_zoned(tz.clone()).date();
    let contract = st.gw.cx.fleet.customer_contract_on(&id, today);
    let (from, to) = super::availability_window(&q, contract, now, tz)?;
    ordered(from, to)?;
    let gw = st.gw.clone();
    let v = blocking(move || customer_figures(&gw, &id, from, to, now)).await??;
    Ok(Json(v).into_response())
}

// ---------- exclusions ----------

pub(super) async fn exclusions(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let gw = st.gw.clone();
    let v = blocking(move || -> Result<Value, ApiError> {
        if !known_device(&gw, &id)? {
            return Err(unknown_device(&id));
        }
        Ok(json!(gw.store.exclusions(&id)?))
    })
    .await??;
    Ok(Json(v).into_response())
}

/// A field of a JSON body that is a string, or an error naming it.
fn text_field<'a>(body: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{key}: expected a string, found {other}"
        ))),
    }
}

fn time_field(body: &Value, key: &str) -> Result<Option<Timestamp>, ApiError> {
    text_field(body, key)?
        .map(|s| super::parse_time(key, s))
        .transpose()
}

fn json_body(body: Result<Json<Value>, JsonRejection>) -> Result<Value, ApiError> {
    let Json(v) =
        body.map_err(|e| ApiError::bad_request(format!("bad body: {}", e.body_text())))?;
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    Ok(v)
}

/// The exclusion a request asks for, checked: a reason of the three, `from` before `to`,
/// inside the device's life (from its acceptance day to now), a note of sane length.
fn exclusion_of(
    gw: &Gateway,
    device: &str,
    body: &Value,
    now: Timestamp,
) -> Result<Exclusion, ApiError> {
    if let Some(k) = body.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["from", "to", "reason", "note"].contains(&k.as_str()))
    }) {
        return Err(ApiError::bad_request(format!(
            "unknown field {:?}: an exclusion has from, to, reason and note",
            clip(k, 64)
        )));
    }
    let from = time_field(body, "from")?.ok_or_else(|| ApiError::bad_request("from is missing"))?;
    let to = time_field(body, "to")?.ok_or_else(|| ApiError::bad_request("to is missing"))?;
    let reason =
        text_field(body, "reason")?.ok_or_else(|| ApiError::bad_request("reason is missing"))?;
    let reason = ExclusionReason::parse(reason).ok_or_else(|| {
        ApiError::bad_request(format!(
            "reason {:?} is not one of {}",
            clip(reason, 64),
            ExclusionReason::ALL.join(", ")
        ))
    })?;
    let note = text_field(body, "note")?.unwrap_or("");
    if note.chars().count() > MAX_NOTE {
        return Err(ApiError::bad_request(format!(
            "note is longer than {MAX_NOTE} characters"
        )));
    }
    if from >= to {
        return Err(ApiError::bad_request(format!(
            "from ({from}) must be before to ({to})"
        )));
    }
    if to > now {
        return Err(ApiError::bad_request(format!(
            "to ({to}) is in the future: only time already past can be excluded"
        )));
    }
    if let Some(e) = gw.cx.fleet.device(device) {
        let life = e
            .device
            .accepted
            .to_zoned(gw.cx.tz.clone())
            .map(|z| z.timestamp())
            .ok();
        if let Some(start) = life.filter(|s| from < *s) {
            return Err(ApiError::bad_request(format!(
                "from ({from}) is before the device's life began (accepted {}, {start})",
                e.device.accepted
            )));
        }
    }
    Ok(Exclusion {
        id: 0,
        device: device.to_string(),
        from,
        to,
        reason,
        note: note.to_string(),
        recorded_at: now,
    })
}

pub(super) async fn add_exclusion(
    State(st): State<ApiState>,
    remote: Option<ConnectInfo<SocketAddr>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let gw = st.gw.clone();
    let request = body.as_ref().ok().map(|Json(v)| clip(&v.to_string(), 512));
    let device = id.clone();
    let result = blocking(move || -> Result<Exclusion, ApiError> {
        if gw.cx.fleet.device(&id).is_none() {
            return Err(ApiError::not_found(format!(
                "no device {:?} in the fleet: exclusions are for devices under service",
                clip(&id, 128)
            )));
        }
        let body = json_body(body)?;
        let ex = exclusion_of(&gw, &id, &body, Timestamp::now())?;
        match gw.store.add_exclusion(ex)? {
            Ok(ex) => Ok(ex),
            Err(other) => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "overlaps exclusion {} ({} .. {}, {:?}): take that one back first, or exclude only the time outside it",
                    other.id, other.from, other.to, other.reason
                ),
            )),
        }
    })
    .await?;
    let action = "exclude_availability";
    audit(
        &st,
        action,
        &device,
        request,
        &result,
        StatusCode::CREATED,
        |ex| format!("excluded as {}", ex.id),
        &remote,
    )
    .await?;
    let ex = result?;
    Ok((StatusCode::CREATED, Json(json!(ex))).into_response())
}

pub(super) async fn remove_exclusion(
    State(st): State<ApiState>,
    remote: Option<ConnectInfo<SocketAddr>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult {
    let Path((id, n)) = path.map_err(path_error)?;
    let gw = st.gw.clone();
    let device = id.clone();
    let request = Some(clip(&n, 64));
    let result = blocking(move || -> Result<Exclusion, ApiError> {
        let n: u64 = n.parse().map_err(|_| {
            ApiError::bad_request(format!("{:?} is not an exclusion id", clip(&n, 64)))
        })?;
        gw.store
            .remove_exclusion(&id, n, Timestamp::now())?
            .ok_or_else(|| {
                ApiError::not_found(format!("device {:?} has no exclusion {n}", clip(&id, 128)))
            })
    })
    .await?;
    let action = "remove_exclusion";
    audit(
        &st,
        action,
        &device,
        request,
        &result,
        StatusCode::OK,
        |ex| format!("exclusion {} taken back", ex.id),
        &remote,
    )
    .await?;
    Ok(Json(json!({"removed": result?})).into_response())
}

/// Appends the audit line of an action that gave `result`: `ok` with its outcome in
/// words, or the refusal with its status and message.
#[allow(clippy::too_many_arguments)]
async fn audit<T>(
    st: &ApiState,
    action: &str,
    device: &str,
    request: Option<String>,
    result: &Result<T, ApiError>,
    ok: StatusCode,
    outcome: impl Fn(&T) -> String,
    remote: &Option<ConnectInfo<SocketAddr>>,
) -> Result<(), ApiError> {
    let (status, outcome) = match result {
        Ok(x) => (ok, outcome(x)),
        Err(e) => (e.status, format!("refused: {}", e.message)),
    };
    let entry = AuditEntry {
        at: Timestamp::now(),
        action: action.into(),
        device: Some(clip(device, 128)),
        request,
        outcome,
        status: status.as_u16(),
        remote: remote_of(remote),
        count: None,
    };
    write_audit(&st.audit, entry).await
}

// ---------- maintenance ----------

/// The maintenance of a fleet device: its schedule from the contract and what was done.
pub fn maintenance_json(gw: &Gateway, id: &str, now: Timestamp) -> Result<Value, StoreError> {
    let done = gw.store.maintenance_done(id)?;
    let schedule = schedule_of(gw, id, now)?;
    let today = now.to_zoned(gw.cx.tz.clone()).date();
    Ok(match schedule {
        Some((s, contract)) => json!({
            "interval_days": s.interval_days,
            "contract": contract,
            "ticketed": contract.is_some(),
            "counted_from": s.counted_from,
            "last_done": s.last_done.map(|d| d.to_string()),
            "next_due": s.next_due.to_string(),
            "overdue": s.next_due < today,
            "done": done,
        }),
        None => json!({ "done": done }),
    })
}

pub(super) async fn maintenance(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let gw = st.gw.clone();
    let v = blocking(move || -> Result<Value, ApiError> {
        if !known_device(&gw, &id)? {
            return Err(unknown_device(&id));
        }
        Ok(maintenance_json(&gw, &id, Timestamp::now())?)
    })
    .await??;
    Ok(Json(v).into_response())
}

pub(super) async fn add_maintenance(
    State(st): State<ApiState>,
    remote: Option<ConnectInfo<SocketAddr>>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Value>, JsonRejection>,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let gw = st.gw.clone();
    let device = id.clone();
    let request = body.as_ref().ok().map(|Json(v)| clip(&v.to_string(), 512));
    let result = blocking(move || -> Result<MaintenanceDone, ApiError> {
        let Some(entry) = gw.cx.fleet.device(&id) else {
            return Err(ApiError::not_found(format!(
                "no device {:?} in the fleet: maintenance is recorded for devices under service",
                clip(&id, 128)
            )));
        };
        let body = json_body(body)?;
        if let Some(k) = body
            .as_object()
            .and_then(|o| o.keys().find(|k| !["at", "note"].contains(&k.as_str())))
        {
            return Err(ApiError::bad_request(format!(
                "unknown field {:?}: maintenance has at and note",
                clip(k, 64)
            )));
        }
        let now = Timestamp::now();
        let at = time_field(&body, "at")?.unwrap_or(now);
        if at > now {
            return Err(ApiError::bad_request(format!(
                "at ({at}) is in the future: record maintenance once it is done"
            )));
        }
        let accepted = entry.device.accepted;
        if at.to_zoned(gw.cx.tz.clone()).date() < accepted {
            return Err(ApiError::bad_request(format!(
                "at ({at}) is before the device was accepted ({accepted})"
            )));
        }
        let note = text_field(&body, "note")?.unwrap_or("");
        if note.chars().count() > MAX_NOTE {
            return Err(ApiError::bad_request(format!(
                "note is longer than {MAX_NOTE} characters"
            )));
        }
        Ok(gw.store.record_maintenance(MaintenanceDone {
            id: 0,
            device: id.clone(),
            done_at: at,
            source: "hotline".into(),
            note: note.to_string(),
            recorded_at: now,
        })?)
    })
    .await?;
    let action = "record_maintenance";
    audit(
        &st,
        action,
        &device,
        request,
        &result,
        StatusCode::CREATED,
        |m| format!("maintenance {} recorded", m.id),
        &remote,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(json!(result?))).into_response())
}

// ---------- the timeline ----------

/// The device's states over `[from, min(to, now))` as consecutive stretches (`up`,
/// `down`, `maintenance`, `unknown`, `excluded`): what the page draws. Default window:
/// this month.
pub(super) async fn timeline(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let q = query(q)?;
    let now = Timestamp::now();
    let (from, to) = window_query(&q, now, &st.gw.cx.tz)?;
    ordered(from, to)?;
    let gw = st.gw.clone();
    let v = blocking(move || -> Result<Value, ApiError> {
        if !known_device(&gw, &id)? {
            return Err(unknown_device(&id));
        }
        let end = to.min(now).max(from);
        let stretches = gw.store.ledger(&id)?.timeline(from, end);
        Ok(json!({ "device": id, "from": from, "to": to, "until": end, "stretches": stretches }))
    })
    .await??;
    Ok(Json(v).into_response())
}

// ---------- the life record, paged ----------

pub(super) async fn history(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    q: QueryMap,
) -> ApiResult {
    let Path(id) = id.map_err(path_error)?;
    let q = query(q)?;
    let limit = match q.get("limit") {
        None => super::HISTORY_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_HISTORY_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "limit={:?}: a whole number from 1 to {MAX_HISTORY_PAGE}",
                    clip(l, 32)
                ))
            })?,
    };
    let before = match q.get("before").filter(|b| !b.is_empty()) {
        None => None,
        Some(b) => Some(b.parse::<HistoryCursor>().map_err(|_| {
            ApiError::bad_request(format!(
                "before={:?} is not a cursor from an earlier page (its next_before)",
                clip(b, 64)
            ))
        })?),
    };
    let gw = st.gw.clone();
    let v = blocking(move || -> Result<Value, ApiError> {
        if !known_device(&gw, &id)? {
            return Err(unknown_device(&id));
        }
        let page = gw.store.history_page(&id, before, limit)?;
        let next = (page.len() == limit)
            .then(|| page.first().map(|(c, _)| c.to_string()))
            .flatten();
        let entries: Vec<Value> = page
            .into_iter()
            .map(|(c, e)| {
                let mut v = json!(e);
                v["cursor"] = json!(c.to_string());
                v
            })
            .collect();
        Ok(json!({ "device": id, "entries": entries, "next_before": next }))
    })
    .await??;
    Ok(Json(v).into_response())
}

// ---------- the monthly report ----------

pub(super) async fn monthly_report(State(st): State<ApiState>, q: QueryMap) -> ApiResult {
    let q = query(q)?;
    let customer = q
        .get("customer")
        .filter(|c| !c.is_empty())
        .cloned()
        .ok_or_else(|| ApiError::bad_request("customer is missing: ?customer=ID&month=YYYY-MM"))?;
    if st.gw.cx.fleet.customer(&customer).is_none() {
        return Err(unknown_customer(&customer));
    }
    let now = Timestamp::now();
    let first = match q.get("month").filter(|m| !m.is_empty()) {
        Some(m) => crate::report::parse_month(m).map_err(ApiError::bad_request)?,
        None => now.to_zoned(st.gw.cx.tz.clone()).date().first_of_month(),
    };
    let format = q.get("format").map_or("json", String::as_str).to_string();
    if !["json", "csv", "html"].contains(&format.as_str()) {
        return Err(ApiError::bad_request(format!(
            "format={:?}: json, csv or html",
            clip(&format, 32)
        )));
    }
    let gw = st.gw.clone();
    let c = customer.clone();
    let report = blocking(move || crate::report::monthly(&gw, &c, first, now)).await??;
    let name = format!(
        "tend-report-{}-{:04}-{:02}",
        customer.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_"),
        first.year(),
        first.month()
    );
    use axum::http::header;
    Ok(match format.as_str() {
        "csv" => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"{name}.csv\""),
                ),
            ],
            crate::report::render_csv(&report),
        )
            .into_response(),
        "html" => {
            let html = crate::report::render_html(&report);
            (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8".to_string()),
                    (
                        header::CONTENT_SECURITY_POLICY,
                        crate::page::document_csp(&html),
                    ),
                ],
                html,
            )
                .into_response()
        }
        _ => Json(report).into_response(),
    })
}

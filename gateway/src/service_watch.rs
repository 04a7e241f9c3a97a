//! The service watch: every `[backend] status_poll` it keeps the promises in view.
//!
//! - Judges every deadline of every open ticket from its status history
//!   ([`crate::sla_watch`]) and queues an `sla_at_risk` / `sla_missed` event through the
//!   forwarder's outbox the first time a deadline gets there (once per ticket and
//!   deadline: the event's key names both).
//! - Sets the `sla_deadlines` gauges.
//! - Notes maintenance done when a maintenance ticket was resolved in the backend.
//! - Opens a `maintenance_due` ticket for each device under a contract whose preventive
//!   maintenance falls due ([`crate::maintenance`]).
//!
//! The status reads themselves are the forwarder's (it owns the backend); this runs with
//! or without a backend, so a gateway that keeps its tickets itself still shows which
//! deadline is missed.

use crate::app::Gateway;
use crate::maintenance;
use crate::metrics::DeadlineLabel;
use crate::sla_watch::{reached, DeadlineKind, SlaState};
use crate::store::{MaintenanceDone, StoreError, TicketRecord};
use crate::ticket::{
    build_ticket, sla_event, DeviceFacts, DeviceIdentity, EventRequest, TicketContext,
};
use jiff::tz::TimeZone;
use jiff::Timestamp;
use std::collections::HashMap;
use std::time::Duration;
use tend_profiles::SignalKind;
use tokio_util::sync::CancellationToken;

/// How long after a ticket ended a missed deadline is still reported to the backend.
pub const LATE_NEWS: jiff::SignedDuration = jiff::SignedDuration::from_hours(7 * 24);

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Events queued (`sla_at_risk` / `sla_missed`).
    pub sla_events: usize,
    /// Maintenance tickets opened.
    pub maintenance_tickets: usize,
    /// Maintenance done noted from resolved tickets.
    pub maintenance_done: usize,
}

/// The `sla_at_risk` / `sla_missed` events an open ticket is due and has not had: for each
/// deadline `at_risk` now, its at-risk event; for each `missed`, its missed event (a
/// deadline seen only once it was missed gets no at-risk event after the fact).
///
/// A ticket already ended (resolved or closed in the backend) gets only the `sla_missed`
/// of a deadline kept late that nobody saw pass (the gateway or the backend was away),
/// and only within [`LATE_NEWS`] of its end, so an upgrade does not send the history of
/// every old ticket.
pub fn due_sla_events(t: &TicketRecord, now: Timestamp, tz: &TimeZone) -> Vec<EventRequest> {
    let ended = reached(&t.status_history, DeadlineKind::Resolve);
    if !t.open && ended.is_none_or(|e| now.duration_since(e) > LATE_NEWS) {
        return Vec::new();
    }
    let promises = t.promises();
    let status = promises.judge(&t.status_history, now);
    let episode = t.episodes.first().map_or(t.key.as_str(), String::as_str);
    let mut out = Vec::new();
    for kind in DeadlineKind::ALL {
        let Some(due) = promises.due(kind) else {
            continue;
        };
        let from = promises.counted_from(kind);
        let missed = match status.get(kind) {
            SlaState::AtRisk if t.open => false,
            SlaState::Missed => true,
            _ => continue,
        };
        let ev = sla_event(&t.key, episode, kind, missed, from, due, tz);
        if !t
            .events
            .iter()
            .any(|e| e.idempotency_key == ev.idempotency_key)
        {
            out.push(ev);
        }
    }
    out
}

/// One sweep at `now` (blocking: run it on the blocking pool); `maintenance_tickets`
/// says whether this gateway opens the maintenance tickets the contracts make due
/// (`[service] maintenance_tickets`).
pub fn sweep(gw: &Gateway, now: Timestamp, maintenance_tickets: bool) -> Result<Sweep, StoreError> {
    let tz = &gw.cx.tz;
    let mut done = Sweep::default();
    let tickets = gw.store.tickets()?;
    let mut gauges: HashMap<(DeadlineKind, SlaState), i64> = HashMap::new();
    for t in &tickets {
        let status = t.sla_status(now);
        for kind in DeadlineKind::ALL {
            *gauges.entry((kind, status.get(kind))).or_default() += 1;
        }
        let mut events = due_sla_events(t, now, tz);
        if !events.is_empty() && maintained_since(gw, t)? {
            // The maintenance is recorded as done: its ticket waits for the engineer to
            // close it, without deadlines reported missed for work that was done.
            events.clear();
        }
        if !events.is_empty() {
            done.sla_events += queue_events(gw, t, &events)?;
        }
        done.maintenance_done += note_maintenance(gw, t, now)?;
    }
    for kind in DeadlineKind::ALL {
        for state in [
            SlaState::Pending,
            SlaState::AtRisk,
            SlaState::Met,
            SlaState::Missed,
        ] {
            gw.metrics
                .sla_deadlines
                .get_or_create(&DeadlineLabel {
                    deadline: kind.as_str().into(),
                    status: state.as_str().into(),
                })
                .set(gauges.get(&(kind, state)).copied().unwrap_or(0));
        }
    }
    if maintenance_tickets {
        done.maintenance_tickets = open_maintenance(gw, now)?;
    }
    Ok(done)
}

/// Whether `t` is a maintenance ticket whose device has maintenance recorded as done
/// since the ticket was opened.
fn maintained_since(gw: &Gateway, t: &TicketRecord) -> Result<bool, StoreError> {
    if t.kind != SignalKind::MaintenanceDue {
        return Ok(false);
    }
    Ok(gw
        .store
        .maintenance_done(&t.device)?
        .iter()
        .any(|m| m.done_at >= t.detected_at))
}

fn queue_events(
    gw: &Gateway,
    t: &TicketRecord,
    events: &[EventRequest],
) -> Result<usize, StoreError> {
    let mut added = Vec::new();
    gw.store.update_ticket(&t.key, &mut |rec| {
        added.clear();
        for e in events {
            if rec.add_event(e)? {
                added.push(e.idempotency_key.clone());
            }
        }
        Ok(added.clone())
    })?;
    for e in events.iter().filter(|e| added.contains(&e.idempotency_key)) {
        let deadline = e.body.detail["deadline"].as_str().unwrap_or("?");
        let kind = e.body.kind.as_str();
        tracing::warn!(ticket = %t.key, device = %t.device, deadline, due = %e.body.detail["due"], "{kind}: the {deadline} deadline of the ticket");
        gw.metrics
            .sla_events
            .get_or_create(&DeadlineLabel {
                deadline: deadline.into(),
                status: kind.trim_start_matches("sla_").into(),
            })
            .inc();
    }
    if !added.is_empty() {
        gw.forwarder_wake.notify_one();
    }
    Ok(added.len())
}

/// A maintenance ticket resolved in the backend is maintenance done, at the time it
/// reached `resolved`.
fn note_maintenance(gw: &Gateway, t: &TicketRecord, now: Timestamp) -> Result<usize, StoreError> {
    if t.kind != SignalKind::MaintenanceDue || t.open {
        return Ok(0);
    }
    let Some(done_at) = reached(&t.status_history, DeadlineKind::Resolve) else {
        return Ok(0);
    };
    let source = format!("ticket {}", t.key);
    let known = gw.store.maintenance_done(&t.device)?;
    if known.iter().any(|m| m.source == source) {
        return Ok(0);
    }
    gw.store.record_maintenance(MaintenanceDone {
        id: 0,
        device: t.device.clone(),
        done_at,
        source,
        note: format!(
            "{} {} resolved in the backend",
            t.code,
            t.ticket_id.as_deref().unwrap_or("")
        ),
        recorded_at: now,
    })?;
    Ok(1)
}

/// The maintenance schedule of a fleet device as of `now`, with the contract it comes
/// from (`None`: no contract in force, the seed's interval, shown but not ticketed).
pub fn schedule_of(
    gw: &Gateway,
    device: &str,
    now: Timestamp,
) -> Result<Option<(maintenance::Schedule, Option<String>)>, StoreError> {
    let Some(entry) = gw.cx.fleet.device(device) else {
        return Ok(None);
    };
    let tz = &gw.cx.tz;
    // What tend recorded, and what the fleet file says was done before it kept records.
    let done: Vec<_> = gw
        .store
        .maintenance_done(device)?
        .iter()
        .map(|m| m.done_at.to_zoned(tz.clone()).date())
        .chain(entry.device.last_maintenance)
        .collect();
    let today = now.to_zoned(tz.clone()).date();
    let contract = entry.contract_on(today);
    let interval = contract
        .map_or(crate::sla::Terms::SEED, |c| c.terms)
        .pm_interval_days;
    Ok(Some((
        maintenance::schedule(entry.device.accepted, &done, interval),
        contract.map(|c| c.id.clone()),
    )))
}

/// Opens the maintenance tickets that fell due; how many were new.
fn open_maintenance(gw: &Gateway, now: Timestamp) -> Result<usize, StoreError> {
    let tz = &gw.cx.tz;
    let today = now.to_zoned(tz.clone()).date();
    let mut opened = 0;
    for entry in gw.cx.fleet.devices() {
        let id = entry.device.id.as_str();
        let Some((s, Some(contract))) = schedule_of(gw, id, now)? else {
            continue;
        };
        if !maintenance::ticket_due(&s, today) {
            continue;
        }
        let key = crate::ticket::ticket_key(&maintenance::episode(id, s.next_due));
        if gw.store.ticket(&key)?.is_some() {
            // Opened by an earlier sweep: nothing to build, nothing to write.
            continue;
        }
        let ev = maintenance::due_event(id, &s, &contract, now);
        let live = gw.store.device(id)?;
        let identity = live
            .as_ref()
            .and_then(|d| d.identity.as_ref())
            .map(|i| DeviceIdentity {
                model: i.model.clone(),
                firmware: i.firmware.clone(),
                serial: i.serial.clone(),
                profile: i.profile.clone(),
            });
        let agent = live.as_ref().map_or("", |d| d.agent.as_str());
        let facts = DeviceFacts::resolve(&entry, identity.as_ref(), &gw.cx.profiles);
        let cx = TicketContext {
            gateway: &gw.cx.gateway,
            agent,
            entry,
            facts: &facts,
            tz,
        };
        let req = build_ticket(&cx, &ev);
        let ticket = TicketRecord::new(&req, id, agent, ev.opened_at, now)?;
        if gw.store.open_ticket(ticket)? {
            tracing::info!(device = id, due = %s.next_due, contract = %contract, "preventive maintenance due: ticket opened");
            gw.metrics.tickets_opened.inc();
            opened += 1;
        }
    }
    if opened > 0 {
        gw.forwarder_wake.notify_one();
    }
    Ok(opened)
}

/// Sweeps at start and then every `every` until `shutdown`.
pub async fn run(
    gw: Gateway,
    every: Duration,
    maintenance_tickets: bool,
    shutdown: CancellationToken,
) {
    // A tiny status_poll must not turn the sweep (every ticket read) into a busy loop.
    let every = every.max(Duration::from_secs(1));
    loop {
        let g = gw.clone();
        match tokio::task::spawn_blocking(move || sweep(&g, Timestamp::now(), maintenance_tickets))
            .await
        {
            Ok(Ok(s)) if s != Sweep::default() => tracing::debug!(?s, "service watch"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!("service watch: {e}"),
            Err(e) => tracing::error!("service watch stopped a sweep: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

//! Preventive maintenance from the contract, for every device: due every
//! `pm_interval_days` from acceptance or from the last maintenance done, whatever the device
//! itself reports (the AV-500 counts its own interval, the LIP-300 keeps its last date, the
//! HM-2 and VM-12 say nothing).
//!
//! Pure: dates and times are arguments.

use jiff::civil::Date;
use jiff::{Timestamp, ToSpan};
use serde::Serialize;
use std::collections::BTreeMap;
use tend_profiles::{FaultClass, SignalKind};
use tend_wire::{EpisodeChange, EpisodeEvent};

/// A maintenance ticket opens this many days before the due date, so the visit can be
/// planned; its `resolve_by` is the end of the due date.
pub const LEAD_DAYS: i32 = 14;
/// The code of a maintenance ticket the contract makes due.
pub const PM_CODE: &str = "PM";

/// When a device's next preventive maintenance is due, and from what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Schedule {
    pub interval_days: u32,
    /// The last maintenance done (local date), if any.
    pub last_done: Option<Date>,
    /// `acceptance` or `last_maintenance`: what the interval counts from.
    pub counted_from: &'static str,
    pub next_due: Date,
    /// The day its ticket opens ([`LEAD_DAYS`] before).
    pub ticket_from: Date,
}

/// The schedule of a device accepted on `accepted` with maintenance done on `done` (any
/// order; dates before acceptance are ignored).
pub fn schedule(accepted: Date, done: &[Date], interval_days: u32) -> Schedule {
    let last_done = done.iter().copied().filter(|d| *d >= accepted).max();
    let base = last_done.unwrap_or(accepted);
    let next_due = base
        .checked_add((interval_days as i32).days())
        .unwrap_or(Date::MAX);
    Schedule {
        interval_days,
        last_done,
        counted_from: if last_done.is_some() {
            "last_maintenance"
        } else {
            "acceptance"
        },
        next_due,
        ticket_from: next_due.checked_sub(LEAD_DAYS.days()).unwrap_or(next_due),
    }
}

/// Whether the ticket of `s` should be open on `today`.
pub fn ticket_due(s: &Schedule, today: Date) -> bool {
    today >= s.ticket_from
}

/// The episode id of the maintenance due on `due` for `device`: one ticket per due date.
pub fn episode(device: &str, due: Date) -> String {
    format!("pm/{device}/{due}")
}

/// The maintenance-due "episode" a ticket is built from, detected `now`: the moment the
/// gateway opens the ticket is when its response time starts (a time taken from the
/// calendar, such as the day's start, would make the answer late before anyone could
/// give it). The ticket's key comes from device and due date alone, and the store opens
/// a key once.
pub fn due_event(device: &str, s: &Schedule, contract: &str, now: Timestamp) -> EpisodeEvent {
    let opened_at = now;
    let mut evidence = BTreeMap::new();
    evidence.insert("contract".into(), contract.into());
    evidence.insert("interval_days".into(), s.interval_days.into());
    evidence.insert(
        "last_done".into(),
        s.last_done.map(|d| d.to_string()).into(),
    );
    evidence.insert("counted_from".into(), s.counted_from.into());
    EpisodeEvent {
        episode: episode(device, s.next_due),
        change: EpisodeChange::Opened,
        code: PM_CODE.into(),
        kind: SignalKind::MaintenanceDue,
        class: Some(FaultClass::Simple),
        description: format!(
            "Preventive maintenance due on {} (every {} days under contract {contract})",
            s.next_due, s.interval_days
        ),
        action: Some("Schedule the preventive maintenance visit with the customer.".into()),
        evidence,
        device_available: true,
        opened_at,
        due: Some(s.next_due.to_string()),
        opening: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    #[test]
    fn due_from_acceptance_then_from_the_last_maintenance() {
        let s = schedule(date(2025, 3, 1), &[], 182);
        assert_eq!(s.next_due, date(2025, 8, 30));
        assert_eq!(s.counted_from, "acceptance");
        assert_eq!(s.ticket_from, date(2025, 8, 16));
        assert!(!ticket_due(&s, date(2025, 8, 15)));
        assert!(ticket_due(&s, date(2025, 8, 16)));
        // Done early, late, twice: the latest counts; before acceptance does not.
        let s = schedule(
            date(2025, 3, 1),
            &[date(2025, 9, 10), date(2024, 1, 1), date(2025, 8, 1)],
            182,
        );
        assert_eq!(s.last_done, Some(date(2025, 9, 10)));
        assert_eq!(s.next_due, date(2026, 3, 11));
        assert_eq!(s.counted_from, "last_maintenance");
    }

    #[test]
    fn one_episode_per_due_date_detected_when_opened() {
        let s = schedule(date(2026, 6, 1), &[], 30);
        let now: Timestamp = "2026-06-17T09:00:00Z".parse().unwrap();
        let a = due_event("d", &s, "k", now);
        assert_eq!(a.opened_at, now);
        assert_eq!(a.episode, "pm/d/2026-07-01");
        assert_eq!(a.due.as_deref(), Some("2026-07-01"));
        assert_eq!(a.kind, SignalKind::MaintenanceDue);
        assert_eq!(a.evidence["last_done"], serde_json::Value::Null);
    }
}

//! The SLA watch's judgement: whether each deadline of a ticket was met, missed, is at
//! risk or still pending, from the backend's status history (DESIGN "Service level").
//!
//! `respond` is met when the ticket reached `acknowledged` (or any later status) by
//! `respond_by`, `onsite` by `on_site`, `plan` by `plan_agreed`, `resolve` by `resolved`.
//! A ticket may skip steps (a simple fault solved by phone goes from `acknowledged` to
//! `resolved`), so a later status reaches every earlier step. A deadline not reached is
//! `at_risk` once more than 75 % of its time is gone and `missed` once it passed.
//!
//! Pure: the time is always an argument.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The four promises a ticket can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineKind {
    Respond,
    Onsite,
    Plan,
    Resolve,
}

impl DeadlineKind {
    pub const ALL: [DeadlineKind; 4] = [
        DeadlineKind::Respond,
        DeadlineKind::Onsite,
        DeadlineKind::Plan,
        DeadlineKind::Resolve,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeadlineKind::Respond => "respond",
            DeadlineKind::Onsite => "onsite",
            DeadlineKind::Plan => "plan",
            DeadlineKind::Resolve => "resolve",
        }
    }

    /// The backend status that keeps this promise (or any later one).
    pub fn kept_by(self) -> &'static str {
        match self {
            DeadlineKind::Respond => "acknowledged",
            DeadlineKind::Onsite => "on_site",
            DeadlineKind::Plan => "plan_agreed",
            DeadlineKind::Resolve => "resolved",
        }
    }
}

impl fmt::Display for DeadlineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a deadline stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SlaState {
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "at_risk")]
    AtRisk,
    #[serde(rename = "met")]
    Met,
    #[serde(rename = "missed")]
    Missed,
    /// The ticket has no such deadline.
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl SlaState {
    pub fn as_str(self) -> &'static str {
        match self {
            SlaState::Pending => "pending",
            SlaState::AtRisk => "at_risk",
            SlaState::Met => "met",
            SlaState::Missed => "missed",
            SlaState::NotApplicable => "n/a",
        }
    }
}

/// Past this share of a deadline's time, a deadline not yet kept is at risk.
pub const AT_RISK_AFTER: f64 = 0.75;

/// One change of a ticket's status in the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub status: String,
    pub at: Timestamp,
}

/// The backend's statuses in their usual order; `None` for one it may add later (it
/// reaches nothing).
pub fn rank(status: &str) -> Option<u8> {
    Some(match status {
        "open" => 0,
        "acknowledged" => 1,
        "engineer_dispatched" => 2,
        "on_site" => 3,
        "plan_agreed" => 4,
        "resolved" => 5,
        "closed" => 6,
        _ => return None,
    })
}

/// When the history first reached the status that keeps `kind` (or a later one).
pub fn reached(history: &[StatusChange], kind: DeadlineKind) -> Option<Timestamp> {
    let need = rank(kind.kept_by())?;
    history
        .iter()
        .filter(|c| rank(&c.status).is_some_and(|r| r >= need))
        .map(|c| c.at)
        .min()
}

/// A deadline due at `due`, counted from `from`, kept at `kept` (if it was), as of `now`.
pub fn judge(
    from: Timestamp,
    due: Option<Timestamp>,
    kept: Option<Timestamp>,
    now: Timestamp,
) -> SlaState {
    let Some(due) = due else {
        return SlaState::NotApplicable;
    };
    match kept {
        Some(k) if k <= due => SlaState::Met,
        Some(_) => SlaState::Missed,
        None if now >= due => SlaState::Missed,
        None if now >= risk_from(from, due) => SlaState::AtRisk,
        None => SlaState::Pending,
    }
}

/// The moment a deadline from `from` to `due` becomes at risk (75 % of its time gone).
pub fn risk_from(from: Timestamp, due: Timestamp) -> Timestamp {
    let span = due.duration_since(from);
    if span <= SignedDuration::ZERO {
        return due;
    }
    let gone = SignedDuration::from_secs_f64(span.as_secs_f64() * AT_RISK_AFTER);
    from.checked_add(gone).unwrap_or(due)
}

/// A ticket's deadlines with where each one counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promises {
    /// Detection: the response time counts from here.
    pub detected: Timestamp,
    /// Where each class deadline counts from: detection, or the moment the class rose to
    /// the class that set it.
    pub onsite_from: Timestamp,
    pub plan_from: Timestamp,
    pub resolve_from: Timestamp,
    pub respond_by: Option<Timestamp>,
    pub onsite_by: Option<Timestamp>,
    pub plan_by: Option<Timestamp>,
    pub resolve_by: Option<Timestamp>,
}

impl Promises {
    pub fn due(&self, kind: DeadlineKind) -> Option<Timestamp> {
        match kind {
            DeadlineKind::Respond => self.respond_by,
            DeadlineKind::Onsite => self.onsite_by,
            DeadlineKind::Plan => self.plan_by,
            DeadlineKind::Resolve => self.resolve_by,
        }
    }

    pub fn counted_from(&self, kind: DeadlineKind) -> Timestamp {
        match kind {
            DeadlineKind::Respond => self.detected,
            DeadlineKind::Onsite => self.onsite_from,
            DeadlineKind::Plan => self.plan_from,
            DeadlineKind::Resolve => self.resolve_from,
        }
    }

    /// Every deadline judged against `history` as of `now`.
    pub fn judge(&self, history: &[StatusChange], now: Timestamp) -> SlaStatus {
        let j =
            |k: DeadlineKind| judge(self.counted_from(k), self.due(k), reached(history, k), now);
        SlaStatus {
            respond: j(DeadlineKind::Respond),
            onsite: j(DeadlineKind::Onsite),
            plan: j(DeadlineKind::Plan),
            resolve: j(DeadlineKind::Resolve),
        }
    }
}

/// The `sla_status` of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlaStatus {
    pub respond: SlaState,
    pub onsite: SlaState,
    pub plan: SlaState,
    pub resolve: SlaState,
}

impl SlaStatus {
    pub fn get(&self, kind: DeadlineKind) -> SlaState {
        match kind {
            DeadlineKind::Respond => self.respond,
            DeadlineKind::Onsite => self.onsite,
            DeadlineKind::Plan => self.plan,
            DeadlineKind::Resolve => self.resolve,
        }
    }

    /// The worst of the four, for a one-word summary: missed, at_risk, pending, met, n/a.
    pub fn worst(&self) -> SlaState {
        let order = |s: SlaState| match s {
            SlaState::Missed => 0,
            SlaState::AtRisk => 1,
            SlaState::Pending => 2,
            SlaState::Met => 3,
            SlaState::NotApplicable => 4,
        };
        DeadlineKind::ALL
            .iter()
            .map(|k| self.get(*k))
            .min_by_key(|s| order(*s))
            .unwrap_or(SlaState::NotApplicable)
    }
}

/// The history the gateway keeps after a read: the backend's own history when it sends
/// one (v1.1), else the one kept so far with the status read appended, stamped `read_at`,
/// when it changed (v1 backends: only the status and the time it was read are known).
pub fn merge_history(
    kept: &[StatusChange],
    status: &str,
    backend_history: Option<Vec<StatusChange>>,
    read_at: Timestamp,
) -> Vec<StatusChange> {
    if let Some(mut h) = backend_history.filter(|h| !h.is_empty()) {
        h.sort_by_key(|c| c.at);
        return h;
    }
    let mut out = kept.to_vec();
    if out.last().map(|c| c.status.as_str()) != Some(status) {
        out.push(StatusChange {
            status: status.to_string(),
            at: read_at,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn h(items: &[(&str, i64)]) -> Vec<StatusChange> {
        items
            .iter()
            .map(|(s, at)| StatusChange {
                status: s.to_string(),
                at: t(*at),
            })
            .collect()
    }

    #[test]
    fn each_deadline_is_kept_by_its_status_or_a_later_one() {
        let hist = h(&[("open", 0), ("acknowledged", 600), ("resolved", 5000)]);
        assert_eq!(reached(&hist, DeadlineKind::Respond), Some(t(600)));
        // Solved by phone: resolved reaches on-site and plan too.
        assert_eq!(reached(&hist, DeadlineKind::Onsite), Some(t(5000)));
        assert_eq!(reached(&hist, DeadlineKind::Plan), Some(t(5000)));
        assert_eq!(reached(&hist, DeadlineKind::Resolve), Some(t(5000)));
        // Dispatched is not on site; an unknown status reaches nothing.
        let hist = h(&[("engineer_dispatched", 100), ("waiting_parts", 200)]);
        assert_eq!(reached(&hist, DeadlineKind::Respond), Some(t(100)));
        assert_eq!(reached(&hist, DeadlineKind::Onsite), None);
    }

    #[test]
    fn judgement_at_every_point_of_a_deadline() {
        let (from, due) = (t(0), Some(t(3600)));
        assert_eq!(judge(from, None, None, t(0)), SlaState::NotApplicable);
        assert_eq!(judge(from, due, None, t(0)), SlaState::Pending);
        assert_eq!(judge(from, due, None, t(2699)), SlaState::Pending);
        assert_eq!(judge(from, due, None, t(2700)), SlaState::AtRisk);
        assert_eq!(judge(from, due, None, t(3599)), SlaState::AtRisk);
        assert_eq!(judge(from, due, None, t(3600)), SlaState::Missed);
        assert_eq!(judge(from, due, Some(t(3600)), t(9999)), SlaState::Met);
        assert_eq!(judge(from, due, Some(t(3601)), t(9999)), SlaState::Missed);
        // Kept early: met at once, whatever the time now.
        assert_eq!(judge(from, due, Some(t(10)), t(20)), SlaState::Met);
        // A deadline already due at its start (a due date in the past).
        assert_eq!(judge(t(10), Some(t(10)), None, t(10)), SlaState::Missed);
    }

    #[test]
    fn escalated_deadlines_count_from_the_rise() {
        let p = Promises {
            detected: t(0),
            onsite_from: t(10_000),
            plan_from: t(10_000),
            resolve_from: t(10_000),
            respond_by: Some(t(3600)),
            onsite_by: Some(t(10_000 + 4000)),
            plan_by: None,
            resolve_by: Some(t(10_000 + 8000)),
        };
        // 75 % of the resolve time from the rise (17 500), not from detection (15 000).
        let p = Promises {
            resolve_by: Some(t(20_000)),
            ..p
        };
        let s = p.judge(&h(&[("acknowledged", 100)]), t(16_000));
        assert_eq!(s.respond, SlaState::Met);
        assert_eq!(s.onsite, SlaState::Missed);
        assert_eq!(s.plan, SlaState::NotApplicable);
        assert_eq!(s.resolve, SlaState::Pending);
        assert_eq!(s.worst(), SlaState::Missed);
        let s = p.judge(&h(&[("acknowledged", 100)]), t(17_500));
        assert_eq!(s.resolve, SlaState::AtRisk);
    }

    #[test]
    fn history_from_the_backend_wins_else_reads_are_stamped() {
        let kept = h(&[("open", 0)]);
        let merged = merge_history(&kept, "acknowledged", None, t(50));
        assert_eq!(merged, h(&[("open", 0), ("acknowledged", 50)]));
        // The same status read again adds nothing.
        assert_eq!(merge_history(&merged, "acknowledged", None, t(99)), merged);
        // A v1.1 backend's history replaces the reads, sorted.
        let backend = h(&[("acknowledged", 30), ("open", 1)]);
        assert_eq!(
            merge_history(&merged, "acknowledged", Some(backend), t(99)),
            h(&[("open", 1), ("acknowledged", 30)])
        );
        assert_eq!(
            serde_json::to_value(SlaState::NotApplicable).unwrap(),
            serde_json::json!("n/a")
        );
    }
}

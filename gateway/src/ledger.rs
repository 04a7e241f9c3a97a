//! The availability ledger: per device, how long it was `up`, `down`, in `maintenance` or
//! `unknown` over any window, and how far it is from the contractual 99.5 %.
//!
//! The ledger keeps the device's state transitions keyed by the agent's time, not by when
//! they arrived: an agent that comes back after an outage replays its outbox, and those
//! late transitions slot into the gap they belong to, so the gap fills with what really
//! happened. The result depends only on the set of transitions, never on arrival order.
//!
//! Arithmetic is exact (whole nanoseconds); seconds as `f64` appear only in the report.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::Serialize;
use std::collections::BTreeSet;
use tend_profiles::DeviceState;

/// The contractual availability: 99.5 %.
pub const TARGET: f64 = 0.995;

/// One device's state history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// (agent time, agent seq, new state). The seq orders two transitions stamped with the
    /// same instant; the state in the key keeps even a conflicting duplicate deterministic.
    transitions: BTreeSet<(Timestamp, u64, DeviceState)>,
    /// The latest agent time heard from this device (any record). The last state holds up
    /// to here; after it nobody knows.
    heard_until: Option<Timestamp>,
}

/// Time spent in each state, exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub up: SignedDuration,
    pub down: SignedDuration,
    pub maintenance: SignedDuration,
    pub unknown: SignedDuration,
}

impl Totals {
    pub fn sum(&self) -> SignedDuration {
        self.up + self.down + self.maintenance + self.unknown
    }

    fn add(&mut self, state: DeviceState, d: SignedDuration) {
        let slot = match state {
            DeviceState::Up => &mut self.up,
            DeviceState::Down => &mut self.down,
            DeviceState::Maintenance => &mut self.maintenance,
            DeviceState::Unknown => &mut self.unknown,
        };
        *slot += d;
    }
}

/// The hotline's availability answer (DESIGN §4), field for field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AvailabilityReport {
    pub device: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub up_s: f64,
    pub down_s: f64,
    pub maintenance_s: f64,
    pub unknown_s: f64,
    /// up ÷ (up + down); `None` (JSON null) when both are 0.
    pub availability: Option<f64>,
    /// (up + down + maintenance) ÷ the elapsed part of the window; `None` for an empty one.
    pub coverage: Option<f64>,
    pub target: f64,
    /// See [`downtime_budget`].
    pub downtime_budget_s: f64,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a state transition at the agent's time `at` (with the record's `seq`). Any
    /// order; a repeat of the same record changes nothing.
    pub fn transition(&mut self, at: Timestamp, seq: u64, to: DeviceState) {
        self.transitions.insert((at, seq, to));
        self.heard(at);
    }

    /// Notes that a record of this device (of any kind) was made at `at`: the current state
    /// is known to have lasted at least until then.
    ///
    /// Only the latest time is kept, so a silence *between* two records (an agent that
    /// died and restarted, with nothing to replay) is not seen here: whoever learns of it
    /// (the agent's `offline` will, or a transition whose `from` is `unknown`) records a
    /// transition to `Unknown` at the last time heard before it.
    pub fn heard(&mut self, at: Timestamp) {
        if self.heard_until.is_none_or(|h| at > h) {
            self.heard_until = Some(at);
        }
    }

    pub fn heard_until(&self) -> Option<Timestamp> {
        self.heard_until
    }

    /// The state at `at` as far as the ledger knows (`Unknown` before the first transition
    /// and after the last record heard).
    pub fn state_at(&self, at: Timestamp) -> DeviceState {
        if self.heard_until.is_none_or(|h| at >= h) {
            return DeviceState::Unknown;
        }
        self.transitions
            .range(..=(at, u64::MAX, DeviceState::Unknown))
            .next_back()
            .map(|t| t.2)
            .unwrap_or(DeviceState::Unknown)
    }

    /// Drops transitions before `before` that no window starting at or after `before` needs
    /// (all but the last one before it), to bound memory for a device's long life.
    pub fn forget_before(&mut self, before: Timestamp) {
        let keep = self
            .transitions
            .range(..(before, 0, DeviceState::Up))
            .next_back()
            .copied();
        if let Some(keep) = keep {
            self.transitions = self.transitions.split_off(&keep);
        }
    }

    /// Time in each state over `[from, to)`. The state before the first transition is
    /// unknown, and so is the time after the last record heard.
    pub fn totals(&self, from: Timestamp, to: Timestamp) -> Totals {
        let mut t = Totals::default();
        if to <= from {
            return t;
        }
        let known_end = self.heard_until.map_or(from, |h| h.clamp(from, to));
        let mut cursor = from;
        let mut state = self
            .transitions
            .range(..=(from, u64::MAX, DeviceState::Unknown))
            .next_back()
            .map_or(DeviceState::Unknown, |x| x.2);
        for &(at, _, to_state) in self
            .transitions
            .range((from, u64::MAX, DeviceState::Unknown)..)
        {
            if at >= known_end {
                break;
            }
            if at > cursor {
                t.add(state, at.duration_since(cursor));
                cursor = at;
            }
            state = to_state;
        }
        if known_end > cursor {
            t.add(state, known_end.duration_since(cursor));
        }
        if to > known_end.max(cursor) {
            t.add(
                DeviceState::Unknown,
                to.duration_since(known_end.max(cursor)),
            );
        }
        t
    }

    /// The hotline report for `[from, to)` as of `now`. The state fields cover the elapsed
    /// part `[from, min(to, now))`; the rest of the window (the future) enters only the
    /// downtime budget, as time that may still be up or down.
    pub fn report(
        &self,
        device: &str,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
    ) -> AvailabilityReport {
        let elapsed_end = to.min(now).max(from);
        let t = self.totals(from, elapsed_end);
        let future = if to > elapsed_end {
            to.duration_since(elapsed_end)
        } else {
            SignedDuration::ZERO
        };
        let secs = |d: SignedDuration| d.as_secs_f64();
        let window = secs(elapsed_end.duration_since(from));
        let counted = secs(t.up) + secs(t.down);
        AvailabilityReport {
            device: device.to_string(),
            from,
            to,
            up_s: secs(t.up),
            down_s: secs(t.down),
            maintenance_s: secs(t.maintenance),
            unknown_s: secs(t.unknown),
            availability: (counted > 0.0).then(|| secs(t.up) / counted),
            coverage: (window > 0.0)
                .then(|| (secs(t.up) + secs(t.down) + secs(t.maintenance)) / window),
            target: TARGET,
            downtime_budget_s: downtime_budget(&t, future, TARGET),
        }
    }
}

/// The down time a window may still take while its availability stays at or above
/// `target`, in seconds:
///
/// `max(0, (1 − target) × (up + down + future) − down)`
///
/// where `future` is the part of the window not yet elapsed. It is the answer to a service
/// manager's "how much more downtime can this device have this month and still make
/// 99.5 %?": more down time replaces either up time already counted or time still to
/// come (both assumed usable), and availability = up ÷ (up + down) stays ≥ target exactly
/// while the total down ≤ (1 − target) × (up + down). Maintenance and unknown time count
/// neither way, as in availability itself. At the start of a fully monitored 30-day month
/// the budget is 0.005 × 30 d = 3.6 h. A device below target so far may still have a
/// budget (the rest of the month can make up for it); the budget is 0 once the window's
/// down time already exceeds what the target allows for the whole window. For a window
/// wholly in the past (`future` = 0) it is how much up time could still have been down.
pub fn downtime_budget(t: &Totals, future: SignedDuration, target: f64) -> f64 {
    let counted = t.up.as_secs_f64() + t.down.as_secs_f64() + future.as_secs_f64().max(0.0);
    ((1.0 - target) * counted - t.down.as_secs_f64()).max(0.0)
}

/// `[start, end)` of the calendar month containing `at` in `tz` (local midnight of the
/// 1st to local midnight of the next 1st).
pub fn month_window(at: Timestamp, tz: &TimeZone) -> (Timestamp, Timestamp) {
    let local = at.to_zoned(tz.clone());
    let first = local.date().first_of_month();
    let start = first.to_zoned(tz.clone());
    let next = first
        .checked_add(1.month())
        .and_then(|d| d.to_zoned(tz.clone()));
    match (start, next) {
        (Ok(s), Ok(n)) => (s.timestamp(), n.timestamp()),
        // Only at the ends of jiff's range (years -9999 / 9999): a one-instant window.
        _ => (at, at),
    }
}

/// A device below target in the month so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BelowTarget {
    pub device: String,
    pub availability: f64,
    /// The month's remaining downtime budget (0 once the month is already lost).
    pub downtime_budget_s: f64,
    pub report: AvailabilityReport,
}

/// Every device whose availability in the calendar month containing `now` (in `tz`) is
/// below 99.5 %, with its remaining downtime budget for that month (the rest of the month
/// counts as future). Devices without up or down time are not flagged: nothing is known.
pub fn below_target_this_month<'a>(
    ledgers: impl IntoIterator<Item = (&'a str, &'a Ledger)>,
    now: Timestamp,
    tz: &TimeZone,
) -> Vec<BelowTarget> {
    let (from, to) = month_window(now, tz);
    ledgers
        .into_iter()
        .filter_map(|(device, ledger)| {
            let report = ledger.report(device, from, to, now);
            let a = report.availability?;
            (a < TARGET).then(|| BelowTarget {
                device: device.to_string(),
                availability: a,
                downtime_budget_s: report.downtime_budget_s,
                report,
            })
        })
        .collect()
}

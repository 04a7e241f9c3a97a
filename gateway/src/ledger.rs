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

/// The seed's availability target, 99.5 % (a contract may set another).
pub const TARGET: f64 = crate::sla::Terms::SEED.availability_target;

/// One device's state history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// (agent time, agent seq, new state). The seq orders two transitions stamped with the
    /// same instant; the state in the key keeps even a conflicting duplicate deterministic.
    transitions: BTreeSet<(Timestamp, u64, DeviceState)>,
    /// The latest agent time heard from this device (any record). The last state holds up
    /// to here; after it nobody knows (except `down`, see [`Ledger::totals`]).
    heard_until: Option<Timestamp>,
    /// Intervals `[from, to)` the hotline excluded (customer caused, force majeure,
    /// planned): neither up nor down.
    exclusions: BTreeSet<(Timestamp, Timestamp)>,
}

/// Time spent in each state, exact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub up: SignedDuration,
    pub down: SignedDuration,
    pub maintenance: SignedDuration,
    pub unknown: SignedDuration,
    /// Time inside an exclusion, whatever the device's state was.
    pub excluded: SignedDuration,
}

impl Totals {
    pub fn sum(&self) -> SignedDuration {
        self.up + self.down + self.maintenance + self.unknown + self.excluded
    }

    fn add(&mut self, state: Span, d: SignedDuration) {
        let slot = match state {
            Span::State(DeviceState::Up) => &mut self.up,
            Span::State(DeviceState::Down) => &mut self.down,
            Span::State(DeviceState::Maintenance) => &mut self.maintenance,
            Span::State(DeviceState::Unknown) => &mut self.unknown,
            Span::Excluded => &mut self.excluded,
        };
        *slot += d;
    }
}

/// What a stretch of a device's timeline was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", untagged)]
pub enum Span {
    State(DeviceState),
    /// Excluded by the hotline: counts neither as up nor as down.
    #[serde(serialize_with = "excluded_str")]
    Excluded,
}

fn excluded_str<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("excluded")
}

impl Span {
    pub fn as_str(self) -> &'static str {
        match self {
            Span::State(s) => s.as_str(),
            Span::Excluded => "excluded",
        }
    }
}

/// One stretch of a timeline: `[from, to)` in one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Stretch {
    pub from: Timestamp,
    pub to: Timestamp,
    pub state: Span,
}

/// How the downtime budget of a period stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetStatus {
    /// Half of the period's budget or more is left.
    Ok,
    /// Less than half of the period's budget is left.
    AtRisk,
    /// The budget is spent: the target can no longer be met in this period.
    Breached,
}

impl BudgetStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetStatus::Ok => "ok",
            BudgetStatus::AtRisk => "at_risk",
            BudgetStatus::Breached => "breached",
        }
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
    /// Time the hotline excluded (with a reason): neither up nor down.
    pub excluded_s: f64,
    /// up ÷ (up + down); `None` (JSON null) when both are 0.
    pub availability: Option<f64>,
    /// (up + down + maintenance + excluded) ÷ the elapsed part of the window: how much of
    /// it is known; `None` for an empty one.
    pub coverage: Option<f64>,
    pub target: f64,
    /// The down time the whole window allows at the target ([`Budget::allowed`]).
    pub downtime_allowed_s: f64,
    /// What of it is left ([`Budget::remaining`]): the one budget figure.
    pub downtime_budget_s: f64,
    pub budget_status: BudgetStatus,
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
    /// died and restarted) is not seen here: the agent itself reports it when it starts
    /// again, with a transition to `unknown` stamped at its last observation before it
    /// stopped.
    pub fn heard(&mut self, at: Timestamp) {
        if self.heard_until.is_none_or(|h| at > h) {
            self.heard_until = Some(at);
        }
    }

    pub fn heard_until(&self) -> Option<Timestamp> {
        self.heard_until
    }

    /// Excludes `[from, to)`: that time counts neither as up nor as down. Overlaps are the
    /// caller's to refuse; the arithmetic merges them.
    pub fn exclude(&mut self, from: Timestamp, to: Timestamp) {
        if from < to {
            self.exclusions.insert((from, to));
        }
    }

    /// The last state recorded at or before `at`, heard or not.
    fn recorded_at(&self, at: Timestamp) -> DeviceState {
        self.transitions
            .range(..=(at, u64::MAX, DeviceState::Unknown))
            .next_back()
            .map_or(DeviceState::Unknown, |x| x.2)
    }

    /// The state at `at` as far as the ledger knows: `Unknown` before the first transition;
    /// after the last record heard `Unknown`, unless the device was `down` then. A broken
    /// device that falls silent (switched off, unplugged) is still broken: its down time
    /// goes on counting until a record says otherwise. An agent that stops running says so
    /// itself when it starts again (a transition to `unknown` at its last observation), and
    /// that replaces the presumed down time with unknown.
    pub fn state_at(&self, at: Timestamp) -> DeviceState {
        match self.heard_until {
            None => DeviceState::Unknown,
            Some(h) if at >= h => match self.recorded_at(h) {
                DeviceState::Down => DeviceState::Down,
                _ => DeviceState::Unknown,
            },
            Some(_) => self.recorded_at(at),
        }
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

    /// The device's states over `[from, to)` as consecutive stretches (adjacent ones in
    /// the same state merged), before exclusions. The state before the first transition is
    /// unknown, and so is the time after the last record heard, unless the device was down
    /// then ([`Ledger::state_at`]).
    fn states(&self, from: Timestamp, to: Timestamp) -> Vec<Stretch> {
        let mut out: Vec<Stretch> = Vec::new();
        let mut push = |a: Timestamp, b: Timestamp, s: DeviceState| {
            if b <= a {
                return;
            }
            match out.last_mut() {
                Some(last) if last.state == Span::State(s) && last.to == a => last.to = b,
                _ => out.push(Stretch {
                    from: a,
                    to: b,
                    state: Span::State(s),
                }),
            }
        };
        if to <= from {
            return out;
        }
        let known_end = self.heard_until.map_or(from, |h| h.clamp(from, to));
        let mut cursor = from;
        let mut state = self.recorded_at(from);
        for &(at, _, to_state) in self
            .transitions
            .range((from, u64::MAX, DeviceState::Unknown)..)
        {
            if at >= known_end {
                break;
            }
            if at > cursor {
                push(cursor, at, state);
                cursor = at;
            }
            state = to_state;
        }
        if known_end > cursor {
            push(cursor, known_end, state);
            cursor = known_end;
        }
        // After the last record heard (every transition is a record heard, so none comes
        // later): down holds, anything else is unknown.
        let silent_down = self
            .heard_until
            .is_some_and(|h| self.recorded_at(h) == DeviceState::Down);
        let tail_state = if silent_down {
            DeviceState::Down
        } else {
            DeviceState::Unknown
        };
        push(cursor, to, tail_state);
        out
    }

    /// The device's timeline over `[from, to)`: its states, with excluded time cut out as
    /// [`Span::Excluded`]. Consecutive stretches, covering the window exactly.
    pub fn timeline(&self, from: Timestamp, to: Timestamp) -> Vec<Stretch> {
        let states = self.states(from, to);
        let excl = merged(&self.exclusions);
        let mut out: Vec<Stretch> = Vec::new();
        let mut push = |a: Timestamp, b: Timestamp, s: Span| {
            if b <= a {
                return;
            }
            match out.last_mut() {
                Some(last) if last.state == s && last.to == a => last.to = b,
                _ => out.push(Stretch {
                    from: a,
                    to: b,
                    state: s,
                }),
            }
        };
        for st in states {
            let mut cursor = st.from;
            for &(xa, xb) in excl.iter().filter(|(xa, xb)| *xb > st.from && *xa < st.to) {
                let (xa, xb) = (xa.max(st.from), xb.min(st.to));
                push(cursor, xa, st.state);
                push(xa, xb, Span::Excluded);
                cursor = xb;
            }
            push(cursor, st.to, st.state);
        }
        out
    }

    /// Time in each state over `[from, to)` ([`Ledger::timeline`] summed).
    pub fn totals(&self, from: Timestamp, to: Timestamp) -> Totals {
        let mut t = Totals::default();
        for s in self.timeline(from, to) {
            t.add(s.state, s.to.duration_since(s.from));
        }
        t
    }

    /// The hotline report for `[from, to)` as of `now`, against `target`. The state fields
    /// cover the elapsed part `[from, min(to, now))`; the rest of the window (the future)
    /// enters only the downtime budget, as time that may still be up or down.
    pub fn report(
        &self,
        device: &str,
        from: Timestamp,
        to: Timestamp,
        now: Timestamp,
        target: f64,
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
        let budget = Budget::of(&t, future, target);
        AvailabilityReport {
            device: device.to_string(),
            from,
            to,
            up_s: secs(t.up),
            down_s: secs(t.down),
            maintenance_s: secs(t.maintenance),
            unknown_s: secs(t.unknown),
            excluded_s: secs(t.excluded),
            availability: (counted > 0.0).then(|| secs(t.up) / counted),
            coverage: (window > 0.0).then(|| {
                (secs(t.up) + secs(t.down) + secs(t.maintenance) + secs(t.excluded)) / window
            }),
            target,
            downtime_allowed_s: budget.allowed,
            downtime_budget_s: budget.remaining(),
            budget_status: budget.status(),
        }
    }
}

/// Overlapping or touching intervals joined, in order.
fn merged(set: &BTreeSet<(Timestamp, Timestamp)>) -> Vec<(Timestamp, Timestamp)> {
    let mut out: Vec<(Timestamp, Timestamp)> = Vec::new();
    for &(a, b) in set {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// A period's downtime budget: what down time the whole period allows at the target, and
/// what of it is spent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// `(1 − target) × (up + down + future)`, seconds: the down time the period may have
    /// with its availability still at the target (maintenance, unknown and excluded time
    /// count neither way, as in availability itself).
    pub allowed: f64,
    /// Down time so far, seconds.
    pub spent: f64,
}

impl Budget {
    pub fn of(t: &Totals, future: SignedDuration, target: f64) -> Budget {
        let counted = t.up.as_secs_f64() + t.down.as_secs_f64() + future.as_secs_f64().max(0.0);
        Budget {
            allowed: (1.0 - target) * counted,
            spent: t.down.as_secs_f64(),
        }
    }

    /// The sum of several devices' budgets (a customer's).
    pub fn sum(budgets: impl IntoIterator<Item = Budget>) -> Budget {
        budgets.into_iter().fold(
            Budget {
                allowed: 0.0,
                spent: 0.0,
            },
            |a, b| Budget {
                allowed: a.allowed + b.allowed,
                spent: a.spent + b.spent,
            },
        )
    }

    /// What down time is left ([`downtime_budget`]).
    pub fn remaining(&self) -> f64 {
        (self.allowed - self.spent).max(0.0)
    }

    /// `breached` once more down time was spent than the period allows (its target can no
    /// longer be met), `at_risk` when less than half is left, else `ok`.
    pub fn status(&self) -> BudgetStatus {
        if self.spent > self.allowed {
            BudgetStatus::Breached
        } else if self.remaining() < self.allowed / 2.0 {
            BudgetStatus::AtRisk
        } else {
            BudgetStatus::Ok
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
    Budget::of(t, future, target).remaining()
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

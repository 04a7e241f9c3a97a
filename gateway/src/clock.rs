//! An agent's clock against the gateway's: records carry the agent's time, batches the
//! agent's time of sending, and the gateway stamps their arrival. Beyond a tolerance
//! (default 2 min) the agent is skewed and its records' times are taken in gateway time
//! (shifted by the offset), so SLA deadlines, warranty and the live picture never follow
//! a wrong clock; and no time is ever later than the batch's arrival, so one
//! future-dated record can neither freeze a device's live picture nor stretch its ledger
//! into the future. Pure: the arrival is given.

use jiff::{SignedDuration, Timestamp};
use std::borrow::Cow;
use tend_wire::{Record, RecordBody};

/// The default tolerance.
pub const DEFAULT_TOLERANCE: SignedDuration = SignedDuration::from_secs(120);

/// How one batch's agent clock relates to the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentClock {
    /// Agent clock minus gateway clock (transit time makes it a little low).
    pub offset: SignedDuration,
    /// `|offset|` beyond the tolerance.
    pub skewed: bool,
    arrival: Timestamp,
}

impl AgentClock {
    /// Judges a batch sent at `sent_at` (agent clock) that arrived at `arrival`.
    pub fn judge(sent_at: Timestamp, arrival: Timestamp, tolerance: SignedDuration) -> Self {
        let offset = sent_at.duration_since(arrival);
        AgentClock {
            offset,
            skewed: offset.abs() > tolerance,
            arrival,
        }
    }

    /// Agent time `at` in gateway time: shifted by the offset when the agent is skewed,
    /// and never after the arrival.
    pub fn to_gateway(&self, at: Timestamp) -> Timestamp {
        let shifted = if self.skewed {
            at.checked_sub(self.offset).unwrap_or(at)
        } else {
            at
        };
        shifted.min(self.arrival)
    }

    /// The record with its times in gateway time; borrowed when nothing changes (the
    /// common case: a clock within tolerance and a record from the past).
    pub fn record<'r>(&self, r: &'r Record) -> Cow<'r, Record> {
        let opened = match &r.body {
            RecordBody::Episode(ev) => Some(ev.opened_at),
            _ => None,
        };
        let unchanged =
            self.to_gateway(r.at) == r.at && opened.is_none_or(|o| self.to_gateway(o) == o);
        if unchanged {
            return Cow::Borrowed(r);
        }
        let mut r = r.clone();
        r.at = self.to_gateway(r.at);
        if let RecordBody::Episode(ev) = &mut r.body {
            ev.opened_at = self.to_gateway(ev.opened_at);
        }
        Cow::Owned(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_profiles::DeviceState;

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn state_at(at: Timestamp) -> Record {
        Record {
            seq: 1,
            at,
            device: "d".into(),
            body: RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
        }
    }

    #[test]
    fn within_tolerance_times_stand_but_never_pass_the_arrival() {
        let arrival = t("2026-12-02T10:00:00Z");
        let c = AgentClock::judge(t("2026-12-02T10:01:00Z"), arrival, DEFAULT_TOLERANCE);
        assert!(!c.skewed);
        assert_eq!(c.offset, SignedDuration::from_secs(60));
        let past = state_at(t("2026-12-02T09:00:00Z"));
        assert!(matches!(c.record(&past), Cow::Borrowed(_)));
        // A record a minute ahead is taken as arriving now, not in the future.
        let ahead = state_at(t("2026-12-02T10:00:50Z"));
        assert_eq!(c.record(&ahead).at, arrival);
    }

    #[test]
    fn a_clock_years_off_is_skewed_and_shifted_both_ways() {
        let arrival = t("2026-12-02T10:00:00Z");
        // Two years ahead: a record made a minute ago by the agent's clock.
        let c = AgentClock::judge(t("2028-12-01T10:00:00Z"), arrival, DEFAULT_TOLERANCE);
        assert!(c.skewed);
        let r = state_at(t("2028-12-01T09:59:00Z"));
        assert_eq!(c.record(&r).at, t("2026-12-02T09:59:00Z"));
        // Three hours behind (a CMOS battery, a zone mix-up).
        let c = AgentClock::judge(t("2026-12-02T07:00:00Z"), arrival, DEFAULT_TOLERANCE);
        assert!(c.skewed);
        assert_eq!(c.offset, SignedDuration::from_hours(-3));
        assert_eq!(
            c.to_gateway(t("2026-12-02T06:30:00Z")),
            t("2026-12-02T09:30:00Z")
        );
        // Shifted times still never pass the arrival.
        assert_eq!(c.to_gateway(t("2026-12-02T08:00:00Z")), arrival);
    }

    #[test]
    fn tolerance_is_a_bound_both_ways() {
        let arrival = t("2026-12-02T10:00:00Z");
        let tol = SignedDuration::from_secs(120);
        assert!(!AgentClock::judge(t("2026-12-02T10:02:00Z"), arrival, tol).skewed);
        assert!(AgentClock::judge(t("2026-12-02T10:02:01Z"), arrival, tol).skewed);
        assert!(!AgentClock::judge(t("2026-12-02T09:58:00Z"), arrival, tol).skewed);
        assert!(AgentClock::judge(t("2026-12-02T09:57:59Z"), arrival, tol).skewed);
    }
}

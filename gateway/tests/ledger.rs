//! The availability ledger: exact sums, order independence, replayed gaps, silent down
//! time, exclusions, the budget and its status.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use tend_gateway::ledger::{
    downtime_budget, month_window, Budget, BudgetStatus, Ledger, Span, Totals, TARGET,
};
use tend_profiles::DeviceState::{self, Down, Maintenance, Unknown, Up};

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn secs(s: i64) -> SignedDuration {
    SignedDuration::from_secs(s)
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const STATES: [DeviceState; 4] = [Up, Down, Maintenance, Unknown];

/// The obvious second-by-second count, to check the interval arithmetic against: the
/// last state at or before each second; after the last time heard unknown, unless the
/// device was down then; a second inside an exclusion is excluded.
fn brute(
    trans: &[(i64, u64, DeviceState)],
    heard: Option<i64>,
    excl: &[(i64, i64)],
    from: i64,
    to: i64,
) -> [i64; 5] {
    let mut sorted = trans.to_vec();
    sorted.sort();
    let at = |s: i64| sorted.iter().rfind(|x| x.0 <= s).map_or(Unknown, |x| x.2);
    let mut out = [0i64; 5];
    for s in from..to {
        if excl.iter().any(|&(a, b)| a <= s && s < b) {
            out[4] += 1;
            continue;
        }
        let st = match heard {
            None => Unknown,
            Some(h) if s >= h => {
                if at(h) == Down {
                    Down
                } else {
                    Unknown
                }
            }
            Some(_) => at(s),
        };
        out[STATES.iter().position(|x| *x == st).unwrap()] += 1;
    }
    out
}

fn as_array(x: &Totals) -> [i64; 4] {
    [x.up, x.down, x.maintenance, x.unknown].map(|d| d.as_secs())
}

fn as_array5(x: &Totals) -> [i64; 5] {
    [x.up, x.down, x.maintenance, x.unknown, x.excluded].map(|d| d.as_secs())
}

#[test]
fn simple_day() {
    let mut l = Ledger::new();
    l.transition(t(100), 1, Up);
    l.transition(t(1000), 2, Down);
    l.transition(t(1600), 3, Up);
    l.transition(t(2000), 4, Maintenance);
    l.transition(t(2500), 5, Up);
    l.heard(t(3000));
    let x = l.totals(t(0), t(4000));
    // Before the first transition and after the last record heard: unknown.
    assert_eq!(as_array(&x), [900 + 400 + 500, 600, 500, 100 + 1000]);
    assert_eq!(x.sum(), secs(4000));
    let r = l.report("icu7-vent", t(0), t(4000), t(4000), TARGET);
    assert_eq!(r.up_s, 1800.0);
    assert_eq!(r.down_s, 600.0);
    assert_eq!(r.availability, Some(1800.0 / 2400.0));
    assert_eq!(r.coverage, Some(2900.0 / 4000.0));
    assert_eq!(r.target, 0.995);
    assert_eq!(r.downtime_budget_s, 0.0);
    assert_eq!(l.state_at(t(50)), Unknown);
    assert_eq!(l.state_at(t(1000)), Down);
    assert_eq!(l.state_at(t(2999)), Up);
    assert_eq!(l.state_at(t(3000)), Unknown);
}

#[test]
fn report_json_has_exactly_the_hotline_fields() {
    let mut l = Ledger::new();
    let r = l.report("d", t(0), t(60), t(60), TARGET);
    assert_eq!(r.availability, None);
    let v = serde_json::to_value(&r).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "availability",
            "budget_status",
            "coverage",
            "device",
            "down_s",
            "downtime_allowed_s",
            "downtime_budget_s",
            "excluded_s",
            "from",
            "maintenance_s",
            "target",
            "to",
            "unknown_s",
            "up_s"
        ]
    );
    assert_eq!(v["availability"], serde_json::Value::Null);
    assert_eq!(v["unknown_s"], 60.0);
    assert_eq!(v["coverage"], 0.0);
    l.transition(t(0), 1, Maintenance);
    l.heard(t(60));
    let r = l.report("d", t(0), t(60), t(60), TARGET);
    // Only maintenance: no availability, full coverage, no budget (nothing counted).
    assert_eq!((r.availability, r.coverage), (None, Some(1.0)));
    assert_eq!(r.downtime_budget_s, 0.0);
    // An empty window.
    let r = l.report("d", t(10), t(10), t(60), TARGET);
    assert_eq!((r.availability, r.coverage), (None, None));
}

#[test]
fn random_histories_sum_to_the_window_match_brute_force_and_ignore_order() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for case in 0..400 {
        let n = rng.below(12) as usize;
        let mut trans: Vec<(i64, u64, DeviceState)> = (0..n)
            .map(|i| {
                (
                    rng.below(500) as i64,
                    i as u64,
                    STATES[rng.below(4) as usize],
                )
            })
            .collect();
        let heard = rng.below(600) as i64;
        let from = rng.below(300) as i64 - 50;
        let to = from + rng.below(500) as i64;
        let excl: Vec<(i64, i64)> = (0..rng.below(3))
            .map(|_| {
                let a = rng.below(600) as i64 - 50;
                (a, a + rng.below(120) as i64)
            })
            .collect();

        let mut a = Ledger::new();
        for &(at, seq, st) in &trans {
            a.transition(t(at), seq, st);
        }
        a.heard(t(heard));
        for &(xa, xb) in &excl {
            a.exclude(t(xa), t(xb));
        }
        let heard_eff = trans
            .iter()
            .map(|x| x.0)
            .max()
            .map_or(heard, |m| m.max(heard));
        let x = a.totals(t(from), t(to));
        assert_eq!(x.sum(), secs(to - from), "case {case}");
        assert_eq!(
            as_array5(&x),
            brute(&trans, Some(heard_eff), &excl, from, to),
            "case {case}: {trans:?} heard {heard} excl {excl:?} [{from},{to})"
        );
        // The timeline covers the window exactly, in order, and sums to the totals.
        let tl = a.timeline(t(from), t(to));
        let mut cursor = t(from);
        for st in &tl {
            assert_eq!(st.from, cursor, "case {case}: {tl:?}");
            assert!(st.to > st.from);
            cursor = st.to;
        }
        if to > from {
            assert_eq!(cursor, t(to), "case {case}");
        }

        // Same records in another order (an outbox replay), some twice: same answer.
        let mut b = Ledger::new();
        b.heard(t(heard));
        for &(xa, xb) in excl.iter().rev() {
            b.exclude(t(xa), t(xb));
        }
        let mut shuffled = trans.clone();
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for &(at, seq, st) in shuffled.iter().chain(trans.iter().take(3)) {
            b.transition(t(at), seq, st);
        }
        assert_eq!(a, b, "case {case}");
        assert_eq!(b.totals(t(from), t(to)), x);

        // Splitting the window splits the totals.
        let mid = from + (to - from) / 2;
        let (p, q) = (a.totals(t(from), t(mid)), a.totals(t(mid), t(to)));
        assert_eq!(p.up + q.up, x.up);
        assert_eq!(p.down + q.down, x.down);
        assert_eq!(p.unknown + q.unknown, x.unknown);
        assert_eq!(p.excluded + q.excluded, x.excluded);

        // Forgetting the past changes nothing at or after the cut.
        let mut c = a.clone();
        c.forget_before(t(from));
        assert_eq!(c.totals(t(from), t(to)), x, "case {case}");

        // Availability and coverage stay in [0, 1]; the budget is never negative.
        let r = a.report("d", t(from), t(to), t(to), TARGET);
        for v in [r.availability, r.coverage].into_iter().flatten() {
            assert!((0.0..=1.0).contains(&v));
        }
        assert!(r.downtime_budget_s >= 0.0);
        assert!(r.downtime_budget_s <= r.downtime_allowed_s);
        trans.clear();
    }
}

#[test]
fn a_replayed_outbox_fills_the_gap() {
    let mut l = Ledger::new();
    l.transition(t(0), 1, Up);
    l.heard(t(600));
    // The gateway heard nothing from 600 to 3600: unknown, not up.
    let before = l.totals(t(0), t(3600));
    assert_eq!(as_array(&before), [600, 0, 0, 3000]);
    // The agent comes back and replays what happened: down 1200..1800, readings to 3600.
    l.heard(t(3600));
    l.transition(t(1800), 3, Up);
    l.transition(t(1200), 2, Down);
    assert_eq!(as_array(&l.totals(t(0), t(3600))), [3000, 600, 0, 0]);
}

#[test]
fn same_instant_transitions_order_by_seq() {
    let mut l = Ledger::new();
    l.transition(t(0), 7, Down);
    l.transition(t(0), 8, Up);
    l.heard(t(10));
    assert_eq!(as_array(&l.totals(t(0), t(10))), [10, 0, 0, 0]);
    let mut m = Ledger::new();
    m.transition(t(0), 8, Up);
    m.transition(t(0), 7, Down);
    m.heard(t(10));
    assert_eq!(l, m);
}

#[test]
fn budget_definition() {
    let tot = |up: i64, down: i64| Totals {
        up: secs(up),
        down: secs(down),
        maintenance: secs(1_000),
        unknown: secs(5_000),
        excluded: secs(7_000),
    };
    let month = 30 * 86_400;
    // Start of a month: the whole month's allowance, 0.5 % of 30 days = 3.6 h.
    let b = downtime_budget(&tot(0, 0), secs(month), TARGET);
    assert!((b - 12_960.0).abs() < 1e-6, "{b}");
    // Half way, one hour down: 3.6 h - 1 h left.
    let b = downtime_budget(&tot(month / 2 - 3600, 3600), secs(month / 2), TARGET);
    assert!((b - 9_360.0).abs() < 1e-6, "{b}");
    // Taking exactly the budget lands exactly on the target.
    let (up, down, fut) = (month / 2 - 3600, 3600, month / 2);
    let b = downtime_budget(&tot(up, down), secs(fut), TARGET);
    let a = (up + fut) as f64 - b;
    assert!((a / (a + down as f64 + b) - TARGET).abs() < 1e-12);
    // Over budget: 0, never negative.
    assert_eq!(downtime_budget(&tot(100_000, 20_000), secs(0), TARGET), 0.0);
    // A past window: the up time that could still have been down.
    let b = downtime_budget(&tot(99_000, 0), secs(0), TARGET);
    assert!((b - 495.0).abs() < 1e-9, "{b}");
}

fn shanghai() -> TimeZone {
    TimeZone::get("Asia/Shanghai").unwrap()
}

#[test]
fn month_window_in_the_zone() {
    let tz = shanghai();
    // 2026-11-30T20:00Z is already December 1st in Shanghai.
    let (a, b) = month_window("2026-11-30T20:00:00Z".parse().unwrap(), &tz);
    assert_eq!(a.to_string(), "2026-11-30T16:00:00Z");
    assert_eq!(b.to_string(), "2026-12-31T16:00:00Z");
    let (a, b) = month_window("2026-02-10T00:00:00Z".parse().unwrap(), &TimeZone::UTC);
    assert_eq!(a.to_string(), "2026-02-01T00:00:00Z");
    assert_eq!(b.to_string(), "2026-03-01T00:00:00Z");
    // A DST zone: the month is its local length (March 2026 in Berlin: 31 d - 1 h).
    let berlin = TimeZone::get("Europe/Berlin").unwrap();
    let (a, b) = month_window("2026-03-15T00:00:00Z".parse().unwrap(), &berlin);
    assert_eq!(b.duration_since(a), secs(31 * 86_400 - 3600));
}

#[test]
fn the_flag_is_the_budget_not_a_few_minutes() {
    let tz = shanghai();
    let (start, end) = month_window("2026-11-10T00:00:00Z".parse().unwrap(), &tz);
    let at = |s: i64| start.checked_add(secs(s)).unwrap();
    let month = end.duration_since(start).as_secs();
    let allowed = 0.005 * month as f64;
    // Four minutes into the month, one minute down: 75 % available, but 1 min of a 3.6 h
    // budget is spent: ok.
    let mut early = Ledger::new();
    early.transition(at(0), 1, Up);
    early.transition(at(180), 2, Down);
    early.transition(at(240), 3, Up);
    early.heard(at(240));
    let r = early.report("early", start, end, at(240), TARGET);
    assert_eq!(r.availability, Some(0.75));
    assert_eq!(r.budget_status, BudgetStatus::Ok);
    assert!((r.downtime_allowed_s - 0.005 * month as f64).abs() < 1e-6);
    assert!((r.downtime_budget_s - (allowed - 60.0)).abs() < 1e-6);
    // Two hours down by the 10th: more than half of 3.6 h spent: at risk.
    let mut bad = Ledger::new();
    bad.transition(at(0), 1, Up);
    bad.transition(at(86_400), 2, Down);
    bad.transition(at(86_400 + 7_200), 3, Up);
    bad.heard(at(10 * 86_400));
    let r = bad.report("bad", start, end, at(10 * 86_400), TARGET);
    assert_eq!(r.budget_status, BudgetStatus::AtRisk);
    assert!((r.downtime_budget_s - (allowed - 7_200.0)).abs() < 1e-6);
    // One major fault fixed within its 72 h: the month can no longer make 99.5 %.
    let mut major = Ledger::new();
    major.transition(at(0), 1, Up);
    major.transition(at(86_400), 2, Down);
    major.transition(at(86_400 + 72 * 3600), 3, Up);
    major.heard(at(10 * 86_400));
    let r = major.report("major", start, end, at(10 * 86_400), TARGET);
    assert_eq!(r.budget_status, BudgetStatus::Breached);
    assert_eq!(r.downtime_budget_s, 0.0);
    // Exactly the budget spent at the end of the month: met, not breached.
    let b = Budget {
        allowed: 100.0,
        spent: 100.0,
    };
    assert_eq!(b.status(), BudgetStatus::AtRisk);
    let b = Budget {
        allowed: 100.0,
        spent: 100.5,
    };
    assert_eq!(b.status(), BudgetStatus::Breached);
    // A customer's budget is the sum of its devices'.
    let sum = Budget::sum([
        Budget {
            allowed: 100.0,
            spent: 10.0,
        },
        Budget {
            allowed: 50.0,
            spent: 70.0,
        },
    ]);
    assert_eq!((sum.allowed, sum.spent), (150.0, 80.0));
    assert_eq!(sum.status(), BudgetStatus::AtRisk);
}

#[test]
fn a_down_device_that_falls_silent_stays_down() {
    let mut l = Ledger::new();
    l.transition(t(0), 1, Up);
    l.transition(t(100), 2, Down);
    l.heard(t(200));
    // Silent since 200: its down time goes on counting.
    assert_eq!(as_array(&l.totals(t(0), t(1000))), [100, 900, 0, 0]);
    assert_eq!(l.state_at(t(999)), Down);
    // Up and silent: unknown.
    let mut u = Ledger::new();
    u.transition(t(0), 1, Up);
    u.heard(t(200));
    assert_eq!(as_array(&u.totals(t(0), t(1000))), [200, 0, 0, 800]);
    // The agent was dead from 150 on and says so when it is back (unknown from its last
    // observation), then sees the device up at 900.
    l.transition(t(150), 3, Unknown);
    l.transition(t(900), 4, Up);
    l.heard(t(1000));
    assert_eq!(as_array(&l.totals(t(0), t(1000))), [200, 50, 0, 750]);
}

#[test]
fn excluded_time_is_neither_up_nor_down() {
    let mut l = Ledger::new();
    l.transition(t(0), 1, Up);
    l.transition(t(100), 2, Down);
    l.transition(t(400), 3, Up);
    l.heard(t(1000));
    l.exclude(t(50), t(300));
    let x = l.totals(t(0), t(1000));
    assert_eq!(as_array5(&x), [50 + 600, 100, 0, 0, 250]);
    let r = l.report("d", t(0), t(1000), t(1000), TARGET);
    assert_eq!(r.excluded_s, 250.0);
    assert_eq!(r.coverage, Some(1.0));
    assert_eq!(r.availability, Some(650.0 / 750.0));
    let spans: Vec<(i64, i64, &str)> = l
        .timeline(t(0), t(1000))
        .iter()
        .map(|s| {
            (
                s.from.as_second() - t(0).as_second(),
                s.to.as_second() - t(0).as_second(),
                s.state.as_str(),
            )
        })
        .collect();
    assert_eq!(
        spans,
        [
            (0, 50, "up"),
            (50, 300, "excluded"),
            (300, 400, "down"),
            (400, 1000, "up")
        ]
    );
    assert_eq!(
        serde_json::to_value(Span::Excluded).unwrap(),
        serde_json::json!("excluded")
    );
    assert_eq!(
        serde_json::to_value(Span::State(Down)).unwrap(),
        serde_json::json!("down")
    );
}

//! Refused hotline callers, by address: the back-off after repeated wrong tokens, and the
//! tally that puts refusals in the audit log once a minute per address instead of one
//! fsynced line per request.
//!
//! Pure bookkeeping: the caller passes the time in. Both tables are bounded: when an
//! attacker hops addresses faster than entries are forgotten, the new addresses share one
//! entry (the unspecified address), so memory and audit lines stay capped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

/// Wrong tokens an address may send before it has to wait.
pub const FREE_TRIES: u32 = 5;
/// The first wait; each further wrong token after a wait doubles it.
pub const FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait.
pub const LONGEST_WAIT: Duration = Duration::from_secs(15 * 60);
/// An address with no refusal for this long starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// At most one audit line per address this often.
pub const AUDIT_EVERY: Duration = Duration::from_secs(60);
/// How often refusals look for other addresses' lines that are due (a scan of the table).
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// Addresses tracked at once by each table.
pub const MAX_ADDRESSES: usize = 1024;

/// Where addresses go once a table is full.
const OVERFLOW: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// The entry `ip` is counted under: its own when known or when there is room, else the
/// shared overflow entry.
fn slot<V>(map: &HashMap<IpAddr, V>, ip: IpAddr) -> IpAddr {
    if map.contains_key(&ip) || map.len() < MAX_ADDRESSES {
        ip
    } else {
        OVERFLOW
    }
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    /// Wrong tokens since the last accepted one.
    wrong: u32,
    /// No token is checked before this.
    until: Option<Instant>,
    last: Instant,
}

/// The wrong-token back-off: after [`FREE_TRIES`] wrong tokens an address is answered 429
/// without its token being looked at, for a wait that doubles with each further wrong
/// token, up to [`LONGEST_WAIT`].
#[derive(Debug, Default)]
pub struct Backoff {
    by_addr: HashMap<IpAddr, Strikes>,
}

impl Backoff {
    /// How long `ip` must still wait, if it must.
    pub fn wait(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let s = self.by_addr.get(&slot(&self.by_addr, ip))?;
        s.until
            .and_then(|u| u.checked_duration_since(now))
            .filter(|d| !d.is_zero())
    }

    /// Records a wrong token from `ip`; returns the wait it now has to keep, if any.
    pub fn wrong(&mut self, ip: IpAddr, now: Instant) -> Option<Duration> {
        if !self.by_addr.contains_key(&ip) && self.by_addr.len() >= MAX_ADDRESSES {
            self.forget_quiet(now);
        }
        let key = slot(&self.by_addr, ip);
        let s = self.by_addr.entry(key).or_insert(Strikes {
            wrong: 0,
            until: None,
            last: now,
        });
        if now.duration_since(s.last) >= FORGET_AFTER {
            s.wrong = 0;
        }
        s.wrong = s.wrong.saturating_add(1);
        s.last = now;
        let over = s.wrong.checked_sub(FREE_TRIES)?;
        let wait = FIRST_WAIT
            .checked_mul(1u32.checked_shl(over).unwrap_or(u32::MAX))
            .unwrap_or(LONGEST_WAIT)
            .min(LONGEST_WAIT);
        s.until = Some(now + wait);
        Some(wait)
    }

    /// A right token from `ip`: its wrong ones are forgiven.
    pub fn accepted(&mut self, ip: IpAddr) {
        self.by_addr.remove(&ip);
    }

    fn forget_quiet(&mut self, now: Instant) {
        self.by_addr.retain(|_, s| {
            now.duration_since(s.last) < FORGET_AFTER || s.until.is_some_and(|u| u > now)
        });
    }
}

#[derive(Debug, Clone, Copy)]
struct Tally {
    /// When this address last had a line.
    last_line: Instant,
    /// Refusals since, not yet on record.
    pending: u64,
    /// The status the latest of them was answered.
    status: u16,
}

/// What to do with one refused request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Write a line now, standing for this many refusals (this one included).
    WriteNow { count: u64 },
    /// Counted; it goes into the address's next line.
    Counted,
}

/// A line the tally owes the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueLine {
    /// The address, or the unspecified address for the overflow entry.
    pub ip: IpAddr,
    pub count: u64,
    pub status: u16,
}

/// The per-address audit tally of refused requests: the first refusal from an address is
/// written at once; the ones after it within [`AUDIT_EVERY`] are counted and written as
/// one line when the minute is over.
#[derive(Debug, Default)]
pub struct RefusalTally {
    by_addr: HashMap<IpAddr, Tally>,
    last_sweep: Option<Instant>,
}

impl RefusalTally {
    pub fn refused(&mut self, ip: IpAddr, status: u16, now: Instant) -> Refused {
        let key = slot(&self.by_addr, ip);
        match self.by_addr.get_mut(&key) {
            None => {
                self.by_addr.insert(
                    key,
                    Tally {
                        last_line: now,
                        pending: 0,
                        status,
                    },
                );
                Refused::WriteNow { count: 1 }
            }
            Some(t) if now.duration_since(t.last_line) >= AUDIT_EVERY => {
                let count = t.pending + 1;
                *t = Tally {
                    last_line: now,
                    pending: 0,
                    status,
                };
                Refused::WriteNow { count }
            }
            Some(t) => {
                t.pending += 1;
                t.status = status;
                Refused::Counted
            }
        }
    }

    /// Whether it is time to look for due lines ([`RefusalTally::due`]): at most once per
    /// [`SWEEP_EVERY`], so a flood of refusals does not scan the table each time.
    pub fn sweep_due(&mut self, now: Instant) -> bool {
        if self
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return false;
        }
        self.last_sweep = Some(now);
        true
    }

    /// The lines owed now: addresses whose minute is over (or all, at shutdown). Addresses
    /// with nothing pending and a minute quiet are forgotten.
    pub fn due(&mut self, now: Instant, all: bool) -> Vec<DueLine> {
        let mut out = Vec::new();
        self.by_addr.retain(|ip, t| {
            let minute_over = now.duration_since(t.last_line) >= AUDIT_EVERY;
            if t.pending > 0 && (all || minute_over) {
                out.push(DueLine {
                    ip: *ip,
                    count: t.pending,
                    status: t.status,
                });
                t.pending = 0;
                t.last_line = now;
                return true;
            }
            !(t.pending == 0 && minute_over)
        });
        out.sort_by_key(|l| l.ip);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn waits_begin_after_the_free_tries_and_double() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for _ in 0..FREE_TRIES - 1 {
            assert_eq!(b.wrong(ip(1), t0), None);
        }
        assert_eq!(b.wait(ip(1), t0), None);
        assert_eq!(b.wrong(ip(1), t0), Some(FIRST_WAIT));
        assert_eq!(b.wait(ip(1), t0), Some(FIRST_WAIT));
        assert_eq!(b.wait(ip(2), t0), None, "other addresses are not held");
        let t1 = t0 + FIRST_WAIT;
        assert_eq!(b.wait(ip(1), t1), None);
        assert_eq!(b.wrong(ip(1), t1), Some(FIRST_WAIT * 2));
        assert_eq!(b.wrong(ip(1), t1), Some(FIRST_WAIT * 4));
        for _ in 0..40 {
            b.wrong(ip(1), t1);
        }
        assert_eq!(b.wait(ip(1), t1), Some(LONGEST_WAIT));
        b.accepted(ip(1));
        assert_eq!(b.wait(ip(1), t1), None);
        assert_eq!(b.wrong(ip(1), t1), None);
    }

    #[test]
    fn an_address_is_forgiven_after_a_quiet_hour() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for _ in 0..FREE_TRIES {
            b.wrong(ip(1), t0);
        }
        assert_eq!(b.wrong(ip(1), t0 + FORGET_AFTER), None);
    }

    #[test]
    fn hopping_addresses_share_one_entry_once_full() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        for i in 0..MAX_ADDRESSES as u32 + 10 * FREE_TRIES {
            let a = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            b.wrong(a, t0);
        }
        assert_eq!(b.by_addr.len(), MAX_ADDRESSES + 1);
        assert!(b
            .wait(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0)
            .is_some());
        assert_eq!(
            b.wait(ip(1), t0),
            None,
            "known addresses keep their own count"
        );
    }

    #[test]
    fn one_line_per_address_per_minute() {
        let t0 = Instant::now();
        let mut t = RefusalTally::default();
        assert_eq!(t.refused(ip(1), 401, t0), Refused::WriteNow { count: 1 });
        for _ in 0..199 {
            assert_eq!(t.refused(ip(1), 429, t0), Refused::Counted);
        }
        assert_eq!(t.refused(ip(2), 401, t0), Refused::WriteNow { count: 1 });
        assert!(t.due(t0 + AUDIT_EVERY / 2, false).is_empty());
        let minute = t0 + AUDIT_EVERY;
        assert_eq!(
            t.due(minute, false),
            vec![DueLine {
                ip: ip(1),
                count: 199,
                status: 429
            }]
        );
        // ip(2) had nothing pending and is forgotten; ip(1) had a line just now.
        assert_eq!(t.by_addr.len(), 1);
        assert_eq!(t.refused(ip(1), 401, minute), Refused::Counted);
        assert_eq!(
            t.due(minute, true).len(),
            1,
            "shutdown writes what is pending"
        );
        assert_eq!(
            t.refused(ip(1), 401, minute + AUDIT_EVERY),
            Refused::WriteNow { count: 1 }
        );
    }

    #[test]
    fn due_lines_are_looked_for_now_and_then() {
        let t0 = Instant::now();
        let mut t = RefusalTally::default();
        assert!(t.sweep_due(t0));
        assert!(!t.sweep_due(t0 + SWEEP_EVERY / 2));
        assert!(t.sweep_due(t0 + SWEEP_EVERY));
    }

    #[test]
    fn a_late_refusal_carries_the_uncounted_ones() {
        let t0 = Instant::now();
        let mut t = RefusalTally::default();
        t.refused(ip(1), 401, t0);
        t.refused(ip(1), 401, t0);
        t.refused(ip(1), 401, t0);
        assert_eq!(
            t.refused(ip(1), 401, t0 + AUDIT_EVERY),
            Refused::WriteNow { count: 3 }
        );
    }
}

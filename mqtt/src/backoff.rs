//! The reconnect back-off policy of every MQTT reconnect loop: `min · factor^attempt`,
//! capped at `max`, and then, with jitter, a random point in the upper part of that, so
//! that clients cut off together do not all come back at the same moment. Pure: the
//! caller passes the attempt number and a random number.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// A back-off policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay, and the least one.
    pub min: Duration,
    /// The cap.
    pub max: Duration,
    /// Growth per attempt (2: doubling; 1: a fixed delay).
    pub factor: u32,
    /// The share of the delay that is random, 0 to 1: 0.5 picks a point in the upper
    /// half of `min · factor^attempt` (never below `min`).
    pub jitter: f64,
}

impl Backoff {
    /// The same delay every time.
    pub const fn fixed(delay: Duration) -> Backoff {
        Backoff {
            min: delay,
            max: delay,
            factor: 1,
            jitter: 0.0,
        }
    }

    /// The delay before attempt `attempt` (0 for the first retry); `random` is any
    /// random number (see [`random_u64`]), ignored without jitter.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let max = self.max.max(self.min);
        let mut base = self.min;
        for _ in 0..attempt {
            if base >= max || self.factor <= 1 || base.is_zero() {
                break;
            }
            base = base.saturating_mul(self.factor);
        }
        let base = base.min(max).max(Duration::from_nanos(1));
        let jitter = if self.jitter.is_nan() {
            0.0
        } else {
            self.jitter.clamp(0.0, 1.0)
        };
        let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let spread = (nanos as f64 * jitter) as u64;
        let random_part = if spread == 0 {
            0
        } else {
            random % spread.saturating_add(1)
        };
        let jittered = Duration::from_nanos(nanos - spread + random_part);
        jittered.clamp(self.min, max)
    }
}

/// A random number for the jitter: each `RandomState` has fresh keys, random enough for
/// spreading reconnects, without a dependency.
pub fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x7465_6e64);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_bounds_and_grows() {
        let p = Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
            factor: 2,
            jitter: 0.5,
        };
        for attempt in 0..40 {
            for r in [0, 1, u64::MAX / 3, u64::MAX] {
                let d = p.delay(attempt, r);
                assert!(d >= p.min && d <= p.max, "{attempt} {r} {d:?}");
            }
        }
        assert!(p.delay(0, 0) < Duration::from_secs(1));
        assert!(p.delay(10, 0) >= Duration::from_secs(15));
        assert!(p.delay(u32::MAX, u64::MAX) <= p.max);
        // min > max does not panic.
        let odd = Backoff {
            min: Duration::from_secs(5),
            max: Duration::from_secs(1),
            ..p
        };
        assert_eq!(odd.delay(3, 7), Duration::from_secs(5));
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn without_jitter_it_doubles_to_the_cap() {
        let p = Backoff {
            min: Duration::from_millis(400),
            max: Duration::from_millis(6400),
            factor: 2,
            jitter: 0.0,
        };
        let ms: Vec<u128> = (0..7).map(|a| p.delay(a, 12345).as_millis()).collect();
        assert_eq!(ms, [400, 800, 1600, 3200, 6400, 6400, 6400]);
        let f = Backoff::fixed(Duration::from_secs(1));
        assert_eq!(f.delay(0, 1), Duration::from_secs(1));
        assert_eq!(f.delay(99, 1), Duration::from_secs(1));
    }

    #[test]
    fn jitter_picks_a_point_in_the_upper_part() {
        let p = Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(15),
            factor: 2,
            jitter: 0.5,
        };
        // Attempt 4: 16 s capped to 15 s, jittered within 7.5-15 s.
        let lo = p.delay(4, 0);
        assert_eq!(lo, Duration::from_millis(7500));
        assert_eq!(p.delay(4, 7_500_000_000), Duration::from_secs(15));
        for r in [1, 99, u64::MAX] {
            let d = p.delay(4, r);
            assert!(d >= lo && d <= Duration::from_secs(15), "{d:?}");
        }
        let wild = Backoff {
            jitter: f64::NAN,
            ..p
        };
        assert_eq!(wild.delay(4, 5), Duration::from_secs(15));
    }
}

//! At most one log line per source and interval: refused logins and forged messages are
//! counted every time but logged rarely, so a flood from an attacker cannot flood the
//! log (or the disk it is on).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Sources remembered at once; past this, sources not seen within the interval are
/// forgotten, and if all are recent a new source is not logged.
const MAX_SOURCES: usize = 4096;

/// Says whether a source may log now.
#[derive(Debug)]
pub struct LogLimit {
    every: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        LogLimit {
            every,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Once a minute per source.
    pub fn per_minute() -> Self {
        Self::new(Duration::from_secs(60))
    }

    /// Whether `source` may log at `now` (and, if so, its next line waits an interval).
    pub fn allow_at(&self, source: &str, now: Instant) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = last.get(source) {
            if now.saturating_duration_since(*t) < self.every {
                return false;
            }
        } else if last.len() >= MAX_SOURCES {
            let every = self.every;
            last.retain(|_, t| now.saturating_duration_since(*t) < every);
            if last.len() >= MAX_SOURCES {
                return false;
            }
        }
        last.insert(source.to_string(), now);
        true
    }

    pub fn allow(&self, source: &str) -> bool {
        self.allow_at(source, Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_interval_per_source_and_bounded() {
        let l = LogLimit::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(l.allow_at("a", t0));
        assert!(!l.allow_at("a", t0 + Duration::from_secs(59)));
        assert!(l.allow_at("b", t0 + Duration::from_secs(1)));
        assert!(l.allow_at("a", t0 + Duration::from_secs(60)));
        for i in 0..MAX_SOURCES * 2 {
            l.allow_at(&format!("s{i}"), t0 + Duration::from_secs(61));
        }
        assert!(l.last.lock().unwrap().len() <= MAX_SOURCES);
        // Once the old ones age out, new sources log again.
        assert!(l.allow_at("late", t0 + Duration::from_secs(200)));
    }
}

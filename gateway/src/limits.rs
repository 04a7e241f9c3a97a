//! The process's open-file limit and the hotline's share of it.
//!
//! The hotline API and the embedded broker share one process and so one table of file
//! descriptors. At start the soft `RLIMIT_NOFILE` is raised to the hard limit, and the
//! hotline may hold only a share of it, so idle HTTP clients can never take the
//! descriptors agents need to reach the broker.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Used when the hard limit is "unlimited" (Linux refuses an infinite open-file limit;
/// its own default ceiling, `fs.nr_open`, is 2^20).
const UNLIMITED_AS: u64 = 1 << 20;

/// The part of the open-file limit the hotline may use by default: a quarter, so the
/// broker, the store and the backend keep the rest.
pub const HOTLINE_SHARE: u64 = 4;

/// Fewest and most hotline connections a derived default allows.
const DEFAULT_CAP_RANGE: (u64, u64) = (16, 16_384);

/// Raises the soft open-file limit to the hard limit and returns the soft limit now in
/// effect. When raising is refused, the limit stays as it was and that is returned.
pub fn raise_open_files() -> u64 {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let hard = maximum.unwrap_or(UNLIMITED_AS);
    let soft = current.unwrap_or(UNLIMITED_AS);
    if soft >= hard {
        return soft;
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => hard,
        Err(e) => {
            tracing::warn!("open-file limit stays at {soft} (raising it to {hard}: {e})");
            soft
        }
    }
}

/// The default cap on concurrent hotline connections for an open-file limit.
pub fn default_max_connections(open_files: u64) -> usize {
    let (lo, hi) = DEFAULT_CAP_RANGE;
    let cap = (open_files / HOTLINE_SHARE).clamp(lo, hi);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The cap to use: the configured one, but never more than the hotline's share of the
/// limit (a configured cap above it is lowered, with a warning, rather than let the
/// hotline starve the broker).
pub fn hotline_cap(configured: Option<usize>, open_files: u64) -> usize {
    let share = default_max_connections(open_files);
    match configured {
        None => share,
        Some(c) if c <= share => c,
        Some(c) => {
            tracing::warn!(
                "[api] max_connections = {c} is more than a quarter of the open-file limit \
                 ({open_files}); using {share}"
            );
            share
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hotline_gets_a_quarter_within_bounds() {
        assert_eq!(default_max_connections(20_000), 5_000);
        assert_eq!(default_max_connections(1_024), 256);
        assert_eq!(default_max_connections(20), 16);
        assert_eq!(default_max_connections(1 << 20), 16_384);
        assert_eq!(hotline_cap(Some(100), 1_024), 100);
        assert_eq!(hotline_cap(Some(1_000), 1_024), 256);
        assert_eq!(hotline_cap(None, 1_024), 256);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = getrlimit(Resource::Nofile).current.unwrap_or(UNLIMITED_AS);
        let now = raise_open_files();
        assert!(now >= before);
        assert_eq!(raise_open_files(), now);
    }
}

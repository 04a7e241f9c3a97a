//! What a process (and its children) costs, read from /proc: CPU as utime + stime ticks
//! (`/proc/<pid>/stat`), memory as VmRSS and VmHWM (`/proc/<pid>/status`).

use std::time::{Duration, Instant};

/// Clock ticks per second of the `stat` times (USER_HZ, 100 on Linux/x86).
pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (ppid, utime + stime + cutime + cstime) of a live process. The children's fields hold
/// the time of children already reaped, so summing them over a process tree counts every
/// thread and every child once.
fn stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ppid = f.get(1)?.parse().ok()?;
    let ticks = f
        .get(11..15)?
        .iter()
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .sum();
    Some((ppid, ticks))
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// `root` and every process below it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if let Some((ppid, _)) = stat(pid) {
                    parents.push((pid, ppid));
                }
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// One look at a process tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub at: Option<Instant>,
    pub ticks: u64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub processes: usize,
}

pub fn sample(root: u32) -> Sample {
    let pids = tree(root);
    let mut s = Sample {
        at: Some(Instant::now()),
        processes: pids.len(),
        ..Sample::default()
    };
    for p in pids {
        s.ticks += stat(p).map(|x| x.1).unwrap_or(0);
        s.rss_kib += status_kib(p, "VmRSS:").unwrap_or(0);
        s.hwm_kib += status_kib(p, "VmHWM:").unwrap_or(0);
    }
    s
}

/// What a process tree cost over a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Percent of one core over the window.
    pub cpu_pct: f64,
    /// Mean of the VmRSS samples (one a second), MiB.
    pub rss_mean_mib: f64,
    /// Largest VmRSS sample, MiB.
    pub rss_max_mib: f64,
    /// VmHWM (peak resident since start) at the end of the window, MiB.
    pub hwm_mib: f64,
    pub processes: usize,
}

/// Samples `root`'s tree once a second for `window`.
pub async fn measure(root: u32, window: Duration, tck: f64) -> Usage {
    let first = sample(root);
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut last = first;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while start.elapsed() < window {
        tick.tick().await;
        last = sample(root);
        rss.push(last.rss_kib as f64);
    }
    let secs = match (first.at, last.at) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => window.as_secs_f64(),
    };
    let mib = 1024.0;
    Usage {
        cpu_pct: (last.ticks.saturating_sub(first.ticks)) as f64 / tck / secs.max(1e-9) * 100.0,
        rss_mean_mib: rss.iter().sum::<f64>() / rss.len().max(1) as f64 / mib,
        rss_max_mib: rss.iter().cloned().fold(0.0, f64::max) / mib,
        hwm_mib: last.hwm_kib as f64 / mib,
        processes: last.processes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let s = sample(me);
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
        assert!(tree(me).contains(&me));
        assert!(clk_tck() > 0.0);
    }
}

//! What a process (and its children) costs, read from /proc: CPU as utime + stime ticks
//! (`/proc/<pid>/stat`), memory as VmRSS and VmHWM (`/proc/<pid>/status`), wake-ups as
//! its threads' voluntary context switches (`/proc/<pid>/task/*/status`); and what one
//! wake-up costs on this machine ([`WakeCost`]).

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
    let f = stat_fields(&format!("/proc/{pid}/stat"))?;
    let ppid = f.get(1)?.parse().ok()?;
    Some((ppid, ticks(&f, 11..15)?))
}

/// The fields of a `stat` file after the command name (which may hold spaces and
/// parentheses, so they start after the last ')'): 0 is the state, 1 the ppid, 11 and 12
/// utime and stime, 13 and 14 cutime and cstime.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The sum of the clock-tick fields `range` of [`stat_fields`].
fn ticks(fields: &[String], range: std::ops::Range<usize>) -> Option<u64> {
    Some(
        fields
            .get(range)?
            .iter()
            .map(|x| x.parse::<u64>().unwrap_or(0))
            .sum(),
    )
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Voluntary context switches of every live thread of `pid`: each is a sleep (on a timer,
/// a socket, a lock, a disk write) the thread was woken from.
fn wakeups(pid: u32) -> u64 {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    rd.flatten().filter_map(|t| task_wakeups(&t.path())).sum()
}

/// One thread's voluntary context switches, from its /proc task folder.
fn task_wakeups(task: &std::path::Path) -> Option<u64> {
    let s = std::fs::read_to_string(task.join("status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
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
    pub wakeups: u64,
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
        s.wakeups += wakeups(p);
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
    /// Times a thread of the tree was woken from a sleep, per second of the window: a
    /// lower bound, as a thread that ends within the window takes its count with it.
    pub wakeups_per_s: f64,
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
        wakeups_per_s: last.wakeups.saturating_sub(first.wakeups) as f64 / secs.max(1e-9),
        processes: last.processes,
    }
}

/// What one sleep and wake-up costs on this machine, measured while something else is
/// measured: a thread with a tokio runtime of its own sleeps `PERIOD` at a time (a timer
/// in epoll, as the agent's polls are) for the window, and its CPU time (utime + stime
/// of /proc/thread-self/stat) is divided by its wake-ups. On a virtual machine a wake-up
/// is far dearer than on bare metal (the timer and the idle CPU go through the
/// hypervisor), and this puts the price next to the agent's count of them.
pub struct WakeCost {
    thread: std::thread::JoinHandle<Option<f64>>,
}

impl WakeCost {
    const PERIOD: Duration = Duration::from_millis(10);

    pub fn start(window: Duration) -> WakeCost {
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .ok()?;
            let (c0, t0) = (thread_cpu(), Instant::now());
            let mut n = 0u64;
            rt.block_on(async {
                while t0.elapsed() < window {
                    tokio::time::sleep(Self::PERIOD).await;
                    n += 1;
                }
            });
            let cpu = thread_cpu() - c0;
            (n > 0 && cpu >= 0.0).then(|| cpu / n as f64 * 1e6)
        });
        WakeCost { thread }
    }

    /// CPU µs per wake-up (`None` if /proc could not say).
    pub async fn finish(self) -> Option<f64> {
        tokio::task::spawn_blocking(move || self.thread.join().ok().flatten())
            .await
            .ok()
            .flatten()
    }
}

/// CPU seconds the calling thread has used (utime + stime of /proc/thread-self/stat).
pub fn thread_cpu() -> f64 {
    let used = stat_fields("/proc/thread-self/stat").and_then(|f| ticks(&f, 11..13));
    used.unwrap_or(0) as f64 / clk_tck()
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

    #[test]
    fn counts_the_wake_ups_of_a_sleeping_thread() {
        let me = std::process::id();
        let (before, after, all) = std::thread::spawn(move || {
            let own = std::path::Path::new("/proc/thread-self");
            let before = task_wakeups(own).unwrap();
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let after = task_wakeups(own).unwrap();
            (before, after, sample(me).wakeups)
        })
        .join()
        .unwrap();
        assert!(after >= before + 20, "{before} → {after}");
        // The process's count holds this thread's while it lives.
        assert!(all >= after, "{all} < {after}");
    }

    #[test]
    fn a_wake_up_is_priced_below_a_millisecond() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let us = rt
            .block_on(WakeCost::start(Duration::from_millis(300)).finish())
            .expect("a cost");
        assert!((0.0..1000.0).contains(&us), "{us} µs");
    }
}

//! Resident memory of processes, sampled from `/proc` while a suite runs (the memory
//! bounds the outage suite asserts).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// (VmRSS, VmHWM) of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples the resident memory of processes every 100 ms until dropped; `peak()` gives
/// the highest VmRSS seen of each pid (KiB), and the last VmHWM read.
pub struct RssSampler {
    peaks: Arc<Mutex<BTreeMap<u32, (u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let peaks: Arc<Mutex<BTreeMap<u32, (u64, u64)>>> = Default::default();
        let p = peaks.clone();
        let task = tokio::spawn(async move {
            loop {
                for pid in &pids {
                    if let Some((rss, hwm)) = rss_kib(*pid) {
                        let mut m = p.lock().unwrap();
                        let e = m.entry(*pid).or_insert((0, 0));
                        e.0 = e.0.max(rss);
                        e.1 = e.1.max(hwm);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { peaks, task }
    }
    /// (peak VmRSS, VmHWM) of `pid` in KiB.
    pub fn peak(&self, pid: u32) -> (u64, u64) {
        self.peaks
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .unwrap_or((0, 0))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

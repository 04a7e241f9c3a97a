//! The append-only audit log of hotline actions (DESIGN §5 "an append-only audit log of
//! hotline actions").
//!
//! One JSON object per line: when, what, on which device, which request, how it ended,
//! the HTTP status answered and the caller's address. Never the token. The file is opened
//! for appending only, every line is flushed and `sync_data`'d before [`Audit::append`]
//! returns (a hotline action is on disk before it is answered), and one mutex keeps the
//! lines of concurrent callers whole.
//!
//! The log is capped: a line that would take `audit.log` past its size first rotates it
//! to `audit.log.1` (and `.1` to `.2`, ... up to [`KEEP_ROTATED`]; the oldest goes).
//! Nothing is rewritten in place. Refused unauthenticated requests are not written one by
//! one: the [`RefusalTally`] writes the first from an address at once and the rest as one
//! line a minute with their count.

use crate::refusals::{DueLine, RefusalTally, Refused};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The default size `audit.log` is rotated at.
pub const DEFAULT_MAX_SIZE: u64 = 64 << 20;
/// How many rotated files (`audit.log.1` ... `.4`) are kept.
pub const KEEP_ROTATED: u32 = 4;

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Gateway time of the action.
    pub at: Timestamp,
    /// `diagnostic`, `retry_ticket`, `unauthorized`, ...
    pub action: String,
    pub device: Option<String>,
    /// The diagnostic's name, the ticket key, or the refused path.
    pub request: Option<String>,
    /// `ok`, `error: ...`, `timeout`, `refused: ...`.
    pub outcome: String,
    /// The HTTP status answered.
    pub status: u16,
    /// The caller's address (`ip:port`, or `ip` on a tally line) when known.
    pub remote: Option<String>,
    /// On a tally line: how many refused requests it stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// What a refused request needs written (from [`Audit::count_refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub struct RefusalWrite {
    /// Write the request's own line, standing for this many refusals.
    now_count: Option<u64>,
    /// Write the lines other addresses are owed.
    sweep: bool,
}

impl RefusalWrite {
    /// Nothing to write: the refusal was only counted.
    pub fn is_nothing(&self) -> bool {
        self.now_count.is_none() && !self.sweep
    }
}

#[derive(Debug)]
struct LogFile {
    file: File,
    /// Bytes in the current `audit.log`.
    size: u64,
}

/// The audit log file, shared by every handler.
#[derive(Debug, Clone)]
pub struct Audit {
    inner: Arc<Mutex<LogFile>>,
    tally: Arc<Mutex<RefusalTally>>,
    path: PathBuf,
    max_size: u64,
    /// On a shared store: every line is also kept there, under this gateway's id, so the
    /// fleet's audit log is in one place whichever gateway the hotline used.
    shared: Option<(Arc<dyn crate::store::GatewayStore>, String)>,
}

impl Audit {
    /// Opens `path` for appending (creating it and its folders), rotated at
    /// [`DEFAULT_MAX_SIZE`]. Nothing already in it is ever rewritten.
    pub fn open(path: &Path) -> io::Result<Audit> {
        Self::open_capped(path, DEFAULT_MAX_SIZE)
    }

    /// Opens `path` for appending, rotated before it would pass `max_size` bytes.
    pub fn open_capped(path: &Path, max_size: u64) -> io::Result<Audit> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Audit {
            inner: Arc::new(Mutex::new(LogFile { file, size })),
            tally: Arc::default(),
            path: path.to_path_buf(),
            max_size,
            shared: None,
        })
    }

    /// Keeps every line in `store` too (when it keeps audit lines: a shared store), under
    /// `gateway`.
    pub fn keep_in(mut self, store: Arc<dyn crate::store::GatewayStore>, gateway: &str) -> Audit {
        if store.shared() {
            self.shared = Some((store, gateway.to_string()));
        }
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `audit.log.N`.
    pub fn rotated_path(&self, n: u32) -> PathBuf {
        let mut name = self.path.as_os_str().to_owned();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Appends one line and makes it durable before returning.
    pub fn append(&self, entry: &AuditEntry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut log = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let len = line.len() as u64;
        if log.size > 0 && log.size.saturating_add(len) > self.max_size {
            self.rotate(&mut log)?;
        }
        // One write of the whole line: with O_APPEND it lands at the end in one piece.
        log.file.write_all(&line)?;
        log.size += len;
        log.file.sync_data()?;
        drop(log);
        if let Some((store, gateway)) = &self.shared {
            let json = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            store
                .audit(gateway, entry.at, &json)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Shifts `audit.log.N` to `.N+1` (the oldest is replaced), `audit.log` to `.1`, and
    /// starts a new `audit.log`; the folder is synced so the renames survive a crash.
    fn rotate(&self, log: &mut LogFile) -> io::Result<()> {
        for n in (1..KEEP_ROTATED).rev() {
            match std::fs::rename(self.rotated_path(n), self.rotated_path(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, self.rotated_path(1))?;
        log.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        log.size = 0;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        tracing::info!(path = %self.path.display(), "audit log rotated");
        Ok(())
    }

    /// Counts a refused unauthenticated request from `ip` (no I/O) and says what must be
    /// written for it: the first from an address in a minute is written as it is, the
    /// rest are counted into a later line; now and then the lines other addresses are
    /// owed are due too. Hand the answer to [`Audit::write_refusal`] unless it is
    /// [`RefusalWrite::is_nothing`].
    pub fn count_refusal(&self, ip: IpAddr, status: u16, now: Instant) -> RefusalWrite {
        let mut tally = self.lock_tally();
        let now_count = match tally.refused(ip, status, now) {
            Refused::WriteNow { count } => Some(count),
            Refused::Counted => None,
        };
        RefusalWrite {
            now_count,
            sweep: tally.sweep_due(now),
        }
    }

    /// Writes what [`Audit::count_refusal`] asked for; `entry` is the refused request.
    pub fn write_refusal(
        &self,
        entry: AuditEntry,
        write: RefusalWrite,
        now: Instant,
    ) -> io::Result<()> {
        if let Some(count) = write.now_count {
            let entry = AuditEntry {
                count: (count > 1).then_some(count),
                ..entry
            };
            self.append(&entry)?;
        }
        if write.sweep {
            self.flush_refusals(now, false)?;
        }
        Ok(())
    }

    /// [`Audit::count_refusal`] and [`Audit::write_refusal`] in one.
    pub fn refused(&self, ip: IpAddr, entry: AuditEntry, now: Instant) -> io::Result<()> {
        let write = self.count_refusal(ip, entry.status, now);
        self.write_refusal(entry, write, now)
    }

    /// Writes the tally lines that are due (all of them with `all`, at shutdown).
    pub fn flush_refusals(&self, now: Instant, all: bool) -> io::Result<()> {
        let due = self.lock_tally().due(now, all);
        for line in due {
            self.append(&tally_entry(line))?;
        }
        Ok(())
    }

    fn lock_tally(&self) -> std::sync::MutexGuard<'_, RefusalTally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The line for refusals counted since an address's last line.
fn tally_entry(line: DueLine) -> AuditEntry {
    let remote = if line.ip.is_unspecified() {
        "other addresses".to_string()
    } else {
        line.ip.to_string()
    };
    AuditEntry {
        at: Timestamp::now(),
        action: "unauthorized".into(),
        device: None,
        request: None,
        outcome: format!(
            "refused: {} more unauthenticated requests since this address's last line",
            line.count
        ),
        status: line.status,
        remote: Some(remote),
        count: Some(line.count),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> AuditEntry {
        AuditEntry {
            at: Timestamp::from_second(1_800_000_000 + i64::from(n)).unwrap(),
            action: "diagnostic".into(),
            device: Some("icu7-vent".into()),
            request: Some(format!("readings-{n}")),
            outcome: "ok".into(),
            status: 200,
            remote: Some("127.0.0.1:50000".into()),
            count: None,
        }
    }

    fn lines(path: &Path) -> Vec<AuditEntry> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn lines_accumulate_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("nested").join("audit.log");
        let a = Audit::open(&path).unwrap();
        a.append(&entry(1)).unwrap();
        a.append(&entry(2)).unwrap();
        drop(a);
        let b = Audit::open(&path).unwrap();
        b.append(&entry(3)).unwrap();
        assert_eq!(lines(&path), vec![entry(1), entry(2), entry(3)]);
    }

    #[test]
    fn concurrent_appends_stay_whole_lines() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        a.append(&entry(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let got = lines(&path);
        assert_eq!(got.len(), 100);
        let mut requests: Vec<_> = got.into_iter().filter_map(|e| e.request).collect();
        requests.sort();
        requests.dedup();
        assert_eq!(requests.len(), 100);
    }

    #[test]
    fn rotation_keeps_each_file_under_the_cap_and_a_few_old_ones() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit.log");
        let one = serde_json::to_vec(&entry(1)).unwrap().len() as u64 + 1;
        let a = Audit::open_capped(&path, one * 10).unwrap();
        for i in 0..100 {
            a.append(&entry(i)).unwrap();
        }
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        assert!(size(&path) <= one * 10);
        for n in 1..=KEEP_ROTATED {
            assert!(size(&a.rotated_path(n)) <= one * 10, "audit.log.{n}");
        }
        assert!(!a.rotated_path(KEEP_ROTATED + 1).exists());
        // The newest lines are in audit.log, the ones before in .1, in order.
        let last = lines(&path);
        assert_eq!(last.last(), Some(&entry(99)));
        let before = lines(&a.rotated_path(1));
        assert_eq!(
            before.last().unwrap().request,
            Some(format!("readings-{}", 99 - last.len()))
        );
        // Reopening knows the size already there.
        drop(a);
        let b = Audit::open_capped(&path, one * 10).unwrap();
        for i in 100..120 {
            b.append(&entry(i)).unwrap();
        }
        assert!(size(&path) <= one * 10);
    }

    #[test]
    fn refusals_are_written_once_a_minute_per_address() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("audit.log");
        let a = Audit::open(&path).unwrap();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let refused = AuditEntry {
            action: "unauthorized".into(),
            status: 401,
            ..entry(0)
        };
        let t0 = Instant::now();
        for _ in 0..200 {
            a.refused(ip, refused.clone(), t0).unwrap();
        }
        assert_eq!(lines(&path), vec![refused.clone()]);
        a.flush_refusals(t0 + crate::refusals::AUDIT_EVERY, false)
            .unwrap();
        let got = lines(&path);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].count, Some(199));
        assert_eq!(got[1].remote.as_deref(), Some("192.0.2.7"));
    }
}

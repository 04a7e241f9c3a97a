//! The append-only audit log of hotline actions (DESIGN §5 "an append-only audit log of
//! hotline actions").
//!
//! One JSON object per line: when, what, on which device, which request, how it ended,
//! the HTTP status answered and the caller's address. Never the token. The file is opened
//! for appending only, every line is flushed and `sync_data`'d before [`Audit::append`]
//! returns (a hotline action is on disk before it is answered), and one mutex keeps the
//! lines of concurrent callers whole.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// The caller's address (`ip:port`) when known.
    pub remote: Option<String>,
}

/// The audit log file, shared by every handler.
#[derive(Debug, Clone)]
pub struct Audit {
    inner: Arc<Mutex<File>>,
    path: PathBuf,
}

impl Audit {
    /// Opens `path` for appending (creating it and its folders). Nothing already in it is
    /// ever rewritten.
    pub fn open(path: &Path) -> io::Result<Audit> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Audit {
            inner: Arc::new(Mutex::new(file)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line and makes it durable before returning.
    pub fn append(&self, entry: &AuditEntry) -> io::Result<()> {
        let mut line = serde_json::to_vec(entry).map_err(io::Error::other)?;
        line.push(b'\n');
        let mut f = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // One write of the whole line: with O_APPEND it lands at the end in one piece.
        f.write_all(&line)?;
        f.sync_data()
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
}

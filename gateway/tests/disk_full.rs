//! A full disk under the gateway's store, for real: the store on a small tmpfs, a
//! ballast file, batches until the disk is full. The failed batch is refused (so not
//! acknowledged), nothing committed before is lost, and once the ballast is deleted the
//! same store object takes batches again (it reopens its file) without a restart.
//!
//! Mounting needs root, as CI has; elsewhere the test says so and does nothing.

use std::path::Path;
use std::process::Command;
use tend_gateway::fleet::Fleet;
use tend_gateway::ingest::IngestContext;
use tend_gateway::store::{GatewayStore, RedbStore, StoreError};
use tend_profiles::{ProfileSet, Value};
use tend_wire::{Record, RecordBody, UpBatch, WireReading, VERSION};

struct Tmpfs<'a>(&'a Path);

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

fn batch(first: u64, n: u64) -> UpBatch {
    let at = jiff::Timestamp::now();
    UpBatch {
        v: VERSION,
        agent: "agent-1".into(),
        incarnation: "i1".into(),
        site: "s-1".into(),
        sent_at: at,
        oldest: None,
        records: (first..first + n)
            .map(|seq| Record {
                seq,
                at,
                device: "vent".into(),
                body: RecordBody::Readings {
                    readings: (0..20)
                        .map(|i| WireReading {
                            name: format!("reading-{i}"),
                            value: Value::Num(seq as f64),
                            unit: None,
                        })
                        .collect(),
                },
            })
            .collect(),
    }
}

#[test]
fn a_full_disk_refuses_batches_loses_nothing_and_recovers_without_a_restart() {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    if !is_root {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs this as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mount a tmpfs at {}",
        dir.path().display()
    );
    let _umount = Tmpfs(dir.path());
    let ballast = dir.path().join("ballast");
    std::fs::write(&ballast, vec![0u8; 3 << 20]).unwrap();

    let cx = IngestContext {
        gateway: "gw".into(),
        fleet: Fleet::parse("fleet.toml", "").unwrap(),
        profiles: ProfileSet::builtin().unwrap(),
        tz: jiff::tz::TimeZone::UTC,
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
    };
    let store = RedbStore::open(&dir.path().join("data")).unwrap();
    let now = jiff::Timestamp::now();
    let mut next = 1u64;
    let mut acked = Vec::new();
    let failed = loop {
        match store.apply(&batch(next, 100), &cx, now) {
            Ok(a) => {
                acked.push(a.stored);
                next += 100;
            }
            Err(e) => break e,
        }
        assert!(next < 1_000_000, "the disk never filled");
    };
    assert!(matches!(failed, StoreError::Io { .. }), "{failed}");
    assert!(failed.to_string().contains("disk"), "{failed}");
    // Still full: still refused, never a silent success.
    assert!(store.apply(&batch(next, 100), &cx, now).is_err());

    // Space comes back: the same store takes the refused batch, and everything
    // acknowledged before is there.
    std::fs::remove_file(&ballast).unwrap();
    let a = store.apply(&batch(next, 100), &cx, now).unwrap();
    assert_eq!(a.new_records, 100);
    for seq in (1..next + 100).step_by(37) {
        assert!(store.has_record("agent-1", seq).unwrap(), "seq {seq} lost");
    }
    assert_eq!(store.records_stored().unwrap(), next + 99);
    assert!(!acked.is_empty());
}

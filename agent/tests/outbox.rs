//! The outbox on real files in temp dirs: seqs, durability across reopen and `kill -9`,
//! concurrency, acks by exact ranges, paging, the size cap, and damaged files.
//!
//! The crash test runs this test binary itself as the child: with
//! `TEND_OUTBOX_CRASH_CHILD=<file>` set, the test `crash_child` appends in a loop and
//! prints each seq once `append` returned; without it, that test does nothing.

use jiff::Timestamp;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tend_agent::outbox::{Outbox, OutboxConfig, OutboxError, AGENT_DEVICE};
use tend_profiles::{DeviceState, Value};
use tend_wire::{Record, RecordBody, SeqRange, WireReading};

/// A reading record of about 200 bytes encoded, like one poll of a few points.
fn reading(i: u64) -> RecordBody {
    RecordBody::Readings {
        readings: ["pressure", "flow", "battery"]
            .iter()
            .map(|n| WireReading {
                name: (*n).into(),
                value: Value::Num(i as f64 / 10.0),
                unit: Some("kPa".into()),
            })
            .collect(),
    }
}

fn state() -> RecordBody {
    RecordBody::State {
        from: DeviceState::Up,
        to: DeviceState::Down,
    }
}

fn cfg(path: &Path) -> OutboxConfig {
    OutboxConfig::new(path)
}

fn all_pending(ob: &Outbox) -> Vec<Record> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = ob.pending(after, 1000, 1 << 20).unwrap();
        match page.last() {
            Some(r) => after = Some(r.seq),
            None => return out,
        }
        out.extend(page);
    }
}

#[tokio::test]
async fn seqs_are_monotonic_and_durable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/outbox.redb");
    let at: Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    let mut seqs = Vec::new();
    for i in 0..10 {
        seqs.push(ob.append("icu7-vent", at, reading(i)).await.unwrap());
    }
    seqs.extend(
        ob.append_many(vec![
            ("icu7-vent".into(), at, state()),
            ("lab-3".into(), at, reading(99)),
        ])
        .await
        .unwrap(),
    );
    assert_eq!(seqs, (1..=12).collect::<Vec<_>>());
    assert!(ob.append_many(vec![]).await.unwrap().is_empty());
    ob.close().await.unwrap();

    let ob = Outbox::open(cfg(&path)).await.unwrap();
    let s = ob.stats();
    assert_eq!((s.records, s.next_seq, s.oldest_seq), (12, 13, Some(1)));
    let recs = all_pending(&ob);
    assert_eq!(recs.len(), 12);
    assert_eq!(
        recs[10],
        Record {
            seq: 11,
            at,
            device: "icu7-vent".into(),
            body: state()
        }
    );
    let bytes: usize = recs
        .iter()
        .map(|r| tend_wire::encode(r).unwrap().len())
        .sum();
    assert_eq!(s.bytes, bytes as u64);
    // Acked records leave, but their seqs are never handed out again.
    assert_eq!(
        ob.ack(&[SeqRange { first: 1, last: 12 }]).await.unwrap(),
        12
    );
    ob.close().await.unwrap();
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    assert_eq!(ob.append("d", at, state()).await.unwrap(), 13);
    assert_eq!(ob.stats().records, 1);
    ob.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appenders_get_distinct_seqs_and_none_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(cfg(&dir.path().join("o.redb"))).await.unwrap();
    let mut tasks = Vec::new();
    // 32 × 500: kept small because an unoptimised redb commits slowly in test builds.
    for t in 0..32u64 {
        let ob = ob.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for i in 0..500u64 {
                let seq = ob
                    .append(
                        &format!("dev-{t}"),
                        Timestamp::now(),
                        reading(t * 10_000 + i),
                    )
                    .await
                    .unwrap();
                mine.push((seq, t * 10_000 + i));
            }
            mine
        }));
    }
    let mut given = BTreeMap::new();
    for t in tasks {
        for (seq, i) in t.await.unwrap() {
            assert!(given.insert(seq, i).is_none(), "seq {seq} given twice");
        }
    }
    assert_eq!(given.len(), 16_000);
    assert_eq!(ob.stats().records, 16_000);
    let recs = all_pending(&ob);
    assert_eq!(recs.len(), 16_000);
    for r in &recs {
        assert_eq!(r.body, reading(given[&r.seq]), "seq {}", r.seq);
    }
    ob.close().await.unwrap();
}

#[tokio::test]
async fn ack_removes_exactly_the_given_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.redb");
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    let items = (0..20)
        .map(|i| ("d".to_string(), Timestamp::now(), reading(i)))
        .collect();
    assert_eq!(
        ob.append_many(items).await.unwrap(),
        (1..=20).collect::<Vec<_>>()
    );
    let r = |first, last| SeqRange { first, last };
    // Holes, a range past the end, and one that is empty.
    let n = ob
        .ack(&[r(3, 5), r(9, 9), r(15, 100), r(12, 11)])
        .await
        .unwrap();
    assert_eq!(n, 3 + 1 + 6);
    let left: Vec<u64> = all_pending(&ob).iter().map(|r| r.seq).collect();
    assert_eq!(left, vec![1, 2, 6, 7, 8, 10, 11, 12, 13, 14]);
    // Acking what is already gone deletes nothing more.
    assert_eq!(ob.ack(&[r(3, 5), r(0, 2)]).await.unwrap(), 2);
    assert_eq!(ob.stats().oldest_seq, Some(6));
    ob.close().await.unwrap();
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    let left: Vec<u64> = all_pending(&ob).iter().map(|r| r.seq).collect();
    assert_eq!(left, vec![6, 7, 8, 10, 11, 12, 13, 14]);
    assert_eq!(ob.stats().records, 8);
    ob.close().await.unwrap();
}

#[tokio::test]
async fn pending_pages_with_after_and_byte_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(cfg(&dir.path().join("o.redb"))).await.unwrap();
    let items = (0..25)
        .map(|i| ("d".to_string(), Timestamp::now(), reading(i)))
        .collect();
    ob.append_many(items).await.unwrap();
    let seqs = |v: Vec<Record>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
    assert_eq!(
        seqs(ob.pending(None, 10, 1 << 20).unwrap()),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(ob.pending(Some(10), 10, 1 << 20).unwrap()),
        (11..=20).collect::<Vec<_>>()
    );
    assert_eq!(
        seqs(ob.pending(Some(20), 10, 1 << 20).unwrap()),
        (21..=25).collect::<Vec<_>>()
    );
    assert!(ob.pending(Some(25), 10, 1 << 20).unwrap().is_empty());
    assert!(ob.pending(Some(u64::MAX), 10, 1 << 20).unwrap().is_empty());
    assert!(ob.pending(None, 0, 1 << 20).unwrap().is_empty());
    // A byte limit smaller than one record still yields one, so nothing can stall.
    assert_eq!(seqs(ob.pending(Some(4), 10, 1).unwrap()), vec![5]);
    let one = tend_wire::encode(&ob.pending(None, 1, 1 << 20).unwrap()[0])
        .unwrap()
        .len();
    let page = ob.pending(None, 100, one * 3 + one / 2).unwrap();
    assert_eq!(page.len(), 3);
    assert!(
        page.iter()
            .map(|r| tend_wire::encode(r).unwrap().len())
            .sum::<usize>()
            <= one * 3 + one / 2
    );
    // Ack between pages: paging by `after` carries on past holes.
    ob.ack(&[SeqRange {
        first: 11,
        last: 13,
    }])
    .await
    .unwrap();
    assert_eq!(
        seqs(ob.pending(Some(10), 3, 1 << 20).unwrap()),
        vec![14, 15, 16]
    );
    ob.close().await.unwrap();
}

#[tokio::test]
async fn cap_drops_oldest_readings_first_and_keeps_every_state() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.redb");
    let max_bytes = 40_000;
    let ob = Outbox::open(OutboxConfig {
        max_bytes,
        ..cfg(&path)
    })
    .await
    .unwrap();
    let mut readings = BTreeSet::new();
    let mut states = BTreeSet::new();
    for chunk in 0..20u64 {
        let items: Vec<_> = (0..50u64)
            .map(|i| {
                let body = if i % 10 == 0 {
                    state()
                } else {
                    reading(chunk * 50 + i)
                };
                ("d".to_string(), Timestamp::now(), body)
            })
            .collect();
        let kinds: Vec<bool> = items.iter().map(|(_, _, b)| b.is_droppable()).collect();
        for (seq, droppable) in ob.append_many(items).await.unwrap().into_iter().zip(kinds) {
            if droppable {
                readings.insert(seq);
            } else {
                states.insert(seq);
            }
        }
        assert!(ob.stats().bytes <= max_bytes, "{:?}", ob.stats());
    }
    let recs = all_pending(&ob);
    let s = ob.stats();
    let present: BTreeSet<u64> = recs.iter().map(|r| r.seq).collect();
    // Every state is still there.
    assert!(states.is_subset(&present));
    // The readings that went are the oldest ones.
    let gone: BTreeSet<u64> = readings.difference(&present).copied().collect();
    assert!(!gone.is_empty());
    let kept_min = readings.intersection(&present).next().copied().unwrap();
    assert!(gone.iter().all(|&g| g < kept_min));
    // Each drop event is reported with its own seq, count and range; together they
    // account for every missing reading.
    let mut reported = 0;
    let mut covered = BTreeSet::new();
    for r in &recs {
        if let RecordBody::Dropped {
            count,
            first_seq,
            last_seq,
        } = r.body
        {
            assert_eq!(r.device, AGENT_DEVICE);
            let these: Vec<u64> = gone.range(first_seq..=last_seq).copied().collect();
            assert_eq!(these.len() as u64, count);
            assert_eq!((these[0], *these.last().unwrap()), (first_seq, last_seq));
            covered.extend(these);
            reported += count;
        }
    }
    assert_eq!(covered, gone);
    assert_eq!(reported, gone.len() as u64);
    assert_eq!(s.dropped_total, reported);
    assert!(!s.over_cap);
    let bytes: usize = recs
        .iter()
        .map(|r| tend_wire::encode(r).unwrap().len())
        .sum();
    assert_eq!(s.bytes, bytes as u64);
    ob.close().await.unwrap();
    // The drop total survives a restart.
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    assert_eq!(ob.stats().dropped_total, reported);
    ob.close().await.unwrap();
}

#[tokio::test]
async fn over_cap_with_only_states_keeps_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(OutboxConfig {
        max_bytes: 1000,
        ..cfg(&dir.path().join("o.redb"))
    })
    .await
    .unwrap();
    ob.append("d", Timestamp::now(), reading(1)).await.unwrap();
    let items = (0..30)
        .map(|_| ("d".to_string(), Timestamp::now(), state()))
        .collect();
    let seqs = ob.append_many(items).await.unwrap();
    let s = ob.stats();
    assert!(s.over_cap && s.bytes > 1000, "{s:?}");
    assert_eq!(s.dropped_total, 1);
    let recs = all_pending(&ob);
    // 30 states and the report of the one dropped reading.
    assert_eq!(recs.len(), 31);
    assert!(seqs.iter().all(|s| recs.iter().any(|r| r.seq == *s)));
    assert_eq!(
        recs.last().unwrap().body,
        RecordBody::Dropped {
            count: 1,
            first_seq: 1,
            last_seq: 1
        }
    );
    ob.close().await.unwrap();
}

#[tokio::test]
async fn file_stays_bounded_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.redb");
    let max_bytes = 100_000;
    let ob = Outbox::open(OutboxConfig {
        max_bytes,
        ..cfg(&path)
    })
    .await
    .unwrap();
    let mut sizes = Vec::new();
    for round in 0..150u64 {
        let items = (0..100)
            .map(|i| ("d".to_string(), Timestamp::now(), reading(round * 100 + i)))
            .collect();
        ob.append_many(items).await.unwrap();
        if round % 25 == 24 {
            sizes.push(std::fs::metadata(&path).unwrap().len());
        }
    }
    // 15,000 records of ~200 bytes went through a 100 kB outbox: 3 MB written.
    assert!(ob.stats().dropped_total > 14_000);
    let (early, late) = (sizes[1], *sizes.last().unwrap());
    assert!(late <= early * 2 && late < 8 << 20, "file grew: {sizes:?}");
    ob.close().await.unwrap();
}

#[tokio::test]
async fn damaged_or_unusable_files_give_errors_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // Not a redb file at all: moved aside whole, and a new outbox starts.
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5au8; 64 << 10]).unwrap();
    let ob = Outbox::open(cfg(&garbage)).await.unwrap();
    assert_eq!(ob.stats().next_seq, 1);
    ob.append("d", Timestamp::now(), state()).await.unwrap();
    ob.close().await.unwrap();
    let aside = moved_aside(dir.path(), "garbage.redb");
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read(&aside[0]).unwrap(), vec![0x5au8; 64 << 10]);

    // A real outbox cut short: redb recovers from an older commit, or the file is moved
    // aside; either way the outbox works and keeps its seqs unique.
    let cut = dir.path().join("cut.redb");
    let ob = Outbox::open(cfg(&cut)).await.unwrap();
    let first = ob.incarnation().to_string();
    let items = (0..500)
        .map(|i| ("d".to_string(), Timestamp::now(), reading(i)))
        .collect();
    ob.append_many(items).await.unwrap();
    ob.close().await.unwrap();
    let len = std::fs::metadata(&cut).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    f.set_len(len / 3).unwrap();
    drop(f);
    let ob = Outbox::open(cfg(&cut)).await.unwrap();
    all_pending(&ob);
    if moved_aside(dir.path(), "cut.redb").is_empty() {
        assert_eq!(ob.incarnation(), first);
    } else {
        assert_ne!(ob.incarnation(), first, "a new file is a new incarnation");
        assert_eq!(ob.stats().next_seq, 1);
    }
    ob.append("d", Timestamp::now(), state()).await.unwrap();
    ob.close().await.unwrap();

    // A directory where the file should be.
    let err = Outbox::open(cfg(dir.path())).await.unwrap_err();
    assert!(
        err.to_string().contains(&dir.path().display().to_string()),
        "{err}"
    );

    // The same file twice.
    let p = dir.path().join("twice.redb");
    let ob = Outbox::open(cfg(&p)).await.unwrap();
    let err = Outbox::open(cfg(&p)).await.unwrap_err();
    assert!(matches!(err, OutboxError::Open { .. }), "{err}");
    ob.close().await.unwrap();
}

/// The files `name` was moved aside to in `dir`.
fn moved_aside(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!("{name}.corrupt-");
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    v.sort();
    v
}

/// The incarnation is made with the file and kept with it; a new file gets a new one.
#[tokio::test]
async fn an_outbox_keeps_its_incarnation_and_a_new_file_gets_a_new_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.redb");
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    let inc = ob.incarnation().to_string();
    assert_eq!(inc.len(), 32);
    assert!(inc.chars().all(|c| c.is_ascii_hexdigit()), "{inc}");
    assert!(tend_wire::valid_incarnation(&inc));
    assert_eq!(ob.stats().incarnation, inc);
    ob.append("d", Timestamp::now(), state()).await.unwrap();
    ob.close().await.unwrap();
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    assert_eq!(ob.incarnation(), inc);
    ob.close().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    let ob = Outbox::open(cfg(&path)).await.unwrap();
    assert_ne!(ob.incarnation(), inc);
    assert_eq!(ob.stats().next_seq, 1);
    ob.close().await.unwrap();
}

#[tokio::test]
async fn closed_outbox_refuses_work() {
    let dir = tempfile::tempdir().unwrap();
    let ob = Outbox::open(cfg(&dir.path().join("o.redb"))).await.unwrap();
    let other = ob.clone();
    ob.close().await.unwrap();
    let err = other
        .append("d", Timestamp::now(), state())
        .await
        .unwrap_err();
    assert!(matches!(err, OutboxError::Closed { .. }), "{err}");
    assert!(other.ack(&[SeqRange { first: 1, last: 1 }]).await.is_err());
    other.close().await.unwrap();
}

const CHILD_ENV: &str = "TEND_OUTBOX_CRASH_CHILD";

/// The child of `survives_kill_9`: appends from 16 tasks and acks now and then,
/// printing `SEQ n` after each append returned, `ACKING a b` before and `ACKED a b`
/// after each ack. Does nothing in a normal test run.
#[test]
fn crash_child() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let ob = Outbox::open(cfg(Path::new(&path))).await.unwrap();
        let say = |line: String| {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        };
        for t in 0..16u64 {
            let ob = ob.clone();
            tokio::spawn(async move {
                for i in 0u64.. {
                    let body = if i % 7 == 0 { state() } else { reading(i) };
                    let seq = ob
                        .append(&format!("d{t}"), Timestamp::now(), body)
                        .await
                        .unwrap();
                    say(format!("SEQ {seq}"));
                }
            });
        }
        // Ack a window of old seqs every few ms, like a gateway would.
        loop {
            tokio::time::sleep(Duration::from_millis(7)).await;
            let s = ob.stats();
            if let Some(first) = s.oldest_seq {
                let last = first + 40;
                say(format!("ACKING {first} {last}"));
                ob.ack(&[SeqRange { first, last }]).await.unwrap();
                say(format!("ACKED {first} {last}"));
            }
        }
    });
}

/// Spawns `crash_child` and kills it with SIGKILL at random moments, several times on
/// the same file; every seq it printed must then be present exactly once (unless it
/// was acked), and seqs must continue above every seq seen.
#[test]
fn survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let exe = std::env::current_exe().unwrap();
    let mut rng = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut printed = BTreeSet::new();
    let mut acked = BTreeSet::new();
    let mut maybe_acked = Vec::new();
    for run in 0..6 {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (started_tx, started) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if lines.is_empty() {
                    let _ = started_tx.send(());
                }
                lines.push(l);
            }
            lines
        });
        // The random moment counts from the child's first record, not from the spawn: on
        // a loaded machine the child may need longer than the whole window to start.
        let _ = started.recv_timeout(Duration::from_secs(60));
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(150 + rng % 350));
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();
        let before = printed.iter().next_back().copied().unwrap_or(0);
        let mut acking = BTreeMap::new();
        for l in &lines {
            let w: Vec<&str> = l.split(' ').collect();
            match w.as_slice() {
                ["SEQ", n] => {
                    let n: u64 = n.parse().unwrap();
                    assert!(n > before, "run {run}: seq {n} reused (had up to {before})");
                    assert!(printed.insert(n), "run {run}: seq {n} printed twice");
                }
                ["ACKING", a, b] => {
                    acking.insert((a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()), ());
                }
                ["ACKED", a, b] => {
                    let (a, b) = (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap());
                    acking.remove(&(a, b));
                    acked.extend(a..=b);
                }
                _ => {}
            }
        }
        // An ack cut short by the kill may or may not have happened.
        maybe_acked.extend(acking.into_keys());
    }
    assert!(
        printed.len() > 100,
        "the child barely ran: {}",
        printed.len()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ob = Outbox::open(cfg(&path)).await.unwrap();
        let recs = all_pending(&ob);
        let mut present = BTreeSet::new();
        for r in &recs {
            assert!(present.insert(r.seq), "seq {} stored twice", r.seq);
        }
        let in_doubt = |s: u64| maybe_acked.iter().any(|&(a, b)| (a..=b).contains(&s));
        for &s in &printed {
            if acked.contains(&s) {
                assert!(!present.contains(&s), "acked seq {s} came back");
            } else if !in_doubt(s) {
                assert!(present.contains(&s), "durable seq {s} lost");
            }
        }
        let max = *printed.iter().next_back().unwrap();
        let s = ob.stats();
        assert!(s.next_seq > max, "{s:?} after max {max}");
        assert_eq!(s.records, recs.len() as u64);
        assert!(ob.append("d", Timestamp::now(), state()).await.unwrap() > max);
        ob.close().await.unwrap();
    });
}

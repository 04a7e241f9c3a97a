//! Outbox throughput (DESIGN §5: at least 100,000 durable records/s; `tend-bench --only outbox` measures it with AV-500 records).
//!
//!     cargo run --release -p tend-agent --example outbox_bench -- [--appenders 64]
//!         [--seconds 3] [--runs 5] [--window-us 2000] [--dir DIR]
//!
//! Each run opens a fresh outbox file in DIR (default: a temp dir under the system temp
//! dir — put it on the disk you care about) and lets N tasks append ~200-byte reading
//! records in a closed loop, each `append` awaited (durable) before the next. Prints
//! durable records/s per run and the median. Then the same load against a 16 MiB cap
//! (readings dropped while appending; file size printed), then draining a 180,000-record
//! backlog (DESIGN §5: one hour of gateway outage must drain in under 15 s) with
//! `pending` pages of 1,000 and one `ack` per page.

use jiff::Timestamp;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend_agent::outbox::{Outbox, OutboxConfig};
use tend_profiles::Value;
use tend_wire::{RecordBody, SeqRange, WireReading};

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

struct Args {
    appenders: usize,
    seconds: f64,
    runs: usize,
    window: Duration,
    dir: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        appenders: 64,
        seconds: 3.0,
        runs: 5,
        window: Duration::from_millis(2),
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--appenders" => a.appenders = v()?.parse()?,
            "--seconds" => a.seconds = v()?.parse()?,
            "--runs" => a.runs = v()?.parse()?,
            "--window-us" => a.window = Duration::from_micros(v()?.parse()?),
            "--dir" => a.dir = Some(v()?.into()),
            _ => anyhow::bail!("unknown argument {k}"),
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let tmp = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let sample = tend_wire::encode(&tend_wire::Record {
        seq: 1_000_000,
        at: Timestamp::now(),
        device: "icu7-vent".into(),
        body: reading(12345),
    })?;
    println!(
        "outbox_bench: {} appenders, {} s x {} runs, commit window {:?}, record {} bytes, dir {}",
        a.appenders,
        a.seconds,
        a.runs,
        a.window,
        sample.len(),
        tmp.path().display()
    );
    let mut rates = Vec::new();
    for run in 0..a.runs {
        let path = tmp.path().join(format!("run{run}.redb"));
        let ob = Outbox::open(OutboxConfig {
            commit_window: a.window,
            ..OutboxConfig::new(&path)
        })
        .await?;
        let (n, secs) = closed_loop(&ob, a.appenders, a.seconds).await?;
        let rate = n as f64 / secs;
        let file = std::fs::metadata(&path)?.len();
        println!(
            "run {run}: {n} records in {secs:.2} s = {rate:.0} durable records/s (file {:.1} MB)",
            file as f64 / 1e6
        );
        rates.push(rate);
        ob.close().await?;
        std::fs::remove_file(&path)?;
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "median: {:.0} durable records/s ({} appenders)",
        rates[rates.len() / 2],
        a.appenders
    );

    // Full: a 16 MiB cap overrun several times, so the oldest readings are dropped
    // while appending; the file must stay bounded.
    let path = tmp.path().join("full.redb");
    let max_bytes = 16 << 20;
    let ob = Outbox::open(OutboxConfig {
        commit_window: a.window,
        max_bytes,
        ..OutboxConfig::new(&path)
    })
    .await?;
    let (n, secs) = closed_loop(&ob, a.appenders, a.seconds.max(3.0)).await?;
    let s = ob.stats();
    println!(
        "full: {:.0} durable records/s with a {} MiB cap; {n} appended, {} dropped, {:.1} MB stored, file {:.1} MB",
        n as f64 / secs,
        max_bytes >> 20,
        s.dropped_total,
        s.bytes as f64 / 1e6,
        std::fs::metadata(&path)?.len() as f64 / 1e6
    );
    ob.close().await?;

    // Drain: 180,000 records waiting, sent in pages and acked page by page.
    let path = tmp.path().join("drain.redb");
    let ob = Outbox::open(OutboxConfig::new(&path)).await?;
    for chunk in 0..180u64 {
        let items = (0..1000)
            .map(|i| {
                (
                    format!("dev-{:02}", i % 50),
                    Timestamp::now(),
                    reading(chunk * 1000 + i),
                )
            })
            .collect();
        ob.append_many(items).await?;
    }
    let start = Instant::now();
    let mut after = None;
    let mut sent = 0;
    loop {
        let page = ob.pending(after, 1000, 1 << 20)?;
        let (Some(first), Some(last)) = (page.first(), page.last()) else {
            break;
        };
        let batch = tend_wire::encode(&page)?;
        std::hint::black_box(batch);
        after = Some(last.seq);
        sent += page.len();
        ob.ack(&[SeqRange {
            first: first.seq,
            last: last.seq,
        }])
        .await?;
    }
    println!(
        "drain: {sent} records read, encoded and acked in {:.2} s; {} left",
        start.elapsed().as_secs_f64(),
        ob.stats().records
    );
    ob.close().await?;
    Ok(())
}

/// `appenders` tasks, each appending and awaiting one record at a time, for `seconds`.
async fn closed_loop(ob: &Outbox, appenders: usize, seconds: f64) -> anyhow::Result<(u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let start = Instant::now();
    for t in 0..appenders {
        let (ob, stop, done) = (ob.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let device = format!("dev-{t:02}");
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ob.append(&device, Timestamp::now(), reading(i)).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, tend_agent::outbox::OutboxError>(())
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    Ok((done.load(Ordering::Relaxed), start.elapsed().as_secs_f64()))
}

//! The hotline page with a large fleet, in headless Chromium: how big its first load is,
//! how long until the fleet is on screen, and what filtering, sorting and the periodic
//! refresh cost with 2,000 devices (issue 15: "smooth on a hospital PC").
//!
//!     cargo build --release -p tend-gateway -p tend-bench
//!     target/release/page_bench [--devices 2000] [--runs 5]
//!
//! Builds a fleet file of N devices (one customer, two sites), fills the gateway's store
//! with a day of their history (identity, states, readings; every 20th down with an open
//! fault and its ticket), starts the release `tend-gateway` on it (no agent: the store is
//! the fleet), opens the page with the token and times the page's own work in the page
//! (`performance.now()`), so the figures are the browser's, not the harness's. Prints a
//! Markdown table.

use anyhow::{bail, Context};
use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;
use tend_gateway::fleet::Fleet;
use tend_gateway::ingest::IngestContext;
use tend_gateway::store::{GatewayStore, RedbStore};
use tend_profiles::{DeviceState, FaultClass, ProfileSet, SignalKind, Value as PValue};
use tend_testkit::browser::{chromium, Browser};
use tend_testkit::config::{write_secret, API_TOKEN};
use tend_testkit::procs::GatewayProc;
use tend_wire::{EpisodeChange, EpisodeEvent, Record, RecordBody, UpBatch, WireReading};

fn fleet_file(n: usize) -> String {
    let mut s = String::from(
        "[[customer]]\nid = \"c-1\"\nname = \"Bench Hospital Group\"\ncontact_name = \"N\"\ncontact_phone = \"1\"\n\
         [[site]]\nid = \"s-a\"\ncustomer = \"c-1\"\nname = \"Main\"\naddress = \"A\"\nservice_area = \"same_city\"\n\
         [[site]]\nid = \"s-b\"\ncustomer = \"c-1\"\nname = \"County\"\naddress = \"B\"\nservice_area = \"remote\"\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "[[device]]\nid = \"dev-{i:05}\"\nsite = \"s-{}\"\nserial = \"AV5C-21-{i:06}\"\nlocation = \"Ward {} bed {}\"\naccepted = \"2025-03-01\"\n",
            if i % 3 == 0 { "b" } else { "a" },
            i / 20,
            i % 20
        ));
    }
    s
}

fn episode(device: &str, at: Timestamp) -> RecordBody {
    RecordBody::Episode(EpisodeEvent {
        episode: format!("bench/{device}/ALM1.4/1"),
        change: EpisodeChange::Opened,
        code: "ALM1.4".into(),
        kind: SignalKind::Fault,
        class: Some(FaultClass::Major),
        description: "exhalation valve fault".into(),
        action: Some("Replace the exhalation valve assembly; bring spare.".into()),
        evidence: BTreeMap::new(),
        device_available: false,
        opened_at: at,
        due: None,
        opening: None,
    })
}

/// The records of one device: identified and up a day ago; every 20th down at noon with
/// an open major fault; ten readings five seconds ago.
fn history(i: usize, now: Timestamp, seq: &mut u64) -> Vec<Record> {
    let t0 = now - SignedDuration::from_hours(24);
    let device = format!("dev-{i:05}");
    let mut bodies = vec![
        (
            t0,
            RecordBody::Identity {
                model: "aeris/av-500".into(),
                firmware: "5.2.0".into(),
                serial: Some(format!("AV5C-21-{i:06}")),
                profile: "aeris/av-500 5.x".into(),
            },
        ),
        (
            t0,
            RecordBody::State {
                from: DeviceState::Unknown,
                to: DeviceState::Up,
            },
        ),
    ];
    if i % 20 == 7 {
        let at = t0 + SignedDuration::from_hours(12);
        bodies.push((
            at,
            RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
        ));
        bodies.push((at, episode(&device, at)));
    }
    let readings = (0..10)
        .map(|k| WireReading {
            name: format!("reading_{k}"),
            value: PValue::Num(k as f64 * 1.5),
            unit: Some("kPa".into()),
        })
        .collect();
    bodies.push((
        now - SignedDuration::from_secs(5),
        RecordBody::Readings { readings },
    ));
    bodies
        .into_iter()
        .map(|(at, body)| {
            *seq += 1;
            Record {
                seq: *seq,
                at,
                device: device.clone(),
                body,
            }
        })
        .collect()
}

fn fill(store: &RedbStore, cx: &IngestContext, n: usize, now: Timestamp) -> anyhow::Result<()> {
    let mut seq = 0u64;
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(100) {
        let records = chunk
            .iter()
            .flat_map(|&i| history(i, now, &mut seq))
            .collect();
        let batch = UpBatch {
            v: tend_wire::VERSION,
            agent: "agent-bench".into(),
            incarnation: "b0".into(),
            site: "s-a".into(),
            sent_at: now,
            oldest: None,
            records,
        };
        store.apply(&batch, cx, now)?;
    }
    Ok(())
}

struct Args {
    devices: usize,
    runs: usize,
    gateway: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        devices: 2000,
        runs: 5,
        gateway: PathBuf::from("target/release/tend-gateway"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--devices" => a.devices = it.next().context("--devices N")?.parse()?,
            "--runs" => a.runs = it.next().context("--runs N")?.parse()?,
            "--gateway" => a.gateway = it.next().context("--gateway PATH")?.into(),
            other => bail!("unknown argument {other:?} (--devices N, --runs N, --gateway PATH)"),
        }
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

/// Starts the gateway on a store filled with `devices` devices.
async fn gateway_with_fleet(a: &Args, dir: &std::path::Path) -> anyhow::Result<GatewayProc> {
    let gw_dir = dir.join("gw");
    std::fs::create_dir_all(&gw_dir)?;
    let fleet = fleet_file(a.devices);
    std::fs::write(gw_dir.join("fleet.toml"), &fleet)?;
    write_secret(gw_dir.join("api.token"), format!("{API_TOKEN}\n"))?;
    let config = gw_dir.join("gateway.toml");
    std::fs::write(
        &config,
        "gateway_id = \"gw-page-bench\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\ntimezone = \"Asia/Shanghai\"\n\
         [broker]\nembedded = true\nlisten = \"127.0.0.1:0\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n",
    )?;
    let store = RedbStore::open(&gw_dir.join("data"))?;
    let cx = IngestContext {
        gateway: "gw-page-bench".into(),
        fleet: Fleet::parse("fleet.toml", &fleet)?,
        profiles: ProfileSet::builtin()?,
        tz: jiff::tz::TimeZone::get("Asia/Shanghai")?,
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
    };
    let started = Instant::now();
    fill(&store, &cx, a.devices, Timestamp::now())?;
    eprintln!(
        "store filled with {} devices in {:?}",
        a.devices,
        started.elapsed()
    );
    drop(store);
    Ok(GatewayProc::start(&a.gateway, &gw_dir, &config, &gw_dir.join("gateway.log")).await)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn worst(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::MIN, f64::max)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let Some(chromium) = chromium() else {
        bail!("chromium is needed (apt-get install chromium)")
    };
    if !a.gateway.is_file() {
        bail!(
            "{} is missing: cargo build --release -p tend-gateway",
            a.gateway.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let gw = gateway_with_fleet(&a, dir.path()).await?;
    let n = a.devices;
    if std::env::var_os("PAGE_BENCH_HOLD").is_some() {
        // Keeps the gateway up for a minute, to look at it with curl.
        eprintln!("holding: {}", gw.api);
        tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    }

    let http = reqwest::Client::new();
    let page = http
        .get(format!("{}/", gw.api))
        .send()
        .await?
        .bytes()
        .await?;
    let icon = http
        .get(format!("{}/favicon.ico", gw.api))
        .send()
        .await?
        .bytes()
        .await?;
    let mut api_ms = Vec::new();
    let mut api_bytes = 0;
    for _ in 0..a.runs {
        let t = Instant::now();
        let b = http
            .get(format!("{}/api/v1/devices", gw.api))
            .bearer_auth(API_TOKEN)
            .send()
            .await?
            .bytes()
            .await?;
        api_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        api_bytes = b.len();
    }

    let mut b = Browser::start(&chromium, "zh-CN").await;
    // The first page of rows drawn and the count of the whole fleet shown.
    let on_screen = format!(
        "document.querySelectorAll('#devices tbody tr[data-id]').length === Math.min({n}, PAGE_ROWS) && document.getElementById('shown').textContent.includes('{n}')"
    );
    let mut first = Vec::new();
    for _ in 0..a.runs {
        b.navigate("about:blank").await;
        let t = Instant::now();
        b.navigate(&format!("{}/#token={API_TOKEN}", gw.api)).await;
        b.until("the whole fleet on screen", &on_screen).await;
        first.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let timed = |js: &str| {
        format!("(async () => {{ const t0 = performance.now(); {js}; return performance.now() - t0; }})()")
    };
    let (mut render, mut filter, mut sort, mut refresh) = (vec![], vec![], vec![], vec![]);
    let (mut fetch_devices, mut fetch_tickets, mut all) = (vec![], vec![], vec![]);
    for i in 0..a.runs {
        let ms = |v: serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
        // Each drawing is followed by a forced layout, so the browser's work is counted.
        render.push(ms(b
            .eval_async(&timed("renderFleet(); document.body.offsetHeight"))
            .await));
        let keystroke = format!(
            "const f = document.getElementById('filter'); f.value = 'bed {i}'; renderFleet(); document.body.offsetHeight; f.value = ''; renderFleet(); document.body.offsetHeight"
        );
        filter.push(ms(b.eval_async(&timed(&keystroke)).await) / 2.0);
        let click = "document.querySelector('#devices th[data-sort=availability]').click(); document.body.offsetHeight";
        sort.push(ms(b.eval_async(&timed(click)).await));
        refresh.push(ms(b
            .eval_async(&timed("await refresh(); document.body.offsetHeight"))
            .await));
        all.push(ms(b.eval_async(&timed("rowsShown = 1e9; renderFleet(); document.body.offsetHeight; rowsShown = PAGE_ROWS; renderFleet()")).await));
        fetch_devices.push(ms(b
            .eval_async(&timed("await api('/api/v1/devices')"))
            .await));
        fetch_tickets.push(ms(b.eval_async(&timed("await refreshTickets()")).await));
    }
    let heap = b
        .eval("performance.memory ? performance.memory.usedJSHeapSize : null")
        .await
        .as_f64()
        .unwrap_or(f64::NAN);
    let errors = b.errors();
    if !errors.is_empty() {
        bail!("the browser reported errors: {errors:?}");
    }
    println!(
        "| the page with {n} devices ({} runs) | median | worst |",
        a.runs
    );
    println!("|---|---|---|");
    println!(
        "| first load: the page and its icon, nothing else | {:.1} KiB | |",
        (page.len() + icon.len()) as f64 / 1024.0
    );
    let row =
        |what: &str, v: &[f64]| println!("| {what} | {:.0} ms | {:.0} ms |", median(v), worst(v));
    row(
        &format!(
            "`GET /api/v1/devices` ({:.0} KiB of JSON), at the gateway",
            api_bytes as f64 / 1024.0
        ),
        &api_ms,
    );
    row(
        "open with the token → the fleet on screen (its first 200 rows, the count of all)",
        &first,
    );
    row(
        "draw the fleet table, first 200 rows (in the page)",
        &render,
    );
    row("a keystroke in the filter (in the page)", &filter);
    row("sort by a column (in the page)", &sort);
    row(
        "the 10 s refresh: 3 API calls and the redraw (in the page)",
        &refresh,
    );
    row(
        "… of which fetching and parsing the devices (in the page)",
        &fetch_devices,
    );
    row("… of which the tickets table (in the page)", &fetch_tickets);
    row(
        &format!("show all {n} rows at once, and back (in the page)"),
        &all,
    );
    println!(
        "| JS heap after the runs | {:.1} MiB | |",
        heap / 1_048_576.0
    );
    Ok(())
}

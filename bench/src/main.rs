//! `tend-bench`: the figures of DESIGN §5, measured on this machine, each a median over
//! several runs, with ThingsBoard IoT Gateway beside the agent. Run it through
//! `./scripts/bench`, which builds the binaries, installs the peer in `.bench-venv/` and
//! passes its arguments on (`./scripts/bench --window 10s --runs 1` for a quick try).
//!
//! Phases (`--only` picks some):
//! - `resources`: `tend-agent run` against 50 simulated AV-500 ventilators on Modbus TCP,
//!   polled every second, sending to `tend-gateway run`; the agent's CPU, memory and
//!   wake-ups over the window from /proc, and beside them what one wake-up costs on this
//!   machine ([`procs::WakeCost`]). Then the peer against the same simulators, measured the same
//!   way (its whole process tree), its MQTT messages counted. Once per layout
//!   (`--layouts`): `endpoints`, one Modbus TCP endpoint per ventilator, and `one-link`,
//!   the 50 ventilators as units 1–50 behind one endpoint (a serial-to-Ethernet gateway
//!   in front of an RS-485 bus, the layout hospitals have most), and `bus`, the 50 as
//!   units of one RS-485 bus the agent (and the peer) read as Modbus RTU on a pty.
//! - `outbox`: durable records/s of the agent's outbox, closed-loop appenders (64, where
//!   the commit's latency bounds the rate, and 1,024, enough to keep its writer busy).
//! - `drain`: a 180,000-record backlog in the agent's outbox, the gateway down, the
//!   agent's memory while it holds it; the gateway starts; time until it has stored
//!   every record; loss and duplicates.
//! - `latency`: faults raised in simulators; from the poll that saw each (the record's
//!   `at`) to the backend stand-in receiving its ticket.
//! - `ingest`: pre-encoded batches of many synthetic agents published as fast as the
//!   gateway acknowledges them; records stored per second, per batch size
//!   (`--ingest-batches`).
//!
//! The report also gives the sizes of the shipped binaries (`--dist`, the `dist`
//! profile `scripts/package` builds and `scripts/bench` builds first).
//!
//! The simulators, the backend stand-in and the publishers live in this process; the
//! agent, the gateway, mosquitto and the peer are processes of their own.
#![forbid(unsafe_code)]

mod faults;
mod mqtt;
mod peer;
mod procs;
mod procs_util;
mod report;
mod scaleout;
mod tend;

use anyhow::Context;
use bytes::Bytes;
use clap::Parser;
use jiff::Timestamp;
use report::Report;
use rumqttc::QoS;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend::{device_id, Gateway, GatewayPlan, Target};
use tend_agent::outbox::{Outbox, OutboxConfig};
use tend_devsim::av500::Av500Units;
use tend_devsim::av500::Endpoint;
use tend_devsim::{Av500Config, Av500Handle, Av500Sim, Av500State};
use tend_gateway::store::{GatewayStore, RedbStore};
use tend_profiles::Value;
use tend_wire::{seal, AgentKey, Purpose, Record, RecordBody, UpBatch, WireReading};

fn duration(s: &str) -> Result<Duration, String> {
    tend_devsim::duration::parse_duration(s)
}

#[derive(Parser, Debug)]
#[command(
    name = "tend-bench",
    // scripts/bench passes some options first; the user's own come later and win.
    args_override_self = true,
    about = "The benchmarks of DESIGN §5, tend beside ThingsBoard IoT Gateway"
)]
struct Args {
    /// How long the agent's (and the peer's) CPU and memory are measured, per run.
    #[arg(long, default_value = "60s", value_parser = duration)]
    window: Duration,
    /// Runs of each phase; every figure is the median over them.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Phases, comma-separated: resources, outbox, drain, latency, ingest, scaleout.
    #[arg(long, default_value = "resources,outbox,drain,latency,ingest,scaleout")]
    only: String,
    /// Simulated ventilators (Modbus TCP).
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// The resources phase's layouts, comma-separated: `endpoints` (one Modbus TCP
    /// endpoint per ventilator), `one-link` (every ventilator a unit behind one endpoint),
    /// `bus` (every ventilator a unit of one RS-485 bus, Modbus RTU on a pty).
    #[arg(long, default_value = "endpoints,one-link,bus")]
    layouts: String,
    /// Settling time after start before a window opens.
    #[arg(long, default_value = "10s", value_parser = duration)]
    warmup: Duration,
    /// Skip the peer.
    #[arg(long)]
    no_peer: bool,
    /// The resources phase's agent reads every point at every poll, as the peer does (an
    /// AV-500 profile without `read_every`, from a `profiles_dir`): by default the shipped
    /// profile reads the maintenance counters once a minute.
    #[arg(long)]
    every_poll: bool,
    /// Where tend-agent and tend-gateway are.
    #[arg(long, default_value = "target/release")]
    bin: PathBuf,
    /// The folder of the `tend-agent` to run, when not `--bin` (`scripts/bench` passes the shipped
    /// one, `target/x86_64-unknown-linux-musl/dist-agent`); its size is reported as the
    /// shipped agent's.
    #[arg(long)]
    agent_dir: Option<PathBuf>,
    /// The target directory holding the shipped binaries (`dist-agent/tend-agent`,
    /// `dist/tend-gateway`), for their sizes.
    #[arg(long, default_value = "target")]
    dist: PathBuf,
    /// The virtualenv holding thingsboard-gateway.
    #[arg(long, default_value = ".bench-venv")]
    venv: PathBuf,
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto: PathBuf,
    /// Records in the outage backlog.
    #[arg(long, default_value_t = 180_000)]
    backlog: u64,
    /// Fault episodes per latency run.
    #[arg(long, default_value_t = 50)]
    episodes: usize,
    /// Time between two faults raised.
    #[arg(long, default_value = "250ms", value_parser = duration)]
    fault_spacing: Duration,
    /// Seconds of appending per outbox run.
    #[arg(long, default_value = "3s", value_parser = duration)]
    outbox_seconds: Duration,
    /// Appender tasks of the outbox runs, comma-separated: one measurement per count.
    /// Each awaits its record's commit before the next, so the rate is at most appenders
    /// ÷ commit time: 64 shows what the commit's latency allows, 1,024 what the writer
    /// does when records queue up (an outage's recorder, many devices at once).
    #[arg(long, default_value = "64,1024", value_delimiter = ',')]
    outbox_appenders: Vec<usize>,
    /// Records published per ingest run.
    #[arg(long, default_value_t = 200_000)]
    ingest_records: u64,
    /// Synthetic agents of the ingest run.
    #[arg(long, default_value_t = 100)]
    ingest_agents: usize,
    /// Records per published batch, comma-separated: one ingest measurement per size.
    /// The agent's uplink sends at most 1,000; a live agent sends what its last second
    /// brought (50 for 50 devices at 1 Hz). A size's run publishes at most 10,000
    /// batches.
    #[arg(long, default_value = "1,10,100,1000")]
    ingest_batches: String,
    /// Batches published and not yet acknowledged (for batches under 1,000 records, one
    /// per synthetic agent, as live agents have).
    #[arg(long, default_value_t = 16)]
    ingest_window: usize,
    /// Working directory (default: a fresh one under the system temp dir, removed at the end).
    #[arg(long)]
    work: Option<PathBuf>,
    /// A command put in front of `tend-agent` (a profiler: "valgrind --tool=massif");
    /// its figures then describe the profiler too.
    #[arg(long)]
    agent_wrap: Option<String>,
    /// Also write the report (Markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tend-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The simulated ventilators, in this process: one endpoint each, and (for the
/// `one-link` layout) the same number again as units 1..=n behind one endpoint, and (for
/// the `bus` layout) again as units 1..=n of one RS-485 bus on a pty.
struct Sims {
    handles: Vec<Av500Handle>,
    units: Option<Av500Units>,
    /// The `bus` layout: the same number again as units 1..=n of one RS-485 bus (Modbus
    /// RTU on a pty).
    bus: Option<Av500Units>,
}

/// The resources phase's layouts.
const LAYOUTS: [&str; 3] = ["endpoints", "one-link", "bus"];

impl Sims {
    async fn start(n: usize, one_link: bool, bus: bool) -> anyhow::Result<Sims> {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let cfg = |i: usize| {
            let mut cfg = Av500Config::v5();
            cfg.serial = tend::serial(i);
            cfg
        };
        let mut handles = Vec::new();
        for i in 0..n {
            handles.push(Av500Sim::spawn_tcp(cfg(i), any).await?);
        }
        anyhow::ensure!(
            n <= 247 || !(one_link || bus),
            "one Modbus link has at most 247 units"
        );
        let cfgs = || -> Vec<Av500Config> {
            (0..n)
                .map(|i| {
                    let mut c = cfg(i);
                    c.unit = (i + 1) as u8;
                    c
                })
                .collect()
        };
        let units = match one_link {
            true => Some(Av500Sim::spawn_tcp_units(cfgs(), any).await?),
            false => None,
        };
        let bus = match bus {
            true => Some(Av500Sim::spawn_rtu_bus(cfgs()).await?),
            false => None,
        };
        Ok(Sims {
            handles,
            units,
            bus,
        })
    }

    /// Each ventilator's endpoint and unit id: one endpoint each (unit 1).
    fn addrs(&self) -> Vec<(SocketAddr, u8)> {
        self.handles
            .iter()
            .filter_map(|h| Some((h.addr()?, 1)))
            .collect()
    }

    /// The targets of `layout`.
    fn layout(&self, layout: &str) -> Vec<Target> {
        let shared = match layout {
            "one-link" => self.units.as_ref(),
            "bus" => self.bus.as_ref(),
            _ => None,
        };
        let Some(link) = shared else {
            return Target::tcp(&self.addrs());
        };
        link.units()
            .iter()
            .map(|(c, _)| match link.endpoint() {
                Endpoint::Tcp(a) => Target::Tcp(*a, c.unit),
                Endpoint::Pty(path) => Target::Bus(path.clone(), c.unit),
            })
            .collect()
    }

    /// Every ventilator healthy again.
    fn reset(&self) {
        for h in &self.handles {
            h.update(|s| *s = Av500State::default());
        }
        for (_, state) in self.units.iter().chain(&self.bus).flat_map(|u| u.units()) {
            state.update(|s| *s = Av500State::default());
        }
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!(
        "[{}] {}",
        Timestamp::now().strftime("%H:%M:%S"),
        msg.as_ref()
    );
}

async fn run(a: Args) -> anyhow::Result<()> {
    let phases: Vec<&str> = a.only.split(',').map(str::trim).collect();
    for p in &phases {
        anyhow::ensure!(
            [
                "resources",
                "outbox",
                "drain",
                "latency",
                "ingest",
                "scaleout"
            ]
            .contains(p),
            "unknown phase {p:?}"
        );
    }
    let layouts = layouts(&a.layouts)?;
    batch_sizes(&a.ingest_batches)?;
    for p in [
        a.agent_folder().join("tend-agent"),
        a.bin.join("tend-gateway"),
    ] {
        anyhow::ensure!(
            p.exists(),
            "{} is missing (cargo build --release)",
            p.display()
        );
    }
    let tmp;
    let work = match &a.work {
        Some(w) => {
            std::fs::create_dir_all(w)?;
            w.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("tend-bench-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut report = Report::new(&a, &work);
    report.dist_sizes = dist_sizes(&a.dist, a.agent_dir.as_deref());
    log(format!("work dir {}", work.display()));
    let one_link = phases.contains(&"resources") && layouts.contains(&"one-link");
    let bus = phases.contains(&"resources") && layouts.contains(&"bus");
    let sims = Sims::start(a.devices, one_link, bus).await?;
    log(format!("{} simulated AV-500 5.x on Modbus TCP", a.devices));

    if phases.contains(&"resources") {
        for layout in &layouts {
            resources(&a, &sims, layout, &work, &mut report).await?;
        }
    }
    if phases.contains(&"outbox") {
        outbox(&a, &work, &mut report).await?;
    }
    if phases.contains(&"drain") {
        drain(&a, &sims, &work, &mut report).await?;
    }
    if phases.contains(&"latency") {
        faults::latency(&a, &sims, &work, &mut report).await?;
    }
    if phases.contains(&"ingest") {
        ingest(&a, &work, &mut report).await?;
    }
    if phases.contains(&"scaleout") {
        scaleout::scaleout(&a, &sims, &work, &mut report).await?;
    }
    let text = report.render();
    println!("{text}");
    if let Some(out) = &a.out {
        std::fs::write(out, &text).with_context(|| out.display().to_string())?;
    }
    Ok(())
}

/// `--layouts`, checked.
fn layouts(s: &str) -> anyhow::Result<Vec<&str>> {
    let v: Vec<&str> = s.split(',').map(str::trim).collect();
    for l in &v {
        anyhow::ensure!(
            LAYOUTS.contains(l),
            "unknown layout {l:?} (--layouts takes {})",
            LAYOUTS.join(", ")
        );
    }
    Ok(v)
}

/// `--ingest-batches`, checked.
fn batch_sizes(s: &str) -> anyhow::Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=1000).contains(n))
                .ok_or_else(|| {
                    anyhow::anyhow!("--ingest-batches: {x:?} is not a size of 1 to 1000")
                })
        })
        .collect()
}

/// Bytes of the shipped binaries, where `scripts/package` or `scripts/bench` built them:
/// the gateway under the target directory `dir`, the agent in `agent_dir` (its musl
/// target's folder) or else `dir/dist-agent`.
fn dist_sizes(dir: &Path, agent_dir: Option<&Path>) -> Vec<(String, u64)> {
    let agent = agent_dir.map_or_else(|| dir.join("dist-agent"), Path::to_path_buf);
    [
        (agent.join("tend-agent"), "tend-agent"),
        (dir.join("dist").join("tend-gateway"), "tend-gateway"),
    ]
    .iter()
    .filter_map(|(path, b)| {
        let bytes = std::fs::metadata(path).ok()?.len();
        Some((b.to_string(), bytes))
    })
    .collect()
}

impl Args {
    /// The folder of the `tend-agent` the bench runs.
    fn agent_folder(&self) -> &Path {
        self.agent_dir.as_deref().unwrap_or(&self.bin)
    }
}

// ---------------------------------------------------------------------------------------
// resources

async fn resources(
    a: &Args,
    sims: &Sims,
    layout: &str,
    work: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let tck = procs::clk_tck();
    let addrs = sims.layout(layout);
    let peer_setup = if a.no_peer {
        None
    } else {
        let venv = std::fs::canonicalize(&a.venv).with_context(|| {
            format!(
                "the peer's venv {} (scripts/bench creates it)",
                a.venv.display()
            )
        })?;
        let (mosq, port) = peer::start_mosquitto(&a.mosquitto, &work.join("mosquitto")).await?;
        let (counts, responder) = peer::responder(port).await?;
        Some((venv, mosq, port, counts, responder))
    };
    for run in 0..a.runs {
        sims.reset();
        let dir = work.join(format!("resources-{layout}-{run}"));
        log(format!(
            "resources run {} ({layout}): tend-agent, {} devices, window {:?}",
            run + 1,
            a.devices,
            a.window
        ));
        let plan = GatewayPlan {
            dir: dir.join("gateway"),
            devices: a.devices,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            backend: None,
            trust_dir: None,
            shared: None,
        };
        tend::enrol_agent(&a.bin, &plan, &dir.join("agent"))?;
        let gw = Gateway::start(&a.bin, &plan).await?;
        let cfg = tend::agent_config(&dir.join("agent"), &gw.broker, &addrs, "60s")?;
        if a.every_poll {
            tend::read_every_point_every_poll(&cfg)?;
        }
        let mut agent = tend::start_agent(a.agent_folder(), &cfg, a.agent_wrap.as_deref())?;
        tokio::time::sleep(a.warmup).await;
        let r0 = gw.metric("tend_gateway_records_total").await?;
        let wake = procs::WakeCost::start(a.window);
        let u = procs::measure(agent.pid(), a.window, tck).await;
        let r1 = gw.metric("tend_gateway_records_total").await?;
        let wake_us = wake.finish().await;
        anyhow::ensure!(agent.alive(), "the agent died:\n{}", agent.tail());
        agent.stop(Duration::from_secs(10)).await;
        gw.stop().await;
        clean(&dir);
        let rate = (r1 - r0) as f64 / a.window.as_secs_f64();
        log(format!(
            "  tend-agent: {:.2} % of a core, VmRSS mean {:.1} MiB, max {:.1} MiB, VmHWM {:.1} MiB; gateway stored {rate:.1} records/s; {:.0} wake-ups/s at {} µs each on this machine",
            u.cpu_pct, u.rss_mean_mib, u.rss_max_mib, u.hwm_mib, u.wakeups_per_s,
            wake_us.map_or("?".into(), |w| format!("{w:.0}"))
        ));
        report.tend_usage.push((layout.to_string(), u, rate));
        if let Some(w) = wake_us {
            report.wake_cost.push((layout.to_string(), w));
        }

        if let Some((venv, _, port, counts, _)) = &peer_setup {
            log(format!(
                "resources run {} ({layout}): thingsboard-gateway",
                run + 1
            ));
            let pdir = dir.join("peer");
            let mut p = peer::start(venv, &pdir, *port, &addrs)?;
            tokio::time::sleep(a.warmup.max(Duration::from_secs(20))).await;
            anyhow::ensure!(p.alive(), "the peer died:\n{}", p.tail());
            let (m0, d0) = counts.snapshot();
            let u = procs::measure(p.pid(), a.window, tck).await;
            let (m1, d1) = counts.snapshot();
            anyhow::ensure!(p.alive(), "the peer died:\n{}", p.tail());
            let peer_tail = p.tail();
            p.stop(Duration::from_secs(10)).await;
            let secs = a.window.as_secs_f64();
            let (mps, dps) = ((m1 - m0) as f64 / secs, (d1 - d0) as f64 / secs);
            log(format!(
                "  peer: {:.2} % of a core, VmRSS mean {:.1} MiB, max {:.1} MiB, VmHWM {:.1} MiB ({} processes); {} messages ({mps:.1}/s), {dps:.0} datapoints/s",
                u.cpu_pct, u.rss_mean_mib, u.rss_max_mib, u.hwm_mib, u.processes, m1 - m0
            ));
            if m1 == m0 {
                log(format!(
                    "  the peer published nothing; its output:\n{peer_tail}"
                ));
            }
            report
                .peer_usage
                .push((layout.to_string(), u, m1 - m0, mps, dps));
        }
    }
    if let Some((_, mosq, _, _, responder)) = peer_setup {
        responder.abort();
        mosq.stop(Duration::from_secs(5)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// outbox

/// A poll's readings as the agent records them for an AV-500 5.x (16 points).
fn av500_readings(i: u64) -> RecordBody {
    let points: [(&str, f64, Option<&str>); 16] = [
        ("pm_days", 37.0, Some("d")),
        ("pm_interval", 180.0, Some("d")),
        ("state", 1.0, None),
        ("alarm_word_1", 0.0, None),
        ("alarm_word_2", 0.0, None),
        ("error_code", 0.0, None),
        (
            "operating_minutes",
            1_966_130.0 + (i / 60) as f64,
            Some("min"),
        ),
        ("turbine_minutes", 620_000.0 + (i / 60) as f64, Some("min")),
        (
            "turbine_temperature",
            42.0 + (i % 10) as f64 / 10.0,
            Some("°C"),
        ),
        ("o2_cell_life", 78.0, Some("%")),
        ("battery", 100.0, Some("%")),
        ("battery_health", 92.0, Some("%")),
        ("mains", 1.0, None),
        ("o2_supply_pressure", 400.0, Some("kPa")),
        ("air_supply_pressure", 400.0, Some("kPa")),
        ("turbine_speed", 23_500.0, Some("rpm")),
    ];
    RecordBody::Readings {
        readings: points
            .iter()
            .map(|(n, v, u)| WireReading {
                name: (*n).into(),
                value: Value::Num(*v),
                unit: u.map(str::to_string),
            })
            .collect(),
    }
}

async fn outbox(a: &Args, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    let dir = work.join("outbox");
    std::fs::create_dir_all(&dir)?;
    for &appenders in &a.outbox_appenders {
        let mut load = crate::report::OutboxLoad {
            appenders,
            ..Default::default()
        };
        for run in 0..a.runs {
            // What the disk costs: with a fixed number of appenders the throughput is at
            // most appenders ÷ commit time, and a commit is at least one fsync.
            let fsync_ms = fsync_probe(&dir)?;
            report.fsync_ms.push(fsync_ms);
            let (rate, cpu_us) = outbox_run(a, &dir, appenders, run).await?;
            log(format!(
                "outbox, {appenders} appenders, run {}: {rate:.0} durable records/s (4 KiB write + fdatasync: median {fsync_ms:.2} ms; {cpu_us:.1} µs of CPU a record)",
                run + 1
            ));
            load.rates.push(rate);
            load.cpu_us.push(cpu_us);
        }
        report.outbox.push(load);
    }
    Ok(())
}

/// One run: `appenders` tasks append AV-500 poll records for `outbox_seconds`, each
/// awaiting its record's commit before the next. Durable records/s and CPU µs per record.
async fn outbox_run(
    a: &Args,
    dir: &Path,
    appenders: usize,
    run: usize,
) -> anyhow::Result<(f64, f64)> {
    let path = dir.join(format!("run{run}.redb"));
    let ob = Outbox::open(OutboxConfig::new(&path)).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let cpu0 = procs::sample(std::process::id());
    let start = Instant::now();
    for t in 0..appenders {
        let (ob, stop, done) = (ob.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let device = device_id(t % 50);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ob.append(&device, Timestamp::now(), av500_readings(i))
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, tend_agent::outbox::OutboxError>(())
        }));
    }
    tokio::time::sleep(a.outbox_seconds).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let cpu_us = (procs::sample(std::process::id()).ticks - cpu0.ticks) as f64 / procs::clk_tck()
        * 1e6
        / n.max(1) as f64;
    ob.close().await?;
    std::fs::remove_file(&path)?;
    Ok((n as f64 / secs, cpu_us))
}

// ---------------------------------------------------------------------------------------
// drain

async fn drain(a: &Args, sims: &Sims, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    let addrs = Target::tcp(&sims.addrs());
    for run in 0..a.runs {
        sims.reset();
        let dir = work.join(format!("drain-{run}"));
        let agent_dir = dir.join("agent");
        let data = agent_dir.join("data");
        std::fs::create_dir_all(&data)?;
        // The outage: an hour of records, made durable by the agent's own outbox code.
        let t_fill = Instant::now();
        let (mut first, mut last) = (u64::MAX, 0u64);
        {
            let ob = Outbox::open(OutboxConfig::new(data.join("outbox.redb"))).await?;
            let hour_ago = Timestamp::now() - jiff::SignedDuration::from_secs(3600);
            let mut i = 0u64;
            while i < a.backlog {
                let n = (a.backlog - i).min(1000);
                let items = (i..i + n)
                    .map(|k| {
                        let at =
                            hour_ago + jiff::SignedDuration::from_millis((k * 1000 / 50) as i64);
                        (device_id((k % 50) as usize), at, av500_readings(k))
                    })
                    .collect();
                for s in ob.append_many(items).await? {
                    first = first.min(s);
                    last = last.max(s);
                }
                i += n;
            }
            let st = ob.stats();
            ob.close().await?;
            // The blocks the file holds, not its length: redb grows the file ahead of use
            // (to 270 MB for this backlog whatever the records' size), and the rest is a hole.
            let file = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(
                data.join("outbox.redb"),
            )?) * 512;
            report.outbox_size = Some((
                st.bytes as f64 / a.backlog as f64,
                file as f64 / a.backlog as f64,
            ));
        }
        anyhow::ensure!(
            last - first + 1 == a.backlog,
            "backlog seqs {first}..={last}"
        );
        log(format!(
            "drain run {}: {} records in the outbox (seq {first}..={last}) in {:.1} s; gateway down",
            run + 1,
            a.backlog,
            t_fill.elapsed().as_secs_f64()
        ));
        // The agent runs (polling the live devices too) while the gateway is down.
        let port = procs_util::free_port()?;
        let cfg = tend::agent_config(
            &agent_dir,
            &format!("mqtt://127.0.0.1:{port}"),
            &addrs,
            "60s",
        )?;
        let plan = GatewayPlan {
            dir: dir.join("gateway"),
            devices: a.devices,
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            backend: None,
            trust_dir: None,
            shared: None,
        };
        tend::enrol_agent(&a.bin, &plan, &agent_dir)?;
        let mut agent = tend::start_agent(a.agent_folder(), &cfg, a.agent_wrap.as_deref())?;
        // The agent in the outage, holding the backlog and recording its devices.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let held = procs::sample(agent.pid());
        let held_mib = held.rss_kib as f64 / 1024.0;
        let gw = Gateway::start(&a.bin, &plan).await?;
        let t0 = Instant::now();
        let mut t_first = None;
        let deadline = t0 + Duration::from_secs(600);
        let done = loop {
            let n = gw.metric("tend_gateway_records_total").await.unwrap_or(0);
            if n > 0 && t_first.is_none() {
                t_first = Some(t0.elapsed());
            }
            if n >= a.backlog {
                break Some(t0.elapsed());
            }
            if Instant::now() > deadline || !agent.alive() {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let dups = gw
            .metric("tend_gateway_duplicate_records_total")
            .await
            .unwrap_or(0);
        let peak_mib = procs::sample(agent.pid()).hwm_kib as f64 / 1024.0;
        anyhow::ensure!(agent.alive(), "the agent died:\n{}", agent.tail());
        agent.stop(Duration::from_secs(10)).await;
        let gw_data = gw.stop().await;
        let Some(total) = done else {
            anyhow::bail!("the backlog did not drain within 600 s");
        };
        // Loss: every seq of the backlog must be in the gateway's store.
        let store = RedbStore::open(&gw_data)?;
        let mut lost = 0u64;
        for s in first..=last {
            if !store.has_record(tend::AGENT_ID, s)? {
                lost += 1;
            }
        }
        drop(store);
        clean(&dir);
        let first_s = t_first.unwrap_or_default().as_secs_f64();
        log(format!(
            "  drained in {:.2} s after the gateway was ready (first record stored after {first_s:.2} s: the agent's reconnect back-off); lost {lost}, received twice {dups}; the agent held the backlog in {held_mib:.1} MiB (VmRSS), peak {peak_mib:.1} MiB (VmHWM)",
            total.as_secs_f64()
        ));
        report
            .drain
            .push((total.as_secs_f64(), first_s, lost, dups));
        report.outage_mib.push((held_mib, peak_mib));
    }
    Ok(())
}

/// The agent whose `up` or `ack` topic this is.
fn agent_of(topic: &str) -> Option<&str> {
    use tend_wire::topic::Parsed;
    match tend_wire::topic::parse(topic)? {
        Parsed::Up(a) | Parsed::Ack(a) => Some(a),
        _ => None,
    }
}

/// (open and decode CPU s, apply CPU s, apply wall s) for these payloads, each with its
/// agent's key and id.
fn breakdown(
    payloads: &[(AgentKey, String, Bytes)],
    dir: &Path,
    devices: usize,
    group: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let c0 = procs::thread_cpu();
    let decoded: Vec<UpBatch> = payloads
        .iter()
        .map(|(key, agent, p)| -> anyhow::Result<UpBatch> {
            let body = seal::open(key, Purpose::Up, agent, p)
                .map_err(|e| anyhow::anyhow!("a bench batch does not open: {}", e.as_str()))?;
            Ok(UpBatch::decode(body)?)
        })
        .collect::<Result<_, _>>()?;
    let decode_cpu = procs::thread_cpu() - c0;
    let store = RedbStore::open(dir)?;
    let cx = tend_gateway::ingest::IngestContext {
        gateway: "gw-bench".into(),
        fleet: tend_gateway::fleet::Fleet::parse("fleet.toml", &tend::fleet(devices))?,
        profiles: tend_profiles::ProfileSet::builtin()?,
        tz: jiff::tz::TimeZone::get("Asia/Shanghai")?,
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
    };
    let (c0, t0) = (procs::thread_cpu(), Instant::now());
    for g in decoded.chunks(group) {
        store.apply_many(g, &cx, Timestamp::now())?;
    }
    let (apply_cpu, apply_wall) = (procs::thread_cpu() - c0, t0.elapsed().as_secs_f64());
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
    Ok((decode_cpu.max(1e-3), apply_cpu.max(1e-3), apply_wall))
}

/// Removes a run's data (stores, outboxes), keeping its configs and logs: the disk
/// holds one run's data at a time.
fn clean(dir: &Path) {
    for sub in ["gateway/data", "agent/data"] {
        let _ = std::fs::remove_dir_all(dir.join(sub));
    }
}

/// Median time of a 4 KiB write + fdatasync in `dir`, ms (50 of them).
fn fsync_probe(dir: &Path) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("fsync-probe");
    let mut f = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut ms = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(report::median(&ms))
}

// ---------------------------------------------------------------------------------------
// ingest

/// The ingest phase's synthetic agents `synth-NNNN` (their keys, to seal their batches
/// and open their acks) and the bench's own MQTT clients (their broker passwords),
/// enrolled with the gateway of `plan`; credentials under `creds`.
fn enrol_ingest(
    a: &Args,
    plan: &GatewayPlan,
    creds: &Path,
) -> anyhow::Result<(HashMap<String, AgentKey>, HashMap<String, String>)> {
    let t_enrol = Instant::now();
    let config = plan.write_files()?;
    std::fs::create_dir_all(creds)?;
    let mut keys: HashMap<String, AgentKey> = HashMap::new();
    for k in 0..a.ingest_agents {
        let agent = format!("synth-{k:04}");
        let out = creds.join(format!("{agent}.cred"));
        keys.insert(agent.clone(), tend::enrol(&a.bin, &config, &agent, &out)?);
    }
    // The publishers and the ack listener log in to the embedded broker as themselves.
    let mut logins: HashMap<String, String> = HashMap::new();
    for name in [
        "bench-acks",
        "bench-pub-0",
        "bench-pub-1",
        "bench-pub-2",
        "bench-pub-3",
    ] {
        let password = tend::enrol_client(&a.bin, &config, name, creds)?;
        logins.insert(name.to_string(), password);
    }
    log(format!(
        "ingest: {} agents enrolled in {:.1} s",
        a.ingest_agents,
        t_enrol.elapsed().as_secs_f64()
    ));
    Ok((keys, logins))
}

/// The ingest phase's batches, encoded and sealed beforehand: `total` records, agent k
/// sending seqs 1, 2, ... in batches of `size`. Each is (topic, payload, records).
fn ingest_batches(
    a: &Args,
    keys: &HashMap<String, AgentKey>,
    size: usize,
    total: u64,
) -> anyhow::Result<Vec<(String, Bytes, u64)>> {
    let t_enc = Instant::now();
    let mut next_seq: Vec<u64> = vec![1; a.ingest_agents];
    let mut batches: Vec<(String, Bytes, u64)> = Vec::new();
    let mut left = total;
    let mut k = 0usize;
    let now = Timestamp::now();
    while left > 0 {
        let n = left.min(size as u64);
        let agent = format!("synth-{k:04}");
        let s0 = next_seq[k];
        let records = (0..n)
            .map(|i| Record {
                seq: s0 + i,
                at: now,
                device: format!("{agent}-{}", device_id(((s0 + i) % 50) as usize)),
                body: av500_readings(s0 + i),
            })
            .collect();
        next_seq[k] += n;
        let b = UpBatch {
            v: tend_wire::VERSION,
            agent: agent.clone(),
            incarnation: "b0".into(),
            site: tend::SITE_ID.into(),
            sent_at: jiff::Timestamp::now(),
            oldest: None,
            records,
        };
        let sealed = tend_wire::encode_sealed(&keys[&agent], Purpose::Up, &agent, &b)?;
        batches.push((tend_wire::topic::up(&agent), Bytes::from(sealed), n));
        left -= n;
        k = (k + 1) % a.ingest_agents;
    }
    let bytes: usize = batches.iter().map(|b| b.1.len()).sum();
    log(format!(
        "ingest: {} batches of up to {} records ({:.0} bytes a record) from {} agents, encoded in {:.1} s",
        batches.len(),
        size,
        bytes as f64 / total as f64,
        a.ingest_agents,
        t_enc.elapsed().as_secs_f64()
    ));
    Ok(batches)
}

async fn ingest(a: &Args, work: &Path, report: &mut Report) -> anyhow::Result<()> {
    // The synthetic agents, enrolled once in a trust directory every run's gateway reads.
    let trust_dir = work.join("ingest-trust");
    let plan = |name: &str| GatewayPlan {
        dir: work.join(format!("ingest-{name}")).join("gateway"),
        devices: a.devices,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backend: None,
        trust_dir: Some(trust_dir.clone()),
        shared: None,
    };
    let (keys, logins) = enrol_ingest(a, &plan("enrol"), &work.join("ingest-credentials"))?;
    let sizes = batch_sizes(&a.ingest_batches)?;
    let largest = sizes.iter().copied().max().unwrap_or(1000);
    for size in sizes {
        // At most 10,000 batches a run: single-record batches are about the gateway's
        // per-message cost, which that many measure well.
        let total = a.ingest_records.min(size as u64 * 10_000);
        let batches = ingest_batches(a, &keys, size, total)?;
        if size == largest {
            ingest_breakdown(a, work, &keys, &batches, total, report).await?;
        }
        // Live agents keep one batch in flight each; a backlog drain keeps a window.
        let in_flight = if size >= 1000 {
            a.ingest_window
        } else {
            a.ingest_agents
        };
        for run in 0..a.runs {
            let plan = plan(&format!("{size}-{run}"));
            let (rate, cpu, us) =
                ingest_run(&a.bin, &plan, &logins, &keys, &batches, total, in_flight).await?;
            log(format!(
                "ingest run {} (batches of {size}, {in_flight} in flight): {total} records acknowledged = {rate:.0} records/s (gateway CPU {cpu:.0} % of a core, {us:.1} µs a record)",
                run + 1,
            ));
            report.ingest.push((size, rate, cpu, us));
        }
    }
    Ok(())
}

/// Where the gateway's time goes, per record, on one core (thread CPU time, so other load
/// on the machine matters little): opening (checking the seal) and decoding the batches,
/// and applying them to a store in this process (groups of `ingest_window`, one
/// transaction each).
async fn ingest_breakdown(
    a: &Args,
    work: &Path,
    keys: &HashMap<String, AgentKey>,
    batches: &[(String, Bytes, u64)],
    total: u64,
    report: &mut Report,
) -> anyhow::Result<()> {
    let payloads: Vec<(AgentKey, String, Bytes)> = batches
        .iter()
        .map(|(topic, p, _)| {
            let agent = agent_of(topic).unwrap_or_default();
            (keys[agent].clone(), agent.to_string(), p.clone())
        })
        .collect();
    let store_dir = work.join("ingest-breakdown");
    let devices = a.devices;
    let group = a.ingest_window.max(1);
    let (decode_cpu, apply_cpu, apply_wall) =
        tokio::task::spawn_blocking(move || breakdown(&payloads, &store_dir, devices, group))
            .await??;
    log(format!(
            "ingest CPU per record on one core: open and decode {:.2} µs ({:.0} records/s), apply {:.2} µs ({:.0} records/s; {:.0} records/s with its fsyncs, groups of {group})",
            decode_cpu * 1e6 / total as f64,
            total as f64 / decode_cpu,
            apply_cpu * 1e6 / total as f64,
            total as f64 / apply_cpu,
            total as f64 / apply_wall,
        ));
    report.ingest_breakdown = Some((total as f64 / decode_cpu, total as f64 / apply_cpu));
    Ok(())
}

/// Publishes `batches` from four clients to the broker at `host:port` (logging in with
/// `logins` when it asks), at most `in_flight` unacknowledged, until sealed acks cover
/// `total` records: the seconds from the first publish to that ack.
async fn publish_until_acked(
    host: &str,
    port: u16,
    logins: Option<&HashMap<String, String>>,
    keys: &HashMap<String, AgentKey>,
    batches: &[(String, Bytes, u64)],
    total: u64,
    in_flight: usize,
) -> anyhow::Result<f64> {
    let login = |name: &str| logins.map(|l| l[name].clone());
    let mut acks = mqtt::connect_as(
        host,
        port,
        "bench-acks",
        login("bench-acks"),
        &["tend/v1/+/ack".to_string()],
    )
    .await?;
    let mut pubs = Vec::new();
    for i in 0..4 {
        let name = format!("bench-pub-{i}");
        pubs.push(mqtt::connect_as(host, port, &name, login(&name), &[]).await?);
    }
    let window = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let acked = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Instant>();
    let ack_task = {
        let (window, acked, keys) = (window.clone(), acked.clone(), keys.clone());
        tokio::spawn(async move {
            let mut done_tx = Some(done_tx);
            while let Some(m) = acks.rx.recv().await {
                // Only acks sealed with the agent's key count, as for a real agent.
                let opened = agent_of(&m.topic)
                    .and_then(|agent| Some((agent, keys.get(agent)?)))
                    .and_then(|(agent, key)| seal::open(key, Purpose::Ack, agent, &m.payload).ok());
                let Some(Ok(ack)) = opened.map(tend_wire::Ack::decode) else {
                    continue;
                };
                let n: u64 = ack.ranges.iter().map(|r| r.last - r.first + 1).sum();
                window.add_permits(1);
                if acked.fetch_add(n, Ordering::Relaxed) + n >= total {
                    if let Some(tx) = done_tx.take() {
                        let _ = tx.send(m.at);
                    }
                }
            }
        })
    };
    let t0 = Instant::now();
    for (i, (topic, payload, _)) in batches.iter().enumerate() {
        window.acquire().await?.forget();
        pubs[i % pubs.len()]
            .client
            .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
            .await?;
    }
    let t_end = tokio::time::timeout(Duration::from_secs(600), done_rx)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "ingest: not every batch was acknowledged within 600 s ({} records)",
                acked.load(Ordering::Relaxed)
            )
        })??;
    ack_task.abort();
    drop(pubs);
    Ok((t_end - t0).as_secs_f64())
}

/// One ingest run: a fresh gateway, `batches` published by four clients with at most
/// `in_flight` unacknowledged, until acks cover `total` records. Returns records/s, the
/// gateway's CPU (% of a core) and its CPU µs per record.
async fn ingest_run(
    bin: &Path,
    plan: &GatewayPlan,
    logins: &HashMap<String, String>,
    keys: &HashMap<String, AgentKey>,
    batches: &[(String, Bytes, u64)],
    total: u64,
    in_flight: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let tck = procs::clk_tck();
    let gw = Gateway::start(bin, plan).await?;
    let (host, port) = gw.broker_addr();
    let me = std::process::id();
    let (g0, b0) = (procs::sample(gw.proc.pid()), procs::sample(me));
    let secs =
        publish_until_acked(&host, port, Some(logins), keys, batches, total, in_flight).await?;
    let (g1, b1) = (procs::sample(gw.proc.pid()), procs::sample(me));
    let stored = gw.metric("tend_gateway_records_total").await?;
    gw.stop().await;
    if let Some(dir) = plan.dir.parent() {
        clean(dir);
    }
    let rate = total as f64 / secs;
    let gw_cpu_s = (g1.ticks - g0.ticks) as f64 / tck;
    let bench_cpu_s = (b1.ticks.saturating_sub(b0.ticks)) as f64 / tck;
    let cpu = gw_cpu_s / secs * 100.0;
    let us = gw_cpu_s * 1e6 / total as f64;
    log(format!(
        "  {total} records in {secs:.2} s; gateway stored {stored}; publisher {:.1} µs a record",
        bench_cpu_s * 1e6 / total as f64
    ));
    anyhow::ensure!(
        stored >= total,
        "the gateway stored {stored} of {total} records"
    );
    Ok((rate, cpu, us))
}

#[cfg(test)]
mod tests {
    use super::*;

    use report::{median, percentile};

    #[test]
    fn percentiles() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0];
        assert_eq!(percentile(&v, 50.0), 5.0);
        assert_eq!(percentile(&v, 99.0), 10.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn readings_look_like_the_agents() {
        let RecordBody::Readings { readings } = av500_readings(1) else {
            panic!()
        };
        assert_eq!(readings.len(), 16);
    }
}

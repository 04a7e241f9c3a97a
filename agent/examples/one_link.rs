//! The agent's cost on the common layout (issue 16): N simulated AV-500 5.x ventilators
//! behind one Modbus TCP endpoint (a serial-to-Ethernet gateway on an RS-485 bus), polled
//! every second by the real `tend-agent run`, its records acknowledged by the real
//! `tend-gateway run` (embedded broker, a fleet of the N, the agent enrolled with
//! `tend-gateway agent add`).
//!
//!     cargo build --release -p tend-agent -p tend-gateway
//!     cargo run --release -p tend-agent --example one_link -- [--units 50]
//!         [--warmup 10] [--window 60] [--linger 100ms] [--runs 1]
//!         [--agent-bin target/release/tend-agent] [--gateway-bin target/release/tend-gateway]
//!
//! After the warm-up, over the window: the agent's CPU as Δ(utime + stime) from
//! `/proc/<pid>/stat`, as % of one core; its resident memory (VmRSS) sampled every second
//! (mean, max) and its peak (VmHWM) at the end, from `/proc/<pid>/status`; its threads;
//! and the records the gateway stored meanwhile (`tend_gateway_records_total`), so an
//! agent that reads nothing cannot look cheap. The simulators run in this process, the
//! gateway in its own; neither is counted. `--linger` sets the agent's `[outbox] linger`
//! (left out: the agent's default).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tend_devsim::av500::{Av500Config, Av500Sim};
use tend_devsim::Version;
use tend_testkit::config::{fleet_toml, BrokerChoice, FleetDevice, GatewaySpec};
use tend_testkit::metrics::metric;
use tend_testkit::procs::{spawn_agent, GatewayProc};

const AGENT: &str = "one-link";

struct Args {
    units: u8,
    warmup: u64,
    window: u64,
    runs: usize,
    linger: Option<String>,
    agent_bin: PathBuf,
    gateway_bin: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        units: 50,
        warmup: 10,
        window: 60,
        runs: 1,
        linger: None,
        agent_bin: "target/release/tend-agent".into(),
        gateway_bin: "target/release/tend-gateway".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || {
            it.next()
                .ok_or_else(|| anyhow::anyhow!("{k} needs a value"))
        };
        match k.as_str() {
            "--units" => a.units = v()?.parse()?,
            "--warmup" => a.warmup = v()?.parse()?,
            "--window" => a.window = v()?.parse()?,
            "--runs" => a.runs = v()?.parse()?,
            "--linger" => a.linger = Some(v()?),
            "--agent-bin" => a.agent_bin = v()?.into(),
            "--gateway-bin" => a.gateway_bin = v()?.into(),
            _ => anyhow::bail!("unknown argument {k} (see the example's doc comment)"),
        }
    }
    anyhow::ensure!(
        (1..=247).contains(&a.units),
        "--units must be 1 to 247 (Modbus unit ids on one link)"
    );
    for bin in [&a.agent_bin, &a.gateway_bin] {
        anyhow::ensure!(
            bin.is_file(),
            "{} not found: build it first (cargo build --release -p tend-agent -p tend-gateway)",
            bin.display()
        );
    }
    Ok(a)
}

fn device_id(i: u8) -> String {
    format!("vent-{i:03}")
}

fn serial(i: u8) -> String {
    format!("AV5C-21-{:06}", 100 + u32::from(i))
}

/// What one run measured.
struct Figures {
    cpu_percent: f64,
    rss_mean_mib: f64,
    rss_max_mib: f64,
    hwm_mib: f64,
    threads: u64,
    stored_per_s: f64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let hz = clock_ticks();
    println!(
        "one_link: {} AV-500 units behind one Modbus TCP endpoint, 1 s polls; warm-up {} s, window {} s, {} run(s), linger {}",
        a.units,
        a.warmup,
        a.window,
        a.runs,
        a.linger.as_deref().unwrap_or("(agent default)")
    );
    let mut all = Vec::new();
    for run in 0..a.runs {
        let f = one_run(&a, hz).await?;
        println!(
            "run {run}: agent CPU {:.2} % of one core; RSS mean {:.1} MiB, max {:.1} MiB, VmHWM {:.1} MiB; {} threads; gateway stored {:.1} records/s",
            f.cpu_percent, f.rss_mean_mib, f.rss_max_mib, f.hwm_mib, f.threads, f.stored_per_s
        );
        all.push(f);
    }
    let median = |get: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = all.iter().map(get).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "median: agent CPU {:.2} % of one core (target <= 1 %), RSS mean {:.1} MiB (target <= 8 MiB), VmHWM {:.1} MiB, gateway stored {:.1} records/s",
        median(|f| f.cpu_percent),
        median(|f| f.rss_mean_mib),
        median(|f| f.hwm_mib),
        median(|f| f.stored_per_s)
    );
    Ok(())
}

async fn one_run(a: &Args, hz: f64) -> anyhow::Result<Figures> {
    let tmp = tempfile::tempdir()?;
    let cfgs = (1..=a.units)
        .map(|i| {
            let mut c = Av500Config::new(Version::new(5, 2, 1), serial(i));
            c.unit = i;
            c
        })
        .collect();
    let sims = Av500Sim::spawn_tcp_units(cfgs, "127.0.0.1:0".parse()?).await?;

    let ids: Vec<(String, String)> = (1..=a.units).map(|i| (device_id(i), serial(i))).collect();
    let fleet: Vec<FleetDevice<'_>> = ids
        .iter()
        .map(|(id, serial)| FleetDevice {
            id,
            serial,
            site: "s-main",
            location: "ICU",
            accepted: "2025-06-01",
        })
        .collect();
    let fleet = fleet_toml(&fleet);
    let gw_dir = tmp.path().join("gateway");
    let spec = GatewaySpec {
        id: "gw-one-link",
        broker: BrokerChoice::Embedded(tend_testkit::ports::free_port()),
        backend: None,
        fleet: &fleet,
    };
    let gw = GatewayProc::spawn(&a.gateway_bin, &gw_dir, &spec).await;
    let agent_dir = tmp.path().join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    tend_testkit::trust::enrol(
        &a.gateway_bin,
        &gw.config,
        AGENT,
        &agent_dir.join(format!("{AGENT}.cred")),
    );
    let endpoint = sims
        .addr()
        .ok_or_else(|| anyhow::anyhow!("the units are on Modbus TCP"))?;
    let config = agent_toml(&agent_dir, &gw.broker_url, endpoint, a)?;
    let mut agent = spawn_agent(&a.agent_bin, &config, &agent_dir.join("agent.log"));
    let pid = agent
        .id()
        .ok_or_else(|| anyhow::anyhow!("the agent exited at once"))?;

    tokio::time::sleep(Duration::from_secs(a.warmup)).await;
    let stored0 = stored(&gw).await;
    anyhow::ensure!(
        stored0 > 0.0,
        "the gateway stored nothing from the agent during the warm-up; agent log:\n{}",
        tend_testkit::procs::tail(&agent_dir.join("agent.log"), 20)
    );
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let mut rss = Vec::new();
    let end = t0 + Duration::from_secs(a.window);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss.push(status_kib(pid, "VmRSS:")?);
    }
    let (cpu1, secs) = (cpu_ticks(pid)?, t0.elapsed().as_secs_f64());
    let stored1 = stored(&gw).await;
    let hwm = status_kib(pid, "VmHWM:")?;
    let threads = status_kib(pid, "Threads:")?;
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let mib = |kib: u64| kib as f64 / 1024.0;
    Ok(Figures {
        cpu_percent: (cpu1 - cpu0) as f64 / hz / secs * 100.0,
        rss_mean_mib: mib(rss.iter().sum::<u64>()) / rss.len().max(1) as f64,
        rss_max_mib: mib(rss.iter().copied().max().unwrap_or(0)),
        hwm_mib: mib(hwm),
        threads,
        stored_per_s: (stored1 - stored0) / secs,
    })
}

fn agent_toml(
    dir: &Path,
    broker: &str,
    endpoint: std::net::SocketAddr,
    a: &Args,
) -> anyhow::Result<PathBuf> {
    let mut s = format!(
        "agent_id = \"{AGENT}\"\nsite_id = \"s-main\"\ndata_dir = \"data\"\n\n[uplink]\nbroker = \"{broker}\"\ncredentials = \"{AGENT}.cred\"\n"
    );
    if let Some(l) = &a.linger {
        s.push_str(&format!("\n[outbox]\nlinger = \"{l}\"\n"));
    }
    for i in 1..=a.units {
        s.push_str(&format!(
            "\n[[device]]\nid = \"{}\"\nprofile = \"aeris/av-500\"\ntransport = \"modbus-tcp\"\naddress = \"{endpoint}\"\nunit = {i}\npoll_interval = \"1s\"\n",
            device_id(i)
        ));
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, s)?;
    Ok(path)
}

/// Records the gateway has stored.
async fn stored(gw: &GatewayProc) -> f64 {
    metric(&gw.metrics().await, "tend_gateway_records_total")
}

/// utime + stime of `pid` (clock ticks), fields 14 and 15 of `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after it are plain.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no command name"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state), so field n is at index n - 3.
    let field = |n: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(n - 3)
            .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/stat: no field {n}"))?
            .parse()?)
    };
    Ok(field(14)? + field(15)?)
}

/// A `kB` (or plain count) line of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status: no {key}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("/proc/{pid}/status: {key} has no value"))?
        .parse()?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100, Linux's USER_HZ, if that fails).
fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#![forbid(unsafe_code)]
//! `tend-devsim`: runs simulated LIP-300, AV-500, HM-2 and VM-12 devices, prints where
//! each one listens (one line per device), and plays a fault scenario against them.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tend_devsim::duration::parse_duration;
use tend_devsim::fleet::{self, ExternalBroker, FirmwareSet, FleetOptions};
use tend_devsim::scenario::{self, Scenario};

#[derive(Parser)]
#[command(
    name = "tend-devsim",
    version,
    about = "Device simulators for tend: LIP-300 (serial pty), AV-500 (Modbus RTU pty and TCP), \
             HM-2 (Modbus TCP) and VM-12 (MQTT), written from the vendors' manuals"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start every simulated device, print one line per device, run until Ctrl-C/SIGTERM.
    ///
    /// Lines printed on stdout:
    ///   broker embedded address=127.0.0.1:PORT url=mqtt://127.0.0.1:PORT
    ///   device NAME model=VENDOR/MODEL fw=X.Y.Z transport=serial|modbus-rtu|modbus-tcp|mqtt KEY=VALUE...
    ///   ready devices=N
    ///   step t=SECONDS device=NAME action=... ok|error=...
    Run {
        /// `demo` (built-in, repeating), `none`, or a scenario TOML file.
        #[arg(long, default_value = "none")]
        scenario: String,
        /// External MQTT broker for the VM-12s, mqtt://[user[:password]@]host:port
        /// (default: an embedded broker on a free port).
        #[arg(long)]
        broker: Option<String>,
        /// Which firmware families: old (2.x/4.x/2.x/6.x, names ending -b), new
        /// (3.x/5.x/3.x/7.x, names ending -a), or both.
        #[arg(long, default_value = "both")]
        firmware_set: String,
        /// Address the Modbus TCP simulators listen on.
        #[arg(long, default_value = "127.0.0.1")]
        host: IpAddr,
        /// First TCP port for the Modbus TCP simulators (consecutive ports); default: free ports.
        #[arg(long)]
        base_port: Option<u16>,
        /// Directory for stable symlinks DIR/<device> to the serial ptys.
        #[arg(long)]
        link_dir: Option<PathBuf>,
        /// LIP-300 and AV-500 answer busy for this long after start (e.g. "20s").
        #[arg(long, default_value = "0s")]
        boot_time: String,
        /// VM-12 status interval.
        #[arg(long, default_value = "10s")]
        status_interval: String,
    },
    /// Check a scenario file against the devices of a firmware set; exit 0 or 2.
    Check {
        /// The scenario file (or `demo`).
        scenario: String,
        #[arg(long, default_value = "both")]
        firmware_set: String,
    },
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("tend-devsim: error: {msg}");
    ExitCode::from(2)
}

fn load_scenario(arg: &str) -> Result<Option<Scenario>, String> {
    match arg {
        "none" => Ok(None),
        "demo" => Ok(Some(Scenario::demo())),
        path => Scenario::load(std::path::Path::new(path))
            .map(Some)
            .map_err(|e| e.to_string()),
    }
}

fn checked(arg: &str, set: FirmwareSet) -> Result<Option<Scenario>, String> {
    let sc = load_scenario(arg)?;
    if let Some(s) = &sc {
        let kinds: Vec<_> = fleet::plan(set)
            .into_iter()
            .map(|p| (p.name, p.kind))
            .collect();
        s.check(&kinds).map_err(|e| e.to_string())?;
    }
    Ok(sc)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .init();
    match cli.command {
        Command::Check {
            scenario,
            firmware_set,
        } => {
            let set = match firmware_set.parse::<FirmwareSet>() {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            match checked(&scenario, set) {
                Ok(_) => {
                    println!("ok {scenario}");
                    ExitCode::SUCCESS
                }
                Err(e) => usage_error(e),
            }
        }
        Command::Run {
            scenario,
            broker,
            firmware_set,
            host,
            base_port,
            link_dir,
            boot_time,
            status_interval,
        } => {
            let set = match firmware_set.parse::<FirmwareSet>() {
                Ok(s) => s,
                Err(e) => return usage_error(format!("--firmware-set: {e}")),
            };
            let broker = match broker.map(|b| b.parse::<ExternalBroker>()).transpose() {
                Ok(b) => b,
                Err(e) => return usage_error(format!("--broker: {e}")),
            };
            let boot_time = match parse_duration(&boot_time) {
                Ok(d) => d,
                Err(e) => return usage_error(format!("--boot-time: {e}")),
            };
            let status_interval = match parse_duration(&status_interval) {
                Ok(d) if d >= Duration::from_millis(100) => d,
                Ok(_) => return usage_error("--status-interval: at least 100ms"),
                Err(e) => return usage_error(format!("--status-interval: {e}")),
            };
            let sc = match checked(&scenario, set) {
                Ok(s) => s,
                Err(e) => return usage_error(e),
            };
            let opts = FleetOptions {
                firmware_set: set,
                host,
                base_port,
                broker,
                link_dir,
                boot_time,
                status_interval,
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tend-devsim: error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let outcome = rt.block_on(run(opts, sc));
            rt.shutdown_timeout(Duration::from_millis(500));
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tend-devsim: error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(opts: FleetOptions, sc: Option<Scenario>) -> anyhow::Result<()> {
    let fleet = fleet::start(&opts).await?;
    {
        let mut out = std::io::stdout().lock();
        if let Some(b) = &fleet.broker_line {
            writeln!(out, "{b}")?;
        }
        for l in &fleet.lines {
            writeln!(out, "{l}")?;
        }
        writeln!(out, "ready devices={}", fleet.lines.len())?;
        out.flush()?;
    }
    let scenario_task = async {
        if let Some(s) = &sc {
            scenario::run(s, &fleet.devices, |step, device, r| {
                let outcome = match r {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error={e:?}"),
                };
                println!(
                    "step t={} device={device} {} {outcome}",
                    step.at.as_secs_f64(),
                    step.action
                );
            })
            .await
        }
        std::future::pending::<()>().await
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = scenario_task => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(fleet);
    Ok(())
}

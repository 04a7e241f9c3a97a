//! The `tend-gateway` command line (`run`, `check`, `hotline`, `agent`), in the library so that
//! the binary and the end-to-end suites' copy of it (`tests/`) are one program.

use clap::{CommandFactory, Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Exit code for an invalid config or fleet file.
pub(crate) const EXIT_INVALID: u8 = 2;

#[derive(Parser)]
#[command(
    name = "tend-gateway",
    version,
    about = "tend gateway: collects agents' records, keeps the availability ledger, opens repair tickets, serves the hotline"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: broker (embedded or external), ingest, ledger, tickets, forwarder
    /// and hotline API. Stops on Ctrl-C or SIGTERM.
    Run {
        /// The gateway's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Only check: the config and fleet file, the data directory, that the listen
        /// addresses are free and the external broker and backend reachable; print what is
        /// wrong, exit 0 or 2. Start nothing.
        #[arg(long)]
        check: bool,
    },
    /// Check a config file and the fleet file it names: exit 0 when valid, 2 with file,
    /// line and key when not.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// The hotline from a terminal, through the gateway's API: devices, device, availability,
    /// tickets, diag, retry. Target with --config gateway.toml, or --api URL --token-file F.
    Hotline(crate::cli::HotlineArgs),
    /// Reports through the gateway's API (`report monthly --customer ID --month YYYY-MM
    /// --format html --out FILE`); the same as `hotline report ...`.
    Report {
        #[command(flatten)]
        target: crate::cli::ApiTarget,
        #[command(subcommand)]
        command: crate::cli::ReportCommand,
    },
    /// Enrolment: which agents this fleet's gateways accept (needs only the config file;
    /// a running gateway picks changes up within a second).
    #[command(subcommand)]
    Agent(AgentCommand),
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Enrol an agent: make its key and write its credentials file (mode 0600) to copy
    /// to the agent, which names it in `[uplink] credentials`.
    Add {
        /// The agent's id (its `agent_id`).
        id: String,
        #[arg(long)]
        config: PathBuf,
        /// Where to write the credentials (default `ID.cred` here); never overwritten.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List enrolled and revoked agents.
    List {
        #[arg(long)]
        config: PathBuf,
    },
    /// Revoke an agent: its messages and logins are refused from then on.
    Revoke {
        id: String,
        #[arg(long)]
        config: PathBuf,
    },
}

/// Parses the command line and runs the command: what the binary's `main` does.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            check: true,
        } => crate::check::main(&config),
        Command::Run { config, .. } => run(&config),
        Command::Report { target, command } => hotline(crate::cli::HotlineArgs {
            target,
            json: false,
            command: crate::cli::HotlineCommand::Report(command),
        }),
        Command::Hotline(args) => hotline(args),
        Command::Agent(cmd) => agent(cmd),
        Command::Check { config } => match crate::config::load(&config) {
            Ok(l) => {
                println!(
                    "{}: valid ({} fleet devices)",
                    config.display(),
                    l.fleet.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tend-gateway: invalid config: {e}");
                ExitCode::from(EXIT_INVALID)
            }
        },
    }
}

fn agent(cmd: AgentCommand) -> ExitCode {
    let config = match &cmd {
        AgentCommand::Add { config, .. }
        | AgentCommand::List { config }
        | AgentCommand::Revoke { config, .. } => config,
    };
    let cfg = match crate::config::load_for_enrolment(config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tend-gateway: invalid config: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let now = jiff::Timestamp::now();
    let done = match &cmd {
        AgentCommand::Add { id, out, .. } => crate::enrol::add(&cfg, id, out.as_deref(), now)
            .map(|file| {
                println!(
                    "enrolled agent {id}; credentials in {} (mode 0600): copy them to the agent and name the file in its [uplink] credentials",
                    file.display()
                )
            }),
        AgentCommand::List { .. } => crate::enrol::list(&cfg).map(|text| print!("{text}")),
        AgentCommand::Revoke { id, .. } => crate::enrol::revoke(&cfg, id, now)
            .map(|()| println!("revoked agent {id}: refused from now on")),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tend-gateway: {e}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// The command line's definition, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

fn run(config: &Path) -> ExitCode {
    let loaded = match crate::config::load(config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tend-gateway: invalid config: {e}");
            return ExitCode::from(EXIT_INVALID);
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tend-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let running = match crate::run::start(loaded).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tend-gateway: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        println!(
            "gateway ready broker={} api={}",
            running.broker_url, running.api_url
        );
        wait_for_signal().await;
        tracing::info!("stopping");
        running.stop().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs a hotline command on a small runtime of its own.
fn hotline(args: crate::cli::HotlineArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tend-gateway: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(crate::cli::run_args(&args)) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tend-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

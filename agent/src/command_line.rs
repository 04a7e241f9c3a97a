//! The `tend-agent` command line (`run`, `probe`, `profile check|list`), in the library so
//! that the binary and the end-to-end suites' copy of it (`tests/`) are one program.

use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tend-agent",
    version,
    about = "tend agent: reads device status over serial, Modbus and MQTT, detects technical faults and keeps uptime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with firmware profiles.
    Profile {
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Run the agent: read every configured device, keep every record on disk until the
    /// gateway acknowledges it, answer diagnostics. Stops on Ctrl-C or SIGTERM.
    Run {
        /// The agent's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// Only check: the config, profiles and credentials, and that every device and the
        /// uplink broker can be reached; print what is wrong, exit 0 or 2. Start nothing.
        #[arg(long)]
        check: bool,
    },
    /// Read one device once and print its readings, faults and state (commissioning).
    Probe(Box<crate::probe::ProbeArgs>),
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Check profiles: schema, cross-references, PHI allow-list and golden vectors.
    /// Without a path, checks the profiles built into this binary. Exit 0 when all are
    /// valid, 2 naming file, line and key when not.
    Check {
        /// Profile files or directories of profiles.
        paths: Vec<PathBuf>,
    },
    /// List the profiles built into this binary.
    List,
}

/// Parses the command line and runs the command: what the binary's `main` does.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Profile {
            command: ProfileCommand::Check { paths },
        } => crate::profile_cmd::check(&paths, &mut std::io::stdout(), &mut std::io::stderr()),
        Command::Profile {
            command: ProfileCommand::List,
        } => crate::profile_cmd::list(&mut std::io::stdout()),
        Command::Probe(args) => crate::probe::main(*args),
        Command::Run {
            config,
            check: true,
        } => crate::check::main(&config),
        Command::Run { config, .. } => run(&config),
    }
}

/// The command line's definition, for man pages and shell completions.
pub fn command() -> clap::Command {
    Cli::command()
}

/// Logs to stderr at the level `RUST_LOG` names (`info`, `tend_agent=debug,info`, ...),
/// `info` when it is unset. A value that does not parse is said once and `info` used.
/// `Targets` is EnvFilter without span and field matching, and without the regex
/// engine that would be a tenth of the agent's code.
fn log_to_stderr() {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let info = Targets::new().with_default(LevelFilter::INFO);
    let (filter, refused) = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => match v.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (info, Some((v, e))),
        },
        _ => (info, None),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    if let Some((v, e)) = refused {
        tracing::warn!("RUST_LOG={v:?} is not a log filter ({e}); logging at info");
    }
}

fn run(config: &std::path::Path) -> ExitCode {
    let loaded = match crate::config::load(config) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("tend-agent: invalid config: {e}");
            return ExitCode::from(crate::profile_cmd::EXIT_INVALID);
        }
    };
    log_to_stderr();
    // One thread does all the async work (a link task per port or bus, the recorder, the
    // uplink): it waits on sockets and timers almost all the time, and more workers would
    // only add wake-ups and memory. The outbox's commits run on a blocking-pool thread.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tend-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let shutdown = async {
            let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
            match term {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        };
        crate::run::run(loaded, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tend-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

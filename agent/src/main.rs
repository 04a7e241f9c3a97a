//! `tend-agent`: reads medical devices beside them and keeps every record until the
//! gateway has it. This binary holds the command line; the work is in the library.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
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
    /// Read one device once and print its readings, faults and state (commissioning).
    Probe(Box<tend_agent::probe::ProbeArgs>),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Profile {
            command: ProfileCommand::Check { paths },
        } => tend_agent::profile_cmd::check(&paths, &mut std::io::stdout(), &mut std::io::stderr()),
        Command::Profile {
            command: ProfileCommand::List,
        } => tend_agent::profile_cmd::list(&mut std::io::stdout()),
        Command::Probe(args) => tend_agent::probe::main(*args),
    }
}

//! `tend-agent probe`: read one device once and print what the profile makes of it.

use std::process::ExitCode;

/// Arguments of `tend-agent probe`.
#[derive(Debug, clap::Args)]
pub struct ProbeArgs {}

pub fn main(_args: ProbeArgs) -> ExitCode {
    eprintln!("probe: not built yet");
    ExitCode::from(1)
}

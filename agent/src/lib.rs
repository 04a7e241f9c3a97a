//! The tend agent: transports that read devices, the profile engine's output turned into
//! records, and the tools a field engineer runs (`probe`, `profile check`).
#![forbid(unsafe_code)]

pub mod check;
pub mod command_line;
pub mod config;
pub mod device;
pub mod episodes;
pub mod monitor;
pub mod outbox;
pub mod probe;
pub mod profile_cmd;
pub mod run;
pub mod transport;
pub mod uplink;

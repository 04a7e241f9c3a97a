//! `tend-gateway`: collects what the agents send, keeps the availability ledger, opens
//! repair tickets in the service backend and serves the hotline. The command line is
//! [`tend_gateway::command_line`]; the work is in the library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tend_gateway::command_line::main()
}

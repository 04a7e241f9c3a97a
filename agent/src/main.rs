//! `tend-agent`: reads medical devices beside them and keeps every record until the
//! gateway has it. The command line is [`tend_agent::command_line`]; the work is in the
//! library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tend_agent::command_line::main()
}

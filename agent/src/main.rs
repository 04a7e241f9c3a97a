//! `tend-agent`: reads medical devices beside them and keeps every record until the
//! gateway has it. The command line is [`tend_agent::command_line`]; the work is in the
//! library.
#![forbid(unsafe_code)]

/// See agent/Cargo.toml: musl's malloc made the backlog drain 12 % slower.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

fn main() -> std::process::ExitCode {
    tend_agent::command_line::main()
}

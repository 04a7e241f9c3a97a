//! `e2e-tend-agent`: the `tend-agent` command line, built as this package's binary so the
//! suites get it from cargo (`CARGO_BIN_EXE_e2e-tend-agent`) instead of building it
//! themselves. Its name differs from `tend-agent`'s so the two files never collide in
//! `target/`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tend_agent::command_line::main()
}

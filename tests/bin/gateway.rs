//! `e2e-tend-gateway`: the `tend-gateway` command line, built as this package's binary so
//! the suites get it from cargo (`CARGO_BIN_EXE_e2e-tend-gateway`). Its name differs from
//! `tend-gateway`'s so the two files never collide in `target/`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    tend_gateway::command_line::main()
}

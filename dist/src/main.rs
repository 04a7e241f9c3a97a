//! `tend-dist OUT_DIR`: writes the man pages and shell completions of `tend-agent` and
//! `tend-gateway` from their clap definitions, so they never disagree with `--help`.
//! `scripts/package` runs it and puts the files into the packages:
//!
//! - `OUT_DIR/man/tend-agent.1`, one page per subcommand (`tend-agent-run.1`, ...), the
//!   same for `tend-gateway`;
//! - `OUT_DIR/completions/{bash,zsh,fish}/...`, named where each shell looks for them.
#![forbid(unsafe_code)]

use clap_complete::Shell;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: tend-dist OUT_DIR");
        return ExitCode::from(2);
    };
    let out = PathBuf::from(out);
    for cmd in [
        tend_agent::command_line::command(),
        tend_gateway::command_line::command(),
    ] {
        if let Err(e) = write_all(cmd, &out) {
            eprintln!("tend-dist: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

/// A write that failed, naming the file.
#[derive(Debug)]
struct WriteError {
    path: PathBuf,
    source: std::io::Error,
}

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot write {}: {}", self.path.display(), self.source)
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    let fail = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    std::fs::write(path, bytes).map_err(fail)
}

fn write_all(mut cmd: clap::Command, out: &Path) -> Result<(), WriteError> {
    let name = cmd.get_name().to_string();
    cmd.build();
    write_man(&cmd, &name, &out.join("man"))?;
    for (shell, dir, file) in [
        (Shell::Bash, "bash", name.clone()),
        (Shell::Zsh, "zsh", format!("_{name}")),
        (Shell::Fish, "fish", format!("{name}.fish")),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &name, &mut text);
        write_file(&out.join("completions").join(dir).join(file), &text)?;
    }
    Ok(())
}

/// The page of `cmd` as `page.1`, then one page per subcommand (`page-sub.1`), as git
/// names its pages; help and hidden subcommands have none.
fn write_man(cmd: &clap::Command, page: &str, dir: &Path) -> Result<(), WriteError> {
    // After `build()` a subcommand's display name is `tend-agent-run`: the page's title.
    // Subcommands carry no version of their own; the page footer shows the workspace's.
    let cmd = cmd.clone().version(env!("CARGO_PKG_VERSION"));
    let mut text = Vec::new();
    let path = dir.join(format!("{page}.1"));
    clap_mangen::Man::new(cmd.clone())
        .render(&mut text)
        .map_err(|source| WriteError {
            path: path.clone(),
            source,
        })?;
    write_file(&path, &text)?;
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        write_man(sub, &format!("{page}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

//! Child processes of the bench: started with their output in files, stopped with SIGTERM
//! (then SIGKILL), never left behind.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running child; killed when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if tokio::time::timeout(grace, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log, for an error message.
    pub fn tail(&self) -> String {
        tail(&self.log)
    }
}

pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Starts `cmd` with stdout and stderr appended to `log` (stdout piped when `stdout` is
/// true, for a ready line).
pub fn spawn(name: &str, mut cmd: Command, log: &Path, stdout: bool) -> anyhow::Result<Proc> {
    let f = std::fs::File::create(log).with_context(|| format!("{}", log.display()))?;
    cmd.stderr(Stdio::from(f.try_clone()?));
    if stdout {
        cmd.stdout(Stdio::piped());
    } else {
        cmd.stdout(Stdio::from(f));
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log: log.to_path_buf(),
    })
}

/// Reads the child's stdout until a line starting with `prefix` (within `timeout`).
pub async fn ready_line(p: &mut Proc, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
    let out = p.child.stdout.take().context("stdout was not piped")?;
    let mut lines = BufReader::new(out).lines();
    let found = tokio::time::timeout(timeout, async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with(prefix) {
                return Some(l);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(l)) => {
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(l)
        }
        _ => anyhow::bail!(
            "{} did not print {prefix:?} within {timeout:?}; its log:\n{}",
            p.name,
            p.tail()
        ),
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; taken by whoever binds it next).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

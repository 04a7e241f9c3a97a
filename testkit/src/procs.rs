//! The gateway and the agent as real processes: started from the binary a test names,
//! logs appended to a file, the gateway's ready line parsed for its API and broker
//! addresses, and a small hotline API client.

use crate::config::{gateway_toml, write_secret, GatewaySpec, API_TOKEN, BACKEND_TOKEN};
use crate::wait::until;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running `tend-gateway run` process.
pub struct GatewayProc {
    pub child: tokio::process::Child,
    /// The hotline API's base URL, from the ready line.
    pub api: String,
    /// The broker the gateway reads, from the ready line.
    pub broker_url: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Its stderr (the tracing log).
    pub log: PathBuf,
}

impl GatewayProc {
    /// Writes the config of `spec`, its fleet and token files under `dir` and starts the
    /// gateway binary `bin`; waits for its ready line.
    pub async fn spawn(bin: &Path, dir: &Path, spec: &GatewaySpec<'_>) -> GatewayProc {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("fleet.toml"), spec.fleet).unwrap();
        write_secret(dir.join("api.token"), format!("{API_TOKEN}\n")).unwrap();
        write_secret(dir.join("backend.token"), format!("{BACKEND_TOKEN}\n")).unwrap();
        let config = dir.join("gateway.toml");
        std::fs::write(&config, gateway_toml(spec)).unwrap();
        let log = dir.join("gateway.log");
        Self::start(bin, dir, &config, &log).await
    }

    /// Starts (or restarts) the gateway binary `bin` on an existing config, stderr
    /// appended to `log`; waits for its ready line.
    pub async fn start(bin: &Path, dir: &Path, config: &Path, log: &Path) -> GatewayProc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = tokio::process::Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,tend_gateway=debug,rumqttd=warn")
            .stdout(Stdio::piped())
            .stderr(logf)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if l.starts_with("gateway ready") {
                    return Some(l);
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            panic!(
                "gateway did not start; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |k: &str| {
            ready
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("no {k}= in {ready:?}"))
                .to_string()
        };
        GatewayProc {
            child,
            api: field("api"),
            broker_url: field("broker"),
            dir: dir.to_path_buf(),
            config: config.to_path_buf(),
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL, and waits until the process is gone.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// Everything the process has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET` on the hotline API with the suites' token: status and JSON body (`Null`
    /// when the body is not JSON).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.api))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// `POST` of a JSON body on the hotline API, answered like [`GatewayProc::get`].
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = reqwest::Client::new()
            .post(format!("{}{path}", self.api))
            .bearer_auth(API_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Like `get`, but `None` when the gateway does not answer (a crashed gateway shows
    /// up as a failed assertion, not a panic inside the fixture).
    pub async fn try_get(&self, path: &str) -> Option<(u16, serde_json::Value)> {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", self.api))
            .bearer_auth(API_TOKEN)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?;
        let status = r.status().as_u16();
        Some((status, r.json().await.unwrap_or(serde_json::Value::Null)))
    }

    /// The process id (None once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The `/metrics` text (see [`crate::metrics::metric`]).
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.api))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Starts `<bin> run --config <config>` (`bin` being a `tend-agent` binary), stderr
/// appended to `log`.
pub fn spawn_agent(bin: &Path, config: &Path, log: &Path) -> tokio::process::Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(bin)
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(logf)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Asks the agent behind `device` for its outbox statistics through the gateway.
pub async fn agent_outbox(gw: &GatewayProc, device: &str) -> Option<serde_json::Value> {
    let (st, v) = gw
        .post(
            &format!("/api/v1/devices/{device}/diagnostics"),
            serde_json::json!({"request": "outbox"}),
        )
        .await;
    (st == 200).then(|| v["answer"].clone())
}

/// Whether the gateway's forwarder has nothing left to send: every ticket and event
/// `sent` (or `failed`, kept and shown; the events of a failed ticket wait for an
/// operator's retry).
pub fn forwarding_settled(tickets: &serde_json::Value) -> bool {
    let done = |f: &serde_json::Value| f["state"] == "sent" || f["state"] == "failed";
    tickets.as_array().is_some_and(|ts| {
        ts.iter().all(|t| {
            t["forwarding"]["state"] == "failed"
                || t["events"]
                    .as_array()
                    .is_none_or(|es| es.iter().all(|e| done(&e["forwarding"])))
                    && done(&t["forwarding"])
        })
    })
}

/// The last `lines` lines of a log.
pub fn tail(path: &Path, lines: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Waits until the gateway sees `n` devices up with no open fault.
pub async fn until_all_up_no_fault(gw: &GatewayProc, n: usize, within: Duration) {
    until("every device up with no open fault", within, || async {
        let (_, v) = gw.try_get("/api/v1/devices").await?;
        let list = v.as_array()?;
        let good = list
            .iter()
            .filter(|d| d["open_faults"] == 0 && d["state"] == "up")
            .count();
        (good >= n).then_some(())
    })
    .await;
}

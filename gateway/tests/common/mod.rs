//! Fixtures for the gateway's end-to-end tests: the gateway and the agent as real
//! processes, their config and fleet files, and a small hotline API client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

pub const API_TOKEN: &str = "hotline-e2e-token-7f3a";
pub const BACKEND_TOKEN: &str = "backend-e2e-token-91c2";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `tend-agent` binary of this workspace, built (or brought up to date) on first use:
/// cargo builds only this package's binaries for its tests.
pub fn agent_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let exe = std::env::current_exe().unwrap();
            // target/<profile>/deps/<test> → target/<profile>
            let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = std::process::Command::new(cargo);
            cmd.args(["build", "-q", "-p", "tend-agent", "--bin", "tend-agent"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if release {
                cmd.arg("--release");
            }
            let st = cmd.status().expect("run cargo build for tend-agent");
            assert!(st.success(), "building tend-agent failed");
            let bin = profile_dir.join("tend-agent");
            assert!(bin.is_file(), "{} missing", bin.display());
            bin
        })
        .clone()
}

/// One fleet device.
pub struct FleetDevice<'a> {
    pub id: &'a str,
    pub serial: &'a str,
    pub site: &'a str,
    pub location: &'a str,
    pub accepted: &'a str,
}

/// A fleet with customer c-017 and two sites: `s-main` (same city) and `s-county`
/// (remote).
pub fn fleet_toml(devices: &[FleetDevice<'_>]) -> String {
    let mut s = String::from(
        r#"[[customer]]
id = "c-017"
name = "Jiangbei District Hospital"
contact_name = "Wang Lei"
contact_phone = "+86 23 6000 1234"

[[site]]
id = "s-main"
customer = "c-017"
name = "Main building"
address = "12 Jianxin Rd, Chongqing"
service_area = "same_city"

[[site]]
id = "s-county"
customer = "c-017"
name = "County clinic"
address = "3 Hexi St, Wuxi County"
service_area = "remote"
"#,
    );
    for d in devices {
        s.push_str(&format!(
            "\n[[device]]\nid = \"{}\"\nsite = \"{}\"\nserial = \"{}\"\nlocation = \"{}\"\naccepted = \"{}\"\n",
            d.id, d.site, d.serial, d.location, d.accepted
        ));
    }
    s
}

pub enum BrokerChoice {
    /// The gateway's own broker on this port.
    Embedded(u16),
    /// An external broker, with a shared-subscription group.
    External { url: String, group: Option<String> },
}

pub struct GatewaySpec<'a> {
    pub id: &'a str,
    pub broker: BrokerChoice,
    pub backend: Option<&'a str>,
    pub fleet: &'a str,
}

/// A running `tend-gateway run` process.
pub struct GatewayProc {
    pub child: tokio::process::Child,
    pub api: String,
    pub broker_url: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl GatewayProc {
    /// Writes the config under `dir` and starts the gateway; waits for its ready line.
    pub async fn spawn(dir: &Path, spec: &GatewaySpec<'_>) -> GatewayProc {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("fleet.toml"), spec.fleet).unwrap();
        std::fs::write(dir.join("api.token"), format!("{API_TOKEN}\n")).unwrap();
        std::fs::write(dir.join("backend.token"), format!("{BACKEND_TOKEN}\n")).unwrap();
        let broker = match &spec.broker {
            BrokerChoice::Embedded(port) => {
                format!("[broker]\nembedded = true\nlisten = \"127.0.0.1:{port}\"\n")
            }
            BrokerChoice::External { url, group } => {
                let mut s = format!("[broker]\nurl = \"{url}\"\n");
                if let Some(g) = group {
                    s.push_str(&format!("share_group = \"{g}\"\n"));
                }
                s
            }
        };
        let backend = match spec.backend {
            Some(url) => format!(
                "[backend]\nurl = \"{url}\"\ntoken_file = \"backend.token\"\ntimeout = \"2s\"\nstatus_poll = \"1h\"\n"
            ),
            None => String::new(),
        };
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                "gateway_id = \"{}\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\ntimezone = \"Asia/Shanghai\"\n\n{broker}\n{backend}\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\ndiag_timeout = \"8s\"\n",
                spec.id
            ),
        )
        .unwrap();
        let log = dir.join("gateway.log");
        Self::start(dir, &config, &log).await
    }

    /// Starts (or restarts) the process on an existing config.
    pub async fn start(dir: &Path, config: &Path, log: &Path) -> GatewayProc {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tend-gateway"))
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

    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

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
}

/// Starts `tend-agent run --config <config>`, stderr appended to `log`.
pub fn spawn_agent(config: &Path, log: &Path) -> tokio::process::Child {
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(agent_bin())
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

/// Polls `check` every 100 ms until it gives `Some`, or panics naming `what`.
pub async fn until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts Mosquitto on `port` (config in `dir`) and waits until it accepts connections.
pub async fn start_mosquitto(dir: &Path, port: u16) -> tokio::process::Child {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .unwrap();
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is not installed (.ci/run installs it with apt-get)");
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("mosquitto did not start on port {port}");
}

/// A counter's value in a Prometheus text exposition (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k == name)
        .filter_map(|(_, v)| v.trim().parse::<f64>().ok())
        .sum()
}

impl GatewayProc {
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.api))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

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
            // `cargo test --workspace` has built it for the agent's own tests already;
            // use that one unless a source it is made of is newer (a nested cargo build
            // with other feature unification would rebuild the agent from scratch).
            let bin = profile_dir.join("tend-agent");
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let newest_source = [
                "agent/src",
                "wire/src",
                "firmware-profiles/src",
                "firmware-profiles/profiles",
            ]
            .iter()
            .filter_map(|d| newest_mtime(&root.join(d)))
            .max();
            let built = std::fs::metadata(&bin).and_then(|m| m.modified()).ok();
            if let (Some(b), Some(s)) = (built, newest_source) {
                if b >= s {
                    return bin;
                }
            }
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

fn newest_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            e.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
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

// ---------------------------------------------------------------------------------------
// Additions for the reliability suites (crash, outage, hostile).

/// A small xorshift generator: the suites' random moments, reproducible from a printed
/// seed (`TEND_*_SEED`).
pub struct Rng(u64);

impl Rng {
    /// From `env` if set, else from the clock; the seed is printed so a failure can be
    /// replayed.
    pub fn from_env(env: &str) -> Rng {
        let seed = std::env::var(env)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{env}={seed}");
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `lo..hi` (`lo` when the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }
}

/// A number from the environment, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// (VmRSS, VmHWM) of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Samples the resident memory of processes every 100 ms until dropped; `peak()` gives
/// the highest VmRSS seen of each pid (KiB), and the last VmHWM read.
pub struct RssSampler {
    peaks: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u32, (u64, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> RssSampler {
        let peaks: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u32, (u64, u64)>>> =
            Default::default();
        let p = peaks.clone();
        let task = tokio::spawn(async move {
            loop {
                for pid in &pids {
                    if let Some((rss, hwm)) = rss_kib(*pid) {
                        let mut m = p.lock().unwrap();
                        let e = m.entry(*pid).or_insert((0, 0));
                        e.0 = e.0.max(rss);
                        e.1 = e.1.max(hwm);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        RssSampler { peaks, task }
    }
    /// (peak VmRSS, VmHWM) of `pid` in KiB.
    pub fn peak(&self, pid: u32) -> (u64, u64) {
        self.peaks
            .lock()
            .unwrap()
            .get(&pid)
            .copied()
            .unwrap_or((0, 0))
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a listener on `tend/v1/+/up` saw: the first content of every (agent, seq), how
/// often each was sent, and every seq sent again with a different content.
#[derive(Default)]
pub struct TapSeen {
    pub first: std::collections::HashMap<(String, u64), serde_json::Value>,
    pub sends: std::collections::HashMap<(String, u64), u32>,
    pub conflicts: Vec<(String, u64, serde_json::Value, serde_json::Value)>,
    pub batches: u64,
    pub undecodable: u64,
}

impl TapSeen {
    /// Seqs seen more than once (resends after a lost ack, a reconnect or a restart).
    pub fn resent(&self) -> u64 {
        self.sends.values().filter(|n| **n > 1).count() as u64
    }
}

/// A plain (non-shared) MQTT subscriber of every agent's batches, reconnecting across
/// broker and gateway restarts. It sees copies of what the gateway gets, so the suites
/// can check that no seq ever travelled with two different contents.
pub struct WireTap {
    pub seen: std::sync::Arc<std::sync::Mutex<TapSeen>>,
    task: tokio::task::JoinHandle<()>,
}

impl WireTap {
    pub async fn start(broker_url: &str, id: &str) -> WireTap {
        let hostport = broker_url.trim_start_matches("mqtt://");
        let (host, port) = hostport.rsplit_once(':').unwrap();
        let mut opts = rumqttc::MqttOptions::new(id, host, port.parse::<u16>().unwrap());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 1024);
        let seen: std::sync::Arc<std::sync::Mutex<TapSeen>> = Default::default();
        let s = seen.clone();
        let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("tend/v1/+/up", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let mut s = s.lock().unwrap();
                        s.batches += 1;
                        let Ok(b) = serde_json::from_slice::<serde_json::Value>(&p.payload) else {
                            s.undecodable += 1;
                            continue;
                        };
                        let agent = b["agent"].as_str().unwrap_or_default().to_string();
                        for r in b["records"].as_array().into_iter().flatten() {
                            let Some(seq) = r["seq"].as_u64() else {
                                continue;
                            };
                            let k = (agent.clone(), seq);
                            *s.sends.entry(k.clone()).or_default() += 1;
                            match s.first.get(&k) {
                                None => {
                                    s.first.insert(k, r.clone());
                                }
                                Some(f) if f != r => {
                                    let f = f.clone();
                                    s.conflicts.push((k.0, k.1, f, r.clone()));
                                }
                                Some(_) => {}
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(20), subscribed.wait_for(|s| *s)).await;
        WireTap { seen, task }
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.task.abort();
    }
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

impl GatewayProc {
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
}

// ---------------------------------------------------------------------------------------
// Simulated Modbus TCP devices under load, and the end checks the suites share.

/// A simulated device the agent polls over Modbus TCP.
pub enum Sim {
    Av(tend_devsim::av500::Av500Handle),
    Hm(tend_devsim::hm2::Hm2Handle),
}

impl Sim {
    pub fn addr(&self) -> std::net::SocketAddr {
        match self {
            Sim::Av(a) => a.addr().unwrap(),
            Sim::Hm(h) => h.addr(),
        }
    }
    pub fn profile(&self) -> &'static str {
        match self {
            Sim::Av(_) => "aeris/av-500",
            Sim::Hm(_) => "cryosense/hm-2",
        }
    }
    /// Raises a fault chosen by `pick`: on a ventilator one of the alarm bits ALM1.3 to
    /// ALM1.7 (a third of the time in its failure state too), on a helium monitor a
    /// compressor fault.
    pub fn raise(&self, pick: u64) {
        use tend_devsim::av500::device_state;
        match self {
            Sim::Av(a) => a.update(|s| {
                s.alarm_word1 = 1 << (3 + pick % 5);
                if pick % 3 == 0 {
                    s.device_state = device_state::FAILURE;
                }
            }),
            Sim::Hm(h) => h.update(|s| s.compressor = 2),
        }
    }
    pub fn clear(&self) {
        use tend_devsim::av500::device_state;
        match self {
            Sim::Av(a) => a.update(|s| {
                s.alarm_word1 = 0;
                s.device_state = device_state::VENTILATING;
            }),
            Sim::Hm(h) => h.update(|s| s.compressor = 1),
        }
    }
    pub fn serial(&self, i: usize) -> String {
        match self {
            Sim::Av(_) => format!("AV5C-21-{i:06}"),
            Sim::Hm(_) => format!("HM2-{i:06}"),
        }
    }
}

/// `n` simulators on free ports: three AV-500 ventilators (`vent-<i>`, each its own
/// serial) for every HM-2 helium monitor (`mri-<i>`).
pub async fn spawn_sims(n: usize) -> Vec<(String, Sim)> {
    use tend_devsim::av500::{Av500Config, Av500Sim};
    use tend_devsim::hm2::{Hm2Config, Hm2Sim};
    let mut sims = Vec::new();
    for i in 0..n {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        if i % 4 == 3 {
            let h = Hm2Sim::spawn_tcp(Hm2Config::v3(), any).await.unwrap();
            sims.push((format!("mri-{i}"), Sim::Hm(h)));
        } else {
            let mut cfg = Av500Config::v5();
            cfg.serial = format!("AV5C-21-{i:06}");
            let a = Av500Sim::spawn_tcp(cfg, any).await.unwrap();
            sims.push((format!("vent-{i}"), Sim::Av(a)));
        }
    }
    sims
}

/// The fleet file listing every simulator (site `s-main`).
pub fn sims_fleet(sims: &[(String, Sim)]) -> String {
    let serials: Vec<String> = sims
        .iter()
        .enumerate()
        .map(|(i, (_, s))| s.serial(i))
        .collect();
    let devices: Vec<FleetDevice<'_>> = sims
        .iter()
        .zip(&serials)
        .map(|((id, _), serial)| FleetDevice {
            id,
            serial,
            site: "s-main",
            location: "ICU",
            accepted: "2025-06-01",
        })
        .collect();
    fleet_toml(&devices)
}

/// An agent config polling every simulator every `poll`.
pub fn sims_agent_toml(agent: &str, broker: &str, sims: &[(String, Sim)], poll: &str) -> String {
    let mut s = format!(
        "agent_id = \"{agent}\"\nsite_id = \"s-main\"\ndata_dir = \"data\"\nflap_damping = \"300ms\"\n[uplink]\nbroker = \"{broker}\"\nkeep_alive = \"5s\"\n"
    );
    for (id, sim) in sims {
        s.push_str(&format!(
            "[[device]]\nid = \"{id}\"\nprofile = \"{}\"\ntransport = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval = \"{poll}\"\n",
            sim.profile(),
            sim.addr()
        ));
    }
    s
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

/// The agent's last run: SIGKILL, then a restart that polls each device once (`1h`
/// poll), so its outbox can empty and stay empty; waits until its first polls are
/// recorded (one record per device at least), the outbox is empty (asked through the
/// gateway's `outbox` diagnostic on `device`) and has stayed so for a second, and every
/// ticket is forwarded. The agent's data directory is `data` beside `cfg`.
pub async fn drain_agent(
    agent: &mut tokio::process::Child,
    cfg: &Path,
    log: &Path,
    config_text: String,
    gw: &GatewayProc,
    device: &str,
    within: Duration,
) {
    use tend_agent::outbox::{Outbox, OutboxConfig};
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let path = cfg.parent().unwrap().join("data/outbox.redb");
    let outbox = Outbox::open(OutboxConfig::new(path)).await.unwrap();
    let before = outbox.stats().next_seq;
    outbox.close().await.unwrap();
    let devices = config_text.matches("[[device]]").count() as u64;
    std::fs::write(cfg, config_text).unwrap();
    *agent = spawn_agent(cfg, log);
    let empty = tokio::time::timeout(within, async {
        let mut last = None;
        loop {
            if let Some(a) = agent_outbox(gw, device).await {
                let next = a["next_seq"].as_u64().unwrap_or(0);
                if a["records"] == 0 && next >= before + devices {
                    if last == Some(next) {
                        return;
                    }
                    last = Some(next);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            last = None;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    if empty.is_err() {
        panic!(
            "the agent's outbox did not empty within {within:?}; agent log:\n{}\ngateway log:\n{}",
            tail(log, 40),
            tail(&gw.log, 40)
        );
    }
    until("every ticket and event forwarded", within, || async {
        let (_, t) = gw.try_get("/api/v1/tickets").await?;
        forwarding_settled(&t).then_some(())
    })
    .await;
}

/// After the agent and the gateway have stopped: the agent's outbox is empty (everything
/// acked) and the gateway's store holds exactly seqs 1..=max of `agent`, max being the
/// last seq the outbox gave out. Returns max.
pub async fn assert_delivered_exactly_once(agent_data: &Path, gw_data: &Path, agent: &str) -> u64 {
    assert_delivered(agent_data, gw_data, agent, true).await
}

/// The same, when other agents' records share the store (`only_agent` false): then the
/// seqs around 1..=max (0, the next hundreds, the largest) must be absent.
pub async fn assert_delivered(
    agent_data: &Path,
    gw_data: &Path,
    agent: &str,
    only_agent: bool,
) -> u64 {
    use tend_agent::outbox::{Outbox, OutboxConfig};
    let outbox = Outbox::open(OutboxConfig::new(agent_data.join("outbox.redb")))
        .await
        .unwrap();
    let stats = outbox.stats();
    outbox.close().await.unwrap();
    assert_eq!(stats.records, 0, "unacknowledged records left: {stats:?}");
    let max = stats.next_seq - 1;
    assert!(max > 0);
    use tend_gateway::store::{GatewayStore, RedbStore};
    let store = RedbStore::open(gw_data).unwrap();
    let missing: Vec<u64> = (1..=max)
        .filter(|s| !store.has_record(agent, *s).unwrap())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {max} records lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    if only_agent {
        assert_eq!(
            store.records_stored().unwrap(),
            max,
            "records beyond the agent's seqs"
        );
    } else {
        for s in [0, u64::MAX - 1, u64::MAX]
            .into_iter()
            .chain(max + 1..=max + 500)
        {
            assert!(
                !store.has_record(agent, s).unwrap(),
                "seq {s} of {agent} stored"
            );
        }
    }
    max
}

/// No seq travelled twice with two different contents.
pub fn assert_no_conflicting_resend(tap: &WireTap) -> (usize, u64) {
    let s = tap.seen.lock().unwrap();
    assert!(
        s.conflicts.is_empty(),
        "seqs reused for different records: {:#?}",
        &s.conflicts[..s.conflicts.len().min(3)]
    );
    (s.first.len(), s.resent())
}

/// Figures of the ticket check.
#[derive(Debug, Default)]
pub struct TicketFigures {
    pub episodes: usize,
    pub tickets: usize,
    pub backend_tickets: usize,
    pub events: usize,
}

/// One ticket per episode, from the stopped gateway's store and the backend stand-in:
/// every episode of the life records of `devices` opened once and in exactly one ticket;
/// backend and gateway know the same ticket keys, each once; no two open backend tickets
/// for one (device, kind, code); every event queued arrived once; no 409. Tickets whose
/// keys are in `refused` are expected `failed` and absent from the backend.
pub fn assert_one_ticket_per_episode(
    gw_data: &Path,
    backend: &tend_gateway::backend_standin::Backend,
    devices: &[&str],
    refused: &[String],
) -> TicketFigures {
    use std::collections::{BTreeMap, BTreeSet};
    use tend_gateway::store::{ForwardState, GatewayStore, LifeEvent, RedbStore};
    let store = RedbStore::open(gw_data).unwrap();
    let tickets = store.tickets().unwrap();
    let mut episodes: BTreeMap<String, String> = BTreeMap::new();
    let mut opened: BTreeMap<String, u32> = BTreeMap::new();
    for id in devices {
        for e in store.history(id, usize::MAX).unwrap() {
            if let LifeEvent::Episode { event, .. } = e {
                if event.change == tend_wire::EpisodeChange::Opened {
                    *opened.entry(event.episode.clone()).or_default() += 1;
                }
                episodes.insert(event.episode.clone(), id.to_string());
            }
        }
    }
    for (ep, n) in &opened {
        assert_eq!(*n, 1, "episode {ep} opened {n} times in the life record");
    }
    for (ep, dev) in &episodes {
        let owners: Vec<&str> = tickets
            .iter()
            .filter(|t| t.episodes.contains(ep))
            .map(|t| t.key.as_str())
            .collect();
        assert_eq!(
            owners.len(),
            1,
            "episode {ep} of {dev} in tickets {owners:?}"
        );
    }
    let bt = backend.tickets();
    let backend_keys: BTreeSet<&str> = bt.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(
        backend_keys.len(),
        bt.len(),
        "two backend tickets under one key"
    );
    let gw_keys: BTreeSet<&str> = tickets
        .iter()
        .filter(|t| !refused.contains(&t.key))
        .map(|t| t.key.as_str())
        .collect();
    assert_eq!(
        backend_keys, gw_keys,
        "backend and gateway disagree on the tickets"
    );
    let mut per_fault: BTreeMap<(String, String, String), Vec<&str>> = BTreeMap::new();
    for t in &bt {
        assert!(t.key.starts_with("tend-t"), "{}", t.key);
        if t.status == "open" {
            per_fault
                .entry((
                    t.body["device"]["id"].to_string(),
                    t.body["kind"].to_string(),
                    t.body["fault"]["code"].to_string(),
                ))
                .or_default()
                .push(&t.key);
        }
    }
    for (k, keys) in &per_fault {
        assert_eq!(keys.len(), 1, "open tickets {keys:?} for {k:?}");
    }
    for t in &tickets {
        if refused.contains(&t.key) {
            assert_eq!(t.forward.state, ForwardState::Failed, "{t:#?}");
            continue;
        }
        assert_eq!(t.forward.state, ForwardState::Sent, "{t:#?}");
        let b = bt.iter().find(|b| b.key == t.key).unwrap();
        let want: BTreeSet<&str> = t
            .events
            .iter()
            .map(|e| e.idempotency_key.as_str())
            .collect();
        let got: BTreeSet<&str> = b.events.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(got.len(), b.events.len(), "an event twice on {}", t.key);
        assert_eq!(want, got, "events of {}", t.key);
    }
    for r in backend.requests() {
        assert_ne!(
            r.status,
            Some(409),
            "a key reused with another body: {r:#?}"
        );
    }
    TicketFigures {
        episodes: episodes.len(),
        tickets: tickets.len(),
        backend_tickets: bt.len(),
        events: tickets.iter().map(|t| t.events.len()).sum(),
    }
}

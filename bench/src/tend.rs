//! tend's own processes for the bench: `tend-gateway run` (embedded broker, a fleet of the
//! simulated ventilators, optionally the backend stand-in), agents enrolled with
//! `tend-gateway agent add` as an operator does, and `tend-agent run` with one
//! `[[device]]` per simulator.

use crate::procs_util::{self, Proc};
use anyhow::Context as _;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tend_testkit::config::write_secret;
use tend_wire::credentials::Credentials;
use tend_wire::AgentKey;
use tokio::process::Command;

pub const AGENT_ID: &str = "bench-agent";
pub const SITE_ID: &str = "s-bench";

/// The device id of simulator `i`.
pub fn device_id(i: usize) -> String {
    format!("vent-{i:03}")
}

/// The serial of simulator `i` (the fleet file and the simulator agree).
pub fn serial(i: usize) -> String {
    format!("AV5C-21-{:06}", 100 + i)
}

/// The fleet file: one customer, one site, `n` ventilators.
pub fn fleet(n: usize) -> String {
    let mut s = String::from(
        "[[customer]]\nid = \"c-bench\"\nname = \"Bench Hospital\"\ncontact_name = \"Bench\"\ncontact_phone = \"+86 23 6000 0000\"\n\n\
         [[site]]\nid = \"s-bench\"\ncustomer = \"c-bench\"\nname = \"Main building\"\naddress = \"1 Bench Rd\"\nservice_area = \"same_city\"\n",
    );
    for i in 0..n {
        let _ = write!(
            s,
            "\n[[device]]\nid = \"{}\"\nsite = \"s-bench\"\nserial = \"{}\"\nlocation = \"ICU bed {i}\"\naccepted = \"2025-06-01\"\n",
            device_id(i),
            serial(i)
        );
    }
    s
}

/// A gateway's files in `dir`; `listen` is the embedded broker's address (port 0: any).
pub struct GatewayPlan {
    pub dir: PathBuf,
    pub devices: usize,
    pub listen: SocketAddr,
    /// The backend stand-in's URL and token.
    pub backend: Option<(String, String)>,
    /// `[trust] dir`, when several runs' gateways share one enrolment (default: the
    /// gateway's own, `<data_dir>/trust`).
    pub trust_dir: Option<PathBuf>,
    /// One of several gateways sharing an external broker (and maybe a store).
    pub shared: Option<SharedPlan>,
}

/// How a gateway of several is set up: its id, the external broker with the group's
/// shared subscription, and its `[store]` section (empty: redb in its data_dir).
#[derive(Debug, Clone)]
pub struct SharedPlan {
    pub gateway_id: String,
    pub broker_url: String,
    pub group: String,
    pub store: String,
}

impl GatewayPlan {
    /// Writes the gateway's config, fleet and token files; returns the config's path.
    /// Agents can be enrolled with it before the gateway starts.
    pub fn write_files(&self) -> anyhow::Result<PathBuf> {
        let dir = &self.dir;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("fleet.toml"), fleet(self.devices))?;
        write_secret(dir.join("api.token"), "bench-api-token\n")?;
        let (id, broker) = match &self.shared {
            None => (
                "gw-bench".to_string(),
                format!("embedded = true\nlisten = \"{}\"", self.listen),
            ),
            Some(s) => (
                s.gateway_id.clone(),
                format!("url = \"{}\"\nshare_group = \"{}\"", s.broker_url, s.group),
            ),
        };
        let mut cfg = format!(
            "gateway_id = \"{id}\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n\n\
             [broker]\n{broker}\n\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n"
        );
        if let Some(s) = &self.shared {
            let _ = write!(cfg, "\n{}\n", s.store);
        }
        if let Some((url, token)) = &self.backend {
            write_secret(dir.join("backend.token"), format!("{token}\n"))?;
            let _ = write!(
                cfg,
                "\n[backend]\nurl = \"{url}\"\ntoken_file = \"backend.token\"\ntimeout = \"5s\"\n"
            );
        }
        if let Some(trust) = &self.trust_dir {
            let _ = write!(cfg, "\n[trust]\ndir = \"{}\"\n", trust.display());
        }
        let path = dir.join("gateway.toml");
        std::fs::write(&path, cfg)?;
        Ok(path)
    }
}

/// Enrols `agent` as an operator does (`tend-gateway agent add ID --config ... --out
/// ...`, the binary in `bin`) with the gateway whose config is `gateway_toml`; the
/// credentials go to `out`. Returns the agent's key.
pub fn enrol(bin: &Path, gateway_toml: &Path, agent: &str, out: &Path) -> anyhow::Result<AgentKey> {
    let _ = std::fs::remove_file(out);
    let done = std::process::Command::new(bin.join("tend-gateway"))
        .args(["agent", "add", agent, "--config"])
        .arg(gateway_toml)
        .arg("--out")
        .arg(out)
        .output()?;
    anyhow::ensure!(
        done.status.success(),
        "tend-gateway agent add {agent}: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let text = std::fs::read_to_string(out)?;
    Ok(Credentials::parse(&text)?.key)
}

/// Enrols `name` for one of the bench's own MQTT clients (the embedded broker admits
/// enrolled agents only, each as itself) with the gateway whose config is
/// `gateway_toml`, its credentials under `dir`. Returns its broker password.
pub fn enrol_client(
    bin: &Path,
    gateway_toml: &Path,
    name: &str,
    dir: &Path,
) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let key = enrol(bin, gateway_toml, name, &dir.join(format!("{name}.cred")))?;
    Ok(key.broker_password(name))
}

/// Enrols the bench's agent with the gateway of `plan` (writing its files), the
/// credentials in `<agent_dir>/bench-agent.cred` where [`agent_config`] names them.
pub fn enrol_agent(bin: &Path, plan: &GatewayPlan, agent_dir: &Path) -> anyhow::Result<AgentKey> {
    std::fs::create_dir_all(agent_dir)?;
    let config = plan.write_files()?;
    enrol(
        bin,
        &config,
        AGENT_ID,
        &agent_dir.join(format!("{AGENT_ID}.cred")),
    )
}

pub struct Gateway {
    pub proc: Proc,
    pub broker: String,
    pub api: String,
    pub dir: PathBuf,
}

impl Gateway {
    pub async fn start(bin: &Path, plan: &GatewayPlan) -> anyhow::Result<Gateway> {
        let dir = &plan.dir;
        let path = plan.write_files()?;
        let mut cmd = Command::new(bin.join("tend-gateway"));
        cmd.arg("run").arg("--config").arg(&path);
        let mut proc = procs_util::spawn("tend-gateway", cmd, &dir.join("gateway.log"), true)?;
        let line =
            procs_util::ready_line(&mut proc, "gateway ready", Duration::from_secs(30)).await?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(str::to_string)
                .unwrap_or_default()
        };
        Ok(Gateway {
            broker: field("broker="),
            api: field("api="),
            proc,
            dir: dir.clone(),
        })
    }

    /// A counter of `/metrics` (`tend_gateway_records_total`, ...).
    pub async fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let text = reqwest::get(format!("{}/metrics", self.api))
            .await?
            .text()
            .await?;
        text.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse::<f64>().ok())?
            })
            .map(|v| v as u64)
            .ok_or_else(|| anyhow::anyhow!("no {name} in the gateway's /metrics"))
    }

    /// `(host, port)` of the embedded broker.
    pub fn broker_addr(&self) -> (String, u16) {
        broker_addr(&self.broker)
    }

    pub async fn stop(self) -> PathBuf {
        self.proc.stop(Duration::from_secs(10)).await;
        self.dir.join("data")
    }
}

pub fn broker_addr(url: &str) -> (String, u16) {
    let hp = url.trim_start_matches("mqtt://");
    let (h, p) = hp.rsplit_once(':').unwrap_or((hp, "1883"));
    (h.to_string(), p.parse().unwrap_or(1883))
}

/// An agent's config: `devices` are the simulators' addresses and Modbus unit ids (one
/// endpoint each, or many units behind one); its credentials are `bench-agent.cred`
/// beside it (see [`enrol_agent`]).
/// Where one simulated ventilator is read: its Modbus TCP endpoint or the pty of its
/// RS-485 bus, and its unit id there.
#[derive(Debug, Clone)]
pub enum Target {
    Tcp(SocketAddr, u8),
    Bus(PathBuf, u8),
}

impl Target {
    /// One target per `(endpoint, unit)`.
    pub fn tcp(addrs: &[(SocketAddr, u8)]) -> Vec<Target> {
        addrs.iter().map(|(a, u)| Target::Tcp(*a, *u)).collect()
    }
}

pub fn agent_config(
    dir: &Path,
    broker: &str,
    devices: &[Target],
    flap_damping: &str,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut s = format!(
        "agent_id = \"{AGENT_ID}\"\nsite_id = \"{SITE_ID}\"\ndata_dir = \"data\"\nflap_damping = \"{flap_damping}\"\n\n\
         [uplink]\nbroker = \"{broker}\"\ncredentials = \"{AGENT_ID}.cred\"\n"
    );
    for (i, target) in devices.iter().enumerate() {
        let (link, unit) = match target {
            Target::Tcp(a, unit) => (
                format!("transport = \"modbus-tcp\"\naddress = \"{a}\""),
                unit,
            ),
            // The AV-500's bus settings (19200 8E1) are its profile's defaults.
            Target::Bus(path, unit) => (
                format!("transport = \"modbus-rtu\"\nport = \"{}\"", path.display()),
                unit,
            ),
        };
        let _ = write!(
            s,
            "\n[[device]]\nid = \"{}\"\nprofile = \"aeris/av-500\"\n{link}\nunit = {unit}\npoll_interval = \"1s\"\n",
            device_id(i)
        );
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, s)?;
    Ok(path)
}

/// Makes the agent of `config` read every AV-500 point at every poll: the built-in 5.x
/// profile without its `read_every` lines, in a `profiles_dir` beside the config, which
/// replaces the built-in one.
pub fn read_every_point_every_poll(config: &Path) -> anyhow::Result<()> {
    let dir = config
        .parent()
        .context("the agent config has no folder")?
        .join("profiles");
    std::fs::create_dir_all(&dir)?;
    let (_, src) = tend_profiles::load::BUILTIN
        .iter()
        .find(|(name, _)| name.contains("av-500-5"))
        .context("no built-in AV-500 5.x profile")?;
    let plain: String = src
        .lines()
        .filter(|l| !l.trim_start().starts_with("read_every"))
        .map(|l| format!("{l}\n"))
        .collect();
    anyhow::ensure!(
        plain.len() < src.len(),
        "the AV-500 5.x profile has no read_every"
    );
    std::fs::write(dir.join("av-500-5.x.toml"), plain)?;
    let cfg = std::fs::read_to_string(config)?;
    std::fs::write(
        config,
        format!("profiles_dir = \"{}\"\n{cfg}", dir.display()),
    )?;
    Ok(())
}

/// Starts `tend-agent run`; `wrap` is a command put in front of it (a profiler such as
/// `valgrind --tool=massif`), split on whitespace.
pub fn start_agent(bin: &Path, config: &Path, wrap: Option<&str>) -> anyhow::Result<Proc> {
    let agent = bin.join("tend-agent");
    let mut cmd = match wrap.map(|w| w.split_whitespace().collect::<Vec<_>>()) {
        Some(w) if !w.is_empty() => {
            let mut c = Command::new(w[0]);
            c.args(&w[1..]).arg(&agent);
            c
        }
        _ => Command::new(&agent),
    };
    cmd.arg("run").arg("--config").arg(config);
    let log = config.with_file_name("agent.log");
    procs_util::spawn("tend-agent", cmd, &log, false)
}

//! The set of simulated devices that `tend-devsim run` starts (one of each manual per
//! firmware family), and the one line per device it prints so that people and scripts
//! know where each device listens.

use crate::av500::{Av500Config, Av500Handle, Av500Sim, Endpoint};
use crate::hm2::{Hm2Config, Hm2Sim};
use crate::lip300::{self, Lip300Config, Lip300Sim};
use crate::scenario::{Kind, Target};
use crate::vm12::{Vm12Config, Vm12Sim};
use crate::Version;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;
use tend_mqtt::{BrokerUrl, UrlError};

/// Which firmware families to simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FirmwareSet {
    /// LIP-300 2.x, AV-500 4.x, HM-2 2.x, VM-12 6.x (device names ending `-b`).
    Old,
    /// LIP-300 3.x, AV-500 5.x, HM-2 3.x, VM-12 7.x (device names ending `-a`).
    New,
    /// Both.
    #[default]
    Both,
}

impl FromStr for FirmwareSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "old" => Ok(FirmwareSet::Old),
            "new" => Ok(FirmwareSet::New),
            "both" => Ok(FirmwareSet::Both),
            _ => Err(format!("unknown firmware set {s:?} (old, new, both)")),
        }
    }
}

/// The external broker the simulated monitors publish to: `--broker
/// mqtt://[user[:password]@]host[:port]`. A simulator is a test tool, so its command line
/// may carry a device's credentials; they are split off here and the rest is the one
/// broker URL grammar of [`tend_mqtt::BrokerUrl`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBroker {
    pub url: BrokerUrl,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A `--broker` the simulators cannot use.
#[derive(Debug, thiserror::Error)]
pub enum BrokerArgError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("broker {0}: the simulated monitors connect without TLS; give an mqtt:// broker")]
    Tls(String),
}

impl ExternalBroker {
    /// `mqtt://host:port`, without credentials.
    pub fn display(&self) -> String {
        self.url.to_string()
    }
}

impl FromStr for ExternalBroker {
    type Err = BrokerArgError;
    fn from_str(s: &str) -> Result<Self, BrokerArgError> {
        // Credentials go before the URL is parsed (and named in an error).
        let (creds, url) = match s.split_once("://").zip(s.rsplit_once('@')) {
            Some(((scheme, rest), (_, hostport))) => {
                let creds = rest.rsplit_once('@').map(|(c, _)| c);
                (creds, BrokerUrl::parse(&format!("{scheme}://{hostport}"))?)
            }
            None => (None, BrokerUrl::parse(s)?),
        };
        if url.is_tls() {
            return Err(BrokerArgError::Tls(url.to_string()));
        }
        let (username, password) = match creds {
            Some(c) => match c.split_once(':') {
                Some((u, p)) => (Some(u.to_string()), Some(p.to_string())),
                None => (Some(c.to_string()), None),
            },
            None => (None, None),
        };
        Ok(ExternalBroker {
            url,
            username,
            password,
        })
    }
}

/// How to start the fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub firmware_set: FirmwareSet,
    /// Address the Modbus TCP simulators listen on.
    pub host: IpAddr,
    /// First TCP port (the TCP devices take consecutive ports); `None`: free ports.
    pub base_port: Option<u16>,
    /// An external broker; `None`: the embedded one.
    pub broker: Option<ExternalBroker>,
    /// Where to put stable symlinks `<dir>/<device>` to the ptys.
    pub link_dir: Option<PathBuf>,
    /// LIP-300 / AV-500 answer BUSY for this long after start.
    pub boot_time: Duration,
    /// VM-12 status interval (the manual: 10 s).
    pub status_interval: Duration,
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            firmware_set: FirmwareSet::Both,
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            base_port: None,
            broker: None,
            link_dir: None,
            boot_time: Duration::ZERO,
            status_interval: Duration::from_secs(10),
        }
    }
}

/// One planned device.
#[derive(Debug, Clone)]
pub struct Planned {
    pub name: String,
    pub kind: Kind,
    /// AV-500 only: on Modbus TCP (else RTU).
    pub tcp: bool,
}

struct Family {
    suffix: &'static str,
    lip: Lip300Config,
    av: Av500Config,
    hm: Hm2Config,
    vm_fw: Version,
    vm_serial: &'static str,
}

/// The serial one higher in its last digit (`AV5C-21-004417` → `AV5C-21-004418`).
fn next_serial(serial: &str) -> String {
    let mut chars: Vec<char> = serial.chars().collect();
    if let Some(c) = chars.last_mut() {
        if let Some(d) = c.to_digit(10) {
            *c = char::from_digit((d + 1) % 10, 10).unwrap_or('0');
        }
    }
    chars.into_iter().collect()
}

fn families(set: FirmwareSet) -> Vec<Family> {
    let new = || Family {
        suffix: "a",
        lip: Lip300Config::v3(),
        av: Av500Config::v5(),
        hm: Hm2Config::v3(),
        vm_fw: Version::new(7, 4, 2),
        vm_serial: "VM12-00A4471",
    };
    let old = || Family {
        suffix: "b",
        lip: Lip300Config::v2(),
        av: Av500Config::v4(),
        hm: Hm2Config::v2(),
        vm_fw: Version::new(6, 9, 0),
        vm_serial: "VM12-0081192",
    };
    match set {
        FirmwareSet::New => vec![new()],
        FirmwareSet::Old => vec![old()],
        FirmwareSet::Both => vec![new(), old()],
    }
}

/// The devices `start` will run, by name and kind (to check a scenario before starting).
pub fn plan(set: FirmwareSet) -> Vec<Planned> {
    let mut out = Vec::new();
    for f in families(set) {
        let s = f.suffix;
        out.push(Planned {
            name: format!("lip300-{s}"),
            kind: Kind::Lip300(f.lip.firmware),
            tcp: false,
        });
        out.push(Planned {
            name: format!("av500-rtu-{s}"),
            kind: Kind::Av500(f.av.firmware),
            tcp: false,
        });
        out.push(Planned {
            name: format!("av500-tcp-{s}"),
            kind: Kind::Av500(f.av.firmware),
            tcp: true,
        });
        out.push(Planned {
            name: format!("hm2-{s}"),
            kind: Kind::Hm2(f.hm.firmware),
            tcp: true,
        });
        out.push(Planned {
            name: format!("vm12-{s}"),
            kind: Kind::Vm12(f.vm_fw),
            tcp: false,
        });
    }
    out
}

/// The running fleet.
#[derive(Debug)]
pub struct Fleet {
    /// Devices by name, for scenarios.
    pub devices: Vec<(String, Target)>,
    /// One line per device (see [`describe`]).
    pub lines: Vec<String>,
    /// `broker embedded address=… url=…` when the embedded broker runs.
    pub broker_line: Option<String>,
}

/// The line printed for a device: `device NAME model=VENDOR/MODEL fw=X.Y.Z transport=…`
/// followed by the transport's keys (`port`, `baud`, `parity`, `unit`, `address`,
/// `broker`, `serial`).
pub fn describe(
    name: &str,
    target: &Target,
    broker: Option<&str>,
    link: Option<&PathBuf>,
) -> String {
    let link = link
        .map(|l| format!(" link={}", l.display()))
        .unwrap_or_default();
    match target {
        Target::Lip300(h) => format!(
            "device {name} model=lumen/lip-300 fw={} transport=serial port={} baud={} sn={}{link}",
            h.config().firmware,
            h.path().display(),
            lip300::BAUD,
            h.config().serial
        ),
        Target::Av500(h) => av500_line(name, h, &link),
        Target::Hm2(h) => format!(
            "device {name} model=cryosense/hm-2 fw={}.{} transport=modbus-tcp address={} unit=1",
            h.config().firmware.major,
            h.config().firmware.minor,
            h.addr()
        ),
        Target::Vm12(h) => format!(
            "device {name} model=vistara/vm-12 fw={} transport=mqtt broker={} serial={}",
            h.config().firmware,
            broker.unwrap_or("?"),
            h.serial()
        ),
    }
}

fn av500_line(name: &str, h: &Av500Handle, link: &str) -> String {
    let c = h.config();
    let sn = c.serial.trim();
    match h.endpoint() {
        Endpoint::Tcp(a) => format!(
            "device {name} model=aeris/av-500 fw={} transport=modbus-tcp address={a} unit={} sn={sn}",
            c.firmware, c.unit
        ),
        Endpoint::Pty(p) => format!(
            "device {name} model=aeris/av-500 fw={} transport=modbus-rtu port={} baud={} parity={} unit={} sn={sn}{link}",
            c.firmware,
            p.display(),
            crate::av500::BAUD,
            crate::av500::PARITY,
            c.unit
        ),
    }
}

fn link_pty(
    dir: &Option<PathBuf>,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<Option<PathBuf>> {
    let Some(dir) = dir else { return Ok(None) };
    std::fs::create_dir_all(dir)?;
    let link = dir.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(path, &link).map_err(|e| {
        anyhow::anyhow!("cannot link {} -> {}: {e}", link.display(), path.display())
    })?;
    Ok(Some(link))
}

/// Starts every planned device (and the embedded broker when no broker is given).
pub async fn start(opts: &FleetOptions) -> anyhow::Result<Fleet> {
    let mut broker_line = None;
    let broker = match &opts.broker {
        Some(b) => b.clone(),
        None => {
            #[cfg(feature = "embedded-broker")]
            {
                let b = tokio::task::spawn_blocking(crate::broker::spawn_embedded).await??;
                broker_line = Some(format!(
                    "broker embedded address={} url={}",
                    b.addr(),
                    b.url()
                ));
                ExternalBroker {
                    url: BrokerUrl::new(b.addr().ip().to_string(), b.port(), false),
                    username: None,
                    password: None,
                }
            }
            #[cfg(not(feature = "embedded-broker"))]
            {
                anyhow::bail!(
                    "no broker: give --broker mqtt://host:port (built without the embedded broker)"
                )
            }
        }
    };
    let broker_text = broker.display();
    let mut next_port = opts.base_port;
    let mut tcp_addr = || {
        let port = next_port.unwrap_or(0);
        if let Some(p) = next_port.as_mut() {
            *p = p.saturating_add(1);
        }
        SocketAddr::new(opts.host, port)
    };
    let mut devices = Vec::new();
    let mut lines = Vec::new();
    for f in families(opts.firmware_set) {
        let s = f.suffix;

        let mut lip = f.lip.clone();
        lip.boot_time = opts.boot_time;
        let h = Lip300Sim::spawn_pty(lip).await?;
        let name = format!("lip300-{s}");
        let link = link_pty(&opts.link_dir, &name, h.path())?;
        let t = Target::Lip300(h);
        lines.push(describe(&name, &t, None, link.as_ref()));
        devices.push((name, t));

        let mut av = f.av.clone();
        av.boot_time = opts.boot_time;
        let h = Av500Sim::spawn_rtu_pty(av.clone()).await?;
        let name = format!("av500-rtu-{s}");
        let link = match h.path() {
            Some(p) => link_pty(&opts.link_dir, &name, p)?,
            None => None,
        };
        let t = Target::Av500(h);
        lines.push(describe(&name, &t, None, link.as_ref()));
        devices.push((name, t));

        // A second ventilator, so its own serial: a fleet file lists each serial once.
        av.serial = next_serial(&av.serial);
        let h = Av500Sim::spawn_tcp(av, tcp_addr()).await?;
        let name = format!("av500-tcp-{s}");
        let t = Target::Av500(h);
        lines.push(describe(&name, &t, None, None));
        devices.push((name, t));

        let h = Hm2Sim::spawn_tcp(f.hm.clone(), tcp_addr()).await?;
        let name = format!("hm2-{s}");
        let t = Target::Hm2(h);
        lines.push(describe(&name, &t, None, None));
        devices.push((name, t));

        let mut vm = Vm12Config::new(f.vm_fw, f.vm_serial, broker.url.host(), broker.url.port());
        vm.username = broker.username.clone();
        vm.password = broker.password.clone();
        vm.status_interval = opts.status_interval;
        let h = Vm12Sim::spawn(vm).await?;
        let name = format!("vm12-{s}");
        let t = Target::Vm12(h);
        lines.push(describe(&name, &t, Some(&broker_text), None));
        devices.push((name, t));
    }
    Ok(Fleet {
        devices,
        lines,
        broker_line,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let b: ExternalBroker = "mqtt://127.0.0.1:1884".parse().unwrap();
        assert_eq!((b.url.host(), b.url.port()), ("127.0.0.1", 1884));
        let b: ExternalBroker = "mqtt://u:p@broker.local".parse().unwrap();
        assert_eq!(b.url.port(), 1883);
        assert_eq!(b.username.as_deref(), Some("u"));
        assert_eq!(b.password.as_deref(), Some("p"));
        assert_eq!(b.display(), "mqtt://broker.local:1883");
        let b: ExternalBroker = "mqtt://[::1]:1999".parse().unwrap();
        assert_eq!((b.url.host(), b.url.port()), ("::1", 1999));
        assert_eq!(b.display(), "mqtt://[::1]:1999");
        assert!("http://x".parse::<ExternalBroker>().is_err());
        assert!("mqtt://x:notaport".parse::<ExternalBroker>().is_err());
        assert!("mqtt://:1883".parse::<ExternalBroker>().is_err());
        // The one grammar: no other scheme, no bare host, and the error hides the password.
        assert!("tcp://x:1".parse::<ExternalBroker>().is_err());
        assert!("x:1883".parse::<ExternalBroker>().is_err());
        let e = "http://u:s3cret@x".parse::<ExternalBroker>().unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = "mqtts://x".parse::<ExternalBroker>().unwrap_err();
        assert!(e.to_string().contains("without TLS"), "{e}");
    }

    #[test]
    fn plan_names() {
        let names: Vec<String> = plan(FirmwareSet::Both)
            .into_iter()
            .map(|p| p.name)
            .collect();
        assert_eq!(
            names,
            [
                "lip300-a",
                "av500-rtu-a",
                "av500-tcp-a",
                "hm2-a",
                "vm12-a",
                "lip300-b",
                "av500-rtu-b",
                "av500-tcp-b",
                "hm2-b",
                "vm12-b"
            ]
        );
        assert_eq!(plan(FirmwareSet::Old).len(), 5);
    }
}

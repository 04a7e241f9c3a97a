//! The agent's configuration file (`tend-agent run --config agent.toml`): what it reads,
//! where it keeps its outbox and where it sends. Every error names file, line and key.

use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tend_mqtt::{BrokerAuth, BrokerUrl, ClientTls};
use tend_profiles::load::toml_error;
use tend_profiles::locate::{line_of_path, KeyPath};
use tend_profiles::schema::TransportKind;
use tend_profiles::units::{ByteSize, Dur};
use tend_profiles::{ProfileError, ProfileSet};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's name on the wire (`tend/v1/<agent_id>/...`).
    pub agent_id: String,
    /// The site (fleet file) the agent's devices stand in.
    pub site_id: String,
    /// Outbox and agent state live here.
    pub data_dir: PathBuf,
    /// Extra or replacement profiles, beside the built-in ones.
    pub profiles_dir: Option<PathBuf>,
    /// A fault that clears and returns within this time stays one episode.
    #[serde(default = "default_damping")]
    pub flap_damping: Dur,
    pub uplink: UplinkSection,
    #[serde(default)]
    pub outbox: OutboxSection,
    #[serde(rename = "device", default)]
    pub devices: Vec<DeviceConfig>,
}

fn default_damping() -> Dur {
    Dur(Duration::from_secs(60))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkSection {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub broker: String,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    /// The password is read from a file so it never sits in the config or a command line.
    pub password_file: Option<PathBuf>,
    pub keep_alive: Option<Dur>,
}

impl UplinkSection {
    /// The user name, password file and TLS files of the uplink.
    pub fn auth(&self) -> BrokerAuth {
        BrokerAuth {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            tls: ClientTls {
                ca_file: self.ca_file.clone(),
                client_cert: self.client_cert.clone(),
                client_key: self.client_key.clone(),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSection {
    /// Size cap; when full, the oldest readings go first, never states or fault events.
    #[serde(default = "default_max_size")]
    pub max_size: ByteSize,
    /// Group commit window.
    #[serde(default = "default_commit_window")]
    pub commit_window: Dur,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            max_size: default_max_size(),
            commit_window: default_commit_window(),
        }
    }
}

fn default_max_size() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_commit_window() -> Dur {
    Dur(Duration::from_millis(2))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportName {
    Serial,
    ModbusRtu,
    ModbusTcp,
    Mqtt,
}

impl TransportName {
    /// The profile transport this link carries.
    pub fn profile_kind(self) -> TransportKind {
        match self {
            TransportName::Serial => TransportKind::Serial,
            TransportName::ModbusRtu | TransportName::ModbusTcp => TransportKind::Modbus,
            TransportName::Mqtt => TransportKind::Mqtt,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParityName {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The id the fleet file uses for this device.
    pub id: String,
    /// `vendor/model`; the device's firmware picks the profile of that model.
    pub profile: String,
    pub transport: TransportName,
    /// Serial port path (serial, modbus-rtu).
    pub port: Option<String>,
    pub baud: Option<u32>,
    pub parity: Option<ParityName>,
    /// Modbus unit id.
    pub unit: Option<u8>,
    /// Modbus TCP `host:port`.
    pub address: Option<String>,
    /// MQTT device: the broker it publishes to and its serial number.
    pub broker: Option<String>,
    pub serial: Option<String>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// MQTT device on an `mqtts://` broker: the CA bundle (else the system's roots).
    pub ca_file: Option<PathBuf>,
    /// How often to read the device (serial, Modbus). Default 1 s.
    pub poll_interval: Option<Dur>,
    /// Overrides the profile's reply timeout.
    pub reply_timeout: Option<Dur>,
}

impl DeviceConfig {
    /// The user name, password file and CA file of an MQTT device's broker.
    pub fn broker_auth(&self) -> BrokerAuth {
        BrokerAuth {
            username: self.username.clone(),
            password_file: self.password_file.clone(),
            tls: ClientTls {
                ca_file: self.ca_file.clone(),
                ..ClientTls::default()
            },
        }
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
            .map(|d| d.0)
            .unwrap_or(Duration::from_secs(1))
    }
}

/// A loaded, checked configuration and the profiles its devices use.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: AgentConfig,
    pub profiles: ProfileSet,
}

/// Reads and checks a config file. Relative paths in it are taken from the file's folder.
pub fn load(path: &Path) -> Result<Loaded, ProfileError> {
    let (file, src) = tend_profiles::load::read_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&file, &src, base)
}

/// Parses and checks config text; `file` names it in errors, `base` resolves relative paths.
pub fn parse(file: &str, src: &str, base: &Path) -> Result<Loaded, ProfileError> {
    let mut config: AgentConfig = toml::from_str(src).map_err(|e| toml_error(file, src, &e))?;
    let err = |path: &KeyPath, message: String| ProfileError {
        file: file.to_string(),
        line: line_of_path(src, path),
        key: path.to_string(),
        message,
    };
    let root = KeyPath::root();
    if !tend_wire::topic::valid_agent_id(&config.agent_id) {
        return Err(err(
            &root.key("agent_id"),
            "must be 1-64 letters, digits, '-', '_' or '.' (it is an MQTT topic level)".into(),
        ));
    }
    if config.site_id.trim().is_empty() {
        return Err(err(&root.key("site_id"), "must not be empty".into()));
    }
    let resolve = |p: &mut PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    resolve(&mut config.data_dir);
    for p in [
        &mut config.profiles_dir,
        &mut config.uplink.ca_file,
        &mut config.uplink.client_cert,
        &mut config.uplink.client_key,
        &mut config.uplink.password_file,
    ]
    .into_iter()
    .flatten()
    {
        resolve(p);
    }
    let up = root.key("uplink");
    let broker = BrokerUrl::parse(&config.uplink.broker)
        .map_err(|e| err(&up.key("broker"), e.to_string()))?;
    config
        .uplink
        .auth()
        .check(&broker)
        .map_err(|e| err(&up.key(e.config_key()), e.to_string()))?;
    for (key, p) in [
        ("ca_file", &config.uplink.ca_file),
        ("client_cert", &config.uplink.client_cert),
        ("client_key", &config.uplink.client_key),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(err(
                    &up.key(key),
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
    }
    if let Some(p) = &config.uplink.password_file {
        tend_mqtt::read_secret("password file", p)
            .map_err(|e| err(&up.key("password_file"), e.to_string()))?;
    }

    let mut profiles = ProfileSet::builtin()?;
    if let Some(dir) = &config.profiles_dir {
        profiles.load_dir(dir)?;
    }

    let mut ids = BTreeSet::new();
    let mut endpoints = BTreeSet::new();
    for (i, d) in config.devices.iter_mut().enumerate() {
        let dp = root.key("device").index(i);
        if !tend_wire::topic::valid_agent_id(&d.id) {
            return Err(err(
                &dp.key("id"),
                "must be 1-64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if !ids.insert(d.id.clone()) {
            return Err(err(
                &dp.key("id"),
                format!("device `{}` is listed twice", d.id),
            ));
        }
        let family = profiles
            .family(&d.profile)
            .map_err(|e| err(&dp.key("profile"), e.to_string()))?;
        let kind = family[0].transport_kind();
        if kind != d.transport.profile_kind() {
            return Err(err(
                &dp.key("transport"),
                format!("{} is read over {kind:?}, not {:?}", d.profile, d.transport)
                    .to_lowercase(),
            ));
        }
        let need = |ok: bool, key: &str| -> Result<(), ProfileError> {
            if ok {
                Ok(())
            } else {
                Err(err(
                    &dp.key(key),
                    format!("a {:?} device needs `{key}`", d.transport).to_lowercase(),
                ))
            }
        };
        match d.transport {
            TransportName::Serial | TransportName::ModbusRtu => need(d.port.is_some(), "port")?,
            TransportName::ModbusTcp => need(d.address.is_some(), "address")?,
            TransportName::Mqtt => {
                need(d.broker.is_some(), "broker")?;
                need(d.serial.is_some(), "serial")?;
            }
        }
        for p in [&mut d.password_file, &mut d.ca_file].into_iter().flatten() {
            resolve(p);
        }
        if let Some(url) = &d.broker {
            // Checked now: a broker the link cannot use would otherwise fail only later.
            let url = BrokerUrl::parse(url).map_err(|e| err(&dp.key("broker"), e.to_string()))?;
            d.broker_auth()
                .check(&url)
                .map_err(|e| err(&dp.key(e.config_key()), e.to_string()))?;
        }
        if let Some(pi) = d.poll_interval {
            if pi.0 < Duration::from_millis(100) {
                return Err(err(&dp.key("poll_interval"), "at least 100ms".into()));
            }
        }
        if d.unit == Some(0) {
            return Err(err(&dp.key("unit"), "Modbus unit ids are 1 to 247".into()));
        }
        // One device per link and unit: two entries reading the same unit would double
        // every record.
        let endpoint = match d.transport {
            TransportName::Serial => format!("serial {}", d.port.as_deref().unwrap_or("")),
            TransportName::ModbusRtu => format!(
                "rtu {} unit {}",
                d.port.as_deref().unwrap_or(""),
                d.unit.unwrap_or(1)
            ),
            TransportName::ModbusTcp => format!(
                "tcp {} unit {}",
                d.address.as_deref().unwrap_or(""),
                d.unit.unwrap_or(1)
            ),
            TransportName::Mqtt => format!(
                "mqtt {} {}",
                d.broker.as_deref().unwrap_or(""),
                d.serial.as_deref().unwrap_or("")
            ),
        };
        if !endpoints.insert(endpoint.clone()) {
            return Err(err(
                &dp.key("id"),
                format!("another device already reads {endpoint}"),
            ));
        }
        if let Some(p) = &d.password_file {
            tend_mqtt::read_secret("password file", p)
                .map_err(|e| err(&dp.key("password_file"), e.to_string()))?;
        }
        if let Some(p) = &d.ca_file {
            if !p.is_file() {
                return Err(err(
                    &dp.key("ca_file"),
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
    }
    Ok(Loaded { config, profiles })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
agent_id = "agent-icu-a"
site_id = "s-017-main"
data_dir = "data"

[uplink]
broker = "mqtt://127.0.0.1:1883"

[[device]]
id = "icu7-vent"
profile = "aeris/av-500"
transport = "modbus-tcp"
address = "127.0.0.1:502"
unit = 1
poll_interval = "1s"

[[device]]
id = "ward3-pump"
profile = "lumen/lip-300"
transport = "serial"
port = "/dev/ttyUSB0"

[[device]]
id = "icu7-monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "mqtt://127.0.0.1:1883"
serial = "VM12-00A4471"
"#;

    fn refuse(src: &str) -> ProfileError {
        parse("agent.toml", src, Path::new("/etc/tend")).expect_err("should be refused")
    }

    fn line(src: &str, needle: &str) -> usize {
        src.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn good_config() {
        let l = parse("agent.toml", GOOD, Path::new("/etc/tend")).unwrap();
        assert_eq!(l.config.devices.len(), 3);
        assert_eq!(l.config.data_dir, PathBuf::from("/etc/tend/data"));
        assert_eq!(l.config.outbox.max_size.0, 256 << 20);
        assert_eq!(l.config.devices[1].poll_interval(), Duration::from_secs(1));
    }

    #[test]
    fn errors_name_line_and_key() {
        let cases: &[(&str, &str, &str)] = &[
            ("unit = 1", "unit = 1\nspeed = 3", "speed"),
            (
                "agent_id = \"agent-icu-a\"",
                "agent_id = \"agent/icu\"",
                "agent_id",
            ),
            (
                "broker = \"mqtt://127.0.0.1:1883\"\n\n[[device]]",
                "broker = \"http://x\"\n\n[[device]]",
                "uplink.broker",
            ),
            (
                "profile = \"aeris/av-500\"",
                "profile = \"aeris/av-900\"",
                "device[0].profile",
            ),
            (
                "transport = \"modbus-tcp\"",
                "transport = \"serial\"",
                "device[0].transport",
            ),
            ("address = \"127.0.0.1:502\"\n", "", "device[0].address"),
            (
                "poll_interval = \"1s\"",
                "poll_interval = \"1 fortnight\"",
                "poll_interval",
            ),
            (
                "poll_interval = \"1s\"",
                "poll_interval = \"10ms\"",
                "device[0].poll_interval",
            ),
            ("id = \"ward3-pump\"", "id = \"icu7-vent\"", "device[1].id"),
            (
                "port = \"/dev/ttyUSB0\"",
                "port = \"/dev/ttyUSB0\"\npassword_file = \"nope\"",
                "device[1].password_file",
            ),
            ("serial = \"VM12-00A4471\"\n", "", "device[2].serial"),
            (
                "transport = \"modbus-tcp\"",
                "transport = \"modbus-tcpx\"",
                "transport",
            ),
        ];
        for (from, to, key) in cases {
            assert!(GOOD.contains(from), "{from}");
            let bad = GOOD.replacen(from, to, 1);
            let e = refuse(&bad);
            assert!(e.key.contains(key), "{from:?} -> {to:?}: {e}");
            assert_eq!(e.file, "agent.toml");
            assert!(e.line > 1, "{e}");
        }
        let bad = GOOD.replacen("unit = 1", "unit = 1\nspeed = 3", 1);
        assert_eq!(refuse(&bad).line, line(&bad, "speed = 3"));
    }

    #[test]
    fn uplink_broker_and_secrets_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let load = |src: &str| parse("agent.toml", src, dir.path());
        let with = |extra: &str| {
            GOOD.replacen(
                "broker = \"mqtt://127.0.0.1:1883\"\n\n[[device]]",
                &format!("broker = \"mqtt://127.0.0.1:1883\"\n{extra}\n\n[[device]]"),
                1,
            )
        };
        // An unreadable (here: missing) password file is refused, naming it; it does not
        // become an empty password.
        let src = with("username = \"a\"\npassword_file = \"uplink.pw\"");
        let e = load(&src).unwrap_err();
        assert_eq!(e.key, "uplink.password_file", "{e}");
        assert_eq!(e.line, line(&src, "password_file"), "{e}");
        assert!(e.message.contains("cannot read the password file"), "{e}");
        assert!(e.message.contains("uplink.pw"), "{e}");
        std::fs::write(dir.path().join("uplink.pw"), "\n").unwrap();
        assert!(load(&src).unwrap_err().message.contains("empty"));
        std::fs::write(dir.path().join("uplink.pw"), "pw\n").unwrap();
        assert!(load(&src).is_ok());

        // A password without a user, TLS files without mqtts://, a broker URL with a path.
        let e = load(&with("password_file = \"uplink.pw\"")).unwrap_err();
        assert_eq!(e.key, "uplink.password_file", "{e}");
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        let e = load(&with("ca_file = \"ca.pem\"")).unwrap_err();
        assert_eq!(e.key, "uplink.ca_file", "{e}");
        let src = GOOD.replacen("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883/tend", 1);
        assert_eq!(load(&src).unwrap_err().key, "uplink.broker");
    }

    #[test]
    fn two_devices_on_one_unit_refused() {
        let bad = format!(
            "{GOOD}\n[[device]]\nid = \"twin\"\nprofile = \"aeris/av-500\"\ntransport = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nunit = 1\n"
        );
        let e = refuse(&bad);
        assert_eq!(e.key, "device[3].id");
        assert!(e.message.contains("127.0.0.1:502"), "{e}");
    }
}

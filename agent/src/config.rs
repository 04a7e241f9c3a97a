//! The agent's configuration file (`tend-agent run --config agent.toml`): what it reads,
//! where it keeps its outbox and where it sends. Every error names file, line and key.

pub use crate::device::DeviceConfig;
use crate::device::{LinkTarget, MqttLink, Transport};
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
use tend_wire::credentials::Credentials;

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
    /// The credentials file from `tend-gateway agent add`: the key every message is
    /// sealed with (and, without `username`, the embedded broker's login).
    pub credentials: PathBuf,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    /// The password is read from a file so it never sits in the config or a command line.
    pub password_file: Option<PathBuf>,
    pub keep_alive: Option<Dur>,
    /// The longest new readings wait to share a batch (0 to 10 s, default 1 s); states
    /// and fault episodes never wait.
    pub linger: Option<Dur>,
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
    /// The longest a reading (and an acknowledged deletion) waits to share a commit;
    /// states, fault episodes and identities never wait.
    #[serde(default = "default_linger")]
    pub linger: Dur,
}

impl Default for OutboxSection {
    fn default() -> Self {
        OutboxSection {
            max_size: default_max_size(),
            commit_window: default_commit_window(),
            linger: default_linger(),
        }
    }
}

fn default_max_size() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_linger() -> Dur {
    Dur(crate::outbox::DEFAULT_LINGER)
}

fn default_commit_window() -> Dur {
    Dur(Duration::from_millis(2))
}

/// A loaded, checked configuration and the profiles its devices use.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: AgentConfig,
    pub profiles: ProfileSet,
    /// Read from `[uplink] credentials`, checked to be this agent's.
    pub credentials: Credentials,
}

/// Reads and checks a config file. Relative paths in it are taken from the file's folder.
pub fn load(path: &Path) -> Result<Loaded, ProfileError> {
    let (file, src) = tend_profiles::load::read_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&file, &src, base)
}

/// Parses and checks config text; `file` names it in errors, `base` resolves relative paths.
pub fn parse(file: &str, src: &str, base: &Path) -> Result<Loaded, ProfileError> {
    let cx = Located { file, src };
    let mut config: AgentConfig = toml::from_str(src).map_err(|e| located(&cx, base, &e))?;
    let root = KeyPath::root();
    if !tend_wire::topic::valid_agent_id(&config.agent_id) {
        return Err(cx.err(
            &root.key("agent_id"),
            "must be 1-64 letters, digits, '-', '_' or '.' (it is an MQTT topic level)",
        ));
    }
    if config.site_id.trim().is_empty() {
        return Err(cx.err(&root.key("site_id"), "must not be empty"));
    }
    resolve(base, &mut config.data_dir);
    resolve(base, &mut config.uplink.credentials);
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
        resolve(base, p);
    }
    check_uplink(&cx, &config.uplink)?;
    let credentials = read_credentials(&cx, &config.uplink.credentials, &config.agent_id)?;

    let mut profiles = ProfileSet::builtin()?;
    if let Some(dir) = &config.profiles_dir {
        profiles.load_dir(dir)?;
    }

    let mut ids = BTreeSet::new();
    let mut endpoints = BTreeSet::new();
    for (i, d) in config.devices.iter_mut().enumerate() {
        let dp = root.key("device").index(i);
        if !tend_wire::topic::valid_agent_id(&d.id) {
            return Err(cx.err(
                &dp.key("id"),
                "must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        if !ids.insert(d.id.clone()) {
            return Err(cx.err(&dp.key("id"), format!("device `{}` is listed twice", d.id)));
        }
        let endpoint = check_device(&cx, &dp, d, &profiles, base)?;
        if !endpoints.insert(endpoint.clone()) {
            return Err(cx.err(
                &dp.key("id"),
                format!("another device already reads {endpoint}"),
            ));
        }
    }
    Ok(Loaded {
        config,
        profiles,
        credentials,
    })
}

/// Reads `[uplink] credentials`: private to the agent's user, well-formed, and this
/// agent's (a copy of another agent's file would make every message refused).
fn read_credentials(cx: &Located, path: &Path, agent: &str) -> Result<Credentials, ProfileError> {
    let at = KeyPath::root().key("uplink").key("credentials");
    let bytes = tend_mqtt::read_private("credentials file", path)
        .map_err(|e| cx.err(&at, e.to_string()))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| cx.err(&at, format!("{} is not UTF-8", path.display())))?;
    let c =
        Credentials::parse(&text).map_err(|e| cx.err(&at, format!("{}: {e}", path.display())))?;
    if c.agent_id != agent {
        return Err(cx.err(
            &at,
            format!(
                "{} holds the credentials of agent {:?}, not of this agent {agent:?} (make this agent's with `tend-gateway agent add {agent}`)",
                path.display(),
                c.agent_id
            ),
        ));
    }
    Ok(c)
}

/// A relative path in the config is taken from the config file's folder.
fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}

/// Builds located errors for one config text.
struct Located<'a> {
    file: &'a str,
    src: &'a str,
}

impl Located<'_> {
    fn err(&self, path: &KeyPath, message: impl Into<String>) -> ProfileError {
        ProfileError {
            file: self.file.to_string(),
            line: line_of_path(self.src, path),
            key: path.to_string(),
            message: message.into(),
        }
    }
}

fn check_uplink(cx: &Located, uplink: &UplinkSection) -> Result<(), ProfileError> {
    let up = KeyPath::root().key("uplink");
    if let Some(l) = uplink.linger {
        if l.0 > crate::uplink::MAX_LINGER {
            return Err(cx.err(
                &up.key("linger"),
                format!(
                    "{l} is longer than the {} allowed",
                    Dur(crate::uplink::MAX_LINGER)
                ),
            ));
        }
    }
    let broker =
        BrokerUrl::parse(&uplink.broker).map_err(|e| cx.err(&up.key("broker"), e.to_string()))?;
    uplink
        .auth()
        .check(&broker)
        .map_err(|e| cx.err(&up.key(e.config_key()), e.to_string()))?;
    for (key, p) in [
        ("ca_file", &uplink.ca_file),
        ("client_cert", &uplink.client_cert),
        ("client_key", &uplink.client_key),
    ] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(cx.err(
                    &up.key(key),
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }
    }
    if let Some(p) = &uplink.password_file {
        tend_mqtt::read_secret("password file", p)
            .map_err(|e| cx.err(&up.key("password_file"), e.to_string()))?;
    }
    // The key is parsed when the link starts, but one open to others is refused now.
    if let Some(p) = &uplink.client_key {
        tend_mqtt::check_private("private key", p)
            .map_err(|e| cx.err(&up.key("client_key"), e.to_string()))?;
    }
    Ok(())
}

/// Checks one device entry against its profile and resolves its relative paths; returns
/// what it reads (`tcp host:502 unit 1`), which no other entry may read too.
fn check_device(
    cx: &Located,
    dp: &KeyPath,
    d: &mut DeviceConfig,
    profiles: &ProfileSet,
    base: &Path,
) -> Result<String, ProfileError> {
    let family = profiles
        .family(&d.profile)
        .map_err(|e| cx.err(&dp.key("profile"), e.to_string()))?;
    let kind = family[0].transport_kind();
    if kind != d.transport.profile_kind() {
        return Err(cx.err(
            &dp.key("transport"),
            misfit(&d.profile, kind, d.transport.name()),
        ));
    }
    if let Some(pi) = d.poll_interval {
        if pi.0 < Duration::from_millis(100) {
            return Err(cx.err(&dp.key("poll_interval"), "at least 100ms"));
        }
    }
    if d.transport.unit() == Some(0) {
        return Err(cx.err(&dp.key("unit"), "Modbus unit ids are 1 to 247"));
    }
    if let Transport::Mqtt(m) = &mut d.transport {
        check_mqtt_link(cx, dp, m, base)?;
    }
    // One device per link and unit: two entries reading the same unit would double every
    // record.
    Ok(match d.transport.resolve(&family[0].doc.transport) {
        t @ LinkTarget::Modbus { unit, .. } => format!("{} unit {unit}", t.link_key()),
        t => t.link_key(),
    })
}

/// An MQTT device's broker: its URL, credentials and CA file, checked now (a broker the
/// link cannot use would otherwise fail only later, and for good).
fn check_mqtt_link(
    cx: &Located,
    dp: &KeyPath,
    m: &mut MqttLink,
    base: &Path,
) -> Result<(), ProfileError> {
    for p in [&mut m.password_file, &mut m.ca_file].into_iter().flatten() {
        resolve(base, p);
    }
    let url = BrokerUrl::parse(&m.broker).map_err(|e| cx.err(&dp.key("broker"), e.to_string()))?;
    m.broker_auth()
        .check(&url)
        .map_err(|e| cx.err(&dp.key(e.config_key()), e.to_string()))?;
    if let Some(p) = &m.password_file {
        tend_mqtt::read_secret("password file", p)
            .map_err(|e| cx.err(&dp.key("password_file"), e.to_string()))?;
    }
    if let Some(p) = &m.ca_file {
        if !p.is_file() {
            return Err(cx.err(
                &dp.key("ca_file"),
                format!("{} is not a readable file", p.display()),
            ));
        }
    }
    Ok(())
}

/// A TOML or serde error, located. Inside a `[[device]]` table the transport's keys are
/// read through a tagged enum, which serde buffers: its errors carry the table's position
/// and often no key, so the key is found here from the message.
///
/// A device whose transport does not fit its profile is reported as that: its other keys
/// then follow from the wrong transport, and the unknown key is only the symptom.
fn located(cx: &Located, base: &Path, e: &toml::de::Error) -> ProfileError {
    let src = cx.src;
    let mut err = toml_error(cx.file, src, e);
    let Some(i) = device_table_at(src, err.line) else {
        return err;
    };
    let dp = KeyPath::root().key("device").index(i);
    if let Some(message) = transport_misfit(src, base, i) {
        return cx.err(&dp.key("transport"), message);
    }
    let message = e.message();
    let key = quoted_after(message, "unknown field `")
        .or_else(|| quoted_after(message, "missing field `"))
        .or_else(|| {
            message
                .contains("variant")
                .then(|| quoted_after(message, "`"))
                .flatten()
                .and_then(|v| key_with_value(src, i, &v))
        })
        .or_else(|| quoted_value(message).and_then(|v| key_with_value(src, i, &v)));
    if let Some(key) = key {
        let path = dp.key(&key);
        err.line = line_of_path(src, &path);
        err.key = path.to_string();
    } else if !err.key.starts_with("device[") {
        err.key = dp.to_string();
    }
    err
}

/// Why device `i`'s transport cannot read its profile's model, if it cannot; read from
/// the raw text, for a config that does not deserialize.
fn transport_misfit(src: &str, base: &Path, i: usize) -> Option<String> {
    let doc: toml::Table = toml::from_str(src).ok()?;
    let device = doc.get("device")?.as_array()?.get(i)?.as_table()?;
    let profile = device.get("profile")?.as_str()?;
    let transport = device.get("transport")?.as_str()?;
    let written = match transport {
        "serial" => TransportKind::Serial,
        "modbus-rtu" | "modbus-tcp" => TransportKind::Modbus,
        "mqtt" => TransportKind::Mqtt,
        _ => return None,
    };
    let mut profiles = ProfileSet::builtin().ok()?;
    if let Some(dir) = doc.get("profiles_dir").and_then(|d| d.as_str()) {
        profiles.load_dir(&base.join(dir)).ok()?;
    }
    let kind = profiles.family(profile).ok()?.first()?.transport_kind();
    (kind != written).then(|| misfit(profile, kind, transport))
}

fn misfit(profile: &str, kind: TransportKind, transport: &str) -> String {
    format!("{profile} is read over {kind:?}, not {transport}").to_lowercase()
}

/// The text between `prefix` and the next backtick.
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = &message[message.find(prefix)? + prefix.len()..];
    Some(rest.split('`').next()?.to_string())
}

/// The value a serde message quotes: `` `300` `` or `"text"`.
fn quoted_value(message: &str) -> Option<String> {
    if let Some(v) = quoted_after(message, "`") {
        return Some(v);
    }
    let start = message.find('"')? + 1;
    let end = start + message[start..].find('"')?;
    Some(message[start..end].to_string())
}

/// The key of device `i` whose value is written as `value`, if exactly one is.
fn key_with_value(src: &str, i: usize, value: &str) -> Option<String> {
    let doc: toml::Table = toml::from_str(src).ok()?;
    let table = doc.get("device")?.as_array()?.get(i)?.as_table()?;
    let mut keys = table.iter().filter(|(_, v)| match v {
        toml::Value::String(s) => s == value,
        other => other.to_string() == value,
    });
    let (key, _) = keys.next()?;
    keys.next().is_none().then(|| key.clone())
}

/// Which `[[device]]` table (0-based) the 1-based `line` is in, if any.
fn device_table_at(src: &str, line: usize) -> Option<usize> {
    let mut index = None;
    let mut count = 0;
    for l in src.lines().take(line) {
        let l = l.trim();
        if l.starts_with("[[device]]") {
            index = Some(count);
            count += 1;
        } else if l.starts_with('[') {
            index = None;
        }
    }
    index
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

    /// [`GOOD`] with a credentials file for its agent in `dir` (which must outlive the
    /// parse).
    fn good(dir: &tempfile::TempDir) -> String {
        let (path, _) = tend_testkit::trust::credentials(dir.path(), "agent-icu-a");
        GOOD.replacen(
            "[uplink]\n",
            &format!("[uplink]\ncredentials = {:?}\n", path.display().to_string()),
            1,
        )
    }

    fn refuse(src: &str) -> ProfileError {
        parse("agent.toml", src, Path::new("/etc/tend")).expect_err("should be refused")
    }

    fn line(src: &str, needle: &str) -> usize {
        src.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn good_config() {
        let dir = tempfile::tempdir().unwrap();
        let l = parse("agent.toml", &good(&dir), Path::new("/etc/tend")).unwrap();
        assert_eq!(l.config.devices.len(), 3);
        assert_eq!(l.config.data_dir, PathBuf::from("/etc/tend/data"));
        assert_eq!(l.config.outbox.max_size.0, 256 << 20);
        assert_eq!(l.config.devices[1].poll_interval(), Duration::from_secs(1));
    }

    #[test]
    fn errors_name_line_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let good = good(&dir);
        let cases: &[(&str, &str, &str)] = &[
            ("unit = 1", "unit = 1\nspeed = 3", "speed"),
            (
                "broker = \"mqtt://127.0.0.1:1883\"\n\n[[device]]",
                "broker = \"mqtt://127.0.0.1:1883\"\nlinger = \"11s\"\n\n[[device]]",
                "uplink.linger",
            ),
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
            assert!(good.contains(from), "{from}");
            let bad = good.replacen(from, to, 1);
            let e = refuse(&bad);
            assert!(e.key.contains(key), "{from:?} -> {to:?}: {e}");
            assert_eq!(e.file, "agent.toml");
            assert!(e.line > 1, "{e}");
        }
        let bad = good.replacen("unit = 1", "unit = 1\nspeed = 3", 1);
        assert_eq!(refuse(&bad).line, line(&bad, "speed = 3"));
    }

    #[test]
    fn credentials_are_checked_at_load() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let good = good(&dir);
        let cred = dir.path().join("agent-icu-a.cred");
        let secret = tend_testkit::trust::read_credentials(&cred).key.to_hex();
        let (other, other_key) = tend_testkit::trust::credentials(dir.path(), "agent-icu-b");
        let open = dir.path().join("open.cred");
        std::fs::copy(&cred, &open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let garbled = dir.path().join("garbled.cred");
        tend_testkit::config::write_secret(
            &garbled,
            format!("agent_id = \"agent-icu-a\"\nkey = \"{}\"\n", &secret[..40]),
        )
        .unwrap();
        let cases = [
            (dir.path().join("missing.cred"), "missing"),
            (open, "0644"),
            (other, "another agent's"),
            (garbled, "garbled"),
        ];
        for (path, what) in cases {
            let bad = good.replacen(&cred.display().to_string(), &path.display().to_string(), 1);
            let e = refuse(&bad);
            assert_eq!(e.key, "uplink.credentials", "{what}: {e}");
            assert_eq!(e.line, line(&bad, "credentials = "), "{what}: {e}");
            assert!(
                e.message.contains(&path.display().to_string()),
                "{what}: {e}"
            );
            assert!(
                !e.to_string().contains(&secret),
                "{what}: the key leaked: {e}"
            );
            assert!(!e.to_string().contains(&other_key.to_hex()), "{what}: {e}");
        }
    }

    #[test]
    fn transport_keys_are_checked_per_transport() {
        let dir = tempfile::tempdir().unwrap();
        let good = good(&dir);
        // (replace, with, key, line of)
        let cases: &[(&str, &str, &str, &str)] = &[
            // A key of another transport.
            (
                "unit = 1",
                "unit = 1\nparity = \"even\"",
                "device[0].parity",
                "parity = ",
            ),
            (
                "port = \"/dev/ttyUSB0\"",
                "port = 5",
                "device[1].port",
                "port = 5",
            ),
            ("unit = 1", "unit = 300", "device[0].unit", "unit = 300"),
            (
                "unit = 1",
                "unit = \"one\"",
                "device[0].unit",
                "unit = \"one\"",
            ),
            (
                "transport = \"modbus-tcp\"",
                "transport = \"modbus-tcpx\"",
                "device[0].transport",
                "modbus-tcpx",
            ),
            (
                "transport = \"serial\"\n",
                "",
                "device[1].transport",
                "id = \"ward3-pump\"",
            ),
            (
                "serial = \"VM12-00A4471\"",
                "serial = \"VM12-00A4471\"\nbaud = 9600",
                "device[2].baud",
                "baud = 9600",
            ),
        ];
        for (from, to, key, at) in cases {
            assert!(good.contains(from), "{from}");
            let bad = good.replacen(from, to, 1);
            let e = refuse(&bad);
            assert_eq!(e.key, *key, "{from:?} -> {to:?}: {e}");
            let want = if key.ends_with("transport") && to.is_empty() {
                // A missing key is reported at its table.
                line(&bad, at) - 1
            } else {
                line(&bad, at)
            };
            assert_eq!(e.line, want, "{from:?} -> {to:?}: {e}");
        }
        let bad = good.replacen("unit = 1", "unit = 1\nparity = \"even\"", 1);
        let e = refuse(&bad);
        assert!(e.message.contains("unknown field `parity`"), "{e}");
    }

    #[test]
    fn rtu_defaults_come_from_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let src = good(&dir).replacen(
            "transport = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nunit = 1",
            "transport = \"modbus-rtu\"\nport = \"/dev/ttyUSB1\"",
            1,
        );
        let l = parse("agent.toml", &src, Path::new("/etc/tend")).unwrap();
        let d = &l.config.devices[0];
        let family = l.profiles.family(&d.profile).unwrap();
        assert_eq!(
            d.transport.resolve(&family[0].doc.transport),
            LinkTarget::Modbus {
                endpoint: crate::transport::modbus::Endpoint::Rtu {
                    path: "/dev/ttyUSB1".into(),
                    baud: 19200,
                    parity: tend_profiles::schema::Parity::Even,
                },
                unit: 1,
            }
        );
    }

    #[test]
    fn two_devices_on_one_unit_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = good(&dir);
        let bad = format!(
            "{good}\n[[device]]\nid = \"twin\"\nprofile = \"aeris/av-500\"\ntransport = \"modbus-tcp\"\naddress = \"127.0.0.1:502\"\nunit = 1\n"
        );
        let e = refuse(&bad);
        assert_eq!(e.key, "device[3].id");
        assert!(e.message.contains("127.0.0.1:502"), "{e}");
    }
}

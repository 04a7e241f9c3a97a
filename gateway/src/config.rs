//! The gateway's configuration file (`tend-gateway run --config gateway.toml`). Every
//! error names file, line and key; relative paths are taken from the file's folder.

use crate::backend::BackendKind;
use crate::fleet::Fleet;
use jiff::tz::TimeZone;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tend_mqtt::{BrokerAuth, BrokerUrl, ClientTls, OptionsError};
use tend_profiles::load::toml_error;
use tend_profiles::locate::{line_of_path, KeyPath};
use tend_profiles::units::{ByteSize, Dur};
use tend_profiles::{ProfileError, ProfileSet};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Named in tickets (`source.gateway`) and in the MQTT client id.
    pub gateway_id: String,
    /// The store and the audit log live here.
    pub data_dir: PathBuf,
    /// The fleet file (customers, sites, devices).
    pub fleet: PathBuf,
    /// Deadlines and month boundaries are in this zone (`Asia/Shanghai`).
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// Extra or replacement profiles, beside the built-in ones.
    pub profiles_dir: Option<PathBuf>,
    #[serde(default)]
    pub broker: BrokerSection,
    pub backend: Option<BackendSection>,
    pub api: ApiSection,
    #[serde(default)]
    pub trust: TrustSection,
    #[serde(default)]
    pub service: ServiceSection,
    #[serde(default)]
    pub store: StoreSection,
    /// An agent whose clock is off by more than this is flagged, and its records' times
    /// are taken in gateway time.
    #[serde(default = "default_clock_tolerance")]
    pub clock_tolerance: Dur,
}

fn default_clock_tolerance() -> Dur {
    Dur(Duration::from_secs(120))
}

/// `[service]`: the service watch's own work.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Whether this gateway opens the `maintenance_due` tickets the contracts make due.
    /// Several gateways that share the agents' traffic on an external broker each keep
    /// their own store: exactly one of them should (the others: `false`), or each would
    /// open the same ticket with its own detection time.
    #[serde(default = "yes")]
    pub maintenance_tickets: bool,
}

impl Default for ServiceSection {
    fn default() -> Self {
        ServiceSection {
            maintenance_tickets: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// `[store]`: where the gateway keeps everything: one redb file in `data_dir` (the
/// default), or a PostgreSQL database that several gateways of one fleet share.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    #[serde(default)]
    pub kind: StoreKind,
    /// `postgres://user@host:port/db` (`?sslmode=require` for TLS to the database); the
    /// password comes from `password_file`, never from the URL.
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    /// PEM roots the database's TLS certificate must chain to (default: the system's).
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Redb,
    Postgres,
}

/// `[trust]`: where enrolment material lives.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// The trust directory (default `<data_dir>/trust`); gateways of one fleet that name
    /// the same directory accept the same agents.
    pub dir: Option<PathBuf>,
}

impl GatewayConfig {
    /// The trust directory, `[trust] dir` or `<data_dir>/trust`.
    pub fn trust_dir(&self) -> PathBuf {
        self.trust
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("trust"))
    }
}

fn default_tz() -> String {
    "Asia/Shanghai".into()
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    /// Run the MQTT broker inside the gateway (the default).
    #[serde(default)]
    pub embedded: Option<bool>,
    /// Where the embedded broker listens.
    pub listen: Option<SocketAddr>,
    /// An external broker: `mqtt://host:port` or `mqtts://host:port`.
    pub url: Option<String>,
    /// Gateways sharing one external broker name the same group: each batch goes to one
    /// of them (`$share/<group>/tend/v1/+/up`).
    pub share_group: Option<String>,
    /// For an `mqtts://` url: the CA bundle (else the system's roots), and a client
    /// certificate and key for mutual TLS (both or neither).
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// The embedded broker speaks only TLS with this certificate chain and key (PEM,
    /// both or neither; the key private to its owner).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Where the gateway's MQTT client connects, decided from the broker section.
#[derive(Debug, Clone, PartialEq)]
pub enum BrokerPlan {
    Embedded { listen: SocketAddr },
    External { url: String },
}

impl BrokerSection {
    /// The user name, password file and TLS files the gateway's MQTT client uses.
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

    /// The embedded broker's TLS files, when both are given.
    #[cfg(feature = "embedded-broker")]
    pub fn server_tls(&self) -> Option<tend_mqtt::broker::ServerTls> {
        Some(tend_mqtt::broker::ServerTls {
            cert_file: self.tls_cert.clone()?,
            key_file: self.tls_key.clone()?,
        })
    }

    pub fn plan(&self) -> BrokerPlan {
        match (&self.url, self.embedded) {
            (Some(url), _) => BrokerPlan::External { url: url.clone() },
            _ => BrokerPlan::Embedded {
                listen: self
                    .listen
                    .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 1883))),
            },
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    /// Which ticket system (`"service-api"`, the default: the documented service backend
    /// API). The settings below are that API's.
    #[serde(default)]
    pub kind: BackendKind,
    /// The ticket system's base URL (`https://service.example.com`); the API paths
    /// (`/api/v1/tickets`) are appended.
    pub url: String,
    /// The bearer token, read from a file so it never sits in the config.
    pub token_file: PathBuf,
    /// Extra CA certificate (PEM) to trust for the backend.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout.
    #[serde(default = "default_request_timeout")]
    pub timeout: Dur,
    /// How often the status of open tickets is read back.
    #[serde(default = "default_status_poll")]
    pub status_poll: Dur,
}

fn default_request_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_status_poll() -> Dur {
    Dur(Duration::from_secs(60))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    /// Where the hotline API listens.
    pub listen: SocketAddr,
    /// The hotline's bearer token, read from a file.
    pub token_file: PathBuf,
    /// How long a diagnostic waits for the agent.
    #[serde(default = "default_diag_timeout")]
    pub diag_timeout: Dur,
    /// Serve HTTPS with this PEM certificate chain and key (both or neither).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Concurrent hotline connections; more wait to be accepted. Default: a quarter of
    /// the process's open-file limit, so the broker keeps descriptors for agents.
    pub max_connections: Option<usize>,
    /// A client must send a request's headers within this.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: Dur,
    /// A connection with no request in flight and none begun or ended for this long is
    /// closed (bytes trickling in or out do not keep it open).
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: Dur,
    /// A TLS handshake must finish within this.
    #[serde(default = "default_tls_handshake_timeout")]
    pub tls_handshake_timeout: Dur,
    /// `audit.log` is rotated before it passes this (to `audit.log.1` ... `.4`).
    #[serde(default = "default_audit_max_size")]
    pub audit_max_size: ByteSize,
}

fn default_diag_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_header_read_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_idle_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}

fn default_tls_handshake_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}

fn default_audit_max_size() -> ByteSize {
    ByteSize(crate::audit::DEFAULT_MAX_SIZE)
}

/// The smallest `audit_max_size`: a few lines must fit before a rotation.
const AUDIT_MIN_SIZE: u64 = 4 << 10;

/// A loaded, checked configuration with what it refers to.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: GatewayConfig,
    pub fleet: Fleet,
    pub profiles: ProfileSet,
    pub tz: TimeZone,
}

/// Reads and checks a config file and the fleet file it names.
pub fn load(path: &Path) -> Result<Loaded, ProfileError> {
    let (file, src) = tend_profiles::load::read_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&file, &src, base)
}

/// Reads a config file for the enrolment commands (`agent add`, `list`, `revoke`): its
/// keys are checked and its paths resolved, but the files it names (fleet, tokens,
/// certificates) need not exist yet, so a new installation can enrol before the rest is
/// in place.
pub fn load_for_enrolment(path: &Path) -> Result<GatewayConfig, ProfileError> {
    let (file, src) = tend_profiles::load::read_text(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config: GatewayConfig =
        toml::from_str(&src).map_err(|e| toml_error(&file, &src, &e))?;
    let at = Locator {
        file: &file,
        src: &src,
    };
    if !tend_wire::topic::valid_agent_id(&config.gateway_id) {
        return Err(at.error(&KeyPath::root().key("gateway_id"), ID_RULE));
    }
    config.resolve_paths(base);
    Ok(config)
}

/// Why a token file cannot be used. The message names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is empty", path.display())]
    Empty { path: PathBuf },
    /// Open to group or others (`tend_mqtt::secret`'s rule), or not UTF-8.
    #[error(transparent)]
    Refused(tend_mqtt::SecretError),
}

/// Reads a secret (token, password) from a file: private to its owner, trimmed, never
/// empty, never logged.
pub fn read_secret(path: &Path) -> Result<String, SecretFileError> {
    let bytes = tend_mqtt::read_private("token file", path).map_err(|e| match e {
        tend_mqtt::SecretError::Unreadable { path, source, .. } => {
            SecretFileError::Unreadable { path, source }
        }
        e => SecretFileError::Refused(e),
    })?;
    let s = String::from_utf8(bytes).map_err(|_| SecretFileError::Unreadable {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        ),
    })?;
    let s = s.trim().to_string();
    if s.is_empty() {
        return Err(SecretFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(s)
}

/// Parses and checks config text; `file` names it in errors, `base` resolves relative paths.
pub fn parse(file: &str, src: &str, base: &Path) -> Result<Loaded, ProfileError> {
    let mut config: GatewayConfig = toml::from_str(src).map_err(|e| toml_error(file, src, &e))?;
    let at = Locator { file, src };
    if !tend_wire::topic::valid_agent_id(&config.gateway_id) {
        return Err(at.error(&KeyPath::root().key("gateway_id"), ID_RULE));
    }
    config.resolve_paths(base);
    let tz = TimeZone::get(&config.timezone).map_err(|e| {
        at.error(
            &KeyPath::root().key("timezone"),
            format!("{:?} is not a known time zone: {e}", config.timezone),
        )
    })?;
    check_broker(&config.broker, &at)?;
    check_api(&config.api, &at)?;
    check_store(&config.store, &at)?;
    if let Some(b) = &config.backend {
        check_backend(b, &at)?;
    }
    check_files_exist(&config, &at)?;
    check_secrets(&config, &at)?;

    let fleet = Fleet::load(&config.fleet)?;
    let mut profiles = ProfileSet::builtin()?;
    if let Some(dir) = &config.profiles_dir {
        profiles.load_dir(dir)?;
    }
    Ok(Loaded {
        config,
        fleet,
        profiles,
        tz,
    })
}

/// What a gateway id and a share group may be (both are MQTT topic levels).
const ID_RULE: &str = "must be 1-64 letters, digits, '-', '_' or '.'";

/// The config text being checked: turns a key path into a located error.
struct Locator<'a> {
    file: &'a str,
    src: &'a str,
}

impl Locator<'_> {
    fn error(&self, path: &KeyPath, message: impl Into<String>) -> ProfileError {
        ProfileError {
            file: self.file.to_string(),
            line: line_of_path(self.src, path),
            key: path.to_string(),
            message: message.into(),
        }
    }
}

impl GatewayConfig {
    /// Relative paths are taken from the config file's folder `base`.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        resolve(&mut self.fleet);
        resolve(&mut self.api.token_file);
        for p in [
            &mut self.api.tls_cert,
            &mut self.api.tls_key,
            &mut self.profiles_dir,
            &mut self.broker.ca_file,
            &mut self.broker.client_cert,
            &mut self.broker.client_key,
            &mut self.broker.password_file,
            &mut self.trust.dir,
            &mut self.broker.tls_cert,
            &mut self.broker.tls_key,
            &mut self.store.password_file,
            &mut self.store.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            resolve(p);
        }
        if let Some(b) = &mut self.backend {
            resolve(&mut b.token_file);
            if let Some(p) = &mut b.ca_file {
                resolve(p);
            }
        }
    }
}

/// `[broker]`: an external broker's URL, credentials and TLS files, or the embedded
/// broker's settings, never a mix of both.
fn check_broker(broker: &BrokerSection, at: &Locator) -> Result<(), ProfileError> {
    let br = KeyPath::root().key("broker");
    if let Some(url) = &broker.url {
        let url = BrokerUrl::parse(url).map_err(|e| at.error(&br.key("url"), e.to_string()))?;
        broker
            .auth()
            .check(&url)
            .map_err(|e| at.error(&br.key(e.config_key()), e.to_string()))?;
        if broker.embedded == Some(true) {
            return Err(at.error(
                &br.key("embedded"),
                "embedded = true and url are exclusive: run the broker here or use the one at url",
            ));
        }
        if broker.listen.is_some() {
            return Err(at.error(
                &br.key("listen"),
                "listen is for the embedded broker; this config names an external one (url)",
            ));
        }
        if let Some(given) = given_tls_key(broker) {
            return Err(at.error(
                &br.key(given),
                "tls_cert / tls_key are for the embedded broker; this config names an external one (url)",
            ));
        }
    } else if broker.embedded == Some(false) {
        return Err(at.error(
            &br.key("url"),
            "embedded = false needs the external broker's url",
        ));
    } else if !broker.auth().tls.is_empty() {
        // The gateway reaches its embedded broker over mqtt:// on this machine.
        return Err(at.error(
            &br.key("ca_file"),
            "ca_file / client_cert / client_key are for an external mqtts:// broker (url)",
        ));
    } else if broker.password_file.is_some() && broker.username.is_none() {
        return Err(at.error(
            &br.key("password_file"),
            OptionsError::PasswordWithoutUser.to_string(),
        ));
    }
    if broker.tls_cert.is_some() != broker.tls_key.is_some() {
        if let Some(given) = given_tls_key(broker) {
            return Err(at.error(&br.key(given), "tls_cert and tls_key go together"));
        }
    }
    if let Some(g) = &broker.share_group {
        if !tend_wire::topic::valid_agent_id(g) {
            return Err(at.error(&br.key("share_group"), ID_RULE));
        }
    }
    #[cfg(not(feature = "embedded-broker"))]
    if broker.url.is_none() {
        return Err(at.error(
            &br.key("url"),
            "this build has no embedded broker (feature embedded-broker); name an external one",
        ));
    }
    Ok(())
}

/// The first of `tls_cert`, `tls_key` the broker section gives.
fn given_tls_key(broker: &BrokerSection) -> Option<&'static str> {
    if broker.tls_cert.is_some() {
        Some("tls_cert")
    } else if broker.tls_key.is_some() {
        Some("tls_key")
    } else {
        None
    }
}

/// `[api]`: HTTPS needs both the certificate and the key; the limits must allow work.
fn check_api(api: &ApiSection, at: &Locator) -> Result<(), ProfileError> {
    let key = |k: &str| KeyPath::root().key("api").key(k);
    if api.max_connections == Some(0) {
        return Err(at.error(&key("max_connections"), "must be at least 1"));
    }
    for (name, d) in [
        ("header_read_timeout", api.header_read_timeout),
        ("idle_timeout", api.idle_timeout),
        ("tls_handshake_timeout", api.tls_handshake_timeout),
    ] {
        if d.0.is_zero() {
            return Err(at.error(&key(name), "must be more than 0s"));
        }
    }
    if api.audit_max_size.0 < AUDIT_MIN_SIZE {
        return Err(at.error(&key("audit_max_size"), "must be at least 4KiB"));
    }
    if api.tls_cert.is_some() != api.tls_key.is_some() {
        let given = if api.tls_cert.is_some() {
            "tls_cert"
        } else {
            "tls_key"
        };
        return Err(at.error(
            &KeyPath::root().key("api").key(given),
            "tls_cert and tls_key go together",
        ));
    }
    Ok(())
}

/// `[store]`: a PostgreSQL store needs a URL that parses and holds no password; redb
/// takes no URL.
fn check_store(store: &StoreSection, at: &Locator) -> Result<(), ProfileError> {
    let st = KeyPath::root().key("store");
    match (store.kind, &store.url) {
        (StoreKind::Redb, None) => {
            for (key, set) in [
                ("password_file", store.password_file.is_some()),
                ("ca_file", store.ca_file.is_some()),
            ] {
                if set {
                    return Err(at.error(&st.key(key), "is for kind = \"postgres\""));
                }
            }
            Ok(())
        }
        (StoreKind::Redb, Some(_)) => Err(at.error(
            &st.key("url"),
            "is for kind = \"postgres\" (redb keeps its file in data_dir)",
        )),
        (StoreKind::Postgres, None) => Err(at.error(
            &st.key("url"),
            "kind = \"postgres\" needs url = \"postgres://user@host:port/database\"",
        )),
        (StoreKind::Postgres, Some(url)) => {
            let parsed = crate::store::pg_config(url).map_err(|e| at.error(&st.key("url"), e))?;
            if parsed.get_password().is_some() {
                return Err(at.error(
                    &st.key("url"),
                    "holds a password: put it in password_file (a file only the gateway can read)",
                ));
            }
            Ok(())
        }
    }
}

/// `[backend]`: the ticket system is reached over HTTP(S).
fn check_backend(backend: &BackendSection, at: &Locator) -> Result<(), ProfileError> {
    if !(backend.url.starts_with("http://") || backend.url.starts_with("https://")) {
        return Err(at.error(
            &KeyPath::root().key("backend").key("url"),
            format!("{:?} is not an http:// or https:// URL", backend.url),
        ));
    }
    Ok(())
}

/// Every file the config names must be there, so a typo shows at load, not at first use.
fn check_files_exist(config: &GatewayConfig, at: &Locator) -> Result<(), ProfileError> {
    let root = KeyPath::root();
    let (br, api, bk) = (root.key("broker"), root.key("api"), root.key("backend"));
    let mut files: Vec<(KeyPath, &PathBuf)> = vec![
        (api.key("token_file"), &config.api.token_file),
        (root.key("fleet"), &config.fleet),
    ];
    let broker = &config.broker;
    let optional = [
        (br.key("ca_file"), broker.ca_file.as_ref()),
        (br.key("client_cert"), broker.client_cert.as_ref()),
        (br.key("client_key"), broker.client_key.as_ref()),
        (br.key("tls_cert"), broker.tls_cert.as_ref()),
        (br.key("tls_key"), broker.tls_key.as_ref()),
        (api.key("tls_cert"), config.api.tls_cert.as_ref()),
        (api.key("tls_key"), config.api.tls_key.as_ref()),
        (
            bk.key("token_file"),
            config.backend.as_ref().map(|b| &b.token_file),
        ),
        (
            bk.key("ca_file"),
            config.backend.as_ref().and_then(|b| b.ca_file.as_ref()),
        ),
        (
            root.key("store").key("password_file"),
            config.store.password_file.as_ref(),
        ),
        (
            root.key("store").key("ca_file"),
            config.store.ca_file.as_ref(),
        ),
    ];
    files.extend(optional.into_iter().filter_map(|(k, p)| Some((k, p?))));
    for (key, p) in files {
        if !p.is_file() {
            return Err(at.error(&key, format!("{} is not a readable file", p.display())));
        }
    }
    Ok(())
}

/// The tokens and the broker password are read once here, and the private keys' modes
/// checked, so an empty, unreadable or exposed secret stops the load instead of the
/// first call that needs it.
fn check_secrets(config: &GatewayConfig, at: &Locator) -> Result<(), ProfileError> {
    let root = KeyPath::root();
    for (key, p) in [
        (
            root.key("api").key("token_file"),
            Some(&config.api.token_file),
        ),
        (
            root.key("backend").key("token_file"),
            config.backend.as_ref().map(|b| &b.token_file),
        ),
    ] {
        if let Some(p) = p {
            read_secret(p).map_err(|e| at.error(&key, e.to_string()))?;
        }
    }
    if let Some(p) = &config.broker.password_file {
        tend_mqtt::read_secret("password file", p)
            .map_err(|e| at.error(&root.key("broker").key("password_file"), e.to_string()))?;
    }
    if let Some(p) = &config.store.password_file {
        read_secret(p)
            .map_err(|e| at.error(&root.key("store").key("password_file"), e.to_string()))?;
    }
    // Private keys are parsed only when used, but one open to others is refused now.
    for (key, p) in [
        (root.key("api").key("tls_key"), config.api.tls_key.as_ref()),
        (
            root.key("broker").key("client_key"),
            config.broker.client_key.as_ref(),
        ),
        (
            root.key("broker").key("tls_key"),
            config.broker.tls_key.as_ref(),
        ),
    ] {
        if let Some(p) = p {
            tend_mqtt::check_private("private key", p)
                .map_err(|e| at.error(&key, e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_testkit::config::write_secret;

    fn dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write_secret(d.path().join("api.token"), "hotline-secret\n").unwrap();
        write_secret(d.path().join("backend.token"), "backend-secret\n").unwrap();
        std::fs::write(
            d.path().join("fleet.toml"),
            r#"
[[customer]]
id = "c-017"
name = "Jiangbei District Hospital"
contact_name = "Wang Lei"
contact_phone = "+86 23 6000 1234"

[[site]]
id = "s-017-main"
customer = "c-017"
name = "Main building"
address = "12 Jianxin Rd, Chongqing"
service_area = "same_city"

[[device]]
id = "icu7-vent"
site = "s-017-main"
serial = "AV5C-21-004417"
location = "ICU bed 7"
accepted = "2025-03-01"
"#,
        )
        .unwrap();
        d
    }

    const GOOD: &str = r#"gateway_id = "gw-cq-1"
data_dir = "data"
fleet = "fleet.toml"
timezone = "Asia/Shanghai"

[broker]
embedded = true
listen = "127.0.0.1:1883"

[backend]
url = "https://service.example.com"
token_file = "backend.token"

[api]
listen = "127.0.0.1:8080"
token_file = "api.token"
"#;

    #[test]
    fn good_config_loads_with_fleet() {
        let d = dir();
        let l = parse("gw.toml", GOOD, d.path()).unwrap();
        assert_eq!(l.config.gateway_id, "gw-cq-1");
        assert_eq!(l.fleet.len(), 1);
        assert_eq!(l.config.data_dir, d.path().join("data"));
        assert_eq!(
            l.config.broker.plan(),
            BrokerPlan::Embedded {
                listen: "127.0.0.1:1883".parse().unwrap()
            }
        );
    }

    #[test]
    fn service_section_defaults_to_opening_maintenance_tickets() {
        let d = dir();
        let l = parse("gw.toml", GOOD, d.path()).unwrap();
        assert!(l.config.service.maintenance_tickets);
        let off = format!("{GOOD}\n[service]\nmaintenance_tickets = false\n");
        let l = parse("gw.toml", &off, d.path()).unwrap();
        assert!(!l.config.service.maintenance_tickets);
        let bad = format!("{GOOD}\n[service]\nmaintenance = false\n");
        let e = parse("gw.toml", &bad, d.path()).unwrap_err();
        assert!(e.to_string().contains("maintenance"), "{e}");
        assert!(e.line > 0, "{e}");
    }

    #[test]
    fn errors_name_line_and_key() {
        let d = dir();
        let cases = [
            (
                "timezone = \"Asia/Shanghai\"",
                "timezone = \"Mars/Olympus\"",
                4,
                "timezone",
            ),
            (
                "url = \"https://service.example.com\"",
                "url = \"ftp://x\"",
                11,
                "backend.url",
            ),
            (
                "listen = \"127.0.0.1:8080\"",
                "listen = \"nowhere\"",
                15,
                "api.listen",
            ),
            (
                "token_file = \"api.token\"",
                "token_file = \"missing\"",
                16,
                "api.token_file",
            ),
            (
                "embedded = true",
                "embedded = true\nurl = \"mqtt://x:1\"",
                7,
                "broker.embedded",
            ),
            (
                "gateway_id = \"gw-cq-1\"",
                "gateway_id = \"gw/1\"",
                1,
                "gateway_id",
            ),
            ("[api]", "[api]\ncolour = \"red\"", 15, "api.colour"),
        ];
        for (from, to, line, key) in cases {
            let src = GOOD.replace(from, to);
            let e = parse("gw.toml", &src, d.path()).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{to}: {e}");
            assert!(
                e.to_string().starts_with(&format!("gw.toml:{line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn each_section_check_names_its_own_key() {
        let d = dir();
        let cases = [
            (
                "token_file = \"api.token\"",
                "token_file = \"api.token\"\ntls_cert = \"api.token\"",
                17,
                "api.tls_cert",
                "go together",
            ),
            (
                "token_file = \"api.token\"",
                "token_file = \"api.token\"\ntls_key = \"api.token\"",
                17,
                "api.tls_key",
                "go together",
            ),
            (
                "token_file = \"backend.token\"",
                "token_file = \"backend.token\"\nca_file = \"missing.pem\"",
                13,
                "backend.ca_file",
                "is not a readable file",
            ),
            (
                "listen = \"127.0.0.1:1883\"",
                "listen = \"127.0.0.1:1883\"\nshare_group = \"a/b\"",
                9,
                "broker.share_group",
                "letters, digits",
            ),
            (
                "embedded = true",
                "embedded = false",
                6,
                "broker.url",
                "needs the external broker's url",
            ),
        ];
        for (from, to, line, key, says) in cases {
            let src = GOOD.replace(from, to);
            let e = parse("gw.toml", &src, d.path()).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{to}: {e}");
            assert!(e.message.contains(says), "{e}");
        }
        // The backend token is read at load, as the hotline's is.
        write_secret(d.path().join("backend.token"), "\n").unwrap();
        let e = parse("gw.toml", GOOD, d.path()).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (12, "backend.token_file"), "{e}");
        assert!(e.message.contains("is empty"), "{e}");
    }

    #[test]
    fn hotline_limits_have_defaults_and_are_checked() {
        let d = dir();
        let api = parse("gw.toml", GOOD, d.path()).unwrap().config.api;
        assert_eq!(api.max_connections, None);
        assert_eq!(api.header_read_timeout, Dur(Duration::from_secs(10)));
        assert_eq!(api.idle_timeout, Dur(Duration::from_secs(60)));
        assert_eq!(api.tls_handshake_timeout, Dur(Duration::from_secs(10)));
        assert_eq!(api.audit_max_size, ByteSize(64 << 20));
        let set = |extra: &str| {
            GOOD.replace(
                "token_file = \"api.token\"",
                &format!("token_file = \"api.token\"\n{extra}"),
            )
        };
        let l = parse(
            "gw.toml",
            &set("max_connections = 500\nidle_timeout = \"5s\"\naudit_max_size = \"1MiB\""),
            d.path(),
        )
        .unwrap();
        assert_eq!(l.config.api.max_connections, Some(500));
        assert_eq!(l.config.api.idle_timeout, Dur(Duration::from_secs(5)));
        assert_eq!(l.config.api.audit_max_size, ByteSize(1 << 20));
        for (extra, key, says) in [
            ("max_connections = 0", "api.max_connections", "at least 1"),
            (
                "header_read_timeout = \"0s\"",
                "api.header_read_timeout",
                "more than 0s",
            ),
            ("idle_timeout = \"0ms\"", "api.idle_timeout", "more than 0s"),
            (
                "tls_handshake_timeout = \"0s\"",
                "api.tls_handshake_timeout",
                "more than 0s",
            ),
            (
                "audit_max_size = \"1KiB\"",
                "api.audit_max_size",
                "at least 4KiB",
            ),
            ("audit_max_size = \"lots\"", "api.audit_max_size", "size"),
        ] {
            let e = parse("gw.toml", &set(extra), d.path()).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (17, key), "{extra}: {e}");
            assert!(e.message.contains(says), "{e}");
        }
    }

    #[test]
    fn a_store_section_is_checked_with_line_and_key_and_never_echoes_a_password() {
        let d = dir();
        let l = parse("gw.toml", GOOD, d.path()).unwrap();
        assert_eq!(l.config.store.kind, StoreKind::Redb);
        crate::trust::write_private(&d.path().join("pg.pw"), b"s3cret\n").unwrap();
        let ok = format!(
            "{GOOD}\n[store]\nkind = \"postgres\"\nurl = \"postgres://tend@db:5432/tend\"\npassword_file = \"pg.pw\"\n"
        );
        let l = parse("gw.toml", &ok, d.path()).unwrap();
        assert_eq!(l.config.store.kind, StoreKind::Postgres);
        assert_eq!(l.config.store.password_file, Some(d.path().join("pg.pw")));
        // Line 18 is [store]; the key's own line follows.
        for (body, line, key, says) in [
            ("kind = \"sqlite\"", 19, "store.kind", "unknown variant"),
            ("kind = \"postgres\"", 18, "store.url", "needs url"),
            (
                "url = \"postgres://u@h/db\"",
                19,
                "store.url",
                "kind = \"postgres\"",
            ),
            (
                "kind = \"postgres\"\nurl = \"mysql://u@h/db\"",
                20,
                "store.url",
                "not a postgres:// URL",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u:hunter2@h/db\"",
                20,
                "store.url",
                "password_file",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u@h/db\"\npassword_file = \"missing\"",
                21,
                "store.password_file",
                "not a readable file",
            ),
            (
                "password_file = \"pg.pw\"",
                19,
                "store.password_file",
                "kind = \"postgres\"",
            ),
        ] {
            let src = format!("{GOOD}\n[store]\n{body}\n");
            let e = parse("gw.toml", &src, d.path()).unwrap_err();
            assert_eq!((e.line, e.key.as_str()), (line, key), "{body}: {e}");
            assert!(e.message.contains(says), "{body}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn backend_kind_defaults_to_the_service_api_and_an_unknown_one_is_located() {
        let d = dir();
        let l = parse("gw.toml", GOOD, d.path()).unwrap();
        assert_eq!(l.config.backend.unwrap().kind, BackendKind::ServiceApi);
        let src = GOOD.replace("[backend]\n", "[backend]\nkind = \"service-api\"\n");
        let l = parse("gw.toml", &src, d.path()).unwrap();
        assert_eq!(l.config.backend.unwrap().kind, BackendKind::ServiceApi);
        let src = GOOD.replace("[backend]\n", "[backend]\nkind = \"jira\"\n");
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (11, "backend.kind"), "{e}");
        assert!(e.to_string().starts_with("gw.toml:11: "), "{e}");
        assert!(e.message.contains("service-api"), "{e}");
    }

    #[test]
    fn empty_token_file_refused_without_showing_it() {
        let d = dir();
        write_secret(d.path().join("api.token"), "  \n").unwrap();
        let e = parse("gw.toml", GOOD, d.path()).unwrap_err();
        assert_eq!(e.key, "api.token_file");
        assert!(e.message.contains("is empty"), "{e}");
    }

    #[test]
    fn secret_files_open_to_others_are_refused_at_load() {
        use std::os::unix::fs::PermissionsExt;
        let chmod = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let d = dir();
        let with_tls = GOOD.replace(
            "token_file = \"api.token\"",
            "token_file = \"api.token\"\ntls_cert = \"server.pem\"\ntls_key = \"server.key\"",
        );
        std::fs::write(d.path().join("server.pem"), "cert\n").unwrap();
        write_secret(d.path().join("server.key"), "key\n").unwrap();
        parse("gw.toml", &with_tls, d.path()).unwrap();
        for (file, key) in [
            ("api.token", "api.token_file"),
            ("backend.token", "backend.token_file"),
            ("server.key", "api.tls_key"),
        ] {
            let p = d.path().join(file);
            for mode in [0o644, 0o640] {
                chmod(&p, mode);
                let e = parse("gw.toml", &with_tls, d.path()).unwrap_err();
                assert_eq!(e.key, key, "{e}");
                assert!(e.message.contains(&format!("mode 0{mode:o}")), "{e}");
                let fix = format!("chmod 600 {}", p.display());
                assert!(e.message.contains(&fix), "{e}");
                assert!(!e.message.contains("secret"), "{e}");
            }
            chmod(&p, 0o600);
        }
        parse("gw.toml", &with_tls, d.path()).unwrap();
    }

    #[test]
    fn broker_url_and_password_file_are_checked_at_load() {
        let d = dir();
        let external = |extra: &str| {
            GOOD.replace(
                "embedded = true\nlisten = \"127.0.0.1:1883\"",
                &format!("url = \"mqtts://broker.example\"\n{extra}"),
            )
        };
        // An unreadable (here: missing) password file is refused, naming it.
        let src = external("username = \"gw\"\npassword_file = \"broker.pw\"");
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert_eq!((e.line, e.key.as_str()), (9, "broker.password_file"), "{e}");
        assert!(e.message.contains("cannot read the password file"), "{e}");
        assert!(e.message.contains("broker.pw"), "{e}");
        write_secret(d.path().join("broker.pw"), "\n").unwrap();
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert!(e.message.contains("empty"), "{e}");
        write_secret(d.path().join("broker.pw"), "s3cret\n").unwrap();
        let l = parse("gw.toml", &src, d.path()).unwrap();
        assert_eq!(
            l.config
                .broker
                .auth()
                .credentials()
                .unwrap()
                .unwrap()
                .password,
            "s3cret"
        );

        for (extra, key) in [
            ("password_file = \"broker.pw\"", "broker.password_file"),
            ("client_cert = \"broker.pw\"", "broker.client_key"),
        ] {
            let e = parse("gw.toml", &external(extra), d.path()).unwrap_err();
            assert_eq!(e.key, key, "{e}");
        }
        let src = GOOD.replace(
            "embedded = true\nlisten = \"127.0.0.1:1883\"",
            "url = \"mqtt://broker.example/x\"",
        );
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert_eq!(e.key, "broker.url", "{e}");
        let e = parse(
            "gw.toml",
            &GOOD.replace("embedded = true", "ca_file = \"broker.pw\""),
            d.path(),
        )
        .unwrap_err();
        assert_eq!(e.key, "broker.ca_file", "{e}");
    }

    #[test]
    #[cfg(feature = "embedded-broker")]
    fn embedded_broker_tls_files_are_checked_at_load() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir();
        let embedded = |extra: &str| {
            GOOD.replace(
                "embedded = true\nlisten = \"127.0.0.1:1883\"",
                &format!("embedded = true\nlisten = \"127.0.0.1:1883\"\n{extra}"),
            )
        };
        // The 1-based line of `needle` in `src`.
        let line_of =
            |src: &str, needle: &str| src.lines().position(|l| l.starts_with(needle)).unwrap() + 1;
        std::fs::write(d.path().join("broker.pem"), "cert\n").unwrap();
        write_secret(d.path().join("broker.key"), "key\n").unwrap();

        let both = embedded("tls_cert = \"broker.pem\"\ntls_key = \"broker.key\"");
        let l = parse("gw.toml", &both, d.path()).unwrap();
        let tls = l.config.broker.server_tls().unwrap();
        assert_eq!(tls.cert_file, d.path().join("broker.pem"));
        assert_eq!(tls.key_file, d.path().join("broker.key"));

        // Both or neither, located at the one given.
        for (extra, key) in [
            ("tls_cert = \"broker.pem\"", "tls_cert"),
            ("tls_key = \"broker.key\"", "tls_key"),
        ] {
            let src = embedded(extra);
            let e = parse("gw.toml", &src, d.path()).unwrap_err();
            assert_eq!(e.file, "gw.toml");
            assert_eq!(e.key, format!("broker.{key}"), "{e}");
            assert_eq!(e.line, line_of(&src, key), "{e}");
            assert!(e.message.contains("go together"), "{e}");
        }

        // Only for the embedded broker.
        let src = GOOD.replace(
            "embedded = true\nlisten = \"127.0.0.1:1883\"",
            "url = \"mqtt://broker.example\"\ntls_cert = \"broker.pem\"\ntls_key = \"broker.key\"",
        );
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert_eq!(e.key, "broker.tls_cert", "{e}");
        assert!(e.message.contains("embedded broker"), "{e}");

        // The files must be there, and the key private.
        let src = embedded("tls_cert = \"missing.pem\"\ntls_key = \"broker.key\"");
        let e = parse("gw.toml", &src, d.path()).unwrap_err();
        assert_eq!(e.key, "broker.tls_cert", "{e}");
        assert!(e.message.contains("missing.pem"), "{e}");
        let key = d.path().join("broker.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = parse("gw.toml", &both, d.path()).unwrap_err();
        assert_eq!(e.key, "broker.tls_key", "{e}");
        assert_eq!(e.line, line_of(&both, "tls_key"), "{e}");
        assert!(
            e.message.contains(&format!("chmod 600 {}", key.display())),
            "{e}"
        );
    }

    #[test]
    fn external_broker_with_share_group() {
        let d = dir();
        let src = GOOD.replace(
            "embedded = true\nlisten = \"127.0.0.1:1883\"",
            "url = \"mqtt://127.0.0.1:1884\"\nshare_group = \"tend-gateways\"",
        );
        let l = parse("gw.toml", &src, d.path()).unwrap();
        assert_eq!(
            l.config.broker.plan(),
            BrokerPlan::External {
                url: "mqtt://127.0.0.1:1884".into()
            }
        );
    }
}

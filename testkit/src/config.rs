//! Config and fleet files for the processes a suite starts: the gateway's config, the
//! fleet file, and the tokens both sides use, written private to their owner
//! ([`write_secret`]) as the gateway and the agent refuse any other.

use std::io::Write;
use std::path::Path;

/// The hotline API token every suite's gateway accepts.
pub const API_TOKEN: &str = "hotline-e2e-token-7f3a";
/// The service-backend token the gateways send and the stand-in accepts.
pub const BACKEND_TOKEN: &str = "backend-e2e-token-91c2";

/// Writes a secret file (token, password, private key) readable by its owner only
/// (mode 0600), whatever the umask, as the gateway and the agent refuse secret files
/// open to group or others. An existing file is truncated and made 0600 too.
pub fn write_secret(path: impl AsRef<Path>, text: impl AsRef<[u8]>) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = path.as_ref();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file created here.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(text.as_ref())
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

/// Which broker a suite's gateway uses.
pub enum BrokerChoice {
    /// The gateway's own broker on this port.
    Embedded(u16),
    /// An external broker, with a shared-subscription group.
    External { url: String, group: Option<String> },
}

/// What differs between the gateways the suites start; everything else is fixed by
/// [`gateway_toml`].
pub struct GatewaySpec<'a> {
    /// `gateway_id`.
    pub id: &'a str,
    pub broker: BrokerChoice,
    /// The service backend's URL (the stand-in's), or none for a gateway without one.
    pub backend: Option<&'a str>,
    /// The fleet file's text (see [`fleet_toml`]).
    pub fleet: &'a str,
}

/// The gateway config of `spec`: data in `data`, the fleet in `fleet.toml`, tokens read
/// from `api.token` and `backend.token` beside it (relative paths, resolved against the
/// config's directory), zone Asia/Shanghai, the API on a free port, a 2 s backend timeout
/// and an hourly status poll.
pub fn gateway_toml(spec: &GatewaySpec<'_>) -> String {
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
    format!(
        "gateway_id = \"{}\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\ntimezone = \"Asia/Shanghai\"\n\n{broker}\n{backend}\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\ndiag_timeout = \"8s\"\n",
        spec.id
    )
}

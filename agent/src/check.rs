//! `tend-agent run --config FILE --check`: what a field engineer runs before enabling the
//! service. It loads the config the way `run` does (so every key, profile and credential
//! file is checked by the same code, errors naming file, line and key), then tries to
//! reach what the agent will talk to: each device's link (a serial port opened with the
//! settings `run` uses, a Modbus TCP connection, an MQTT device's broker) and the uplink
//! broker (a TCP connection and, for `mqtts://`, the TLS handshake with the configured CA
//! and client certificate). Nothing is written to a device and no MQTT session is opened:
//! a running agent on the same machine is not disturbed, except that a serial port it
//! holds is reported as busy.
//!
//! It prints one line per item, `ok` or `FAIL` with the reason, and exits 0 when every
//! item passed, 2 when any did not.

use crate::config::Loaded;
use crate::device::LinkTarget;
use crate::transport::modbus::Endpoint;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tend_mqtt::{BrokerUrl, ClientTls};
use tend_profiles::schema::Parity;
use tokio::net::TcpStream;

/// Exit code when the config is invalid or anything it names cannot be reached: the
/// one every invalid config gets (the unit's `RestartPreventExitStatus` names it).
pub const EXIT_PROBLEMS: u8 = crate::profile_cmd::EXIT_INVALID;

/// How long one connection attempt (TCP connect plus TLS handshake) may take.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// One thing the agent will connect to, and who depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// How the item is named in the report: `uplink mqtts://gw:8883`,
    /// `device icu7-vent (modbus-tcp 10.0.0.5:502 unit 1)`.
    pub name: String,
    pub reach: Reach,
}

/// How an item is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// A serial port, opened (exclusively, as `run` opens it) and closed again.
    Serial {
        port: String,
        baud: u32,
        parity: Parity,
    },
    /// A TCP connection to `host:port`.
    Tcp { address: String },
    /// An MQTT broker: TCP, then the TLS handshake for `mqtts://`.
    Broker { url: BrokerUrl, tls: ClientTls },
    /// Cannot be tried: why.
    Unusable(String),
}

/// The outcome of one item: what was found when it worked, why not when it did not.
pub type Outcome = Result<String, String>;

/// The items a loaded config names, in the config's order: the data directory is checked
/// apart ([`data_dir_problem`]); then the uplink, then each link once. Devices sharing a
/// link (units on one RS-485 bus or Modbus TCP gateway) are one item naming them all,
/// since the link is opened once.
pub fn plan(loaded: &Loaded) -> Vec<Item> {
    let config = &loaded.config;
    let mut items = Vec::new();
    match BrokerUrl::parse(&config.uplink.broker) {
        Ok(url) => items.push(Item {
            name: format!("uplink {}", config.uplink.broker),
            reach: Reach::Broker {
                url,
                tls: config.uplink.auth().tls,
            },
        }),
        // The loader has refused such a URL already; kept for a config built in code.
        Err(e) => items.push(Item {
            name: format!("uplink {}", config.uplink.broker),
            reach: Reach::Unusable(e.to_string()),
        }),
    }
    // (link key, item index, device ids)
    let mut links: Vec<(String, usize, Vec<String>)> = Vec::new();
    for d in &config.devices {
        let Some(target) = loaded
            .profiles
            .family(&d.profile)
            .ok()
            .and_then(|f| f.first().map(|p| d.transport.resolve(&p.doc.transport)))
        else {
            continue;
        };
        let key = target.link_key();
        if let Some((_, at, ids)) = links.iter_mut().find(|(k, _, _)| *k == key) {
            ids.push(d.id.clone());
            items[*at].name = device_item_name(ids, &target);
            continue;
        }
        let ids = vec![d.id.clone()];
        items.push(Item {
            name: device_item_name(&ids, &target),
            reach: reach_of(&target),
        });
        links.push((key, items.len() - 1, ids));
    }
    items
}

fn device_item_name(ids: &[String], target: &LinkTarget) -> String {
    let link = match target {
        // Units of one bus share the item: the unit is not part of what is reached.
        LinkTarget::Modbus { endpoint, unit } if ids.len() == 1 => {
            return format!(
                "device {} ({} {endpoint} unit {unit})",
                ids[0],
                modbus_kind(endpoint)
            )
        }
        LinkTarget::Modbus { endpoint, .. } => format!("{} {endpoint}", modbus_kind(endpoint)),
        other => other.describe(),
    };
    let noun = if ids.len() == 1 { "device" } else { "devices" };
    format!("{noun} {} ({link})", ids.join(", "))
}

fn modbus_kind(endpoint: &Endpoint) -> &'static str {
    match endpoint {
        Endpoint::Rtu { .. } => "modbus-rtu",
        Endpoint::Tcp(_) => "modbus-tcp",
    }
}

fn reach_of(target: &LinkTarget) -> Reach {
    match target {
        LinkTarget::Serial { port, baud } => Reach::Serial {
            port: port.clone(),
            baud: *baud,
            parity: Parity::None,
        },
        LinkTarget::Modbus {
            endpoint: Endpoint::Rtu { path, baud, parity },
            ..
        } => Reach::Serial {
            port: path.clone(),
            baud: *baud,
            parity: *parity,
        },
        LinkTarget::Modbus {
            endpoint: Endpoint::Tcp(address),
            ..
        } => Reach::Tcp {
            address: address.clone(),
        },
        LinkTarget::Mqtt(m) => match BrokerUrl::parse(&m.broker) {
            Ok(url) => Reach::Broker {
                url,
                tls: m.broker_auth().tls,
            },
            Err(e) => Reach::Unusable(e.to_string()),
        },
    }
}

/// Why the data directory cannot hold the outbox, if it cannot: it must be a directory,
/// or not exist yet below a directory (`run` creates it; under systemd `StateDirectory`
/// does). Nothing is created or opened here: a running agent holds the outbox's lock.
pub fn data_dir_problem(dir: &Path) -> Option<String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => None,
        Ok(_) => Some(format!("{} is not a directory", dir.display())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            let parent = nearest_existing(dir);
            match parent {
                Some(p) if p.is_dir() => None,
                Some(p) => Some(format!(
                    "{} cannot be created: {} is not a directory",
                    dir.display(),
                    p.display()
                )),
                None => Some(format!("{} cannot be created", dir.display())),
            }
        }
        Err(e) => Some(format!("{}: {e}", dir.display())),
    }
}

fn nearest_existing(dir: &Path) -> Option<PathBuf> {
    dir.ancestors()
        .skip(1)
        .find(|a| std::fs::symlink_metadata(a).is_ok())
        .map(Path::to_path_buf)
}

/// Tries to reach one item within [`REACH_TIMEOUT`].
pub async fn reach(item: &Reach) -> Outcome {
    match item {
        Reach::Serial { port, baud, parity } => {
            let parity = match parity {
                Parity::None => tokio_serial::Parity::None,
                Parity::Even => tokio_serial::Parity::Even,
                Parity::Odd => tokio_serial::Parity::Odd,
            };
            match crate::transport::serial::open_line(port, *baud, parity) {
                Ok(stream) => {
                    drop(stream);
                    Ok("port opens".into())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Reach::Tcp { address } => match tokio::time::timeout(REACH_TIMEOUT, connect(address)).await
        {
            Ok(Ok(_)) => Ok("connects".into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(no_answer(address)),
        },
        Reach::Unusable(why) => Err(why.clone()),
        Reach::Broker { url, tls } => {
            let authority = url.authority();
            match tokio::time::timeout(REACH_TIMEOUT, broker(url, tls)).await {
                Ok(r) => r,
                Err(_) => Err(no_answer(&authority)),
            }
        }
    }
}

fn no_answer(what: &str) -> String {
    format!(
        "{what}: no answer within {}s (address, firewall?)",
        REACH_TIMEOUT.as_secs()
    )
}

async fn connect(address: &str) -> Result<TcpStream, String> {
    TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))
}

async fn broker(url: &BrokerUrl, tls: &ClientTls) -> Outcome {
    let authority = url.authority();
    let tcp = connect(&authority).await?;
    if !url.is_tls() {
        return Ok("connects".into());
    }
    let config = tend_mqtt::client_config(tls).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(url.host().to_string())
        .map_err(|e| format!("{}: not a TLS server name: {e}", url.host()))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {authority}: {e}"))?;
    Ok("connects, TLS handshake passes".into())
}

/// Writes the report line of one item.
pub fn line(name: &str, outcome: &Outcome) -> String {
    match outcome {
        Ok(found) => format!("ok    {name}: {found}"),
        Err(why) => format!("FAIL  {name}: {why}"),
    }
}

/// The last line, and the exit code: 0 when nothing failed.
pub fn verdict(outcomes: &[Outcome]) -> (String, u8) {
    let failed = outcomes.iter().filter(|o| o.is_err()).count();
    if failed == 0 {
        (format!("all {} checks passed", outcomes.len()), 0)
    } else {
        (
            format!("{failed} of {} checks failed", outcomes.len()),
            EXIT_PROBLEMS,
        )
    }
}

/// `tend-agent run --config FILE --check`.
pub fn main(config: &Path) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let loaded = match crate::config::load(config) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(out, "FAIL  config {}", config.display());
            let _ = out.flush();
            eprintln!("tend-agent: invalid config: {e}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let mut outcomes = vec![Ok(format!(
        "valid, agent {}, {} device(s), {} profile(s)",
        loaded.config.agent_id,
        loaded.config.devices.len(),
        loaded.profiles.iter().count()
    ))];
    let mut names = vec![format!("config {}", config.display())];
    names.push(format!("data_dir {}", loaded.config.data_dir.display()));
    outcomes.push(match data_dir_problem(&loaded.config.data_dir) {
        None => Ok("usable".into()),
        Some(why) => Err(why),
    });
    let items = plan(&loaded);
    let reached = match reach_all(&items) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tend-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    names.extend(items.into_iter().map(|i| i.name));
    outcomes.extend(reached);
    for (name, outcome) in names.iter().zip(&outcomes) {
        let _ = writeln!(out, "{}", line(name, outcome));
    }
    let (last, code) = verdict(&outcomes);
    let _ = writeln!(out, "{last}");
    let _ = out.flush();
    ExitCode::from(code)
}

/// Reaches every item at once (one unreachable device costs its timeout once, not once
/// per device), answering in the items' order.
fn reach_all(items: &[Item]) -> std::io::Result<Vec<Outcome>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcomes = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, item) in items.iter().enumerate() {
            let reach_of = item.reach.clone();
            tasks.spawn(async move { (i, reach(&reach_of).await) });
        }
        let mut outcomes: Vec<Outcome> = vec![Err("not checked".into()); items.len()];
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, outcome)) => outcomes[i] = outcome,
                // A panicking check leaves its "not checked" in place.
                Err(e) => tracing::debug!("check task: {e}"),
            }
        }
        outcomes
    });
    // A name lookup that outlived its timeout still holds a blocking thread: leave it.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
agent_id = "agent-icu-a"
site_id = "s-017-main"
data_dir = "data"

[uplink]
broker = "mqtt://gw.example:1883"
credentials = "agent-icu-a.cred"

[[device]]
id = "icu7-vent"
profile = "aeris/av-500"
transport = "modbus-rtu"
port = "/dev/ttyUSB1"
unit = 1

[[device]]
id = "icu8-vent"
profile = "aeris/av-500"
transport = "modbus-rtu"
port = "/dev/ttyUSB1"
unit = 2

[[device]]
id = "lab-helium"
profile = "cryosense/hm-2"
transport = "modbus-tcp"
address = "10.0.0.9"

[[device]]
id = "ward3-pump"
profile = "lumen/lip-300"
transport = "serial"
port = "/dev/ttyS0"

[[device]]
id = "icu7-monitor"
profile = "vistara/vm-12"
transport = "mqtt"
broker = "mqtts://devices.example"
serial = "VM12-00A4471"
"#;

    #[test]
    fn one_item_per_link_in_config_order() {
        // The config's relative paths resolve against its folder, which holds the
        // credentials file the uplink requires.
        let dir = tempfile::tempdir().unwrap();
        tend_testkit::trust::credentials(dir.path(), "agent-icu-a");
        let loaded = crate::config::parse("agent.toml", CONFIG, dir.path()).unwrap();
        let items = plan(&loaded);
        let names: Vec<&str> = items.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "uplink mqtt://gw.example:1883",
                "devices icu7-vent, icu8-vent (modbus-rtu /dev/ttyUSB1 (19200 8E1))",
                "device lab-helium (modbus-tcp 10.0.0.9:502 unit 1)",
                "device ward3-pump (serial /dev/ttyS0 at 9600 baud)",
                "device icu7-monitor (mqtt mqtts://devices.example serial VM12-00A4471)",
            ]
        );
        assert_eq!(
            items[1].reach,
            Reach::Serial {
                port: "/dev/ttyUSB1".into(),
                baud: 19200,
                parity: Parity::Even
            }
        );
        assert_eq!(
            items[2].reach,
            Reach::Tcp {
                address: "10.0.0.9:502".into()
            }
        );
        match &items[4].reach {
            Reach::Broker { url, .. } => {
                assert!(url.is_tls());
                assert_eq!(url.port(), 8883);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn verdict_counts_failures() {
        let ok: Outcome = Ok("connects".into());
        let bad: Outcome = Err("refused".into());
        assert_eq!(verdict(&[ok.clone(), ok.clone()]).1, 0);
        let (text, code) = verdict(&[ok.clone(), bad.clone()]);
        assert_eq!(
            (text.as_str(), code),
            ("1 of 2 checks failed", EXIT_PROBLEMS)
        );
        assert_eq!(line("uplink x", &ok), "ok    uplink x: connects");
        assert_eq!(line("device y", &bad), "FAIL  device y: refused");
    }

    #[test]
    fn data_dir_may_be_missing_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(data_dir_problem(dir.path()), None);
        assert_eq!(data_dir_problem(&dir.path().join("new/outbox")), None);
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(data_dir_problem(&file)
            .unwrap()
            .contains("is not a directory"));
        assert!(data_dir_problem(&file.join("below"))
            .unwrap()
            .contains("cannot be created"));
    }
}

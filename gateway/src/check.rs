//! `tend-gateway run --config FILE --check`: what an operator runs before enabling the
//! service. It loads the config and the fleet file as `run` does (keys, fleet, token and
//! TLS files: errors name file, line and key), then tries what `run` will need from the
//! machine and the network: the data directory, the embedded broker's and the API's listen
//! addresses (free and local), an external broker (TCP, and the TLS handshake for
//! `mqtts://`) and the service backend (TCP). Nothing is started and the store is not
//! opened (a running gateway holds its lock; its ports then show as in use).
//!
//! One line per item, `ok` or `FAIL` with why, then exit 0 when all passed, 2 when not.

use crate::config::{BrokerPlan, Loaded};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tend_mqtt::{BrokerUrl, ClientTls};

/// Exit code when the config is invalid or anything it names is not usable: the one
/// every invalid config gets (the unit's `RestartPreventExitStatus` names it).
pub const EXIT_PROBLEMS: u8 = crate::command_line::EXIT_INVALID;

/// How long one connection attempt (TCP connect, TLS handshake) may take.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// One thing the gateway will need, as the report names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub name: String,
    pub need: Need,
}

/// What is tried for an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// The data directory: a directory, or absent below one (`run` creates it).
    DataDir(std::path::PathBuf),
    /// A listen address this machine has and nobody listens on yet.
    Listen(SocketAddr),
    /// An external MQTT broker: TCP, then the TLS handshake for `mqtts://`.
    Broker { url: BrokerUrl, tls: ClientTls },
    /// A TCP connection to `host:port`.
    Connect(String),
    /// Cannot be tried: why.
    Unusable(String),
}

/// The items of a loaded config, in the order `run` needs them.
pub fn plan(loaded: &Loaded) -> Vec<Item> {
    let config = &loaded.config;
    let mut items = vec![Item {
        name: format!("data_dir {}", config.data_dir.display()),
        need: Need::DataDir(config.data_dir.clone()),
    }];
    items.push(match config.broker.plan() {
        BrokerPlan::Embedded { listen } => Item {
            name: format!("embedded broker {listen}"),
            need: Need::Listen(listen),
        },
        BrokerPlan::External { url } => Item {
            name: format!("broker {url}"),
            need: match BrokerUrl::parse(&url) {
                Ok(parsed) => Need::Broker {
                    url: parsed,
                    tls: config.broker.auth().tls,
                },
                Err(e) => Need::Unusable(e.to_string()),
            },
        },
    });
    items.push(Item {
        name: format!("api {}", config.api.listen),
        need: Need::Listen(config.api.listen),
    });
    if let Some(backend) = &config.backend {
        items.push(Item {
            name: format!("backend {}", backend.url),
            need: match backend_authority(&backend.url) {
                Ok(a) => Need::Connect(a),
                Err(why) => Need::Unusable(why),
            },
        });
    }
    items
}

/// `host:port` of an `http(s)://` URL, the scheme's port when it names none.
fn backend_authority(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    let host = parsed.host_str().ok_or_else(|| format!("{url}: no host"))?;
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| format!("{url}: no port"))?;
    Ok(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// Tries one item: what was found, or why it will not do.
pub fn try_need(need: &Need) -> Result<String, String> {
    match need {
        Need::DataDir(dir) => data_dir(dir),
        Need::Listen(addr) => match TcpListener::bind(addr) {
            Ok(_) => Ok("free".into()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
                "{addr} is in use (is tend-gateway running already?)"
            )),
            Err(e) => Err(format!("cannot listen on {addr}: {e}")),
        },
        Need::Connect(authority) => connect(authority).map(|_| "connects".into()),
        Need::Broker { url, tls } => broker(url, tls),
        Need::Unusable(why) => Err(why.clone()),
    }
}

fn data_dir(dir: &Path) -> Result<String, String> {
    if dir.is_dir() {
        return Ok("usable".into());
    }
    if dir.exists() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    match dir.ancestors().skip(1).find(|a| a.exists()) {
        Some(a) if a.is_dir() => Ok("will be created".into()),
        Some(a) => Err(format!(
            "{} cannot be created: {} is not a directory",
            dir.display(),
            a.display()
        )),
        None => Err(format!("{} cannot be created", dir.display())),
    }
}

fn connect(authority: &str) -> Result<TcpStream, String> {
    let addrs = authority
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority}: {e}"))?;
    let mut last = format!("{authority}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, REACH_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect to {authority} ({addr}): {e}"),
        }
    }
    Err(last)
}

fn broker(url: &BrokerUrl, tls: &ClientTls) -> Result<String, String> {
    let authority = url.authority();
    let mut tcp = connect(&authority)?;
    if !url.is_tls() {
        return Ok("connects".into());
    }
    let config = tend_mqtt::client_config(tls).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(url.host().to_string())
        .map_err(|e| format!("{}: not a TLS server name: {e}", url.host()))?;
    let handshake_failed =
        |e: &dyn std::fmt::Display| format!("TLS handshake with {authority}: {e}");
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| handshake_failed(&e))?;
    tcp.set_read_timeout(Some(REACH_TIMEOUT))
        .and_then(|()| tcp.set_write_timeout(Some(REACH_TIMEOUT)))
        .map_err(|e| handshake_failed(&e))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .map_err(|e| handshake_failed(&e))?;
    }
    Ok("connects, TLS handshake passes".into())
}

/// `tend-gateway run --config FILE --check`.
pub fn main(config: &Path) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let loaded = match crate::config::load(config) {
        Ok(l) => l,
        Err(e) => {
            let _ = writeln!(out, "FAIL  config {}", config.display());
            let _ = out.flush();
            eprintln!("tend-gateway: invalid config: {e}");
            return ExitCode::from(EXIT_PROBLEMS);
        }
    };
    let _ = writeln!(
        out,
        "ok    config {}: valid, gateway {}, {} fleet device(s)",
        config.display(),
        loaded.config.gateway_id,
        loaded.fleet.len()
    );
    let items = plan(&loaded);
    let mut failed = 0;
    for item in &items {
        let line = match try_need(&item.need) {
            Ok(found) => format!("ok    {}: {found}", item.name),
            Err(why) => {
                failed += 1;
                format!("FAIL  {}: {why}", item.name)
            }
        };
        let _ = writeln!(out, "{line}");
    }
    let total = items.len() + 1;
    if failed == 0 {
        let _ = writeln!(out, "all {total} checks passed");
        ExitCode::SUCCESS
    } else {
        let _ = writeln!(out, "{failed} of {total} checks failed");
        ExitCode::from(EXIT_PROBLEMS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_authority_has_the_scheme_port() {
        assert_eq!(
            backend_authority("https://service.example.com").unwrap(),
            "service.example.com:443"
        );
        assert_eq!(
            backend_authority("http://10.0.0.5:8081/api").unwrap(),
            "10.0.0.5:8081"
        );
        assert_eq!(
            backend_authority("http://[::1]:9000").unwrap(),
            "[::1]:9000"
        );
        assert!(backend_authority("not a url").is_err());
    }

    #[test]
    fn a_port_in_use_is_named() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = try_need(&Need::Listen(addr)).unwrap_err();
        assert!(e.contains(&addr.to_string()) && e.contains("in use"), "{e}");
        drop(taken);
        assert_eq!(try_need(&Need::Listen(addr)).unwrap(), "free");
    }

    #[test]
    fn an_unreachable_backend_is_named() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = try_need(&Need::Connect(addr.to_string())).unwrap_err();
        assert!(e.contains(&addr.to_string()), "{e}");
    }
}

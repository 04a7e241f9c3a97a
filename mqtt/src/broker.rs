//! The embedded MQTT broker (rumqttd, one MQTT 3.1.1 server on a TCP port), so that a
//! gateway or a simulator runs on a machine with nothing else installed. rumqttd cannot
//! be stopped: the broker lives until the process exits.
//!
//! Open access ([`BrokerAccess::default`]) is rumqttd alone on the port. Restricted
//! access (a login, TLS or both) puts [`front`] on the port and rumqttd on a loopback
//! port behind it; rumqttd asks the same login again, so a local process reaching that
//! port directly still needs credentials.

mod access;
mod front;

pub use access::{BrokerAccess, Login, RefusalLog, ServerTls, LOG_EVERY};

use crate::tls::TlsError;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a starting broker has to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker's sizes; each user keeps its own figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerLimits {
    /// Largest packet a client may send.
    pub max_payload: usize,
    /// Unacknowledged QoS 1 messages per connection.
    pub max_inflight: usize,
    /// Messages queued towards one connection.
    pub max_outgoing_packets: u64,
    /// A segment of the router's log; it must hold the largest message.
    pub max_segment_size: usize,
}

/// Why the broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("MQTT broker on {listen}: {source}")]
    Io {
        listen: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("MQTT broker on {listen}: {why}")]
    Failed { listen: SocketAddr, why: String },
    #[error("MQTT broker on {listen} did not accept connections within 5 s")]
    NotAccepting { listen: SocketAddr },
    /// The TLS certificate or key cannot be used; the error names the file.
    #[error("MQTT broker on {listen}: {source}")]
    Tls {
        listen: SocketAddr,
        #[source]
        source: TlsError,
    },
}

/// A started broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartedBroker {
    /// Where clients connect (loopback when the broker listens on all addresses); TLS
    /// only when the access says so.
    pub addr: SocketAddr,
    /// Plain MQTT on loopback, for clients in this process (the gateway's own): rumqttd
    /// itself when access is restricted, else the same as `addr`. It asks the same login.
    pub local: SocketAddr,
}

fn config(listen: SocketAddr, limits: &BrokerLimits, login: Option<&Login>) -> rumqttd::Config {
    let mut connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: limits.max_payload,
        max_inflight_count: limits.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    if let Some(login) = login.cloned() {
        connections.set_auth_handler(move |client_id: String, user: String, password: String| {
            std::future::ready(login(&client_id, &user, &password))
        });
    }
    let server = rumqttd::ServerSettings {
        name: format!("v4-{}", listen.port()),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: front::MAX_CONNECTIONS,
        max_outgoing_packet_count: limits.max_outgoing_packets,
        max_segment_size: limits.max_segment_size,
        max_segment_count: 10,
        ..Default::default()
    };
    rumqttd::Config {
        id: 0,
        router,
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts a broker on `listen` with `access` and waits until it accepts connections.
/// Port 0 picks a free port first (rumqttd does not report the port it bound). The TLS
/// files are checked first, each error naming its file.
pub fn start(
    listen: SocketAddr,
    limits: &BrokerLimits,
    access: &BrokerAccess,
) -> Result<StartedBroker, BrokerError> {
    let io_err = |source| BrokerError::Io { listen, source };
    if access.is_open() {
        let addr = start_rumqttd(free_port(listen)?, limits, None)?;
        return Ok(StartedBroker { addr, local: addr });
    }
    let tls = access
        .tls
        .as_ref()
        .map(|t| crate::tls::server_config(&t.cert_file, &t.key_file))
        .transpose()
        .map_err(|source| BrokerError::Tls { listen, source })?;
    // Bound here, so the port is ours before anything starts and port 0 needs no guess.
    let public = TcpListener::bind(listen).map_err(io_err)?;
    let bound = public.local_addr().map_err(io_err)?;
    let local = start_rumqttd(
        free_port(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?,
        limits,
        access.login.as_ref(),
    )?;
    front::spawn(public, local, access, tls).map_err(io_err)?;
    Ok(StartedBroker {
        addr: connect_address(bound),
        local,
    })
}

/// `listen` with a free port in place of port 0.
fn free_port(mut listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if listen.port() == 0 {
        let port = TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .map_err(|source| BrokerError::Io { listen, source })?
            .port();
        listen.set_port(port);
    }
    Ok(listen)
}

/// Where to connect to a listener on `listen`: loopback when it is unspecified.
fn connect_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
    } else {
        listen
    }
}

/// Starts rumqttd on `listen` (a fixed port) and waits until it accepts connections.
fn start_rumqttd(
    listen: SocketAddr,
    limits: &BrokerLimits,
    login: Option<&Login>,
) -> Result<SocketAddr, BrokerError> {
    let io_err = |source| BrokerError::Io { listen, source };
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let cfg = config(listen, limits, login);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            let outcome = match broker.start() {
                Ok(()) => "broker stopped".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = done_tx.send(outcome);
        })
        .map_err(io_err)?;
    let connect_to = connect_address(listen);
    let failed = |why| BrokerError::Failed { listen, why };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(why) = done_rx.try_recv() {
            return Err(failed(why));
        }
        if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
            // The server thread may still fail to bind when another process holds the
            // port; give it a moment to say so.
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(why) = done_rx.try_recv() {
                return Err(failed(why));
            }
            return Ok(connect_to);
        }
        if Instant::now() > deadline {
            return Err(BrokerError::NotAccepting { listen });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

//! The embedded MQTT broker (rumqttd, one MQTT 3.1.1 server on a TCP port), so that a
//! gateway or a simulator runs on a machine with nothing else installed. rumqttd cannot
//! be stopped: the broker lives until the process exits.

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
}

fn config(listen: SocketAddr, limits: &BrokerLimits) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: limits.max_payload,
        max_inflight_count: limits.max_inflight,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: format!("v4-{}", listen.port()),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let router = rumqttd::RouterConfig {
        max_connections: 10_000,
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

/// Starts a broker on `listen` and waits until it accepts connections. Port 0 picks a
/// free port first (rumqttd does not report the port it bound). Returns the address to
/// connect to (loopback when `listen` is unspecified).
pub fn start(mut listen: SocketAddr, limits: &BrokerLimits) -> Result<SocketAddr, BrokerError> {
    let io_err = |listen, source| BrokerError::Io { listen, source };
    if listen.port() == 0 {
        let port = TcpListener::bind(listen)
            .and_then(|l| l.local_addr())
            .map_err(|e| io_err(listen, e))?
            .port();
        listen.set_port(port);
    }
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let cfg = config(listen, limits);
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
        .map_err(|e| io_err(listen, e))?;
    let connect_to = if listen.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
    } else {
        listen
    };
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

//! An embedded MQTT broker (rumqttd, one MQTT 3.1.1 server on a TCP port) so that the
//! VM-12 simulator runs on a machine with nothing installed, and tests need no external
//! broker. rumqttd cannot be stopped: the broker lives until the process exits.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

fn config(listen: SocketAddr) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1024 * 1024,
        max_inflight_count: 200,
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
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
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

/// Starts a broker on 127.0.0.1 on a free port and waits until it accepts connections.
pub fn spawn_embedded() -> io::Result<EmbeddedBroker> {
    let mut last_err = io::Error::other("embedded broker did not start");
    for _ in 0..5 {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        match spawn_embedded_on(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            Ok(b) => return Ok(b),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Starts a broker listening on `listen` (a fixed port) and waits until it accepts
/// connections.
pub fn spawn_embedded_on(listen: SocketAddr) -> io::Result<EmbeddedBroker> {
    let (done_tx, done_rx) = mpsc::channel::<String>();
    let cfg = config(listen);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(cfg);
            let outcome = match broker.start() {
                Ok(()) => "broker stopped".to_string(),
                Err(e) => e.to_string(),
            };
            let _ = done_tx.send(outcome);
        })?;
    let connect_to = if listen.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, listen.port()))
    } else {
        listen
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(why) = done_rx.try_recv() {
            return Err(io::Error::other(format!(
                "embedded broker on {listen}: {why}"
            )));
        }
        if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
            // The server thread may still fail to bind if something else holds the port;
            // give it a moment to report that.
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(why) = done_rx.try_recv() {
                return Err(io::Error::other(format!(
                    "embedded broker on {listen}: {why}"
                )));
            }
            return Ok(EmbeddedBroker { addr: connect_to });
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("embedded broker on {listen} did not accept connections"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

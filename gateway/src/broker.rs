//! The embedded MQTT broker (rumqttd, MQTT 3.1.1), so a gateway on one machine needs
//! nothing else installed. rumqttd cannot be stopped: the broker lives until the process
//! exits, which is how the gateway uses it.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Largest packet the broker takes: a full agent batch plus MQTT overhead.
const MAX_PACKET: usize = tend_wire::MAX_MESSAGE + 64 * 1024;

fn config(listen: SocketAddr) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PACKET,
        max_inflight_count: 500,
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
        max_outgoing_packet_count: 500,
        // A segment must hold the largest message.
        max_segment_size: 2 * MAX_PACKET,
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

/// Starts the broker on `listen` and waits until it accepts connections. Returns the
/// address to connect to (loopback when `listen` is unspecified).
pub fn start(mut listen: SocketAddr) -> io::Result<SocketAddr> {
    if listen.port() == 0 {
        // rumqttd does not report the port it bound: pick a free one first.
        listen.set_port(std::net::TcpListener::bind(listen)?.local_addr()?.port());
    }
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
            return Err(io::Error::other(format!("MQTT broker on {listen}: {why}")));
        }
        if TcpStream::connect_timeout(&connect_to, Duration::from_millis(200)).is_ok() {
            // The server thread may still fail to bind when another process holds the
            // port; give it a moment to say so.
            std::thread::sleep(Duration::from_millis(20));
            if let Ok(why) = done_rx.try_recv() {
                return Err(io::Error::other(format!("MQTT broker on {listen}: {why}")));
            }
            return Ok(connect_to);
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("MQTT broker on {listen} did not accept connections within 5 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

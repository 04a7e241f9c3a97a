//! An embedded MQTT broker (rumqttd, one MQTT 3.1.1 server on a TCP port) so that the
//! VM-12 simulator runs on a machine with nothing installed, and tests need no external
//! broker: [`tend_mqtt::broker`] with the simulator's sizes, on a free loopback port.
//! rumqttd cannot be stopped: the broker lives until the process exits.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use tend_mqtt::broker::{BrokerAccess, BrokerError, BrokerLimits};

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

fn limits() -> BrokerLimits {
    BrokerLimits {
        max_payload: 1024 * 1024,
        max_inflight: 200,
        max_outgoing_packets: 200,
        max_segment_size: 1024 * 1024,
    }
}

/// Starts a broker on 127.0.0.1 on a free port and waits until it accepts connections.
/// A port taken between choosing and binding it is tried again with another, five times.
pub fn spawn_embedded() -> Result<EmbeddedBroker, BrokerError> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let mut last_err = None;
    for _ in 0..5 {
        let port = TcpListener::bind(loopback)
            .and_then(|l| l.local_addr())
            .map_err(|source| BrokerError::Io {
                listen: loopback,
                source,
            })?
            .port();
        match spawn_embedded_on(SocketAddr::from((Ipv4Addr::LOCALHOST, port))) {
            Ok(b) => return Ok(b),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or(BrokerError::NotAccepting { listen: loopback }))
}

/// Starts a broker listening on `listen` (a fixed port) and waits until it accepts
/// connections.
pub fn spawn_embedded_on(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    let addr = tend_mqtt::broker::start(listen, &limits(), &BrokerAccess::default())?.addr;
    Ok(EmbeddedBroker { addr })
}

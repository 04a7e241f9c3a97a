//! The embedded MQTT broker (rumqttd, MQTT 3.1.1), so a gateway on one machine needs
//! nothing else installed: [`tend_mqtt::broker`] with the gateway's sizes. rumqttd cannot
//! be stopped: the broker lives until the process exits, which is how the gateway uses it.

use std::net::SocketAddr;
use tend_mqtt::broker::{BrokerError, BrokerLimits};

/// Largest packet the broker takes: a full agent batch plus MQTT overhead.
const MAX_PACKET: usize = tend_wire::MAX_MESSAGE + 64 * 1024;

fn limits() -> BrokerLimits {
    BrokerLimits {
        max_payload: MAX_PACKET,
        max_inflight: 500,
        max_outgoing_packets: 500,
        // A segment must hold the largest message.
        max_segment_size: 2 * MAX_PACKET,
    }
}

/// Starts the broker on `listen` and waits until it accepts connections. Returns the
/// address to connect to (loopback when `listen` is unspecified).
pub fn start(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    tend_mqtt::broker::start(listen, &limits())
}

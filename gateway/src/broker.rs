//! The embedded MQTT broker (rumqttd, MQTT 3.1.1), so a gateway on one machine needs
//! nothing else installed: [`tend_mqtt::broker`] with the gateway's sizes. rumqttd cannot
//! be stopped: the broker lives until the process exits, which is how the gateway uses it.

use std::net::SocketAddr;
use tend_mqtt::broker::{BrokerAccess, BrokerError, BrokerLimits, StartedBroker};

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

/// Starts the broker on `listen` with `access` (login, TLS) and waits until it accepts
/// connections. Returns where agents connect and where the gateway's own client does.
pub fn start(listen: SocketAddr, access: &BrokerAccess) -> Result<StartedBroker, BrokerError> {
    tend_mqtt::broker::start(listen, &limits(), access)
}

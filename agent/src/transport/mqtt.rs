//! MQTT device source (VM-12): the device publishes its status as JSON to a broker; the
//! agent subscribes to the profile's status and last-will topics for one serial number.
//!
//! The first status message identifies the device (`fw`), the profile for that firmware is
//! chosen and the message must also carry that profile's schema tag (6.x sends
//! `vistara.status/1`, 7.x `vistara.status/2`): a firmware that claims one family but
//! sends the other's document is an error rather than a guess. A payload larger than the
//! profile allows is dropped before any parsing. Nothing is published.

use super::{family_first, DeviceRead, Stats, TransportError};
use rumqttc::{AsyncClient, ConnectionError, Event, Packet, QoS};
use std::time::{Duration, Instant};
use tend_mqtt::options::options_with;
use tend_mqtt::{BrokerUrl, ClientSettings, ClientTls, Credentials};
use tend_profiles::engine::DecodeError;
use tend_profiles::ProfileSet;

/// Where the broker is and whose status to read.
#[derive(Debug, Clone)]
pub struct MqttSource {
    /// `mqtt://host[:port]` or `mqtts://host[:port]` (the system's CA roots).
    pub broker: String,
    /// The device's serial number, substituted for `{serial}` in the profile's topics.
    pub serial: String,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The broker URL (`mqtt://host[:port]` or `mqtts://host[:port]`), in the one grammar of
/// [`tend_mqtt::BrokerUrl`].
pub fn parse_broker(url: &str) -> Result<BrokerUrl, TransportError> {
    BrokerUrl::parse(url).map_err(|e| TransportError::Config(e.to_string()))
}

/// What the last will topic said, if anything arrived there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline,
    Other,
}

/// The outcome of waiting for one status message.
#[derive(Debug)]
pub struct MqttRead {
    pub read: DeviceRead,
    pub presence: Option<Presence>,
    pub stats: Stats,
}

/// A serial number that cannot be part of a topic (wildcards, separators) is refused: it
/// would subscribe to other devices' data.
fn check_serial(serial: &str) -> Result<(), TransportError> {
    if serial.is_empty()
        || serial.len() > 64
        || serial
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return Err(TransportError::Config(format!(
            "serial {serial:?} cannot be used in a topic"
        )));
    }
    Ok(())
}

fn client_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("tend-probe-{}-{nanos:08x}", std::process::id())
}

/// Connects, subscribes and waits up to `wait` for the device's first status message;
/// identifies, selects and decodes it. Oversize and undecodable messages are counted and
/// skipped while there is time left, so one bad message does not hide a good one.
pub async fn read_status(
    src: &MqttSource,
    set: &ProfileSet,
    model: &str,
    wait: Duration,
) -> Result<MqttRead, TransportError> {
    check_serial(&src.serial)?;
    let family = set.family(model)?;
    let first = family_first(family, model)?;
    let t = &first.doc.transport;
    let topic = |tpl: &Option<String>| tpl.as_ref().map(|s| s.replace("{serial}", &src.serial));
    let status_topic = topic(&t.status_topic).ok_or_else(|| {
        TransportError::Config(format!("profile {} has no status topic", first.id()))
    })?;
    let lwt_topic = topic(&t.lwt_topic);
    // The size check uses the largest limit of the family: the firmware is not known yet.
    let max_payload = family
        .iter()
        .filter_map(|p| p.doc.transport.max_payload.map(|b| b.0))
        .max()
        .unwrap_or(16 * 1024) as usize;

    let url = parse_broker(&src.broker)?;
    let credentials = src.username.as_ref().map(|user| Credentials {
        username: user.clone(),
        password: src.password.clone().unwrap_or_default(),
    });
    let settings = ClientSettings {
        client_id: client_id(),
        keep_alive: Duration::from_secs(30),
        // Accept packets well above the device limit so an oversize message is dropped by
        // us (and counted) instead of tearing the connection down.
        max_incoming: (max_payload * 8).max(256 * 1024),
        max_outgoing: 64 * 1024,
    };
    let opts = options_with(&url, credentials, &ClientTls::default(), &settings)
        .map_err(|e| TransportError::Config(e.to_string()))?;
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let target = url.authority();
    let mut stats = Stats::default();
    let mut presence = None;
    let mut last_problem: Option<String> = None;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;

    let result = 'wait: loop {
        let ev = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => {
                stats.timeouts += 1;
                let mut detail = String::new();
                if presence == Some(Presence::Offline) {
                    detail.push_str("; the monitor's last will says it is offline");
                }
                if let Some(p) = &last_problem {
                    detail.push_str(&format!("; last message skipped: {p}"));
                }
                break Err(TransportError::Timeout {
                    what: format!("no status on {status_topic} at {target}"),
                    after: wait,
                    detail,
                });
            }
            Ok(ev) => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                stats.requests += 1;
                let mut subs = vec![status_topic.clone()];
                subs.extend(lwt_topic.clone());
                for s in subs {
                    // The request queue holds 16: two subscriptions never wait on it.
                    if let Err(e) = client.try_subscribe(s, QoS::AtLeastOnce) {
                        break 'wait Err(TransportError::Mqtt(format!("subscribe: {e}")));
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if Some(&p.topic) == lwt_topic.as_ref() {
                    presence = Some(match &p.payload[..] {
                        b"online" => Presence::Online,
                        b"offline" => Presence::Offline,
                        _ => Presence::Other,
                    });
                    continue;
                }
                if p.topic != status_topic {
                    continue;
                }
                if p.payload.len() > max_payload {
                    stats.oversize += 1;
                    last_problem = Some(format!(
                        "{} bytes, more than the {max_payload} the device may send",
                        p.payload.len()
                    ));
                    continue;
                }
                stats.last_latency = Some(started.elapsed());
                match decode(set, model, &p.payload) {
                    Ok(read) => break Ok(read),
                    // A broken message may be followed by a good one: keep waiting.
                    Err(TransportError::Identify(e)) | Err(TransportError::Decode(e))
                        if matches!(e, DecodeError::Json(_) | DecodeError::NotObject) =>
                    {
                        last_problem = Some(e.to_string());
                    }
                    Err(e) => break Err(e),
                }
            }
            Ok(_) => {}
            Err(e) => break Err(connection_error(&target, e)),
        }
    };
    // Best effort: the broker drops the session either way.
    let _ = tokio::time::timeout(Duration::from_millis(200), client.disconnect()).await;
    result.map(|read| MqttRead {
        read,
        presence,
        stats,
    })
}

/// Identifies the status document, selects the profile and decodes with it.
pub fn decode(set: &ProfileSet, model: &str, payload: &[u8]) -> Result<DeviceRead, TransportError> {
    let family = set.family(model)?;
    let first = family_first(family, model)?;
    let identity = first
        .identify_json(payload)
        .map_err(TransportError::Identify)?;
    let profile = set.select(model, &identity.firmware)?;
    // decode_json checks the schema tag too: a 7.x firmware sending the 6.x document is
    // refused there.
    let snapshot = profile
        .decode_json(payload)
        .map_err(TransportError::Decode)?;
    Ok(DeviceRead {
        identity,
        profile,
        snapshot,
    })
}

fn connection_error(target: &str, e: ConnectionError) -> TransportError {
    match e {
        ConnectionError::Io(io) => TransportError::Connect {
            target: target.to_string(),
            reason: io.to_string(),
        },
        ConnectionError::ConnectionRefused(code) => TransportError::Connect {
            target: target.to_string(),
            reason: format!("the broker refused the connection ({code:?})"),
        },
        ConnectionError::NetworkTimeout => TransportError::Connect {
            target: target.to_string(),
            reason: "network timeout".into(),
        },
        other => TransportError::Mqtt(other.to_string()),
    }
}

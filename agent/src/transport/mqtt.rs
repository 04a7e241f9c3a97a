//! MQTT device source (VM-12): the device publishes its status as JSON to a broker; the
//! agent subscribes to the profile's status and last-will topics for one serial number.
//!
//! The first status message identifies the device (`fw`), the profile for that firmware is
//! chosen and the message must also carry that profile's schema tag (6.x sends
//! `vistara.status/1`, 7.x `vistara.status/2`): a firmware that claims one family but
//! sends the other's document is an error rather than a guess. A payload larger than the
//! profile allows is dropped before any parsing.
//!
//! [`read_status`] reads one status (probe); [`mqtt_link`] is the running agent's link
//! task for one device, a standing subscription. Nothing is published but the commands a
//! profile lists as diagnostics, to the device's command topic.

use super::link::{DeviceRequest, LinkContext, RequestError};
use super::{family_first, DeviceRead, Stats, TransportError};
use crate::device::{DeviceConfig, MqttLink};
use rumqttc::{AsyncClient, ConnectionError, Event, Packet, QoS};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend_mqtt::options::options_with;
use tend_mqtt::{BrokerUrl, ClientSettings, ClientTls, Credentials};
use tend_profiles::engine::DecodeError;
use tend_profiles::{Profile, ProfileSet};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;

/// Where the broker is and whose status to read.
#[derive(Debug, Clone)]
pub struct MqttSource {
    /// `mqtt://host[:port]` or `mqtts://host[:port]`.
    pub broker: String,
    /// The device's serial number, substituted for `{serial}` in the profile's topics.
    pub serial: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// On an `mqtts://` broker: the CA bundle (else the system's roots).
    pub ca_file: Option<PathBuf>,
}

impl MqttSource {
    /// The source a configured MQTT device reads, its password read from its file.
    pub fn from_link(link: &MqttLink) -> Result<Self, TransportError> {
        let password = match &link.password_file {
            Some(p) => Some(
                tend_mqtt::read_secret("password file", p)
                    .map_err(|e| TransportError::Config(e.to_string()))?,
            ),
            None => None,
        };
        Ok(MqttSource {
            broker: link.broker.clone(),
            serial: link.serial.clone(),
            username: link.username.clone(),
            password,
            ca_file: link.ca_file.clone(),
        })
    }
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
    let tls = ClientTls {
        ca_file: src.ca_file.clone(),
        ..ClientTls::default()
    };
    let opts = options_with(&url, credentials, &tls, &settings)
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

/// The topics and timing of one MQTT device, from its model's profiles.
struct DeviceTopics {
    status: String,
    cmd: Option<String>,
    reply: Option<String>,
    lwt: Option<String>,
    max_payload: usize,
    /// The device's status period; silence is judged against it.
    period: Duration,
}

impl DeviceTopics {
    fn of(family: &[Arc<Profile>], serial: &str) -> Self {
        let topic_of = |pick: fn(&tend_profiles::schema::TransportDef) -> &Option<String>| {
            family
                .iter()
                .find_map(|p| pick(&p.doc.transport).as_ref())
                .map(|t| t.replace("{serial}", serial))
        };
        Self {
            status: topic_of(|t| &t.status_topic).unwrap_or_default(),
            cmd: topic_of(|t| &t.cmd_topic),
            reply: topic_of(|t| &t.reply_topic),
            lwt: topic_of(|t| &t.lwt_topic),
            max_payload: family
                .iter()
                .filter_map(|p| p.doc.transport.max_payload.map(|b| b.0))
                .max()
                .unwrap_or(16 * 1024) as usize,
            period: family
                .iter()
                .find_map(|p| p.doc.transport.status_interval)
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(10)),
        }
    }
}

/// A command sent to an MQTT device, waiting for its reply: who asked, the answer fields
/// that are PHI (removed at any depth), and when to give up.
type PendingCommand = (
    oneshot::Sender<Result<serde_json::Value, RequestError>>,
    Vec<String>,
    TokioInstant,
);

/// Back-off before an MQTT device link reconnects: 1 s doubling to 10 s.
const MQTT_RECONNECT: tend_mqtt::Backoff = tend_mqtt::Backoff {
    min: Duration::from_secs(1),
    max: Duration::from_secs(10),
    factor: 2,
    jitter: 0.0,
};

/// An MQTT device (VM-12): a standing subscription to its status topic. Silence longer
/// than three status periods is a failed read each period. Profile-listed commands
/// (`selftest`, `errlog`) are published to the device's command topic and answered from
/// its reply topic.
pub async fn mqtt_link(d: DeviceConfig, link: MqttLink, mut cx: LinkContext) {
    let serial = link.serial.clone();
    let broker = link.broker.clone();
    let Ok(family) = cx.set.family(&d.profile) else {
        return;
    };
    let topics = DeviceTopics::of(family, &serial);
    let max_payload = topics.max_payload;
    let settings = ClientSettings {
        client_id: format!("tend-agent-{}-{}", d.id, std::process::id()),
        keep_alive: Duration::from_secs(30),
        max_incoming: (max_payload * 8).max(256 * 1024),
        max_outgoing: 64 * 1024,
    };
    let opts = parse_broker(&broker).and_then(|url| {
        tend_mqtt::mqtt_options(&url, &link.broker_auth(), &settings)
            .map_err(|e| TransportError::Config(e.to_string()))
    });
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            let _ = cx.send(&d.id, Err(e)).await;
            return;
        }
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    // The event loop runs in its own task: cancelling its poll mid-handshake would drop
    // the connection.
    let (ev_tx, mut events) = mpsc::channel::<Result<Event, ConnectionError>>(64);
    let poller = tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            match eventloop.poll().await {
                Ok(ev) => {
                    failures = 0;
                    if ev_tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if ev_tx.send(Err(e)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(MQTT_RECONNECT.delay(failures - 1, 0)).await;
                }
            }
        }
    });
    let mut state = MqttDevice {
        device: d.id.clone(),
        model: d.profile.clone(),
        silent_deadline: TokioInstant::now() + topics.period * 3,
        topics,
        client,
        stats: Stats::default(),
        known: None,
        pending: BTreeMap::new(),
        next_id: 0,
        last_error: None,
    };
    loop {
        let next_expiry = state.next_expiry();
        let go_on = tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => state.on_event(ev, &cx).await,
                None => false,
            },
            _ = tokio::time::sleep_until(next_expiry) => state.on_expiry(&cx).await,
            Some(req) = cx.requests.recv() => {
                state.on_request(req).await;
                true
            }
        };
        if !go_on {
            break;
        }
    }
    poller.abort();
}

/// What the link task of one MQTT device knows between events.
struct MqttDevice {
    device: String,
    model: String,
    topics: DeviceTopics,
    client: AsyncClient,
    stats: Stats,
    /// The profile of the last status that decoded.
    known: Option<Arc<Profile>>,
    silent_deadline: TokioInstant,
    pending: BTreeMap<String, PendingCommand>,
    next_id: u64,
    /// Why the broker connection last failed, told when the device falls silent.
    last_error: Option<ConnectionError>,
}

impl MqttDevice {
    /// The next moment something is due: a command's deadline or the silence deadline.
    fn next_expiry(&self) -> TokioInstant {
        self.pending
            .values()
            .map(|p| p.2)
            .min()
            .unwrap_or(self.silent_deadline)
            .min(self.silent_deadline)
    }

    /// Handles one event of the broker connection; false once the recorder is gone.
    async fn on_event(&mut self, ev: Result<Event, ConnectionError>, cx: &LinkContext) -> bool {
        let topics = &self.topics;
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                self.stats.requests += 1;
                let mut subs = vec![topics.status.clone()];
                subs.extend(topics.reply.clone());
                subs.extend(topics.lwt.clone());
                for s in subs {
                    let _ = self.client.subscribe(s, QoS::AtLeastOnce).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.status => {
                if p.payload.len() > topics.max_payload {
                    self.stats.oversize += 1;
                    return true;
                }
                let result = crate::transport::mqtt::decode(&cx.set, &self.model, &p.payload);
                if let Ok(r) = &result {
                    self.known = Some(r.profile.clone());
                    self.silent_deadline = TokioInstant::now() + topics.period * 3;
                }
                cx.shared.set_stats(&self.device, self.stats.clone());
                return cx.send(&self.device, result).await;
            }
            Ok(Event::Incoming(Packet::Publish(p))) if Some(&p.topic) == topics.lwt.as_ref() => {
                // The device's last will: it is gone now, not three periods from now.
                if &p.payload[..] == b"offline" {
                    self.silent_deadline = TokioInstant::now() + topics.period;
                    let err = TransportError::Timeout {
                        what: format!("{} says offline (last will)", p.topic),
                        after: Duration::ZERO,
                        detail: String::new(),
                    };
                    return cx.send(&self.device, Err(err)).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if Some(&p.topic) == topics.reply.as_ref() => {
                if p.payload.len() > topics.max_payload {
                    self.stats.oversize += 1;
                    return true;
                }
                self.on_reply(&p.payload);
            }
            Ok(_) => {}
            Err(e) => {
                self.stats.reconnects += 1;
                self.last_error = Some(e);
            }
        }
        true
    }

    /// A reply on the device's reply topic answers the pending command of its id.
    fn on_reply(&mut self, payload: &[u8]) {
        let Ok(reply) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let Some(id) = reply.get("id").and_then(|v| v.as_str()) else {
            return;
        };
        let Some((tx, drop_fields, _)) = self.pending.remove(id) else {
            return;
        };
        let answer = if reply.get("ok").and_then(|v| v.as_bool()) == Some(true) {
            let mut result = reply.get("result").cloned().unwrap_or_default();
            tend_profiles::phi::strip_json(&mut result, &drop_fields);
            Ok(result)
        } else {
            Err(RequestError::DeviceRefused(
                reply
                    .get("error")
                    .and_then(|v| v.as_str())
                    .unwrap_or("error")
                    .to_string(),
            ))
        };
        let _ = tx.send(answer);
    }

    /// Expires commands past their deadline; a device silent past its deadline is a
    /// failed read. False once the recorder is gone.
    async fn on_expiry(&mut self, cx: &LinkContext) -> bool {
        let now = TokioInstant::now();
        let expired: Vec<String> = self
            .pending
            .iter()
            .filter(|(_, p)| p.2 <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            if let Some((tx, _, _)) = self.pending.remove(&id) {
                let _ = tx.send(Err(RequestError::CommandTimeout));
            }
        }
        if self.silent_deadline <= now {
            self.stats.timeouts += 1;
            cx.shared.set_stats(&self.device, self.stats.clone());
            let period = self.topics.period;
            self.silent_deadline = now + period;
            let err = TransportError::Timeout {
                what: format!("no status on {}", self.topics.status),
                after: period * 3,
                detail: self
                    .last_error
                    .as_ref()
                    .map(|e| format!("; broker: {e}"))
                    .unwrap_or_default(),
            };
            return cx.send(&self.device, Err(err)).await;
        }
        true
    }

    /// Publishes a profile-listed command to the device; the reply answers `req` later.
    async fn on_request(&mut self, req: DeviceRequest) {
        let diag = self
            .known
            .as_ref()
            .and_then(|p| super::find_diagnostic(p, &req.name).ok().cloned());
        // Stripped from the answer, as the serial link does: the diagnostic's fields, the
        // profile's PHI and the manual's PHI for the model.
        let phi = self.known.as_ref().zip(diag.as_ref()).map(|(p, g)| {
            tend_profiles::phi::answer_phi(&p.doc.device.id, &p.doc.device.phi, &g.drop_fields)
        });
        let (Some(diag), Some(topic)) = (diag, self.topics.cmd.as_ref()) else {
            let _ = req.reply.send(Err(RequestError::TakesNoCommands));
            return;
        };
        let Some(command) = diag.command.clone() else {
            let _ = req.reply.send(Err(RequestError::NotACommand(req.name)));
            return;
        };
        self.next_id += 1;
        let id = format!("tend-{}-{}", std::process::id(), self.next_id);
        let mut body = serde_json::Map::new();
        body.insert("id".into(), id.clone().into());
        body.insert("cmd".into(), command.into());
        for (k, v) in &diag.args {
            match serde_json::to_value(v) {
                Ok(v) => {
                    body.insert(k.clone(), v);
                }
                Err(e) => {
                    let _ = req.reply.send(Err(RequestError::Publish(format!(
                        "argument `{k}` cannot be encoded: {e}"
                    ))));
                    return;
                }
            }
        }
        let timeout = self
            .known
            .as_ref()
            .and_then(|p| p.doc.transport.reply_timeout)
            .map(|t| t.0)
            .unwrap_or(Duration::from_secs(5));
        match self
            .client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                serde_json::Value::Object(body).to_string(),
            )
            .await
        {
            Ok(()) => {
                self.pending.insert(
                    id,
                    (
                        req.reply,
                        phi.unwrap_or_default(),
                        TokioInstant::now() + timeout,
                    ),
                );
            }
            Err(e) => {
                let _ = req.reply.send(Err(RequestError::Publish(e.to_string())));
            }
        }
    }
}

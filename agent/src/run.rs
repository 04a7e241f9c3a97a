//! `tend-agent run`: the running agent. One task per link reads its devices on schedule
//! (one task per serial port or RS-485 bus, polling every unit on it in turn, so a dead
//! unit costs its timeout and never stalls the others); a recorder turns every read into
//! records through each device's [`DeviceMonitor`] and makes them durable in the outbox;
//! the uplink sends them and answers the hotline's diagnostics.

use crate::config::{DeviceConfig, Loaded, ParityName, TransportName};
use crate::monitor::DeviceMonitor;
use crate::transport::modbus::{Endpoint, ModbusBus};
use crate::transport::serial::SerialDevice;
use crate::transport::{DeviceRead, Stats, TransportError};
use jiff::Timestamp;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_profiles::{Identity, Profile, ProfileSet};
use tend_wire::RecordBody;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// One read of one device, or its failure, at a time.
#[derive(Debug)]
pub struct Observation {
    pub device: String,
    pub at: Timestamp,
    pub result: Result<DeviceRead, TransportError>,
}

/// A profile-listed read-only device request, handed to the task that owns the link.
#[derive(Debug)]
pub struct DeviceRequest {
    pub device: String,
    pub name: String,
    pub reply: oneshot::Sender<Result<serde_json::Value, String>>,
}

/// What every part of the running agent can look at.
#[derive(Debug, Default)]
pub struct Shared {
    pub monitors: Mutex<BTreeMap<String, DeviceMonitor>>,
    /// Transport statistics by device.
    pub stats: Mutex<BTreeMap<String, Stats>>,
    /// The link task of each device, for device requests.
    pub links: Mutex<BTreeMap<String, mpsc::Sender<DeviceRequest>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave these maps half-updated in a way that matters more
    // than stopping the agent would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn set_stats(&self, device: &str, stats: Stats) {
        lock(&self.stats).insert(device.to_string(), stats);
    }

    /// The profile currently chosen for a device (known after its first read).
    pub fn profile_of(&self, device: &str) -> Option<Arc<Profile>> {
        lock(&self.monitors)
            .get(device)
            .and_then(|m| m.profile().cloned())
    }
}

/// Back-off before reopening a link that failed: grows to a minute, so a dead port is
/// retried without spinning.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << failures.min(7))).min(Duration::from_secs(60))
}

/// Back-off before an MQTT device link reconnects: 1 s doubling to 10 s.
const MQTT_RECONNECT: tend_mqtt::Backoff = tend_mqtt::Backoff {
    min: Duration::from_secs(1),
    max: Duration::from_secs(10),
    factor: 2,
    jitter: 0.0,
};

/// Starts the link tasks for every configured device. Observations go to `out`.
pub fn spawn_links(
    loaded: &Loaded,
    shared: Arc<Shared>,
    out: mpsc::Sender<Observation>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let set = Arc::new(loaded.profiles.clone());
    let mut tasks = Vec::new();
    // Modbus devices are grouped by link: one task per RS-485 port or TCP address.
    let mut buses: BTreeMap<String, (Endpoint, Vec<DeviceConfig>)> = BTreeMap::new();
    for d in &loaded.config.devices {
        match d.transport {
            TransportName::Serial => {
                let (tx, rx) = mpsc::channel(4);
                lock(&shared.links).insert(d.id.clone(), tx);
                tasks.push(tokio::spawn(serial_link(
                    d.clone(),
                    set.clone(),
                    shared.clone(),
                    out.clone(),
                    rx,
                )));
            }
            TransportName::Mqtt => {
                let (tx, rx) = mpsc::channel(4);
                lock(&shared.links).insert(d.id.clone(), tx);
                tasks.push(tokio::spawn(mqtt_link(
                    d.clone(),
                    set.clone(),
                    shared.clone(),
                    out.clone(),
                    rx,
                )));
            }
            TransportName::ModbusTcp | TransportName::ModbusRtu => {
                let (key, endpoint) = match d.transport {
                    TransportName::ModbusTcp => {
                        let a = d.address.clone().unwrap_or_default();
                        (format!("tcp {a}"), Endpoint::Tcp(a))
                    }
                    _ => {
                        let first = set.family(&d.profile).ok().and_then(|f| f.first().cloned());
                        let t = first.as_ref().map(|p| &p.doc.transport);
                        let path = d.port.clone().unwrap_or_default();
                        use tend_profiles::schema::Parity;
                        let parity = match d.parity {
                            Some(ParityName::None) => Parity::None,
                            Some(ParityName::Odd) => Parity::Odd,
                            Some(ParityName::Even) => Parity::Even,
                            None => t.and_then(|t| t.parity).unwrap_or(Parity::None),
                        };
                        let baud = d.baud.or(t.and_then(|t| t.baud)).unwrap_or(19200);
                        (format!("rtu {path}"), Endpoint::Rtu { path, baud, parity })
                    }
                };
                buses
                    .entry(key)
                    .or_insert_with(|| (endpoint, Vec::new()))
                    .1
                    .push(d.clone());
            }
        }
    }
    for (_, (endpoint, devices)) in buses {
        let (tx, rx) = mpsc::channel(4);
        for d in &devices {
            lock(&shared.links).insert(d.id.clone(), tx.clone());
        }
        tasks.push(tokio::spawn(modbus_link(
            endpoint,
            devices,
            set.clone(),
            shared.clone(),
            out.clone(),
            rx,
        )));
    }
    tasks
}

async fn send(
    out: &mpsc::Sender<Observation>,
    device: &str,
    result: Result<DeviceRead, TransportError>,
) -> bool {
    out.send(Observation {
        device: device.to_string(),
        at: Timestamp::now(),
        result,
    })
    .await
    .is_ok()
}

/// One serial device on its own port: identify at connect and after every failure (the
/// device may have come back with other firmware), then poll.
async fn serial_link(
    d: DeviceConfig,
    set: Arc<ProfileSet>,
    shared: Arc<Shared>,
    out: mpsc::Sender<Observation>,
    mut requests: mpsc::Receiver<DeviceRequest>,
) {
    let path = d.port.clone().unwrap_or_default();
    let mut dev: Option<SerialDevice> = None;
    let mut known: Option<(Identity, Arc<Profile>)> = None;
    let mut failures = 0u32;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            Some(req) = requests.recv() => {
                let answer = match (dev.as_mut(), known.as_ref()) {
                    (Some(dv), Some((_, p))) => dv
                        .diagnostic(p, &req.name)
                        .await
                        .map(|f| serde_json::to_value(f).unwrap_or_default())
                        .map_err(|e| e.to_string()),
                    _ => Err("the device has not answered yet".into()),
                };
                let _ = req.reply.send(answer);
                continue;
            }
        }
        next = Instant::now() + d.poll_interval();
        if dev.is_none() {
            match SerialDevice::open(&path, d.baud, &set, &d.profile) {
                Ok(mut dv) => {
                    if let Some(t) = d.reply_timeout {
                        dv.set_reply_timeout(t.0);
                    }
                    dev = Some(dv);
                }
                Err(e) => {
                    failures += 1;
                    next = Instant::now() + backoff(failures).max(d.poll_interval());
                    if !send(&out, &d.id, Err(e)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(dv) = dev.as_mut() else { continue };
        if known.is_none() {
            match dv.identify(&set, &d.profile).await {
                Ok(k) => known = Some(k),
                Err(e) => {
                    shared.set_stats(&d.id, dv.stats().clone());
                    failures += 1;
                    if !send(&out, &d.id, Err(e)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some((identity, profile)) = known.clone() else {
            continue;
        };
        let result = dv.poll(&profile).await;
        shared.set_stats(&d.id, dv.stats().clone());
        let result = match result {
            Ok(snapshot) => {
                failures = 0;
                Ok(DeviceRead {
                    identity,
                    profile,
                    snapshot,
                })
            }
            Err(e) => {
                failures += 1;
                // Identify again once it answers: it may have been swapped or updated.
                known = None;
                if matches!(e, TransportError::Io { .. } | TransportError::Open { .. }) {
                    dev = None;
                    next = Instant::now() + backoff(failures).max(d.poll_interval());
                }
                Err(e)
            }
        };
        if !send(&out, &d.id, result).await {
            return;
        }
    }
}

/// Units on one Modbus link, polled in turn, each on its own interval.
async fn modbus_link(
    endpoint: Endpoint,
    devices: Vec<DeviceConfig>,
    set: Arc<ProfileSet>,
    shared: Arc<Shared>,
    out: mpsc::Sender<Observation>,
    mut requests: mpsc::Receiver<DeviceRequest>,
) {
    struct Unit {
        d: DeviceConfig,
        unit: u8,
        known: Option<(Identity, Arc<Profile>)>,
        next: Instant,
    }
    let mut bus = ModbusBus::new(endpoint);
    let mut units: Vec<Unit> = devices
        .into_iter()
        .map(|d| Unit {
            unit: d.unit.unwrap_or(1),
            d,
            known: None,
            next: Instant::now(),
        })
        .collect();
    if units.is_empty() {
        return;
    }
    loop {
        let (i, due) = units
            .iter()
            .enumerate()
            .map(|(i, u)| (i, u.next))
            .min_by_key(|(_, t)| *t)
            .unwrap_or((0, Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            Some(req) = requests.recv() => {
                let answer = match units.iter().find(|u| u.d.id == req.device) {
                    Some(Unit { unit, known: Some((_, p)), .. }) => bus
                        .diagnostic(*unit, p, &req.name)
                        .await
                        .map(|words| serde_json::json!({ "registers": words }))
                        .map_err(|e| e.to_string()),
                    _ => Err("the device has not answered yet".into()),
                };
                let _ = req.reply.send(answer);
                continue;
            }
        }
        let u = &mut units[i];
        u.next = Instant::now() + u.d.poll_interval();
        let timeout = u.d.reply_timeout.map(|t| t.0);
        if u.known.is_none() {
            match bus.identify(u.unit, &set, &u.d.profile, timeout).await {
                Ok(k) => u.known = Some(k),
                Err(e) => {
                    shared.set_stats(&u.d.id, bus.stats(u.unit));
                    if !send(&out, &u.d.id, Err(e)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some((identity, profile)) = u.known.clone() else {
            continue;
        };
        let result = bus.poll(u.unit, &profile, timeout).await;
        shared.set_stats(&u.d.id, bus.stats(u.unit));
        let result = match result {
            Ok(snapshot) => Ok(DeviceRead {
                identity,
                profile,
                snapshot,
            }),
            Err(e) => {
                u.known = None;
                Err(e)
            }
        };
        if !send(&out, &u.d.id, result).await {
            return;
        }
    }
}

/// A command sent to an MQTT device, waiting for its reply: who asked, the answer fields
/// that are PHI, and when to give up.
type PendingCommand = (
    oneshot::Sender<Result<serde_json::Value, String>>,
    Vec<String>,
    Instant,
);

/// An MQTT device (VM-12): a standing subscription to its status topic. Silence longer
/// than three status periods is a failed read each period. Profile-listed commands
/// (`selftest`, `errlog`) are published to the device's command topic and answered from
/// its reply topic.
async fn mqtt_link(
    d: DeviceConfig,
    set: Arc<ProfileSet>,
    shared: Arc<Shared>,
    out: mpsc::Sender<Observation>,
    mut requests: mpsc::Receiver<DeviceRequest>,
) {
    let serial = d.serial.clone().unwrap_or_default();
    let broker = d.broker.clone().unwrap_or_default();
    let Ok(family) = set.family(&d.profile) else {
        return;
    };
    let topic_of = |pick: fn(&tend_profiles::schema::TransportDef) -> &Option<String>| {
        family
            .iter()
            .find_map(|p| pick(&p.doc.transport).as_ref())
            .map(|t| t.replace("{serial}", &serial))
    };
    let status_topic = topic_of(|t| &t.status_topic).unwrap_or_default();
    let cmd_topic = topic_of(|t| &t.cmd_topic);
    let reply_topic = topic_of(|t| &t.reply_topic);
    let lwt_topic = topic_of(|t| &t.lwt_topic);
    let max_payload = family
        .iter()
        .filter_map(|p| p.doc.transport.max_payload.map(|b| b.0))
        .max()
        .unwrap_or(16 * 1024) as usize;
    let period = family
        .iter()
        .find_map(|p| p.doc.transport.status_interval)
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(10));
    let settings = tend_mqtt::ClientSettings {
        client_id: format!("tend-agent-{}-{}", d.id, std::process::id()),
        keep_alive: Duration::from_secs(30),
        max_incoming: (max_payload * 8).max(256 * 1024),
        max_outgoing: 64 * 1024,
    };
    let opts = crate::transport::mqtt::parse_broker(&broker).and_then(|url| {
        tend_mqtt::mqtt_options(&url, &d.broker_auth(), &settings)
            .map_err(|e| TransportError::Config(e.to_string()))
    });
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            let _ = send(&out, &d.id, Err(e)).await;
            return;
        }
    };
    let (client, mut eventloop) = AsyncClient::new(opts, 32);
    // The event loop runs in its own task: cancelling its poll mid-handshake would drop
    // the connection.
    let (ev_tx, mut events) = mpsc::channel::<Result<Event, String>>(64);
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
                    if ev_tx.send(Err(e.to_string())).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(MQTT_RECONNECT.delay(failures - 1, 0)).await;
                }
            }
        }
    });
    let mut stats = Stats::default();
    let mut known: Option<Arc<Profile>> = None;
    let mut silent_deadline = Instant::now() + period * 3;
    let mut pending: BTreeMap<String, PendingCommand> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut last_error: Option<String> = None;
    loop {
        let next_expiry = pending
            .values()
            .map(|p| p.2)
            .min()
            .unwrap_or(silent_deadline)
            .min(silent_deadline);
        tokio::select! {
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        stats.requests += 1;
                        let mut subs = vec![status_topic.clone()];
                        subs.extend(reply_topic.clone());
                        subs.extend(lwt_topic.clone());
                        for s in subs {
                            let _ = client.subscribe(s, QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == status_topic => {
                        if p.payload.len() > max_payload {
                            stats.oversize += 1;
                            continue;
                        }
                        let result = crate::transport::mqtt::decode(&set, &d.profile, &p.payload);
                        if let Ok(r) = &result {
                            known = Some(r.profile.clone());
                            silent_deadline = Instant::now() + period * 3;
                        }
                        shared.set_stats(&d.id, stats.clone());
                        if !send(&out, &d.id, result).await {
                            break;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if Some(&p.topic) == lwt_topic.as_ref() => {
                        // The device's last will: it is gone now, not three periods from now.
                        if &p.payload[..] == b"offline" {
                            silent_deadline = Instant::now() + period;
                            let err = TransportError::Timeout {
                                what: format!("{} says offline (last will)", p.topic),
                                after: Duration::ZERO,
                                detail: String::new(),
                            };
                            if !send(&out, &d.id, Err(err)).await {
                                break;
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if Some(&p.topic) == reply_topic.as_ref() => {
                        if p.payload.len() > max_payload {
                            stats.oversize += 1;
                            continue;
                        }
                        let Ok(reply) = serde_json::from_slice::<serde_json::Value>(&p.payload) else { continue };
                        let Some(id) = reply.get("id").and_then(|v| v.as_str()) else { continue };
                        if let Some((tx, drop_fields, _)) = pending.remove(id) {
                            let answer = if reply.get("ok").and_then(|v| v.as_bool()) == Some(true) {
                                let mut result = reply.get("result").cloned().unwrap_or_default();
                                if let Some(obj) = result.as_object_mut() {
                                    for f in &drop_fields {
                                        obj.remove(f);
                                    }
                                }
                                Ok(result)
                            } else {
                                Err(format!(
                                    "the device answered: {}",
                                    reply.get("error").and_then(|v| v.as_str()).unwrap_or("error")
                                ))
                            };
                            let _ = tx.send(answer);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        stats.reconnects += 1;
                        last_error = Some(e);
                    }
                }
            }
            _ = tokio::time::sleep_until(next_expiry) => {
                let now = Instant::now();
                let expired: Vec<String> = pending.iter().filter(|(_, p)| p.2 <= now).map(|(k, _)| k.clone()).collect();
                for id in expired {
                    if let Some((tx, _, _)) = pending.remove(&id) {
                        let _ = tx.send(Err("the device did not answer the command in time".into()));
                    }
                }
                if silent_deadline <= now {
                    stats.timeouts += 1;
                    shared.set_stats(&d.id, stats.clone());
                    silent_deadline = now + period;
                    let err = TransportError::Timeout {
                        what: format!("no status on {status_topic}"),
                        after: period * 3,
                        detail: last_error.as_ref().map(|e| format!("; broker: {e}")).unwrap_or_default(),
                    };
                    if !send(&out, &d.id, Err(err)).await {
                        break;
                    }
                }
            }
            Some(req) = requests.recv() => {
                let diag = known.as_ref().and_then(|p| crate::transport::find_diagnostic(p, &req.name).ok().cloned());
                let (Some(diag), Some(topic)) = (diag, cmd_topic.as_ref()) else {
                    let _ = req.reply.send(Err("the device has not answered yet, or its firmware takes no commands".into()));
                    continue;
                };
                let Some(command) = diag.command.clone() else {
                    let _ = req.reply.send(Err(format!("diagnostic `{}` is not a command", req.name)));
                    continue;
                };
                next_id += 1;
                let id = format!("tend-{}-{next_id}", std::process::id());
                let mut body = serde_json::Map::new();
                body.insert("id".into(), id.clone().into());
                body.insert("cmd".into(), command.into());
                for (k, v) in &diag.args {
                    body.insert(k.clone(), serde_json::to_value(v).unwrap_or_default());
                }
                let timeout = known
                    .as_ref()
                    .and_then(|p| p.doc.transport.reply_timeout)
                    .map(|t| t.0)
                    .unwrap_or(Duration::from_secs(5));
                match client.publish(topic.clone(), QoS::AtLeastOnce, false, serde_json::Value::Object(body).to_string()).await {
                    Ok(()) => {
                        pending.insert(id, (req.reply, diag.drop_fields.clone(), Instant::now() + timeout));
                    }
                    Err(e) => {
                        let _ = req.reply.send(Err(format!("cannot publish the command: {e}")));
                    }
                }
            }
        }
    }
    poller.abort();
}

/// Answers a hotline diagnostic: the agent's own views (`readings`, `transport`,
/// `episodes`, `outbox`) from memory, anything else only when the device's profile lists
/// it, through the task that owns the device's link. Nothing unlisted reaches a device.
pub async fn answer_diagnostic(
    shared: &Shared,
    outbox: Option<&crate::outbox::Outbox>,
    req: &tend_wire::DiagRequest,
    device_timeout: Duration,
) -> Result<serde_json::Value, String> {
    let known = lock(&shared.monitors).contains_key(&req.device);
    if !known {
        return Err(format!("this agent has no device `{}`", req.device));
    }
    match req.request.as_str() {
        "readings" => {
            let live = lock(&shared.monitors).get(&req.device).map(|m| m.live());
            serde_json::to_value(live).map_err(|e| e.to_string())
        }
        "episodes" => {
            let recent = lock(&shared.monitors)
                .get(&req.device)
                .map(|m| m.recent_episodes())
                .unwrap_or_default();
            serde_json::to_value(recent).map_err(|e| e.to_string())
        }
        "transport" => {
            let stats = lock(&shared.stats)
                .get(&req.device)
                .cloned()
                .unwrap_or_default();
            serde_json::to_value(stats).map_err(|e| e.to_string())
        }
        "outbox" => match outbox {
            Some(o) => serde_json::to_value(o.stats()).map_err(|e| e.to_string()),
            None => Err("no outbox".into()),
        },
        name => {
            let Some(profile) = shared.profile_of(&req.device) else {
                return Err("the device has not been identified yet, so its profile's requests are not known".into());
            };
            if !profile.diagnostic_names().any(|n| n == name) {
                return Err(format!(
                    "`{name}` is not a read-only request the profile {} lists (it lists: {})",
                    profile.id(),
                    profile.diagnostic_names().collect::<Vec<_>>().join(", ")
                ));
            }
            let link = lock(&shared.links).get(&req.device).cloned();
            let Some(link) = link else {
                return Err("the device's link is not running".into());
            };
            let (reply, answer) = oneshot::channel();
            link.send(DeviceRequest {
                device: req.device.clone(),
                name: name.to_string(),
                reply,
            })
            .await
            .map_err(|_| "the device's link has stopped".to_string())?;
            match tokio::time::timeout(device_timeout, answer).await {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => Err("the device's link dropped the request".into()),
                Err(_) => Err(format!(
                    "the device did not answer within {device_timeout:?}"
                )),
            }
        }
    }
}

/// Where a device's monitor memory is kept in the outbox.
fn memory_key(device: &str) -> String {
    format!("monitor/{device}")
}

/// Most records the recorder gathers into one commit.
const RECORD_GROUP_MAX: usize = 1000;

/// Turns observations into durable records: each through its device's monitor. What is
/// already waiting when the recorder looks goes to the outbox in as few commits as order
/// allows (devices polled in the same instant cost one fsync, not one each): readings are
/// gathered into one commit; an observation that changes a device's episodes or state is
/// committed on its own with the monitor's memory (after the gathered readings, so the
/// order of records is kept). `written` is poked after each commit so the uplink sends at
/// once.
pub async fn record(
    shared: Arc<Shared>,
    set: Arc<ProfileSet>,
    outbox: crate::outbox::Outbox,
    mut observations: mpsc::Receiver<Observation>,
    written: Arc<tokio::sync::Notify>,
) -> Result<(), crate::outbox::OutboxError> {
    while let Some(first) = observations.recv().await {
        let mut gathered: Vec<(String, Timestamp, RecordBody)> = Vec::new();
        let mut next = Some(first);
        while let Some(obs) = next.take() {
            let (bodies, memory) = {
                let mut monitors = lock(&shared.monitors);
                match monitors.get_mut(&obs.device) {
                    None => (Vec::new(), None),
                    Some(m) => {
                        let bodies = match obs.result {
                            Ok(read) => m.observe(obs.at, read),
                            Err(e) => {
                                tracing::debug!(device = %obs.device, error = %e, "read failed");
                                m.observe_failure(obs.at, &set)
                            }
                        };
                        // States and episodes change the monitor's memory: store it in the
                        // same commit as the records, so a crash cannot reopen or repeat
                        // them.
                        let remembers = bodies.iter().any(|b| {
                            matches!(b, RecordBody::State { .. } | RecordBody::Episode(_))
                        });
                        (bodies, remembers.then(|| m.memory()))
                    }
                }
            };
            let items = bodies.into_iter().map(|b| (obs.device.clone(), obs.at, b));
            match memory {
                Some(mem) => {
                    if !gathered.is_empty() {
                        outbox.append_many(std::mem::take(&mut gathered)).await?;
                    }
                    outbox
                        .append_many_with_state(items.collect(), &memory_key(&obs.device), mem)
                        .await?;
                    written.notify_one();
                }
                None => gathered.extend(items),
            }
            if gathered.len() < RECORD_GROUP_MAX {
                next = observations.try_recv().ok();
            }
        }
        if !gathered.is_empty() {
            outbox.append_many(gathered).await?;
            written.notify_one();
        }
    }
    Ok(())
}

/// Everything the running agent is made of, started: the outbox, the link tasks and the
/// recorder. The uplink is started by [`run`] on top of it; tests can drive the parts.
pub struct Started {
    pub shared: Arc<Shared>,
    pub outbox: crate::outbox::Outbox,
    /// Poked after every commit to the outbox.
    pub written: Arc<tokio::sync::Notify>,
    links: Vec<tokio::task::JoinHandle<()>>,
    recorder: tokio::task::JoinHandle<Result<(), crate::outbox::OutboxError>>,
}

impl Started {
    /// Opens the outbox in the data directory and starts reading every device.
    pub async fn start(loaded: &Loaded) -> Result<Started, crate::outbox::OutboxError> {
        let c = &loaded.config;
        let outbox = crate::outbox::Outbox::open(crate::outbox::OutboxConfig {
            path: c.data_dir.join("outbox.redb"),
            max_bytes: c.outbox.max_size.0,
            commit_window: c.outbox.commit_window.0,
        })
        .await?;
        let shared = Arc::new(Shared::default());
        {
            let mut monitors = lock(&shared.monitors);
            for d in &c.devices {
                let mut m = DeviceMonitor::new(&c.agent_id, &d.id, &d.profile, c.flap_damping.0);
                if let Some(mem) = outbox.load_state(&memory_key(&d.id))? {
                    if !m.restore(&mem) {
                        tracing::warn!(device = %d.id, "stored episode memory unreadable; starting afresh");
                    }
                }
                monitors.insert(d.id.clone(), m);
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        let links = spawn_links(loaded, shared.clone(), tx);
        let written = Arc::new(tokio::sync::Notify::new());
        let recorder = tokio::spawn(record(
            shared.clone(),
            Arc::new(loaded.profiles.clone()),
            outbox.clone(),
            rx,
            written.clone(),
        ));
        Ok(Started {
            shared,
            outbox,
            written,
            links,
            recorder,
        })
    }

    /// Stops reading, lets the recorder write what it has, and closes the outbox.
    pub async fn stop(self) -> Result<(), crate::outbox::OutboxError> {
        for l in &self.links {
            l.abort();
        }
        for l in self.links {
            let _ = l.await;
        }
        // The link tasks held the only senders: the recorder ends once it has written
        // everything they sent.
        match self.recorder.await {
            Ok(r) => r?,
            Err(e) => tracing::error!(error = %e, "recorder task failed"),
        }
        self.outbox.close().await
    }
}

/// The uplink settings of a config.
pub fn uplink_config(c: &crate::config::AgentConfig) -> crate::uplink::UplinkConfig {
    let mut u = crate::uplink::UplinkConfig::new(&c.agent_id, &c.site_id, &c.uplink.broker);
    u.ca_file = c.uplink.ca_file.clone();
    u.client_cert = c.uplink.client_cert.clone();
    u.client_key = c.uplink.client_key.clone();
    u.username = c.uplink.username.clone();
    u.password_file = c.uplink.password_file.clone();
    if let Some(k) = c.uplink.keep_alive {
        u.keep_alive = k.0;
    }
    u
}

/// Runs the agent until `shutdown`: reads every device, keeps every record durable until
/// the gateway acknowledges it, and answers diagnostics. Returns once the outbox is closed.
pub async fn run(
    loaded: Loaded,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let started = Started::start(&loaded).await?;
    let diag = {
        let shared = started.shared.clone();
        let outbox = started.outbox.clone();
        crate::uplink::diag_handler(move |req: tend_wire::DiagRequest| {
            let shared = shared.clone();
            let outbox = outbox.clone();
            async move { answer_diagnostic(&shared, Some(&outbox), &req, Duration::from_secs(8)).await }
        })
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let mut uplink = tokio::spawn(crate::uplink::run(
        uplink_config(&loaded.config),
        started.outbox.clone(),
        diag,
        started.written.clone(),
        async {
            let _ = stop_rx.await;
        },
    ));
    tracing::info!(
        agent = %loaded.config.agent_id,
        devices = loaded.config.devices.len(),
        broker = %loaded.config.uplink.broker,
        "agent running"
    );
    // The uplink ends early only on a config it cannot use (a bad CA file) or a failing
    // outbox; either stops the agent.
    let early = tokio::select! {
        _ = shutdown => None,
        r = &mut uplink => Some(r),
    };
    let _ = stop_tx.send(());
    let result = match early {
        Some(r) => r,
        None => uplink.await,
    };
    let stopped = started.stop().await;
    match result {
        Ok(r) => r?,
        Err(e) => anyhow::bail!("uplink task failed: {e}"),
    }
    stopped?;
    Ok(())
}

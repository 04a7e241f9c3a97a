//! `tend-agent run`: the running agent. One task per link reads its devices on schedule
//! (one task per serial port or RS-485 bus, polling every unit on it in turn, so a dead
//! unit costs its timeout and never stalls the others); a recorder turns every read into
//! records through each device's [`DeviceMonitor`] and makes them durable in the outbox;
//! the uplink sends them and answers the hotline's diagnostics.

use crate::config::Loaded;
use crate::device::LinkTarget;
use crate::monitor::DeviceMonitor;
use crate::transport::link::{self, LinkContext, RequestError, Unit};
use crate::transport::modbus::{Endpoint, ModbusBus};
use crate::transport::mqtt::mqtt_link;
use crate::transport::serial::SerialSource;
use crate::transport::Stats;
use jiff::Timestamp;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_profiles::{Profile, ProfileSet};
use tend_wire::RecordBody;
use tokio::sync::{mpsc, oneshot};

pub use crate::transport::link::{DeviceRequest, Observation};

/// What every part of the running agent can look at.
#[derive(Debug, Default)]
pub struct Shared {
    pub monitors: Mutex<BTreeMap<String, DeviceMonitor>>,
    /// Transport statistics by device.
    pub stats: Mutex<BTreeMap<String, Stats>>,
    /// The link task of each device, for device requests.
    pub links: Mutex<BTreeMap<String, mpsc::Sender<DeviceRequest>>>,
    /// The uplink's stats once it runs, for the `transport` diagnostic.
    pub uplink: Mutex<Option<crate::uplink::UplinkStatus>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking holder cannot leave these maps half-updated in a way that matters more
    // than stopping the agent would.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn set_stats(&self, device: &str, stats: Stats) {
        lock(&self.stats).insert(device.to_string(), stats);
    }

    /// The profile currently chosen for a device (known after its first read).
    pub fn profile_of(&self, device: &str) -> Option<Arc<Profile>> {
        lock(&self.monitors)
            .get(device)
            .and_then(|m| m.profile().cloned())
    }
}

/// Starts the link tasks for every configured device. Observations go to `out`.
pub fn spawn_links(
    loaded: &Loaded,
    shared: Arc<Shared>,
    out: mpsc::Sender<Observation>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let set = Arc::new(loaded.profiles.clone());
    let mut tasks = Vec::new();
    // The link context of a task that owns `devices`: their requests come to it.
    let context = |devices: &[&str]| {
        let (tx, rx) = mpsc::channel(4);
        let mut links = lock(&shared.links);
        for d in devices {
            links.insert(d.to_string(), tx.clone());
        }
        LinkContext {
            set: set.clone(),
            shared: shared.clone(),
            out: out.clone(),
            requests: rx,
        }
    };
    // Modbus units are grouped by link: one task per RS-485 port or TCP address.
    let mut buses: BTreeMap<String, (Endpoint, Vec<Unit>)> = BTreeMap::new();
    for d in &loaded.config.devices {
        let Some(first) = set.family(&d.profile).ok().and_then(|f| f.first().cloned()) else {
            // A loaded config has a profile for every device.
            tracing::error!(device = %d.id, profile = %d.profile, "no profile; device not read");
            continue;
        };
        let target = d.transport.resolve(&first.doc.transport);
        let unit = |address| Unit {
            device: d.id.clone(),
            model: d.profile.clone(),
            address,
            poll_interval: d.poll_interval(),
            reply_timeout: d.reply_timeout(),
        };
        match target {
            LinkTarget::Serial { ref port, baud } => {
                let source = SerialSource::new(port, baud, d.reply_timeout());
                let cx = context(&[&d.id]);
                tasks.push(tokio::spawn(link::run_polled(source, vec![unit(0)], cx)));
            }
            LinkTarget::Modbus {
                ref endpoint,
                unit: address,
            } => buses
                .entry(target.link_key())
                .or_insert_with(|| (endpoint.clone(), Vec::new()))
                .1
                .push(unit(address)),
            LinkTarget::Mqtt(m) => {
                let cx = context(&[&d.id]);
                tasks.push(tokio::spawn(mqtt_link(d.clone(), m, cx)));
            }
        }
    }
    for (_, (endpoint, units)) in buses {
        let ids: Vec<&str> = units.iter().map(|u| u.device.as_str()).collect();
        let cx = context(&ids);
        let bus = ModbusBus::new(endpoint);
        tasks.push(tokio::spawn(link::run_polled(bus, units, cx)));
    }
    tasks
}

/// Why a hotline diagnostic got no answer.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    #[error("this agent has no device `{0}`")]
    UnknownDevice(String),
    #[error("no outbox")]
    NoOutbox,
    #[error("the device has not been identified yet, so its profile's requests are not known")]
    NotIdentified,
    #[error(
        "`{name}` is not a read-only request the profile {profile} lists (it lists: {listed})"
    )]
    NotListed {
        name: String,
        profile: String,
        listed: String,
    },
    #[error("the device's link is not running")]
    NoLink,
    #[error("the device's link has stopped")]
    LinkStopped,
    #[error("the device's link dropped the request")]
    Dropped,
    #[error("the device did not answer within {0:?}")]
    DeviceTimeout(Duration),
    #[error(transparent)]
    Device(#[from] RequestError),
    #[error("{0}")]
    Encode(#[from] serde_json::Error),
}

/// Answers a hotline diagnostic: the agent's own views (`readings`, `transport`,
/// `episodes`, `outbox`) from memory, anything else only when the device's profile lists
/// it, through the task that owns the device's link. Nothing unlisted reaches a device.
pub async fn answer_diagnostic(
    shared: &Shared,
    outbox: Option<&crate::outbox::Outbox>,
    req: &tend_wire::DiagRequest,
    device_timeout: Duration,
) -> Result<serde_json::Value, DiagError> {
    let known = lock(&shared.monitors).contains_key(&req.device);
    if !known {
        return Err(DiagError::UnknownDevice(req.device.clone()));
    }
    Ok(match req.request.as_str() {
        "readings" => {
            let live = lock(&shared.monitors).get(&req.device).map(|m| m.live());
            serde_json::to_value(live)?
        }
        "episodes" => {
            let recent = lock(&shared.monitors)
                .get(&req.device)
                .map(|m| m.recent_episodes())
                .unwrap_or_default();
            serde_json::to_value(recent)?
        }
        "transport" => {
            let stats = lock(&shared.stats)
                .get(&req.device)
                .cloned()
                .unwrap_or_default();
            let mut answer = serde_json::to_value(stats)?;
            // The uplink's counters beside the device's: among them the messages refused
            // as forged or replayed, which nothing else outside the process shows.
            if let Some(uplink) = lock(&shared.uplink).as_ref() {
                answer["uplink"] = serde_json::to_value(uplink.snapshot())?;
            }
            answer
        }
        "outbox" => match outbox {
            Some(o) => serde_json::to_value(o.stats())?,
            None => return Err(DiagError::NoOutbox),
        },
        name => ask_device(shared, &req.device, name, device_timeout).await?,
    })
}

/// Hands a profile-listed request to the task that owns the device's link and waits for
/// its answer.
async fn ask_device(
    shared: &Shared,
    device: &str,
    name: &str,
    device_timeout: Duration,
) -> Result<serde_json::Value, DiagError> {
    let Some(profile) = shared.profile_of(device) else {
        return Err(DiagError::NotIdentified);
    };
    if !profile.diagnostic_names().any(|n| n == name) {
        return Err(DiagError::NotListed {
            name: name.to_string(),
            profile: profile.id().to_string(),
            listed: profile.diagnostic_names().collect::<Vec<_>>().join(", "),
        });
    }
    let link = lock(&shared.links).get(device).cloned();
    let Some(link) = link else {
        return Err(DiagError::NoLink);
    };
    let (reply, answer) = oneshot::channel();
    link.send(DeviceRequest {
        device: device.to_string(),
        name: name.to_string(),
        reply,
    })
    .await
    .map_err(|_| DiagError::LinkStopped)?;
    match tokio::time::timeout(device_timeout, answer).await {
        Ok(Ok(a)) => Ok(a?),
        Ok(Err(_)) => Err(DiagError::Dropped),
        Err(_) => Err(DiagError::DeviceTimeout(device_timeout)),
    }
}

/// Where a device's monitor memory is kept in the outbox.
fn memory_key(device: &str) -> String {
    format!("monitor/{device}")
}

/// The longest the outbox's [`observed_until`] may lag behind the observations while a
/// device holds a state without making records (a `down` device that stays silent, whose
/// state a restart turns `unknown` from that time on): past it, the next such observation
/// is noted on its own ([`Outbox::observed`]), a small commit no more than once per this
/// and only when nothing else was committed meanwhile. Any record carries its time along.
///
/// [`observed_until`]: crate::outbox::OutboxStats::observed_until
/// [`Outbox::observed`]: crate::outbox::Outbox::observed
const OBSERVED_HEARTBEAT: Duration = Duration::from_secs(5);

/// What starting again made of the restored monitors: the records of the time the agent
/// was not running (a restored state turned `unknown`, stamped when the agent stopped),
/// and the monitors' memories to store with them. The recorder commits them first.
#[derive(Debug, Default)]
pub struct Resumed {
    pub records: Vec<(String, Timestamp, RecordBody)>,
    /// (state key, memory)
    pub memories: Vec<(String, Vec<u8>)>,
}

/// When the agent stopped, as far as it can tell after a restart: the newest time of its
/// observations the outbox kept (`observed_until`, carried by every commit), so within a
/// poll interval and a linger of the stop for a device that was making records, and within
/// [`OBSERVED_HEARTBEAT`] for one that held its state silently. Never later than `now` (a
/// clock set back meanwhile); `now` when the outbox kept no such time (a file written by
/// an older build: the gap is then as short as it was before).
fn stopped_at(observed_until: Option<Timestamp>, now: Timestamp) -> Timestamp {
    observed_until.map_or(now, |t| t.min(now))
}

/// Most records the recorder gathers into one hand-over.
const RECORD_GROUP_MAX: usize = 1000;
/// Most hand-overs of readings whose commit the recorder has not seen yet; past this it
/// waits for the oldest before reading more (a slow disk slows the links, it does not
/// grow memory).
const COMMITS_IN_FLIGHT: usize = 64;

/// Turns observations into durable records: each through its device's monitor. Readings
/// are gathered for up to `linger` after the first of them and then handed to the outbox
/// in one piece without waiting for the disk ([`Outbox::append_soon`]), so the reads of a
/// link that polls its units in turn share one commit, and the outbox's writer wakes once
/// per group, not once per read. An observation that changes a device's episodes or
/// state is committed at once with the monitor's memory, after the readings gathered
/// before it (the order of records is kept). `written` is poked after each commit so the
/// uplink sends at once; nothing reaches the uplink before its commit returned, because
/// the uplink reads what is committed. The records of a restart (`resumed`) go first.
///
/// [`Outbox::append_soon`]: crate::outbox::Outbox::append_soon
pub async fn record(
    shared: Arc<Shared>,
    set: Arc<ProfileSet>,
    outbox: crate::outbox::Outbox,
    mut observations: mpsc::Receiver<Observation>,
    written: Arc<tokio::sync::Notify>,
    linger: Duration,
    resumed: Resumed,
) -> Result<(), crate::outbox::OutboxError> {
    let mut commits: VecDeque<crate::outbox::Commit> = VecDeque::new();
    if !resumed.records.is_empty() {
        commits.push_back(outbox.append_soon_with_states(resumed.records, resumed.memories)?);
    }
    let mut gathered: Vec<(String, Timestamp, RecordBody)> = Vec::new();
    // One timer for the whole group, armed by its first reading.
    let flush = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(flush);
    // When a time of observation last went to the outbox (with records or alone).
    let mut noted = tokio::time::Instant::now();
    loop {
        let obs = tokio::select! {
            biased;
            done = oldest(&mut commits), if !commits.is_empty() => {
                commits.pop_front();
                done?;
                written.notify_one();
                continue;
            }
            () = &mut flush, if !gathered.is_empty() => {
                commits.push_back(outbox.append_soon(std::mem::take(&mut gathered))?);
                continue;
            }
            obs = observations.recv(), if commits.len() < COMMITS_IN_FLIGHT => match obs {
                Some(obs) => obs,
                None => break,
            },
        };
        let Observation { device, at, result } = obs;
        let (bodies, memory, holds) = observe(&shared, &set, &device, at, result);
        if bodies.is_empty() {
            if holds && noted.elapsed() >= OBSERVED_HEARTBEAT {
                commits.push_back(outbox.observed(at)?);
                noted = tokio::time::Instant::now();
            }
            continue;
        }
        noted = tokio::time::Instant::now();
        let items = bodies.into_iter().map(|b| (device.clone(), at, b));
        match memory {
            Some(mem) => {
                if !gathered.is_empty() {
                    commits.push_back(outbox.append_soon(std::mem::take(&mut gathered))?);
                }
                outbox
                    .append_many_with_state(items.collect(), &memory_key(&device), mem)
                    .await?;
                written.notify_one();
            }
            None => {
                if gathered.is_empty() {
                    flush.as_mut().reset(tokio::time::Instant::now() + linger);
                }
                gathered.extend(items);
                if gathered.len() >= RECORD_GROUP_MAX {
                    commits.push_back(outbox.append_soon(std::mem::take(&mut gathered))?);
                }
            }
        }
    }
    if !gathered.is_empty() {
        commits.push_back(outbox.append_soon(gathered)?);
    }
    while let Some(done) = commits.pop_front() {
        done.await?;
        written.notify_one();
    }
    Ok(())
}

/// The oldest hand-over's commit (the caller makes sure there is one).
async fn oldest(
    commits: &mut VecDeque<crate::outbox::Commit>,
) -> Result<Vec<u64>, crate::outbox::OutboxError> {
    match commits.front_mut() {
        Some(c) => c.await,
        None => std::future::pending().await,
    }
}

/// Runs one observation through its device's monitor: the records it makes, the
/// monitor's memory when they change the device's episodes or state (stored in the same
/// commit as the records, so a crash cannot reopen or repeat them), and whether the device
/// holds a state other than `unknown` afterwards.
fn observe(
    shared: &Shared,
    set: &ProfileSet,
    device: &str,
    at: Timestamp,
    result: Result<crate::transport::DeviceRead, crate::transport::TransportError>,
) -> (Vec<RecordBody>, Option<Vec<u8>>, bool) {
    let mut monitors = lock(&shared.monitors);
    let Some(m) = monitors.get_mut(device) else {
        return (Vec::new(), None, false);
    };
    let bodies = match result {
        Ok(read) => m.observe(at, read),
        Err(e) => {
            tracing::debug!(device = %device, error = %e, "read failed");
            m.observe_failure(at, set)
        }
    };
    let remembers = bodies
        .iter()
        .any(|b| matches!(b, RecordBody::State { .. } | RecordBody::Episode(_)));
    let memory = remembers.then(|| m.memory());
    let holds = m
        .state()
        .is_some_and(|s| s != tend_profiles::DeviceState::Unknown);
    (bodies, memory, holds)
}

/// Every configured device's monitor, with the memory the outbox kept restored (an
/// unreadable one is logged and the monitor starts afresh), and what the restart makes of
/// them: a restored state other than `unknown` turns `unknown` at the moment the agent
/// stopped ([`stopped_at`]), for the time it was not running.
fn restore_monitors(
    c: &crate::config::AgentConfig,
    outbox: &crate::outbox::Outbox,
) -> Result<(BTreeMap<String, DeviceMonitor>, Resumed), crate::outbox::OutboxError> {
    // The stamp of the gap: the newest observation time the outbox kept rides along with
    // every commit, so it costs no write of its own and is as fresh as the last commit;
    // a device's own newest record may already be acknowledged and deleted.
    let stopped = stopped_at(outbox.stats().observed_until, Timestamp::now());
    let mut monitors = BTreeMap::new();
    let mut resumed = Resumed::default();
    for d in &c.devices {
        let mut m = DeviceMonitor::new(&c.agent_id, &d.id, &d.profile, c.flap_damping.0);
        let key = memory_key(&d.id);
        if let Some(mem) = outbox.load_state(&key)? {
            match m.restore(&mem) {
                None => {
                    tracing::warn!(device = %d.id, "stored episode memory unreadable; starting afresh")
                }
                Some(gap) if gap.is_empty() => {}
                Some(gap) => {
                    tracing::info!(device = %d.id, since = %stopped,
                        "the agent was not running: device state unknown since it stopped");
                    resumed
                        .records
                        .extend(gap.into_iter().map(|b| (d.id.clone(), stopped, b)));
                    resumed.memories.push((key, m.memory()));
                }
            }
        }
        monitors.insert(d.id.clone(), m);
    }
    Ok((monitors, resumed))
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
    /// Notified when the recorder stopped on an outbox error (a full disk): the agent
    /// then records nothing, and must not look alive.
    pub recorder_failed: Arc<tokio::sync::Notify>,
}

impl Started {
    /// Opens the outbox in the data directory and starts reading every device.
    pub async fn start(loaded: &Loaded) -> Result<Started, crate::outbox::OutboxError> {
        let c = &loaded.config;
        let outbox = crate::outbox::Outbox::open(crate::outbox::OutboxConfig {
            path: c.data_dir.join("outbox.redb"),
            max_bytes: c.outbox.max_size.0,
            commit_window: c.outbox.commit_window.0,
            linger: c.outbox.linger.0,
            ack_linger: crate::outbox::DEFAULT_ACK_LINGER,
            cache_bytes: crate::outbox::DEFAULT_CACHE_BYTES,
        })
        .await?;
        let (monitors, resumed) = restore_monitors(c, &outbox)?;
        let shared = Arc::new(Shared {
            monitors: Mutex::new(monitors),
            ..Shared::default()
        });
        let (tx, rx) = mpsc::channel(1024);
        let links = spawn_links(loaded, shared.clone(), tx);
        let written = Arc::new(tokio::sync::Notify::new());
        let recorder_failed = Arc::new(tokio::sync::Notify::new());
        let recording = record(
            shared.clone(),
            Arc::new(loaded.profiles.clone()),
            outbox.clone(),
            rx,
            written.clone(),
            c.outbox.linger.0,
            resumed,
        );
        let failed = recorder_failed.clone();
        let recorder = tokio::spawn(async move {
            let r = recording.await;
            if r.is_err() {
                failed.notify_one();
            }
            r
        });
        Ok(Started {
            shared,
            outbox,
            written,
            links,
            recorder,
            recorder_failed,
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
pub fn uplink_config(
    c: &crate::config::AgentConfig,
    key: tend_wire::AgentKey,
) -> crate::uplink::UplinkConfig {
    let mut u = crate::uplink::UplinkConfig::new(&c.agent_id, &c.site_id, &c.uplink.broker, key);
    u.ca_file = c.uplink.ca_file.clone();
    u.client_cert = c.uplink.client_cert.clone();
    u.client_key = c.uplink.client_key.clone();
    u.username = c.uplink.username.clone();
    u.password_file = c.uplink.password_file.clone();
    if let Some(k) = c.uplink.keep_alive {
        u.keep_alive = k.0;
    }
    if let Some(l) = c.uplink.linger {
        u.linger = l.0;
    }
    u
}

/// Why the running agent stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Outbox(#[from] crate::outbox::OutboxError),
    #[error(transparent)]
    Uplink(#[from] crate::uplink::UplinkError),
    #[error("uplink task failed: {0}")]
    UplinkTask(tokio::task::JoinError),
    #[error("the outbox cannot be written ({0}); stopped so that a supervisor restarts the agent once the disk has room")]
    Recording(String),
}

/// Runs the agent until `shutdown`: reads every device, keeps every record durable until
/// the gateway acknowledges it, and answers diagnostics. Returns once the outbox is closed.
pub async fn run(
    loaded: Loaded,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), RunError> {
    let started = Started::start(&loaded).await?;
    let diag = {
        let shared = started.shared.clone();
        let outbox = started.outbox.clone();
        crate::uplink::diag_handler(move |req: tend_wire::DiagRequest| {
            let shared = shared.clone();
            let outbox = outbox.clone();
            async move {
                answer_diagnostic(&shared, Some(&outbox), &req, Duration::from_secs(8))
                    .await
                    .map_err(crate::uplink::HandlerError::from)
            }
        })
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let uplink = crate::uplink::Uplink::new(
        uplink_config(&loaded.config, loaded.credentials.key.clone()),
        started.outbox.clone(),
        diag,
        started.written.clone(),
    );
    let uplink_status = uplink.status();
    *lock(&started.shared.uplink) = Some(uplink_status.clone());
    let mut uplink = tokio::spawn(uplink.run(async {
        let _ = stop_rx.await;
    }));
    tracing::info!(
        agent = %loaded.config.agent_id,
        devices = loaded.config.devices.len(),
        broker = %loaded.config.uplink.broker,
        "agent running"
    );
    // The uplink ends early only on a config it cannot use (a bad CA file) or a failing
    // outbox; either stops the agent.
    let mut recording_failed = false;
    let early = tokio::select! {
        _ = shutdown => None,
        r = &mut uplink => Some(r),
        _ = started.recorder_failed.notified() => {
            // Said to the gateway as the parting status instead of `offline`.
            recording_failed = true;
            uplink_status.set_parting_status("degraded: outbox cannot be written (disk full?)");
            None
        }
    };
    let _ = stop_tx.send(());
    let result = match early {
        Some(r) => r,
        None => uplink.await,
    };
    let stopped = started.stop().await;
    match result {
        Ok(r) => r?,
        Err(e) => return Err(RunError::UplinkTask(e)),
    }
    match stopped {
        Err(e) if recording_failed => Err(RunError::Recording(e.to_string())),
        Err(e) => Err(e.into()),
        Ok(()) if recording_failed => Err(RunError::Recording("the recorder stopped".into())),
        Ok(()) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_starts_at_the_newest_observation_kept_never_later_than_now() {
        let t = |s: i64| Timestamp::from_second(1_795_000_000 + s).unwrap();
        assert_eq!(stopped_at(Some(t(10)), t(18)), t(10));
        // A clock set back while the agent was not running: not in the future.
        assert_eq!(stopped_at(Some(t(30)), t(18)), t(18));
        // An outbox that kept no time (written by an older build): now.
        assert_eq!(stopped_at(None, t(18)), t(18));
    }
}

//! The link task: one task owns each serial port, RS-485 bus, Modbus TCP connection or
//! MQTT device subscription, reads its devices on schedule and sends every read (or its
//! failure) to the recorder as an [`Observation`]. Profile-listed diagnostics reach a
//! device only through the task that owns its link ([`DeviceRequest`]).
//!
//! Request/response transports (serial, Modbus RTU/TCP) implement [`DeviceSource`] and
//! share one loop, [`run_polled`]: every unit on the link is polled in turn on its own
//! interval, so a dead unit costs its own timeout and never stalls the others. A new
//! polled transport is one more [`DeviceSource`]. A device that pushes its status (MQTT)
//! runs its own loop ([`super::mqtt::mqtt_link`]) with the same [`LinkContext`].

use super::{DeviceRead, Stats, TransportError};
use crate::run::Shared;
use jiff::Timestamp;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tend_profiles::{Identity, Profile, ProfileSet, Snapshot};
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
    pub reply: oneshot::Sender<Result<serde_json::Value, RequestError>>,
}

/// Why a link task could not answer a device request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the device has not answered yet")]
    NotAnswered,
    #[error("the device has not answered yet, or its firmware takes no commands")]
    TakesNoCommands,
    #[error("diagnostic `{0}` is not a command")]
    NotACommand(String),
    #[error("the device answered: {0}")]
    DeviceRefused(String),
    #[error("the device did not answer the command in time")]
    CommandTimeout,
    #[error("cannot publish the command: {0}")]
    Publish(String),
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What a link task works with: the profiles, where statistics go, where reads go, and
/// the requests for its devices.
pub struct LinkContext {
    pub set: Arc<ProfileSet>,
    pub shared: Arc<Shared>,
    pub out: mpsc::Sender<Observation>,
    pub requests: mpsc::Receiver<DeviceRequest>,
}

impl LinkContext {
    /// Sends one read to the recorder; false once the recorder is gone.
    pub async fn send(&self, device: &str, result: Result<DeviceRead, TransportError>) -> bool {
        self.out
            .send(Observation {
                device: device.to_string(),
                at: Timestamp::now(),
                result,
            })
            .await
            .is_ok()
    }
}

/// One device on a link, as the link task addresses it.
#[derive(Debug, Clone)]
pub struct Unit {
    /// The device's id in the config.
    pub device: String,
    /// `vendor/model`.
    pub model: String,
    /// Modbus unit id; 0 on a link that carries one device.
    pub address: u8,
    pub poll_interval: Duration,
    /// Overrides the profile's reply timeout.
    pub reply_timeout: Option<Duration>,
}

/// A request/response transport, as a link task uses it. It never writes to a device:
/// every method only reads, and only what the profile lists.
pub trait DeviceSource: Send {
    /// Reads the identity of `unit` and chooses the profile for its firmware (opening the
    /// link first if it is closed).
    fn identify(
        &mut self,
        unit: &Unit,
        set: &ProfileSet,
    ) -> impl Future<Output = Result<(Identity, Arc<Profile>), TransportError>> + Send;

    /// Reads the points `profile` lists.
    fn poll(
        &mut self,
        unit: &Unit,
        profile: &Profile,
    ) -> impl Future<Output = Result<Snapshot, TransportError>> + Send;

    /// Runs a read-only diagnostic request the profile lists; personal fields removed.
    fn diagnostic(
        &mut self,
        unit: &Unit,
        profile: &Profile,
        name: &str,
    ) -> impl Future<Output = Result<serde_json::Value, TransportError>> + Send;

    /// Transport statistics of `unit`.
    fn stats(&self, unit: &Unit) -> Stats;

    /// After a failure: how long to leave the link alone at least (a port that could not
    /// be opened is retried with a growing back-off, not every poll).
    fn hold_off(&self) -> Option<Duration> {
        None
    }
}

/// A unit and what the link task knows of it.
struct Polled {
    unit: Unit,
    /// Identity and profile, from the last identification; cleared by a failed poll
    /// (the device may have been swapped or updated).
    known: Option<(Identity, Arc<Profile>)>,
    next: Instant,
}

/// Polls every unit of one link in turn, each on its own interval, and answers device
/// requests between reads.
pub async fn run_polled<S: DeviceSource>(mut source: S, units: Vec<Unit>, mut cx: LinkContext) {
    let mut units: Vec<Polled> = units
        .into_iter()
        .map(|unit| Polled {
            unit,
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
            Some(req) = cx.requests.recv() => {
                let answer = match units.iter().find(|u| u.unit.device == req.device) {
                    Some(Polled { unit, known: Some((_, p)), .. }) => source
                        .diagnostic(unit, p, &req.name)
                        .await
                        .map_err(RequestError::from),
                    _ => Err(RequestError::NotAnswered),
                };
                let _ = req.reply.send(answer);
                continue;
            }
        }
        let u = &mut units[i];
        u.next = Instant::now() + u.unit.poll_interval;
        let result = read(&mut source, u, &cx.set).await;
        cx.shared.set_stats(&u.unit.device, source.stats(&u.unit));
        if result.is_err() {
            if let Some(wait) = source.hold_off() {
                u.next = Instant::now() + wait.max(u.unit.poll_interval);
            }
        }
        if !cx.send(&u.unit.device, result).await {
            return;
        }
    }
}

/// Identifies the unit if it is not known yet, then polls it.
async fn read<S: DeviceSource>(
    source: &mut S,
    u: &mut Polled,
    set: &ProfileSet,
) -> Result<DeviceRead, TransportError> {
    let (identity, profile) = match u.known.clone() {
        Some(k) => k,
        None => {
            let k = source.identify(&u.unit, set).await?;
            u.known = Some(k.clone());
            k
        }
    };
    match source.poll(&u.unit, &profile).await {
        Ok(snapshot) => Ok(DeviceRead {
            identity,
            profile,
            snapshot,
        }),
        Err(e) => {
            u.known = None;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// Unit 1 answers at once; unit 2 is dead and costs `dead_timeout` per attempt. With
    /// `closed`, the source asks for a hold-off after every failure.
    struct FakeSource {
        profile: Arc<Profile>,
        dead_timeout: Duration,
        closed: bool,
        attempts: Arc<AtomicU32>,
    }

    impl DeviceSource for FakeSource {
        async fn identify(
            &mut self,
            unit: &Unit,
            _set: &ProfileSet,
        ) -> Result<(Identity, Arc<Profile>), TransportError> {
            if unit.address == 2 {
                self.attempts.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.dead_timeout).await;
                return Err(TransportError::Timeout {
                    what: "unit 2".into(),
                    after: self.dead_timeout,
                    detail: String::new(),
                });
            }
            let identity = Identity {
                firmware: "5.2.1".into(),
                serial: None,
            };
            Ok((identity, self.profile.clone()))
        }

        async fn poll(
            &mut self,
            _unit: &Unit,
            _profile: &Profile,
        ) -> Result<Snapshot, TransportError> {
            Ok(Snapshot::default())
        }

        async fn diagnostic(
            &mut self,
            unit: &Unit,
            _profile: &Profile,
            name: &str,
        ) -> Result<serde_json::Value, TransportError> {
            Ok(serde_json::json!({ "unit": unit.address, "name": name }))
        }

        fn stats(&self, _unit: &Unit) -> Stats {
            Stats::default()
        }

        fn hold_off(&self) -> Option<Duration> {
            self.closed.then_some(Duration::from_millis(400))
        }
    }

    fn unit(address: u8) -> Unit {
        Unit {
            device: format!("dev-{address}"),
            model: "aeris/av-500".into(),
            address,
            poll_interval: Duration::from_millis(20),
            reply_timeout: None,
        }
    }

    struct Running {
        reads: mpsc::Receiver<Observation>,
        requests: mpsc::Sender<DeviceRequest>,
        attempts: Arc<AtomicU32>,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(closed: bool) -> Running {
        let set = Arc::new(ProfileSet::builtin().expect("built-in profiles"));
        let profile = set.family("aeris/av-500").expect("av-500")[0].clone();
        let attempts = Arc::new(AtomicU32::new(0));
        let source = FakeSource {
            profile,
            dead_timeout: Duration::from_millis(100),
            closed,
            attempts: attempts.clone(),
        };
        let (out, reads) = mpsc::channel(256);
        let (requests, rx) = mpsc::channel(4);
        let cx = LinkContext {
            set,
            shared: Arc::new(Shared::default()),
            out,
            requests: rx,
        };
        let task = tokio::spawn(run_polled(source, vec![unit(1), unit(2)], cx));
        Running {
            reads,
            requests,
            attempts,
            task,
        }
    }

    async fn ask(r: &Running, device: &str) -> Result<serde_json::Value, RequestError> {
        let (reply, answer) = oneshot::channel();
        r.requests
            .send(DeviceRequest {
                device: device.into(),
                name: "status-registers".into(),
                reply,
            })
            .await
            .expect("link running");
        answer.await.expect("answered")
    }

    #[tokio::test]
    async fn a_dead_unit_costs_its_timeout_and_requests_reach_the_owning_unit() {
        let mut r = start(false);
        let (mut good, mut failed) = (0, 0);
        let deadline = Instant::now() + Duration::from_millis(1500);
        while let Ok(Some(obs)) = tokio::time::timeout_at(deadline, r.reads.recv()).await {
            match (obs.device.as_str(), obs.result.is_ok()) {
                ("dev-1", true) => good += 1,
                ("dev-2", false) => failed += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        // Unit 2 costs 100 ms per attempt; unit 1 is read between its attempts.
        assert!(failed >= 2, "{failed} failures of the dead unit");
        assert!(
            good >= failed,
            "{good} reads of the live unit, {failed} failures"
        );
        let answer = ask(&r, "dev-1").await.expect("unit 1 answers");
        assert_eq!(answer["unit"], 1);
        assert!(matches!(
            ask(&r, "dev-2").await,
            Err(RequestError::NotAnswered)
        ));
        r.task.abort();
    }

    #[tokio::test]
    async fn a_failed_link_is_left_alone_for_its_hold_off() {
        let mut r = start(true);
        let deadline = Instant::now() + Duration::from_millis(1000);
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, r.reads.recv()).await {}
        // 100 ms per attempt and 400 ms held off after it: at most 3 in a second, where
        // a 20 ms poll interval alone would allow 9.
        let n = r.attempts.load(Ordering::SeqCst);
        assert!((1..=3).contains(&n), "{n} attempts");
        r.task.abort();
    }
}

//! Remote diagnostics: the hotline asks, the gateway publishes a request on the owning
//! agent's `diag/req` topic with a fresh correlation id and waits for the answer on
//! `diag/resp`.
//!
//! Only the names the device's profile lists (plus the agent's built-ins) are ever sent:
//! the check is here, before anything leaves the gateway, and again in the agent.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tend_wire::{DiagRequest, DiagResponse};
use tokio::sync::{mpsc, oneshot};

/// Requests the agent answers itself for every device.
pub const BUILTIN: [&str; 4] = ["readings", "transport", "episodes", "outbox"];

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DiagError {
    #[error("device {0:?} is not in the fleet or has not been heard from")]
    UnknownDevice(String),
    #[error("{request:?} is not a diagnostic of {device:?}; allowed: {allowed}")]
    NotListed {
        device: String,
        request: String,
        allowed: String,
    },
    #[error("agent {agent:?} did not answer within {secs} s")]
    Timeout { agent: String, secs: u64 },
    #[error("the gateway is not connected to the broker")]
    NotConnected,
    #[error(transparent)]
    Encode(#[from] tend_wire::EncodeError),
}

/// A request to publish on the agent's `diag/req` topic (the link seals it with the
/// agent's key).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub agent: String,
    pub request: DiagRequest,
}

/// What an answer must match: the agent it was asked of, and the device and request.
#[derive(Debug)]
struct Waiter {
    agent: String,
    device: String,
    request: String,
    tx: oneshot::Sender<DiagResponse>,
}

/// Sends diagnostic requests and routes the answers back to whoever asked.
#[derive(Debug, Clone)]
pub struct DiagClient {
    publish: mpsc::Sender<Outgoing>,
    waiting: Arc<Mutex<HashMap<String, Waiter>>>,
    gateway: String,
}

impl DiagClient {
    /// `publish` is drained by the MQTT link, which publishes each on
    /// `tend/v1/<agent>/diag/req`.
    pub fn new(gateway: &str) -> (DiagClient, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(64);
        (
            DiagClient {
                publish: tx,
                waiting: Arc::default(),
                gateway: gateway.to_string(),
            },
            rx,
        )
    }

    /// Asks `agent` for `request` on `device` and waits up to `timeout` for the answer.
    /// The caller has already checked the name against the profile (see [`allowed`]).
    pub async fn ask(
        &self,
        agent: &str,
        device: &str,
        request: &str,
        timeout: Duration,
    ) -> Result<DiagResponse, DiagError> {
        let id = correlation_id(&self.gateway);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(
            id.clone(),
            Waiter {
                agent: agent.to_string(),
                device: device.to_string(),
                request: request.to_string(),
                tx,
            },
        );
        // The agent answers an id once and not after this, judged by the gateway time it
        // has seen: a request recorded and replayed later gets no answer.
        let ttl = jiff::SignedDuration::try_from(timeout).unwrap_or(jiff::SignedDuration::MAX);
        let expires_at = jiff::Timestamp::now()
            .checked_add(ttl)
            .unwrap_or(jiff::Timestamp::MAX);
        let out = Outgoing {
            agent: agent.to_string(),
            request: DiagRequest {
                v: tend_wire::VERSION,
                id: id.clone(),
                device: device.to_string(),
                request: request.to_string(),
                expires_at,
            },
        };
        if self.publish.send(out).await.is_err() {
            self.lock().remove(&id);
            return Err(DiagError::NotConnected);
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        self.lock().remove(&id);
        match answer {
            Ok(Ok(resp)) => Ok(resp),
            _ => Err(DiagError::Timeout {
                agent: agent.to_string(),
                secs: timeout.as_secs(),
            }),
        }
    }

    /// Hands an answer from `agent`'s `diag/resp` (already authenticated as the agent's)
    /// to its waiter, once: it must name the id, device and request that were asked of
    /// that agent. Answers nobody waits for (another gateway's, too late, or not matching)
    /// are ignored. Returns whether someone was waiting.
    pub fn answer(&self, agent: &str, resp: DiagResponse) -> bool {
        let mut waiting = self.lock();
        let matches = waiting.get(&resp.id).is_some_and(|w| {
            w.agent == agent && w.device == resp.device && w.request == resp.request
        });
        if !matches {
            return false;
        }
        match waiting.remove(&resp.id) {
            Some(w) => w.tx.send(resp).is_ok(),
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The names a device may be asked: the built-ins and its profile's `[[diagnostic]]`s.
pub fn allowed(profile_requests: &[String]) -> Vec<String> {
    BUILTIN
        .iter()
        .map(|s| s.to_string())
        .chain(profile_requests.iter().cloned())
        .collect()
}

/// Unguessable, so an answer cannot be made up in advance for a request to come.
fn correlation_id(gateway: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let random = tend_wire::seal::random_hex(12).unwrap_or_else(|_| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(n);
        format!("{:016x}", h.finish())
    });
    format!("{gateway}-{n}-{random}")
}

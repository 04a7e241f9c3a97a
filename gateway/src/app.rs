//! The running gateway's shared parts: the store, what ingest needs, metrics, the
//! diagnostics client and what is known about the agents' connections. The MQTT link,
//! the forwarder and the hotline API each hold a clone.

use crate::diag::DiagClient;
use crate::ingest::IngestContext;
use crate::metrics::Metrics;
use crate::store::{DeviceLive, GatewayStore};
use jiff::Timestamp;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the gateway last heard on an agent's status topic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentStatus {
    /// `online` or `offline`.
    pub status: String,
    /// Gateway time it was heard.
    pub since: Timestamp,
}

#[derive(Clone, Debug)]
pub struct Gateway {
    /// The store (redb by default), shared by ingest, the forwarder and the API.
    pub store: Arc<dyn GatewayStore>,
    pub cx: Arc<IngestContext>,
    pub metrics: Arc<Metrics>,
    pub diag: DiagClient,
    pub agents: Arc<Mutex<BTreeMap<String, AgentStatus>>>,
    /// Woken when ingest queued work for the forwarder.
    pub forwarder_wake: Arc<tokio::sync::Notify>,
    /// Whether a backend is configured (else tickets are kept by the gateway).
    pub backend_configured: bool,
    /// How long a hotline diagnostic waits for the agent.
    pub diag_timeout: Duration,
    /// The enrolled agents and their keys: every message on an agent's topics is checked
    /// against them.
    pub trust: Arc<crate::trust::Trust>,
    /// Refused messages are logged once a minute per agent and reason.
    pub refusal_log: Arc<tend_mqtt::LogLimit>,
}

impl Gateway {
    /// A gateway's shared parts around `store`: fresh metrics, no agent heard yet.
    pub fn new(
        store: Arc<dyn GatewayStore>,
        cx: IngestContext,
        diag: DiagClient,
        trust: Arc<crate::trust::Trust>,
        backend_configured: bool,
        diag_timeout: Duration,
    ) -> Gateway {
        Gateway {
            store,
            cx: Arc::new(cx),
            metrics: Arc::new(Metrics::new()),
            diag,
            agents: Arc::default(),
            forwarder_wake: Arc::default(),
            backend_configured,
            diag_timeout,
            trust,
            refusal_log: Arc::new(tend_mqtt::LogLimit::per_minute()),
        }
    }

    /// The diagnostic names the device's profile lists (empty until the device has been
    /// identified: without the firmware the gateway cannot know the profile).
    pub fn profile_diagnostics(&self, device: &DeviceLive) -> Vec<String> {
        let Some(id) = &device.identity else {
            return Vec::new();
        };
        match self.cx.profiles.select(&id.model, &id.firmware) {
            Ok(p) => p.diagnostic_names().map(str::to_string).collect(),
            Err(_) => Vec::new(),
        }
    }

    pub fn agent_status(&self, agent: &str) -> Option<AgentStatus> {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent)
            .cloned()
    }

    pub fn set_agent_status(&self, agent: &str, status: &str, now: Timestamp) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                agent.to_string(),
                AgentStatus {
                    status: status.to_string(),
                    since: now,
                },
            );
    }
}

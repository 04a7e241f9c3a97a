//! Prometheus metrics of the gateway, served on `GET /metrics` in the text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadlineLabel {
    pub deadline: String,
    pub status: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Batches received on `tend/v1/+/up`.
    pub batches: Counter,
    /// Records applied for the first time.
    pub records: Counter,
    /// Records received again (replays, lost acks): acked, not reapplied.
    pub duplicates: Counter,
    /// Records with the (agent, incarnation, seq) of a stored one and other content:
    /// acked, not applied.
    pub conflicting_records: Counter,
    /// Messages on the agents' topics that could not be decoded.
    pub malformed: Counter,
    /// Readings agents reported dropped because their outbox was full.
    pub dropped_readings: Counter,
    /// Batches that could not be stored (not acked: the agent resends).
    pub store_errors: Counter,
    pub tickets_opened: Counter,
    pub ticket_events: Counter,
    /// Forwarder attempts by outcome (`sent`, `retry`, `failed`).
    pub forward_attempts: Family<OutcomeLabel, Counter>,
    /// Jobs waiting in the forwarder's outbox.
    pub forward_queue: Gauge,
    /// Hotline diagnostics by outcome (`ok`, `error`, `timeout`, `refused`).
    pub diagnostics: Family<OutcomeLabel, Counter>,
    /// Fleet devices by availability state.
    pub devices: Family<StateLabel, Gauge>,
    /// Fleet devices by the status of this month's downtime budget (`ok`, `at_risk`,
    /// `breached`).
    pub devices_budget: Family<StatusLabel, Gauge>,
    /// Deadlines of the gateway's tickets by kind and status (`pending`, `at_risk`, `met`,
    /// `missed`), as the SLA watch last judged them.
    pub sla_deadlines: Family<DeadlineLabel, Gauge>,
    /// `sla_at_risk` and `sla_missed` events queued for the backend, by deadline and status.
    pub sla_events: Family<DeadlineLabel, Counter>,
    /// Hotline requests refused for a missing or wrong token, or while their address waits.
    pub auth_failures: Counter,
    /// Messages on agents' topics not believed (`unsigned`, `bad_signature`,
    /// `unknown_agent`, `revoked`, `wrong_agent`, ...): dropped unread.
    pub rejected: Family<ReasonLabel, Counter>,
    /// Records about devices not in the fleet file (kept without tickets, or dropped when
    /// the stray list is full).
    pub unknown_device_records: Counter,
    pub stray_records_dropped: Counter,
    /// 1 while the last batch could not be stored (a full disk, ...), else 0.
    pub store_failing: Gauge,
    /// Agents whose clock is off by more than `clock_tolerance`.
    pub agents_clock_skewed: Gauge,
    skewed: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// CONNECTs the embedded broker refused; the broker counts them itself
    /// (`tend_mqtt::broker::BrokerAccess::refused`).
    pub broker_refused: Arc<AtomicU64>,
}

/// A counter kept by someone else as a bare atomic (the embedded broker's refusals).
#[derive(Debug)]
struct SharedCounter(Arc<AtomicU64>);

impl prometheus_client::encoding::EncodeMetric for SharedCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(
            &self.0.load(Ordering::Relaxed),
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Counter
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tend_gateway");
        let m = Metrics {
            registry: Registry::default(),
            batches: Counter::default(),
            records: Counter::default(),
            duplicates: Counter::default(),
            conflicting_records: Counter::default(),
            malformed: Counter::default(),
            dropped_readings: Counter::default(),
            store_errors: Counter::default(),
            tickets_opened: Counter::default(),
            ticket_events: Counter::default(),
            forward_attempts: Family::default(),
            forward_queue: Gauge::default(),
            diagnostics: Family::default(),
            devices: Family::default(),
            devices_budget: Family::default(),
            sla_deadlines: Family::default(),
            sla_events: Family::default(),
            auth_failures: Counter::default(),
            rejected: Family::default(),
            agents_clock_skewed: Gauge::default(),
            store_failing: Gauge::default(),
            unknown_device_records: Counter::default(),
            stray_records_dropped: Counter::default(),
            skewed: Default::default(),
            broker_refused: Arc::default(),
        };
        registry.register("batches", "Batches received from agents", m.batches.clone());
        registry.register(
            "records",
            "Records stored for the first time",
            m.records.clone(),
        );
        registry.register(
            "duplicate_records",
            "Records received again and acked without reapplying",
            m.duplicates.clone(),
        );
        registry.register(
            "conflicting_records",
            "Records with the agent, outbox incarnation and seq of a stored record and other content (acked, not applied)",
            m.conflicting_records.clone(),
        );
        registry.register(
            "malformed_messages",
            "Messages on agent topics that could not be decoded",
            m.malformed.clone(),
        );
        registry.register(
            "dropped_readings",
            "Readings agents reported dropped because their outbox was full",
            m.dropped_readings.clone(),
        );
        registry.register(
            "store_errors",
            "Batches that could not be stored (not acknowledged)",
            m.store_errors.clone(),
        );
        registry.register(
            "tickets_opened",
            "Tickets decided",
            m.tickets_opened.clone(),
        );
        registry.register(
            "ticket_events",
            "Ticket events decided",
            m.ticket_events.clone(),
        );
        registry.register(
            "forward_attempts",
            "Backend requests by outcome",
            m.forward_attempts.clone(),
        );
        registry.register(
            "forward_queue",
            "Jobs waiting in the forwarder's outbox",
            m.forward_queue.clone(),
        );
        registry.register(
            "diagnostics",
            "Hotline diagnostics by outcome",
            m.diagnostics.clone(),
        );
        registry.register("devices", "Fleet devices by state", m.devices.clone());
        registry.register(
            "devices_budget",
            "Fleet devices by the status of this month's downtime budget (ok, at_risk: less than half left, breached: the target can no longer be met)",
            m.devices_budget.clone(),
        );
        registry.register(
            "sla_deadlines",
            "Ticket deadlines by kind (respond, onsite, plan, resolve) and status (pending, at_risk, met, missed)",
            m.sla_deadlines.clone(),
        );
        registry.register(
            "sla_events",
            "sla_at_risk and sla_missed events queued for the backend, by deadline",
            m.sla_events.clone(),
        );
        registry.register(
            "auth_failures",
            "Hotline requests refused for a missing or wrong token, or while their address waits",
            m.auth_failures.clone(),
        );
        registry.register(
            "rejected_messages",
            "Messages on agents' topics that failed authentication or named another agent, by reason (dropped)",
            m.rejected.clone(),
        );
        registry.register(
            "broker_refused_connections",
            "Connections the embedded broker refused: no credentials or refused ones",
            SharedCounter(m.broker_refused.clone()),
        );
        registry.register(
            "unknown_device_records",
            "Records about devices the fleet file does not list (no tickets)",
            m.unknown_device_records.clone(),
        );
        registry.register(
            "stray_records_dropped",
            "Records about devices not in the fleet file dropped because 32 such devices are kept already",
            m.stray_records_dropped.clone(),
        );
        registry.register(
            "store_failing",
            "1 while batches cannot be stored (a full disk: the store reopens itself once space is back), else 0",
            m.store_failing.clone(),
        );
        registry.register(
            "agents_clock_skewed",
            "Agents whose clock is off the gateway's by more than clock_tolerance (their records are taken in gateway time)",
            m.agents_clock_skewed.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn outcome(family: &Family<OutcomeLabel, Counter>, outcome: &str) {
        family
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// Notes whether `agent`'s clock is skewed; returns whether that changed.
    pub fn agent_clock(&self, agent: &str, skewed: bool) -> bool {
        let mut set = self.skewed.lock().unwrap_or_else(|p| p.into_inner());
        let changed = if skewed {
            set.insert(agent.to_string())
        } else {
            set.remove(agent)
        };
        self.agents_clock_skewed.set(set.len() as i64);
        changed
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

//! The gateway's store: everything it must not forget, in one redb file.
//!
//! - which (agent, seq) it has stored, so a replayed record is acknowledged again but
//!   applied once;
//! - each device's live picture (identity, state, last readings, open episodes) and its
//!   whole life (every state change, episode change, ticket and maintenance event);
//! - the availability ledger's transitions, keyed by the agent's time;
//! - the tickets with their forwarding state, and the forwarder's outbox of jobs.
//!
//! Every batch from an agent is applied in one write transaction ([`Store::apply`]), so a
//! gateway killed at any moment has either all of a batch or none of it, and acks only
//! what committed. The rest of the gateway sees the store through this one type, so the
//! embedded redb can give way to a shared database without touching ingest or tickets.

use crate::ledger::Ledger;
use jiff::Timestamp;
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tend_profiles::{DeviceState, FaultClass, SignalKind};
use tend_wire::EpisodeEvent;

/// (agent, seq) of every record stored.
pub(crate) const SEEN: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
/// device id → [`DeviceLive`] (JSON).
pub(crate) const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// (device, agent time in ns, seq) → state (`DeviceState` as u8).
pub(crate) const TRANSITIONS: TableDefinition<(&str, i128, u64), u8> =
    TableDefinition::new("transitions");
/// (device, time in ns, unique n) → [`LifeEvent`] (JSON).
pub(crate) const HISTORY: TableDefinition<(&str, i128, u64), &[u8]> =
    TableDefinition::new("history");
/// ticket key → [`TicketRecord`] (JSON).
pub(crate) const TICKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("tickets");
/// (device, ticket key): the tickets of a device.
pub(crate) const DEVICE_TICKETS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("device_tickets");
/// job id → [`Job`] (JSON): what the forwarder still has to send, in order.
pub(crate) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// counters.
pub(crate) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, thiserror::Error)]
#[error("store {path}: {what}: {detail}")]
pub struct StoreError {
    pub path: PathBuf,
    pub what: &'static str,
    pub detail: String,
}

/// One reading as last seen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveReading {
    pub name: String,
    /// JSON, not `Value`: a NaN reading is stored (and shown) as null.
    pub value: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub unit: Option<String>,
    pub time: Timestamp,
}

/// What the device said it is (its agent's Identity record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveIdentity {
    pub model: String,
    pub firmware: String,
    pub serial: Option<String>,
    pub profile: String,
    pub at: Timestamp,
}

/// A device's live picture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceLive {
    pub id: String,
    /// The agent that last reported it.
    pub agent: String,
    pub site_reported: String,
    pub identity: Option<LiveIdentity>,
    pub state: DeviceState,
    /// Agent time of the transition into `state`.
    pub state_since: Option<Timestamp>,
    /// Agent time of the latest record about the device.
    pub last_seen: Option<Timestamp>,
    pub readings: BTreeMap<String, LiveReading>,
    /// Open episodes by episode id: the latest change seen of each.
    pub open_episodes: BTreeMap<String, EpisodeEvent>,
    /// Readings the agent's outbox dropped when full.
    #[serde(default)]
    pub dropped_readings: u64,
}

impl DeviceLive {
    pub fn new(id: &str, agent: &str, site: &str) -> Self {
        DeviceLive {
            id: id.into(),
            agent: agent.into(),
            site_reported: site.into(),
            identity: None,
            state: DeviceState::Unknown,
            state_since: None,
            last_seen: None,
            readings: BTreeMap::new(),
            open_episodes: BTreeMap::new(),
            dropped_readings: 0,
        }
    }
}

/// One line of a device's life record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LifeEvent {
    Identified {
        at: Timestamp,
        firmware: String,
        serial: Option<String>,
        profile: String,
    },
    State {
        at: Timestamp,
        from: DeviceState,
        to: DeviceState,
    },
    Episode {
        at: Timestamp,
        event: EpisodeEvent,
    },
    TicketOpened {
        at: Timestamp,
        ticket_key: String,
        kind: SignalKind,
        code: String,
        class: FaultClass,
    },
    TicketEvent {
        at: Timestamp,
        ticket_key: String,
        event: String,
    },
    ReadingsDropped {
        at: Timestamp,
        count: u64,
    },
}

/// Where a ticket or an event stands with the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardState {
    /// Waiting to be sent (or no backend is configured: kept by the gateway).
    Pending,
    /// The backend has it.
    Sent,
    /// The backend refused it for good (400, 409, 413, 404): kept, shown, not resent.
    Failed,
}

/// Forwarding bookkeeping of a ticket or an event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forwarding {
    pub state: ForwardState,
    pub attempts: u32,
    /// The backend's last error (status and body) or the transport error.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub next_attempt: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sent_at: Option<Timestamp>,
}

impl Forwarding {
    pub fn pending() -> Self {
        Forwarding {
            state: ForwardState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt: None,
            sent_at: None,
        }
    }
}

/// An event on a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketEventRecord {
    pub idempotency_key: String,
    /// `fault_cleared`, `fault_recurred`, `escalated`, `note`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exact body sent (built once: a key resent with another body is a 409).
    pub body: serde_json::Value,
    pub forward: Forwarding,
}

/// A ticket the gateway opened (or is opening).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketRecord {
    /// The Idempotency-Key.
    pub key: String,
    pub device: String,
    pub agent: String,
    pub kind: SignalKind,
    pub code: String,
    /// The class now (after escalations).
    pub class: FaultClass,
    /// The episode that opened it, then every recurrence attached.
    pub episodes: Vec<String>,
    /// Open in the backend (not resolved or closed) as far as the gateway knows.
    pub open: bool,
    /// Agent time the fault was detected.
    pub detected_at: Timestamp,
    /// Gateway time the ticket was decided.
    pub created_at: Timestamp,
    /// The exact body of `POST /api/v1/tickets`.
    pub body: serde_json::Value,
    /// The backend's ticket id once created.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ticket_id: Option<String>,
    /// The backend's status (`open`, `acknowledged`, ...) when last read.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub backend_status: Option<String>,
    pub forward: Forwarding,
    pub events: Vec<TicketEventRecord>,
}

impl TicketRecord {
    pub fn known(&self) -> crate::ticket::KnownTicket {
        crate::ticket::KnownTicket {
            key: self.key.clone(),
            device: self.device.clone(),
            code: self.code.clone(),
            kind: self.kind,
            class: self.class,
            episodes: self.episodes.clone(),
            open: self.open,
        }
    }
}

/// A forwarder job: create the ticket `ticket_key`, or send its event `event` (an event's
/// Idempotency-Key). The bodies live in the ticket record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub ticket_key: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub event: Option<String>,
}

/// What became of a job when the forwarder tried it.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// Created (or already existed: 200) with this backend ticket id; or the event was
    /// accepted (`ticket_id` is then the ticket's).
    Sent { ticket_id: String },
    /// Transient: try again at `next_attempt`.
    Retry {
        error: String,
        next_attempt: Timestamp,
    },
    /// Permanent: kept and shown as failed, not resent.
    Failed { error: String },
}

pub(crate) fn state_code(s: DeviceState) -> u8 {
    match s {
        DeviceState::Up => 0,
        DeviceState::Down => 1,
        DeviceState::Maintenance => 2,
        DeviceState::Unknown => 3,
    }
}

pub(crate) fn state_of(c: u8) -> DeviceState {
    match c {
        0 => DeviceState::Up,
        1 => DeviceState::Down,
        2 => DeviceState::Maintenance,
        _ => DeviceState::Unknown,
    }
}

pub(crate) fn ns(t: Timestamp) -> i128 {
    t.as_nanosecond()
}

/// The gateway's durable store.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (or creates) `dir/gateway.redb`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("gateway.redb");
        let err = |what: &'static str| {
            let path = path.clone();
            move |e: redb::Error| StoreError {
                path: path.clone(),
                what,
                detail: e.to_string(),
            }
        };
        std::fs::create_dir_all(dir).map_err(|e| StoreError {
            path: dir.to_path_buf(),
            what: "create data directory",
            detail: e.to_string(),
        })?;
        let db = Database::create(&path).map_err(|e| err("open")(e.into()))?;
        let txn = db.begin_write().map_err(|e| err("begin write")(e.into()))?;
        {
            let e = err("create tables");
            txn.open_table(SEEN).map_err(|x| e(x.into()))?;
            txn.open_table(DEVICES).map_err(|x| e(x.into()))?;
            txn.open_table(TRANSITIONS).map_err(|x| e(x.into()))?;
            txn.open_table(HISTORY).map_err(|x| e(x.into()))?;
            txn.open_table(TICKETS).map_err(|x| e(x.into()))?;
            txn.open_table(DEVICE_TICKETS).map_err(|x| e(x.into()))?;
            txn.open_table(OUTBOX).map_err(|x| e(x.into()))?;
            txn.open_table(META).map_err(|x| e(x.into()))?;
        }
        txn.commit().map_err(|e| err("commit")(e.into()))?;
        Ok(Store { db, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    pub(crate) fn error<E: Into<redb::Error>>(
        &self,
        what: &'static str,
    ) -> impl Fn(E) -> StoreError + '_ {
        move |e: E| StoreError {
            path: self.path.clone(),
            what,
            detail: e.into().to_string(),
        }
    }

    /// Every device the gateway has heard of.
    pub fn devices(&self) -> Result<Vec<DeviceLive>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(DEVICES)
            .map_err(self.error("open devices"))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(self.error("read devices"))? {
            let (_, v) = row.map_err(self.error("read devices"))?;
            if let Ok(d) = serde_json::from_slice(v.value()) {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn device(&self, id: &str) -> Result<Option<DeviceLive>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(DEVICES)
            .map_err(self.error("open devices"))?;
        let v = t.get(id).map_err(self.error("read device"))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// The device's availability ledger, rebuilt from its stored transitions.
    pub fn ledger(&self, id: &str) -> Result<Ledger, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(TRANSITIONS)
            .map_err(self.error("open transitions"))?;
        let mut ledger = Ledger::new();
        let range = t
            .range((id, i128::MIN, 0)..=(id, i128::MAX, u64::MAX))
            .map_err(self.error("read transitions"))?;
        for row in range {
            let (k, v) = row.map_err(self.error("read transitions"))?;
            let (_, at, seq) = k.value();
            if let Ok(at) = Timestamp::from_nanosecond(at) {
                ledger.transition(at, seq, state_of(v.value()));
            }
        }
        let devices = txn
            .open_table(DEVICES)
            .map_err(self.error("open devices"))?;
        if let Some(v) = devices.get(id).map_err(self.error("read device"))? {
            if let Ok(d) = serde_json::from_slice::<DeviceLive>(v.value()) {
                if let Some(at) = d.last_seen {
                    ledger.heard(at);
                }
            }
        }
        Ok(ledger)
    }

    /// The device's life record, oldest first (at most `limit` newest entries).
    pub fn history(&self, id: &str, limit: usize) -> Result<Vec<LifeEvent>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(HISTORY)
            .map_err(self.error("open history"))?;
        let range = t
            .range((id, i128::MIN, 0)..=(id, i128::MAX, u64::MAX))
            .map_err(self.error("read history"))?;
        let mut out = Vec::new();
        for row in range.rev().take(limit) {
            let (_, v) = row.map_err(self.error("read history"))?;
            if let Ok(e) = serde_json::from_slice(v.value()) {
                out.push(e);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Every ticket, oldest detection first.
    pub fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(TICKETS)
            .map_err(self.error("open tickets"))?;
        let mut out: Vec<TicketRecord> = Vec::new();
        for row in t.iter().map_err(self.error("read tickets"))? {
            let (_, v) = row.map_err(self.error("read tickets"))?;
            if let Ok(r) = serde_json::from_slice(v.value()) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.detected_at, &a.key).cmp(&(b.detected_at, &b.key)));
        Ok(out)
    }

    pub fn ticket(&self, key: &str) -> Result<Option<TicketRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn
            .open_table(TICKETS)
            .map_err(self.error("open tickets"))?;
        let v = t.get(key).map_err(self.error("read ticket"))?;
        Ok(v.and_then(|v| serde_json::from_slice(v.value()).ok()))
    }

    /// The forwarder's jobs in order.
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn.open_table(OUTBOX).map_err(self.error("open outbox"))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(self.error("read outbox"))? {
            let (_, v) = row.map_err(self.error("read outbox"))?;
            if let Ok(j) = serde_json::from_slice(v.value()) {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// Records what the forwarder's attempt at `job` gave, in one transaction: the ticket's
    /// (or event's) forwarding state, and the job leaves the outbox unless it is to be
    /// retried. When a create is `Sent`, the ticket id is stored so its events can follow.
    pub fn finish_job(
        &self,
        job: &Job,
        outcome: &JobOutcome,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(self.error("begin write"))?;
        {
            let mut tickets = txn
                .open_table(TICKETS)
                .map_err(self.error("open tickets"))?;
            let mut outbox = txn.open_table(OUTBOX).map_err(self.error("open outbox"))?;
            let current: Option<TicketRecord> = tickets
                .get(job.ticket_key.as_str())
                .map_err(self.error("read ticket"))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            let Some(mut t) = current else {
                // A job without its ticket cannot be sent; drop the orphan job.
                outbox.remove(job.id).map_err(self.error("remove job"))?;
                drop((tickets, outbox));
                txn.commit().map_err(self.error("commit"))?;
                return Ok(());
            };
            let f = match &job.event {
                None => &mut t.forward,
                Some(k) => match t.events.iter_mut().find(|e| &e.idempotency_key == k) {
                    Some(e) => &mut e.forward,
                    None => &mut t.forward,
                },
            };
            f.attempts += 1;
            let keep = match outcome {
                JobOutcome::Sent { .. } => {
                    // The last error stays: "sent after 503s" is worth seeing.
                    f.state = ForwardState::Sent;
                    f.sent_at = Some(now);
                    f.next_attempt = None;
                    false
                }
                JobOutcome::Retry {
                    error,
                    next_attempt,
                } => {
                    f.last_error = Some(error.clone());
                    f.next_attempt = Some(*next_attempt);
                    true
                }
                JobOutcome::Failed { error } => {
                    f.state = ForwardState::Failed;
                    f.last_error = Some(error.clone());
                    f.next_attempt = None;
                    false
                }
            };
            if let (JobOutcome::Sent { ticket_id }, None) = (outcome, &job.event) {
                t.ticket_id = Some(ticket_id.clone());
            }
            let bytes = serde_json::to_vec(&t).unwrap_or_default();
            tickets
                .insert(job.ticket_key.as_str(), bytes.as_slice())
                .map_err(self.error("write ticket"))?;
            if !keep {
                outbox.remove(job.id).map_err(self.error("remove job"))?;
            }
        }
        txn.commit().map_err(self.error("commit"))?;
        Ok(())
    }

    /// Puts a failed ticket (and its failed events) back in the outbox: an operator's
    /// decision after fixing what the backend refused.
    pub fn requeue(&self, key: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(self.error("begin write"))?;
        let found;
        {
            let mut tickets = txn
                .open_table(TICKETS)
                .map_err(self.error("open tickets"))?;
            let mut outbox = txn.open_table(OUTBOX).map_err(self.error("open outbox"))?;
            let mut meta = txn.open_table(META).map_err(self.error("open meta"))?;
            let current: Option<TicketRecord> = tickets
                .get(key)
                .map_err(self.error("read ticket"))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            found = current.is_some();
            if let Some(mut t) = current {
                let mut jobs = Vec::new();
                if t.forward.state == ForwardState::Failed {
                    t.forward.state = ForwardState::Pending;
                    jobs.push(None);
                }
                for e in t.events.iter_mut() {
                    if e.forward.state == ForwardState::Failed {
                        e.forward.state = ForwardState::Pending;
                        jobs.push(Some(e.idempotency_key.clone()));
                    }
                }
                for event in jobs {
                    let id = next(&mut meta, "next_job").map_err(self.error("write meta"))?;
                    let job = Job {
                        id,
                        ticket_key: key.to_string(),
                        event,
                    };
                    let bytes = serde_json::to_vec(&job).unwrap_or_default();
                    outbox
                        .insert(id, bytes.as_slice())
                        .map_err(self.error("write job"))?;
                }
                let bytes = serde_json::to_vec(&t).unwrap_or_default();
                tickets
                    .insert(key, bytes.as_slice())
                    .map_err(self.error("write ticket"))?;
            }
        }
        txn.commit().map_err(self.error("commit"))?;
        Ok(found)
    }

    /// Notes the backend's status of a ticket (`resolved` and `closed` end it: a fault
    /// that returns afterwards opens a new ticket rather than a recurrence).
    pub fn set_backend_status(&self, key: &str, status: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(self.error("begin write"))?;
        {
            let mut tickets = txn
                .open_table(TICKETS)
                .map_err(self.error("open tickets"))?;
            let current: Option<TicketRecord> = tickets
                .get(key)
                .map_err(self.error("read ticket"))?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            if let Some(mut t) = current {
                t.backend_status = Some(status.to_string());
                t.open = !matches!(status, "resolved" | "closed");
                let bytes = serde_json::to_vec(&t).unwrap_or_default();
                tickets
                    .insert(key, bytes.as_slice())
                    .map_err(self.error("write ticket"))?;
            }
        }
        txn.commit().map_err(self.error("commit"))?;
        Ok(())
    }

    /// How many (agent, seq) records are stored.
    pub fn records_stored(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        t.len().map_err(self.error("count seen"))
    }

    /// Whether (agent, seq) is stored.
    pub fn has_record(&self, agent: &str, seq: u64) -> Result<bool, StoreError> {
        let txn = self.db.begin_read().map_err(self.error("begin read"))?;
        let t = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        Ok(t.get((agent, seq))
            .map_err(self.error("read seen"))?
            .is_some())
    }
}

/// Takes the next value of counter `name` (starting at 1).
pub(crate) fn next(
    meta: &mut redb::Table<'_, &'static str, u64>,
    name: &'static str,
) -> Result<u64, redb::StorageError> {
    let n = meta.get(name)?.map(|v| v.value()).unwrap_or(0) + 1;
    meta.insert(name, n)?;
    Ok(n)
}

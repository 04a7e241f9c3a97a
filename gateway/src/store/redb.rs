//! The store in one redb file (`gateway.redb`): the default for one gateway.
//!
//! Rows are JSON (devices, life record, tickets, jobs) under keys that keep what belongs
//! together adjacent: a device's transitions and life record are ranges of
//! (device, agent time, n). Every [`GatewayStore`] method is one redb transaction, so a
//! gateway killed at any moment has either all of a group of batches or none of it.
//!
//! A file redb finds damaged (truncated, corrupt, not a redb file) is refused with
//! [`StoreError::Damaged`], naming the file and what to do; it is never moved or
//! rewritten here: the store is the gateway's record of everything, and only a person
//! should decide to start without it.

use super::{
    encode, AgentRecord, DeviceLive, Exclusion, GatewayStore, HistoryCursor, Job, JobOutcome,
    LifeEvent, MaintenanceDone, StoreError, TicketRecord,
};
use crate::ingest::{plan, Applied, Changes, Digest, IngestContext, Needs, Stored};
use crate::ledger::Ledger;
use ::redb::{Database, ReadableTable, ReadableTableMetadata, Table, TableDefinition};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tend_profiles::DeviceState;
use tend_wire::UpBatch;

/// (agent, outbox incarnation, seq) of every record stored → its content's digest.
const SEEN: TableDefinition<(&str, &str, u64), Digest> = TableDefinition::new("records_seen");
/// The dedup of builds before incarnations, (agent, seq): dropped when the store opens.
/// Its keys cannot be told apart by incarnation, and every agent of such a build starts
/// a new incarnation when it is upgraded.
const SEEN_BEFORE_INCARNATIONS: TableDefinition<(&str, u64), ()> = TableDefinition::new("seen");
/// (agent, incarnation) → the watermark: every seq at or below it was handled, and its
/// rows in [`SEEN`] and [`CONFLICTS`] are gone (the agent had deleted those records).
const WATERMARKS: TableDefinition<(&str, &str), u64> = TableDefinition::new("watermarks");
/// (agent, incarnation) → how many of its [`SEEN`] rows were forgotten.
const FORGOTTEN_OF: TableDefinition<(&str, &str), u64> = TableDefinition::new("forgotten");
/// Name in [`META`] of the number of [`SEEN`] rows forgotten under watermarks.
const FORGOTTEN: &str = "records_forgotten";
/// Name in [`META`] of the number of devices not in the fleet file kept in [`DEVICES`].
const STRAYS: &str = "stray_devices";
/// (agent, incarnation, seq, digest) of every conflicting version counted.
const CONFLICTS: TableDefinition<(&str, &str, u64, Digest), ()> = TableDefinition::new("conflicts");
/// agent id → [`AgentRecord`] (JSON).
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
/// device id → [`DeviceLive`] (JSON).
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
/// (device, agent time in ns, seq) → state (`DeviceState` as u8).
const TRANSITIONS: TableDefinition<(&str, i128, u64), u8> = TableDefinition::new("transitions");
/// (device, time in ns, unique n) → [`LifeEvent`] (JSON).
const HISTORY: TableDefinition<(&str, i128, u64), &[u8]> = TableDefinition::new("history");
/// ticket key → [`TicketRecord`] (JSON).
const TICKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("tickets");
/// (device, ticket key): the tickets of a device.
const DEVICE_TICKETS: TableDefinition<(&str, &str), ()> = TableDefinition::new("device_tickets");
/// job id → [`Job`] (JSON): what the forwarder still has to send, in order.
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// (device, id) → [`Exclusion`] (JSON).
const EXCLUSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("exclusions");
/// (device, id) → [`MaintenanceDone`] (JSON).
const MAINTENANCE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("maintenance");
/// counters.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

fn state_code(s: DeviceState) -> u8 {
    match s {
        DeviceState::Up => 0,
        DeviceState::Down => 1,
        DeviceState::Maintenance => 2,
        DeviceState::Unknown => 3,
    }
}

fn state_of(c: u8) -> DeviceState {
    match c {
        0 => DeviceState::Up,
        1 => DeviceState::Down,
        2 => DeviceState::Maintenance,
        _ => DeviceState::Unknown,
    }
}

fn ns(t: Timestamp) -> i128 {
    t.as_nanosecond()
}

/// A stored JSON row, or `None` when it cannot be read (skipped, never fatal).
fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    serde_json::from_slice(bytes).ok()
}

/// The gateway's store in `gateway.redb`.
pub struct RedbStore {
    /// `None` between closing after a disk error and the reopen that failed.
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) `dir/gateway.redb`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let path = dir.join("gateway.redb");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Database {
            store: dir.display().to_string(),
            what: "create data directory",
            detail: e.to_string(),
        })?;
        let db = open_database(&path)?;
        let store = RedbStore {
            db: std::sync::RwLock::new(Some(db)),
            path,
        };
        let txn = store.begin_write()?;
        Tables::open(&txn, &store)?;
        txn.delete_table(SEEN_BEFORE_INCARNATIONS)
            .map_err(store.error("drop the dedup of an older build"))?;
        txn.commit().map_err(store.error("commit"))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error<E: Into<::redb::Error>>(&self, what: &'static str) -> impl Fn(E) -> StoreError + '_ {
        move |e: E| {
            let e: ::redb::Error = e.into();
            let store = self.path.display().to_string();
            let detail = e.to_string();
            match e {
                ::redb::Error::Io(_) | ::redb::Error::PreviousIo => StoreError::Io {
                    store,
                    what,
                    detail,
                },
                _ => StoreError::Database {
                    store,
                    what,
                    detail,
                },
            }
        }
    }

    /// The open database (a handle: transactions outlive the guard), reopening it first
    /// if a disk error closed it.
    fn db(&self) -> Result<std::sync::RwLockReadGuard<'_, Option<Database>>, StoreError> {
        {
            let db = self.db.read().unwrap_or_else(|p| p.into_inner());
            if db.is_some() {
                return Ok(db);
            }
        }
        self.reopen()?;
        Ok(self.db.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn begin_read(&self) -> Result<::redb::ReadTransaction, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().ok_or_else(|| self.closed())?;
        db.begin_read().map_err(self.error("begin read"))
    }

    fn begin_write(&self) -> Result<::redb::WriteTransaction, StoreError> {
        let db = self.db()?;
        let db = db.as_ref().ok_or_else(|| self.closed())?;
        db.begin_write().map_err(self.error("begin write"))
    }

    fn closed(&self) -> StoreError {
        StoreError::Io {
            store: self.path.display().to_string(),
            what: "reopen",
            detail: "closed after a disk error".into(),
        }
    }

    /// Closes the database and opens its file again: after an I/O error (a full disk)
    /// redb refuses every later write until then. What was committed is in the file;
    /// redb checks it on open.
    fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(|p| p.into_inner());
        if db.is_some() {
            return Ok(());
        }
        *db = Some(open_database(&self.path)?);
        tracing::info!("store {}: reopened", self.path.display());
        Ok(())
    }

    /// After a disk error: closes the database (dropped before the next open: the file
    /// is locked while a handle is open), so the next use reopens it.
    fn close_after(&self, e: &StoreError) {
        if matches!(e, StoreError::Io { .. }) {
            self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        }
    }

    /// The outbox incarnations of `agent` the store knows: those with a watermark and
    /// those with records not yet forgotten.
    fn incarnations(
        &self,
        txn: &::redb::ReadTransaction,
        agent: &str,
    ) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let mut all = std::collections::BTreeSet::new();
        let w = txn
            .open_table(WATERMARKS)
            .map_err(self.error("open watermarks"))?;
        for row in w
            .range((agent, "")..)
            .map_err(self.error("read watermarks"))?
        {
            let (k, _) = row.map_err(self.error("read watermarks"))?;
            let (a, incarnation) = k.value();
            if a != agent {
                break;
            }
            all.insert(incarnation.to_string());
        }
        let t = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        // Keys are ordered by agent, then incarnation: hop from one incarnation of the
        // agent to the next ("x" + "\0" is the least string after "x").
        let mut from = String::new();
        loop {
            let first = t
                .range((agent, from.as_str(), 0)..)
                .map_err(self.error("read seen"))?
                .next()
                .transpose()
                .map_err(self.error("read seen"))?;
            let Some((k, _)) = first else {
                return Ok(all);
            };
            let (a, incarnation, _) = k.value();
            if a != agent {
                return Ok(all);
            }
            all.insert(incarnation.to_string());
            from = format!("{incarnation}\0");
        }
    }

    fn watermark(
        &self,
        txn: &::redb::ReadTransaction,
        agent: &str,
        incarnation: &str,
    ) -> Result<Option<u64>, StoreError> {
        let w = txn
            .open_table(WATERMARKS)
            .map_err(self.error("open watermarks"))?;
        Ok(w.get((agent, incarnation))
            .map_err(self.error("read watermarks"))?
            .map(|v| v.value()))
    }

    fn meta_value(&self, txn: &::redb::ReadTransaction, name: &str) -> Result<u64, StoreError> {
        let m = txn.open_table(META).map_err(self.error("open meta"))?;
        Ok(m.get(name)
            .map_err(self.error("read meta"))?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// Every row of a table of JSON values, in key order, unreadable ones skipped.
    fn all<K: ::redb::Key + 'static, T: DeserializeOwned>(
        &self,
        table: TableDefinition<'static, K, &'static [u8]>,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(table).map_err(self.error(what))?;
        let mut out = Vec::new();
        for row in t.iter().map_err(self.error(what))? {
            let (_, v) = row.map_err(self.error(what))?;
            out.extend(decode(v.value()));
        }
        Ok(out)
    }
}

/// Opens the database file, telling damage from other failures.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let damaged = |detail: String| StoreError::Damaged {
        store: path.display().to_string(),
        detail,
    };
    // redb 2 panics on some truncated files (an assertion on the file's length) instead
    // of returning an error. Caught here so the gateway exits with an error naming the
    // file rather than a panic; nothing of the failed open outlives the closure.
    let opened = quietly(|| Database::create(path));
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(::redb::DatabaseError::Storage(::redb::StorageError::Corrupted(detail)))) => {
            Err(damaged(detail))
        }
        // What redb says of a file that is not one of its databases (bad header).
        Ok(Err(::redb::DatabaseError::Storage(::redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(damaged(e.to_string()))
        }
        Ok(Err(e)) => Err(StoreError::Database {
            store: path.display().to_string(),
            what: "open",
            detail: e.to_string(),
        }),
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(damaged(format!("redb could not read it ({text})")))
        }
    }
}

/// Runs `f`, catching a panic; the panic hook stays silent for a panic on this thread
/// meanwhile (it is reported as an error, and a "panicked at" line in the log would read
/// as a crash), and passes on any other thread's. Opens take turns, so each restores the
/// hook it found.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    use std::sync::{Arc, Mutex};
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        Arc::from(std::panic::take_hook());
    let me = std::thread::current().id();
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            others(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    drop(std::panic::take_hook());
    std::panic::set_hook(Box::new(move |info| previous(info)));
    result
}

/// Every table, open in one write transaction.
struct Tables<'t> {
    store: &'t RedbStore,
    seen: Table<'t, (&'static str, &'static str, u64), Digest>,
    watermarks: Table<'t, (&'static str, &'static str), u64>,
    forgotten_of: Table<'t, (&'static str, &'static str), u64>,
    conflicts: Table<'t, (&'static str, &'static str, u64, Digest), ()>,
    agents: Table<'t, &'static str, &'static [u8]>,
    devices: Table<'t, &'static str, &'static [u8]>,
    transitions: Table<'t, (&'static str, i128, u64), u8>,
    history: Table<'t, (&'static str, i128, u64), &'static [u8]>,
    tickets: Table<'t, &'static str, &'static [u8]>,
    device_tickets: Table<'t, (&'static str, &'static str), ()>,
    outbox: Table<'t, u64, &'static [u8]>,
    exclusions: Table<'t, (&'static str, u64), &'static [u8]>,
    maintenance: Table<'t, (&'static str, u64), &'static [u8]>,
    meta: Table<'t, &'static str, u64>,
}

impl<'t> Tables<'t> {
    /// Opens (creating them the first time) every table.
    fn open(txn: &'t ::redb::WriteTransaction, store: &'t RedbStore) -> Result<Self, StoreError> {
        let e = |what| store.error::<::redb::TableError>(what);
        Ok(Tables {
            store,
            seen: txn.open_table(SEEN).map_err(e("open seen"))?,
            watermarks: txn.open_table(WATERMARKS).map_err(e("open watermarks"))?,
            forgotten_of: txn.open_table(FORGOTTEN_OF).map_err(e("open forgotten"))?,
            conflicts: txn.open_table(CONFLICTS).map_err(e("open conflicts"))?,
            agents: txn.open_table(AGENTS).map_err(e("open agents"))?,
            devices: txn.open_table(DEVICES).map_err(e("open devices"))?,
            transitions: txn.open_table(TRANSITIONS).map_err(e("open transitions"))?,
            history: txn.open_table(HISTORY).map_err(e("open history"))?,
            tickets: txn.open_table(TICKETS).map_err(e("open tickets"))?,
            device_tickets: txn
                .open_table(DEVICE_TICKETS)
                .map_err(e("open device tickets"))?,
            outbox: txn.open_table(OUTBOX).map_err(e("open outbox"))?,
            exclusions: txn.open_table(EXCLUSIONS).map_err(e("open exclusions"))?,
            maintenance: txn.open_table(MAINTENANCE).map_err(e("open maintenance"))?,
            meta: txn.open_table(META).map_err(e("open meta"))?,
        })
    }

    /// What the store holds of what a group of batches needs.
    fn load<'a>(&self, needs: &Needs<'a>) -> Result<Stored<'a>, StoreError> {
        let s = self.store;
        let mut stored = Stored {
            strays: self
                .meta
                .get(STRAYS)
                .map_err(s.error("read meta"))?
                .map(|v| v.value())
                .unwrap_or(0),
            ..Stored::default()
        };
        for &key in &needs.outboxes {
            if let Some(w) = self
                .watermarks
                .get(key)
                .map_err(s.error("read watermark"))?
            {
                stored.watermarks.insert(key, w.value());
            }
        }
        for &key in &needs.records {
            let (agent, incarnation, seq) = key;
            let Some(d) = self.seen.get(key).map_err(s.error("read seen"))? else {
                continue;
            };
            stored.seen.insert(key, d.value());
            // Only a record stored already can have conflicting versions.
            let versions = self
                .conflicts
                .range(
                    (agent, incarnation, seq, [0u8; 32])..=(agent, incarnation, seq, [0xffu8; 32]),
                )
                .map_err(s.error("read conflicts"))?;
            for row in versions {
                let (k, _) = row.map_err(s.error("read conflicts"))?;
                stored.conflicts.insert((key, k.value().3));
            }
        }
        for &id in &needs.agents {
            let v = self.agents.get(id).map_err(s.error("read agent"))?;
            if let Some(a) = v.and_then(|v| decode::<AgentRecord>(v.value())) {
                stored.agents.insert(id.to_string(), a);
            }
        }
        for &id in &needs.devices {
            let v = self.devices.get(id).map_err(s.error("read device"))?;
            if let Some(d) = v.and_then(|v| decode::<DeviceLive>(v.value())) {
                stored.devices.insert(id.to_string(), d);
            }
        }
        for &id in &needs.tickets_of {
            let mut keys = Vec::new();
            let range = self
                .device_tickets
                .range((id, "")..)
                .map_err(s.error("read device tickets"))?;
            for row in range {
                let (k, _) = row.map_err(s.error("read device tickets"))?;
                let (device, key) = k.value();
                if device != id {
                    break;
                }
                keys.push(key.to_string());
            }
            let mut mine = BTreeMap::new();
            for key in keys {
                if let Some(t) = self.ticket(&key)? {
                    mine.insert(key, t);
                }
            }
            stored.tickets.insert(id.to_string(), mine);
        }
        Ok(stored)
    }

    /// Writes what a group of batches changed.
    fn write(&mut self, changes: &Changes<'_>) -> Result<(), StoreError> {
        let s = self.store;
        for &(key, d) in &changes.seen {
            self.seen.insert(key, d).map_err(s.error("write seen"))?;
        }
        if changes.new_strays > 0 {
            let e = s.error("write meta");
            let n = self.meta.get(STRAYS).map_err(&e)?.map(|v| v.value());
            self.meta
                .insert(STRAYS, n.unwrap_or(0) + changes.new_strays)
                .map_err(&e)?;
        }
        for (&(agent, incarnation), &w) in &changes.watermarks {
            self.forget(agent, incarnation, w)?;
        }
        for &((agent, incarnation, seq), d) in &changes.conflicts {
            self.conflicts
                .insert((agent, incarnation, seq, d), ())
                .map_err(s.error("write conflicts"))?;
        }
        for (id, a) in &changes.agents {
            let bytes = encode("agent", a)?;
            self.agents
                .insert(id.as_str(), bytes.as_slice())
                .map_err(s.error("write agent"))?;
        }
        for (id, d) in &changes.devices {
            let bytes = encode("device", d)?;
            self.devices
                .insert(id.as_str(), bytes.as_slice())
                .map_err(s.error("write device"))?;
        }
        for t in &changes.transitions {
            self.transitions
                .insert((t.device.as_str(), ns(t.at), t.seq), state_code(t.to))
                .map_err(s.error("write transition"))?;
        }
        for line in &changes.life {
            self.life(&line.device, line.at, &line.event)?;
        }
        for (key, t) in &changes.tickets {
            self.put_ticket(key, t)?;
        }
        for (device, key) in &changes.new_tickets {
            self.device_tickets
                .insert((device.as_str(), key.as_str()), ())
                .map_err(s.error("write device tickets"))?;
        }
        for job in &changes.jobs {
            self.queue(&job.ticket_key, job.event.clone())?;
        }
        Ok(())
    }

    fn ticket(&self, key: &str) -> Result<Option<TicketRecord>, StoreError> {
        let v = self
            .tickets
            .get(key)
            .map_err(self.store.error("read ticket"))?;
        Ok(v.and_then(|v| decode(v.value())))
    }

    fn put_ticket(&mut self, key: &str, t: &TicketRecord) -> Result<(), StoreError> {
        let bytes = encode("ticket", t)?;
        self.tickets
            .insert(key, bytes.as_slice())
            .map_err(self.store.error("write ticket"))?;
        Ok(())
    }

    /// Appends a line to a device's life record.
    fn life(&mut self, device: &str, at: Timestamp, event: &LifeEvent) -> Result<(), StoreError> {
        let n = self.next("next_history")?;
        let bytes = encode("life record", event)?;
        self.history
            .insert((device, ns(at), n), bytes.as_slice())
            .map_err(self.store.error("write history"))?;
        Ok(())
    }

    /// Every JSON row of `device` in a (device, id) table.
    fn rows_of<T: DeserializeOwned>(
        table: &Table<'t, (&'static str, u64), &'static [u8]>,
        device: &str,
        store: &RedbStore,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        let range = table
            .range((device, 0)..=(device, u64::MAX))
            .map_err(store.error("read rows"))?;
        for row in range {
            let (_, v) = row.map_err(store.error("read rows"))?;
            out.extend(decode(v.value()));
        }
        Ok(out)
    }

    /// Queues a job for the forwarder under the next job id.
    fn queue(&mut self, ticket_key: &str, event: Option<String>) -> Result<(), StoreError> {
        let id = self.next("next_job")?;
        let job = Job {
            id,
            ticket_key: ticket_key.to_string(),
            event,
        };
        let bytes = encode("job", &job)?;
        self.outbox
            .insert(id, bytes.as_slice())
            .map_err(self.store.error("write job"))?;
        Ok(())
    }

    /// Takes the next value of counter `name` (starting at 1).
    /// Raises an outbox's watermark to `w` and forgets its seqs at or below it.
    fn forget(&mut self, agent: &str, incarnation: &str, w: u64) -> Result<(), StoreError> {
        let s = self.store;
        self.watermarks
            .insert((agent, incarnation), w)
            .map_err(s.error("write watermark"))?;
        let mut gone = 0u64;
        self.seen
            .retain_in((agent, incarnation, 0)..=(agent, incarnation, w), |_, _| {
                gone += 1;
                false
            })
            .map_err(s.error("forget seen"))?;
        self.conflicts
            .retain_in(
                (agent, incarnation, 0, [0u8; 32])..=(agent, incarnation, w, [0xffu8; 32]),
                |_, _| false,
            )
            .map_err(s.error("forget conflicts"))?;
        if gone > 0 {
            let e = s.error("write forgotten");
            let n = self
                .forgotten_of
                .get((agent, incarnation))
                .map_err(&e)?
                .map(|v| v.value());
            self.forgotten_of
                .insert((agent, incarnation), n.unwrap_or(0) + gone)
                .map_err(&e)?;
            let e = s.error("write meta");
            let n = self.meta.get(FORGOTTEN).map_err(&e)?.map(|v| v.value());
            self.meta
                .insert(FORGOTTEN, n.unwrap_or(0) + gone)
                .map_err(&e)?;
        }
        Ok(())
    }

    fn next(&mut self, name: &'static str) -> Result<u64, StoreError> {
        let e = self.store.error("write meta");
        let n = self
            .meta
            .get(name)
            .map_err(&e)?
            .map(|v| v.value())
            .unwrap_or(0)
            + 1;
        self.meta.insert(name, n).map_err(&e)?;
        Ok(n)
    }
}

impl RedbStore {
    /// Runs `f` on the open tables in one write transaction and commits what it did.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Tables<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let done = (|| {
            let txn = self.begin_write()?;
            let out = {
                let mut tables = Tables::open(&txn, self)?;
                f(&mut tables)?
            };
            txn.commit().map_err(self.error("commit"))?;
            Ok(out)
        })();
        if let Err(e) = &done {
            self.close_after(e);
        }
        done
    }
}

impl GatewayStore for RedbStore {
    fn apply_many(
        &self,
        batches: &[UpBatch],
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Vec<Applied>, StoreError> {
        let needs = Needs::of(batches);
        self.write(|t| {
            let stored = t.load(&needs)?;
            let plan = plan(batches, stored, cx, now)?;
            t.write(&plan.changes)?;
            Ok(plan.applied)
        })
    }

    fn records_stored(&self) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        let t = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        let rows = t.len().map_err(self.error("count seen"))?;
        Ok(rows + self.meta_value(&txn, FORGOTTEN)?)
    }

    fn records_stored_of(&self, agent: &str) -> Result<u64, StoreError> {
        let txn = self.begin_read()?;
        let seen = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        let forgotten = txn
            .open_table(FORGOTTEN_OF)
            .map_err(self.error("open forgotten"))?;
        let mut n = 0u64;
        for incarnation in self.incarnations(&txn, agent)? {
            let inc = incarnation.as_str();
            n += seen
                .range((agent, inc, 0)..=(agent, inc, u64::MAX))
                .map_err(self.error("read seen"))?
                .count() as u64;
            n += forgotten
                .get((agent, inc))
                .map_err(self.error("read forgotten"))?
                .map(|v| v.value())
                .unwrap_or(0);
        }
        Ok(n)
    }

    fn has_record(&self, agent: &str, seq: u64) -> Result<bool, StoreError> {
        let txn = self.begin_read()?;
        for incarnation in self.incarnations(&txn, agent)? {
            if self.has_record_in(agent, &incarnation, seq)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn has_record_in(&self, agent: &str, incarnation: &str, seq: u64) -> Result<bool, StoreError> {
        let txn = self.begin_read()?;
        if let Some(w) = self.watermark(&txn, agent, incarnation)? {
            if seq <= w {
                return Ok(true);
            }
        }
        let t = txn.open_table(SEEN).map_err(self.error("open seen"))?;
        Ok(t.get((agent, incarnation, seq))
            .map_err(self.error("read seen"))?
            .is_some())
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.all(AGENTS, "read agents")
    }

    fn devices(&self) -> Result<Vec<DeviceLive>, StoreError> {
        self.all(DEVICES, "read devices")
    }

    fn device(&self, id: &str) -> Result<Option<DeviceLive>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(DEVICES)
            .map_err(self.error("open devices"))?;
        let v = t.get(id).map_err(self.error("read device"))?;
        Ok(v.and_then(|v| decode(v.value())))
    }

    fn ledger(&self, id: &str) -> Result<Ledger, StoreError> {
        let txn = self.begin_read()?;
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
            if let Some(at) = decode::<DeviceLive>(v.value()).and_then(|d| d.last_seen) {
                ledger.heard(at);
            }
        }
        let exclusions = txn
            .open_table(EXCLUSIONS)
            .map_err(self.error("open exclusions"))?;
        for row in exclusions
            .range((id, 0)..=(id, u64::MAX))
            .map_err(self.error("read exclusions"))?
        {
            let (_, v) = row.map_err(self.error("read exclusions"))?;
            if let Some(ex) = decode::<Exclusion>(v.value()) {
                ledger.exclude(ex.from, ex.to);
            }
        }
        Ok(ledger)
    }

    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        let mut out: Vec<TicketRecord> = self.all(TICKETS, "read tickets")?;
        out.sort_by(|a, b| (a.detected_at, &a.key).cmp(&(b.detected_at, &b.key)));
        Ok(out)
    }

    fn ticket(&self, key: &str) -> Result<Option<TicketRecord>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(TICKETS)
            .map_err(self.error("open tickets"))?;
        let v = t.get(key).map_err(self.error("read ticket"))?;
        Ok(v.and_then(|v| decode(v.value())))
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.all(OUTBOX, "read outbox")
    }

    fn finish_job(
        &self,
        job: &Job,
        outcome: &JobOutcome,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|t| {
            let keep = match t.ticket(&job.ticket_key)? {
                Some(mut ticket) => {
                    let keep = ticket.record_outcome(job, outcome, now);
                    t.put_ticket(&job.ticket_key, &ticket)?;
                    keep
                }
                // A job without its ticket cannot be sent; drop the orphan job.
                None => false,
            };
            if !keep {
                t.outbox.remove(job.id).map_err(self.error("remove job"))?;
            }
            Ok(())
        })
    }

    fn requeue(&self, key: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            let Some(mut ticket) = t.ticket(key)? else {
                return Ok(false);
            };
            for event in ticket.requeue_failed() {
                t.queue(key, event)?;
            }
            t.put_ticket(key, &ticket)?;
            Ok(true)
        })
    }

    fn update_ticket(
        &self,
        key: &str,
        change: &mut dyn FnMut(&mut TicketRecord) -> Result<Vec<String>, StoreError>,
    ) -> Result<Option<TicketRecord>, StoreError> {
        self.write(|t| {
            let Some(mut ticket) = t.ticket(key)? else {
                return Ok(None);
            };
            let events = change(&mut ticket)?;
            for event in events {
                t.queue(key, Some(event))?;
            }
            t.put_ticket(key, &ticket)?;
            Ok(Some(ticket))
        })
    }

    fn history_page(
        &self,
        id: &str,
        before: Option<HistoryCursor>,
        limit: usize,
    ) -> Result<Vec<(HistoryCursor, LifeEvent)>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(HISTORY)
            .map_err(self.error("open history"))?;
        let range = match before {
            Some(c) => t.range((id, i128::MIN, 0)..(id, c.at_ns, c.n)),
            None => t.range((id, i128::MIN, 0)..=(id, i128::MAX, u64::MAX)),
        }
        .map_err(self.error("read history"))?;
        let mut out = Vec::new();
        for row in range.rev() {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(self.error("read history"))?;
            let (_, at_ns, n) = k.value();
            if let Some(e) = decode(v.value()) {
                out.push((HistoryCursor { at_ns, n }, e));
            }
        }
        out.reverse();
        Ok(out)
    }

    fn exclusions(&self, device: &str) -> Result<Vec<Exclusion>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(EXCLUSIONS)
            .map_err(self.error("open exclusions"))?;
        let mut out: Vec<Exclusion> = Vec::new();
        for row in t
            .range((device, 0)..=(device, u64::MAX))
            .map_err(self.error("read exclusions"))?
        {
            let (_, v) = row.map_err(self.error("read exclusions"))?;
            out.extend(decode(v.value()));
        }
        out.sort_by_key(|e| (e.from, e.id));
        Ok(out)
    }

    fn add_exclusion(&self, ex: Exclusion) -> Result<Result<Exclusion, Exclusion>, StoreError> {
        self.write(|t| {
            let existing: Vec<Exclusion> = Tables::rows_of(&t.exclusions, &ex.device, self)?;
            if let Some(other) = existing.into_iter().find(|o| ex.overlaps(o)) {
                return Ok(Err(other));
            }
            let id = t.next("next_exclusion")?;
            let ex = Exclusion { id, ..ex };
            let bytes = encode("exclusion", &ex)?;
            t.exclusions
                .insert((ex.device.as_str(), id), bytes.as_slice())
                .map_err(self.error("write exclusion"))?;
            t.life(
                &ex.device,
                ex.recorded_at,
                &LifeEvent::Excluded {
                    at: ex.recorded_at,
                    exclusion: ex.clone(),
                },
            )?;
            Ok(Ok(ex))
        })
    }

    fn remove_exclusion(
        &self,
        device: &str,
        id: u64,
        at: Timestamp,
    ) -> Result<Option<Exclusion>, StoreError> {
        self.write(|t| {
            let removed = t
                .exclusions
                .remove((device, id))
                .map_err(self.error("remove exclusion"))?
                .and_then(|v| decode::<Exclusion>(v.value()));
            if let Some(ex) = &removed {
                t.life(
                    device,
                    at,
                    &LifeEvent::ExclusionRemoved {
                        at,
                        exclusion: ex.clone(),
                    },
                )?;
            }
            Ok(removed)
        })
    }

    fn maintenance_done(&self, device: &str) -> Result<Vec<MaintenanceDone>, StoreError> {
        let txn = self.begin_read()?;
        let t = txn
            .open_table(MAINTENANCE)
            .map_err(self.error("open maintenance"))?;
        let mut out: Vec<MaintenanceDone> = Vec::new();
        for row in t
            .range((device, 0)..=(device, u64::MAX))
            .map_err(self.error("read maintenance"))?
        {
            let (_, v) = row.map_err(self.error("read maintenance"))?;
            out.extend(decode(v.value()));
        }
        out.sort_by_key(|m| (m.done_at, m.id));
        Ok(out)
    }

    fn record_maintenance(&self, m: MaintenanceDone) -> Result<MaintenanceDone, StoreError> {
        self.write(|t| {
            let existing: Vec<MaintenanceDone> = Tables::rows_of(&t.maintenance, &m.device, self)?;
            if m.source != "hotline" {
                if let Some(same) = existing.into_iter().find(|o| o.source == m.source) {
                    return Ok(same);
                }
            }
            let id = t.next("next_maintenance")?;
            let m = MaintenanceDone { id, ..m };
            let bytes = encode("maintenance", &m)?;
            t.maintenance
                .insert((m.device.as_str(), id), bytes.as_slice())
                .map_err(self.error("write maintenance"))?;
            t.life(
                &m.device,
                m.recorded_at,
                &LifeEvent::Maintenance {
                    at: m.recorded_at,
                    maintenance: m.clone(),
                },
            )?;
            Ok(m)
        })
    }

    fn open_ticket(&self, ticket: TicketRecord) -> Result<bool, StoreError> {
        self.write(|t| {
            if t.ticket(&ticket.key)?.is_some() {
                return Ok(false);
            }
            t.put_ticket(&ticket.key, &ticket)?;
            t.device_tickets
                .insert((ticket.device.as_str(), ticket.key.as_str()), ())
                .map_err(self.error("write device tickets"))?;
            t.life(
                &ticket.device,
                ticket.created_at,
                &LifeEvent::TicketOpened {
                    at: ticket.created_at,
                    ticket_key: ticket.key.clone(),
                    kind: ticket.kind,
                    code: ticket.code.clone(),
                    class: ticket.class,
                },
            )?;
            t.queue(&ticket.key, None)?;
            Ok(true)
        })
    }
}

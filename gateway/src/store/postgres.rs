//! The store in a shared PostgreSQL database (`[store] kind = "postgres"`): several
//! gateways of one fleet keep one record of it (DESIGN "Scale-out").
//!
//! - Rows mirror [`super::RedbStore`]'s tables, with the same JSON documents (as `text`,
//!   readable with psql). Times are nanoseconds since the epoch (`bigint`).
//! - Every write is one READ COMMITTED transaction that first takes the locks of what it
//!   decides about: `apply_many` the transaction-scoped advisory locks of its agents,
//!   then of its devices (each in order, so no two gateways wait in a circle), and the
//!   rows of the devices' tickets (`FOR UPDATE`); the forwarder and the SLA watch the
//!   row of the ticket they change; exclusions and maintenance their device's lock. So
//!   one agent's batches are applied one after the other whichever gateways got them,
//!   an episode's ticket is decided in one place, and no change to a ticket is lost
//!   under another's. (SERIALIZABLE alone also fails transactions of unrelated agents
//!   whose rows share an index page: 10x slower here.) A deadlock or serialization
//!   failure that still happens is retried.
//! - The forwarder's jobs are claimed per ticket ([`GatewayStore::claim_jobs`]) with a
//!   lease judged by the database's clock, taken with `FOR UPDATE SKIP LOCKED`: each job
//!   is sent by one gateway, and by another only when the first stopped renewing it.
//! - Schema versions are applied at start under a session advisory lock, so several
//!   gateways starting together migrate once.
//!
//! The trait is blocking; queries run on a small runtime of the store's own, which owns
//! the connections, and callers wait for them on their own (blocking) thread. A lost
//! connection is dropped and a new one made on the next use: while the database is
//! unreachable every call fails at once with [`StoreError::Database`] (ingest then
//! acknowledges nothing and the agents keep their outboxes).

use super::{
    encode, AgentRecord, DeviceLive, Exclusion, GatewayStore, HistoryCursor, Job, JobOutcome,
    LifeEvent, MaintenanceDone, StoreError, TicketRecord,
};
use crate::ingest::{plan, Applied, Changes, Digest, IngestContext, Needs, Stored};
use crate::ledger::Ledger;
use futures::executor::block_on;
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::{BTreeMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;
use tend_profiles::DeviceState;
use tend_wire::UpBatch;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, IsolationLevel, Row, Statement, Transaction};

/// Connections open at most per gateway; a call waits for one beyond that.
const MAX_CONNECTIONS: usize = 12;
/// How long a call waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How often a transaction that conflicted with another gateway's is tried again.
const MAX_ATTEMPTS: u32 = 30;
/// The advisory lock (session) under which schema versions are applied.
const MIGRATION_LOCK: i64 = 0x7465_6e64_0001;

/// The schema, one version per entry, applied in order and recorded in
/// `tend_schema_version`. A released version is never edited: a change is a new entry.
const MIGRATIONS: &[&str] = &[
    // 1: everything a gateway keeps.
    "CREATE TABLE records_seen (agent text NOT NULL, incarnation text NOT NULL, seq bigint NOT NULL,
         digest bytea NOT NULL, PRIMARY KEY (agent, incarnation, seq));
     CREATE TABLE watermarks (agent text NOT NULL, incarnation text NOT NULL,
         watermark bigint NOT NULL, forgotten bigint NOT NULL DEFAULT 0,
         PRIMARY KEY (agent, incarnation));
     CREATE TABLE conflicts (agent text NOT NULL, incarnation text NOT NULL, seq bigint NOT NULL,
         digest bytea NOT NULL, PRIMARY KEY (agent, incarnation, seq, digest));
     CREATE TABLE counters (name text PRIMARY KEY, value bigint NOT NULL);
     CREATE TABLE agents (id text PRIMARY KEY, doc text NOT NULL);
     CREATE TABLE devices (id text PRIMARY KEY, doc text NOT NULL);
     CREATE TABLE transitions (device text NOT NULL, at_ns bigint NOT NULL, seq bigint NOT NULL,
         state smallint NOT NULL, PRIMARY KEY (device, at_ns, seq));
     CREATE SEQUENCE life_record_n;
     CREATE TABLE life_record (device text NOT NULL, at_ns bigint NOT NULL,
         n bigint NOT NULL DEFAULT nextval('life_record_n'), doc text NOT NULL,
         PRIMARY KEY (device, at_ns, n));
     CREATE TABLE tickets (key text PRIMARY KEY, device text NOT NULL, doc text NOT NULL);
     CREATE INDEX tickets_by_device ON tickets (device);
     CREATE TABLE outbox (id bigserial PRIMARY KEY, ticket_key text NOT NULL, event text);
     CREATE INDEX outbox_by_ticket ON outbox (ticket_key);
     CREATE TABLE job_claims (ticket_key text PRIMARY KEY, owner text NOT NULL,
         until timestamptz NOT NULL);
     CREATE TABLE exclusions (device text NOT NULL, id bigserial, doc text NOT NULL,
         PRIMARY KEY (device, id));
     CREATE TABLE maintenance (device text NOT NULL, id bigserial, source text NOT NULL,
         doc text NOT NULL, PRIMARY KEY (device, id));",
    // 2: the hotline's audit log of every gateway.
    "CREATE TABLE audit_log (n bigserial PRIMARY KEY, gateway text NOT NULL,
         at_ns bigint NOT NULL, line text NOT NULL);",
    // 3: the fleet's enrolments, shared by its gateways.
    "CREATE TABLE trust (agent text PRIMARY KEY, key text NOT NULL,
         enrolled_at_ns bigint NOT NULL, revoked_at_ns bigint);",
    // 4: fleet-wide chores and the gateway doing each (`GatewayStore::lead`).
    "CREATE TABLE duties (name text PRIMARY KEY, owner text NOT NULL,
         until timestamptz NOT NULL);",
];

fn state_code(s: DeviceState) -> i16 {
    match s {
        DeviceState::Up => 0,
        DeviceState::Down => 1,
        DeviceState::Maintenance => 2,
        DeviceState::Unknown => 3,
    }
}

fn state_of(c: i16) -> DeviceState {
    match c {
        0 => DeviceState::Up,
        1 => DeviceState::Down,
        2 => DeviceState::Maintenance,
        _ => DeviceState::Unknown,
    }
}

/// Nanoseconds since the epoch as `bigint`: exact from 1677 to 2262, clamped outside (an
/// agent's clock that far off is refused before it gets here).
fn ns(t: Timestamp) -> i64 {
    t.as_nanosecond().clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

fn seq(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn unseq(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A stored JSON row, or `None` when it cannot be read (skipped, never fatal).
fn decode<T: DeserializeOwned>(doc: &str) -> Option<T> {
    serde_json::from_str(doc).ok()
}

fn json<T: serde::Serialize>(what: &'static str, v: &T) -> Result<String, StoreError> {
    // JSON is UTF-8; a failure here would be serde_json's bug, reported as encoding.
    String::from_utf8(encode(what, v)?).map_err(|e| StoreError::Database {
        store: "postgres".into(),
        what,
        detail: e.to_string(),
    })
}

/// Parses a `[store] url` (`postgres://user@host:port/db?sslmode=require`), with the
/// timeouts a gateway needs so that a database gone silent fails calls instead of
/// hanging them. The message of an error never repeats the URL (it may hold secrets).
pub fn pg_config(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("is not a postgres:// URL".into());
    }
    let mut c: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| format!("is not a usable PostgreSQL URL: {e}"))?;
    if c.get_user().is_none() {
        return Err("names no user (postgres://USER@host/db)".into());
    }
    if c.get_dbname().is_none() {
        return Err("names no database (postgres://user@host/DATABASE)".into());
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(10));
    }
    c.keepalives(true)
        .keepalives_idle(Duration::from_secs(15))
        .tcp_user_timeout(Duration::from_secs(20));
    if c.get_application_name().is_none() {
        c.application_name("tend-gateway");
    }
    Ok(c)
}

impl PgConnect {
    /// From a checked `[store]` section: the URL, the password file's secret, and TLS
    /// when the URL asks for it (`sslmode=require`).
    pub fn from_section(s: &crate::config::StoreSection) -> Result<PgConnect, String> {
        let url = s.url.as_deref().ok_or("store.url is missing")?;
        let mut config = pg_config(url).map_err(|e| format!("store.url {e}"))?;
        if let Some(p) = &s.password_file {
            let pw =
                crate::config::read_secret(p).map_err(|e| format!("store.password_file: {e}"))?;
            config.password(pw);
        }
        let tls = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            let tls = tend_mqtt::ClientTls {
                ca_file: s.ca_file.clone(),
                ..Default::default()
            };
            let c = tend_mqtt::client_config(&tls).map_err(|e| format!("store.ca_file: {e}"))?;
            Some(std::sync::Arc::new(c))
        } else {
            None
        };
        Ok(PgConnect { config, tls })
    }
}

/// How the store reaches its database.
pub struct PgConnect {
    pub config: tokio_postgres::Config,
    /// TLS to the database (`sslmode=require` or `verify-full` in the URL): the trust roots.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgConnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConnect")
            .field("target", &target_of(&self.config))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// `host:port/dbname`, for messages (never the password).
fn target_of(c: &tokio_postgres::Config) -> String {
    let host = c
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{host}:{port}/{}",
        c.get_dbname().unwrap_or_default()
    )
}

/// A connection and the statements prepared on it (by their SQL): each statement is
/// parsed once per connection, not once per use.
struct Conn {
    client: Client,
    statements: RefCell<HashMap<&'static str, Statement>>,
}

struct Pool {
    idle: Vec<Conn>,
    open: usize,
}

/// An open transaction with its connection's prepared statements.
struct Tx<'a> {
    txn: Transaction<'a>,
    statements: &'a RefCell<HashMap<&'static str, Statement>>,
}

impl Tx<'_> {
    fn statement(&self, what: &'static str, sql: &'static str) -> Result<Statement, TxError> {
        if let Some(s) = self.statements.borrow().get(sql) {
            return Ok(s.clone());
        }
        let s = block_on(self.txn.prepare(sql)).doing(what)?;
        self.statements.borrow_mut().insert(sql, s.clone());
        Ok(s)
    }
}

/// The gateway's store in a shared PostgreSQL database.
pub struct PgStore {
    connect: PgConnect,
    target: String,
    /// Runs the connections; taken (and shut down in the background) on drop.
    rt: Option<tokio::runtime::Runtime>,
    pool: Mutex<Pool>,
    freed: Condvar,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A PostgreSQL error with what the store was doing.
struct PgError {
    what: &'static str,
    error: tokio_postgres::Error,
}

impl PgError {
    /// Another transaction got there first: the whole transaction is worth another try.
    fn conflicting(&self) -> bool {
        matches!(
            self.error.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        )
    }
}

/// Either a PostgreSQL error (maybe worth retrying) or any other store error.
enum TxError {
    Pg(PgError),
    Store(StoreError),
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, TxError>;
}

impl<T> Doing<T> for Result<T, tokio_postgres::Error> {
    fn doing(self, what: &'static str) -> Result<T, TxError> {
        self.map_err(|error| TxError::Pg(PgError { what, error }))
    }
}

impl PgStore {
    /// Connects, applies the schema versions this build knows that the database lacks,
    /// and returns the store.
    pub fn open(connect: PgConnect) -> Result<PgStore, StoreError> {
        let target = target_of(&connect.config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tend-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database {
                store: target.clone(),
                what: "start the database runtime",
                detail: e.to_string(),
            })?;
        let store = PgStore {
            connect,
            target,
            rt: Some(rt),
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Where the store is, for messages: `postgres://host:port/db`.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn fail(&self, e: TxError) -> StoreError {
        match e {
            TxError::Store(e) => e,
            TxError::Pg(PgError { what, error }) => StoreError::Database {
                store: self.target.clone(),
                what,
                detail: pg_detail(&error),
            },
        }
    }

    /// A new connection, made on the store's runtime.
    fn connect(&self) -> Result<Conn, StoreError> {
        let Some(rt) = &self.rt else {
            return Err(StoreError::Database {
                store: self.target.clone(),
                what: "connect",
                detail: "the store is closed".into(),
            });
        };
        let config = self.connect.config.clone();
        let tls = self.connect.tls.clone();
        let made = block_on(rt.spawn(async move {
            match tls {
                Some(tls) => {
                    let tls = postgres_rustls::MakeTlsConnector::new(
                        tokio_rustls::TlsConnector::from(tls),
                    );
                    let (client, conn) = config.connect(tls).await?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::warn!("database connection ended: {e}");
                        }
                    });
                    Ok(client)
                }
                None => {
                    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::warn!("database connection ended: {e}");
                        }
                    });
                    Ok::<_, tokio_postgres::Error>(client)
                }
            }
        }));
        match made {
            Ok(Ok(client)) => Ok(Conn {
                client,
                statements: RefCell::default(),
            }),
            Ok(Err(e)) => Err(StoreError::Database {
                store: self.target.clone(),
                what: "connect",
                detail: pg_detail(&e),
            }),
            Err(e) => Err(StoreError::Database {
                store: self.target.clone(),
                what: "connect",
                detail: e.to_string(),
            }),
        }
    }

    /// A connection from the pool (or a new one), waiting while all are in use.
    fn client(&self) -> Result<Conn, StoreError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = std::time::Instant::now() + POOL_WAIT;
        loop {
            while let Some(c) = pool.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                pool.open -= 1;
            }
            if pool.open < MAX_CONNECTIONS {
                pool.open += 1;
                drop(pool);
                let made = self.connect();
                if made.is_err() {
                    let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                    pool.open -= 1;
                    self.freed.notify_one();
                }
                return made;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Database {
                    store: self.target.clone(),
                    what: "connect",
                    detail: format!("all {MAX_CONNECTIONS} connections busy for {POOL_WAIT:?}"),
                });
            }
            pool = self
                .freed
                .wait_timeout(pool, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Puts a connection back (a closed one is dropped).
    fn give_back(&self, c: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if c.client.is_closed() {
            pool.open -= 1;
        } else {
            pool.idle.push(c);
        }
        self.freed.notify_one();
    }

    /// Runs `f` in one transaction at `level` and commits, trying again (a few ms later)
    /// when it conflicted with another gateway's transaction.
    fn transaction<T>(
        &self,
        level: IsolationLevel,
        read_only: bool,
        mut f: impl FnMut(&Tx<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut conn = self.client()?;
            let done = (|| {
                let Conn { client, statements } = &mut conn;
                let txn = block_on(
                    client
                        .build_transaction()
                        .isolation_level(level)
                        .read_only(read_only)
                        .start(),
                )
                .doing("begin")?;
                let tx = Tx { txn, statements };
                let out = f(&tx)?;
                block_on(tx.txn.commit()).doing("commit")?;
                Ok(out)
            })();
            self.give_back(conn);
            match done {
                Ok(out) => return Ok(out),
                // A pooled connection the database dropped (it restarted): once more on a
                // new one.
                Err(TxError::Pg(e)) if e.error.is_closed() && attempt == 1 => {}
                Err(TxError::Pg(e)) if e.conflicting() && attempt < MAX_ATTEMPTS => {
                    // Another gateway's transaction won: back off a little, at random, so
                    // the two do not meet again at once.
                    let ms = 1 + (nanos_now() % (4 * u64::from(attempt.min(25))));
                    std::thread::sleep(Duration::from_millis(ms));
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
    }

    /// A write: READ COMMITTED, with the locks each write takes itself (module doc).
    fn write<T>(&self, f: impl FnMut(&Tx<'_>) -> Result<T, TxError>) -> Result<T, StoreError> {
        self.transaction(IsolationLevel::ReadCommitted, false, f)
    }

    /// A write of leases (job claims, duties) that does not wait for the WAL flush: a
    /// lease lost in a crash costs a chore or a send done twice, and the flush would be
    /// a fault's ticket waiting.
    fn lease_write<T>(
        &self,
        what: &'static str,
        mut f: impl FnMut(&Tx<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        self.transaction(IsolationLevel::ReadCommitted, false, |t| {
            execute(t, what, "SET LOCAL synchronous_commit = off", &[])?;
            f(t)
        })
    }

    /// A consistent read of several statements.
    fn read<T>(&self, f: impl FnMut(&Tx<'_>) -> Result<T, TxError>) -> Result<T, StoreError> {
        self.transaction(IsolationLevel::RepeatableRead, true, f)
    }

    /// Applies the schema versions the database lacks, one transaction each, under a
    /// session lock so that gateways starting together do it once.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.client()?;
        let client = &mut conn.client;
        let done = (|| {
            block_on(client.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]))
                .doing("lock for migrations")?;
            let applied = (|| {
                block_on(client.batch_execute(
                    "CREATE TABLE IF NOT EXISTS tend_schema_version (
                         version integer PRIMARY KEY,
                         applied_at timestamptz NOT NULL DEFAULT now())",
                ))
                .doing("create the schema table")?;
                let row = block_on(client.query_one(
                    "SELECT coalesce(max(version), 0) FROM tend_schema_version",
                    &[],
                ))
                .doing("read the schema version")?;
                let have: i32 = row.get(0);
                let known = MIGRATIONS.len() as i32;
                if have > known {
                    return Err(TxError::Store(StoreError::Database {
                        store: self.target.clone(),
                        what: "read the schema version",
                        detail: format!(
                            "the database is at schema version {have}, this gateway knows only up to {known}: upgrade this gateway"
                        ),
                    }));
                }
                for (i, sql) in MIGRATIONS.iter().enumerate().skip(have as usize) {
                    let version = i as i32 + 1;
                    let txn = block_on(client.transaction()).doing("begin a migration")?;
                    block_on(txn.batch_execute(sql)).doing("migrate the schema")?;
                    block_on(txn.execute(
                        "INSERT INTO tend_schema_version (version) VALUES ($1)",
                        &[&version],
                    ))
                    .doing("record the schema version")?;
                    block_on(txn.commit()).doing("commit a migration")?;
                    tracing::info!(version, "database schema migrated");
                }
                Ok(())
            })();
            // Released whatever happened (the connection may be gone: then so is the lock).
            let _ = block_on(client.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]));
            applied
        })();
        self.give_back(conn);
        done.map_err(|e| self.fail(e))
    }

    fn all<T: DeserializeOwned>(&self, sql: &'static str) -> Result<Vec<T>, StoreError> {
        let rows = self.read(|t| query(t, "read", sql, &[]))?;
        Ok(rows
            .iter()
            .filter_map(|r| decode(r.get::<_, &str>(0)))
            .collect())
    }

    fn docs_of<T: DeserializeOwned>(
        &self,
        sql: &'static str,
        device: &str,
    ) -> Result<Vec<T>, StoreError> {
        let rows = self.read(|t| query(t, "read", sql, &[&device]))?;
        Ok(rows
            .iter()
            .filter_map(|r| decode(r.get::<_, &str>(0)))
            .collect())
    }
}

fn nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}

/// PostgreSQL's own message, with its code when it has one.
fn pg_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(cause) = src {
                s.push_str(": ");
                s.push_str(&cause.to_string());
                src = cause.source();
            }
            s
        }
    }
}

fn query(
    t: &Tx<'_>,
    what: &'static str,
    sql: &'static str,
    p: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, TxError> {
    let s = t.statement(what, sql)?;
    block_on(t.txn.query(&s, p)).doing(what)
}

fn execute(
    t: &Tx<'_>,
    what: &'static str,
    sql: &'static str,
    p: &[&(dyn ToSql + Sync)],
) -> Result<u64, TxError> {
    let s = t.statement(what, sql)?;
    block_on(t.txn.execute(&s, p)).doing(what)
}

fn digest_of(bytes: &[u8]) -> Option<Digest> {
    bytes.try_into().ok()
}

/// What a group of batches needs, read in one transaction.
fn load<'a>(t: &Tx<'_>, needs: &Needs<'a>) -> Result<Stored<'a>, TxError> {
    let mut stored = Stored::default();
    if let Some(r) = query(
        t,
        "read counters",
        "SELECT value FROM counters WHERE name = 'stray_devices'",
        &[],
    )?
    .first()
    {
        stored.strays = unseq(r.get(0));
    }
    // One statement each for every outbox and record of the group (not one per outbox).
    let outboxes: Vec<(&'a str, &'a str)> = needs.outboxes.iter().copied().collect();
    let (oa, oi): (Vec<&str>, Vec<&str>) = outboxes.iter().copied().unzip();
    for r in query(
        t,
        "read watermarks",
        "SELECT w.agent, w.incarnation, w.watermark FROM watermarks w
         JOIN UNNEST($1::text[], $2::text[]) AS k(a, i) ON w.agent = k.a AND w.incarnation = k.i",
        &[&oa, &oi],
    )? {
        let (agent, incarnation): (&str, &str) = (r.get(0), r.get(1));
        if let Some(&key) = outboxes.iter().find(|k| **k == (agent, incarnation)) {
            stored.watermarks.insert(key, unseq(r.get(2)));
        }
    }
    if !needs.records.is_empty() {
        let keys: BTreeMap<(&str, &str, i64), (&'a str, &'a str, u64)> = needs
            .records
            .iter()
            .map(|&k| ((k.0, k.1, seq(k.2)), k))
            .collect();
        let (mut ra, mut ri, mut rs) = (vec![], vec![], vec![]);
        for &(a, i, n) in keys.keys() {
            ra.push(a);
            ri.push(i);
            rs.push(n);
        }
        for r in query(
            t,
            "read seen",
            "SELECT r.agent, r.incarnation, r.seq, r.digest FROM records_seen r
             JOIN UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(a, i, s)
               ON r.agent = k.a AND r.incarnation = k.i AND r.seq = k.s",
            &[&ra, &ri, &rs],
        )? {
            let at: (&str, &str, i64) = (r.get(0), r.get(1), r.get(2));
            if let (Some(&key), Some(d)) = (keys.get(&at), digest_of(r.get::<_, &[u8]>(3))) {
                stored.seen.insert(key, d);
            }
        }
        if !stored.seen.is_empty() {
            // Only a record stored already can have conflicting versions.
            for r in query(
                t,
                "read conflicts",
                "SELECT c.agent, c.incarnation, c.seq, c.digest FROM conflicts c
                 JOIN UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(a, i, s)
                   ON c.agent = k.a AND c.incarnation = k.i AND c.seq = k.s",
                &[&ra, &ri, &rs],
            )? {
                let at: (&str, &str, i64) = (r.get(0), r.get(1), r.get(2));
                if let (Some(&key), Some(d)) = (keys.get(&at), digest_of(r.get::<_, &[u8]>(3))) {
                    stored.conflicts.insert((key, d));
                }
            }
        }
    }
    let agents: Vec<&str> = needs.agents.iter().copied().collect();
    for r in query(
        t,
        "read agents",
        "SELECT id, doc FROM agents WHERE id = ANY($1)",
        &[&agents],
    )? {
        if let Some(a) = decode::<AgentRecord>(r.get(1)) {
            stored.agents.insert(r.get::<_, String>(0), a);
        }
    }
    let devices: Vec<&str> = needs.devices.iter().copied().collect();
    for r in query(
        t,
        "read devices",
        "SELECT id, doc FROM devices WHERE id = ANY($1)",
        &[&devices],
    )? {
        if let Some(d) = decode::<DeviceLive>(r.get(1)) {
            stored.devices.insert(r.get::<_, String>(0), d);
        }
    }
    let of: Vec<&str> = needs.tickets_of.iter().copied().collect();
    for &id in &of {
        stored.tickets.entry(id.to_string()).or_default();
    }
    for r in query(
        t,
        "read tickets",
        "SELECT device, key, doc FROM tickets WHERE device = ANY($1) ORDER BY key FOR UPDATE",
        &[&of],
    )? {
        if let Some(ticket) = decode::<TicketRecord>(r.get(2)) {
            stored
                .tickets
                .entry(r.get::<_, String>(0))
                .or_default()
                .insert(r.get::<_, String>(1), ticket);
        }
    }
    Ok(stored)
}

/// Writes what a group of batches changed.
fn write_changes(t: &Tx<'_>, c: &Changes<'_>) -> Result<(), TxError> {
    if !c.seen.is_empty() {
        let (mut a, mut i, mut s, mut d) = (vec![], vec![], vec![], vec![]);
        for &((agent, inc, n), digest) in &c.seen {
            a.push(agent);
            i.push(inc);
            s.push(seq(n));
            d.push(digest.to_vec());
        }
        execute(
            t,
            "write seen",
            "INSERT INTO records_seen (agent, incarnation, seq, digest)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bytea[])",
            &[&a, &i, &s, &d],
        )?;
    }
    if c.new_strays > 0 {
        execute(
            t,
            "write counters",
            "INSERT INTO counters (name, value) VALUES ('stray_devices', $1)
             ON CONFLICT (name) DO UPDATE SET value = counters.value + EXCLUDED.value",
            &[&seq(c.new_strays)],
        )?;
    }
    if !c.watermarks.is_empty() {
        forget(t, &c.watermarks)?;
    }
    for &((agent, inc, n), digest) in &c.conflicts {
        execute(
            t,
            "write conflicts",
            "INSERT INTO conflicts (agent, incarnation, seq, digest) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&agent, &inc, &seq(n), &digest.to_vec()],
        )?;
    }
    if !c.agents.is_empty() {
        let ids: Vec<&str> = c.agents.keys().map(String::as_str).collect();
        let docs = c
            .agents
            .values()
            .map(|a| json("agent", a))
            .collect::<Result<Vec<_>, _>>()?;
        execute(
            t,
            "write agents",
            "INSERT INTO agents (id, doc) SELECT * FROM UNNEST($1::text[], $2::text[])
             ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
            &[&ids, &docs],
        )?;
    }
    if !c.devices.is_empty() {
        let ids: Vec<&str> = c.devices.keys().map(String::as_str).collect();
        let docs = c
            .devices
            .values()
            .map(|d| json("device", d))
            .collect::<Result<Vec<_>, _>>()?;
        execute(
            t,
            "write devices",
            "INSERT INTO devices (id, doc) SELECT * FROM UNNEST($1::text[], $2::text[])
             ON CONFLICT (id) DO UPDATE SET doc = EXCLUDED.doc",
            &[&ids, &docs],
        )?;
    }
    if !c.transitions.is_empty() {
        let (mut dev, mut at, mut s, mut st) = (vec![], vec![], vec![], vec![]);
        for tr in &c.transitions {
            dev.push(tr.device.as_str());
            at.push(ns(tr.at));
            s.push(seq(tr.seq));
            st.push(state_code(tr.to));
        }
        execute(
            t,
            "write transitions",
            "INSERT INTO transitions (device, at_ns, seq, state)
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::smallint[])
             ON CONFLICT (device, at_ns, seq) DO UPDATE SET state = EXCLUDED.state",
            &[&dev, &at, &s, &st],
        )?;
    }
    if !c.life.is_empty() {
        let (mut dev, mut at, mut doc) = (vec![], vec![], vec![]);
        for line in &c.life {
            dev.push(line.device.as_str());
            at.push(ns(line.at));
            doc.push(json("life record", &line.event)?);
        }
        execute(
            t,
            "write life record",
            "INSERT INTO life_record (device, at_ns, doc)
             SELECT d, a, j FROM UNNEST($1::text[], $2::bigint[], $3::text[]) WITH ORDINALITY AS l(d, a, j, o)
             ORDER BY o",
            &[&dev, &at, &doc],
        )?;
    }
    for (key, ticket) in &c.tickets {
        put_ticket(t, key, ticket)?;
    }
    for job in &c.jobs {
        queue(t, &job.ticket_key, job.event.as_deref())?;
    }
    Ok(())
}

/// Takes the transaction's lock of each device (in order): exclusions, maintenance and
/// ingest of one device never interleave.
fn lock_devices(t: &Tx<'_>, devices: &[&str]) -> Result<(), TxError> {
    execute(
        t,
        "lock devices",
        "SELECT pg_advisory_xact_lock(hashtext('tend-device:' || d)::bigint)
         FROM unnest($1::text[]) AS d ORDER BY d",
        &[&devices],
    )?;
    Ok(())
}

fn put_ticket(t: &Tx<'_>, key: &str, ticket: &TicketRecord) -> Result<(), TxError> {
    let doc = json("ticket", ticket)?;
    execute(
        t,
        "write ticket",
        "INSERT INTO tickets (key, device, doc) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO UPDATE SET doc = EXCLUDED.doc",
        &[&key, &ticket.device, &doc],
    )?;
    Ok(())
}

/// The ticket `key`, its row locked until the transaction ends: every caller writes it
/// back, and without the lock a change another gateway's ingest made meanwhile (a
/// recurrence's episode and event) would be overwritten by this older copy.
fn ticket_in(t: &Tx<'_>, key: &str) -> Result<Option<TicketRecord>, TxError> {
    let rows = query(
        t,
        "read ticket",
        "SELECT doc FROM tickets WHERE key = $1 FOR UPDATE",
        &[&key],
    )?;
    Ok(rows.first().and_then(|r| decode(r.get(0))))
}

fn queue(t: &Tx<'_>, ticket_key: &str, event: Option<&str>) -> Result<(), TxError> {
    execute(
        t,
        "write job",
        "INSERT INTO outbox (ticket_key, event) VALUES ($1, $2)",
        &[&ticket_key, &event],
    )?;
    Ok(())
}

fn life(t: &Tx<'_>, device: &str, at: Timestamp, event: &LifeEvent) -> Result<(), TxError> {
    let doc = json("life record", event)?;
    execute(
        t,
        "write life record",
        "INSERT INTO life_record (device, at_ns, doc) VALUES ($1, $2, $3)",
        &[&device, &ns(at), &doc],
    )?;
    Ok(())
}

/// Raises outboxes' watermarks and forgets their seqs at or below them (and their
/// conflicts), counting what each forgot.
fn forget(t: &Tx<'_>, watermarks: &BTreeMap<(&str, &str), u64>) -> Result<(), TxError> {
    let (mut a, mut i, mut w) = (vec![], vec![], vec![]);
    for (&(agent, inc), &mark) in watermarks {
        a.push(agent);
        i.push(inc);
        w.push(seq(mark));
    }
    let mut gone: BTreeMap<(String, String), i64> = BTreeMap::new();
    for r in query(
        t,
        "forget seen",
        "DELETE FROM records_seen r USING UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(a, i, w)
         WHERE r.agent = k.a AND r.incarnation = k.i AND r.seq <= k.w
         RETURNING r.agent, r.incarnation",
        &[&a, &i, &w],
    )? {
        *gone.entry((r.get(0), r.get(1))).or_default() += 1;
    }
    execute(
        t,
        "forget conflicts",
        "DELETE FROM conflicts c USING UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(a, i, w)
         WHERE c.agent = k.a AND c.incarnation = k.i AND c.seq <= k.w",
        &[&a, &i, &w],
    )?;
    let n: Vec<i64> = a
        .iter()
        .zip(&i)
        .map(|(a, i)| {
            gone.get(&(a.to_string(), i.to_string()))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    execute(
        t,
        "write watermarks",
        "INSERT INTO watermarks (agent, incarnation, watermark, forgotten)
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[])
         ON CONFLICT (agent, incarnation) DO UPDATE
         SET watermark = EXCLUDED.watermark, forgotten = watermarks.forgotten + EXCLUDED.forgotten",
        &[&a, &i, &w, &n],
    )?;
    Ok(())
}

impl GatewayStore for PgStore {
    fn apply_many(
        &self,
        batches: &[UpBatch],
        cx: &IngestContext,
        now: Timestamp,
    ) -> Result<Vec<Applied>, StoreError> {
        let needs = Needs::of(batches);
        let agents: Vec<&str> = needs.agents.iter().copied().collect();
        let devices: Vec<&str> = needs.devices.iter().copied().collect();
        self.write(|t| {
            // The agents', then the devices' locks, each in order, so two gateways never
            // wait for each other in a circle: one agent's batches are applied one after
            // the other whichever gateways got them, and a device's tickets are decided
            // in one place.
            execute(
                t,
                "lock agents",
                "SELECT pg_advisory_xact_lock(hashtext('tend-agent:' || a)::bigint)
                 FROM unnest($1::text[]) AS a ORDER BY a",
                &[&agents],
            )?;
            lock_devices(t, &devices)?;
            let stored = load(t, &needs)?;
            let plan = plan(batches, stored, cx, now)?;
            write_changes(t, &plan.changes)?;
            Ok(plan.applied)
        })
    }

    fn records_stored(&self) -> Result<u64, StoreError> {
        self.read(|t| {
            let r = query(
                t,
                "count records",
                "SELECT (SELECT count(*) FROM records_seen)
                      + (SELECT coalesce(sum(forgotten), 0) FROM watermarks)::bigint",
                &[],
            )?;
            Ok(r.first().map(|r| unseq(r.get(0))).unwrap_or(0))
        })
    }

    fn records_stored_of(&self, agent: &str) -> Result<u64, StoreError> {
        self.read(|t| {
            let r = query(
                t,
                "count records",
                "SELECT (SELECT count(*) FROM records_seen WHERE agent = $1)
                      + (SELECT coalesce(sum(forgotten), 0) FROM watermarks WHERE agent = $1)::bigint",
                &[&agent],
            )?;
            Ok(r.first().map(|r| unseq(r.get(0))).unwrap_or(0))
        })
    }

    fn has_record(&self, agent: &str, n: u64) -> Result<bool, StoreError> {
        self.read(|t| {
            let r = query(
                t,
                "read seen",
                "SELECT EXISTS (SELECT 1 FROM records_seen WHERE agent = $1 AND seq = $2)
                     OR EXISTS (SELECT 1 FROM watermarks WHERE agent = $1 AND watermark >= $2)",
                &[&agent, &seq(n)],
            )?;
            Ok(r.first().is_some_and(|r| r.get(0)))
        })
    }

    fn has_record_in(&self, agent: &str, incarnation: &str, n: u64) -> Result<bool, StoreError> {
        self.read(|t| {
            let r = query(
                t,
                "read seen",
                "SELECT EXISTS (SELECT 1 FROM records_seen WHERE agent = $1 AND incarnation = $2 AND seq = $3)
                     OR EXISTS (SELECT 1 FROM watermarks WHERE agent = $1 AND incarnation = $2 AND watermark >= $3)",
                &[&agent, &incarnation, &seq(n)],
            )?;
            Ok(r.first().is_some_and(|r| r.get(0)))
        })
    }

    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        self.all("SELECT doc FROM agents ORDER BY id")
    }

    fn devices(&self) -> Result<Vec<DeviceLive>, StoreError> {
        self.all("SELECT doc FROM devices ORDER BY id")
    }

    fn device(&self, id: &str) -> Result<Option<DeviceLive>, StoreError> {
        Ok(self
            .docs_of("SELECT doc FROM devices WHERE id = $1", id)?
            .pop())
    }

    fn ledger(&self, id: &str) -> Result<Ledger, StoreError> {
        self.read(|t| {
            let mut ledger = Ledger::new();
            for r in query(
                t,
                "read transitions",
                "SELECT at_ns, seq, state FROM transitions WHERE device = $1 ORDER BY at_ns, seq",
                &[&id],
            )? {
                let at = Timestamp::from_nanosecond(r.get::<_, i64>(0) as i128);
                if let Ok(at) = at {
                    ledger.transition(at, unseq(r.get(1)), state_of(r.get(2)));
                }
            }
            let device = query(
                t,
                "read device",
                "SELECT doc FROM devices WHERE id = $1",
                &[&id],
            )?;
            if let Some(at) = device
                .first()
                .and_then(|r| decode::<DeviceLive>(r.get(0)))
                .and_then(|d| d.last_seen)
            {
                ledger.heard(at);
            }
            for r in query(
                t,
                "read exclusions",
                "SELECT doc FROM exclusions WHERE device = $1 ORDER BY id",
                &[&id],
            )? {
                if let Some(ex) = decode::<Exclusion>(r.get(0)) {
                    ledger.exclude(ex.from, ex.to);
                }
            }
            Ok(ledger)
        })
    }

    fn tickets(&self) -> Result<Vec<TicketRecord>, StoreError> {
        let mut out: Vec<TicketRecord> = self.all("SELECT doc FROM tickets")?;
        out.sort_by(|a, b| (a.detected_at, &a.key).cmp(&(b.detected_at, &b.key)));
        Ok(out)
    }

    fn ticket(&self, key: &str) -> Result<Option<TicketRecord>, StoreError> {
        Ok(self
            .docs_of("SELECT doc FROM tickets WHERE key = $1", key)?
            .pop())
    }

    fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        let rows = self.read(|t| {
            query(
                t,
                "read outbox",
                "SELECT id, ticket_key, event FROM outbox ORDER BY id",
                &[],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| Job {
                id: unseq(r.get(0)),
                ticket_key: r.get(1),
                event: r.get(2),
            })
            .collect())
    }

    fn shared(&self) -> bool {
        true
    }

    fn trust_entries(&self) -> Result<Vec<crate::trust::Enrolment>, StoreError> {
        let rows = self.read(|t| {
            query(
                t,
                "read trust",
                "SELECT agent, key, enrolled_at_ns, revoked_at_ns FROM trust ORDER BY agent",
                &[],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                let at = |ns: i64| Timestamp::from_nanosecond(ns as i128).ok();
                Some(crate::trust::Enrolment {
                    agent: r.get(0),
                    key: tend_wire::AgentKey::from_hex(r.get(1))?,
                    enrolled_at: at(r.get(2))?,
                    revoked_at: r.get::<_, Option<i64>>(3).and_then(at),
                })
            })
            .collect())
    }

    fn keep_trust_entries(&self, entries: &[crate::trust::Enrolment]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let agents: Vec<&str> = entries.iter().map(|e| e.agent.as_str()).collect();
        let keys: Vec<String> = entries.iter().map(|e| e.key.to_hex()).collect();
        let enrolled: Vec<i64> = entries.iter().map(|e| ns(e.enrolled_at)).collect();
        let revoked: Vec<Option<i64>> = entries.iter().map(|e| e.revoked_at.map(ns)).collect();
        self.transaction(IsolationLevel::ReadCommitted, false, |t| {
            // The same rule as trust::supersedes, decided by the database; all of this
            // gateway's entries in one statement (they are one per agent).
            execute(
                t,
                "write trust",
                "INSERT INTO trust (agent, key, enrolled_at_ns, revoked_at_ns)
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                 ON CONFLICT (agent) DO UPDATE
                 SET key = EXCLUDED.key, enrolled_at_ns = EXCLUDED.enrolled_at_ns,
                     revoked_at_ns = EXCLUDED.revoked_at_ns
                 WHERE EXCLUDED.enrolled_at_ns > trust.enrolled_at_ns
                    OR (EXCLUDED.enrolled_at_ns = trust.enrolled_at_ns
                        AND EXCLUDED.revoked_at_ns IS NOT NULL AND trust.revoked_at_ns IS NULL)",
                &[&agents, &keys, &enrolled, &revoked],
            )
        })?;
        Ok(())
    }

    fn audit(&self, gateway: &str, at: Timestamp, line: &str) -> Result<(), StoreError> {
        self.transaction(IsolationLevel::ReadCommitted, false, |t| {
            execute(
                t,
                "write audit line",
                "INSERT INTO audit_log (gateway, at_ns, line) VALUES ($1, $2, $3)",
                &[&gateway, &ns(at), &line],
            )
        })?;
        Ok(())
    }

    fn audit_lines(&self, limit: usize) -> Result<Vec<(String, String)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read(|t| {
            query(
                t,
                "read audit log",
                "SELECT gateway, line FROM (SELECT n, gateway, line FROM audit_log ORDER BY n DESC LIMIT $1) l ORDER BY n",
                &[&limit],
            )
        })?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    fn lead(&self, duty: &str, owner: &str, lease: Duration) -> Result<bool, StoreError> {
        let lease_ms = lease.as_secs_f64() * 1000.0;
        // Losing the lease in a crash only means two gateways do the chore once.
        let rows = self.lease_write("lead", |t| {
            query(
                t,
                "lead",
                "INSERT INTO duties (name, owner, until)
                 VALUES ($1, $2, now() + $3::float8 * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
                 WHERE duties.owner = EXCLUDED.owner OR duties.until < now()
                 RETURNING name",
                &[&duty, &owner, &lease_ms],
            )
        })?;
        Ok(!rows.is_empty())
    }

    fn claim_jobs(
        &self,
        tickets: &[String],
        owner: &str,
        lease: Duration,
    ) -> Result<HashSet<String>, StoreError> {
        if tickets.is_empty() {
            return Ok(HashSet::new());
        }
        let lease_ms = lease.as_secs_f64() * 1000.0;
        // A claim the database loses in a crash lets another gateway send the job again
        // under the same Idempotency-Key, which the backend answers as the first time.
        let claimed = self.lease_write("claim jobs", |t| {
            execute(
                t,
                "claim jobs",
                // Only tickets that still have jobs: one another gateway has just
                // finished would otherwise leave a claim nobody releases.
                "INSERT INTO job_claims (ticket_key, owner, until)
                 SELECT k, '', '-infinity' FROM unnest($1::text[]) AS k
                 WHERE EXISTS (SELECT 1 FROM outbox WHERE ticket_key = k)
                 ON CONFLICT (ticket_key) DO NOTHING",
                &[&tickets],
            )?;
            // Rows another gateway is claiming right now are skipped, not waited for;
            // a claim is ours when we hold it or its holder let its lease run out.
            query(
                t,
                "claim jobs",
                "UPDATE job_claims SET owner = $2, until = now() + $3::float8 * interval '1 millisecond'
                 WHERE ticket_key IN (
                     SELECT ticket_key FROM job_claims
                     WHERE ticket_key = ANY($1) AND (owner = $2 OR until < now())
                     FOR UPDATE SKIP LOCKED)
                 RETURNING ticket_key",
                &[&tickets, &owner, &lease_ms],
            )
        })?;
        Ok(claimed.iter().map(|r| r.get::<_, String>(0)).collect())
    }

    fn finish_job(
        &self,
        job: &Job,
        outcome: &JobOutcome,
        now: Timestamp,
    ) -> Result<(), StoreError> {
        self.write(|t| {
            let keep = match ticket_in(t, &job.ticket_key)? {
                Some(mut ticket) => {
                    let keep = ticket.record_outcome(job, outcome, now);
                    put_ticket(t, &job.ticket_key, &ticket)?;
                    keep
                }
                None => false,
            };
            if !keep {
                execute(
                    t,
                    "remove job",
                    "DELETE FROM outbox WHERE id = $1",
                    &[&seq(job.id)],
                )?;
                execute(
                    t,
                    "release claim",
                    "DELETE FROM job_claims WHERE ticket_key = $1
                     AND NOT EXISTS (SELECT 1 FROM outbox WHERE ticket_key = $1)",
                    &[&job.ticket_key],
                )?;
            }
            Ok(())
        })
    }

    fn requeue(&self, key: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            let Some(mut ticket) = ticket_in(t, key)? else {
                return Ok(false);
            };
            for event in ticket.requeue_failed() {
                queue(t, key, event.as_deref())?;
            }
            put_ticket(t, key, &ticket)?;
            Ok(true)
        })
    }

    fn update_ticket(
        &self,
        key: &str,
        change: &mut dyn FnMut(&mut TicketRecord) -> Result<Vec<String>, StoreError>,
    ) -> Result<Option<TicketRecord>, StoreError> {
        self.write(|t| {
            let Some(mut ticket) = ticket_in(t, key)? else {
                return Ok(None);
            };
            for event in change(&mut ticket)? {
                queue(t, key, Some(&event))?;
            }
            put_ticket(t, key, &ticket)?;
            Ok(Some(ticket))
        })
    }

    fn history_page(
        &self,
        id: &str,
        before: Option<HistoryCursor>,
        limit: usize,
    ) -> Result<Vec<(HistoryCursor, LifeEvent)>, StoreError> {
        let (at, n) = match before {
            Some(c) => (
                c.at_ns.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                seq(c.n),
            ),
            None => (i64::MAX, i64::MAX),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.read(|t| {
            query(
                t,
                "read history",
                "SELECT at_ns, n, doc FROM life_record
                 WHERE device = $1 AND (at_ns, n) < ($2, $3)
                 ORDER BY at_ns DESC, n DESC LIMIT $4",
                &[&id, &at, &n, &limit],
            )
        })?;
        let mut out: Vec<(HistoryCursor, LifeEvent)> = rows
            .iter()
            .filter_map(|r| {
                let cursor = HistoryCursor {
                    at_ns: r.get::<_, i64>(0) as i128,
                    n: unseq(r.get(1)),
                };
                decode(r.get(2)).map(|e| (cursor, e))
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    fn exclusions(&self, device: &str) -> Result<Vec<Exclusion>, StoreError> {
        let mut out: Vec<Exclusion> =
            self.docs_of("SELECT doc FROM exclusions WHERE device = $1", device)?;
        out.sort_by_key(|e| (e.from, e.id));
        Ok(out)
    }

    fn add_exclusion(&self, ex: Exclusion) -> Result<Result<Exclusion, Exclusion>, StoreError> {
        self.write(|t| {
            lock_devices(t, &[ex.device.as_str()])?;
            for r in query(
                t,
                "read exclusions",
                "SELECT doc FROM exclusions WHERE device = $1",
                &[&ex.device],
            )? {
                if let Some(other) = decode::<Exclusion>(r.get(0)) {
                    if ex.overlaps(&other) {
                        return Ok(Err(other));
                    }
                }
            }
            let id: i64 = query(
                t,
                "number exclusion",
                "SELECT nextval('exclusions_id_seq')",
                &[],
            )?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
            let ex = Exclusion {
                id: unseq(id),
                ..ex.clone()
            };
            execute(
                t,
                "write exclusion",
                "INSERT INTO exclusions (device, id, doc) VALUES ($1, $2, $3)",
                &[&ex.device, &id, &json("exclusion", &ex)?],
            )?;
            life(
                t,
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
            let removed = query(
                t,
                "remove exclusion",
                "DELETE FROM exclusions WHERE device = $1 AND id = $2 RETURNING doc",
                &[&device, &seq(id)],
            )?
            .first()
            .and_then(|r| decode::<Exclusion>(r.get(0)));
            if let Some(ex) = &removed {
                life(
                    t,
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
        let mut out: Vec<MaintenanceDone> =
            self.docs_of("SELECT doc FROM maintenance WHERE device = $1", device)?;
        out.sort_by_key(|m| (m.done_at, m.id));
        Ok(out)
    }

    fn record_maintenance(&self, m: MaintenanceDone) -> Result<MaintenanceDone, StoreError> {
        self.write(|t| {
            lock_devices(t, &[m.device.as_str()])?;
            if m.source != "hotline" {
                let same = query(
                    t,
                    "read maintenance",
                    "SELECT doc FROM maintenance WHERE device = $1 AND source = $2",
                    &[&m.device, &m.source],
                )?;
                if let Some(same) = same.first().and_then(|r| decode(r.get(0))) {
                    return Ok(same);
                }
            }
            let id: i64 = query(
                t,
                "number maintenance",
                "SELECT nextval('maintenance_id_seq')",
                &[],
            )?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
            let m = MaintenanceDone {
                id: unseq(id),
                ..m.clone()
            };
            execute(
                t,
                "write maintenance",
                "INSERT INTO maintenance (device, id, source, doc) VALUES ($1, $2, $3, $4)",
                &[&m.device, &id, &m.source, &json("maintenance", &m)?],
            )?;
            life(
                t,
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
            // Stored only by whichever gateway gets there first.
            let inserted = execute(
                t,
                "write ticket",
                "INSERT INTO tickets (key, device, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO NOTHING",
                &[&ticket.key, &ticket.device, &json("ticket", &ticket)?],
            )?;
            if inserted == 0 {
                return Ok(false);
            }
            life(
                t,
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
            queue(t, &ticket.key, None)?;
            Ok(true)
        })
    }
}

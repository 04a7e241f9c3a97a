//! The agent's durable outbox (DESIGN §2 "Outbox"): every record the agent produces gets
//! the next sequence number and is on disk before it counts as produced, and it stays
//! there until the gateway acknowledges exactly its seq.
//!
//! Storage is one redb file with four tables:
//! - `records`: seq → one format byte and the record. [`TAG_KEEP_PACKED`] /
//!   [`TAG_READING_PACKED`] (what this build writes): the record's JSON without its seq,
//!   compressed as one LZ4 block behind its length (u32, little-endian); the seq is the
//!   key, and `pending` splices it back in, giving the JSON exactly as
//!   [`tend_wire::encode`] would write it. An AV-500 poll packs from 842 to about 300
//!   bytes, and the single writer's cost per record follows the bytes it puts in the
//!   tree. [`TAG_KEEP`] / [`TAG_READING`] (format 1 files): that JSON, seq included, as
//!   is. Byte accounting is the size on the wire either way;
//! - `meta`: the seq counter, record and byte counts, drop and quarantine totals — all
//!   written in the same transaction as the records they describe, so after a crash the
//!   counter is never behind a stored seq and seqs never repeat — and the file's
//!   *incarnation*: 128 random bits made when the file is created (or first opened by a
//!   build that has them), sent with every batch, so the gateway can tell this file's
//!   seqs from those of an outbox that was lost and replaced;
//! - `quarantine`: records that no longer decode, moved aside (never sent, never fatal);
//! - `state`: small state the agent keeps in step with the records (a device monitor's
//!   memory), written in the same transaction as the records it belongs to.
//!
//! `meta` also keeps `observed_until`: the newest agent time (`at`) of the records
//! committed, or of a bare observation handed over with [`Outbox::observed`]. It rides
//! along with every commit (no write of its own), and tells a restarted agent until when
//! it was known to be running and watching its devices.
//!
//! Writes go through one writer (on the runtime's blocking pool, because a redb commit
//! blocks on fsync) that takes appends and acks from a channel and commits everything
//! that arrived within the commit window in one `Durability::Immediate` transaction, then
//! answers each caller. Reads (`pending`, `stats`) never wait for the writer: redb read
//! transactions see the last commit.
//!
//! Group commit with a linger: readings handed over with [`Outbox::append_lingering`] may
//! wait up to `linger` (100 ms by default) for company, and deletions handed over with
//! [`Outbox::ack_later`] up to `ack_linger` (5 s), so a link that polls its units in turn
//! makes one fsync per linger instead of one per poll and one per ack: acknowledged
//! deletions ride along with the next commit of records. Anything else (states, fault
//! episodes, identities, [`Outbox::append`], [`Outbox::append_soon`], a durable
//! [`Outbox::ack`], closing) commits at once and takes every waiting op with it. A
//! lingering reading still counts only once its commit returned; a deletion lost to a
//! crash only means the record is sent again, and the gateway keeps one copy.
//!
//! Size cap: when the encoded records exceed `max_bytes`, the oldest readings are
//! deleted until the total is a little below the cap (see [`drop_slack`]), and one
//! `Dropped { count, first_seq, last_seq }` record is appended for that drop event, with
//! device [`AGENT_DEVICE`] (the empty string: the agent itself, not a device); `count`
//! readings went, all within `first_seq..=last_seq`, where kept states may sit between
//! them. The `Dropped` record itself is written in the same commit. States,
//! fault episodes, identities and earlier `Dropped` records are never dropped; if only
//! they remain over the cap they are all kept, `stats().over_cap` says so and a warning
//! is logged.
//!
//! A file that redb finds damaged when opening it (truncated, corrupt) is moved aside as
//! `outbox.redb.corrupt-<time>` and a new outbox, with a new incarnation, starts: records
//! the gateway acknowledged were deleted from the file anyway, what was still waiting
//! stays in the moved file for whoever wants to dig, and the agent keeps recording.

use jiff::Timestamp;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::Serialize;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tend_wire::{Record, RecordBody, SeqRange};
use tokio::sync::oneshot;

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
/// Small state the agent must keep in step with the records (a device's open episodes),
/// written in the same transaction as the records it produced.
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// First byte of a stored record that may never be dropped, its JSON as is (format 1).
pub const TAG_KEEP: u8 = b'K';
/// First byte of a stored reading, which the size cap may drop, its JSON as is (format 1).
pub const TAG_READING: u8 = b'R';
/// [`TAG_KEEP`], the JSON without its seq and packed (LZ4 block behind its length).
pub const TAG_KEEP_PACKED: u8 = b'k';
/// [`TAG_READING`], the JSON without its seq and packed.
pub const TAG_READING_PACKED: u8 = b'r';
/// The layout described in the module doc; a file with another one is refused. Format 1
/// files (no packed records) are read and become format 2 on open: a build that knows
/// only format 1 then refuses the file instead of setting packed records aside.
const FORMAT: u64 = 2;
/// Formats this build reads.
const FORMATS_READ: [u64; 2] = [1, FORMAT];
/// Largest unpacked record `pending` accepts: a damaged length cannot make it allocate
/// gigabytes. Far above any record the agent makes (an identity, a poll of a large
/// profile: a few KiB).
const MAX_UNPACKED: usize = 16 << 20;

/// The `device` of records the outbox makes itself (`Dropped`): the agent, no device.
pub const AGENT_DEVICE: &str = "";
/// Default size cap (DESIGN's agent config default).
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Default group-commit window.
pub const DEFAULT_COMMIT_WINDOW: Duration = Duration::from_millis(2);
/// Default linger of readings (`[outbox] linger`).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(100);
/// Default longest wait of a deferred ack for a commit to ride along with: past a poll
/// interval or two, so that with devices polled every second or so acks never cost a
/// commit of their own; a crash loses at most this much of deletions (records sent again).
pub const DEFAULT_ACK_LINGER: Duration = Duration::from_secs(5);
/// Default bound of redb's page cache. redb's own default (1 GiB) lets the cache grow
/// with the file, so an outage's backlog would show up as resident memory; the writer
/// only touches the newest pages and the uplink reads the oldest ones once. 512 KiB holds
/// the tree's top and its newest leaves; 2 MiB cost 1.5 MiB more resident memory and no
/// throughput (BENCHMARKS.md, issue 16).
pub const DEFAULT_CACHE_BYTES: usize = 512 << 10;

/// Upper bound of records in one transaction, so one commit's latency stays bounded
/// when a long queue builds up behind a slow disk.
const MAX_BATCH_RECORDS: usize = 32_768;
/// Undecodable records one `pending` call sets aside before it stops scanning, so a
/// badly damaged file cannot make a single call walk the whole table.
const MAX_BAD_PER_SCAN: usize = 1024;

const K_NEXT_SEQ: &str = "next_seq";
const K_RECORDS: &str = "records";
const K_BYTES: &str = "bytes";
const K_DROPPED: &str = "dropped_total";
const K_UNDECODABLE: &str = "undecodable_total";
const K_FORMAT: &str = "format";
/// [`OutboxStats::observed_until`], nanoseconds since the Unix epoch.
const K_OBSERVED_UNTIL: &str = "observed_until_ns";
/// The incarnation's two halves (meta holds u64s).
const K_INCARNATION_HI: &str = "incarnation_hi";
const K_INCARNATION_LO: &str = "incarnation_lo";

/// How far below the cap a drop event goes: 1/16 of the cap, at most 4 MiB. Dropping
/// only down to the cap would make one `Dropped` record per commit once the outbox is
/// full, and those are never dropped themselves; with this slack a full outbox at 50,000
/// records/s makes a drop event every few hundred milliseconds at most.
pub fn drop_slack(max_bytes: u64) -> u64 {
    (max_bytes / 16).min(4 << 20)
}

#[derive(Debug, Clone)]
pub struct OutboxConfig {
    pub path: PathBuf,
    /// Cap on the encoded size of the stored records.
    pub max_bytes: u64,
    /// The longest the writer gathers appends and acks into one commit after the first
    /// arrives. It closes early once as many callers wait as the last commit answered,
    /// or when nothing new arrives for a tenth of it (at least 20 µs), so a lone
    /// appender is not slowed down by the full window.
    pub commit_window: Duration,
    /// The longest lingering readings wait for a commit (see the module doc).
    pub linger: Duration,
    /// The longest deferred acks wait for a commit to ride along with.
    pub ack_linger: Duration,
    /// Bound of redb's page cache, bytes.
    pub cache_bytes: usize,
}

impl OutboxConfig {
    /// A config with the default cap, commit window, linger and cache.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        OutboxConfig {
            path: path.into(),
            max_bytes: DEFAULT_MAX_BYTES,
            commit_window: DEFAULT_COMMIT_WINDOW,
            linger: DEFAULT_LINGER,
            ack_linger: DEFAULT_ACK_LINGER,
            cache_bytes: DEFAULT_CACHE_BYTES,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// The file's incarnation: its seqs count within it.
    pub incarnation: String,
    /// Records waiting for an ack.
    pub records: u64,
    /// Their encoded size (JSON bytes).
    pub bytes: u64,
    /// The seq the next record will get.
    pub next_seq: u64,
    /// Readings dropped by the size cap since the file was created.
    pub dropped_total: u64,
    pub oldest_seq: Option<u64>,
    /// Over the cap with nothing droppable left: only states, episodes, identities and
    /// drop reports remain, and they are kept.
    pub over_cap: bool,
    /// Records that failed to decode and were moved to the quarantine table.
    pub undecodable_total: u64,
    /// The newest agent time of the records committed to this file, or of an observation
    /// handed over with [`Outbox::observed`]: the agent was running and watching its
    /// devices until then. `None` for a file no build that keeps it has written to.
    pub observed_until: Option<Timestamp>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    /// redb found the file damaged (or panicked reading it).
    #[error("outbox {path}: the file is damaged: {detail}")]
    Damaged { path: PathBuf, detail: String },
    #[error("outbox {path}: damaged, and cannot be moved aside to {aside}: {source}")]
    MoveAside {
        path: PathBuf,
        aside: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox {path}: no random source for the incarnation")]
    Random { path: PathBuf },
    #[error("outbox {path}: cannot create directory: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox {path}: {what}: {source}")]
    Storage {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    /// A commit failed; every caller in that commit gets this and none of its records
    /// or acks took effect.
    #[error("outbox {path}: commit failed: {source}")]
    Commit {
        path: PathBuf,
        #[source]
        source: CommitError,
    },
    #[error("outbox {path}: file format {found} is not supported (this build reads {FORMAT})")]
    Format { path: PathBuf, found: u64 },
    #[error("outbox {path}: cannot encode record: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("outbox {path}: must be opened inside a tokio runtime")]
    NoRuntime { path: PathBuf },
    #[error("outbox {path}: {what} panicked")]
    Panicked { path: PathBuf, what: &'static str },
    #[error("outbox {path}: the writer has stopped (closed, or its commit failed fatally)")]
    Closed { path: PathBuf },
}

/// Why one writer commit failed. Every caller in the batch gets a copy, hence the `Arc`s.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    #[error("{what}: {source}")]
    Storage {
        what: &'static str,
        #[source]
        source: Arc<redb::Error>,
    },
    #[error("encode drop report: {0}")]
    EncodeDropReport(#[source] Arc<serde_json::Error>),
    #[error("writer already closed")]
    WriterClosed,
}

/// What the writer is asked to do.
enum Op {
    Append {
        /// Each record as stored but for its seq: tag and packed JSON (the tag says
        /// whether the size cap may drop it).
        items: Vec<Vec<u8>>,
        /// Written with the records, in the same commit: (key, value) in the state table.
        states: Vec<(String, Vec<u8>)>,
        /// The newest agent time of the records, or of an observation that made none.
        observed: Option<Timestamp>,
        /// The caller lets readings wait up to the linger for company.
        linger: bool,
        reply: oneshot::Sender<Result<Vec<u64>, OutboxError>>,
    },
    Ack {
        ranges: Vec<SeqRange>,
        /// None: a deferred ack ([`Outbox::ack_later`]), riding along with the next commit.
        reply: Option<oneshot::Sender<Result<u64, OutboxError>>>,
    },
    /// Records `pending` could not decode: move them to the quarantine table.
    Quarantine { seqs: Vec<u64> },
    Close {
        reply: oneshot::Sender<Result<(), OutboxError>>,
    },
}

/// How long an op may wait for company before its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Commit at once (within the commit window).
    Prompt,
    /// Up to `linger`: readings only (no state, nothing that may not be dropped) handed
    /// over to linger.
    Linger,
    /// Up to `ack_linger`: deferred acks and quarantine moves.
    AckLinger,
}

impl Op {
    fn wait(&self) -> Wait {
        match self {
            Op::Append { states, linger, .. } => {
                if *linger && states.is_empty() && !self.keeps_a_record() {
                    Wait::Linger
                } else {
                    Wait::Prompt
                }
            }
            Op::Ack { reply: None, .. } | Op::Quarantine { .. } => Wait::AckLinger,
            Op::Ack { reply: Some(_), .. } | Op::Close { .. } => Wait::Prompt,
        }
    }

    /// Whether the op appends a record that is not a reading (a state, a fault episode,
    /// an identity, a drop report): such a record neither waits for the linger nor lets
    /// the uplink wait.
    fn keeps_a_record(&self) -> bool {
        match self {
            Op::Append { items, .. } => items.iter().any(|stored| !is_reading(stored)),
            _ => false,
        }
    }
}

/// One range handed to the writer with [`Outbox::ack_later`] and not committed yet, and
/// the records and bytes its commit deletes.
#[derive(Debug, Clone, Copy)]
struct UnsavedAck {
    range: SeqRange,
    records: u64,
    bytes: u64,
}

/// The deferred acks not committed yet: `pending` skips them, `ack_later` does not count
/// them twice, and `stats` counts their records as gone.
type Unsaved = Arc<Mutex<Vec<UnsavedAck>>>;

fn unsaved_covers(unsaved: &[UnsavedAck], seq: u64) -> bool {
    unsaved
        .iter()
        .any(|u| u.range.first <= seq && seq <= u.range.last)
}

fn covered(ranges: &[SeqRange], seq: u64) -> bool {
    ranges.iter().any(|r| r.first <= seq && seq <= r.last)
}

/// The commit of records handed over with [`Outbox::append_lingering`] or
/// [`Outbox::append_soon`]: resolves to their seqs once they are durable.
#[derive(Debug)]
pub struct Commit {
    path: PathBuf,
    rx: oneshot::Receiver<Result<Vec<u64>, OutboxError>>,
}

impl Future for Commit {
    type Output = Result<Vec<u64>, OutboxError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.rx).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(OutboxError::Closed {
                path: self.path.clone(),
            })),
        }
    }
}

/// Records encoded for the writer (each as stored but for its seq: tag and packed JSON),
/// and the newest of their times.
struct Encoded {
    records: Vec<Vec<u8>>,
    observed: Option<Timestamp>,
}

/// A record as stored, minus the seq that the writer splices in front.
#[derive(Serialize)]
struct Unnumbered<'a> {
    at: Timestamp,
    device: &'a str,
    #[serde(flatten)]
    body: &'a RecordBody,
}

struct Inner {
    path: PathBuf,
    incarnation: String,
    db: Arc<Database>,
    tx: Mutex<Option<std_mpsc::Sender<Op>>>,
    stats: Arc<Mutex<OutboxStats>>,
    unsaved: Unsaved,
    /// Set by the writer when a commit held a record that is not a reading (a state, a
    /// fault episode, an identity); taken by [`Outbox::take_urgent`].
    urgent: Arc<AtomicBool>,
}

/// Handle to the outbox; clones share one file and one writer.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain counters replaced whole; a panicked holder cannot
    // leave them half-written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn storage<'a, E: Into<redb::Error>>(
    path: &'a Path,
    what: &'static str,
) -> impl FnOnce(E) -> OutboxError + 'a {
    move |source| OutboxError::Storage {
        path: path.to_path_buf(),
        what,
        source: Box::new(source.into()),
    }
}

/// For the writer, whose errors go to every caller of a batch.
fn failed<E: Into<redb::Error>>(what: &'static str) -> impl Fn(E) -> CommitError {
    move |err| CommitError::Storage {
        what,
        source: Arc::new(err.into()),
    }
}

impl Outbox {
    /// Opens or creates; spawns the group-commit writer on the current tokio runtime.
    pub async fn open(cfg: OutboxConfig) -> Result<Outbox, OutboxError> {
        let path = cfg.path.clone();
        let rt = tokio::runtime::Handle::try_current()
            .map_err(|_| OutboxError::NoRuntime { path: path.clone() })?;
        // Opening after a crash makes redb check the whole file: keep that off the
        // async workers.
        let cfg2 = cfg.clone();
        let (db, state) = rt
            .spawn_blocking(move || open_blocking(&cfg2))
            .await
            .map_err(|_| OutboxError::Panicked {
                path: path.clone(),
                what: "opening the file",
            })??;
        let db = Arc::new(db);
        let incarnation = state.incarnation.clone();
        let stats = Arc::new(Mutex::new(state.stats()));
        let (tx, rx) = std_mpsc::channel();
        let unsaved = Unsaved::default();
        let urgent = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            path: path.clone(),
            db: Some(db.clone()),
            max_bytes: cfg.max_bytes,
            window: cfg.commit_window,
            linger: cfg.linger,
            ack_linger: cfg.ack_linger,
            state,
            stats: stats.clone(),
            unsaved: unsaved.clone(),
            urgent: urgent.clone(),
        };
        rt.spawn_blocking(move || writer.run(rx));
        Ok(Outbox {
            inner: Arc::new(Inner {
                path,
                incarnation,
                db,
                tx: Mutex::new(Some(tx)),
                stats,
                unsaved,
                urgent,
            }),
        })
    }

    /// Whether a commit since the last call held a record that is not a reading (a state,
    /// a fault episode, an identity, a drop report): the uplink sends those at once, and
    /// lets readings wait for company.
    pub fn take_urgent(&self) -> bool {
        self.inner.urgent.swap(false, Ordering::AcqRel)
    }

    /// The file this outbox lives in.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The file's incarnation (32 hex digits): its seqs count within it.
    pub fn incarnation(&self) -> &str {
        &self.inner.incarnation
    }

    fn closed(&self) -> OutboxError {
        OutboxError::Closed {
            path: self.inner.path.clone(),
        }
    }

    fn send(&self, op: Op) -> Result<(), OutboxError> {
        let tx = lock(&self.inner.tx);
        match tx.as_ref() {
            Some(tx) => tx.send(op).map_err(|_| self.closed()),
            None => Err(self.closed()),
        }
    }

    /// The record as stored, but for its seq: tag and packed JSON.
    fn encode(
        &self,
        device: &str,
        at: Timestamp,
        body: &RecordBody,
    ) -> Result<Vec<u8>, OutboxError> {
        let json = serde_json::to_vec(&Unnumbered { at, device, body }).map_err(|source| {
            OutboxError::Encode {
                path: self.inner.path.clone(),
                source,
            }
        })?;
        Ok(pack(body.is_droppable(), &json))
    }

    /// Encodes and packs records for the writer (on the caller's task, which keeps the
    /// single writer's work to inserts), with the newest of their times.
    fn encode_all(
        &self,
        items: &[(String, Timestamp, RecordBody)],
    ) -> Result<Encoded, OutboxError> {
        let records = items
            .iter()
            .map(|(device, at, body)| self.encode(device, *at, body))
            .collect::<Result<Vec<_>, OutboxError>>()?;
        let observed = items.iter().map(|(_, at, _)| *at).max();
        Ok(Encoded { records, observed })
    }

    /// Assigns the next seq and returns only once the record is durable (redb commit returned).
    pub async fn append(
        &self,
        device: &str,
        at: Timestamp,
        body: RecordBody,
    ) -> Result<u64, OutboxError> {
        let encoded = self.encode_all(&[(device.to_string(), at, body)])?;
        let seqs = self.append_encoded(encoded, Vec::new(), false).await?;
        seqs.first().copied().ok_or_else(|| self.closed())
    }

    /// Same for several records in one commit; returns their seqs in order.
    pub async fn append_many(
        &self,
        items: Vec<(String, Timestamp, RecordBody)>,
    ) -> Result<Vec<u64>, OutboxError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let encoded = self.encode_all(&items)?;
        self.append_encoded(encoded, Vec::new(), false).await
    }

    /// Hands records over for the next commit and returns at once; the [`Commit`]
    /// resolves to their seqs once they are durable. Readings may wait up to the linger
    /// for other work to share their commit; records that may not be dropped (states,
    /// episodes, identities) make the commit start at once.
    pub fn append_lingering(
        &self,
        items: Vec<(String, Timestamp, RecordBody)>,
    ) -> Result<Commit, OutboxError> {
        self.hand_over(self.encode_all(&items)?, Vec::new(), true)
    }

    /// Hands records over for a commit that starts at once, and returns at once; the
    /// [`Commit`] resolves to their seqs once they are durable. For a caller that gathered
    /// its records itself and must not wait for the disk meanwhile.
    pub fn append_soon(
        &self,
        items: Vec<(String, Timestamp, RecordBody)>,
    ) -> Result<Commit, OutboxError> {
        self.hand_over(self.encode_all(&items)?, Vec::new(), false)
    }

    /// [`Outbox::append_soon`], storing each `(key, state)` of `states` in the same commit
    /// (see [`Outbox::append_many_with_state`]).
    pub fn append_soon_with_states(
        &self,
        items: Vec<(String, Timestamp, RecordBody)>,
        states: Vec<(String, Vec<u8>)>,
    ) -> Result<Commit, OutboxError> {
        self.hand_over(self.encode_all(&items)?, states, false)
    }

    /// Notes that the agent observed its devices at `at` without making a record: it
    /// rides along with the next commit (within the linger) as
    /// [`OutboxStats::observed_until`], and the [`Commit`] resolves (to no seqs) once it
    /// is durable.
    pub fn observed(&self, at: Timestamp) -> Result<Commit, OutboxError> {
        let encoded = Encoded {
            records: Vec::new(),
            observed: Some(at),
        };
        self.hand_over(encoded, Vec::new(), true)
    }

    fn hand_over(
        &self,
        encoded: Encoded,
        states: Vec<(String, Vec<u8>)>,
        linger: bool,
    ) -> Result<Commit, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Append {
            items: encoded.records,
            states,
            observed: encoded.observed,
            linger,
            reply,
        })?;
        Ok(Commit {
            path: self.inner.path.clone(),
            rx,
        })
    }

    /// Like [`Outbox::append_many`], and stores `state` under `key` in the same commit: a
    /// crash leaves both or neither, so state derived from the records (a device's open
    /// fault episodes) never disagrees with what was sent.
    pub async fn append_many_with_state(
        &self,
        items: Vec<(String, Timestamp, RecordBody)>,
        key: &str,
        state: Vec<u8>,
    ) -> Result<Vec<u64>, OutboxError> {
        let encoded = self.encode_all(&items)?;
        self.append_encoded(encoded, vec![(key.to_string(), state)], false)
            .await
    }

    /// The state last stored under `key` with [`Outbox::append_many_with_state`].
    pub fn load_state(&self, key: &str) -> Result<Option<Vec<u8>>, OutboxError> {
        let path = &self.inner.path;
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(storage(path, "read state"))?;
        let table = match txn.open_table(STATE) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(path, "read state")(e)),
        };
        let value = table.get(key).map_err(storage(path, "read state"))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    async fn append_encoded(
        &self,
        encoded: Encoded,
        states: Vec<(String, Vec<u8>)>,
        linger: bool,
    ) -> Result<Vec<u64>, OutboxError> {
        let (reply, rx) = oneshot::channel();
        self.send(Op::Append {
            items: encoded.records,
            states,
            observed: encoded.observed,
            linger,
            reply,
        })?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Oldest first, records with seq > after (None = from the oldest), at most max
    /// records / max_bytes of encoded JSON. The first record is returned even when it
    /// alone is larger than `max_bytes`, so that an oversized record cannot stall the
    /// queue. Records that fail to decode are skipped, counted and moved aside; records
    /// acknowledged with [`Outbox::ack_later`] are skipped before their deletion commits.
    pub fn pending(
        &self,
        after: Option<u64>,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let path = &self.inner.path;
        let start = match after {
            None => 0,
            Some(u64::MAX) => return Ok(Vec::new()),
            Some(a) => a + 1,
        };
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        let unsaved = lock(&self.inner.unsaved).clone();
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(storage(path, "begin read"))?;
        let table = txn
            .open_table(RECORDS)
            .map_err(storage(path, "open records table"))?;
        let mut bad = Vec::new();
        let mut total = 0usize;
        for item in table
            .range(start..)
            .map_err(storage(path, "read records"))?
        {
            let (k, v) = item.map_err(storage(path, "read records"))?;
            let seq = k.value();
            if unsaved_covers(&unsaved, seq) {
                continue;
            }
            let stored = v.value();
            let len = usize::try_from(json_len(seq, stored)).unwrap_or(usize::MAX);
            if !out.is_empty() && total.saturating_add(len) > max_bytes {
                break;
            }
            match decode_stored(seq, stored) {
                Some(r) if r.seq == seq => {
                    total += len;
                    out.push(r);
                    if out.len() >= max {
                        break;
                    }
                }
                _ => {
                    tracing::warn!(path = %path.display(), seq, "outbox record does not decode; moving it to quarantine");
                    bad.push(seq);
                    if bad.len() >= MAX_BAD_PER_SCAN {
                        break;
                    }
                }
            }
        }
        if !bad.is_empty() {
            // Best effort: if the writer is gone the records stay and are skipped again.
            let _ = self.send(Op::Quarantine { seqs: bad });
        }
        Ok(out)
    }

    /// Deletes exactly the records in these ranges (ranges may cover seqs already gone);
    /// returns how many were deleted. Durable when it returns.
    pub async fn ack(&self, ranges: &[SeqRange]) -> Result<u64, OutboxError> {
        let ranges: Vec<SeqRange> = ranges
            .iter()
            .filter(|r| r.first <= r.last)
            .copied()
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let (reply, rx) = oneshot::channel();
        self.send(Op::Ack {
            ranges,
            reply: Some(reply),
        })?;
        rx.await.map_err(|_| self.closed())?
    }

    /// Deletes exactly the records in these ranges with the next commit, without waiting
    /// for it: `pending` skips them from now on, and a crash before that commit only means
    /// they are sent again (the gateway keeps one copy). Returns how many records it
    /// deletes (ranges may cover seqs already gone or already acknowledged).
    pub fn ack_later(&self, ranges: &[SeqRange]) -> Result<u64, OutboxError> {
        let ranges: Vec<SeqRange> = ranges
            .iter()
            .filter(|r| r.first <= r.last)
            .copied()
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let path = &self.inner.path;
        // Held until the writer has the op: it takes the ranges out only after their
        // commit, so each record is counted once, whichever side of it this read lands.
        let mut unsaved = lock(&self.inner.unsaved);
        let txn = self
            .inner
            .db
            .begin_read()
            .map_err(storage(path, "begin read"))?;
        let table = txn
            .open_table(RECORDS)
            .map_err(storage(path, "open records table"))?;
        let mut entries = Vec::with_capacity(ranges.len());
        for (i, r) in ranges.iter().enumerate() {
            let mut e = UnsavedAck {
                range: *r,
                records: 0,
                bytes: 0,
            };
            for item in table
                .range(r.first..=r.last)
                .map_err(storage(path, "read records"))?
            {
                let (k, v) = item.map_err(storage(path, "read records"))?;
                let seq = k.value();
                if !unsaved_covers(&unsaved, seq) && !covered(&ranges[..i], seq) {
                    e.records += 1;
                    e.bytes += json_len(seq, v.value());
                }
            }
            entries.push(e);
        }
        let n = entries.iter().map(|e| e.records).sum();
        unsaved.extend_from_slice(&entries);
        let sent = self.send(Op::Ack {
            ranges,
            reply: None,
        });
        if sent.is_err() {
            let keep = unsaved.len() - entries.len();
            unsaved.truncate(keep);
        }
        sent.map(|()| n)
    }

    /// The counters as of the last commit, less the records deferred acks delete with
    /// the next one (`oldest_seq` is the last commit's).
    pub fn stats(&self) -> OutboxStats {
        let unsaved = lock(&self.inner.unsaved);
        let mut s = lock(&self.inner.stats).clone();
        for u in unsaved.iter() {
            s.records = s.records.saturating_sub(u.records);
            s.bytes = s.bytes.saturating_sub(u.bytes);
        }
        s
    }

    /// Flushes and stops the writer. Other clones get [`OutboxError::Closed`] afterwards.
    /// Once every clone is dropped the file is free to be opened again.
    pub async fn close(self) -> Result<(), OutboxError> {
        let (reply, rx) = oneshot::channel();
        let sent = self.send(Op::Close { reply });
        // No more ops from any clone: the writer exits once it has answered the ones
        // already queued.
        lock(&self.inner.tx).take();
        match sent {
            Ok(()) => rx.await.map_err(|_| self.closed())?,
            // Already closed by another clone: nothing left to flush.
            Err(_) => Ok(()),
        }
    }
}

/// The record stored under `seq`; `None` if it does not unpack or decode.
fn decode_stored(seq: u64, stored: &[u8]) -> Option<Record> {
    match stored.split_first() {
        Some((&TAG_KEEP | &TAG_READING, json)) => serde_json::from_slice(json).ok(),
        Some((&TAG_KEEP_PACKED | &TAG_READING_PACKED, packed)) => {
            let len = packed_len(packed)?;
            if len > MAX_UNPACKED {
                return None;
            }
            let unnumbered = lz4_flex::block::decompress_size_prepended(packed).ok()?;
            // A length that does not match would make the byte accounting wrong.
            if unnumbered.len() != len {
                return None;
            }
            serde_json::from_slice(&numbered(seq, &unnumbered)).ok()
        }
        _ => None,
    }
}

/// Tag and packed JSON of a record without its seq (see the module doc).
fn pack(droppable: bool, unnumbered: &[u8]) -> Vec<u8> {
    let tag = if droppable {
        TAG_READING_PACKED
    } else {
        TAG_KEEP_PACKED
    };
    // Tag, length and block written into one buffer: no second allocation and copy.
    let mut stored = vec![0u8; 5 + lz4_flex::block::get_maximum_output_size(unnumbered.len())];
    stored[0] = tag;
    stored[1..5].copy_from_slice(&(unnumbered.len() as u32).to_le_bytes());
    if let Ok(n) = lz4_flex::block::compress_into(unnumbered, &mut stored[5..]) {
        stored.truncate(5 + n);
        return stored;
    }
    // Not expected (the buffer has the block's worst-case size): the allocating form.
    let mut stored = vec![tag];
    stored.extend_from_slice(&lz4_flex::block::compress_prepend_size(unnumbered));
    stored
}

/// The unpacked length that a packed record starts with.
fn packed_len(packed: &[u8]) -> Option<usize> {
    let len: [u8; 4] = packed.get(..4)?.try_into().ok()?;
    usize::try_from(u32::from_le_bytes(len)).ok()
}

fn is_reading(stored: &[u8]) -> bool {
    matches!(stored.first(), Some(&TAG_READING | &TAG_READING_PACKED))
}

/// The counters the writer keeps, mirrored in `meta`.
#[derive(Debug, Clone, Default)]
struct State {
    /// Written once, when the file gets it.
    incarnation: String,
    next_seq: u64,
    records: u64,
    bytes: u64,
    dropped_total: u64,
    undecodable_total: u64,
    oldest_seq: Option<u64>,
    over_cap: bool,
    /// Every record below this seq may not be dropped (not persisted: after a restart
    /// the first drop event walks from the start once).
    scan_from: u64,
    observed_until: Option<Timestamp>,
}

impl State {
    fn stats(&self) -> OutboxStats {
        OutboxStats {
            incarnation: self.incarnation.clone(),
            records: self.records,
            bytes: self.bytes,
            next_seq: self.next_seq,
            dropped_total: self.dropped_total,
            oldest_seq: self.oldest_seq,
            over_cap: self.over_cap,
            undecodable_total: self.undecodable_total,
            observed_until: self.observed_until,
        }
    }
}

fn open_blocking(cfg: &OutboxConfig) -> Result<(Database, State), OutboxError> {
    let path = &cfg.path;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| OutboxError::Dir {
            path: path.clone(),
            source,
        })?;
    }
    match open_file(cfg) {
        Err(OutboxError::Damaged { detail, .. }) => {
            let aside = move_aside(path, Timestamp::now())?;
            tracing::error!(
                path = %path.display(),
                moved_to = %aside.display(),
                problem = %detail,
                "outbox file is damaged: moved it aside and starting a new outbox (a new incarnation)"
            );
            open_file(cfg)
        }
        other => other,
    }
}

/// Renames a damaged outbox to `<name>.corrupt-<UTC time>` (never over an existing file).
fn move_aside(path: &Path, now: Timestamp) -> Result<PathBuf, OutboxError> {
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{stamp}"));
    let mut aside = path.with_file_name(&name);
    let mut n = 1;
    while aside.exists() {
        n += 1;
        aside = path.with_file_name(format!("{}-{n}", name.to_string_lossy()));
    }
    std::fs::rename(path, &aside).map_err(|source| OutboxError::MoveAside {
        path: path.to_path_buf(),
        aside: aside.clone(),
        source,
    })?;
    Ok(aside)
}

/// 128 random bits as 32 hex digits, split in the two halves meta stores.
fn new_incarnation(path: &Path) -> Result<(u64, u64), OutboxError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| OutboxError::Random {
            path: path.to_path_buf(),
        })?;
    let (hi, lo) = bytes.split_at(8);
    let half = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    Ok((half(hi), half(lo)))
}

/// Opens the database, telling damage (which moving the file aside cures) from every other
/// failure (locked by another process, permissions: those must stop the agent).
fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, OutboxError> {
    // redb 2 panics on some truncated files instead of returning an error; the panic is
    // caught here so a damaged file is treated as damaged, not as a dead agent. Nothing
    // outlives the closure but its result, so no broken state can be observed.
    let opened = quietly(|| {
        redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(path)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)))) => {
            Err(OutboxError::Damaged {
                path: path.to_path_buf(),
                detail,
            })
        }
        // What redb says of a file that is not one of its databases (bad header).
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            Err(OutboxError::Damaged {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })
        }
        Ok(Err(source)) => Err(OutboxError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        }),
        Err(panic) => Err(OutboxError::Damaged {
            path: path.to_path_buf(),
            detail: format!("redb could not read it ({})", panic_text(panic.as_ref())),
        }),
    }
}

/// Runs `f`, catching a panic; the panic hook stays silent for a panic on this thread
/// meanwhile (it is reported as damage, and a "panicked at" line in the log would read as
/// a crash), and passes on any other thread's. Opens take turns, so each restores the
/// hook it found. (The gateway's store does the same.)
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static TURN: Mutex<()> = Mutex::new(());
    let _turn = lock(&TURN);
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

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

fn open_file(cfg: &OutboxConfig) -> Result<(Database, State), OutboxError> {
    let path = &cfg.path;
    let db = open_database(path, cfg.cache_bytes)?;
    let mut txn = db.begin_write().map_err(storage(path, "begin write"))?;
    txn.set_durability(Durability::Immediate);
    let state = {
        let what = "create tables";
        let records = txn.open_table(RECORDS).map_err(storage(path, what))?;
        txn.open_table(QUARANTINE).map_err(storage(path, what))?;
        let mut meta = txn.open_table(META).map_err(storage(path, what))?;
        let get = |meta: &redb::Table<&str, u64>, k: &str| -> Result<Option<u64>, OutboxError> {
            Ok(meta
                .get(k)
                .map_err(storage(path, "read meta"))?
                .map(|v| v.value()))
        };
        match get(&meta, K_FORMAT)? {
            None => {}
            Some(found) if FORMATS_READ.contains(&found) => {}
            Some(found) => {
                return Err(OutboxError::Format {
                    path: path.clone(),
                    found,
                })
            }
        }
        let (hi, lo) = match (get(&meta, K_INCARNATION_HI)?, get(&meta, K_INCARNATION_LO)?) {
            (Some(hi), Some(lo)) => (hi, lo),
            // A new file, or one from a build before incarnations: it gets one now.
            _ => {
                let (hi, lo) = new_incarnation(path)?;
                meta.insert(K_INCARNATION_HI, hi)
                    .map_err(storage(path, "write meta"))?;
                meta.insert(K_INCARNATION_LO, lo)
                    .map_err(storage(path, "write meta"))?;
                (hi, lo)
            }
        };
        let mut s = State {
            incarnation: format!("{hi:016x}{lo:016x}"),
            next_seq: get(&meta, K_NEXT_SEQ)?.unwrap_or(1),
            records: get(&meta, K_RECORDS)?.unwrap_or(0),
            bytes: get(&meta, K_BYTES)?.unwrap_or(0),
            dropped_total: get(&meta, K_DROPPED)?.unwrap_or(0),
            undecodable_total: get(&meta, K_UNDECODABLE)?.unwrap_or(0),
            oldest_seq: None,
            over_cap: false,
            scan_from: 0,
            observed_until: get(&meta, K_OBSERVED_UNTIL)?.and_then(from_nanos),
        };
        let first = records.first().map_err(storage(path, "read records"))?;
        s.oldest_seq = first.as_ref().map(|(k, _)| k.value());
        // Belt and braces: the counter is written with every record, but should it ever
        // be behind the table, continuing above the highest stored seq keeps seqs unique.
        let last = records.last().map_err(storage(path, "read records"))?;
        if let Some((k, _)) = last {
            s.next_seq = s.next_seq.max(k.value() + 1);
        }
        s.over_cap = s.bytes > cfg.max_bytes;
        meta.insert(K_FORMAT, FORMAT)
            .map_err(storage(path, "write meta"))?;
        s
    };
    txn.commit().map_err(storage(path, "commit"))?;
    Ok((db, state))
}

struct Writer {
    path: PathBuf,
    /// Taken (dropped) on close so the file can be reopened as soon as `close` returns.
    db: Option<Arc<Database>>,
    max_bytes: u64,
    window: Duration,
    linger: Duration,
    ack_linger: Duration,
    state: State,
    stats: Arc<Mutex<OutboxStats>>,
    unsaved: Unsaved,
    urgent: Arc<AtomicBool>,
}

/// What one op produced inside the transaction, sent once the commit returned.
enum Outcome {
    Seqs(Vec<u64>),
    Acked(u64),
    None,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Op>) {
        // Callers that await each append (every appender task) come back right after
        // their answer; `expect` is how many such callers the last commit answered.
        let mut expect = 1;
        while let Ok(first) = rx.recv() {
            let mut gathering = Gathering::new(&self, expect);
            gathering.admit(&first);
            let mut st = self.state.clone();
            let mut batch = Vec::new();
            let result = match self.db.as_ref() {
                Some(db) => write_batch(
                    db,
                    first,
                    || gathering.next(&rx),
                    &mut batch,
                    &mut st,
                    self.max_bytes,
                ),
                None => {
                    batch.push(first);
                    Err(CommitError::WriterClosed)
                }
            };
            expect = batch
                .iter()
                .filter(|op| op.wait() == Wait::Prompt)
                .count()
                .max(1);
            let closing = batch.iter().any(|op| matches!(op, Op::Close { .. }));
            self.settle(batch, result, st);
            if closing || self.db.is_none() {
                break;
            }
        }
        // Ops still queued (from other clones, after close) are dropped here: their
        // callers see the reply channel close and get `Closed`.
    }

    /// Answers the callers of a batch once its commit returned (or failed).
    fn settle(&mut self, batch: Vec<Op>, result: Result<Vec<Outcome>, CommitError>, st: State) {
        // Committed or not, deferred acks are no longer waiting: after a failed commit
        // their records are visible again and go to the gateway once more. The waiting
        // set and the counters change under one lock, so `stats` never counts a deletion
        // twice or not at all.
        let mut unsaved = lock(&self.unsaved);
        forget_unsaved(&mut unsaved, &batch);
        match result {
            Ok(outcomes) => {
                if st.over_cap && !self.state.over_cap {
                    tracing::warn!(path = %self.path.display(), bytes = st.bytes, max_bytes = self.max_bytes,
                        "outbox over its size cap with only states, fault events and drop reports left; keeping them all");
                }
                self.state = st;
                *lock(&self.stats) = self.state.stats();
                drop(unsaved);
                // Before the replies: the caller pokes the uplink once its append returns.
                if batch.iter().any(Op::keeps_a_record) {
                    self.urgent.store(true, Ordering::Release);
                }
                let closing = batch.iter().any(|op| matches!(op, Op::Close { .. }));
                if closing {
                    self.db = None;
                }
                for (op, outcome) in batch.into_iter().zip(outcomes) {
                    match (op, outcome) {
                        (Op::Append { reply, .. }, Outcome::Seqs(s)) => {
                            let _ = reply.send(Ok(s));
                        }
                        (
                            Op::Ack {
                                reply: Some(reply), ..
                            },
                            Outcome::Acked(n),
                        ) => {
                            let _ = reply.send(Ok(n));
                        }
                        (Op::Close { reply }, _) => {
                            let _ = reply.send(Ok(()));
                        }
                        _ => {}
                    }
                }
            }
            Err(failure) => {
                drop(unsaved);
                tracing::error!(path = %self.path.display(), error = %failure, "outbox commit failed");
                let err = || OutboxError::Commit {
                    path: self.path.clone(),
                    source: failure.clone(),
                };
                for op in batch {
                    match op {
                        Op::Append { reply, .. } => {
                            let _ = reply.send(Err(err()));
                        }
                        Op::Ack { reply, .. } => {
                            if let Some(reply) = reply {
                                let _ = reply.send(Err(err()));
                            }
                        }
                        Op::Close { reply } => {
                            self.db = None;
                            let _ = reply.send(Err(err()));
                        }
                        Op::Quarantine { .. } => {}
                    }
                }
            }
        }
    }
}

/// The ops of one commit after its first. Ops that may linger wait for company: the
/// commit starts at the earliest of their arrival plus their linger (`linger` for
/// readings, `ack_linger` for deferred acks). Once an op that may not wait is in, the
/// commit window applies, and it closes early in two cases: (1) as many callers wait as
/// the last commit answered (`expect`): once they are all in, waiting longer only adds
/// latency; (2) nothing new arrived for a tenth of the window: nobody else is coming. Ops
/// that arrive while a commit runs queue up and all go into the next one, so batches
/// grow with load on their own. Each op goes into the transaction as it arrives, so the
/// writer's inserts overlap the callers' encoding of what comes next.
struct Gathering {
    window: Duration,
    linger: Duration,
    ack_linger: Duration,
    quiet: Duration,
    expect: usize,
    prompt: usize,
    deadline: Instant,
    records: usize,
    closing: bool,
}

impl Gathering {
    fn new(w: &Writer, expect: usize) -> Self {
        Gathering {
            window: w.window,
            linger: w.linger,
            ack_linger: w.ack_linger,
            quiet: (w.window / 10).max(Duration::from_micros(20)),
            expect,
            prompt: 0,
            deadline: Instant::now() + w.ack_linger,
            records: 0,
            closing: false,
        }
    }

    /// Counts `op` in: the commit must start by its linger, and a prompt op brings the
    /// deadline within the commit window.
    fn admit(&mut self, op: &Op) {
        let wait = match op.wait() {
            Wait::Prompt => {
                self.prompt += 1;
                self.window
            }
            Wait::Linger => self.linger,
            Wait::AckLinger => self.ack_linger,
        };
        self.deadline = self.deadline.min(Instant::now() + wait);
        self.records += op_records(op);
        self.closing |= matches!(op, Op::Close { .. });
    }

    /// The next op of this commit, or `None` when the commit should start.
    fn next(&mut self, rx: &std_mpsc::Receiver<Op>) -> Option<Op> {
        if self.closing || self.records >= MAX_BATCH_RECORDS {
            return None;
        }
        let op = loop {
            match rx.try_recv() {
                Ok(op) => break op,
                Err(std_mpsc::TryRecvError::Disconnected) => return None,
                Err(std_mpsc::TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= self.deadline || (self.prompt > 0 && self.prompt >= self.expect) {
                return None;
            }
            let wait = if self.prompt > 0 {
                self.quiet.min(self.deadline - now)
            } else {
                self.deadline - now
            };
            match rx.recv_timeout(wait) {
                Ok(op) => break op,
                Err(std_mpsc::RecvTimeoutError::Timeout) if self.prompt == 0 => continue,
                Err(_) => return None,
            }
        };
        self.admit(&op);
        Some(op)
    }
}

/// Takes the deferred acks of `batch` out of the waiting set, one entry per range.
fn forget_unsaved(unsaved: &mut Vec<UnsavedAck>, batch: &[Op]) {
    for op in batch {
        if let Op::Ack {
            ranges,
            reply: None,
        } = op
        {
            for r in ranges {
                if let Some(i) = unsaved.iter().position(|u| u.range == *r) {
                    unsaved.swap_remove(i);
                }
            }
        }
    }
}

fn op_records(op: &Op) -> usize {
    match op {
        Op::Append { items, .. } => items.len(),
        Op::Ack { ranges, .. } => ranges.len(),
        Op::Quarantine { seqs } => seqs.len(),
        Op::Close { .. } => 1,
    }
}

/// `{"at":...}` → `{"seq":N,"at":...}`, the same bytes `serde_json` writes for a `Record`.
fn numbered(seq: u64, unnumbered: &[u8]) -> Vec<u8> {
    let rest = unnumbered.get(1..).unwrap_or_default();
    let mut v = Vec::with_capacity(unnumbered.len() + 28);
    v.extend_from_slice(b"{\"seq\":");
    v.extend_from_slice(seq.to_string().as_bytes());
    v.push(b',');
    v.extend_from_slice(rest);
    v
}

/// What [`numbered`] adds to a record's JSON: `"seq":`, the digits and a comma.
fn seq_len(seq: u64) -> u64 {
    let digits = u64::from(seq.checked_ilog10().unwrap_or(0)) + 1;
    b"\"seq\":".len() as u64 + digits + 1
}

/// A time as meta keeps it: nanoseconds since the Unix epoch (`None` before 1970 or after
/// 2554, which no record of a running agent has).
fn to_nanos(t: Timestamp) -> Option<u64> {
    u64::try_from(t.as_nanosecond()).ok()
}

fn from_nanos(ns: u64) -> Option<Timestamp> {
    Timestamp::from_nanosecond(i128::from(ns)).ok()
}

/// Size on the wire of the record stored under `seq` (its JSON, seq included).
fn json_len(seq: u64, stored: &[u8]) -> u64 {
    match stored.split_first() {
        Some((&TAG_KEEP_PACKED | &TAG_READING_PACKED, packed)) => {
            packed_len(packed).map_or(0, |n| n as u64 + seq_len(seq))
        }
        _ => stored.len().saturating_sub(1) as u64,
    }
}

/// The tables a commit writes records to.
struct Tables<'t> {
    records: redb::Table<'t, u64, &'static [u8]>,
    quarantine: redb::Table<'t, u64, &'static [u8]>,
    states: redb::Table<'t, &'static str, &'static [u8]>,
}

/// One op inside the transaction.
fn apply(t: &mut Tables<'_>, op: &Op, st: &mut State) -> Result<Outcome, CommitError> {
    Ok(match op {
        Op::Append {
            items,
            states: kept,
            observed,
            ..
        } => {
            for (k, v) in kept {
                t.states
                    .insert(k.as_str(), v.as_slice())
                    .map_err(failed("store state"))?;
            }
            st.observed_until = st.observed_until.max(*observed);
            let mut seqs = Vec::with_capacity(items.len());
            for stored in items {
                let seq = st.next_seq;
                st.next_seq += 1;
                t.records
                    .insert(seq, stored.as_slice())
                    .map_err(failed("insert record"))?;
                st.records += 1;
                st.bytes += json_len(seq, stored);
                seqs.push(seq);
            }
            Outcome::Seqs(seqs)
        }
        Op::Ack { ranges, .. } => {
            let mut n = 0;
            for r in ranges {
                for item in t
                    .records
                    .extract_from_if(r.first..=r.last, |_, _| true)
                    .map_err(failed("delete acked"))?
                {
                    let (k, v) = item.map_err(failed("delete acked"))?;
                    st.records = st.records.saturating_sub(1);
                    st.bytes = st.bytes.saturating_sub(json_len(k.value(), v.value()));
                    n += 1;
                }
            }
            Outcome::Acked(n)
        }
        Op::Quarantine { seqs } => {
            for &seq in seqs {
                let moved = t
                    .records
                    .remove(seq)
                    .map_err(failed("quarantine"))?
                    .map(|v| {
                        let stored = v.value().to_vec();
                        st.records = st.records.saturating_sub(1);
                        st.bytes = st.bytes.saturating_sub(json_len(seq, &stored));
                        stored
                    });
                if let Some(stored) = moved {
                    t.quarantine
                        .insert(seq, stored.as_slice())
                        .map_err(failed("quarantine"))?;
                    st.undecodable_total += 1;
                }
            }
            Outcome::None
        }
        Op::Close { .. } => Outcome::None,
    })
}

/// One transaction for `first` and the ops `more` hands over until it says `None`, each
/// applied as it comes; every op taken is pushed to `batch` before it is applied, so its
/// caller gets the outcome, and one failure is reported to every caller in it.
fn write_batch(
    db: &Database,
    first: Op,
    mut more: impl FnMut() -> Option<Op>,
    batch: &mut Vec<Op>,
    st: &mut State,
    max_bytes: u64,
) -> Result<Vec<Outcome>, CommitError> {
    batch.push(first);
    let mut txn = db.begin_write().map_err(failed("begin write"))?;
    txn.set_durability(Durability::Immediate);
    let mut outcomes = Vec::new();
    {
        let mut tables = Tables {
            records: txn.open_table(RECORDS).map_err(failed("open records"))?,
            quarantine: txn
                .open_table(QUARANTINE)
                .map_err(failed("open quarantine"))?,
            states: txn.open_table(STATE).map_err(failed("open state"))?,
        };
        let mut meta = txn.open_table(META).map_err(failed("open meta"))?;
        while let Some(op) = batch.last() {
            outcomes.push(apply(&mut tables, op, st)?);
            match more() {
                Some(op) => batch.push(op),
                None => break,
            }
        }
        let records = &mut tables.records;
        if st.bytes > max_bytes {
            drop_oldest_readings(records, st, max_bytes)?;
        }
        st.over_cap = st.bytes > max_bytes;
        st.oldest_seq = records
            .first()
            .map_err(failed("read oldest"))?
            .map(|(k, _)| k.value());

        for (k, v) in [
            (K_NEXT_SEQ, st.next_seq),
            (K_RECORDS, st.records),
            (K_BYTES, st.bytes),
            (K_DROPPED, st.dropped_total),
            (K_UNDECODABLE, st.undecodable_total),
        ] {
            meta.insert(k, v).map_err(failed("write meta"))?;
        }
        if let Some(ns) = st.observed_until.and_then(to_nanos) {
            meta.insert(K_OBSERVED_UNTIL, ns)
                .map_err(failed("write meta"))?;
        }
    }
    txn.commit().map_err(failed("commit"))?;
    Ok(outcomes)
}

/// Deletes the oldest readings until the stored bytes are a little below the cap, and
/// writes one `Dropped` record for them (nothing when only undroppable records remain).
fn drop_oldest_readings(
    records: &mut redb::Table<u64, &[u8]>,
    st: &mut State,
    max_bytes: u64,
) -> Result<(), CommitError> {
    let target = max_bytes.saturating_sub(drop_slack(max_bytes));
    let (mut count, mut first, mut last) = (0u64, None, 0u64);
    // Oldest first, skipping what may not be dropped. Everything below
    // `scan_from` is known to be undroppable (new records only ever go on top),
    // so a file full of states is walked once, not on every commit.
    let mut exhausted = true;
    for item in records
        .extract_from_if(st.scan_from.., |_, v| is_reading(v))
        .map_err(failed("drop readings"))?
    {
        let (k, v) = item.map_err(failed("drop readings"))?;
        let seq = k.value();
        st.records = st.records.saturating_sub(1);
        st.bytes = st.bytes.saturating_sub(json_len(seq, v.value()));
        count += 1;
        first.get_or_insert(seq);
        last = seq;
        if st.bytes <= target {
            exhausted = false;
            break;
        }
    }
    st.scan_from = if exhausted { st.next_seq } else { last + 1 };
    if let Some(first_seq) = first {
        let body = RecordBody::Dropped {
            count,
            first_seq,
            last_seq: last,
        };
        let unnumbered = serde_json::to_vec(&Unnumbered {
            at: Timestamp::now(),
            device: AGENT_DEVICE,
            body: &body,
        })
        .map_err(|x| CommitError::EncodeDropReport(Arc::new(x)))?;
        let seq = st.next_seq;
        st.next_seq += 1;
        let stored = pack(false, &unnumbered);
        records
            .insert(seq, stored.as_slice())
            .map_err(failed("insert drop report"))?;
        st.records += 1;
        st.bytes += json_len(seq, &stored);
        st.dropped_total += count;
        tracing::warn!(
            count,
            first_seq,
            last_seq = last,
            "outbox full: dropped the oldest readings"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tend_profiles::{DeviceState, Value};
    use tend_wire::WireReading;

    fn sample_bodies() -> [RecordBody; 2] {
        [
            RecordBody::State {
                from: DeviceState::Up,
                to: DeviceState::Down,
            },
            RecordBody::Readings {
                readings: (0..16)
                    .map(|i| WireReading {
                        name: format!("reading_{i}"),
                        value: Value::Num(f64::from(i) * 1.5),
                        unit: Some("cmH2O".into()),
                    })
                    .collect(),
            },
        ]
    }

    #[test]
    fn stored_records_unpack_to_the_wire_encoding_and_count_its_size() {
        let at: Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
        for body in sample_bodies() {
            let un = serde_json::to_vec(&Unnumbered {
                at,
                device: "d\"1",
                body: &body,
            })
            .unwrap();
            for seq in [0, 1, 9, 10, 99, 100, 12345, u64::MAX] {
                let rec = Record {
                    seq,
                    at,
                    device: "d\"1".into(),
                    body: body.clone(),
                };
                let wire = tend_wire::encode(&rec).unwrap();
                assert_eq!(numbered(seq, &un), wire);
                // What this build writes: packed, seq spliced back in on reading.
                let packed = pack(body.is_droppable(), &un);
                assert_eq!(is_reading(&packed), body.is_droppable());
                assert_eq!(json_len(seq, &packed), wire.len() as u64, "seq {seq}");
                assert_eq!(decode_stored(seq, &packed), Some(rec.clone()));
                // What format 1 files hold: the JSON as is.
                let tag = if body.is_droppable() {
                    TAG_READING
                } else {
                    TAG_KEEP
                };
                let plain = [&[tag], wire.as_slice()].concat();
                assert_eq!(is_reading(&plain), body.is_droppable());
                assert_eq!(json_len(seq, &plain), wire.len() as u64);
                assert_eq!(decode_stored(seq, &plain), Some(rec));
            }
        }
    }

    #[test]
    fn damaged_stored_records_decode_to_nothing_without_panicking() {
        let at: Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
        let body = &sample_bodies()[1];
        let un = serde_json::to_vec(&Unnumbered {
            at,
            device: "d1",
            body,
        })
        .unwrap();
        let packed = pack(true, &un);
        assert!(
            packed.len() * 2 < un.len(),
            "{} packs to {}",
            un.len(),
            packed.len()
        );
        let mut cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"X{}".to_vec(),
            b"K{not json".to_vec(),
            b"r".to_vec(),
            b"r\x01\x00".to_vec(),
        ];
        // Every truncation, and a length that claims 4 GiB or a byte too few or too many.
        cases.extend((1..packed.len()).map(|n| packed[..n].to_vec()));
        for claim in [u32::MAX, un.len() as u32 - 1, un.len() as u32 + 1] {
            let mut p = packed.clone();
            p[1..5].copy_from_slice(&claim.to_le_bytes());
            cases.push(p);
        }
        // Flipped bytes in the packed body: never a panic; what decodes is refused by
        // `pending` unless it is a whole record with the right seq.
        for i in 5..packed.len() {
            let mut p = packed.clone();
            p[i] ^= 0x5a;
            let _ = decode_stored(7, &p);
            let _ = json_len(7, &p);
        }
        for c in &cases {
            assert_eq!(decode_stored(7, c), None, "{c:?}");
            let _ = json_len(7, c);
        }
    }

    #[tokio::test]
    async fn a_format_1_file_is_read_and_becomes_format_2_and_an_unknown_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let at: Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
        let [state, readings] = sample_bodies();
        Outbox::open(OutboxConfig::new(&path))
            .await
            .unwrap()
            .close()
            .await
            .unwrap();
        let old = |seq: u64, body: &RecordBody| Record {
            seq,
            at,
            device: "d1".into(),
            body: body.clone(),
        };
        let set_format = |format: u64| {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(K_FORMAT, format)
                .unwrap();
            txn.commit().unwrap();
        };
        {
            // What a format 1 build left: plain JSON under K and R, counters in meta.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            let mut bytes = 0;
            {
                let mut records = txn.open_table(RECORDS).unwrap();
                for (seq, body, tag) in [(1, &state, TAG_KEEP), (2, &readings, TAG_READING)] {
                    let wire = tend_wire::encode(&old(seq, body)).unwrap();
                    bytes += wire.len() as u64;
                    let stored = [&[tag], wire.as_slice()].concat();
                    records.insert(seq, stored.as_slice()).unwrap();
                }
                let mut meta = txn.open_table(META).unwrap();
                for (k, v) in [
                    (K_FORMAT, 1),
                    (K_NEXT_SEQ, 3),
                    (K_RECORDS, 2),
                    (K_BYTES, bytes),
                ] {
                    meta.insert(k, v).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        let seq = ob.append("d1", at, readings.clone()).await.unwrap();
        assert_eq!(seq, 3);
        let got = ob.pending(None, 10, 1 << 20).unwrap();
        assert_eq!(
            got,
            vec![old(1, &state), old(2, &readings), old(3, &readings)]
        );
        let wire: u64 = got
            .iter()
            .map(|r| tend_wire::encode(r).unwrap().len() as u64)
            .sum();
        assert_eq!(ob.stats().bytes, wire);
        assert_eq!(ob.ack(&[SeqRange { first: 1, last: 2 }]).await.unwrap(), 2);
        assert_eq!(
            ob.stats().bytes,
            wire - (wire - tend_wire::encode(&got[2]).unwrap().len() as u64)
        );
        ob.close().await.unwrap();
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_read().unwrap();
            let format = txn
                .open_table(META)
                .unwrap()
                .get(K_FORMAT)
                .unwrap()
                .unwrap()
                .value();
            assert_eq!(format, FORMAT);
        }
        set_format(3);
        match Outbox::open(OutboxConfig::new(&path)).await {
            Err(e @ OutboxError::Format { found: 3, .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("outbox.redb") && text.contains("format 3"),
                    "{text}"
                );
            }
            other => panic!("a format 3 file must be refused, got {other:?}"),
        }
        // Refused, not touched: the record is still there for a build that reads it.
        set_format(FORMAT);
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        assert_eq!(
            ob.pending(None, 10, 1 << 20).unwrap(),
            vec![old(3, &readings)]
        );
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn undecodable_records_are_skipped_counted_and_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.redb");
        let at = Timestamp::now();
        let state = RecordBody::State {
            from: DeviceState::Unknown,
            to: DeviceState::Up,
        };
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        for _ in 0..3 {
            ob.append("d1", at, state.clone()).await.unwrap();
        }
        ob.close().await.unwrap();
        {
            // Damage seq 2 behind the outbox's back.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(RECORDS)
                .unwrap()
                .insert(2u64, b"K{not json".as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        let got: Vec<u64> = ob
            .pending(None, 10, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, vec![1, 3]);
        // The quarantine move is asynchronous: an ack round-trip orders after it.
        ob.ack(&[SeqRange {
            first: 99,
            last: 99,
        }])
        .await
        .unwrap();
        let s = ob.stats();
        assert_eq!((s.records, s.undecodable_total), (2, 1));
        assert_eq!(ob.pending(None, 10, 1 << 20).unwrap().len(), 2);
        ob.close().await.unwrap();
    }

    fn reading(i: u64) -> RecordBody {
        RecordBody::Readings {
            readings: vec![WireReading {
                name: "p".into(),
                value: Value::Num(i as f64),
                unit: None,
            }],
        }
    }

    fn seqs_pending(ob: &Outbox) -> Vec<u64> {
        ob.pending(None, 1000, 1 << 20)
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect()
    }

    /// A linger no test outlives: whatever commits did so because something made it.
    const FOREVER: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn lingering_readings_go_with_the_next_state_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig {
            linger: FOREVER,
            ..OutboxConfig::new(dir.path().join("o.redb"))
        })
        .await
        .unwrap();
        let at = Timestamp::now();
        let readings = ob
            .append_lingering(vec![
                ("d".into(), at, reading(1)),
                ("d".into(), at, reading(2)),
            ])
            .unwrap();
        // Not durable, so not there for the uplink.
        assert!(seqs_pending(&ob).is_empty());
        let state = RecordBody::State {
            from: DeviceState::Up,
            to: DeviceState::Down,
        };
        // A state does not wait: it commits at once and takes the readings along.
        assert_eq!(ob.append("d", at, state.clone()).await.unwrap(), 3);
        assert_eq!(readings.await.unwrap(), vec![1, 2]);
        assert_eq!(seqs_pending(&ob), vec![1, 2, 3]);
        // Handed over to linger but not a reading: no waiting either.
        let kept = ob.append_lingering(vec![("d".into(), at, state)]).unwrap();
        assert_eq!(kept.await.unwrap(), vec![4]);
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_lingering_reading_alone_commits_after_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig {
            linger: Duration::from_millis(20),
            ..OutboxConfig::new(dir.path().join("o.redb"))
        })
        .await
        .unwrap();
        let c = ob
            .append_lingering(vec![("d".into(), Timestamp::now(), reading(1))])
            .unwrap();
        assert_eq!(c.await.unwrap(), vec![1]);
        assert_eq!(seqs_pending(&ob), vec![1]);
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn deferred_acks_count_once_hide_at_once_and_ride_along() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let ob = Outbox::open(OutboxConfig {
            ack_linger: FOREVER,
            ..OutboxConfig::new(&path)
        })
        .await
        .unwrap();
        let at = Timestamp::now();
        let items = (0..10).map(|i| ("d".to_string(), at, reading(i))).collect();
        assert_eq!(
            ob.append_many(items).await.unwrap(),
            (1..=10).collect::<Vec<_>>()
        );
        let r = |first, last| SeqRange { first, last };
        assert_eq!(ob.ack_later(&[r(1, 3)]).unwrap(), 3);
        // Overlapping what is already acknowledged, within itself, and past the end.
        assert_eq!(ob.ack_later(&[r(2, 5), r(4, 6), r(9, 99)]).unwrap(), 5);
        assert_eq!(ob.ack_later(&[r(5, 4)]).unwrap(), 0);
        assert_eq!(seqs_pending(&ob), vec![7, 8]);
        // Counted as gone before their commit.
        assert_eq!(ob.stats().records, 2);
        // The next commit takes them along.
        ob.append("d", at, reading(11)).await.unwrap();
        assert_eq!(ob.stats().records, 3);
        assert_eq!(seqs_pending(&ob), vec![7, 8, 11]);
        assert_eq!(ob.ack_later(&[r(1, 8)]).unwrap(), 2);
        assert_eq!(ob.stats().records, 1);
        // Closing commits what waits.
        ob.close().await.unwrap();
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        assert_eq!(seqs_pending(&ob), vec![11]);
        assert_eq!(ob.stats().records, 1);
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_deferred_ack_alone_commits_after_its_linger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let ob = Outbox::open(OutboxConfig {
            ack_linger: Duration::from_millis(20),
            ..OutboxConfig::new(&path)
        })
        .await
        .unwrap();
        ob.append("d", Timestamp::now(), reading(1)).await.unwrap();
        assert_eq!(ob.ack_later(&[SeqRange { first: 1, last: 1 }]).unwrap(), 1);
        // Nothing else comes: the linger running out commits it, which the writer's
        // own counters (not `stats`, which counts it gone at once) show.
        while lock(&ob.inner.stats).records != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(seqs_pending(&ob).is_empty());
        assert!(lock(&ob.inner.unsaved).is_empty());
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn records_handed_over_soon_commit_without_waiting_for_the_linger() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::open(OutboxConfig {
            linger: FOREVER,
            ack_linger: FOREVER,
            ..OutboxConfig::new(dir.path().join("o.redb"))
        })
        .await
        .unwrap();
        let at = Timestamp::now();
        let c = ob
            .append_soon(vec![
                ("d".into(), at, reading(1)),
                ("d".into(), at, reading(2)),
            ])
            .unwrap();
        assert_eq!(c.await.unwrap(), vec![1, 2]);
        assert_eq!(seqs_pending(&ob), vec![1, 2]);
        ob.close().await.unwrap();
    }

    #[tokio::test]
    async fn the_newest_time_observed_rides_along_and_outlives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.redb");
        let t = |s: i64| Timestamp::from_second(1_795_000_000 + s).unwrap();
        let ob = Outbox::open(OutboxConfig {
            linger: FOREVER,
            ..OutboxConfig::new(&path)
        })
        .await
        .unwrap();
        assert_eq!(ob.stats().observed_until, None);
        ob.append_many(vec![
            ("d".into(), t(5), reading(1)),
            ("e".into(), t(3), reading(2)),
        ])
        .await
        .unwrap();
        assert_eq!(ob.stats().observed_until, Some(t(5)));
        // A record stamped in the past does not take it back.
        ob.append("d", t(1), reading(3)).await.unwrap();
        assert_eq!(ob.stats().observed_until, Some(t(5)));
        // A bare observation waits for company (no commit of its own within the linger)
        // and rides along with the next commit, with the states stored beside records.
        let bare = ob.observed(t(9)).unwrap();
        let with = ob
            .append_soon_with_states(
                vec![("d".into(), t(7), reading(4))],
                vec![("k1".into(), b"v1".to_vec()), ("k2".into(), b"v2".to_vec())],
            )
            .unwrap();
        assert_eq!(with.await.unwrap(), vec![4]);
        assert_eq!(bare.await.unwrap(), Vec::<u64>::new());
        assert_eq!(ob.stats().observed_until, Some(t(9)));
        assert_eq!(ob.load_state("k1").unwrap().as_deref(), Some(&b"v1"[..]));
        assert_eq!(ob.load_state("k2").unwrap().as_deref(), Some(&b"v2"[..]));
        ob.close().await.unwrap();
        let ob = Outbox::open(OutboxConfig::new(&path)).await.unwrap();
        assert_eq!(ob.stats().observed_until, Some(t(9)));
        assert_eq!(seqs_pending(&ob), vec![1, 2, 3, 4]);
        ob.close().await.unwrap();
    }
}

//! Modbus RTU (serial line, RS-485) and Modbus TCP, read-only.
//!
//! A [`ModbusBus`] owns one link — a serial port with every unit on its RS-485 bus, or one
//! TCP connection — and serves read requests for any unit id in turn, so one task can
//! schedule every unit of a bus and a dead unit costs its own timeout, nothing more.
//!
//! Only function codes 0x03 and 0x04 are ever sent: the bus builds the request itself from
//! a [`ReadRequest`] and there is no write method, so no write path exists. Every request
//! has a timeout; after a timeout (or a broken link) the connection is dropped and opened
//! again before the next request, because a late reply would otherwise be taken for the
//! answer to the next call. Exception 0x06 (busy, a device booting) backs off and retries
//! a bounded number of times; any other exception is an error that names its code.

use super::modbus_frame::{self, FrameError, Parsed, Reply, MAX_ADU};
use super::{dur, family_first, DeviceRead, Stats, TransportError};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend_profiles::modbus::{exception_name, ReadRequest, RegisterImage, Scan, Table};
use tend_profiles::schema::Parity;
use tend_profiles::{Identity, Profile, ProfileSet, Snapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where a bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Modbus TCP, `host:port`.
    Tcp(String),
    /// Modbus RTU on a serial port.
    Rtu {
        path: String,
        baud: u32,
        parity: Parity,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "{a}"),
            Endpoint::Rtu { path, baud, parity } => {
                let p = match parity {
                    Parity::None => 'N',
                    Parity::Even => 'E',
                    Parity::Odd => 'O',
                };
                write!(f, "{path} ({baud} 8{p}1)")
            }
        }
    }
}

/// How to treat one unit: its timeout, pacing and busy handling, from its profile.
#[derive(Debug, Clone, Copy)]
pub struct UnitPolicy {
    pub timeout: Duration,
    /// Quiet time after a reply before the next request on the bus.
    pub request_gap: Duration,
    /// Exception code meaning "busy, retry later" (0x06).
    pub busy_exception: Option<u8>,
    pub busy_retry: Duration,
    /// Busy answers tolerated per request.
    pub max_busy: u32,
    /// Sends per request when it times out or the link breaks (a reconnect between).
    pub attempts: u32,
}

impl UnitPolicy {
    pub fn from_profile(p: &Profile) -> Self {
        let t = &p.doc.transport;
        Self {
            timeout: dur(t.reply_timeout, Duration::from_secs(1)),
            request_gap: dur(t.request_gap, Duration::ZERO),
            busy_exception: t.busy_exception,
            busy_retry: dur(t.busy_retry, Duration::from_secs(1)),
            max_busy: 3,
            attempts: 2,
        }
    }
}

/// An open link: the stream and the buffer its reply is read into.
struct Conn {
    stream: Stream,
    /// A link waits for one reply at a time, and a reply is at most `MAX_ADU` bytes.
    buf: Box<[u8; MAX_ADU]>,
}

enum Stream {
    Tcp {
        socket: tokio::net::TcpStream,
        /// The MBAP transaction id of the last request.
        transaction: u16,
    },
    Rtu(tokio_serial::SerialStream),
}

/// Why a request got no reply.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

fn closed() -> CallError {
    CallError::Io(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the link was closed by the other end",
    ))
}

impl Conn {
    fn new(stream: Stream) -> Self {
        Self {
            stream,
            buf: Box::new([0; MAX_ADU]),
        }
    }

    /// Sends one read request and reads its reply.
    async fn call(&mut self, unit: u8, req: ReadRequest) -> Result<Reply, CallError> {
        let buf = &mut self.buf[..];
        match &mut self.stream {
            Stream::Tcp {
                socket,
                transaction,
            } => {
                *transaction = transaction.wrapping_add(1);
                let tid = *transaction;
                let request = modbus_frame::tcp_request(tid, unit, req);
                // A TCP stream carries only replies: nothing is ever skipped.
                exchange(socket, buf, &request, |b| {
                    (0, modbus_frame::parse_tcp(b, tid, unit, req))
                })
                .await
            }
            Stream::Rtu(port) => {
                let request = modbus_frame::rtu_request(unit, req);
                exchange(port, buf, &request, |b| {
                    modbus_frame::rtu_resync(b, unit, req)
                })
                .await
            }
        }
    }
}

/// Writes `request`, then reads into `buf` until `parse` finds the whole reply. `parse`
/// says how many bytes at the front to drop before looking again (line noise) with what it
/// found; both parsers need at most `MAX_ADU` bytes after that, so `buf` never fills up
/// before the reply is whole.
async fn exchange<S>(
    stream: &mut S,
    buf: &mut [u8],
    request: &[u8],
    mut parse: impl FnMut(&[u8]) -> (usize, Result<Parsed, FrameError>),
) -> Result<Reply, CallError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await?;
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(closed());
        }
        len += n;
        let (skip, parsed) = parse(&buf[..len]);
        if let Parsed::Reply(r) = parsed? {
            return Ok(r);
        }
        buf.copy_within(skip..len, 0);
        len -= skip;
    }
}

/// One Modbus link and the units on it.
pub struct ModbusBus {
    endpoint: Endpoint,
    ctx: Option<Conn>,
    /// The link was open before: opening it again counts as a reconnect.
    opened_before: bool,
    connect_timeout: Duration,
    last_reply: Option<Instant>,
    stats: BTreeMap<u8, Stats>,
    /// Per unit: its poll plan and the registers answered so far (points read less often
    /// than every poll keep their last answer here).
    scans: BTreeMap<u8, UnitScan>,
}

/// A unit's [`Scan`], for the profile it was planned from.
struct UnitScan {
    /// `device.id` and `device.firmware` of that profile: another profile (the unit was
    /// identified again as another firmware) plans anew.
    profile: (String, String),
    scan: Scan,
}

impl UnitScan {
    fn new(profile: &Profile) -> Self {
        let d = &profile.doc.device;
        Self {
            profile: (d.id.clone(), d.firmware.clone()),
            scan: Scan::new(profile.scan_plan()),
        }
    }

    fn is_for(&self, profile: &Profile) -> bool {
        let d = &profile.doc.device;
        self.profile.0 == d.id && self.profile.1 == d.firmware
    }
}

impl std::fmt::Debug for ModbusBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModbusBus")
            .field("endpoint", &self.endpoint)
            .field("connected", &self.ctx.is_some())
            .field("stats", &self.stats)
            .finish()
    }
}

impl ModbusBus {
    /// A bus that connects on its first request.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            ctx: None,
            opened_before: false,
            connect_timeout: Duration::from_secs(3),
            last_reply: None,
            stats: BTreeMap::new(),
            scans: BTreeMap::new(),
        }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn set_connect_timeout(&mut self, t: Duration) {
        self.connect_timeout = t;
    }

    /// Statistics of one unit.
    pub fn stats(&self, unit: u8) -> Stats {
        self.stats.get(&unit).cloned().unwrap_or_default()
    }

    /// Statistics of every unit seen on this bus.
    pub fn all_stats(&self) -> &BTreeMap<u8, Stats> {
        &self.stats
    }

    /// Closes the link; the next request opens it again.
    pub fn close(&mut self) {
        self.ctx = None;
    }

    async fn connect(&mut self, unit: u8) -> Result<&mut Conn, TransportError> {
        if self.ctx.is_none() {
            let ctx = match &self.endpoint {
                Endpoint::Tcp(target) => {
                    let addr = resolve(target).await?;
                    let fail = |reason: String| TransportError::Connect {
                        target: target.clone(),
                        reason,
                    };
                    match tokio::time::timeout(
                        self.connect_timeout,
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                    {
                        Err(_) => {
                            return Err(fail(format!(
                                "no answer within {:?}",
                                self.connect_timeout
                            )))
                        }
                        Ok(Err(e)) => return Err(fail(e.to_string())),
                        Ok(Ok(stream)) => {
                            // Requests are small and latency-bound.
                            let _ = stream.set_nodelay(true);
                            Conn::new(Stream::Tcp {
                                socket: stream,
                                transaction: 0,
                            })
                        }
                    }
                }
                Endpoint::Rtu { path, baud, parity } => {
                    let parity = match parity {
                        Parity::None => tokio_serial::Parity::None,
                        Parity::Even => tokio_serial::Parity::Even,
                        Parity::Odd => tokio_serial::Parity::Odd,
                    };
                    Conn::new(Stream::Rtu(super::serial::open_line(path, *baud, parity)?))
                }
            };
            if self.opened_before {
                self.stats.entry(unit).or_default().reconnects += 1;
            }
            self.opened_before = true;
            self.ctx = Some(ctx);
        }
        match self.ctx.as_mut() {
            Some(ctx) => Ok(ctx),
            None => Err(TransportError::Protocol("link not open".into())),
        }
    }

    /// Reads one block from one unit, with the unit's timeout, busy handling and a
    /// reconnect after a timeout.
    pub async fn read(
        &mut self,
        unit: u8,
        req: ReadRequest,
        policy: &UnitPolicy,
    ) -> Result<Vec<u16>, TransportError> {
        // Named only when something went wrong: a poll that succeeds formats nothing.
        let what = || describe(req);
        let mut busy = 0u32;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            if let Some(last) = self.last_reply {
                let since = last.elapsed();
                if since < policy.request_gap {
                    tokio::time::sleep(policy.request_gap - since).await;
                }
            }
            let ctx = self.connect(unit).await?;
            let started = Instant::now();
            let outcome = tokio::time::timeout(policy.timeout, ctx.call(unit, req)).await;
            let stats = self.stats.entry(unit).or_default();
            stats.requests += 1;
            match outcome {
                Err(_) => {
                    stats.timeouts += 1;
                    // The reply may still come: only a fresh link is sure not to carry it.
                    self.ctx = None;
                    if attempt < policy.attempts {
                        continue;
                    }
                    return Err(TransportError::Timeout {
                        what: format!("unit {unit} {} on {}", what(), self.endpoint),
                        after: policy.timeout,
                        detail: String::new(),
                    });
                }
                Ok(Err(e)) => {
                    self.ctx = None;
                    if attempt < policy.attempts {
                        tracing::debug!(error = %e, unit, "modbus link error, reconnecting");
                        continue;
                    }
                    return Err(match e {
                        CallError::Io(io) => TransportError::Io {
                            target: self.endpoint.to_string(),
                            reason: io.to_string(),
                        },
                        CallError::Frame(p) => {
                            TransportError::Protocol(format!("unit {unit} {}: {p}", what()))
                        }
                    });
                }
                Ok(Ok(Reply::Exception(code))) => {
                    stats.exception(code);
                    self.last_reply = Some(Instant::now());
                    stats.last_latency = Some(started.elapsed());
                    if policy.busy_exception == Some(code) {
                        busy += 1;
                        if busy > policy.max_busy {
                            return Err(TransportError::Busy {
                                attempts: busy,
                                what: format!(
                                    "unit {unit} {}: exception 0x{code:02X} {}",
                                    what(),
                                    exception_name(code)
                                ),
                            });
                        }
                        attempt -= 1;
                        tokio::time::sleep(policy.busy_retry).await;
                        continue;
                    }
                    return Err(TransportError::Exception {
                        unit,
                        code,
                        name: exception_name(code),
                        what: what(),
                    });
                }
                Ok(Ok(Reply::Registers(words))) => {
                    // The frame parser checked the count: the words go to their addresses.
                    self.last_reply = Some(Instant::now());
                    stats.last_latency = Some(started.elapsed());
                    return Ok(words);
                }
            }
        }
    }

    /// Reads every block into one register image.
    pub async fn read_image(
        &mut self,
        unit: u8,
        reqs: &[ReadRequest],
        policy: &UnitPolicy,
    ) -> Result<RegisterImage, TransportError> {
        let mut image = RegisterImage::new();
        for r in reqs {
            let words = self.read(unit, *r, policy).await?;
            image.insert(r.table, r.start, &words);
        }
        Ok(image)
    }

    /// Reads the identity registers of `unit` and chooses its profile.
    pub async fn identify(
        &mut self,
        unit: u8,
        set: &ProfileSet,
        model: &str,
        timeout: Option<Duration>,
    ) -> Result<(Identity, Arc<Profile>), TransportError> {
        // What was read of this unit before belongs to the device that was there then.
        self.scans.remove(&unit);
        let first = family_first(set.family(model)?, model)?;
        let mut policy = UnitPolicy::from_profile(&first);
        if let Some(t) = timeout {
            policy.timeout = t;
        }
        let image = self
            .read_image(unit, &first.identify_reads(), &policy)
            .await?;
        let identity = first
            .identify_registers(&image)
            .map_err(TransportError::Identify)?;
        let profile = set.select(model, &identity.firmware)?;
        Ok((identity, profile))
    }

    /// Reads the profile's points from `unit`: the reads of the coalesced plan that are
    /// due (every one, but for points with `read_every` read recently, whose last answer
    /// stands). A failed read fails the poll and forgets every earlier answer.
    pub async fn poll(
        &mut self,
        unit: u8,
        profile: &Profile,
        timeout: Option<Duration>,
    ) -> Result<Snapshot, TransportError> {
        let mut policy = UnitPolicy::from_profile(profile);
        if let Some(t) = timeout {
            policy.timeout = t;
        }
        let mut us = match self.scans.remove(&unit) {
            Some(us) if us.is_for(profile) => us,
            _ => UnitScan::new(profile),
        };
        let now = Instant::now();
        for (i, r) in us.scan.due(now) {
            match self.read(unit, r, &policy).await {
                Ok(words) => us.scan.answer(i, &words, now),
                Err(e) => {
                    us.scan.forget();
                    self.scans.insert(unit, us);
                    return Err(e);
                }
            }
        }
        let snapshot = profile.decode_registers(us.scan.image());
        self.scans.insert(unit, us);
        Ok(snapshot)
    }

    /// Identifies `unit` and reads it once.
    pub async fn read_once(
        &mut self,
        unit: u8,
        set: &ProfileSet,
        model: &str,
        timeout: Option<Duration>,
    ) -> Result<DeviceRead, TransportError> {
        let (identity, profile) = self.identify(unit, set, model, timeout).await?;
        let snapshot = self.poll(unit, &profile, timeout).await?;
        Ok(DeviceRead {
            identity,
            profile,
            snapshot,
        })
    }

    /// A register dump the profile lists as a diagnostic (`status-registers`).
    pub async fn diagnostic(
        &mut self,
        unit: u8,
        profile: &Profile,
        name: &str,
    ) -> Result<Vec<u16>, TransportError> {
        let d = super::find_diagnostic(profile, name)?;
        let (Some(table), Some(start), Some(count)) = (d.table, d.start, d.count) else {
            return Err(TransportError::Config(format!(
                "diagnostic `{name}` is not a register dump"
            )));
        };
        let max = profile.doc.transport.request_limit().max(1);
        let policy = UnitPolicy::from_profile(profile);
        let mut out = Vec::with_capacity(count as usize);
        let mut at = start;
        let end = start as u32 + count as u32;
        while (at as u32) < end {
            let n = (end - at as u32).min(max as u32) as u16;
            let words = self
                .read(
                    unit,
                    ReadRequest {
                        table,
                        start: at,
                        count: n,
                    },
                    &policy,
                )
                .await?;
            out.extend(words);
            at = match at.checked_add(n) {
                Some(a) => a,
                None => break,
            };
        }
        Ok(out)
    }
}

fn describe(r: ReadRequest) -> String {
    let (what, fc) = match r.table {
        Table::Holding => ("holding", 0x03),
        Table::Input => ("input", 0x04),
    };
    format!(
        "{what} registers {}..{} (function 0x{fc:02X})",
        r.start,
        r.end().saturating_sub(1)
    )
}

async fn resolve(target: &str) -> Result<SocketAddr, TransportError> {
    let fail = |reason: String| TransportError::Connect {
        target: target.to_string(),
        reason,
    };
    let mut addrs = tokio::net::lookup_host(target)
        .await
        .map_err(|e| fail(e.to_string()))?;
    addrs
        .next()
        .ok_or_else(|| fail("the name resolves to no address".into()))
}

/// The units of one Modbus link, polled by one link task.
impl super::link::DeviceSource for ModbusBus {
    async fn identify(
        &mut self,
        unit: &super::link::Unit,
        set: &ProfileSet,
    ) -> Result<(Identity, Arc<Profile>), TransportError> {
        ModbusBus::identify(self, unit.address, set, &unit.model, unit.reply_timeout).await
    }

    async fn poll(
        &mut self,
        unit: &super::link::Unit,
        profile: &Profile,
    ) -> Result<Snapshot, TransportError> {
        ModbusBus::poll(self, unit.address, profile, unit.reply_timeout).await
    }

    async fn diagnostic(
        &mut self,
        unit: &super::link::Unit,
        profile: &Profile,
        name: &str,
    ) -> Result<serde_json::Value, TransportError> {
        let words = ModbusBus::diagnostic(self, unit.address, profile, name).await?;
        Ok(serde_json::json!({ "registers": words }))
    }

    fn stats(&self, unit: &super::link::Unit) -> Stats {
        ModbusBus::stats(self, unit.address)
    }
}

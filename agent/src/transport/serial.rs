//! Framed ASCII request/response on a serial port (LIP-300 service data interface,
//! `STX · BODY · '*' · CHECKSUM · ETX`).
//!
//! One request at a time: the pump must not get a new request before the previous reply
//! or its timeout. The firmware is unknown at first, so `Q|INFO` goes out in the XOR form
//! every firmware understands (LM-SDI-300 §2); once the profile is chosen its checksum
//! form is used. Noise and half frames are skipped by the profile crate's
//! [`FrameReader`]; after a timeout the reader is reset and anything already waiting on
//! the line is drained before the next request, so a late reply cannot pass for the
//! answer to the next one. Answers are also matched by kind (`Q|STATUS` wants
//! `A|STATUS|...`) for the same reason.

use super::{dur, family_first, DeviceRead, Stats, TransportError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend_profiles::serial_frame::{self, Checksum, FrameEvent, FrameReader, RejectReason, Reply};
use tend_profiles::{Identity, Profile, ProfileSet, Snapshot};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

/// Fields of one answer (`KEY → VALUE`), unknown keys included; only the profile decides
/// what is kept.
pub type Fields = BTreeMap<String, String>;

/// Timing and retry policy of the link, from the profile.
#[derive(Debug, Clone, Copy)]
pub struct SerialTiming {
    pub reply_timeout: Duration,
    pub request_gap: Duration,
    pub busy_retry: Duration,
    /// `N|ERR=BUSY` answers tolerated per request before giving up.
    pub max_busy: u32,
    /// Sends per request when the answer times out or arrives corrupt.
    pub attempts: u32,
}

impl SerialTiming {
    pub fn from_profile(p: &Profile) -> Self {
        let t = &p.doc.transport;
        Self {
            reply_timeout: dur(t.reply_timeout, Duration::from_millis(500)),
            request_gap: dur(t.request_gap, Duration::from_millis(20)),
            busy_retry: dur(t.busy_retry, Duration::from_secs(1)),
            max_busy: 5,
            attempts: 2,
        }
    }
}

/// A framed request/response device on a byte stream (a serial port in production, any
/// stream in tests).
#[derive(Debug)]
pub struct SerialDevice<P = SerialStream> {
    io: P,
    target: String,
    reader: FrameReader,
    form: Checksum,
    timing: SerialTiming,
    busy_reply: String,
    last_reply: Option<Instant>,
    /// A reply timeout the caller set; it survives the switch to the device's profile.
    timeout_override: Option<Duration>,
    stats: Stats,
}

/// Opens `path` at `baud`, 8N1, no flow control, as LM-SDI-300 §1 says.
pub fn open_port(path: &str, baud: u32) -> Result<SerialStream, TransportError> {
    open_line(path, baud, tokio_serial::Parity::None)
}

/// Opens a serial line (8 data bits, 1 stop bit, no flow control).
///
/// The port is opened exclusively first: one task owns each port, and a second agent on
/// the same line would steal its bytes. When the only obstacle is a shared advisory lock
/// (a process that keeps the port open in shared mode, as a pty simulator does), the
/// open is retried in shared mode with a warning rather than refused; a port another
/// process holds exclusively still fails.
pub fn open_line(
    path: &str,
    baud: u32,
    parity: tokio_serial::Parity,
) -> Result<SerialStream, TransportError> {
    let builder = |exclusive: bool| {
        tokio_serial::new(path, baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(parity)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .exclusive(exclusive)
    };
    // An exclusive lock held by our own previous handle of this port can outlive its
    // close for a moment: a process spawned elsewhere (between fork and exec) carries a
    // copy of every descriptor. So a port locked exclusively is tried again briefly before
    // the refusal counts; the wait is bounded (at most 150 ms, and only on this path).
    let mut waits = [25u64, 50, 75].into_iter();
    loop {
        let first = match builder(true).open_native_async() {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if !first.to_string().contains("lock") {
            return Err(TransportError::Open {
                target: path.to_string(),
                reason: first.to_string(),
            });
        }
        if let Ok(p) = builder(false).open_native_async() {
            tracing::warn!(port = path, "port is shared with another process (advisory lock held); opened without exclusive access");
            return Ok(p);
        }
        match waits.next() {
            Some(ms) => std::thread::sleep(std::time::Duration::from_millis(ms)),
            None => {
                return Err(TransportError::Open {
                    target: path.to_string(),
                    reason: first.to_string(),
                })
            }
        }
    }
}

impl SerialDevice<SerialStream> {
    /// Opens the port of a device of `model`, at `baud` or the profile's.
    pub fn open(
        path: &str,
        baud: Option<u32>,
        set: &ProfileSet,
        model: &str,
    ) -> Result<Self, TransportError> {
        let first = family_first(set.family(model)?, model)?;
        let baud = baud.or(first.doc.transport.baud).unwrap_or(9600);
        let port = open_port(path, baud)?;
        Ok(Self::new(port, path, &first))
    }
}

impl<P: AsyncRead + AsyncWrite + Unpin> SerialDevice<P> {
    /// Wraps a stream; `profile` (any of the model's) gives the timing until the device is
    /// identified.
    pub fn new(io: P, target: &str, profile: &Profile) -> Self {
        Self {
            io,
            target: target.to_string(),
            reader: FrameReader::new(),
            form: Checksum::Xor,
            timing: SerialTiming::from_profile(profile),
            busy_reply: profile
                .doc
                .transport
                .busy_reply
                .clone()
                .unwrap_or_else(|| "BUSY".into()),
            last_reply: None,
            timeout_override: None,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn timing(&self) -> SerialTiming {
        self.timing
    }

    /// Overrides the reply timeout (a slow line, a USB adapter with latency).
    pub fn set_reply_timeout(&mut self, t: Duration) {
        self.timing.reply_timeout = t;
        self.timeout_override = Some(t);
    }

    /// Checksum form used for requests.
    pub fn checksum(&self) -> Checksum {
        self.form
    }

    /// Adopts the profile's checksum form and timing once the firmware is known.
    pub fn use_profile(&mut self, p: &Profile) {
        self.timing = SerialTiming::from_profile(p);
        if let Some(t) = self.timeout_override {
            self.timing.reply_timeout = t;
        }
        if let Some(c) = p.doc.transport.checksum {
            self.form = c;
        }
    }

    /// Reads the identity (`Q|INFO` in XOR form), chooses the profile and switches to its
    /// checksum form.
    pub async fn identify(
        &mut self,
        set: &ProfileSet,
        model: &str,
    ) -> Result<(Identity, Arc<Profile>), TransportError> {
        let first = family_first(set.family(model)?, model)?;
        let req = first.doc.identify.request.as_deref().unwrap_or("INFO");
        self.form = Checksum::Xor;
        let info = self.request(&format!("Q|{req}")).await?;
        let identity = first
            .identify_serial(&info)
            .map_err(TransportError::Identify)?;
        let profile = set.select(model, &identity.firmware)?;
        self.use_profile(&profile);
        Ok((identity, profile))
    }

    /// Sends the profile's poll requests and decodes their answers.
    pub async fn poll(&mut self, profile: &Profile) -> Result<Snapshot, TransportError> {
        let mut replies = BTreeMap::new();
        for kind in &profile.doc.transport.poll {
            let fields = self.request(&format!("Q|{kind}")).await?;
            replies.insert(kind.clone(), fields);
        }
        Ok(profile.decode_serial(&replies))
    }

    /// Identifies the device and reads it once.
    pub async fn read_once(
        &mut self,
        set: &ProfileSet,
        model: &str,
    ) -> Result<DeviceRead, TransportError> {
        let (identity, profile) = self.identify(set, model).await?;
        let snapshot = self.poll(&profile).await?;
        Ok(DeviceRead {
            identity,
            profile,
            snapshot,
        })
    }

    /// Runs one of the read-only diagnostic requests the profile lists (`selftest`). The
    /// fields the profile marks as personal data are removed from the answer.
    pub async fn diagnostic(
        &mut self,
        profile: &Profile,
        name: &str,
    ) -> Result<Fields, TransportError> {
        let diag = super::find_diagnostic(profile, name)?;
        let body = diag.request.as_deref().ok_or_else(|| {
            TransportError::Config(format!("diagnostic `{name}` is not a serial request"))
        })?;
        // Only queries exist on this interface; refuse anything else a profile might say.
        if !body.starts_with("Q|") {
            return Err(TransportError::Config(format!(
                "diagnostic `{name}` is not a read-only query"
            )));
        }
        let mut fields = self.request(body).await?;
        for f in &diag.drop_fields {
            fields.remove(f);
        }
        for f in &profile.doc.device.phi {
            fields.remove(f);
        }
        Ok(fields)
    }

    /// One request with its retries: busy answers back off and retry a bounded number of
    /// times, a timeout or corrupt answer is retried `attempts` times in all.
    async fn request(&mut self, body: &str) -> Result<Fields, TransportError> {
        let mut busy = 0u32;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.exchange(body).await {
                Ok(Reply::Answer { fields, .. }) => return Ok(fields),
                Ok(Reply::Negative(code)) => {
                    self.stats.negative(&code);
                    if code == self.busy_reply {
                        busy += 1;
                        if busy > self.timing.max_busy {
                            return Err(TransportError::Busy {
                                attempts: busy,
                                what: body.to_string(),
                            });
                        }
                        attempt -= 1;
                        tokio::time::sleep(self.timing.busy_retry).await;
                        continue;
                    }
                    let meaning = match code.as_str() {
                        "CHECKSUM" => {
                            "the device rejected the request's checksum: wrong checksum form for its firmware, or a corrupted line"
                        }
                        "UNKNOWN_CMD" => "the device does not know this request",
                        _ => "a negative reply the manual does not list",
                    };
                    return Err(TransportError::Negative {
                        request: body.to_string(),
                        code: code.chars().take(24).collect(),
                        meaning,
                    });
                }
                Err(e @ TransportError::Timeout { .. }) if attempt < self.timing.attempts => {
                    tracing::debug!(error = %e, attempt, "serial request retried");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends one frame and waits for the answer of the matching kind.
    async fn exchange(&mut self, body: &str) -> Result<Reply, TransportError> {
        let frame = serial_frame::encode(body, self.form)
            .map_err(|e| TransportError::Config(format!("request {body:?}: {e}")))?;
        let want_kind = body.strip_prefix("Q|").unwrap_or(body).to_string();
        if let Some(last) = self.last_reply {
            let since = last.elapsed();
            if since < self.timing.request_gap {
                tokio::time::sleep(self.timing.request_gap - since).await;
            }
        }
        self.drain().await?;
        self.stats.requests += 1;
        let started = Instant::now();
        self.io
            .write_all(&frame)
            .await
            .map_err(|e| self.io_error(e))?;
        self.io.flush().await.map_err(|e| self.io_error(e))?;

        let deadline = tokio::time::Instant::now() + self.timing.reply_timeout;
        let mut buf = [0u8; 512];
        let mut corrupt: Option<RejectReason> = None;
        loop {
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut buf)).await {
                Ok(Ok(0)) => {
                    return Err(TransportError::Io {
                        target: self.target.clone(),
                        reason: "port closed".into(),
                    })
                }
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return Err(self.io_error(e)),
                Err(_) => {
                    // Whatever half frame is buffered belongs to an answer we gave up on.
                    self.reader.reset();
                    self.stats.timeouts += 1;
                    let detail = match corrupt {
                        Some(r) => format!("; a corrupt frame was received ({r})"),
                        None => String::new(),
                    };
                    return Err(TransportError::Timeout {
                        what: format!("{} request {body}", self.target),
                        after: self.timing.reply_timeout,
                        detail,
                    });
                }
            };
            for ev in self.reader.push(&buf[..n]) {
                match ev {
                    FrameEvent::Noise(k) => self.stats.noise_bytes += k as u64,
                    FrameEvent::Rejected(r) => {
                        self.stats.rejected_frames += 1;
                        // A cut-off frame is line noise before the real answer; a complete
                        // frame with a bad checksum may be our answer, corrupted.
                        if !matches!(r, RejectReason::Truncated(_)) {
                            corrupt = Some(r);
                        }
                    }
                    FrameEvent::Frame(f) => match serial_frame::parse_reply(&f.body) {
                        Ok(Reply::Answer { kind, fields }) if kind == want_kind => {
                            self.finish(started);
                            return Ok(Reply::Answer { kind, fields });
                        }
                        Ok(Reply::Answer { .. }) => {
                            // A late answer to an earlier request: never the one we want.
                            self.stats.rejected_frames += 1;
                        }
                        Ok(neg @ Reply::Negative(_)) => {
                            self.finish(started);
                            return Ok(neg);
                        }
                        Err(_) => {
                            // Not a reply shape the manual knows; the body is not quoted
                            // because it might carry anything.
                            self.stats.rejected_frames += 1;
                        }
                    },
                }
            }
        }
    }

    fn finish(&mut self, started: Instant) {
        self.stats.last_latency = Some(started.elapsed());
        self.last_reply = Some(Instant::now());
        // Bytes after the answer (noise) are dropped with the next drain.
        self.reader.reset();
    }

    /// Discards whatever is already waiting on the line (a late reply, noise).
    async fn drain(&mut self) -> Result<(), TransportError> {
        let mut buf = [0u8; 512];
        // Bounded: a line that never stops talking must not hold the poll forever.
        for _ in 0..64 {
            // A zero timeout polls the read once: only bytes already there are taken.
            match tokio::time::timeout(Duration::ZERO, self.io.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    self.stats.noise_bytes += n as u64;
                }
                Ok(Ok(_)) | Err(_) => break,
                Ok(Err(e)) => return Err(self.io_error(e)),
            }
        }
        self.reader.reset();
        Ok(())
    }

    fn io_error(&self, e: std::io::Error) -> TransportError {
        TransportError::Io {
            target: self.target.clone(),
            reason: e.to_string(),
        }
    }
}

/// A serial device as its link task reads it: the port is opened on the first read and
/// again after an I/O failure, with a growing back-off while it cannot be opened.
#[derive(Debug)]
pub struct SerialSource {
    port: String,
    baud: u32,
    reply_timeout: Option<Duration>,
    dev: Option<SerialDevice>,
    /// Failed reads since the last good one; sets the back-off.
    failures: u32,
    /// Statistics of the port as last opened: they outlive a closed port.
    last_stats: Stats,
}

impl SerialSource {
    pub fn new(port: &str, baud: u32, reply_timeout: Option<Duration>) -> Self {
        Self {
            port: port.to_string(),
            baud,
            reply_timeout,
            dev: None,
            failures: 0,
            last_stats: Stats::default(),
        }
    }

    fn open(&mut self, set: &ProfileSet, model: &str) -> Result<&mut SerialDevice, TransportError> {
        if self.dev.is_none() {
            let mut dv = SerialDevice::open(&self.port, Some(self.baud), set, model)?;
            if let Some(t) = self.reply_timeout {
                dv.set_reply_timeout(t);
            }
            self.dev = Some(dv);
        }
        match self.dev.as_mut() {
            Some(dv) => Ok(dv),
            None => Err(TransportError::Protocol("port not open".into())),
        }
    }
}

impl super::link::DeviceSource for SerialSource {
    /// Identifies at connect and after every failed poll: the device may have come back
    /// with other firmware.
    async fn identify(
        &mut self,
        unit: &super::link::Unit,
        set: &ProfileSet,
    ) -> Result<(Identity, Arc<Profile>), TransportError> {
        let result = match self.open(set, &unit.model) {
            Ok(dv) => {
                let r = dv.identify(set, &unit.model).await;
                self.last_stats = dv.stats().clone();
                r
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.failures += 1;
        }
        result
    }

    async fn poll(
        &mut self,
        _unit: &super::link::Unit,
        profile: &Profile,
    ) -> Result<Snapshot, TransportError> {
        let Some(dv) = self.dev.as_mut() else {
            return Err(TransportError::Protocol("port not open".into()));
        };
        let result = dv.poll(profile).await;
        self.last_stats = dv.stats().clone();
        match &result {
            Ok(_) => self.failures = 0,
            Err(e) => {
                self.failures += 1;
                // A broken port is closed and opened again after the back-off.
                if matches!(e, TransportError::Io { .. } | TransportError::Open { .. }) {
                    self.dev = None;
                }
            }
        }
        result
    }

    async fn diagnostic(
        &mut self,
        _unit: &super::link::Unit,
        profile: &Profile,
        name: &str,
    ) -> Result<serde_json::Value, TransportError> {
        let Some(dv) = self.dev.as_mut() else {
            return Err(TransportError::Protocol("port not open".into()));
        };
        let fields = dv.diagnostic(profile, name).await?;
        Ok(serde_json::Value::Object(
            fields.into_iter().map(|(k, v)| (k, v.into())).collect(),
        ))
    }

    fn stats(&self, _unit: &super::link::Unit) -> Stats {
        self.last_stats.clone()
    }

    fn hold_off(&self) -> Option<Duration> {
        self.dev
            .is_none()
            .then(|| super::reopen_backoff(self.failures))
    }
}

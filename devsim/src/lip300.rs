//! Lumen LIP-300 infusion pump (document LM-SDI-300 rev. F): the RS-232 service data
//! interface, simulated on a pty.
//!
//! Frames are `STX · BODY · '*' · CHECKSUM · ETX`; firmware 2.x checks and writes a 2-digit
//! XOR, firmware 3.x accepts the XOR or a 4-digit CRC-16/CCITT-FALSE and replies in the
//! request's form. Requests `Q|INFO`, `Q|STATUS`, `Q|COUNTERS`, `Q|SELFTEST`; negative
//! replies `N|ERR=CHECKSUM`, `N|ERR=UNKNOWN_CMD`, `N|ERR=BUSY`. Bytes outside a frame are
//! discarded. STATUS carries the patient id (PID, personal health information) so that
//! tests can prove the agent drops it.

use crate::pty;
use crate::shared::{Shared, Stopper};
use crate::Version;
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const STX: u8 = 0x02;
pub const ETX: u8 = 0x03;
/// Longest BODY the manual allows.
pub const MAX_BODY: usize = 240;
/// Baud rate of the service port (printed; a pty ignores it).
pub const BAUD: u32 = 9600;

// ---------------------------------------------------------------- checksums and frames

/// Firmware 2.x checksum: XOR of all BODY bytes.
pub fn xor_checksum(body: &[u8]) -> u8 {
    body.iter().fold(0, |a, b| a ^ b)
}

/// Firmware 3.x checksum: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection,
/// no final XOR).
pub fn crc16_ccitt_false(body: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in body {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Which checksum a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumForm {
    /// 2 hex digits, XOR (firmware 2.x, and 3.x when asked so).
    Xor,
    /// 4 hex digits, CRC-16/CCITT-FALSE (firmware 3.x).
    Crc,
}

/// The checksum text of `body` in `form`, uppercase hex.
pub fn checksum_text(body: &[u8], form: ChecksumForm) -> String {
    match form {
        ChecksumForm::Xor => format!("{:02X}", xor_checksum(body)),
        ChecksumForm::Crc => format!("{:04X}", crc16_ccitt_false(body)),
    }
}

/// A complete frame: `STX BODY * CHECKSUM ETX`.
pub fn encode_frame(body: &str, form: ChecksumForm) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.push(STX);
    out.extend_from_slice(body.as_bytes());
    out.push(b'*');
    out.extend_from_slice(checksum_text(body.as_bytes(), form).as_bytes());
    out.push(ETX);
    out
}

/// Splits a byte stream into frame contents (the bytes between STX and ETX). Bytes
/// outside a frame are dropped; an STX inside a frame starts a new frame; a frame that
/// grows past the longest legal one, or holds a byte that is not printable ASCII, is
/// dropped as noise.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    in_frame: bool,
    /// Bytes dropped so far (noise, broken frames).
    pub discarded: u64,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the contents of every frame completed by them.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        for &b in bytes {
            match (self.in_frame, b) {
                (_, STX) => {
                    if self.in_frame {
                        self.discarded += 1 + self.buf.len() as u64;
                    }
                    self.in_frame = true;
                    self.buf.clear();
                }
                (false, _) => self.discarded += 1,
                (true, ETX) => {
                    self.in_frame = false;
                    frames.push(std::mem::take(&mut self.buf));
                }
                (true, 0x20..=0x7E) if self.buf.len() < MAX_BODY + 5 => self.buf.push(b),
                (true, _) => {
                    self.discarded += 2 + self.buf.len() as u64;
                    self.in_frame = false;
                    self.buf.clear();
                }
            }
        }
        frames
    }
}

/// A frame's content split into body and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// The checksum is well-formed and matches.
    Valid(&'a str, ChecksumForm),
    /// The checksum is well-formed but does not match the body.
    Mismatch(ChecksumForm),
    /// No `*`, or a checksum that is neither 2 nor 4 uppercase hex digits.
    Malformed,
}

/// Parses the bytes between STX and ETX. `crc_allowed` is false on firmware 2.x, which
/// cannot check a CRC and so treats a CRC-form request as a checksum mismatch.
pub fn parse_content(content: &[u8], crc_allowed: bool) -> Parsed<'_> {
    let Ok(text) = std::str::from_utf8(content) else {
        return Parsed::Malformed;
    };
    let Some(star) = text.rfind('*') else {
        return Parsed::Malformed;
    };
    let (body, sum) = (&text[..star], &text[star + 1..]);
    let hex_upper = |s: &str| {
        s.bytes()
            .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(&c))
    };
    if body.len() > MAX_BODY || !hex_upper(sum) {
        return Parsed::Malformed;
    }
    let form = match sum.len() {
        2 => ChecksumForm::Xor,
        4 => ChecksumForm::Crc,
        _ => return Parsed::Malformed,
    };
    if form == ChecksumForm::Crc && !crc_allowed {
        return Parsed::Mismatch(form);
    }
    if checksum_text(body.as_bytes(), form) == sum {
        Parsed::Valid(body, form)
    } else {
        Parsed::Mismatch(form)
    }
}

// ---------------------------------------------------------------- device state

/// Operating mode (STATUS `MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Idle,
    Infusing,
    Paused,
    Standby,
    Alarm,
    Service,
    Failsafe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Idle => "IDLE",
            Mode::Infusing => "INFUSING",
            Mode::Paused => "PAUSED",
            Mode::Standby => "STANDBY",
            Mode::Alarm => "ALARM",
            Mode::Service => "SERVICE",
            Mode::Failsafe => "FAILSAFE",
        }
    }
}

impl FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "IDLE" => Mode::Idle,
            "INFUSING" => Mode::Infusing,
            "PAUSED" => Mode::Paused,
            "STANDBY" => Mode::Standby,
            "ALARM" => Mode::Alarm,
            "SERVICE" => Mode::Service,
            "FAILSAFE" => Mode::Failsafe,
            _ => {
                return Err(format!(
                "unknown LIP-300 mode {s:?} (IDLE, INFUSING, PAUSED, STANDBY, ALARM, SERVICE, FAILSAFE)"
            ))
            }
        })
    }
}

/// Result of the last power-on self-test (SELFTEST); `true` is `OK`.
#[derive(Debug, Clone, PartialEq)]
pub struct Selftest {
    pub ram: bool,
    pub flash: bool,
    pub motor: bool,
    pub psens: bool,
    pub airsens: bool,
    pub batt: bool,
    /// `LAST`, e.g. `2026-11-27T06:02:11Z`.
    pub last: String,
}

/// Noise sent before replies, on request ("noise between frames").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Noise {
    #[default]
    Off,
    /// A few garbage bytes (never STX) before every reply.
    Garbage,
    /// An STX and the start of a frame that never ends, before every reply.
    HalfFrame,
    /// Garbage and half frames in turn.
    Mixed,
}

impl FromStr for Noise {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "none" => Ok(Noise::Off),
            "garbage" => Ok(Noise::Garbage),
            "half-frame" | "half_frame" => Ok(Noise::HalfFrame),
            "mixed" | "on" => Ok(Noise::Mixed),
            _ => Err(format!(
                "unknown noise {s:?} (off, garbage, half-frame, mixed)"
            )),
        }
    }
}

/// The noise bytes to send before reply number `n`.
pub fn noise_bytes(noise: Noise, n: u64) -> Vec<u8> {
    const GARBAGE: &[u8] = &[
        0x00, 0xFF, ETX, b'*', b'A', 0x7F, b'|', 0x15, b'3', 0x80, b'\r',
    ];
    let garbage = || {
        let len = 3 + (n % 7) as usize;
        (0..len)
            .map(|i| GARBAGE[(i + n as usize) % GARBAGE.len()])
            .collect::<Vec<u8>>()
    };
    let half = || {
        let full = b"A|STATUS|MODE=INFUSING|RATE=1";
        let len = 4 + (n % 20) as usize;
        let mut v = vec![STX];
        v.extend_from_slice(&full[..len.min(full.len())]);
        v
    };
    match noise {
        Noise::Off => Vec::new(),
        Noise::Garbage => garbage(),
        Noise::HalfFrame => half(),
        Noise::Mixed if n % 2 == 0 => garbage(),
        Noise::Mixed => half(),
    }
}

/// What the pump reports; mutate it through [`Lip300Handle`] while the simulator runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Lip300State {
    pub mode: Mode,
    /// mL/h.
    pub rate: f64,
    /// mL.
    pub vtbi: u32,
    /// percent.
    pub batt: u8,
    pub ac: bool,
    /// Technical alarm bits (2.x shows the low 16 bits).
    pub talm: u32,
    /// Clinical alarm bits: not device faults.
    pub calm: u16,
    pub err: u16,
    /// °C, reported by 3.x only.
    pub temp: f64,
    /// Patient id: personal health information.
    pub pid: String,
    pub runh: u32,
    pub pumpcyc: u32,
    pub doorcyc: u32,
    /// `YYYY-MM-DD`.
    pub lastpm: String,
    pub selftest: Selftest,
    /// Answer nothing at all (switched off, cable pulled).
    pub silent: bool,
    /// Answer `N|ERR=BUSY` until then.
    pub busy_until: Option<Instant>,
    pub noise: Noise,
}

impl Lip300State {
    /// The manual's example status for this firmware family (§5).
    pub fn example(firmware: Version) -> Self {
        let v3 = firmware.major >= 3;
        Self {
            mode: Mode::Infusing,
            rate: if v3 { 62.5 } else { 125.0 },
            vtbi: if v3 { 250 } else { 480 },
            batt: if v3 { 91 } else { 87 },
            ac: !v3,
            talm: 0,
            calm: 0,
            err: 0,
            temp: 36.5,
            pid: if v3 { "P-0051877" } else { "P-0048213" }.to_string(),
            runh: 10422,
            pumpcyc: 8_830_211,
            doorcyc: 3120,
            lastpm: "2026-06-02".to_string(),
            selftest: Selftest {
                ram: true,
                flash: true,
                motor: true,
                psens: true,
                airsens: true,
                batt: true,
                last: "2026-11-27T06:02:11Z".to_string(),
            },
            silent: false,
            busy_until: None,
            noise: Noise::Off,
        }
    }

    pub fn is_busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }
}

/// Identity of one simulated pump.
#[derive(Debug, Clone)]
pub struct Lip300Config {
    pub firmware: Version,
    /// 14 characters, e.g. `LP3B-2403-0457`.
    pub serial: String,
    /// Hardware revision letter.
    pub hw: char,
    /// Answer BUSY for this long after start (the manual: the pump is booting).
    pub boot_time: Duration,
    /// Initial state; `None` is the manual's example for the firmware.
    pub state: Option<Lip300State>,
}

impl Lip300Config {
    pub fn new(firmware: Version, serial: impl Into<String>) -> Self {
        Self {
            firmware,
            serial: serial.into(),
            hw: if firmware.major >= 3 { 'D' } else { 'C' },
            boot_time: Duration::ZERO,
            state: None,
        }
    }

    /// The manual's 3.x pump (`LP3B-2403-0457`, 3.1.0, HW D).
    pub fn v3() -> Self {
        Self::new(Version::new(3, 1, 0), "LP3B-2403-0457")
    }

    /// The manual's 2.x pump (`LP3A-2207-0193`, 2.4.1, HW C).
    pub fn v2() -> Self {
        Self::new(Version::new(2, 4, 1), "LP3A-2207-0193")
    }

    fn is_v3(&self) -> bool {
        self.firmware.major >= 3
    }
}

// ---------------------------------------------------------------- reply bodies

/// `A|INFO|…` (§4).
pub fn info_body(cfg: &Lip300Config) -> String {
    format!(
        "A|INFO|MODEL=LIP-300|SN={}|FW={}|HW={}",
        cfg.serial, cfg.firmware, cfg.hw
    )
}

/// `A|STATUS|…` (§5): 2.x with a 4-digit TALM, 3.x with an 8-digit TALM and TEMP.
pub fn status_body(cfg: &Lip300Config, s: &Lip300State) -> String {
    let mut b = format!(
        "A|STATUS|MODE={}|RATE={:.1}|VTBI={}|BATT={}|AC={}|",
        s.mode.as_str(),
        s.rate,
        s.vtbi,
        s.batt,
        u8::from(s.ac)
    );
    if cfg.is_v3() {
        let _ = write!(
            b,
            "TALM={:08X}|CALM={:04X}|ERR={}|TEMP={:.1}|",
            s.talm, s.calm, s.err, s.temp
        );
    } else {
        let _ = write!(
            b,
            "TALM={:04X}|CALM={:04X}|ERR={}|",
            s.talm & 0xFFFF,
            s.calm,
            s.err
        );
    }
    let _ = write!(b, "PID={}", s.pid);
    b
}

/// `A|COUNTERS|…` (§6).
pub fn counters_body(s: &Lip300State) -> String {
    format!(
        "A|COUNTERS|RUNH={}|PUMPCYC={}|DOORCYC={}|LASTPM={}",
        s.runh, s.pumpcyc, s.doorcyc, s.lastpm
    )
}

/// `A|SELFTEST|…` (§7).
pub fn selftest_body(s: &Lip300State) -> String {
    let t = &s.selftest;
    let ok = |b: bool| if b { "OK" } else { "FAIL" };
    let all = t.ram && t.flash && t.motor && t.psens && t.airsens && t.batt;
    format!(
        "A|SELFTEST|RESULT={}|RAM={}|FLASH={}|MOTOR={}|PSENS={}|AIRSENS={}|BATT={}|LAST={}",
        if all { "PASS" } else { "FAIL" },
        ok(t.ram),
        ok(t.flash),
        ok(t.motor),
        ok(t.psens),
        ok(t.airsens),
        ok(t.batt),
        t.last
    )
}

/// The reply frame to one request frame's content, or `None` when the pump stays silent.
/// Pure: `busy` is whether the pump is still booting.
pub fn respond(cfg: &Lip300Config, s: &Lip300State, busy: bool, content: &[u8]) -> Option<Vec<u8>> {
    if s.silent {
        return None;
    }
    let v3 = cfg.is_v3();
    let (body, form) = match parse_content(content, v3) {
        Parsed::Valid(body, form) => (body, form),
        Parsed::Mismatch(form) => {
            let form = if v3 { form } else { ChecksumForm::Xor };
            return Some(encode_frame("N|ERR=CHECKSUM", form));
        }
        Parsed::Malformed => return Some(encode_frame("N|ERR=CHECKSUM", ChecksumForm::Xor)),
    };
    let reply = if busy {
        "N|ERR=BUSY".to_string()
    } else {
        match body {
            "Q|INFO" => info_body(cfg),
            "Q|STATUS" => status_body(cfg, s),
            "Q|COUNTERS" => counters_body(s),
            "Q|SELFTEST" => selftest_body(s),
            _ => "N|ERR=UNKNOWN_CMD".to_string(),
        }
    };
    Some(encode_frame(&reply, form))
}

// ---------------------------------------------------------------- the simulator on a pty

/// Starts LIP-300 simulators.
pub struct Lip300Sim;

impl Lip300Sim {
    /// Serves a pump on a fresh pty; the handle's [`Lip300Handle::path`] is the port to open.
    pub async fn spawn_pty(cfg: Lip300Config) -> io::Result<Lip300Handle> {
        let mut pty = pty::open()?;
        let mut initial = cfg
            .state
            .clone()
            .unwrap_or_else(|| Lip300State::example(cfg.firmware));
        if !cfg.boot_time.is_zero() {
            initial.busy_until = Some(Instant::now() + cfg.boot_time);
        }
        let state = Shared::new(initial);
        let stopper = Stopper::new();
        let token = stopper.token();
        let path = pty.path.clone();
        let st = state.clone();
        let c = cfg.clone();
        tokio::spawn(async move {
            let mut reader = FrameReader::new();
            let mut buf = [0u8; 512];
            let mut replies: u64 = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                let n = tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => { pty.release_exclusive(); continue; }
                    r = pty.master.read(&mut buf) => match r {
                        Ok(0) => { tokio::time::sleep(Duration::from_millis(50)).await; continue; }
                        Ok(n) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "lip300 pty read");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                for content in reader.push(&buf[..n]) {
                    let now = Instant::now();
                    let (reply, noise) =
                        st.with(|s| (respond(&c, s, s.is_busy(now), &content), s.noise));
                    if let Some(reply) = reply {
                        let mut out = noise_bytes(noise, replies);
                        out.extend_from_slice(&reply);
                        replies += 1;
                        if let Err(e) = pty.master.write_all(&out).await {
                            tracing::debug!(error = %e, "lip300 pty write");
                        }
                    }
                }
            }
        });
        Ok(Lip300Handle {
            cfg,
            state,
            path,
            stopper,
        })
    }
}

/// A running LIP-300 simulator. Dropping it stops the simulator.
#[derive(Debug)]
pub struct Lip300Handle {
    cfg: Lip300Config,
    state: Shared<Lip300State>,
    path: PathBuf,
    stopper: Stopper,
}

impl Lip300Handle {
    /// The pty path a client opens (9600 8N1).
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn config(&self) -> &Lip300Config {
        &self.cfg
    }
    /// The shared state, for any change the helpers below do not cover.
    pub fn shared(&self) -> &Shared<Lip300State> {
        &self.state
    }
    pub fn state(&self) -> Lip300State {
        self.state.get()
    }
    pub fn update<R>(&self, f: impl FnOnce(&mut Lip300State) -> R) -> R {
        self.state.update(f)
    }
    pub fn set_talm(&self, talm: u32) {
        self.update(|s| s.talm = talm);
    }
    pub fn set_err(&self, err: u16) {
        self.update(|s| s.err = err);
    }
    pub fn set_mode(&self, mode: Mode) {
        self.update(|s| s.mode = mode);
    }
    pub fn set_pid(&self, pid: &str) {
        self.update(|s| s.pid = pid.to_string());
    }
    pub fn set_silent(&self, silent: bool) {
        self.update(|s| s.silent = silent);
    }
    pub fn set_noise(&self, noise: Noise) {
        self.update(|s| s.noise = noise);
    }
    /// Answer BUSY for `d` from now (a reboot).
    pub fn boot(&self, d: Duration) {
        self.update(|s| s.busy_until = Some(Instant::now() + d));
    }
    /// Stops the simulator; the pty goes away when the handle is dropped.
    pub fn shutdown(&self) {
        self.stopper.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_str(f: &[u8]) -> String {
        String::from_utf8_lossy(f)
            .replace('\u{2}', "\\x02")
            .replace('\u{3}', "\\x03")
    }

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16_ccitt_false(b"123456789"), 0x29B1);
    }

    #[test]
    fn checksum_table_of_section_2() {
        let table = [
            ("Q|STATUS", "39", "4839"),
            ("Q|INFO", "23", "288F"),
            ("Q|COUNTERS", "2A", "B912"),
            ("Q|SELFTEST", "27", "6475"),
            ("N|ERR=CHECKSUM", "47", "44DE"),
        ];
        for (body, xor, crc) in table {
            assert_eq!(
                checksum_text(body.as_bytes(), ChecksumForm::Xor),
                xor,
                "{body}"
            );
            assert_eq!(
                checksum_text(body.as_bytes(), ChecksumForm::Crc),
                crc,
                "{body}"
            );
        }
        assert_eq!(
            encode_frame("Q|STATUS", ChecksumForm::Xor),
            b"\x02Q|STATUS*39\x03"
        );
        assert_eq!(encode_frame("Q|STATUS", ChecksumForm::Xor).len(), 13);
    }

    #[test]
    fn section_8_frame_fw2_motor_failure() {
        let cfg = Lip300Config::v2();
        let mut s = Lip300State::example(cfg.firmware);
        s.mode = Mode::Alarm;
        s.rate = 0.0;
        s.batt = 86;
        s.talm = 0x0001;
        s.err = 310;
        let reply = respond(&cfg, &s, false, b"Q|STATUS*39").unwrap();
        assert_eq!(
            frame_str(&reply),
            "\\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=480|BATT=86|AC=1|TALM=0001|CALM=0000|ERR=310|PID=P-0048213*62\\x03"
        );
    }

    #[test]
    fn section_8_frames_fw3_info_and_fault() {
        let cfg = Lip300Config::v3();
        let mut s = Lip300State::example(cfg.firmware);
        let info = respond(&cfg, &s, false, b"Q|INFO*288F").unwrap();
        assert_eq!(
            frame_str(&info),
            "\\x02A|INFO|MODEL=LIP-300|SN=LP3B-2403-0457|FW=3.1.0|HW=D*F5A0\\x03"
        );
        s.mode = Mode::Alarm;
        s.rate = 0.0;
        s.batt = 90;
        s.ac = true;
        s.talm = (1 << 1) | (1 << 16);
        s.err = 240;
        s.temp = 38.0;
        let st = respond(&cfg, &s, false, b"Q|STATUS*4839").unwrap();
        assert_eq!(
            frame_str(&st),
            "\\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=250|BATT=90|AC=1|TALM=00010002|CALM=0000|ERR=240|TEMP=38.0|PID=P-0051877*C8DF\\x03"
        );
    }

    #[test]
    fn example_statuses_of_section_5() {
        let v2 = Lip300Config::v2();
        assert_eq!(
            status_body(&v2, &Lip300State::example(v2.firmware)),
            "A|STATUS|MODE=INFUSING|RATE=125.0|VTBI=480|BATT=87|AC=1|TALM=0000|CALM=0000|ERR=0|PID=P-0048213"
        );
        let v3 = Lip300Config::v3();
        assert_eq!(
            status_body(&v3, &Lip300State::example(v3.firmware)),
            "A|STATUS|MODE=INFUSING|RATE=62.5|VTBI=250|BATT=91|AC=0|TALM=00000000|CALM=0000|ERR=0|TEMP=36.5|PID=P-0051877"
        );
        let s = Lip300State::example(v3.firmware);
        assert_eq!(
            counters_body(&s),
            "A|COUNTERS|RUNH=10422|PUMPCYC=8830211|DOORCYC=3120|LASTPM=2026-06-02"
        );
        assert_eq!(
            selftest_body(&s),
            "A|SELFTEST|RESULT=PASS|RAM=OK|FLASH=OK|MOTOR=OK|PSENS=OK|AIRSENS=OK|BATT=OK|LAST=2026-11-27T06:02:11Z"
        );
    }

    #[test]
    fn checksum_forms_per_firmware() {
        let v2 = Lip300Config::v2();
        let s2 = Lip300State::example(v2.firmware);
        // 2.x cannot check a CRC: N|ERR=CHECKSUM in XOR form.
        assert_eq!(
            respond(&v2, &s2, false, b"Q|INFO*288F").unwrap(),
            b"\x02N|ERR=CHECKSUM*47\x03"
        );
        assert_eq!(
            respond(&v2, &s2, false, b"Q|INFO*24").unwrap(),
            b"\x02N|ERR=CHECKSUM*47\x03"
        );
        assert!(respond(&v2, &s2, false, b"Q|INFO*23")
            .unwrap()
            .ends_with(b"\x03"));
        let v3 = Lip300Config::v3();
        let s3 = Lip300State::example(v3.firmware);
        // 3.x replies in the request's form.
        let xor = respond(&v3, &s3, false, b"Q|INFO*23").unwrap();
        let text = String::from_utf8(xor).unwrap();
        let sum = &text[text.rfind('*').unwrap() + 1..text.len() - 1];
        assert_eq!(sum.len(), 2);
        assert_eq!(
            respond(&v3, &s3, false, b"Q|INFO*2880").unwrap(),
            b"\x02N|ERR=CHECKSUM*44DE\x03"
        );
        assert_eq!(
            respond(&v3, &s3, false, b"Q|INFO*2X").unwrap(),
            b"\x02N|ERR=CHECKSUM*47\x03"
        );
        assert_eq!(
            respond(&v3, &s3, false, b"Q|INFO").unwrap(),
            b"\x02N|ERR=CHECKSUM*47\x03"
        );
        // lowercase hex is not the manual's form
        assert_eq!(
            respond(&v3, &s3, false, b"Q|INFO*288f").unwrap(),
            b"\x02N|ERR=CHECKSUM*47\x03"
        );
    }

    #[test]
    fn unknown_busy_silent() {
        let cfg = Lip300Config::v3();
        let mut s = Lip300State::example(cfg.firmware);
        let q = encode_frame("Q|RESET", ChecksumForm::Crc);
        let r = respond(&cfg, &s, false, &q[1..q.len() - 1]).unwrap();
        assert_eq!(r, encode_frame("N|ERR=UNKNOWN_CMD", ChecksumForm::Crc));
        let r = respond(&cfg, &s, true, b"Q|STATUS*39").unwrap();
        assert_eq!(r, encode_frame("N|ERR=BUSY", ChecksumForm::Xor));
        s.silent = true;
        assert!(respond(&cfg, &s, false, b"Q|STATUS*39").is_none());
    }

    #[test]
    fn frame_reader_discards_noise() {
        let mut r = FrameReader::new();
        let mut input = vec![0xFF, b'x', ETX];
        input.extend_from_slice(b"\x02A|STAT"); // half frame
        input.extend_from_slice(b"\x02Q|INFO*23\x03junk\x02Q|ST");
        let frames = r.push(&input);
        assert_eq!(frames, vec![b"Q|INFO*23".to_vec()]);
        let frames = r.push(b"ATUS*39\x03");
        assert_eq!(frames, vec![b"Q|STATUS*39".to_vec()]);
        // a non-printable byte breaks the frame
        assert!(r.push(b"\x02Q|IN\x00FO*23\x03").is_empty());
        // an over-long frame is dropped
        let mut long = vec![STX];
        long.extend(std::iter::repeat_n(b'A', 400));
        long.push(ETX);
        assert!(r.push(&long).is_empty());
        assert_eq!(r.push(b"\x02Q|INFO*23\x03").len(), 1);
    }

    #[test]
    fn noise_never_contains_a_complete_frame() {
        for noise in [Noise::Garbage, Noise::HalfFrame, Noise::Mixed] {
            for n in 0..50 {
                let mut r = FrameReader::new();
                let bytes = noise_bytes(noise, n);
                assert!(!bytes.is_empty());
                let mut all = bytes.clone();
                all.extend_from_slice(b"\x02Q|INFO*23\x03");
                assert_eq!(r.push(&all), vec![b"Q|INFO*23".to_vec()], "{noise:?} {n}");
            }
        }
        assert!(noise_bytes(Noise::Off, 3).is_empty());
    }

    #[test]
    fn fuzz_like_garbage_never_panics() {
        let cfg = Lip300Config::v2();
        let s = Lip300State::example(cfg.firmware);
        let mut r = FrameReader::new();
        let mut x: u32 = 12345;
        for _ in 0..20000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let b = (x >> 16) as u8;
            let b = if b % 5 == 0 {
                STX
            } else if b % 7 == 0 {
                ETX
            } else if b % 3 == 0 {
                b'*'
            } else {
                b
            };
            for f in r.push(&[b]) {
                let _ = respond(&cfg, &s, false, &f);
            }
        }
    }
}

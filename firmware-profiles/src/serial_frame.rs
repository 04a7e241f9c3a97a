//! The LIP-300 service data interface framing, `STX · BODY · '*' · CHECKSUM · ETX`, as a
//! sans-IO encoder and a streaming reader that resynchronises after line noise and half
//! frames. Bytes go in, frames come out; no port, no clock.

use std::collections::BTreeMap;

pub const STX: u8 = 0x02;
pub const ETX: u8 = 0x03;
/// BODY is at most 240 bytes (LM-SDI-300 §2).
pub const MAX_BODY: usize = 240;
/// '*' and at most four checksum digits follow the body.
const MAX_FRAME_INNER: usize = MAX_BODY + 5;

/// The two checksum forms of the manual.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Checksum {
    /// Firmware 2.x (and 3.x): XOR of the body bytes, 2 hex digits.
    Xor,
    /// Firmware 3.x: CRC-16/CCITT-FALSE of the body bytes, 4 hex digits.
    Crc16,
}

/// XOR of all bytes.
pub fn xor8(body: &[u8]) -> u8 {
    body.iter().fold(0, |acc, b| acc ^ b)
}

/// CRC-16/CCITT-FALSE: polynomial 0x1021, initial 0xFFFF, no reflection, no final XOR.
pub fn crc16_ccitt_false(body: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in body {
        crc ^= (b as u16) << 8;
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

/// The checksum digits for `body` in the given form, uppercase hex.
pub fn checksum_digits(body: &[u8], form: Checksum) -> String {
    match form {
        Checksum::Xor => format!("{:02X}", xor8(body)),
        Checksum::Crc16 => format!("{:04X}", crc16_ccitt_false(body)),
    }
}

/// Why a frame could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame body is {0} bytes, the interface allows at most {MAX_BODY}")]
    TooLong(usize),
    #[error("frame body byte 0x{0:02X} is not printable ASCII")]
    NotPrintable(u8),
}

/// Builds a complete frame around `body`.
pub fn encode(body: &str, form: Checksum) -> Result<Vec<u8>, EncodeError> {
    let bytes = body.as_bytes();
    if bytes.len() > MAX_BODY {
        return Err(EncodeError::TooLong(bytes.len()));
    }
    if let Some(&b) = bytes.iter().find(|b| !(0x20..=0x7E).contains(*b)) {
        return Err(EncodeError::NotPrintable(b));
    }
    let mut out = Vec::with_capacity(bytes.len() + 8);
    out.push(STX);
    out.extend_from_slice(bytes);
    out.push(b'*');
    out.extend_from_slice(checksum_digits(bytes, form).as_bytes());
    out.push(ETX);
    Ok(out)
}

/// A frame whose checksum was right.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub body: String,
    pub checksum: Checksum,
}

/// What the reader found in the byte stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameEvent {
    Frame(Frame),
    /// A complete frame that must not be trusted; the reader has moved past it.
    Rejected(RejectReason),
    /// Bytes outside any frame (noise, the tail of a frame cut when a cable was plugged in).
    Noise(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("checksum mismatch: frame says {got}, body gives {want}")]
    ChecksumMismatch { got: String, want: String },
    #[error("checksum field {0:?} is neither 2 nor 4 hex digits")]
    MalformedChecksum(String),
    #[error("frame has no '*' before its checksum")]
    NoChecksum,
    #[error("frame longer than {MAX_BODY} bytes of body")]
    Oversize,
    #[error("non-printable byte 0x{0:02X} in frame body")]
    NotPrintable(u8),
    #[error("frame interrupted by a new STX after {0} bytes")]
    Truncated(usize),
}

/// Streaming frame reader. Feed it whatever the port gives; take events out.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    in_frame: bool,
    noise: usize,
    /// Skipping the rest of an oversize frame until its ETX or the next STX.
    skipping: bool,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops any partial frame, e.g. after a timeout so a late reply cannot pass for the
    /// answer to the next request.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.in_frame = false;
        self.noise = 0;
        self.skipping = false;
    }

    /// True while a frame has started but not ended.
    pub fn mid_frame(&self) -> bool {
        self.in_frame
    }

    /// Feeds bytes and returns every event they complete, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<FrameEvent> {
        let mut events = Vec::new();
        for &b in bytes {
            if let Some(ev) = self.push_byte(b) {
                events.extend(ev);
            }
        }
        if !self.in_frame && self.noise > 0 {
            events.push(FrameEvent::Noise(std::mem::take(&mut self.noise)));
        }
        events
    }

    fn push_byte(&mut self, b: u8) -> Option<Vec<FrameEvent>> {
        if b == STX {
            let mut out = Vec::new();
            if self.noise > 0 {
                out.push(FrameEvent::Noise(std::mem::take(&mut self.noise)));
            }
            if self.in_frame && !self.skipping {
                out.push(FrameEvent::Rejected(RejectReason::Truncated(
                    self.buf.len(),
                )));
            }
            self.buf.clear();
            self.in_frame = true;
            self.skipping = false;
            return (!out.is_empty()).then_some(out);
        }
        if !self.in_frame {
            self.noise += 1;
            return None;
        }
        if b == ETX {
            self.in_frame = false;
            if self.skipping {
                self.skipping = false;
                return None;
            }
            let inner = std::mem::take(&mut self.buf);
            return Some(vec![check_frame(&inner)]);
        }
        if self.skipping {
            return None;
        }
        if self.buf.len() >= MAX_FRAME_INNER {
            self.skipping = true;
            self.buf.clear();
            return Some(vec![FrameEvent::Rejected(RejectReason::Oversize)]);
        }
        self.buf.push(b);
        None
    }
}

fn check_frame(inner: &[u8]) -> FrameEvent {
    let Some(star) = inner.iter().rposition(|&b| b == b'*') else {
        return FrameEvent::Rejected(RejectReason::NoChecksum);
    };
    let (body, digits) = (&inner[..star], &inner[star + 1..]);
    if body.len() > MAX_BODY {
        return FrameEvent::Rejected(RejectReason::Oversize);
    }
    if let Some(&b) = body.iter().find(|b| !(0x20..=0x7E).contains(*b)) {
        return FrameEvent::Rejected(RejectReason::NotPrintable(b));
    }
    let digits_text = String::from_utf8_lossy(digits).into_owned();
    let form = match digits.len() {
        2 => Checksum::Xor,
        4 => Checksum::Crc16,
        _ => return FrameEvent::Rejected(RejectReason::MalformedChecksum(digits_text)),
    };
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return FrameEvent::Rejected(RejectReason::MalformedChecksum(digits_text));
    }
    let want = checksum_digits(body, form);
    if !want.eq_ignore_ascii_case(&digits_text) {
        return FrameEvent::Rejected(RejectReason::ChecksumMismatch {
            got: digits_text,
            want,
        });
    }
    // Printable ASCII checked above, so this is valid UTF-8.
    let body = String::from_utf8_lossy(body).into_owned();
    FrameEvent::Frame(Frame {
        body,
        checksum: form,
    })
}

/// A reply body taken apart: `A|STATUS|K=V|...` or `N|ERR=...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `A|<KIND>|K=V...`: the fields, unknown keys included (the caller keeps only what
    /// the profile lists).
    Answer {
        kind: String,
        fields: BTreeMap<String, String>,
    },
    /// `N|ERR=<CODE>`.
    Negative(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply body {0:?} starts with neither 'A|' nor 'N|'")]
    UnknownStart(String),
    #[error("negative reply without ERR=: {0:?}")]
    BadNegative(String),
    #[error("answer has no kind field")]
    NoKind,
}

/// Parses a reply body. Fields without `=` are ignored, as are repeated keys after the
/// first: a later firmware may add keys and the order is not guaranteed.
pub fn parse_reply(body: &str) -> Result<Reply, ReplyError> {
    let mut parts = body.split('|');
    match parts.next() {
        Some("A") => {
            let kind = parts
                .next()
                .filter(|k| !k.is_empty())
                .ok_or(ReplyError::NoKind)?;
            let mut fields = BTreeMap::new();
            for f in parts {
                if let Some((k, v)) = f.split_once('=') {
                    fields.entry(k.to_string()).or_insert_with(|| v.to_string());
                }
            }
            Ok(Reply::Answer {
                kind: kind.to_string(),
                fields,
            })
        }
        Some("N") => {
            let rest = parts.next().unwrap_or("");
            match rest.strip_prefix("ERR=") {
                Some(code) if !code.is_empty() => Ok(Reply::Negative(code.to_string())),
                _ => Err(ReplyError::BadNegative(body.chars().take(64).collect())),
            }
        }
        _ => Err(ReplyError::UnknownStart(body.chars().take(16).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LM-SDI-300 §2 worked examples: BODY, XOR, CRC-16.
    const WORKED: &[(&str, &str, &str)] = &[
        ("Q|STATUS", "39", "4839"),
        ("Q|INFO", "23", "288F"),
        ("Q|COUNTERS", "2A", "B912"),
        ("Q|SELFTEST", "27", "6475"),
        ("N|ERR=CHECKSUM", "47", "44DE"),
    ];

    #[test]
    fn crc_check_value() {
        assert_eq!(crc16_ccitt_false(b"123456789"), 0x29B1);
    }

    #[test]
    fn worked_examples() {
        for (body, x, c) in WORKED {
            assert_eq!(
                checksum_digits(body.as_bytes(), Checksum::Xor),
                *x,
                "{body}"
            );
            assert_eq!(
                checksum_digits(body.as_bytes(), Checksum::Crc16),
                *c,
                "{body}"
            );
        }
    }

    #[test]
    fn status_request_is_13_bytes() {
        let f = encode("Q|STATUS", Checksum::Xor).unwrap();
        assert_eq!(f, b"\x02Q|STATUS*39\x03");
        assert_eq!(f.len(), 13);
    }

    #[test]
    fn resync_after_noise_and_half_frame() {
        let mut r = FrameReader::new();
        let mut bytes = b"garbage\x02A|STATUS|MODE=".to_vec();
        bytes.extend(encode("A|INFO|FW=2.4.1", Checksum::Xor).unwrap());
        let ev = r.push(&bytes);
        assert_eq!(ev[0], FrameEvent::Noise(7));
        assert!(matches!(
            ev[1],
            FrameEvent::Rejected(RejectReason::Truncated(_))
        ));
        assert_eq!(
            ev[2],
            FrameEvent::Frame(Frame {
                body: "A|INFO|FW=2.4.1".into(),
                checksum: Checksum::Xor
            })
        );
    }

    #[test]
    fn split_across_reads() {
        let f = encode("A|INFO|FW=3.1.0", Checksum::Crc16).unwrap();
        let mut r = FrameReader::new();
        for chunk in f.chunks(3).take(f.len() / 3) {
            assert!(r.push(chunk).is_empty());
        }
        let ev = r.push(&f[(f.len() / 3) * 3..]);
        assert!(matches!(&ev[0], FrameEvent::Frame(fr) if fr.checksum == Checksum::Crc16));
    }

    #[test]
    fn wrong_checksum_rejected() {
        let mut r = FrameReader::new();
        let ev = r.push(b"\x02Q|STATUS*38\x03");
        assert!(matches!(
            ev[0],
            FrameEvent::Rejected(RejectReason::ChecksumMismatch { .. })
        ));
        let ev = r.push(b"\x02Q|STATUS*3\x03");
        assert!(matches!(
            ev[0],
            FrameEvent::Rejected(RejectReason::MalformedChecksum(_))
        ));
        let ev = r.push(b"\x02Q|STATUS\x03");
        assert!(matches!(
            ev[0],
            FrameEvent::Rejected(RejectReason::NoChecksum)
        ));
    }

    #[test]
    fn oversize_frame_skipped_then_next_read() {
        let mut r = FrameReader::new();
        let mut bytes = vec![STX];
        bytes.extend(std::iter::repeat_n(b'A', 10_000));
        bytes.push(ETX);
        bytes.extend(encode("A|INFO|FW=2.4.1", Checksum::Xor).unwrap());
        let ev = r.push(&bytes);
        assert_eq!(ev[0], FrameEvent::Rejected(RejectReason::Oversize));
        assert!(matches!(&ev[1], FrameEvent::Frame(_)));
        assert_eq!(ev.len(), 2);
    }

    #[test]
    fn body_may_contain_star() {
        let f = encode("A|X|K=a*b", Checksum::Xor).unwrap();
        let ev = FrameReader::new().push(&f);
        assert!(matches!(&ev[0], FrameEvent::Frame(fr) if fr.body == "A|X|K=a*b"));
    }

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply("N|ERR=BUSY").unwrap(),
            Reply::Negative("BUSY".into())
        );
        let Reply::Answer { kind, fields } =
            parse_reply("A|INFO|MODEL=LIP-300|SN=LP3A-2207-0193|FW=2.4.1|HW=C|NEW=1").unwrap()
        else {
            panic!("not an answer")
        };
        assert_eq!(kind, "INFO");
        assert_eq!(fields["FW"], "2.4.1");
        assert_eq!(fields["NEW"], "1");
        assert!(parse_reply("X|foo").is_err());
        assert!(parse_reply("N|").is_err());
        assert!(parse_reply("A").is_err());
    }

    #[test]
    fn selftest_example_parses() {
        // LM-SDI-300 §7.
        let body = "A|SELFTEST|RESULT=PASS|RAM=OK|FLASH=OK|MOTOR=OK|PSENS=OK|AIRSENS=OK|BATT=OK|LAST=2026-11-27T06:02:11Z";
        let frame = encode(body, Checksum::Xor).unwrap();
        let ev = FrameReader::new().push(&frame);
        let FrameEvent::Frame(f) = &ev[0] else {
            panic!("{ev:?}")
        };
        let Reply::Answer { kind, fields } = parse_reply(&f.body).unwrap() else {
            panic!()
        };
        assert_eq!(kind, "SELFTEST");
        assert_eq!(fields["RESULT"], "PASS");
        assert_eq!(fields["LAST"], "2026-11-27T06:02:11Z");
        assert_eq!(fields.len(), 8);
    }

    #[test]
    fn manual_section_8_frames_verify() {
        let frames: &[&[u8]] = &[
            b"\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=480|BATT=86|AC=1|TALM=0001|CALM=0000|ERR=310|PID=P-0048213*62\x03",
            b"\x02A|INFO|MODEL=LIP-300|SN=LP3B-2403-0457|FW=3.1.0|HW=D*F5A0\x03",
            b"\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=250|BATT=90|AC=1|TALM=00010002|CALM=0000|ERR=240|TEMP=38.0|PID=P-0051877*C8DF\x03",
        ];
        let forms = [Checksum::Xor, Checksum::Crc16, Checksum::Crc16];
        for (f, form) in frames.iter().zip(forms) {
            let ev = FrameReader::new().push(f);
            assert!(
                matches!(&ev[..], [FrameEvent::Frame(fr)] if fr.checksum == form),
                "{ev:?}"
            );
            // Re-encoding the body gives the manual's bytes exactly.
            let FrameEvent::Frame(fr) = &ev[0] else {
                unreachable!()
            };
            assert_eq!(&encode(&fr.body, form).unwrap()[..], *f);
        }
    }

    #[test]
    fn encode_rejects_bad_bodies() {
        assert_eq!(
            encode(&"A".repeat(241), Checksum::Xor),
            Err(EncodeError::TooLong(241))
        );
        assert_eq!(
            encode("A\x01", Checksum::Xor),
            Err(EncodeError::NotPrintable(1))
        );
    }
}

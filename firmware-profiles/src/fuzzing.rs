//! The bodies of the cargo-fuzz targets in `fuzz/` (serial frames, Modbus registers, JSON
//! status documents, profile files). They live here so that `tests/fuzz_corpus.rs` replays
//! every committed corpus input under plain `cargo test` (stable, no libFuzzer) with the
//! same checks the fuzzer ran. Each function takes arbitrary bytes, must never panic or
//! hang, and panics only when an invariant of the decoders is broken.
//!
//! Pure: no I/O, no clock (times are fixed or derived from the input).

use crate::engine::{Profile, RuleState, Snapshot};
use crate::modbus::{self, RegType, RegisterImage, Table, WordOrder};
use crate::schema::TransportKind;
use crate::serial_frame::{self, Checksum, FrameEvent, FrameReader, Reply};
use crate::units::{ByteSize, Dur};
use crate::{parse_profile, ProfileSet};
use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

/// The evaluation time of the golden vectors.
const NOW: &str = "2026-11-28T10:15:00Z";

fn base_time() -> Timestamp {
    NOW.parse().expect("constant time")
}

/// The built-in profiles, parsed once (parsing runs every golden vector).
fn builtin() -> &'static ProfileSet {
    static SET: OnceLock<ProfileSet> = OnceLock::new();
    SET.get_or_init(|| ProfileSet::builtin().expect("built-in profiles load"))
}

fn profiles_of(kind: TransportKind) -> Vec<&'static Arc<Profile>> {
    builtin()
        .iter()
        .filter(|p| p.transport_kind() == kind)
        .collect()
}

/// A snapshot only ever holds points the profile lists, and issues name listed points.
fn check_snapshot(p: &Profile, snap: &Snapshot) {
    for name in snap.values.keys() {
        assert!(
            p.point(name).is_some(),
            "{}: snapshot holds unlisted point {name:?}",
            p.id()
        );
    }
    for issue in &snap.issues {
        let name = issue.split(':').next().unwrap_or("");
        assert!(
            p.point(name).is_some(),
            "{}: issue {issue:?} names no listed point",
            p.id()
        );
    }
}

/// Evaluates `snap` at `now` and checks what comes out: readings are listed reading
/// points, signals sorted and unique, and the whole serialises (as the agent sends it).
fn evaluate_checked(p: &Profile, snap: &Snapshot, now: Timestamp, st: &mut RuleState) {
    let ev = p.evaluate(snap, now, st);
    for r in &ev.readings {
        let def = p.point(&r.name).expect("reading of a listed point");
        assert!(def.reading, "{}: {} is not a reading", p.id(), r.name);
        let v = snap.values.get(&r.name).expect("reading from the snapshot");
        // Debug form, so NaN (a failed sensor) equals itself.
        assert_eq!(format!("{v:?}"), format!("{:?}", r.value));
    }
    for w in ev.signals.windows(2) {
        assert!(w[0].code < w[1].code, "signals not sorted and unique");
    }
    if snap.is_empty() {
        assert!(ev.signals.is_empty());
        assert_eq!(ev.state, crate::DeviceState::Unknown);
    }
    serde_json::to_string(&(snap, &ev)).expect("evaluation serialises");
}

// ---------- serial_frame ----------

/// Chunk sizes from a one-byte seed: 0 feeds everything at once, otherwise a small
/// xorshift sequence of sizes in `1..=seed` so short and long reads both happen.
fn chunks(seed: u8, bytes: &[u8]) -> Vec<&[u8]> {
    if seed == 0 {
        return vec![bytes];
    }
    let mut out = Vec::new();
    let mut x = u32::from(seed) | 0x100;
    let mut rest = bytes;
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let n = (1 + x % u32::from(seed)) as usize;
        let (a, b) = rest.split_at(n.min(rest.len()));
        out.push(a);
        rest = b;
    }
    out
}

/// Frames and rejections in order, and the total noise byte count.
fn split_events(events: Vec<FrameEvent>) -> (Vec<FrameEvent>, usize) {
    let mut noise = 0;
    let mut rest = Vec::new();
    for e in events {
        match e {
            FrameEvent::Noise(n) => noise += n,
            other => rest.push(other),
        }
    }
    (rest, noise)
}

/// Target `serial_frame`: byte 0 chooses how the rest is chunked into `FrameReader::push`
/// calls. The events must not depend on the chunking; every accepted frame must re-encode
/// to a frame that reads back the same; reply bodies parse without panics; the serial
/// profiles decode and evaluate what came out.
pub fn serial_frame(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };

    let mut reader = FrameReader::new();
    let mut chunked = Vec::new();
    for c in chunks(seed, stream) {
        chunked.extend(reader.push(c));
    }
    let whole = FrameReader::new().push(stream);
    let (a, noise_a) = split_events(chunked);
    let (b, noise_b) = split_events(whole);
    assert_eq!(a, b, "events depend on how the bytes were chunked");
    assert_eq!(noise_a, noise_b, "noise count depends on chunking");
    assert!(noise_a <= stream.len());
    // After a reset the reader is clean: a good frame reads back alone.
    reader.reset();
    assert!(!reader.mid_frame());
    let probe = serial_frame::encode("Q|STATUS", Checksum::Xor).expect("valid body");
    assert_eq!(reader.push(&probe).len(), 1);

    let mut replies: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for ev in &a {
        let FrameEvent::Frame(f) = ev else { continue };
        assert!(f.body.len() <= serial_frame::MAX_BODY);
        assert!(f.body.bytes().all(|b| (0x20..=0x7E).contains(&b)));
        let again = serial_frame::encode(&f.body, f.checksum).expect("accepted body encodes");
        assert_eq!(
            FrameReader::new().push(&again),
            vec![FrameEvent::Frame(f.clone())],
            "re-encoded frame does not read back"
        );
        match serial_frame::parse_reply(&f.body) {
            Ok(Reply::Answer { kind, fields }) => {
                assert!(!kind.is_empty() && !kind.contains('|'));
                assert!(fields.keys().all(|k| !k.contains('|') && !k.contains('=')));
                replies.insert(kind, fields);
            }
            Ok(Reply::Negative(code)) => assert!(!code.is_empty()),
            Err(_) => {}
        }
    }

    // Encoding arbitrary text either fails or makes a frame that reads back.
    let text = String::from_utf8_lossy(stream);
    for form in [Checksum::Xor, Checksum::Crc16] {
        if let Ok(f) = serial_frame::encode(&text, form) {
            let ev = FrameReader::new().push(&f);
            assert!(
                matches!(&ev[..], [FrameEvent::Frame(fr)] if fr.body == text && fr.checksum == form),
                "{ev:?}"
            );
        }
    }
    let _ = crate::engine::replies_from_frames(
        &chunks(seed, stream)
            .iter()
            .map(|c| c.to_vec())
            .collect::<Vec<_>>(),
    );

    let now = base_time();
    for p in profiles_of(TransportKind::Serial) {
        let snap = p.decode_serial(&replies);
        check_snapshot(p, &snap);
        if let Some(req) = &p.doc.identify.request {
            if let Some(info) = replies.get(req) {
                if let Ok(id) = p.identify_serial(info) {
                    assert!(crate::engine::firmware_major(&id.firmware).is_some());
                }
            }
        }
        let mut st = RuleState::default();
        evaluate_checked(p, &snap, now, &mut st);
    }
}

// ---------- modbus_registers ----------

/// Polls evaluated per input, besides the last.
pub const MAX_POLLS: usize = 16;

/// Target `modbus_registers`: the input is a small program building register images:
///
/// * `0b0TAAAAAA n w1 w2 ...`: table `T` (0 holding, 1 input), start address `A` (0-63),
///   `n % 33` big-endian words that follow;
/// * `0b10DDDDDD`: poll: decode and evaluate the image with every built-in Modbus profile
///   (each keeps its rule memory across polls), clear it and advance the clock by `D`
///   × 10 s;
/// * `0b11xxxxxx s1 s2 s3 s4`: move the clock by the big-endian `i32` seconds.
///
/// A last poll runs at the end; polls beyond [`MAX_POLLS`] only clear and advance (keeps
/// each input fast). Also decodes the raw words with every register type.
pub fn modbus_registers(data: &[u8]) {
    let profiles = profiles_of(TransportKind::Modbus);
    let mut states: Vec<RuleState> = profiles.iter().map(|_| RuleState::default()).collect();
    let mut now = base_time();
    let mut image = RegisterImage::new();
    let mut all_words = Vec::new();
    let mut polls = 0;

    let poll = |image: &RegisterImage, now: Timestamp, states: &mut [RuleState]| {
        for (p, st) in profiles.iter().zip(states.iter_mut()) {
            let snap = p.decode_registers(image);
            check_snapshot(p, &snap);
            if let Ok(id) = p.identify_registers(image) {
                assert!(crate::engine::firmware_major(&id.firmware).is_some());
                if let Some(sn) = &id.serial {
                    assert!(sn.bytes().all(|b| (0x20..=0x7E).contains(&b)));
                }
            }
            evaluate_checked(p, &snap, now, st);
        }
    };

    let mut i = 0;
    while i < data.len() {
        let op = data[i];
        i += 1;
        match op >> 6 {
            0 | 1 => {
                let table = if op & 0x40 == 0 {
                    Table::Holding
                } else {
                    Table::Input
                };
                let start = u16::from(op & 0x3F);
                let n = usize::from(data.get(i).copied().unwrap_or(0) % 33);
                i += 1;
                let words: Vec<u16> = data[i.min(data.len())..]
                    .chunks_exact(2)
                    .take(n)
                    .map(|w| u16::from_be_bytes([w[0], w[1]]))
                    .collect();
                i += words.len() * 2;
                image.insert(table, start, &words);
                assert_eq!(
                    image.get(table, start, words.len() as u16),
                    Some(words.clone())
                );
                all_words.extend(words);
            }
            2 => {
                if polls < MAX_POLLS {
                    poll(&image, now, &mut states);
                    polls += 1;
                }
                image = RegisterImage::new();
                let step = SignedDuration::from_secs(i64::from(op & 0x3F) * 10);
                now = now.checked_add(step).unwrap_or(now);
            }
            _ => {
                let Some(s) = data.get(i..i + 4) else { break };
                i += 4;
                let secs = i32::from_be_bytes([s[0], s[1], s[2], s[3]]);
                now = now
                    .checked_add(SignedDuration::from_secs(i64::from(secs)))
                    .unwrap_or(now);
            }
        }
    }
    poll(&image, now, &mut states);

    // Every register type on every window of the words: decodes at its width, refuses
    // any other; ASCII is printable and trimmed.
    for ty in [
        RegType::U16,
        RegType::I16,
        RegType::U32,
        RegType::I32,
        RegType::F32,
        RegType::Ascii,
    ] {
        let w = match ty {
            RegType::Ascii => all_words.len().clamp(1, 8),
            other => usize::from(other.width(0)),
        };
        for order in [WordOrder::HighFirst, WordOrder::LowFirst] {
            for win in all_words.windows(w).take(64) {
                match modbus::decode(ty, order, win) {
                    Some(crate::Value::Num(_)) => assert!(ty != RegType::Ascii),
                    Some(crate::Value::Text(t)) => {
                        assert!(ty == RegType::Ascii && t.len() <= 2 * w);
                        assert!(t.bytes().all(|b| (0x20..=0x7E).contains(&b)));
                        assert!(!t.ends_with(' '));
                    }
                    other => panic!("{ty:?} {win:?} decoded to {other:?}"),
                }
            }
            if ty != RegType::Ascii {
                if let Some(wrong) = all_words.get(..w + 1) {
                    assert_eq!(modbus::decode(ty, order, wrong), None);
                }
            }
        }
    }
}

// ---------- json_status ----------

/// Target `json_status`: every built-in MQTT profile identifies and decodes the bytes as
/// a status message, then evaluates the snapshot twice (an hour apart, one rule memory).
pub fn json_status(data: &[u8]) {
    let now = base_time();
    for p in profiles_of(TransportKind::Mqtt) {
        if let Ok(id) = p.identify_json(data) {
            assert!(crate::engine::firmware_major(&id.firmware).is_some());
        }
        let Ok(snap) = p.decode_json(data) else {
            continue;
        };
        check_snapshot(p, &snap);
        let mut st = RuleState::default();
        evaluate_checked(p, &snap, now, &mut st);
        evaluate_checked(p, &snap, now + SignedDuration::from_hours(1), &mut st);
    }
}

// ---------- profile_loader ----------

/// Target `profile_loader`: arbitrary text as a profile file. An error names a line of
/// the text; a profile that loads can be planned, added to a set and its goldens rerun.
pub fn profile_loader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Dur::parse(text);
    let _ = ByteSize::parse(text);
    match parse_profile("fuzz.toml", text) {
        Err(e) => {
            let lines = text.lines().count().max(1) + 1;
            assert!(
                (1..=lines).contains(&e.line),
                "error line {} outside 1..={lines}: {e}",
                e.line
            );
            assert!(!e.message.is_empty());
            assert_eq!(e.file, "fuzz.toml");
        }
        Ok(p) => {
            let _ = p.read_plan();
            let _ = p.identify_reads();
            let _ = p.diagnostic_names().count();
            for g in &p.doc.golden {
                crate::load::run_golden(&p, g).expect("a loaded profile passes its goldens");
            }
            let mut set = ProfileSet::default();
            set.add(p.clone()).expect("first profile of its model");
            assert!(set.add(p).is_err(), "same model and firmware added twice");
        }
    }
}

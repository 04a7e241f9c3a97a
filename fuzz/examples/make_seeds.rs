//! Writes the seed inputs of every fuzz target into `corpus/<target>/seed-*` (run from
//! `fuzz/`: `cargo run --example make_seeds`). Seeds come from the built-in profiles'
//! golden vectors (frames, register blocks, JSON documents), the profile files
//! themselves, and wire messages made by encoding real structs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use tend_profiles::load::BUILTIN;
use tend_profiles::modbus::Table;
use tend_profiles::parse_profile;
use tend_profiles::schema::TransportKind;
use tend_profiles::serial_frame::{encode, Checksum, ETX, STX};
use tend_profiles::{DeviceState, FaultClass, SignalKind, Value};
use tend_wire::{
    Ack, DiagRequest, DiagResponse, EpisodeChange, EpisodeEvent, Opening, Record, RecordBody,
    SeqRange, UpBatch, WireReading, VERSION,
};

struct Seeds {
    dir: String,
    n: usize,
}

impl Seeds {
    fn new(target: &str) -> Self {
        let dir = format!("corpus/{target}");
        fs::create_dir_all(&dir).unwrap();
        Seeds { dir, n: 0 }
    }
    fn add(&mut self, bytes: impl AsRef<[u8]>) {
        let p = Path::new(&self.dir).join(format!("seed-{:03}", self.n));
        fs::write(p, bytes.as_ref()).unwrap();
        self.n += 1;
    }
}

/// A register block in the `modbus_registers` input language.
fn block(out: &mut Vec<u8>, table: Table, start: u16, words: &[u16]) {
    for (i, chunk) in words.chunks(32).enumerate() {
        let s = start as usize + i * 32;
        assert!(s < 64, "block start {s} does not fit the seed language");
        let t = if table == Table::Input { 0x40 } else { 0 };
        out.push(t | s as u8);
        out.push(chunk.len() as u8);
        for w in chunk {
            out.extend(w.to_be_bytes());
        }
    }
}

fn main() {
    let profiles: Vec<_> = BUILTIN
        .iter()
        .map(|(name, src)| parse_profile(name, src).expect("built-in profile"))
        .collect();

    // serial_frame: byte 0 is the chunking seed.
    let mut s = Seeds::new("serial_frame");
    for p in profiles
        .iter()
        .filter(|p| p.transport_kind() == TransportKind::Serial)
    {
        for g in &p.doc.golden {
            let stream: Vec<u8> = g.frames.concat().into_bytes();
            for seed in [0u8, 1, 7] {
                let mut v = vec![seed];
                v.extend(&stream);
                s.add(v);
            }
        }
    }
    for (body, form) in [
        (
            "A|INFO|MODEL=LIP-300|SN=LP3B-2403-0457|FW=3.1.0|HW=D",
            Checksum::Crc16,
        ),
        ("N|ERR=CHECKSUM", Checksum::Xor),
        ("N|ERR=BUSY", Checksum::Crc16),
        ("A|X|K=a*b", Checksum::Xor),
        ("Q|STATUS", Checksum::Xor),
    ] {
        let mut v = vec![0];
        v.extend(encode(body, form).unwrap());
        s.add(v);
    }
    // Noise, a half frame, wrong and malformed checksums, an oversize frame, then a good one.
    let good = encode("A|INFO|MODEL=LIP-300|SN=X|FW=2.4.1|HW=C", Checksum::Xor).unwrap();
    let mut v = vec![3];
    v.extend(b"garbage\x02A|STATUS|MODE=");
    v.extend(b"\x02Q|STATUS*38\x03\x02Q|STATUS*3\x03\x02Q|STATUS\x03\x02A|\x01*00\x03");
    v.push(STX);
    v.extend(std::iter::repeat_n(b'A', 300));
    v.push(ETX);
    v.extend(&good);
    s.add(v);

    // modbus_registers: register blocks, then 0x80 (poll).
    let mut s = Seeds::new("modbus_registers");
    for p in profiles
        .iter()
        .filter(|p| p.transport_kind() == TransportKind::Modbus)
    {
        let mut all = Vec::new();
        for g in &p.doc.golden {
            let mut v = Vec::new();
            for r in &g.registers {
                block(&mut v, r.table, r.start, &r.words);
            }
            v.push(0x80);
            s.add(&v);
            all.extend(v);
        }
        // Every vector of a profile in a row, then the first again after 61 s polls.
        all.extend([0x86, 0x86]);
        s.add(&all);
    }
    // HM-2 helium falling over a day (rate rule), with clock jumps.
    let mut v = Vec::new();
    for (i, level) in [71.5f32, 71.3, 71.0, 70.9].iter().enumerate() {
        let b = level.to_bits();
        block(
            &mut v,
            Table::Holding,
            0,
            &[
                b as u16,
                (b >> 16) as u16,
                0x999A,
                0x3F99,
                0x6666,
                0x4086,
                1,
                0,
                75,
                0x0001,
                0x86A0,
                12000,
                305,
                0,
            ],
        );
        v.push(0x80);
        if i % 2 == 1 {
            v.push(0xC0);
            v.extend((6 * 3600i32).to_be_bytes());
        }
    }
    s.add(&v);

    // json_status: the documents of the golden vectors, and a few hostile shapes.
    let mut s = Seeds::new("json_status");
    for p in profiles
        .iter()
        .filter(|p| p.transport_kind() == TransportKind::Mqtt)
    {
        for g in &p.doc.golden {
            s.add(g.json.as_deref().unwrap());
        }
    }
    s.add(r#"{"schema":"vistara.status/2","fw":"7.1.0","sn":"X","state":"RUNNING","tech_alarms":[{"code":"T-301"},1,null],"modules":[{"id":"a","status":"FAULT","code":"M-12"}],"power":{"source":"AC","battery_pct":1e308}}"#);
    s.add(r#"{"schema":"vistara.status/1","fw":"6.x","talarms":"T-1","st":null,"pwr":[],"batt":"87"}"#);
    s.add(format!("{}{}", "[".repeat(200), "]".repeat(200)));
    s.add(r#"{"a":{"a":{"a":{"a":{"a":{"a":{"a":{"a":[[[[[[[[{}]]]]]]]]}}}}}}}}"#);

    // profile_loader: the built-in profiles as shipped, without golden vectors, and bare.
    let mut s = Seeds::new("profile_loader");
    for (_, src) in BUILTIN {
        s.add(src);
        let no_golden = src.split("\n[[golden]]").next().unwrap();
        s.add(no_golden);
        let bare: String = no_golden
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        s.add(bare);
    }

    // wire_decode: every message kind, encoded from real structs, and topic names.
    let mut s = Seeds::new("wire_decode");
    let at: jiff::Timestamp = "2026-11-28T02:15:02Z".parse().unwrap();
    let episode = EpisodeEvent {
        episode: "agent-icu-a/icu7-vent/ALM1.4/1795832102000".into(),
        change: EpisodeChange::Opened,
        code: "ALM1.4".into(),
        kind: SignalKind::Fault,
        class: Some(FaultClass::Major),
        description: "exhalation valve fault".into(),
        action: Some("Replace the exhalation valve assembly; bring spare.".into()),
        evidence: BTreeMap::from([
            ("state".into(), serde_json::json!(4)),
            ("temp".into(), serde_json::json!(42.5)),
        ]),
        device_available: false,
        opened_at: at,
        due: Some("2026-12-01".into()),
        opening: Some(Box::new(Opening {
            class: Some(FaultClass::Major),
            description: "exhalation valve fault".into(),
            action: None,
            evidence: BTreeMap::new(),
            device_available: true,
            due: None,
            model: Some("aeris/av-500".into()),
            firmware: Some("5.2.0".into()),
        })),
    };
    let rec = |seq: u64, body: RecordBody| Record {
        seq,
        at,
        device: "icu7-vent".into(),
        body,
    };
    let batch = UpBatch {
        v: VERSION,
        agent: "agent-icu-a".into(),
        incarnation: "9f1c2e4a7b3d5f60a1b2c3d4e5f60718".into(),
        site: "s-017-main".into(),
        records: vec![
            rec(
                1,
                RecordBody::Identity {
                    model: "aeris/av-500".into(),
                    firmware: "5.2.0".into(),
                    serial: Some("AV5C-21-004417".into()),
                    profile: "builtin:aeris/av-500-5.x.toml".into(),
                },
            ),
            rec(
                2,
                RecordBody::Readings {
                    readings: vec![
                        WireReading {
                            name: "battery".into(),
                            value: Value::Num(87.0),
                            unit: Some("%".into()),
                        },
                        WireReading {
                            name: "mode".into(),
                            value: Value::Text("INFUSING".into()),
                            unit: None,
                        },
                        WireReading {
                            name: "tech_alarms".into(),
                            value: Value::Codes(vec!["T-301".into(), "T-410".into()]),
                            unit: None,
                        },
                    ],
                },
            ),
            rec(
                3,
                RecordBody::State {
                    from: DeviceState::Up,
                    to: DeviceState::Down,
                },
            ),
            rec(4, RecordBody::Episode(episode.clone())),
            rec(
                5,
                RecordBody::Dropped {
                    count: 10,
                    first_seq: 100,
                    last_seq: 109,
                },
            ),
        ],
    };
    s.add(tend_wire::encode(&batch).unwrap());
    for r in &batch.records {
        let one = UpBatch {
            records: vec![r.clone()],
            ..batch.clone()
        };
        s.add(tend_wire::encode(&one).unwrap());
    }
    s.add(
        tend_wire::encode(&Ack {
            v: VERSION,
            incarnation: "9f1c2e4a7b3d5f60a1b2c3d4e5f60718".into(),
            ranges: vec![
                SeqRange { first: 1, last: 5 },
                SeqRange { first: 9, last: 9 },
            ],
        })
        .unwrap(),
    );
    s.add(
        tend_wire::encode(&DiagRequest {
            v: VERSION,
            id: "d-1".into(),
            device: "icu7-vent".into(),
            request: "status-registers".into(),
        })
        .unwrap(),
    );
    s.add(
        tend_wire::encode(&DiagResponse {
            v: VERSION,
            id: "d-1".into(),
            device: "icu7-vent".into(),
            request: "status-registers".into(),
            ok: true,
            answer: serde_json::json!({"input": [1, 16, 0]}),
            error: None,
        })
        .unwrap(),
    );
    s.add(
        tend_wire::encode(&DiagResponse {
            v: VERSION,
            id: "d-2".into(),
            device: "icu7-vent".into(),
            request: "x".into(),
            ok: false,
            answer: Default::default(),
            error: Some("no such diagnostic".into()),
        })
        .unwrap(),
    );
    for t in [
        tend_wire::topic::up("agent-icu-a"),
        tend_wire::topic::ack("a"),
        tend_wire::topic::status("a.b_c"),
        tend_wire::topic::diag_req("agent-1"),
        tend_wire::topic::diag_resp("agent-1"),
    ] {
        s.add(t);
    }
    s.add([
        0u8, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 3, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
        0xFF,
    ]);
    println!("seeds written under corpus/");
}

//! What sealing costs: encoding a batch of readings as the agent does, sealing it, and
//! opening and decoding it as the gateway does, per record, for batch sizes the uplink
//! sends. Run in release:
//!
//! ```sh
//! cargo run --release -p tend-wire --example seal_bench
//! ```

use std::time::{Duration, Instant};
use tend_profiles::Value;
use tend_wire::seal::{open, seal};
use tend_wire::{AgentKey, Purpose, Record, RecordBody, UpBatch, WireReading};

fn batch(records: usize) -> UpBatch {
    let at: jiff::Timestamp = "2026-12-02T01:00:00Z".parse().unwrap();
    UpBatch {
        v: tend_wire::VERSION,
        agent: "agent-icu-a".into(),
        incarnation: "9f1c2e4a7b3d5f60a1b2c3d4e5f60718".into(),
        site: "s-017-main".into(),
        sent_at: at,
        oldest: Some(1),
        records: (0..records as u64)
            .map(|seq| Record {
                seq: seq + 1,
                at,
                device: format!("icu{}-vent", seq % 50),
                body: RecordBody::Readings {
                    readings: ["battery", "o2_supply_kpa", "peak_pressure", "fio2", "hours"]
                        .iter()
                        .enumerate()
                        .map(|(i, n)| WireReading {
                            name: n.to_string(),
                            value: Value::Num(seq as f64 * 0.5 + i as f64),
                            unit: Some("%".into()),
                        })
                        .collect(),
                },
            })
            .collect(),
    }
}

/// Mean time of `f` over enough runs to take about 300 ms.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut runs = 0u32;
    while start.elapsed() < Duration::from_millis(300) || runs < 10 {
        f();
        runs += 1;
    }
    start.elapsed() / runs
}

fn main() {
    let key = AgentKey::generate().expect("random key");
    println!(
        "{:>8} {:>10} {:>14} {:>14} {:>14} {:>16} {:>10}",
        "records",
        "bytes",
        "encode ns/rec",
        "seal ns/rec",
        "open ns/rec",
        "decode ns/rec",
        "seal share"
    );
    for n in [1usize, 10, 100, 1000] {
        let b = batch(n);
        let body = tend_wire::encode(&b).unwrap();
        let sealed = seal(&key, Purpose::Up, &b.agent, &body);
        let encode = time(|| {
            std::hint::black_box(tend_wire::encode(std::hint::black_box(&b)).unwrap());
        });
        let sealing = time(|| {
            std::hint::black_box(seal(
                &key,
                Purpose::Up,
                &b.agent,
                std::hint::black_box(&body),
            ));
        });
        let opening = time(|| {
            std::hint::black_box(open(&key, Purpose::Up, &b.agent, &sealed).unwrap());
        });
        let decode = time(|| {
            std::hint::black_box(UpBatch::decode(std::hint::black_box(&body)).unwrap());
        });
        let per = |d: Duration| d.as_nanos() as f64 / n as f64;
        println!(
            "{:>8} {:>10} {:>14.0} {:>14.0} {:>14.0} {:>16.0} {:>9.1}%",
            n,
            sealed.len(),
            per(encode),
            per(sealing),
            per(opening),
            per(decode),
            100.0 * (sealing + opening).as_secs_f64()
                / (encode + sealing + opening + decode).as_secs_f64()
        );
    }
}

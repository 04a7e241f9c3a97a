//! A month of one agent's 50 devices at 1 Hz through the gateway's store, compressed:
//! every simulated second a batch of 50 readings (one per device), sent once the one
//! before was acknowledged (so each batch names the agent's oldest record), grouped a
//! simulated minute per transaction as the link groups what queues up; every device has
//! a fault a day (down, episode opened, cleared ten minutes later, up). Prints the store
//! file's size after each simulated day. DESIGN §5: a month in under 100 MB.
//!
//! ```sh
//! cargo run --release -p tend-gateway --example store_soak -- [DAYS] [DIR]
//! ```
//! DAYS defaults to 30 (about 130 million records); DIR to a temporary directory.

use jiff::{SignedDuration, Timestamp};
use std::collections::BTreeMap;
use std::time::Instant;
use tend_gateway::fleet::Fleet;
use tend_gateway::ingest::IngestContext;
use tend_gateway::store::{GatewayStore, RedbStore};
use tend_profiles::{DeviceState, FaultClass, ProfileSet, SignalKind, Value};
use tend_wire::{EpisodeChange, EpisodeEvent, Record, RecordBody, UpBatch, WireReading, VERSION};

const DEVICES: usize = 50;
const AGENT: &str = "agent-soak";

fn fleet() -> String {
    let mut s = String::from(
        "[[customer]]\nid = \"c-1\"\nname = \"Soak Hospital\"\ncontact_name = \"A\"\ncontact_phone = \"1\"\n\n\
         [[site]]\nid = \"s-1\"\ncustomer = \"c-1\"\nname = \"Main\"\naddress = \"1 Rd\"\nservice_area = \"same_city\"\n",
    );
    for d in 0..DEVICES {
        s.push_str(&format!(
            "\n[[device]]\nid = \"dev-{d:02}\"\nsite = \"s-1\"\nserial = \"SN-{d:04}\"\nlocation = \"bed {d}\"\naccepted = \"2026-01-01\"\n"
        ));
    }
    s
}

fn readings(t: u64) -> Vec<WireReading> {
    ["battery", "o2_supply_kpa", "peak_pressure", "fio2", "hours"]
        .iter()
        .enumerate()
        .map(|(i, n)| WireReading {
            name: n.to_string(),
            value: Value::Num(((t + i as u64) % 97) as f64),
            unit: None,
        })
        .collect()
}

fn episode(device: &str, opened: Timestamp, change: EpisodeChange) -> RecordBody {
    RecordBody::Episode(EpisodeEvent {
        episode: format!("{AGENT}/{device}/E-SOAK/{}", opened.as_millisecond()),
        change,
        code: "E-SOAK".into(),
        kind: SignalKind::Fault,
        class: Some(FaultClass::Simple),
        description: "simulated fault".into(),
        action: None,
        evidence: BTreeMap::new(),
        device_available: false,
        opened_at: opened,
        due: None,
        opening: None,
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let days: u64 = args.next().map(|d| d.parse().expect("DAYS")).unwrap_or(30);
    let tmp = tempfile::tempdir().expect("temporary directory");
    let dir = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let store = RedbStore::open(&dir).expect("open the store");
    let file = store.path().to_path_buf();
    let cx = IngestContext {
        gateway: "gw-soak".into(),
        fleet: Fleet::parse("fleet.toml", &fleet()).expect("fleet"),
        profiles: ProfileSet::builtin().expect("profiles"),
        tz: jiff::tz::TimeZone::get("Asia/Shanghai").expect("zone"),
        clock_tolerance: tend_gateway::clock::DEFAULT_TOLERANCE,
    };
    let start: Timestamp = "2026-11-01T00:00:00Z".parse().unwrap();
    let mut seq = 0u64;
    let mut records = 0u64;
    let began = Instant::now();
    println!(
        "{:>4} {:>14} {:>12} {:>10}",
        "day", "records", "store MiB", "rec/s"
    );
    for day in 0..days {
        for minute in 0..24 * 60u64 {
            let mut group = Vec::with_capacity(60);
            for second in 0..60u64 {
                let t = day * 86_400 + minute * 60 + second;
                let at = start + SignedDuration::from_secs(t as i64);
                let oldest = seq + 1;
                let mut batch_records = Vec::with_capacity(DEVICES + 2);
                for d in 0..DEVICES {
                    let device = format!("dev-{d:02}");
                    seq += 1;
                    batch_records.push(Record {
                        seq,
                        at,
                        device: device.clone(),
                        body: RecordBody::Readings {
                            readings: readings(t),
                        },
                    });
                    // Each device's daily fault, spread over the day.
                    let fault_at = (d as u64 * 1_700) % 86_400;
                    let of_day = t % 86_400;
                    let events: &[_] = if of_day == fault_at {
                        &[(DeviceState::Up, DeviceState::Down, EpisodeChange::Opened)]
                    } else if of_day == fault_at + 600 {
                        &[(DeviceState::Down, DeviceState::Up, EpisodeChange::Cleared)]
                    } else {
                        &[]
                    };
                    for &(from, to, change) in events {
                        let opened =
                            start + SignedDuration::from_secs((day * 86_400 + fault_at) as i64);
                        seq += 1;
                        batch_records.push(Record {
                            seq,
                            at,
                            device: device.clone(),
                            body: RecordBody::State { from, to },
                        });
                        seq += 1;
                        batch_records.push(Record {
                            seq,
                            at,
                            device: device.clone(),
                            body: episode(&device, opened, change),
                        });
                    }
                }
                records += batch_records.len() as u64;
                group.push(UpBatch {
                    v: VERSION,
                    agent: AGENT.into(),
                    incarnation: "soak1".into(),
                    site: "s-1".into(),
                    sent_at: at,
                    oldest: Some(oldest),
                    records: batch_records,
                });
            }
            let now = start + SignedDuration::from_secs((day * 86_400 + minute * 60 + 60) as i64);
            store.apply_many(&group, &cx, now).expect("apply");
        }
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        println!(
            "{:>4} {:>14} {:>12.1} {:>10.0}",
            day + 1,
            records,
            size as f64 / (1 << 20) as f64,
            records as f64 / began.elapsed().as_secs_f64()
        );
    }
    assert_eq!(store.records_stored().expect("count"), records);
}

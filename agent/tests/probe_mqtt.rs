//! The MQTT device source and `probe --transport mqtt`: the devsim VM-12 (firmware 6.x and
//! 7.x) on an embedded broker, alarms raised in the simulator, patient data that must not
//! appear in the output, oversize payloads, schema mismatches and a silent monitor.

mod common;

use common::{assert_no_phi, probe, reading, signal_codes};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use std::sync::OnceLock;
use std::time::Duration;
use tend_agent::transport::mqtt::{self, MqttSource, Presence};
use tend_agent::transport::TransportError;
use tend_devsim::broker::{spawn_embedded, EmbeddedBroker};
use tend_devsim::{Vm12Config, Vm12Sim};
use tend_profiles::ProfileSet;

const VM: &str = "vistara/vm-12";
const PHI_V7: &[&str] = &[
    "ZHANG",
    "MRN0012931",
    "1961-04-02",
    "ICU-07",
    "118/76",
    "\"hr\"",
];
const PHI_V6: &[&str] = &["LI Si", "MRN0033017", "pt_name", "pt_id", "1958-09-17"];

/// One embedded broker for the whole test binary: rumqttd cannot be stopped.
fn broker() -> EmbeddedBroker {
    static B: OnceLock<EmbeddedBroker> = OnceLock::new();
    *B.get_or_init(|| spawn_embedded().expect("embedded broker"))
}

async fn monitor(cfg: Vm12Config) -> tend_devsim::Vm12Handle {
    let mut cfg = cfg;
    // Publish often so that a probe never waits the manual's 10 s.
    cfg.status_interval = Duration::from_millis(500);
    Vm12Sim::spawn(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_vm12_firmware_7_with_alarms_and_no_patient_data() {
    let b = broker();
    let sim = monitor(Vm12Config::v7("127.0.0.1", b.port())).await;
    let args = [
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        &b.url(),
        "--serial",
        "VM12-00A4471",
        "--timeout",
        "8s",
    ];
    let run = probe(&args).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let out = &run.stdout;
    assert!(out.contains("firmware 7.4.2"), "{out}");
    assert!(out.contains("vistara/vm-12 7.x"), "{out}");
    assert!(out.contains("96 %"), "{out}");
    assert!(out.contains("41.5 °C"), "{out}");
    assert!(out.contains("state     up"), "{out}");
    assert_no_phi(&run.all(), PHI_V7);

    // VS-IOT-12 §2 example: NIBP pump failure (major) and an SpO2 module fault.
    // In one update: each update publishes a status, and a probe that read the one between
    // two updates would see the alarm without the module fault.
    sim.update(|s| {
        tend_devsim::vm12::raise_alarm(s, "T-301", "high", "NIBP pump failure");
        tend_devsim::vm12::set_module(s, 2, Some("M-214"));
    });
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = probe(&json_args).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    assert_eq!(v["firmware"], "7.4.2");
    assert_eq!(v["serial"], "VM12-00A4471");
    assert_eq!(v["presence"], "online");
    let codes = signal_codes(&v);
    assert!(codes.contains(&"T-301".to_string()), "{codes:?}");
    assert!(codes.contains(&"M-214".to_string()), "{codes:?}");
    let t301 = v["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"] == "T-301")
        .unwrap();
    assert_eq!(t301["class"], "major");
    assert_eq!(v["state"], "down");
    assert_no_phi(&run.all(), PHI_V7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_vm12_firmware_6_flat_schema() {
    let b = broker();
    let sim = monitor(Vm12Config::v6("127.0.0.1", b.port())).await;
    sim.raise_alarm("T-112", "low", "RTC battery low");
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        &b.url(),
        "--serial",
        "VM12-0081192",
        "--timeout",
        "8s",
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    assert_eq!(v["firmware"], "6.9.0");
    assert_eq!(v["profile_firmware"], "6.x");
    assert_eq!(reading(&v, "state"), "monitoring");
    assert_eq!(reading(&v, "battery"), 77.0);
    assert_eq!(reading(&v, "power_on_hours"), 30551.0);
    let codes = signal_codes(&v);
    assert_eq!(codes, vec!["T-112".to_string()]);
    assert_eq!(v["signals"][0]["class"], "simple");
    assert_eq!(v["state"], "up");
    assert_no_phi(&run.all(), PHI_V6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_silent_monitor_times_out_naming_the_last_will() {
    let b = broker();
    let mut cfg = Vm12Config::v7("127.0.0.1", b.port());
    cfg.serial = "VM12-SILENT01".into();
    let sim = monitor(cfg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    sim.set_silent(true);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        &b.url(),
        "--serial",
        "VM12-SILENT01",
        "--timeout",
        "1500ms",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("timeout"), "{}", run.stderr);
    assert!(run.stderr.contains("offline"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_mqtt_argument_errors() {
    // Wildcards in the serial would subscribe to other devices.
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--serial",
        "#",
    ])
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        "mqtt://127.0.0.1:1",
    ])
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--serial"), "{}", run.stderr);
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        "http://x",
        "--serial",
        "VM12-1",
    ])
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    // Nothing listening: the broker cannot be reached.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let run = probe(&[
        "--profile",
        VM,
        "--transport",
        "mqtt",
        "--broker",
        &format!("mqtt://{free}"),
        "--serial",
        "VM12-1",
        "--timeout",
        "3s",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("cannot connect"), "{}", run.stderr);
}

// ------------------------------------------------------------------ decoding and limits

const V7_DOC: &str = r#"{"schema":"vistara.status/2","serial":"VM12-TEST0001","fw":"7.1.0","ts":"2026-11-28T10:15:00Z","state":"monitoring","power":{"source":"mains","battery_pct":96,"battery_health_pct":88},"temps":{"board_c":41.5},"modules":[],"tech_alarms":[],"counters":{"power_on_hours":1,"nibp_cycles":2},"patient":{"mrn":"MRN0012931","name":"ZHANG San"}}"#;

#[test]
fn firmware_and_schema_must_agree() {
    let set = ProfileSet::builtin().unwrap();
    let read = mqtt::decode(&set, VM, V7_DOC.as_bytes()).unwrap();
    assert_eq!(read.identity.firmware, "7.1.0");
    assert_eq!(read.profile.doc.device.firmware, "7.x");
    assert!(!format!("{:?}", read.snapshot).contains("ZHANG"));

    // 7.x firmware with the 6.x document: an error, not a guess.
    let mixed = V7_DOC.replace("vistara.status/2", "vistara.status/1");
    let err = mqtt::decode(&set, VM, mixed.as_bytes()).unwrap_err();
    assert!(matches!(err, TransportError::Decode(_)), "{err}");
    assert!(err.to_string().contains("vistara.status/1"), "{err}");

    // Unsupported firmware.
    let v9 = V7_DOC.replace("\"7.1.0\"", "\"9.0.0\"");
    let err = mqtt::decode(&set, VM, v9.as_bytes()).unwrap_err();
    assert!(matches!(err, TransportError::Select(_)), "{err}");

    // Garbage, huge and hostile documents are errors, never panics.
    for bad in [
        &b"not json"[..],
        b"[]",
        b"{}",
        b"{\"fw\": 7}",
        &vec![b'['; 20_000][..],
    ] {
        assert!(mqtt::decode(&set, VM, bad).is_err());
    }
}

#[test]
fn broker_urls() {
    let u = mqtt::parse_broker("mqtt://127.0.0.1:1883").unwrap();
    assert_eq!((u.host(), u.port(), u.is_tls()), ("127.0.0.1", 1883, false));
    // A device on a TLS broker is read over TLS (it was refused before tend-mqtt).
    let u = mqtt::parse_broker("mqtts://[::1]:8884").unwrap();
    assert_eq!((u.host(), u.port(), u.is_tls()), ("::1", 8884, true));
    // One grammar for every broker URL: no bare host, no other scheme.
    for bad in [
        "broker.local",
        "tcp://[::1]:1884",
        "http://h",
        "mqtt://",
        "mqtt://h:port",
        "mqtt://u@h:1",
    ] {
        assert!(mqtt::parse_broker(bad).is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_status_is_dropped_unparsed_then_a_good_one_is_read() {
    let b = broker();
    let serial = "VM12-TEST0001";
    let topic = format!("vistara/{serial}/status");
    let set = ProfileSet::builtin().unwrap();
    let src = MqttSource {
        broker: b.url(),
        serial: serial.into(),
        username: None,
        password: None,
        ca_file: None,
    };
    let reader =
        tokio::spawn(
            async move { mqtt::read_status(&src, &set, VM, Duration::from_secs(8)).await },
        );

    let mut opts = MqttOptions::new("oversize-publisher", "127.0.0.1", b.port());
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(opts, 64);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    // 20 KiB, over the manual's 16 KiB; it would decode if parsed.
    let huge = format!(
        "{}{}",
        &V7_DOC[..V7_DOC.len() - 1],
        format_args!(",\"pad\":\"{}\"}}", "x".repeat(20 * 1024))
    );
    for i in 0..40 {
        let payload = if i < 15 {
            huge.clone()
        } else {
            V7_DOC.to_string()
        };
        client
            .publish(&topic, QoS::AtMostOnce, false, payload)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        if reader.is_finished() {
            break;
        }
    }
    let r = reader.await.unwrap().unwrap();
    pump.abort();
    assert_eq!(r.read.identity.firmware, "7.1.0");
    assert!(r.stats.oversize >= 1, "{:?}", r.stats);
    assert_ne!(r.presence, Some(Presence::Offline));
}

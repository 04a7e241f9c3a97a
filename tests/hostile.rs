//! Hostile input at the gateway (DESIGN §5 "Bad input never panics and never loses other
//! data"): while a real agent sends the records of two simulated ventilators, another
//! MQTT client (logged in as `agent-evil`: the embedded broker admits enrolled agents
//! only) publishes on the agents' topics (`tend/v1/<agent>/up`, `.../status`,
//! `.../diag/resp`), each message twice: as it is (unsigned: refused before it is
//! decoded) and sealed with the key of a second enrolled agent (`agent-evil`: a
//! compromised or broken agent, whose messages do reach the decoder): garbage bytes, empty and truncated JSON, JSON that is not an object,
//! 10,000 levels of nesting (also inside a record's evidence), a payload just over the
//! gateway's 4 MiB limit and one of 10 MiB, the wrong wire version, a batch naming
//! another agent than its topic (the real agent's, with its seqs: accepted, it would make
//! the gateway drop the real records as duplicates; refused as `wrong_agent`), a batch on
//! the real agent's topic sealed with the evil agent's key (`bad_signature`), one from an
//! agent never enrolled (`unknown_agent`), seqs 0 and u64::MAX, timestamps at
//! the ends of the representable range (a fault episode opening in the year 9999 on a
//! fleet device, so SLA deadlines fall past the end of time), unknown devices, a 100 KB
//! device id, a batch of 10,000 records, an invalid topic level.
//!
//! Proves: the gateway process stays up and its API answers (also about the device the
//! absurd records named), the malformed-message counter rises (the sealed copies), the
//! unsigned copies are refused as `unsigned` in `tend_gateway_rejected_messages_total`,
//! no panic is logged, and
//! every record of the real agent arrives exactly once and is acknowledged (its outbox
//! empties). Run once against the embedded broker (which itself refuses the 10 MiB
//! payload) and once against Mosquitto (which passes it on, also retained).

mod common;

use common::*;
use jiff::{SignedDuration, Timestamp};
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tend_profiles::{FaultClass, SignalKind};
use tend_wire::{
    encode, seal, AgentKey, EpisodeChange, EpisodeEvent, Purpose, Record, RecordBody, UpBatch,
    WireReading, MAX_MESSAGE,
};

const REAL: &str = "agent-real";
const EVIL: &str = "agent-evil";

fn batch(agent: &str, records: Vec<Record>) -> Vec<u8> {
    encode(&UpBatch {
        v: 1,
        agent: agent.into(),
        incarnation: "e0".into(),
        site: "s-main".into(),
        sent_at: jiff::Timestamp::now(),
        oldest: None,
        records,
    })
    .unwrap()
}

fn readings(seq: u64, at: Timestamp, device: &str) -> Record {
    Record {
        seq,
        at,
        device: device.into(),
        body: RecordBody::Readings {
            readings: vec![WireReading {
                name: "pressure".into(),
                value: tend_profiles::Value::Num(seq as f64),
                unit: Some("kPa".into()),
            }],
        },
    }
}

fn episode(seq: u64, at: Timestamp, device: &str, evidence: serde_json::Value) -> Record {
    Record {
        seq,
        at,
        device: device.into(),
        body: RecordBody::Episode(EpisodeEvent {
            episode: format!("{EVIL}/{device}/ALM1.4/{seq}"),
            change: EpisodeChange::Opened,
            code: "ALM1.4".into(),
            kind: SignalKind::Fault,
            class: Some(FaultClass::Major),
            description: "exhalation valve fault".into(),
            action: None,
            evidence: BTreeMap::from([("x".to_string(), evidence)]),
            device_available: false,
            opened_at: at,
            due: None,
            opening: None,
        }),
    }
}

fn state(seq: u64, at: Timestamp, device: &str, down: bool) -> Record {
    use tend_profiles::DeviceState::{Down, Up};
    Record {
        seq,
        at,
        device: device.into(),
        body: if down {
            RecordBody::State { from: Up, to: Down }
        } else {
            RecordBody::State { from: Down, to: Up }
        },
    }
}

/// Every hostile message: (topic, payload, retained, what).
fn hostile_messages(round: u64, rng: &mut Rng) -> Vec<(String, Vec<u8>, bool, &'static str)> {
    let up = |a: &str| format!("tend/v1/{a}/up");
    let status = |a: &str| format!("tend/v1/{a}/status");
    let diag = |a: &str| format!("tend/v1/{a}/diag/resp");
    let now = Timestamp::now();
    let base = 1_000_000 * (round + 1);
    let garbage: Vec<u8> = (0..1024).map(|_| rng.next_u64() as u8).collect();
    let valid = batch(
        EVIL,
        (0..20)
            .map(|i| readings(base + i, now, "ghost-1"))
            .collect(),
    );
    let deep_arrays = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes();
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)).into_bytes();
    let deep_value: serde_json::Value = {
        // Built as text: serde_json's own recursion limit refuses it when parsed.
        let text = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        serde_json::Value::String(text)
    };
    let deep_in_evidence = {
        let b = batch(EVIL, vec![episode(base + 100, now, "ghost-2", deep_value)]);
        // The evidence as real nesting, not a string.
        let s = String::from_utf8(b).unwrap();
        let nested = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        s.replacen(
            &format!("\"{}1{}\"", "[".repeat(10_000), "]".repeat(10_000)),
            &nested,
            1,
        )
        .into_bytes()
    };
    let mut wrong_version: serde_json::Value =
        serde_json::from_slice(&batch(EVIL, vec![readings(base + 200, now, "ghost-1")])).unwrap();
    wrong_version["v"] = json!(2);
    let mut version_text = wrong_version.clone();
    version_text["v"] = json!("1");
    let mut negative_seq = wrong_version.clone();
    negative_seq["v"] = json!(1);
    negative_seq["records"][0]["seq"] = json!(-1);
    let mut float_seq = negative_seq.clone();
    float_seq["records"][0]["seq"] = json!(1e30);
    let mut bad_time = negative_seq.clone();
    bad_time["records"][0]["seq"] = json!(base + 201);
    bad_time["records"][0]["at"] = json!("year 10000");
    // The real agent's id in the body, its first seqs, on another agent's topic; and the
    // other way round.
    let spoof = batch(
        REAL,
        (1..=200)
            .map(|s| state(s, now, "vent-0", s % 2 == 1))
            .collect(),
    );
    let reverse = batch(
        EVIL,
        (1..=200).map(|s| readings(s, now, "vent-0")).collect(),
    );
    // Absurd seqs and times, on a fleet device the real agent does not poll.
    let absurd = batch(
        EVIL,
        vec![
            readings(0, now, "spare-9"),
            readings(u64::MAX, now, "spare-9"),
            readings(u64::MAX - 1, Timestamp::MAX, "spare-9"),
            state(base + 300, Timestamp::MIN, "spare-9", true),
            state(base + 301, Timestamp::MAX, "spare-9", false),
            state(base + 302, Timestamp::UNIX_EPOCH, "spare-9", true),
            episode(base + 303, Timestamp::MAX, "spare-9", json!(1)),
            episode(base + 304, Timestamp::MIN, "spare-9", json!(f64::MAX)),
            episode(
                base + 305,
                Timestamp::MAX - SignedDuration::from_hours(1),
                "spare-9",
                json!(-1),
            ),
            // The same seq twice in one batch, with two contents.
            readings(base + 306, now, "spare-9"),
            readings(base + 306, now, "ghost-3"),
        ],
    );
    let long_id = batch(EVIL, vec![readings(base + 400, now, &"d".repeat(100_000))]);
    let many = batch(
        EVIL,
        (0..10_000)
            .map(|i| readings(base + 1000 + i, now, &format!("ghost-{}", i % 37)))
            .collect(),
    );
    let mut just_over = vec![b' '; MAX_MESSAGE + 1000];
    just_over[0] = b'{';
    let huge = vec![b'x'; 10 << 20];
    let bad_agent_topic = format!("tend/v1/{}/up", "x".repeat(100));
    vec![
        (up(EVIL), Vec::new(), false, "empty"),
        (up(EVIL), garbage.clone(), false, "garbage"),
        (up(EVIL), b"\xff\xfe\x00\x01{".to_vec(), false, "invalid utf-8"),
        (up(EVIL), valid[..valid.len() / 2].to_vec(), false, "truncated"),
        (up(EVIL), b"123".to_vec(), false, "a number"),
        (up(EVIL), b"null".to_vec(), false, "null"),
        (up(EVIL), b"[]".to_vec(), false, "an array"),
        (up(EVIL), deep_arrays.clone(), false, "10,000 nested arrays"),
        (up(EVIL), deep_objects.clone(), false, "10,000 nested objects"),
        (up(EVIL), deep_in_evidence, false, "nested evidence"),
        (up(EVIL), wrong_version.to_string().into_bytes(), false, "version 2"),
        (up(EVIL), version_text.to_string().into_bytes(), false, "version as text"),
        (up(EVIL), negative_seq.to_string().into_bytes(), false, "seq -1"),
        (up(EVIL), float_seq.to_string().into_bytes(), false, "seq 1e30"),
        (up(EVIL), bad_time.to_string().into_bytes(), false, "bad time"),
        (up(EVIL), spoof, false, "another agent in the body"),
        (up(REAL), reverse, false, "another agent on the real topic"),
        (up(EVIL), absurd, false, "absurd seqs and times"),
        (up(EVIL), long_id, false, "100 KB device id"),
        (up(EVIL), many, false, "10,000 records"),
        (up(EVIL), valid, false, "a valid batch of unknown devices"),
        (up(EVIL), just_over, false, "just over 4 MiB"),
        (bad_agent_topic, b"{}".to_vec(), false, "invalid agent id"),
        (status(EVIL), garbage.clone(), false, "garbage status"),
        (status(EVIL), b"ONLINE".to_vec(), false, "unknown status"),
        (status(EVIL), Vec::new(), true, "empty retained status"),
        (status(EVIL), b"\xff\xff".to_vec(), false, "binary status"),
        (diag(EVIL), garbage, false, "garbage diag answer"),
        (diag(EVIL), deep_objects, false, "nested diag answer"),
        (
            diag(EVIL),
            json!({"v": 1, "id": "no-such-request", "device": "vent-0", "request": "outbox", "ok": true, "answer": {}})
                .to_string()
                .into_bytes(),
            false,
            "an answer nobody asked for",
        ),
        (
            diag(EVIL),
            json!({"v": 9, "id": "x", "device": "vent-0", "request": "outbox", "ok": true})
                .to_string()
                .into_bytes(),
            false,
            "diag version 9",
        ),
        (diag(EVIL), deep_arrays, false, "nested diag arrays"),
        // Retained, just over the limit (the embedded broker takes it), on the topics the
        // real agent subscribes to: it gets them at every (re)connect.
        (
            format!("tend/v1/{REAL}/diag/req"),
            vec![b'{'; MAX_MESSAGE + 10_000],
            true,
            "oversize retained diagnostic request to the real agent",
        ),
        (
            format!("tend/v1/{REAL}/ack"),
            vec![b'{'; MAX_MESSAGE + 10_000],
            true,
            "oversize retained ack to the real agent",
        ),
        // Last: a broker may close the connection on it.
        (status(EVIL), huge.clone(), true, "10 MiB retained status"),
        (up(EVIL), huge, false, "10 MiB batch"),
    ]
}

/// The messages of [`hostile_messages`], each on an agent's inbound topic (batch, status,
/// diagnostic answer) followed by a copy sealed with `key` (the evil agent's) as that
/// topic's agent, so it passes the seal on the evil agent's topics and reaches the
/// decoder; oversize ones stay unsealed (refused for their size first). Also a valid batch
/// of an agent never enrolled, sealed with a made-up key.
fn with_sealed_copies(
    msgs: Vec<(String, Vec<u8>, bool, &'static str)>,
    key: &AgentKey,
) -> Vec<(String, Vec<u8>, bool, &'static str)> {
    let mut out = Vec::new();
    for (topic, payload, retain, what) in msgs {
        let sealed = [REAL, EVIL].iter().find_map(|agent| {
            let rest = topic.strip_prefix(&format!("tend/v1/{agent}/"))?;
            let purpose = match rest {
                "up" => Purpose::Up,
                "status" => Purpose::Status,
                "diag/resp" => Purpose::DiagResp,
                _ => return None,
            };
            (payload.len() <= MAX_MESSAGE).then(|| seal::seal(key, purpose, agent, &payload))
        });
        out.push((topic.clone(), payload, retain, what));
        if let Some(sealed) = sealed {
            out.push((topic, sealed, retain, what));
        }
    }
    let stranger = "agent-stranger";
    let made_up = AgentKey::from_bytes([7; 32]);
    let b = batch(stranger, vec![readings(1, Timestamp::now(), "vent-0")]);
    out.push((
        format!("tend/v1/{stranger}/up"),
        seal::seal(&made_up, Purpose::Up, stranger, &b),
        false,
        "an agent never enrolled",
    ));
    // The huge ones last: a broker may close the connection on them.
    out.sort_by_key(|(_, p, _, _)| p.len() > MAX_MESSAGE * 2);
    out
}

/// `tend_gateway_rejected_messages_total{reason="..."}` in a `/metrics` text.
fn rejected(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        &format!("tend_gateway_rejected_messages_total{{reason=\"{reason}\"}}"),
    )
}

/// The refusals between the metrics `before` and `m`: every round's unsigned copies, and
/// each round's impersonations and stranger. Returns the unsigned ones.
fn assert_refusals(before: &str, m: &str, gw: &GatewayProc) -> f64 {
    let unsigned = rejected(m, "unsigned") - rejected(before, "unsigned");
    assert!(
        unsigned >= 3.0 * 20.0,
        "unsigned refusals rose by {unsigned} only; log:\n{}",
        tail(&gw.log, 30)
    );
    for (reason, what) in [
        (
            "wrong_agent",
            "the evil agent's batches naming the real agent",
        ),
        (
            "bad_signature",
            "the evil agent's seal on the real agent's topic",
        ),
        ("unknown_agent", "a batch of an agent never enrolled"),
    ] {
        let n = rejected(m, reason) - rejected(before, reason);
        assert!(n >= 3.0, "{what}: {reason} rose by {n} only");
    }
    unsigned
}

/// A publisher that reconnects after the broker throws it out, logged in as the evil
/// agent (the embedded broker admits only enrolled agents, each as itself).
async fn publisher(url: &str, key: &AgentKey) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let hostport = url.trim_start_matches("mqtt://");
    let (host, port) = hostport.rsplit_once(':').unwrap();
    let mut opts = MqttOptions::new(EVIL, host, port.parse::<u16>().unwrap());
    opts.set_credentials(EVIL, key.broker_password(EVIL));
    opts.set_max_packet_size(16 << 20, 16 << 20);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 256);
    let task = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    (client, task)
}

async fn hostile(external: bool) {
    let started = Instant::now();
    let mut rng = Rng::from_env("TEND_HOSTILE_SEED");
    let dir = tempfile::tempdir().unwrap();
    let _mosquitto;
    let broker = if external {
        let port = free_port();
        _mosquitto = Some(start_mosquitto(dir.path(), port).await);
        BrokerChoice::External {
            url: format!("mqtt://127.0.0.1:{port}"),
            group: None,
        }
    } else {
        _mosquitto = None;
        BrokerChoice::Embedded(free_port())
    };
    let backend = tend_testkit::backend_standin::spawn(BACKEND_TOKEN)
        .await
        .unwrap();
    let backend_url = backend.url();
    let sims = spawn_sims(2).await;
    let fleet = format!(
        "{}\n[[device]]\nid = \"spare-9\"\nsite = \"s-main\"\nserial = \"AV5C-21-999999\"\nlocation = \"Store room\"\naccepted = \"2025-06-01\"\n",
        sims_fleet(&sims)
    );
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-hostile",
            broker,
            backend: Some(&backend_url),
            fleet: &fleet,
        },
    )
    .await;
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let cfg = agent_dir.join("agent.toml");
    let log = agent_dir.join("agent.log");
    enrol_agent(&gw.config, REAL, &agent_dir);
    let evil_key = enrol_agent(&gw.config, EVIL, &dir.path().join("evil"));
    std::fs::write(&cfg, sims_agent_toml(REAL, &gw.broker_url, &sims, "100ms")).unwrap();
    let mut agent = spawn_agent(agent_bin(), &cfg, &log);
    until_all_up_no_fault(&gw, 2, Duration::from_secs(90)).await;
    let before = gw.metrics().await;
    let malformed_before = metric(&before, "tend_gateway_malformed_messages_total");
    // Three rounds of everything, interleaved with the real agent's traffic and a fault
    // that opens and clears on one of its devices.
    let (evil, evil_task) = publisher(&gw.broker_url, &evil_key).await;
    let mut sent = 0;
    for round in 0..3 {
        if round == 1 {
            sims[0].1.raise(0);
        }
        for (topic, payload, retain, what) in
            with_sealed_copies(hostile_messages(round, &mut rng), &evil_key)
        {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                evil.publish(topic, QoS::AtLeastOnce, retain, payload),
            )
            .await;
            assert!(matches!(r, Ok(Ok(()))), "could not queue {what}: {r:?}");
            sent += 1;
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(
                gw.alive(),
                "the gateway died after {what:?}; log:\n{}",
                tail(&gw.log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    sims[0].1.clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    evil_task.abort();

    // Still up, still answering, also about the device the absurd records named.
    assert!(gw.alive(), "the gateway died; log:\n{}", tail(&gw.log, 40));
    for path in [
        "/api/v1/devices",
        "/api/v1/devices/spare-9",
        "/api/v1/devices/spare-9/availability",
        "/api/v1/devices/spare-9/availability?from=1970-01-01T00:00:00Z&to=2100-01-01T00:00:00Z",
        "/api/v1/devices/ghost-1",
        "/api/v1/devices/vent-0",
        "/api/v1/tickets",
    ] {
        let r = gw.try_get(path).await;
        let (st, v) =
            r.unwrap_or_else(|| panic!("no answer to {path}; log:\n{}", tail(&gw.log, 40)));
        assert_eq!(st, 200, "{path}: {v}");
    }
    let m = gw.metrics().await;
    let malformed = metric(&m, "tend_gateway_malformed_messages_total") - malformed_before;
    // At least the undecodable batches, statuses and answers of each round that no broker
    // refuses (their sealed copies: the unsigned ones never reach the decoder).
    assert!(
        malformed >= 3.0 * 20.0,
        "malformed counter rose by {malformed} only; log:\n{}",
        tail(&gw.log, 30)
    );
    let unsigned = assert_refusals(&before, &m, &gw);

    // The real agent's records: all arrived, once, acknowledged.
    until_all_up_no_fault(&gw, 2, Duration::from_secs(90)).await;
    drain_agent(
        &mut agent,
        &cfg,
        &log,
        sims_agent_toml(REAL, &gw.broker_url, &sims, "1h"),
        &gw,
        &sims[0].0,
        Duration::from_secs(120),
    )
    .await;
    assert!(gw.alive(), "the gateway died; log:\n{}", tail(&gw.log, 40));
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    gw.kill().await;
    let text = gw.log_text();
    assert!(
        !text.contains("panicked"),
        "a panic in the log:\n{}",
        tail(&gw.log, 60)
    );
    let records = assert_delivered(
        &agent_dir.join("data"),
        &dir.path().join("gw/data"),
        REAL,
        false,
    )
    .await;
    use tend_gateway::store::{GatewayStore, RedbStore};
    let store = RedbStore::open(&dir.path().join("gw/data")).unwrap();
    assert!(store.has_record(EVIL, u64::MAX).unwrap());
    println!(
        "hostile summary: broker={} hostile_messages={sent} malformed_counted={malformed} \
         unsigned_refused={unsigned} real_records={records} duration={:.1}s",
        if external { "mosquitto" } else { "embedded" },
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_on_the_embedded_broker_never_crash_nor_cost_the_real_agent_a_record() {
    hostile(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_through_mosquitto_never_crash_nor_cost_the_real_agent_a_record() {
    hostile(true).await;
}

/// Invalid configuration files, for `tend-gateway run`, `tend-gateway check` and
/// `tend-agent run`: each exits with code 2 and a message naming the file and the key
/// (or the line), never a panic and never a start.
#[test]
fn invalid_configs_exit_2_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write_secret(d.join("api.token"), "t0ken-for-the-test\n").unwrap();
    std::fs::write(
        d.join("fleet.toml"),
        fleet_toml(&[FleetDevice {
            id: "icu7-vent",
            serial: "AV5C-21-004417",
            site: "s-main",
            location: "ICU bed 7",
            accepted: "2025-06-01",
        }]),
    )
    .unwrap();
    std::fs::write(
        d.join("bad-fleet.toml"),
        "[[site]]\nid = \"s\"\ncustomer = \"nobody\"\nname = \"x\"\naddress = \"y\"\nservice_area = \"moon\"\n",
    )
    .unwrap();
    let gw_ok = "gateway_id = \"gw\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n[api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n";
    let gateway_cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "\u{0}\u{1}not toml at all [[[".into(), "gateway-garbage.toml"),
        ("unknown key", format!("{gw_ok}speed = 3\n"), "speed"),
        (
            "bad broker url",
            gw_ok.replace("[api]", "[broker]\nurl = \"http://h:1\"\n[api]"),
            "url",
        ),
        (
            "bad duration",
            gw_ok.replace(
                "[api]",
                "[backend]\nurl = \"http://127.0.0.1:9\"\ntoken_file = \"api.token\"\ntimeout = \"soon\"\n[api]",
            ),
            "timeout",
        ),
        ("missing fleet", gw_ok.replace("fleet.toml", "nope.toml"), "fleet"),
        ("bad fleet", gw_ok.replace("fleet.toml", "bad-fleet.toml"), "service_area"),
        ("missing api", "gateway_id = \"gw\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n".into(), "api"),
    ];
    for (what, text, names) in &gateway_cases {
        let file = d.join(format!("gateway-{}.toml", what.replace(' ', "-")));
        std::fs::write(&file, text).unwrap();
        for sub in ["run", "check"] {
            let out = std::process::Command::new(gateway_bin())
                .args([sub, "--config"])
                .arg(&file)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{what} ({sub}): {err}");
            assert!(!err.contains("panicked"), "{what} ({sub}): {err}");
            assert!(
                err.contains(names),
                "{what} ({sub}): the message should name {names:?}: {err}"
            );
            assert!(
                out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains("ready")
            );
        }
    }

    // Credentials: a1's own, another agent's, one open to others, and garbage.
    credentials(d, "a1");
    credentials(d, "b2");
    std::fs::copy(d.join("a1.cred"), d.join("open.cred")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("open.cred"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
    }
    write_secret(d.join("garbage.cred"), "not credentials at all\n").unwrap();
    let agent_ok = "agent_id = \"a1\"\nsite_id = \"s\"\ndata_dir = \"data\"\n[uplink]\nbroker = \"mqtt://127.0.0.1:1\"\ncredentials = \"a1.cred\"\n";
    let agent_cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "\u{0}\u{1}[[[".into(), "agent-garbage.toml"),
        (
            "no credentials",
            agent_ok.replace("credentials = \"a1.cred\"\n", ""),
            "credentials",
        ),
        (
            "missing credentials file",
            agent_ok.replace("a1.cred", "nope.cred"),
            "uplink.credentials",
        ),
        (
            "another agent's credentials",
            agent_ok.replace("a1.cred", "b2.cred"),
            "uplink.credentials",
        ),
        (
            "credentials open to others",
            agent_ok.replace("a1.cred", "open.cred"),
            "uplink.credentials",
        ),
        (
            "garbage credentials",
            agent_ok.replace("a1.cred", "garbage.cred"),
            "uplink.credentials",
        ),
        ("bad agent id", agent_ok.replace("a1", "a/#"), "agent_id"),
        ("bad broker", agent_ok.replace("mqtt://", "tcp://"), "broker"),
        (
            "unknown profile",
            format!("{agent_ok}[[device]]\nid = \"d\"\nprofile = \"acme/none\"\ntransport = \"modbus-tcp\"\naddress = \"127.0.0.1:1\"\n"),
            "profile",
        ),
        (
            "bad poll interval",
            format!("{agent_ok}[[device]]\nid = \"d\"\nprofile = \"aeris/av-500\"\ntransport = \"modbus-tcp\"\naddress = \"127.0.0.1:1\"\npoll_interval = \"often\"\n"),
            "poll_interval",
        ),
        (
            "bad outbox size",
            format!("{agent_ok}[outbox]\nmax_size = \"lots\"\n"),
            "max_size",
        ),
    ];
    for (what, text, names) in &agent_cases {
        let file = d.join(format!("agent-{}.toml", what.replace(' ', "-")));
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(agent_bin())
            .args(["run", "--config"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            err.contains(names),
            "{what}: the message should name {names:?}: {err}"
        );
    }
}

//! The Modbus transport and `probe --transport modbus-tcp|modbus-rtu`: the devsim AV-500
//! (TCP and RTU on a pty, firmware 4.x and 5.x) and HM-2 (TCP, 2.x and 3.x), faults raised
//! in the simulators, busy devices, exceptions, timeouts with a reconnect, refused
//! connections and unsupported firmware.

mod common;

use common::{probe, reading, signal_codes};
use std::net::SocketAddr;
use std::time::Duration;
use tend_agent::transport::modbus::{Endpoint, ModbusBus, UnitPolicy};
use tend_agent::transport::TransportError;
use tend_devsim::{Av500Config, Av500Sim, Hm2Config, Hm2Sim, Version};
use tend_profiles::modbus::{ReadRequest, Table};
use tend_profiles::ProfileSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const AV: &str = "aeris/av-500";
const HM: &str = "cryosense/hm-2";

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_av500_firmware_5_over_tcp() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    let addr = sim.addr().unwrap().to_string();
    let run = probe(&[
        "--profile",
        AV,
        "--transport",
        "modbus-tcp",
        "--address",
        &addr,
        "--unit",
        "1",
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    assert_eq!(v["firmware"], "5.2.1");
    assert_eq!(v["serial"], "AV5C-21-004417");
    assert_eq!(v["profile_firmware"], "5.x");
    // AR-MB-500 §3.5: low word first on 5.x.
    assert_eq!(reading(&v, "operating_minutes"), 1_966_130.0);
    assert_eq!(reading(&v, "turbine_speed"), 23_500.0);
    assert_eq!(reading(&v, "turbine_temperature"), 42.0);
    assert_eq!(v["state"], "up");
    assert!(signal_codes(&v).is_empty(), "{}", v["signals"]);
    // Identity (holding 0-10) and the coalesced plan: at most 32 registers per request.
    assert!(
        v["transport"]["requests"].as_u64().unwrap() <= 3,
        "{}",
        v["transport"]
    );
    assert_eq!(v["transport"]["timeouts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_av500_firmware_4_over_rtu_with_a_fault() {
    let sim = Av500Sim::spawn_rtu_pty(Av500Config::v4()).await.unwrap();
    let port = sim.path().unwrap().display().to_string();
    let args = [
        "--profile",
        AV,
        "--transport",
        "modbus-rtu",
        "--port",
        &port,
        "--baud",
        "19200",
        "--parity",
        "even",
        "--unit",
        "1",
    ];
    let run = probe(&args).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let out = &run.stdout;
    assert!(out.contains("firmware 4.8.3"), "{out}");
    assert!(out.contains("aeris/av-500 4.x"), "{out}");
    // §3.5: high word first on 4.x, same value.
    assert!(out.contains("1966130 min"), "{out}");
    assert!(out.contains("42 °C"), "{out}");
    assert!(out.contains("signals   none active"), "{out}");

    // §3.2 bit 4 (exhalation valve fault, major) in safe state (4): down.
    sim.update(|s| {
        s.alarm_word1 = 1 << 4;
        s.device_state = 4;
    });
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let run = probe(&json_args).await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    let codes = signal_codes(&v);
    assert!(codes.contains(&"ALM1.4".to_string()), "{codes:?}");
    assert!(codes.contains(&"SAFE_STATE".to_string()), "{codes:?}");
    let alm = v["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"] == "ALM1.4")
        .unwrap();
    assert_eq!(alm["class"], "major");
    assert!(alm["description"]
        .as_str()
        .unwrap()
        .contains("exhalation valve"));
    assert_eq!(v["state"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_hm2_both_word_orders_and_a_compressor_fault() {
    for (cfg, fw, family) in [
        (Hm2Config::v2(), "2.7", "2.x"),
        (Hm2Config::v3(), "3.5", "3.x"),
    ] {
        let sim = Hm2Sim::spawn_tcp(cfg, any_port()).await.unwrap();
        let addr = sim.addr().to_string();
        let args = [
            "--profile",
            HM,
            "--transport",
            "modbus-tcp",
            "--address",
            &addr,
            "--json",
        ];
        let run = probe(&args).await;
        assert_eq!(run.code, 0, "{}", run.all());
        let v = run.json();
        assert_eq!(v["firmware"], fw);
        assert_eq!(v["profile_firmware"], family);
        let level = reading(&v, "helium_level").as_f64().unwrap();
        assert!((level - 71.5).abs() < 1e-4, "{level}");
        let k = reading(&v, "cold_head_temperature").as_f64().unwrap();
        assert!((k - 4.2).abs() < 1e-4, "{k}");
        assert_eq!(v["state"], "up");

        // CS-HM2-MB §4: compressor state 2 (alarm bit 3) makes the magnet's cooling down.
        sim.update(|s| s.compressor = 2);
        let run = probe(&args).await;
        assert_eq!(run.code, 0, "{}", run.all());
        let v = run.json();
        let codes = signal_codes(&v);
        assert!(codes.contains(&"ALM.3".to_string()), "{fw}: {codes:?}");
        assert_eq!(v["state"], "down", "{fw}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_ventilator_is_retried_after_backing_off() {
    let set = ProfileSet::builtin().unwrap();
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    sim.boot(Duration::from_millis(1500));
    let mut bus = ModbusBus::new(Endpoint::Tcp(sim.addr().unwrap().to_string()));
    let read = bus.read_once(1, &set, AV, None).await.unwrap();
    assert_eq!(read.identity.firmware, "5.2.1");
    let st = bus.stats(1);
    assert!(st.exceptions.get(&6).copied().unwrap_or(0) >= 1, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_a_booting_ventilator_fails_naming_busy() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    sim.boot(Duration::from_secs(60));
    let addr = sim.addr().unwrap().to_string();
    let run = probe(&[
        "--profile",
        AV,
        "--transport",
        "modbus-tcp",
        "--address",
        &addr,
        "--timeout",
        "1s",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("timeout"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_read_is_an_exception_error_naming_the_code() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    let mut bus = ModbusBus::new(Endpoint::Tcp(sim.addr().unwrap().to_string()));
    let set = ProfileSet::builtin().unwrap();
    let profile = set.select(AV, "5.2.1").unwrap();
    let policy = UnitPolicy::from_profile(&profile);
    // AR-MB-500 §2: holding 13-99 are not mapped.
    let err = bus
        .read(
            1,
            ReadRequest {
                table: Table::Holding,
                start: 20,
                count: 2,
            },
            &policy,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Exception { code: 2, .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("0x02") && msg.contains("illegal data address"),
        "{msg}"
    );
    // §1: more than 32 registers is 0x03.
    let err = bus
        .read(
            1,
            ReadRequest {
                table: Table::Input,
                start: 0,
                count: 40,
            },
            &policy,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("0x03"), "{err}");
    assert_eq!(bus.stats(1).exceptions.get(&2), Some(&1));
    // The link stays usable after exceptions.
    let ok = bus
        .read(
            1,
            ReadRequest {
                table: Table::Holding,
                start: 0,
                count: 3,
            },
            &policy,
        )
        .await
        .unwrap();
    assert_eq!(ok, vec![5, 2, 1]);
}

/// A Modbus TCP "device" whose every answer is `answer(request header, request PDU)`:
/// one that answers with exceptions, or (a device or a man in the middle) out of turn or
/// with a malformed frame. An empty answer is silence.
async fn answering_server(
    answer: impl Fn([u8; 7], &[u8]) -> Vec<u8> + Send + Sync + 'static,
) -> SocketAddr {
    let answer = std::sync::Arc::new(answer);
    let l = TcpListener::bind(any_port()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut hdr = [0u8; 7];
                while s.read_exact(&mut hdr).await.is_ok() {
                    let len = u16::from_be_bytes([hdr[4], hdr[5]]) as usize;
                    let mut pdu = vec![0u8; len.saturating_sub(1)];
                    if s.read_exact(&mut pdu).await.is_err() {
                        return;
                    }
                    if s.write_all(&answer(hdr, &pdu)).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A Modbus TCP device that answers every request with exception `code`.
async fn exception_server(code: u8) -> SocketAddr {
    answering_server(move |hdr, pdu| {
        let fc = pdu.first().copied().unwrap_or(0);
        vec![hdr[0], hdr[1], 0, 0, 0, 3, hdr[6], fc | 0x80, code]
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_reports_exceptions_with_exit_1() {
    let addr = exception_server(0x04).await.to_string();
    let run = probe(&[
        "--profile",
        HM,
        "--transport",
        "modbus-tcp",
        "--address",
        &addr,
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("exception 0x04"), "{}", run.stderr);
    assert!(
        run.stderr.contains("server device failure"),
        "{}",
        run.stderr
    );
}

/// A proxy in front of `target` that swallows the first connection's requests (a device
/// that stops answering mid-session) and forwards every later connection.
async fn swallow_first_connection(target: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(any_port()).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut s, _)) = l.accept().await {
            n += 1;
            if n == 1 {
                tokio::spawn(async move {
                    let mut sink = [0u8; 256];
                    while matches!(s.read(&mut sink).await, Ok(k) if k > 0) {}
                });
                continue;
            }
            tokio::spawn(async move {
                if let Ok(mut up) = TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_reconnects_and_the_read_succeeds() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v4(), any_port())
        .await
        .unwrap();
    let proxy = swallow_first_connection(sim.addr().unwrap()).await;
    let set = ProfileSet::builtin().unwrap();
    let mut bus = ModbusBus::new(Endpoint::Tcp(proxy.to_string()));
    let read = bus
        .read_once(1, &set, AV, Some(Duration::from_millis(200)))
        .await
        .unwrap();
    assert_eq!(read.identity.firmware, "4.8.3");
    let st = bus.stats(1);
    assert_eq!(st.timeouts, 1, "{st:?}");
    assert_eq!(st.reconnects, 1, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_silent_unit_times_out_and_refused_connection_is_named() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    sim.set_silent(true);
    let addr = sim.addr().unwrap().to_string();
    let run = probe(&[
        "--profile",
        AV,
        "--transport",
        "modbus-tcp",
        "--address",
        &addr,
        "--reply-timeout",
        "200ms",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("timeout"), "{}", run.stderr);
    assert!(run.stderr.contains("unit 1"), "{}", run.stderr);

    // Nothing listens on a port just released.
    let free = TcpListener::bind(any_port())
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let run = probe(&[
        "--profile",
        AV,
        "--transport",
        "modbus-tcp",
        "--address",
        &free,
        "--json",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("cannot connect"), "{}", run.stderr);
    assert!(
        run.stderr.to_lowercase().contains("refused"),
        "{}",
        run.stderr
    );
    assert_eq!(run.json()["ok"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_firmware_is_a_clear_error() {
    let sim = Av500Sim::spawn_tcp(
        Av500Config::new(Version::new(6, 0, 1), "AV6X-25-000001"),
        any_port(),
    )
    .await
    .unwrap();
    let addr = sim.addr().unwrap().to_string();
    let run = probe(&[
        "--profile",
        AV,
        "--transport",
        "modbus-tcp",
        "--address",
        &addr,
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("6.0.1"), "{}", run.stderr);
    assert!(run.stderr.contains("no profile covers"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_timeout_reopens_the_port_and_recovers() {
    let sim = Av500Sim::spawn_rtu_pty(Av500Config::v5()).await.unwrap();
    let path = sim.path().unwrap().display().to_string();
    let set = ProfileSet::builtin().unwrap();
    let profile = set.select(AV, "5.2.1").unwrap();
    let mut policy = UnitPolicy::from_profile(&profile);
    policy.timeout = Duration::from_millis(200);
    let mut bus = ModbusBus::new(Endpoint::Rtu {
        path,
        baud: 19200,
        parity: tend_profiles::schema::Parity::Even,
    });
    let req = ReadRequest {
        table: Table::Holding,
        start: 0,
        count: 3,
    };
    sim.set_silent(true);
    let err = bus.read(1, req, &policy).await.unwrap_err();
    assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    assert_eq!(bus.stats(1).timeouts, 2);
    sim.set_silent(false);
    assert_eq!(bus.read(1, req, &policy).await.unwrap(), vec![5, 2, 1]);
    let st = bus.stats(1);
    assert!(st.reconnects >= 2, "{st:?}");
    // Another unit on the same bus answers nothing: its timeout is its own.
    assert!(bus.read(7, req, &policy).await.is_err());
    assert_eq!(bus.stats(7).timeouts, 2);
    assert_eq!(bus.read(1, req, &policy).await.unwrap(), vec![5, 2, 1]);
}

/// The answer a misbehaving device gives to a request with this MBAP header.
type Answer = fn([u8; 7]) -> Vec<u8>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_that_are_not_the_answer_are_refused_naming_why() {
    let req = ReadRequest {
        table: Table::Holding,
        start: 0,
        count: 2,
    };
    let policy = UnitPolicy {
        timeout: Duration::from_millis(300),
        request_gap: Duration::ZERO,
        busy_exception: None,
        busy_retry: Duration::ZERO,
        max_busy: 0,
        attempts: 2,
    };
    let cases: [(Answer, &str); 5] = [
        // The answer to another transaction (a late reply to an earlier request).
        (
            |h| vec![h[0], h[1] ^ 1, 0, 0, 0, 7, h[6], 3, 4, 0, 1, 0, 2],
            "answer to transaction",
        ),
        // From another unit.
        (
            |h| vec![h[0], h[1], 0, 0, 0, 7, h[6] + 1, 3, 4, 0, 1, 0, 2],
            "answer from unit",
        ),
        // One register where two were asked.
        (
            |h| vec![h[0], h[1], 0, 0, 0, 5, h[6], 3, 2, 0, 1],
            "2 data bytes for 2 registers",
        ),
        // A header claiming 65,535 bytes follow.
        (
            |h| vec![h[0], h[1], 0, 0, 0xFF, 0xFF, h[6], 3],
            "frame length 65535",
        ),
        // Not Modbus at all.
        (
            |_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(),
            "protocol id",
        ),
    ];
    for (reply, says) in cases {
        let addr = answering_server(move |hdr, _| reply(hdr)).await;
        let mut bus = ModbusBus::new(Endpoint::Tcp(addr.to_string()));
        let err = bus.read(1, req, &policy).await.unwrap_err();
        assert!(matches!(err, TransportError::Protocol(_)), "{err:?}");
        assert!(err.to_string().contains(says), "{says}: {err}");
        assert!(
            err.to_string().contains("unit 1 holding registers 0..1"),
            "{err}"
        );
        // Each refused answer dropped the link: the retry came on a new connection.
        let st = bus.stats(1);
        assert_eq!((st.requests, st.reconnects), (2, 1), "{says}: {st:?}");
    }
    // A link closed by the other end mid-request is an I/O error naming the endpoint.
    let addr = answering_server(|_, _| Vec::new()).await;
    let l = TcpListener::bind(any_port()).await.unwrap();
    let closing = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    let mut bus = ModbusBus::new(Endpoint::Tcp(closing.to_string()));
    let err = bus.read(1, req, &policy).await.unwrap_err();
    assert!(matches!(err, TransportError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&closing.to_string()), "{err}");
    // Silence (the server reads and never answers) is a timeout, not a hang.
    let mut bus = ModbusBus::new(Endpoint::Tcp(addr.to_string()));
    let err = bus.read(1, req, &policy).await.unwrap_err();
    assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_of_one_rtu_bus_each_answer_for_themselves() {
    // Three ventilators on one RS-485 bus (the bench's `bus` layout, smaller); the second
    // is silent (switched off), and its timeout must not cost the others their reads.
    let cfgs: Vec<Av500Config> = (1..=3u8)
        .map(|unit| {
            let mut c = Av500Config::v5();
            c.unit = unit;
            c.serial = format!("AV5C-21-00000{unit}");
            c
        })
        .collect();
    let bus_sim = Av500Sim::spawn_rtu_bus(cfgs).await.unwrap();
    let tend_devsim::av500::Endpoint::Pty(path) = bus_sim.endpoint() else {
        panic!("a bus on a pty");
    };
    bus_sim.units()[1].1.update(|s| s.silent = true);
    let set = ProfileSet::builtin().unwrap();
    let mut bus = ModbusBus::new(Endpoint::Rtu {
        path: path.display().to_string(),
        baud: 19200,
        parity: tend_profiles::schema::Parity::Even,
    });
    for round in 0..2 {
        for unit in [1u8, 3] {
            let read = bus
                .read_once(unit, &set, AV, Some(Duration::from_millis(200)))
                .await
                .unwrap_or_else(|e| panic!("round {round} unit {unit}: {e}"));
            assert_eq!(
                read.identity.serial.as_deref(),
                Some(format!("AV5C-21-00000{unit}").as_str())
            );
        }
        let err = bus
            .read_once(2, &set, AV, Some(Duration::from_millis(200)))
            .await
            .unwrap_err();
        assert!(matches!(err, TransportError::Timeout { .. }), "{err}");
    }
    assert_eq!(bus.stats(1).timeouts, 0);
    assert_eq!(bus.stats(3).timeouts, 0);
    assert_eq!(bus.stats(2).timeouts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_counters_are_read_once_a_minute_and_afresh_after_a_failure() {
    let sim = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    let set = ProfileSet::builtin().unwrap();
    let mut bus = ModbusBus::new(Endpoint::Tcp(sim.addr().unwrap().to_string()));
    let (_, profile) = bus.identify(1, &set, AV, None).await.unwrap();
    let pm_days = |s: &tend_profiles::Snapshot| s.values["pm_days"].as_f64().unwrap();
    let before = sim.state().days_since_pm as f64;
    let requests = |bus: &ModbusBus| bus.stats(1).requests;

    // First poll: the input registers and the counters (holding 11-12).
    let r0 = requests(&bus);
    let s = bus.poll(1, &profile, None).await.unwrap();
    assert_eq!(requests(&bus) - r0, 2);
    assert_eq!(pm_days(&s), before);

    // Within the minute only the input registers are read; the counters' last answer
    // stands in the snapshot (a day counter that changed is seen at the next minute).
    sim.update(|s| {
        s.days_since_pm += 7;
        s.error_code = 1021;
    });
    for _ in 0..3 {
        let r = requests(&bus);
        let s = bus.poll(1, &profile, None).await.unwrap();
        assert_eq!(requests(&bus) - r, 1);
        assert_eq!(pm_days(&s), before);
        assert_eq!(s.values["error_code"].as_f64(), Some(1021.0));
    }

    // A failed poll forgets everything: the next one reads the counters again.
    sim.set_silent(true);
    let failed = bus
        .poll(1, &profile, Some(Duration::from_millis(100)))
        .await;
    assert!(failed.is_err(), "{failed:?}");
    sim.set_silent(false);
    let r = requests(&bus);
    let s = bus.poll(1, &profile, None).await.unwrap();
    assert_eq!(requests(&bus) - r, 2);
    assert_eq!(pm_days(&s), before + 7.0);

    // So does identifying the unit again (another device may answer at its address).
    let s = bus.poll(1, &profile, None).await.unwrap();
    assert_eq!(pm_days(&s), before + 7.0);
    sim.update(|s| s.days_since_pm = 0);
    let (_, profile) = bus.identify(1, &set, AV, None).await.unwrap();
    let r = requests(&bus);
    let s = bus.poll(1, &profile, None).await.unwrap();
    assert_eq!(requests(&bus) - r, 2);
    assert_eq!(pm_days(&s), 0.0);
}

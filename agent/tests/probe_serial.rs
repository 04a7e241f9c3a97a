//! The LIP-300 serial transport and `probe --transport serial`, over real ptys: against
//! the devsim pump (both firmware families, faults, noise, booting, silence) and against
//! small scripted fakes for the negative replies and a late reply.

mod common;

use common::{assert_no_phi, probe, reading, signal_codes};
use std::time::Duration;
use tend_agent::transport::serial::SerialDevice;
use tend_agent::transport::TransportError;
use tend_devsim::lip300::Mode;
use tend_devsim::{Lip300Config, Lip300Sim, Noise};
use tend_profiles::serial_frame::{encode, Checksum, FrameEvent, FrameReader};
use tend_profiles::ProfileSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPort, SerialStream};

const MODEL: &str = "lumen/lip-300";
const PIDS: &[&str] = &["P-0048213", "P-0051877", "PID"];

fn path(h: &tend_devsim::Lip300Handle) -> String {
    h.path().display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_lip300_firmware_2_healthy() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v2()).await.unwrap();
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "serial",
        "--port",
        &path(&sim),
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let out = &run.stdout;
    assert!(out.contains("firmware 2.4.1"), "{out}");
    assert!(out.contains("serial LP3A-2207-0193"), "{out}");
    assert!(out.contains("lumen/lip-300 2.x"), "{out}");
    assert!(out.contains("INFUSING"), "{out}");
    assert!(out.contains("battery") && out.contains("87 %"), "{out}");
    assert!(out.contains("state     up"), "{out}");
    assert_no_phi(&run.all(), PIDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_lip300_firmware_3_fault_shows_up_in_json() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    // LM-SDI-300 §8: bits 1 and 16, error 240.
    sim.update(|s| {
        s.mode = Mode::Alarm;
        s.talm = (1 << 1) | (1 << 16);
        s.err = 240;
        s.temp = 38.0;
    });
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "serial",
        "--port",
        &path(&sim),
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    assert_eq!(v["firmware"], "3.1.0");
    assert_eq!(v["serial"], "LP3B-2403-0457");
    assert_eq!(v["profile_firmware"], "3.x");
    assert_eq!(reading(&v, "temperature"), 38.0);
    assert_eq!(reading(&v, "error_code"), 240.0);
    let codes = signal_codes(&v);
    for c in ["ERR.240", "TALM.1", "TALM.16"] {
        assert!(codes.contains(&c.to_string()), "{c} missing: {codes:?}");
    }
    let talm1 = v["signals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["code"] == "TALM.1")
        .unwrap();
    assert_eq!(talm1["class"], "complex");
    assert_eq!(talm1["kind"], "fault");
    assert!(talm1["description"].as_str().unwrap().contains("pressure"));
    assert_no_phi(&run.all(), PIDS);

    // The fault clears on the device: the next probe sees it gone, and FAILSAFE is down.
    sim.update(|s| {
        s.talm = 0;
        s.err = 0;
        s.mode = Mode::Failsafe;
    });
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "serial",
        "--port",
        &path(&sim),
        "--json",
    ])
    .await;
    assert_eq!(run.code, 0, "{}", run.all());
    let v = run.json();
    let codes = signal_codes(&v);
    assert!(!codes.iter().any(|c| c.starts_with("TALM")), "{codes:?}");
    assert!(codes.contains(&"FAILSAFE".to_string()), "{codes:?}");
    assert_eq!(v["state"], "down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_recovers_from_noise_and_half_frames() {
    let set = ProfileSet::builtin().unwrap();
    for (cfg, noise) in [
        (Lip300Config::v3(), Noise::Mixed),
        (Lip300Config::v2(), Noise::HalfFrame),
        (Lip300Config::v3(), Noise::Garbage),
    ] {
        let sim = Lip300Sim::spawn_pty(cfg).await.unwrap();
        sim.set_noise(noise);
        let mut dev = SerialDevice::open(&path(&sim), None, &set, MODEL).unwrap();
        let read = dev.read_once(&set, MODEL).await.unwrap();
        assert_eq!(
            read.snapshot.values["mode"],
            tend_profiles::Value::Text("INFUSING".into())
        );
        assert!(read.snapshot.values.contains_key("pump_cycles"));
        let st = dev.stats();
        assert_eq!(st.timeouts, 0, "{noise:?}: {st:?}");
        assert!(
            st.noise_bytes > 0 || st.rejected_frames > 0,
            "{noise:?}: the noise was not seen: {st:?}"
        );
        // A diagnostic the profile lists, through the same noise.
        let selftest = dev.diagnostic(&read.profile, "selftest").await.unwrap();
        assert_eq!(selftest.get("RESULT").map(String::as_str), Some("PASS"));
        assert!(dev.diagnostic(&read.profile, "reset").await.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_backs_off_while_busy_then_reads() {
    let set = ProfileSet::builtin().unwrap();
    let sim = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    sim.boot(Duration::from_millis(1200));
    let mut dev = SerialDevice::open(&path(&sim), None, &set, MODEL).unwrap();
    let read = dev.read_once(&set, MODEL).await.unwrap();
    assert_eq!(read.identity.firmware, "3.1.0");
    assert!(dev.stats().negative.get("BUSY").copied().unwrap_or(0) >= 1);
    // After identification the 3.x profile's CRC form is used.
    assert_eq!(dev.checksum(), Checksum::Crc16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_silent_pump_times_out_with_exit_1() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v2()).await.unwrap();
    sim.set_silent(true);
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "serial",
        "--port",
        &path(&sim),
        "--reply-timeout",
        "200ms",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("timeout"), "{}", run.stderr);
    assert!(run.stderr.contains("Q|INFO"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_bad_arguments_exit_2() {
    // No port.
    let run = probe(&["--profile", MODEL, "--transport", "serial"]).await;
    assert_eq!(run.code, 2, "{}", run.all());
    assert!(run.stderr.contains("--port"), "{}", run.stderr);
    // Wrong transport for the profile.
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "modbus-tcp",
        "--address",
        "127.0.0.1:1",
    ])
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    // Unknown profile.
    let run = probe(&[
        "--profile",
        "acme/none",
        "--transport",
        "serial",
        "--port",
        "/dev/null",
    ])
    .await;
    assert_eq!(run.code, 2, "{}", run.all());
    // clap's own errors.
    let run = probe(&["--profile", MODEL, "--transport", "carrier-pigeon"]).await;
    assert_eq!(run.code, 2, "{}", run.all());
    // A port that does not exist is a device that cannot be read.
    let run = probe(&[
        "--profile",
        MODEL,
        "--transport",
        "serial",
        "--port",
        "/dev/does-not-exist",
    ])
    .await;
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.stderr.contains("cannot open"), "{}", run.stderr);
}

// ------------------------------------------------------------------ scripted fakes

/// A fake pump on a pty: answers each request body with `answer(body, n)`, which gives a
/// delay and a reply frame (or nothing). Returns the path the client opens.
fn fake_pump<F>(answer: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: Fn(&str, usize) -> Option<(Duration, Vec<u8>)> + Send + 'static,
{
    let (mut master, slave) = SerialStream::pair().unwrap();
    let path = slave.name().unwrap();
    let task = tokio::spawn(async move {
        // Held open so that the client's close is not a hang-up for the master.
        let _slave = slave;
        let mut reader = FrameReader::new();
        let mut buf = [0u8; 256];
        let mut n = 0usize;
        loop {
            let k = match master.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Ok(k) => k,
            };
            for ev in reader.push(&buf[..k]) {
                if let FrameEvent::Frame(f) = ev {
                    if let Some((delay, reply)) = answer(&f.body, n) {
                        tokio::time::sleep(delay).await;
                        let _ = master.write_all(&reply).await;
                    }
                    n += 1;
                }
            }
        }
    });
    (path, task)
}

fn info_v2() -> Vec<u8> {
    encode(
        "A|INFO|MODEL=LIP-300|SN=LP3A-2207-0193|FW=2.4.1|HW=C",
        Checksum::Xor,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_replies_are_clear_errors() {
    let set = ProfileSet::builtin().unwrap();
    let (p, task) = fake_pump(|_, _| {
        Some((
            Duration::ZERO,
            encode("N|ERR=CHECKSUM", Checksum::Xor).unwrap(),
        ))
    });
    let mut dev = SerialDevice::open(&p, None, &set, MODEL).unwrap();
    let err = dev.read_once(&set, MODEL).await.unwrap_err();
    assert!(
        matches!(&err, TransportError::Negative { code, .. } if code == "CHECKSUM"),
        "{err}"
    );
    assert!(err.to_string().contains("checksum"), "{err}");
    task.abort();

    let (p, task) = fake_pump(|body, _| {
        let reply = if body == "Q|INFO" {
            info_v2()
        } else {
            encode("N|ERR=UNKNOWN_CMD", Checksum::Xor).unwrap()
        };
        Some((Duration::ZERO, reply))
    });
    let mut dev = SerialDevice::open(&p, None, &set, MODEL).unwrap();
    let err = dev.read_once(&set, MODEL).await.unwrap_err();
    assert!(err.to_string().contains("UNKNOWN_CMD"), "{err}");
    assert!(err.to_string().contains("Q|STATUS"), "{err}");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reply_does_not_poison_the_next_request() {
    let set = ProfileSet::builtin().unwrap();
    let status = |batt: u32| {
        encode(
            &format!("A|STATUS|MODE=IDLE|RATE=0.0|VTBI=0|BATT={batt}|AC=1|TALM=0000|CALM=0000|ERR=0|PID=P-0048213"),
            Checksum::Xor,
        )
        .unwrap()
    };
    let (p, task) = fake_pump(move |body, n| match body {
        "Q|INFO" => Some((Duration::ZERO, info_v2())),
        // The first STATUS is answered after the 500 ms timeout; the retry at once.
        "Q|STATUS" if n == 1 => Some((Duration::from_millis(700), status(11))),
        "Q|STATUS" => Some((Duration::ZERO, status(22))),
        "Q|COUNTERS" => Some((
            Duration::ZERO,
            encode(
                "A|COUNTERS|RUNH=10422|PUMPCYC=8830211|DOORCYC=3120|LASTPM=2026-06-02",
                Checksum::Xor,
            )
            .unwrap(),
        )),
        _ => None,
    });
    let mut dev = SerialDevice::open(&p, None, &set, MODEL).unwrap();
    let read = dev.read_once(&set, MODEL).await.unwrap();
    let v = &read.snapshot.values;
    assert!(matches!(v["battery"].as_f64(), Some(b) if b == 11.0 || b == 22.0));
    assert_eq!(v["pump_cycles"].as_f64(), Some(8_830_211.0));
    assert_eq!(v["last_pm"].as_text(), Some("2026-06-02"));
    assert_eq!(dev.stats().timeouts, 1, "{:?}", dev.stats());
    assert!(!format!("{:?}", read.snapshot).contains("P-0048213"));
    task.abort();
}

//! LIP-300 over a real pty, opened as a serial port at 9600 8N1 like the agent does.

mod common;

use common::*;
use std::time::Duration;
use tend_devsim::lip300::{encode_frame, ChecksumForm, Lip300Config, Lip300Sim, Mode, Noise};
use tokio::io::AsyncWriteExt;
use tokio_serial::Parity;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn fw2_answers_xor_requests_and_refuses_crc() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v2()).await.unwrap();
    assert!(sim.path().starts_with("/dev/pts"), "{:?}", sim.path());
    let mut port = open_serial(sim.path(), 9600, Parity::None);

    let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
    assert_eq!(
        text(&r),
        "\x02A|INFO|MODEL=LIP-300|SN=LP3A-2207-0193|FW=2.4.1|HW=C*4F\x03".replace(
            "*4F",
            &format!(
                "*{}",
                tend_devsim::lip300::checksum_text(
                    b"A|INFO|MODEL=LIP-300|SN=LP3A-2207-0193|FW=2.4.1|HW=C",
                    ChecksumForm::Xor
                )
            )
        )
    );

    let r = lip_exchange(&mut port, b"\x02Q|STATUS*39\x03").await;
    assert_eq!(
        text(&r),
        text(&encode_frame(
            "A|STATUS|MODE=INFUSING|RATE=125.0|VTBI=480|BATT=87|AC=1|TALM=0000|CALM=0000|ERR=0|PID=P-0048213",
            ChecksumForm::Xor
        ))
    );

    // CRC form: 2.x cannot check it.
    let r = lip_exchange(&mut port, b"\x02Q|STATUS*4839\x03").await;
    assert_eq!(r, b"\x02N|ERR=CHECKSUM*47\x03");
    // Wrong XOR.
    let r = lip_exchange(&mut port, b"\x02Q|STATUS*38\x03").await;
    assert_eq!(r, b"\x02N|ERR=CHECKSUM*47\x03");
    // Unknown command.
    let r = lip_exchange(&mut port, &encode_frame("Q|PURGE", ChecksumForm::Xor)).await;
    assert_eq!(r, encode_frame("N|ERR=UNKNOWN_CMD", ChecksumForm::Xor));

    // §8: a motor drive failure, byte for byte.
    sim.update(|s| {
        s.mode = Mode::Alarm;
        s.rate = 0.0;
        s.batt = 86;
    });
    sim.set_talm(0x0001);
    sim.set_err(310);
    let r = lip_exchange(&mut port, b"\x02Q|STATUS*39\x03").await;
    assert_eq!(
        text(&r),
        "\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=480|BATT=86|AC=1|TALM=0001|CALM=0000|ERR=310|PID=P-0048213*62\x03"
    );

    let r = lip_exchange(&mut port, b"\x02Q|COUNTERS*2A\x03").await;
    assert!(text(&r)
        .starts_with("\x02A|COUNTERS|RUNH=10422|PUMPCYC=8830211|DOORCYC=3120|LASTPM=2026-06-02*"));
    let r = lip_exchange(&mut port, b"\x02Q|SELFTEST*27\x03").await;
    assert!(text(&r).starts_with("\x02A|SELFTEST|RESULT=PASS|RAM=OK|"));
}

#[tokio::test]
async fn fw3_replies_in_the_requests_form() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    let mut port = open_serial(sim.path(), 9600, Parity::None);
    let r = lip_exchange(&mut port, b"\x02Q|INFO*288F\x03").await;
    assert_eq!(
        text(&r),
        "\x02A|INFO|MODEL=LIP-300|SN=LP3B-2403-0457|FW=3.1.0|HW=D*F5A0\x03"
    );
    let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
    assert_eq!(
        r,
        encode_frame(
            "A|INFO|MODEL=LIP-300|SN=LP3B-2403-0457|FW=3.1.0|HW=D",
            ChecksumForm::Xor
        )
    );
    // §8 fault frame: bits 1 and 16, error 240.
    sim.update(|s| {
        s.mode = Mode::Alarm;
        s.rate = 0.0;
        s.batt = 90;
        s.ac = true;
        s.talm = 0x0001_0002;
        s.err = 240;
        s.temp = 38.0;
    });
    let r = lip_exchange(&mut port, b"\x02Q|STATUS*4839\x03").await;
    assert_eq!(
        text(&r),
        "\x02A|STATUS|MODE=ALARM|RATE=0.0|VTBI=250|BATT=90|AC=1|TALM=00010002|CALM=0000|ERR=240|TEMP=38.0|PID=P-0051877*C8DF\x03"
    );
    let r = lip_exchange(&mut port, b"\x02Q|STATUS*4838\x03").await;
    assert_eq!(r, b"\x02N|ERR=CHECKSUM*44DE\x03");
}

#[tokio::test]
async fn noise_before_frames_is_discarded_and_pid_is_present() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v3()).await.unwrap();
    let mut port = open_serial(sim.path(), 9600, Parity::None);
    // noise from the host side: garbage and a half frame before the request
    let r = lip_exchange(&mut port, b"\xff\x00junk\x03\x02Q|STA\x02Q|STATUS*4839\x03").await;
    assert!(text(&r).contains("|PID=P-0051877*"), "{}", text(&r));

    sim.set_pid("P-7777777");
    for noise in [Noise::Garbage, Noise::HalfFrame, Noise::Mixed] {
        sim.set_noise(noise);
        for _ in 0..3 {
            let r = lip_exchange(&mut port, b"\x02Q|STATUS*39\x03").await;
            let frame = last_frame(&r);
            assert!(r.len() > frame.len(), "{noise:?}: noise precedes the reply");
            assert!(text(frame).contains("|PID=P-7777777*"), "{}", text(frame));
            let body = &frame[1..frame.iter().rposition(|&b| b == b'*').unwrap()];
            let sum = &frame[frame.len() - 3..frame.len() - 1];
            assert_eq!(
                tend_devsim::lip300::checksum_text(body, ChecksumForm::Xor).as_bytes(),
                sum
            );
        }
    }
}

#[tokio::test]
async fn busy_while_booting_then_answers() {
    let mut cfg = Lip300Config::v2();
    cfg.boot_time = Duration::from_millis(600);
    let sim = Lip300Sim::spawn_pty(cfg).await.unwrap();
    let mut port = open_serial(sim.path(), 9600, Parity::None);
    let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
    assert_eq!(r, encode_frame("N|ERR=BUSY", ChecksumForm::Xor));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
    assert!(text(&r).starts_with("\x02A|INFO|"));
    sim.boot(Duration::from_secs(5));
    let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
    assert_eq!(r, encode_frame("N|ERR=BUSY", ChecksumForm::Xor));
}

#[tokio::test]
async fn silent_then_back_and_reopen() {
    let sim = Lip300Sim::spawn_pty(Lip300Config::v2()).await.unwrap();
    let path = sim.path().to_path_buf();
    {
        let mut port = open_serial(&path, 9600, Parity::None);
        sim.set_silent(true);
        port.write_all(b"\x02Q|INFO*23\x03").await.unwrap();
        assert!(read_for(&mut port, Duration::from_millis(400))
            .await
            .is_empty());
        sim.set_silent(false);
        let r = lip_exchange(&mut port, b"\x02Q|INFO*23\x03").await;
        assert!(text(&r).starts_with("\x02A|INFO|"));
    }
    // the client closed the port; a new client opens the same path
    for _ in 0..3 {
        let mut port = open_serial(&path, 9600, Parity::None);
        let r = lip_exchange(&mut port, b"\x02Q|STATUS*39\x03").await;
        assert!(text(&r).starts_with("\x02A|STATUS|"), "{}", text(&r));
    }
}

#[test]
fn another_process_can_open_the_pty() {
    // A separate OS process (a shell with stty and a read) opens the path.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sim = rt
        .block_on(Lip300Sim::spawn_pty(Lip300Config::v2()))
        .unwrap();
    let path = sim.path().display().to_string();
    let script = format!(
        "exec 3<>{path}; stty -F {path} 9600 cs8 -parenb -cstopb raw -echo; \
         printf '\\002Q|INFO*23\\003' >&3; timeout 1 cat <&3"
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(
        got.starts_with("\u{2}A|INFO|MODEL=LIP-300|SN=LP3A-2207-0193"),
        "{got:?} {:?}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(sim);
}

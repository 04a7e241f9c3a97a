//! AV-500 over Modbus TCP and over RTU on a real pty, HM-2 over Modbus TCP: read with an
//! independent client (tokio-modbus) and with raw frames for exceptions and silence.

mod common;

use std::net::SocketAddr;
use std::time::Duration;
use tend_devsim::av500::{Av500Config, Av500Sim};
use tend_devsim::hm2::{Hm2Config, Hm2Sim};
use tend_devsim::modbus::{crc16_modbus, rtu_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_modbus::prelude::*;
use tokio_serial::Parity;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn raw_tcp(stream: &mut TcpStream, tid: u16, unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
    let mut req = tid.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0]);
    req.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    req.push(unit);
    req.extend_from_slice(pdu);
    stream.write_all(&req).await.unwrap();
    let mut head = [0u8; 7];
    match tokio::time::timeout(Duration::from_millis(400), stream.read_exact(&mut head)).await {
        Err(_) => return None,
        Ok(r) => {
            r.unwrap();
        }
    }
    assert_eq!(u16::from_be_bytes([head[0], head[1]]), tid);
    assert_eq!(head[6], unit);
    let len = u16::from_be_bytes([head[4], head[5]]) as usize;
    let mut body = vec![0u8; len - 1];
    stream.read_exact(&mut body).await.unwrap();
    Some(body)
}

#[tokio::test]
async fn av500_tcp_both_word_orders_and_identity() {
    let v4 = Av500Sim::spawn_tcp(Av500Config::v4(), any_port())
        .await
        .unwrap();
    let v5 = Av500Sim::spawn_tcp(Av500Config::v5(), any_port())
        .await
        .unwrap();
    for (h, words, speed) in [(&v4, [0x001E, 0x0032], 0u16), (&v5, [0x0032, 0x001E], 2350)] {
        h.update(|s| s.operating_minutes = 1_966_130);
        let mut ctx = tcp::connect_slave(h.addr().unwrap(), Slave(1))
            .await
            .unwrap();
        let input = ctx.read_input_registers(0, 20).await.unwrap().unwrap();
        assert_eq!(&input[4..6], &words);
        assert_eq!(input[15], speed);
        assert_eq!(input[0], 1);
        let hold = ctx.read_holding_registers(0, 13).await.unwrap().unwrap();
        assert_eq!(hold[0], h.config().firmware.major);
        let serial: Vec<u8> = hold[3..11].iter().flat_map(|r| r.to_be_bytes()).collect();
        assert_eq!(
            String::from_utf8(serial).unwrap().trim_end(),
            h.config().serial
        );
        assert_eq!(hold[12], 180);
    }
}

#[tokio::test]
async fn av500_tcp_exceptions_busy_and_unit() {
    let mut cfg = Av500Config::v5();
    cfg.boot_time = Duration::from_millis(500);
    let sim = Av500Sim::spawn_tcp(cfg, any_port()).await.unwrap();
    let mut ctx = tcp::connect_slave(sim.addr().unwrap(), Slave(1))
        .await
        .unwrap();
    assert_eq!(
        ctx.read_input_registers(0, 1).await.unwrap(),
        Err(ExceptionCode::ServerDeviceBusy)
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        ctx.read_input_registers(0, 33).await.unwrap(),
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        ctx.read_input_registers(10, 11).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.read_holding_registers(13, 1).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.write_single_register(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        ctx.write_multiple_registers(0, &[1, 2]).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        ctx.read_coils(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert!(ctx.read_input_registers(0, 20).await.unwrap().is_ok());

    let mut raw = TcpStream::connect(sim.addr().unwrap()).await.unwrap();
    // another unit id: silence
    assert_eq!(raw_tcp(&mut raw, 7, 2, &[4, 0, 0, 0, 1]).await, None);
    assert_eq!(
        raw_tcp(&mut raw, 8, 1, &[4, 0, 3, 0, 1]).await,
        Some(vec![4, 2, 0, 0])
    );
    sim.update(|s| s.error_code = 1021);
    assert_eq!(
        raw_tcp(&mut raw, 9, 1, &[4, 0, 3, 0, 1]).await,
        Some(vec![4, 2, 0x03, 0xFD])
    );
    // silent
    sim.set_silent(true);
    assert_eq!(raw_tcp(&mut raw, 10, 1, &[4, 0, 3, 0, 1]).await, None);
}

#[tokio::test]
async fn av500_rtu_on_a_pty() {
    let v4 = Av500Sim::spawn_rtu_pty(Av500Config::v4()).await.unwrap();
    let port = common::open_serial(v4.path().unwrap(), 19200, Parity::Even);
    let mut ctx = rtu::attach_slave(port, Slave(1));
    let input = ctx.read_input_registers(0, 20).await.unwrap().unwrap();
    assert_eq!(&input[4..6], &[0x001E, 0x0032]);
    assert_eq!(input[15], 0);
    assert_eq!(
        ctx.read_input_registers(0, 40).await.unwrap(),
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        ctx.read_input_registers(19, 2).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        ctx.write_single_register(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    drop(ctx);

    let mut cfg = Av500Config::v5();
    cfg.unit = 17;
    let v5 = Av500Sim::spawn_rtu_pty(cfg).await.unwrap();
    let mut port = common::open_serial(v5.path().unwrap(), 19200, Parity::Even);
    // wrong unit id: no answer
    port.write_all(&rtu_frame(1, &[4, 0, 0, 0, 2]))
        .await
        .unwrap();
    assert!(common::read_for(&mut port, Duration::from_millis(300))
        .await
        .is_empty());
    // bad CRC: no answer
    let mut bad = rtu_frame(17, &[4, 0, 0, 0, 2]);
    bad[6] ^= 0xFF;
    port.write_all(&bad).await.unwrap();
    assert!(common::read_for(&mut port, Duration::from_millis(300))
        .await
        .is_empty());
    // line noise, then a good request: answered, CRC correct, low word first
    let mut req = vec![0xFF, 0x00, 0x42];
    req.extend_from_slice(&rtu_frame(17, &[4, 0, 4, 0, 2]));
    port.write_all(&req).await.unwrap();
    let reply = common::read_for(&mut port, Duration::from_millis(300)).await;
    assert_eq!(&reply[..7], &[17, 4, 4, 0x00, 0x32, 0x00, 0x1E]);
    assert_eq!(
        crc16_modbus(&reply[..7]).to_le_bytes(),
        [reply[7], reply[8]]
    );
    // an unknown function code (framed by silence): exception 0x01
    port.write_all(&rtu_frame(17, &[0x2B, 0x0E, 0x01, 0x00]))
        .await
        .unwrap();
    let reply = common::read_for(&mut port, Duration::from_millis(300)).await;
    assert_eq!(reply, rtu_frame(17, &[0xAB, 0x01]));
    // busy
    v5.boot(Duration::from_secs(5));
    port.write_all(&rtu_frame(17, &[3, 0, 0, 0, 3]))
        .await
        .unwrap();
    let reply = common::read_for(&mut port, Duration::from_millis(300)).await;
    assert_eq!(reply, rtu_frame(17, &[0x83, 0x06]));
    // the client closes and reopens the port
    drop(port);
    v5.update(|s| s.busy_until = None);
    let port = common::open_serial(v5.path().unwrap(), 19200, Parity::Even);
    let mut ctx = rtu::attach_slave(port, Slave(17));
    let hold = ctx.read_holding_registers(0, 3).await.unwrap().unwrap();
    assert_eq!(hold, vec![5, 2, 1]);
}

#[tokio::test]
async fn hm2_word_orders_nan_and_exceptions() {
    let v2 = Hm2Sim::spawn_tcp(Hm2Config::v2(), any_port())
        .await
        .unwrap();
    let v3 = Hm2Sim::spawn_tcp(Hm2Config::v3(), any_port())
        .await
        .unwrap();
    let mut c2 = tcp::connect_slave(v2.addr(), Slave(1)).await.unwrap();
    // the HM-2 answers any unit id
    let mut c3 = tcp::connect_slave(v3.addr(), Slave(42)).await.unwrap();
    let r2 = c2.read_holding_registers(0, 17).await.unwrap().unwrap();
    let r3 = c3.read_holding_registers(0, 17).await.unwrap().unwrap();
    assert_eq!(&r2[0..6], &[0x428F, 0x0000, 0x3F99, 0x999A, 0x4086, 0x6666]);
    assert_eq!(&r3[0..6], &[0x0000, 0x428F, 0x999A, 0x3F99, 0x6666, 0x4086]);
    assert_eq!((r2[12], r3[12]), (207, 305));
    assert_eq!(&r2[9..11], &r3[9..11]);
    v3.update(|s| s.cold_head_sensor_failed = true);
    let r3 = c3.read_holding_registers(4, 4).await.unwrap().unwrap();
    assert_eq!(&r3[0..2], &[0x0000, 0x7FC0]);
    assert_eq!(r3[3], 1 << 6);
    let f = f32::from_bits((u32::from(r3[1]) << 16) | u32::from(r3[0]));
    assert!(f.is_nan());
    assert_eq!(
        c3.read_holding_registers(0, 65).await.unwrap(),
        Err(ExceptionCode::IllegalDataValue)
    );
    assert_eq!(
        c3.read_holding_registers(10, 10).await.unwrap(),
        Err(ExceptionCode::IllegalDataAddress)
    );
    assert_eq!(
        c3.read_input_registers(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
    assert_eq!(
        c3.write_single_register(0, 1).await.unwrap(),
        Err(ExceptionCode::IllegalFunction)
    );
}

#[tokio::test]
async fn hm2_connection_limit_and_idle_timeout() {
    let mut cfg = Hm2Config::v3();
    cfg.idle_timeout = Duration::from_millis(800);
    let sim = Hm2Sim::spawn_tcp(cfg, any_port()).await.unwrap();
    let mut conns = Vec::new();
    for i in 0..4u16 {
        let mut s = TcpStream::connect(sim.addr()).await.unwrap();
        assert!(raw_tcp(&mut s, i, 1, &[3, 0, 6, 0, 1]).await.is_some());
        conns.push(s);
    }
    // the fifth is closed at once
    let mut fifth = TcpStream::connect(sim.addr()).await.unwrap();
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "fifth connection closed");
    // one closes: a new one is accepted
    drop(conns.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(sim.addr()).await.unwrap();
    assert!(raw_tcp(&mut again, 99, 1, &[3, 0, 6, 0, 1]).await.is_some());
    // idle ones are closed by the monitor
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let n = tokio::time::timeout(Duration::from_secs(2), again.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "idle connection closed");
}

#[tokio::test]
async fn hm2_boil_off_lowers_the_level() {
    let sim = Hm2Sim::spawn_tcp(Hm2Config::v2(), any_port())
        .await
        .unwrap();
    sim.set_boil_off(600.0); // 10 points per second, to see it in a test
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let mut c = tcp::connect_slave(sim.addr(), Slave(1)).await.unwrap();
    let r = c.read_holding_registers(0, 2).await.unwrap().unwrap();
    let level = f32::from_bits((u32::from(r[0]) << 16) | u32::from(r[1]));
    assert!(level < 62.0 && level > 40.0, "level {level}");
    let alarms = c.read_holding_registers(7, 1).await.unwrap().unwrap()[0];
    assert_eq!(alarms & 1, 1, "level low alarm bit 0");
}

#[tokio::test]
async fn av500_units_behind_one_tcp_endpoint() {
    let cfgs: Vec<Av500Config> = (1..=3u8)
        .map(|unit| {
            let mut c = Av500Config::new(
                tend_devsim::Version::new(5, 2, 1),
                format!("AV5C-21-00010{unit}"),
            );
            c.unit = unit;
            c
        })
        .collect();
    let sims = Av500Sim::spawn_tcp_units(cfgs, any_port()).await.unwrap();
    sims.units()[1]
        .1
        .update(|s| s.operating_minutes = 1_966_130);
    sims.units()[0].1.update(|s| s.operating_minutes = 0);
    sims.units()[2].1.update(|s| s.operating_minutes = 0);
    let mut stream = TcpStream::connect(sims.addr().unwrap()).await.unwrap();
    for unit in 1..=3u8 {
        // Each unit answers with its own serial, on the same connection.
        let hold = raw_tcp(&mut stream, u16::from(unit), unit, &[0x03, 0, 3, 0, 8])
            .await
            .expect("the unit answers");
        let serial = String::from_utf8(hold[2..18].to_vec()).unwrap();
        assert_eq!(serial.trim_end(), format!("AV5C-21-00010{unit}"));
        let input = raw_tcp(&mut stream, 10 + u16::from(unit), unit, &[0x04, 0, 4, 0, 2])
            .await
            .expect("the unit answers");
        let minutes = if unit == 2 {
            [0x00, 0x32, 0x00, 0x1E]
        } else {
            [0; 4]
        };
        assert_eq!(&input[2..6], &minutes, "unit {unit}");
    }
    // A unit id nobody has: silence, as on a bus.
    assert!(raw_tcp(&mut stream, 99, 9, &[0x03, 0, 3, 0, 8])
        .await
        .is_none());
    // Two units with one id are refused.
    let twice = vec![Av500Config::v5(), Av500Config::v5()];
    assert!(Av500Sim::spawn_tcp_units(twice, any_port()).await.is_err());
}

//! CryoSense HM-2 MRI magnet helium monitor (document CS-HM2-MB v3.2): Modbus TCP.
//!
//! Holding registers 0–16 through function 0x03 only (anything else: exception 0x01), at
//! most 64 registers (0x03), past register 16 exception 0x02, any unit id answered. f32
//! values are ABCD on firmware 2.x and CDAB on 3.x; a failed sensor reads NaN and sets
//! alarm bit 6. At most 4 connections (a fifth is closed at once); idle ones are closed
//! after 120 s. A boil-off trend lowers the helium level at a set rate for demos.

use crate::modbus::{self, Exception, ModbusDevice, TcpLimits};
use crate::shared::{Shared, Stopper};
use crate::Version;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MAX_REGISTERS: u16 = 64;
pub const REGISTER_COUNT: usize = 17;
/// The NaN a failed sensor reads as (`0x7FC0 0x0000` in ABCD order).
pub const NAN_BITS: u32 = 0x7FC0_0000;

/// Alarm bits of register 7 (§3).
pub mod alarm {
    pub const LEVEL_LOW: u8 = 0;
    pub const LEVEL_CRITICAL: u8 = 1;
    pub const PRESSURE_HIGH: u8 = 2;
    pub const COMPRESSOR_FAULT: u8 = 3;
    pub const FLOW_LOW: u8 = 4;
    pub const COLD_HEAD_HIGH: u8 = 5;
    pub const SENSOR_FAULT: u8 = 6;
}

/// What the monitor measures; the alarm bits follow from it (see [`alarm_bits`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Hm2State {
    /// Helium level, percent of full.
    pub level_pct: f64,
    /// Vessel pressure, psi gauge.
    pub pressure_psi: f64,
    /// Cold head 2nd stage, kelvin.
    pub cold_head_k: f64,
    pub level_sensor_failed: bool,
    pub pressure_sensor_failed: bool,
    pub cold_head_sensor_failed: bool,
    /// 0 off, 1 running, 2 fault.
    pub compressor: u16,
    /// Alarm bits forced on in addition to the derived ones.
    pub forced_alarms: u16,
    /// Chiller water flow, L/min (sent in 0.1 L/min).
    pub flow_l_min: f64,
    pub compressor_hours: u32,
    pub adsorber_hours: u16,
    /// Helium boil-off: the level falls by this many points per minute while non-zero.
    pub boil_off_pct_per_min: f64,
    /// Answer nothing.
    pub silent: bool,
}

impl Default for Hm2State {
    fn default() -> Self {
        Self {
            level_pct: 71.5,
            pressure_psi: 1.2,
            cold_head_k: 4.2,
            level_sensor_failed: false,
            pressure_sensor_failed: false,
            cold_head_sensor_failed: false,
            compressor: 1,
            forced_alarms: 0,
            flow_l_min: 7.5,
            compressor_hours: 41_327,
            adsorber_hours: 12_874,
            boil_off_pct_per_min: 0.0,
            silent: false,
        }
    }
}

/// Register 7 as the monitor computes it from its readings (§3), plus forced bits.
/// "Flow low" is taken as below the nominal 5 L/min.
pub fn alarm_bits(s: &Hm2State) -> u16 {
    let mut bits = s.forced_alarms;
    let mut set = |bit: u8, on: bool| {
        if on {
            bits |= 1 << bit;
        }
    };
    set(
        alarm::LEVEL_LOW,
        !s.level_sensor_failed && s.level_pct < 60.0,
    );
    set(
        alarm::LEVEL_CRITICAL,
        !s.level_sensor_failed && s.level_pct < 40.0,
    );
    set(
        alarm::PRESSURE_HIGH,
        !s.pressure_sensor_failed && s.pressure_psi > 4.0,
    );
    set(alarm::COMPRESSOR_FAULT, s.compressor == 2);
    set(alarm::FLOW_LOW, s.flow_l_min < 5.0);
    set(
        alarm::COLD_HEAD_HIGH,
        !s.cold_head_sensor_failed && s.cold_head_k > 4.6,
    );
    set(
        alarm::SENSOR_FAULT,
        s.level_sensor_failed || s.pressure_sensor_failed || s.cold_head_sensor_failed,
    );
    bits
}

/// An f32 as two registers: ABCD (high word first) or CDAB (low word first).
pub fn f32_registers(bits: u32, cdab: bool) -> [u16; 2] {
    let hi = (bits >> 16) as u16;
    let lo = bits as u16;
    if cdab {
        [lo, hi]
    } else {
        [hi, lo]
    }
}

fn value_bits(v: f64, failed: bool) -> u32 {
    if failed {
        NAN_BITS
    } else {
        (v as f32).to_bits()
    }
}

/// Identity of one simulated monitor.
#[derive(Debug, Clone)]
pub struct Hm2Config {
    pub firmware: Version,
    /// Connections beyond this are closed at once (the manual: 4).
    pub max_connections: usize,
    /// Idle connections are closed after this (the manual: 120 s).
    pub idle_timeout: Duration,
    pub state: Option<Hm2State>,
}

impl Hm2Config {
    pub fn new(firmware: Version) -> Self {
        Self {
            firmware,
            max_connections: 4,
            idle_timeout: Duration::from_secs(120),
            state: None,
        }
    }
    /// Firmware 3.5 (CDAB).
    pub fn v3() -> Self {
        Self::new(Version::new(3, 5, 0))
    }
    /// Firmware 2.7 (ABCD).
    pub fn v2() -> Self {
        Self::new(Version::new(2, 7, 0))
    }
    fn cdab(&self) -> bool {
        self.firmware.major >= 3
    }
}

/// Holding registers 0–16 (§2).
pub fn holding_registers(cfg: &Hm2Config, s: &Hm2State) -> [u16; REGISTER_COUNT] {
    let cdab = cfg.cdab();
    let mut r = [0u16; REGISTER_COUNT];
    r[0..2].copy_from_slice(&f32_registers(
        value_bits(s.level_pct, s.level_sensor_failed),
        cdab,
    ));
    r[2..4].copy_from_slice(&f32_registers(
        value_bits(s.pressure_psi, s.pressure_sensor_failed),
        cdab,
    ));
    r[4..6].copy_from_slice(&f32_registers(
        value_bits(s.cold_head_k, s.cold_head_sensor_failed),
        cdab,
    ));
    r[6] = s.compressor;
    r[7] = alarm_bits(s);
    r[8] = (s.flow_l_min * 10.0).round().clamp(0.0, 65535.0) as u16;
    r[9] = (s.compressor_hours >> 16) as u16;
    r[10] = s.compressor_hours as u16;
    r[11] = s.adsorber_hours;
    r[12] = cfg.firmware.major * 100 + cfg.firmware.minor;
    r
}

/// The reply PDU to any request PDU. Pure.
pub fn respond_pdu(cfg: &Hm2Config, s: &Hm2State, pdu: &[u8]) -> Vec<u8> {
    let fc = pdu.first().copied().unwrap_or(0);
    if fc != modbus::FC_READ_HOLDING {
        return modbus::exception_pdu(fc, Exception::IllegalFunction);
    }
    match modbus::parse_read(pdu, MAX_REGISTERS) {
        Ok(req) => modbus::read_reply(req, &holding_registers(cfg, s)),
        Err(e) => modbus::exception_pdu(fc, e),
    }
}

/// One step of the boil-off trend: the level after `elapsed` at the state's rate.
pub fn apply_boil_off(s: &mut Hm2State, elapsed: Duration) {
    if s.boil_off_pct_per_min != 0.0 {
        s.level_pct =
            (s.level_pct - s.boil_off_pct_per_min * elapsed.as_secs_f64() / 60.0).clamp(0.0, 100.0);
    }
}

struct Device {
    cfg: Hm2Config,
    state: Shared<Hm2State>,
}

impl ModbusDevice for Device {
    fn respond(&self, _unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
        if pdu.is_empty() {
            return None;
        }
        self.state
            .with(|s| (!s.silent).then(|| respond_pdu(&self.cfg, s, pdu)))
    }
}

/// Starts HM-2 simulators.
pub struct Hm2Sim;

impl Hm2Sim {
    /// Serves Modbus TCP on `addr` (port 0 picks a free port).
    pub async fn spawn_tcp(cfg: Hm2Config, addr: SocketAddr) -> io::Result<Hm2Handle> {
        let listener = modbus::bind(addr).await?;
        let local = listener.local_addr()?;
        let state = Shared::new(cfg.state.clone().unwrap_or_default());
        let dev = Arc::new(Device {
            cfg: cfg.clone(),
            state: state.clone(),
        });
        let stopper = Stopper::new();
        let limits = TcpLimits {
            max_connections: Some(cfg.max_connections),
            idle_timeout: Some(cfg.idle_timeout),
        };
        tokio::spawn(modbus::serve_tcp(listener, dev, limits, stopper.token()));
        let (st, token) = (state.clone(), stopper.token());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = Instant::now();
                let elapsed = now - last;
                last = now;
                if st.with(|s| s.boil_off_pct_per_min != 0.0) {
                    st.update(|s| apply_boil_off(s, elapsed));
                }
            }
        });
        Ok(Hm2Handle {
            cfg,
            state,
            addr: local,
            stopper,
        })
    }
}

/// A running HM-2 simulator. Dropping it stops the simulator.
#[derive(Debug)]
pub struct Hm2Handle {
    cfg: Hm2Config,
    state: Shared<Hm2State>,
    addr: SocketAddr,
    stopper: Stopper,
}

impl Hm2Handle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn config(&self) -> &Hm2Config {
        &self.cfg
    }
    pub fn shared(&self) -> &Shared<Hm2State> {
        &self.state
    }
    pub fn state(&self) -> Hm2State {
        self.state.get()
    }
    pub fn update<R>(&self, f: impl FnOnce(&mut Hm2State) -> R) -> R {
        self.state.update(f)
    }
    pub fn set_silent(&self, silent: bool) {
        self.update(|s| s.silent = silent);
    }
    /// Starts (or with 0.0 stops) a helium boil-off of `pct_per_min` points per minute.
    pub fn set_boil_off(&self, pct_per_min: f64) {
        self.update(|s| s.boil_off_pct_per_min = pct_per_min);
    }
    pub fn shutdown(&self) {
        self.stopper.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_examples_of_section_2_1() {
        assert_eq!(f32_registers(71.5f32.to_bits(), false), [0x428F, 0x0000]);
        assert_eq!(f32_registers(71.5f32.to_bits(), true), [0x0000, 0x428F]);
        assert_eq!(f32_registers(1.2f32.to_bits(), false), [0x3F99, 0x999A]);
        assert_eq!(f32_registers(1.2f32.to_bits(), true), [0x999A, 0x3F99]);
        assert_eq!(f32_registers(4.2f32.to_bits(), false), [0x4086, 0x6666]);
        assert_eq!(f32_registers(4.2f32.to_bits(), true), [0x6666, 0x4086]);
        assert_eq!(f32_registers(NAN_BITS, false), [0x7FC0, 0x0000]);
        assert_eq!(f32_registers(NAN_BITS, true), [0x0000, 0x7FC0]);
    }

    #[test]
    fn register_image_both_families() {
        let s = Hm2State::default();
        let r2 = holding_registers(&Hm2Config::v2(), &s);
        assert_eq!(&r2[0..6], &[0x428F, 0, 0x3F99, 0x999A, 0x4086, 0x6666]);
        assert_eq!(r2[6], 1);
        assert_eq!(r2[7], 0);
        assert_eq!(r2[8], 75);
        assert_eq!((u32::from(r2[9]) << 16) | u32::from(r2[10]), 41_327);
        assert_eq!(r2[12], 207);
        let r3 = holding_registers(&Hm2Config::v3(), &s);
        assert_eq!(&r3[0..6], &[0, 0x428F, 0x999A, 0x3F99, 0x6666, 0x4086]);
        assert_eq!(r3[12], 305);
        // compressor hours stay high word first on every firmware
        assert_eq!(&r3[9..11], &r2[9..11]);
        assert!(r3[13..].iter().all(|&x| x == 0));
    }

    #[test]
    fn failed_sensor_reads_nan_with_bit_6() {
        let s = Hm2State {
            level_sensor_failed: true,
            ..Hm2State::default()
        };
        let r2 = holding_registers(&Hm2Config::v2(), &s);
        assert_eq!(&r2[0..2], &[0x7FC0, 0x0000]);
        assert_eq!(r2[7], 1 << 6);
        let r3 = holding_registers(&Hm2Config::v3(), &s);
        assert_eq!(&r3[0..2], &[0x0000, 0x7FC0]);
    }

    #[test]
    fn derived_alarms() {
        let mut s = Hm2State {
            level_pct: 55.0,
            ..Hm2State::default()
        };
        assert_eq!(alarm_bits(&s), 0b1);
        s.level_pct = 39.0;
        assert_eq!(alarm_bits(&s), 0b11);
        s.level_pct = 70.0;
        s.compressor = 2;
        s.pressure_psi = 4.5;
        s.cold_head_k = 4.8;
        s.flow_l_min = 3.0;
        assert_eq!(alarm_bits(&s), 0b11_1100);
    }

    #[test]
    fn boil_off_rate() {
        let mut s = Hm2State {
            boil_off_pct_per_min: 1.0,
            ..Hm2State::default()
        };
        apply_boil_off(&mut s, Duration::from_secs(30));
        assert!((s.level_pct - 71.0).abs() < 1e-9);
    }

    #[test]
    fn exceptions() {
        let cfg = Hm2Config::v3();
        let s = Hm2State::default();
        assert_eq!(respond_pdu(&cfg, &s, &[0x04, 0, 0, 0, 1]), vec![0x84, 0x01]);
        assert_eq!(respond_pdu(&cfg, &s, &[0x06, 0, 0, 0, 1]), vec![0x86, 0x01]);
        assert_eq!(
            respond_pdu(&cfg, &s, &[0x03, 0, 0, 0, 65]),
            vec![0x83, 0x03]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, &[0x03, 0, 0, 0, 18]),
            vec![0x83, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, &[0x03, 0, 17, 0, 1]),
            vec![0x83, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, &[0x03, 0, 16, 0, 1]),
            vec![0x03, 2, 0, 0]
        );
        assert_eq!(respond_pdu(&cfg, &s, &[0x03, 0, 0, 0, 17]).len(), 2 + 34);
    }
}

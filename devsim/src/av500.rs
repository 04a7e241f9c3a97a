//! Aeris AV-500 ventilator (document AR-MB-500 rev. 7): the Modbus service interface,
//! simulated as an RTU slave on a pty (19200 8E1, unit id 1 by default) and as a Modbus
//! TCP server (the AV-NET module).
//!
//! Holding registers 0–12 (identity, maintenance), input registers 0–19 (status);
//! functions 0x03/0x04 only (anything else, writes included: exception 0x01), at most 32
//! registers (0x03), unmapped or spanning addresses 0x02, exception 0x06 while booting.
//! Firmware 4.x stores a u32 high word first, 5.x low word first; register 15 (turbine
//! speed) exists on 5.x only and reads 0 on 4.x.

use crate::modbus::{self, Exception, ModbusDevice, TcpLimits};
use crate::pty;
use crate::shared::{Shared, Stopper};
use crate::Version;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most registers one request may read.
pub const MAX_REGISTERS: u16 = 32;
pub const HOLDING_COUNT: usize = 13;
pub const INPUT_COUNT: usize = 20;
/// RS-485 line settings (printed; a pty ignores them).
pub const BAUD: u32 = 19200;
pub const PARITY: &str = "even";

/// Device state, input register 0 (§3.1).
pub mod device_state {
    pub const STANDBY: u16 = 0;
    pub const VENTILATING: u16 = 1;
    pub const SELF_TEST: u16 = 2;
    pub const SERVICE: u16 = 3;
    pub const FAILURE: u16 = 4;
    pub const POWER_DOWN: u16 = 5;
}

/// What the ventilator reports; mutate it through [`Av500Handle`].
#[derive(Debug, Clone, PartialEq)]
pub struct Av500State {
    /// Holding 11.
    pub days_since_pm: u16,
    /// Holding 12.
    pub pm_interval_days: u16,
    /// Input 0, see [`device_state`].
    pub device_state: u16,
    /// Input 1, technical alarm word 1.
    pub alarm_word1: u16,
    /// Input 2, technical alarm word 2.
    pub alarm_word2: u16,
    /// Input 3.
    pub error_code: u16,
    /// Inputs 4–5.
    pub operating_minutes: u32,
    /// Inputs 6–7.
    pub turbine_minutes: u32,
    /// Input 8, °C (sent in 0.1 °C).
    pub turbine_temp_c: f64,
    pub o2_cell_pct: u16,
    pub battery_pct: u16,
    pub battery_health_pct: u16,
    pub mains: bool,
    pub o2_supply_kpa: u16,
    pub air_supply_kpa: u16,
    /// Input 15 on 5.x, in rpm (sent in 10 rpm).
    pub turbine_rpm: u32,
    /// Answer nothing.
    pub silent: bool,
    /// Answer exception 0x06 until then.
    pub busy_until: Option<Instant>,
}

impl Default for Av500State {
    fn default() -> Self {
        Self {
            days_since_pm: 37,
            pm_interval_days: 180,
            device_state: device_state::VENTILATING,
            alarm_word1: 0,
            alarm_word2: 0,
            error_code: 0,
            operating_minutes: 1_966_130,
            turbine_minutes: 620_000,
            turbine_temp_c: 42.0,
            o2_cell_pct: 78,
            battery_pct: 100,
            battery_health_pct: 92,
            mains: true,
            o2_supply_kpa: 400,
            air_supply_kpa: 400,
            turbine_rpm: 23_500,
            silent: false,
            busy_until: None,
        }
    }
}

impl Av500State {
    pub fn is_busy(&self, now: Instant) -> bool {
        self.busy_until.is_some_and(|t| now < t)
    }
}

/// Identity of one simulated ventilator.
#[derive(Debug, Clone)]
pub struct Av500Config {
    pub firmware: Version,
    /// Up to 16 ASCII characters (padded with spaces).
    pub serial: String,
    /// The unit id answered, 1–247.
    pub unit: u8,
    /// Exception 0x06 for this long after start (the manual: about 20 s).
    pub boot_time: Duration,
    pub state: Option<Av500State>,
}

impl Av500Config {
    pub fn new(firmware: Version, serial: impl Into<String>) -> Self {
        Self {
            firmware,
            serial: serial.into(),
            unit: 1,
            boot_time: Duration::ZERO,
            state: None,
        }
    }
    /// A 5.x ventilator (low word first, turbine speed present).
    pub fn v5() -> Self {
        Self::new(Version::new(5, 2, 1), "AV5C-21-004417")
    }
    /// A 4.x ventilator (high word first, no turbine speed).
    pub fn v4() -> Self {
        Self::new(Version::new(4, 8, 3), "AV4B-19-002210")
    }
    fn low_word_first(&self) -> bool {
        self.firmware.major >= 5
    }
}

/// A u32 as two registers in the firmware's order (§3.5).
pub fn u32_registers(value: u32, low_word_first: bool) -> [u16; 2] {
    let hi = (value >> 16) as u16;
    let lo = value as u16;
    if low_word_first {
        [lo, hi]
    } else {
        [hi, lo]
    }
}

/// The 16-character serial as 8 registers, two ASCII characters each, high byte first,
/// padded with spaces (non-ASCII characters become `?`).
pub fn serial_registers(serial: &str) -> [u16; 8] {
    let mut bytes = [b' '; 16];
    for (slot, c) in bytes.iter_mut().zip(serial.chars()) {
        *slot = if c.is_ascii() { c as u8 } else { b'?' };
    }
    let mut regs = [0u16; 8];
    for (i, r) in regs.iter_mut().enumerate() {
        *r = u16::from_be_bytes([bytes[2 * i], bytes[2 * i + 1]]);
    }
    regs
}

/// Holding registers 0–12 (§2).
pub fn holding_registers(cfg: &Av500Config, s: &Av500State) -> [u16; HOLDING_COUNT] {
    let mut r = [0u16; HOLDING_COUNT];
    r[0] = cfg.firmware.major;
    r[1] = cfg.firmware.minor;
    r[2] = cfg.firmware.patch;
    r[3..11].copy_from_slice(&serial_registers(&cfg.serial));
    r[11] = s.days_since_pm;
    r[12] = s.pm_interval_days;
    r
}

/// Input registers 0–19 (§3).
pub fn input_registers(cfg: &Av500Config, s: &Av500State) -> [u16; INPUT_COUNT] {
    let lw = cfg.low_word_first();
    let mut r = [0u16; INPUT_COUNT];
    r[0] = s.device_state;
    r[1] = s.alarm_word1;
    r[2] = s.alarm_word2;
    r[3] = s.error_code;
    r[4..6].copy_from_slice(&u32_registers(s.operating_minutes, lw));
    r[6..8].copy_from_slice(&u32_registers(s.turbine_minutes, lw));
    r[8] = ((s.turbine_temp_c * 10.0).round().clamp(-32768.0, 32767.0) as i16) as u16;
    r[9] = s.o2_cell_pct;
    r[10] = s.battery_pct;
    r[11] = s.battery_health_pct;
    r[12] = u16::from(s.mains);
    r[13] = s.o2_supply_kpa;
    r[14] = s.air_supply_kpa;
    r[15] = if lw {
        (s.turbine_rpm / 10).min(u32::from(u16::MAX)) as u16
    } else {
        0
    };
    r
}

/// The reply PDU to a request PDU addressed to this ventilator. Pure.
pub fn respond_pdu(cfg: &Av500Config, s: &Av500State, busy: bool, pdu: &[u8]) -> Vec<u8> {
    let fc = pdu.first().copied().unwrap_or(0);
    if busy {
        return modbus::exception_pdu(fc, Exception::ServerDeviceBusy);
    }
    if fc != modbus::FC_READ_HOLDING && fc != modbus::FC_READ_INPUT {
        return modbus::exception_pdu(fc, Exception::IllegalFunction);
    }
    let req = match modbus::parse_read(pdu, MAX_REGISTERS) {
        Ok(r) => r,
        Err(e) => return modbus::exception_pdu(fc, e),
    };
    if fc == modbus::FC_READ_HOLDING {
        modbus::read_reply(req, &holding_registers(cfg, s))
    } else {
        modbus::read_reply(req, &input_registers(cfg, s))
    }
}

struct Device {
    cfg: Av500Config,
    state: Shared<Av500State>,
}

impl ModbusDevice for Device {
    fn respond(&self, unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
        if unit != self.cfg.unit || pdu.is_empty() {
            return None;
        }
        let now = Instant::now();
        self.state.with(|s| {
            if s.silent {
                None
            } else {
                Some(respond_pdu(&self.cfg, s, s.is_busy(now), pdu))
            }
        })
    }
}

/// Several ventilators behind one Modbus TCP endpoint (a serial-to-Ethernet gateway in
/// front of an RS-485 bus): each request goes to the unit it names.
struct Units(Vec<Arc<Device>>);

impl ModbusDevice for Units {
    fn respond(&self, unit: u8, pdu: &[u8]) -> Option<Vec<u8>> {
        let device = self.0.iter().find(|d| d.cfg.unit == unit)?;
        device.respond(unit, pdu)
    }
}

/// Ventilators served by [`Av500Sim::spawn_tcp_units`] or [`Av500Sim::spawn_rtu_bus`].
/// Dropping it stops them all.
#[derive(Debug)]
pub struct Av500Units {
    endpoint: Endpoint,
    units: Vec<(Av500Config, Shared<Av500State>)>,
    _stopper: Stopper,
}

impl Av500Units {
    /// The TCP address every unit answers on, for units behind one Modbus TCP endpoint.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.endpoint {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Pty(_) => None,
        }
    }
    /// Where every unit answers: a TCP endpoint, or the pty of an RS-485 bus.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
    /// Each unit's config and state, in the order given.
    pub fn units(&self) -> &[(Av500Config, Shared<Av500State>)] {
        &self.units
    }
}

/// Starts AV-500 simulators.
pub struct Av500Sim;

impl Av500Sim {
    fn device(cfg: &Av500Config) -> (Shared<Av500State>, Arc<Device>) {
        let mut initial = cfg.state.clone().unwrap_or_default();
        if !cfg.boot_time.is_zero() {
            initial.busy_until = Some(Instant::now() + cfg.boot_time);
        }
        let state = Shared::new(initial);
        let dev = Arc::new(Device {
            cfg: cfg.clone(),
            state: state.clone(),
        });
        (state, dev)
    }

    /// Serves Modbus TCP on `addr` (port 0 picks a free port).
    pub async fn spawn_tcp(cfg: Av500Config, addr: SocketAddr) -> io::Result<Av500Handle> {
        let listener = modbus::bind(addr).await?;
        let local = listener.local_addr()?;
        let (state, dev) = Self::device(&cfg);
        let stopper = Stopper::new();
        tokio::spawn(modbus::serve_tcp(
            listener,
            dev,
            TcpLimits::default(),
            stopper.token(),
        ));
        Ok(Av500Handle {
            cfg,
            state,
            endpoint: Endpoint::Tcp(local),
            stopper,
        })
    }

    /// Serves every ventilator of `cfgs` on one Modbus TCP endpoint `addr`, each under
    /// its own unit id (which must differ).
    pub async fn spawn_tcp_units(
        cfgs: Vec<Av500Config>,
        addr: SocketAddr,
    ) -> io::Result<Av500Units> {
        let listener = modbus::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (units, devices) = Self::units(cfgs)?;
        let stopper = Stopper::new();
        tokio::spawn(modbus::serve_tcp(
            listener,
            Arc::new(Units(devices)),
            TcpLimits::default(),
            stopper.token(),
        ));
        Ok(Av500Units {
            endpoint: Endpoint::Tcp(addr),
            units,
            _stopper: stopper,
        })
    }

    /// Serves every ventilator of `cfgs` as a unit of one RS-485 bus, Modbus RTU on a
    /// fresh pty (open it at 19200 8E1): a request goes to the unit it addresses, and
    /// units answer one at a time, as on a real bus.
    pub async fn spawn_rtu_bus(cfgs: Vec<Av500Config>) -> io::Result<Av500Units> {
        let (units, devices) = Self::units(cfgs)?;
        let pty = pty::open()?;
        let path = pty.path.clone();
        let stopper = Stopper::new();
        tokio::spawn(modbus::serve_rtu(
            pty,
            Arc::new(Units(devices)),
            stopper.token(),
        ));
        Ok(Av500Units {
            endpoint: Endpoint::Pty(path),
            units,
            _stopper: stopper,
        })
    }

    /// The units of one link, their unit ids checked to differ.
    #[allow(clippy::type_complexity)]
    fn units(
        cfgs: Vec<Av500Config>,
    ) -> io::Result<(Vec<(Av500Config, Shared<Av500State>)>, Vec<Arc<Device>>)> {
        let mut ids: Vec<u8> = cfgs.iter().map(|c| c.unit).collect();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "two simulated AV-500 units on one link have the same unit id",
            ));
        }
        Ok(cfgs
            .into_iter()
            .map(|cfg| {
                let (state, dev) = Self::device(&cfg);
                ((cfg, state), dev)
            })
            .unzip())
    }

    /// Serves Modbus RTU on a fresh pty (open it at 19200 8E1).
    pub async fn spawn_rtu_pty(cfg: Av500Config) -> io::Result<Av500Handle> {
        let pty = pty::open()?;
        let path = pty.path.clone();
        let (state, dev) = Self::device(&cfg);
        let stopper = Stopper::new();
        tokio::spawn(modbus::serve_rtu(pty, dev, stopper.token()));
        Ok(Av500Handle {
            cfg,
            state,
            endpoint: Endpoint::Pty(path),
            stopper,
        })
    }
}

/// Where a simulator listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Pty(PathBuf),
}

/// A running AV-500 simulator. Dropping it stops the simulator.
#[derive(Debug)]
pub struct Av500Handle {
    cfg: Av500Config,
    state: Shared<Av500State>,
    endpoint: Endpoint,
    stopper: Stopper,
}

impl Av500Handle {
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
    /// The TCP address, for a TCP simulator.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.endpoint {
            Endpoint::Tcp(a) => Some(*a),
            Endpoint::Pty(_) => None,
        }
    }
    /// The pty path, for an RTU simulator.
    pub fn path(&self) -> Option<&Path> {
        match &self.endpoint {
            Endpoint::Pty(p) => Some(p),
            Endpoint::Tcp(_) => None,
        }
    }
    pub fn config(&self) -> &Av500Config {
        &self.cfg
    }
    pub fn shared(&self) -> &Shared<Av500State> {
        &self.state
    }
    pub fn state(&self) -> Av500State {
        self.state.get()
    }
    pub fn update<R>(&self, f: impl FnOnce(&mut Av500State) -> R) -> R {
        self.state.update(f)
    }
    pub fn set_silent(&self, silent: bool) {
        self.update(|s| s.silent = silent);
    }
    /// Exception 0x06 for `d` from now.
    pub fn boot(&self, d: Duration) {
        self.update(|s| s.busy_until = Some(Instant::now() + d));
    }
    pub fn shutdown(&self) {
        self.stopper.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn u32_word_orders_of_section_3_5() {
        assert_eq!(u32_registers(1_966_130, false), [0x001E, 0x0032]);
        assert_eq!(u32_registers(1_966_130, true), [0x0032, 0x001E]);
        let s = Av500State::default();
        assert_eq!(
            &input_registers(&Av500Config::v4(), &s)[4..6],
            &[0x001E, 0x0032]
        );
        assert_eq!(
            &input_registers(&Av500Config::v5(), &s)[4..6],
            &[0x0032, 0x001E]
        );
    }

    #[test]
    fn turbine_speed_only_on_5x() {
        let s = Av500State::default();
        assert_eq!(input_registers(&Av500Config::v5(), &s)[15], 2350);
        assert_eq!(input_registers(&Av500Config::v4(), &s)[15], 0);
        assert!(input_registers(&Av500Config::v5(), &s)[16..]
            .iter()
            .all(|&r| r == 0));
    }

    #[test]
    fn identity_registers() {
        let cfg = Av500Config::v5();
        let h = holding_registers(&cfg, &Av500State::default());
        assert_eq!(&h[0..3], &[5, 2, 1]);
        assert_eq!(h[3], u16::from_be_bytes(*b"AV"));
        assert_eq!(h[4], u16::from_be_bytes(*b"5C"));
        assert_eq!(h[10], u16::from_be_bytes(*b"  ")); // padded to 16
        assert_eq!(h[11], 37);
        assert_eq!(h[12], 180);
        let text: Vec<u8> = h[3..11].iter().flat_map(|r| r.to_be_bytes()).collect();
        assert_eq!(&text, b"AV5C-21-004417  ");
    }

    #[test]
    fn negative_temperature_is_twos_complement() {
        let s = Av500State {
            turbine_temp_c: -1.5,
            ..Av500State::default()
        };
        assert_eq!(input_registers(&Av500Config::v4(), &s)[8], 0xFFF1);
    }

    #[test]
    fn exceptions() {
        let cfg = Av500Config::v4();
        let s = Av500State::default();
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x06, 0, 1, 0, 5]),
            vec![0x86, 0x01]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x10, 0, 1, 0, 1, 2, 0, 5]),
            vec![0x90, 0x01]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x01, 0, 0, 0, 1]),
            vec![0x81, 0x01]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x03, 0, 0, 0, 33]),
            vec![0x83, 0x03]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x04, 0, 0, 0, 32]),
            vec![0x84, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x04, 0, 19, 0, 2]),
            vec![0x84, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x03, 0, 12, 0, 2]),
            vec![0x83, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, false, &[0x03, 0, 99, 0, 1]),
            vec![0x83, 0x02]
        );
        assert_eq!(
            respond_pdu(&cfg, &s, true, &[0x04, 0, 0, 0, 1]),
            vec![0x84, 0x06]
        );
        let ok = respond_pdu(&cfg, &s, false, &[0x04, 0, 0, 0, 20]);
        assert_eq!(ok.len(), 2 + 40);
        assert_eq!(&ok[..4], &[0x04, 40, 0, 1]);
        let ok = respond_pdu(&cfg, &s, false, &[0x03, 0, 0, 0, 13]);
        assert_eq!(&ok[..8], &[0x03, 26, 0, 4, 0, 8, 0, 3]);
    }
}

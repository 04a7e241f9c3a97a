//! `tend-agent probe`: read one device once and print what the profile makes of it — the
//! command a field engineer runs when commissioning a device.
//!
//! It identifies the device (firmware, serial number), picks the profile for that
//! firmware, reads once, evaluates with the current time and prints identity, readings,
//! active signals and the device state. Only the profile's snapshot is printed: fields the
//! device sends that the profile does not list (patient ids and names, vitals) never reach
//! the output.
//!
//! Exit codes: 0 read and printed; 1 the device could not be read (timeout, exception,
//! refused, unsupported firmware...); 2 bad arguments.

use crate::device::{LinkTarget, ModbusRtuLink, ModbusTcpLink, MqttLink, SerialLink, Transport};
use crate::transport::modbus::{Endpoint, ModbusBus};
use crate::transport::mqtt::{self, MqttSource, Presence};
use crate::transport::serial::SerialDevice;
use crate::transport::{DeviceRead, Stats, TransportError};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tend_profiles::schema::{Parity, TransportKind};
use tend_profiles::{Evaluation, Profile, ProfileSet, RuleState};

/// Exit code when the device could not be read.
pub const EXIT_UNREADABLE: u8 = 1;
/// Exit code for bad arguments.
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportArg {
    /// Framed ASCII request/response on a serial port (LIP-300).
    Serial,
    /// Modbus RTU on a serial port (RS-485).
    ModbusRtu,
    /// Modbus TCP.
    ModbusTcp,
    /// The device publishes to an MQTT broker (VM-12).
    Mqtt,
}

impl TransportArg {
    fn name(self) -> &'static str {
        match self {
            TransportArg::Serial => "serial",
            TransportArg::ModbusRtu => "modbus-rtu",
            TransportArg::ModbusTcp => "modbus-tcp",
            TransportArg::Mqtt => "mqtt",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ParityArg {
    None,
    Even,
    Odd,
}

/// A duration flag that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DurationArgError {
    #[error("{0}")]
    Unreadable(String),
    #[error("must be longer than zero")]
    Zero,
}

fn parse_duration(s: &str) -> Result<Duration, DurationArgError> {
    let d = tend_profiles::units::Dur::parse(s)
        .map_err(|e| DurationArgError::Unreadable(e.to_string()))?
        .0;
    if d.is_zero() {
        return Err(DurationArgError::Zero);
    }
    Ok(d)
}

/// Arguments of `tend-agent probe`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  tend-agent probe --profile aeris/av-500 --transport modbus-tcp --address 127.0.0.1:502 --unit 1
  tend-agent probe --profile aeris/av-500 --transport modbus-rtu --port /dev/ttyUSB0 --baud 19200 --parity even --unit 1
  tend-agent probe --profile lumen/lip-300 --transport serial --port /dev/ttyS0
  tend-agent probe --profile vistara/vm-12 --transport mqtt --broker mqtt://127.0.0.1:1883 --serial VM12-00A4471")]
pub struct ProbeArgs {
    /// Device profile, `vendor/model` (see `tend-agent profile list`).
    #[arg(long)]
    pub profile: String,
    /// How the device is connected.
    #[arg(long, value_enum)]
    pub transport: TransportArg,
    /// Serial port (serial, modbus-rtu).
    #[arg(long)]
    pub port: Option<String>,
    /// Baud rate (serial, modbus-rtu); default from the profile.
    #[arg(long)]
    pub baud: Option<u32>,
    /// Parity (modbus-rtu); default from the profile.
    #[arg(long, value_enum)]
    pub parity: Option<ParityArg>,
    /// Modbus unit id; default from the profile.
    #[arg(long)]
    pub unit: Option<u8>,
    /// Modbus TCP `host:port` (port from the profile when omitted).
    #[arg(long)]
    pub address: Option<String>,
    /// MQTT broker, `mqtt://host:port`.
    #[arg(long)]
    pub broker: Option<String>,
    /// Device serial number (mqtt: names the device's topics).
    #[arg(long)]
    pub serial: Option<String>,
    /// MQTT user name.
    #[arg(long)]
    pub username: Option<String>,
    /// File holding the MQTT password (kept off the command line, where `ps` shows it).
    #[arg(long)]
    pub password_file: Option<PathBuf>,
    /// CA bundle for an `mqtts://` broker (else the system's roots).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Give up after this long in all (`10s`); for mqtt the default also covers one status
    /// interval of the device.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Timeout of each request; default from the profile.
    #[arg(long, value_parser = parse_duration)]
    pub reply_timeout: Option<Duration>,
    /// Also run one of the profile's read-only diagnostic requests (`selftest`,
    /// `status-registers`).
    #[arg(long)]
    pub diagnostic: Option<String>,
    /// Directory of extra profiles, replacing built-in ones of the same firmware family.
    #[arg(long)]
    pub profiles: Option<PathBuf>,
    /// Machine-readable output (JSON).
    #[arg(long)]
    pub json: bool,
}

/// A checked probe request.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// `vendor/model`.
    pub model: String,
    /// The device's link, defaults filled in from the profile as `run` fills them.
    pub link: LinkTarget,
    /// Deadline of the whole probe.
    pub timeout: Duration,
    pub reply_timeout: Option<Duration>,
    pub diagnostic: Option<String>,
}

/// What a probe found.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub model: String,
    pub link: String,
    pub read: DeviceRead,
    pub evaluation: Evaluation,
    pub stats: Stats,
    pub presence: Option<Presence>,
    /// Answer of the requested diagnostic, personal fields removed.
    pub diagnostic: Option<(String, serde_json::Value)>,
}

fn usage(msg: impl Into<String>) -> TransportError {
    TransportError::Config(msg.into())
}

/// The transport the flags describe, with exactly that transport's keys: the value a
/// `[[device]]` entry of the agent's config holds.
pub fn transport_from_args(args: &ProbeArgs) -> Result<Transport, TransportError> {
    let need = |v: &Option<String>, flag: &str| {
        v.clone().filter(|s| !s.trim().is_empty()).ok_or_else(|| {
            usage(format!(
                "--transport {} needs {flag}",
                args.transport.name()
            ))
        })
    };
    Ok(match args.transport {
        TransportArg::Serial => Transport::Serial(SerialLink {
            port: need(&args.port, "--port")?,
            baud: args.baud,
        }),
        TransportArg::ModbusRtu => Transport::ModbusRtu(ModbusRtuLink {
            port: need(&args.port, "--port")?,
            baud: args.baud,
            parity: args.parity.map(|p| match p {
                ParityArg::None => Parity::None,
                ParityArg::Even => Parity::Even,
                ParityArg::Odd => Parity::Odd,
            }),
            unit: args.unit,
        }),
        TransportArg::ModbusTcp => Transport::ModbusTcp(ModbusTcpLink {
            address: need(&args.address, "--address")?,
            unit: args.unit,
        }),
        TransportArg::Mqtt => Transport::Mqtt(MqttLink {
            broker: need(&args.broker, "--broker")?,
            serial: need(&args.serial, "--serial")?,
            username: args.username.clone(),
            password_file: args.password_file.clone(),
            ca_file: args.ca_file.clone(),
        }),
    })
}

/// Checks the arguments against the profile set and builds the target.
pub fn target_from_args(args: &ProbeArgs, set: &ProfileSet) -> Result<ProbeTarget, TransportError> {
    let family = set
        .family(&args.profile)
        .map_err(|e| usage(e.to_string()))?;
    let first: &Arc<Profile> = family
        .first()
        .ok_or_else(|| usage(format!("no profile for `{}`", args.profile)))?;
    let t = &first.doc.transport;
    let want = match args.transport {
        TransportArg::Serial => TransportKind::Serial,
        TransportArg::ModbusRtu | TransportArg::ModbusTcp => TransportKind::Modbus,
        TransportArg::Mqtt => TransportKind::Mqtt,
    };
    if t.kind != want {
        return Err(usage(format!(
            "{} is a {} device; --transport {} does not fit it",
            args.profile,
            match t.kind {
                TransportKind::Serial => "serial",
                TransportKind::Modbus => "Modbus (modbus-rtu or modbus-tcp)",
                TransportKind::Mqtt => "MQTT",
            },
            args.transport.name()
        )));
    }
    let link = transport_from_args(args)?.resolve(t);
    match &link {
        LinkTarget::Modbus {
            endpoint: Endpoint::Rtu { .. },
            unit: 0,
        } => {
            return Err(usage(
                "--unit 0 is the broadcast address; a read needs 1-247",
            ))
        }
        LinkTarget::Mqtt(m) => {
            mqtt::parse_broker(&m.broker)?;
        }
        _ => {}
    }
    if let Some(d) = &args.diagnostic {
        if !family.iter().any(|p| p.diagnostic_names().any(|n| n == d)) {
            let names: Vec<&str> = family.iter().flat_map(|p| p.diagnostic_names()).collect();
            return Err(usage(format!(
                "{} lists no diagnostic `{d}` (it lists: {})",
                args.profile,
                names.join(", ")
            )));
        }
        if matches!(link, LinkTarget::Mqtt(_)) {
            return Err(usage(
                "diagnostics of an MQTT device are commands to it; probe does not send them",
            ));
        }
    }
    let status_interval = t
        .status_interval
        .map(|d| d.0)
        .unwrap_or(Duration::from_secs(10));
    let timeout = args.timeout.unwrap_or(match link {
        // The device publishes on its own schedule: wait one interval and some.
        LinkTarget::Mqtt(_) => status_interval + Duration::from_secs(5),
        _ => Duration::from_secs(10),
    });
    Ok(ProbeTarget {
        model: args.profile.clone(),
        link,
        timeout,
        reply_timeout: args.reply_timeout,
        diagnostic: args.diagnostic.clone(),
    })
}

/// Reads the device once and evaluates what it sent at the current time.
pub async fn probe(target: &ProbeTarget, set: &ProfileSet) -> Result<ProbeReport, TransportError> {
    match tokio::time::timeout(target.timeout, probe_inner(target, set)).await {
        Ok(r) => r,
        Err(_) => Err(TransportError::Timeout {
            what: format!("probe of {}", target.link.describe()),
            after: target.timeout,
            detail: " in all".into(),
        }),
    }
}

async fn probe_inner(
    target: &ProbeTarget,
    set: &ProfileSet,
) -> Result<ProbeReport, TransportError> {
    let model = target.model.as_str();
    let (read, stats, presence, diagnostic) = match &target.link {
        LinkTarget::Serial { port, baud } => {
            let mut dev = SerialDevice::open(port, Some(*baud), set, model)?;
            if let Some(t) = target.reply_timeout {
                dev.set_reply_timeout(t);
            }
            let read = dev.read_once(set, model).await?;
            let diagnostic = match &target.diagnostic {
                Some(name) => {
                    let fields = dev.diagnostic(&read.profile, name).await?;
                    Some((name.clone(), json!(fields)))
                }
                None => None,
            };
            (read, dev.stats().clone(), None, diagnostic)
        }
        LinkTarget::Modbus { endpoint, unit } => {
            let mut bus = ModbusBus::new(endpoint.clone());
            modbus_read(&mut bus, *unit, target, set).await?
        }
        LinkTarget::Mqtt(link) => {
            let src = MqttSource::from_link(link)?;
            // The whole deadline is the wait; the outer timeout is only a backstop.
            let wait = target.timeout.saturating_sub(Duration::from_millis(100));
            let r = mqtt::read_status(&src, set, model, wait).await?;
            (r.read, r.stats, r.presence, None)
        }
    };
    let evaluation = read.profile.evaluate(
        &read.snapshot,
        jiff::Timestamp::now(),
        &mut RuleState::default(),
    );
    Ok(ProbeReport {
        model: model.to_string(),
        link: target.link.describe(),
        read,
        evaluation,
        stats,
        presence,
        diagnostic,
    })
}

type Outcome = (
    DeviceRead,
    Stats,
    Option<Presence>,
    Option<(String, serde_json::Value)>,
);

async fn modbus_read(
    bus: &mut ModbusBus,
    unit: u8,
    target: &ProbeTarget,
    set: &ProfileSet,
) -> Result<Outcome, TransportError> {
    let read = bus
        .read_once(unit, set, &target.model, target.reply_timeout)
        .await?;
    let diagnostic = match &target.diagnostic {
        Some(name) => {
            let words = bus.diagnostic(unit, &read.profile, name).await?;
            Some((name.clone(), json!(words)))
        }
        None => None,
    };
    bus.close();
    Ok((read, bus.stats(unit), None, diagnostic))
}

/// The report as JSON: the same content as the text form.
pub fn render_json(r: &ProbeReport) -> serde_json::Value {
    let d = &r.read.profile.doc.device;
    let mut v = json!({
        "ok": true,
        "profile": r.model,
        "vendor": d.vendor,
        "model": d.model,
        "kind": d.kind,
        "firmware": r.read.identity.firmware,
        "serial": r.read.identity.serial,
        "profile_firmware": d.firmware,
        "profile_source": r.read.profile.source,
        "manual": d.manual,
        "link": r.link,
        "transport": r.stats,
        "state": r.evaluation.state,
        "readings": r.evaluation.readings,
        "signals": r.evaluation.signals,
        "issues": r.read.snapshot.issues,
    });
    if let Some(p) = &r.presence {
        v["presence"] = json!(match p {
            Presence::Online => "online",
            Presence::Offline => "offline",
            Presence::Other => "other",
        });
    }
    if let Some((name, answer)) = &r.diagnostic {
        v["diagnostic"] = json!({"name": name, "answer": answer});
    }
    v
}

/// The report for a person.
pub fn render_text(r: &ProbeReport) -> String {
    use std::fmt::Write as _;
    let d = &r.read.profile.doc.device;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "device    {} {}  serial {}  firmware {}",
        d.vendor,
        d.model,
        r.read
            .identity
            .serial
            .as_deref()
            .unwrap_or("(not reported)"),
        r.read.identity.firmware
    );
    let _ = writeln!(
        s,
        "profile   {} {} ({}, {})",
        d.id, d.firmware, r.read.profile.source, d.manual
    );
    let _ = writeln!(s, "link      {}", r.link);
    let _ = writeln!(s, "transport {}", r.stats.summary());
    if let Some(p) = &r.presence {
        let p = match p {
            Presence::Online => "online",
            Presence::Offline => "offline",
            Presence::Other => "unknown",
        };
        let _ = writeln!(s, "presence  {p} (the device's last-will topic)");
    }
    let _ = writeln!(s, "state     {}", r.evaluation.state);
    let _ = writeln!(s);
    let _ = writeln!(s, "readings");
    let width = r
        .evaluation
        .readings
        .iter()
        .map(|x| x.name.len())
        .max()
        .unwrap_or(0);
    for rd in &r.evaluation.readings {
        let unit = rd
            .unit
            .as_deref()
            .map(|u| format!(" {u}"))
            .unwrap_or_default();
        let _ = writeln!(s, "  {:<width$}  {}{unit}", rd.name, rd.value);
    }
    if !r.read.snapshot.issues.is_empty() {
        let _ = writeln!(s);
        let _ = writeln!(s, "decoding issues");
        for i in &r.read.snapshot.issues {
            let _ = writeln!(s, "  {i}");
        }
    }
    let _ = writeln!(s);
    if r.evaluation.signals.is_empty() {
        let _ = writeln!(s, "signals   none active");
    } else {
        let _ = writeln!(s, "signals ({})", r.evaluation.signals.len());
        for sig in &r.evaluation.signals {
            let _ = writeln!(
                s,
                "  {:<22} {:<16} {:<8} {}",
                sig.code,
                sig.kind.as_str(),
                sig.class.map(|c| c.as_str()).unwrap_or("-"),
                sig.description
            );
            if let Some(due) = &sig.due {
                let _ = writeln!(s, "      due: {due}");
            }
            if let Some(a) = &sig.action {
                let _ = writeln!(s, "      action: {a}");
            }
        }
    }
    if let Some((name, answer)) = &r.diagnostic {
        let _ = writeln!(s);
        let _ = writeln!(s, "diagnostic {name}");
        match answer {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let v = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    let _ = writeln!(s, "  {k} = {v}");
                }
            }
            other => {
                let _ = writeln!(s, "  {other}");
            }
        }
    }
    s
}

/// Runs the command with its output going to `out` and `err`; returns the exit code.
pub fn run(args: ProbeArgs, out: &mut dyn Write, err: &mut dyn Write) -> ExitCode {
    let json_out = args.json;
    let fail = |out: &mut dyn Write, err: &mut dyn Write, e: &TransportError| {
        let code = if e.is_config() {
            EXIT_USAGE
        } else {
            EXIT_UNREADABLE
        };
        let _ = writeln!(err, "probe: error: {e}");
        if json_out {
            let _ = writeln!(out, "{}", json!({"ok": false, "error": e.to_string()}));
        }
        ExitCode::from(code)
    };
    let mut set = match ProfileSet::builtin() {
        Ok(s) => s,
        Err(e) => return fail(out, err, &usage(format!("built-in profiles: {e}"))),
    };
    if let Some(dir) = &args.profiles {
        if let Err(e) = set.load_dir(dir) {
            return fail(out, err, &usage(e.to_string()));
        }
    }
    let target = match target_from_args(&args, &set) {
        Ok(t) => t,
        Err(e) => return fail(out, err, &e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "probe: error: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_UNREADABLE);
        }
    };
    match rt.block_on(probe(&target, &set)) {
        Ok(report) => {
            if json_out {
                let _ = writeln!(out, "{}", render_json(&report));
            } else {
                let _ = write!(out, "{}", render_text(&report));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(out, err, &e),
    }
}

/// Entry point of `tend-agent probe`.
pub fn main(args: ProbeArgs) -> ExitCode {
    run(args, &mut std::io::stdout(), &mut std::io::stderr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ProbeArgs,
    }

    fn target(argv: &[&str]) -> Result<ProbeTarget, TransportError> {
        let set = ProfileSet::builtin().expect("built-in profiles");
        let cli = Cli::try_parse_from(std::iter::once("probe").chain(argv.iter().copied()))
            .map_err(|e| usage(e.to_string()))?;
        target_from_args(&cli.args, &set)
    }

    #[test]
    fn modbus_defaults_come_from_the_profile() {
        let t = target(&[
            "--profile",
            "aeris/av-500",
            "--transport",
            "modbus-tcp",
            "--address",
            "10.0.0.5",
        ])
        .unwrap();
        assert!(
            matches!(&t.link, LinkTarget::Modbus { endpoint: Endpoint::Tcp(address), unit: 1 } if address == "10.0.0.5:502")
        );
        let t = target(&[
            "--profile",
            "aeris/av-500",
            "--transport",
            "modbus-rtu",
            "--port",
            "/dev/ttyUSB0",
        ])
        .unwrap();
        assert!(matches!(
            &t.link,
            LinkTarget::Modbus {
                endpoint: Endpoint::Rtu {
                    baud: 19200,
                    parity: Parity::Even,
                    ..
                },
                unit: 1,
            }
        ));
        assert_eq!(t.timeout, Duration::from_secs(10));
        let t = target(&[
            "--profile",
            "aeris/av-500",
            "--transport",
            "modbus-tcp",
            "--address",
            "[::1]:1502",
            "--unit",
            "3",
        ])
        .unwrap();
        assert!(
            matches!(&t.link, LinkTarget::Modbus { endpoint: Endpoint::Tcp(address), unit: 3 } if address == "[::1]:1502")
        );
    }

    #[test]
    fn flags_and_config_reach_a_device_the_same_way() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["--transport", "modbus-tcp", "--address", "10.0.0.5"],
                "transport = \"modbus-tcp\"\naddress = \"10.0.0.5\"",
            ),
            (
                &["--transport", "modbus-rtu", "--port", "/dev/ttyUSB0"],
                "transport = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"",
            ),
            (
                &[
                    "--transport",
                    "modbus-rtu",
                    "--port",
                    "/dev/ttyUSB0",
                    "--parity",
                    "odd",
                    "--baud",
                    "9600",
                    "--unit",
                    "4",
                ],
                "transport = \"modbus-rtu\"\nport = \"/dev/ttyUSB0\"\nparity = \"odd\"\nbaud = 9600\nunit = 4",
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        tend_testkit::trust::credentials(dir.path(), "a");
        for (flags, keys) in cases {
            let mut argv = vec!["--profile", "aeris/av-500"];
            argv.extend_from_slice(flags);
            let probed = target(&argv).unwrap().link;
            let src = format!(
                "agent_id = \"a\"\nsite_id = \"s\"\ndata_dir = \"d\"\n[uplink]\nbroker = \"mqtt://h\"\ncredentials = \"a.cred\"\n\
                 [[device]]\nid = \"v\"\nprofile = \"aeris/av-500\"\n{keys}\n"
            );
            let l = crate::config::parse("agent.toml", &src, dir.path()).unwrap();
            let d = &l.config.devices[0];
            let family = l.profiles.family(&d.profile).unwrap();
            assert_eq!(
                d.transport.resolve(&family[0].doc.transport),
                probed,
                "{keys}"
            );
        }
    }

    #[test]
    fn mqtt_waits_one_status_interval_by_default() {
        let t = target(&[
            "--profile",
            "vistara/vm-12",
            "--transport",
            "mqtt",
            "--broker",
            "mqtt://h:1883",
            "--serial",
            "VM12-1",
        ])
        .unwrap();
        assert_eq!(t.timeout, Duration::from_secs(15));
    }

    #[test]
    fn bad_arguments_are_config_errors() {
        for argv in [
            &[
                "--profile",
                "aeris/av-500",
                "--transport",
                "serial",
                "--port",
                "/dev/x",
            ][..],
            &["--profile", "aeris/av-500", "--transport", "modbus-tcp"],
            &[
                "--profile",
                "aeris/av-500",
                "--transport",
                "modbus-rtu",
                "--port",
                "/dev/x",
                "--unit",
                "0",
            ],
            &[
                "--profile",
                "lumen/lip-300",
                "--transport",
                "serial",
                "--port",
                "/dev/x",
                "--diagnostic",
                "reset",
            ],
            &[
                "--profile",
                "vistara/vm-12",
                "--transport",
                "mqtt",
                "--broker",
                // mqtts:// works now (tend-mqtt); another scheme is still refused.
                "tcp://h",
                "--serial",
                "V",
            ],
            &[
                "--profile",
                "nobody/nothing",
                "--transport",
                "serial",
                "--port",
                "/dev/x",
            ],
        ] {
            let e = target(argv).unwrap_err();
            assert!(e.is_config(), "{argv:?}: {e}");
        }
    }
}

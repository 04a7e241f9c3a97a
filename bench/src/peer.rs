//! The peer: ThingsBoard IoT Gateway (PyPI `thingsboard-gateway`, pinned by
//! `scripts/bench`) with its Modbus connector reading the same simulated ventilators and
//! the same registers as the agent, publishing to a local mosquitto.
//!
//! Without a ThingsBoard server the gateway asks `getSessionLimits` on
//! `v1/devices/me/rpc/request/<n>` and forwards nothing until answered; the responder here
//! answers with no limits and counts what the gateway publishes (`v1/gateway/telemetry`:
//! messages and datapoints), so a peer that publishes nothing is caught.

use crate::mqtt;
use crate::procs_util::{self, Proc};
use crate::tend::Target;
use rumqttc::QoS;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::Command;

/// mosquitto on a free port of 127.0.0.1, no persistence, anonymous.
pub async fn start_mosquitto(bin: &Path, dir: &Path) -> anyhow::Result<(Proc, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = procs_util::free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )?;
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let mut p = procs_util::spawn("mosquitto", cmd, &dir.join("mosquitto.log"), false)?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((p, port));
        }
        if !p.alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("mosquitto did not listen on {port}:\n{}", p.tail())
}

/// What the peer published, counted by the responder.
#[derive(Debug, Default)]
pub struct Counts {
    pub telemetry_messages: AtomicU64,
    pub datapoints: AtomicU64,
    pub other_messages: AtomicU64,
    pub rpc_answered: AtomicU64,
}

impl Counts {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.telemetry_messages.load(Ordering::Relaxed),
            self.datapoints.load(Ordering::Relaxed),
        )
    }
}

/// The session-limits responder and message counter, on mosquitto at `port`.
pub async fn responder(port: u16) -> anyhow::Result<(Arc<Counts>, tokio::task::JoinHandle<()>)> {
    let mut c = mqtt::connect(
        "127.0.0.1",
        port,
        "bench-peer-responder",
        &["v1/#".to_string()],
    )
    .await?;
    let counts = Arc::new(Counts::default());
    let k = counts.clone();
    let task = tokio::spawn(async move {
        while let Some(m) = c.rx.recv().await {
            if let Some(id) = m.topic.strip_prefix("v1/devices/me/rpc/request/") {
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                if v["method"] == "getSessionLimits" {
                    let answer = serde_json::json!({
                        "maxInflightMessages": 100,
                        "maxPayloadSize": 65536,
                        "rateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""},
                        "gatewayRateLimits": {"messages": "", "telemetryMessages": "", "telemetryDataPoints": ""}
                    });
                    let _ = c
                        .client
                        .publish(
                            format!("v1/devices/me/rpc/response/{id}"),
                            QoS::AtLeastOnce,
                            false,
                            answer.to_string(),
                        )
                        .await;
                    k.rpc_answered.fetch_add(1, Ordering::Relaxed);
                }
            } else if m.topic == "v1/gateway/telemetry" {
                k.telemetry_messages.fetch_add(1, Ordering::Relaxed);
                // {"device": [{"ts": .., "values": {..}}, ..], ..}
                let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
                let n: usize = v
                    .as_object()
                    .map(|o| {
                        o.values()
                            .filter_map(|d| d.as_array())
                            .flatten()
                            .map(|e| {
                                e.get("values")
                                    .and_then(|x| x.as_object())
                                    .map_or(0, |x| x.len())
                            })
                            .sum()
                    })
                    .unwrap_or(0);
                k.datapoints.fetch_add(n as u64, Ordering::Relaxed);
            } else {
                k.other_messages.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Ok((counts, task))
}

/// `tb_gateway.json`: the local mosquitto, remote configuration and shell off, statistics
/// off, memory storage, one Modbus connector.
fn tb_gateway_json(port: u16) -> serde_json::Value {
    serde_json::json!({
        "thingsboard": {
            "host": "127.0.0.1",
            "port": port,
            "remoteShell": false,
            "remoteConfiguration": false,
            "latencyDebugMode": false,
            "statistics": {"enable": false, "statsSendPeriodInSeconds": 3600, "customStatsSendPeriodInSeconds": 3600},
            "deviceFiltering": {"enable": false, "filterFile": "list.json"},
            "maxPayloadSizeBytes": 8196,
            "minPackSendDelayMS": 50,
            "minPackSizeToSend": 500,
            "checkConnectorsConfigurationInSeconds": 60,
            "handleDeviceRenaming": true,
            "security": {"type": "accessToken", "accessToken": "bench"},
            "qos": 1,
            "reportStrategy": {"type": "ON_RECEIVED"},
            "checkingDeviceActivity": {"checkDeviceInactivity": false, "inactivityTimeoutSeconds": 300, "inactivityCheckPeriodSeconds": 10}
        },
        "storage": {"type": "memory", "read_records_count": 100, "max_records_count": 100000},
        "grpc": {"enabled": false},
        "connectors": [{"type": "modbus", "name": "Modbus", "configuration": "modbus.json"}]
    })
}

/// `modbus.json`: one slave per simulator (its endpoint and unit id), the registers the agent's AV-500 5.x profile
/// reads every poll (holding 11–12, input 0–15) as two address ranges (one request each,
/// the cheaper form), every second.
fn modbus_json(devices: &[Target]) -> serde_json::Value {
    let slaves: Vec<serde_json::Value> = devices
        .iter()
        .enumerate()
        .map(|(i, target)| {
            let (link, unit) = match target {
                Target::Tcp(a, unit) => (
                    serde_json::json!({
                        "host": a.ip().to_string(),
                        "port": a.port(),
                        "type": "tcp",
                        "method": "socket",
                    }),
                    unit,
                ),
                // The AV-500's bus: 19200 baud, 8 data bits, 1 stop bit, and the manual's
                // 5 ms between requests, which the agent keeps too. Parity none, not the
                // bus's even: pyserial's tcsetattr with even parity fails on a Linux pty
                // (EINVAL), and a pty carries no parity bit, so the bytes are the same.
                Target::Bus(path, unit) => (
                    serde_json::json!({
                        "delayBetweenRequestsMs": 5,
                        "port": path.display().to_string(),
                        "type": "serial",
                        "method": "rtu",
                        "baudrate": 19200,
                        "bytesize": 8,
                        "parity": "N",
                        "stopbits": 1,
                    }),
                    unit,
                ),
            };
            let mut slave = serde_json::json!({
                "unitId": unit,
                "deviceName": crate::tend::device_id(i),
                "deviceType": "ventilator",
                "timeout": 1,
                "byteOrder": "BIG",
                "wordOrder": "LITTLE",
                "retries": 1,
                "retryOnEmpty": true,
                "retryOnInvalid": true,
                "pollPeriod": 1000,
                "connectAttemptTimeMs": 5000,
                "connectAttemptCount": 5,
                "waitAfterFailedAttemptsMs": 300000,
                "attributes": [],
                "timeseries": [
                    {"tag": "hr_${address}", "type": "16uint", "functionCode": 3, "objectsCount": 1, "address": "11-12"},
                    {"tag": "ir_${address}", "type": "16uint", "functionCode": 4, "objectsCount": 1, "address": "0-15"}
                ],
                "attributeUpdates": [],
                "rpc": []
            });
            if let (Some(s), serde_json::Value::Object(l)) = (slave.as_object_mut(), link) {
                s.extend(l);
            }
            slave
        })
        .collect();
    serde_json::json!({"master": {"slaves": slaves}})
}

/// The installed package's own folder (for its default `logs.json`).
fn package_dir(venv: &Path) -> anyhow::Result<PathBuf> {
    let lib = venv.join("lib");
    for e in std::fs::read_dir(&lib)? {
        let p = e?.path().join("site-packages/thingsboard_gateway");
        if p.is_dir() {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "thingsboard_gateway is not installed in {} (scripts/bench installs it)",
        venv.display()
    )
}

/// Starts the peer in `dir` (its config, `./logs`, and its output).
pub fn start(venv: &Path, dir: &Path, port: u16, devices: &[Target]) -> anyhow::Result<Proc> {
    let config = dir.join("config");
    std::fs::create_dir_all(&config)?;
    // Without ./logs the logging config fails (and pymodbus floods the console).
    std::fs::create_dir_all(dir.join("logs"))?;
    std::fs::copy(
        package_dir(venv)?.join("config/logs.json"),
        config.join("logs.json"),
    )?;
    std::fs::write(
        config.join("tb_gateway.json"),
        serde_json::to_vec_pretty(&tb_gateway_json(port))?,
    )?;
    std::fs::write(
        config.join("modbus.json"),
        serde_json::to_vec_pretty(&modbus_json(devices))?,
    )?;
    let mut cmd = Command::new(venv.join("bin/thingsboard-gateway"));
    cmd.current_dir(dir)
        .env("TB_GW_CONFIG_DIR", &config)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    procs_util::spawn("thingsboard-gateway", cmd, &dir.join("peer.out"), false)
}

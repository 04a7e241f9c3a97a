//! The hotline from a terminal: the client side of `tend-gateway`'s hotline subcommands
//! (`devices`, `device`, `availability`, `tickets`, `diag`, `retry`). They call the
//! gateway's HTTP API (see [`crate::api`]) and print a table, or the API's JSON with
//! `--json`.
//!
//! Where the API is and its token come from the gateway's own config (`--config
//! gateway.toml`: `[api] listen` and `token_file`), or from `--api URL` and
//! `--token-file PATH`; flags given win over the config. A gateway listening on an
//! unspecified address (`0.0.0.0`, `[::]`) is contacted on loopback.
//!
//! The rendering functions ([`render_devices`], [`render_tickets`], ...) are pure, so the
//! demo prints the same tables from the same JSON.

use crate::config;
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Where the hotline API is and how to authenticate.
#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
pub struct ApiTarget {
    /// The gateway's config file: the API address and token file are its `[api] listen`
    /// and `token_file`.
    #[arg(long, global = true, value_name = "gateway.toml")]
    pub config: Option<PathBuf>,
    /// The hotline API's base URL (`http://127.0.0.1:8080`), instead of the config's.
    #[arg(long, global = true, value_name = "URL")]
    pub api: Option<String>,
    /// The file holding the hotline token, instead of the config's.
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// The hotline subcommands.
#[derive(clap::Subcommand, Debug, Clone, PartialEq)]
pub enum HotlineCommand {
    /// Every fleet device: state, availability this month, downtime budget, open faults,
    /// last seen.
    Devices,
    /// One device: identity, live readings, open faults, allowed diagnostics, tickets.
    Device {
        /// The device id (as in the fleet file).
        id: String,
    },
    /// A device's availability report (default: this month so far).
    Availability {
        id: String,
        /// Start, RFC 3339 (`2026-11-01T00:00:00+08:00`); default: the first of the month.
        #[arg(long)]
        from: Option<String>,
        /// End, RFC 3339; default: now.
        #[arg(long)]
        to: Option<String>,
    },
    /// The gateway's tickets with their deadlines and forwarding state.
    Tickets {
        /// Only this device's tickets.
        #[arg(long)]
        device: Option<String>,
        /// Only open tickets.
        #[arg(long)]
        open: bool,
    },
    /// Run a read-only diagnostic on a device (audit-logged by the gateway).
    Diag {
        id: String,
        /// `readings`, `transport`, `episodes`, `outbox`, or one the device's profile lists
        /// (`tend-gateway device <id>` shows them).
        request: String,
    },
    /// Put a ticket the backend refused back in the forwarder's queue (audit-logged).
    Retry {
        /// The ticket's key (as `tickets` shows it).
        key: String,
    },
    /// Deadlines met and missed per kind (respond, onsite, plan, resolve), and the rate met
    /// (default: this month).
    Sla {
        /// Only this customer's tickets.
        #[arg(long)]
        customer: Option<String>,
        /// Start, RFC 3339; default: the first of the month.
        #[arg(long)]
        from: Option<String>,
        /// End, RFC 3339; default: the end of the month.
        #[arg(long)]
        to: Option<String>,
    },
    /// Reports for the customer.
    #[command(subcommand)]
    Report(ReportCommand),
}

/// `tend-gateway report ...`
#[derive(clap::Subcommand, Debug, Clone, PartialEq)]
pub enum ReportCommand {
    /// The monthly service report of a customer: availability, coverage and budget per
    /// device with a timeline, tickets with every deadline met or missed, maintenance,
    /// consumables.
    Monthly {
        /// The customer's id (as in the fleet file).
        #[arg(long)]
        customer: String,
        /// The month, YYYY-MM; default: this month.
        #[arg(long)]
        month: Option<String>,
        /// `text` (a summary table), `csv`, `html` (printable on A4) or `json`.
        #[arg(long, default_value = "text")]
        format: String,
        /// Write the report to this file instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The hotline subcommands with where to reach the API: what `main` embeds as one
/// subcommand (`tend-gateway hotline devices --config gateway.toml`).
#[derive(clap::Args, Debug, Clone, PartialEq)]
pub struct HotlineArgs {
    #[command(flatten)]
    pub target: ApiTarget,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: HotlineCommand,
}

/// Why a hotline command failed: the message for stderr and the exit code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// 1 for a failed call, 2 for an unusable configuration or command line.
    pub code: i32,
    pub message: String,
}

impl Failure {
    fn call(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

/// Runs [`HotlineArgs`]: see [`run`].
pub async fn run_args(args: &HotlineArgs) -> std::io::Result<i32> {
    run(&args.target, &args.command, args.json).await
}

/// Runs one hotline command, prints its table (or JSON) on stdout, or a message on
/// stderr, and returns the exit code (0, 1 for a failed call, 2 for a bad config). The
/// error is stdout refusing the output (a closed pipe): there is nobody left to tell.
pub async fn run(target: &ApiTarget, cmd: &HotlineCommand, json: bool) -> std::io::Result<i32> {
    match output(target, cmd, json).await {
        Ok(text) => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(0)
        }
        Err(f) => {
            eprintln!("tend-gateway: {}", f.message);
            Ok(f.code)
        }
    }
}

/// The resolved endpoint.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub base: Url,
    pub token: String,
    /// Where the token came from (for "wrong token from <file>").
    pub token_file: PathBuf,
    /// Longest wait for one call (a diagnostic waits for the agent).
    pub timeout: Duration,
}

/// The URL to contact for a listen address: an unspecified one is reached on loopback.
pub fn url_for_listen(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(v) if v.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v) if v.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

/// Resolves `--config` / `--api` / `--token-file` into an endpoint.
pub fn resolve(target: &ApiTarget) -> Result<Endpoint, Failure> {
    let mut base = target.api.clone();
    let mut token_file = target.token_file.clone();
    let mut timeout = Duration::from_secs(40);
    if let Some(path) = &target.config {
        let loaded = config::load(path).map_err(|e| Failure::usage(e.to_string()))?;
        let api = &loaded.config.api;
        base.get_or_insert_with(|| url_for_listen(api.listen));
        token_file.get_or_insert_with(|| api.token_file.clone());
        timeout = api.diag_timeout.0 + Duration::from_secs(30);
    }
    let (Some(base), Some(token_file)) = (base, token_file) else {
        return Err(Failure::usage(
            "where is the gateway? give --config gateway.toml, or --api URL and --token-file PATH",
        ));
    };
    let with_scheme = if base.contains("://") {
        base.clone()
    } else {
        format!("http://{base}")
    };
    let base = Url::parse(&with_scheme)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
        .ok_or_else(|| Failure::usage(format!("{base:?} is not an http:// or https:// URL")))?;
    let token = config::read_secret(&token_file).map_err(|e| Failure::usage(e.to_string()))?;
    Ok(Endpoint {
        base,
        token,
        token_file,
        timeout,
    })
}

fn url(base: &Url, segments: &[&str], query: &[(&str, &str)]) -> Url {
    let mut u = base.clone();
    if let Ok(mut p) = u.path_segments_mut() {
        p.pop_if_empty();
        // Each segment is percent-encoded ('/' in a ticket key becomes %2F).
        p.extend(segments);
    }
    if !query.is_empty() {
        let mut q = u.query_pairs_mut();
        for (k, v) in query {
            q.append_pair(k, v);
        }
    }
    u
}

/// Calls the API for `cmd` and returns what to print.
pub async fn output(
    target: &ApiTarget,
    cmd: &HotlineCommand,
    json: bool,
) -> Result<String, Failure> {
    let ep = resolve(target)?;
    let (method, u, body) = match cmd {
        HotlineCommand::Devices => (
            Method::GET,
            url(&ep.base, &["api", "v1", "devices"], &[]),
            None,
        ),
        HotlineCommand::Device { id } => (
            Method::GET,
            url(&ep.base, &["api", "v1", "devices", id], &[]),
            None,
        ),
        HotlineCommand::Availability { id, from, to } => {
            let mut q = Vec::new();
            if let Some(f) = from {
                q.push(("from", f.as_str()));
            }
            if let Some(t) = to {
                q.push(("to", t.as_str()));
            }
            (
                Method::GET,
                url(&ep.base, &["api", "v1", "devices", id, "availability"], &q),
                None,
            )
        }
        HotlineCommand::Tickets { device, open } => {
            let mut q = Vec::new();
            if let Some(d) = device {
                q.push(("device", d.as_str()));
            }
            if *open {
                q.push(("open", "true"));
            }
            (
                Method::GET,
                url(&ep.base, &["api", "v1", "tickets"], &q),
                None,
            )
        }
        HotlineCommand::Diag { id, request } => (
            Method::POST,
            url(&ep.base, &["api", "v1", "devices", id, "diagnostics"], &[]),
            Some(serde_json::json!({ "request": request })),
        ),
        HotlineCommand::Retry { key } => (
            Method::POST,
            url(&ep.base, &["api", "v1", "tickets", key, "retry"], &[]),
            None,
        ),
        HotlineCommand::Sla { customer, from, to } => {
            let mut q = Vec::new();
            for (k, v) in [("customer", customer), ("from", from), ("to", to)] {
                if let Some(v) = v {
                    q.push((k, v.as_str()));
                }
            }
            (Method::GET, url(&ep.base, &["api", "v1", "sla"], &q), None)
        }
        HotlineCommand::Report(ReportCommand::Monthly {
            customer,
            month,
            format,
            ..
        }) => {
            if !["text", "csv", "html", "json"].contains(&format.as_str()) {
                return Err(Failure::usage(format!(
                    "--format {format:?}: text, csv, html or json"
                )));
            }
            let mut q = vec![("customer", customer.as_str())];
            if let Some(m) = month {
                q.push(("month", m.as_str()));
            }
            (
                Method::GET,
                url(&ep.base, &["api", "v1", "reports", "monthly"], &q),
                None,
            )
        }
    };
    let v = call(&ep, method, u, body).await?;
    if let HotlineCommand::Report(ReportCommand::Monthly { format, out, .. }) = cmd {
        let text = match (json, format.as_str()) {
            (true, _) | (_, "json") => pretty(&v) + "\n",
            (_, "csv") => crate::report::render_csv(&v),
            (_, "html") => crate::report::render_html(&v),
            _ => render_report(&v),
        };
        return match out {
            Some(path) => std::fs::write(path, &text)
                .map(|()| format!("report written to {}\n", path.display()))
                .map_err(|e| Failure::call(format!("cannot write {}: {e}", path.display()))),
            None => Ok(text),
        };
    }
    if json {
        let mut s = pretty(&v);
        s.push('\n');
        return Ok(s);
    }
    Ok(match cmd {
        HotlineCommand::Devices => render_devices(&v),
        HotlineCommand::Device { .. } => render_device(&v),
        HotlineCommand::Availability { .. } => render_availability(&v),
        HotlineCommand::Tickets { .. } => render_tickets(&v),
        HotlineCommand::Diag { .. } => render_diag(&v),
        HotlineCommand::Retry { .. } => render_retry(&v),
        HotlineCommand::Sla { .. } => render_sla(&v),
        HotlineCommand::Report(_) => render_report(&v),
    })
}

/// `GET /api/v1/sla` as a table: per deadline kind met, missed, at risk, pending, rate.
pub fn render_sla(v: &Value) -> String {
    let rows: Vec<Vec<String>> = ["respond", "onsite", "plan", "resolve"]
        .iter()
        .map(|k| {
            let d = &v["deadlines"][*k];
            vec![
                k.to_string(),
                s(&d["met"]),
                s(&d["missed"]),
                s(&d["at_risk"]),
                s(&d["pending"]),
                percent(&d["rate"]),
            ]
        })
        .chain(std::iter::once(vec![
            "all".into(),
            s(&v["met"]),
            s(&v["missed"]),
            String::new(),
            String::new(),
            percent(&v["rate"]),
        ]))
        .collect();
    let mut out = format!(
        "deadlines due {} .. {}{}\n",
        short_time(&v["from"]),
        short_time(&v["to"]),
        match v["customer"].as_str() {
            Some(c) => format!(" (customer {c})"),
            None => String::new(),
        }
    );
    out.push_str(&table(
        &[
            "DEADLINE", "MET", "MISSED", "AT RISK", "PENDING", "RATE MET",
        ],
        &rows,
    ));
    out
}

/// The monthly report as a terminal summary: one line per device.
pub fn render_report(v: &Value) -> String {
    let rows: Vec<Vec<String>> = as_array(&v["devices"])
        .iter()
        .map(|d| {
            let a = &d["availability"];
            let (mut met, mut missed) = (0, 0);
            for t in as_array(&d["tickets"]) {
                for (_, dl) in t["deadlines"].as_object().into_iter().flatten() {
                    if dl["in_month"] == Value::Bool(false) {
                        continue;
                    }
                    match dl["status"].as_str() {
                        Some("met") => met += 1,
                        Some("missed") => missed += 1,
                        _ => {}
                    }
                }
            }
            vec![
                s(&d["id"]),
                percent(&a["availability"]),
                percent(&a["coverage"]),
                duration(&a["down_s"]),
                budget(a),
                as_array(&d["tickets"]).len().to_string(),
                format!("{met}/{missed}"),
                s(&d["maintenance"]["next_due"]),
            ]
        })
        .collect();
    let t = &v["totals"];
    let mut out = format!(
        "{} ({}) {}: availability {}, coverage {}, budget {}; deadlines met {} missed {} (rate {})\n",
        s(&v["customer_name"]),
        s(&v["customer"]),
        s(&v["month"]),
        percent(&t["availability"]),
        percent(&t["coverage"]),
        budget(t),
        s(&v["sla"]["met"]),
        s(&v["sla"]["missed"]),
        percent(&v["sla"]["rate"]),
    );
    out.push_str(&table(
        &[
            "DEVICE",
            "AVAILABILITY",
            "COVERAGE",
            "DOWN",
            "BUDGET LEFT",
            "TICKETS",
            "MET/MISSED",
            "NEXT PM",
        ],
        &rows,
    ));
    out
}

async fn call(
    ep: &Endpoint,
    method: Method,
    u: Url,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let client = reqwest::Client::builder()
        .timeout(ep.timeout)
        .build()
        .map_err(|e| Failure::call(format!("cannot make an HTTP client: {e}")))?;
    let mut req = client.request(method, u.clone()).bearer_auth(&ep.token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|e| {
        let what = if e.is_timeout() {
            "no answer in time"
        } else if e.is_connect() {
            "cannot connect (is `tend-gateway run` up, and is this its [api] listen?)"
        } else {
            "request failed"
        };
        Failure::call(format!("{}: {what}: {}", ep.base, source_chain(&e)))
    })?;
    let status = resp.status();
    let text = resp
        .text()
        .await
        .map_err(|e| Failure::call(format!("{}: reading the answer: {e}", ep.base)))?;
    let v: Option<Value> = serde_json::from_str(&text).ok();
    if status == StatusCode::UNAUTHORIZED {
        return Err(Failure::call(format!(
            "401: wrong token from {}",
            ep.token_file.display()
        )));
    }
    if !status.is_success() {
        let msg = v
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(300).collect());
        return Err(Failure::call(format!("{}: {msg}", status.as_u16())));
    }
    v.ok_or_else(|| Failure::call(format!("{u}: the answer is not JSON")))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            let _ = write!(s, ": {t}");
        }
        cur = c.source();
    }
    s
}

// ---------- rendering ----------

/// A plain text table: headers, then rows, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let n = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(n) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut s = String::new();
        for (i, c) in cells.enumerate().take(n) {
            if i + 1 == n {
                s.push_str(c);
            } else {
                let pad = width[i] - c.chars().count();
                let _ = write!(s, "{c}{}  ", " ".repeat(pad));
            }
        }
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(&mut headers.iter().copied());
    for r in rows {
        out.push_str(&line(&mut r.iter().map(String::as_str)));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

/// `0.99532` → `99.532 %`; null → `-`.
pub fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or_else(|| "-".into(), |a| format!("{:.3} %", a * 100.0))
}

/// Seconds as `3h36m`, `6m00s`, `42s`; null → `-`.
pub fn duration(v: &Value) -> String {
    let Some(secs) = v.as_f64() else {
        return "-".into();
    };
    let t = secs.max(0.0).round() as u64;
    let (h, m, sec) = (t / 3600, (t % 3600) / 60, t % 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// An RFC 3339 time without the `T` and fractions: `2026-11-28 11:15:02+08:00`.
pub fn short_time(v: &Value) -> String {
    let Some(t) = v.as_str() else {
        return "-".into();
    };
    let t = t.replacen('T', " ", 1);
    match t.find('.') {
        Some(dot) => {
            let zone = t[dot..].find(['Z', '+', '-']);
            match zone {
                Some(z) => format!("{}{}", &t[..dot], &t[dot + z..]),
                None => t[..dot].to_string(),
            }
        }
        None => t,
    }
}

/// `v` as indented JSON.
fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v)
        .expect("a serde_json::Value always serialises: its keys are strings")
}

fn as_array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// The devices table of `GET /api/v1/devices`.
pub fn render_devices(json: &Value) -> String {
    let rows: Vec<Vec<String>> = as_array(json)
        .iter()
        .map(|d| {
            let mut id = s(&d["id"]);
            if d["in_fleet"] == Value::Bool(false) {
                id.push_str(" (not in fleet)");
            }
            let avail = percent(&d["availability"]);
            let agent = match (&d["agent"], &d["agent_status"]) {
                (Value::String(a), Value::String(st)) => format!("{a} ({st})"),
                (a, _) => s(a),
            };
            vec![
                id,
                s(&d["state"]),
                avail,
                percent(&d["coverage"]),
                budget(d),
                s(&d["open_faults"]),
                short_time(&d["last_seen"]),
                s(&d["model"]),
                s(&d["location"]),
                agent,
            ]
        })
        .collect();
    table(
        &[
            "DEVICE",
            "STATE",
            "AVAILABILITY (MONTH)",
            "COVERAGE",
            "BUDGET LEFT",
            "FAULTS",
            "LAST SEEN",
            "MODEL",
            "LOCATION",
            "AGENT",
        ],
        &rows,
    )
}

fn forwarding(f: &Value) -> (String, String) {
    let mut state = s(&f["state"]);
    if let Some(n) = f["attempts"].as_u64().filter(|n| *n > 0) {
        let _ = write!(state, " ({n} tries)");
    }
    let note = f["error"]
        .as_str()
        .or_else(|| f["detail"].as_str())
        .map(|e| {
            let e = e.replace('\n', " ");
            if e.chars().count() > 80 {
                format!("{}...", e.chars().take(77).collect::<String>())
            } else {
                e
            }
        })
        .unwrap_or_default();
    (state, note)
}

/// The tickets table of `GET /api/v1/tickets`.
pub fn render_tickets(json: &Value) -> String {
    let rows: Vec<Vec<String>> = as_array(json)
        .iter()
        .map(|t| {
            let (mut state, note) = forwarding(&t["forwarding"]);
            let events = as_array(&t["events"]);
            let unsent = events
                .iter()
                .filter(|e| e["forwarding"]["state"] != "sent")
                .count();
            if !events.is_empty() {
                let _ = write!(
                    state,
                    ", events {}/{} sent",
                    events.len() - unsent,
                    events.len()
                );
            }
            if t["open"] == Value::Bool(false) {
                state.push_str(", ended");
            }
            vec![
                s(&t["key"]),
                s(&t["ticket_id"]),
                s(&t["device"]),
                s(&t["kind"]),
                s(&t["class"]),
                short_time(&t["sla"]["respond_by"]),
                short_time(&t["sla"]["onsite_by"]),
                short_time(&t["sla"]["resolve_by"]),
                sla_summary(&t["sla_status"]),
                state,
                note,
            ]
        })
        .collect();
    table(
        &[
            "KEY",
            "TICKET",
            "DEVICE",
            "KIND",
            "CLASS",
            "RESPOND BY",
            "ONSITE BY",
            "RESOLVE BY",
            "SLA",
            "FORWARDING",
            "ERROR",
        ],
        &rows,
    )
}

/// A ticket's `sla_status` in a few words: each deadline that applies with its status
/// (`respond met, onsite missed, resolve at_risk`).
fn sla_summary(v: &Value) -> String {
    let parts: Vec<String> = ["respond", "onsite", "plan", "resolve"]
        .iter()
        .filter_map(|k| match v[*k].as_str() {
            None | Some("n/a") => None,
            Some(st) => Some(format!("{k} {st}")),
        })
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// `key  value` lines, keys padded to the longest.
fn kv(rows: &[(&str, String)]) -> String {
    let w = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k}{}  {v}\n", " ".repeat(w - k.chars().count())))
        .collect()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// One device (`GET /api/v1/devices/{id}`).
pub fn render_device(d: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", s(&d["id"]));
    let mut facts: Vec<(&str, String)> = Vec::new();
    facts.push(("serial", s(&d["serial"])));
    facts.push(("model", format!("{} {}", s(&d["model"]), s(&d["kind"]))));
    if let Some(i) = d["identity"].as_object() {
        facts.push((
            "identity",
            format!("{}, firmware {}", s(&i["profile"]), s(&i["firmware"])),
        ));
    }
    let site = match d["fleet"].as_object() {
        Some(f) => format!(
            "{} - {}, {} ({})",
            s(&d["site"]),
            s(&f["site_name"]),
            s(&f["address"]),
            s(&f["service_area"])
        ),
        None => s(&d["site"]),
    };
    facts.push(("site", site));
    if let Some(f) = d["fleet"].as_object() {
        facts.push((
            "customer",
            format!(
                "{} - {} {}",
                s(&f["customer_name"]),
                s(&f["contact_name"]),
                s(&f["contact_phone"])
            ),
        ));
    }
    facts.push(("location", s(&d["location"])));
    facts.push((
        "state",
        format!("{} since {}", s(&d["state"]), short_time(&d["state_since"])),
    ));
    facts.push(("last seen", short_time(&d["last_seen"])));
    facts.push((
        "availability",
        format!(
            "{} this month (target {}, coverage {})",
            percent(&d["availability"]),
            percent(&d["target"]),
            percent(&d["coverage"])
        ),
    ));
    facts.push(("downtime budget", budget(d)));
    facts.push((
        "agent",
        match &d["agent_status"] {
            Value::String(st) => format!("{} ({st})", s(&d["agent"])),
            _ => s(&d["agent"]),
        },
    ));
    out.push_str(&indent(&kv(&facts)));

    let readings: Vec<Vec<String>> = as_array(&d["readings"])
        .iter()
        .map(|r| {
            vec![
                s(&r["name"]),
                s(&r["value"]),
                r["unit"].as_str().unwrap_or("").to_string(),
                short_time(&r["time"]),
            ]
        })
        .collect();
    out.push_str("\nreadings\n");
    if readings.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&indent(&table(
            &["NAME", "VALUE", "UNIT", "TIME"],
            &readings,
        )));
    }
    let faults: Vec<Vec<String>> = as_array(&d["open_faults"])
        .iter()
        .map(|f| {
            vec![
                s(&f["code"]),
                s(&f["class"]),
                s(&f["description"]),
                short_time(&f["opened_at"]),
                if f["device_available"] == Value::Bool(true) {
                    "yes".into()
                } else {
                    "no".into()
                },
                s(&f["suggested_action"]),
            ]
        })
        .collect();
    out.push_str("\nopen faults\n");
    if faults.is_empty() {
        out.push_str("  none\n");
    } else {
        out.push_str(&indent(&table(
            &[
                "CODE",
                "CLASS",
                "DESCRIPTION",
                "SINCE",
                "AVAILABLE",
                "ACTION",
            ],
            &faults,
        )));
    }
    let list = |v: &Value| {
        let items: Vec<String> = as_array(v).iter().map(s).collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    let _ = writeln!(out, "\ndiagnostics: {}", list(&d["diagnostics"]));
    let _ = writeln!(out, "tickets: {}", list(&d["tickets"]));
    out
}

/// An availability report.
pub fn render_availability(r: &Value) -> String {
    kv(&[
        ("device", s(&r["device"])),
        (
            "window",
            format!("{} .. {}", short_time(&r["from"]), short_time(&r["to"])),
        ),
        ("availability", percent(&r["availability"])),
        ("target", percent(&r["target"])),
        ("coverage", percent(&r["coverage"])),
        ("up", duration(&r["up_s"])),
        ("down", duration(&r["down_s"])),
        ("maintenance", duration(&r["maintenance_s"])),
        ("unknown", duration(&r["unknown_s"])),
        ("excluded", duration(&r["excluded_s"])),
        ("downtime budget", budget(r)),
    ])
}

/// What is left of the downtime budget, of how much, and its status
/// (`2h 10m of 3h 36m left (ok)`).
fn budget(r: &Value) -> String {
    format!(
        "{} of {} left ({})",
        duration(&r["downtime_budget_s"]),
        duration(&r["downtime_allowed_s"]),
        s(&r["budget_status"])
    )
}

/// A diagnostic's answer.
pub fn render_diag(v: &Value) -> String {
    format!(
        "{} {}:\n{}\n",
        s(&v["device"]),
        s(&v["request"]),
        pretty(&v["answer"])
    )
}

/// A retry's answer.
pub fn render_retry(v: &Value) -> String {
    let t = &v["ticket"];
    let (state, _) = forwarding(&t["forwarding"]);
    format!("requeued {}: forwarding {state}\n", s(&t["key"]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use serde_json::json;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    /// As `main` embeds it, beside `run --config`.
    #[derive(clap::Subcommand, Debug)]
    enum Top {
        Run {
            #[arg(long)]
            config: PathBuf,
        },
        Hotline(HotlineArgs),
    }

    #[test]
    fn clap_structure_parses() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "tend-gateway",
            "hotline",
            "tickets",
            "--open",
            "--config",
            "gw.toml",
            "--json",
        ])
        .unwrap();
        let Top::Hotline(h) = c.cmd else {
            panic!("not hotline")
        };
        assert!(h.json);
        assert_eq!(h.target.config, Some(PathBuf::from("gw.toml")));
        assert_eq!(
            h.command,
            HotlineCommand::Tickets {
                device: None,
                open: true
            }
        );
        let c = Cli::try_parse_from([
            "tend-gateway",
            "hotline",
            "--api",
            "127.0.0.1:8080",
            "--token-file",
            "t",
            "diag",
            "icu7-vent",
            "selftest",
        ])
        .unwrap();
        let Top::Hotline(h) = c.cmd else {
            panic!("not hotline")
        };
        assert_eq!(h.target.api.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(
            h.command,
            HotlineCommand::Diag {
                id: "icu7-vent".into(),
                request: "selftest".into()
            }
        );
        let c = Cli::try_parse_from(["tend-gateway", "run", "--config", "gw.toml"]).unwrap();
        assert!(matches!(c.cmd, Top::Run { .. }));
    }

    #[test]
    fn unspecified_listen_is_loopback() {
        assert_eq!(
            url_for_listen("0.0.0.0:8080".parse().unwrap()),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            url_for_listen("[::]:8080".parse().unwrap()),
            "http://[::1]:8080"
        );
        assert_eq!(
            url_for_listen("10.1.2.3:80".parse().unwrap()),
            "http://10.1.2.3:80"
        );
    }

    #[test]
    fn segments_are_encoded() {
        let base = Url::parse("http://127.0.0.1:8080").unwrap();
        let u = url(
            &base,
            &["api", "v1", "tickets", "tend-t:a/b/ALM1.4/17", "retry"],
            &[],
        );
        assert_eq!(
            u.as_str(),
            "http://127.0.0.1:8080/api/v1/tickets/tend-t:a%2Fb%2FALM1.4%2F17/retry"
        );
        let u = url(&base, &["x"], &[("from", "2026-11-01T00:00:00+08:00")]);
        assert_eq!(u.query(), Some("from=2026-11-01T00%3A00%3A00%2B08%3A00"));
    }

    #[test]
    fn missing_target_is_a_usage_error() {
        let e = resolve(&ApiTarget::default()).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.message.contains("--config"), "{e}");
    }

    #[test]
    fn devices_table() {
        let v = json!([
            {"id": "icu7-vent", "state": "down", "availability": 0.9090909, "coverage": 0.5,
             "budget_status": "at_risk", "downtime_allowed_s": 12960.0,
             "downtime_budget_s": 3600.0, "open_faults": 1, "last_seen": "2026-11-28T02:15:02.5Z",
             "model": "AV-500", "location": "ICU bed 7", "agent": "agent-a", "agent_status": "online",
             "in_fleet": true},
            {"id": "ward3-pump", "state": "unknown", "availability": null, "coverage": 0.0,
             "budget_status": "ok", "downtime_allowed_s": 0.0, "downtime_budget_s": 0.0, "open_faults": 0, "last_seen": null, "model": null,
             "location": "Ward 3", "agent": null, "agent_status": null, "in_fleet": true}
        ]);
        let t = render_devices(&v);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("DEVICE"));
        assert!(lines[1].contains("90.909 %"), "{t}");
        assert!(lines[1].contains("50.000 %"), "{t}");
        assert!(lines[1].contains("1h00m of 3h36m left (at_risk)"), "{t}");
        assert!(lines[1].contains("2026-11-28 02:15:02Z"), "{t}");
        assert!(lines[1].contains("agent-a (online)"), "{t}");
        assert!(lines[2].starts_with("ward3-pump"), "{t}");
        // Columns line up.
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(&lines[1][col..col + 4], "down");
        assert_eq!(&lines[2][col..col + 7], "unknown");
    }

    #[test]
    fn tickets_table() {
        let v = json!([{
            "key": "tend-t:a/icu7-vent/ALM1.4/1", "ticket_id": null, "device": "icu7-vent",
            "kind": "fault", "class": "major", "open": true,
            "sla": {"respond_by": "2026-11-28T11:15:02+08:00", "onsite_by": "2026-11-28T13:15:02+08:00",
                    "plan_by": null, "resolve_by": "2026-12-01T10:15:02+08:00"},
            "forwarding": {"state": "failed", "attempts": 3, "error": "400: bad serial"},
            "events": [{"key": "e1", "type": "fault_cleared", "forwarding": {"state": "pending"}}]
        }]);
        let t = render_tickets(&v);
        assert!(t.contains("2026-11-28 11:15:02+08:00"), "{t}");
        assert!(t.contains("failed (3 tries), events 0/1 sent"), "{t}");
        assert!(t.contains("400: bad serial"), "{t}");
    }

    #[test]
    fn small_formats() {
        assert_eq!(duration(&json!(360.0)), "6m00s");
        assert_eq!(duration(&json!(42)), "42s");
        assert_eq!(duration(&Value::Null), "-");
        assert_eq!(percent(&json!(0.995)), "99.500 %");
        assert_eq!(
            short_time(&json!("2026-11-28T02:15:02.123456Z")),
            "2026-11-28 02:15:02Z"
        );
        assert_eq!(
            short_time(&json!("2026-11-28T10:15:02.1+08:00")),
            "2026-11-28 10:15:02+08:00"
        );
    }
}

//! The monthly report per customer (DESIGN "Service level"): for each of the customer's
//! devices its availability, coverage and downtime budget, the time down, in maintenance,
//! excluded and unknown, a timeline of its states, its tickets with every deadline met or
//! missed, the maintenance done and due, and consumable warnings; with the customer's
//! sums and SLA figures. As JSON ([`monthly`]), CSV ([`render_csv`], one row per device)
//! and a printable A4 HTML page with the timelines drawn in inline SVG ([`render_html`]).
//!
//! The renderers are pure functions of the JSON, so the API, the CLI and tests print the
//! same report from the same data.

use crate::api::service::{customer_figures, maintenance_json, sla_figures};
use crate::app::Gateway;
use crate::ledger::month_window;
use crate::sla::rfc3339;
use crate::store::StoreError;
use jiff::civil::Date;
use jiff::Timestamp;
use serde_json::{json, Value};
use std::fmt::Write as _;
use tend_profiles::SignalKind;

/// A month as `YYYY-MM`, checked.
pub fn parse_month(s: &str) -> Result<Date, String> {
    let bad = || format!("month={s:?}: expected YYYY-MM, like 2026-11");
    let (y, m) = s.trim().split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let y: i16 = y.parse().map_err(|_| bad())?;
    let m: i8 = m.parse().map_err(|_| bad())?;
    Date::new(y, m, 1).map_err(|_| bad())
}

/// The report of `customer` for the month starting on `first` (in the gateway's zone), as
/// of `now`. A month still running is measured up to `now`; its budget counts the rest.
pub fn monthly(
    gw: &Gateway,
    customer: &str,
    first: Date,
    now: Timestamp,
) -> Result<Value, StoreError> {
    let tz = &gw.cx.tz;
    let anchor = first
        .to_zoned(tz.clone())
        .map(|z| z.timestamp())
        .unwrap_or(now);
    let (from, to) = month_window(anchor, tz);
    let totals = customer_figures(gw, customer, from, to, now)?;
    let sla = sla_figures(gw, Some(customer), from, to, now)?;
    let tickets = gw.store.tickets()?;
    let mut devices = Vec::new();
    for e in gw.cx.fleet.devices() {
        if e.customer.id != customer {
            continue;
        }
        let id = e.device.id.as_str();
        let availability = totals["by_device"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["device"] == id))
            .cloned()
            .unwrap_or(Value::Null);
        let ledger = gw.store.ledger(id)?;
        let timeline: Vec<Value> = ledger
            .timeline(from, to.min(now).max(from))
            .iter()
            .map(|s| json!({"from": s.from, "to": s.to, "state": s.state.as_str()}))
            .collect();
        let mine: Vec<Value> = tickets
            .iter()
            .filter(|t| t.device == id)
            // Open at some time in the month: detected before its end, and not resolved
            // (nor closed) before its start. Decided from the history, not from the
            // ticket's state today, so a past month's report stays as it was.
            .filter(|t| {
                let ended = crate::sla_watch::reached(
                    &t.status_history,
                    crate::sla_watch::DeadlineKind::Resolve,
                );
                t.detected_at < to && ended.is_none_or(|e| e >= from)
            })
            .map(|t| {
                let p = t.promises();
                let status = p.judge(&t.status_history, now);
                let deadlines: serde_json::Map<String, Value> = crate::sla_watch::DeadlineKind::ALL
                    .iter()
                    .filter_map(|k| {
                        let due = p.due(*k)?;
                        Some((
                            k.as_str().to_string(),
                            json!({
                                "due": rfc3339(due, tz),
                                "status": status.get(*k).as_str(),
                                // Counted in this month's figures: due in it.
                                "in_month": from <= due && due < to,
                            }),
                        ))
                    })
                    .collect();
                json!({
                    "key": t.key,
                    "ticket_id": t.ticket_id,
                    "kind": t.kind,
                    "code": t.code,
                    "class": t.class,
                    "description": t.body.pointer("/fault/description"),
                    "detected_at": rfc3339(t.detected_at, tz),
                    "status": t.backend_status,
                    "open": t.open,
                    "deadlines": deadlines,
                })
            })
            .collect();
        let consumables: Vec<Value> = mine
            .iter()
            .filter(|t| t["kind"] == json!(SignalKind::Consumable))
            .cloned()
            .collect();
        let mut maintenance = maintenance_json(gw, id, now)?;
        if let Some(done) = maintenance.get_mut("done").and_then(|d| d.as_array_mut()) {
            done.retain(|m| {
                m["done_at"]
                    .as_str()
                    .and_then(|s| s.parse::<Timestamp>().ok())
                    .is_some_and(|at| from <= at && at < to)
            });
        }
        let identity =
            gw.store
                .device(id)?
                .and_then(|d| d.identity)
                .map(|i| crate::ticket::DeviceIdentity {
                    model: i.model,
                    firmware: i.firmware,
                    serial: i.serial,
                    profile: i.profile,
                });
        let facts = crate::ticket::DeviceFacts::resolve(&e, identity.as_ref(), &gw.cx.profiles);
        devices.push(json!({
            "id": id,
            "serial": e.device.serial,
            "model": facts.model,
            "location": e.device.location,
            "site": e.site.name,
            "contract": e.contract_on(first).map(|c| c.id.clone()),
            "availability": availability,
            "timeline": timeline,
            "tickets": mine,
            "maintenance": maintenance,
            "consumables": consumables,
        }));
    }
    let c = gw.cx.fleet.customer(customer);
    Ok(json!({
        "customer": customer,
        "customer_name": c.map(|c| c.name.clone()),
        "month": format!("{:04}-{:02}", first.year(), first.month()),
        "from": rfc3339(from, tz),
        "to": rfc3339(to, tz),
        "as_of": rfc3339(now.min(to), tz),
        "complete": now >= to,
        "totals": totals_without_devices(totals),
        "sla": sla,
        "devices": devices,
    }))
}

fn totals_without_devices(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("by_device");
    }
    v
}

// ---------- CSV ----------

/// The columns of the CSV, one row per device.
pub const CSV_COLUMNS: [&str; 21] = [
    "month",
    "customer",
    "device",
    "serial",
    "model",
    "location",
    "availability",
    "coverage",
    "target",
    "up_s",
    "down_s",
    "maintenance_s",
    "unknown_s",
    "excluded_s",
    "downtime_allowed_s",
    "downtime_budget_s",
    "budget_status",
    "tickets",
    "deadlines_met",
    "deadlines_missed",
    "next_maintenance_due",
];

/// A CSV field: quoted when it holds a comma, quote or line break (RFC 4180), and a
/// leading `=`, `+`, `-`, `@` defused so a spreadsheet never runs it as a formula.
fn csv_field(s: &str) -> String {
    let risky = s.starts_with(['=', '+', '-', '@', '\t', '\r'])
        || s.trim_start().starts_with(['=', '+', '-', '@']);
    let s = if risky && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn deadline_counts(d: &Value) -> (usize, usize) {
    let mut met = 0;
    let mut missed = 0;
    for t in d["tickets"].as_array().into_iter().flatten() {
        for (_, dl) in t["deadlines"].as_object().into_iter().flatten() {
            if dl["in_month"] == json!(false) {
                continue;
            }
            match dl["status"].as_str() {
                Some("met") => met += 1,
                Some("missed") => missed += 1,
                _ => {}
            }
        }
    }
    (met, missed)
}

/// The report as CSV: a header and one row per device.
pub fn render_csv(r: &Value) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push_str("\r\n");
    for d in r["devices"].as_array().into_iter().flatten() {
        let a = &d["availability"];
        let (met, missed) = deadline_counts(d);
        let row = [
            plain(&r["month"]),
            plain(&r["customer"]),
            plain(&d["id"]),
            plain(&d["serial"]),
            plain(&d["model"]),
            plain(&d["location"]),
            plain(&a["availability"]),
            plain(&a["coverage"]),
            plain(&a["target"]),
            plain(&a["up_s"]),
            plain(&a["down_s"]),
            plain(&a["maintenance_s"]),
            plain(&a["unknown_s"]),
            plain(&a["excluded_s"]),
            plain(&a["downtime_allowed_s"]),
            plain(&a["downtime_budget_s"]),
            plain(&a["budget_status"]),
            d["tickets"].as_array().map_or(0, Vec::len).to_string(),
            met.to_string(),
            missed.to_string(),
            plain(&d["maintenance"]["next_due"]),
        ];
        let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
        out.push_str(&fields.join(","));
        out.push_str("\r\n");
    }
    out
}

// ---------- HTML ----------

/// Text for HTML: `&`, `<`, `>`, `"`, `'` escaped.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// An RFC 3339 time as `2026-12-02 15:05` (the report's zone is in its header).
fn short(v: &Value) -> String {
    let t = plain(v);
    match (t.get(..10), t.get(11..16)) {
        (Some(d), Some(hm)) if t.len() >= 16 => format!("{d} {hm}"),
        _ => t,
    }
}

fn pct(v: &Value) -> String {
    v.as_f64()
        .map_or("–".into(), |x| format!("{:.3} %", x * 100.0))
}

fn hours(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |s| {
        let m = (s / 60.0).round() as i64;
        format!("{}h {:02}m", m / 60, m % 60)
    })
}

/// The colour of a state in the timeline and its legend.
fn colour(state: &str) -> &'static str {
    match state {
        "up" => "#2e7d32",
        "down" => "#c62828",
        "maintenance" => "#1565c0",
        "excluded" => "#9e9e9e",
        _ => "#e0e0e0",
    }
}

/// A device's month as one bar: a rectangle per stretch, scaled to the month.
fn timeline_svg(d: &Value, from: Timestamp, to: Timestamp) -> String {
    const W: f64 = 700.0;
    let span = to.duration_since(from).as_secs_f64().max(1.0);
    let mut svg = format!(
        r#"<svg class="timeline" viewBox="0 0 {W} 18" width="100%" height="18" role="img" aria-label="states over the month">"#
    );
    // The whole month unknown first; the stretches drawn over it.
    let _ = write!(
        svg,
        r#"<rect x="0" y="0" width="{W}" height="18" fill="{}"/>"#,
        colour("unknown")
    );
    for s in d["timeline"].as_array().into_iter().flatten() {
        let (Some(a), Some(b)) = (
            s["from"].as_str().and_then(|x| x.parse::<Timestamp>().ok()),
            s["to"].as_str().and_then(|x| x.parse::<Timestamp>().ok()),
        ) else {
            continue;
        };
        let state = s["state"].as_str().unwrap_or("unknown");
        let x = a.duration_since(from).as_secs_f64() / span * W;
        let w = (b.duration_since(a).as_secs_f64() / span * W).max(0.5);
        let _ = write!(
            svg,
            r#"<rect x="{x:.2}" y="0" width="{w:.2}" height="18" fill="{}"><title>{} {} – {}</title></rect>"#,
            colour(state),
            esc(state),
            esc(&plain(&s["from"])),
            esc(&plain(&s["to"]))
        );
    }
    svg.push_str("</svg>");
    svg
}

const STYLE: &str = "@page { size: A4; margin: 14mm; }
body { font: 10pt/1.35 sans-serif; color: #111; margin: 0 auto; max-width: 190mm; }
h1 { font-size: 15pt; margin: 0 0 2mm; } h2 { font-size: 12pt; margin: 6mm 0 1mm; }
table { border-collapse: collapse; width: 100%; margin: 1mm 0 2mm; }
th, td { border-bottom: 1px solid #ccc; padding: 1mm 1.5mm; text-align: left; vertical-align: top; }
th { background: #f2f2f2; } table.tickets { font-size: 8.5pt; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.device { break-inside: avoid; page-break-inside: avoid; border-top: 2px solid #333; margin-top: 5mm; }
.ok { color: #2e7d32; } .at_risk { color: #b26a00; } .breached, .missed { color: #c62828; font-weight: bold; }
.met { color: #2e7d32; } .legend span { display: inline-block; margin-right: 4mm; }
.legend i { display: inline-block; width: 3mm; height: 3mm; margin-right: 1mm; vertical-align: middle; }
.note { color: #555; font-size: 9pt; }
.l-up { background: #2e7d32; } .l-down { background: #c62828; } .l-maintenance { background: #1565c0; }
.l-excluded { background: #9e9e9e; } .l-unknown { background: #e0e0e0; }";

/// The report as one printable HTML page (A4), no script, no outside resource.
pub fn render_html(r: &Value) -> String {
    let from = r["from"].as_str().and_then(|x| x.parse::<Timestamp>().ok());
    let to = r["to"].as_str().and_then(|x| x.parse::<Timestamp>().ok());
    let t = &r["totals"];
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Monthly service report {} {}</title><style>{STYLE}</style></head><body>",
        esc(&plain(&r["customer"])),
        esc(&plain(&r["month"]))
    );
    let _ = write!(
        h,
        "<h1>Monthly service report — {} ({})</h1><p>{} · {} to {} (UTC{}) · as of {}{}</p>",
        esc(&plain(&r["customer_name"])),
        esc(&plain(&r["customer"])),
        esc(&plain(&r["month"])),
        esc(&short(&r["from"])),
        esc(&short(&r["to"])),
        esc(plain(&r["from"]).get(19..).unwrap_or("")),
        esc(&short(&r["as_of"])),
        if r["complete"] == json!(true) {
            ""
        } else {
            " (month still running)"
        }
    );
    let _ = write!(
        h,
        "<h2>Summary</h2><table><tr><th>Devices</th><th>Availability</th><th>Coverage</th><th>Down</th><th>Budget left</th><th>Budget</th><th>Deadlines met</th><th>Missed</th><th>Rate met</th></tr>\
         <tr><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{} of {}</td><td class=\"{}\">{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td></tr></table>",
        plain(&t["devices"]),
        pct(&t["availability"]),
        pct(&t["coverage"]),
        hours(&t["down_s"]),
        hours(&t["downtime_budget_s"]),
        hours(&t["downtime_allowed_s"]),
        esc(&plain(&t["budget_status"])),
        esc(&plain(&t["budget_status"])),
        plain(&r["sla"]["met"]),
        plain(&r["sla"]["missed"]),
        pct(&r["sla"]["rate"]),
    );
    h.push_str("<p class=legend>");
    for s in ["up", "down", "maintenance", "excluded", "unknown"] {
        let _ = write!(h, "<span><i class=\"l-{s}\"></i>{s}</span>");
    }
    h.push_str("</p>");
    for d in r["devices"].as_array().into_iter().flatten() {
        device_html(&mut h, d, from, to);
    }
    h.push_str("<p class=note>Availability = up ÷ (up + down); coverage = known ÷ elapsed time. The budget is the down time the month allows at the target; excluded time counts neither way.</p></body></html>");
    h
}

fn device_html(h: &mut String, d: &Value, from: Option<Timestamp>, to: Option<Timestamp>) {
    let a = &d["availability"];
    let _ = write!(
        h,
        "<section class=device><h2>{} — {} {}</h2><p>{} · {} · contract {}</p>",
        esc(&plain(&d["id"])),
        esc(&plain(&d["model"])),
        esc(&plain(&d["serial"])),
        esc(&plain(&d["site"])),
        esc(&plain(&d["location"])),
        if d["contract"].is_null() {
            "— (the seed's terms)".to_string()
        } else {
            esc(&plain(&d["contract"]))
        },
    );
    if let (Some(f), Some(t)) = (from, to) {
        h.push_str(&timeline_svg(d, f, t));
    }
    let _ = write!(
        h,
        "<table><tr><th>Availability</th><th>Target</th><th>Coverage</th><th>Up</th><th>Down</th><th>Maintenance</th><th>Excluded</th><th>Unknown</th><th>Budget left</th><th>Budget</th></tr>\
         <tr><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{} of {}</td><td class=\"{}\">{}</td></tr></table>",
        pct(&a["availability"]),
        pct(&a["target"]),
        pct(&a["coverage"]),
        hours(&a["up_s"]),
        hours(&a["down_s"]),
        hours(&a["maintenance_s"]),
        hours(&a["excluded_s"]),
        hours(&a["unknown_s"]),
        hours(&a["downtime_budget_s"]),
        hours(&a["downtime_allowed_s"]),
        esc(&plain(&a["budget_status"])),
        esc(&plain(&a["budget_status"])),
    );
    let tickets = d["tickets"].as_array().cloned().unwrap_or_default();
    if tickets.is_empty() {
        h.push_str("<p class=note>No tickets this month.</p>");
    } else {
        h.push_str("<table class=tickets><tr><th>Ticket</th><th>Fault</th><th>Detected</th><th>Status</th><th>Respond</th><th>On site</th><th>Plan</th><th>Resolve</th></tr>");
        for t in &tickets {
            let cell = |k: &str| {
                let dl = &t["deadlines"][k];
                match dl["status"].as_str() {
                    None => "<td>–</td>".to_string(),
                    Some(s) => format!(
                        "<td class=\"{}\">{}<br><span class=note>{}</span></td>",
                        esc(s),
                        esc(s),
                        esc(&short(&dl["due"]))
                    ),
                }
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{} {} ({})<br><span class=note>{}</span></td><td>{}</td><td>{}</td>{}{}{}{}</tr>",
                if t["ticket_id"].is_null() {
                    "(not sent)".to_string()
                } else {
                    esc(&plain(&t["ticket_id"]))
                },
                esc(&plain(&t["kind"])),
                esc(&plain(&t["code"])),
                esc(&plain(&t["class"])),
                esc(&plain(&t["description"])),
                esc(&short(&t["detected_at"])),
                esc(&plain(&t["status"])),
                cell("respond"),
                cell("onsite"),
                cell("plan"),
                cell("resolve"),
            );
        }
        h.push_str("</table>");
    }
    let m = &d["maintenance"];
    let done: Vec<String> = m["done"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| format!("{} ({})", plain(&x["done_at"]), plain(&x["source"])))
        .collect();
    let _ = write!(
        h,
        "<p>Preventive maintenance: every {} days; done this month: {}; next due {}{}.</p>",
        esc(&plain(&m["interval_days"])),
        esc(&if done.is_empty() {
            "none".into()
        } else {
            done.join(", ")
        }),
        esc(&plain(&m["next_due"])),
        if m["overdue"] == json!(true) {
            " <b class=missed>(overdue)</b>"
        } else {
            ""
        }
    );
    let consumables = d["consumables"].as_array().cloned().unwrap_or_default();
    if !consumables.is_empty() {
        let list: Vec<String> = consumables
            .iter()
            .map(|c| format!("{} {}", plain(&c["code"]), plain(&c["description"])))
            .collect();
        let _ = write!(h, "<p>Consumables: {}</p>", esc(&list.join("; ")));
    }
    h.push_str("</section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_checked() {
        assert_eq!(
            parse_month("2026-11").unwrap(),
            jiff::civil::date(2026, 11, 1)
        );
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "2026-11-01"] {
            assert!(parse_month(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_quotes_and_defuses_formulas() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(1)"), "'=HYPERLINK(1)");
        assert_eq!(csv_field("-0.5"), "-0.5");
        assert_eq!(csv_field("\t=HYPERLINK(1)"), "'\t=HYPERLINK(1)");
        assert_eq!(csv_field("  @SUM(1)"), "'  @SUM(1)");
    }

    #[test]
    fn html_escapes_what_it_is_given() {
        let r = json!({
            "customer": "c<script>", "customer_name": "A & B", "month": "2026-11",
            "from": "2026-11-01T00:00:00+08:00", "to": "2026-12-01T00:00:00+08:00",
            "totals": {}, "sla": {},
            "devices": [{"id": "d\"1", "timeline": [
                {"from": "2026-11-01T00:00:00+08:00", "to": "2026-11-16T00:00:00+08:00", "state": "up"},
                {"from": "2026-11-16T00:00:00+08:00", "to": "2026-11-17T00:00:00+08:00", "state": "down"}],
                "tickets": [{"ticket_id": "T-1", "code": "<b>", "deadlines": {"respond": {"due": "x", "status": "missed"}}}],
                "maintenance": {"interval_days": 182, "done": [], "next_due": "2027-01-01"}}]
        });
        let h = render_html(&r);
        assert!(!h.contains("<script>") && h.contains("c&lt;script&gt;"));
        assert!(h.contains("A &amp; B") && h.contains("d&quot;1") && h.contains("&lt;b&gt;"));
        assert!(h.contains("<svg") && h.contains(colour("down")));
        assert!(h.contains("class=\"missed\""));
        // Half the month up: the first bar is half the width.
        assert!(h.contains(r#"<rect x="0.00" y="0" width="350.00""#), "{h}");
        let csv = render_csv(&r);
        assert_eq!(csv.lines().count(), 2);
        assert!(csv.lines().nth(1).unwrap().contains(",0,1,"), "{csv}");
    }
}

//! The hotline page as an engineer uses it, in Debian's headless Chromium over the
//! DevTools protocol, against real processes: simulated ventilators → an enrolled agent →
//! the gateway → the backend stand-in.
//!
//! Opens the page with the token in Chinese, sees every device with its budget gauge,
//! filters and sorts the fleet, opens a device and sees its month drawn, runs a diagnostic
//! and reads the answer as a table, sees a ticket's deadline counting down, switches to
//! English, and the browser reports no error. `TEND_PAGE_SCREENSHOTS=<dir>` also writes
//! a screenshot of each language there (the README's come from here).

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;
use tend_testkit::backend_standin;
use tend_testkit::browser::{chromium, Browser};

const CONTRACT: &str = r#"
[[contract]]
id = "k-page"
customer = "c-017"
respond = "20m"
onsite = { same_city = "45m", other_city = "2h", remote = "4h" }
major_fix = "8h"
"#;

const ROWS: &str = "document.querySelectorAll('#devices tbody tr').length";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engineer_reads_the_fleet_a_device_and_its_tickets_in_both_languages() {
    let Some(chromium) = chromium() else { return };
    let backend = backend_standin::spawn(BACKEND_TOKEN).await.unwrap();
    let sims = spawn_sims(2).await;
    let dir = tempfile::tempdir().unwrap();
    let fleet = format!("{}{CONTRACT}", sims_fleet(&sims));
    let backend_url = backend.url();
    let gw = GatewayProc::spawn(
        gateway_bin(),
        &dir.path().join("gw"),
        &GatewaySpec {
            id: "gw-page",
            broker: BrokerChoice::Embedded(free_port()),
            backend: Some(&backend_url),
            fleet: &fleet,
        },
    )
    .await;
    let agent_dir = dir.path().join("agent");
    enrol_agent(&gw.config, "agent-page", &agent_dir);
    let agent_cfg = agent_dir.join("agent.toml");
    std::fs::write(
        &agent_cfg,
        sims_agent_toml("agent-page", &gw.broker_url, &sims, "300ms"),
    )
    .unwrap();
    let mut agent = spawn_agent(agent_bin(), &agent_cfg, &agent_dir.join("agent.log"));
    until_all_up_no_fault(&gw, 2, Duration::from_secs(60)).await;
    // The exhalation valve of vent-1: a major fault, a ticket with deadlines.
    sims[1].1.raise(1);
    until(
        "vent-1's ticket at the backend",
        Duration::from_secs(60),
        || async {
            backend
                .tickets()
                .into_iter()
                .find(|t| t.body["device"]["id"] == "vent-1")
        },
    )
    .await;

    let mut b = Browser::start(&chromium, "zh-CN").await;
    b.navigate(&format!("{}/#token={API_TOKEN}", gw.api)).await;
    b.until("both devices listed", &format!("{ROWS} === 2"))
        .await;
    assert_eq!(b.eval("document.documentElement.lang").await, "zh-CN");
    assert_eq!(
        b.eval("document.querySelectorAll('#devices .gauge > span').length")
            .await,
        2
    );
    b.until(
        "vent-1's SLA in Chinese",
        "[...document.querySelectorAll('#devices tbody tr')].some(r => r.dataset.id === 'vent-1' && r.cells[7].textContent === '进行中')",
    )
    .await;

    // Filter, then sort: the rows follow, the controls stay.
    b.eval("(() => { const f = document.getElementById('filter'); f.value = 'vent-1'; f.dispatchEvent(new Event('input')); return true; })()")
        .await;
    b.until("filtered to one", &format!("{ROWS} === 1")).await;
    b.eval("(() => { const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); return true; })()")
        .await;
    b.until("both again", &format!("{ROWS} === 2")).await;
    b.eval("document.querySelector('#devices th[data-sort=id]').click(); true")
        .await;
    b.until(
        "sorted by id, descending",
        "document.querySelector('#devices tbody tr').dataset.id === 'vent-1'",
    )
    .await;

    // A ticket's deadlines count down.
    b.until(
        "a countdown",
        "[...document.querySelectorAll('#tickets .countdown')].some(c => c.textContent.startsWith('剩余'))",
    )
    .await;

    // The device: its month drawn, its life record, a diagnostic read as a table.
    b.eval("document.querySelector('#devices tbody tr[data-id=\"vent-1\"]').click(); true")
        .await;
    b.until(
        "the month's chart",
        "document.querySelectorAll('#chart rect.s-up').length >= 1",
    )
    .await;
    b.until(
        "the life record",
        "document.querySelectorAll('#life tr').length > 2",
    )
    .await;
    b.eval("document.getElementById('diag-name').value = 'readings'; document.querySelector('#detail form').requestSubmit(); true")
        .await;
    b.until(
        "the diagnostic's answer as a table",
        "document.querySelectorAll('#diag-result table.answer tr').length > 1",
    )
    .await;
    let shots = std::env::var_os("TEND_PAGE_SCREENSHOTS").map(PathBuf::from);
    if let Some(d) = &shots {
        b.screenshot(&d.join("page-zh-CN.png"), 1280, 900).await;
    }

    // English at a click; the state of the page stays.
    b.eval("document.querySelector('#langs button[data-lang=en]').click(); true")
        .await;
    b.until(
        "English",
        "document.querySelector('h1').textContent === 'tend hotline'",
    )
    .await;
    b.until(
        "vent-1's SLA in English",
        "[...document.querySelectorAll('#devices tbody tr')].some(r => r.dataset.id === 'vent-1' && r.cells[7].textContent === 'pending')",
    )
    .await;
    if let Some(d) = &shots {
        b.screenshot(&d.join("page-en.png"), 1280, 900).await;
    }
    assert_eq!(
        b.errors(),
        Vec::<String>::new(),
        "the browser reported errors"
    );

    let _ = agent.start_kill();
    let _ = agent.wait().await;
}

//! The crash suite (DESIGN §5 "Reliability"): under steady load from simulated devices
//! (AV-500 ventilators and HM-2 helium monitors over Modbus TCP, polled every 100 ms,
//! with faults raised and cleared on a random schedule), `tend-agent run` and
//! `tend-gateway run` are killed with SIGKILL at random moments and restarted at once on
//! the same outbox and data directory.
//!
//! At the end (faults stopped, everything settled) it proves:
//! - every record the agent made durable reached the gateway exactly once: the gateway's
//!   store holds (agent, seq) for every seq 1..=max and nothing else, where max is the
//!   last seq the agent's outbox gave out, and the agent's outbox is empty (all acked);
//! - no seq ever travelled with two different contents (a listener on the broker
//!   compares every resend with the first copy), so the gateway's dedup never threw
//!   away a different record under a reused seq;
//! - every fault episode the gateway knows belongs to exactly one ticket, every ticket
//!   exists exactly once at the backend stand-in (no key the gateway does not know, no
//!   409), no two backend tickets for one device and fault while open, and every event
//!   the gateway queued arrived once.
//!
//! Short version (in `cargo test`): 6 agent kills, 3 gateway kills. Full version:
//! `TEND_CRASH_AGENT_KILLS=100 TEND_CRASH_GATEWAY_KILLS=20 cargo test --release -p tend-e2e --test crash -- --nocapture`
//! Other knobs: `TEND_CRASH_SEED` (replays a run's random moments), `TEND_CRASH_DEVICES`.

mod common;

use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tend_testkit::backend_standin;

const AGENT: &str = "agent-crash";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_agent_and_gateway_at_random_no_loss_no_duplicate_one_ticket_per_episode() {
    let agent_kills = env_u64("TEND_CRASH_AGENT_KILLS", 6);
    let gateway_kills = env_u64("TEND_CRASH_GATEWAY_KILLS", 3);
    let n_devices = env_u64("TEND_CRASH_DEVICES", 8).max(2) as usize;
    let mut rng = Rng::from_env("TEND_CRASH_SEED");
    let started = Instant::now();

    let backend = backend_standin::spawn(BACKEND_TOKEN).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sims = Arc::new(spawn_sims(n_devices).await);
    let fleet = sims_fleet(&sims);

    let broker_port = free_port();
    let backend_url = backend.url();
    let gw_dir = dir.path().join("gw");
    let mut gw = GatewayProc::spawn(
        gateway_bin(),
        &gw_dir,
        &GatewaySpec {
            id: "gw-crash",
            broker: BrokerChoice::Embedded(broker_port),
            backend: Some(&backend_url),
            fleet: &fleet,
        },
    )
    .await;
    let broker_url = gw.broker_url.clone();
    // The embedded broker admits only enrolled agents: the tap is one.
    let tap_key = enrol_agent(&gw.config, "crash-tap", &dir.path().join("tap"));
    let tap = WireTap::start_as(
        &broker_url,
        "crash-tap",
        tap_key.broker_password("crash-tap"),
    )
    .await;

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let agent_cfg = agent_dir.join("agent.toml");
    let agent_log = agent_dir.join("agent.log");
    enrol_agent(&gw.config, AGENT, &agent_dir);
    std::fs::write(
        &agent_cfg,
        sims_agent_toml(AGENT, &broker_url, &sims, "100ms"),
    )
    .unwrap();
    let mut agent = spawn_agent(agent_bin(), &agent_cfg, &agent_log);
    until_all_up_no_fault(&gw, n_devices, Duration::from_secs(90)).await;
    eprintln!(
        "crash: devices up after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Faults on a schedule: every 150–600 ms one device changes, raising a fault if it
    // had none and clearing it otherwise.
    let stop_faults = Arc::new(AtomicBool::new(false));
    let faults = {
        let stop = stop_faults.clone();
        let sims = sims.clone();
        let mut frng = Rng::from_env("TEND_CRASH_FAULT_SEED");
        tokio::spawn(async move {
            let mut active = vec![false; sims.len()];
            let mut raised = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let i = frng.range(0, sims.len() as u64) as usize;
                if active[i] {
                    sims[i].1.clear();
                } else {
                    sims[i].1.raise(frng.next_u64());
                    raised += 1;
                }
                active[i] = !active[i];
                tokio::time::sleep(frng.millis(150, 600)).await;
            }
            for (_, s) in sims.iter() {
                s.clear();
            }
            raised
        })
    };

    // The kills, in a random order at random moments; each restarted at once on the same
    // outbox or data directory.
    let (mut a_left, mut g_left) = (agent_kills, gateway_kills);
    while a_left + g_left > 0 {
        tokio::time::sleep(rng.millis(50, 2500)).await;
        if rng.range(0, a_left + g_left) < a_left {
            let _ = agent.start_kill();
            let _ = agent.wait().await;
            agent = spawn_agent(agent_bin(), &agent_cfg, &agent_log);
            a_left -= 1;
        } else {
            gw.kill().await;
            gw = GatewayProc::start(gateway_bin(), &gw_dir, &gw.config.clone(), &gw.log.clone())
                .await;
            g_left -= 1;
        }
    }
    eprintln!(
        "crash: kills done after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Settle: faults stop and clear, the gateway sees every device up without a fault,
    // the agent's outbox empties, every ticket is forwarded.
    stop_faults.store(true, Ordering::SeqCst);
    let raised = faults.await.unwrap();
    until_all_up_no_fault(&gw, n_devices, Duration::from_secs(90)).await;
    drain_agent(
        &mut agent,
        &agent_cfg,
        &agent_log,
        sims_agent_toml(AGENT, &broker_url, &sims, "1h"),
        &gw,
        &sims[0].0,
        Duration::from_secs(120),
    )
    .await;
    eprintln!(
        "crash: settled after {:.1}s",
        started.elapsed().as_secs_f64()
    );

    // Both stop for good; their files are read directly.
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    gw.kill().await;
    let records =
        assert_delivered_exactly_once(&agent_dir.join("data"), &gw_dir.join("data"), AGENT).await;
    let (tapped, resent) = assert_no_conflicting_resend(&tap);
    let ids: Vec<&str> = sims.iter().map(|(id, _)| id.as_str()).collect();
    let t = assert_one_ticket_per_episode(&gw_dir.join("data"), &backend, &ids, &[]);
    assert!(t.episodes > 0 && t.tickets > 0, "{t:?}");
    println!(
        "crash summary: agent_kills={agent_kills} gateway_kills={gateway_kills} devices={n_devices} \
         records={records} seen_on_wire={tapped} resent={resent} faults_raised={raised} episodes={} \
         tickets={} backend_tickets={} ticket_events={} backend_requests={} duration={:.1}s",
        t.episodes,
        t.tickets,
        t.backend_tickets,
        t.events,
        backend.requests().len(),
        started.elapsed().as_secs_f64()
    );
}

//! The scale-out phase (DESIGN "Scale-out"): ingest through a real Mosquitto whose
//! shared subscription hands the agents' batches to one, two or three gateways, each
//! storing in one shared PostgreSQL (a throwaway cluster on the same machine, fsync on
//! as in production), beside one gateway on redb
//! behind the same broker. The synthetic agents are the ingest phase's; live agents keep
//! one batch in flight each. Then, on the same gateways, fault to ticket: the real agent
//! polling the simulators through the same broker, its faults' tickets sent by whichever
//! gateway claims the job (each exactly once: the run fails on a duplicate).

use super::{
    clean, enrol_ingest, faults, ingest_batches, log, procs, publish_until_acked, tend, Args,
    GatewayPlan, Sims,
};
use crate::report::Report;
use crate::tend::{Gateway, SharedPlan};
use std::net::SocketAddr;
use std::path::Path;

/// The layouts measured: store kind and number of gateways.
const LAYOUTS: [(&str, usize); 4] = [
    ("redb", 1),
    ("postgres", 1),
    ("postgres", 2),
    ("postgres", 3),
];

pub async fn scaleout(
    a: &Args,
    sims: &Sims,
    work: &Path,
    report: &mut Report,
) -> anyhow::Result<()> {
    let trust_dir = work.join("scaleout-trust");
    let plan = |name: &str, shared: Option<SharedPlan>, backend: Option<String>| GatewayPlan {
        dir: work.join(format!("scaleout-{name}")).join("gateway"),
        devices: a.devices,
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        backend: backend.map(|url| (url, faults::BACKEND_TOKEN.to_string())),
        trust_dir: Some(trust_dir.clone()),
        shared,
    };
    let enrol_plan = plan("enrol", None, None);
    let creds = work.join("scaleout-credentials");
    let (keys, _) = enrol_ingest(a, &enrol_plan, &creds)?;
    // The real agent of the fault runs, in the same trust directory.
    let agent_cred = creds.join(format!("{}.cred", tend::AGENT_ID));
    let agent_key = tend::enrol(
        &a.bin,
        &enrol_plan.dir.join("gateway.toml"),
        tend::AGENT_ID,
        &agent_cred,
    )?;
    let pg = tokio::task::spawn_blocking(tend_testkit::postgres::Postgres::start_durable).await?;
    let mqtt_port = tend_testkit::ports::free_port();
    let broker_dir = work.join("scaleout-mosquitto");
    std::fs::create_dir_all(&broker_dir)?;
    let _mosquitto = tend_testkit::mosquitto::start_mosquitto(&broker_dir, mqtt_port).await;
    let size = 10;
    let total = a.ingest_records.min(size as u64 * 10_000);
    let batches = ingest_batches(a, &keys, size, total)?;
    let tck = procs::clk_tck();
    for run in 0..a.runs {
        for (kind, n) in LAYOUTS {
            let name = format!("{kind}-{n}-{run}");
            let store = match kind {
                "postgres" => {
                    let db = pg.create_database(&name.replace('-', "_"));
                    format!(
                        "[store]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"../pg.password\"\n",
                        pg.url(&db)
                    )
                }
                _ => String::new(),
            };
            let backend = tend_testkit::backend_standin::spawn(faults::BACKEND_TOKEN).await?;
            let broker_url = format!("mqtt://127.0.0.1:{mqtt_port}");
            let mut gws = Vec::new();
            for g in 0..n {
                let p = plan(
                    &format!("{name}-{g}"),
                    Some(SharedPlan {
                        gateway_id: format!("gw-{g}"),
                        broker_url: broker_url.clone(),
                        group: "bench".into(),
                        store: store.clone(),
                    }),
                    Some(backend.url()),
                );
                std::fs::create_dir_all(p.dir.parent().unwrap_or(work))?;
                tend_testkit::config::write_secret(
                    p.dir.parent().unwrap_or(work).join("pg.password"),
                    format!("{}\n", pg.password()),
                )?;
                gws.push(Gateway::start(&a.bin, &p).await?);
            }
            let pids: Vec<u32> = gws.iter().map(|g| g.proc.pid()).collect();
            let cpu0: u64 = pids.iter().map(|&p| procs::sample(p).ticks).sum();
            let secs = publish_until_acked(
                "127.0.0.1",
                mqtt_port,
                None,
                &keys,
                &batches,
                total,
                a.ingest_agents,
            )
            .await?;
            let cpu1: u64 = pids.iter().map(|&p| procs::sample(p).ticks).sum();
            let mut stored = 0;
            for gw in &gws {
                stored += gw.metric("tend_gateway_records_total").await?;
            }
            let rate = total as f64 / secs;
            let cpu = (cpu1 - cpu0) as f64 / tck / secs * 100.0;
            log(format!(
                "scale-out run {} ({kind}, {n} gateway(s), batches of {size}, {} in flight): {total} records in {secs:.2} s = {rate:.0} records/s; gateways' CPU {cpu:.0} % of a core; stored {stored}",
                run + 1,
                a.ingest_agents
            ));
            anyhow::ensure!(
                stored >= total,
                "{kind} x{n}: stored {stored} of {total} records"
            );
            report.scaleout.push((kind.to_string(), n, rate, cpu));
            let agent_dir = work.join(format!("scaleout-{name}-agent"));
            std::fs::create_dir_all(&agent_dir)?;
            std::fs::copy(
                &agent_cred,
                agent_dir.join(format!("{}.cred", tend::AGENT_ID)),
            )?;
            let tap = faults::Tap {
                host: "127.0.0.1",
                port: mqtt_port,
                login: None,
                key: &agent_key,
            };
            let times = faults::fault_run(
                a,
                sims,
                &format!("scale-out run {} ({kind}, {n} gateway(s))", run + 1),
                &tap,
                &broker_url,
                &agent_dir,
                &backend,
            )
            .await;
            for gw in gws {
                gw.stop().await;
            }
            backend.stop().await;
            clean(&agent_dir);
            for g in 0..n {
                clean(&work.join(format!("scaleout-{name}-{g}")));
            }
            let times = times?;
            anyhow::ensure!(
                times.creates == times.raised,
                "{kind} x{n}: {} ticket creations for {} faults",
                times.creates,
                times.raised
            );
            report
                .scaleout_latency
                .push((kind.to_string(), n, times.poll_ms));
        }
    }
    Ok(())
}

//! The bench's report: every figure as the median of its runs (the runs listed beside
//! it), against the target of DESIGN §5.

use crate::procs::Usage;
use std::fmt::Write as _;
use std::path::Path;

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// Nearest-rank percentile (`p` in 0–100); NaN for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

/// The outbox runs with one number of appenders.
#[derive(Debug, Default)]
pub struct OutboxLoad {
    pub appenders: usize,
    /// Durable records/s per run.
    pub rates: Vec<f64>,
    /// CPU µs (all threads) per durable record, per run.
    pub cpu_us: Vec<f64>,
}

pub struct Report {
    command: String,
    machine: String,
    load_before: String,
    /// Layout, usage, records/s the gateway stored.
    pub tend_usage: Vec<(String, Usage, f64)>,
    /// Layout, this machine's CPU µs per wake-up, measured beside the agent's window
    /// ([`crate::procs::WakeCost`]).
    pub wake_cost: Vec<(String, f64)>,
    /// Layout, usage, messages in the window, messages/s, datapoints/s.
    pub peer_usage: Vec<(String, Usage, u64, f64, f64)>,
    /// One per appender count.
    pub outbox: Vec<OutboxLoad>,
    /// Median 4 KiB write + fdatasync before each outbox run, ms.
    pub fsync_ms: Vec<f64>,
    /// Drain seconds, seconds to the first record stored, lost, received twice.
    pub drain: Vec<(f64, f64, u64, u64)>,
    /// The agent holding the backlog in the outage: VmRSS, MiB; VmHWM through the drain.
    pub outage_mib: Vec<(f64, f64)>,
    /// The shipped binaries and their bytes.
    pub dist_sizes: Vec<(String, u64)>,
    /// poll→ticket ms, raise→ticket ms, faults raised.
    pub latency: Vec<(Vec<f64>, Vec<f64>, usize)>,
    /// Batch size, records/s, gateway CPU % of a core, gateway CPU µs per record.
    pub ingest: Vec<(usize, f64, f64, f64)>,
    /// Records/s on one core: decoding batches, applying them to the store.
    pub ingest_breakdown: Option<(f64, f64)>,
    /// Store kind, gateways, records/s, the gateways' CPU (% of a core).
    pub scaleout: Vec<(String, usize, f64, f64)>,
    /// Per scale-out run: store kind, gateways, poll → ticket times (ms).
    pub scaleout_latency: Vec<(String, usize, Vec<f64>)>,
    /// Per backlog record: encoded bytes (what the outbox cap counts), bytes of file.
    pub outbox_size: Option<(f64, f64)>,
    windows: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = cpu.lines().filter(|l| l.starts_with("processor")).count();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|k| k / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cores} cores ({model}), {mem:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

fn runs(v: &[f64], digits: usize) -> String {
    v.iter()
        .map(|x| format!("{x:.digits$}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

impl Report {
    pub fn new(a: &crate::Args, work: &Path) -> Report {
        let _ = work;
        Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            machine: machine(),
            load_before: loadavg(),
            tend_usage: Vec::new(),
            wake_cost: Vec::new(),
            peer_usage: Vec::new(),
            outbox: Vec::new(),
            fsync_ms: Vec::new(),
            drain: Vec::new(),
            outage_mib: Vec::new(),
            dist_sizes: Vec::new(),
            latency: Vec::new(),
            ingest: Vec::new(),
            ingest_breakdown: None,
            scaleout: Vec::new(),
            scaleout_latency: Vec::new(),
            outbox_size: None,
            windows: format!(
                "{} run(s); resource window {:?} after {:?} warm-up; {} devices, layouts {}; backlog {}; {} faults per run every {:?}; ingest up to {} records (10,000 batches) per batch size {} from {} agents, {} batches in flight for 1,000-record batches, one per agent for smaller ones",
                a.runs, a.window, a.warmup, a.devices, a.layouts, a.backlog, a.episodes, a.fault_spacing,
                a.ingest_records, a.ingest_batches, a.ingest_agents, a.ingest_window
            ) + if a.every_poll {
                "; the agent reads every AV-500 point at every poll (--every-poll)"
            } else {
                "; the agent's AV-500 profile reads its maintenance counters once a minute (the peer: every poll)"
            },
        }
    }

    /// The resources rows of one layout: tend, the peer, and their ratios.
    fn render_resources(&self, o: &mut String, layout: &str) {
        let tend: Vec<_> = self.tend_usage.iter().filter(|u| u.0 == layout).collect();
        let peer: Vec<_> = self.peer_usage.iter().filter(|u| u.0 == layout).collect();
        let cpu: Vec<f64> = tend.iter().map(|u| u.1.cpu_pct).collect();
        let hwm: Vec<f64> = tend.iter().map(|u| u.1.hwm_mib).collect();
        let rss: Vec<f64> = tend.iter().map(|u| u.1.rss_mean_mib).collect();
        let rate: Vec<f64> = tend.iter().map(|u| u.2).collect();
        let _ = writeln!(
            o,
            "| **{layout}**: tend-agent CPU, % of one core | {:.2} | {} | ≤ 1 % | {} |",
            median(&cpu),
            runs(&cpu, 2),
            verdict(median(&cpu) <= 1.0)
        );
        let _ = writeln!(
            o,
            "| {layout}: tend-agent peak resident memory (VmHWM), MiB | {:.1} | {} | ≤ 8 MiB | {} |",
            median(&hwm),
            runs(&hwm, 1),
            verdict(median(&hwm) <= 8.0)
        );
        let _ = writeln!(
            o,
            "| {layout}: tend-agent mean resident memory (VmRSS), MiB | {:.1} | {} | | |",
            median(&rss),
            runs(&rss, 1)
        );
        let _ = writeln!(
            o,
            "| {layout}: records the gateway stored from the agent, /s | {:.1} | {} | (50 devices × 1/s) | |",
            median(&rate),
            runs(&rate, 1)
        );
        let wakes: Vec<f64> = tend.iter().map(|u| u.1.wakeups_per_s).collect();
        let _ = writeln!(
            o,
            "| {layout}: tend-agent wake-ups (its threads' voluntary context switches), /s | {:.0} | {} | | |",
            median(&wakes),
            runs(&wakes, 0)
        );
        let cost: Vec<f64> = self
            .wake_cost
            .iter()
            .filter(|w| w.0 == layout)
            .map(|w| w.1)
            .collect();
        if !cost.is_empty() {
            // What the wake-ups alone cost at this machine's price: the part of the CPU
            // figure a leaner program cannot remove without waking less often.
            let _ = writeln!(
                o,
                "| {layout}: … this machine's CPU per wake-up (a thread sleeping 10 ms at a time, same window), µs; the agent's wake-ups at that price, % of one core | {:.0}; {:.2} | {} | | |",
                median(&cost),
                median(&wakes) * median(&cost) / 1e4,
                runs(&cost, 0)
            );
        }
        if peer.is_empty() {
            return;
        }
        let pcpu: Vec<f64> = peer.iter().map(|u| u.1.cpu_pct).collect();
        let phwm: Vec<f64> = peer.iter().map(|u| u.1.hwm_mib).collect();
        let prss: Vec<f64> = peer.iter().map(|u| u.1.rss_mean_mib).collect();
        let pmps: Vec<f64> = peer.iter().map(|u| u.3).collect();
        let pdps: Vec<f64> = peer.iter().map(|u| u.4).collect();
        let _ = writeln!(
            o,
            "| {layout}: peer CPU, % of one core | {:.2} | {} | | |",
            median(&pcpu),
            runs(&pcpu, 2)
        );
        let _ = writeln!(
            o,
            "| {layout}: peer peak resident memory (VmHWM, process tree), MiB | {:.1} | {} | | |",
            median(&phwm),
            runs(&phwm, 1)
        );
        let _ = writeln!(
            o,
            "| {layout}: peer mean resident memory (VmRSS), MiB | {:.1} | {} | | |",
            median(&prss),
            runs(&prss, 1)
        );
        let _ = writeln!(
            o,
            "| {layout}: peer MQTT telemetry messages /s (datapoints /s) | {:.1} ({:.0}) | {} | (50 devices × 1/s) | |",
            median(&pmps),
            median(&pdps),
            runs(&pmps, 1)
        );
        // A peer that read nothing did not do the same work: no ratio is taken from it.
        if pmps.iter().any(|m| *m < 0.9 * median(&rate)) {
            let _ = writeln!(
                o,
                "| {layout}: tend ÷ peer | not compared: the peer published fewer messages than the agent stored records in a run | | ≤ 0.125 (8× less) | **no comparison** |"
            );
            return;
        }
        let cpu_ratio = median(&cpu) / median(&pcpu);
        let mem_ratio = median(&hwm) / median(&phwm);
        let rss_ratio = median(&rss) / median(&prss);
        let _ = writeln!(
            o,
            "| {layout}: CPU, tend ÷ peer | {cpu_ratio:.3} (peer uses {:.1}×) | | ≤ 0.125 (8× less) | {} |",
            1.0 / cpu_ratio,
            verdict(cpu_ratio <= 0.125)
        );
        let _ = writeln!(
            o,
            "| {layout}: peak memory, tend ÷ peer | {mem_ratio:.3} (peer uses {:.1}×) | | ≤ 0.125 (8× less) | {} |",
            1.0 / mem_ratio,
            verdict(mem_ratio <= 0.125)
        );
        let _ = writeln!(
            o,
            "| {layout}: mean memory, tend ÷ peer | {rss_ratio:.3} (peer uses {:.1}×) | | | |",
            1.0 / rss_ratio
        );
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "## Results\n");
        let _ = writeln!(o, "- machine: {}", self.machine);
        let _ = writeln!(o, "- command: `{}`", self.command);
        let _ = writeln!(o, "- settings: {}", self.windows);
        let _ = writeln!(
            o,
            "- load average (1, 5, 15 min) at start: {}; at end: {}\n",
            self.load_before,
            loadavg()
        );
        let _ = writeln!(o, "| figure | median | runs | DESIGN §5 target | |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        let mut layouts: Vec<&str> = Vec::new();
        for (l, ..) in &self.tend_usage {
            if !layouts.contains(&l.as_str()) {
                layouts.push(l);
            }
        }
        for layout in layouts {
            self.render_resources(&mut o, layout);
        }
        if !self.dist_sizes.is_empty() {
            for (name, bytes) in &self.dist_sizes {
                let mib = *bytes as f64 / 1024.0 / 1024.0;
                let (target, ok) = if name == "tend-agent" {
                    ("≤ 6 MiB", Some(mib <= 6.0))
                } else {
                    ("", None)
                };
                let _ = writeln!(
                    o,
                    "| {name} as shipped (dist profile, stripped), MiB | {mib:.2} | | {target} | {} |",
                    ok.map_or("", verdict)
                );
            }
        }
        // The target is the outbox's throughput: the most appenders measured, so that the
        // commit's latency is not what bounds it.
        let most = self.outbox.iter().map(|l| l.appenders).max();
        for load in &self.outbox {
            let rate = median(&load.rates);
            let (target, ok) = if Some(load.appenders) == most {
                ("≥ 100,000", verdict(rate >= 100_000.0))
            } else {
                ("(at most appenders ÷ commit time)", "")
            };
            let _ = writeln!(
                o,
                "| outbox durable records/s, {} appenders | {rate:.0} | {} | {target} | {ok} |",
                load.appenders,
                runs(&load.rates, 0),
            );
            let _ = writeln!(
                o,
                "| … CPU per durable record (all threads), µs; the CPU ceiling on one core | {:.1}; {:.0} records/s | {} | | |",
                median(&load.cpu_us),
                1e6 / median(&load.cpu_us),
                runs(&load.cpu_us, 1)
            );
        }
        if !self.outbox.is_empty() {
            let _ = writeln!(
                o,
                "| … the disk meanwhile: 4 KiB write + fdatasync, ms | {:.2} | {} | | |",
                median(&self.fsync_ms),
                runs(&self.fsync_ms, 2)
            );
        }
        if !self.drain.is_empty() {
            let t: Vec<f64> = self.drain.iter().map(|d| d.0).collect();
            let f: Vec<f64> = self.drain.iter().map(|d| d.1).collect();
            let lost: u64 = self.drain.iter().map(|d| d.2).sum();
            let dups: Vec<f64> = self.drain.iter().map(|d| d.3 as f64).collect();
            let _ = writeln!(
                o,
                "| backlog drain, s (gateway ready → all stored) | {:.2} | {} | < 15 s | {} |",
                median(&t),
                runs(&t, 2),
                verdict(median(&t) < 15.0)
            );
            let _ = writeln!(
                o,
                "| … of which the agent's reconnect wait, s | {:.2} | {} | | |",
                median(&f),
                runs(&f, 2)
            );
            if !self.outage_mib.is_empty() {
                let held: Vec<f64> = self.outage_mib.iter().map(|m| m.0).collect();
                let peak: Vec<f64> = self.outage_mib.iter().map(|m| m.1).collect();
                let _ = writeln!(
                    o,
                    "| tend-agent resident memory holding the backlog (gateway down), MiB | {:.1} | {} | ≤ 16 MiB | {} |",
                    median(&held),
                    runs(&held, 1),
                    verdict(median(&held) <= 16.0)
                );
                let _ = writeln!(
                    o,
                    "| … its peak through the drain (VmHWM), MiB | {:.1} | {} | ≤ 16 MiB | {} |",
                    median(&peak),
                    runs(&peak, 1),
                    verdict(median(&peak) <= 16.0)
                );
            }
            if let Some((enc, file)) = self.outbox_size {
                let _ = writeln!(
                    o,
                    "| outbox bytes per AV-500 poll record: encoded (counted by `max_size`) / on disk | {enc:.0} / {file:.0} | | | |"
                );
            }
            let _ = writeln!(
                o,
                "| backlog records lost (all runs) | {lost} | | 0 | {} |",
                verdict(lost == 0)
            );
            let _ = writeln!(
                o,
                "| backlog records received twice (resent, stored once) | {:.0} | {} | 0 in the store | |",
                median(&dups),
                runs(&dups, 0)
            );
        }
        if !self.latency.is_empty() {
            let p50: Vec<f64> = self
                .latency
                .iter()
                .map(|l| percentile(&l.0, 50.0))
                .collect();
            let p99: Vec<f64> = self
                .latency
                .iter()
                .map(|l| percentile(&l.0, 99.0))
                .collect();
            let all: Vec<f64> = self.latency.iter().flat_map(|l| l.0.clone()).collect();
            let raise: Vec<f64> = self.latency.iter().flat_map(|l| l.1.clone()).collect();
            let got: usize = self.latency.iter().map(|l| l.1.len()).sum();
            let want: usize = self.latency.iter().map(|l| l.2).sum();
            let _ = writeln!(
                o,
                "| fault → ticket p50, ms (poll that saw it → backend received) | {:.1} | {} | | |",
                median(&p50),
                runs(&p50, 1)
            );
            let _ = writeln!(
                o,
                "| fault → ticket p99, ms | {:.1} | {} | < 150 ms | {} |",
                median(&p99),
                runs(&p99, 1),
                verdict(median(&p99) < 150.0 && got == want)
            );
            let _ = writeln!(
                o,
                "| … all runs pooled: p50 / p99 / max, ms ({} tickets of {want} faults) | {:.1} / {:.1} / {:.1} | | | |",
                all.len(),
                percentile(&all, 50.0),
                percentile(&all, 99.0),
                percentile(&all, 100.0)
            );
            let _ = writeln!(
                o,
                "| fault raised in the simulator → ticket p50 / p99, ms (adds the wait for the next 1 s poll) | {:.1} / {:.1} | | | |",
                percentile(&raise, 50.0),
                percentile(&raise, 99.0)
            );
        }
        let mut sizes: Vec<usize> = self.ingest.iter().map(|i| i.0).collect();
        sizes.dedup();
        for size in sizes {
            let of = |f: fn(&(usize, f64, f64, f64)) -> f64| -> Vec<f64> {
                self.ingest.iter().filter(|i| i.0 == size).map(f).collect()
            };
            let (r, c, us) = (of(|i| i.1), of(|i| i.2), of(|i| i.3));
            let _ = writeln!(
                o,
                "| gateway ingest, batches of {size}, records/s | {:.0} | {} | ≥ 100,000 | {} |",
                median(&r),
                runs(&r, 0),
                verdict(median(&r) >= 100_000.0)
            );
            let _ = writeln!(
                o,
                "| … gateway CPU meanwhile, % of one core; CPU per record (broker, MQTT, decode, apply, ack), µs | {:.0}; {:.1} | {} | (2 cores = 200 %) | |",
                median(&c),
                median(&us),
                runs(&us, 1)
            );
        }
        if let Some((dec, app)) = self.ingest_breakdown {
            let _ = writeln!(
                o,
                "| … one core's worth (CPU time): decode {dec:.0} records/s, apply to the store {app:.0} records/s | {:.0} | | | |",
                1.0 / (1.0 / dec + 1.0 / app)
            );
        }
        let mut layouts: Vec<(String, usize)> =
            self.scaleout.iter().map(|s| (s.0.clone(), s.1)).collect();
        layouts.sort();
        layouts.dedup();
        for (kind, n) in layouts {
            let mine: Vec<&(String, usize, f64, f64)> = self
                .scaleout
                .iter()
                .filter(|s| s.0 == kind && s.1 == n)
                .collect();
            let r: Vec<f64> = mine.iter().map(|s| s.2).collect();
            let c: Vec<f64> = mine.iter().map(|s| s.3).collect();
            let _ = writeln!(
                o,
                "| scale-out: {n} gateway(s) on {kind} behind Mosquitto, batches of 10, records/s (gateways' CPU, % of a core) | {:.0} ({:.0}) | {} | | |",
                median(&r),
                median(&c),
                runs(&r, 0)
            );
            let times: Vec<&Vec<f64>> = self
                .scaleout_latency
                .iter()
                .filter(|s| s.0 == kind && s.1 == n)
                .map(|s| &s.2)
                .collect();
            if !times.is_empty() {
                let p50: Vec<f64> = times.iter().map(|t| percentile(t, 50.0)).collect();
                let p99: Vec<f64> = times.iter().map(|t| percentile(t, 99.0)).collect();
                let all: Vec<f64> = times.iter().flat_map(|t| t.iter().copied()).collect();
                let _ = writeln!(
                    o,
                    "| scale-out: {n} gateway(s) on {kind}, fault → ticket p50 / p99, ms (median of runs; all {} pooled: p99 {:.1}, max {:.1}) | {:.1} / {:.1} | p99 {} | < 150 ms | {} |",
                    all.len(),
                    percentile(&all, 99.0),
                    percentile(&all, 100.0),
                    median(&p50),
                    median(&p99),
                    runs(&p99, 1),
                    verdict(median(&p99) < 150.0)
                );
            }
        }
        o
    }
}

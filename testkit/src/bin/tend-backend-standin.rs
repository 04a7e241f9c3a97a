//! The service backend stand-in as a program, for the demo: the ticket API of
//! `service-backend-api.md` (v1.1, with status history) on 127.0.0.1, and an "engineer"
//! who moves the tickets along on a schedule of seconds so the gateway's SLA watch has
//! something to judge: most tickets are answered, visited and fixed in time; every fourth
//! is left unanswered, so its deadlines are missed.
//!
//!     tend-backend-standin --token-file FILE [--engineer]
//!
//! Prints `ready url=http://127.0.0.1:PORT` once listening; runs until killed.

use jiff::Timestamp;
use std::time::Duration;
use tend_testkit::backend_standin;

/// Seconds after creation at which a ticket of `kind`/`class` reaches each status.
fn plan(kind: &str, class: &str) -> &'static [(&'static str, i64)] {
    match (kind, class) {
        ("fault" | "monitoring_lost", "major") => &[
            ("acknowledged", 20),
            ("engineer_dispatched", 40),
            ("on_site", 90),
            ("resolved", 180),
        ],
        ("fault" | "monitoring_lost", "complex") => &[
            ("acknowledged", 20),
            ("engineer_dispatched", 40),
            ("on_site", 90),
            ("plan_agreed", 150),
        ],
        ("fault" | "monitoring_lost", _) => &[("acknowledged", 20), ("resolved", 90)],
        _ => &[("acknowledged", 30), ("resolved", 120)],
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut token_file = None;
    let mut engineer = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--token-file" => token_file = args.next(),
            "--engineer" => engineer = true,
            other => {
                eprintln!("tend-backend-standin: unknown argument {other:?} (--token-file FILE [--engineer])");
                std::process::exit(2);
            }
        }
    }
    let Some(token_file) = token_file else {
        eprintln!("tend-backend-standin: --token-file FILE is required");
        std::process::exit(2);
    };
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) => t.trim().to_string(),
        Err(e) => {
            eprintln!("tend-backend-standin: {token_file}: {e}");
            std::process::exit(2);
        }
    };
    let backend = match backend_standin::spawn(&token).await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tend-backend-standin: cannot listen: {e}");
            std::process::exit(1);
        }
    };
    println!("ready url={}", backend.url());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if !engineer {
            continue;
        }
        let now = Timestamp::now();
        for (n, t) in backend.tickets().into_iter().enumerate() {
            // Every fourth ticket is forgotten: nobody answers it.
            if n % 4 == 3 {
                continue;
            }
            let kind = t.body["kind"].as_str().unwrap_or("");
            let class = t.body["fault"]["class"].as_str().unwrap_or("");
            let age = now.duration_since(t.created).as_secs();
            for (status, after) in plan(kind, class) {
                if age >= *after && !t.history.iter().any(|(s, _)| s == status) {
                    backend.set_status(&t.id, status);
                    eprintln!("{} {} -> {status}", t.id, t.key);
                }
            }
        }
    }
}

//! The hotline HTTP server against hostile clients, with real sockets and a real gateway
//! process (issue 13, item 4): idle connections by the thousand, a slow-loris sender,
//! wrong tokens by the hundred, and an audit log that must stay under its cap.
//!
//! Timings here are only generous upper bounds on waiting.

use serde_json::json;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tend_testkit::config::{fleet_toml, write_secret, API_TOKEN};
use tend_testkit::metrics::metric;
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;
use tend_testkit::wait::until;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_tend-gateway");

/// Starts a gateway with its embedded broker, `api_extra` added to `[api]`; with
/// `open_files`, under `prlimit` so the process has only that many descriptors (the
/// field's 1,024 default), when `prlimit` is installed.
async fn gateway(dir: &Path, api_extra: &str, open_files: Option<u64>) -> GatewayProc {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("fleet.toml"), fleet_toml(&[])).unwrap();
    write_secret(dir.join("api.token"), format!("{API_TOKEN}\n")).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "gateway_id = \"gw-hostile\"\ndata_dir = \"data\"\nfleet = \"fleet.toml\"\n\n\
             [broker]\nembedded = true\nlisten = \"127.0.0.1:{}\"\n\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"api.token\"\n{api_extra}\n",
            free_port()
        ),
    )
    .unwrap();
    let log = dir.join("gateway.log");
    let prlimit = ["/usr/bin/prlimit", "/bin/prlimit"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let (Some(n), Some(prlimit)) = (open_files, prlimit) else {
        if open_files.is_some() {
            eprintln!("prlimit is not installed: the gateway keeps this process's limit");
        }
        return GatewayProc::start(Path::new(GATEWAY_BIN), dir, &config, &log).await;
    };
    let mut child = tokio::process::Command::new(prlimit)
        .arg(format!("--nofile={n}:{n}"))
        .arg(GATEWAY_BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info,tend_gateway=debug,rumqttd=warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.starts_with("gateway ready") {
                return l;
            }
        }
        panic!(
            "gateway exited; log:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
    })
    .await
    .expect("gateway did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_string()
    };
    GatewayProc {
        child,
        api: field("api"),
        broker_url: field("broker"),
        dir: dir.to_path_buf(),
        config,
        log,
    }
}

fn api_addr(gw: &GatewayProc) -> String {
    gw.api.trim_start_matches("http://").to_string()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

/// Whether an enrolled agent gets a CONNACK from the gateway's broker within `within`.
async fn mqtt_connects(gw: &GatewayProc, within: Duration) -> bool {
    let cred = gw.config.with_file_name("probe-agent.cred");
    let key = tend_testkit::trust::enrol(Path::new(GATEWAY_BIN), &gw.config, "probe-agent", &cred);
    let (host, port) = gw
        .broker_url
        .trim_start_matches("mqtt://")
        .rsplit_once(':')
        .unwrap();
    let mut opts = rumqttc::MqttOptions::new("probe-agent", host, port.parse::<u16>().unwrap());
    opts.set_credentials("probe-agent", key.broker_password("probe-agent"));
    let (_client, mut el) = rumqttc::AsyncClient::new(opts, 8);
    tokio::time::timeout(within, async {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => return,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .is_ok()
}

fn audit_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_leave_the_api_and_the_broker_serving() {
    const IDLE: usize = 1_500;
    let limit = tend_gateway::limits::raise_open_files();
    assert!(
        limit > 2 * IDLE as u64,
        "this test needs {} descriptors, has {limit}",
        2 * IDLE
    );
    let dir = tempfile::tempdir().unwrap();
    // 1,024 descriptors, as a default install has: the hotline gets 256 of them, and an
    // idle connection is let go after 2 s so the ones waiting get their turn.
    let mut gw = gateway(dir.path(), "idle_timeout = \"2s\"", Some(1_024)).await;
    let addr = api_addr(&gw);

    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..IDLE {
        let addr = addr.clone();
        opening.spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
                .await
                .ok()
                .and_then(Result::ok)
        });
    }
    let mut idle = Vec::new();
    while let Some(r) = opening.join_next().await {
        idle.extend(r.unwrap());
    }
    eprintln!("{} of {IDLE} idle connections opened", idle.len());
    assert!(idle.len() > 1_024, "only {} connections opened", idle.len());

    // The broker still has descriptors for agents.
    assert!(
        mqtt_connects(&gw, Duration::from_secs(60)).await,
        "an MQTT client could not connect with {} idle hotline connections; log:\n{}",
        idle.len(),
        gw.log_text()
    );
    // And the hotline still answers (once idle connections ahead of it are let go).
    let r = client()
        .get(format!("{}/api/v1/devices", gw.api))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .expect("the hotline did not answer");
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{}/metrics", gw.api))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(gw.alive());
    if Path::new("/usr/bin/prlimit").exists() {
        let log = gw.log_text();
        assert!(
            log.contains("at most 256 connections (open-file limit 1024)"),
            "{log}"
        );
    }
    // Nothing spun: the log stays small.
    let log = std::fs::metadata(&gw.log).unwrap().len();
    assert!(log < 1 << 20, "gateway log is {log} bytes");
    drop(idle);
    gw.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_sender_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), "header_read_timeout = \"1s\"", None).await;
    let mut s = TcpStream::connect(api_addr(&gw)).await.unwrap();
    let header = format!(
        "GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(600)
    );
    // One byte every 100 ms: the whole header would take more than a minute.
    let started = Instant::now();
    let mut sent = 0;
    let mut buf = [0u8; 512];
    let cut = loop {
        if sent == header.len() {
            break false;
        }
        if s.write_all(&header.as_bytes()[sent..sent + 1])
            .await
            .is_err()
        {
            break true;
        }
        sent += 1;
        // A closed connection reads as end of file (or an error, or a 408 first).
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {
                // hyper may answer 408 before closing; read on until the close.
                let mut rest = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
                break true;
            }
            Err(_) => {}
        }
        assert!(started.elapsed() < Duration::from_secs(50), "not cut off");
    };
    assert!(cut, "the whole header went through a byte at a time");
    assert!(sent < header.len());
    eprintln!("cut off after {sent} of {} bytes", header.len());
    // The server is fine afterwards.
    let r = client()
        .get(format!("{}/api/v1/devices", gw.api))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_get_429_and_a_handful_of_audit_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), "", None).await;
    let http = client();
    let mut statuses = Vec::new();
    let mut retry_after = Vec::new();
    for i in 0..200 {
        let r = http
            .post(format!("{}/api/v1/devices/icu7-vent/diagnostics", gw.api))
            .bearer_auth(format!("guess-{i}"))
            .json(&json!({"request": "readings"}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        if status == 429 {
            let secs: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(secs >= 1);
            retry_after.push(secs);
        }
        statuses.push(status);
    }
    assert!(statuses[..5].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 401 || *s == 429));
    assert!(retry_after.len() > 100, "{statuses:?}");
    let text = gw.metrics().await;
    assert_eq!(metric(&text, "tend_gateway_auth_failures_total"), 200.0);

    // A handful of lines at most, not one fsync per request; never a token.
    let audit = dir.path().join("data").join("audit.log");
    let lines = audit_lines(&audit);
    assert!(!lines.is_empty() && lines.len() <= 3, "{lines:?}");
    assert!(lines.iter().all(|l| l["action"] == "unauthorized"));
    assert!(!std::fs::read_to_string(&audit).unwrap().contains("guess-"));

    // While it waits, even the right token is not looked at; after the wait it works.
    let r = http
        .get(format!("{}/api/v1/devices", gw.api))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    if r.status() == 429 {
        let secs: u64 = r.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(secs <= 60, "waits {secs} s after 200 tries");
        tokio::time::sleep(Duration::from_secs(secs)).await;
    }
    let r = until("the right token accepted", Duration::from_secs(90), || {
        let http = http.clone();
        let url = format!("{}/api/v1/devices", gw.api);
        async move {
            let r = http.get(url).bearer_auth(API_TOKEN).send().await.ok()?;
            (r.status() == 200).then_some(r)
        }
    })
    .await;
    assert_eq!(r.status(), 200);
    gw.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_audit_log_under_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = gateway(dir.path(), "audit_max_size = \"4KiB\"", None).await;
    let http = client();
    for i in 0..100 {
        // Each call is audited, refused ones included (no such device here).
        let r = http
            .post(format!("{}/api/v1/devices/dev-{i}/diagnostics", gw.api))
            .bearer_auth(API_TOKEN)
            .json(&json!({"request": "readings"}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let data = dir.path().join("data");
    let size = |name: &str| std::fs::metadata(data.join(name)).map(|m| m.len());
    assert!(size("audit.log").unwrap() <= 4096);
    for n in 1..=4 {
        let s = size(&format!("audit.log.{n}")).unwrap();
        assert!(s <= 4096, "audit.log.{n} is {s} bytes");
    }
    assert!(
        size("audit.log.5").is_err(),
        "only four rotated files are kept"
    );
    // The newest action is the last line of audit.log.
    let last = audit_lines(&data.join("audit.log"));
    assert_eq!(last.last().unwrap()["device"], "dev-99");
    gw.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_slow_answers_are_not_cut() {
    use axum::routing::get;
    use tend_gateway::serve::{serve, Limits};
    // A handler that takes longer than the idle timeout, as a diagnostic waiting for its
    // agent does.
    let router = axum::Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "done"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let server = tokio::spawn(serve(listener, router, None, limits, shutdown.clone()));

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // The answer comes whole, then the connection, idle, is closed by the server.
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("done"), "{text}");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_dribbling_a_frame_is_let_go() {
    use tend_gateway::serve::{serve, Limits};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let limits = Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    };
    let router = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
    let server = tokio::spawn(serve(listener, router, None, limits, shutdown.clone()));
    // HTTP/2 with prior knowledge: the preface, then a frame header a byte at a time (the
    // HTTP/1 header-read timeout does not apply; the idle timeout does).
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let frame = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let mut i = 0;
    let cut = loop {
        if s.write_all(&frame[i % frame.len()..][..1]).await.is_err() {
            break true;
        }
        i += 1;
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(50) {
            break false;
        }
    };
    assert!(cut, "a dribbling HTTP/2 client kept its connection");
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

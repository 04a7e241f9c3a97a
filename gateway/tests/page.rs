//! The hotline page in a real browser: Debian's headless Chromium opens the page of a
//! running gateway in Chinese and in English, with the token, without it and with a wrong
//! one, and the rendered DOM must be in the browser's language and show the fleet. The
//! headers and the favicon are checked over HTTP beside it.
//!
//! Chromium comes from `.ci/run` (`apt-get install chromium`). Without it the test fails
//! in CI (`CI=true`) and is skipped elsewhere with a notice. `TEND_PAGE_SCREENSHOTS=<dir>`
//! also writes a screenshot of each language there, to look at.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tend_testkit::config::{fleet_toml, BrokerChoice, FleetDevice, GatewaySpec, API_TOKEN};
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;

/// The Chromium binary, or `None` (after saying so) where it may be missing.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TEND_CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file());
    if found.is_none() {
        let msg = "chromium is not installed (apt-get install chromium, as .ci/run does)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

/// Runs headless Chromium on `url` with `lang` as the browser's language and returns
/// the DOM after the page's script has run (5 s of virtual time for its fetches).
async fn browse(chromium: &Path, profile: &Path, lang: &str, url: &str, extra: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--window-size=1280,900",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            // `--lang` alone does not reach navigator.languages in the new headless mode.
            .arg(format!("--lang={lang}"))
            .arg(format!("--accept-lang={lang}"))
            .args(extra)
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 90 s")
    .expect("chromium could not be started");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("DOM is UTF-8")
}

async fn dump_dom(chromium: &Path, dir: &Path, lang: &str, url: &str) -> String {
    // A fresh profile each time: no language choice or token left from another run.
    let profile = tempfile::tempdir_in(dir).unwrap();
    browse(chromium, profile.path(), lang, url, &["--dump-dom"]).await
}

/// What a run in one language must show.
struct Expect {
    lang: &'static str,
    html_lang: &'static str,
    heading: &'static str,
    unknown: &'static str,
    budget: &'static str,
    refused: &'static str,
}

const CHINESE: Expect = Expect {
    lang: "zh-CN",
    html_lang: r#"<html lang="zh-CN">"#,
    heading: "tend 维修热线",
    unknown: r#"<td class="unknown">未知</td>"#,
    budget: "停机预算",
    refused: "网关拒绝了该令牌。",
};
const ENGLISH: Expect = Expect {
    lang: "en-US",
    html_lang: r#"<html lang="en">"#,
    heading: "tend hotline",
    unknown: r#"<td class="unknown">unknown</td>"#,
    budget: "Budget",
    refused: "The gateway refused the token.",
};

#[tokio::test]
async fn page_in_chinese_and_english_in_a_real_browser() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet_toml(&[
        FleetDevice {
            id: "icu7-vent",
            serial: "AV5C-21-004417",
            site: "s-main",
            location: "ICU bed 7",
            accepted: "2025-03-01",
        },
        FleetDevice {
            id: "ward3-pump",
            serial: "LP3B-2403-0457",
            site: "s-county",
            location: "Ward 3 bed 12",
            accepted: "2025-06-01",
        },
    ]);
    let spec = GatewaySpec {
        id: "gw-page",
        broker: BrokerChoice::Embedded(free_port()),
        backend: None,
        fleet: &fleet,
    };
    let gw = GatewayProc::spawn(
        Path::new(env!("CARGO_BIN_EXE_tend-gateway")),
        &dir.path().join("gw"),
        &spec,
    )
    .await;
    let base = &gw.api;

    // Headers and favicon, over plain HTTP.
    let http = reqwest::Client::new();
    let page = http.get(format!("{base}/")).send().await.unwrap();
    let h = page.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    for part in [
        "default-src 'self'",
        "script-src 'sha256-",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} missing in {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let icon = http
        .get(format!("{base}/favicon.ico"))
        .send()
        .await
        .unwrap();
    assert_eq!(icon.status(), 200);
    assert_eq!(icon.headers()["content-type"], "image/x-icon");
    assert_eq!(icon.headers()["x-content-type-options"], "nosniff");
    let refused = http
        .get(format!("{base}/api/v1/devices"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(refused.headers()["x-frame-options"], "DENY");
    assert!(refused.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));

    for want in [CHINESE, ENGLISH] {
        let lang = want.lang;
        // Without a token the page asks for one, in the browser's language.
        let dom = dump_dom(&chromium, dir.path(), lang, &format!("{base}/")).await;
        assert!(dom.contains(want.html_lang), "{lang}: {dom}");
        assert!(dom.contains(want.heading), "{lang}: heading missing: {dom}");
        assert!(
            dom.contains(r#"<form id="login">"#),
            "{lang}: no token form: {dom}"
        );
        assert!(dom.contains(r#"<div id="app" hidden="">"#), "{lang}: {dom}");

        // With the token (in the fragment, never sent to the server) the fleet is shown.
        let url = format!("{base}/#token={API_TOKEN}");
        let dom = dump_dom(&chromium, dir.path(), lang, &url).await;
        assert!(dom.contains(want.heading), "{lang}: heading missing: {dom}");
        assert!(
            dom.contains(r#"<div id="app">"#),
            "{lang}: app hidden: {dom}"
        );
        for id in ["icu7-vent", "ward3-pump"] {
            assert!(
                dom.contains(&format!("<td>{id}")),
                "{lang}: {id} missing: {dom}"
            );
        }
        assert!(
            dom.contains(want.unknown),
            "{lang}: state not translated: {dom}"
        );
        assert!(dom.contains(want.budget), "{lang}: {dom}");
        assert!(
            dom.contains("Asia/Shanghai"),
            "{lang}: zone not shown: {dom}"
        );
        assert!(
            dom.contains(r#"<p id="error" class="err"></p>"#),
            "{lang}: the page reported an error: {dom}"
        );
        assert!(!dom.contains(API_TOKEN), "{lang}: token left in the DOM");

        // A wrong token is refused, and the page says so.
        let dom = dump_dom(&chromium, dir.path(), lang, &format!("{base}/#token=wrong")).await;
        assert!(
            dom.contains(want.refused),
            "{lang}: refusal not shown: {dom}"
        );
        assert!(dom.contains(r#"<div id="app" hidden="">"#), "{lang}: {dom}");

        if let Some(shots) = std::env::var_os("TEND_PAGE_SCREENSHOTS") {
            let profile = tempfile::tempdir_in(dir.path()).unwrap();
            let file = PathBuf::from(shots).join(format!("page-{lang}.png"));
            let arg = format!("--screenshot={}", file.display());
            browse(&chromium, profile.path(), lang, &url, &[&arg]).await;
        }
    }
}

/// A minimal Chrome DevTools Protocol client over the one WebSocket Chromium offers
/// (text frames only; a few dozen lines rather than a WebSocket crate for a test). Events
/// that arrive while a call waits for its answer are kept in `events`.
mod cdp {
    use serde_json::{json, Value};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::TcpStream;

    pub struct Cdp {
        rd: BufReader<OwnedReadHalf>,
        wr: OwnedWriteHalf,
        next_id: u64,
        pub events: Vec<Value>,
    }

    impl Cdp {
        /// Connects to `ws://host:port/path` (the URL Chromium prints on start).
        pub async fn connect(url: &str) -> Cdp {
            let rest = url.strip_prefix("ws://").expect("ws:// URL");
            let (host, path) = rest.split_at(rest.find('/').expect("path in URL"));
            let (rd, mut wr) = TcpStream::connect(host).await.unwrap().into_split();
            let hello = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            wr.write_all(hello.as_bytes()).await.unwrap();
            let mut rd = BufReader::new(rd);
            let mut status = String::new();
            rd.read_line(&mut status).await.unwrap();
            assert!(status.contains(" 101 "), "no WebSocket upgrade: {status}");
            loop {
                let mut line = String::new();
                rd.read_line(&mut line).await.unwrap();
                if line == "\r\n" {
                    break;
                }
            }
            Cdp {
                rd,
                wr,
                next_id: 0,
                events: Vec::new(),
            }
        }

        async fn send(&mut self, text: &str) {
            let p = text.as_bytes();
            let mut f = vec![0x81u8];
            match p.len() {
                n if n < 126 => f.push(0x80 | n as u8),
                n if n < 65536 => {
                    f.push(0x80 | 126);
                    f.extend((n as u16).to_be_bytes());
                }
                n => {
                    f.push(0x80 | 127);
                    f.extend((n as u64).to_be_bytes());
                }
            }
            // A client must mask; an all-zero key leaves the payload as it is.
            f.extend([0u8; 4]);
            f.extend(p);
            self.wr.write_all(&f).await.unwrap();
        }

        async fn receive(&mut self) -> Value {
            let mut msg = Vec::new();
            loop {
                let mut h = [0u8; 2];
                self.rd.read_exact(&mut h).await.unwrap();
                let (fin, op) = (h[0] & 0x80 != 0, h[0] & 0x0f);
                let len = match h[1] & 0x7f {
                    126 => u64::from(self.rd.read_u16().await.unwrap()),
                    127 => self.rd.read_u64().await.unwrap(),
                    n => u64::from(n),
                };
                let mut data = vec![0u8; len as usize];
                self.rd.read_exact(&mut data).await.unwrap();
                match op {
                    0..=2 => msg.extend(data),
                    8 => panic!("Chromium closed the DevTools connection"),
                    _ => continue,
                }
                if fin {
                    return serde_json::from_slice(&msg).unwrap();
                }
            }
        }

        /// Calls `method` (on the page `session`, or on the browser) and returns its result.
        pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
            self.next_id += 1;
            let id = self.next_id;
            let mut m = json!({ "id": id, "method": method, "params": params });
            if let Some(s) = session {
                m["sessionId"] = json!(s);
            }
            self.send(&m.to_string()).await;
            loop {
                let v = self.receive().await;
                if v["id"] == json!(id) {
                    assert!(v.get("error").is_none(), "{method}: {v}");
                    return v["result"].clone();
                }
                if v.get("method").is_some() {
                    self.events.push(v);
                }
            }
        }
    }
}

/// Headless Chromium with its DevTools socket, one page attached.
struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    cdp: cdp::Cdp,
    session: String,
}

impl Browser {
    async fn start(chromium: &Path, lang: &str) -> Browser {
        use tokio::io::AsyncBufReadExt;
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--lang={lang}"))
            .arg(format!("--accept-lang={lang}"))
            .arg("about:blank")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium could not be started");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Some(u) = l.strip_prefix("DevTools listening on ") {
                    return u.trim().to_string();
                }
            }
            panic!("chromium exited without a DevTools socket")
        })
        .await
        .expect("no DevTools socket within 60 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut cdp = cdp::Cdp::connect(&url).await;
        let target = cdp
            .call(
                None,
                "Target.createTarget",
                serde_json::json!({ "url": "about:blank" }),
            )
            .await;
        let attached = cdp
            .call(
                None,
                "Target.attachToTarget",
                serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_string();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            cdp.call(Some(&session), domain, serde_json::json!({}))
                .await;
        }
        Browser {
            _child: child,
            _profile: profile,
            cdp,
            session,
        }
    }

    async fn navigate(&mut self, url: &str) {
        let s = self.session.clone();
        self.cdp
            .call(Some(&s), "Page.navigate", serde_json::json!({ "url": url }))
            .await;
    }

    /// Evaluates `js` in the page (DevTools is not bound by the page's CSP).
    async fn eval(&mut self, js: &str) -> serde_json::Value {
        let s = self.session.clone();
        let r = self
            .cdp
            .call(
                Some(&s),
                "Runtime.evaluate",
                serde_json::json!({ "expression": js, "returnByValue": true }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits (up to 20 s) until `js` is true in the page.
    async fn until(&mut self, what: &str, js: &str) {
        for _ in 0..200 {
            if self.eval(js).await == serde_json::json!(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let body = self.eval("document.body.innerText").await;
        panic!("{what}: not so within 20 s; page says:\n{body}");
    }

    /// The console errors, uncaught exceptions and failed loads reported so far.
    fn errors(&self) -> Vec<String> {
        self.cdp
            .events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => {
                    matches!(e["params"]["type"].as_str(), Some("error" | "assert"))
                }
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .map(|e| e["params"].to_string())
            .collect()
    }
}

const HEADING: &str = "document.querySelector('h1').textContent";
const FIRST_STATE: &str = "document.querySelector('#devices tbody td:nth-child(4)').textContent";

#[tokio::test]
async fn page_driven_over_devtools_switches_language_without_console_errors() {
    let Some(chromium) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet_toml(&[FleetDevice {
        id: "icu7-vent",
        serial: "AV5C-21-004417",
        site: "s-main",
        location: "ICU bed 7",
        accepted: "2025-03-01",
    }]);
    let spec = GatewaySpec {
        id: "gw-page-cdp",
        broker: BrokerChoice::Embedded(free_port()),
        backend: None,
        fleet: &fleet,
    };
    let gw = GatewayProc::spawn(
        Path::new(env!("CARGO_BIN_EXE_tend-gateway")),
        &dir.path().join("gw"),
        &spec,
    )
    .await;
    let mut b = Browser::start(&chromium, "zh-CN").await;

    // A Chinese browser gets the Chinese page, which asks for the token.
    b.navigate(&format!("{}/", gw.api)).await;
    b.until("token form", "!document.getElementById('login').hidden")
        .await;
    assert_eq!(b.eval(HEADING).await, "tend 维修热线");

    // The engineer types the token: the fleet appears, states in Chinese.
    let login = format!(
        "document.getElementById('token').value = '{API_TOKEN}'; \
         document.getElementById('login').requestSubmit(); true"
    );
    b.eval(&login).await;
    b.until(
        "device table",
        "document.querySelectorAll('#devices tbody tr').length === 1",
    )
    .await;
    assert_eq!(b.eval(FIRST_STATE).await, "未知");

    // The switch turns the page English at once, and the choice outlives a reload.
    b.eval("document.querySelector('#langs button[data-lang=en]').click(); true")
        .await;
    b.until("English heading", &format!("{HEADING} === 'tend hotline'"))
        .await;
    b.until("English state", &format!("{FIRST_STATE} === 'unknown'"))
        .await;
    b.navigate(&format!("{}/", gw.api)).await;
    b.until(
        "table after reload",
        "document.querySelectorAll('#devices tbody tr').length === 1",
    )
    .await;
    assert_eq!(b.eval(HEADING).await, "tend hotline");
    assert_eq!(b.eval("document.documentElement.lang").await, "en");
    b.eval("document.querySelector('#devices tbody tr').click(); true")
        .await;
    b.until(
        "device detail",
        "document.querySelector('#detail h2')?.textContent.startsWith('Device icu7-vent') === true",
    )
    .await;
    assert_eq!(
        b.errors(),
        Vec::<String>::new(),
        "the browser reported errors"
    );

    // A wrong token is refused and the page asks again (the 401 is the one error).
    b.eval("sessionStorage.setItem('tend-hotline-token', 'wrong'); location.reload(); true")
        .await;
    b.until(
        "refusal",
        "document.getElementById('login-error').textContent === 'The gateway refused the token.'",
    )
    .await;
    // The refused request is itself reported: proof that errors are seen at all.
    let errors = b.errors();
    assert!(
        !errors.is_empty() && errors.iter().all(|e| e.contains("401")),
        "expected only the refusal: {errors:?}"
    );
}

//! Headless Chromium driven over the Chrome DevTools Protocol, for the suites that test
//! the hotline page in a real browser: Debian's `chromium` (installed by `.ci/run`), a
//! minimal DevTools client over its one WebSocket (text frames only; a few dozen lines
//! rather than a WebSocket crate for tests), and [`Browser`] with one page attached.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Chromium binary, or `None` (after saying so) where it may be missing.
/// How every suite runs Chromium: headless, no sandbox (CI containers run as root), and
/// nothing that would reach the network on its own.
pub const HEADLESS: [&str; 8] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

pub fn chromium() -> Option<PathBuf> {
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

/// A minimal Chrome DevTools Protocol client over the one WebSocket Chromium offers
/// (text frames only; a few dozen lines rather than a WebSocket crate for a test). Events
/// that arrive while a call waits for its answer are kept in `events`.
pub mod cdp {
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
pub struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    cdp: cdp::Cdp,
    session: String,
}

impl Browser {
    pub async fn start(chromium: &Path, lang: &str) -> Browser {
        use tokio::io::AsyncBufReadExt;
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(chromium)
            .args(HEADLESS)
            .arg("--remote-debugging-port=0")
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

    pub async fn navigate(&mut self, url: &str) {
        let s = self.session.clone();
        self.cdp
            .call(Some(&s), "Page.navigate", serde_json::json!({ "url": url }))
            .await;
    }

    /// Evaluates `js` in the page (DevTools is not bound by the page's CSP).
    pub async fn eval(&mut self, js: &str) -> serde_json::Value {
        self.evaluate(js, false).await
    }

    /// Evaluates `js` and waits for the promise it gives (an `async` IIFE).
    pub async fn eval_async(&mut self, js: &str) -> serde_json::Value {
        self.evaluate(js, true).await
    }

    async fn evaluate(&mut self, js: &str, await_promise: bool) -> serde_json::Value {
        let s = self.session.clone();
        let r = self
            .cdp
            .call(
                Some(&s),
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": js,
                    "returnByValue": true,
                    "awaitPromise": await_promise,
                }),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Waits (up to 20 s) until `js` is true in the page.
    pub async fn until(&mut self, what: &str, js: &str) {
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
    pub fn errors(&self) -> Vec<String> {
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

impl Browser {
    /// Writes a PNG screenshot of the page's whole width at `w`×`h` CSS pixels to `path`.
    pub async fn screenshot(&mut self, path: &Path, w: u32, h: u32) {
        let s = self.session.clone();
        self.cdp
            .call(
                Some(&s),
                "Emulation.setDeviceMetricsOverride",
                serde_json::json!({ "width": w, "height": h, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await;
        let shot = self
            .cdp
            .call(
                Some(&s),
                "Page.captureScreenshot",
                serde_json::json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let data = shot["data"].as_str().expect("screenshot data");
        std::fs::write(path, base64_decode(data)).expect("write the screenshot");
    }
}

/// Standard base64 (with padding) to bytes; the screenshots' encoding.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter_map(val) {
        acc = (acc << 6) | c;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

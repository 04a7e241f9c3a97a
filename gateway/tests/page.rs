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
use tend_testkit::browser::{chromium, Browser, HEADLESS};
use tend_testkit::config::{fleet_toml, BrokerChoice, FleetDevice, GatewaySpec, API_TOKEN};
use tend_testkit::ports::free_port;
use tend_testkit::procs::GatewayProc;

/// Runs headless Chromium on `url` with `lang` as the browser's language and returns
/// the DOM after the page's script has run (5 s of virtual time for its fetches).
async fn browse(chromium: &Path, profile: &Path, lang: &str, url: &str, extra: &[&str]) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(chromium)
            .args(HEADLESS)
            .args(["--window-size=1280,900", "--virtual-time-budget=5000"])
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

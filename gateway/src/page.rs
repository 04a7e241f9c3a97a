//! The hotline page as the browser gets it: the one-file page with its time zone filled
//! in, the favicon, and the security headers on every hotline answer.
//!
//! The page keeps its script and style inline (one file in the binary, no build step), so
//! its Content-Security-Policy allows exactly those blocks by their SHA-256 and nothing
//! else inline; everything else the gateway answers (API, `/metrics`, errors) gets a
//! policy that allows nothing at all, since a JSON or text answer never needs to load
//! anything.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use std::sync::LazyLock;

/// The hotline page served on `/`, before its time zone is filled in.
pub const PAGE: &str = include_str!("page.html");
/// The icon browsers ask for on `/favicon.ico` (a 32×32 PNG inside an ICO).
pub const FAVICON: &[u8] = include_bytes!("favicon.ico");
/// Where [`page_html`] puts the gateway's time zone (an IANA name such as
/// `Asia/Shanghai`): the page shows every time in that zone, not the browser's.
const TIME_ZONE_SLOT: &str = "{{time_zone}}";

/// The page's policy: only its own hashed inline script and style, fetches and images
/// from the gateway itself, never framed.
pub static PAGE_CSP: LazyLock<String> = LazyLock::new(|| page_csp(PAGE));
/// The policy of every other answer: load nothing, never framed.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// The page with `zone` filled in, keeping only the characters IANA names use (so the
/// name cannot break out of its attribute).
pub fn page_html(zone: &str) -> String {
    let zone: String = zone
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "/_+-".contains(*c))
        .collect();
    PAGE.replace(TIME_ZONE_SLOT, &zone)
}

/// The answer to `GET /` for a gateway in `zone`.
pub fn page_response(zone: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        [(header::CONTENT_SECURITY_POLICY, PAGE_CSP.as_str())],
        page_html(zone),
    )
        .into_response()
}

/// The answer to `GET /favicon.ico`.
pub async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/x-icon"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        FAVICON,
    )
        .into_response()
}

/// Adds the security headers to an answer; a policy the handler set (the page's) stays.
pub async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(API_CSP),
        );
    }
    let fixed: [(HeaderName, &'static str); 3] = [
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

/// The policy for `html`: each `<script>` and `<style>` block allowed by its hash.
fn page_csp(html: &str) -> String {
    let hashes = |tag: &str| -> String {
        blocks(html, tag)
            .map(|b| format!(" 'sha256-{}'", base64(sha256(b.as_bytes()).as_ref())))
            .collect()
    };
    format!(
        "default-src 'self'; script-src{}; style-src{}; img-src 'self'; connect-src 'self'; \
         object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        hashes("script"),
        hashes("style"),
    )
}

/// The policy of a generated document (the monthly report) whose only inline content is
/// the `<style>` blocks of `html`: those by their hash, nothing else loaded or run.
pub fn document_csp(html: &str) -> String {
    let styles: String = blocks(html, "style")
        .map(|b| format!(" 'sha256-{}'", base64(sha256(b.as_bytes()).as_ref())))
        .collect();
    format!("default-src 'none'; style-src{styles}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
}

/// The text between each `<tag>` (without attributes) and its `</tag>`.
fn blocks<'a>(html: &'a str, tag: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut rest = html;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let block = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(block)
    })
}

fn sha256(data: &[u8]) -> ring::digest::Digest {
    ring::digest::digest(&ring::digest::SHA256, data)
}

/// Standard base64 with padding, as CSP hash sources are written (a few lines rather
/// than one more dependency in the gateway for one 32-byte value).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (plain, coded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), coded);
        }
    }

    #[test]
    fn policy_hashes_each_inline_block() {
        let html = "<style>a{}</style><script>x()</script><script>y()</script>";
        let csp = page_csp(html);
        let h = |s: &str| format!("'sha256-{}'", base64(sha256(s.as_bytes()).as_ref()));
        assert!(
            csp.contains(&format!("script-src {} {};", h("x()"), h("y()"))),
            "{csp}"
        );
        assert!(csp.contains(&format!("style-src {};", h("a{}"))), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
    }

    #[test]
    fn the_page_has_one_script_and_one_style_and_a_zone_slot() {
        assert_eq!(blocks(PAGE, "script").count(), 1);
        assert_eq!(blocks(PAGE, "style").count(), 1);
        // Attributes on a block would hide it from the hash list.
        assert!(!PAGE.contains("<script ") && !PAGE.contains("<style "));
        assert!(!PAGE.contains(" style=") && !PAGE.contains(" onclick="));
        let html = page_html("Asia/Shanghai");
        assert!(
            html.contains(r#"content="Asia/Shanghai""#),
            "zone not filled in"
        );
        let hostile = page_html("\"><script>alert(1)</script>");
        assert!(
            hostile.contains(r#"content="scriptalert1/script""#),
            "zone not cleaned"
        );
    }

    #[test]
    fn favicon_is_an_icon() {
        assert_eq!(&FAVICON[..4], &[0, 0, 1, 0]);
    }
}

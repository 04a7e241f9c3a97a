//! The broker URL: `mqtt://host[:port]` (port 1883) or `mqtts://host[:port]` (TLS, port
//! 8883), an IPv6 address in brackets (`mqtt://[::1]:1883`). Nothing else: user names,
//! passwords, CA and client certificates are configuration beside the URL
//! ([`crate::BrokerAuth`]), so a secret never sits in a URL that gets logged.

use std::fmt;
use std::str::FromStr;

/// A parsed broker URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BrokerUrl {
    host: String,
    port: u16,
    tls: bool,
}

/// A broker URL that is not `mqtt://host[:port]` or `mqtts://host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("broker URL {url:?}: {why}")]
pub struct UrlError {
    /// The URL as given, or without its credentials part when it had one.
    pub url: String,
    pub why: String,
}

const EXPECTED: &str = "expected mqtt://host[:port] or mqtts://host[:port]";

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` or `mqtts://host[:port]` (one trailing `/` allowed).
    pub fn parse(url: &str) -> Result<BrokerUrl, UrlError> {
        let bad = |why: &str| UrlError {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad(EXPECTED))?;
        let tls = match scheme {
            "mqtt" => false,
            "mqtts" => true,
            _ => return Err(bad(&format!("unknown scheme {scheme:?}: {EXPECTED}"))),
        };
        if let Some((_, host)) = rest.rsplit_once('@') {
            // The credentials are not echoed: they may hold a password.
            return Err(UrlError {
                url: format!("{scheme}://…@{host}"),
                why: "credentials do not belong in the broker URL: use username and password_file"
                    .into(),
            });
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(bad(&format!("no path or query allowed: {EXPECTED}")));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
            let (host, after) = inner.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("expected [address]:port")),
            }
        } else {
            match rest.split_once(':') {
                Some((_, p)) if p.contains(':') => {
                    return Err(bad("an IPv6 address goes in brackets: mqtt://[::1]:1883"))
                }
                Some((host, p)) => (host, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if host.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(bad("the host has a space in it"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(bad(&format!("bad port {p:?} (1 to 65535)"))),
            },
        };
        Ok(BrokerUrl {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// A URL for `host` and `port` (the embedded broker's address, a test's).
    pub fn new(host: impl Into<String>, port: u16, tls: bool) -> BrokerUrl {
        BrokerUrl {
            host: host.into(),
            port,
            tls,
        }
    }

    /// The host name or address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtts://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// `host:port` (`[::1]:1883` for IPv6), for messages.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for BrokerUrl {
    /// `mqtt://host:port`, with the port always written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        write!(f, "{scheme}://{}", self.authority())
    }
}

impl FromStr for BrokerUrl {
    type Err = UrlError;
    fn from_str(s: &str) -> Result<Self, UrlError> {
        BrokerUrl::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> (String, u16, bool) {
        let u = BrokerUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        (u.host().to_string(), u.port(), u.is_tls())
    }

    #[test]
    fn the_two_schemes_and_their_default_ports() {
        assert_eq!(
            ok("mqtt://127.0.0.1:1884"),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            ok("mqtt://broker.local"),
            ("broker.local".into(), 1883, false)
        );
        assert_eq!(ok("mqtts://gw.example"), ("gw.example".into(), 8883, true));
        assert_eq!(
            ok("mqtts://gw.example:9883/"),
            ("gw.example".into(), 9883, true)
        );
        assert_eq!(ok("mqtt://[::1]:2000/"), ("::1".into(), 2000, false));
        assert_eq!(ok("mqtts://[fe80::1]"), ("fe80::1".into(), 8883, true));
    }

    #[test]
    fn display_round_trips() {
        for url in [
            "mqtt://h:1883",
            "mqtts://[::1]:8883",
            "mqtt://10.0.0.1:1999",
        ] {
            assert_eq!(BrokerUrl::parse(url).unwrap().to_string(), url);
        }
        assert_eq!(
            BrokerUrl::parse("mqtts://h").unwrap().to_string(),
            "mqtts://h:8883"
        );
        assert_eq!(BrokerUrl::new("::1", 5, false).authority(), "[::1]:5");
    }

    #[test]
    fn everything_else_is_refused_naming_the_url() {
        for bad in [
            "tcp://h:1",
            "ssl://h:1",
            "http://h",
            "h:1883",
            "broker.local",
            "mqtt://",
            "mqtts:///",
            "mqtt://:1883",
            "mqtt://h:x",
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:",
            "mqtt://h/path",
            "mqtt://h:1883/path",
            "mqtt://h?x=1",
            "mqtt://[::1",
            "mqtt://[::1]x",
            "mqtt://::1",
            "mqtt://a b",
            "",
        ] {
            let e = BrokerUrl::parse(bad).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn credentials_are_refused_without_echoing_them() {
        let e = BrokerUrl::parse("mqtt://user:s3cret@h:1883").unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("password_file"), "{text}");
        assert!(text.contains("h:1883"), "{text}");
    }
}

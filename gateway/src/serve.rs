//! Serving the hotline router to the network, plain HTTP or HTTPS, under hyper-util, with
//! the limits a hostile client meets: a cap on concurrent connections (the rest wait in
//! the kernel's backlog; descriptors stay for the broker), a header-read timeout against
//! slow senders, an idle timeout, a TLS-handshake timeout, and accept errors (such as
//! running out of descriptors) that back off and are logged at most once a minute.
//!
//! Idle means no request in flight and none begun or ended for `idle_timeout`, whatever
//! bytes trickle: so a keep-alive connection nobody uses, an HTTP/2 client dribbling a
//! header frame (the header-read timeout is HTTP/1's) and a client reading an answer a
//! byte at a time are all let go, while a diagnostic waiting for its agent is never cut.

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::{Extension, Router};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Most bytes of request headers (HTTP/1 read buffer, HTTP/2 header list).
const HEADER_BYTES: usize = 64 << 10;
/// Requests one HTTP/2 connection may have in flight.
const H2_STREAMS: u32 = 32;
/// How long requests in flight may still take once the gateway stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// The limits every hotline connection is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// A request's headers must arrive within this (HTTP/1).
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and none begun or ended for this long is
    /// closed.
    pub idle_timeout: Duration,
    /// A TLS handshake must finish within this.
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    /// The config's defaults, with the cap for a 1,024-descriptor process.
    fn default() -> Self {
        Limits {
            max_connections: crate::limits::default_max_connections(1024),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The `[api]` section's limits, the cap kept within the open-file limit's share.
    pub fn from_section(api: &crate::config::ApiSection, open_files: u64) -> Limits {
        Limits {
            max_connections: crate::limits::hotline_cap(api.max_connections, open_files),
            header_read_timeout: api.header_read_timeout.0,
            idle_timeout: api.idle_timeout.0,
            tls_handshake_timeout: api.tls_handshake_timeout.0,
        }
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`, then lets the
/// requests in flight finish (within a grace period). Each request gets the caller's
/// address as `ConnectInfo`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX >> 3);
    let permits = Arc::new(Semaphore::new(slots as usize));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let mut backoff = AcceptBackoff::default();
    loop {
        // A free slot first: over the cap, clients wait in the listen backlog and this
        // task sleeps, rather than accepting and refusing in a loop.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    let pause = backoff.failed(&e, Instant::now());
                    tokio::time::sleep(pause).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let conn = Connection {
            peer,
            router: router.clone(),
            limits,
            shutdown: shutdown.clone(),
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            conn.run(tcp, acceptor).await;
            drop(permit);
        });
    }
    // Every slot back means every connection has ended.
    let _ = permits.acquire_many(slots).await;
    Ok(())
}

/// One accepted connection.
struct Connection {
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Connection {
    async fn run(self, tcp: tokio::net::TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
        let Some(acceptor) = tls else {
            return self.drive(tcp).await;
        };
        let handshake =
            tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(tcp));
        let stream = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = handshake => match r {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!("hotline API TLS handshake from {}: {e}", self.peer);
                    return;
                }
                Err(_) => {
                    tracing::debug!("hotline API TLS handshake from {} timed out", self.peer);
                    return;
                }
            },
        };
        self.drive(stream).await
    }

    async fn drive<S>(self, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let app = self
            .router
            .layer(Extension(ConnectInfo::<SocketAddr>(self.peer)))
            .layer(middleware::from_fn_with_state(activity.clone(), busy));
        let mut builder = Builder::new(TokioExecutor::new());
        // Headers are small here: bounding them bounds each connection's memory, so the
        // cap on connections caps the whole.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout)
            .max_buf_size(HEADER_BYTES);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(HEADER_BYTES as u32)
            .max_concurrent_streams(H2_STREAMS);
        let conn =
            builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(app));
        tokio::pin!(conn);
        let peer = self.peer;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!("hotline API connection from {peer}: {e}");
                }
            }
            () = activity.idle(self.limits.idle_timeout) => {
                tracing::debug!("hotline API: closing idle connection from {peer}");
            }
            () = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
            }
        }
    }
}

/// Counts a request as in flight while its handler runs: an idle timeout never cuts a
/// diagnostic that waits for its agent.
async fn busy(State(activity): State<Arc<Activity>>, req: Request, next: Next) -> Response {
    let _busy = Busy::new(activity);
    next.run(req).await
}

/// When a connection's last request began or ended (or it was accepted), and how many of
/// its requests are being handled.
#[derive(Debug)]
struct Activity {
    born: Instant,
    /// Milliseconds after `born`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            born: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Quiet for how long.
    fn quiet(&self) -> Duration {
        self.born
            .elapsed()
            .saturating_sub(Duration::from_millis(self.last.load(Ordering::Relaxed)))
    }

    /// Returns once the connection has been idle for `limit`.
    async fn idle(&self, limit: Duration) {
        loop {
            let quiet = self.quiet();
            let busy = self.in_flight.load(Ordering::Relaxed) > 0;
            if !busy && quiet >= limit {
                return;
            }
            let wait = if busy { limit } else { limit - quiet };
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }
}

struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Self {
        activity.touch();
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Pauses after failed accepts, growing while they keep failing (out of descriptors,
/// say), and logs them at most once a minute with how many there were.
#[derive(Debug, Default)]
struct AcceptBackoff {
    pause: Duration,
    /// Failures not yet logged.
    unlogged: u64,
    last_log: Option<Instant>,
}

const ACCEPT_PAUSES: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(60);

impl AcceptBackoff {
    /// The pause before accepting again.
    fn failed(&mut self, e: &io::Error, now: Instant) -> Duration {
        let (first, longest) = ACCEPT_PAUSES;
        self.pause = (self.pause * 2).clamp(first, longest);
        self.unlogged += 1;
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                "hotline API accept failed {} time(s) since the last report: {e}",
                self.unlogged
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        self.pause
    }

    fn succeeded(&mut self) {
        self.pause = Duration::ZERO;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_pause_longer_and_log_once_a_minute() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let e = io::Error::from_raw_os_error(24);
        let pauses: Vec<Duration> = (0..10).map(|_| b.failed(&e, t0)).collect();
        assert_eq!(pauses[0], Duration::from_millis(10));
        assert_eq!(pauses[1], Duration::from_millis(20));
        assert_eq!(*pauses.last().unwrap(), Duration::from_secs(1));
        assert_eq!(b.unlogged, 9, "only the first was logged");
        b.failed(&e, t0 + ACCEPT_LOG_EVERY);
        assert_eq!(b.unlogged, 0);
        b.succeeded();
        assert_eq!(b.failed(&e, t0), Duration::from_millis(10));
    }
}

//! The listener in front of rumqttd when access is restricted: it ends TLS, reads each
//! CONNECT and asks the login before anything reaches rumqttd, then relays the session
//! to rumqttd's own listener on loopback.
//!
//! Why not rumqttd's own TLS and `external_auth` alone: rumqttd 0.20 does the TLS
//! handshake inside its accept loop with no time limit, so one idle TCP connection
//! stops it accepting anyone; it would also bring a second rustls (0.22) and x509-parser
//! into the build. And it drops an anonymous CONNECT before any hook sees it, so such
//! refusals could be neither counted nor logged. Here a refused CONNECT gets a CONNACK
//! saying why (bad user name or password, not authorized) and is counted and logged.

use super::access::{shown_user, BrokerAccess, Login, RefusalLog};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Connect, Packet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// How long a client has for its TLS handshake, and then for its CONNECT.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(10);
const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// The largest CONNECT read (client id, user name, password, will): far above any real
/// one, so a stranger cannot make the front buffer much.
const MAX_CONNECT: usize = 64 * 1024;
/// Connections relayed at once, as many as rumqttd takes.
pub(super) const MAX_CONNECTIONS: usize = 10_000;

/// MQTT 3.1.1 CONNACK return codes.
const BAD_USER_NAME_OR_PASSWORD: u8 = 4;
const NOT_AUTHORIZED: u8 = 5;

/// What every connection of the front shares.
struct Front {
    /// rumqttd's own listener (loopback, plain MQTT).
    upstream: SocketAddr,
    login: Option<Login>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    refused: Arc<AtomicU64>,
    log: Mutex<RefusalLog>,
    slots: Arc<Semaphore>,
}

/// Serves `listener` (already bound) on a thread of its own until the process exits,
/// relaying admitted sessions to `upstream`.
pub(super) fn spawn(
    listener: std::net::TcpListener,
    upstream: SocketAddr,
    access: &BrokerAccess,
    tls: Option<rustls::ServerConfig>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let front = Arc::new(Front {
        upstream,
        login: access.login.clone(),
        tls: tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c))),
        refused: access.refused.clone(),
        log: Mutex::default(),
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("broker-front")
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("broker-front".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, front).await,
                    Err(e) => tracing::error!("embedded broker: listener unusable: {e}"),
                }
            })
        })?;
    Ok(())
}

async fn accept_loop(listener: TcpListener, front: Arc<Front>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors, most likely: let some connections end.
                tracing::warn!("embedded broker: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = front.slots.clone().try_acquire_owned() else {
            continue; // Full: the stream is dropped, the client retries later.
        };
        let front = front.clone();
        tokio::spawn(async move {
            let _slot = slot;
            front.serve(stream, peer).await;
        });
    }
}

impl Front {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let Some(acceptor) = &self.tls else {
            return self.admit(stream, peer).await;
        };
        match tokio::time::timeout(HANDSHAKE_WAIT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => self.admit(tls, peer).await,
            Ok(Err(e)) => self.note_handshake_failure(peer, &e.to_string()),
            Err(_) => self.note_handshake_failure(peer, "no handshake within 10 s"),
        }
    }

    /// Reads the CONNECT, decides, and relays an admitted session to rumqttd.
    async fn admit<S>(&self, mut client: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut read = BytesMut::with_capacity(512);
        let connect =
            match tokio::time::timeout(CONNECT_WAIT, read_connect(&mut client, &mut read)).await {
                Ok(Some(c)) => c,
                // Not MQTT, too big or too slow: rumqttd would drop it too.
                _ => return,
            };
        if let Some(code) = self.refusal(&connect) {
            self.note_refusal(peer, &connect, code);
            // The client learns why; a failed write changes nothing.
            let answer = async {
                client.write_all(&[0x20, 0x02, 0x00, code]).await?;
                client.shutdown().await
            };
            let _ = tokio::time::timeout(CONNECT_WAIT, answer).await;
            return;
        }
        let mut upstream = match TcpStream::connect(self.upstream).await {
            Ok(u) => u,
            Err(e) => {
                tracing::error!(
                    "embedded broker: cannot reach rumqttd on {}: {e}",
                    self.upstream
                );
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        // The CONNECT and whatever came after it, as the client sent them.
        if upstream.write_all(&read).await.is_err() {
            return;
        }
        relay(client, upstream).await;
    }

    /// The CONNACK code refusing `connect`, or `None` to admit it.
    fn refusal(&self, connect: &Connect) -> Option<u8> {
        let login = self.login.as_ref()?;
        match &connect.login {
            Some(l) if !l.username.is_empty() => {
                (!login(&connect.client_id, &l.username, &l.password))
                    .then_some(BAD_USER_NAME_OR_PASSWORD)
            }
            _ => Some(NOT_AUTHORIZED),
        }
    }

    fn note_refusal(&self, peer: SocketAddr, connect: &Connect, code: u8) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let user = connect.login.as_ref().map_or("", |l| l.username.as_str());
        if let Some(n) = self.should_log(user) {
            let why = if code == NOT_AUTHORIZED {
                "no user name and password"
            } else {
                "credentials refused"
            };
            tracing::warn!(
                "embedded broker: refused a connection from {peer} (user {}, client id {}): \
                 {why}; {n} refused for this user since the last such line",
                shown_user(user),
                shown_user(&connect.client_id),
            );
        }
    }

    fn note_handshake_failure(&self, peer: SocketAddr, why: &str) {
        // Logged under a key no user name can take (user names are UTF-8 without NUL).
        if self.should_log("\0tls").is_some() {
            tracing::warn!(
                "embedded broker: TLS handshake with {peer} failed: {why} \
                 (one such line a minute)"
            );
        }
    }

    fn should_log(&self, key: &str) -> Option<u64> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.refused(key, Instant::now())
    }
}

/// Copies both ways until either side closes. Not `copy_bidirectional`: it waits for
/// both directions, so a client that vanished without a FIN (a box losing power) would
/// hold its task and descriptors after rumqttd's keep-alive had closed its side.
async fn relay<S>(client: S, mut upstream: TcpStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = upstream.split();
    // An MQTT session is over once either side is gone; errors just end it too.
    tokio::select! {
        _ = tokio::io::copy(&mut client_rx, &mut upstream_tx) => {}
        _ = tokio::io::copy(&mut upstream_rx, &mut client_tx) => {
            // rumqttd closed it (keep-alive, takeover): tell the client, TLS included,
            // unless it no longer reads.
            let _ = tokio::time::timeout(HANDSHAKE_WAIT, client_tx.shutdown()).await;
        }
    }
}

/// Reads until `read` holds a whole first packet; that packet must be a CONNECT.
/// `None` when the client closes, sends something else or more than [`MAX_CONNECT`].
async fn read_connect<S>(client: &mut S, read: &mut BytesMut) -> Option<Connect>
where
    S: AsyncRead + Unpin,
{
    loop {
        // Parse a copy: the bytes themselves go to rumqttd untouched.
        let mut probe = read.clone();
        match Packet::read(&mut probe, MAX_CONNECT) {
            Ok(Packet::Connect(c)) => return Some(c),
            Ok(_) => return None,
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(_) => return None,
        }
        if read.len() > MAX_CONNECT + 5 || client.read_buf(read).await.ok()? == 0 {
            return None;
        }
    }
}

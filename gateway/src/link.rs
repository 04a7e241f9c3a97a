//! The gateway's MQTT link: subscribes to the agents' topics, hands each batch to ingest,
//! acks exactly the sequence ranges that committed, follows the agents' online status and
//! carries hotline diagnostics to the agents and their answers back.
//!
//! Batches are taken from `$share/<group>/tend/v1/+/up` when several gateways share one
//! external broker, so each batch reaches one of them; status and diagnostic answers are
//! subscribed without sharing (every gateway needs every status, and each keeps only the
//! answers it is waiting for).

use crate::app::Gateway;
use crate::diag::Outgoing;
use crate::store::StoreError;
use jiff::Timestamp;
use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tend_wire::topic::{self, Parsed};
use tend_wire::{Ack, DiagResponse, UpBatch, VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where and how to connect.
#[derive(Clone)]
pub struct LinkConfig {
    /// `mqtt://host:port` or `mqtts://host:port`.
    pub url: String,
    pub client_id: String,
    pub share_group: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for LinkConfig {
    // The password stays out of every log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkConfig")
            .field("url", &self.url)
            .field("client_id", &self.client_id)
            .field("share_group", &self.share_group)
            .field("ca_file", &self.ca_file)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// `mqtt://host[:port]` → (host, port, tls).
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), String> {
    let (rest, tls, default_port) = if let Some(r) = url.strip_prefix("mqtt://") {
        (r, false, 1883)
    } else if let Some(r) = url.strip_prefix("mqtts://") {
        (r, true, 8883)
    } else {
        return Err(format!("{url:?} is not an mqtt:// or mqtts:// URL"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains('@') {
        return Err(
            "credentials do not belong in the broker URL: use username and password_file".into(),
        );
    }
    if rest.is_empty() || rest.contains('/') {
        return Err(format!(
            "broker URL must be scheme://host[:port], got {url:?}"
        ));
    }
    let (host, port) = if let Some(h) = rest.strip_prefix('[') {
        let (h, p) = h.split_once(']').ok_or("unclosed [ in broker URL")?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    let port = match port {
        Some(p) => p
            .parse()
            .map_err(|_| format!("bad port {p:?} in broker URL"))?,
        None => default_port,
    };
    if host.is_empty() {
        return Err(format!("no host in broker URL {url:?}"));
    }
    Ok((host, port, tls))
}

/// The largest packet MQTT can encode (remaining length 268,435,455 and a 5-byte header).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

fn options(cfg: &LinkConfig) -> Result<MqttOptions, String> {
    let (host, port, tls) = parse_broker_url(&cfg.url)?;
    let mut opts = MqttOptions::new(cfg.client_id.clone(), host, port);
    opts.set_clean_session(true);
    opts.set_keep_alive(Duration::from_secs(15));
    let max = tend_wire::MAX_MESSAGE + 64 * 1024;
    // Any packet MQTT allows is read, and a payload over MAX_MESSAGE is then refused
    // unparsed: with a smaller limit, one oversize message (retained on a subscribed topic
    // of an external broker that does not cap sizes) would end the connection at every
    // reconnect, and the gateway would hear nothing more.
    opts.set_max_packet_size(MQTT_MAX_PACKET, max);
    opts.set_inflight(200);
    if let Some(user) = &cfg.username {
        opts.set_credentials(user.clone(), cfg.password.clone().unwrap_or_default());
    }
    if tls {
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca_file {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                use rustls::pki_types::pem::PemObject;
                for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                    let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
            }
            None => {
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(opts)
}

/// The topic batches are taken from.
pub fn up_filter(share_group: Option<&str>) -> String {
    match share_group {
        Some(g) => format!("$share/{g}/{}/+/up", topic::PREFIX),
        None => format!("{}/+/up", topic::PREFIX),
    }
}

/// Runs the link until `shutdown`: connects (and reconnects with back-off), subscribes,
/// ingests, acks, relays diagnostics. `diag_out` is the [`crate::diag::DiagClient`]'s
/// queue of requests to publish.
pub async fn run(
    gw: Gateway,
    cfg: LinkConfig,
    mut diag_out: mpsc::Receiver<Outgoing>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let opts = options(&cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let (batch_tx, batch_rx) = mpsc::channel::<(String, Vec<u8>)>(256);

    // Ingest in its own task: the event loop keeps polling (pings, acks) while a batch
    // commits.
    let ingest = tokio::spawn(ingest_loop(gw.clone(), client.clone(), batch_rx));

    let diag_client = client.clone();
    let diag_task = tokio::spawn(async move {
        while let Some(o) = diag_out.recv().await {
            let t = topic::diag_req(&o.agent);
            if let Err(e) = diag_client
                .publish(t, QoS::AtLeastOnce, false, o.payload)
                .await
            {
                tracing::warn!("diagnostic request to {} not queued: {e}", o.agent);
            }
        }
    });

    let filters = [
        (up_filter(cfg.share_group.as_deref()), QoS::AtLeastOnce),
        (format!("{}/+/status", topic::PREFIX), QoS::AtLeastOnce),
        (format!("{}/+/diag/resp", topic::PREFIX), QoS::AtLeastOnce),
    ];
    let mut failures: u32 = 0;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                failures = 0;
                tracing::info!("connected to MQTT broker {}", cfg.url);
                let c = client.clone();
                let filters = filters.clone();
                tokio::spawn(async move {
                    for (f, q) in filters {
                        if let Err(e) = c.subscribe(f.clone(), q).await {
                            tracing::warn!("subscribe {f}: {e}");
                        }
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.payload.len() > tend_wire::MAX_MESSAGE => {
                gw.metrics.malformed.inc();
                tracing::warn!(
                    "message of {} bytes on {:.80} refused unread (limit {})",
                    p.payload.len(),
                    p.topic,
                    tend_wire::MAX_MESSAGE
                );
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = p.topic.clone();
                match topic::parse(&topic) {
                    Some(Parsed::Up(agent)) => {
                        let agent = agent.to_string();
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            r = batch_tx.send((agent, p.payload.to_vec())) => {
                                if r.is_err() { break; }
                            }
                        }
                    }
                    Some(Parsed::Status(agent)) => {
                        let s = String::from_utf8_lossy(&p.payload);
                        let s = s.trim();
                        if s == tend_wire::STATUS_ONLINE || s == tend_wire::STATUS_OFFLINE {
                            gw.set_agent_status(agent, s, Timestamp::now());
                        } else {
                            gw.metrics.malformed.inc();
                        }
                    }
                    Some(Parsed::DiagResp(_)) => match DiagResponse::decode(&p.payload) {
                        Ok(resp) => {
                            gw.diag.answer(resp);
                        }
                        Err(e) => {
                            gw.metrics.malformed.inc();
                            tracing::warn!("malformed diagnostic answer on {topic}: {e}");
                        }
                    },
                    _ => {
                        gw.metrics.malformed.inc();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
                if failures <= 3 || failures % 20 == 0 {
                    tracing::warn!("MQTT broker {}: {}; retrying in {wait:?}", cfg.url, why(&e));
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    let _ = client.disconnect().await;
    drop(batch_tx);
    diag_task.abort();
    let _ = ingest.await;
    Ok(())
}

fn why(e: &ConnectionError) -> String {
    e.to_string()
}

/// Most batches applied in one transaction: enough to spread one fsync over many agents'
/// batches when they queue up, few enough that the first of them is acked soon.
const GROUP_MAX_BATCHES: usize = 32;
/// Most records applied in one transaction.
const GROUP_MAX_RECORDS: usize = 20_000;

/// What one group's commit did, batch by batch: the agent and its batch's outcome.
type Outcome = Vec<(String, Result<crate::ingest::Applied, StoreError>)>;

async fn ingest_loop(gw: Gateway, client: AsyncClient, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    // While one group commits on the blocking pool, the next is received and decoded here
    // (decoding costs about as much CPU as applying), so ingest keeps two cores busy;
    // groups are still applied one after the other, in the order they came, and a group
    // is acked as soon as it has committed.
    enum Next {
        Committed(Result<Outcome, tokio::task::JoinError>),
        Received(Option<(String, Vec<u8>)>),
    }
    let mut applying: Option<tokio::task::JoinHandle<Outcome>> = None;
    loop {
        let next = match applying.as_mut() {
            Some(h) => tokio::select! {
                done = h => Next::Committed(done),
                m = rx.recv() => Next::Received(m),
            },
            None => Next::Received(rx.recv().await),
        };
        let first = match next {
            Next::Committed(done) => {
                applying = None;
                acknowledge(&gw, &client, done).await;
                continue;
            }
            Next::Received(None) => break,
            Next::Received(Some(m)) => m,
        };
        let group = gather(&gw, first, &mut rx);
        if let Some(h) = applying.take() {
            acknowledge(&gw, &client, h.await).await;
        }
        if group.is_empty() {
            continue;
        }
        let g = gw.clone();
        applying = Some(tokio::task::spawn_blocking(move || {
            let now = Timestamp::now();
            let results = match g.store.apply_many(&group, &g.cx, now) {
                Ok(all) => all.into_iter().map(Ok).collect(),
                // One transaction for all failed: each on its own, so one batch that cannot
                // be stored does not hold back the others.
                Err(_) if group.len() > 1 => {
                    group.iter().map(|b| g.store.apply(b, &g.cx, now)).collect()
                }
                Err(e) => vec![Err(e)],
            };
            group
                .into_iter()
                .map(|b| b.agent)
                .zip(results)
                .collect::<Vec<_>>()
        }));
    }
    if let Some(h) = applying.take() {
        acknowledge(&gw, &client, h.await).await;
    }
}

/// Group commit: `first` and the batches already waiting, decoded, up to the group's
/// limits (a lone batch makes a group of one and is applied at once).
fn gather(
    gw: &Gateway,
    first: (String, Vec<u8>),
    rx: &mut mpsc::Receiver<(String, Vec<u8>)>,
) -> Vec<UpBatch> {
    let mut group: Vec<UpBatch> = Vec::new();
    let mut records = 0usize;
    let mut next = Some(first);
    while let Some((agent, payload)) = next.take() {
        gw.metrics.batches.inc();
        match UpBatch::decode(&payload) {
            Ok(b) if b.agent == agent => {
                records += b.records.len();
                group.push(b);
            }
            Ok(b) => {
                gw.metrics.malformed.inc();
                tracing::warn!(
                    "batch on {} names agent {:?}: refused",
                    topic::up(&agent),
                    b.agent
                );
            }
            Err(e) => {
                gw.metrics.malformed.inc();
                tracing::warn!("malformed batch on {}: {e}", topic::up(&agent));
            }
        }
        if group.len() < GROUP_MAX_BATCHES && records < GROUP_MAX_RECORDS {
            next = rx.try_recv().ok();
        }
    }
    group
}

/// Counts what a group's commit did and acks exactly what each batch stored.
async fn acknowledge(
    gw: &Gateway,
    client: &AsyncClient,
    done: Result<Outcome, tokio::task::JoinError>,
) {
    let applied = match done {
        Ok(x) => x,
        Err(e) => {
            gw.metrics.store_errors.inc();
            tracing::error!("ingest task failed: {e}");
            return;
        }
    };
    for (agent, result) in applied {
        match result {
            Ok(a) => {
                gw.metrics.records.inc_by(a.new_records);
                gw.metrics.duplicates.inc_by(a.duplicates);
                gw.metrics.dropped_readings.inc_by(a.dropped_readings);
                gw.metrics
                    .tickets_opened
                    .inc_by(a.tickets_opened.len() as u64);
                gw.metrics.ticket_events.inc_by(a.events_queued);
                for key in &a.tickets_opened {
                    tracing::info!("ticket {key} opened for agent {agent}");
                }
                if a.has_jobs() {
                    gw.forwarder_wake.notify_one();
                }
                let ack = Ack {
                    v: VERSION,
                    ranges: a.stored,
                };
                let sent = match tend_wire::encode(&ack) {
                    Ok(payload) => client
                        .publish(topic::ack(&agent), QoS::AtLeastOnce, false, payload)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = sent {
                    tracing::warn!("ack to {agent} not queued: {e}");
                }
            }
            Err(e) => {
                // Not acked: the agent sends it again.
                gw.metrics.store_errors.inc();
                log_store_error(&e);
            }
        }
    }
}

fn log_store_error(e: &StoreError) {
    tracing::error!("batch not stored (the agent will resend it): {e}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://gw.example").unwrap(),
            ("gw.example".into(), 8883, true)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:2000/").unwrap(),
            ("::1".into(), 2000, false)
        );
        for bad in [
            "tcp://h:1",
            "mqtt://",
            "mqtt://h:x",
            "mqtt://h/path",
            "h:1883",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
        let e = parse_broker_url("mqtt://user:s3cret@h:1883").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn shared_subscription_filter() {
        assert_eq!(up_filter(None), "tend/v1/+/up");
        assert_eq!(up_filter(Some("gws")), "$share/gws/tend/v1/+/up");
    }
}

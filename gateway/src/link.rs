//! The gateway's MQTT link: subscribes to the agents' topics, hands each batch to ingest,
//! acks exactly the sequence ranges that committed (naming the batch's outbox
//! incarnation), follows the agents' online status and
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
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use tend_mqtt::{Backoff, BrokerAuth, BrokerUrl, ClientSettings, OptionsError};
use tend_wire::topic::{self, Parsed};
use tend_wire::{Ack, DiagResponse, Purpose, UpBatch, VERSION};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub url: BrokerUrl,
    pub client_id: String,
    pub share_group: Option<String>,
    /// User name, password file and TLS files (the password is read when the link
    /// starts, and never logged).
    pub auth: BrokerAuth,
    /// The login made at start for the embedded broker; overrides `auth`'s user name and
    /// password file.
    pub login: Option<tend_mqtt::Credentials>,
}

/// Why the link cannot start.
#[derive(Debug, thiserror::Error)]
#[error("MQTT link to {url}: {source}")]
pub struct LinkError {
    url: BrokerUrl,
    #[source]
    source: OptionsError,
}

/// Reconnects after 400 ms, doubling to 6.4 s.
const RECONNECT: Backoff = Backoff {
    min: Duration::from_millis(400),
    max: Duration::from_millis(6400),
    factor: 2,
    jitter: 0.0,
};

fn options(cfg: &LinkConfig) -> Result<MqttOptions, LinkError> {
    let settings = ClientSettings {
        client_id: cfg.client_id.clone(),
        keep_alive: Duration::from_secs(15),
        // Any packet MQTT allows is read, and a payload over MAX_MESSAGE is then refused
        // unparsed: with a smaller limit, one oversize message (retained on a subscribed
        // topic of an external broker that does not cap sizes) would end the connection
        // at every reconnect, and the gateway would hear nothing more.
        max_incoming: tend_mqtt::MQTT_MAX_PACKET,
        max_outgoing: tend_wire::MAX_MESSAGE + 64 * 1024,
    };
    let made = match &cfg.login {
        Some(login) => tend_mqtt::options::options_with(
            &cfg.url,
            Some(login.clone()),
            &cfg.auth.tls,
            &settings,
        ),
        None => tend_mqtt::mqtt_options(&cfg.url, &cfg.auth, &settings),
    };
    let mut opts = made.map_err(|source| LinkError {
        url: cfg.url.clone(),
        source,
    })?;
    opts.set_inflight(200);
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
) -> Result<(), LinkError> {
    let opts = options(&cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let (batch_tx, batch_rx) = mpsc::channel::<(String, Vec<u8>)>(256);

    // Ingest in its own task: the event loop keeps polling (pings, acks) while a batch
    // commits.
    let ingest = tokio::spawn(ingest_loop(gw.clone(), client.clone(), batch_rx));

    let diag_client = client.clone();
    let diag_gw = gw.clone();
    let diag_task = tokio::spawn(async move {
        while let Some(o) = diag_out.recv().await {
            let payload = match diag_gw.trust.key_for(&o.agent) {
                Ok(key) => tend_wire::encode_sealed(&key, Purpose::DiagReq, &o.agent, &o.request),
                Err(r) => {
                    tracing::warn!(
                        "diagnostic request to {} not sent: the agent is {}",
                        o.agent,
                        r.as_str()
                    );
                    continue;
                }
            };
            let sent = match payload {
                Ok(p) => diag_client
                    .publish(topic::diag_req(&o.agent), QoS::AtLeastOnce, false, p)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = sent {
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
            Ok(Event::Incoming(Packet::Publish(p)))
                if p.retain && !matches!(topic::parse(&p.topic), Some(Parsed::Status(_))) =>
            {
                // Retained batches and answers are old news replayed at every subscribe
                // (a broker keeps one per topic): not ingested, counted.
                gw.metrics.rejected("retained");
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
                        if let Some(body) = believe(&gw, agent, Purpose::Status, &p.payload) {
                            let s = String::from_utf8_lossy(body);
                            let s = s.trim();
                            if tend_wire::valid_status(s) {
                                gw.set_agent_status(agent, s, Timestamp::now());
                            } else {
                                gw.metrics.malformed.inc();
                            }
                        }
                    }
                    Some(Parsed::DiagResp(agent)) => {
                        if let Some(body) = believe(&gw, agent, Purpose::DiagResp, &p.payload) {
                            match DiagResponse::decode(body) {
                                Ok(resp) => {
                                    gw.diag.answer(agent, resp);
                                }
                                Err(e) => {
                                    gw.metrics.malformed.inc();
                                    tracing::warn!("malformed diagnostic answer on {topic}: {e}");
                                }
                            }
                        }
                    }
                    _ => {
                        gw.metrics.malformed.inc();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                let wait = RECONNECT.delay(failures, 0);
                failures = failures.saturating_add(1);
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

/// What one group's commit did to one batch.
struct Done {
    agent: String,
    /// The batch's outbox incarnation, which its ack names.
    incarnation: String,
    result: Result<crate::ingest::Applied, StoreError>,
}

/// What one group's commit did, batch by batch.
type Outcome = Vec<Done>;

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
                .zip(results)
                .map(|(b, result)| Done {
                    agent: b.agent,
                    incarnation: b.incarnation,
                    result,
                })
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
        let Some(body) = believe(gw, &agent, Purpose::Up, &payload) else {
            next = rx.try_recv().ok();
            continue;
        };
        match UpBatch::decode(body) {
            Ok(b) if b.agent == agent => {
                records += b.records.len();
                group.push(b);
            }
            Ok(b) => {
                // Sealed with this agent's key yet naming another: its own key, so not a
                // forgery from outside, but never believed for the other agent.
                refuse(gw, &agent, "batch", "wrong_agent", || {
                    format!(
                        "names agent {:?}",
                        b.agent.chars().take(64).collect::<String>()
                    )
                });
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
    for Done {
        agent,
        incarnation,
        result,
    } in applied
    {
        match result {
            Ok(a) => {
                if gw.metrics.store_failing.get() != 0 {
                    gw.metrics.store_failing.set(0);
                    tracing::info!("the store takes batches again");
                }
                gw.metrics.records.inc_by(a.new_records);
                gw.metrics.duplicates.inc_by(a.duplicates);
                gw.metrics
                    .conflicting_records
                    .inc_by(a.conflicts.len() as u64);
                if let Some(first) = a.conflicts.first() {
                    tracing::warn!(
                        "agent {agent} incarnation {incarnation}: {} record(s) came with the seq of a stored one and other content (first seq {first}); not applied, counted",
                        a.conflicts.len()
                    );
                }
                gw.metrics.dropped_readings.inc_by(a.dropped_readings);
                gw.metrics.unknown_device_records.inc_by(a.unknown_device);
                gw.metrics.stray_records_dropped.inc_by(a.strays_dropped);
                if a.strays_dropped > 0 && gw.refusal_log.allow(&format!("{agent}\0strays")) {
                    tracing::warn!(
                        "agent {agent} reports devices the fleet file does not list, past the {} kept: their records are dropped (tend_gateway_stray_records_dropped_total); add them to the fleet file or fix the agent's config",
                        crate::ingest::MAX_STRAYS
                    );
                }
                if let Some(c) = a.clock {
                    if gw.metrics.agent_clock(&agent, c.skewed) {
                        if c.skewed {
                            tracing::warn!(
                                "agent {agent}'s clock is off the gateway's by {} s: its records are taken in gateway time until it is right",
                                c.offset.as_secs()
                            );
                        } else {
                            tracing::info!("agent {agent}'s clock is right again");
                        }
                    }
                }
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
                    incarnation,
                    ranges: a.stored,
                    gateway_time: Timestamp::now(),
                };
                let sealed = match gw.trust.key_for(&agent) {
                    Ok(key) => tend_wire::encode_sealed(&key, Purpose::Ack, &agent, &ack),
                    Err(r) => {
                        // Revoked between receipt and commit: stored, but no longer told.
                        tracing::warn!("ack to {agent} not sent: the agent is {}", r.as_str());
                        continue;
                    }
                };
                let sent = match sealed {
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
                gw.metrics.store_failing.set(1);
                if gw.refusal_log.allow("\0store") {
                    log_store_error(&e);
                }
            }
        }
    }
}

/// The body of a message on `agent`'s topic sealed for `purpose` with that agent's key,
/// or `None` after counting and (at most once a minute per agent and reason) logging why
/// it is not believed. A message that fails never reaches the store or the hotline.
fn believe<'a>(gw: &Gateway, agent: &str, purpose: Purpose, payload: &'a [u8]) -> Option<&'a [u8]> {
    let reason = match gw.trust.key_for(agent) {
        Err(r) => r.as_str(),
        Ok(key) => match tend_wire::seal::open(&key, purpose, agent, payload) {
            Ok(body) => return Some(body),
            Err(e) => e.as_str(),
        },
    };
    let what = match purpose {
        Purpose::Up => "batch",
        Purpose::Status => "status",
        Purpose::DiagResp => "diagnostic answer",
        Purpose::Ack | Purpose::DiagReq => "message",
    };
    refuse(gw, agent, what, reason, String::new);
    None
}

/// Counts a refused message and logs it, rarely.
fn refuse(gw: &Gateway, agent: &str, what: &str, reason: &str, detail: impl FnOnce() -> String) {
    gw.metrics.rejected(reason);
    if gw.refusal_log.allow(&format!("{agent}\0{reason}")) {
        let detail = detail();
        tracing::warn!(
            "{what} on tend/v1/{agent}/ refused ({reason}){}{detail}; further ones from this agent for this reason are counted in tend_gateway_rejected_messages_total and logged at most once a minute",
            if detail.is_empty() { "" } else { ": " }
        );
    }
}

fn log_store_error(e: &StoreError) {
    tracing::error!(
        "batch not stored (the agent will resend it; logged at most once a minute, counted in tend_gateway_store_errors_total): {e}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_subscription_filter() {
        assert_eq!(up_filter(None), "tend/v1/+/up");
        assert_eq!(up_filter(Some("gws")), "$share/gws/tend/v1/+/up");
    }
}

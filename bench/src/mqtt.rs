//! A small MQTT client for the bench: subscribes, hands every message to a channel, and
//! publishes through the returned client.

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// One message received: topic, payload, when.
pub struct Msg {
    pub topic: String,
    pub payload: Bytes,
    pub at: Instant,
}

pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Msg>,
    task: JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects to `host:port` and subscribes to `topics` (QoS 1); returns once every
/// subscription is acknowledged.
pub async fn connect(host: &str, port: u16, id: &str, topics: &[String]) -> anyhow::Result<Client> {
    connect_as(host, port, id, None, topics).await
}

/// The same, logged in as `id` (user name = client id, as an enrolled agent logs in to
/// the gateway's embedded broker) with `password`.
pub async fn connect_as(
    host: &str,
    port: u16,
    id: &str,
    password: Option<String>,
    topics: &[String],
) -> anyhow::Result<Client> {
    let mut opts = MqttOptions::new(id, host, port);
    if let Some(p) = password {
        opts.set_credentials(id, p);
    }
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    let max = tend_wire::MAX_MESSAGE + 64 * 1024;
    opts.set_max_packet_size(max, max);
    opts.set_inflight(100);
    let (client, mut ev) = AsyncClient::new(opts, 1024);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let subs = topics.to_vec();
    let c = client.clone();
    let task = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut acked = 0;
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    acked = 0;
                    for t in &subs {
                        let _ = c.try_subscribe(t.clone(), QoS::AtLeastOnce);
                    }
                    if subs.is_empty() {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    acked += 1;
                    if acked == subs.len() {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Msg {
                        topic: p.topic.clone(),
                        payload: p.payload,
                        at: Instant::now(),
                    });
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(15), ready_rx)
        .await
        .map_err(|_| anyhow::anyhow!("MQTT broker {host}:{port}: no connection within 15 s"))??;
    Ok(Client { client, rx, task })
}

//! A tap on the broker: a plain MQTT subscriber that sees copies of every agent's
//! batches, so a suite can prove that no seq ever travelled with two different contents.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a listener on `tend/v1/+/up` saw: the first content of every (agent, seq), how
/// often each was sent, and every seq sent again with a different content.
#[derive(Default)]
pub struct TapSeen {
    pub first: HashMap<(String, u64), serde_json::Value>,
    pub sends: HashMap<(String, u64), u32>,
    pub conflicts: Vec<(String, u64, serde_json::Value, serde_json::Value)>,
    pub batches: u64,
    pub undecodable: u64,
}

impl TapSeen {
    /// Seqs seen more than once (resends after a lost ack, a reconnect or a restart).
    pub fn resent(&self) -> u64 {
        self.sends.values().filter(|n| **n > 1).count() as u64
    }
}

/// A plain (non-shared) MQTT subscriber of every agent's batches, reconnecting across
/// broker and gateway restarts. It sees copies of what the gateway gets, so the suites
/// can check that no seq ever travelled with two different contents.
pub struct WireTap {
    pub seen: Arc<Mutex<TapSeen>>,
    task: tokio::task::JoinHandle<()>,
}

impl WireTap {
    pub async fn start(broker_url: &str, id: &str) -> WireTap {
        Self::start_with(broker_url, id, None).await
    }

    /// The same, logged in as `user` (also its client id) with `password`: on a broker
    /// that admits only enrolled agents, the tap is one (see [`crate::trust::enrol`]).
    pub async fn start_as(broker_url: &str, user: &str, password: String) -> WireTap {
        Self::start_with(broker_url, user, Some((user, password))).await
    }

    async fn start_with(broker_url: &str, id: &str, login: Option<(&str, String)>) -> WireTap {
        let hostport = broker_url.trim_start_matches("mqtt://");
        let (host, port) = hostport.rsplit_once(':').unwrap();
        let mut opts = rumqttc::MqttOptions::new(id, host, port.parse::<u16>().unwrap());
        if let Some((user, password)) = login {
            opts.set_credentials(user, password);
        }
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut el) = rumqttc::AsyncClient::new(opts, 1024);
        let seen: Arc<Mutex<TapSeen>> = Default::default();
        let s = seen.clone();
        let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        let _ = client.try_subscribe("tend/v1/+/up", rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(true);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let mut s = s.lock().unwrap();
                        s.batches += 1;
                        // A sealed batch is its JSON body and a trailer line; the tap reads
                        // the body without checking the seal (it holds no key).
                        let body = tend_wire::seal::split(&p.payload)
                            .map(|(body, _)| body)
                            .unwrap_or(&p.payload);
                        let Ok(b) = serde_json::from_slice::<serde_json::Value>(body) else {
                            s.undecodable += 1;
                            continue;
                        };
                        let agent = b["agent"].as_str().unwrap_or_default().to_string();
                        for r in b["records"].as_array().into_iter().flatten() {
                            let Some(seq) = r["seq"].as_u64() else {
                                continue;
                            };
                            let k = (agent.clone(), seq);
                            *s.sends.entry(k.clone()).or_default() += 1;
                            match s.first.get(&k) {
                                None => {
                                    s.first.insert(k, r.clone());
                                }
                                Some(f) if f != r => {
                                    let f = f.clone();
                                    s.conflicts.push((k.0, k.1, f, r.clone()));
                                }
                                Some(_) => {}
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(20), subscribed.wait_for(|s| *s)).await;
        WireTap { seen, task }
    }
}

impl Drop for WireTap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// No seq travelled twice with two different contents. Returns (distinct seqs seen,
/// seqs sent more than once).
pub fn assert_no_conflicting_resend(tap: &WireTap) -> (usize, u64) {
    let s = tap.seen.lock().unwrap();
    assert!(
        s.conflicts.is_empty(),
        "seqs reused for different records: {:#?}",
        &s.conflicts[..s.conflicts.len().min(3)]
    );
    (s.first.len(), s.resent())
}

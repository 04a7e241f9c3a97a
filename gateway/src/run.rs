//! `tend-gateway run`: the store, the broker (embedded or external), the MQTT link, the
//! forwarder and the hotline API, started together and stopped together.

use crate::app::Gateway;
use crate::backend::BackendError;
use crate::config::StoreKind;
use crate::config::{read_secret, BrokerPlan, GatewayConfig, Loaded, SecretFileError};
use crate::diag::DiagClient;
use crate::ingest::IngestContext;
use crate::link::{self, LinkConfig};
use crate::metrics::Metrics;
use crate::store::{GatewayStore, PgConnect, PgStore, RedbStore, StoreError};
use crate::tls::ServerTlsError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tend_mqtt::UrlError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A started gateway.
#[derive(Debug)]
pub struct Running {
    /// The MQTT broker agents connect to (`mqtt://…`, or `mqtts://…` for an embedded
    /// broker with TLS).
    pub broker_url: String,
    /// Where the hotline API listens.
    pub api_addr: SocketAddr,
    /// `http://…` or `https://…`.
    pub api_url: String,
    pub gateway: Gateway,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every part and waits for them (the store is closed when the last handle goes).
    pub async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Why the gateway could not start (the process is expected to exit: tasks already
/// started are not stopped).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening the store: {0}")]
    StoreTask(#[source] tokio::task::JoinError),
    #[cfg(feature = "embedded-broker")]
    #[error(transparent)]
    Broker(#[from] tend_mqtt::broker::BrokerError),
    #[error("this build has no embedded broker (feature embedded-broker)")]
    NoEmbeddedBroker,
    #[error(transparent)]
    BrokerUrl(#[from] UrlError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    ApiToken(#[from] SecretFileError),
    #[error("audit log {}: {source}", path.display())]
    Audit {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hotline API on {listen}: {source}")]
    Listen {
        listen: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ApiTls(#[from] ServerTlsError),
    #[error("trust store: {0}")]
    Trust(#[from] crate::trust::TrustError),
    #[error(transparent)]
    Random(#[from] tend_wire::seal::RandomError),
}

/// The store `[store]` names: redb in `data_dir`, or the shared PostgreSQL database
/// (connected, its schema migrated).
pub fn open_store(
    data_dir: &std::path::Path,
    section: &crate::config::StoreSection,
) -> Result<Arc<dyn GatewayStore>, StoreError> {
    match section.kind {
        StoreKind::Redb => Ok(Arc::new(RedbStore::open(data_dir)?)),
        StoreKind::Postgres => {
            let connect =
                PgConnect::from_section(section).map_err(|detail| StoreError::Database {
                    store: "postgres".into(),
                    what: "configure",
                    detail,
                })?;
            let store = PgStore::open(connect)?;
            tracing::info!("store: {} (shared)", store.target());
            Ok(Arc::new(store))
        }
    }
}

/// Starts everything the config describes.
pub async fn start(loaded: Loaded) -> Result<Running, StartError> {
    let cfg = &loaded.config;
    // Before the broker and the API open sockets: the hotline gets a share of this.
    let open_files = crate::limits::raise_open_files();
    let store = {
        let (dir, section) = (cfg.data_dir.clone(), cfg.store.clone());
        tokio::task::spawn_blocking(move || open_store(&dir, &section))
            .await
            .map_err(StartError::StoreTask)??
    };
    let cx = IngestContext {
        // Gateways sharing the agents' traffic sign tickets with their group's name, so a
        // ticket body does not depend on which of them built it.
        gateway: cfg
            .broker
            .share_group
            .clone()
            .unwrap_or_else(|| cfg.gateway_id.clone()),
        fleet: loaded.fleet.clone(),
        profiles: loaded.profiles.clone(),
        tz: loaded.tz.clone(),
        clock_tolerance: jiff::SignedDuration::try_from(cfg.clock_tolerance.0)
            .unwrap_or(crate::clock::DEFAULT_TOLERANCE),
    };
    let trust = {
        let dir = crate::trust::TrustDir::new(cfg.trust_dir());
        tokio::task::spawn_blocking(move || crate::trust::Trust::open(dir))
            .await
            .map_err(StartError::StoreTask)??
    };
    tracing::info!(
        "trust store {}: {} agent(s) enrolled",
        trust.dir().path().display(),
        trust.enrolled()
    );
    let login = crate::trust::GatewayLogin::new(&cfg.gateway_id)?;
    let (diag, diag_out) = DiagClient::new(&cfg.gateway_id);
    let gw = Gateway::new(
        store,
        cx,
        diag,
        trust.clone(),
        cfg.backend.is_some(),
        cfg.api.diag_timeout.0,
    );
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(watch_trust(trust.clone(), shutdown.clone())));
    if gw.store.shared() {
        tasks.push(share_trust_from_start(&gw, &shutdown).await);
    }

    // Agents connect to `broker_url`; the gateway's own client to `link_url`, which for
    // the embedded broker is its plain loopback side (behind the same login).
    let (broker_url, link_url, embedded_login) = match cfg.broker.plan() {
        BrokerPlan::External { url } => (url.clone(), url, None),
        BrokerPlan::Embedded { listen } => {
            let (agents_url, local_url) = embedded(listen, cfg, &gw.metrics, &trust, &login)?;
            let own = tend_mqtt::Credentials {
                username: login.username.clone(),
                password: login.password.clone(),
            };
            (agents_url, local_url, Some(own))
        }
    };
    let link_cfg = LinkConfig {
        url: tend_mqtt::BrokerUrl::parse(&link_url)?,
        // Not guessable: a client taking the gateway's id would knock it off the broker.
        client_id: login.client_id.clone(),
        share_group: cfg.broker.share_group.clone(),
        auth: cfg.broker.auth(),
        login: embedded_login,
    };
    {
        let gw = gw.clone();
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = link::run(gw, link_cfg, diag_out, sd).await {
                tracing::error!("MQTT link stopped: {e}");
            }
        }));
    }

    tasks.extend(spawn_ticket_tasks(cfg, &gw, &shutdown)?);

    // The hotline API. Bound here, so a config with port 0 still reports the real one.
    let token = read_secret(&cfg.api.token_file)?;
    let audit_path = cfg.data_dir.join("audit.log");
    let audit = crate::audit::Audit::open_capped(&audit_path, cfg.api.audit_max_size.0)
        .map_err(|source| StartError::Audit {
            path: audit_path.clone(),
            source,
        })?
        .keep_in(gw.store.clone(), &cfg.gateway_id);
    tasks.push(tokio::spawn(write_refusal_tallies(
        audit.clone(),
        shutdown.clone(),
    )));
    let listen = cfg.api.listen;
    let listen_error = |source| StartError::Listen { listen, source };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(listen_error)?;
    let api_addr = listener.local_addr().map_err(listen_error)?;
    let tls = match (&cfg.api.tls_cert, &cfg.api.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::server_config(c, k)?),
        _ => None,
    };
    let api_url = format!(
        "{}://{api_addr}",
        if tls.is_some() { "https" } else { "http" }
    );
    {
        let limits = crate::serve::Limits::from_section(&cfg.api, open_files);
        tracing::info!(
            "hotline API: at most {} connections (open-file limit {open_files})",
            limits.max_connections
        );
        let router = crate::api::router(gw.clone(), token, audit);
        let sd = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let served = crate::serve::serve(listener, router, tls, limits, sd).await;
            if let Err(e) = served {
                tracing::error!("hotline API stopped: {e}");
            }
        }));
    }

    Ok(Running {
        broker_url,
        api_addr,
        api_url,
        gateway: gw,
        shutdown,
        tasks,
    })
}

/// Writes the audit log's per-address refusal tallies as their minutes end, and what is
/// left of them at shutdown.
async fn write_refusal_tallies(audit: crate::audit::Audit, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        let all = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.cancelled() => true,
        };
        let a = audit.clone();
        let now = std::time::Instant::now();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || a.flush_refusals(now, all)).await {
            tracing::error!(error = %e, "audit log could not be written");
        }
        if all {
            return;
        }
    }
}

/// Reads the trust directory again when it changes, so enrolments and revocations take
/// effect within a second without a restart.
async fn watch_trust(trust: Arc<crate::trust::Trust>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(crate::trust::RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let t = trust.clone();
        let _ = tokio::task::spawn_blocking(move || t.reload(false)).await;
    }
}

/// How often a gateway on a shared store exchanges enrolments with it.
pub const TRUST_SYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// On a shared store: this gateway's enrolments go to the store and the fleet's come from
/// it (the newer state of each agent wins: `trust::supersedes`), so an agent enrolled or
/// revoked with `tend-gateway agent add/revoke` on any running gateway is heard or refused
/// by all within [`TRUST_SYNC`]. The number of entries taken from the store.
pub fn sync_trust(store: &dyn GatewayStore, trust: &crate::trust::Trust) -> Result<usize, String> {
    let dir = trust.dir();
    let mine = dir.entries().map_err(|e| e.to_string())?;
    store.keep_trust_entries(&mine).map_err(|e| e.to_string())?;
    // What the directory already holds as new is left alone without reading it again;
    // `merge` checks once more what it writes.
    let held: std::collections::HashMap<&str, &crate::trust::Enrolment> =
        mine.iter().map(|e| (e.agent.as_str(), e)).collect();
    let mut taken = 0;
    for e in store.trust_entries().map_err(|e| e.to_string())? {
        let known = held.get(e.agent.as_str());
        if known.is_some_and(|m| !crate::trust::supersedes(&e, m)) {
            continue;
        }
        if dir.merge(&e).map_err(|e| e.to_string())? {
            tracing::info!(agent = %e.agent, revoked = e.revoked_at.is_some(), "trust store: enrolment taken from the shared store");
            taken += 1;
        }
    }
    if taken > 0 {
        trust.reload(true);
    }
    Ok(taken)
}

/// Takes the fleet's enrolments from the shared store once (before the link starts, so
/// agents enrolled on another gateway are heard at once), then keeps exchanging them.
async fn share_trust_from_start(
    gw: &Gateway,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    match sync_trust_off_thread(&gw.store, &gw.trust).await {
        Ok(n) => tracing::info!("trust store: {n} enrolment(s) taken from the shared store"),
        Err(e) => tracing::error!("trust store: cannot sync with the shared store: {e}"),
    }
    tokio::spawn(share_trust(
        gw.store.clone(),
        gw.trust.clone(),
        shutdown.clone(),
    ))
}

async fn share_trust(
    store: Arc<dyn GatewayStore>,
    trust: Arc<crate::trust::Trust>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(TRUST_SYNC);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = sync_trust_off_thread(&store, &trust).await {
            tracing::warn!("trust store: cannot sync with the shared store: {e}");
        }
    }
}

/// [`sync_trust`] on a blocking thread (the store and the trust directory block).
async fn sync_trust_off_thread(
    store: &Arc<dyn GatewayStore>,
    trust: &Arc<crate::trust::Trust>,
) -> Result<usize, String> {
    let (s, t) = (store.clone(), trust.clone());
    tokio::task::spawn_blocking(move || sync_trust(s.as_ref(), &t))
        .await
        .map_err(|e| format!("sync task: {e}"))?
}

/// Starts the embedded broker; returns the URL agents connect to (`mqtts://` with TLS)
/// and that of its plain loopback side, where the gateway's own client connects. Only
/// enrolled agents (each as itself) and this gateway get a session.
#[cfg(feature = "embedded-broker")]
fn embedded(
    listen: SocketAddr,
    cfg: &GatewayConfig,
    metrics: &Metrics,
    trust: &Arc<crate::trust::Trust>,
    own: &crate::trust::GatewayLogin,
) -> Result<(String, String), StartError> {
    let (trust, own) = (trust.clone(), own.clone());
    let login: tend_mqtt::broker::Login =
        Arc::new(move |client_id: &str, user: &str, pass: &str| {
            trust.broker_login(&own, client_id, user, pass)
        });
    let access = tend_mqtt::broker::BrokerAccess {
        login: Some(login),
        tls: cfg.broker.server_tls(),
        refused: metrics.broker_refused.clone(),
    };
    let started = crate::broker::start(listen, &access)?;
    let scheme = if access.tls.is_some() {
        "mqtts"
    } else {
        "mqtt"
    };
    Ok((
        format!("{scheme}://{}", started.addr),
        format!("mqtt://{}", started.local),
    ))
}

#[cfg(not(feature = "embedded-broker"))]
fn embedded(
    _listen: SocketAddr,
    _: &GatewayConfig,
    _: &Metrics,
    _: &Arc<crate::trust::Trust>,
    _: &crate::trust::GatewayLogin,
) -> Result<(String, String), StartError> {
    Err(StartError::NoEmbeddedBroker)
}

/// The service watch (deadlines, SLA events, maintenance due, at the pace the backend's
/// tickets are read back, 60 s without a backend) and, with a backend, the forwarder;
/// without one, tickets stay in the store and the API shows them.
fn spawn_ticket_tasks(
    cfg: &crate::config::GatewayConfig,
    gw: &Gateway,
    shutdown: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    let mut tasks = Vec::new();
    let every = cfg
        .backend
        .as_ref()
        .map_or(std::time::Duration::from_secs(60), |b| b.status_poll.0);
    let (g, sd) = (gw.clone(), shutdown.clone());
    let pm = cfg.service.maintenance_tickets;
    tasks.push(tokio::spawn(crate::service_watch::run(g, every, pm, sd)));
    match &cfg.backend {
        Some(b) => {
            let backend = crate::backend::from_section(b)?;
            let fcfg = crate::forwarder::ForwarderConfig {
                gateway_id: cfg.gateway_id.clone(),
                ..crate::forwarder::ForwarderConfig::from_section(b)
            };
            let (g, sd) = (gw.clone(), shutdown.clone());
            tasks.push(tokio::spawn(crate::forwarder::run(g, backend, fcfg, sd)));
        }
        None => tracing::info!("no backend configured: tickets are kept by the gateway"),
    }
    Ok(tasks)
}

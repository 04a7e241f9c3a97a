//! Enrolment and the trust store: which agents this fleet's gateways believe, and the key
//! each one seals its messages with (`tend_wire::seal`).
//!
//! The store is a directory (`[trust] dir`, default `<data_dir>/trust`) with one file per
//! agent, `agents/<id>.toml`, private to the gateway's user. `tend-gateway agent add`
//! writes a file (and the agent's credentials), `agent revoke` marks it revoked; both
//! work without a running gateway, and gateways that name the same directory accept the
//! same agents. A running gateway reads the directory again when it changes (checked
//! every second and whenever an unknown agent speaks), so an enrolment or a revocation
//! takes effect within a second without a restart.
//!
//! A revoked agent is kept, not deleted, so `agent list` shows it and a stolen key stays
//! refused; `agent add` of a revoked id issues a new key.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tend_wire::seal::{random_hex, RandomError};
use tend_wire::AgentKey;

/// Why an enrolment command failed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Damaged { path: PathBuf, message: String },
    #[error("{0:?} is not a valid agent id (1-64 letters, digits, '-', '_' or '.')")]
    InvalidId(String),
    #[error("agent {0:?} is already enrolled (revoke it first to issue a new key)")]
    AlreadyEnrolled(String),
    #[error("agent {0:?} is not enrolled")]
    NotEnrolled(String),
    #[error(transparent)]
    Random(#[from] RandomError),
    #[error(transparent)]
    Private(#[from] tend_mqtt::SecretError),
}

/// Why a message or a login of an agent is refused. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Revoked,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unknown => "unknown_agent",
            Refusal::Revoked => "revoked",
        }
    }
}

/// One agent's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolment {
    pub agent: String,
    pub key: AgentKey,
    pub enrolled_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryFile {
    agent_id: String,
    key: String,
    enrolled_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_at: Option<Timestamp>,
}

/// The trust directory on disk.
#[derive(Debug, Clone)]
pub struct TrustDir {
    dir: PathBuf,
}

impl TrustDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        TrustDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn agents(&self) -> PathBuf {
        self.dir.join("agents")
    }

    fn entry(&self, agent: &str) -> PathBuf {
        self.agents().join(format!("{agent}.toml"))
    }

    /// Creates the directories, private to the gateway's user.
    fn ensure(&self) -> Result<(), TrustError> {
        let agents = self.agents();
        std::fs::create_dir_all(&agents).map_err(|source| TrustError::Io {
            path: agents.clone(),
            source,
        })?;
        for d in [&self.dir, &agents] {
            set_mode(d, 0o700)?;
            self.give_to_service(d)?;
        }
        Ok(())
    }

    /// Run as root (`sudo tend-gateway agent add` on an installed gateway), what is made
    /// here goes to the owner of the directory above the trust directory (the service's
    /// data directory), or the gateway, running as its own user, could not read it.
    fn give_to_service(&self, path: &Path) -> Result<(), TrustError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| TrustError::Io {
            path: path.to_path_buf(),
            source,
        };
        let made = std::fs::metadata(path).map_err(io)?;
        if made.uid() != 0 {
            return Ok(());
        }
        let Some(owner) = self
            .dir
            .parent()
            .and_then(|p| std::fs::metadata(p).ok())
            .filter(|m| m.uid() != 0)
        else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).map_err(io)
    }

    /// Enrols `agent` with a new key. Refused while it is enrolled and not revoked.
    pub fn add(&self, agent: &str, now: Timestamp) -> Result<Enrolment, TrustError> {
        if !tend_wire::topic::valid_agent_id(agent) {
            return Err(TrustError::InvalidId(agent.chars().take(80).collect()));
        }
        self.ensure()?;
        if let Some(e) = self.read(agent)? {
            if e.revoked_at.is_none() {
                return Err(TrustError::AlreadyEnrolled(agent.to_string()));
            }
        }
        let e = Enrolment {
            agent: agent.to_string(),
            key: AgentKey::generate()?,
            enrolled_at: now,
            revoked_at: None,
        };
        self.write(&e)?;
        Ok(e)
    }

    /// Marks `agent` revoked: refused from then on, by every gateway reading this
    /// directory. Revoking a revoked agent keeps the first revocation's time.
    pub fn revoke(&self, agent: &str, now: Timestamp) -> Result<Enrolment, TrustError> {
        let mut e = self
            .read(agent)?
            .ok_or_else(|| TrustError::NotEnrolled(agent.to_string()))?;
        if e.revoked_at.is_none() {
            e.revoked_at = Some(now);
            self.write(&e)?;
        }
        Ok(e)
    }

    /// Every agent, enrolled or revoked, by id.
    pub fn list(&self) -> Result<Vec<Enrolment>, TrustError> {
        let (all, damaged) = self.read_all()?;
        if let Some(e) = damaged.into_iter().next() {
            return Err(e);
        }
        Ok(all.into_values().collect())
    }

    fn read(&self, agent: &str) -> Result<Option<Enrolment>, TrustError> {
        if !tend_wire::topic::valid_agent_id(agent) {
            return Err(TrustError::InvalidId(agent.chars().take(80).collect()));
        }
        let path = self.entry(agent);
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(TrustError::Io { path, source }),
            Ok(_) => read_entry(&path).map(Some),
        }
    }

    /// Every readable entry, by agent (a damaged one is left out here; the live trust
    /// store logs it).
    pub fn entries(&self) -> Result<Vec<Enrolment>, TrustError> {
        Ok(self.read_all()?.0.into_values().collect())
    }

    /// Takes `e` (from another gateway, through a shared store) unless this directory
    /// holds the same or a newer state of that agent ([`supersedes`]); true when written.
    pub fn merge(&self, e: &Enrolment) -> Result<bool, TrustError> {
        self.ensure()?;
        match self.read(&e.agent) {
            Ok(Some(mine)) if !supersedes(e, &mine) => Ok(false),
            Ok(_) | Err(TrustError::Damaged { .. }) => {
                self.write(e)?;
                Ok(true)
            }
            Err(other) => Err(other),
        }
    }

    /// Every readable entry, and the errors of those that are not (a damaged file must
    /// not make a running gateway forget every other agent).
    fn read_all(&self) -> Result<(BTreeMap<String, Enrolment>, Vec<TrustError>), TrustError> {
        let dir = self.agents();
        let rd = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((BTreeMap::new(), Vec::new()))
            }
            Err(source) => return Err(TrustError::Io { path: dir, source }),
            Ok(rd) => rd,
        };
        let mut all = BTreeMap::new();
        let mut damaged = Vec::new();
        for item in rd {
            let item = item.map_err(|source| TrustError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = item.path();
            if path.extension().and_then(|x| x.to_str()) != Some("toml") {
                continue;
            }
            match read_entry(&path) {
                Ok(e) => {
                    all.insert(e.agent.clone(), e);
                }
                Err(e) => damaged.push(e),
            }
        }
        Ok((all, damaged))
    }

    /// Writes an entry atomically (a temporary file renamed over the old one), so a
    /// gateway reading the directory never sees half a file.
    fn write(&self, e: &Enrolment) -> Result<(), TrustError> {
        let path = self.entry(&e.agent);
        let text = toml::to_string(&EntryFile {
            agent_id: e.agent.clone(),
            key: e.key.to_hex(),
            enrolled_at: e.enrolled_at,
            revoked_at: e.revoked_at,
        })
        .map_err(|err| TrustError::Damaged {
            path: path.clone(),
            message: err.to_string(),
        })?;
        let tmp = self.agents().join(format!(".{}.tmp", e.agent));
        write_private(&tmp, text.as_bytes())?;
        self.give_to_service(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|source| TrustError::Io {
            path: path.clone(),
            source,
        })?;
        sync_dir(&self.agents())
    }
}

/// Whether enrolment state `a` of an agent replaces `b`: a later enrolment (a new key), or
/// the same enrolment revoked (a revocation is never undone but by enrolling again).
pub fn supersedes(a: &Enrolment, b: &Enrolment) -> bool {
    a.enrolled_at > b.enrolled_at
        || (a.enrolled_at == b.enrolled_at && a.revoked_at.is_some() && b.revoked_at.is_none())
}

fn read_entry(path: &Path) -> Result<Enrolment, TrustError> {
    let bytes = tend_mqtt::read_private("trust entry", path)?;
    let damaged = |message: String| TrustError::Damaged {
        path: path.to_path_buf(),
        message,
    };
    let text = String::from_utf8(bytes).map_err(|_| damaged("not UTF-8".into()))?;
    let f: EntryFile = toml::from_str(&text)
        .map_err(|e| damaged(e.message().lines().next().unwrap_or("invalid").into()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    if f.agent_id != stem || !tend_wire::topic::valid_agent_id(&f.agent_id) {
        return Err(damaged(format!(
            "names agent {:?} but is the file of {stem:?}",
            f.agent_id
        )));
    }
    let key = AgentKey::from_hex(&f.key).ok_or_else(|| damaged("key: not 64 hex digits".into()))?;
    Ok(Enrolment {
        agent: f.agent_id,
        key,
        enrolled_at: f.enrolled_at,
        revoked_at: f.revoked_at,
    })
}

/// Writes `bytes` to a new file readable only by its owner, synced.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TrustError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    };
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), TrustError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        TrustError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

fn sync_dir(path: &Path) -> Result<(), TrustError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|source| TrustError::Io {
            path: path.to_path_buf(),
            source,
        })
}

/// How often a running gateway looks for changes in the trust directory.
pub const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// How often it reads the directory whether or not it seems changed.
const FULL_RELOAD: Duration = Duration::from_secs(30);

/// The gateway's own login to its embedded broker: made fresh at every start and never
/// written down, with a client id no agent can guess (so none can take it over).
#[derive(Clone)]
pub struct GatewayLogin {
    pub username: String,
    pub password: String,
    pub client_id: String,
}

impl std::fmt::Debug for GatewayLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayLogin")
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl GatewayLogin {
    pub fn new(gateway_id: &str) -> Result<Self, RandomError> {
        Ok(GatewayLogin {
            // ':' is no agent id character, so no enrolment can take this name.
            username: format!("gateway:{gateway_id}"),
            password: random_hex(32)?,
            client_id: format!("tend-gateway-{gateway_id}-{}", random_hex(8)?),
        })
    }
}

struct Loaded {
    agents: HashMap<String, Enrolment>,
    /// The agents directory's modification time when it was read.
    stamp: Option<SystemTime>,
    checked: Instant,
}

/// The live trust store of a running gateway: keys by agent, read again when the
/// directory changes.
pub struct Trust {
    dir: TrustDir,
    state: RwLock<Loaded>,
    /// Serialises reloads.
    reloading: Mutex<()>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").field("dir", &self.dir).finish()
    }
}

impl Trust {
    /// Opens (creating if need be) the trust directory and reads it.
    pub fn open(dir: TrustDir) -> Result<Arc<Trust>, TrustError> {
        dir.ensure()?;
        let t = Trust {
            dir,
            state: RwLock::new(Loaded {
                agents: HashMap::new(),
                stamp: None,
                checked: Instant::now(),
            }),
            reloading: Mutex::new(()),
        };
        t.reload(true);
        Ok(Arc::new(t))
    }

    pub fn dir(&self) -> &TrustDir {
        &self.dir
    }

    /// The key of `agent`, or why it is refused. An unknown agent makes the directory be
    /// looked at again first (one `stat`; read only when it changed), so one enrolled a
    /// moment ago is heard at once.
    pub fn key_for(&self, agent: &str) -> Result<AgentKey, Refusal> {
        match self.lookup(agent) {
            Err(Refusal::Unknown) => {
                self.reload(false);
                self.lookup(agent)
            }
            other => other,
        }
    }

    fn lookup(&self, agent: &str) -> Result<AgentKey, Refusal> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        match state.agents.get(agent) {
            None => Err(Refusal::Unknown),
            Some(e) if e.revoked_at.is_some() => Err(Refusal::Revoked),
            Some(e) => Ok(e.key.clone()),
        }
    }

    /// Agents enrolled and not revoked.
    pub fn enrolled(&self) -> usize {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .agents
            .values()
            .filter(|e| e.revoked_at.is_none())
            .count()
    }

    /// Reads the directory again if it changed since the last read (its modification
    /// time), or the last read is [`FULL_RELOAD`] old (a change within the file system's
    /// timestamp granularity leaves the time as it was), or `force`. A directory that
    /// cannot be read keeps the last good view; a damaged entry is logged and left out.
    pub fn reload(&self, force: bool) {
        let _one = self.reloading.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = std::fs::metadata(self.dir.agents())
            .and_then(|m| m.modified())
            .ok();
        {
            let state = self.state.read().unwrap_or_else(|p| p.into_inner());
            let elapsed = state.checked.elapsed();
            let due = force
                || elapsed >= FULL_RELOAD
                || stamp != state.stamp
                || (stamp.is_none() && elapsed >= RELOAD_EVERY);
            if !due {
                return;
            }
        }
        match self.dir.read_all() {
            Ok((all, damaged)) => {
                for e in damaged {
                    tracing::error!("trust store: {e}; that agent is refused until it is fixed");
                }
                let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                state.agents = all.into_iter().collect();
                state.stamp = stamp;
                state.checked = Instant::now();
            }
            Err(e) => {
                tracing::error!("trust store: {e}; keeping the agents read before");
                let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
                state.checked = Instant::now();
            }
        }
    }

    /// Whether a CONNECT to the embedded broker may have a session: the gateway's own
    /// login, or an enrolled agent logging in as itself (user name = client id = agent
    /// id) with the password derived from its key. Compared in constant time.
    pub fn broker_login(
        &self,
        own: &GatewayLogin,
        client_id: &str,
        user: &str,
        pass: &str,
    ) -> bool {
        if user == own.username {
            return client_id == own.client_id && same(pass, &own.password);
        }
        if client_id != user {
            return false;
        }
        match self.key_for(user) {
            Ok(key) => same(pass, &key.broker_password(user)),
            Err(_) => false,
        }
    }
}

fn same(a: &str, b: &str) -> bool {
    bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-12-02T01:00:00Z".parse().unwrap()
    }

    #[test]
    fn add_list_revoke_and_add_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = TrustDir::new(d.path().join("trust"));
        assert!(dir.list().unwrap().is_empty());
        let a = dir.add("icu-a", now()).unwrap();
        assert!(matches!(
            dir.add("icu-a", now()),
            Err(TrustError::AlreadyEnrolled(_))
        ));
        assert!(matches!(
            dir.add("a/b", now()),
            Err(TrustError::InvalidId(_))
        ));
        dir.add("icu-b", now()).unwrap();
        let list = dir.list().unwrap();
        assert_eq!(
            list.iter().map(|e| e.agent.as_str()).collect::<Vec<_>>(),
            ["icu-a", "icu-b"]
        );
        assert_eq!(list[0].key, a.key);
        let r = dir.revoke("icu-a", now()).unwrap();
        assert_eq!(r.revoked_at, Some(now()));
        assert!(matches!(
            dir.revoke("nobody", now()),
            Err(TrustError::NotEnrolled(_))
        ));
        let again = dir.add("icu-a", now()).unwrap();
        assert_ne!(again.key, a.key, "a re-enrolled agent gets a new key");
        // Private files in a private directory.
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.entry("icu-a")), 0o600);
        assert_eq!(mode(dir.path()), 0o700);
    }

    #[test]
    fn a_running_gateway_sees_enrolments_and_revocations() {
        let d = tempfile::tempdir().unwrap();
        let dir = TrustDir::new(d.path().join("trust"));
        let trust = Trust::open(dir.clone()).unwrap();
        assert_eq!(trust.key_for("a1"), Err(Refusal::Unknown));
        let e = dir.add("a1", now()).unwrap();
        // Unknown agents make it look again at once.
        assert_eq!(trust.key_for("a1"), Ok(e.key.clone()));
        dir.revoke("a1", now()).unwrap();
        // Known ones within RELOAD_EVERY.
        trust.reload(true);
        assert_eq!(trust.key_for("a1"), Err(Refusal::Revoked));
        assert_eq!(trust.enrolled(), 0);
    }

    #[test]
    fn broker_logins() {
        let d = tempfile::tempdir().unwrap();
        let dir = TrustDir::new(d.path());
        let trust = Trust::open(dir.clone()).unwrap();
        let own = GatewayLogin::new("gw1").unwrap();
        let e = dir.add("a1", now()).unwrap();
        let pw = e.key.broker_password("a1");
        assert!(trust.broker_login(&own, "a1", "a1", &pw));
        assert!(!trust.broker_login(&own, "a1", "a1", "guess"));
        assert!(
            !trust.broker_login(&own, "a2", "a1", &pw),
            "client id must be its own"
        );
        assert!(!trust.broker_login(&own, &own.client_id, "a1", &pw));
        assert!(!trust.broker_login(&own, "x", "", ""));
        assert!(trust.broker_login(&own, &own.client_id, &own.username, &own.password));
        assert!(!trust.broker_login(&own, "other", &own.username, &own.password));
        dir.revoke("a1", now()).unwrap();
        trust.reload(true);
        assert!(!trust.broker_login(&own, "a1", "a1", &pw));
        assert!(!format!("{own:?}").contains(&own.password));
    }

    #[test]
    fn a_damaged_entry_is_refused_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = TrustDir::new(d.path());
        let good = dir.add("good", now()).unwrap();
        dir.add("bad", now()).unwrap();
        write_private(&dir.entry("bad"), b"key = 1").unwrap();
        let trust = Trust::open(dir.clone()).unwrap();
        assert_eq!(trust.key_for("good"), Ok(good.key));
        assert_eq!(trust.key_for("bad"), Err(Refusal::Unknown));
        let e = dir.list().unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}

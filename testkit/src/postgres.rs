//! A real, throwaway PostgreSQL cluster for the suites of the shared store (`.ci/run`
//! installs Debian's `postgresql`).
//!
//! Each [`Postgres`] is its own cluster (initdb in a temporary directory, a free port on
//! 127.0.0.1, password authentication) and is stopped when dropped. PostgreSQL refuses to
//! run as root, so under root its commands run as the `postgres` user (`runuser`), which
//! the Debian package creates.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The superuser the tests connect as.
pub const USER: &str = "tend";

/// A throwaway cluster.
pub struct Postgres {
    /// fsync and synchronous commit on (a bench's database), else off (tests).
    durable: bool,
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    password: String,
    as_postgres: bool,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("port", &self.port)
            .finish()
    }
}

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/<major>/bin`).
fn server_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .expect("PostgreSQL's server is not installed (.ci/run installs Debian's postgresql)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Postgres {
    /// Creates and starts a cluster for tests: fsync off (the suites kill gateways, not
    /// the database's host); panics with PostgreSQL's own words when it cannot.
    pub fn start() -> Postgres {
        Self::start_with(false)
    }

    /// A cluster that makes every commit durable, as a production one does (benches).
    pub fn start_durable() -> Postgres {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Postgres {
        let bin = server_bin();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("tend-pg-")
            .tempdir()
            .unwrap();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let password = format!("pw-{nanos:x}");
        std::fs::write(dir.path().join("pw"), &password).unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown of the cluster's directory to postgres failed");
        }
        let pg = Postgres {
            durable,
            port: crate::ports::free_port(),
            dir,
            bin,
            password,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                USER,
                "--auth=scram-sha-256",
                &format!("--pwfile={}", pg.dir.path().join("pw").display()),
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
        );
        // TLS offered with the test server certificate (for localhost and 127.0.0.1,
        // signed by the test CA); plain connections stay allowed.
        for (name, pem) in [
            ("server.crt", crate::certs::SERVER_CERT_PEM),
            ("server.key", crate::certs::SERVER_KEY_PEM),
        ] {
            let path = pg.data().join(name);
            crate::config::write_secret(&path, pem).unwrap();
            if pg.as_postgres {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .unwrap()
                    .success();
                assert!(ok, "chown of {name} to postgres failed");
            }
        }
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A server tool, run as `postgres` under root.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self
            .command(tool)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"));
        if !out.status.success() {
            let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
            panic!(
                "{tool} failed: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Starts the server (again) and waits until it accepts connections.
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200 -c ssl=on{}",
            self.port,
            self.dir.path().display(),
            if self.durable { "" } else { " -c fsync=off" }
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.path().join("log").display().to_string(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server at once (clients are cut off, as when a database host fails).
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The file holding the password, for a gateway's `[store] password_file`.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let f = dir.join("pg-password");
        std::fs::write(&f, format!("{}\n", self.password)).unwrap();
        f
    }

    /// A URL of database `db` without the password (it comes from a file or the URL of
    /// [`Postgres::url_with_password`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn url_with_password(&self, db: &str) -> String {
        format!(
            "postgres://{USER}:{}@127.0.0.1:{}/{db}",
            self.password, self.port
        )
    }

    /// Creates a new empty database and returns its name.
    pub fn create_database(&self, name: &str) -> String {
        let out = Command::new("psql")
            .arg(self.url_with_password("postgres"))
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
            .arg(format!("CREATE DATABASE \"{name}\""))
            .stdin(Stdio::null())
            .output()
            .expect("psql (Debian's postgresql-client)");
        assert!(
            out.status.success(),
            "CREATE DATABASE {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        name.to_string()
    }

    /// One SQL statement's rows, as psql prints them unaligned (`|` between columns).
    pub fn query(&self, db: &str, sql: &str) -> Vec<String> {
        let out = Command::new("psql")
            .arg(self.url_with_password(db))
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("psql (Debian's postgresql-client)");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

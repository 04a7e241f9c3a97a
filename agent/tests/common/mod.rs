//! Helpers shared by the probe tests: running the built binary, and PHI checks.
#![allow(dead_code)]

use std::time::Duration;

/// Output of one `tend-agent probe` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

/// Runs the built binary with `probe` and `args`. The simulators live in the test's own
/// runtime, so the child is awaited asynchronously while they keep serving.
pub async fn probe(args: &[&str]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tend-agent"));
    cmd.arg("probe").args(args).kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(40), cmd.output())
        .await
        .expect("probe did not finish in 40 s")
        .expect("probe could not be started");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts that none of `needles` (patient ids, names, vitals) appears in `hay`.
pub fn assert_no_phi(hay: &str, needles: &[&str]) {
    for n in needles {
        assert!(
            !hay.contains(n),
            "personal data {n:?} leaked into probe output:\n{hay}"
        );
    }
}

/// Signal codes of a JSON report.
pub fn signal_codes(v: &serde_json::Value) -> Vec<String> {
    v["signals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["code"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The value of a reading in a JSON report.
pub fn reading(v: &serde_json::Value, name: &str) -> serde_json::Value {
    v["readings"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == name))
        .map(|r| r["value"].clone())
        .unwrap_or(serde_json::Value::Null)
}

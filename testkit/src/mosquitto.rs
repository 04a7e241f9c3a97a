//! A real Mosquitto broker for the suites that run against an external broker (`.ci/run`
//! installs it with apt-get).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Starts Mosquitto on `port` (config in `dir`) and waits until it accepts connections.
pub async fn start_mosquitto(dir: &Path, port: u16) -> tokio::process::Child {
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        // set_tcp_nodelay: Mosquitto leaves Nagle on by default, which holds small
        // messages (a fault's batch, its ack) for the peer's delayed ACK, ~40 ms.
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        ),
    )
    .unwrap();
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("mosquitto is not installed (.ci/run installs it with apt-get)");
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .kill_on_drop(true)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("mosquitto did not start on port {port}");
}

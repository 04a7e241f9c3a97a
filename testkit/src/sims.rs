//! Simulated devices under load: AV-500 ventilators and HM-2 helium monitors on Modbus
//! TCP (from `tend-devsim`), the fleet file that lists them and an agent config that
//! polls them.

use crate::config::{fleet_toml, FleetDevice};

/// A simulated device the agent polls over Modbus TCP.
pub enum Sim {
    Av(tend_devsim::av500::Av500Handle),
    Hm(tend_devsim::hm2::Hm2Handle),
}

impl Sim {
    pub fn addr(&self) -> std::net::SocketAddr {
        match self {
            Sim::Av(a) => a.addr().unwrap(),
            Sim::Hm(h) => h.addr(),
        }
    }
    pub fn profile(&self) -> &'static str {
        match self {
            Sim::Av(_) => "aeris/av-500",
            Sim::Hm(_) => "cryosense/hm-2",
        }
    }
    /// Raises a fault chosen by `pick`: on a ventilator one of the alarm bits ALM1.3 to
    /// ALM1.7 (a third of the time in its failure state too), on a helium monitor a
    /// compressor fault.
    pub fn raise(&self, pick: u64) {
        use tend_devsim::av500::device_state;
        match self {
            Sim::Av(a) => a.update(|s| {
                s.alarm_word1 = 1 << (3 + pick % 5);
                if pick % 3 == 0 {
                    s.device_state = device_state::FAILURE;
                }
            }),
            Sim::Hm(h) => h.update(|s| s.compressor = 2),
        }
    }
    pub fn clear(&self) {
        use tend_devsim::av500::device_state;
        match self {
            Sim::Av(a) => a.update(|s| {
                s.alarm_word1 = 0;
                s.device_state = device_state::VENTILATING;
            }),
            Sim::Hm(h) => h.update(|s| s.compressor = 1),
        }
    }
    pub fn serial(&self, i: usize) -> String {
        match self {
            Sim::Av(_) => format!("AV5C-21-{i:06}"),
            Sim::Hm(_) => format!("HM2-{i:06}"),
        }
    }
}

/// `n` simulators on free ports: three AV-500 ventilators (`vent-<i>`, each its own
/// serial) for every HM-2 helium monitor (`mri-<i>`).
pub async fn spawn_sims(n: usize) -> Vec<(String, Sim)> {
    use tend_devsim::av500::{Av500Config, Av500Sim};
    use tend_devsim::hm2::{Hm2Config, Hm2Sim};
    let mut sims = Vec::new();
    for i in 0..n {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        if i % 4 == 3 {
            let h = Hm2Sim::spawn_tcp(Hm2Config::v3(), any).await.unwrap();
            sims.push((format!("mri-{i}"), Sim::Hm(h)));
        } else {
            let mut cfg = Av500Config::v5();
            cfg.serial = format!("AV5C-21-{i:06}");
            let a = Av500Sim::spawn_tcp(cfg, any).await.unwrap();
            sims.push((format!("vent-{i}"), Sim::Av(a)));
        }
    }
    sims
}

/// The fleet file listing every simulator (site `s-main`).
pub fn sims_fleet(sims: &[(String, Sim)]) -> String {
    let serials: Vec<String> = sims
        .iter()
        .enumerate()
        .map(|(i, (_, s))| s.serial(i))
        .collect();
    let devices: Vec<FleetDevice<'_>> = sims
        .iter()
        .zip(&serials)
        .map(|((id, _), serial)| FleetDevice {
            id,
            serial,
            site: "s-main",
            location: "ICU",
            accepted: "2025-06-01",
        })
        .collect();
    fleet_toml(&devices)
}

/// An agent config polling every simulator every `poll`. Its credentials are read from
/// `<agent>.cred` beside the config (see [`crate::trust`]).
pub fn sims_agent_toml(agent: &str, broker: &str, sims: &[(String, Sim)], poll: &str) -> String {
    let mut s = format!(
        "agent_id = \"{agent}\"\nsite_id = \"s-main\"\ndata_dir = \"data\"\nflap_damping = \"300ms\"\n[uplink]\nbroker = \"{broker}\"\ncredentials = \"{agent}.cred\"\nkeep_alive = \"5s\"\n"
    );
    for (id, sim) in sims {
        s.push_str(&format!(
            "[[device]]\nid = \"{id}\"\nprofile = \"{}\"\ntransport = \"modbus-tcp\"\naddress = \"{}\"\npoll_interval = \"{poll}\"\n",
            sim.profile(),
            sim.addr()
        ));
    }
    s
}

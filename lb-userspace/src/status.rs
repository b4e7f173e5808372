//! `xdplb status` and `xdplb stats`: reports read from the pinned maps of a running director.

use std::{collections::BTreeMap, fmt::Write as _};

use lb_common::{reason, Counters, VipKey};
use tabled::{settings::Style, Table, Tabled};

use crate::dataplane::{addr_from_bytes, Maps, Result};

pub struct ServiceReport {
    pub key: VipKey,
    pub id: u32,
    pub mode: u8,
    pub counters: Counters,
    pub backends: Vec<BackendReport>,
}

pub struct BackendReport {
    pub id: u32,
    pub address: std::net::IpAddr,
    pub mac: [u8; 6],
    pub weight: u32,
    /// `BACKEND_F_*` bits as the controller last wrote them.
    pub flags: u8,
    pub active_flows: u64,
    pub counters: Counters,
}

fn endpoint(key: &VipKey) -> String {
    let addr = addr_from_bytes(key.addr, key.family);
    let port = u16::from_be(key.port_be);
    let proto = match key.proto {
        lb_common::IPPROTO_TCP => "tcp",
        lb_common::IPPROTO_UDP => "udp",
        _ => "?",
    };
    match addr {
        std::net::IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}

/// Everything `status` shows, read from the maps.
pub fn collect(maps: &Maps) -> Result<Vec<ServiceReport>> {
    let mut flows_per_backend: BTreeMap<u32, u64> = BTreeMap::new();
    for (_, v) in maps.flows.iter().filter_map(|r| r.ok()) {
        *flows_per_backend.entry(v.backend).or_default() += 1;
    }
    let mut services: Vec<ServiceReport> = Vec::new();
    for (key, meta) in maps.services.iter().filter_map(|r| r.ok()) {
        services.push(ServiceReport {
            key,
            id: meta.id,
            mode: meta.mode,
            counters: Maps::sum_counters(&maps.service_stats, meta.id)?,
            backends: Vec::new(),
        });
    }
    services.sort_by_key(|s| s.id);
    for id in 0..lb_common::MAX_BACKENDS {
        let b = maps.backends.get(&id, 0)?;
        if b.flags & lb_common::BACKEND_F_VALID == 0 {
            continue;
        }
        if let Some(svc) = services.iter_mut().find(|s| s.id == b.service) {
            svc.backends.push(BackendReport {
                id,
                address: addr_from_bytes(b.addr, b.family),
                mac: b.mac,
                weight: b.weight,
                flags: b.flags,
                active_flows: flows_per_backend.get(&id).copied().unwrap_or(0),
                counters: Maps::sum_counters(&maps.backend_stats, id)?,
            });
        }
    }
    Ok(services)
}

impl BackendReport {
    /// `up`, `down`, `drained` (by `xdplb drain`), `down,drained`, `removed` (gone from
    /// the config, established flows finishing); weight 0 in the config shows as `up` with
    /// weight 0.
    pub fn state(&self) -> &'static str {
        if self.flags & lb_common::BACKEND_F_RETIRED != 0 {
            return "removed";
        }
        let down = self.flags & lb_common::BACKEND_F_DOWN != 0;
        let drained = self.flags & lb_common::BACKEND_F_DRAINED != 0;
        match (down, drained) {
            (false, false) => "up",
            (true, false) => "down",
            (false, true) => "drained",
            (true, true) => "down,drained",
        }
    }
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "Prot LocalAddress:Port / -> RemoteAddress")]
    what: String,
    #[tabled(rename = "Mode")]
    mode: String,
    #[tabled(rename = "Weight")]
    weight: String,
    #[tabled(rename = "State")]
    state: String,
    #[tabled(rename = "ActiveFlows")]
    flows: String,
    #[tabled(rename = "NewFlows")]
    new_flows: u64,
    #[tabled(rename = "Packets")]
    packets: u64,
    #[tabled(rename = "Bytes")]
    bytes: u64,
}

pub fn render_status(services: &[ServiceReport]) -> String {
    let mut rows = Vec::new();
    for s in services {
        rows.push(Row {
            what: endpoint(&s.key),
            mode: match s.mode {
                lb_common::mode::DR => "dr".into(),
                lb_common::mode::TUN => "tun".into(),
                lb_common::mode::NAT => "nat".into(),
                lb_common::mode::FULLNAT => "fullnat".into(),
                m => format!("mode {m}"),
            },
            weight: String::new(),
            state: String::new(),
            flows: String::new(),
            new_flows: s.counters.new_flows,
            packets: s.counters.packets,
            bytes: s.counters.bytes,
        });
        for b in &s.backends {
            let m = b.mac;
            rows.push(Row {
                what: format!(
                    "  -> {} ({:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x})",
                    b.address, m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                mode: String::new(),
                weight: b.weight.to_string(),
                state: b.state().to_string(),
                flows: b.active_flows.to_string(),
                new_flows: b.counters.new_flows,
                packets: b.counters.packets,
                bytes: b.counters.bytes,
            });
        }
    }
    Table::new(rows).with(Style::psql()).to_string()
}

/// `xdplb stats`: per-reason packet counts (every packet lands in one) plus per service.
pub fn render_stats(maps: &Maps, json: bool) -> Result<String> {
    let totals = maps.reason_totals()?;
    let services = collect(maps)?;
    let mut out = String::new();
    if json {
        let reasons: serde_json::Map<String, serde_json::Value> = reason::NAMES
            .iter()
            .zip(&totals)
            .map(|(n, v)| (n.to_string(), (*v).into()))
            .collect();
        let services: Vec<serde_json::Value> = services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "service": endpoint(&s.key),
                    "packets": s.counters.packets,
                    "bytes": s.counters.bytes,
                    "new_flows": s.counters.new_flows,
                    "backends": s.backends.iter().map(|b| serde_json::json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "state": b.state(),
                        "packets": b.counters.packets,
                        "bytes": b.counters.bytes,
                        "new_flows": b.counters.new_flows,
                        "active_flows": b.active_flows,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let doc = serde_json::json!({ "reasons": reasons, "services": services });
        return Ok(format!("{doc}\n"));
    }
    for (name, v) in reason::NAMES.iter().zip(&totals) {
        let _ = writeln!(out, "{name:<22} {v}");
    }
    out.push('\n');
    out.push_str(&render_status(&services));
    out.push('\n');
    Ok(out)
}

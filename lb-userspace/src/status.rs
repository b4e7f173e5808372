//! `xdplb status` and `xdplb stats`: reports read from the pinned maps of a running director,
//! joined with what its controller knows (names, schedulers, health, last check).

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, time::Duration};

use lb_common::{reason, Counters, VipKey};
use serde::{Deserialize, Serialize};
use tabled::{settings::Style, Table, Tabled};

use crate::dataplane::{addr_from_bytes, Maps, Result};

pub struct ServiceReport {
    pub key: VipKey,
    pub id: u32,
    pub mode: u8,
    pub counters: Counters,
    pub backends: Vec<BackendReport>,
    /// With `ring_fast_path` (or within its hold after it was turned off): how many ring
    /// slots are dirty (take the flow table's way).
    pub dirty_slots: Option<u32>,
    /// The ring fast path is on (not only held after it was turned off).
    pub ring_fast: bool,
}

pub struct BackendReport {
    pub id: u32,
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub weight: u32,
    /// `BACKEND_F_*` bits as the controller last wrote them.
    pub flags: u8,
    pub active_flows: u64,
    pub counters: Counters,
}

/// What the controller knows beyond the maps, answered on its control socket (`view`) and
/// used by `xdplb status` and `/metrics`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct View {
    /// Config generation: 1 at start, +1 per applied reload.
    pub generation: u64,
    /// Unix time of the last reconcile that wrote to the maps (or found nothing to write).
    pub last_reconcile_unix: f64,
    pub reconcile_errors: u64,
    pub config: String,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: String,
    pub mode: String,
    pub scheduler: String,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub weight: u32,
    /// `up`, `down` or `pending` (not checked yet).
    pub health: String,
    pub drained: bool,
    pub retired: bool,
    /// The latest check, if the service has checks.
    pub last_check: Option<CheckView>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckView {
    pub ok: bool,
    pub detail: String,
    pub at_unix: f64,
}

impl View {
    /// The controller's view of the service with this key.
    pub fn service(&self, key: &VipKey) -> Option<&ServiceView> {
        let (vip, port) = (
            addr_from_bytes(key.addr, key.family),
            u16::from_be(key.port_be),
        );
        let proto = proto_name(key.proto);
        self.services
            .iter()
            .find(|s| s.vip == vip && s.port == port && s.protocol == proto)
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        lb_common::IPPROTO_TCP => "tcp",
        lb_common::IPPROTO_UDP => "udp",
        _ => "?",
    }
}

pub fn mode_name(m: u8) -> &'static str {
    match m {
        lb_common::mode::DR => "dr",
        lb_common::mode::TUN => "tun",
        lb_common::mode::NAT => "nat",
        lb_common::mode::FULLNAT => "fullnat",
        _ => "?",
    }
}

pub fn endpoint(key: &VipKey) -> String {
    let addr = addr_from_bytes(key.addr, key.family);
    let port = u16::from_be(key.port_be);
    let proto = proto_name(key.proto);
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    }
}

/// Everything the maps say; active flows are the data plane's per-backend counts.
pub fn collect(maps: &Maps) -> Result<Vec<ServiceReport>> {
    let mut services: Vec<ServiceReport> = Vec::new();
    for (key, meta) in maps.services.iter().filter_map(|r| r.ok()) {
        let dirty_slots = if meta.flags & lb_common::SERVICE_F_RING_HELD != 0 {
            let words = lb_common::RING_DIRTY_WORDS;
            let mut n = 0;
            for w in meta.id * words..(meta.id + 1) * words {
                n += maps.ring_dirty.get(&w, 0)?.count_ones();
            }
            Some(n)
        } else {
            None
        };
        services.push(ServiceReport {
            key,
            id: meta.id,
            mode: meta.mode,
            counters: Maps::sum_counters(&maps.service_stats, meta.id)?,
            backends: Vec::new(),
            dirty_slots,
            ring_fast: meta.flags & lb_common::SERVICE_F_RING_FAST != 0,
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
                active_flows: maps.active_flows(id)?,
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

/// Per-second rates between two snapshots of the counters.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    pub conn_per_s: f64,
    pub packets_per_s: f64,
    pub bytes_per_s: f64,
    pub out_packets_per_s: f64,
    pub out_bytes_per_s: f64,
}

impl Rates {
    fn between(a: &Counters, b: &Counters, dt: Duration) -> Rates {
        let s = dt.as_secs_f64().max(1e-9);
        let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / s;
        Rates {
            conn_per_s: d(a.new_flows, b.new_flows),
            packets_per_s: d(a.packets, b.packets),
            bytes_per_s: d(a.bytes, b.bytes),
            out_packets_per_s: d(a.out_packets, b.out_packets),
            out_bytes_per_s: d(a.out_bytes, b.out_bytes),
        }
    }
}

/// A status report: two snapshots `interval` apart, joined with the controller's view.
pub struct Status {
    pub services: Vec<ServiceReport>,
    pub rates: BTreeMap<(u32, Option<u32>), Rates>,
    pub view: Option<View>,
    pub interval: Duration,
}

/// Read the maps twice, `interval` apart, for rates; `view` from the controller if it runs.
pub fn status(maps: &Maps, view: Option<View>, interval: Duration) -> Result<Status> {
    let first = collect(maps)?;
    let started = std::time::Instant::now();
    std::thread::sleep(interval);
    let services = collect(maps)?;
    let dt = started.elapsed();
    let mut rates = BTreeMap::new();
    for s in &services {
        if let Some(a) = first.iter().find(|f| f.id == s.id) {
            rates.insert((s.id, None), Rates::between(&a.counters, &s.counters, dt));
            for b in &s.backends {
                if let Some(ab) = a.backends.iter().find(|x| x.id == b.id) {
                    rates.insert(
                        (s.id, Some(b.id)),
                        Rates::between(&ab.counters, &b.counters, dt),
                    );
                }
            }
        }
    }
    Ok(Status {
        services,
        rates,
        view,
        interval: dt,
    })
}

fn human(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}K", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn ago(at_unix: f64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let s = (now - at_unix).max(0.0);
    if s < 60.0 {
        format!("{s:.1}s ago")
    } else {
        format!("{:.0}m ago", s / 60.0)
    }
}

#[derive(Tabled)]
struct Row {
    #[tabled(rename = "Prot LocalAddress:Port Scheduler / -> RemoteAddress")]
    what: String,
    #[tabled(rename = "Mode")]
    mode: String,
    #[tabled(rename = "Weight")]
    weight: String,
    #[tabled(rename = "State")]
    state: String,
    #[tabled(rename = "LastCheck")]
    check: String,
    #[tabled(rename = "ActiveFlows")]
    flows: String,
    #[tabled(rename = "CPS")]
    cps: String,
    #[tabled(rename = "InPPS")]
    pps: String,
    #[tabled(rename = "InBPS")]
    bps: String,
    #[tabled(rename = "OutPPS")]
    out_pps: String,
    #[tabled(rename = "OutBPS")]
    out_bps: String,
}

/// The `ipvsadm -Ln --rate`-like table.
pub fn render_status(st: &Status) -> String {
    let mut rows = Vec::new();
    for s in &st.services {
        let sv = st.view.as_ref().and_then(|v| v.service(&s.key));
        let nat = matches!(s.mode, lb_common::mode::NAT | lb_common::mode::FULLNAT);
        let rate = |b: Option<u32>| st.rates.get(&(s.id, b)).copied().unwrap_or_default();
        let out = |v: f64| if nat { human(v) } else { "-".into() };
        let r = rate(None);
        rows.push(Row {
            what: format!(
                "{} {}{}{}",
                endpoint(&s.key),
                sv.map_or("maglev", |v| v.scheduler.as_str()),
                sv.map_or(String::new(), |v| format!(" ({})", v.name)),
                match (s.dirty_slots, s.ring_fast) {
                    (Some(n), true) => format!(", ring fast path ({n} dirty slots)"),
                    (Some(n), false) => format!(", ring fast path off, held ({n} dirty slots)"),
                    (None, _) => String::new(),
                },
            ),
            mode: mode_name(s.mode).into(),
            weight: String::new(),
            state: String::new(),
            check: String::new(),
            flows: String::new(),
            cps: human(r.conn_per_s),
            pps: human(r.packets_per_s),
            bps: human(r.bytes_per_s),
            out_pps: out(r.out_packets_per_s),
            out_bps: out(r.out_bytes_per_s),
        });
        for b in &s.backends {
            let bv = sv.and_then(|v| v.backends.iter().find(|x| x.address == b.address));
            let mut state = b.state().to_string();
            if bv.is_some_and(|x| x.health == "pending") {
                state = "pending".into();
            }
            let check = match bv.and_then(|x| x.last_check.as_ref()) {
                Some(c) if c.ok => format!("ok {}", ago(c.at_unix)),
                Some(c) => format!(
                    "FAIL {}: {}",
                    ago(c.at_unix),
                    c.detail.chars().take(64).collect::<String>()
                ),
                None if st.view.is_some() => "no check".into(),
                None => "?".into(),
            };
            let r = rate(Some(b.id));
            rows.push(Row {
                what: format!("  -> {}", b.address),
                mode: String::new(),
                weight: b.weight.to_string(),
                state,
                check,
                flows: b.active_flows.to_string(),
                cps: human(r.conn_per_s),
                pps: human(r.packets_per_s),
                bps: human(r.bytes_per_s),
                out_pps: out(r.out_packets_per_s),
                out_bps: out(r.out_bytes_per_s),
            });
        }
    }
    let mut out = Table::new(rows).with(Style::psql()).to_string();
    let _ = write!(out, "\nrates over {:.1}s; ", st.interval.as_secs_f64());
    match &st.view {
        Some(v) => {
            let _ = write!(
                out,
                "config generation {} ({}), last reconcile {}",
                v.generation,
                v.config,
                ago(v.last_reconcile_unix)
            );
        }
        None => out.push_str("no controller running: health and names unknown"),
    }
    out
}

/// `xdplb status --json`.
pub fn status_json(st: &Status) -> serde_json::Value {
    let services: Vec<serde_json::Value> = st
        .services
        .iter()
        .map(|s| {
            let sv = st.view.as_ref().and_then(|v| v.service(&s.key));
            let rate = |b: Option<u32>| st.rates.get(&(s.id, b)).copied().unwrap_or_default();
            serde_json::json!({
                "service": endpoint(&s.key),
                "name": sv.map(|v| v.name.clone()),
                "mode": mode_name(s.mode),
                "scheduler": sv.map_or("maglev".to_string(), |v| v.scheduler.clone()),
                "ring_fast_path": s.dirty_slots.map(|n| serde_json::json!({"on": s.ring_fast, "dirty_slots": n})),
                "rates": rate(None),
                "packets": s.counters.packets,
                "bytes": s.counters.bytes,
                "new_flows": s.counters.new_flows,
                "out_packets": s.counters.out_packets,
                "out_bytes": s.counters.out_bytes,
                "backends": s.backends.iter().map(|b| {
                    let bv = sv.and_then(|v| v.backends.iter().find(|x| x.address == b.address));
                    serde_json::json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "state": b.state(),
                        "health": bv.map(|x| x.health.clone()),
                        "last_check": bv.and_then(|x| x.last_check.clone()),
                        "active_flows": b.active_flows,
                        "rates": rate(Some(b.id)),
                        "packets": b.counters.packets,
                        "bytes": b.counters.bytes,
                        "new_flows": b.counters.new_flows,
                        "out_packets": b.counters.out_packets,
                        "out_bytes": b.counters.out_bytes,
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "interval_s": st.interval.as_secs_f64(),
        "controller": st.view.as_ref().map(|v| serde_json::json!({
            "generation": v.generation,
            "config": v.config,
            "last_reconcile_unix": v.last_reconcile_unix,
            "reconcile_errors": v.reconcile_errors,
        })),
        "services": services,
    })
}

/// `xdplb stats`: per-reason packet counts (every packet lands in one) plus per service
/// and backend. With `previous` (a snapshot `dt` earlier), per-second rates too.
pub fn render_stats(maps: &Maps, json: bool) -> Result<String> {
    render_stats_since(maps, json, None)
}

/// A snapshot of the reason counters, for `--watch` rates.
pub type ReasonSnapshot = (Vec<u64>, std::time::Instant);

pub fn render_stats_since(
    maps: &Maps,
    json: bool,
    previous: Option<&ReasonSnapshot>,
) -> Result<String> {
    let totals = maps.reason_totals()?;
    let services = collect(maps)?;
    let per_s: Option<Vec<f64>> = previous.map(|(prev, at)| {
        let dt = at.elapsed().as_secs_f64().max(1e-9);
        totals
            .iter()
            .zip(prev)
            .map(|(n, p)| n.saturating_sub(*p) as f64 / dt)
            .collect()
    });
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
                    "mode": mode_name(s.mode),
                    "packets": s.counters.packets,
                    "bytes": s.counters.bytes,
                    "new_flows": s.counters.new_flows,
                    "out_packets": s.counters.out_packets,
                    "out_bytes": s.counters.out_bytes,
                    "backends": s.backends.iter().map(|b| serde_json::json!({
                        "address": b.address.to_string(),
                        "weight": b.weight,
                        "state": b.state(),
                        "packets": b.counters.packets,
                        "bytes": b.counters.bytes,
                        "new_flows": b.counters.new_flows,
                        "out_packets": b.counters.out_packets,
                        "out_bytes": b.counters.out_bytes,
                        "active_flows": b.active_flows,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let mut doc = serde_json::json!({ "reasons": reasons, "services": services });
        if let Some(r) = &per_s {
            let rates: serde_json::Map<String, serde_json::Value> = reason::NAMES
                .iter()
                .zip(r)
                .map(|(n, v)| (n.to_string(), (*v).into()))
                .collect();
            doc["reasons_per_s"] = rates.into();
        }
        return Ok(format!("{doc}\n"));
    }
    for (i, (name, v)) in reason::NAMES.iter().zip(&totals).enumerate() {
        match &per_s {
            Some(r) => {
                let _ = writeln!(out, "{name:<22} {v:>14} {:>12}/s", human(r[i]));
            }
            None => {
                let _ = writeln!(out, "{name:<22} {v}");
            }
        }
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = services
        .iter()
        .flat_map(|s| {
            std::iter::once(vec![
                endpoint(&s.key),
                mode_name(s.mode).to_string(),
                String::new(),
                String::new(),
                s.counters.new_flows.to_string(),
                s.counters.packets.to_string(),
                s.counters.bytes.to_string(),
                s.counters.out_packets.to_string(),
                s.counters.out_bytes.to_string(),
            ])
            .chain(s.backends.iter().map(|b| {
                vec![
                    format!("  -> {}", b.address),
                    String::new(),
                    b.state().to_string(),
                    b.active_flows.to_string(),
                    b.counters.new_flows.to_string(),
                    b.counters.packets.to_string(),
                    b.counters.bytes.to_string(),
                    b.counters.out_packets.to_string(),
                    b.counters.out_bytes.to_string(),
                ]
            }))
        })
        .collect();
    let mut b = tabled::builder::Builder::default();
    b.push_record([
        "Service / -> Backend",
        "Mode",
        "State",
        "ActiveFlows",
        "NewFlows",
        "Packets",
        "Bytes",
        "OutPackets",
        "OutBytes",
    ]);
    for r in rows {
        b.push_record(r);
    }
    out.push_str(&b.build().with(Style::psql()).to_string());
    out.push('\n');
    Ok(out)
}

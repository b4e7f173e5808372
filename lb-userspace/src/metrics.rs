//! `/metrics` in the Prometheus text exposition format (prometheus-client), read at scrape
//! time from the pinned maps and the controller's view.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use tokio::task::JoinHandle;

use crate::{
    dataplane::Maps,
    status::{self, View},
};

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct DirectorCollector {
    pin_dir: PathBuf,
    view: Arc<Mutex<View>>,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    if let [(labels, v)] = rows {
        if labels.is_empty() {
            // Unlabelled: `name value`, not `name{} value`.
            return ConstCounter::new(*v).encode(m);
        }
    }
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    if let [(labels, v)] = rows {
        if labels.is_empty() {
            // Unlabelled: `name value`, not `name{} value`.
            return ConstGauge::new(*v).encode(m);
        }
    }
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn l(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

impl Collector for DirectorCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.view.lock().map(|v| v.clone()).unwrap_or_default();
        gauge(
            &mut enc,
            "xdplb_config_generation",
            "Configuration generation: 1 at start, +1 per applied reload.",
            &[(vec![], view.generation as f64)],
        )?;
        gauge(
            &mut enc,
            "xdplb_last_reconcile_timestamp_seconds",
            "Unix time of the controller's last successful reconcile.",
            &[(vec![], view.last_reconcile_unix)],
        )?;
        counter(
            &mut enc,
            "xdplb_reconcile_errors",
            "Reconciles that failed to write the maps.",
            &[(vec![], view.reconcile_errors)],
        )?;
        // Counters come from the maps; a scrape while no director is pinned has none.
        let Ok(maps) = Maps::from_pins(&self.pin_dir) else {
            return Ok(());
        };
        let Ok(services) = status::collect(&maps) else {
            return Ok(());
        };
        if let Ok(totals) = maps.reason_totals() {
            let rows: Vec<(Labels, u64)> = lb_common::reason::NAMES
                .iter()
                .zip(totals)
                .map(|(n, v)| (l(&[("reason", n.to_string())]), v))
                .collect();
            counter(
                &mut enc,
                "xdplb_packets",
                "Packets by what the data plane did with them (fwd_*) or why it passed or dropped them.",
                &rows,
            )?;
        }
        let mut svc_rows: [Vec<(Labels, u64)>; 5] = Default::default();
        let mut be_rows: [Vec<(Labels, u64)>; 5] = Default::default();
        let mut up_rows = Vec::new();
        let mut weight_rows = Vec::new();
        let mut flow_rows = Vec::new();
        let mut dirty_rows = Vec::new();
        for s in &services {
            let ep = status::endpoint(&s.key);
            let sv = view.service(&s.key);
            let name = sv.map_or(String::new(), |v| v.name.clone());
            let sl = l(&[
                ("service", name.clone()),
                ("vip", ep.clone()),
                ("mode", status::mode_name(s.mode).to_string()),
            ]);
            let c = &s.counters;
            for (i, v) in [c.packets, c.bytes, c.new_flows, c.out_packets, c.out_bytes]
                .into_iter()
                .enumerate()
            {
                svc_rows[i].push((sl.clone(), v));
            }
            if let Some(n) = s.dirty_slots {
                dirty_rows.push((sl.clone(), f64::from(n)));
            }
            for b in &s.backends {
                let bl = l(&[
                    ("service", name.clone()),
                    ("vip", ep.clone()),
                    ("backend", b.address.to_string()),
                ]);
                let c = &b.counters;
                for (i, v) in [c.packets, c.bytes, c.new_flows, c.out_packets, c.out_bytes]
                    .into_iter()
                    .enumerate()
                {
                    be_rows[i].push((bl.clone(), v));
                }
                let bv = sv.and_then(|v| v.backends.iter().find(|x| x.address == b.address));
                let up =
                    b.flags & lb_common::BACKEND_F_DOWN == 0 && bv.is_none_or(|x| x.health == "up");
                up_rows.push((bl.clone(), if up { 1.0 } else { 0.0 }));
                weight_rows.push((bl.clone(), f64::from(b.weight)));
                flow_rows.push((bl, b.active_flows as f64));
            }
        }
        let names = [
            ("packets", "Client packets forwarded"),
            ("bytes", "Client bytes forwarded"),
            ("flows", "New flows scheduled"),
            (
                "reply_packets",
                "Backend reply packets forwarded (NAT modes)",
            ),
            ("reply_bytes", "Backend reply bytes forwarded (NAT modes)"),
        ];
        for (i, (n, help)) in names.iter().enumerate() {
            counter(
                &mut enc,
                &format!("xdplb_service_{n}"),
                &format!("{help}, per service."),
                &svc_rows[i],
            )?;
            counter(
                &mut enc,
                &format!("xdplb_backend_{n}"),
                &format!("{help}, per backend."),
                &be_rows[i],
            )?;
        }
        gauge(
            &mut enc,
            "xdplb_backend_up",
            "1 if the backend's health check passes (or it has none), 0 if down or not checked yet.",
            &up_rows,
        )?;
        gauge(
            &mut enc,
            "xdplb_backend_weight",
            "Configured weight (0 = drained).",
            &weight_rows,
        )?;
        gauge(
            &mut enc,
            "xdplb_backend_active_flows",
            "Active flows (the data plane's count: +1 per new flow, -1 at FIN/RST/close; corrected from the flow table every 5 s).",
            &flow_rows,
        )?;
        if !dirty_rows.is_empty() {
            gauge(
                &mut enc,
                "xdplb_service_ring_dirty_slots",
                "Ring fast path: Maglev slots still dirty after a backend change. Their packets consult the flow table, and connections it lacks go to the slot's held (old) backend, until ring_fast_path_hold has passed and no flow there disagrees with the ring.",
                &dirty_rows,
            )?;
        }
        Ok(())
    }
}

/// Render the exposition text once (also used by tests).
pub fn render(pin_dir: PathBuf, view: Arc<Mutex<View>>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(DirectorCollector { pin_dir, view }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

/// Serve `GET /metrics` on `addr` until the task is aborted.
pub fn serve(
    addr: SocketAddr,
    pin_dir: PathBuf,
    view: Arc<Mutex<View>>,
) -> anyhow::Result<JoinHandle<()>> {
    use anyhow::Context as _;
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("metrics.listen: cannot listen on {addr}"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (pin_dir, view) = (pin_dir.clone(), view.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (pin_dir, view) = (pin_dir.clone(), view.clone());
                        async move {
                            let (status, body, ctype) = if req.uri().path() == "/metrics" {
                                (
                                    200,
                                    render(pin_dir, view),
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                            } else {
                                (404, "try /metrics\n".to_string(), "text/plain")
                            };
                            hyper::Response::builder()
                                .status(status)
                                .header(hyper::header::CONTENT_TYPE, ctype)
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}

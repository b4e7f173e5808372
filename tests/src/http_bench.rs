//! HTTP requests/s through the VIP for `cargo xtask bench`: wrk in the client namespace,
//! small keep-alive HTTP servers (hyper) in three backend namespaces of a NAT lab
//! ([`Topology::nat`]), and in the director's namespace, one after the other: xdplb in NAT
//! mode, nftables DNAT with `numgen`, and HAProxy in `mode tcp`. Every contender gets the
//! same VIP, backends and wrk command; a run with socket errors or non-2xx answers fails
//! the bench instead of being reported.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use crate::{
    median, min_max,
    netns::{self, in_netns, sh, wait_for, ConfigFile, NftDnat, Topology, VIP4},
};

const PORT: u16 = 80;
/// wrk's connections (keep-alive) and threads.
const CONNECTIONS: &str = "32";
const THREADS: &str = "2";

/// A keep-alive HTTP/1.1 server answering every request with a short body; stops on drop.
struct HttpServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    fn start(ns: &str, name: &str) -> HttpServer {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
        let body = format!("hello from {name}\n");
        let thread = in_netns(ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT);
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                ready_tx.send(()).expect("ready");
                let mut stop_rx = stop_rx;
                loop {
                    tokio::select! {
                        _ = &mut stop_rx => break,
                        accepted = listener.accept() => {
                            let Ok((stream, _)) = accepted else { continue };
                            let body = body.clone();
                            tokio::spawn(async move {
                                let service = hyper::service::service_fn(move |_req| {
                                    let body = body.clone();
                                    async move {
                                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                            http_body_util::Full::new(hyper::body::Bytes::from(body)),
                                        ))
                                    }
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                    .await;
                            });
                        }
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("HTTP server bound");
        HttpServer {
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
pub enum Peer {
    Xdplb,
    Nft,
    Haproxy,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Xdplb => "xdplb NAT",
            Peer::Nft => "nftables DNAT (numgen)",
            Peer::Haproxy => "HAProxy mode tcp",
        }
    }
}

pub struct HttpRow {
    pub peer: Peer,
    pub requests_per_s: Vec<f64>,
}

fn backends() -> Vec<String> {
    (0..3).map(netns::tun_backend4).collect()
}

fn xdplb_config() -> String {
    let mut cfg = format!(
        "interfaces:\n  - {{name: eth0, xdp_mode: native}}\n  - {{name: eth1, xdp_mode: native}}\nservices:\n  - name: http\n    vip: {VIP4}\n    port: {PORT}\n    protocol: tcp\n    mode: nat\n    backends:\n"
    );
    for b in backends() {
        cfg += &format!("      - address: {b}\n");
    }
    cfg
}

fn haproxy_config() -> String {
    let mut cfg = format!(
        "global\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend http\n  bind {VIP4}:{PORT}\n  default_backend servers\nbackend servers\n  balance roundrobin\n"
    );
    for (i, b) in backends().iter().enumerate() {
        cfg += &format!("  server b{i} {b}:{PORT}\n");
    }
    cfg
}

/// One wrk run of `seconds` from the client namespace; requests/s.
fn wrk(topo: &Topology, seconds: u32) -> f64 {
    let out = sh(&[
        "ip",
        "netns",
        "exec",
        &topo.ns("cl"),
        "wrk",
        "-t",
        THREADS,
        "-c",
        CONNECTIONS,
        "-d",
        &format!("{seconds}s"),
        &format!("http://{VIP4}:{PORT}/"),
    ]);
    parse_wrk(&out).unwrap_or_else(|e| panic!("wrk: {e}\n{out}"))
}

/// Requests/s from wrk's output; an error if any request failed.
pub fn parse_wrk(out: &str) -> Result<f64, String> {
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        return Err(format!("failed requests: {}", line.trim()));
    }
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| "no `Requests/sec:` line".to_string())
}

/// Wait until one request through the VIP is answered.
fn reachable(topo: &Topology) {
    let ns = topo.ns("cl");
    wait_for("an answer through the VIP", Duration::from_secs(20), || {
        let ns = ns.clone();
        in_netns(&ns, || {
            let addr = SocketAddr::new(VIP4.parse().expect("vip"), PORT);
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        })
        .join()
        .unwrap_or(false)
    });
}

fn measure(topo: &Topology, peer: Peer, runs: usize, seconds: u32) -> HttpRow {
    reachable(topo);
    // Warm-up (ARP, conntrack, HAProxy's first connections).
    wrk(topo, 1);
    HttpRow {
        peer,
        requests_per_s: (0..runs).map(|_| wrk(topo, seconds)).collect(),
    }
}

/// Requests/s through the VIP for each peer (`runs` wrk runs each).
pub fn rows(quick: bool) -> Vec<HttpRow> {
    let (runs, seconds) = if quick { (2, 1) } else { (5, 5) };
    let xdplb = netns::xdplb_binary();
    let prefix = format!("bh{}", std::process::id());
    let mut topo = Topology::nat(&prefix, 3, false);
    topo.attach_pass_on(&xdplb, "dir");
    topo.attach_pass_on(&xdplb, "dir-eth1");
    let _servers: Vec<HttpServer> = (0..3)
        .map(|i| {
            let name = Topology::backend_name(i);
            HttpServer::start(&topo.ns(&name), &name)
        })
        .collect();
    let mut out = Vec::new();

    let file = ConfigFile::new(&prefix, &xdplb_config());
    topo.start_director(&xdplb, file.path());
    out.push(measure(&topo, Peer::Xdplb, runs, seconds));
    assert!(topo.stop_director(), "xdplb run exited cleanly");

    let backends = backends();
    let targets: Vec<&str> = backends.iter().map(String::as_str).collect();
    let nft = NftDnat::new(&topo.ns("dir"), "xdplb_bench_http", VIP4, PORT, &targets);
    out.push(measure(&topo, Peer::Nft, runs, seconds));
    drop(nft);

    // HAProxy terminates TCP on the VIP: the director owns the address for this run.
    topo.ip("dir", &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    let cfg = ConfigFile::new(&format!("{prefix}-haproxy"), &haproxy_config());
    let haproxy = topo.spawn_in(
        "dir",
        Path::new("/usr/sbin/haproxy"),
        &["-q", "-db", "-f", cfg.path().to_str().expect("utf-8")],
    );
    out.push(measure(&topo, Peer::Haproxy, runs, seconds));
    topo.stop_child(haproxy);
    topo.ip("dir", &["addr", "del", &format!("{VIP4}/32"), "dev", "lo"]);
    out
}

/// The requests/s table (markdown) with each peer's ratio to xdplb.
pub fn report(rows: &[HttpRow]) -> String {
    let xdplb = rows
        .iter()
        .find(|r| r.peer == Peer::Xdplb)
        .map(|r| median(&r.requests_per_s))
        .unwrap_or(f64::NAN);
    let mut out = format!(
        "\n| HTTP through the VIP (wrk -t{THREADS} -c{CONNECTIONS}, keep-alive) | requests/s (median) | min–max | xdplb / this |\n|---|---:|---:|---:|\n"
    );
    for r in rows {
        let m = median(&r.requests_per_s);
        let (min, max) = min_max(&r.requests_per_s);
        out.push_str(&format!(
            "| {} | {m:.0} | {min:.0}–{max:.0} | {:.2} |\n",
            r.peer.name(),
            xdplb / m
        ));
    }
    out
}

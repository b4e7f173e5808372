//! Health checks: one tokio task per (service, backend), each with its own rise/fall
//! counters, reporting every result to the reconciler over a channel.
//!
//! Checks run from the director toward the backend's own address (see the README for what
//! that proves in DR and TUN mode, where clients reach the backend through the VIP).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use tokio::{io::AsyncReadExt as _, net::TcpStream, sync::mpsc, task::JoinHandle};

use crate::config::{CheckKind, HealthCheck, Protocol};

/// A backend of a service: what the reconciler and the checks know it by across reloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub address: IpAddr,
}

impl BackendKey {
    pub fn new(service: (IpAddr, u16, Protocol), address: IpAddr) -> Self {
        BackendKey {
            vip: service.0,
            port: service.1,
            proto: service.2.number(),
            address,
        }
    }
}

/// Every backend of `cfg`, in config order.
pub fn backend_keys(cfg: &crate::config::Config) -> Vec<BackendKey> {
    cfg.services
        .iter()
        .flat_map(|s| {
            s.backends
                .iter()
                .map(|b| BackendKey::new(s.endpoint(), b.address))
        })
        .collect()
}

impl std::fmt::Display for BackendKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = if self.proto == lb_common::IPPROTO_TCP {
            "tcp"
        } else {
            "udp"
        };
        match self.vip {
            IpAddr::V4(v) => write!(f, "{v}:{}/{proto} -> {}", self.port, self.address),
            IpAddr::V6(v) => write!(f, "[{v}]:{}/{proto} -> {}", self.port, self.address),
        }
    }
}

/// A backend's health as the reconciler uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Not checked yet (a backend the director has not seen before): out of the ring until
    /// its first check passes.
    Pending,
    Up,
    Down,
}

/// One check result, with the state it leads to after rise/fall.
#[derive(Clone, Debug)]
pub struct Report {
    pub key: BackendKey,
    pub state: State,
    pub ok: bool,
    /// What happened (e.g. "connect: Connection refused").
    pub detail: String,
    pub at: SystemTime,
}

/// Run one check with the configured timeout.
pub async fn check_once(hc: &HealthCheck, address: IpAddr, port: u16) -> Result<(), String> {
    match tokio::time::timeout(hc.timeout, probe(hc, address, port)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", hc.timeout)),
    }
}

async fn probe(hc: &HealthCheck, address: IpAddr, port: u16) -> Result<(), String> {
    let target = SocketAddr::new(address, port);
    match hc.kind {
        CheckKind::None => Ok(()),
        CheckKind::Tcp => TcpStream::connect(target)
            .await
            .map(drop)
            .map_err(|e| format!("connect {target}: {e}")),
        CheckKind::Http => http(hc, target).await,
        CheckKind::Udp => udp(hc, target).await,
        CheckKind::Exec => exec(hc, address, port).await,
    }
}

async fn http(hc: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    let stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect {target}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("http handshake with {target}: {e}"))?;
    // The connection task ends with the request (or with the timeout dropping us).
    let conn = tokio::spawn(conn);
    let path = hc.path.as_deref().unwrap_or("/");
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::USER_AGENT, "xdplb-health-check")
        .header(hyper::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let res = sender.send_request(req).await;
    conn.abort();
    let res = res.map_err(|e| format!("GET {path} from {target}: {e}"))?;
    let want = hc.expect_status.unwrap_or(200);
    if res.status().as_u16() == want {
        Ok(())
    } else {
        Err(format!(
            "GET {path} from {target}: status {} (want {want})",
            res.status().as_u16()
        ))
    }
}

async fn udp(hc: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    let any: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(any)
        .await
        .map_err(|e| format!("udp socket: {e}"))?;
    // Connected: an ICMP port unreachable fails the receive at once.
    sock.connect(target)
        .await
        .map_err(|e| format!("udp {target}: {e}"))?;
    sock.send(hc.payload.as_deref().unwrap_or("").as_bytes())
        .await
        .map_err(|e| format!("udp send to {target}: {e}"))?;
    let mut buf = vec![0u8; 2048];
    let n = sock
        .recv(&mut buf)
        .await
        .map_err(|e| format!("udp reply from {target}: {e}"))?;
    match &hc.expect {
        Some(want) if !String::from_utf8_lossy(&buf[..n]).contains(want.as_str()) => {
            Err(format!("udp reply from {target} does not contain `{want}`"))
        }
        _ => Ok(()),
    }
}

async fn exec(hc: &HealthCheck, address: IpAddr, port: u16) -> Result<(), String> {
    let args: Vec<String> = hc
        .command
        .iter()
        .map(|a| {
            a.replace("{address}", &address.to_string())
                .replace("{port}", &port.to_string())
        })
        .collect();
    let mut child = tokio::process::Command::new(&args[0])
        .args(&args[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // A timed-out check is killed (the future holding it is dropped).
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("running {}: {e}", args[0]))?;
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    let status = child
        .wait()
        .await
        .map_err(|e| format!("waiting for {}: {e}", args[0]))?;
    if status.success() {
        Ok(())
    } else {
        let stderr = stderr.trim();
        Err(format!(
            "{} exited with {status}{}{}",
            args[0],
            if stderr.is_empty() { "" } else { ": " },
            stderr.chars().take(200).collect::<String>()
        ))
    }
}

/// Rise/fall bookkeeping of one backend.
#[derive(Clone, Debug)]
pub struct Counter {
    pub state: State,
    successes: u32,
    failures: u32,
}

impl Counter {
    pub fn new(state: State) -> Self {
        Counter {
            state,
            successes: 0,
            failures: 0,
        }
    }

    /// Count one result; returns the (possibly new) state. A pending backend takes the
    /// first result as it is.
    pub fn record(&mut self, ok: bool, hc: &HealthCheck) -> State {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        self.state = match (self.state, ok) {
            (State::Pending, true) => State::Up,
            (State::Pending, false) => State::Down,
            (State::Down, true) if self.successes >= hc.rise => State::Up,
            (State::Up, false) if self.failures >= hc.fall => State::Down,
            (s, _) => s,
        };
        self.state
    }
}

/// Start checking one backend every `interval` (±10 % jitter, so a director's checks do
/// not hit backends in lockstep). A pending backend is checked at once; others after a
/// random part of one interval.
pub fn spawn(
    key: BackendKey,
    hc: HealthCheck,
    port: u16,
    initial: State,
    tx: mpsc::UnboundedSender<Report>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut counter = Counter::new(initial);
        if initial != State::Pending {
            tokio::time::sleep(hc.interval.mul_f64(fastrand::f64())).await;
        }
        loop {
            let started = tokio::time::Instant::now();
            let result = check_once(&hc, key.address, port).await;
            let state = counter.record(result.is_ok(), &hc);
            let report = Report {
                key,
                state,
                ok: result.is_ok(),
                detail: result.err().unwrap_or_else(|| "ok".into()),
                at: SystemTime::now(),
            };
            if tx.send(report).is_err() {
                return;
            }
            let jitter = hc.interval.mul_f64(0.9 + 0.2 * fastrand::f64());
            tokio::time::sleep_until(started + jitter.max(Duration::from_millis(10))).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(kind: CheckKind) -> HealthCheck {
        HealthCheck {
            kind,
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(150),
            rise: 2,
            fall: 3,
            port: None,
            path: None,
            expect_status: None,
            payload: None,
            expect: None,
            command: Vec::new(),
        }
    }

    #[test]
    fn rise_and_fall_count_consecutive_results() {
        let h = hc(CheckKind::Tcp);
        let mut c = Counter::new(State::Up);
        assert_eq!(c.record(false, &h), State::Up);
        assert_eq!(c.record(false, &h), State::Up);
        assert_eq!(
            c.record(true, &h),
            State::Up,
            "a success resets the failures"
        );
        assert_eq!(c.record(false, &h), State::Up);
        assert_eq!(c.record(false, &h), State::Up);
        assert_eq!(c.record(false, &h), State::Down, "fall = 3");
        assert_eq!(c.record(true, &h), State::Down);
        assert_eq!(c.record(true, &h), State::Up, "rise = 2");
        let mut p = Counter::new(State::Pending);
        assert_eq!(
            p.record(true, &h),
            State::Up,
            "pending takes the first result"
        );
        let mut p = Counter::new(State::Pending);
        assert_eq!(p.record(false, &h), State::Down);
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn tcp_http_udp_and_exec_checks_tell_up_from_down() {
        rt().block_on(async {
            let lo: IpAddr = "127.0.0.1".parse().unwrap();
            // TCP: a listener vs a closed port.
            let l = tokio::net::TcpListener::bind((lo, 0)).await.unwrap();
            let open = l.local_addr().unwrap().port();
            let closed = {
                let t = std::net::TcpListener::bind((lo, 0)).unwrap();
                t.local_addr().unwrap().port()
            };
            assert!(check_once(&hc(CheckKind::Tcp), lo, open).await.is_ok());
            let e = check_once(&hc(CheckKind::Tcp), lo, closed)
                .await
                .unwrap_err();
            assert!(e.contains("refused"), "{e}");

            // HTTP: a tiny server answering 200 on /healthz and 503 elsewhere.
            let hl = tokio::net::TcpListener::bind((lo, 0)).await.unwrap();
            let hport = hl.local_addr().unwrap().port();
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                loop {
                    let (mut s, _) = hl.accept().await.unwrap();
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap();
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /healthz ") {
                        "200 OK"
                    } else {
                        "503 Service Unavailable"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                }
            });
            let mut h = hc(CheckKind::Http);
            h.path = Some("/healthz".into());
            assert_eq!(check_once(&h, lo, hport).await, Ok(()));
            h.path = Some("/other".into());
            let e = check_once(&h, lo, hport).await.unwrap_err();
            assert!(e.contains("status 503"), "{e}");
            h.expect_status = Some(503);
            assert_eq!(check_once(&h, lo, hport).await, Ok(()));

            // UDP: an echo server; a closed port fails fast (ICMP unreachable).
            let u = tokio::net::UdpSocket::bind((lo, 0)).await.unwrap();
            let uport = u.local_addr().unwrap().port();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                loop {
                    let (n, from) = u.recv_from(&mut buf).await.unwrap();
                    let _ = u.send_to(&buf[..n], from).await;
                }
            });
            let mut h = hc(CheckKind::Udp);
            h.payload = Some("ping".into());
            assert_eq!(check_once(&h, lo, uport).await, Ok(()));
            h.expect = Some("pong".into());
            assert!(check_once(&h, lo, uport).await.is_err());
            let closed_udp = {
                let t = std::net::UdpSocket::bind((lo, 0)).unwrap();
                t.local_addr().unwrap().port()
            };
            assert!(check_once(&hc(CheckKind::Udp), lo, closed_udp)
                .await
                .is_err());

            // exec: placeholders are substituted; the exit code decides; a slow command
            // times out.
            let mut h = hc(CheckKind::Exec);
            h.command = vec![
                "sh".into(),
                "-c".into(),
                "test \"$0:$1\" = 127.0.0.1:8080".into(),
                "{address}".into(),
                "{port}".into(),
            ];
            assert_eq!(check_once(&h, lo, 8080).await, Ok(()));
            assert!(check_once(&h, lo, 8081).await.is_err());
            h.command = vec!["sleep".into(), "5".into()];
            let e = check_once(&h, lo, 1).await.unwrap_err();
            assert!(e.contains("no answer within"), "{e}");
        });
    }
}

//! Continuous client load for failover, reload and restart tests: long-lived TCP
//! connections that exchange data every 50 ms (every byte checked) plus a new connection
//! every 20 ms, against echo servers that can stop accepting (as a crashed service does)
//! while their established connections live on.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::in_netns;

/// Port of the echo service (greeting line with the backend's name, then echo).
pub const ECHO_PORT: u16 = 9000;
/// Long-lived connections of a [`Load`].
pub const LONG_LIVED: usize = 20;
const EXCHANGE_EVERY: Duration = Duration::from_millis(50);
const NEW_EVERY: Duration = Duration::from_millis(20);
const MESSAGE: usize = 64;

/// An echo server in a backend namespace on 0.0.0.0:[`ECHO_PORT`] (so it answers on the VIP
/// held on `lo` and on the backend's own address, where health checks go).
pub struct EchoServer {
    accepting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str, name: &str) -> EchoServer {
        let accepting = Arc::new(AtomicBool::new(true));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, n) = (accepting.clone(), stop.clone(), name.to_string());
        let bound = Arc::new(AtomicBool::new(false));
        let b = bound.clone();
        let thread = in_netns(ns, move || serve(&n, &a, &s, &b));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !bound.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "echo server {name} did not bind");
            std::thread::sleep(Duration::from_millis(5));
        }
        EchoServer {
            accepting,
            stop,
            thread: Some(thread),
        }
    }

    /// Close (false) or reopen (true) the listening socket; established connections stay.
    pub fn set_accepting(&self, on: bool) {
        self.accepting.store(on, Ordering::SeqCst);
        // Let the listener thread act on it (it polls every few ms).
        std::thread::sleep(Duration::from_millis(30));
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(name: &str, accepting: &AtomicBool, stop: &Arc<AtomicBool>, bound: &AtomicBool) {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), ECHO_PORT);
    let mut listener: Option<TcpListener> = None;
    let mut conns = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if accepting.load(Ordering::SeqCst) {
            if listener.is_none() {
                let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                l.set_nonblocking(true).expect("nonblocking");
                listener = Some(l);
                bound.store(true, Ordering::SeqCst);
            }
            match listener.as_ref().expect("bound").accept() {
                Ok((s, _)) => {
                    let (n, stop) = (name.to_string(), stop.clone());
                    conns.push(std::thread::spawn(move || echo(s, &n, &stop)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        } else {
            // Closing the listener: new connections are refused, as with a stopped service.
            listener = None;
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    for c in conns {
        let _ = c.join();
    }
}

fn echo(mut s: TcpStream, name: &str, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    if s.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// One new connection's outcome: when (since the load started) and which backend answered.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub at: Duration,
    pub result: Result<String, String>,
}

/// A long-lived connection's life.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub backend: String,
    pub bytes_sent: u64,
    pub bytes_verified: u64,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub attempts: Vec<Attempt>,
    pub sessions: Vec<Session>,
}

impl LoadReport {
    /// New connections that failed: (time, error).
    pub fn failed_attempts(&self) -> Vec<(Duration, String)> {
        self.attempts
            .iter()
            .filter_map(|a| a.result.as_ref().err().map(|e| (a.at, e.clone())))
            .collect()
    }

    /// Long-lived connections that broke: (backend, error).
    pub fn broken_sessions(&self) -> Vec<(String, String)> {
        self.sessions
            .iter()
            .filter_map(|s| s.error.as_ref().map(|e| (s.backend.clone(), e.clone())))
            .collect()
    }

    pub fn lost_bytes(&self) -> u64 {
        self.sessions
            .iter()
            .map(|s| s.bytes_sent - s.bytes_verified)
            .sum()
    }

    /// Successful new connections per backend at or after `from`.
    pub fn served_since(&self, from: Duration) -> std::collections::BTreeMap<String, usize> {
        let mut out = std::collections::BTreeMap::new();
        for a in self.attempts.iter().filter(|a| a.at >= from) {
            if let Ok(b) = &a.result {
                *out.entry(b.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    pub fn summary(&self) -> String {
        format!(
            "{} new connections ({} failed, first failures: {:?}); {} long-lived ({} broken: {:?}); \
             {} bytes lost",
            self.attempts.len(),
            self.failed_attempts().len(),
            self.failed_attempts().iter().take(3).collect::<Vec<_>>(),
            self.sessions.len(),
            self.broken_sessions().len(),
            self.broken_sessions().iter().take(3).collect::<Vec<_>>(),
            self.lost_bytes()
        )
    }
}

/// [`LONG_LIVED`] long-lived connections plus a new connection every 20 ms, from namespace
/// `ns` to `target`, until [`Load::stop`] (bounded: at most `max` total).
pub struct Load {
    started: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    report: Arc<Mutex<LoadReport>>,
    /// Long-lived connections that have read their greeting.
    established: Arc<AtomicUsize>,
}

impl Load {
    pub fn start(ns: &str, target: SocketAddr, max: Duration) -> Load {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(LoadReport::default()));
        let established = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for i in 0..LONG_LIVED {
            let (stop, report, up) = (stop.clone(), report.clone(), established.clone());
            threads.push(in_netns(ns, move || {
                let s = long_lived(target, i, &stop, started + max, &up);
                report.lock().expect("report").sessions.push(s);
            }));
        }
        let (st, rep) = (stop.clone(), report.clone());
        threads.push(in_netns(ns, move || {
            let mut next = Instant::now();
            while !st.load(Ordering::SeqCst) && Instant::now() < started + max {
                let at = started.elapsed();
                // A failure says how long it took: a refusal is immediate, a lost SYN or
                // greeting takes the timeout.
                let result = short(target).map_err(|e| {
                    format!("{e} (after {} ms)", (started.elapsed() - at).as_millis())
                });
                rep.lock()
                    .expect("report")
                    .attempts
                    .push(Attempt { at, result });
                next += NEW_EVERY;
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }));
        let load = Load {
            started,
            stop,
            threads,
            report,
            established,
        };
        // Every long-lived connection is up before the caller disturbs anything.
        let deadline = Instant::now() + Duration::from_secs(5);
        while load.established() < LONG_LIVED {
            assert!(
                Instant::now() < deadline,
                "long-lived connections did not come up: {}",
                load.report.lock().expect("report").summary()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        load
    }

    fn established(&self) -> usize {
        self.established.load(Ordering::SeqCst)
    }

    /// Time since the load started (the time base of [`Attempt::at`]).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load thread");
        }
        std::mem::take(&mut *self.report.lock().expect("report"))
    }
}

fn connect(target: SocketAddr) -> std::io::Result<(BufReader<TcpStream>, String)> {
    let s = TcpStream::connect_timeout(&target, Duration::from_millis(1000))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s);
    let mut name = String::new();
    r.read_line(&mut name)?;
    if name.is_empty() {
        return Err(std::io::Error::other("closed before the greeting"));
    }
    Ok((r, name.trim().to_string()))
}

fn short(target: SocketAddr) -> Result<String, String> {
    connect(target)
        .map(|(_, name)| name)
        .map_err(|e| e.to_string())
}

fn long_lived(
    target: SocketAddr,
    i: usize,
    stop: &AtomicBool,
    until: Instant,
    up: &AtomicUsize,
) -> Session {
    let mut session = Session::default();
    let (mut r, name) = match connect(target) {
        Ok(x) => x,
        Err(e) => {
            session.error = Some(format!("connect: {e}"));
            return session;
        }
    };
    session.backend = name;
    up.fetch_add(1, Ordering::SeqCst);
    let mut seq = 0u64;
    while !stop.load(Ordering::SeqCst) && Instant::now() < until {
        let mut msg = [0u8; MESSAGE];
        for (j, b) in msg.iter_mut().enumerate() {
            *b = (i as u64 * 131 + seq * 7 + j as u64) as u8;
        }
        seq += 1;
        if let Err(e) = r.get_mut().write_all(&msg) {
            session.error = Some(format!("send: {e}"));
            return session;
        }
        session.bytes_sent += MESSAGE as u64;
        let mut back = [0u8; MESSAGE];
        if let Err(e) = r.read_exact(&mut back) {
            session.error = Some(format!(
                "receive after {} bytes: {e}",
                session.bytes_verified
            ));
            return session;
        }
        if back != msg {
            session.error = Some("echo differs".into());
            return session;
        }
        session.bytes_verified += MESSAGE as u64;
        std::thread::sleep(EXCHANGE_EVERY);
    }
    session
}

//! Network-namespace topologies for end-to-end tests and the demo. Everything a
//! [`DrTopology`] creates (namespaces, the director process, its pins) it deletes on drop;
//! nothing else is touched. Addresses come only from 198.18.0.0/15 and 2001:db8::/32.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Run a command; panic with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` on a thread that has entered network namespace `ns`; sockets it opens live there.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid netns fd; setns only affects this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
        f()
    })
}

/// The DR topology: a client, a director and `n` backends on one bridge (in a switch
/// namespace). The VIP is routed by the client to the director; backends hold it on `lo`
/// with `arp_ignore=1`/`arp_announce=2`, as LVS DR wants.
pub struct DrTopology {
    pub prefix: String,
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Index in `children` of the running `xdplb run`.
    director: Option<usize>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    pub pin_dir: PathBuf,
    pub backends: usize,
}

pub const VIP4: &str = "198.18.100.100";
pub const VIP6: &str = "2001:db8:100::100";
pub const DIRECTOR4: &str = "198.18.0.3";
pub const DIRECTOR6: &str = "2001:db8:1::3";
pub const CLIENT4: &str = "198.18.0.2";
pub const CLIENT6: &str = "2001:db8:1::2";
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;

pub fn backend4(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}
pub fn backend6(i: usize) -> String {
    format!("2001:db8:1::{}", 11 + i)
}

impl DrTopology {
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn backend_name(i: usize) -> String {
        format!("b{}", i + 1)
    }

    /// Build the namespaces and links. `prefix` must be unique among live topologies.
    pub fn new(prefix: &str, backends: usize) -> DrTopology {
        let mut t = DrTopology {
            prefix: prefix.to_string(),
            namespaces: Vec::new(),
            children: Vec::new(),
            director: None,
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/xdplb-{prefix}")),
            backends,
        };
        let sw = t.ns("sw");
        t.add_ns(&sw);
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"]);
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"]);
        let mut hosts = vec![("cl".to_string(), CLIENT4.to_string(), CLIENT6.to_string())];
        hosts.push(("dir".into(), DIRECTOR4.into(), DIRECTOR6.into()));
        for i in 0..backends {
            hosts.push((Self::backend_name(i), backend4(i), backend6(i)));
        }
        for (host, a4, a6) in &hosts {
            let ns = t.ns(host);
            t.add_ns(&ns);
            sh(&[
                "ip", "-n", &sw, "link", "add", host, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ]);
            sh(&["ip", "-n", &sw, "link", "set", host, "master", "br0", "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a4}/24"),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
            // The local stack leaves checksums to the NIC; XDP forwards them unfinished (PITFALLS.md).
            sh(&[
                "ip", "netns", "exec", &ns, "ethtool", "-K", "eth0", "tx", "off",
            ]);
        }
        let cl = t.ns("cl");
        sh(&[
            "ip",
            "-n",
            &cl,
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            DIRECTOR4,
        ]);
        sh(&[
            "ip",
            "-n",
            &cl,
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            DIRECTOR6,
        ]);
        for i in 0..backends {
            let ns = t.ns(&Self::backend_name(i));
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{VIP4}/32"),
                "dev",
                "lo",
            ]);
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{VIP6}/128"),
                "dev",
                "lo",
            ]);
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
            ] {
                sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "sysctl",
                    "-qw",
                    &format!("{k}={v}"),
                ]);
            }
        }
        t
    }

    fn add_ns(&mut self, ns: &str) {
        sh(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
    }

    /// Keep `child` running until the topology is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// `xdplb pass` on the switch side of the director's link: `XDP_TX` from the director
    /// is only delivered into a veth whose peer runs XDP.
    pub fn attach_pass(&mut self, xdplb: &Path) {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns("sw")))
            .arg(xdplb)
            .args(["pass", "--iface", "dir"])
            .spawn()
            .expect("spawn xdplb pass");
        self.adopt(child);
        let sw = self.ns("sw");
        wait_for(
            "pass-through XDP on the switch port",
            Duration::from_secs(10),
            || sh(&["ip", "-n", &sw, "-d", "link", "show", "dir"]).contains("xdp"),
        );
    }

    /// The shipped config that matches this topology (three backends).
    pub fn demo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.yaml")
    }

    /// Start `xdplb run` in the director namespace and wait until it has attached.
    pub fn start_director(&mut self, xdplb: &Path, config: &Path) {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns("dir")))
            .arg(xdplb)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn xdplb run");
        self.adopt(child);
        self.director = Some(self.children.len() - 1);
        let link = self.pin_dir.join("link_eth0");
        let child = self.children.last_mut().expect("just adopted");
        wait_for("the director to attach", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("xdplb run exited before attaching: {status}");
            }
            link.exists()
        });
    }

    /// Stop the director (SIGTERM) started by [`DrTopology::start_director`]; returns whether
    /// it exited successfully.
    pub fn stop_director(&mut self) -> bool {
        let idx = self.director.take().expect("director started");
        let child = &mut self.children[idx];
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// Start `xdplb run` in namespace `host` with extra arguments; returns the child's index.
    pub fn spawn_in(&mut self, host: &str, program: &Path, args: &[&str]) -> usize {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns(host)))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        self.adopt(child);
        self.children.len() - 1
    }

    /// TCP and UDP servers in every backend that answer with the backend's name.
    pub fn start_servers(&mut self) {
        for i in 0..self.backends {
            let name = Self::backend_name(i);
            for vip in [VIP4, VIP6] {
                let vip: IpAddr = vip.parse().expect("vip");
                let (stop, n) = (self.stop.clone(), name.clone());
                self.servers.push(in_netns(&self.ns(&name), move || {
                    tcp_server(SocketAddr::new(vip, TCP_PORT), &n, &stop)
                }));
                let (stop, n) = (self.stop.clone(), name.clone());
                self.servers.push(in_netns(&self.ns(&name), move || {
                    udp_server(SocketAddr::new(vip, UDP_PORT), &n, &stop)
                }));
            }
        }
    }
}

impl Drop for DrTopology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for c in &mut self.children {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.children {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        if self.pin_dir.exists() {
            let _ = lb_userspace::dataplane::remove_pins(&self.pin_dir);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tcp_server(addr: SocketAddr, name: &str, stop: &AtomicBool) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    l.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::SeqCst) {
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(format!("{name}\n").as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn udp_server(addr: SocketAddr, name: &str, stop: &AtomicBool) {
    // Bound to the VIP so replies leave with the VIP as source, as the client expects.
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((_, from)) = s.recv_from(&mut buf) {
            let _ = s.send_to(name.as_bytes(), from);
        }
    }
}

/// Answers per backend name, and the failures (each with its error).
pub type Tally = (BTreeMap<String, usize>, Vec<String>);

/// `n` exchanges from namespace `ns`, one after another; `exchange(i)` returns the name of
/// the backend that answered.
fn tally(
    ns: &str,
    n: usize,
    exchange: impl Fn(usize) -> std::io::Result<String> + Send + 'static,
) -> Tally {
    in_netns(ns, move || {
        let mut answers = BTreeMap::new();
        let mut failures = Vec::new();
        for i in 0..n {
            match exchange(i) {
                Ok(name) if !name.is_empty() => *answers.entry(name).or_insert(0) += 1,
                Ok(_) => failures.push(format!("exchange {i}: empty answer")),
                Err(e) => failures.push(format!("exchange {i}: {e}")),
            }
        }
        (answers, failures)
    })
    .join()
    .expect("client thread")
}

/// `n` TCP connections to `vip:port`, each reading the backend's name.
pub fn tcp_clients(ns: &str, vip: &str, port: u16, n: usize) -> Tally {
    let addr = SocketAddr::new(vip.parse().expect("vip"), port);
    tally(ns, n, move |_| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })
}

/// `n` UDP request/response exchanges, each from its own socket (a new flow each).
pub fn udp_clients(ns: &str, vip: &str, port: u16, n: usize) -> Tally {
    let addr = SocketAddr::new(vip.parse().expect("vip"), port);
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    tally(ns, n, move |_| {
        let s = UdpSocket::bind((any, 0))?;
        s.connect(addr)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut buf = [0u8; 64];
        // Up to three tries: the first may wait for neighbour resolution.
        for _ in 0..3 {
            s.send(b"who")?;
            if let Ok(len) = s.recv(&mut buf) {
                return Ok(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no UDP answer",
        ))
    })
}

/// Path of the `xdplb` binary built next to the running test or tool.
pub fn xdplb_binary() -> PathBuf {
    if let Ok(p) = std::env::var("XDPLB_BIN") {
        // Absolute: the binary is started through nsenter, possibly from another directory.
        return std::fs::canonicalize(&p).unwrap_or_else(|e| panic!("XDPLB_BIN={p}: {e}"));
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("xdplb");
        if candidate.exists() {
            return candidate;
        }
    }
    panic!("xdplb binary not found next to {}; build it (cargo build -p lb-userspace) or set XDPLB_BIN", exe.display());
}

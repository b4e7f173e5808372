//! Network-namespace topologies for end-to-end tests and the demo. Everything a
//! [`Topology`] creates (namespaces, the director process, its pins) it deletes on drop;
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

/// A lab of network namespaces: client `cl`, director `dir`, backends `b1`.., bridges in a
/// switch namespace `sw` (see [`Topology::dr`] and [`Topology::tun`]). Backends hold the
/// VIPs on `lo` with `arp_ignore=1`/`arp_announce=2`, as LVS wants.
pub struct Topology {
    pub prefix: String,
    /// Deleted when the topology is dropped (after its processes are stopped).
    namespaces: Vec<TempNs>,
    children: Vec<Child>,
    /// Index in `children` of the running `xdplb run`.
    director: Option<usize>,
    /// What the director has logged so far.
    pub director_log: Arc<std::sync::Mutex<String>>,
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Per backend: whether its TCP name server accepts ([`Topology::set_serving`]).
    serving: Vec<Arc<AtomicBool>>,
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
/// Bulk transfers (`down N` / `up N` + N bytes), see [`bulk_download`] / [`bulk_upload`].
pub const BULK_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 53;

/// Full-NAT pool addresses of the NAT topology (held by the director on eth1).
pub const POOL4: &str = "198.18.5.100";
pub const POOL6: &str = "2001:db8:5::100";

pub const ROUTER4: &str = "198.18.0.1";
pub const ROUTER6: &str = "2001:db8:1::1";

/// Backends of the TUN topology (a routed subnet of their own).
pub fn tun_backend4(i: usize) -> String {
    format!("198.18.5.{}", 11 + i)
}
pub fn tun_backend6(i: usize) -> String {
    format!("2001:db8:5::{}", 11 + i)
}

pub fn backend4(i: usize) -> String {
    format!("198.18.0.{}", 11 + i)
}
pub fn backend6(i: usize) -> String {
    format!("2001:db8:1::{}", 11 + i)
}

impl Topology {
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    pub fn backend_name(i: usize) -> String {
        format!("b{}", i + 1)
    }

    fn empty(prefix: &str, backends: usize) -> Topology {
        Topology {
            prefix: prefix.to_string(),
            namespaces: Vec::new(),
            children: Vec::new(),
            director: None,
            director_log: Arc::default(),
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            serving: Vec::new(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/xdplb-{prefix}")),
            backends,
        }
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, host: &str, args: &[&str]) {
        let ns = self.ns(host);
        let mut all = vec!["ip", "-n", ns.as_str()];
        all.extend_from_slice(args);
        sh(&all);
    }

    fn sysctl(&self, host: &str, settings: &[&str]) {
        let ns = self.ns(host);
        let mut all = vec!["ip", "netns", "exec", ns.as_str(), "sysctl", "-qw"];
        all.extend_from_slice(settings);
        sh(&all);
    }

    /// Create namespace `host` (if new) and plug its interface `ifname` into bridge `bridge`
    /// of the switch namespace, with the given addresses.
    fn plug(&mut self, bridge: &str, host: &str, ifname: &str, a4: &str, a6: &str) {
        let ns = self.ns(host);
        if !self.namespaces.iter().any(|n| n.0 == ns) {
            self.add_ns(&ns);
            self.ip(host, &["link", "set", "lo", "up"]);
        }
        let port = format!("{host}-{ifname}");
        let port = if bridge == "br0" {
            host.to_string()
        } else {
            port
        };
        self.ip(
            "sw",
            &[
                "link", "add", &port, "type", "veth", "peer", "name", ifname, "netns", &ns,
            ],
        );
        self.ip("sw", &["link", "set", &port, "master", bridge, "up"]);
        self.ip(host, &["addr", "add", a4, "dev", ifname]);
        self.ip(host, &["addr", "add", a6, "dev", ifname, "nodad"]);
        self.ip(host, &["link", "set", ifname, "up"]);
        // The local stack leaves checksums to the NIC; XDP forwards them unfinished (PITFALLS.md).
        sh(&[
            "ip", "netns", "exec", &ns, "ethtool", "-K", ifname, "tx", "off",
        ]);
    }

    fn switch(&mut self, bridges: &[&str]) {
        let sw = self.ns("sw");
        self.add_ns(&sw);
        for br in bridges {
            self.ip("sw", &["link", "add", br, "type", "bridge"]);
            self.ip("sw", &["link", "set", br, "up"]);
        }
    }

    /// The client and the director's eth0 on br0.
    fn client_and_director(&mut self) {
        self.plug(
            "br0",
            "cl",
            "eth0",
            &format!("{CLIENT4}/24"),
            &format!("{CLIENT6}/64"),
        );
        self.plug(
            "br0",
            "dir",
            "eth0",
            &format!("{DIRECTOR4}/24"),
            &format!("{DIRECTOR6}/64"),
        );
    }

    /// Backends hold both VIPs on `lo` and never answer ARP for them.
    fn vips_on_backends(&self) {
        for i in 0..self.backends {
            let b = Self::backend_name(i);
            self.ip(&b, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
            self.ip(&b, &["addr", "add", &format!("{VIP6}/128"), "dev", "lo"]);
            self.sysctl(
                &b,
                &[
                    "net.ipv4.conf.all.arp_ignore=1",
                    "net.ipv4.conf.all.arp_announce=2",
                ],
            );
        }
    }

    /// The client sends VIP traffic to the director.
    fn client_routes_vips_via_director(&self) {
        self.ip(
            "cl",
            &["route", "add", &format!("{VIP4}/32"), "via", DIRECTOR4],
        );
        self.ip(
            "cl",
            &[
                "-6",
                "route",
                "add",
                &format!("{VIP6}/128"),
                "via",
                DIRECTOR6,
            ],
        );
    }

    /// DR: client, director and `n` backends on one bridge. The VIP is routed by the client
    /// to the director. `prefix` must be unique among live topologies.
    pub fn dr(prefix: &str, backends: usize) -> Topology {
        let mut t = Topology::empty(prefix, backends);
        t.switch(&["br0"]);
        t.client_and_director();
        for i in 0..backends {
            t.plug(
                "br0",
                &Self::backend_name(i),
                "eth0",
                &format!("{}/24", backend4(i)),
                &format!("{}/64", backend6(i)),
            );
        }
        t.client_routes_vips_via_director();
        t.vips_on_backends();
        t
    }

    /// NAT / full-NAT: a two-armed director, clients on br0 (director eth0), backends on br1
    /// (director eth1 = 198.18.5.1). NAT backends route via the director; full-NAT backends
    /// have no route to clients at all, only to the pool address the director holds on eth1.
    pub fn nat(prefix: &str, backends: usize, fullnat: bool) -> Topology {
        Topology::nat_with(prefix, backends, fullnat, !fullnat)
    }

    /// [`Topology::nat`], choosing whether backends route back via the director.
    pub fn nat_with(prefix: &str, backends: usize, fullnat: bool, route_back: bool) -> Topology {
        let mut t = Topology::empty(prefix, backends);
        t.switch(&["br0", "br1"]);
        t.client_and_director();
        t.plug("br1", "dir", "eth1", "198.18.5.1/24", "2001:db8:5::1/64");
        t.sysctl(
            "dir",
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
        if fullnat {
            t.ip(
                "dir",
                &["addr", "add", &format!("{POOL4}/32"), "dev", "eth1"],
            );
            t.ip(
                "dir",
                &[
                    "addr",
                    "add",
                    &format!("{POOL6}/128"),
                    "dev",
                    "eth1",
                    "nodad",
                ],
            );
        }
        for i in 0..backends {
            let b = Self::backend_name(i);
            t.plug(
                "br1",
                &b,
                "eth0",
                &format!("{}/24", tun_backend4(i)),
                &format!("{}/64", tun_backend6(i)),
            );
            if route_back {
                t.ip(&b, &["route", "add", "default", "via", "198.18.5.1"]);
                t.ip(
                    &b,
                    &["-6", "route", "add", "default", "via", "2001:db8:5::1"],
                );
            }
        }
        t.client_routes_vips_via_director();
        t
    }

    /// The shipped configs that match [`Topology::nat`].
    pub fn nat_config(fullnat: bool) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(if fullnat {
            "../examples/fullnat.yaml"
        } else {
            "../examples/nat.yaml"
        })
    }

    /// TUN: client, director and a router on one segment (br0); the router and `n` backends
    /// on another subnet (br1), so only routing reaches the backends. The director (IP
    /// forwarding on, as the FIB helper requires) reaches them via the router; backends
    /// answer clients directly through the router.
    pub fn tun(prefix: &str, backends: usize) -> Topology {
        let mut t = Topology::empty(prefix, backends);
        t.switch(&["br0", "br1"]);
        t.client_and_director();
        t.plug(
            "br0",
            "rt",
            "eth0",
            &format!("{ROUTER4}/24"),
            &format!("{ROUTER6}/64"),
        );
        t.plug("br1", "rt", "eth1", "198.18.5.1/24", "2001:db8:5::1/64");
        t.sysctl(
            "rt",
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth1.rp_filter=0",
            ],
        );
        t.sysctl(
            "dir",
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        );
        t.ip("dir", &["route", "add", "198.18.5.0/24", "via", ROUTER4]);
        t.ip(
            "dir",
            &["-6", "route", "add", "2001:db8:5::/64", "via", ROUTER6],
        );
        t.sysctl(
            "cl",
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
            ],
        );
        for i in 0..backends {
            let b = Self::backend_name(i);
            t.plug(
                "br1",
                &b,
                "eth0",
                &format!("{}/24", tun_backend4(i)),
                &format!("{}/64", tun_backend6(i)),
            );
            t.ip(&b, &["route", "add", "default", "via", "198.18.5.1"]);
            t.ip(
                &b,
                &["-6", "route", "add", "default", "via", "2001:db8:5::1"],
            );
            t.sysctl(
                &b,
                &[
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.eth0.rp_filter=0",
                ],
            );
        }
        t.client_routes_vips_via_director();
        t.vips_on_backends();
        t
    }

    fn add_ns(&mut self, ns: &str) {
        self.namespaces.push(TempNs::new(ns));
    }

    /// Keep `child` running until the topology is dropped.
    pub fn adopt(&mut self, child: Child) {
        self.children.push(child);
    }

    /// `xdplb pass` on the switch side of the director's link: `XDP_TX` from the director
    /// is only delivered into a veth whose peer runs XDP.
    pub fn attach_pass(&mut self, xdplb: &Path) {
        self.attach_pass_on(xdplb, "dir");
    }

    /// [`Topology::attach_pass`] for switch port `port` (e.g. `dir-eth1` of a second arm).
    pub fn attach_pass_on(&mut self, xdplb: &Path, port: &str) {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns("sw")))
            .arg(xdplb)
            .args(["pass", "--iface", port])
            .spawn()
            .expect("spawn xdplb pass");
        self.adopt(child);
        let sw = self.ns("sw");
        wait_for(
            "pass-through XDP on the switch port",
            Duration::from_secs(10),
            || sh(&["ip", "-n", &sw, "-d", "link", "show", port]).contains("xdp"),
        );
    }

    /// The shipped config that matches [`Topology::dr`] with three backends.
    pub fn demo_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.yaml")
    }

    /// The shipped config that matches [`Topology::tun`] with three backends.
    pub fn tun_config() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tun.yaml")
    }

    /// `xdplb decap` on every backend's eth0, until the topology is dropped.
    pub fn start_decap(&mut self, xdplb: &Path) {
        for i in 0..self.backends {
            let b = Self::backend_name(i);
            self.spawn_in(
                &b,
                xdplb,
                &["decap", "--iface", "eth0", "--xdp-mode", "native"],
            );
            let ns = self.ns(&b);
            wait_for("xdplb decap to attach", Duration::from_secs(10), || {
                sh(&["ip", "-n", &ns, "-d", "link", "show", "eth0"]).contains("prog/xdp")
            });
        }
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
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn xdplb run");
        // Keep the director's log (for tests that look for a warning) and still show it.
        let mut child = child;
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.director_log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("{line}");
                log.lock().expect("log").push_str(&(line + "\n"));
            }
        });
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

    /// SIGKILL the director's controller (the pinned data plane stays).
    pub fn kill_director(&mut self) {
        let idx = self.director.take().expect("director started");
        let child = &mut self.children[idx];
        child.kill().expect("SIGKILL the controller");
        let _ = child.wait();
    }

    /// Send `signal` to the running controller.
    pub fn signal_director(&self, signal: i32) {
        let idx = self.director.expect("director started");
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.children[idx].id() as i32, signal) };
    }

    /// Wait until the director's log holds `needle` at least `count` times.
    pub fn wait_log(&self, needle: &str, count: usize, timeout: Duration) {
        let log = self.director_log.clone();
        wait_for(
            &format!("{count}× `{needle}` in the director's log"),
            timeout,
            || log.lock().expect("log").matches(needle).count() >= count,
        );
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

    /// SIGTERM child `idx` (from [`Topology::spawn_in`]) and wait for it.
    pub fn stop_child(&mut self, idx: usize) {
        let child = &mut self.children[idx];
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }

    /// `xdplb stats --json` of the running director.
    pub fn stats(&self, xdplb: &Path) -> serde_json::Value {
        let out = sh(&[
            xdplb.to_str().expect("path"),
            "--pin-dir",
            self.pin_dir.to_str().expect("path"),
            "stats",
            "--json",
        ]);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("stats --json is not JSON ({e}): {out}"))
    }

    /// TCP and UDP servers in every backend that answer with the backend's name. The TCP
    /// name server listens on the wildcard address (dual-stack `[::]`), so it answers on the
    /// VIPs held on `lo` and on the backend's own address, where health checks go; UDP stays
    /// bound to the VIPs (a wildcard UDP socket would answer from another source address).
    pub fn start_servers(&mut self) {
        self.start_servers_with(|_| [VIP4.to_string(), VIP6.to_string()], true);
    }

    /// Servers on the given addresses of backend `i` (NAT backends see their own address).
    pub fn start_servers_on(&mut self, addrs: impl Fn(usize) -> [String; 2]) {
        self.start_servers_with(addrs, false);
    }

    fn start_servers_with(&mut self, addrs: impl Fn(usize) -> [String; 2], wildcard_tcp: bool) {
        for i in 0..self.backends {
            let name = Self::backend_name(i);
            let serving = Arc::new(AtomicBool::new(true));
            self.serving.push(serving.clone());
            let tcp_addrs: Vec<IpAddr> = if wildcard_tcp {
                vec![Ipv6Addr::UNSPECIFIED.into()]
            } else {
                addrs(i)
                    .iter()
                    .map(|a| a.parse().expect("address"))
                    .collect()
            };
            for addr in tcp_addrs {
                let (stop, n, on) = (self.stop.clone(), name.clone(), serving.clone());
                self.servers.push(in_netns(&self.ns(&name), move || {
                    tcp_server(SocketAddr::new(addr, TCP_PORT), &n, &stop, &on)
                }));
            }
            for vip in addrs(i) {
                let vip: IpAddr = vip.parse().expect("address");
                let (stop, n) = (self.stop.clone(), name.clone());
                self.servers.push(in_netns(&self.ns(&name), move || {
                    udp_server(SocketAddr::new(vip, UDP_PORT), &n, &stop)
                }));
                let stop = self.stop.clone();
                self.servers.push(in_netns(&self.ns(&name), move || {
                    bulk_server(SocketAddr::new(vip, BULK_PORT), &stop)
                }));
            }
        }
    }

    /// Stop (false) or restart (true) backend `i`'s TCP name server, as a crashed or
    /// restarted service would: its listening socket closes, new connections are refused.
    pub fn set_serving(&self, i: usize, on: bool) {
        self.serving[i].store(on, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
    }
}

impl Drop for Topology {
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
        // The namespaces go with the `namespaces` field, after this.
    }
}

/// A config file a test owns (removed on drop). `write` replaces it atomically (write a
/// temporary, rename), as an editor or a deployment tool would, so a watching controller
/// never reads half a file.
pub struct ConfigFile(PathBuf);

impl ConfigFile {
    pub fn new(tag: &str, text: &str) -> ConfigFile {
        let f = ConfigFile(std::env::temp_dir().join(format!("xdplb-{tag}.yaml")));
        f.write(text);
        f
    }

    pub fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.0).expect("replace config");
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(self.0.with_extension("tmp"));
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

fn tcp_server(addr: SocketAddr, name: &str, stop: &AtomicBool, serving: &AtomicBool) {
    let bind = || {
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).expect("nonblocking");
        l
    };
    let mut listener = Some(bind());
    while !stop.load(Ordering::SeqCst) {
        if !serving.load(Ordering::SeqCst) {
            listener = None;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let l = listener.get_or_insert_with(bind);
        match l.accept() {
            Ok((mut s, _)) => {
                let _ = s.set_nonblocking(false);
                let _ = s.write_all(format!("{name}\n").as_bytes());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Byte `i` of every bulk transfer.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

fn bulk_server(addr: SocketAddr, stop: &AtomicBool) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    l.set_nonblocking(true).expect("nonblocking");
    while !stop.load(Ordering::SeqCst) {
        let Ok((s, _)) = l.accept() else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = serve_bulk(s);
    }
}

fn serve_bulk(mut s: TcpStream) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::new(s.try_clone()?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line)?;
    let (cmd, n) = line.trim().split_once(' ').unwrap_or(("", "0"));
    let n: usize = n.parse().unwrap_or(0);
    match cmd {
        "down" => {
            let data: Vec<u8> = (0..n).map(pattern).collect();
            s.write_all(&data)?;
        }
        "up" => {
            let mut data = vec![0u8; n];
            reader.read_exact(&mut data)?;
            let ok = data.iter().enumerate().all(|(i, b)| *b == pattern(i));
            s.write_all(if ok { b"ok\n" } else { b"corrupt\n" })?;
        }
        _ => s.write_all(b"?\n")?,
    }
    Ok(())
}

/// Download `n` bytes from `vip:BULK_PORT` in namespace `ns`; checks every byte.
pub fn bulk_download(ns: &str, vip: &str, n: usize) -> Result<(), String> {
    let addr = SocketAddr::new(vip.parse().expect("vip"), BULK_PORT);
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("down {n}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut got = Vec::with_capacity(n);
        s.read_to_end(&mut got)
            .map_err(|e| format!("after {} bytes: {e}", got.len()))?;
        if got.len() != n {
            return Err(format!("got {} of {n} bytes", got.len()));
        }
        match got.iter().enumerate().find(|(i, b)| **b != pattern(*i)) {
            Some((i, _)) => Err(format!("byte {i} differs")),
            None => Ok(()),
        }
    })
    .join()
    .expect("download thread")
}

/// Upload `n` bytes to `vip:BULK_PORT`; the backend checks every byte and says so.
pub fn bulk_upload(ns: &str, vip: &str, n: usize) -> Result<(), String> {
    let addr = SocketAddr::new(vip.parse().expect("vip"), BULK_PORT);
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| e.to_string())?;
        let data: Vec<u8> = (0..n).map(pattern).collect();
        s.write_all(format!("up {n}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        s.write_all(&data).map_err(|e| format!("sending: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("answer: {e}"))?;
        if answer.trim() == "ok" {
            Ok(())
        } else {
            Err(format!("backend says {answer:?}"))
        }
    })
    .join()
    .expect("upload thread")
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

/// Every exchange succeeded, all `backends` answered, each at least 20 % of `total`.
/// `context` is shown on failure (e.g. the director's counters).
pub fn assert_spread(
    what: &str,
    (answers, failures): &Tally,
    total: usize,
    backends: usize,
    context: impl std::fmt::Display,
) {
    assert!(
        failures.is_empty(),
        "{what}: {} of {total} failed, first: {:?}\n{context}",
        failures.len(),
        failures.first()
    );
    assert_eq!(
        answers.values().sum::<usize>(),
        total,
        "{what}: {answers:?}"
    );
    assert_eq!(
        answers.len(),
        backends,
        "{what}: every backend answers: {answers:?}"
    );
    for (name, n) in answers {
        assert!(
            *n * 5 >= total,
            "{what}: backend {name} got {n} of {total} (< 20 %): {answers:?}"
        );
    }
}

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
            // Bounded in time too: a broken path fails fast instead of timing out n times.
            if failures.len() >= 10 {
                failures.push(format!("stopped after {i} of {n} exchanges"));
                break;
            }
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

/// For fixtures and benchmarks whose FIB lookups must see known routes: a namespace with
/// `up0` (198.18.0.3, 2001:db8:1::3, MTU 1500), backends' and clients' subnets routed
/// via a gateway whose MAC is a permanent neighbour, one subnet via a gateway with no
/// neighbour entry, and no route at all to 198.18.7.0/24.
pub struct FibLab(pub TempNs);

/// A network namespace that exists exactly as long as this guard (deleted on drop, also
/// when a test panics).
pub struct TempNs(pub String);

impl TempNs {
    pub fn new(name: &str) -> TempNs {
        sh(&["ip", "netns", "add", name]);
        TempNs(name.to_string())
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", self.0.as_str()];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// `ip netns exec NS sysctl -qw SETTINGS...`
    pub fn sysctl(&self, settings: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", self.0.as_str(), "sysctl", "-qw"];
        all.extend_from_slice(settings);
        sh(&all);
    }
}

impl Drop for TempNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The benches' kernel peer: nftables DNAT of `vip:port/tcp` round robin over `backends`
/// (`numgen inc`), as table `table` in namespace `ns`; the table is deleted on drop.
pub struct NftDnat {
    ns: String,
    table: String,
}

impl NftDnat {
    pub fn new(ns: &str, table: &str, vip: &str, port: u16, backends: &[&str]) -> NftDnat {
        let map: Vec<String> = backends
            .iter()
            .enumerate()
            .map(|(i, b)| format!("{i} : {b}"))
            .collect();
        let rules = format!(
            "table ip {table} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat;\n    ip daddr {vip} tcp dport {port} dnat to numgen inc mod {} map {{ {} }}\n  }}\n}}\n",
            backends.len(),
            map.join(", ")
        );
        let path = std::env::temp_dir().join(format!("{ns}-{table}.nft"));
        std::fs::write(&path, rules).expect("write ruleset");
        let loaded = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f"])
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        let out = loaded.expect("run nft");
        assert!(
            out.status.success(),
            "nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NftDnat {
            ns: ns.to_string(),
            table: table.to_string(),
        }
    }
}

impl Drop for NftDnat {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "ip"])
            .arg(&self.table)
            .status();
    }
}

/// A FIB lab's neighbour `ip` on `up0` now answers with `mac` (a next hop changing its MAC).
pub fn replace_up0_neighbour(ns: &str, ip: &str, mac: &str) {
    sh(&[
        "ip",
        "-n",
        ns,
        "neigh",
        "replace",
        ip,
        "lladdr",
        mac,
        "dev",
        "up0",
        "nud",
        "permanent",
    ]);
}

/// MAC of `up0` in a [`FibLab`], and of its gateway (a permanent neighbour).
pub const UP_MAC: [u8; 6] = [0x02, 0xd1, 0, 0, 0, 0x10];
pub const GW_MAC: [u8; 6] = [0x02, 0x99, 0, 0, 0, 0xfe];

impl FibLab {
    /// Register `up0` with a harness loaded inside the lab: its IFACES entry (MAC, the
    /// config's first interface's TUN sources) and its TX_PORTS redirect slot.
    pub fn register_up0(h: &mut crate::Harness) {
        let up0 = lb_userspace::netlink::ifindex("up0").expect("up0 in the lab namespace");
        let info = lb_userspace::dataplane::iface_info(&h.config.interfaces[0], UP_MAC);
        h.director.maps.set_iface(up0, info).expect("IFACES");
        h.director
            .maps
            .tx_ports
            .insert(up0, up0, None, 0)
            .expect("TX_PORTS");
    }

    pub fn new(tag: &str) -> FibLab {
        let ns = TempNs::new(&format!("xft{tag}{}", std::process::id()));
        let gw = "02:99:00:00:00:fe";
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec![
                "link",
                "add",
                "up0",
                "address",
                "02:d1:00:00:00:10",
                "type",
                "veth",
                "peer",
                "name",
                "up1",
            ],
            vec!["link", "set", "up0", "up"],
            vec!["link", "set", "up1", "up"],
            vec!["addr", "add", "198.18.0.3/24", "dev", "up0"],
            vec!["addr", "add", "2001:db8:1::3/64", "dev", "up0", "nodad"],
            vec!["route", "add", "198.18.5.0/24", "via", "198.18.0.1"],
            vec!["route", "add", "198.18.6.0/24", "via", "198.18.0.2"],
            // Clients (NAT replies go back to them); 198.19/16 for the bench's NAT replies to
            // as many clients as the driver cycles through (it writes the low 16 bits).
            vec!["route", "add", "198.18.2.0/24", "via", "198.18.0.1"],
            vec!["route", "add", "198.19.0.0/16", "via", "198.18.0.1"],
            vec![
                "-6",
                "route",
                "add",
                "2001:db8:2::/64",
                "via",
                "2001:db8:1::1",
            ],
            vec![
                "-6",
                "route",
                "add",
                "2001:db8:5::/64",
                "via",
                "2001:db8:1::1",
            ],
            vec![
                "neigh",
                "replace",
                "198.18.0.1",
                "lladdr",
                gw,
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
            vec![
                "-6",
                "neigh",
                "replace",
                "2001:db8:1::1",
                "lladdr",
                gw,
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
        ] {
            ns.ip(&cmd);
        }
        // bpf_fib_lookup answers "forwarding disabled" unless the input device forwards.
        ns.sysctl(&["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]);
        FibLab(ns)
    }

    /// Run `f` inside the namespace (BPF_PROG_TEST_RUN uses the caller's namespace).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.0 .0, f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
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

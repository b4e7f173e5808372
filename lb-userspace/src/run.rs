//! `xdplb run`: the controller. Validates the config, loads (or adopts) the director, runs
//! the health checks and reconciles config + health + drains into the maps; reloads on
//! SIGHUP, on a change to the config file and on `xdplb reload`; answers `xdplb drain`.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    signal::unix::{signal, SignalKind},
    sync::mpsc,
    task::JoinHandle,
};

use crate::{
    config::{CheckKind, Config, HealthCheck, Mode, ThisHost},
    dataplane::{self, Director, Origin},
    health::{self, BackendKey, Report, State},
    netlink::Netlink,
    reconcile::{self, Ids, Runtime},
};

/// How long to wait for a backend's MAC to appear in the neighbour table.
const NEIGHBOUR_TIMEOUT: Duration = Duration::from_secs(3);
/// How often `lc`/`wlc` tables are recomputed from the active-flow counts. New flows in
/// between follow the last table, so the balance is approximate at this time scale.
const LC_INTERVAL: Duration = Duration::from_secs(1);
/// How often ended flows (idle UDP, flows of reset or removed backends) are removed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often routed backends are poked so their next hop stays resolved.
const NEIGHBOUR_REFRESH: Duration = Duration::from_secs(20);
/// How often the config file's metadata is compared with what was last seen (the file is
/// read only when size, mtime or inode changed: editors and deploy tools replace it).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a backend removed from the config keeps serving its established flows (of a
/// `keep` service) at most: IPVS's established-TCP timeout. It goes earlier once no flow
/// entry points at it. (DR sees only client packets, so it cannot tell a finished TCP flow
/// from an idle one: entries of finished flows linger until new flows take their ways.)
const RETIRE_MAX: Duration = Duration::from_secs(15 * 60);

/// Where the controller of the director pinned at `pin_dir` keeps its lock and control
/// socket: `/run/xdplb/<pin dir name>.{lock,sock}`.
pub fn control_path(pin_dir: &Path, ext: &str) -> PathBuf {
    let name = pin_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "xdplb".into());
    PathBuf::from("/run/xdplb").join(format!("{name}.{ext}"))
}

/// Notices NAT traffic whose replies never come back through the director — the classic
/// mistake of a (one-armed) NAT set-up whose backends do not route via the director, which
/// no config check can see from here.
#[derive(Default)]
struct ReplyWatch {
    last: Option<(u64, u64)>,
    warned: bool,
}

impl ReplyWatch {
    /// Packets forwarded to backends in one interval, with no reply at all, before warning.
    const THRESHOLD: u64 = 3;

    fn check(&mut self, totals: &[u64]) {
        let now = (
            totals[lb_common::reason::FWD_NAT as usize],
            totals[lb_common::reason::FWD_NAT_REPLY as usize],
        );
        if let Some((fwd, back)) = self.last {
            let (sent, returned) = (now.0 - fwd, now.1 - back);
            if sent >= Self::THRESHOLD && returned == 0 && !self.warned {
                tracing::warn!(
                    "NAT: {sent} packets went to backends in the last {SWEEP_INTERVAL:?} and no reply came back \
                     through the director (if this service expects replies: NAT backends must route them via it, as \
                     their default gateway, or use mode: fullnat)"
                );
                self.warned = true;
            } else if returned > 0 {
                self.warned = false;
            }
        }
        self.last = Some(now);
    }
}

/// Addresses of the backends of services in one of `modes` (each once).
fn backends_of(cfg: &Config, modes: &[Mode]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = cfg
        .services
        .iter()
        .filter(|s| modes.contains(&s.mode))
        .flat_map(|s| s.backends.iter().map(|b| b.address))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub struct RunOptions<'a> {
    pub config: &'a Path,
    pub pin_dir: &'a Path,
    /// Leave the pinned director forwarding when the controller exits.
    pub keep_attached: bool,
    /// Log every packet's fate from the data plane (slow; for debugging only).
    pub debug_log: bool,
}

/// Resolve the MACs of DR backends that the config leaves out and `known` lacks.
async fn backend_macs(
    nl: &Netlink,
    cfg: &Config,
    known: &mut HashMap<IpAddr, [u8; 6]>,
) -> anyhow::Result<()> {
    for (i, svc) in cfg.services.iter().enumerate() {
        if svc.mode != Mode::Dr {
            continue;
        }
        for (j, b) in svc.backends.iter().enumerate() {
            let mac = match b.mac() {
                Some(m) => m.0,
                None => match known.get(&b.address) {
                    Some(m) => *m,
                    None => nl
                        .resolve(b.address, NEIGHBOUR_TIMEOUT)
                        .await
                        .with_context(|| format!("services[{i}].backends[{j}] ({})", b.address))?,
                },
            };
            known.insert(b.address, mac);
        }
    }
    Ok(())
}

/// Routed modes (TUN, NAT, full-NAT) need no backend MAC in the config, but the kernel must
/// know the next hop toward each backend: the XDP FIB lookup does not resolve neighbours,
/// and a full-NAT packet handed to the kernel instead is dropped (its source is ours).
async fn prepare_routes(nl: &Netlink, cfg: &Config) {
    for b in backends_of(cfg, &[Mode::Tun, Mode::Nat, Mode::Fullnat]) {
        crate::netlink::poke(b);
    }
    // NAT backends are usually on a directly attached subnet: wait for them to resolve.
    for b in backends_of(cfg, &[Mode::Nat, Mode::Fullnat]) {
        if let Err(e) = nl.resolve(b, NEIGHBOUR_TIMEOUT).await {
            tracing::warn!("{e:#}; its first packets go through the kernel until it answers");
        }
    }
}

/// A running check: what it checks (to restart it when that changes) and its task.
struct Check {
    spec: (HealthCheck, u16),
    task: JoinHandle<()>,
}

struct Controller {
    config_path: PathBuf,
    cfg: Config,
    /// The file's text as last read (valid or not), to notice edits.
    seen_text: String,
    /// The file's metadata when last looked at ([`file_stamp`]).
    seen_stamp: Option<(u64, i64, i64, u64)>,
    director: Director,
    ids: Ids,
    runtime: HashMap<BackendKey, Runtime>,
    macs: HashMap<IpAddr, [u8; 6]>,
    checks: HashMap<BackendKey, Check>,
    /// Backends removed from the config whose established flows may finish on them
    /// (services with `on_backend_down: keep`): weight 0, not checked, until [`RETIRE_MAX`]
    /// or until no flow points at them.
    retired: HashMap<BackendKey, (crate::config::Backend, Instant)>,
    last_report: HashMap<BackendKey, Report>,
    reports: mpsc::UnboundedSender<Report>,
    nl: Netlink,
    debug_log: bool,
    generation: u64,
    /// What `xdplb status` and `/metrics` see of the controller.
    view: std::sync::Arc<std::sync::Mutex<crate::status::View>>,
    /// Check results arrived since `view` was last rebuilt.
    view_stale: bool,
    last_reconcile_unix: f64,
    reconcile_errors: u64,
    metrics: Option<(std::net::SocketAddr, JoinHandle<()>)>,
    pin_dir: PathBuf,
}

impl Controller {
    fn load_options(&self, cfg: &Config) -> dataplane::LoadOptions<'_> {
        dataplane::LoadOptions {
            flow_table_size: cfg.flow_table_size(),
            pin_dir: self.director.pin_dir(),
            adopt: true,
            debug_log: self.debug_log,
            udp_idle: cfg.udp_idle_timeout(),
            ring_fast: cfg.ring_fast(),
            flow_cache_size: cfg.flow_cache_size(),
            ..Default::default()
        }
    }

    /// The config plus retired backends (weight 0: no new flows).
    fn effective(&self) -> Config {
        let mut cfg = self.cfg.clone();
        for (key, (b, _)) in &self.retired {
            if let Some(svc) = cfg
                .services
                .iter_mut()
                .find(|s| BackendKey::new(s.endpoint(), key.address) == *key)
            {
                svc.backends.push(crate::config::Backend {
                    weight: 0,
                    ..b.clone()
                });
            }
        }
        cfg
    }

    /// Desired state from config + health + drains, written as a diff.
    fn reconcile(&mut self, why: &str) -> anyhow::Result<()> {
        let r = self.reconcile_inner(why);
        match &r {
            Ok(()) => self.last_reconcile_unix = unix_now(),
            Err(_) => self.reconcile_errors += 1,
        }
        self.refresh_view();
        r
    }

    /// Publish names, health and last checks for `status` and `/metrics`.
    fn refresh_view(&mut self) {
        self.view_stale = false;
        use crate::status::{BackendView, CheckView, ServiceView, View};
        let eff = self.effective();
        let services = eff
            .services
            .iter()
            .map(|s| ServiceView {
                name: s.name.clone(),
                vip: s.vip,
                port: s.port,
                protocol: s.protocol.to_string(),
                mode: s.mode.to_string(),
                scheduler: s.scheduler.to_string(),
                backends: s
                    .backends
                    .iter()
                    .map(|b| {
                        let key = BackendKey::new(s.endpoint(), b.address);
                        let rt = self.runtime.get(&key).copied().unwrap_or_default();
                        BackendView {
                            address: b.address,
                            weight: b.weight,
                            health: match rt.state {
                                State::Up => "up",
                                State::Down => "down",
                                State::Pending => "pending",
                            }
                            .into(),
                            drained: rt.drained,
                            retired: self.retired.contains_key(&key),
                            last_check: self.last_report.get(&key).map(|r| CheckView {
                                ok: r.ok,
                                detail: r.detail.clone(),
                                at_unix: r
                                    .at
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map(|d| d.as_secs_f64())
                                    .unwrap_or(0.0),
                            }),
                        }
                    })
                    .collect(),
            })
            .collect();
        let view = View {
            generation: self.generation,
            last_reconcile_unix: self.last_reconcile_unix,
            reconcile_errors: self.reconcile_errors,
            config: self.config_path.display().to_string(),
            services,
        };
        *self.view.lock().expect("view") = view;
    }

    /// (Re)start the metrics endpoint when `metrics.listen` changed.
    fn sync_metrics(&mut self) -> anyhow::Result<()> {
        let want = self.cfg.metrics.as_ref().map(|m| m.listen);
        if self.metrics.as_ref().map(|(a, _)| *a) == want {
            return Ok(());
        }
        if let Some((_, task)) = self.metrics.take() {
            task.abort();
        }
        if let Some(addr) = want {
            let task = crate::metrics::serve(addr, self.pin_dir.clone(), self.view.clone())?;
            tracing::info!(%addr, "serving Prometheus metrics at http://{addr}/metrics");
            self.metrics = Some((addr, task));
        }
        Ok(())
    }

    fn reconcile_inner(&mut self, why: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let runtime = &self.runtime;
        let retired = &self.retired;
        let macs = &self.macs;
        let want = reconcile::desired(
            &self.effective(),
            &mut self.ids,
            |b| {
                b.mac()
                    .map(|m| m.0)
                    .or_else(|| macs.get(&b.address).copied())
                    .unwrap_or_default()
            },
            |k| {
                let mut rt = runtime.get(k).copied().unwrap_or_default();
                if retired.contains_key(k) {
                    rt = Runtime {
                        retired: true,
                        ..Runtime::default()
                    };
                }
                rt
            },
        );
        let changes = self.director.apply(&want)?;
        if changes.is_empty() {
            tracing::debug!(why, "reconcile: no changes");
        } else {
            tracing::info!(
                why,
                generation = self.generation,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "reconcile: {changes}"
            );
        }
        for svc in &self.cfg.services {
            let up = svc
                .backends
                .iter()
                .filter(|b| {
                    let rt = self.runtime_of(svc, b.address);
                    rt.state == State::Up && !rt.drained && b.weight > 0
                })
                .count();
            if up == 0 {
                tracing::warn!(
                    "service {}: no backend takes new flows (all down or drained); new packets are {}",
                    svc.name,
                    match svc.on_all_down {
                        crate::config::AllDownPolicy::Drop => "dropped",
                        crate::config::AllDownPolicy::Pass => "passed to the kernel",
                    }
                );
            }
        }
        Ok(())
    }

    fn runtime_of(&self, svc: &crate::config::Service, addr: IpAddr) -> Runtime {
        self.runtime
            .get(&BackendKey::new(svc.endpoint(), addr))
            .copied()
            .unwrap_or_default()
    }

    /// Start, keep or stop checks so there is exactly one per checked backend; forget the
    /// runtime state of backends that are gone.
    fn sync_checks(&mut self) {
        let mut wanted = HashMap::new();
        for svc in &self.cfg.services {
            for b in &svc.backends {
                let key = BackendKey::new(svc.endpoint(), b.address);
                match &svc.health_check {
                    Some(hc) if hc.kind != CheckKind::None => {
                        let port = hc.port.or(b.port).unwrap_or(svc.port);
                        wanted.insert(key, (hc.clone(), port));
                    }
                    _ => {
                        // Unchecked backends are up (a check removed by a reload included).
                        self.runtime.entry(key).or_default().state = State::Up;
                    }
                }
            }
        }
        self.checks.retain(|key, check| {
            let keep = wanted.get(key) == Some(&check.spec);
            if !keep {
                check.task.abort();
            }
            keep
        });
        for (key, spec) in wanted {
            if self.checks.contains_key(&key) {
                continue;
            }
            // A backend the director already knows keeps its state until the checks say
            // otherwise; a new one waits for its first check.
            let rt = self.runtime.entry(key).or_insert(Runtime {
                state: State::Pending,
                ..Runtime::default()
            });
            let task = health::spawn(key, spec.0.clone(), spec.1, rt.state, self.reports.clone());
            self.checks.insert(key, Check { spec, task });
        }
        let keys: std::collections::HashSet<BackendKey> =
            health::backend_keys(&self.cfg).into_iter().collect();
        self.runtime.retain(|k, _| keys.contains(k));
        self.last_report.retain(|k, _| keys.contains(k));
    }

    /// Take one check result; true if the backend's state changed.
    fn on_report(&mut self, r: Report) -> bool {
        if !self.checks.contains_key(&r.key) {
            return false; // a check that was just stopped
        }
        let rt = self.runtime.entry(r.key).or_default();
        let changed = rt.state != r.state;
        if changed {
            let how = match r.state {
                State::Up => "up",
                State::Down => "DOWN",
                State::Pending => "pending",
            };
            if r.state == State::Down {
                tracing::warn!(backend = %r.key, state = how, check = %r.detail, "backend is {how}");
            } else {
                tracing::info!(backend = %r.key, state = how, check = %r.detail, "backend is {how}");
            }
            rt.state = r.state;
        } else if !r.ok {
            tracing::debug!(backend = %r.key, check = %r.detail, "check failed");
        }
        self.last_report.insert(r.key, r);
        // Published on the next watch tick (or `view` request), not per check result:
        // with thousands of backends, rebuilding the view per result is quadratic.
        self.view_stale = true;
        changed
    }

    /// Wait (bounded by the longest check timeout) for the first result of every backend
    /// that has none yet, so the first ring already reflects health.
    async fn first_results(&mut self, rx: &mut mpsc::UnboundedReceiver<Report>) {
        let longest = self
            .checks
            .values()
            .map(|c| c.spec.0.timeout)
            .max()
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + longest + Duration::from_millis(200);
        while self.runtime.values().any(|r| r.state == State::Pending) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    self.on_report(r);
                }
                _ => break,
            }
        }
    }

    /// Re-read the config file and apply it; an invalid file changes nothing.
    async fn reload(&mut self, why: &str) -> Result<String, String> {
        let text = std::fs::read_to_string(&self.config_path)
            .map_err(|e| format!("reading {}: {e}", self.config_path.display()))?;
        self.seen_text = text.clone();
        let new = match Config::parse(&text, &ThisHost) {
            Ok(c) => c,
            Err(errs) => {
                let report = crate::config::ConfigErrors {
                    file: self.config_path.display().to_string(),
                    errors: errs,
                }
                .to_string();
                tracing::error!(
                    "reload ({why}) rejected, the running configuration stays:\n{report}"
                );
                return Err(report);
            }
        };
        if new == self.cfg {
            tracing::info!("reload ({why}): configuration unchanged");
            return Ok("configuration unchanged".into());
        }
        if let Some(e) = self.director.held_hash_change(&new) {
            let msg = format!("reload ({why}) rejected, the running configuration stays: {e}");
            tracing::error!("{msg}");
            return Err(msg);
        }
        // Everything that can fail comes before anything changes.
        let mut macs = self.macs.clone();
        backend_macs(&self.nl, &new, &mut macs)
            .await
            .map_err(|e| format!("reload ({why}) rejected: {e:#}"))?;
        let mut iface_macs = Vec::new();
        for iface in &new.interfaces {
            iface_macs.push(
                self.nl
                    .link_mac(&iface.name)
                    .await
                    .map_err(|e| format!("reload ({why}) rejected: {e:#}"))?,
            );
        }
        prepare_routes(&self.nl, &new).await;
        if new.flow_table_size() != self.cfg.flow_table_size() {
            tracing::warn!(
                "flow_table_size changes only with `xdplb detach` and a new start (which drops connections); \
                 keeping the current table"
            );
        }
        let next = self.load_options(&new);
        if dataplane::program_version(&next)
            != dataplane::program_version(&self.load_options(&self.cfg))
        {
            // A load-time constant changed: load the program again (maps kept) and swap it in.
            let director = Director::load(&next)
                .map_err(|e| format!("reload ({why}): replacing the program failed: {e}"))?;
            self.director = director;
        }
        self.macs = macs;
        let old_ifaces: Vec<String> = self.cfg.interfaces.iter().map(|i| i.name.clone()).collect();
        self.retire(&new);
        self.cfg = new;
        self.generation += 1;
        self.sync_checks();
        self.reconcile(why).map_err(|e| format!("{e:#}"))?;
        self.sync_metrics().map_err(|e| format!("{e:#}"))?;
        for (iface, mac) in self.cfg.interfaces.iter().zip(&iface_macs) {
            self.director
                .attach(
                    &iface.name,
                    iface.xdp_mode,
                    dataplane::iface_info(iface, *mac),
                )
                .map_err(|e| format!("attaching to {}: {e}", iface.name))?;
        }
        for name in old_ifaces {
            if !self.cfg.interfaces.iter().any(|i| i.name == name) {
                self.director
                    .detach_interface(&name)
                    .map_err(|e| format!("detaching from {name}: {e}"))?;
            }
        }
        let msg = format!(
            "configuration {} applied ({} service(s))",
            self.generation,
            self.cfg.services.len()
        );
        tracing::info!("reload ({why}): {msg}");
        Ok(msg)
    }

    /// Backends that `new` removes from a `keep` service that stays: retire them (their
    /// flows finish); backends `new` lists are not retired.
    fn retire(&mut self, new: &Config) {
        let now = Instant::now();
        for old in &self.cfg.services {
            let Some(svc) = new.services.iter().find(|s| s.endpoint() == old.endpoint()) else {
                continue;
            };
            if svc.on_backend_down != crate::config::DownPolicy::Keep {
                continue;
            }
            for b in &old.backends {
                if !svc.backends.iter().any(|n| n.address == b.address) {
                    let key = BackendKey::new(old.endpoint(), b.address);
                    tracing::info!(
                        "backend {key} removed: no new flows; its established flows may finish (at most {RETIRE_MAX:?})"
                    );
                    self.retired.insert(key, (b.clone(), now));
                }
            }
        }
        // Forget retirements of backends the new config lists again, or whose service is gone.
        self.retired.retain(|key, _| {
            new.services.iter().any(|s| {
                BackendKey::new(s.endpoint(), key.address) == *key
                    && !s.backends.iter().any(|b| b.address == key.address)
            })
        });
    }

    /// After adopting a director: backends its maps hold that the config no longer lists
    /// (removed while no controller ran, or retired before a restart) are retired, so their
    /// established flows finish as after a reload.
    fn adopt_removed(&mut self) {
        let cfg = self.cfg.clone();
        let known: Vec<(BackendKey, u32)> =
            self.ids.backends.iter().map(|(k, v)| (*k, *v)).collect();
        for (key, id) in known {
            let Some(svc) = cfg
                .services
                .iter()
                .find(|s| BackendKey::new(s.endpoint(), key.address) == key)
            else {
                continue;
            };
            if svc.backends.iter().any(|b| b.address == key.address)
                || svc.on_backend_down != crate::config::DownPolicy::Keep
            {
                continue;
            }
            let Some(entry) = self.director.backend_entry(id) else {
                continue;
            };
            let port = u16::from_be(entry.port_be);
            let backend = crate::config::Backend {
                address: key.address,
                weight: 0,
                mac: (svc.mode == Mode::Dr).then(|| crate::config::Mac(entry.mac).to_string()),
                port: (port != 0).then_some(port),
            };
            tracing::info!(
                "backend {key} is not in the config: kept while its established flows finish"
            );
            self.retired.insert(key, (backend, Instant::now()));
        }
    }

    /// `lc`/`wlc`: turn the data plane's active-flow counts into table shares.
    fn least_connections(&mut self) {
        let mut changed = false;
        for svc in &self.cfg.services {
            if !matches!(
                svc.scheduler,
                crate::config::Scheduler::Lc | crate::config::Scheduler::Wlc
            ) {
                continue;
            }
            for b in &svc.backends {
                let key = BackendKey::new(svc.endpoint(), b.address);
                let Some(&id) = self.ids.backends.get(&key) else {
                    continue;
                };
                let n = self.director.maps.active_flows(id).unwrap_or(0);
                let rt = self.runtime.entry(key).or_default();
                if rt.active != n {
                    rt.active = n;
                    changed = true;
                }
            }
        }
        if changed {
            if let Err(e) = self.reconcile("least connections") {
                tracing::error!("{e:#}");
            }
        }
    }

    /// `xdplb drain` / `undrain`: SERVICE is the service name, BACKEND its address.
    fn drain(&mut self, service: &str, backend: &str, on: bool) -> Result<String, String> {
        let svc = self
            .cfg
            .services
            .iter()
            .find(|s| s.name == service)
            .ok_or_else(|| {
                format!(
                    "no service `{service}`; services: {}",
                    self.cfg
                        .services
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        let addr: IpAddr = backend
            .parse()
            .map_err(|_| format!("`{backend}` is not an IP address"))?;
        if !svc.backends.iter().any(|b| b.address == addr) {
            return Err(format!("service `{service}` has no backend {addr}"));
        }
        let key = BackendKey::new(svc.endpoint(), addr);
        self.runtime.entry(key).or_default().drained = on;
        let what = if on { "drained" } else { "undrained" };
        self.reconcile(what).map_err(|e| format!("{e:#}"))?;
        tracing::info!(backend = %key, "backend {what}");
        Ok(format!(
            "{key} {what}: {}",
            if on {
                "no new flows; established flows finish"
            } else {
                "takes new flows again"
            }
        ))
    }

    async fn control(&mut self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["drain", svc, backend] => self.drain(svc, backend, true),
            ["undrain", svc, backend] => self.drain(svc, backend, false),
            ["reload"] => self.reload("xdplb reload").await,
            ["view"] => {
                if self.view_stale {
                    self.refresh_view();
                }
                serde_json::to_string(&*self.view.lock().expect("view")).map_err(|e| e.to_string())
            }
            _ => Err(format!("unknown request `{line}`")),
        }
    }

    /// Remove flows of reset or removed backends and idle UDP flows; let retired backends
    /// go once no flow points at them (or after [`RETIRE_MAX`]).
    fn sweep(&mut self) {
        let swept = match self.director.sweep(self.cfg.udp_idle_timeout()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("sweeping ended flows: {e}");
                return;
            }
        };
        if swept.removed > 0 {
            tracing::debug!("removed {} ended flow(s)", swept.removed);
        }
        if swept.cleaned > 0 || !swept.blocked.is_empty() {
            tracing::debug!(
                "ring fast path: {} slot(s) clean again, {} kept dirty by flows on an old backend",
                swept.cleaned,
                swept.blocked.len()
            );
        }
        // Correct the data plane's per-backend counts from the table (flows the table evicted
        // were never counted down).
        for &id in self.ids.backends.values() {
            let n = swept.live.get(&id).copied().unwrap_or(0) as u64;
            if let Err(e) = self.director.maps.set_active_flows(id, n) {
                tracing::warn!("correcting active flows of backend {id}: {e}");
            }
        }
        if self.director.leaving_done() {
            if let Err(e) = self.reconcile("ring fast path hold over") {
                tracing::error!("{e:#}");
            }
        }
        let before = self.retired.len();
        let ids = &self.ids;
        self.retired.retain(|key, (_, since)| {
            let flows = ids
                .backends
                .get(key)
                .and_then(|id| swept.live.get(id))
                .copied()
                .unwrap_or(0);
            let keep = flows > 0 && since.elapsed() < RETIRE_MAX;
            if !keep {
                tracing::info!(backend = %key, flows, "removed backend is gone");
            }
            keep
        });
        if self.retired.len() != before {
            if let Err(e) = self.reconcile("retired backends") {
                tracing::error!("{e:#}");
            }
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// (inode, mtime s, mtime ns, size) of a file, to notice a change without reading it.
fn file_stamp(path: &Path) -> Option<(u64, i64, i64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.mtime(), m.mtime_nsec(), m.size()))
}

/// Holds `/run/xdplb/<name>.lock` for the controller's lifetime: one controller per director.
struct Lock {
    _file: std::fs::File,
    path: PathBuf,
}

impl Lock {
    fn take(pin_dir: &Path) -> anyhow::Result<Lock> {
        use std::os::fd::AsRawFd as _;
        let path = control_path(pin_dir, "lock");
        std::fs::create_dir_all(path.parent().expect("has parent"))?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .read(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            anyhow::bail!(
                "another `xdplb run` (pid {}) manages the director pinned under {}; stop it first \
                 (or use `xdplb reload` / `xdplb drain` to talk to it)",
                pid.trim(),
                pin_dir.display()
            );
        }
        file.set_len(0)?;
        std::io::Write::write_all(&mut &file, std::process::id().to_string().as_bytes())?;
        Ok(Lock { _file: file, path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // `/run/xdplb/` goes too once no other controller uses it (fails while not empty).
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

pub async fn run(opts: RunOptions<'_>) -> anyhow::Result<()> {
    let cfg = Config::load(opts.config, &ThisHost)?;
    let seen_text = std::fs::read_to_string(opts.config)?;
    let _lock = Lock::take(opts.pin_dir)?;
    let nl = Netlink::new().context("opening rtnetlink")?;
    let mut iface_macs = Vec::new();
    for iface in &cfg.interfaces {
        iface_macs.push(nl.link_mac(&iface.name).await?);
    }
    let mut macs = HashMap::new();
    backend_macs(&nl, &cfg, &mut macs).await?;
    prepare_routes(&nl, &cfg).await;

    let director = Director::load(&dataplane::LoadOptions {
        flow_table_size: cfg.flow_table_size(),
        pin_dir: Some(opts.pin_dir),
        adopt: true,
        debug_log: opts.debug_log,
        udp_idle: cfg.udp_idle_timeout(),
        ring_fast: cfg.ring_fast(),
        flow_cache_size: cfg.flow_cache_size(),
        ..Default::default()
    })?;
    let (ids, runtime) = match director.origin {
        Origin::Fresh => Default::default(),
        Origin::Adopted { program_replaced } => {
            let (ids, runtime) = director.recover()?;
            tracing::info!(
                "adopted the director pinned under {} ({} backend(s), flow table kept); program {}",
                opts.pin_dir.display(),
                ids.backends.len(),
                if program_replaced {
                    "replaced atomically"
                } else {
                    "unchanged"
                }
            );
            (ids, runtime)
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut c = Controller {
        config_path: opts.config.to_path_buf(),
        cfg,
        seen_stamp: file_stamp(opts.config),
        seen_text,
        director,
        ids,
        runtime,
        macs,
        checks: HashMap::new(),
        retired: HashMap::new(),
        last_report: HashMap::new(),
        reports: tx,
        nl,
        debug_log: opts.debug_log,
        generation: 1,
        view: Default::default(),
        view_stale: false,
        last_reconcile_unix: 0.0,
        reconcile_errors: 0,
        metrics: None,
        pin_dir: opts.pin_dir.to_path_buf(),
    };
    if opts.debug_log {
        tracing::warn!("per-packet debug logging is on: expect a much slower data plane");
        let logger = c.director.logger(log::logger())?;
        // SAFETY: the logger owns its ring buffer fd, which stays open and unchanged for as
        // long as the AsyncFd (which owns the logger) lives.
        let mut fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| anyhow::anyhow!("watching the debug log: {}", e.into_parts().1))?;
        tokio::spawn(async move {
            while let Ok(mut guard) = fd.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }
    c.adopt_removed();
    c.sync_checks();
    c.first_results(&mut rx).await;
    let fresh = c.director.origin == Origin::Fresh;
    let setup = (|| -> anyhow::Result<()> {
        // Maps first, so the first packet the program sees meets a complete configuration.
        c.reconcile("start")?;
        for (iface, mac) in c.cfg.interfaces.iter().zip(&iface_macs) {
            c.director.attach(
                &iface.name,
                iface.xdp_mode,
                dataplane::iface_info(iface, *mac),
            )?;
        }
        for name in dataplane::pinned_interfaces(opts.pin_dir) {
            if !c.cfg.interfaces.iter().any(|i| i.name == name) {
                c.director.detach_interface(&name)?;
            }
        }
        Ok(())
    })();
    if let Err(e) = setup {
        if fresh {
            c.director.unpin().ok();
        }
        return Err(e);
    }
    tracing::info!(
        "xdplb running: {} service(s), {} backend(s) on {}",
        c.cfg.services.len(),
        c.ids.backends.len(),
        c.cfg
            .interfaces
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );

    c.sync_metrics()?;
    let sock_path = control_path(opts.pin_dir, "sock");
    let _ = std::fs::remove_file(&sock_path);
    let control = tokio::net::UnixListener::bind(&sock_path)
        .with_context(|| format!("control socket {}", sock_path.display()))?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // Keep the next hops of routed backends in the neighbour table: the kernel sees none of
    // the traffic XDP forwards, so it would otherwise let the entries lapse.
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut lc = tokio::time::interval(LC_INTERVAL);
    let mut replies = ReplyWatch::default();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(r) = rx.recv() => {
                let mut changed = c.on_report(r);
                // Take everything already queued, then write once.
                while let Ok(r) = rx.try_recv() {
                    changed |= c.on_report(r);
                }
                if changed {
                    if let Err(e) = c.reconcile("health") {
                        tracing::error!("applying health changes: {e:#}");
                    }
                }
            }
            _ = hup.recv() => { let _ = c.reload("SIGHUP").await; }
            _ = watch.tick() => {
                if c.view_stale {
                    c.refresh_view();
                }
                let stamp = file_stamp(&c.config_path);
                if stamp != c.seen_stamp {
                    c.seen_stamp = stamp;
                    if let Ok(text) = std::fs::read_to_string(&c.config_path) {
                        if text != c.seen_text {
                            let _ = c.reload("config file changed").await;
                        }
                    }
                }
            }
            Ok((stream, _)) = control.accept() => {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader = tokio::io::BufReader::new(read);
                let reply = match tokio::time::timeout(Duration::from_secs(2), reader.read_line(&mut line)).await {
                    Ok(Ok(_)) => match c.control(line.trim()).await {
                        Ok(m) => format!("ok: {m}\n"),
                        Err(m) => format!("error: {m}\n"),
                    },
                    _ => "error: no request\n".to_string(),
                };
                let _ = write.write_all(reply.as_bytes()).await;
                let _ = write.shutdown().await;
            }
            _ = lc.tick() => c.least_connections(),
            _ = refresh.tick() => backends_of(&c.cfg, &[Mode::Tun, Mode::Nat, Mode::Fullnat])
                .into_iter()
                .for_each(crate::netlink::poke),
            _ = sweep.tick() => {
                c.sweep();
                if let Ok(totals) = c.director.maps.reason_totals() {
                    replies.check(&totals);
                }
            }
        }
    }
    for check in c.checks.values() {
        check.task.abort();
    }
    let _ = std::fs::remove_file(&sock_path);
    if opts.keep_attached {
        tracing::info!(
            "exiting; director left attached and pinned under {}",
            opts.pin_dir.display()
        );
        // Dropping the loader must not detach: links are pinned, maps are pinned.
        std::mem::forget(c.director);
    } else {
        c.director.unpin()?;
        tracing::info!("detached and unpinned");
    }
    Ok(())
}

/// Send one request to the running controller's control socket; returns its answer.
pub fn request(pin_dir: &Path, line: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    let path = control_path(pin_dir, "sock");
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no controller is running for {} (no {}); start one with `xdplb run --config FILE`",
            pin_dir.display(),
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    // The answer may span lines (a rejected config); the controller closes after it.
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut s, &mut answer)?;
    Ok(answer.trim_end().to_string())
}

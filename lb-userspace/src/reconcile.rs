//! Desired state (config + health + drains) -> maps, writing only the differences.
//!
//! Ids are stable: a service keeps its id (and so its rings and counters) and a backend keeps
//! its id (which established flows point at) across reloads and controller restarts; a
//! restarted controller recovers them from the pinned maps. Freed ids are reused as late as
//! possible (a rotating cursor), so a flow of a removed backend is not silently handed to a
//! new backend that took its id.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use lb_common::{
    Backend, RingEntry, ServiceMeta, ServiceSlot, SnatAddr, VipAddr, VipKey, BACKEND_F_DOWN,
    BACKEND_F_DRAINED, BACKEND_F_RESET, BACKEND_F_RETIRED, BACKEND_F_VALID, INDEX_SLOT_SHARED,
    MAX_BACKENDS, MAX_SERVICES, RINGS_PER_SERVICE, RING_DIRTY_WORDS, RING_ENTRIES, RING_SIZE,
    RING_SLOTS_PER_ENTRY, SERVICE_F_DROP_NO_BACKEND, SERVICE_F_RING_FAST, SERVICE_F_RING_HELD,
    SERVICE_INDEX_SLOTS, VIP_FILTER_WORDS,
};

use crate::{
    config::{self, AllDownPolicy, DownPolicy, Scheduler},
    dataplane::{addr_bytes, addr_from_bytes, Desired, DesiredService, Maps, Result},
    health::{BackendKey, State},
};

/// Stable id allocation for services (by VIP key) and backends (by service + address).
#[derive(Debug, Default, Clone)]
pub struct Ids {
    pub services: BTreeMap<VipKey, u32>,
    pub backends: BTreeMap<BackendKey, u32>,
    next_service: u32,
    next_backend: u32,
    /// Last Maglev table per service id and the entries it was built from: a reconcile
    /// rebuilds only the tables whose backends changed.
    tables: HashMap<u32, (bool, Vec<crate::maglev::Entry>, Vec<u32>)>,
}

fn take_free(used: &BTreeSet<u32>, cursor: &mut u32, max: u32) -> u32 {
    for i in 0..max {
        let id = (*cursor + i) % max;
        if !used.contains(&id) {
            *cursor = (id + 1) % max;
            return id;
        }
    }
    unreachable!("validation caps services and backends below the map sizes")
}

impl Ids {
    /// Keep the ids of what `cfg` still has, allocate ids for what is new, forget the rest.
    fn assign(&mut self, cfg: &config::Config) {
        // In config order, so a fresh director numbers things as the file lists them.
        let want_services: Vec<VipKey> = cfg.services.iter().map(vip_key).collect();
        self.services.retain(|k, _| want_services.contains(k));
        let want_backends = crate::health::backend_keys(cfg);
        let wanted: HashSet<&BackendKey> = want_backends.iter().collect();
        self.backends.retain(|k, _| wanted.contains(k));
        let mut used: BTreeSet<u32> = self.services.values().copied().collect();
        for k in want_services {
            if !self.services.contains_key(&k) {
                let id = take_free(&used, &mut self.next_service, MAX_SERVICES);
                used.insert(id);
                self.services.insert(k, id);
            }
        }
        let mut used: BTreeSet<u32> = self.backends.values().copied().collect();
        for k in want_backends {
            if !self.backends.contains_key(&k) {
                let id = take_free(&used, &mut self.next_backend, MAX_BACKENDS);
                used.insert(id);
                self.backends.insert(k, id);
            }
        }
    }
}

pub fn vip_key(s: &config::Service) -> VipKey {
    let (addr, family) = addr_bytes(s.vip);
    VipKey {
        addr,
        port_be: s.port.to_be(),
        proto: s.protocol.number(),
        family,
    }
}

fn key_endpoint(k: &VipKey) -> (IpAddr, u16, u8) {
    (
        addr_from_bytes(k.addr, k.family),
        u16::from_be(k.port_be),
        k.proto,
    )
}

/// What the reconciler knows about a backend besides the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Runtime {
    pub state: State,
    /// Drained at run time (`xdplb drain`).
    pub drained: bool,
    /// Removed from the config, kept while its flows finish.
    pub retired: bool,
    /// Active flows (for `lc`/`wlc`).
    pub active: u64,
}

impl Default for Runtime {
    fn default() -> Self {
        Runtime {
            state: State::Up,
            drained: false,
            retired: false,
            active: 0,
        }
    }
}

/// Desired map contents for a validated config. `mac_of` gives each backend's next-hop
/// MAC (configured or resolved); `runtime` its health and drain state.
pub fn desired(
    cfg: &config::Config,
    ids: &mut Ids,
    mac_of: impl Fn(&config::Backend) -> [u8; 6],
    runtime: impl Fn(&BackendKey) -> Runtime,
) -> Desired {
    ids.assign(cfg);
    let mut out = Desired::default();
    if let Some(f) = &cfg.fullnat {
        for ipv4 in [true, false] {
            out.snat_pool.extend(
                f.pool
                    .iter()
                    .filter(|a| a.is_ipv4() == ipv4)
                    .map(|a| addr_bytes(*a).0),
            );
        }
        out.snat = lb_common::SnatConfig {
            v4_count: f.pool.iter().filter(|a| a.is_ipv4()).count() as u32,
            v6_count: f.pool.iter().filter(|a| a.is_ipv6()).count() as u32,
            port_min: u32::from(f.port_min),
            port_max: u32::from(f.port_max),
        };
    }
    for svc in &cfg.services {
        let key = vip_key(svc);
        let sid = ids.services[&key];
        let mut entries = Vec::new();
        for b in &svc.backends {
            let bkey = BackendKey::new(svc.endpoint(), b.address);
            let id = ids.backends[&bkey];
            let rt = runtime(&bkey);
            let mut flags = BACKEND_F_VALID;
            if rt.state == State::Down {
                flags |= BACKEND_F_DOWN;
                if svc.on_backend_down == DownPolicy::Reset {
                    flags |= BACKEND_F_RESET;
                }
            }
            if rt.drained {
                flags |= BACKEND_F_DRAINED;
            }
            if rt.retired {
                flags |= BACKEND_F_RETIRED;
            }
            let (addr, family) = addr_bytes(b.address);
            out.backends.insert(
                id,
                Backend {
                    addr,
                    mac: mac_of(b),
                    family,
                    flags,
                    service: sid,
                    weight: b.weight,
                    port_be: b.port.unwrap_or(0).to_be(),
                    _pad: [0; 2],
                },
            );
            // In the ring: up, not drained, weight above 0.
            if rt.state == State::Up && !rt.drained && b.weight > 0 {
                entries.push(crate::maglev::Entry {
                    identity: b.address.to_string(),
                    weight: table_weight(svc.scheduler, b.weight, rt.active),
                    id,
                });
            }
        }
        let mut v = [0u8; 17];
        v[..16].copy_from_slice(&key.addr);
        v[16] = key.family;
        out.vips.insert(v);
        out.services.push(DesiredService {
            key,
            id: sid,
            mode: match svc.mode {
                config::Mode::Dr => lb_common::mode::DR,
                config::Mode::Tun => lb_common::mode::TUN,
                config::Mode::Nat => lb_common::mode::NAT,
                config::Mode::Fullnat => lb_common::mode::FULLNAT,
            },
            flags: if svc.on_all_down == AllDownPolicy::Drop {
                SERVICE_F_DROP_NO_BACKEND
            } else {
                0
            } | if svc.ring_fast_path {
                SERVICE_F_RING_FAST
            } else {
                0
            },
            scheduler: match svc.scheduler {
                Scheduler::Rr | Scheduler::Wrr => lb_common::sched::ROUND_ROBIN,
                _ => lb_common::sched::HASH,
            },
            hash_fields: hash_bits(svc),
            rr_len: match svc.scheduler {
                Scheduler::Rr | Scheduler::Wrr => {
                    crate::maglev::smooth_wrr_len(&entries, RING_SIZE as usize) as u32
                }
                _ => 0,
            },
            persist_s: svc.persistence.as_secs() as u32,
            ring: ids.table(sid, svc.scheduler, entries),
            hold: svc.ring_fast_path_hold,
        });
    }
    let live: HashSet<u32> = ids.services.values().copied().collect();
    ids.tables.retain(|sid, _| live.contains(sid));
    out
}

/// `ServiceMeta::hash_fields` of a service: the fields its ring slot is hashed from.
pub fn hash_bits(svc: &config::Service) -> u8 {
    match (svc.scheduler, &svc.hash_fields) {
        (Scheduler::Sh, _) => lb_common::hash::SRC_IP,
        (_, Some(f)) => f.iter().fold(0, |a, h| a | h.bit()),
        _ => 0,
    }
}

impl Ids {
    fn table(
        &mut self,
        sid: u32,
        scheduler: Scheduler,
        entries: Vec<crate::maglev::Entry>,
    ) -> Vec<u32> {
        let rr = matches!(scheduler, Scheduler::Rr | Scheduler::Wrr);
        match self.tables.get(&sid) {
            Some((r, e, t)) if *e == entries && *r == rr => t.clone(),
            _ => {
                let t = if rr {
                    crate::maglev::smooth_wrr(&entries, RING_SIZE as usize)
                } else {
                    crate::maglev::build(&entries, RING_SIZE)
                };
                self.tables.insert(sid, (rr, entries, t.clone()));
                t
            }
        }
    }
}

/// The weight a backend gets in its service's table: the configured one (maglev, sh, wrr),
/// 1 for every backend (rr), or (lc, wlc) one that shrinks with its active flows, so the
/// least loaded backends take most new flows until the next update.
pub fn table_weight(s: Scheduler, weight: u32, active: u64) -> u32 {
    /// Resolution of the load-derived weights.
    const SCALE: u64 = 1000;
    match s {
        Scheduler::Maglev | Scheduler::Sh | Scheduler::Wrr => weight,
        Scheduler::Rr => 1,
        Scheduler::Lc => (SCALE / (active + 1)).max(1) as u32,
        Scheduler::Wlc => {
            (u64::from(weight) * SCALE / (active + 1)).clamp(1, u64::from(u32::MAX)) as u32
        }
    }
}

/// What one [`MapState::apply`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub backends_written: usize,
    pub backends_removed: usize,
    pub rings_flipped: usize,
    pub ring_slots_written: usize,
    pub services_written: usize,
    pub services_removed: usize,
    pub vips_changed: usize,
    pub snat_written: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl std::fmt::Display for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("no changes");
        }
        write!(
            f,
            "{} backend(s) written, {} removed; {} ring(s) flipped ({} slots written); {} service(s) \
             written, {} removed; {} VIP change(s); {} full-NAT entries",
            self.backends_written,
            self.backends_removed,
            self.rings_flipped,
            self.ring_slots_written,
            self.services_written,
            self.services_removed,
            self.vips_changed,
            self.snat_written
        )
    }
}

/// `VIP_FILTER`'s words with the bit of every address set.
pub fn vip_filter<'a>(vips: impl Iterator<Item = (&'a [u8; 16], u8)>) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for (addr, family) in vips {
        let bit = lb_common::vip_filter_bit(addr, family);
        words[(bit / 64) as usize] |= 1 << (bit % 64);
    }
    words
}

/// What the controller knows the maps hold, so that applying a desired state writes only
/// what differs: the backend entries and every ring's slots. No `Default`: an empty
/// `vip_filter` shadow would make `write_vip_filter` write nothing; build it with
/// [`MapState::fresh`] or [`MapState::read`].
#[derive(Debug)]
pub struct MapState {
    backends: BTreeMap<u32, Backend>,
    /// Non-empty `SERVICE_SLOTS` entries, by service id.
    service_slots: BTreeMap<u32, ServiceSlot>,
    /// Ring index -> slots, filled on first use.
    rings: HashMap<u32, Vec<u32>>,
    /// The maps were created empty by us (rings are all zero), not adopted.
    fresh: bool,
    /// `VIP_FILTER`'s words as written.
    vip_filter: Vec<u64>,
    /// `RING_DIRTY`'s words of held services ([`SERVICE_F_RING_HELD`]) as written, by
    /// service id (filled on first use).
    dirty: HashMap<u32, Vec<u64>>,
    /// When a held service's slots last turned dirty (see [`DIRTY_GRACE`]).
    dirty_since: HashMap<u32, Instant>,
    /// `RING_HELD` as written, by service id (filled on first use).
    held: HashMap<u32, Vec<RingEntry>>,
    /// Per held service and ring slot: until when (seconds since `epoch`) a dirty slot
    /// keeps its held backend for connections the table lacks; 0 for none.
    hold_until: HashMap<u32, Vec<u32>>,
    /// `ring_fast_path_hold` of each service, as last applied.
    holds: HashMap<u32, Duration>,
    /// Services whose ring fast path was turned off, and when: they stay held (changed
    /// slots keep their old backends) for `ring_fast_path_hold` and while slots are dirty.
    left: HashMap<u32, Instant>,
    epoch: Instant,
    /// `SERVICE_INDEX` as written.
    index: Vec<u32>,
}

/// A sweep clears a service's dirty slots only when they turned dirty at least this long
/// before it began: a packet that read the ring just before it changed may still be
/// recording its flow (with the old backend) while the sweep walks the table.
pub const DIRTY_GRACE: Duration = Duration::from_secs(1);

/// Ring-fast-path services whose dirty slots a sweep may clear: id -> (`hash_fields`, the
/// live ring). The sweep reports the slots a flow still holds with another backend.
#[derive(Debug, Default)]
pub struct DirtyCheck {
    pub services: HashMap<u32, (u8, Vec<u32>)>,
}

impl DirtyCheck {
    /// The ring slot of `key` in service `id`, if a flow there with `backend` keeps the slot
    /// dirty (its backend is not the ring's).
    pub fn blocks(&self, id: u32, key: &lb_common::FlowKey, backend: u32) -> Option<u32> {
        let (fields, ring) = self.services.get(&id)?;
        let pos = lb_common::flow_hash_fields(key, *fields) % RING_SIZE;
        (ring[pos as usize] != backend).then_some(pos)
    }
}

/// Bits set in `words` (dirty slots in `RING_DIRTY` words).
fn ones(words: &[u64]) -> usize {
    words.iter().map(|w| w.count_ones() as usize).sum()
}

/// The `SERVICE_INDEX` slot of a service key.
pub fn index_slot_of(key: &VipKey) -> u32 {
    let (lo, hi) = lb_common::addr_halves(&key.addr);
    lb_common::index_slot(lo, hi, key.family, key.port_be, key.proto)
}

/// Write the elements of array map `map` from index `base` on whose shadow `have` (what was
/// written) differs from `want`, and update the shadow. Returns how many were written.
fn write_changed<T: aya::Pod + PartialEq>(
    map: &mut aya::maps::Array<aya::maps::MapData, T>,
    base: u32,
    have: &mut [T],
    want: &[T],
) -> Result<usize> {
    let mut n = 0;
    for (i, (have, want)) in have.iter_mut().zip(want).enumerate() {
        if have != want {
            map.set(base + i as u32, *want, 0)?;
            *have = *want;
            n += 1;
        }
    }
    Ok(n)
}

impl MapState {
    /// For maps just created (every entry zero).
    pub fn fresh() -> Self {
        MapState {
            backends: BTreeMap::new(),
            service_slots: BTreeMap::new(),
            rings: HashMap::new(),
            fresh: true,
            vip_filter: vec![0; VIP_FILTER_WORDS as usize],
            dirty: HashMap::new(),
            dirty_since: HashMap::new(),
            held: HashMap::new(),
            hold_until: HashMap::new(),
            holds: HashMap::new(),
            left: HashMap::new(),
            epoch: Instant::now(),
            index: vec![0; SERVICE_INDEX_SLOTS as usize],
        }
    }

    /// For maps someone else filled (an adopted director): read what they hold.
    pub fn read(m: &Maps) -> Result<Self> {
        let mut backends = BTreeMap::new();
        for id in 0..MAX_BACKENDS {
            let b = m.backends.get(&id, 0)?;
            if b.flags & BACKEND_F_VALID != 0 {
                backends.insert(id, b);
            }
        }
        let mut service_slots = BTreeMap::new();
        for id in 0..MAX_SERVICES {
            let slot = m.service_slots.get(&id, 0)?;
            if slot != ServiceSlot::default() {
                service_slots.insert(id, slot);
            }
        }
        let vip_filter = (0..VIP_FILTER_WORDS)
            .map(|i| m.vip_filter.get(&i, 0))
            .collect::<std::result::Result<_, _>>()?;
        let index = (0..SERVICE_INDEX_SLOTS)
            .map(|i| m.service_index.get(&i, 0))
            .collect::<std::result::Result<_, _>>()?;
        Ok(MapState {
            backends,
            service_slots,
            fresh: false,
            vip_filter,
            index,
            ..Self::fresh()
        })
    }

    /// Set the `VIP_FILTER` bits of every service's VIP in the maps (adopted maps may come
    /// from a director that had no filter).
    pub fn cover_pinned_vips(&mut self, m: &mut Maps) -> Result<()> {
        let vips: Vec<VipKey> = m.services.keys().filter_map(|k| k.ok()).collect();
        let want = vip_filter(vips.iter().map(|k| (&k.addr, k.family)));
        self.write_vip_filter(m, &want, true)
    }

    /// Write the filter words that differ from `want` (`add_only`: set `want`'s bits, clear
    /// none).
    fn write_vip_filter(&mut self, m: &mut Maps, want: &[u64], add_only: bool) -> Result<()> {
        let next: Vec<u64> = if add_only {
            self.vip_filter
                .iter()
                .zip(want)
                .map(|(h, w)| h | w)
                .collect()
        } else {
            want.to_vec()
        };
        write_changed(&mut m.vip_filter, 0, &mut self.vip_filter, &next)?;
        Ok(())
    }

    /// The ids, health and drains recorded in adopted maps.
    pub fn recover(&self, m: &Maps) -> Result<(Ids, HashMap<BackendKey, Runtime>)> {
        let mut ids = Ids::default();
        let mut by_id: HashMap<u32, VipKey> = HashMap::new();
        for (key, meta) in m.services.iter().filter_map(|r| r.ok()) {
            ids.services.insert(key, meta.id);
            by_id.insert(meta.id, key);
        }
        let mut runtime = HashMap::new();
        for (&id, b) in &self.backends {
            let Some(svc) = by_id.get(&b.service) else {
                continue;
            };
            let (vip, port, proto) = key_endpoint(svc);
            let key = BackendKey {
                vip,
                port,
                proto,
                address: addr_from_bytes(b.addr, b.family),
            };
            ids.backends.insert(key, id);
            runtime.insert(
                key,
                Runtime {
                    state: if b.flags & BACKEND_F_DOWN != 0 {
                        State::Down
                    } else {
                        State::Up
                    },
                    drained: b.flags & BACKEND_F_DRAINED != 0,
                    retired: b.flags & BACKEND_F_RETIRED != 0,
                    active: 0,
                },
            );
        }
        // Continue allocating after the highest id in use.
        ids.next_service = ids.services.values().max().map_or(0, |m| m + 1) % MAX_SERVICES;
        ids.next_backend = ids.backends.values().max().map_or(0, |m| m + 1) % MAX_BACKENDS;
        Ok((ids, runtime))
    }

    fn ring(&mut self, m: &Maps, ring: u32) -> Result<&mut Vec<u32>> {
        if !self.rings.contains_key(&ring) {
            let mut slots = Vec::with_capacity(RING_SIZE as usize);
            if self.fresh {
                slots.resize(RING_SIZE as usize, 0);
            } else {
                for e in 0..RING_ENTRIES {
                    let entry = m.rings.get(&(ring * RING_ENTRIES + e), 0)?;
                    slots.extend((0..RING_SLOTS_PER_ENTRY).map(|i| entry.slot(i)));
                }
                slots.truncate(RING_SIZE as usize);
            }
            self.rings.insert(ring, slots);
        }
        Ok(self.rings.get_mut(&ring).expect("just inserted"))
    }

    /// Seconds since `epoch`, from 1.
    fn now_s(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32 + 1
    }

    /// `hold` from now, in [`Self::now_s`] seconds (rounded up).
    fn until_s(&self, hold: Duration) -> u32 {
        self.now_s() + hold.as_secs() as u32 + u32::from(hold.subsec_nanos() > 0)
    }

    fn hold_of(&self, id: u32) -> Duration {
        self.holds
            .get(&id)
            .copied()
            .unwrap_or(config::RING_FAST_PATH_HOLD_DEFAULT)
    }

    /// Service `id`'s `RING_DIRTY` words as written (an adopted director's are read; their
    /// age is unknown, so they count as dirty, and held, from now).
    fn dirty_words(&mut self, m: &Maps, id: u32) -> Result<&mut Vec<u64>> {
        if !self.dirty.contains_key(&id) {
            let words: Vec<u64> = if self.fresh {
                vec![0; RING_DIRTY_WORDS as usize]
            } else {
                self.dirty_since.insert(id, Instant::now());
                (0..RING_DIRTY_WORDS)
                    .map(|w| m.ring_dirty.get(&(id * RING_DIRTY_WORDS + w), 0))
                    .collect::<std::result::Result<_, _>>()?
            };
            let until = self.until_s(self.hold_of(id));
            let hold = (0..RING_SIZE)
                .map(|p| {
                    if words[(p / 64) as usize] >> (p % 64) & 1 != 0 {
                        until
                    } else {
                        0
                    }
                })
                .collect();
            self.hold_until.insert(id, hold);
            self.dirty.insert(id, words);
        }
        Ok(self.dirty.get_mut(&id).expect("just inserted"))
    }

    /// Service `id`'s `RING_HELD` entries as written (an adopted director's are read).
    fn held_entries(&mut self, m: &Maps, id: u32) -> Result<&mut Vec<RingEntry>> {
        if !self.held.contains_key(&id) {
            let entries = if self.fresh {
                vec![bytemuck::Zeroable::zeroed(); RING_ENTRIES as usize]
            } else {
                (0..RING_ENTRIES)
                    .map(|e| m.ring_held.get(&(id * RING_ENTRIES + e), 0))
                    .collect::<std::result::Result<_, _>>()?
            };
            self.held.insert(id, entries);
        }
        Ok(self.held.get_mut(&id).expect("just inserted"))
    }

    /// Mark ring slots `positions` of service `id` dirty, writing what changes: a slot
    /// that was clean holds its backend in `before` (the ring as it was) for `hold`, so
    /// connections the table lacks keep it; a slot already dirty keeps what it holds.
    fn mark_dirty(
        &mut self,
        m: &mut Maps,
        id: u32,
        positions: &[u32],
        before: &[u32],
        hold: Duration,
    ) -> Result<()> {
        let until = self.until_s(hold);
        let mut want = self.dirty_words(m, id)?.clone();
        let mut held = self.held_entries(m, id)?.clone();
        let hold_until = self.hold_until.get_mut(&id).expect("filled by dirty_words");
        for &p in positions {
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            if want[w] & bit == 0 {
                want[w] |= bit;
                held[(p / RING_SLOTS_PER_ENTRY) as usize].set_slot(p, before[p as usize]);
                hold_until[p as usize] = until;
            }
        }
        self.write_dirty(m, id, &held, &want)
    }

    /// Every slot of service `id` dirty, holding its backend in `ring` with no hold: for a
    /// service that just turned the fast path on (every connection it has is in the table)
    /// or put its flows on other slots (`hash_fields` changed).
    fn reset_dirty(&mut self, m: &mut Maps, id: u32, ring: &[u32]) -> Result<()> {
        self.dirty_words(m, id)?;
        self.held_entries(m, id)?;
        let mut want = vec![u64::MAX; RING_DIRTY_WORDS as usize];
        // Only the ring's slots: the last word holds RING_SIZE % 64 of them.
        if let Some(last) = want.last_mut() {
            *last = (1 << (RING_SIZE % 64)) - 1;
        }
        let held: Vec<RingEntry> = ring
            .chunks(RING_SLOTS_PER_ENTRY as usize)
            .map(RingEntry::pack)
            .collect();
        self.hold_until.insert(id, vec![0; RING_SIZE as usize]);
        self.write_dirty(m, id, &held, &want)
    }

    /// Write service `id`'s held backends, then its dirty bits (a packet that sees a bit
    /// set finds its held backend written).
    fn write_dirty(
        &mut self,
        m: &mut Maps,
        id: u32,
        held: &[RingEntry],
        want: &[u64],
    ) -> Result<()> {
        let have = self.held.get_mut(&id).expect("filled by held_entries");
        write_changed(&mut m.ring_held, id * RING_ENTRIES, have, held)?;
        let words = self.dirty.get_mut(&id).expect("filled by dirty_words");
        if write_changed(&mut m.ring_dirty, id * RING_DIRTY_WORDS, words, want)? > 0 {
            self.dirty_since.insert(id, Instant::now());
        }
        Ok(())
    }

    /// Dirty slots of service `id` (0 for a service that is not held).
    pub fn dirty_slots(&self, id: u32) -> usize {
        self.dirty.get(&id).map_or(0, |w| ones(w))
    }

    /// Whether a service whose fast path was turned off is past its hold with every slot
    /// clean: the next reconcile stops holding it.
    pub fn leaving_done(&self) -> bool {
        self.left
            .iter()
            .any(|(&id, t)| t.elapsed() >= self.hold_of(id) && self.dirty_slots(id) == 0)
    }

    /// The held services with dirty slots that a sweep starting now may clear (their last
    /// change is older than [`DIRTY_GRACE`]).
    pub fn dirty_check(&mut self, m: &Maps) -> Result<DirtyCheck> {
        let mut check = DirtyCheck::default();
        let held: Vec<(u32, ServiceMeta)> = self
            .service_slots
            .iter()
            .filter(|(_, s)| s.meta.flags & SERVICE_F_RING_HELD != 0)
            .map(|(&id, s)| (id, s.meta))
            .collect();
        for (id, meta) in held {
            if self.dirty_words(m, id)?.iter().all(|&w| w == 0) {
                continue;
            }
            if self
                .dirty_since
                .get(&id)
                .is_some_and(|t| t.elapsed() < DIRTY_GRACE)
            {
                continue;
            }
            let ring = self.ring(m, meta.ring)?.clone();
            check.services.insert(id, (meta.hash_fields, ring));
        }
        Ok(check)
    }

    /// After a sweep with `check`: clear the checked services' dirty slots except those
    /// still held (`ring_fast_path_hold` not over) or `blocked` (a flow there has another
    /// backend than the ring's). Returns how many slots turned clean.
    pub fn clear_dirty(
        &mut self,
        m: &mut Maps,
        check: &DirtyCheck,
        blocked: &HashSet<(u32, u32)>,
    ) -> Result<usize> {
        let mut cleared = 0;
        let now = self.now_s();
        for &id in check.services.keys() {
            let mut keep = vec![0u64; RING_DIRTY_WORDS as usize];
            for &(sid, pos) in blocked {
                if sid == id {
                    keep[(pos / 64) as usize] |= 1 << (pos % 64);
                }
            }
            self.dirty_words(m, id)?;
            for (p, &until) in self.hold_until[&id].iter().enumerate() {
                if until > now {
                    keep[p / 64] |= 1 << (p % 64);
                }
            }
            let words = self.dirty.get_mut(&id).expect("filled by dirty_words");
            let next: Vec<u64> = words.iter().zip(&keep).map(|(h, k)| h & k).collect();
            cleared += ones(words) - ones(&next);
            write_changed(&mut m.ring_dirty, id * RING_DIRTY_WORDS, words, &next)?;
        }
        Ok(cleared)
    }

    /// Make the maps equal to `want`, in an order that never exposes a half state: the
    /// full-NAT pool, then backends (a ring never points at an unset backend), then each
    /// changed service's inactive ring (only the slots that differ) and the service entry
    /// that flips to it; finally what is no longer wanted is removed.
    pub fn apply(&mut self, m: &mut Maps, want: &Desired) -> Result<Changes> {
        let mut ch = Changes::default();
        for (i, a) in want.snat_pool.iter().enumerate() {
            let v = SnatAddr { addr: *a };
            if m.snat_pool.get(&(i as u32), 0)? != v {
                m.snat_pool.set(i as u32, v, 0)?;
                ch.snat_written += 1;
            }
        }
        if m.snat_config.get(&0, 0)? != want.snat {
            m.snat_config.set(0, want.snat, 0)?;
            ch.snat_written += 1;
        }
        for (&id, b) in &want.backends {
            if self.backends.get(&id) != Some(b) {
                m.backends.set(id, *b, 0)?;
                self.backends.insert(id, *b);
                ch.backends_written += 1;
            }
        }
        // New VIPs' filter bits before their services exist (cleared at the end).
        let filter = vip_filter(want.services.iter().map(|s| (&s.key.addr, s.key.family)));
        self.write_vip_filter(m, &filter, true)?;
        let current: HashMap<VipKey, ServiceMeta> =
            m.services.iter().filter_map(|r| r.ok()).collect();
        for svc in &want.services {
            let first = svc.id * RINGS_PER_SERVICE;
            let live = current.get(&svc.key).filter(|meta| meta.id == svc.id);
            let live_ring_matches = match live {
                Some(meta) => *self.ring(m, meta.ring)? == svc.ring,
                None => false,
            };
            let ring = match live {
                Some(meta) if live_ring_matches => meta.ring,
                Some(meta) if meta.ring == first => first + 1,
                _ => first,
            };
            // Ring fast path: the slots whose backend changes turn dirty, holding their old
            // backend, before the ring flips, so no packet takes a changed slot without the
            // flow table, and connections the table lacks keep their backend. A service that
            // just turned the fast path on starts all dirty; one that turned it off stays
            // held for `ring_fast_path_hold` (and while slots are dirty).
            // Other hash fields put flows on other slots: all dirty too.
            let want_fast = svc.flags & SERVICE_F_RING_FAST != 0;
            let live_held = live.is_some_and(|meta| meta.flags & SERVICE_F_RING_HELD != 0);
            self.holds.insert(svc.id, svc.hold);
            let leaving = !want_fast && live_held && {
                let since = *self.left.entry(svc.id).or_insert_with(Instant::now);
                since.elapsed() < svc.hold || self.dirty_slots(svc.id) > 0
            };
            if !leaving {
                self.left.remove(&svc.id);
            }
            let held = want_fast || leaving;
            if held {
                match live.filter(|meta| live_held && meta.hash_fields == svc.hash_fields) {
                    None => {
                        if live_held {
                            tracing::warn!(
                                "service {}: hash_fields changed while its ring fast path holds slots; \
                                 connections the flow table does not hold may move",
                                svc.id
                            );
                        }
                        self.reset_dirty(m, svc.id, &svc.ring)?;
                    }
                    Some(_) if live_ring_matches => {}
                    Some(meta) => {
                        let old = self.ring(m, meta.ring)?.clone();
                        let changed: Vec<u32> = (0..RING_SIZE)
                            .filter(|&p| old[p as usize] != svc.ring[p as usize])
                            .collect();
                        self.mark_dirty(m, svc.id, &changed, &old, svc.hold)?;
                    }
                }
            }
            let flags = if held {
                svc.flags | SERVICE_F_RING_HELD
            } else {
                svc.flags
            };
            if !live_ring_matches {
                let cached = self.ring(m, ring)?;
                let base = ring * RING_ENTRIES;
                // Only the elements (four slots each) with a slot that differs are written.
                let per = RING_SLOTS_PER_ENTRY as usize;
                for (e, (want, old)) in svc.ring.chunks(per).zip(cached.chunks_mut(per)).enumerate()
                {
                    if want != old {
                        m.rings.set(base + e as u32, RingEntry::pack(want), 0)?;
                        ch.ring_slots_written +=
                            want.iter().zip(old.iter()).filter(|(a, b)| a != b).count();
                        old.copy_from_slice(want);
                    }
                }
                ch.rings_flipped += 1;
            }
            let meta = ServiceMeta {
                id: svc.id,
                ring,
                mode: svc.mode,
                flags,
                scheduler: svc.scheduler,
                hash_fields: svc.hash_fields,
                rr_len: svc.rr_len,
                persist_s: svc.persist_s,
            };
            if current.get(&svc.key) != Some(&meta) {
                m.services.insert(svc.key, meta, 0)?;
                ch.services_written += 1;
            }
            let slot = ServiceSlot { key: svc.key, meta };
            if self.service_slots.get(&svc.id) != Some(&slot) {
                m.service_slots.set(svc.id, slot, 0)?;
                self.service_slots.insert(svc.id, slot);
            }
        }
        // Every service by (VIP, port, protocol), once its entries exist; the data plane
        // checks a slot's service against the packet, so a stale one is harmless.
        let mut index = vec![0u32; SERVICE_INDEX_SLOTS as usize];
        for svc in &want.services {
            let slot = &mut index[index_slot_of(&svc.key) as usize];
            *slot = if *slot == 0 {
                svc.id + 1
            } else {
                INDEX_SLOT_SHARED
            };
        }
        write_changed(&mut m.service_index, 0, &mut self.index, &index)?;
        for key in current.keys() {
            if !want.services.iter().any(|s| s.key == *key) {
                m.services.remove(key)?;
                ch.services_removed += 1;
            }
        }
        // Slots of services that are gone: emptied (their flows take the full path and miss).
        let gone: Vec<u32> = self
            .service_slots
            .keys()
            .copied()
            .filter(|id| !want.services.iter().any(|s| s.id == *id))
            .collect();
        for id in gone {
            m.service_slots.set(id, ServiceSlot::default(), 0)?;
            self.service_slots.remove(&id);
        }
        let old_vips: HashSet<VipAddr> = m.vips.keys().filter_map(|k| k.ok()).collect();
        let new_vips: HashSet<VipAddr> = want.vips.iter().map(crate::dataplane::vip_addr).collect();
        for v in new_vips.difference(&old_vips) {
            m.vips.insert(*v, 1, 0)?;
            ch.vips_changed += 1;
        }
        for v in old_vips.difference(&new_vips) {
            m.vips.remove(v)?;
            ch.vips_changed += 1;
        }
        // Services of removed VIPs are gone now: their filter bits may go.
        self.write_vip_filter(m, &filter, false)?;
        let gone: Vec<u32> = self
            .backends
            .keys()
            .filter(|id| !want.backends.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            m.backends.set(id, Backend::default(), 0)?;
            self.backends.remove(&id);
            ch.backends_removed += 1;
        }
        Ok(ch)
    }

    /// Backend ids whose established flows are to be removed from the flow table: flagged
    /// for reset, or no longer configured (`valid` = ids of configured backends).
    pub fn evicted(&self) -> HashSet<u32> {
        self.backends
            .iter()
            .filter(|(_, b)| b.flags & BACKEND_F_RESET != 0)
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn is_configured(&self, id: u32) -> bool {
        self.backends.contains_key(&id)
    }

    /// The entry last written for backend `id`.
    pub fn backend(&self, id: u32) -> Option<&Backend> {
        self.backends.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AnyHost, Config};

    const BASE: &str = "interfaces: [{name: eth0}]\nservices:\n";

    fn svc(name: &str, port: u16, backends: &[&str]) -> String {
        let mut s = format!(
            "  - name: {name}\n    vip: 198.18.0.100\n    port: {port}\n    protocol: tcp\n    mode: dr\n    backends:\n"
        );
        for b in backends {
            s += &format!("      - {{address: {b}, mac: 02:00:00:00:00:01}}\n");
        }
        s
    }

    fn cfg(text: &str) -> Config {
        Config::parse(text, &AnyHost).expect("valid")
    }

    #[test]
    fn ids_survive_reloads_and_are_not_reused_at_once() {
        let mut ids = Ids::default();
        let a = cfg(&format!(
            "{BASE}{}{}",
            svc("web", 80, &["198.18.1.1", "198.18.1.2"]),
            svc("api", 81, &["198.18.1.3"])
        ));
        let d1 = desired(&a, &mut ids, |_| [0; 6], |_| Runtime::default());
        let id_of = |ids: &Ids, port: u16, addr: &str| {
            ids.backends[&BackendKey {
                vip: "198.18.0.100".parse().unwrap(),
                port,
                proto: 6,
                address: addr.parse().unwrap(),
            }]
        };
        let b2 = id_of(&ids, 80, "198.18.1.2");
        let b3 = id_of(&ids, 81, "198.18.1.3");
        // Remove web's first backend and the web service order changes: the others keep ids.
        let b = cfg(&format!(
            "{BASE}{}{}",
            svc("api", 81, &["198.18.1.3", "198.18.1.4"]),
            svc("web", 80, &["198.18.1.2"])
        ));
        let d2 = desired(&b, &mut ids, |_| [0; 6], |_| Runtime::default());
        assert_eq!(id_of(&ids, 80, "198.18.1.2"), b2);
        assert_eq!(id_of(&ids, 81, "198.18.1.3"), b3);
        let new = id_of(&ids, 81, "198.18.1.4");
        assert!(
            !d1.backends.contains_key(&new),
            "the freed id is not handed out at once"
        );
        assert_eq!(
            d1.services
                .iter()
                .find(|s| s.key.port_be == 80u16.to_be())
                .unwrap()
                .id,
            d2.services
                .iter()
                .find(|s| s.key.port_be == 80u16.to_be())
                .unwrap()
                .id,
            "a service keeps its id when the order changes"
        );
    }

    #[test]
    fn down_pending_and_drained_backends_leave_the_ring() {
        let mut ids = Ids::default();
        let text = format!(
            "{BASE}{}    on_backend_down: reset\n",
            svc(
                "web",
                80,
                &["198.18.1.1", "198.18.1.2", "198.18.1.3", "198.18.1.4"]
            )
        );
        let c = cfg(&text);
        let rt = |k: &BackendKey| match k.address.to_string().as_str() {
            "198.18.1.1" => Runtime {
                state: State::Down,
                ..Runtime::default()
            },
            "198.18.1.2" => Runtime {
                state: State::Pending,
                ..Runtime::default()
            },
            "198.18.1.3" => Runtime {
                drained: true,
                ..Runtime::default()
            },
            _ => Runtime::default(),
        };
        let d = desired(&c, &mut ids, |_| [0; 6], rt);
        let only: BTreeSet<u32> = d.services[0].ring.iter().copied().collect();
        let b4 = ids
            .backends
            .iter()
            .find(|(k, _)| k.address.to_string() == "198.18.1.4")
            .unwrap()
            .1;
        assert_eq!(only, BTreeSet::from([*b4]));
        let b1 = ids
            .backends
            .iter()
            .find(|(k, _)| k.address.to_string() == "198.18.1.1")
            .unwrap()
            .1;
        assert_eq!(
            d.backends[b1].flags,
            BACKEND_F_VALID | BACKEND_F_DOWN | BACKEND_F_RESET
        );
        assert_eq!(d.services[0].flags, SERVICE_F_DROP_NO_BACKEND);
    }
}

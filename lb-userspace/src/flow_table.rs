//! The controller's view of the connection table (`FLOWS`, [`lb_common::flow_table`]) and of
//! the NAT reply mappings (`NAT_REPLIES`, the same kind of table): the array
//! memory-mapped, so a walk reads it without a syscall per set and a removal clears one
//! way's tag, not a whole set the data plane may be writing another way of.

use std::{os::fd::AsFd, ptr::NonNull};

use aya::maps::{Array, IterableMap, Map, MapData};
use lb_common::{
    flow_table::{self, Set, Value, Way, WAYS},
    FlowKey, FlowValue, NatReply,
};

use crate::dataplane::{Error, Result};

/// `FLOWS` (or, of [`NatReply`]s, `NAT_REPLIES`: [`ReplyTable`]), mapped into this process.
pub struct FlowTable<V: Value = FlowValue>
where
    Set<Way<V>>: aya::Pod,
{
    /// Keeps the map's descriptor (the mapping holds the map too).
    _map: Array<MapData, Set<Way<V>>>,
    sets: NonNull<Set<Way<V>>>,
    count: u32,
    len: usize,
}

/// `NAT_REPLIES`: the reply mappings, by the reply's 5-tuple as the backend sends it.
pub type ReplyTable = FlowTable<NatReply>;

// SAFETY: the mapping is shared memory the data plane writes concurrently anyway; every
// access goes through volatile reads and writes of plain-old-data values.
unsafe impl<V: Value> Send for FlowTable<V> where Set<Way<V>>: aya::Pod {}
unsafe impl<V: Value> Sync for FlowTable<V> where Set<Way<V>>: aya::Pod {}

impl<V: Value> FlowTable<V>
where
    Set<Way<V>>: aya::Pod,
{
    pub(crate) fn open(map: Map) -> Result<Self> {
        let map: Array<MapData, Set<Way<V>>> = map.try_into()?;
        let count = map.map().info()?.max_entries();
        let page = page_size();
        let len = (count as usize * std::mem::size_of::<Set<Way<V>>>()).div_ceil(page) * page;
        // SAFETY: a shared mapping of the array's values (`BPF_F_MMAPABLE`), at most the
        // pages they occupy; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&map.map().fd().as_fd()),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io(std::io::Error::last_os_error()));
        }
        Ok(FlowTable {
            _map: map,
            sets: NonNull::new(ptr.cast()).expect("mmap returned a mapping"),
            count,
            len,
        })
    }

    /// Sets in the table.
    pub fn sets(&self) -> u32 {
        self.count
    }

    /// Entries the table holds at most.
    pub fn capacity(&self) -> u64 {
        u64::from(self.count) * WAYS as u64
    }

    fn set(&self, i: u32) -> *mut Set<Way<V>> {
        assert!(i < self.count, "set {i} of {}", self.count);
        // SAFETY: inside the mapping.
        unsafe { self.sets.as_ptr().add(i as usize) }
    }

    fn tag(&self, set: u32, way: usize) -> u16 {
        // SAFETY: a field of a mapped set.
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.set(set)).head.tags[way])) }
    }

    fn set_tag(&self, set: u32, way: usize, tag: u16) {
        // SAFETY: a field of a mapped set.
        unsafe {
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.set(set)).head.tags[way]), tag)
        }
    }

    fn way(&self, set: u32, way: usize) -> Way<V> {
        // SAFETY: a mapped way; a copy (the data plane may be writing it: see `Way::flow`).
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.set(set)).ways[way])) }
    }

    /// `key`'s set, tag and way (if the table holds it).
    fn find(&self, key: &FlowKey) -> (u32, u16, Option<usize>) {
        let w: [u64; 5] = bytemuck::cast(*key);
        let h = flow_table::hash(&w);
        let (set, tag) = (
            flow_table::set_of(h, self.count.trailing_zeros()),
            flow_table::tag(h),
        );
        let way = (0..WAYS)
            .find(|&i| self.tag(set, i) == tag && self.way(set, i).flow().as_ref() == Some(key));
        (set, tag, way)
    }

    pub fn get(&self, key: &FlowKey) -> Option<V> {
        let (set, _, way) = self.find(key);
        way.map(|i| self.way(set, i).value)
    }

    /// Drop `key`'s entry (its way's tag cleared). Absent: an error, as for a hash map.
    pub fn remove(&mut self, key: &FlowKey) -> Result<()> {
        match self.find(key) {
            (set, _, Some(i)) => {
                self.set_tag(set, i, 0);
                Ok(())
            }
            _ => Err(Error::Invalid(format!("no entry {key:?} in the table"))),
        }
    }

    /// Write `key`'s entry (fixtures: a state the data plane would reach more slowly) in
    /// its own way or an empty one, as the data plane does: tag cleared, way, tag.
    pub fn insert(&mut self, key: &FlowKey, value: V) -> Result<()> {
        self.put_way(key, flow_table::way(key, value))
    }

    /// Write `way` as `key`'s (see [`FlowTable::insert`]; tests write ways the data plane
    /// could leave, such as one torn between two writers).
    pub fn put_way(&mut self, key: &FlowKey, way: Way<V>) -> Result<()> {
        let (set, tag, found) = self.find(key);
        let i = found
            .or_else(|| (0..WAYS).find(|&i| self.tag(set, i) == 0))
            .ok_or_else(|| Error::Invalid(format!("set {set} of the table is full")))?;
        self.set_tag(set, i, 0);
        // SAFETY: a mapped way.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.set(set)).ways[i]), way) };
        self.set_tag(set, i, tag);
        Ok(())
    }

    /// Set `i`'s header (its tags, reference bits and hand), as it is now.
    pub fn head(&self, i: u32) -> lb_common::flow_table::Head {
        // SAFETY: a mapped set's header; a copy.
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.set(i)).head)) }
    }

    /// `key`'s set and the way holding it, if any.
    pub fn position(&self, key: &FlowKey) -> (u32, Option<usize>) {
        let (set, _, way) = self.find(key);
        (set, way)
    }

    /// Every entry (a way torn between two writers, or being written, is skipped).
    pub fn iter(&self) -> impl Iterator<Item = (FlowKey, V)> + '_ {
        (0..self.count).flat_map(move |set| {
            (0..WAYS).filter_map(move |i| {
                if self.tag(set, i) == 0 {
                    return None;
                }
                let way = self.way(set, i);
                Some((way.flow()?, way.value))
            })
        })
    }
}

impl<V: Value> Drop for FlowTable<V>
where
    Set<Way<V>>: aya::Pod,
{
    fn drop(&mut self) {
        // SAFETY: the mapping made in `open`, not used after this.
        unsafe { libc::munmap(self.sets.as_ptr().cast(), self.len) };
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

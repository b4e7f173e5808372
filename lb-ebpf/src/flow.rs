//! The connection table: an established flow keeps its backend whatever the rings say.

use aya_ebpf::{macros::map, maps::LruHashMap};
use lb_common::{
    reason, Backend, FlowKey, FlowValue, ServiceMeta, BPF_F_NO_COMMON_LRU, FLOW_TABLE_CAPACITY,
};

use crate::select;

/// LRU hash with per-CPU LRU lists: RSS keeps a flow on one CPU, so eviction bookkeeping
/// needs no cross-CPU lock, while the entries stay visible to every CPU. Capacity is set
/// at load time by the controller (`flow_table_size`).
#[map]
static FLOWS: LruHashMap<FlowKey, FlowValue> =
    LruHashMap::with_max_entries(FLOW_TABLE_CAPACITY, BPF_F_NO_COMMON_LRU);

pub struct Choice {
    pub id: u32,
    pub backend: &'static Backend,
    /// The flow was not in the table: it was scheduled now.
    pub new: bool,
}

#[inline(always)]
pub fn lookup_or_schedule(svc: &ServiceMeta, key: &FlowKey) -> Result<Choice, u32> {
    if let Some(v) = unsafe { FLOWS.get(key) } {
        // A backend removed from the config no longer owns its flows: reschedule them.
        if let Some(backend) = select::backend(v.backend) {
            return Ok(Choice {
                id: v.backend,
                backend,
                new: false,
            });
        }
    }
    let id = select::schedule(svc, key)?;
    let backend = select::backend(id).ok_or(reason::PASS_NO_BACKEND)?;
    let value = FlowValue {
        backend: id,
        service: svc.id,
    };
    if FLOWS.insert(key, &value, 0).is_err() {
        crate::stats::reason(reason::FLOW_INSERT_FAILED);
    }
    Ok(Choice {
        id,
        backend,
        new: true,
    })
}

//! Reference variable-rate eviction scheduling (SPEC §5), literally: sort, list every possible
//! block with its cost, sort the list, take the cheapest.

use kvc_abi::geometry::metric_key;

use super::HostCache;
use crate::compress::{Budget, Mode};

/// One sequence's inputs (validated by the caller).
#[derive(Clone, Copy, Debug)]
pub struct SeqInput {
    /// Sequence row.
    pub seq: u32,
    /// What the sequence gives back.
    pub budget: Budget,
    /// Protected window `W`.
    pub protected: u32,
}

/// A head slot's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSchedule {
    /// Index of the head slot `(seq, layer, kv_head)`.
    pub head_slot: u64,
    /// Logical indices evicted, ascending.
    pub evicted: Vec<u32>,
    /// Blocks freed, `k_h`.
    pub blocks: u32,
}

/// A sequence's schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSchedule {
    /// Blocks asked for after the mode's rounding.
    pub requested: u32,
    /// Blocks taken.
    pub taken: u32,
    /// Whether some group could give fewer than asked.
    pub clamped: bool,
    /// Whether the budget was an explicit block count (so a clamp is an error).
    pub explicit: bool,
    /// Per head slot, `(layer, kv_head)` order.
    pub heads: Vec<HeadSchedule>,
}

/// The evictable KVs of a head slot in eviction order, `(metric key, position, logical index)`.
pub fn eviction_order(
    cache: &HostCache,
    metric: &[f32],
    head_slot: u64,
    sinks: u32,
    last_position: i32,
    protected: u32,
) -> Vec<(u32, i32, u32)> {
    let g = cache.geometry;
    let newest_evictable = last_position as i64 - protected as i64;
    let mut order: Vec<(u32, i32, u32)> = (0..cache.len(head_slot))
        .filter_map(|j| {
            let (block, slot) = cache.locate(head_slot, j);
            let pool_slot = g.pool_slot(block, slot) as usize;
            let position = cache.position[pool_slot];
            let evictable = position as i64 >= sinks as i64 && position as i64 <= newest_evictable;
            evictable.then(|| (metric_key(metric[pool_slot]), position, j))
        })
        .collect();
    order.sort();
    order
}

/// `c_k = r + (k - 1) B` KVs of a head slot of `len` KVs must go to free `k` blocks.
pub fn evictions_for(len: u32, block_size: u32, k: u32) -> u32 {
    let blocks = len.div_ceil(block_size);
    let fill = len - (blocks - 1) * block_size;
    fill + (k - 1) * block_size
}

/// The schedule of one sequence (SPEC §5 steps 1-5).
pub fn schedule_seq(
    cache: &HostCache,
    metric: &[f32],
    input: &SeqInput,
    sinks: u32,
    mode: Mode,
    last_position: i32,
) -> SeqSchedule {
    let g = cache.geometry;
    let (num_layers, num_heads, b) = (g.num_layers, g.num_kv_heads, g.block_size);
    // Step 1-2: per head slot, the eviction order and the cost of freeing k = 1, 2, ... blocks.
    let mut orders = Vec::new();
    let mut costs: Vec<Vec<u32>> = Vec::new();
    for layer in 0..num_layers {
        for head in 0..num_heads {
            let head_slot = g.head_slot(input.seq, layer, head);
            let order = eviction_order(
                cache,
                metric,
                head_slot,
                sinks,
                last_position,
                input.protected,
            );
            let len = cache.len(head_slot);
            let mut head_costs = Vec::new();
            for k in 1..=len.div_ceil(b) {
                let c = evictions_for(len, b, k) as usize;
                if c > order.len() {
                    break;
                }
                head_costs.push(order[c - 1].0);
            }
            orders.push(order);
            costs.push(head_costs);
        }
    }
    // Step 5: the budget in blocks.
    let compressible: u64 = orders.iter().map(|o| o.len() as u64).sum();
    let in_use: u64 = (0..num_layers * num_heads)
        .map(|i| {
            g.blocks_for(cache.len(g.head_slot(input.seq, i / num_heads, i % num_heads))) as u64
        })
        .sum();
    let slots = (num_layers * num_heads) as u64;
    let wanted: u64 = match input.budget {
        Budget::Blocks(n) => n as u64,
        Budget::Rate(rate) => {
            let keep = (compressible as f64 / rate as f64).ceil() as u64;
            (compressible - keep.min(compressible)) / b as u64
        }
        Budget::MaxTokens(t) => in_use.saturating_sub((slots * t as u64).div_ceil(b as u64)),
    };
    let group = mode.group_heads(num_layers, num_heads) as u64;
    let groups = slots / group;
    let requested = (wanted - wanted % groups).min(u32::MAX as u64) as u32;
    let per_group = requested as u64 / groups;
    // Step 3: per group, every possible (cost, layer, head, k), the cheapest per_group taken.
    let mut taken = vec![0u32; slots as usize];
    let mut clamped = false;
    for grp in 0..groups {
        let mut pairs: Vec<(u32, u32, u32, u32)> = Vec::new();
        for i in grp * group..(grp + 1) * group {
            for (k, &cost) in costs[i as usize].iter().enumerate() {
                pairs.push((
                    cost,
                    i as u32 / num_heads,
                    i as u32 % num_heads,
                    k as u32 + 1,
                ));
            }
        }
        pairs.sort();
        clamped |= (pairs.len() as u64) < per_group;
        for &(_, layer, head, _) in pairs.iter().take(per_group as usize) {
            taken[(layer * num_heads + head) as usize] += 1;
        }
    }
    let heads = (0..slots as usize)
        .map(|i| {
            let head_slot = g.head_slot(input.seq, i as u32 / num_heads, i as u32 % num_heads);
            let k = taken[i];
            let c = if k == 0 {
                0
            } else {
                evictions_for(cache.len(head_slot), b, k) as usize
            };
            let mut evicted: Vec<u32> = orders[i][..c].iter().map(|&(_, _, j)| j).collect();
            evicted.sort_unstable();
            HeadSchedule {
                head_slot,
                evicted,
                blocks: k,
            }
        })
        .collect();
    SeqSchedule {
        requested,
        taken: taken.iter().sum(),
        clamped,
        explicit: matches!(input.budget, Budget::Blocks(_)),
        heads,
    }
}

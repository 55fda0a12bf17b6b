//! Reference block compaction (SPEC §6).

use super::HostCacheMut;

/// Compacts head slot `head_slot` after evicting the logical indices `evicted` (ascending,
/// `len - |evicted|` a multiple of `B`): retained KVs at logical index `>= n'` move into the
/// holes below `n'`, the highest-index retained KV into the lowest hole, and so on; a move
/// copies K, V, metric and position. Sets the new length and returns the blocks the head slot
/// no longer uses (its last `k_h`), leaving their table entries `-1`.
pub fn compact(cache: &mut HostCacheMut, head_slot: u64, evicted: &[u32]) -> Vec<u32> {
    let g = cache.geometry;
    let len = cache.context_lens[head_slot as usize] as u32;
    let kept = len - evicted.len() as u32;
    let is_evicted = |j: u32| evicted.binary_search(&j).is_ok();
    let holes: Vec<u32> = (0..kept).filter(|&j| is_evicted(j)).collect();
    let movers: Vec<u32> = (kept..len).rev().filter(|&j| !is_evicted(j)).collect();
    let elem = cache.dtype.elem_bytes() as usize;
    let row = g.head_dim as usize * elem;
    let pool_slot = |tables: &[i32], j: u32| {
        let block = tables[g.block_table_at(head_slot, g.logical_block(j)) as usize] as u32;
        g.pool_slot(block, g.slot_in_block(j)) as usize
    };
    for (&hole, &mover) in holes.iter().zip(&movers) {
        let (dst, src) = (
            pool_slot(cache.block_tables, hole),
            pool_slot(cache.block_tables, mover),
        );
        cache
            .k_pool
            .copy_within(src * row..(src + 1) * row, dst * row);
        cache
            .v_pool
            .copy_within(src * row..(src + 1) * row, dst * row);
        cache.metric[dst] = cache.metric[src];
        cache.position[dst] = cache.position[src];
    }
    cache.context_lens[head_slot as usize] = kept as i32;
    let mut freed = Vec::new();
    for logical_block in g.blocks_for(kept)..g.blocks_for(len) {
        let entry = &mut cache.block_tables[g.block_table_at(head_slot, logical_block) as usize];
        freed.push(*entry as u32);
        *entry = -1;
    }
    freed
}

//! Reference `append_kv` (SPEC §2).

use super::HostCacheMut;

/// Writes the new tokens of `layer` into the next logical slots of every head slot: token
/// `w` of sequence `seq` (rows of `k_new`/`v_new` `[num_tokens, H, D]` are consecutive per
/// sequence, in `new_tokens` order) goes to logical index `len + w` of head slot
/// `(seq, layer, h)`, with `position` from `positions` and `metric` 0; then every length grows
/// by its count. The block tables must already hold blocks for the new lengths (the cache's
/// allocator put them there).
pub fn append_kv(
    cache: HostCacheMut,
    layer: u32,
    k_new: &[u8],
    v_new: &[u8],
    positions: &[i32],
    new_tokens: &[u32],
) {
    let g = cache.geometry;
    let row_bytes = (g.head_dim * cache.dtype.elem_bytes()) as usize;
    let mut token = 0usize;
    for (seq, &n) in new_tokens.iter().enumerate() {
        for kv_head in 0..g.num_kv_heads {
            let head_slot = g.head_slot(seq as u32, layer, kv_head);
            let len = cache.context_lens[head_slot as usize] as u32;
            for within in 0..n {
                let logical = len + within;
                let block = cache.block_tables
                    [g.block_table_at(head_slot, g.logical_block(logical)) as usize]
                    as u32;
                let slot = g.slot_in_block(logical);
                let src = ((token + within as usize) * g.num_kv_heads as usize + kv_head as usize)
                    * row_bytes;
                let dst = g.kv_elem(block, slot) as usize * cache.dtype.elem_bytes() as usize;
                cache.k_pool[dst..dst + row_bytes].copy_from_slice(&k_new[src..src + row_bytes]);
                cache.v_pool[dst..dst + row_bytes].copy_from_slice(&v_new[src..src + row_bytes]);
                let pool_slot = g.pool_slot(block, slot) as usize;
                cache.position[pool_slot] = positions[token + within as usize];
                cache.metric[pool_slot] = 0.0;
            }
            cache.context_lens[head_slot as usize] = (len + n) as i32;
        }
        token += n as usize;
    }
}

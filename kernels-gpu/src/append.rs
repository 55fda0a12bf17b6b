//! `append_kv` (SPEC §2): copy new K/V rows into the pool slots the host allocated, set their
//! `position` and zero their `metric`, and apply the host's block-table and length changes.
//!
//! Grid: `scatter_ctas` CTAs of `APPEND_WARPS` warps, one warp per `(token, kv_head)` row, each
//! lane copying 16-byte chunks of K and V; then CTAs with one patch pair per thread. The two
//! parts touch disjoint memory, so one launch does both. The row copy is dtype-agnostic.
//!
//! Host-validated: every destination slot belongs to a block the host just gave this head
//! slot, so no two rows share a slot; patch indices lie inside `block_tables` and
//! `context_lens`.

use kvc_abi::params::AppendParams;
use kvc_abi::plan::{APPEND_THREADS, APPEND_WARPS, VECTOR_BYTES, WARP_SIZE};

use crate::gpu::mem::{load, load_chunk, store, store_chunk};
use crate::gpu::thread::{block_idx_x, lane_id, thread_idx_x, warp_id};

/// The append body.
///
/// # Safety
/// Launched with `plan_append(p)` dims and params the host validated (module header).
#[inline(always)]
pub unsafe fn append_body(p: &AppendParams) {
    let cta = block_idx_x();
    if cta < p.scatter_ctas {
        let row = cta as u64 * APPEND_WARPS as u64 + warp_id() as u64;
        if row >= p.num_rows() {
            return;
        }
        let geom = p.cache.geometry;
        let token = (row / geom.num_kv_heads.max(1) as u64) as u32;
        // SAFETY: meta holds meta_words() u32 words.
        let (dest_slot, position) = unsafe {
            (
                load::<u32>(p.meta, p.dest_slot_word(row)) as u64,
                load::<i32>(p.meta, p.position_word(token)),
            )
        };
        let src = row * p.row_bytes as u64;
        let dst = dest_slot * p.row_bytes as u64;
        let mut byte = lane_id() * VECTOR_BYTES;
        while byte < p.row_bytes {
            // SAFETY: src rows lie in k_new/v_new [num_tokens, H, D]; dest_slot < num_blocks * B.
            unsafe {
                let k = load_chunk(p.k_new + src + byte as u64);
                let v = load_chunk(p.v_new + src + byte as u64);
                store_chunk(p.cache.k_pool + dst + byte as u64, k);
                store_chunk(p.cache.v_pool + dst + byte as u64, v);
            }
            byte += WARP_SIZE * VECTOR_BYTES;
        }
        if lane_id() == 0 {
            // SAFETY: dest_slot < num_blocks * B, the length of metric and position.
            unsafe {
                store::<i32>(p.cache.position, dest_slot, position);
                store::<f32>(p.cache.metric, dest_slot, 0.0);
            }
        }
    } else {
        let i = (cta - p.scatter_ctas) * APPEND_THREADS + thread_idx_x();
        if i >= p.num_patches {
            return;
        }
        // SAFETY: pair i < num_patches lies in meta; its index is inside the tables (header).
        unsafe {
            let index = load::<u32>(p.meta, p.patch_word(i)) as u64;
            let value = load::<i32>(p.meta, p.patch_word(i) + 1);
            let table_len = p.cache.geometry.block_table_len();
            if index < table_len {
                store::<i32>(p.cache.block_tables, index, value);
            } else {
                store::<i32>(p.cache.context_lens, index - table_len, value);
            }
        }
    }
}

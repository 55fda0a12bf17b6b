//! Merge of split decode partitions (SPEC §3, flash-decoding's reduce).
//!
//! Grid `(q_head, seq)`, `MERGE_THREADS` threads each taking columns `d` of the output. Only the
//! partitions that hold live KVs of the head slot are read (`ceil(len / partition_kvs)`), so
//! the workspace rows of the others are never initialised. A head slot with no live KVs gets
//! an all-zero row.

use kvc_abi::params::DecodeParams;
use kvc_abi::plan::MERGE_THREADS;

use crate::gpu::math::{exp2, fma, fmax, store_elem, CacheElem};
use crate::gpu::mem::load;
use crate::gpu::thread::{block_idx_x, block_idx_y, thread_idx_x};

/// The merge body for output type `T`.
///
/// # Safety
/// Launched with `plan_decode`'s merge dims after the decode launch of the same params wrote
/// the workspace.
#[inline(always)]
pub unsafe fn decode_merge_body<T: CacheElem>(p: &DecodeParams) {
    let geom = p.cache.geometry;
    let q_head = block_idx_x();
    let seq = block_idx_y();
    let head_slot = geom.head_slot(seq, p.layer_idx, q_head / geom.group_size.max(1));
    // SAFETY: the grid covers (Hq, num_seqs) and layer_idx < L.
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let live_partitions = len.div_ceil(p.partition_kvs.max(1));
    let first_row = p.partial_row(seq, q_head, 0);
    let head_dim = geom.head_dim;

    let mut max = f32::NEG_INFINITY;
    for part in 0..live_partitions {
        // SAFETY: row first_row + part of partial_ml was written by the decode launch.
        max = fmax(max, unsafe {
            load::<f32>(p.partial_ml, (first_row + part as u64) * 2)
        });
    }
    let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
    let mut sum = 0.0f32;
    for part in 0..live_partitions {
        let row = first_row + part as u64;
        // SAFETY: as above.
        unsafe {
            let scale = exp2(load::<f32>(p.partial_ml, row * 2) - base);
            sum = fma(load::<f32>(p.partial_ml, row * 2 + 1), scale, sum);
        }
    }
    let inv_sum = if sum > 0.0 { 1.0 / sum } else { 0.0 };

    let mut d = thread_idx_x();
    while d < head_dim {
        let mut acc = 0.0f32;
        for part in 0..live_partitions {
            let row = first_row + part as u64;
            // SAFETY: as above; d < D.
            unsafe {
                let scale = exp2(load::<f32>(p.partial_ml, row * 2) - base);
                acc = fma(
                    load::<f32>(p.partial_acc, row * head_dim as u64 + d as u64),
                    scale,
                    acc,
                );
            }
        }
        // SAFETY: out holds [num_seqs, Hq, D] of T.
        unsafe { store_elem::<T>(p.out, p.query_elem(seq, q_head) + d as u64, acc * inv_sum) };
        d += MERGE_THREADS;
    }
}

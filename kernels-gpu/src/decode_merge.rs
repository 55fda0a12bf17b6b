//! Merge of split decode partitions (SPEC §3, flash-decoding's reduce).
//!
//! Grid `(q_head, seq)`, `MERGE_THREADS` threads each taking columns `d` of the output. Only the
//! partitions that hold live KVs of the head slot are read (`ceil(len / partition_kvs)`), so
//! the workspace rows of the others are never initialised. A head slot with no live KVs gets
//! an all-zero row.
//!
//! No load of a partition's row waits behind another's: the `(max, sum)` rows are folded by the
//! lanes of each warp in parallel ([`partition_stats`]); then, 32 partitions at a time, lane
//! `l` loads partition `l`'s max for its weight while every thread loads its column's 32
//! accumulators at once, and the weights go round the warp by shuffles: two round trips to
//! memory for up to 32 partitions. (One partition after another, the merge of 32 partitions
//! took 7.9 us on an H100; with 8 at a time and the maxima loaded by every thread, 5.9 us.)

use kvc_abi::params::DecodeParams;
use kvc_abi::plan::{MERGE_THREADS, WARP_SIZE};

use crate::gpu::math::{exp2, fma, fmax, store_elem, CacheElem};
use crate::gpu::mem::load;
use crate::gpu::thread::{block_idx_x, block_idx_y, lane_id, thread_idx_x};
use crate::gpu::warp::{shfl_idx_u32, shfl_xor};

/// Folds the softmax state `(max2, sum2)` into `(max1, sum1)`: the larger max, and both sums
/// rescaled to it (a max of `-inf` means an empty state).
#[inline(always)]
fn fold_stats(max1: f32, sum1: f32, max2: f32, sum2: f32) -> (f32, f32) {
    let max = fmax(max1, max2);
    let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
    (max, fma(sum2, exp2(max2 - base), sum1 * exp2(max1 - base)))
}

/// The global `(max, sum)` of query head `q_head` of sequence row `seq` over its first `live`
/// partitions, in the log2 domain (`(-inf, 0)` when `live` is 0). Lane `l` folds partitions
/// `l, l + 32, ...`, then the lanes are folded by a butterfly, in a fixed order, so the result
/// is deterministic; every lane returns it.
///
/// # Safety
/// Every lane of the warp calls it with the same arguments; the decode launch wrote the `live`
/// partitions' rows of `partial_ml`.
#[inline(always)]
pub unsafe fn partition_stats(p: &DecodeParams, seq: u32, q_head: u32, live: u32) -> (f32, f32) {
    let first = p.partial_row(seq, q_head, 0);
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0.0f32);
    let mut part = lane_id();
    while part < live {
        let row = first + part as u64;
        // SAFETY: a live partition's row (caller's contract).
        let (m, s) = unsafe {
            (
                load::<f32>(p.partial_ml, row * 2),
                load::<f32>(p.partial_ml, row * 2 + 1),
            )
        };
        (max, sum) = fold_stats(max, sum, m, s);
        part += WARP_SIZE;
    }
    let mut mask = WARP_SIZE / 2;
    while mask > 0 {
        // SAFETY: every lane runs these shuffles.
        let (m, s) = unsafe { (shfl_xor(max, mask), shfl_xor(sum, mask)) };
        (max, sum) = fold_stats(max, sum, m, s);
        mask /= 2;
    }
    (max, sum)
}

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
    let live = len.div_ceil(p.partition_kvs.max(1));
    let first_row = p.partial_row(seq, q_head, 0);
    let head_dim = geom.head_dim;

    // SAFETY: every warp runs it whole; the decode launch wrote the live rows.
    let (max, sum) = unsafe { partition_stats(p, seq, q_head, live) };
    let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
    let inv_sum = if sum > 0.0 { 1.0 / sum } else { 0.0 };

    let lane = lane_id();
    // Columns of a warp are consecutive and D is a multiple of 32: the loop is warp-uniform.
    let mut d = thread_idx_x();
    while d < head_dim {
        let mut acc = 0.0f32;
        let mut chunk = 0;
        while chunk < live {
            // Lane l: the weight of partition chunk + l (0 past the live ones).
            let own = chunk + lane;
            let weight = if own < live {
                // SAFETY: a live partition's row.
                exp2(unsafe { load::<f32>(p.partial_ml, (first_row + own as u64) * 2) } - base)
            } else {
                0.0
            };
            let mut value = [0.0f32; WARP_SIZE as usize];
            for (k, v) in value.iter_mut().enumerate() {
                if chunk + (k as u32) < live {
                    let row = first_row + (chunk + k as u32) as u64;
                    // SAFETY: a live partition's row; d < D.
                    *v = unsafe { load::<f32>(p.partial_acc, row * head_dim as u64 + d as u64) };
                }
            }
            for (k, v) in value.iter().enumerate() {
                // SAFETY: every lane runs the shuffles (the loops are warp-uniform).
                let w = f32::from_bits(unsafe { shfl_idx_u32(weight.to_bits(), k as u32) });
                acc = fma(*v, w, acc);
            }
            chunk += WARP_SIZE;
        }
        // SAFETY: out holds [num_seqs, Hq, D] of T.
        unsafe { store_elem::<T>(p.out, p.query_elem(seq, q_head) + d as u64, acc * inv_sum) };
        d += MERGE_THREADS;
    }
}

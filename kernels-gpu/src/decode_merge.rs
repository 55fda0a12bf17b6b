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
use kvc_abi::plan::{decode_smem, DECODE_WARPS, MERGE_THREADS, WARP_SIZE};

use crate::gpu::math::{exp2, fma, fmax, store_elem, CacheElem};
use crate::gpu::mem::load;
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::wait_for_prior_grid;
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
/// `l, l + 32, ...`, then the lanes are folded by a butterfly; every lane returns the same
/// bits. [`fold_stats`] is not symmetric in its arguments (its `fma` rounds once, after the
/// second term), so both lanes of a pair fold the lower lane's state first: had each folded
/// its own first, lanes would differ in the last bit of the sum, and the merge kernel (each
/// lane its own `1 / sum`) would disagree with a recording launch's merge (lane 0's) in an
/// output's last bit now and then (docs/PERF.md, decode v3.4).
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
        (max, sum) = if lane_id() & mask == 0 {
            fold_stats(max, sum, m, s)
        } else {
            fold_stats(m, s, max, sum)
        };
        mask /= 2;
    }
    (max, sum)
}

/// Column `d` of one query head's merged, not yet normalised output: the sum over its first
/// `live` partitions (rows from `first_row`) of the accumulator weighted by
/// `exp2(partition max - base)`. Lane `l` loads partition `l`'s max for its weight while every
/// thread loads its column's 32 accumulators at once; the weights go round by shuffles.
///
/// # Safety
/// The whole warp calls it with the same `first_row`, `live` and `base` and 32 consecutive
/// columns `d < head_dim`; the live partitions' rows are written and visible.
#[inline(always)]
unsafe fn merged_column(
    p: &DecodeParams,
    first_row: u64,
    live: u32,
    base: f32,
    head_dim: u32,
    d: u32,
) -> f32 {
    let lane = lane_id();
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
    acc
}

/// The merge body for output type `T` (launched only without recording: a recording launch
/// merges in its last CTA of each head slot, [`merge_recorded`]).
///
/// # Safety
/// Launched with `plan_decode`'s merge dims after the decode launch of the same params wrote
/// the workspace.
#[inline(always)]
pub unsafe fn decode_merge_body<T: CacheElem>(p: &DecodeParams) {
    wait_for_prior_grid();
    let geom = p.cache.geometry;
    let q_head = block_idx_x();
    let seq = block_idx_y();
    let head_slot = geom.head_slot(seq, p.layer_idx, q_head / geom.group_size.max(1));
    // SAFETY: the grid covers (Hq, num_seqs) and layer_idx < L.
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let live = p.live_partitions(len);
    let first_row = p.partial_row(seq, q_head, 0);
    let head_dim = geom.head_dim;

    // SAFETY: every warp runs it whole; the decode launch wrote the live rows.
    let (max, sum) = unsafe { partition_stats(p, seq, q_head, live) };
    let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
    let inv_sum = if sum > 0.0 { 1.0 / sum } else { 0.0 };

    // Columns of a warp are consecutive and D is a multiple of 32: the loop is warp-uniform.
    let mut d = thread_idx_x();
    while d < head_dim {
        // SAFETY: the warp's 32 consecutive columns; the decode launch wrote the live rows.
        let acc = unsafe { merged_column(p, first_row, live, base, head_dim, d) };
        // SAFETY: out holds [num_seqs, Hq, D] of T.
        unsafe { store_elem::<T>(p.out, p.query_elem(seq, q_head) + d as u64, acc * inv_sum) };
        d += MERGE_THREADS;
    }
}

/// The merge of a recording launch, by the CTA that left the head slot's handshake last: the
/// output of the `G` query heads of head slot `(seq, layer_idx, kv_head)` from its first
/// `live` partitions, with the global `(max, 1 / sum)` the record phase left at
/// `DecodeSmem::record_ml` (the same fold of the same rows as the merge kernel's, so the
/// output bits do not depend on recording). `live` 0 (an empty head slot, whose CTA ran no
/// record phase) writes +0.0, as the merge kernel does, without reading `record_ml`: that
/// shared memory then holds whatever an earlier CTA on the SM left there, and `0.0 *` a
/// negative or NaN leftover is -0.0 or NaN.
///
/// # Safety
/// Every thread of the CTA calls it after the record phase (none when `live` is 0); every
/// live partition published its partials before the handshake this CTA left last.
#[inline(always)]
pub unsafe fn merge_recorded<T: CacheElem, const D: usize, const G: usize>(
    p: &DecodeParams,
    seq: u32,
    kv_head: u32,
    live: u32,
) {
    let smem = decode_smem(G as u32, D as u32, T::BYTES);
    let stats = dynamic_f32().wrapping_add(smem.record_ml as usize);
    // A warp's 32 items are consecutive columns of one head (D is a multiple of 32).
    let mut item = thread_idx_x();
    while item < (G * D) as u32 {
        let (g, d) = (item / D as u32, item % D as u32);
        let q_head = kv_head * G as u32 + g;
        let (base, inv_sum) = if live == 0 {
            (0.0, 0.0)
        } else {
            // SAFETY: inside the decode_smem map, written by the record phase (before its
            // barrier).
            let (max, inv) =
                unsafe { (*stats.add(2 * g as usize), *stats.add(2 * g as usize + 1)) };
            // The merge kernel's base and `1 / sum` (0 for an empty sum).
            (
                if max == f32::NEG_INFINITY { 0.0 } else { max },
                if inv.is_infinite() { 0.0 } else { inv },
            )
        };
        // SAFETY: the warp's 32 consecutive columns; the live rows are published.
        let acc =
            unsafe { merged_column(p, p.partial_row(seq, q_head, 0), live, base, D as u32, d) };
        // SAFETY: out holds [num_seqs, Hq, D] of T.
        unsafe { store_elem::<T>(p.out, p.query_elem(seq, q_head) + d as u64, acc * inv_sum) };
        item += DECODE_WARPS * WARP_SIZE;
    }
}

//! Block compaction (SPEC §6) with each head slot's eviction set, one CTA per work head slot.
//!
//! 1. Select: the `c_h` evictable KVs of smallest `(metric key, position)` (`schedule.rs` chose
//!    `c_h`). A radix select over the 64-bit key `metric_key << 32 | position` in passes of 8
//!    bits, a shared-memory histogram each, stops as soon as the rank falls on a bin's end; the
//!    result is a prefix `P` of `level` bits such that a KV is evicted iff it is evictable and
//!    the top `level` bits of its key are `<= P` (`level` 0: every evictable KV). Positions are
//!    unique within a head slot, so the select always resolves.
//! 2. Compact: `n' = n - c_h`. Holes (evicted KVs below `n'`, ascending) and movers (retained
//!    KVs at `n'` and above, descending) are found tile by tile with block-wide ballots into two
//!    shared queues; the i-th mover fills the i-th hole (K, V, metric, position), a warp per
//!    move. Sources (`>= n'`) are never destinations (`< n'`), and a hole is read before it is
//!    filled, so the moves need no ordering among themselves.
//! 3. Finish: the head slot's length becomes `n'` and its last `k_h` table entries `-1`.
//!
//! Skipped entirely when `status` reports an explicit budget that cannot be met.

use kvc_abi::params::compress::{
    HEAD_BELOW, HEAD_BLOCKS, HEAD_EVICTABLE, HEAD_EVICTIONS, HEAD_LEN,
};
use kvc_abi::params::CompressParams;
use kvc_abi::plan::{
    compact_smem, COMPACT_QUEUE, COMPRESS_THREADS, COMPRESS_WARPS, VECTOR_BYTES, WARP_SIZE,
};

use crate::gpu::mem::{load, load_chunk, store, store_chunk};
use crate::gpu::mma::shared_addr;
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::shared_add;
use crate::gpu::thread::{block_idx_x, lane_id, sync_threads, thread_idx_x, warp_id};
use crate::gpu::warp::{ballot, lanemask_lt};
use crate::schedule::{kv_at, seq_view, SeqView};

const WARPS: u32 = COMPRESS_WARPS;
const QUEUE: u32 = COMPACT_QUEUE;
const BINS_AT: usize = compact_smem::BINS;
const STATE_AT: usize = compact_smem::STATE;
const WARP_COUNTS_AT: usize = compact_smem::WARP_COUNTS;
const HOLES_AT: usize = compact_smem::HOLES;
const MOVERS_AT: usize = compact_smem::MOVERS;

/// State words.
const S_REMAINING: usize = 0;
const S_PREFIX_HI: usize = 1;
const S_PREFIX_LO: usize = 2;
const S_LEVEL: usize = 3;
const S_DONE: usize = 4;
const S_HOLES: usize = 5;
const S_MOVERS: usize = 6;

/// Which evictable KVs go: those whose top `level` key bits are `<= prefix`.
#[derive(Clone, Copy)]
struct Evict {
    level: u32,
    prefix: u64,
}

impl Evict {
    #[inline(always)]
    fn takes(self, key: u32, position: i32, evictable: bool) -> bool {
        let wide = (key as u64) << 32 | position as u32 as u64;
        evictable && (self.level == 0 || wide >> (64 - self.level) <= self.prefix)
    }
}

/// The compaction body.
///
/// # Safety
/// Launched with `plan_compress`'s compact dims after the last digit pass.
#[inline(always)]
pub unsafe fn compact_body(p: &CompressParams) {
    let geom = p.cache.geometry;
    let w = block_idx_x();
    // SAFETY: status is one word; heads holds a row for w.
    let (status, blocks, len, evictable, evictions) = unsafe {
        (
            load::<u32>(p.status, 0),
            load::<u32>(p.heads, p.head_word(w, HEAD_BLOCKS)),
            load::<u32>(p.heads, p.head_word(w, HEAD_LEN)),
            load::<u32>(p.heads, p.head_word(w, HEAD_EVICTABLE)),
            load::<u32>(p.heads, p.head_word(w, HEAD_EVICTIONS)),
        )
    };
    if status != 0 || blocks == 0 {
        return; // uniform over the CTA
    }
    let s = w / p.heads_per_seq().max(1);
    // SAFETY: s < num_work_seqs.
    let view = unsafe { seq_view(p, s) };
    let head_slot = p.head_slot(view.seq, w);
    let words = dynamic_f32() as *mut u32;
    // SAFETY: every thread calls them; the launch reserved compact_smem::WORDS words.
    let evict = unsafe {
        if evictions == evictable {
            Evict {
                level: 0,
                prefix: 0,
            }
        } else {
            select(p, view, head_slot, len, evictions, words)
        }
    };
    let kept = len - evictions;
    // SAFETY: as above.
    let moved = unsafe { move_tail_into_holes(p, view, head_slot, len, kept, evict, words) };
    let thread = thread_idx_x();
    if thread == 0 {
        // SAFETY: the head slot is validated; heads holds a row for w.
        unsafe {
            store::<i32>(p.cache.context_lens, head_slot, kept as i32);
            store::<u32>(p.heads, p.head_word(w, HEAD_BELOW), moved);
        }
    }
    let mut logical_block = geom.blocks_for(kept) + thread;
    while logical_block < geom.blocks_for(len) {
        // SAFETY: inside the head slot's table.
        unsafe {
            store::<i32>(
                p.cache.block_tables,
                geom.block_table_at(head_slot, logical_block),
                -1,
            )
        };
        logical_block += COMPRESS_THREADS;
    }
}

/// The radix select of step 1.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory.
#[inline(always)]
unsafe fn select(
    p: &CompressParams,
    view: SeqView,
    head_slot: u64,
    len: u32,
    rank: u32,
    words: *mut u32,
) -> Evict {
    let thread = thread_idx_x();
    // SAFETY: inside the smem map; every thread reaches every barrier (the loop condition is
    // read from shared memory after a barrier, so it is uniform).
    unsafe {
        if thread == 0 {
            *words.add(STATE_AT + S_REMAINING) = rank;
            *words.add(STATE_AT + S_PREFIX_HI) = 0;
            *words.add(STATE_AT + S_PREFIX_LO) = 0;
            *words.add(STATE_AT + S_LEVEL) = 0;
            *words.add(STATE_AT + S_DONE) = 0;
        }
        loop {
            let mut b = thread;
            while b < 256 {
                *words.add(BINS_AT + b as usize) = 0;
                b += COMPRESS_THREADS;
            }
            sync_threads();
            let level = *words.add(STATE_AT + S_LEVEL);
            let prefix = (*words.add(STATE_AT + S_PREFIX_HI) as u64) << 32
                | *words.add(STATE_AT + S_PREFIX_LO) as u64;
            let mut idx = thread;
            while idx < len {
                let (_, position, key, evictable) = kv_at(p, view, head_slot, idx);
                let wide = (key as u64) << 32 | position as u32 as u64;
                if evictable && (level == 0 || wide >> (64 - level) == prefix) {
                    let digit = (wide >> (56 - level)) & 0xff;
                    shared_add(shared_addr(words.add(BINS_AT + digit as usize)), 1);
                }
                idx += COMPRESS_THREADS;
            }
            sync_threads();
            if thread == 0 {
                let remaining = *words.add(STATE_AT + S_REMAINING);
                let mut below = 0u32;
                let mut digit = 0u32;
                while digit < 255 && below + *words.add(BINS_AT + digit as usize) < remaining {
                    below += *words.add(BINS_AT + digit as usize);
                    digit += 1;
                }
                let remaining = remaining - below;
                let prefix = prefix << 8 | digit as u64;
                *words.add(STATE_AT + S_REMAINING) = remaining;
                *words.add(STATE_AT + S_PREFIX_HI) = (prefix >> 32) as u32;
                *words.add(STATE_AT + S_PREFIX_LO) = prefix as u32;
                *words.add(STATE_AT + S_LEVEL) = level + 8;
                *words.add(STATE_AT + S_DONE) =
                    (remaining == *words.add(BINS_AT + digit as usize) || level + 8 == 64) as u32;
            }
            sync_threads();
            if *words.add(STATE_AT + S_DONE) != 0 {
                return Evict {
                    level: *words.add(STATE_AT + S_LEVEL),
                    prefix: (*words.add(STATE_AT + S_PREFIX_HI) as u64) << 32
                        | *words.add(STATE_AT + S_PREFIX_LO) as u64,
                };
            }
        }
    }
}

/// Appends the indices whose `flag` is set, in thread order, to the queue at word `queue`
/// whose length is word `count_word`, and updates that length.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory.
#[inline(always)]
unsafe fn append(words: *mut u32, queue: usize, count_word: usize, idx: u32, flag: bool) {
    let (lane, warp) = (lane_id(), warp_id());
    // SAFETY: every lane of every warp calls it; inside the smem map.
    unsafe {
        let votes = ballot(flag);
        if lane == 0 {
            *words.add(WARP_COUNTS_AT + warp as usize) = votes.count_ones();
        }
        sync_threads();
        let mut offset = *words.add(count_word);
        let mut total = offset;
        for w in 0..WARPS {
            let n = *words.add(WARP_COUNTS_AT + w as usize);
            if w < warp {
                offset += n;
            }
            total += n;
        }
        if flag {
            *words.add(queue + (offset + (votes & lanemask_lt()).count_ones()) as usize) = idx;
        }
        sync_threads();
        if thread_idx_x() == 0 {
            *words.add(count_word) = total;
        }
        sync_threads();
    }
}

/// Step 2; returns the number of moves.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory.
#[inline(always)]
unsafe fn move_tail_into_holes(
    p: &CompressParams,
    view: SeqView,
    head_slot: u64,
    len: u32,
    kept: u32,
    evict: Evict,
    words: *mut u32,
) -> u32 {
    let (thread, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
    let mut hole_cursor = 0u32;
    let mut mover_cursor = len;
    let mut moved = 0u32;
    // SAFETY: inside the smem map; every loop condition below is computed from values every
    // thread holds identically (shared counters read after a barrier, cursors advanced in
    // step), so all threads reach every barrier.
    unsafe {
        if thread == 0 {
            *words.add(STATE_AT + S_HOLES) = 0;
            *words.add(STATE_AT + S_MOVERS) = 0;
        }
        sync_threads();
        loop {
            while *words.add(STATE_AT + S_HOLES) < COMPRESS_THREADS && hole_cursor < kept {
                let idx = hole_cursor + thread;
                let flag = idx < kept && {
                    let (_, position, key, evictable) = kv_at(p, view, head_slot, idx);
                    evict.takes(key, position, evictable)
                };
                append(words, HOLES_AT, STATE_AT + S_HOLES, idx, flag);
                hole_cursor += COMPRESS_THREADS;
            }
            while *words.add(STATE_AT + S_MOVERS) < COMPRESS_THREADS && mover_cursor > kept {
                let flag = mover_cursor > thread && mover_cursor - 1 - thread >= kept;
                let idx = if flag { mover_cursor - 1 - thread } else { 0 };
                let flag = flag && {
                    let (_, position, key, evictable) = kv_at(p, view, head_slot, idx);
                    !evict.takes(key, position, evictable)
                };
                append(words, MOVERS_AT, STATE_AT + S_MOVERS, idx, flag);
                mover_cursor = mover_cursor.saturating_sub(COMPRESS_THREADS).max(kept);
            }
            let holes = *words.add(STATE_AT + S_HOLES);
            let movers = *words.add(STATE_AT + S_MOVERS);
            let pairs = holes.min(movers);
            if pairs == 0 {
                break;
            }
            moved += pairs;
            let mut pair = warp;
            while pair < pairs {
                let dst = *words.add(HOLES_AT + pair as usize);
                let src = *words.add(MOVERS_AT + pair as usize);
                move_kv(p, head_slot, src, dst, lane);
                pair += WARPS;
            }
            // Drop the consumed entries: read the rest, barrier, write them to the front.
            let mut keep = [0u32; 2 * QUEUE as usize / COMPRESS_THREADS as usize];
            let mut k = 0;
            let mut i = thread;
            while i < QUEUE {
                keep[k] =
                    *words.add(HOLES_AT + (i as usize + pairs as usize).min(QUEUE as usize - 1));
                keep[k + 1] =
                    *words.add(MOVERS_AT + (i as usize + pairs as usize).min(QUEUE as usize - 1));
                k += 2;
                i += COMPRESS_THREADS;
            }
            sync_threads();
            let mut k = 0;
            let mut i = thread;
            while i < QUEUE {
                *words.add(HOLES_AT + i as usize) = keep[k];
                *words.add(MOVERS_AT + i as usize) = keep[k + 1];
                k += 2;
                i += COMPRESS_THREADS;
            }
            if thread == 0 {
                *words.add(STATE_AT + S_HOLES) = holes - pairs;
                *words.add(STATE_AT + S_MOVERS) = movers - pairs;
            }
            sync_threads();
        }
    }
    moved
}

/// Copies KV `src` of the head slot over KV `dst` (K and V rows, metric, position), one warp.
///
/// # Safety
/// Both are live logical indices of the head slot; the whole warp calls it.
#[inline(always)]
unsafe fn move_kv(p: &CompressParams, head_slot: u64, src: u32, dst: u32, lane: u32) {
    let geom = p.cache.geometry;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    // SAFETY: src, dst < len: their blocks are validated pool blocks of the head slot.
    let (from, to) = unsafe {
        let at = |idx: u32| {
            geom.pool_slot(
                load::<i32>(table, geom.logical_block(idx) as u64) as u32,
                geom.slot_in_block(idx),
            )
        };
        (at(src), at(dst))
    };
    let row = p.row_bytes as u64;
    let mut byte = lane * VECTOR_BYTES;
    while byte < p.row_bytes {
        // SAFETY: both rows lie in the pools; the ranges differ (src != dst).
        unsafe {
            store_chunk(
                p.cache.k_pool + to * row + byte as u64,
                load_chunk(p.cache.k_pool + from * row + byte as u64),
            );
            store_chunk(
                p.cache.v_pool + to * row + byte as u64,
                load_chunk(p.cache.v_pool + from * row + byte as u64),
            );
        }
        byte += WARP_SIZE * VECTOR_BYTES;
    }
    if lane == 0 {
        // SAFETY: both slots lie in metric and position.
        unsafe {
            store::<f32>(p.cache.metric, to, load::<f32>(p.cache.metric, from));
            store::<i32>(p.cache.position, to, load::<i32>(p.cache.position, from));
        }
    }
}

//! Block compaction (SPEC §6) with each head slot's eviction set, one CTA of `THREADS` per
//! work head slot: entry `compact` in CTAs of 256, `compact_narrow` in CTAs of 128 for steps
//! of many head slots (`kvc_abi::plan::COMPACT_THREADS`).
//!
//! 1. Select: the `c_h` evictable KVs of smallest `(metric key, position)` (`schedule.rs` chose
//!    `c_h`). A radix select over the 64-bit key `metric_key << 32 | position` in passes of 8
//!    bits, a shared-memory histogram each (copied from the schedule's histogram of that pass
//!    while the prefix is the group threshold's, so usually no KV is read), stops as soon as
//!    the rank falls on a bin's end; the
//!    result is a prefix `P` of `level` bits such that a KV is evicted iff it is evictable and
//!    the top `level` bits of its key are `<= P` (`level` 0: every evictable KV). Positions are
//!    unique within a head slot, so the select always resolves.
//! 2. Compact: `n' = n - c_h`. Holes (evicted KVs below `n'`, ascending) and movers (retained
//!    KVs at `n'` and above, descending) are found a tile of `compact_tile` KVs at a time
//!    (each thread examines `BATCH` at once, so their loads overlap) and appended in order to
//!    two shared queues with block-wide ballots until each holds `compact_round` (or the scan
//!    ends), a mover with the metric and position its scan read; the i-th mover fills the
//!    i-th hole. The moves of a round run as one flat parallel copy over `(move, K or V,
//!    16-byte chunk)`, then each mover's queued metric and position are stored. Sources (`>=
//!    n'`) are never destinations (`< n'`), and a hole is read before it is filled, so the
//!    moves need no ordering among themselves.
//! 3. Finish: the head slot's length becomes `n'`, its last `k_h` table entries `-1`, and the
//!    number of moves is reported.
//!
//! Skipped entirely when `status` reports an explicit budget that cannot be met.

use kvc_abi::params::compress::{
    KeyFilter, GROUP_PREFIX, HEAD_BELOW, HEAD_BLOCKS, HEAD_EVICTABLE, HEAD_EVICTIONS, HEAD_LEN,
    RADIX_PASSES,
};
use kvc_abi::params::CompressParams;
use kvc_abi::plan::{
    compact_queue, compact_round, compact_smem, compact_tile, COMPACT_QUEUE_PER_THREAD,
    VECTOR_BYTES, WARP_SIZE,
};

use crate::gpu::mem::{load, load_chunk, store, store_chunk, Chunk};
use crate::gpu::mma::shared_addr;
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::{shared_add, wait_for_prior_grid};
use crate::gpu::thread::{block_idx_x, lane_id, sync_threads, thread_idx_x, warp_id};
use crate::gpu::warp::{ballot, lanemask_lt};
use crate::schedule::{
    digest_run, kv_batch, kv_run, pool_slot_of, seq_view, SeqView, BATCH, DIGEST_BITS,
};

/// State fields (`CompactSmem::state`).
const S_REMAINING: usize = 0;
const S_PREFIX_HI: usize = 1;
const S_PREFIX_LO: usize = 2;
const S_LEVEL: usize = 3;
const S_DONE: usize = 4;
const S_HOLES: usize = 5;
const S_MOVERS: usize = 6;
/// 16-byte copies each thread keeps in flight.
const COPIES: usize = 8;

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
pub unsafe fn compact_body<const THREADS: u32>(p: &CompressParams) {
    wait_for_prior_grid();
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
    // SAFETY: every thread calls them; the launch reserved compact_smem::WORDS words; len > 0
    // because blocks > 0.
    let evict = unsafe {
        if evictions == evictable {
            Evict {
                level: 0,
                prefix: 0,
            }
        } else {
            select::<THREADS>(p, view, w, head_slot, len, evictions, words)
        }
    };
    let kept = len - evictions;
    // SAFETY: as above.
    let moved =
        unsafe { move_tail_into_holes::<THREADS>(p, view, head_slot, len, kept, evict, words) };
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
        logical_block += THREADS;
    }
}

/// The radix select of step 1. A pass over the metric key's bits whose prefix is the group's
/// threshold prefix at that depth needs no reading: the schedule's histogram of that pass
/// (`sched_hist0`-`3`) counted exactly the head slot's evictable keys with that prefix. The rank
/// falls near the group's threshold, so most head slots read no KV here at all; the others
/// read the schedule's key digests, and metrics only under the prefix.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory; `len > 0`; work head slot `w`
/// frees blocks, so its group ran every schedule pass.
#[inline(always)]
unsafe fn select<const THREADS: u32>(
    p: &CompressParams,
    view: SeqView,
    w: u32,
    head_slot: u64,
    len: u32,
    rank: u32,
    words: *mut u32,
) -> Evict {
    let thread = thread_idx_x();
    let m = compact_smem(THREADS);
    let num_work_heads = p.num_work_heads();
    // SAFETY: w's group is in groups; after the last digit pass its prefix is the whole
    // 32-bit threshold key.
    let threshold = unsafe {
        load::<u32>(
            p.groups,
            p.group_word(w / p.group_heads.max(1), GROUP_PREFIX),
        )
    } as u64;
    // SAFETY: inside the smem map; every thread reaches every barrier (the loop condition is
    // read from shared memory after a barrier, so it is uniform).
    unsafe {
        if thread == 0 {
            *words.add(m.state + S_REMAINING) = rank;
            *words.add(m.state + S_PREFIX_HI) = 0;
            *words.add(m.state + S_PREFIX_LO) = 0;
            *words.add(m.state + S_LEVEL) = 0;
            *words.add(m.state + S_DONE) = 0;
        }
        loop {
            let mut b = thread;
            while b < 256 {
                *words.add(m.bins + b as usize) = 0;
                b += THREADS;
            }
            sync_threads();
            let level = *words.add(m.state + S_LEVEL);
            let prefix = (*words.add(m.state + S_PREFIX_HI) as u64) << 32
                | *words.add(m.state + S_PREFIX_LO) as u64;
            let pass = level / 8;
            let scheduled = pass < RADIX_PASSES && prefix == threshold >> (32 - level);
            let mut b = thread;
            while scheduled && b < 256 {
                *words.add(m.bins + b as usize) =
                    load::<u32>(p.hist, p.hist_word(num_work_heads, pass, w, b));
                b += THREADS;
            }
            // A histogram: which thread counts which KV does not matter, so each takes a run of
            // consecutive KVs. The schedule's digests say which runs hold keys under the
            // prefix; they also give the digit while it lies in the top `DIGEST_BITS`, and
            // below that the run's metrics and positions are read (one table load, vector
            // loads).
            let digest_bits = level.min(DIGEST_BITS);
            let filter = KeyFilter::new((prefix >> (level - digest_bits)) as u32, digest_bits);
            let mut base = 0;
            while !scheduled && base < len {
                let first = base + BATCH as u32 * thread;
                if first < len {
                    // From level 16 on, the digit or the filter needs the byte below the
                    // high key.
                    let (digest, flags) = digest_run(p, w, first, level >= 16);
                    let mut wanted = [false; BATCH];
                    let mut any = false;
                    for u in 0..BATCH {
                        wanted[u] = flags & (1 << u) != 0 && filter.wants(digest[u]);
                        any |= wanted[u];
                    }
                    if any {
                        let (key, position) = if level >= DIGEST_BITS {
                            let kv = kv_run(p, view, head_slot, first, len);
                            (kv.key, kv.position)
                        } else {
                            (digest, [0; BATCH])
                        };
                        for u in 0..BATCH {
                            let wide = (key[u] as u64) << 32 | position[u] as u32 as u64;
                            if wanted[u] && (level == 0 || wide >> (64 - level) == prefix) {
                                let digit = (wide >> (56 - level)) & 0xff;
                                shared_add(shared_addr(words.add(m.bins + digit as usize)), 1);
                            }
                        }
                    }
                }
                base += compact_tile(THREADS);
            }
            sync_threads();
            if thread == 0 {
                let remaining = *words.add(m.state + S_REMAINING);
                let mut below = 0u32;
                let mut digit = 0u32;
                while digit < 255 && below + *words.add(m.bins + digit as usize) < remaining {
                    below += *words.add(m.bins + digit as usize);
                    digit += 1;
                }
                let remaining = remaining - below;
                let prefix = prefix << 8 | digit as u64;
                *words.add(m.state + S_REMAINING) = remaining;
                *words.add(m.state + S_PREFIX_HI) = (prefix >> 32) as u32;
                *words.add(m.state + S_PREFIX_LO) = prefix as u32;
                *words.add(m.state + S_LEVEL) = level + 8;
                *words.add(m.state + S_DONE) =
                    (remaining == *words.add(m.bins + digit as usize) || level + 8 == 64) as u32;
            }
            sync_threads();
            if *words.add(m.state + S_DONE) != 0 {
                return Evict {
                    level: *words.add(m.state + S_LEVEL),
                    prefix: (*words.add(m.state + S_PREFIX_HI) as u64) << 32
                        | *words.add(m.state + S_PREFIX_LO) as u64,
                };
            }
        }
    }
}

/// Appends, in order, the entries `entry[u]` whose `flag[u]` is set (`u` major, thread minor)
/// to the queue whose length is word `count_word`: word `i` of an entry goes to the array at
/// word `queues[i]` (parallel arrays of one length). Updates that length.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory; the queue has room.
#[inline(always)]
unsafe fn append<const THREADS: u32, const N: usize>(
    words: *mut u32,
    queues: [usize; N],
    count_word: usize,
    entry: [[u32; N]; BATCH],
    flag: [bool; BATCH],
) {
    let (lane, warp, thread) = (lane_id(), warp_id(), thread_idx_x());
    let warps = THREADS / WARP_SIZE;
    let m = compact_smem(THREADS);
    // SAFETY: every lane of every warp calls it; inside the smem map.
    unsafe {
        let mut votes = [0u32; BATCH];
        for u in 0..BATCH {
            votes[u] = ballot(flag[u]);
        }
        if lane == 0 {
            for u in 0..BATCH {
                *words.add(m.warp_counts + u * warps as usize + warp as usize) =
                    votes[u].count_ones();
            }
        }
        sync_threads();
        let mut offset = *words.add(count_word);
        for u in 0..BATCH {
            let mut mine = offset;
            for w in 0..warps {
                let n = *words.add(m.warp_counts + u * warps as usize + w as usize);
                if w < warp {
                    mine += n;
                }
                offset += n;
            }
            if flag[u] {
                let at = (mine + (votes[u] & lanemask_lt()).count_ones()) as usize;
                for i in 0..N {
                    *words.add(queues[i] + at) = entry[u][i];
                }
            }
        }
        sync_threads();
        if thread == 0 {
            *words.add(count_word) = offset;
        }
        sync_threads();
    }
}

/// Step 2; returns the number of moves.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory; `len > 0`.
#[inline(always)]
unsafe fn move_tail_into_holes<const THREADS: u32>(
    p: &CompressParams,
    view: SeqView,
    head_slot: u64,
    len: u32,
    kept: u32,
    evict: Evict,
    words: *mut u32,
) -> u32 {
    let thread = thread_idx_x();
    let m = compact_smem(THREADS);
    let mut hole_cursor = 0u32;
    let mut mover_cursor = len;
    let mut moved = 0u32;
    // SAFETY: inside the smem map; every loop condition below is computed from values every
    // thread holds identically (shared counters read after a barrier, cursors advanced in
    // step), so all threads reach every barrier.
    unsafe {
        if thread == 0 {
            *words.add(m.state + S_HOLES) = 0;
            *words.add(m.state + S_MOVERS) = 0;
        }
        sync_threads();
        loop {
            while *words.add(m.state + S_HOLES) < compact_round(THREADS) && hole_cursor < kept {
                let idx: [u32; BATCH] =
                    core::array::from_fn(|u| hole_cursor + u as u32 * THREADS + thread);
                let kv = kv_batch(p, view, head_slot, idx, len);
                let flag = core::array::from_fn(|u| {
                    idx[u] < kept && evict.takes(kv.key[u], kv.position[u], kv.evictable[u])
                });
                append::<THREADS, _>(words, [m.holes], m.state + S_HOLES, idx.map(|i| [i]), flag);
                hole_cursor += compact_tile(THREADS);
            }
            while *words.add(m.state + S_MOVERS) < compact_round(THREADS) && mover_cursor > kept {
                let back: [u32; BATCH] = core::array::from_fn(|u| u as u32 * THREADS + thread + 1);
                let idx: [u32; BATCH] =
                    core::array::from_fn(|u| mover_cursor.saturating_sub(back[u]));
                let kv = kv_batch(p, view, head_slot, idx, len);
                let flag = core::array::from_fn(|u| {
                    mover_cursor >= back[u]
                        && idx[u] >= kept
                        && !evict.takes(kv.key[u], kv.position[u], kv.evictable[u])
                });
                // A mover's metric and position travel with it, so the copy need not read
                // them again (a scattered 4-byte read each, usually an L2 miss by then).
                let entry = core::array::from_fn(|u| [idx[u], kv.metric[u], kv.position[u] as u32]);
                append::<THREADS, _>(
                    words,
                    [m.movers, m.mover_metrics, m.mover_positions],
                    m.state + S_MOVERS,
                    entry,
                    flag,
                );
                mover_cursor = mover_cursor.saturating_sub(compact_tile(THREADS)).max(kept);
            }
            let holes = *words.add(m.state + S_HOLES);
            let movers = *words.add(m.state + S_MOVERS);
            let pairs = holes.min(movers);
            if pairs == 0 {
                break;
            }
            moved += pairs;
            copy_moves::<THREADS>(p, head_slot, pairs, words);
            // Drop the consumed entries: read the rest, barrier, write them to the front; two
            // arrays at a time, so few registers hold them.
            for arrays in [[m.holes, m.movers], [m.mover_metrics, m.mover_positions]] {
                shift_front::<THREADS>(words, arrays, pairs);
            }
            if thread == 0 {
                *words.add(m.state + S_HOLES) = holes - pairs;
                *words.add(m.state + S_MOVERS) = movers - pairs;
            }
            sync_threads();
        }
    }
    moved
}

/// Moves entries `pairs..` of the two queue arrays at words `arrays` to their front.
///
/// # Safety
/// Every thread calls it; `words` is the kernel's shared memory.
#[inline(always)]
unsafe fn shift_front<const THREADS: u32>(words: *mut u32, arrays: [usize; 2], pairs: u32) {
    const PER_THREAD: usize = COMPACT_QUEUE_PER_THREAD as usize;
    let thread = thread_idx_x() as usize;
    let mut rest = [[0u32; 2]; PER_THREAD];
    // SAFETY: inside the smem map; all reads happen before the barrier, all writes after.
    unsafe {
        for (k, r) in rest.iter_mut().enumerate() {
            let from = (k * THREADS as usize + thread + pairs as usize)
                .min(compact_queue(THREADS) as usize - 1);
            for i in 0..2 {
                r[i] = *words.add(arrays[i] + from);
            }
        }
        sync_threads();
        for (k, r) in rest.iter().enumerate() {
            let to = k * THREADS as usize + thread;
            if to < compact_queue(THREADS) as usize {
                for i in 0..2 {
                    *words.add(arrays[i] + to) = r[i];
                }
            }
        }
    }
}

/// Moves the first `pairs` queued movers into the first `pairs` queued holes: their pool
/// slots replace the queue entries, then the whole CTA copies `(move, K or V, chunk)` items,
/// `COPIES` loads in flight per thread, and stores each move's queued metric and position.
///
/// # Safety
/// Every thread calls it; the queues hold at least `pairs` live logical indices each.
#[inline(always)]
unsafe fn copy_moves<const THREADS: u32>(
    p: &CompressParams,
    head_slot: u64,
    pairs: u32,
    words: *mut u32,
) {
    let thread = thread_idx_x();
    let m = compact_smem(THREADS);
    // SAFETY: inside the smem map; queue entries are live logical indices of the head slot.
    unsafe {
        let mut i = thread;
        while i < pairs {
            *words.add(m.holes + i as usize) =
                pool_slot_of(p, head_slot, *words.add(m.holes + i as usize)) as u32;
            *words.add(m.movers + i as usize) =
                pool_slot_of(p, head_slot, *words.add(m.movers + i as usize)) as u32;
            i += THREADS;
        }
        sync_threads();
        let row = p.row_bytes as u64;
        // Chunks of a row, a power of two (D of 64, 128 or 256 elements of 2 or 4 bytes): an
        // item splits by shifts and masks, not by a division per 16-byte copy.
        let chunks = (p.row_bytes / VECTOR_BYTES).max(1);
        let chunk_bits = chunks.trailing_zeros();
        let items = pairs * 2 * chunks;
        let mut first = thread;
        while first < items {
            let mut chunk: [Chunk; COPIES] = [[0; 4]; COPIES];
            let mut to = [0u64; COPIES];
            for (c, value) in chunk.iter_mut().enumerate() {
                let item = first + (c as u32) * THREADS;
                if item < items {
                    let (pair, rest) = (item >> (chunk_bits + 1), item & (2 * chunks - 1));
                    let pool = if rest < chunks {
                        p.cache.k_pool
                    } else {
                        p.cache.v_pool
                    };
                    let byte = ((rest & (chunks - 1)) * VECTOR_BYTES) as u64;
                    let src = *words.add(m.movers + pair as usize) as u64;
                    let dst = *words.add(m.holes + pair as usize) as u64;
                    *value = load_chunk(pool + src * row + byte);
                    to[c] = pool + dst * row + byte;
                }
            }
            for (c, value) in chunk.iter().enumerate() {
                if first + (c as u32) * THREADS < items {
                    store_chunk(to[c], *value);
                }
            }
            first += COPIES as u32 * THREADS;
        }
        // Metric and position, as the mover scan read them.
        let mut i = thread as usize;
        while i < pairs as usize {
            let to = *words.add(m.holes + i) as u64;
            store::<u32>(p.cache.metric, to, *words.add(m.mover_metrics + i));
            store::<u32>(p.cache.position, to, *words.add(m.mover_positions + i));
            i += THREADS as usize;
        }
    }
}

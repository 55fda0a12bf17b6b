//! Variable-rate eviction scheduling (SPEC §5) as a radix select over metric keys.
//!
//! Freeing `k` blocks of a head slot costs the metric of its `c_k = r + (k - 1) B`-th cheapest
//! evictable KV, so the blocks a group takes are exactly those whose cost is below a threshold
//! `T*` (plus some of the ties at `T*` in `(layer, head, k)` order). Blocks with cost `<= t` in
//! head slot `h` number `blocks_within(count_h(key <= t), r_h, B)`, which needs only the count
//! of evictable keys `<= t`, not their order. So `T*` is found by a radix select over the
//! 32-bit metric key (`metric_key`) in 4 passes of 8 bits, each pass a histogram per head slot
//! (`sched_hist0`-`3`, grid `(work head slot, chunk)`: pass 0 reads the cache and writes each
//! KV's top 24 key bits and evictable flag, which passes 1 and 2 stream; pass 2 lists the few
//! KVs pass 3 can want) and a digit choice per group
//! (`sched_digit`, CTAs of 16 head slots of a group, a warp per head slot scanning its 256
//! bins; the last CTA of a group to finish chooses). `sched_init` first copies the inputs from
//! host-mapped memory and clears the state; after the first histogram `sched_budget`
//! turns each sequence's budget into blocks per group; the last slice of the last digit pass
//! also gives each head slot of its group its blocks and shares out the ties. The work is
//! linear in the KVs per pass; nothing is sorted. `compact.rs` then picks each head slot's
//! `c_h` cheapest KVs and moves the rest. Every kernel after `sched_init` first waits for the
//! one before it (`wait_for_prior_grid`) and lets the next one start its CTAs early
//! (`allow_dependent_grid`): with the Hopper module the host chains them (programmatic
//! dependent launch), so each launch overlaps the previous kernel's last CTAs.
//!
//! Host-validated: sequence rows, budgets and lengths; every live block in the pool.

use kvc_abi::geometry::metric_key;
use kvc_abi::params::compress::{
    blocks_within, evictions, fill, EvictableWindow, KeyFilter, BUDGET_BLOCKS, BUDGET_RATE,
    BUDGET_TOKENS, CANDIDATE_WORDS, GROUP_NEED, GROUP_PREFIX, HEAD_BELOW, HEAD_BLOCKS,
    HEAD_EVICTABLE, HEAD_EVICTIONS, HEAD_FILL, HEAD_LEN, IO_HEAD_BLOCKS, IO_HEAD_EVICTIONS,
    LISTED_PASS, RADIX_BINS, RADIX_PASSES, SEQ_IN_BUDGET_KIND, SEQ_IN_BUDGET_VALUE,
    SEQ_IN_LAST_POSITION, SEQ_IN_PROTECTED, SEQ_IN_SEQ, SEQ_OUT_CLAMPED, SEQ_OUT_REQUESTED,
    SEQ_OUT_TAKEN, SLICE_HEADS,
};
use kvc_abi::params::CompressParams;
use kvc_abi::plan::{
    COMPRESS_THREADS, HIST_CHUNK_KVS, LISTED_THREADS, MIN_BLOCK_SIZE, SCAN_THREADS, SCAN_WARPS,
    WARP_SIZE,
};

use crate::gpu::mem::{load, load_chunk, load_nc, store, store_chunk, Chunk};
use crate::gpu::mma::shared_addr;
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::{
    allow_dependent_grid, atomic_add_acq_rel, global_add, shared_add, shared_fetch_add, shared_min,
    wait_for_prior_grid,
};
use crate::gpu::thread::{block_idx_x, grid_dim_x, lane_id, sync_threads, thread_idx_x, warp_id};
use crate::gpu::warp::{inclusive_scan_u32, warp_sum_u64};

/// Bins each lane scans in `sched_digit` (two 16-byte loads).
const LANE_BINS: u32 = RADIX_BINS / WARP_SIZE;
const _: () = assert!(LANE_BINS == 8);

/// A sequence being compressed: its row, and the positions it may evict.
#[derive(Clone, Copy)]
pub struct SeqView {
    pub seq: u32,
    window: EvictableWindow,
}

impl SeqView {
    /// Whether a KV at `position` may be evicted: neither one of the first `sinks` positions
    /// nor in the protected window (SPEC §5).
    #[inline(always)]
    pub fn may_evict(self, position: i32) -> bool {
        self.window.contains(position)
    }
}

/// The view of work sequence `s`.
///
/// # Safety
/// `s < num_work_seqs`.
#[inline(always)]
pub unsafe fn seq_view(p: &CompressParams, s: u32) -> SeqView {
    // SAFETY: seq_in holds num_work_seqs rows.
    let (seq, last, protected) = unsafe {
        (
            load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_SEQ)),
            load::<i32>(p.seq_in, p.seq_in_word(s, SEQ_IN_LAST_POSITION)),
            load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_PROTECTED)),
        )
    };
    SeqView {
        seq,
        window: EvictableWindow::new(p.sinks, last, protected),
    }
}

/// Logical KVs a thread examines at once, so that their loads overlap.
pub const BATCH: usize = 8;
// `kv_run` reads a run of BATCH KVs from one block.
const _: () = assert!(BATCH as u32 <= MIN_BLOCK_SIZE);

/// Position, metric key and evictability of `BATCH` logical KVs of a head slot.
pub struct KvBatch {
    pub position: [i32; BATCH],
    /// The metric's bits.
    pub metric: [u32; BATCH],
    pub key: [u32; BATCH],
    pub evictable: [bool; BATCH],
}

/// Position, metric key and evictability (position in `[sinks, newest_evictable]`) of
/// `BATCH` logical KVs of a head slot at once; an index `>= len` is read as the last KV (so
/// every load is valid and all are issued together) and reported not evictable.
///
/// # Safety
/// `len > 0` is the head slot's length.
#[inline(always)]
pub unsafe fn kv_batch(
    p: &CompressParams,
    view: SeqView,
    head_slot: u64,
    idx: [u32; BATCH],
    len: u32,
) -> KvBatch {
    let geom = p.cache.geometry;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    let mut slot = [0u64; BATCH];
    for u in 0..BATCH {
        let i = idx[u].min(len - 1);
        // SAFETY: i < len: its block is a validated pool block of the head slot.
        let block = unsafe { load_nc::<i32>(table, geom.logical_block(i) as u64) } as u32;
        slot[u] = geom.pool_slot(block, geom.slot_in_block(i));
    }
    let mut batch = KvBatch {
        position: [0; BATCH],
        metric: [0; BATCH],
        key: [0; BATCH],
        evictable: [false; BATCH],
    };
    for u in 0..BATCH {
        // SAFETY: slot < num_blocks * B.
        unsafe {
            batch.position[u] = load::<i32>(p.cache.position, slot[u]);
            batch.metric[u] = load::<u32>(p.cache.metric, slot[u]);
            batch.key[u] = metric_key(f32::from_bits(batch.metric[u]));
        }
        batch.evictable[u] = idx[u] < len && view.may_evict(batch.position[u]);
    }
    batch
}

/// Byte addresses of the positions and of the metrics of the `BATCH` consecutive logical KVs
/// from `first` of a head slot. `first` is a multiple of `BATCH` and blocks hold at least
/// `MIN_BLOCK_SIZE >= BATCH` slots, so the run lies in one block: one block-table load, and
/// each array's run is two 16-byte aligned chunks.
///
/// # Safety
/// `first` is below the head slot's length (its block is a validated pool block).
#[inline(always)]
unsafe fn run_at(p: &CompressParams, head_slot: u64, first: u32) -> (u64, u64) {
    let geom = p.cache.geometry;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    // SAFETY: forwarded from the caller.
    let block = unsafe { load_nc::<i32>(table, geom.logical_block(first) as u64) } as u32;
    let at = geom.pool_slot(block, geom.slot_in_block(first)) * 4;
    (p.cache.position + at, p.cache.metric + at)
}

/// The metrics and the positions of the `BATCH` consecutive logical KVs from `first` of a
/// head slot (see `run_at`), as two 16-byte chunks each, all four loads issued at once.
///
/// # Safety
/// As [`run_at`].
#[inline(always)]
unsafe fn load_run(p: &CompressParams, head_slot: u64, first: u32) -> ([Chunk; 2], [Chunk; 2]) {
    // SAFETY: forwarded from the caller; the chunks lie in the run's block's slots.
    unsafe {
        let (position, metric) = run_at(p, head_slot, first);
        (
            [load_chunk(metric), load_chunk(metric + 16)],
            [load_chunk(position), load_chunk(position + 16)],
        )
    }
}

/// Position, metric key and evictability of the `BATCH` consecutive logical KVs from `first`
/// of a head slot (see `run_at`): one table load and four 16-byte loads, where `kv_batch`
/// needs a table load and two scalar loads per KV. KVs at or past `len` are reported not
/// evictable, and nothing is read when all are. For passes whose result does not depend on
/// which thread sees which KV.
///
/// # Safety
/// The head slot's first `len` KVs are in validated pool blocks.
#[inline(always)]
pub unsafe fn kv_run(
    p: &CompressParams,
    view: SeqView,
    head_slot: u64,
    first: u32,
    len: u32,
) -> KvBatch {
    let mut batch = KvBatch {
        position: [0; BATCH],
        metric: [0; BATCH],
        key: [0; BATCH],
        evictable: [false; BATCH],
    };
    if first >= len {
        return batch;
    }
    // SAFETY: first < len.
    let (metrics, positions) = unsafe { load_run(p, head_slot, first) };
    for u in 0..BATCH {
        batch.metric[u] = metrics[u / 4][u % 4];
        batch.key[u] = metric_key(f32::from_bits(batch.metric[u]));
        batch.position[u] = positions[u / 4][u % 4] as i32;
        batch.evictable[u] = first + (u as u32) < len && view.may_evict(batch.position[u]);
    }
    batch
}

/// Top bits of a metric key that pass 0's digests hold: the high key (16 bits) and, in
/// `key_mid`, the byte below it.
pub const DIGEST_BITS: u32 = 24;

/// The digests of the `BATCH` KVs from `first` of work head slot `w`: each metric key's top
/// 16 bits (pass 0's high key) as the top bits of a `u32`, with `mid` also the next 8 bits
/// below them (so the top `DIGEST_BITS`), and the evictable flags (bit `u` for KV `first +
/// u`): one 16-byte load, one byte, and with `mid` 8 bytes more.
///
/// # Safety
/// Histogram pass 0 ran; `first` is a multiple of `BATCH` below `p.key_stride()`.
#[inline(always)]
pub unsafe fn digest_run(p: &CompressParams, w: u32, first: u32, mid: bool) -> ([u32; BATCH], u32) {
    let at = p.digest_index(w, first);
    // SAFETY: inside w's rows (16-byte aligned high keys, 8-byte aligned runs of key bytes),
    // which pass 0 wrote.
    let (high, mid, flags) = unsafe {
        (
            load_chunk(p.key_high + 2 * at),
            if mid {
                load::<u64>(p.key_mid, at / 8)
            } else {
                0
            },
            load::<u8>(p.evictable, at / 8) as u32,
        )
    };
    (
        core::array::from_fn(|u| {
            (high[u / 2] >> (16 * (u % 2))) << 16 | ((mid >> (8 * u)) as u32 & 0xff) << 8
        }),
        flags,
    )
}

/// Pool slot of logical KV `idx` of `head_slot`.
///
/// # Safety
/// `idx` is below the head slot's length.
#[inline(always)]
pub unsafe fn pool_slot_of(p: &CompressParams, head_slot: u64, idx: u32) -> u64 {
    let geom = p.cache.geometry;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    // SAFETY: idx < len: its block is a validated pool block of the head slot.
    let block = unsafe { load::<i32>(table, geom.logical_block(idx) as u64) } as u32;
    geom.pool_slot(block, geom.slot_in_block(idx))
}

/// Histogram pass `p.pass` of the metric keys of one chunk of one work head slot: the keys of
/// evictable KVs whose high bits equal the group's threshold prefix, binned by their next 8
/// bits (pass 0: all evictable keys, by their top 8 bits).
///
/// Pass 0 gathers each KV's metric and position through the block tables; it also
/// writes the top 24 bits of each key and an evictable flag per KV to the workspace (3 bytes
/// and 1 bit a KV against the 8 bytes it read), which the later passes stream instead
/// (docs/PERF.md, compression v14): passes 1 and 2 need nothing else. The KVs pass 2 counts
/// are the only ones pass 3 can want, so pass 2 also lists them per chunk, and pass 3 reads
/// the list, and the metrics of the listed KVs under its prefix, instead of the chunk
/// wherever the list fit (compression v15), in CTAs of `LISTED_THREADS` (v19). Each pass is
/// an entry of its own, so that no pass's code sets another's registers.
///
/// # Safety
/// Launched with `plan_compress`'s hist dims (`hist_listed` for `LISTED_PASS`) after the
/// previous digit pass, with `p.pass == PASS`.
#[inline(always)]
pub unsafe fn sched_hist_body<const PASS: u32>(p: &CompressParams) {
    allow_dependent_grid();
    wait_for_prior_grid();
    let w = block_idx_x() / p.chunks_per_head.max(1);
    let chunk = block_idx_x() % p.chunks_per_head.max(1);
    let s = w / p.heads_per_seq().max(1);
    let q = w / p.group_heads.max(1);
    let lo = chunk * HIST_CHUNK_KVS;
    if PASS == 0 {
        // SAFETY: the launch's work head slot, sequence and chunk; every thread gets here.
        unsafe {
            histogram::<COMPRESS_THREADS>(p, w, |bins_at, _| first_pass(p, w, s, lo, bins_at))
        };
        // The chunk's evictable KVs (its bins' sum) go to the head slot's row, so that the
        // budget kernel reads one word a head slot instead of its 256 bins.
        let bins = dynamic_f32() as *const u32;
        let mut evictable = 0u64;
        let mut b = thread_idx_x();
        while b < RADIX_BINS {
            // SAFETY: the smem histogram, final since `histogram`'s last barrier.
            evictable += unsafe { *bins.add(b as usize) } as u64;
            b += COMPRESS_THREADS;
        }
        // SAFETY: every lane of every warp gets here; heads holds w's row (zero at launch).
        unsafe {
            let evictable = warp_sum_u64(evictable) as u32;
            if lane_id() == 0 && evictable != 0 {
                global_add(p.heads + p.head_word(w, HEAD_EVICTABLE) * 4, evictable);
            }
        }
        return;
    }
    if PASS == LISTED_PASS {
        // A CTA of LISTED_THREADS. SAFETY: the launch's work head slot, group and chunk; pass
        // 2 listed the chunk's candidates.
        let listed = unsafe { Listed::load(p, w, s, q, chunk) };
        if listed.need == 0 {
            return; // a group that gives nothing skips the later passes (uniform over the CTA)
        }
        // SAFETY: as above; every thread gets here (the count is the CTA's).
        unsafe {
            if listed.count <= LIST_KEYS {
                histogram::<LISTED_THREADS>(p, w, |bins_at, _| listed.count(p, w, lo, bins_at));
            } else {
                // More candidates than the list holds: the chunk's digests, in sweeps.
                histogram::<LISTED_THREADS>(p, w, |bins_at, count_at| {
                    let sweep = (LATER_RUNS * BATCH) as u32 * LISTED_THREADS;
                    let mut first = lo;
                    while first < lo + HIST_CHUNK_KVS {
                        let later = LaterRuns::load::<LISTED_THREADS>(p, w, s, q, first, PASS);
                        later.count(p, w, chunk, bins_at, count_at, PASS);
                        first += sweep;
                    }
                })
            }
        };
        return;
    }
    // SAFETY: as above; pass 0 ran before.
    let later = unsafe { LaterRuns::load::<COMPRESS_THREADS>(p, w, s, q, lo, PASS) };
    if later.need == 0 {
        return; // as above
    }
    // SAFETY: w and the chunk are the launch's; every thread gets here.
    unsafe {
        histogram::<COMPRESS_THREADS>(p, w, |bins_at, count_at| {
            later.count(p, w, chunk, bins_at, count_at, PASS)
        })
    };
    if PASS == LISTING_PASS && thread_idx_x() == 0 {
        // SAFETY: the chunk's row of the candidate lists; `histogram` ended with a barrier
        // after the count was final.
        unsafe {
            let count = *(dynamic_f32() as *const u32).add(RADIX_BINS as usize);
            store::<u32>(p.candidates, p.candidate_word(w, chunk, 0), count);
        }
    }
}

/// A CTA's histogram of pass `p.pass` for work head slot `w`: zeroes the shared bins and the
/// candidate count after them, runs `fill(bins_at, count_at)` (shared addresses) on every
/// thread, and adds the non-zero bins to the pass's global histogram.
///
/// # Safety
/// Every thread of a CTA of `THREADS` calls it; the launch reserved `RADIX_BINS + 1` words of
/// shared memory.
#[inline(always)]
unsafe fn histogram<const THREADS: u32>(p: &CompressParams, w: u32, fill: impl FnOnce(u32, u32)) {
    let bins = dynamic_f32() as *mut u32;
    let thread = thread_idx_x();
    // SAFETY: inside the reserved words; all threads reach the barriers.
    unsafe {
        let mut b = thread;
        while b <= RADIX_BINS {
            *bins.add(b as usize) = 0;
            b += THREADS;
        }
        sync_threads();
        fill(
            shared_addr(bins),
            shared_addr(bins.add(RADIX_BINS as usize)),
        );
        sync_threads();
    }
    let num_work_heads = p.num_work_heads();
    let mut b = thread;
    while b < RADIX_BINS {
        // SAFETY: inside the smem histogram and the global histogram of this pass.
        unsafe {
            let count = *bins.add(b as usize);
            if count != 0 {
                global_add(
                    p.hist + p.hist_word(num_work_heads, p.pass, w, b) * 4,
                    count,
                );
            }
        }
        b += THREADS;
    }
}

/// Pass 0 (`sched_hist0`) over chunk `[lo, lo + HIST_CHUNK_KVS)` of work head slot `w` (of work
/// sequence `s`): every evictable key, by its top 8 bits, into the shared bins at `bins_at`;
/// and the chunk's digests: high keys, the key bytes below them and evictable flags (all zero
/// past the head slot's length).
///
/// # Safety
/// `w`, `s` and `lo` are a histogram CTA's; `bins_at` holds `RADIX_BINS` zeroed words.
#[inline(always)]
unsafe fn first_pass(p: &CompressParams, w: u32, s: u32, lo: u32, bins_at: u32) {
    // SAFETY: s < num_work_seqs.
    let view = unsafe { seq_view(p, s) };
    let head_slot = p.head_slot(view.seq, w);
    // SAFETY: head_slot is a validated head slot.
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let end = lo + HIST_CHUNK_KVS;
    let hi = len.min(end);
    let mut first = lo + BATCH as u32 * thread_idx_x();
    while first < end {
        let at = p.digest_index(w, first);
        let mut flags = 0u32;
        let mut high = [0u32; 4];
        let mut mid = 0u64;
        if first < hi {
            // SAFETY: first < hi <= len.
            let (metrics, positions) = unsafe { load_run(p, head_slot, first) };
            for u in 0..BATCH {
                let key = metric_key(f32::from_bits(metrics[u / 4][u % 4]));
                high[u / 2] |= (key >> 16) << (16 * (u % 2));
                mid |= (((key >> 8) & 0xff) as u64) << (8 * u);
                if first + (u as u32) < hi && view.may_evict(positions[u / 4][u % 4] as i32) {
                    flags |= 1 << u;
                    // SAFETY: the bin lies in the smem histogram.
                    unsafe { shared_add(bins_at + 4 * (key >> 24), 1) };
                }
            }
        }
        // SAFETY: at is a multiple of 8 inside w's rows (16-byte aligned high keys).
        unsafe {
            store_chunk(p.key_high + 2 * at, high);
            store::<u64>(p.key_mid, at / 8, mid);
            store::<u8>(p.evictable, at / 8, flags as u8);
        }
        first += BATCH as u32 * COMPRESS_THREADS;
    }
}

/// Runs of `BATCH` KVs a thread of a later histogram pass reads at once: its whole share of
/// the chunk (in CTAs of `COMPRESS_THREADS`; pass 3's smaller CTAs take the chunk in sweeps).
const LATER_RUNS: usize = 2;
const _: () = assert!(HIST_CHUNK_KVS == LATER_RUNS as u32 * BATCH as u32 * COMPRESS_THREADS);
const _: () =
    assert!(HIST_CHUNK_KVS.is_multiple_of(LATER_RUNS as u32 * BATCH as u32 * LISTED_THREADS));

/// What a thread of histogram passes 1 to 3 reads before it counts, every load issued at
/// once (these passes are short: a chain of dependent loads would set their time): the
/// group's need and prefix, the sequence row, and pass 0's digests of the thread's runs of
/// the chunk (from pass 2 on, whose digit lies below the high key, with the key bytes below
/// it).
struct LaterRuns {
    need: u32,
    prefix: u32,
    seq: u32,
    first: [u32; LATER_RUNS],
    key: [[u32; BATCH]; LATER_RUNS],
    flags: [u32; LATER_RUNS],
}

impl LaterRuns {
    /// The reads of this thread (of a CTA of `THREADS`) for the `LATER_RUNS * BATCH *
    /// THREADS` KVs from `lo` of a chunk of work head slot `w` (of work sequence `s`, group
    /// `q`) in pass `pass` (`p.pass`); from pass 2 on, whose digit lies below the high keys,
    /// the key bytes below them too.
    ///
    /// # Safety
    /// `w`, `s` and `q` are a histogram CTA's, the KVs inside its chunk; pass 0 ran.
    #[inline(always)]
    unsafe fn load<const THREADS: u32>(
        p: &CompressParams,
        w: u32,
        s: u32,
        q: u32,
        lo: u32,
        pass: u32,
    ) -> LaterRuns {
        let low = pass >= LISTING_PASS;
        let first: [u32; LATER_RUNS] =
            core::array::from_fn(|r| lo + BATCH as u32 * (thread_idx_x() + r as u32 * THREADS));
        let mut runs = LaterRuns {
            // SAFETY: q < num_groups, s < num_work_seqs.
            need: unsafe { load::<u32>(p.groups, p.group_word(q, GROUP_NEED)) },
            prefix: unsafe { load::<u32>(p.groups, p.group_word(q, GROUP_PREFIX)) },
            seq: unsafe { load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_SEQ)) },
            first,
            key: [[0; BATCH]; LATER_RUNS],
            flags: [0; LATER_RUNS],
        };
        for r in 0..LATER_RUNS {
            // SAFETY: the run lies in the chunk, whose digests pass 0 wrote.
            (runs.key[r], runs.flags[r]) = unsafe { digest_run(p, w, first[r], low) };
        }
        runs
    }

    /// Pass `pass` (1 to 3) over the runs of chunk `chunk` into the shared bins at
    /// `bins_at`: the evictable keys under the group's prefix, by their next 8 bits. Passes 1
    /// and 2 find their digit in the digests; in pass 3 they only preselect, and the full
    /// metrics are read for the runs they let through (all such runs' loads at once). Pass 2
    /// also lists the KVs it counted in the chunk's row of `candidates`, counting them in the
    /// shared word at `count_at`.
    ///
    /// # Safety
    /// As [`LaterRuns::load`], whose reads these are (with the same `pass`); `bins_at` holds
    /// `RADIX_BINS` zeroed words, `count_at` a zeroed word.
    #[inline(always)]
    unsafe fn count(
        mut self,
        p: &CompressParams,
        w: u32,
        chunk: u32,
        bins_at: u32,
        count_at: u32,
        pass: u32,
    ) {
        let bits = 8 * pass;
        let digest_bits = bits.min(DIGEST_BITS);
        let digest_filter = KeyFilter::new(self.prefix >> (bits - digest_bits), digest_bits);
        let filter = KeyFilter::new(self.prefix, bits);
        let digit_shift = 24 - bits;
        let mut wanted = [[false; BATCH]; LATER_RUNS];
        let mut any = [false; LATER_RUNS];
        for r in 0..LATER_RUNS {
            for u in 0..BATCH {
                wanted[r][u] = self.flags[r] & (1 << u) != 0 && digest_filter.wants(self.key[r][u]);
                any[r] |= wanted[r][u];
            }
        }
        if pass == LISTING_PASS {
            // SAFETY: the count is the CTA's; the chunk's row of the candidate lists.
            unsafe {
                let place = reserve(count_at, &wanted);
                list(p, w, chunk, place, &self.first, &self.key, &wanted);
            }
        }
        if bits >= DIGEST_BITS {
            let head_slot = p.head_slot(self.seq, w);
            let mut metrics = [[[0u32; 4]; 2]; LATER_RUNS];
            for r in 0..LATER_RUNS {
                if any[r] {
                    // SAFETY: a flag is set only below the head slot's length, so the run
                    // starts below it and its chunks lie in its block's slots.
                    metrics[r] = unsafe {
                        let (_, metric_at) = run_at(p, head_slot, self.first[r]);
                        [load_chunk(metric_at), load_chunk(metric_at + 16)]
                    };
                }
            }
            for r in 0..LATER_RUNS {
                for u in 0..BATCH {
                    self.key[r][u] = metric_key(f32::from_bits(metrics[r][u / 4][u % 4]));
                }
            }
        }
        for r in 0..LATER_RUNS {
            for u in 0..BATCH {
                if wanted[r][u] && filter.wants(self.key[r][u]) {
                    let bin = (self.key[r][u] >> digit_shift) & 0xff;
                    // SAFETY: the bin lies in the smem histogram.
                    unsafe { shared_add(bins_at + 4 * bin, 1) };
                }
            }
        }
    }
}

/// The pass that lists its candidates, and the pass that reads them: every key the latter
/// wants has the high key the former's group prefix selected, and the latter is the one pass
/// whose digit lies below the digests.
const LISTING_PASS: u32 = LISTED_PASS - 1;
const _: () = assert!(LISTED_PASS == RADIX_PASSES - 1 && 8 * LISTING_PASS == 16);
const _: () = assert!(8 * LISTED_PASS == DIGEST_BITS);
/// Entries a chunk's candidate list holds: each a KV's index in the chunk, with its key's
/// byte below the high key at bit `LIST_MID_SHIFT`.
const LIST_KEYS: u32 = CANDIDATE_WORDS - 1;
const LIST_MID_SHIFT: u32 = 16;
const _: () = assert!(HIST_CHUNK_KVS <= 1 << LIST_MID_SHIFT);
/// List entries a thread of pass 3 reads (at places `thread + k * LISTED_THREADS`).
const LISTED_ENTRIES: usize = LIST_KEYS.div_ceil(LISTED_THREADS) as usize;

/// Counts this thread's wanted KVs in the chunk's candidate count, the shared word at
/// `count_at` (so a count above `LIST_KEYS` says the list is incomplete); returns the place
/// in the list of the first.
///
/// # Safety
/// `count_at` is a shared word the CTA zeroed.
#[inline(always)]
unsafe fn reserve(count_at: u32, wanted: &[[bool; BATCH]; LATER_RUNS]) -> u32 {
    let mut n = 0;
    for r in 0..LATER_RUNS {
        for u in 0..BATCH {
            n += wanted[r][u] as u32;
        }
    }
    // SAFETY: forwarded from the caller.
    if n == 0 {
        0
    } else {
        unsafe { shared_fetch_add(count_at, n) }
    }
}

/// Writes the KVs `first[r] + u` with `wanted[r][u]` (digest keys `key[r][u]`) to chunk
/// `chunk` of work head slot `w`'s candidate list from place `at` on (see `reserve`), as far
/// as it has room.
///
/// # Safety
/// `w` and `chunk` are a histogram CTA's; `at` is what `reserve` returned for `wanted`.
#[inline(always)]
unsafe fn list(
    p: &CompressParams,
    w: u32,
    chunk: u32,
    mut at: u32,
    first: &[u32; LATER_RUNS],
    key: &[[u32; BATCH]; LATER_RUNS],
    wanted: &[[bool; BATCH]; LATER_RUNS],
) {
    // SAFETY: forwarded from the caller; entries past the row's room are not written.
    unsafe {
        for r in 0..LATER_RUNS {
            for u in 0..BATCH {
                if wanted[r][u] {
                    if at < LIST_KEYS {
                        let index = (first[r] + u as u32) % HIST_CHUNK_KVS;
                        let entry = (key[r][u] >> 8 & 0xff) << LIST_MID_SHIFT | index;
                        store::<u32>(p.candidates, p.candidate_word(w, chunk, 1 + at), entry);
                    }
                    at += 1;
                }
            }
        }
    }
}

/// What a thread of histogram pass 3 (a CTA of `LISTED_THREADS`) reads first, every load
/// issued at once: the group's need and prefix, the sequence row, the chunk's candidate count
/// (pass 2's) and the entries at the thread's `LISTED_ENTRIES` places in the list (used only
/// where the place is below the count and the count fits the list).
struct Listed {
    need: u32,
    prefix: u32,
    seq: u32,
    count: u32,
    entry: [u32; LISTED_ENTRIES],
}

impl Listed {
    /// The reads of this thread for chunk `chunk` of work head slot `w` (of work sequence `s`,
    /// group `q`).
    ///
    /// # Safety
    /// `w`, `s`, `q` and `chunk` are a histogram CTA's; pass 2 ran.
    #[inline(always)]
    unsafe fn load(p: &CompressParams, w: u32, s: u32, q: u32, chunk: u32) -> Listed {
        // SAFETY: q < num_groups, s < num_work_seqs; the chunk's row of the candidate lists
        // (places clamped into it).
        unsafe {
            Listed {
                need: load::<u32>(p.groups, p.group_word(q, GROUP_NEED)),
                prefix: load::<u32>(p.groups, p.group_word(q, GROUP_PREFIX)),
                seq: load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_SEQ)),
                count: load::<u32>(p.candidates, p.candidate_word(w, chunk, 0)),
                entry: core::array::from_fn(|k| {
                    let place = Self::place(k).min(LIST_KEYS - 1);
                    load::<u32>(p.candidates, p.candidate_word(w, chunk, 1 + place))
                }),
            }
        }
    }

    /// This thread's place `k` in the list.
    #[inline(always)]
    fn place(k: usize) -> u32 {
        thread_idx_x() + k as u32 * LISTED_THREADS
    }

    /// Pass 3 over the list of chunk `[lo, lo + HIST_CHUNK_KVS)` of work head slot `w` into
    /// the shared bins at `bins_at`: the listed KVs under the group's 24-bit prefix (their
    /// high key is its top 16 bits, or pass 2 had not listed them; the entry holds the byte
    /// below), by their key's last 8 bits, read from the cache.
    ///
    /// # Safety
    /// The list is complete (`count <= LIST_KEYS`); `w` and `lo` are the CTA's; `bins_at`
    /// holds `RADIX_BINS` zeroed words.
    #[inline(always)]
    unsafe fn count(self, p: &CompressParams, w: u32, lo: u32, bins_at: u32) {
        let head_slot = p.head_slot(self.seq, w);
        let wanted: [bool; LISTED_ENTRIES] = core::array::from_fn(|k| {
            Self::place(k) < self.count && self.entry[k] >> LIST_MID_SHIFT == self.prefix & 0xff
        });
        // Every wanted KV's table entry, then every metric, each round's loads at once.
        let slots: [u64; LISTED_ENTRIES] = core::array::from_fn(|k| {
            let index = lo + (self.entry[k] & ((1 << LIST_MID_SHIFT) - 1));
            // SAFETY: a listed KV is evictable, so below the head slot's length.
            if wanted[k] {
                unsafe { pool_slot_of(p, head_slot, index) }
            } else {
                0
            }
        });
        for k in 0..LISTED_ENTRIES {
            if wanted[k] {
                // SAFETY: a pool slot of the head slot; the bin lies in the smem histogram.
                unsafe {
                    let key = metric_key(f32::from_bits(load::<u32>(p.cache.metric, slots[k])));
                    shared_add(bins_at + 4 * (key & 0xff), 1);
                }
            }
        }
    }
}

/// Sum over the CTA (`SCAN_THREADS` threads) of a per-thread u64, through shared memory words
/// `scratch[..2 * SCAN_WARPS]`; every thread gets it.
///
/// # Safety
/// Every thread of the CTA calls it; `scratch` holds `2 * SCAN_WARPS` u32 words that no
/// thread uses between the calls.
#[inline(always)]
unsafe fn block_sum_u64(scratch: *mut u32, value: u64) -> u64 {
    let warp = warp_id() as usize;
    // SAFETY: forwarded from the caller; the first barrier ends the previous call's reads.
    unsafe {
        let sum = warp_sum_u64(value);
        sync_threads();
        if lane_id() == 0 {
            *scratch.add(2 * warp) = sum as u32;
            *scratch.add(2 * warp + 1) = (sum >> 32) as u32;
        }
        sync_threads();
        let mut total = 0u64;
        for w in 0..SCAN_WARPS as usize {
            total += *scratch.add(2 * w) as u64 | (*scratch.add(2 * w + 1) as u64) << 32;
        }
        total
    }
}

/// Exclusive prefix sum over the CTA's threads in thread order, and the CTA's total, through
/// shared memory words `scratch[..SCAN_WARPS]`.
///
/// # Safety
/// As [`block_sum_u64`].
#[inline(always)]
unsafe fn block_scan_u32(scratch: *mut u32, value: u32) -> (u32, u32) {
    let warp = warp_id();
    // SAFETY: forwarded from the caller; the first barrier ends the previous call's reads.
    unsafe {
        let inclusive = inclusive_scan_u32(value);
        sync_threads();
        if lane_id() == WARP_SIZE - 1 {
            *scratch.add(warp as usize) = inclusive;
        }
        sync_threads();
        let (mut before, mut total) = (0u32, 0u32);
        for w in 0..SCAN_WARPS {
            let count = *scratch.add(w as usize);
            if w < warp {
                before += count;
            }
            total += count;
        }
        (before + inclusive - value, total)
    }
}

/// This lane's `LANE_BINS` consecutive bins of work head slot `w` in the histogram of `pass`.
///
/// # Safety
/// `pass < RADIX_PASSES`, `w < num_work_heads`.
#[inline(always)]
unsafe fn lane_bins(p: &CompressParams, pass: u32, w: u32) -> [u32; LANE_BINS as usize] {
    let num_work_heads = p.num_work_heads();
    let at = p.hist + p.hist_word(num_work_heads, pass, w, lane_id() * LANE_BINS) * 4;
    // SAFETY: the histograms hold RADIX_BINS bins for every work head slot and start 16-byte
    // aligned (`CompressPlan::offsets`), so the lane's 32 bytes are two aligned chunks.
    let (a, b) = unsafe { (load_chunk(at), load_chunk(at + 16)) };
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
}

/// Before histogram pass 0: copies the step's inputs (words `[0, io_status_word)` of
/// `host_io`, laid out as `seq_in`) from host memory to `seq_in`, and zeroes everything from
/// `seq_out` to the end of the histograms' tickets: words up to the 16-byte aligned
/// histograms, then 16-byte stores. One launch where a copy and a memset each cost the host
/// a driver call of 12-25 us before the device could start (docs/PERF.md, compression v16).
///
/// # Safety
/// Launched with `plan_compress`'s init dims; `host_io` holds the inputs.
#[inline(always)]
pub unsafe fn sched_init_body(p: &CompressParams) {
    allow_dependent_grid();
    let threads = grid_dim_x() as u64 * COMPRESS_THREADS as u64;
    let me = block_idx_x() as u64 * COMPRESS_THREADS as u64 + thread_idx_x() as u64;
    let inputs = p.io_status_word();
    let before_hist = (p.hist - p.seq_out) / 4;
    let hist_words = p.hist_clear_words();
    let hist_chunks = hist_words / 4;
    // SAFETY: the workspace holds seq_in, seq_out up to the histograms, and the histograms
    // with their tickets (`CompressPlan::offsets`, `hist_bytes`); hist is 16-byte aligned;
    // host_io holds the inputs. Each word and chunk is one thread's.
    unsafe {
        let mut i = me;
        while i < inputs {
            store::<u32>(p.seq_in, i, load::<u32>(p.host_io, i));
            i += threads;
        }
        let mut i = me;
        while i < before_hist {
            store::<u32>(p.seq_out, i, 0);
            i += threads;
        }
        let mut i = me;
        while i < hist_chunks {
            store_chunk(p.hist + 16 * i, [0; 4]);
            i += threads;
        }
        let mut i = hist_chunks * 4 + me;
        while i < hist_words {
            store::<u32>(p.hist, i, 0);
            i += threads;
        }
    }
}

/// Per sequence: each head slot's length and fill next to its evictable count (which pass 0
/// added up), the budget in blocks (SPEC §5.5), its share per group clamped to what the group
/// can free, and the report. An explicit block budget that some group cannot meet sets
/// `status`. A thread takes a head slot at a time, a warp a group at a time.
///
/// # Safety
/// Launched with `plan_compress`'s budget dims after histogram pass 0.
#[inline(always)]
pub unsafe fn sched_budget_body(p: &CompressParams) {
    allow_dependent_grid();
    wait_for_prior_grid();
    let geom = p.cache.geometry;
    let s = block_idx_x();
    let heads = p.heads_per_seq();
    let first = s * heads;
    let (thread, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
    // SAFETY: s < num_work_seqs.
    let view = unsafe { seq_view(p, s) };
    let mut compressible = 0u64;
    let mut in_use = 0u64;
    let mut i = thread;
    while i < heads {
        let w = first + i;
        // SAFETY: a work head slot of this sequence, validated; pass 0 added its evictable
        // KVs to its row.
        let (len, evictable) = unsafe {
            (
                load::<i32>(p.cache.context_lens, p.head_slot(view.seq, w)) as u32,
                load::<u32>(p.heads, p.head_word(w, HEAD_EVICTABLE)),
            )
        };
        // SAFETY: heads holds a row for every work head slot.
        unsafe {
            store::<u32>(p.heads, p.head_word(w, HEAD_LEN), len);
            store::<u32>(
                p.heads,
                p.head_word(w, HEAD_FILL),
                fill(len, geom.block_size),
            );
        }
        compressible += evictable as u64;
        in_use += geom.blocks_for(len) as u64;
        i += SCAN_THREADS;
    }
    let scratch = dynamic_f32() as *mut u32;
    // SAFETY: every thread calls these; the launch reserved the scratch. Their barriers also
    // make the head rows written above visible to the whole CTA.
    let (compressible, in_use) = unsafe {
        (
            block_sum_u64(scratch, compressible),
            block_sum_u64(scratch, in_use),
        )
    };
    // SAFETY: seq_in holds this sequence's row.
    let (kind, value) = unsafe {
        (
            load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_BUDGET_KIND)),
            load::<u32>(p.seq_in, p.seq_in_word(s, SEQ_IN_BUDGET_VALUE)),
        )
    };
    let b = geom.block_size as u64;
    let wanted = match kind {
        BUDGET_RATE => {
            let keep = core::intrinsics::ceilf64(compressible as f64 / f32::from_bits(value) as f64)
                as u64;
            (compressible - keep.min(compressible)) / b.max(1)
        }
        BUDGET_TOKENS => in_use.saturating_sub((heads as u64 * value as u64).div_ceil(b.max(1))),
        _ => value as u64,
    };
    let groups = (heads / p.group_heads.max(1)).max(1);
    let requested = (wanted - wanted % groups as u64).min(u32::MAX as u64);
    let per_group = requested / groups as u64;
    let mut taken = 0u64;
    let mut clamped = 0u64;
    let mut g = warp;
    while g < groups {
        let q = s * groups + g;
        let mut possible = 0u64;
        let mut i = lane;
        while i < p.group_heads {
            let w = q * p.group_heads + i;
            // SAFETY: written above by this CTA, visible after the barriers.
            unsafe {
                let evictable = load::<u32>(p.heads, p.head_word(w, HEAD_EVICTABLE));
                let fill = load::<u32>(p.heads, p.head_word(w, HEAD_FILL));
                possible += blocks_within(evictable, fill, geom.block_size) as u64;
            }
            i += WARP_SIZE;
        }
        // SAFETY: the group loop is warp-uniform.
        let possible = unsafe { warp_sum_u64(possible) };
        if lane == 0 {
            let need = per_group.min(possible);
            // SAFETY: q < num_groups.
            unsafe {
                store::<u32>(p.groups, p.group_word(q, GROUP_PREFIX), 0);
                store::<u32>(p.groups, p.group_word(q, GROUP_NEED), need as u32);
            }
            taken += need;
            clamped += (per_group > possible) as u64;
        }
        g += SCAN_WARPS;
    }
    // SAFETY: every thread calls these.
    let (taken, clamped) = unsafe {
        (
            block_sum_u64(scratch, taken),
            block_sum_u64(scratch, clamped),
        )
    };
    if thread == 0 {
        let report = |field: u32, value: u32| {
            // SAFETY: seq_out holds this sequence's row, host_io its copy.
            unsafe {
                store::<u32>(p.seq_out, p.seq_out_word(s, field), value);
                store::<u32>(p.host_io, p.io_seq_out_word(s, field), value);
            }
        };
        report(SEQ_OUT_REQUESTED, requested as u32);
        report(SEQ_OUT_TAKEN, taken as u32);
        report(SEQ_OUT_CLAMPED, (clamped > 0) as u32);
        // SAFETY: status is one word, host_io holds its copy.
        unsafe {
            if kind == BUDGET_BLOCKS && clamped > 0 {
                store::<u32>(p.status, 0, 1);
                store::<u32>(p.host_io, p.io_status_word(), 1);
            }
        }
    }
}

/// What the digit kernel reads of one work head slot: its fill, its count of keys below the
/// group's prefix of the pass, and this lane's bins of the pass's histogram.
struct HeadBins {
    fill: u32,
    below: u32,
    bins: [u32; LANE_BINS as usize],
}

/// Work head slot `w` for pass `pass` of a group whose prefix is `prefix`. The stored count
/// below is that of pass `pass - 1`; the bins of that pass below its digit (the low 8 bits of
/// `prefix`) are added here, so that the digit kernel needs no second look at the histograms
/// once it has chosen.
///
/// # Safety
/// The whole warp calls it; `w < num_work_heads`, `pass < RADIX_PASSES`.
#[inline(always)]
unsafe fn head_bins(p: &CompressParams, w: u32, pass: u32, prefix: u32) -> HeadBins {
    // SAFETY: heads and the histograms hold rows for w.
    unsafe {
        let fill = load::<u32>(p.heads, p.head_word(w, HEAD_FILL));
        let stored = load::<u32>(p.heads, p.head_word(w, HEAD_BELOW));
        let bins = lane_bins(p, pass, w);
        let below = if pass > 0 {
            let digit = prefix & (RADIX_BINS - 1);
            let mut lane_below = 0u32;
            for (j, count) in lane_bins(p, pass - 1, w).iter().enumerate() {
                if lane_id() * LANE_BINS + (j as u32) < digit {
                    lane_below += count;
                }
            }
            stored + warp_sum_u64(lane_below as u64) as u32
        } else {
            stored
        };
        HeadBins { fill, below, bins }
    }
}

/// The group and slice of this CTA of the digit kernel, and the group's need and prefix;
/// `None` for a group that gives nothing (it skips every pass).
///
/// # Safety
/// Launched with `plan_compress`'s digit dims.
#[inline(always)]
unsafe fn group_slice(p: &CompressParams) -> Option<(u32, u32, u32, u32)> {
    let slices = p.slices_per_group();
    let q = block_idx_x() / slices;
    // SAFETY: q < num_groups.
    let (need, prefix) = unsafe {
        (
            load::<u32>(p.groups, p.group_word(q, GROUP_NEED)),
            load::<u32>(p.groups, p.group_word(q, GROUP_PREFIX)),
        )
    };
    (need > 0).then_some((q, block_idx_x() % slices, need, prefix))
}

/// Counts this CTA in at group `q`'s ticket `pass` (every CTA of the group's slices does);
/// true for the last, which then sees every other slice's writes. `flag` is a shared word.
///
/// # Safety
/// Every thread of the CTA calls it after its writes; the ticket is zero at launch.
#[inline(always)]
unsafe fn last_slice(p: &CompressParams, pass: u32, q: u32, flag: *mut u32) -> bool {
    // SAFETY: all threads reach the barriers; the ticket word lies in the zeroed region.
    unsafe {
        sync_threads();
        if thread_idx_x() == 0 {
            let ticket = p.hist + p.ticket_word(pass, q) * 4;
            *flag = (atomic_add_acq_rel(ticket, 1) == p.slices_per_group() - 1) as u32;
        }
        sync_threads();
        *flag != 0
    }
}

/// Digit choice of pass `p.pass` for one group: the smallest bin at whose end the group's
/// blocks with cost at or below it reach its need. A CTA takes a slice of `SLICE_HEADS` head
/// slots of the group, a warp each: it brings the slot's count below the prefix up to date
/// (the previous digit), sums the blocks per bin over its slice, and, when the group has
/// several slices, publishes the sums; the last slice to count in adds them up and chooses.
/// (One CTA per group did all of it, 256 head slots of a sequence one after another per warp:
/// 25 us a pass on an H100, docs/PERF.md compression v8.) In the last pass the warps also keep
/// their head slot's cumulative counts, from which the choosing slice then gives each head
/// slot of the group its blocks (`finish_group`; a kernel of its own until compression v21).
///
/// # Safety
/// Launched with `plan_compress`'s digit dims after histogram pass `p.pass`.
#[inline(always)]
pub unsafe fn sched_digit_body(p: &CompressParams) {
    allow_dependent_grid();
    wait_for_prior_grid();
    let last_pass = p.pass == RADIX_PASSES - 1;
    // SAFETY: launched with the digit dims.
    let Some((q, slice, need, prefix)) = (unsafe { group_slice(p) }) else {
        if last_pass {
            // A group that gives nothing: the host reads zero blocks and evictions for its
            // head slots (it does not clear them itself).
            let slices = p.slices_per_group();
            let i = (block_idx_x() % slices) * SLICE_HEADS + thread_idx_x();
            if thread_idx_x() < SLICE_HEADS && i < p.group_heads {
                let w = (block_idx_x() / slices) * p.group_heads + i;
                // SAFETY: w is a work head slot; host_io holds its result.
                unsafe {
                    store::<u32>(p.host_io, p.io_head_word(w, IO_HEAD_BLOCKS), 0);
                    store::<u32>(p.host_io, p.io_head_word(w, IO_HEAD_EVICTIONS), 0);
                }
            }
        }
        return; // uniform over the CTA
    };
    let geom = p.cache.geometry;
    let (thread, lane, warp) = (thread_idx_x(), lane_id(), warp_id());
    let rows = dynamic_f32() as *mut u32;
    // SAFETY: the launch reserved SCAN_WARPS * RADIX_BINS + 2 words.
    let (digit, flag) = unsafe {
        let digit = rows.add((SCAN_WARPS * RADIX_BINS) as usize);
        (digit, digit.add(1))
    };
    // Blocks with cost up to the end of each bin of the warp's head slot (none past the group).
    let mut blocks = [0u32; LANE_BINS as usize];
    let i = slice * SLICE_HEADS + warp;
    if i < p.group_heads {
        let w = q * p.group_heads + i;
        // SAFETY: the condition is warp-uniform; w is a work head slot.
        let head = unsafe { head_bins(p, w, p.pass, prefix) };
        if lane == 0 {
            // SAFETY: only this lane writes w's row; read by the next pass.
            unsafe { store::<u32>(p.heads, p.head_word(w, HEAD_BELOW), head.below) };
        }
        let lane_total: u32 = head.bins.iter().sum();
        // SAFETY: the warp is converged.
        let mut cum = head.below + unsafe { inclusive_scan_u32(lane_total) } - lane_total;
        let mut cums = [0u32; LANE_BINS as usize];
        for (j, count) in head.bins.iter().enumerate() {
            cum += count;
            cums[j] = cum;
            blocks[j] = blocks_within(cum, head.fill, geom.block_size);
        }
        if last_pass {
            let at = p.candidates + p.cum_word(w, lane * LANE_BINS) * 4;
            // SAFETY: w's row of cumulative counts (16-byte aligned: rows of whole chunks'
            // candidate lists from a 16-byte aligned start), only this lane's 32 bytes.
            unsafe {
                store_chunk(at, [cums[0], cums[1], cums[2], cums[3]]);
                store_chunk(at + 16, [cums[4], cums[5], cums[6], cums[7]]);
            }
        }
    }
    // SAFETY: inside the smem map; each lane owns its bins of its warp's row; all threads reach
    // the barriers (the branches on `slices` and `last_slice` are uniform).
    unsafe {
        for (j, b) in blocks.iter().enumerate() {
            *rows.add((warp * RADIX_BINS + lane * LANE_BINS + j as u32) as usize) = *b;
        }
        if thread == 0 {
            *digit = RADIX_BINS;
        }
        sync_threads();
        let mut total = 0u32;
        if thread < RADIX_BINS {
            for w in 0..SCAN_WARPS {
                total += *rows.add((w * RADIX_BINS + thread) as usize);
            }
        }
        let slices = p.slices_per_group();
        if slices > 1 {
            if thread < RADIX_BINS {
                store::<u32>(p.hist, p.partial_word(q, slice, thread), total);
            }
            if !last_slice(p, p.pass, q, flag) {
                return;
            }
            total = 0;
            if thread < RADIX_BINS {
                for s in 0..slices {
                    total += load::<u32>(p.hist, p.partial_word(q, s, thread));
                }
            }
        }
        if thread < RADIX_BINS && total >= need {
            shared_min(shared_addr(digit), thread);
        }
        sync_threads();
        // A bin always qualifies (module header).
        let chosen = *digit;
        if thread == 0 {
            store::<u32>(
                p.groups,
                p.group_word(q, GROUP_PREFIX),
                prefix << 8 | chosen,
            );
        }
        if last_pass {
            // The per-warp rows are free since the barrier above.
            finish_group(p, q, need, chosen, rows);
        }
    }
}

/// After the last digit `digit` of group `q` is chosen: each head slot's blocks below the
/// threshold and at most with its ties, from its cumulative counts and the last pass's bin at
/// the threshold; then the ties are shared out.
///
/// # Safety
/// Every thread of the group's choosing CTA calls it, after every slice's cumulative counts
/// were written and made visible to it; `scratch` holds `2 * SCAN_WARPS` words.
#[inline(always)]
unsafe fn finish_group(p: &CompressParams, q: u32, need: u32, digit: u32, scratch: *mut u32) {
    let geom = p.cache.geometry;
    let first = q * p.group_heads;
    let num_work_heads = p.num_work_heads();
    let mut i = thread_idx_x();
    while i < p.group_heads {
        let w = first + i;
        // SAFETY: rows of the group's head slots; only this thread writes w's from here on.
        unsafe {
            let at_most = load::<u32>(p.candidates, p.cum_word(w, digit));
            let at_threshold = load::<u32>(
                p.hist,
                p.hist_word(num_work_heads, RADIX_PASSES - 1, w, digit),
            );
            let fill = load::<u32>(p.heads, p.head_word(w, HEAD_FILL));
            store::<u32>(
                p.heads,
                p.head_word(w, HEAD_BLOCKS),
                blocks_within(at_most - at_threshold, fill, geom.block_size),
            );
            store::<u32>(
                p.heads,
                p.head_word(w, HEAD_EVICTIONS),
                blocks_within(at_most, fill, geom.block_size),
            );
        }
        i += SCAN_THREADS;
    }
    // SAFETY: every thread of the CTA calls it after the rows above.
    unsafe { take_ties(p, first, need, scratch) };
}

/// The tie-break: head slot `i` of the group (from work head slot `first`) holds
/// `HEAD_BLOCKS` blocks below the threshold and could free up to `HEAD_EVICTIONS` with the
/// ties; it takes `min(its ties, need - blocks below - ties of head slots before it)` of them,
/// so the ties go in `(layer, head, k)` order. Rewrites both words as the final blocks and
/// evictions.
///
/// # Safety
/// Every thread of the CTA calls it, after the rows of the group's head slots were written
/// and made visible to the CTA; `scratch` holds `2 * SCAN_WARPS` words.
#[inline(always)]
unsafe fn take_ties(p: &CompressParams, first: u32, need: u32, scratch: *mut u32) {
    let geom = p.cache.geometry;
    let thread = thread_idx_x();
    // SAFETY: all threads reach it; the rows written before are CTA-visible after it.
    unsafe { sync_threads() };
    let mut below_threshold = 0u64;
    let mut i = thread;
    while i < p.group_heads {
        // SAFETY: a row of the group.
        below_threshold +=
            unsafe { load::<u32>(p.heads, p.head_word(first + i, HEAD_BLOCKS)) } as u64;
        i += SCAN_THREADS;
    }
    // SAFETY: every thread calls it.
    let below_threshold = unsafe { block_sum_u64(scratch, below_threshold) } as u32;
    let mut ties_left = need - below_threshold;
    let mut chunk = 0;
    while chunk < p.group_heads {
        let i = chunk + thread;
        let w = first + i;
        let (below, at_most, fill) = if i < p.group_heads {
            // SAFETY: a row of the group, which only this thread accesses from here on.
            unsafe {
                (
                    load::<u32>(p.heads, p.head_word(w, HEAD_BLOCKS)),
                    load::<u32>(p.heads, p.head_word(w, HEAD_EVICTIONS)),
                    load::<u32>(p.heads, p.head_word(w, HEAD_FILL)),
                )
            }
        } else {
            (0, 0, 0)
        };
        let ties = at_most - below;
        // SAFETY: every thread calls it (the loop is uniform).
        let (before, total) = unsafe { block_scan_u32(scratch, ties) };
        if i < p.group_heads {
            let blocks = below + ties.min(ties_left.saturating_sub(before));
            let evicted = evictions(blocks, fill, geom.block_size);
            // SAFETY: as above; host_io holds w's result (consecutive threads, consecutive
            // head slots: the host-bound stores coalesce).
            unsafe {
                store::<u32>(p.heads, p.head_word(w, HEAD_BLOCKS), blocks);
                store::<u32>(p.heads, p.head_word(w, HEAD_EVICTIONS), evicted);
                store::<u32>(p.host_io, p.io_head_word(w, IO_HEAD_BLOCKS), blocks);
                store::<u32>(p.host_io, p.io_head_word(w, IO_HEAD_EVICTIONS), evicted);
            }
        }
        ties_left -= total.min(ties_left);
        chunk += SCAN_THREADS;
    }
}

//! Paged decode attention (SPEC §3): one query per query head against the live KVs of its head
//! slot, flash-decoding style.
//!
//! Grid `(partition, kv_head, seq)`, `DECODE_WARPS` warps a CTA. A CTA takes logical KVs
//! `[partition * partition_kvs, ..)` of head slot `(seq, layer_idx, kv_head)` and all `G` query
//! heads of the group, so K and V are read once per KV head. Each warp walks tiles of
//! `tile.tile_rows` consecutive rows (see [`kvc_abi::plan::decode_tile`]): a row is split over
//! `lanes_per_row` lanes with 16-byte loads, and every lane issues all its K and V loads of a
//! tile before using any. Scores are reduced over the lanes of a row, then each lane keeps its
//! own online softmax `(max, sum, acc)` per query head in the log2 domain (the host folds
//! log2(e) into `scale_log2`). Lanes that cover the same columns of different rows are merged by
//! shuffles, warps through shared memory ([`kvc_abi::plan::decode_smem`]).
//!
//! With one partition the CTA writes the normalised output; otherwise it writes the partition's
//! unnormalised accumulators and `(max, sum)` for `decode_merge` (a second launch without
//! recording; with recording, the CTA that leaves the handshake last merges them).
//!
//! Metric recording (`record` L2 or L1): every lane stores the scores of its rows in the
//! workspace's stash (`DecodeParams::stash`; in shared memory it would cost the SM a CTA), and
//! at the end the CTA reads them back, normalises them with the head slot's global max and sum
//! and adds `sum over g of a^2` (or `a`) to the metric of each recorded KV, one thread per KV
//! (a deterministic order, no float atomics). With a split, the global max and sum need every
//! partition: a CTA publishes its `(max, sum)`, counts itself in (release), and waits until all
//! live partitions of its head slot have (acquire). So that waiting cannot deadlock, CTAs take
//! their work in the order they start (a ticket from an atomic counter), partitions of a head
//! slot get consecutive tickets, and the planner keeps a head slot's partitions within one CTA
//! per SM: whenever a CTA waits, its siblings are running or next in line. The counters live
//! with the cache and are zero at every launch without a host copy: the last CTA to take a
//! ticket zeroes the ticket word, and a CTA counts itself out of the handshake too, so that
//! the last one out zeroes its head slot's word.
//!
//! Host-validated: the head slot's length is within its block table, the block ids it covers
//! are in the pool, `q`/`out` hold `[num_seqs, Hq, D]` of this dtype, and `D`, `G` match the
//! entry point. Rows past the live range are never read: they are clamped to the last live row
//! and masked, so stale or poisoned slots cannot leak in.

use kvc_abi::params::{record, stash_rows, DecodeParams, STASH_LINE_WORDS};
use kvc_abi::plan::{decode_smem, decode_tile, DecodeTile, DECODE_WARPS, WARP_SIZE};
use kvc_abi::Geometry;

use crate::decode_merge::{merge_recorded, partition_stats};
use crate::gpu::math::{exp2, fma, fmax, store_elem, CacheElem};
use crate::gpu::mem::{
    discard_l2_line, l2_keep_policy, load, load_chunk, load_chunk_nc, store, store_word_kept, Chunk,
};
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::{
    allow_dependent_grid, atomic_add_relaxed, fence_gpu, load_acquire, nanosleep, red_add_release,
};
use crate::gpu::thread::{
    block_idx_x, block_idx_y, block_idx_z, lane_id, sync_threads, thread_idx_x, warp_id,
};
use crate::gpu::warp::{shfl_xor, sum_within};

/// Most rows one lane covers per tile, most 16-byte loads of one tensor it issues per tile, and
/// most elements of a row it holds (bounds of `decode_tile`, checked in its tests).
const MAX_LANE_ROWS: usize = 8;
const MAX_LANE_LOADS: usize = 8;
const MAX_LANE_ELEMS: usize = 8;

/// Compile-time shape of one instantiation.
struct Shape<T, const D: usize, const G: usize>(T);

impl<T: CacheElem, const D: usize, const G: usize> Shape<T, D, G> {
    const TILE: DecodeTile = decode_tile(D as u32, T::BYTES, G as u32);
    const ROWS: usize = Self::TILE.rows_per_lane as usize;
    const CHUNKS: usize = Self::TILE.chunks_per_lane as usize;
    const ELEMS: usize = Self::TILE.lane_elems() as usize;
}

/// One lane's online-softmax state for the `G` query heads of the group: the running max of
/// the log2-domain scores, the sum of `exp2(score - max)`, and the `exp2`-weighted sum of the
/// lane's V columns.
struct Softmax<const G: usize> {
    max: [f32; G],
    sum: [f32; G],
    acc: [[f32; MAX_LANE_ELEMS]; G],
}

impl<const G: usize> Softmax<G> {
    #[inline(always)]
    fn new() -> Self {
        Self {
            max: [f32::NEG_INFINITY; G],
            sum: [0.0; G],
            acc: [[0.0; MAX_LANE_ELEMS]; G],
        }
    }

    /// Raises head `g`'s running max to at least `max`, rescaling its sum and accumulators,
    /// and returns the base that scores are taken relative to: the new max, or 0 while the
    /// state is still empty (so `-inf - -inf` never happens).
    #[inline(always)]
    fn raise_max(&mut self, g: usize, max: f32, elems: usize) -> f32 {
        let new_max = fmax(self.max[g], max);
        let base = if new_max == f32::NEG_INFINITY {
            0.0
        } else {
            new_max
        };
        let rescale = exp2(self.max[g] - base);
        self.max[g] = new_max;
        self.sum[g] *= rescale;
        for e in 0..elems {
            self.acc[g][e] *= rescale;
        }
        base
    }

    /// Folds in another state of the same columns: the `(max, sum, acc)` merge of flash
    /// attention.
    #[inline(always)]
    fn merge(&mut self, g: usize, max: f32, sum: f32, acc: &[f32; MAX_LANE_ELEMS], elems: usize) {
        let base = self.raise_max(g, max, elems);
        let scale = exp2(max - base);
        self.sum[g] = fma(sum, scale, self.sum[g]);
        for e in 0..elems {
            self.acc[g][e] = fma(acc[e], scale, self.acc[g][e]);
        }
    }
}

/// The decode kernel body for cache type `T`, head dimension `D` and group size `G`, with
/// metric recording when `RECORD` (then `p.record` is L2 or L1; separate entries, so that the
/// recording code costs the plain decode no registers).
///
/// # Safety
/// Launched with [`kvc_abi::plan::plan_decode`]'s dims for this `D`, `G` and dtype, and with
/// params the host validated (module header); `p.record` is off exactly when `R` is false.
#[inline(always)]
pub unsafe fn decode_body<T: CacheElem, const D: usize, const G: usize, const RECORD: bool>(
    p: &DecodeParams,
) {
    allow_dependent_grid();
    let tile = Shape::<T, D, G>::TILE;
    let rows = Shape::<T, D, G>::ROWS;
    let chunks = Shape::<T, D, G>::CHUNKS;
    let elems = Shape::<T, D, G>::ELEMS;
    let geom = p.cache.geometry;
    let elem_bytes = T::BYTES as u64;
    let lane = lane_id();
    let warp = warp_id();
    let smem = decode_smem(G as u32, D as u32, T::BYTES);
    let words = dynamic_f32();
    // SAFETY: every thread of the CTA calls this first.
    let work = unsafe { begin::<T, G>(p) };
    let Work {
        kv_head,
        seq,
        start,
        end,
        ..
    } = work;

    // This lane's columns of the G queries, pre-scaled into the log2 domain.
    let mut q = [[0.0f32; MAX_LANE_ELEMS]; G];
    for (g, q_g) in q.iter_mut().enumerate() {
        let q_elem = p.query_elem(seq, kv_head * G as u32 + g as u32);
        for c in 0..chunks {
            let elem = q_elem + tile.lane_elem(lane, c as u32) as u64;
            // SAFETY: q holds [num_seqs, Hq, D]; elem + PER_CHUNK <= its end, 16-byte aligned.
            let chunk = unsafe { load_chunk(p.q + elem * elem_bytes) };
            T::unpack(chunk, &mut q_g[c * T::PER_CHUNK..]);
        }
        for x in q_g.iter_mut().take(elems) {
            *x *= p.scale_log2;
        }
    }

    let mut state = Softmax::<G>::new();
    // The stash stays in L2 until the record phase reads and drops it.
    let keep = l2_keep_policy();
    let stash = Stash::of::<G>(p, &work);
    // SAFETY: every thread of the CTA calls it.
    let blocks = unsafe { BlockIds::load::<T, G>(p, &work) };
    let mut tile_start = start + warp * tile.tile_rows;
    while tile_start < end {
        // Issue every K and V load of the tile before the first use.
        let mut k = [[0u32; 4]; MAX_LANE_LOADS];
        let mut v = [[0u32; 4]; MAX_LANE_LOADS];
        let mut live = [false; MAX_LANE_ROWS];
        for i in 0..rows {
            let row = tile_start + tile.lane_row(lane, i as u32);
            live[i] = row < end;
            let row = if live[i] { row } else { end - 1 };
            // SAFETY: start <= row < end.
            let block_id = unsafe { blocks.get(geom, row) };
            let row_elem = geom.kv_elem(block_id, geom.slot_in_block(row));
            for c in 0..chunks {
                let byte = (row_elem + tile.lane_elem(lane, c as u32) as u64) * elem_bytes;
                // SAFETY: block_id is a validated pool block; the chunk lies inside its row.
                unsafe {
                    k[i * chunks + c] = load_chunk_nc(p.cache.k_pool + byte);
                    v[i * chunks + c] = load_chunk_nc(p.cache.v_pool + byte);
                }
            }
        }

        let mut score = [[0.0f32; G]; MAX_LANE_ROWS];
        for i in 0..rows {
            let k_row = unpack_row::<T>(&k, i, chunks);
            for g in 0..G {
                let mut dot = 0.0f32;
                for e in 0..elems {
                    dot = fma(q[g][e], k_row[e], dot);
                }
                // SAFETY: the whole warp runs this loop the same number of times.
                score[i][g] = unsafe { sum_within(dot, tile.lanes_per_row) };
            }
            if RECORD && live[i] && lane.is_multiple_of(tile.lanes_per_row) {
                let row = tile_start + tile.lane_row(lane, i as u32) - start;
                for g in 0..G {
                    // SAFETY: row < partition_kvs: a word of the plan's stash.
                    unsafe {
                        store_word_kept(stash.at(g as u32, row), score[i][g].to_bits(), keep)
                    };
                }
            }
        }

        let mut base = [0.0f32; G];
        for g in 0..G {
            let mut tile_max = f32::NEG_INFINITY;
            for i in 0..rows {
                if live[i] {
                    tile_max = fmax(tile_max, score[i][g]);
                }
            }
            base[g] = state.raise_max(g, tile_max, elems);
        }
        for i in 0..rows {
            let v_row = unpack_row::<T>(&v, i, chunks);
            for g in 0..G {
                let weight = if live[i] {
                    exp2(score[i][g] - base[g])
                } else {
                    0.0
                };
                state.sum[g] += weight;
                for e in 0..elems {
                    state.acc[g][e] = fma(weight, v_row[e], state.acc[g][e]);
                }
            }
        }
        tile_start += DECODE_WARPS * tile.tile_rows;
    }

    // Merge lanes holding the same columns of different rows.
    let mut mask = tile.lanes_per_row;
    while mask < 32 {
        for g in 0..G {
            // SAFETY: every lane of the warp runs these shuffles.
            unsafe {
                let max = shfl_xor(state.max[g], mask);
                let sum = shfl_xor(state.sum[g], mask);
                let mut acc = [0.0f32; MAX_LANE_ELEMS];
                for e in 0..elems {
                    acc[e] = shfl_xor(state.acc[g][e], mask);
                }
                state.merge(g, max, sum, &acc, elems);
            }
        }
        mask *= 2;
    }

    // Merge warps through shared memory.
    if lane < tile.lanes_per_row {
        for g in 0..G {
            // SAFETY: the offsets come from decode_smem, whose size the launch reserved.
            unsafe {
                if lane == 0 {
                    *words.add(smem.ml_word(G as u32, warp, g as u32) as usize) = state.max[g];
                    *words.add(smem.ml_word(G as u32, warp, g as u32) as usize + 1) = state.sum[g];
                }
                for c in 0..chunks {
                    let col = tile.lane_elem(lane, c as u32);
                    for e in 0..T::PER_CHUNK {
                        let word =
                            smem.acc_word(G as u32, D as u32, warp, g as u32, col + e as u32);
                        *words.add(word as usize) = state.acc[g][c * T::PER_CHUNK + e];
                    }
                }
            }
        }
    }
    // SAFETY: every thread of the CTA calls it, after writing its warp's state.
    unsafe { finish::<T, D, G, RECORD>(p, &work, &blocks) };
}

/// The block ids of the logical blocks of a CTA's partition, read once into shared memory
/// (`DecodeSmem::blocks`) so that no K or V load waits on a table load.
pub(crate) struct BlockIds {
    first_block: u32,
    ids: *mut u32,
}

impl BlockIds {
    /// Reads the block ids of rows `[work.start, work.end)`; ends with a CTA barrier.
    ///
    /// # Safety
    /// Every thread of the CTA calls it.
    #[inline(always)]
    pub(crate) unsafe fn load<T: CacheElem, const G: usize>(p: &DecodeParams, work: &Work) -> Self {
        let geom = p.cache.geometry;
        let smem = decode_smem(G as u32, geom.head_dim, T::BYTES);
        let table = p.cache.block_tables + geom.block_table_at(work.head_slot, 0) * 4;
        let first_block = geom.logical_block(work.start);
        let count = if work.start < work.end {
            geom.logical_block(work.end - 1) + 1 - first_block
        } else {
            0
        };
        let ids = dynamic_f32().wrapping_add(smem.blocks as usize) as *mut u32;
        let mut i = thread_idx_x();
        while i < count {
            // SAFETY: the blocks of rows < len are within the head slot's table; at most
            // partition_kvs / MIN_BLOCK_SIZE of them, the size the launch gave the region
            // (`DecodeSmem::bytes_for`).
            unsafe { *ids.add(i as usize) = load::<u32>(table, (first_block + i) as u64) };
            i += DECODE_WARPS * WARP_SIZE;
        }
        // SAFETY: every thread of the CTA reaches it.
        unsafe { sync_threads() };
        Self { first_block, ids }
    }

    /// The block id of row `row` of the head slot.
    ///
    /// # Safety
    /// `work.start <= row < work.end` of the `load` that made `self`.
    #[inline(always)]
    pub(crate) unsafe fn get(&self, geom: Geometry, row: u32) -> u32 {
        // SAFETY: forwarded from the caller: the block is in the region `load` filled.
        unsafe {
            *self
                .ids
                .add((geom.logical_block(row) - self.first_block) as usize)
        }
    }
}

/// A CTA's rows of the score stash (`DecodeParams::stash`): query head `g` of the group, row
/// `row` from the partition's start, is at byte address `at(g, row)`.
#[derive(Clone, Copy)]
pub(crate) struct Stash {
    base: u64,
    head_words: u64,
}

impl Stash {
    #[inline(always)]
    pub(crate) fn of<const G: usize>(p: &DecodeParams, work: &Work) -> Self {
        let first = p.stash_word(work.seq, work.kv_head * G as u32, work.partition, 0);
        Self {
            base: p.stash + 4 * first,
            head_words: p.stash_head_words(),
        }
    }

    #[inline(always)]
    pub(crate) fn at(self, g: u32, row: u32) -> u64 {
        self.base + 4 * (g as u64 * self.head_words + row as u64)
    }
}

/// The work of one CTA: partition `partition` of head slot `(seq, layer_idx, kv_head)` (index
/// `head_slot`, `len` live KVs), rows `[start, end)` of it.
pub(crate) struct Work {
    pub partition: u32,
    pub kv_head: u32,
    pub seq: u32,
    pub head_slot: u64,
    pub len: u32,
    pub start: u32,
    pub end: u32,
}

/// The CTA's work (see [`work_item`]).
///
/// # Safety
/// Every thread of the CTA calls it once, first.
#[inline(always)]
pub(crate) unsafe fn begin<T: CacheElem, const G: usize>(p: &DecodeParams) -> Work {
    let geom = p.cache.geometry;
    let smem = decode_smem(G as u32, geom.head_dim, T::BYTES);
    // SAFETY: forwarded from the caller; the ticket word is in the decode_smem map.
    let (partition, kv_head, seq) =
        unsafe { work_item(p, dynamic_f32().add(smem.ticket as usize)) };
    let head_slot = geom.head_slot(seq, p.layer_idx, kv_head);
    // SAFETY: head_slot < num_head_slots: the grid covers (num_seqs, H) and layer_idx < L.
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let start = partition * p.partition_kvs;
    Work {
        partition,
        kv_head,
        seq,
        head_slot,
        len,
        start,
        end: len.min(start + p.partition_kvs),
    }
}

/// The CTA's end, once every warp has written its `(max, sum)` and accumulators (`ml_word`,
/// `acc_word`) and, when recording, its rows' scores and pool slots: merges the warps, writes
/// the output (or the partition's partials) and records the metrics.
///
/// # Safety
/// Every thread of the CTA calls it, after its warp's writes.
#[inline(always)]
pub(crate) unsafe fn finish<T: CacheElem, const D: usize, const G: usize, const RECORD: bool>(
    p: &DecodeParams,
    work: &Work,
    blocks: &BlockIds,
) {
    let smem = decode_smem(G as u32, D as u32, T::BYTES);
    let words = dynamic_f32();
    let &Work {
        partition,
        kv_head,
        seq,
        len,
        start,
        end,
        ..
    } = work;
    // SAFETY: every thread of the CTA reaches this barrier (no thread returned early).
    unsafe { sync_threads() };
    let thread = thread_idx_x();
    if (thread as usize) < G {
        let g = thread;
        let mut max = f32::NEG_INFINITY;
        for w in 0..DECODE_WARPS {
            // SAFETY: inside the decode_smem map.
            max = fmax(max, unsafe {
                *words.add(smem.ml_word(G as u32, w, g) as usize)
            });
        }
        let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
        let mut sum = 0.0f32;
        for w in 0..DECODE_WARPS {
            // SAFETY: inside the decode_smem map.
            unsafe {
                let word = smem.ml_word(G as u32, w, g) as usize;
                sum = fma(*words.add(word + 1), exp2(*words.add(word) - base), sum);
            }
        }
        // SAFETY: inside the decode_smem map.
        unsafe {
            *words.add((smem.cta_ml + 2 * g) as usize) = max;
            *words.add((smem.cta_ml + 2 * g + 1) as usize) = sum;
        }
        if p.num_partitions > 1 {
            let row = p.partial_row(seq, kv_head * G as u32 + g, partition);
            // SAFETY: the host sized the workspace from the same plan (partial_rows rows).
            unsafe {
                crate::gpu::mem::store::<f32>(p.partial_ml, row * 2, max);
                crate::gpu::mem::store::<f32>(p.partial_ml, row * 2 + 1, sum);
            }
        }
    }
    // SAFETY: as above.
    unsafe { sync_threads() };

    let mut item = thread;
    while item < (G * D) as u32 {
        let g = item / D as u32;
        let d = item % D as u32;
        // SAFETY: inside the decode_smem map.
        let (max, sum) = unsafe {
            (
                *words.add((smem.cta_ml + 2 * g) as usize),
                *words.add((smem.cta_ml + 2 * g + 1) as usize),
            )
        };
        let base = if max == f32::NEG_INFINITY { 0.0 } else { max };
        let mut acc = 0.0f32;
        for w in 0..DECODE_WARPS {
            // SAFETY: inside the decode_smem map.
            unsafe {
                let scale = exp2(*words.add(smem.ml_word(G as u32, w, g) as usize) - base);
                acc = fma(
                    *words.add(smem.acc_word(G as u32, D as u32, w, g, d) as usize),
                    scale,
                    acc,
                );
            }
        }
        let q_head = kv_head * G as u32 + g;
        if p.num_partitions == 1 {
            let out = if sum > 0.0 { acc / sum } else { 0.0 };
            // SAFETY: out holds [num_seqs, Hq, D] of T.
            unsafe { store_elem::<T>(p.out, p.query_elem(seq, q_head) + d as u64, out) };
        } else {
            let row = p.partial_row(seq, q_head, partition);
            // SAFETY: the host sized the workspace from the same plan (partial_rows rows).
            unsafe { crate::gpu::mem::store::<f32>(p.partial_acc, row * D as u64 + d as u64, acc) };
        }
        item += DECODE_WARPS * WARP_SIZE;
    }

    // A split recording launch merges in the CTA that leaves each head slot's handshake last
    // (the partials are all published by then), and an empty head slot's first CTA writes its
    // zero output: no merge launch follows. The branches are uniform over the CTA.
    if RECORD && start < end {
        // SAFETY: every thread of the CTA takes this branch.
        if unsafe { record_metrics::<T, G>(p, work, blocks) } {
            // SAFETY: as above; record_metrics said this CTA left the handshake last.
            unsafe { merge_recorded::<T, D, G>(p, seq, kv_head, p.live_partitions(len)) };
        }
    } else if RECORD && p.num_partitions > 1 && partition == 0 {
        // SAFETY: as above; no partition of this empty head slot is live.
        unsafe { merge_recorded::<T, D, G>(p, seq, kv_head, 0) };
    }
}

/// The CTA's work `(partition, kv_head, seq)`: its block index, or, when partitions wait for
/// each other, the next ticket in start order (module header). Ends with a CTA barrier.
///
/// # Safety
/// Every thread of the CTA calls it once; `ticket_word` is the smem ticket word.
#[inline(always)]
unsafe fn work_item(p: &DecodeParams, ticket_word: *mut f32) -> (u32, u32, u32) {
    if !p.cross_partition() {
        return (block_idx_x(), block_idx_y(), block_idx_z());
    }
    let slot = ticket_word as *mut u32;
    let geom = p.cache.geometry;
    let ctas = p.num_partitions * geom.num_kv_heads * geom.num_seqs;
    // SAFETY: counters holds u32 words, zero at launch; the smem word is ours; the barrier is
    // reached by all threads.
    let ticket = unsafe {
        if thread_idx_x() == 0 {
            let ticket = atomic_add_relaxed(p.counters, 1);
            if ticket == ctas - 1 {
                // Every other CTA has taken its ticket: zero for the next launch.
                store::<u32>(p.counters, 0, 0);
            }
            *slot = ticket;
        }
        sync_threads();
        *slot
    };
    let partition = ticket % p.num_partitions;
    let rest = ticket / p.num_partitions;
    let kv_heads = p.cache.geometry.num_kv_heads.max(1);
    (partition, rest % kv_heads, rest / kv_heads)
}

/// Most rows each thread of the record phase reads at once, so that their loads overlap: 8,
/// or 4 for `G = 8` (8 rows of 8 scores took that kernel to 208 registers, 4 rows to 174, when
/// this was written).
const RECORD_ROWS: usize = 8;

/// Rows each thread of the record phase reads at once for group size `g`.
const fn record_rows(g: usize) -> usize {
    if g >= 8 {
        RECORD_ROWS / 2
    } else {
        RECORD_ROWS
    }
}

/// What the record phase needs of one thread's rows `first + r * threads` (`r < rows`): each
/// row's pool slot, position, metric and stashed scores. A row past the partition's end is
/// read as its last row and never written.
struct RecordBatch<const G: usize> {
    first: u32,
    slot: [u64; RECORD_ROWS],
    position: [i32; RECORD_ROWS],
    metric: [f32; RECORD_ROWS],
    score: [[f32; G]; RECORD_ROWS],
}

impl<const G: usize> RecordBatch<G> {
    /// Issues every load of the thread's rows from `first` before any use.
    ///
    /// # Safety
    /// `work.start <= first` and `work.start < work.end` (rows from `work.end` on are read as
    /// the last row); the CTA's stash stores are ordered before (a barrier).
    #[inline(always)]
    unsafe fn load(
        p: &DecodeParams,
        work: &Work,
        blocks: &BlockIds,
        stash: Stash,
        first: u32,
    ) -> Self {
        let geom = p.cache.geometry;
        let mut batch = Self {
            first,
            slot: [0; RECORD_ROWS],
            position: [0; RECORD_ROWS],
            metric: [0.0; RECORD_ROWS],
            score: [[0.0; G]; RECORD_ROWS],
        };
        for r in 0..record_rows(G) {
            let row = (first + r as u32 * DECODE_WARPS * WARP_SIZE).min(work.end - 1);
            // SAFETY: start <= row < end: a live KV of the partition and its stash words.
            unsafe {
                batch.slot[r] = geom.pool_slot(blocks.get(geom, row), geom.slot_in_block(row));
                batch.position[r] = load::<i32>(p.cache.position, batch.slot[r]);
                batch.metric[r] = load::<f32>(p.cache.metric, batch.slot[r]);
                for g in 0..G {
                    batch.score[r][g] = load::<f32>(stash.at(g as u32, row - work.start), 0);
                }
            }
        }
        batch
    }

    /// Adds the recorded value to the metric of each of the rows that is live and at or before
    /// `threshold`, normalising with the `(max, 1 / sum)` per query head at `record_ml`.
    ///
    /// # Safety
    /// `record_ml` holds the head slot's `2 G` words; only this thread writes these metrics.
    #[inline(always)]
    unsafe fn record(&self, p: &DecodeParams, end: u32, threshold: i32, record_ml: *const f32) {
        for r in 0..record_rows(G) {
            let row = self.first + r as u32 * DECODE_WARPS * WARP_SIZE;
            if row < end && self.position[r] <= threshold {
                let mut value = 0.0f32;
                for g in 0..G {
                    // SAFETY: forwarded from the caller.
                    let (max, inv_sum) =
                        unsafe { (*record_ml.add(2 * g), *record_ml.add(2 * g + 1)) };
                    let a = exp2(self.score[r][g] - max) * inv_sum;
                    value += if p.record == record::L2 { a * a } else { a };
                }
                // SAFETY: forwarded from the caller; the slot of a live KV.
                unsafe { store::<f32>(p.cache.metric, self.slot[r], self.metric[r] + value) };
            }
        }
    }
}

/// Adds the recorded metric of the CTA's rows `[start, end)` of its head slot (module header).
/// Returns whether this CTA left a split head slot's handshake last (false without a split).
/// The first rows' loads are issued before the handshake, so they overlap the wait.
///
/// # Safety
/// Called by every thread of the CTA after the output phase, with the stash filled (the
/// barrier in `finish` orders the main loop's stash stores before these loads); `start < end`.
#[inline(always)]
unsafe fn record_metrics<T: CacheElem, const G: usize>(
    p: &DecodeParams,
    work: &Work,
    blocks: &BlockIds,
) -> bool {
    let &Work {
        kv_head,
        seq,
        len,
        start,
        end,
        ..
    } = work;
    let geom = p.cache.geometry;
    let smem = decode_smem(G as u32, geom.head_dim, T::BYTES);
    let words = dynamic_f32();
    let thread = thread_idx_x();
    let threads = DECODE_WARPS * WARP_SIZE;
    let step = record_rows(G) as u32 * threads;
    let stash = Stash::of::<G>(p, work);
    // A thread past the end loads the last row, and records nothing.
    // SAFETY: start < end; the stash stores are ordered before (the caller).
    let mut batch = unsafe { RecordBatch::<G>::load(p, work, blocks, stash, start + thread) };
    // SAFETY: thresholds holds [num_seqs] i32.
    let threshold = unsafe { load::<i32>(p.thresholds, seq as u64) };
    // The ticket word, free once `begin` has read it, tells the CTA who left last.
    let last_out = words.wrapping_add(smem.ticket as usize) as *mut u32;
    let mut merges = false;
    if p.num_partitions > 1 {
        // Publish this partition's (max, sum) rows, written above, before counting in.
        fence_gpu();
        // SAFETY: all threads arrive; the counters are zero at launch (module header).
        unsafe {
            sync_threads();
            if thread == 0 {
                let arrivals = p.counters + p.arrival_word(seq, kv_head) * 4;
                red_add_release(arrivals, 1);
                let live_partitions = p.live_partitions(len);
                while load_acquire(arrivals) < live_partitions {
                    nanosleep(64);
                }
                // Leaving counts too: the last of the 2 * live increments comes after every
                // live partition has seen them all arrive, so the word can be zeroed for the
                // next launch.
                let last = atomic_add_relaxed(arrivals, 1) == 2 * live_partitions - 1;
                if last {
                    store::<u32>(p.counters, p.arrival_word(seq, kv_head), 0);
                }
                *last_out = last as u32;
            }
            sync_threads();
            merges = *last_out != 0;
        }
    }
    if p.num_partitions > 1 {
        // Warp w folds the partitions of query heads w, w + DECODE_WARPS, ... (lanes over
        // partitions, in parallel: no load waits behind another).
        let live_partitions = p.live_partitions(len);
        let mut g = warp_id();
        while (g as usize) < G {
            // SAFETY: the whole warp calls it; every live partition published its row before
            // counting itself in.
            let (max, sum) =
                unsafe { partition_stats(p, seq, kv_head * G as u32 + g, live_partitions) };
            if lane_id() == 0 {
                // SAFETY: inside the decode_smem map.
                unsafe {
                    *words.add((smem.record_ml + 2 * g) as usize) = max;
                    *words.add((smem.record_ml + 2 * g + 1) as usize) = 1.0 / sum;
                }
            }
            g += DECODE_WARPS;
        }
    } else if (thread as usize) < G {
        let g = thread as usize;
        // SAFETY: the CTA's own (max, sum), written before the last barrier; inside the map.
        unsafe {
            let (max, sum) = (
                *words.add(smem.cta_ml as usize + 2 * g),
                *words.add(smem.cta_ml as usize + 2 * g + 1),
            );
            *words.add(smem.record_ml as usize + 2 * g) = max;
            *words.add(smem.record_ml as usize + 2 * g + 1) = 1.0 / sum;
        }
    }
    // SAFETY: every thread reaches it.
    unsafe { sync_threads() };

    let record_ml = words.wrapping_add(smem.record_ml as usize) as *const f32;
    loop {
        // SAFETY: record_ml was written before the barrier; the rows are this thread's.
        unsafe { batch.record(p, end, threshold, record_ml) };
        let first = batch.first + step;
        if first >= end {
            break;
        }
        // SAFETY: start <= first < end.
        batch = unsafe { RecordBatch::<G>::load(p, work, blocks, stash, first) };
    }
    // Every thread's stash reads are done after the barrier: drop the partition's stash from
    // L2 unwritten (each query head's rows are whole lines from a 128-byte aligned start).
    // SAFETY: every thread reaches it.
    unsafe { sync_threads() };
    let lines = stash_rows(p.partition_kvs) / STASH_LINE_WORDS;
    let mut i = thread;
    while i < G as u32 * lines {
        // SAFETY: a line of this CTA's stash, read for the last time above.
        unsafe { discard_l2_line(stash.at(i / lines, STASH_LINE_WORDS * (i % lines))) };
        i += threads;
    }
    merges
}

/// Widens this lane's part of row `i` of a tile's chunks.
#[inline(always)]
fn unpack_row<T: CacheElem>(
    chunks_of: &[Chunk; MAX_LANE_LOADS],
    i: usize,
    chunks: usize,
) -> [f32; MAX_LANE_ELEMS] {
    let mut out = [0.0f32; MAX_LANE_ELEMS];
    for c in 0..chunks {
        T::unpack(chunks_of[i * chunks + c], &mut out[c * T::PER_CHUNK..]);
    }
    out
}

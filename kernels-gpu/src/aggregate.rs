//! Observation-window score aggregation (SPEC §4), in two passes over the keys, never
//! materialising a query x key matrix.
//!
//! Rows are the window's query vectors of one `(seq, kv_head)`: row `r = i * G + g` is query
//! `i` (prompt position `last - (w - 1 - i)`) of query head `g` of the group, so the keys of a
//! KV head are read once for all `G` heads. Both passes tile rows by 16 per warp
//! (`AGG_WARPS` warps, `AGG_ROWS` rows a CTA) and keys by 8, and compute `Q K^T` tiles with
//! tensor-core `mma.sync.m16n8k16` for f16/bf16 (A fragments from `ldmatrix` on the staged
//! query rows, B fragments from `ldmatrix` on the staged key rows, which is K row-major = B
//! "col"), or with scalar FMAs on the same fragment layout for f32.
//!
//! - `window_stats`: grid `(row_chunk * key_splits + split, kv_head, seq)`. A CTA stages its
//!   64 query rows once and walks its key split in tiles of `STATS_TILE_KEYS`; each thread keeps
//!   the online (max, sum) of its two rows over its columns. One split writes `stats` (max,
//!   1/sum); several write `partials`, merged by `window_stats_merge` (one thread per row).
//! - `window_scores`: grid `(key_tile, kv_head, seq)`. A CTA owns `SCORE_KEYS` keys and also
//!   scores `SCORE_HALO` keys on each side, so that it can max-pool its own keys. It walks all
//!   rows in chunks of 64, turns scores into probabilities with the row stats, and sums `a^2`
//!   (or `a`) per key; a thread's two rows belong to one query head (`gid % G`), so columns are
//!   summed per head by shuffles over the lanes of the same head, then over warps in shared
//!   memory in a fixed order (deterministic). Then each owned key's metric gets the group sum
//!   of its max-pooled column, one thread per key.
//!
//! Masks: a row sees keys with position `<= p_i` (pass 1) and counts those with position
//! `<= p_i - metric_skip` (pass 2). Rows past the window, keys past the head slot and halo
//! keys outside it have position sentinels that mask them; their staged rows are zero.
//!
//! Host-validated: window lengths within the prompt and `q`'s window extent, `pool_half <=
//! SCORE_HALO`, the head slots' blocks in the pool.

use kvc_abi::params::{record, AggregateParams};
use kvc_abi::plan::{
    aggregate_smem, tile_row_bytes, AggregateSmem, AGG_ROWS, AGG_WARPS, SCORE_HALO, SCORE_KEYS,
    SCORE_TILE_KEYS, STATS_TILE_KEYS, VECTOR_BYTES, WARP_SIZE,
};

use crate::gpu::math::{exp2, fma, fmax, opaque, CacheElem, F32};
use crate::gpu::mem::{load, load_nc, store};
use crate::gpu::mma::{
    copy_async_chunk, ldmatrix_x2, ldmatrix_x4, shared_addr, wait_async_copies, Mma16,
};
use crate::gpu::smem::dynamic_f32;
use crate::gpu::thread::{
    block_idx_x, block_idx_y, block_idx_z, lane_id, sync_threads, thread_idx_x, warp_id,
};
use crate::gpu::warp::shfl_xor;

/// Most `u32` registers of one warp's A fragments: `4 * D / 16` for `D = 256`.
const MAX_A: usize = 64;
/// Threads per CTA.
const THREADS: u32 = AGG_WARPS * WARP_SIZE;
/// Position of a staged key that no row may see (past the head slot, or halo outside it).
const NO_KEY: i32 = i32::MAX;
/// Score-tile width in 8-key MMA tiles.
const SCORE_NTILES: usize = (SCORE_TILE_KEYS / 8) as usize;
const STATS_NTILES: usize = (STATS_TILE_KEYS / 8) as usize;

/// `Q K^T` on one warp's 16 rows and 8 keys, over `D` dims, in the fragment layout of
/// `mma.m16n8k16` (see `gpu::mma`).
pub trait QkTile: CacheElem {
    /// This warp's A fragments for rows `row0..row0 + 16` of the staged query rows.
    ///
    /// # Safety
    /// The rows are staged at `q_tile` (shared) with `row_bytes` a row; the warp is converged.
    unsafe fn load_a<const D: usize>(q_tile: *const u8, row_bytes: u32, row0: u32) -> [u32; MAX_A];

    /// The C fragment of rows `row0..+16` against keys `key0..+8`.
    ///
    /// # Safety
    /// As `load_a`, with the keys staged at `k_tile`.
    unsafe fn qk<const D: usize>(
        a: &[u32; MAX_A],
        q_tile: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        row0: u32,
        key0: u32,
    ) -> [f32; 4];
}

/// The 16-bit types: A fragments by `ldmatrix.x4` (one per 16 dims), B fragments by
/// `ldmatrix.x2` and one tensor-core MMA per 16 dims.
impl<T: CacheElem + Mma16> QkTile for T {
    #[inline(always)]
    unsafe fn load_a<const D: usize>(q_tile: *const u8, row_bytes: u32, row0: u32) -> [u32; MAX_A] {
        let lane = lane_id();
        let row = row0 + lane % 8 + 8 * ((lane / 8) % 2);
        let col_bytes = 16 * (lane / 16);
        let base = shared_addr(q_tile) + row * row_bytes + col_bytes;
        let mut a = [0u32; MAX_A];
        for ks in 0..D / 16 {
            // SAFETY: forwarded from the caller; row < AGG_ROWS, the column inside the row.
            let frag = unsafe { ldmatrix_x4(base + ks as u32 * 32) };
            a[4 * ks..4 * ks + 4].copy_from_slice(&frag);
        }
        a
    }

    #[inline(always)]
    unsafe fn qk<const D: usize>(
        a: &[u32; MAX_A],
        _: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        _: u32,
        key0: u32,
    ) -> [f32; 4] {
        let lane = lane_id();
        let key = key0 + lane % 8;
        let col_bytes = 16 * ((lane / 8) % 2);
        let base = shared_addr(k_tile) + key * row_bytes + col_bytes;
        let mut c = [0.0f32; 4];
        for ks in 0..D / 16 {
            // SAFETY: forwarded from the caller; key < the staged keys.
            unsafe {
                let b = ldmatrix_x2(base + ks as u32 * 32);
                c = T::mma(
                    [a[4 * ks], a[4 * ks + 1], a[4 * ks + 2], a[4 * ks + 3]],
                    b,
                    c,
                );
            }
        }
        c
    }
}

impl QkTile for F32 {
    #[inline(always)]
    unsafe fn load_a<const D: usize>(_: *const u8, _: u32, _: u32) -> [u32; MAX_A] {
        [0; MAX_A]
    }

    /// The same C fragment by scalar FMAs (no f32 tensor-core MMA at full precision).
    #[inline(always)]
    unsafe fn qk<const D: usize>(
        _: &[u32; MAX_A],
        q_tile: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        row0: u32,
        key0: u32,
    ) -> [f32; 4] {
        let lane = lane_id();
        let (gid, tig) = (lane / 4, lane % 4);
        let row =
            |tile: *const u8, r: u32| tile.wrapping_add((r * row_bytes) as usize) as *const f32;
        let (q0, q1) = (row(q_tile, row0 + gid), row(q_tile, row0 + gid + 8));
        let (k0, k1) = (row(k_tile, key0 + 2 * tig), row(k_tile, key0 + 2 * tig + 1));
        let mut c = [0.0f32; 4];
        for d in 0..opaque(D as u32) as usize {
            // SAFETY: forwarded; d < D lies inside each staged row.
            unsafe {
                let (a0, a1, b0, b1) = (*q0.add(d), *q1.add(d), *k0.add(d), *k1.add(d));
                c = [
                    fma(a0, b0, c[0]),
                    fma(a0, b1, c[1]),
                    fma(a1, b0, c[2]),
                    fma(a1, b1, c[3]),
                ];
            }
        }
        c
    }
}

/// Stages `rows` rows of `row_bytes - 16` bytes into shared memory at `tile`, the whole CTA
/// issuing asynchronous 16-byte copies (none waits on another), then waiting for its own;
/// `src(row)` is the global address of a row, or `None` for a zero row. The caller's barrier
/// makes the tile visible to the CTA.
///
/// # Safety
/// Every thread calls it; each `Some` address holds a readable row no thread writes; the tile
/// holds `rows` rows; `src` reads nothing the copies write.
#[inline(always)]
unsafe fn stage_rows(tile: *mut u8, row_bytes: u32, rows: u32, src: impl Fn(u32) -> Option<u64>) {
    let chunks_per_row = (row_bytes - VECTOR_BYTES) / VECTOR_BYTES;
    let base = shared_addr(tile);
    let mut chunk = thread_idx_x();
    while chunk < rows * chunks_per_row {
        let (row, col) = (chunk / chunks_per_row, chunk % chunks_per_row);
        let offset = col * VECTOR_BYTES;
        // SAFETY: row < rows, col < chunks_per_row; the source as the caller promised.
        unsafe {
            copy_async_chunk(
                base + row * row_bytes + offset,
                src(row).map(|addr| addr + offset as u64),
            )
        };
        chunk += THREADS;
    }
    // SAFETY: this thread's copies.
    unsafe { wait_async_copies() };
}

/// Per-sequence inputs: (window length, last position, metric_skip).
#[inline(always)]
unsafe fn seq_info(p: &AggregateParams, seq: u32) -> (u32, i32, i32) {
    // SAFETY: seq_info holds [num_seqs, 3] i32.
    unsafe {
        (
            load::<i32>(p.seq_info, p.seq_info_word(seq, 0)) as u32,
            load::<i32>(p.seq_info, p.seq_info_word(seq, 1)),
            load::<i32>(p.seq_info, p.seq_info_word(seq, 2)),
        )
    }
}

/// Stages query rows `row_base..row_base + AGG_ROWS` of `(seq, kv_head)` (zero past `rows`).
#[inline(always)]
unsafe fn stage_queries<T: CacheElem>(
    p: &AggregateParams,
    q_tile: *mut u8,
    row_bytes: u32,
    seq: u32,
    kv_head: u32,
    row_base: u32,
    rows: u32,
) {
    let group = p.cache.geometry.group_size.max(1);
    // SAFETY: valid rows address [num_seqs, window, Hq, D] of T (host-validated shape).
    unsafe {
        stage_rows(q_tile, row_bytes, AGG_ROWS, |r| {
            let row = row_base + r;
            (row < rows).then(|| {
                p.q + p.query_elem(seq, row / group, kv_head * group + row % group)
                    * T::BYTES as u64
            })
        })
    }
}

/// The key tile's shared-memory arrays: rows, their global addresses (0: no key), positions.
#[derive(Clone, Copy)]
struct KeyTile {
    rows: *mut u8,
    addresses: *mut u64,
    positions: *mut i32,
}

impl KeyTile {
    /// The arrays in the dynamic shared memory at `base`, laid out by `smem`.
    ///
    /// # Safety
    /// `base` is the start of dynamic shared memory of at least `smem.bytes` bytes.
    #[inline(always)]
    unsafe fn at(base: *mut u8, smem: &AggregateSmem) -> Self {
        // SAFETY: offsets inside the reserved shared memory.
        unsafe {
            Self {
                rows: base.add(smem.k_tile as usize),
                addresses: base.add(smem.key_rows as usize) as *mut u64,
                positions: base.add(smem.positions as usize) as *mut i32,
            }
        }
    }
}

/// Stages keys `first..first + count` of a head slot (as i64: halo keys may be negative) and
/// their positions; keys outside `0..len` become zero rows with position `NO_KEY`. First one
/// thread per key finds its row and position (independent loads), then, after a barrier, the
/// CTA copies the rows without waiting on any table.
///
/// # Safety
/// Every thread calls it; the tile holds `count` keys; `head_slot`'s first `len` KVs are in
/// validated pool blocks.
#[inline(always)]
unsafe fn stage_keys<T: CacheElem>(
    p: &AggregateParams,
    tile: KeyTile,
    row_bytes: u32,
    head_slot: u64,
    (first, count): (i64, u32),
    len: u32,
) {
    let geom = p.cache.geometry;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    let mut k = thread_idx_x();
    while k < count {
        let key = first + k as i64;
        let (address, position) = if key < 0 || key >= len as i64 {
            (0, NO_KEY)
        } else {
            let key = key as u32;
            // SAFETY: key < len: its block is a validated pool block of the head slot.
            unsafe {
                let block = load_nc::<i32>(table, geom.logical_block(key) as u64) as u32;
                let slot = geom.pool_slot(block, geom.slot_in_block(key));
                (
                    p.cache.k_pool + slot * geom.head_dim as u64 * T::BYTES as u64,
                    load_nc::<i32>(p.cache.position, slot),
                )
            }
        };
        // SAFETY: k < count entries of each array.
        unsafe {
            *tile.addresses.add(k as usize) = address;
            *tile.positions.add(k as usize) = position;
        }
        k += THREADS;
    }
    // SAFETY: all threads reach it; then the addresses are read, never written, by the copies.
    unsafe {
        sync_threads();
        stage_rows(tile.rows, row_bytes, count, |k| {
            let address = *tile.addresses.add(k as usize);
            (address != 0).then_some(address)
        });
    }
}

/// Position threshold of row `row` given `(window length, last position)`: the position of
/// its query, or `i32::MIN` for rows past the window (they see nothing).
#[inline(always)]
fn row_position(row: u32, rows: u32, group: u32, window_len: u32, last: i32) -> i32 {
    if row < rows {
        last - (window_len - 1 - row / group) as i32
    } else {
        i32::MIN
    }
}

/// Pass 1 body for cache type `T` and head dimension `D`.
///
/// # Safety
/// Launched with `plan_aggregate`'s stats dims and host-validated params (module header).
#[inline(always)]
pub unsafe fn window_stats_body<T: CacheElem + QkTile, const D: usize>(p: &AggregateParams) {
    let geom = p.cache.geometry;
    let group = geom.group_size.max(1);
    let (kv_head, seq) = (block_idx_y(), block_idx_z());
    let splits = p.key_splits.max(1);
    let (chunk, split) = (block_idx_x() / splits, block_idx_x() % splits);
    // SAFETY: seq < num_seqs (grid).
    let (window_len, last, _) = unsafe { seq_info(p, seq) };
    let rows = window_len * group;
    let row_base = chunk * AGG_ROWS;
    if row_base >= rows {
        return; // uniform over the CTA: no barrier is skipped by part of it
    }
    let head_slot = geom.head_slot(seq, p.layer_idx, kv_head);
    // SAFETY: head_slot is in range (grid and validated layer).
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let key_lo = split * p.split_kvs;
    let key_hi = len.min(key_lo + p.split_kvs);

    let smem = aggregate_smem(D as u32, T::BYTES, group, STATS_TILE_KEYS, false);
    let row_bytes = tile_row_bytes(D as u32, T::BYTES);
    let base = dynamic_f32() as *mut u8;
    // SAFETY: offsets from aggregate_smem, whose size the launch reserved.
    let (q_tile, keys) = unsafe { (base.add(smem.q_tile as usize), KeyTile::at(base, &smem)) };
    let (lane, warp) = (lane_id(), warp_id());
    let (gid, tig) = (lane / 4, lane % 4);
    let row0 = warp * 16;

    // SAFETY: all threads take part; rows past the window are zero.
    unsafe {
        stage_queries::<T>(p, q_tile, row_bytes, seq, kv_head, row_base, rows);
        sync_threads();
    }
    // SAFETY: the rows are staged; the warp is converged.
    let a = unsafe { T::load_a::<D>(q_tile, row_bytes, row0) };
    let my_rows = [row_base + row0 + gid, row_base + row0 + gid + 8];
    let seen = my_rows.map(|r| row_position(r, rows, group, window_len, last));
    let mut max = [f32::NEG_INFINITY; 2];
    let mut sum = [0.0f32; 2];

    let mut tile_start = key_lo;
    while tile_start < key_hi {
        // SAFETY: all threads take part; the barriers separate reuse of the key tile.
        unsafe {
            sync_threads();
            stage_keys::<T>(
                p,
                keys,
                row_bytes,
                head_slot,
                (tile_start as i64, STATS_TILE_KEYS),
                key_hi,
            );
            sync_threads();
        }
        let mut score = [[0.0f32; 4]; STATS_NTILES];
        for (nt, s) in score.iter_mut().enumerate() {
            // SAFETY: the key tile is staged.
            let c = unsafe { T::qk::<D>(&a, q_tile, keys.rows, row_bytes, row0, nt as u32 * 8) };
            for e in 0..4 {
                let key = nt as u32 * 8 + 2 * tig + (e as u32 & 1);
                // SAFETY: key < STATS_TILE_KEYS staged positions.
                let position = unsafe { *keys.positions.add(key as usize) };
                s[e] = if position <= seen[e / 2] {
                    c[e] * p.scale_log2
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        for r in 0..2 {
            let mut tile_max = f32::NEG_INFINITY;
            for s in &score {
                tile_max = fmax(tile_max, fmax(s[2 * r], s[2 * r + 1]));
            }
            // SAFETY: the whole warp runs these shuffles.
            unsafe {
                tile_max = fmax(tile_max, shfl_xor(tile_max, 1));
                tile_max = fmax(tile_max, shfl_xor(tile_max, 2));
            }
            let new_max = fmax(max[r], tile_max);
            let base = if new_max == f32::NEG_INFINITY {
                0.0
            } else {
                new_max
            };
            let mut total = sum[r] * exp2(max[r] - base);
            for s in &score {
                total += exp2(s[2 * r] - base) + exp2(s[2 * r + 1] - base);
            }
            max[r] = new_max;
            sum[r] = total;
        }
        tile_start += STATS_TILE_KEYS;
    }
    for r in 0..2 {
        // SAFETY: the whole warp runs these shuffles.
        unsafe {
            sum[r] += shfl_xor(sum[r], 1);
            sum[r] += shfl_xor(sum[r], 2);
        }
        let row = my_rows[r];
        if tig == 0 && row < rows {
            // SAFETY: the workspace holds stats and partials for every row (plan).
            unsafe {
                if splits == 1 {
                    write_stats(p, p.stats_row(seq, kv_head, row), max[r], sum[r]);
                } else {
                    let at = p.partial_row(seq, kv_head, row, split) * 2;
                    store::<f32>(p.partials, at, max[r]);
                    store::<f32>(p.partials, at + 1, sum[r]);
                }
            }
        }
    }
}

/// Writes a row's final (max, 1/sum), or (0, 0) for a row that saw no key.
#[inline(always)]
unsafe fn write_stats(p: &AggregateParams, stats_row: u64, max: f32, sum: f32) {
    let max = if max == f32::NEG_INFINITY { 0.0 } else { max };
    let inv_sum = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    // SAFETY: forwarded from the caller.
    unsafe {
        store::<f32>(p.stats, stats_row * 2, max);
        store::<f32>(p.stats, stats_row * 2 + 1, inv_sum);
    }
}

/// Merge of pass 1's key splits: one warp per row, lanes over splits.
///
/// # Safety
/// Launched with `plan_aggregate`'s merge dims after pass 1 wrote every split of every row.
#[inline(always)]
pub unsafe fn window_stats_merge_body(p: &AggregateParams) {
    let (kv_head, seq) = (block_idx_y(), block_idx_z());
    let row = block_idx_x() * AGG_WARPS + warp_id();
    let lane = lane_id();
    // SAFETY: seq < num_seqs (grid).
    let (window_len, _, _) = unsafe { seq_info(p, seq) };
    if row >= window_len * p.cache.geometry.group_size {
        return; // uniform over the warp
    }
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0.0f32;
    let mut split = lane;
    while split < p.key_splits {
        let at = p.partial_row(seq, kv_head, row, split) * 2;
        // SAFETY: pass 1 wrote every split of this row.
        let (m, l) = unsafe { (load::<f32>(p.partials, at), load::<f32>(p.partials, at + 1)) };
        let new_max = fmax(max, m);
        let base = if new_max == f32::NEG_INFINITY {
            0.0
        } else {
            new_max
        };
        sum = fma(sum, exp2(max - base), l * exp2(m - base));
        max = new_max;
        split += WARP_SIZE;
    }
    let mut mask = 1;
    while mask < WARP_SIZE {
        // SAFETY: the whole warp runs these shuffles.
        let (m, l) = unsafe { (shfl_xor(max, mask), shfl_xor(sum, mask)) };
        let new_max = fmax(max, m);
        let base = if new_max == f32::NEG_INFINITY {
            0.0
        } else {
            new_max
        };
        sum = fma(sum, exp2(max - base), l * exp2(m - base));
        max = new_max;
        mask *= 2;
    }
    if lane == 0 {
        // SAFETY: stats holds a row for every (seq, kv_head, row).
        unsafe { write_stats(p, p.stats_row(seq, kv_head, row), max, sum) };
    }
}

/// Pass 2 body for cache type `T` and head dimension `D`.
///
/// # Safety
/// Launched with `plan_aggregate`'s scores dims after pass 1 (and its merge) wrote `stats`.
#[inline(always)]
pub unsafe fn window_scores_body<T: CacheElem + QkTile, const D: usize>(p: &AggregateParams) {
    let geom = p.cache.geometry;
    let group = geom.group_size.max(1);
    let (tile, kv_head, seq) = (block_idx_x(), block_idx_y(), block_idx_z());
    // SAFETY: seq < num_seqs (grid).
    let (window_len, last, skip) = unsafe { seq_info(p, seq) };
    let head_slot = geom.head_slot(seq, p.layer_idx, kv_head);
    // SAFETY: head_slot is in range.
    let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
    let owned = tile * SCORE_KEYS;
    if window_len == 0 || owned >= len {
        return; // uniform over the CTA
    }
    let rows = window_len * group;

    let smem = aggregate_smem(D as u32, T::BYTES, group, SCORE_TILE_KEYS, true);
    let row_bytes = tile_row_bytes(D as u32, T::BYTES);
    let base = dynamic_f32() as *mut u8;
    // SAFETY: offsets from aggregate_smem, whose size the launch reserved.
    let (q_tile, keys, columns) = unsafe {
        (
            base.add(smem.q_tile as usize),
            KeyTile::at(base, &smem),
            base.add(smem.columns as usize) as *mut f32,
        )
    };
    let (lane, warp, thread) = (lane_id(), warp_id(), thread_idx_x());
    let (gid, tig) = (lane / 4, lane % 4);
    let row0 = warp * 16;
    let first = owned as i64 - SCORE_HALO as i64;

    // SAFETY: all threads take part.
    unsafe { stage_keys::<T>(p, keys, row_bytes, head_slot, (first, SCORE_TILE_KEYS), len) };
    let mut acc = [[0.0f32; 2]; SCORE_NTILES];
    let mut row_base = 0;
    while row_base < rows {
        // SAFETY: all threads take part; barriers separate reuse of the query tile.
        unsafe {
            sync_threads();
            stage_queries::<T>(p, q_tile, row_bytes, seq, kv_head, row_base, rows);
            sync_threads();
        }
        // SAFETY: the rows are staged; the warp is converged.
        let a = unsafe { T::load_a::<D>(q_tile, row_bytes, row0) };
        let my_rows = [row_base + row0 + gid, row_base + row0 + gid + 8];
        let mut counted_to = [i32::MIN; 2];
        let mut stats = [(0.0f32, 0.0f32); 2];
        for r in 0..2 {
            if my_rows[r] < rows {
                counted_to[r] =
                    row_position(my_rows[r], rows, group, window_len, last).saturating_sub(skip);
                let at = p.stats_row(seq, kv_head, my_rows[r]) * 2;
                // SAFETY: pass 1 wrote stats for every row of the window.
                stats[r] = unsafe { (load::<f32>(p.stats, at), load::<f32>(p.stats, at + 1)) };
            }
        }
        for (nt, acc_nt) in acc.iter_mut().enumerate() {
            // SAFETY: the key tile is staged.
            let c = unsafe { T::qk::<D>(&a, q_tile, keys.rows, row_bytes, row0, nt as u32 * 8) };
            for e in 0..4 {
                let key = nt as u32 * 8 + 2 * tig + (e as u32 & 1);
                let r = e / 2;
                // SAFETY: key < SCORE_TILE_KEYS staged positions.
                let position = unsafe { *keys.positions.add(key as usize) };
                if position <= counted_to[r] {
                    let a = exp2(c[e] * p.scale_log2 - stats[r].0) * stats[r].1;
                    acc_nt[e & 1] += if p.record == record::L2 { a * a } else { a };
                }
            }
        }
        row_base += AGG_ROWS;
    }

    // A thread's rows belong to query head gid % G: sum over the lanes of the same head.
    let mut mask = 4 * group;
    while mask < WARP_SIZE {
        for acc_nt in acc.iter_mut() {
            for v in acc_nt.iter_mut() {
                // SAFETY: the whole warp runs these shuffles.
                *v += unsafe { shfl_xor(*v, mask) };
            }
        }
        mask *= 2;
    }
    let column = |w: u32, g: u32, key: u32| ((w * group + g) * SCORE_TILE_KEYS + key) as usize;
    // The column sums go over the tiles: every warp must be done with them.
    // SAFETY: all threads reach it.
    unsafe { sync_threads() };
    if gid < group {
        for (nt, acc_nt) in acc.iter().enumerate() {
            for (c, v) in acc_nt.iter().enumerate() {
                let key = nt as u32 * 8 + 2 * tig + c as u32;
                // SAFETY: inside the columns map (warp < AGG_WARPS, gid < G, key < tile).
                unsafe { *columns.add(column(warp, gid, key)) = *v };
            }
        }
    }
    // SAFETY: all threads reach it.
    unsafe { sync_threads() };
    let mut item = thread;
    while item < group * SCORE_TILE_KEYS {
        let (g, key) = (item / SCORE_TILE_KEYS, item % SCORE_TILE_KEYS);
        let mut total = 0.0f32;
        for w in 0..AGG_WARPS {
            // SAFETY: inside the columns map.
            total += unsafe { *columns.add(column(w, g, key)) };
        }
        // SAFETY: only this thread touches this column of warp 0 here.
        unsafe { *columns.add(column(0, g, key)) = total };
        item += THREADS;
    }
    // SAFETY: all threads reach it.
    unsafe { sync_threads() };

    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    let mut k = thread;
    while k < SCORE_KEYS && owned + k < len {
        let local = SCORE_HALO + k;
        let mut value = 0.0f32;
        for g in 0..group {
            let mut pooled = 0.0f32;
            for d in local - p.pool_half..=local + p.pool_half {
                // SAFETY: pool_half <= SCORE_HALO keeps d inside the tile.
                pooled = fmax(pooled, unsafe { *columns.add(column(0, g, d)) });
            }
            value += pooled;
        }
        let key = owned + k;
        // SAFETY: key < len: its block is a validated pool block; only this thread touches its
        // metric.
        unsafe {
            let block = load_nc::<i32>(table, geom.logical_block(key) as u64) as u32;
            let slot = geom.pool_slot(block, geom.slot_in_block(key));
            store::<f32>(
                p.cache.metric,
                slot,
                load::<f32>(p.cache.metric, slot) + value,
            );
        }
        k += THREADS;
    }
}

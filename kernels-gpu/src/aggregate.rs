//! Observation-window score aggregation (SPEC §4), in two passes over the keys, never
//! materialising a query x key matrix.
//!
//! Rows are the window's query vectors of one `(seq, kv_head)`: row `r = i * G + g` is query
//! `i` (prompt position `last - (w - 1 - i)`) of query head `g` of the group, so the keys of a
//! KV head are read once for all `G` heads. A CTA holds `agg_rows` rows (`AGG_WARPS` warps of
//! `agg_row_tiles` 16-row MMA tiles each) and streams keys through shared memory in tiles of
//! `agg_tile_keys`, `agg_stages` deep (`cp.async`: the next tiles land while one is computed;
//! each copying thread reads its key's block id one tile ahead). A warp computes `Q K^T` in
//! groups of 32 keys with tensor-core `mma.sync.m16n8k16` for f16/bf16 (A fragments held in
//! registers for the whole walk, each key fragment from `ldmatrix` shared by the warp's row
//! tiles), or scalar FMAs on the same fragment layout for f32. In the Hopper module the CTA
//! (one warpgroup) computes the 16-bit types' groups together with `wgmma`, query rows and
//! keys both read from shared memory in swizzled panels (`gpu::wgmma`); its accumulators have
//! the same per-lane layout, for rows `64 m + 16 w` of warp `w`, so everything after the
//! product is shared. Every warp then takes part in every group: a key tile's two groups are
//! started together and folded in turn while the next product runs, and a tile is skipped
//! only when no row of the CTA sees it.
//!
//! - `window_stats`: grid `(row_chunk * key_splits + split, kv_head, seq)`. Each thread keeps
//!   the online (max, sum) of its rows over its own columns, merged over the row's four lanes
//!   at the end. One split writes `stats` (max, 1/sum); several write `partials`, merged by
//!   `window_stats_merge` (one warp per row).
//! - `window_scores`: grid `(key_range, kv_head, seq)`. A CTA owns `score_kvs` keys and also
//!   scores `SCORE_HALO` keys on each side, so that it can max-pool its own keys. Per key tile
//!   it turns scores into probabilities with the row stats and sums `a^2` (or `a`) per key and
//!   query head: over a thread's rows (all of one head, `gid % G`), over the lanes of that head
//!   by shuffles, then over warps in shared memory in a fixed order (deterministic), into the
//!   CTA's column sums. The Hopper module's 16-bit types with 64-key tiles multiply the other
//!   way round (`keys_major_chunk`: keys are the product's rows, so a key's sums per head are
//!   whole in one warp and go straight into the column sums). At the end each thread adds to
//!   the metrics of quads of 4 owned keys the group sum of their max-pooled columns
//!   (`OwnedUpdate`, shared with the warp-specialized pass 2). Given the
//!   window's log-sum-exp from the caller's prefill attention (`lse`), pass 2 runs alone: a
//!   row's stats are then (`lse * log2(e)`, 1), and `a = 2^(log2(e) (scale q.k - lse))`.
//!
//! Masks: a row sees keys with position `<= p_i` (pass 1) and counts those with position
//! `<= p_i - metric_skip` (pass 2). Keys past the head slot have the position `NO_KEY` and zero
//! rows; rows past the window are zero and see nothing. A group of 32 keys that every row of
//! the warp sees takes a path without the masks (the common case for a window at the end of
//! its prompt; rows past the window then add zero: zero query, stats (0, 0)), and one that no
//! row of the warp sees is skipped (with `wgmma`: a tile no row of the CTA sees), which is
//! the upper triangle of a full-range window.
//!
//! Host-validated: window lengths within the prompt and `q`'s window extent, `pool_half <=
//! SCORE_HALO`, the head slots' blocks in the pool.

use kvc_abi::params::{record, AggregateParams};
use kvc_abi::plan::{
    agg_row_tiles, agg_rows, agg_tile_keys, agg_wgmma, aggregate_smem, swizzled_chunk,
    AGG_GROUP_KEYS, AGG_ID_SLOTS, AGG_STAGES, AGG_WARPS, MAX_SCORE_KEYS, SCORE_COLUMNS, SCORE_HALO,
    VECTOR_BYTES, WARP_SIZE,
};
use kvc_abi::Geometry;

#[cfg(kvc_hopper)]
use crate::gpu::math::log2;
use crate::gpu::math::{exp2, fma, fmax, opaque, CacheElem, F32};
use crate::gpu::mem::{load, load_chunk, store, store_chunk, Chunk};
use crate::gpu::mma::{
    commit_async_copies, copy_async_chunk, copy_async_word, load_shared_chunk, shared_addr,
    wait_async_copies, wait_async_copies_but_last,
};
#[cfg(not(kvc_hopper))]
use crate::gpu::mma::{ldmatrix_x4, Mma16};
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::{allow_dependent_grid, wait_for_prior_grid};
use crate::gpu::thread::{
    block_idx_x, block_idx_y, block_idx_z, lane_id, sync_threads, thread_idx_x, warp_id,
};
#[cfg(kvc_hopper)]
use crate::gpu::warp::max_i32;
use crate::gpu::warp::{ballot, shfl_xor};
#[cfg(kvc_hopper)]
use crate::gpu::wgmma::{
    commit as wgmma_commit, descriptor, fence as wgmma_fence, fence_async_proxy, wait_all,
    wait_pending, Wgmma16,
};
#[cfg(kvc_hopper)]
use kvc_abi::plan::{agg_keys_major, PANEL_ROW_BYTES};

/// Most `u32` registers of one row tile's A fragments: `4 * D / 16` for `D = 256`.
const MAX_A: usize = 64;
/// Threads per CTA.
const THREADS: u32 = AGG_WARPS * WARP_SIZE;
/// Position of a staged key that no row may see (past the range).
const NO_KEY: i32 = i32::MAX;
/// 8-key MMA tiles in a group.
const GROUP_NTILES: usize = (AGG_GROUP_KEYS / 8) as usize;
/// `$object.$add::<H>()` with the pooling's half width `$half` as the constant `H` (`$half` past
/// `SCORE_HALO` taken as `SCORE_HALO`; host-validated not to be), so that the pooling windows
/// unroll over registers.
macro_rules! with_pool_half {
    ($half:expr, $object:ident . $add:ident) => {
        match $half {
            0 => $object.$add::<0>(),
            1 => $object.$add::<1>(),
            2 => $object.$add::<2>(),
            3 => $object.$add::<3>(),
            4 => $object.$add::<4>(),
            5 => $object.$add::<5>(),
            6 => $object.$add::<6>(),
            7 => $object.$add::<7>(),
            _ => $object.$add::<8>(),
        }
    };
}
#[cfg(kvc_hopper)]
pub(crate) use with_pool_half;

/// Quads of owned keys a pass-2 thread updates, at most (`OwnedUpdate`).
const OWNED_QUADS: usize = MAX_SCORE_KEYS.div_ceil(4 * THREADS) as usize;
// `with_pool_half` has an arm for every half width up to `SCORE_HALO`.
const _: () = assert!(SCORE_HALO == 8);
/// Most 8-key MMA tiles in a key tile (64 keys).
const MAX_TILE_NTILES: usize = 8;
/// C fragments of a warp's (up to two) row tiles against a group: `[row tile][n-tile][4]`.
type Group = [[[f32; 4]; GROUP_NTILES]; 2];
/// Positions of a lane's two columns in each n-tile of a group.
type GroupPositions = [[i32; 2]; GROUP_NTILES];

// `pairwise` combines a lane's 8 columns of a group.
const _: () = assert!(2 * GROUP_NTILES == 8);

// `KeyStream::land` waits for all copies but the most recent group (one tile in flight behind
// the one computed: three stages), or for all (two).
const _: () = assert!(AGG_STAGES == 3);

/// `Q K^T` on one warp's row tiles and groups of 32 keys, over `D` dims, in the fragment
/// layout of `mma.m16n8k16` (see `gpu::mma`), walked over a staged key tile.
pub trait QkTile: CacheElem {
    /// Whether the whole warpgroup (the CTA) computes each group together (`wgmma`): every
    /// warp then takes part in every group, and warp `w` holds rows `64 m + 16 w` of tile `m`
    /// (`lane_rows`).
    const WARPGROUP: bool = false;

    /// This warp's A fragments for rows `row0..row0 + 16` of the staged query rows (none for
    /// the implementations that read the rows from shared memory).
    ///
    /// # Safety
    /// The rows are staged at `q_tile` (shared) with `row_bytes` a row; the warp is converged.
    #[inline(always)]
    unsafe fn load_a<const D: usize>(
        _q_tile: *const u8,
        _row_bytes: u32,
        _row0: u32,
    ) -> [u32; MAX_A] {
        [0; MAX_A]
    }

    /// Calls `f(grp, c, pos, seen)` for each 32-key group `grp` of the staged tile whose first
    /// key `first + 32 grp` is below `end` and which some row of the warp sees (`bounds`: the
    /// least and the most position this lane's rows see): its C fragments against `rows`, this
    /// lane's positions of it and what the warp sees of it. An inactive warp calls nothing.
    ///
    /// # Safety
    /// `tile` and `positions` are a staged key tile of `tile_keys` keys; the warp is converged;
    /// with `WARPGROUP`, every warp of the CTA calls it with the same tile and range.
    unsafe fn each_group<const D: usize>(
        rows: &WarpRows,
        tile: (*const u8, *const i32, u32),
        range: (u32, u32),
        bounds: (i32, i32),
        f: impl FnMut(usize, &Group, &GroupPositions, Seen),
    );

    /// Pass 2 over the row chunk at `row_base`: [`rows_major_chunk`] unless the
    /// implementation multiplies in another order.
    ///
    /// # Safety
    /// As [`rows_major_chunk`].
    #[inline(always)]
    unsafe fn score_chunk<const D: usize>(s: &Scores, row_base: u32) {
        // SAFETY: forwarded from the caller.
        unsafe { rows_major_chunk::<Self, D>(s, row_base) }
    }
}

/// The types whose warps compute a group's products on their own and at once (`mma.sync`,
/// scalar FMAs): their `QkTile::each_group` is `WarpRows::each_group_at_once`.
trait QkGroup: CacheElem {
    /// The C fragments of row tiles `row0 + 16 m` (`m < row_tiles`) against keys
    /// `key0..key0 + 32`; `a[m]` holds tile `m`'s A fragments.
    ///
    /// # Safety
    /// As `QkTile::load_a`, with the keys staged at `k_tile`.
    unsafe fn qk_group<const D: usize>(
        a: &[[u32; MAX_A]; 2],
        row_tiles: u32,
        q_tile: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        row0: u32,
        key0: u32,
    ) -> Group;
}

/// `QkTile::each_group` of a `QkGroup` type: `WarpRows::each_group_at_once`.
macro_rules! each_group_at_once {
    () => {
        #[inline(always)]
        unsafe fn each_group<const D: usize>(
            rows: &WarpRows,
            tile: (*const u8, *const i32, u32),
            range: (u32, u32),
            bounds: (i32, i32),
            f: impl FnMut(usize, &Group, &GroupPositions, Seen),
        ) {
            // SAFETY: forwarded from the caller.
            unsafe { rows.each_group_at_once::<Self, D>(tile, range, bounds, f) }
        }
    };
}

/// `acc` of `start_group` as C fragments.
#[cfg(kvc_hopper)]
#[inline(always)]
fn as_group(acc: &[[f32; 16]; 2]) -> Group {
    core::array::from_fn(|m| core::array::from_fn(|j| core::array::from_fn(|e| acc[m][4 * j + e])))
}

/// With `wgmma`: starts the product of the warpgroup's staged query rows (`row_tiles` 64-row
/// tiles) and the group of 32 staged keys at `key0` into `acc` (`[row tile][4 n-tile +
/// register]`), a panel of 64 dims at a time, both operands from shared memory (swizzled
/// panels, `gpu::wgmma`); `acc` is read only after [`finish_groups`] handed it back.
///
/// # Safety
/// Every warp of the CTA calls it with the same tiles, staged and fenced.
#[cfg(kvc_hopper)]
#[inline(always)]
unsafe fn start_group<T: CacheElem + Wgmma16, const D: usize>(
    acc: &mut [[f32; 16]; 2],
    row_tiles: u32,
    q_tile: *const u8,
    k_tile: *const u8,
    key0: u32,
) {
    let q_rows = agg_rows(D as u32, T::BYTES);
    let tile_keys = agg_tile_keys(D as u32, T::BYTES);
    let (q_base, k_base) = (shared_addr(q_tile), shared_addr(k_tile));
    let [acc0, acc1] = acc;
    // Row tile `m`'s panels into `acc_m` (a separate variable per tile, so that the
    // accumulators stay in registers whether or not the loops unroll).
    let tile = |m: u32, acc_m: &mut [f32; 16]| {
        for panel in 0..(D / 64) as u32 {
            let a = q_base + (panel * q_rows + 64 * m) * PANEL_ROW_BYTES;
            let b = k_base + (panel * tile_keys + key0) * PANEL_ROW_BYTES;
            // SAFETY: forwarded from the caller, after the fence below.
            unsafe {
                if panel == 0 {
                    T::first_panel(acc_m, descriptor(a), descriptor(b));
                } else {
                    T::panel(acc_m, descriptor(a), descriptor(b));
                }
            }
        }
    };
    // SAFETY: forwarded from the caller: every warp of the CTA is here with the same tiles,
    // staged and fenced; no instruction writes the accumulators before the MMAs.
    unsafe { wgmma_fence() };
    tile(0, acc0);
    if row_tiles > 1 {
        tile(1, acc1); // uniform over the CTA
    }
    // SAFETY: as above.
    unsafe { wgmma_commit() };
}

/// With `wgmma`: waits for the started groups but the last (`keep_last`) or all, and hands
/// back `acc`, the accumulators of one it completes.
///
/// # Safety
/// Every warp of the CTA calls it together.
#[cfg(kvc_hopper)]
#[inline(always)]
unsafe fn finish_groups(acc: &mut [[f32; 16]; 2], keep_last: bool) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if keep_last {
            wait_pending(acc);
        } else {
            wait_all(acc);
        }
    }
}

/// The 16-bit types on the Hopper module: the warpgroup multiplies its staged query rows (two
/// 64-row tiles, or one at D = 256) by each group's 32 staged keys with `wgmma`
/// (`start_group`), on the overlapped schedule of `WarpRows::each_group_overlapped`.
#[cfg(kvc_hopper)]
impl<T: CacheElem + Wgmma16> QkTile for T {
    const WARPGROUP: bool = true;

    #[inline(always)]
    unsafe fn each_group<const D: usize>(
        rows: &WarpRows,
        (tile, positions, _): (*const u8, *const i32, u32),
        range: (u32, u32),
        bounds: (i32, i32),
        f: impl FnMut(usize, &Group, &GroupPositions, Seen),
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { rows.each_group_overlapped::<T, D>((tile, positions), range, bounds, f) }
    }

    /// Keys by rows ([`keys_major_chunk`]) where a key tile is 64 keys, else rows by keys.
    #[inline(always)]
    unsafe fn score_chunk<const D: usize>(s: &Scores, row_base: u32) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if agg_keys_major(D as u32, T::BYTES, true) {
                keys_major_chunk::<T, D>(s, row_base);
            } else {
                rows_major_chunk::<T, D>(s, row_base);
            }
        }
    }
}

/// The 16-bit types: A fragments by `ldmatrix.x4` (one per 16 dims), key fragments of two
/// 8-key tiles per `ldmatrix.x4`, one tensor-core MMA per row tile, 8 keys and 16 dims.
#[cfg(not(kvc_hopper))]
impl<T: CacheElem + Mma16> QkTile for T {
    #[inline(always)]
    unsafe fn load_a<const D: usize>(q_tile: *const u8, row_bytes: u32, row0: u32) -> [u32; MAX_A] {
        let lane = lane_id();
        let row = row0 + lane % 8 + 8 * ((lane / 8) % 2);
        let col_bytes = 16 * (lane / 16);
        let base = shared_addr(q_tile) + row * row_bytes + col_bytes;
        let mut a = [0u32; MAX_A];
        for ks in 0..D / 16 {
            // SAFETY: forwarded from the caller; the row is staged, the column inside it.
            let frag = unsafe { ldmatrix_x4(base + ks as u32 * 32) };
            a[4 * ks..4 * ks + 4].copy_from_slice(&frag);
        }
        a
    }

    each_group_at_once!();
}

#[cfg(not(kvc_hopper))]
impl<T: CacheElem + Mma16> QkGroup for T {
    #[inline(always)]
    unsafe fn qk_group<const D: usize>(
        a: &[[u32; MAX_A]; 2],
        row_tiles: u32,
        _: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        _: u32,
        key0: u32,
    ) -> Group {
        // Matrix `lane / 8` of an `ldmatrix.x4`: keys `+8` for matrices 2 and 3, dims `+8`
        // for matrices 1 and 3, i.e. the (k-low, k-high) fragments of two 8-key tiles.
        let lane = lane_id();
        let matrix = lane / 8;
        let key = key0 + lane % 8 + 8 * (matrix / 2);
        let base = shared_addr(k_tile) + key * row_bytes + 16 * (matrix % 2);
        let mut c = [[[0.0f32; 4]; GROUP_NTILES]; 2];
        for ks in 0..D / 16 {
            for pair in 0..GROUP_NTILES / 2 {
                // SAFETY: forwarded from the caller; key + 16 pair < the staged keys.
                let b =
                    unsafe { ldmatrix_x4(base + (16 * pair as u32) * row_bytes + ks as u32 * 32) };
                for m in 0..2 {
                    if (m as u32) < row_tiles {
                        let am = [
                            a[m][4 * ks],
                            a[m][4 * ks + 1],
                            a[m][4 * ks + 2],
                            a[m][4 * ks + 3],
                        ];
                        // SAFETY: register-only warp instructions of a converged warp.
                        unsafe {
                            c[m][2 * pair] = T::mma(am, [b[0], b[1]], c[m][2 * pair]);
                            c[m][2 * pair + 1] = T::mma(am, [b[2], b[3]], c[m][2 * pair + 1]);
                        }
                    }
                }
            }
        }
        c
    }
}

impl QkTile for F32 {
    each_group_at_once!();
}

impl QkGroup for F32 {
    /// The same C fragments by scalar FMAs (no f32 tensor-core MMA at full precision).
    #[inline(always)]
    unsafe fn qk_group<const D: usize>(
        _: &[[u32; MAX_A]; 2],
        row_tiles: u32,
        q_tile: *const u8,
        k_tile: *const u8,
        row_bytes: u32,
        row0: u32,
        key0: u32,
    ) -> Group {
        let lane = lane_id();
        let (gid, tig) = (lane / 4, lane % 4);
        let row =
            |tile: *const u8, r: u32| tile.wrapping_add((r * row_bytes) as usize) as *const f32;
        let mut c = [[[0.0f32; 4]; GROUP_NTILES]; 2];
        for (m, c_m) in c.iter_mut().enumerate() {
            if m as u32 >= row_tiles {
                continue;
            }
            let first = row0 + 16 * m as u32 + gid;
            let (q0, q1) = (row(q_tile, first), row(q_tile, first + 8));
            for (nt, c_nt) in c_m.iter_mut().enumerate() {
                let key = key0 + 8 * nt as u32 + 2 * tig;
                let (k0, k1) = (row(k_tile, key), row(k_tile, key + 1));
                for d in 0..opaque(D as u32) as usize {
                    // SAFETY: forwarded; d < D lies inside each staged row.
                    unsafe {
                        let (a0, a1, b0, b1) = (*q0.add(d), *q1.add(d), *k0.add(d), *k1.add(d));
                        *c_nt = [
                            fma(a0, b0, c_nt[0]),
                            fma(a0, b1, c_nt[1]),
                            fma(a1, b0, c_nt[2]),
                            fma(a1, b1, c_nt[3]),
                        ];
                    }
                }
            }
        }
        c
    }
}

/// How staged rows lie in shared memory: rows `stride` bytes apart holding `data` bytes each
/// (padded, for `ldmatrix` and the f32 path), or, `swizzled`, the 128-byte-swizzled panels of
/// a `rows`-row tile that `wgmma` reads (`gpu::wgmma`).
#[derive(Clone, Copy)]
pub(crate) struct RowLayout {
    pub(crate) stride: u32,
    pub(crate) data: u32,
    pub(crate) rows: u32,
    pub(crate) swizzled: bool,
}

impl RowLayout {
    /// The shared address of 16-byte chunk `chunk` of row `row` of the tile at `base`.
    #[inline(always)]
    fn chunk(self, base: u32, row: u32, chunk: u32) -> u32 {
        if self.swizzled {
            swizzled_chunk(base, self.rows, row, chunk)
        } else {
            base + row * self.stride + chunk * VECTOR_BYTES
        }
    }
}

/// After this thread's copies into a tile have landed and before the barrier that publishes
/// it: with `wgmma`, which reads shared memory through the async proxy, the fence that orders
/// them before those reads (nothing in the portable module).
#[inline(always)]
fn publish_copies() {
    #[cfg(kvc_hopper)]
    fence_async_proxy();
}

/// Stages `rows` rows (`layout`) into shared memory at `tile`, threads `0..threads` issuing
/// asynchronous 16-byte copies (none waits on another), then waiting for their own; `src(row)`
/// is the global address of a row, or `None` for a zero row. The caller's barrier makes the
/// tile visible to those threads.
///
/// # Safety
/// Threads `0..threads` call it; each `Some` address holds a readable row no thread writes; the
/// tile holds `rows` rows; `src` reads nothing the copies write.
#[inline(always)]
unsafe fn stage_rows(
    tile: *mut u8,
    layout: RowLayout,
    rows: u32,
    threads: u32,
    src: impl Fn(u32) -> Option<u64>,
) {
    let chunks_per_row = layout.data / VECTOR_BYTES;
    let base = shared_addr(tile);
    let mut chunk = thread_idx_x();
    while chunk < rows * chunks_per_row {
        let (row, col) = (chunk / chunks_per_row, chunk % chunks_per_row);
        let offset = col * VECTOR_BYTES;
        // SAFETY: row < rows, col < chunks_per_row; the source as the caller promised.
        unsafe { copy_async_chunk(layout.chunk(base, row, col), src(row), offset as u64) };
        chunk += threads;
    }
    // SAFETY: this thread's copies.
    unsafe { wait_async_copies() };
    publish_copies();
}

/// Per-sequence inputs: (window length, last position, metric_skip).
#[inline(always)]
pub(crate) unsafe fn seq_info(p: &AggregateParams, seq: u32) -> (u32, i32, i32) {
    // SAFETY: seq_info holds [num_seqs, 3] i32.
    unsafe {
        (
            load::<i32>(p.seq_info, p.seq_info_word(seq, 0)) as u32,
            load::<i32>(p.seq_info, p.seq_info_word(seq, 1)),
            load::<i32>(p.seq_info, p.seq_info_word(seq, 2)),
        )
    }
}

/// Stages query rows `row_base..row_base + count` of `(seq, kv_head)` (zero past `rows`), by
/// threads `0..threads` ([`stage_rows`]).
#[inline(always)]
pub(crate) unsafe fn stage_queries<T: CacheElem>(
    p: &AggregateParams,
    q_tile: *mut u8,
    layout: RowLayout,
    (seq, kv_head): (u32, u32),
    (row_base, count): (u32, u32),
    rows: u32,
    threads: u32,
) {
    let geom = p.cache.geometry;
    // SAFETY: valid rows address [num_seqs, window, Hq, D] of T (host-validated shape).
    unsafe {
        stage_rows(q_tile, layout, count, threads, |r| {
            let row = row_base + r;
            (row < rows).then(|| {
                let (i, g) = geom.window_row(row);
                p.q + p.query_elem(seq, i, kv_head * geom.group_size + g) * T::BYTES as u64
            })
        })
    }
}

/// Position threshold of row `row` given `(window length, last position)`: the position of
/// its query, or `i32::MIN` for rows past the window (they see nothing).
#[inline(always)]
pub(crate) fn row_position(
    row: u32,
    rows: u32,
    geom: &Geometry,
    window_len: u32,
    last: i32,
) -> i32 {
    if row < rows {
        last - (window_len - 1 - geom.window_row(row).0) as i32
    } else {
        i32::MIN
    }
}

/// The shared-memory key tiles of an aggregation CTA.
#[derive(Clone, Copy)]
struct KeyTiles {
    rows: *mut u8,
    positions: *mut i32,
    block_ids: *mut i32,
    tile_keys: u32,
    /// Tiles: 2 or 3 (`agg_stages`).
    stages: u32,
    layout: RowLayout,
}

impl KeyTiles {
    /// The rows of stage `stage`.
    #[inline(always)]
    fn rows(&self, stage: u32) -> *mut u8 {
        self.rows
            .wrapping_add((stage * self.tile_keys * self.layout.stride) as usize)
    }

    /// The positions of stage `stage`.
    #[inline(always)]
    fn positions(&self, stage: u32) -> *mut i32 {
        self.positions
            .wrapping_add((stage * self.tile_keys) as usize)
    }

    /// The block ids of the keys of id slot `slot` (-1: no key).
    #[inline(always)]
    fn block_ids(&self, slot: u32) -> *mut i32 {
        self.block_ids
            .wrapping_add((slot * self.tile_keys) as usize)
    }
}

/// An aggregation CTA's shared memory, carved as `aggregate_smem` says.
#[derive(Clone, Copy)]
struct Layout {
    q_tile: *mut u8,
    q_layout: RowLayout,
    tiles: KeyTiles,
    parts: *mut f32,
    columns: *mut f32,
    owned_ids: *mut i32,
    #[cfg(kvc_hopper)]
    warp_most: *mut i32,
}

impl Layout {
    /// The map for cache type `T`, head dimension `D`, group size `group`.
    ///
    /// # Safety
    /// The launch reserved `aggregate_smem(..).bytes` of dynamic shared memory.
    #[inline(always)]
    unsafe fn new<T: CacheElem, const D: usize>(group: u32, columns: bool) -> Self {
        let hopper = cfg!(kvc_hopper);
        let smem = aggregate_smem(D as u32, T::BYTES, group, columns, hopper);
        let base = dynamic_f32() as *mut u8;
        let at = |offset: u32| base.wrapping_add(offset as usize);
        let tile_keys = agg_tile_keys(D as u32, T::BYTES);
        let layout = |rows: u32| RowLayout {
            stride: smem.row_bytes,
            data: D as u32 * T::BYTES,
            rows,
            swizzled: agg_wgmma(T::BYTES, hopper),
        };
        Self {
            q_tile: at(smem.q_tile),
            q_layout: layout(agg_rows(D as u32, T::BYTES)),
            tiles: KeyTiles {
                rows: at(smem.k_tiles),
                positions: at(smem.positions) as *mut i32,
                block_ids: at(smem.block_ids) as *mut i32,
                tile_keys,
                stages: smem.stages,
                layout: layout(tile_keys),
            },
            parts: at(smem.parts) as *mut f32,
            columns: at(smem.columns) as *mut f32,
            owned_ids: at(smem.owned_ids) as *mut i32,
            #[cfg(kvc_hopper)]
            warp_most: at(smem.warp_most) as *mut i32,
        }
    }
}

/// Keys `kstart..kend` (all below the head slot's length) of a head slot streamed through the
/// key tiles, `tiles.stages` deep: [`KeyStream::start`] copies the first tiles,
/// [`KeyStream::land`] hands over tile `t` once it has landed and the CTA has synchronised (so
/// every warp is also done with tile `t - 1`) and copies tile `t + stages - 1` into `t - 1`'s
/// stage; [`KeyStream::walk`] lands every tile in turn for a consumer. Keys of the last tile
/// past `kend` are zero rows with position `NO_KEY`.
///
/// Nothing waits on a global load: the block ids of tile `j` are copied (`cp.async`, one
/// thread per key, into slot `j % AGG_ID_SLOTS`) with tile `j - 2`'s rows, so they have
/// landed, and a barrier has passed, when tile `j`'s rows are issued two tiles later; the
/// slot is rewritten only after the barrier that follows that issue. The `THREADS /
/// tile_keys` threads of a key copy interleaved 16-byte chunks of its row, so that a warp
/// reads whole sectors.
///
/// Its first barrier comes before any copy into the tiles, so the query rows they overlay
/// (16-bit types) may be read until [`KeyStream::start`].
struct KeyStream<'a> {
    p: &'a AggregateParams,
    tiles: KeyTiles,
    /// Global address of the head slot's block table.
    table: u64,
    kstart: u32,
    kend: u32,
    ntiles: u32,
    /// This thread's key of a tile, and its part of that key's chunks.
    key_local: u32,
    part: u32,
}

impl<'a> KeyStream<'a> {
    /// Copies the block ids of tiles 0 and 1, then, after a barrier, the first `stages - 1`
    /// tiles with the ids of the two after each.
    ///
    /// # Safety
    /// Every thread calls it with the same range; `head_slot`'s first `kend` KVs are in
    /// validated pool blocks; no warp reads the key tiles meanwhile.
    #[inline(always)]
    unsafe fn start(
        p: &'a AggregateParams,
        tiles: KeyTiles,
        head_slot: u64,
        (kstart, kend): (u32, u32),
    ) -> Self {
        let geom = p.cache.geometry;
        let per_key = THREADS / tiles.tile_keys;
        let thread = thread_idx_x();
        let stream = Self {
            p,
            tiles,
            table: p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4,
            kstart,
            kend,
            ntiles: (kend - kstart).div_ceil(tiles.tile_keys),
            key_local: thread / per_key,
            part: thread % per_key,
        };
        if stream.ntiles == 0 {
            return stream; // uniform over the CTA
        }
        stream.fetch_ids(0);
        stream.fetch_ids(1);
        // SAFETY: all threads reach the barrier; the ids are visible after it.
        unsafe {
            commit_async_copies();
            wait_async_copies();
            sync_threads();
        }
        for j in 0..tiles.stages - 1 {
            stream.issue(j);
            stream.fetch_ids(j + 2);
            // SAFETY: closes this thread's group.
            unsafe { commit_async_copies() };
        }
        stream
    }

    /// Key `local` of tile `t`.
    #[inline(always)]
    fn key_of(&self, t: u32, local: u32) -> u32 {
        self.kstart + t * self.tiles.tile_keys + local
    }

    /// Thread `k < tile_keys` copies the block id of key `k` of tile `j` (-1 past the range).
    #[inline(always)]
    fn fetch_ids(&self, j: u32) {
        let thread = thread_idx_x();
        if thread < self.tiles.tile_keys {
            let key = self.key_of(j, thread);
            let id = self
                .tiles
                .block_ids(j % AGG_ID_SLOTS)
                .wrapping_add(thread as usize);
            // SAFETY: thread < tile_keys; key < kend is inside the head slot's table.
            unsafe {
                if j < self.ntiles && key < self.kend {
                    let entry = self.table + self.p.cache.geometry.logical_block(key) as u64 * 4;
                    copy_async_word(shared_addr(id), entry);
                } else {
                    *id = -1;
                }
            }
        }
    }

    /// Issues the copies of tile `j` (none past the last tile), its ids landed and visible.
    #[inline(always)]
    fn issue(&self, j: u32) {
        if j >= self.ntiles {
            return;
        }
        let (p, tiles, geom) = (self.p, self.tiles, self.p.cache.geometry);
        let per_key = THREADS / tiles.tile_keys;
        let (key_local, part) = (self.key_local, self.part);
        let chunks = tiles.layout.data / VECTOR_BYTES / per_key;
        let stage = j % tiles.stages;
        // SAFETY: key_local < tile_keys; the id landed before the last barrier.
        let block = unsafe {
            *tiles
                .block_ids(j % AGG_ID_SLOTS)
                .wrapping_add(key_local as usize)
        };
        let tile = shared_addr(tiles.rows(stage));
        let slot = (block >= 0)
            .then(|| geom.pool_slot(block as u32, geom.slot_in_block(self.key_of(j, key_local))));
        let src = slot.map(|s| p.cache.k_pool + s * tiles.layout.data as u64);
        for c in 0..chunks {
            let chunk = c * per_key + part;
            let dst = tiles.layout.chunk(tile, key_local, chunk);
            // SAFETY: inside this key's staged row; the source is its K row in the pool.
            unsafe { copy_async_chunk(dst, src, (chunk * VECTOR_BYTES) as u64) };
        }
        if part == 0 {
            let position = tiles.positions(stage).wrapping_add(key_local as usize);
            // SAFETY: key_local < tile_keys; the slot is a pool slot.
            unsafe {
                match slot {
                    Some(s) => copy_async_word(shared_addr(position), p.cache.position + s * 4),
                    None => *position = NO_KEY,
                }
            }
        }
    }

    /// Tile `t`'s rows and positions, landed and visible to the CTA, after issuing the
    /// copies of tile `t + stages - 1` into the stage of tile `t - 1`.
    ///
    /// # Safety
    /// Every thread calls it for each `t < ntiles` in turn, done with tile `t - 1`.
    #[inline(always)]
    unsafe fn land(&self, t: u32) -> (*const u8, *const i32) {
        // SAFETY: all threads reach the barrier (same ntiles); after it, tile t and the ids
        // of tile t + 2 have landed for every thread, and no warp reads tile t - 1's stage or
        // the ids of tile t, which the next copies overwrite.
        unsafe {
            if self.tiles.stages == AGG_STAGES {
                wait_async_copies_but_last();
            } else {
                wait_async_copies();
            }
            publish_copies();
            sync_threads();
        }
        let next = t + self.tiles.stages - 1;
        if next < self.ntiles {
            self.issue(next);
            self.fetch_ids(next + 2);
        }
        // SAFETY: closes this thread's group (possibly empty).
        unsafe { commit_async_copies() };
        let stage = t % self.tiles.stages;
        (self.tiles.rows(stage), self.tiles.positions(stage))
    }

    /// Calls `consume(t, rows, positions)` for each tile `t` in turn as it lands
    /// ([`KeyStream::land`]), then waits for the (empty) groups still open.
    ///
    /// # Safety
    /// Every thread calls it; `consume` is done with tile `t - 1` when it returns.
    #[inline(always)]
    unsafe fn walk(self, mut consume: impl FnMut(u32, *const u8, *const i32)) {
        for t in 0..self.ntiles {
            // SAFETY: every thread, each tile in turn; the consumer is done with tile t - 1.
            let (rows, positions) = unsafe { self.land(t) };
            consume(t, rows, positions);
        }
        // SAFETY: only empty groups remain.
        unsafe { wait_async_copies() };
    }
}

/// Positions of a lane's columns (`2 tig`, `2 tig + 1` of each n-tile) of the group at `key0`.
///
/// # Safety
/// `positions` holds the staged tile's positions; `key0 + 32` keys are inside it.
#[inline(always)]
unsafe fn group_positions(positions: *const i32, key0: u32) -> GroupPositions {
    let tig = lane_id() % 4;
    let mut pos = [[0i32; 2]; GROUP_NTILES];
    for (nt, pair) in pos.iter_mut().enumerate() {
        let key = (key0 + 8 * nt as u32 + 2 * tig) as usize;
        // SAFETY: inside the staged tile, as the caller promised.
        *pair = unsafe { [*positions.add(key), *positions.add(key + 1)] };
    }
    pos
}

/// What the rows of a warp see of a group of keys.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Every row every key: no masks.
    All,
    /// Some: masks per score.
    Part,
    /// No row any key: the group is skipped (its masked scores would add nothing).
    Nothing,
}

/// What the warp's rows see of the group whose positions (this lane's columns) are `pos`,
/// given the least and the most position this lane's rows see.
///
/// # Safety
/// The warp is converged.
#[inline(always)]
unsafe fn group_seen(pos: &GroupPositions, (least, most): (i32, i32)) -> Seen {
    let (mut all, mut any) = (true, false);
    for pair in pos {
        for &position in pair {
            all &= position <= least;
            any |= position <= most;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        if ballot(all) == u32::MAX {
            Seen::All
        } else if ballot(any) == 0 {
            Seen::Nothing
        } else {
            Seen::Part
        }
    }
}

/// The first row of this warp in a chunk: warps take `row_tiles` 16-row tiles each, or with
/// `wgmma` rows `16 w..16 w + 16` of each 64-row tile.
#[inline(always)]
fn warp_row0<T: QkTile>(row_tiles: u32) -> u32 {
    if T::WARPGROUP {
        warp_id() * 16
    } else {
        warp_id() * 16 * row_tiles
    }
}

/// The rows of this lane in the chunk from `row_base`: `[row tile][half]`, `row0 + 16 m + 8
/// half + gid`, or with `wgmma` `row0 + 64 m + 8 half + gid`.
#[inline(always)]
fn lane_rows<T: QkTile>(row_base: u32, row_tiles: u32) -> [[u32; 2]; 2] {
    let first = row_base + warp_row0::<T>(row_tiles) + lane_id() / 4;
    let tile = if T::WARPGROUP { 64 } else { 16 };
    [[first, first + 8], [first + tile, first + tile + 8]]
}

/// A warp's query rows in one chunk, held as A fragments, and the tiles it multiplies them with.
pub(crate) struct WarpRows {
    a: [[u32; MAX_A]; 2],
    /// With `wgmma`, the most position any row of the CTA sees (`i32::MIN`: none).
    #[cfg(kvc_hopper)]
    cta_most: i32,
    /// Whether the warp holds a row of the window: an inactive warp folds nothing, and skips
    /// the products too unless the whole warpgroup multiplies (`wgmma`).
    active: bool,
    row_tiles: u32,
    row0: u32,
    q_tile: *const u8,
    row_bytes: u32,
}

impl WarpRows {
    /// Stages query rows `row_base..row_base + agg_rows` of `(seq, kv_head)` (zero past
    /// `rows`) and returns this warp's, its A fragments loaded. `most` is the most position
    /// this lane's rows see, for the CTA-wide skip of the `wgmma` walk (Hopper module only).
    ///
    /// # Safety
    /// Every thread calls it; nothing reads the query rows' shared memory (or the key tiles
    /// over it) meanwhile.
    #[inline(always)]
    unsafe fn stage<T: QkTile, const D: usize>(
        p: &AggregateParams,
        smem: &Layout,
        (seq, kv_head): (u32, u32),
        row_base: u32,
        rows: u32,
        #[cfg_attr(not(kvc_hopper), allow(unused_variables))] most: i32,
    ) -> Self {
        // With `wgmma`, the warp's most seen position, published with the rows by the barrier
        // below (`cta_most`).
        #[cfg(kvc_hopper)]
        if T::WARPGROUP {
            // SAFETY: the whole warp takes part.
            let warp_most = unsafe { max_i32(most) };
            if lane_id() == 0 {
                // SAFETY: this warp's word of the map; read only after the barrier below, and
                // rewritten only after the next chunk's first barrier.
                unsafe { *smem.warp_most.add(warp_id() as usize) = warp_most };
            }
        }
        let row_tiles = agg_row_tiles(D as u32, T::BYTES);
        let row0 = warp_row0::<T>(row_tiles);
        let row_bytes = smem.q_layout.stride;
        let chunk_rows = agg_rows(D as u32, T::BYTES);
        // SAFETY: all threads take part; rows past the window are zero.
        unsafe {
            stage_queries::<T>(
                p,
                smem.q_tile,
                smem.q_layout,
                (seq, kv_head),
                (row_base, chunk_rows),
                rows,
                THREADS,
            );
            sync_threads();
        }
        #[cfg(kvc_hopper)]
        let mut cta_most = i32::MIN;
        #[cfg(kvc_hopper)]
        if T::WARPGROUP {
            for w in 0..AGG_WARPS {
                // SAFETY: every warp's word, written before the barrier above.
                cta_most = cta_most.max(unsafe { *smem.warp_most.add(w as usize) });
            }
        }
        let mut a = [[0u32; MAX_A]; 2];
        for (m, a_m) in a.iter_mut().enumerate() {
            if (m as u32) < row_tiles {
                // SAFETY: the rows are staged; the warp is converged.
                *a_m = unsafe { T::load_a::<D>(smem.q_tile, row_bytes, row0 + 16 * m as u32) };
            }
        }
        Self {
            a,
            #[cfg(kvc_hopper)]
            cta_most,
            active: row_base + row0 < rows,
            row_tiles,
            row0,
            q_tile: smem.q_tile,
            row_bytes,
        }
    }

    /// `QkTile::each_group` for the types that compute a group at once (`QkGroup`): the
    /// warp's groups one after another.
    ///
    /// # Safety
    /// As `QkTile::each_group`.
    #[inline(always)]
    unsafe fn each_group_at_once<T: QkGroup, const D: usize>(
        &self,
        (tile, positions, tile_keys): (*const u8, *const i32, u32),
        (first, end): (u32, u32),
        bounds: (i32, i32),
        mut f: impl FnMut(usize, &Group, &GroupPositions, Seen),
    ) {
        if !self.active {
            return; // uniform over the warp
        }
        for grp in 0..tile_keys / AGG_GROUP_KEYS {
            let key0 = grp * AGG_GROUP_KEYS;
            if first + key0 >= end {
                continue; // past the range (uniform over the CTA)
            }
            // SAFETY: the tile is staged.
            let pos = unsafe { group_positions(positions, key0) };
            // SAFETY: the warp is converged.
            let seen = unsafe { group_seen(&pos, bounds) };
            if seen == Seen::Nothing {
                continue; // uniform over the warp
            }
            // SAFETY: the tile is staged; the warp is converged.
            let c = unsafe {
                T::qk_group::<D>(
                    &self.a,
                    self.row_tiles,
                    self.q_tile,
                    tile,
                    self.row_bytes,
                    self.row0,
                    key0,
                )
            };
            f(grp as usize, &c, &pos, seen);
        }
    }

    /// `QkTile::each_group` with `wgmma`, on a fixed schedule so that nothing diverges between
    /// the issue of a product and its wait: every group of the tile is started (past the range
    /// too: those keys are zero rows no row sees), then each is waited for and folded in
    /// turn, so the later groups' products run while the earlier ones are folded. The tile
    /// is skipped as a whole when no row of the CTA sees any of its keys.
    ///
    /// # Safety
    /// As `QkTile::each_group`; every warp of the CTA calls it with the same tile and range.
    #[cfg(kvc_hopper)]
    #[inline(always)]
    unsafe fn each_group_overlapped<T: CacheElem + Wgmma16, const D: usize>(
        &self,
        (tile, positions): (*const u8, *const i32),
        (first, end): (u32, u32),
        bounds: (i32, i32),
        mut f: impl FnMut(usize, &Group, &GroupPositions, Seen),
    ) {
        // A constant of D and T, equal to `tile_keys / AGG_GROUP_KEYS`: 2 (64-key tiles) or
        // 1. Each group's values are separate variables, not an indexed array, so that they
        // stay in registers whether or not the loops unroll.
        let two = agg_tile_keys(D as u32, T::BYTES) / AGG_GROUP_KEYS == 2;
        let key1 = AGG_GROUP_KEYS;
        // SAFETY: the tile is staged (a second group only in a 64-key tile).
        let (pos0, pos1) = unsafe {
            (
                group_positions(positions, 0),
                if two {
                    group_positions(positions, key1)
                } else {
                    [[NO_KEY; 2]; GROUP_NTILES]
                },
            )
        };
        let sees = |pos: &GroupPositions| pos.iter().flatten().any(|&k| k <= self.cta_most);
        // Every warp votes on the same positions against the same bound.
        // SAFETY: the warp is converged.
        if unsafe { ballot(sees(&pos0) || sees(&pos1)) } == 0 {
            return; // uniform over the CTA
        }
        let (mut acc0, mut acc1) = ([[0.0f32; 16]; 2], [[0.0f32; 16]; 2]);
        // SAFETY: the tile is staged; every warp of the CTA is here for every call below.
        unsafe {
            start_group::<T, D>(&mut acc0, self.row_tiles, self.q_tile, tile, 0);
            if two {
                start_group::<T, D>(&mut acc1, self.row_tiles, self.q_tile, tile, key1);
            }
            finish_groups(&mut acc0, two);
        }
        let mut fold = |grp: u32, acc: &[[f32; 16]; 2], pos: &GroupPositions| {
            // SAFETY: the warp is converged.
            let seen = unsafe { group_seen(pos, bounds) };
            if self.active && first + grp * AGG_GROUP_KEYS < end && seen != Seen::Nothing {
                f(grp as usize, &as_group(acc), pos, seen);
            }
        };
        fold(0, &acc0, &pos0);
        if two {
            // SAFETY: as above.
            unsafe { finish_groups(&mut acc1, false) };
            fold(1, &acc1, &pos1);
        }
    }
}

/// `f(0) op f(1) op ... op f(7)` (a lane's 8 columns of a group) combined by pairs, so that
/// the dependency chain is 3 deep rather than 7.
#[inline(always)]
pub(crate) fn pairwise(f: impl Fn(usize) -> f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let quad = |k: usize| op(op(f(k), f(k + 1)), op(f(k + 2), f(k + 3)));
    op(quad(0), quad(4))
}

/// `(max, sum)` of two partial softmax sums in the log2 domain (`max` `-inf`: empty).
#[inline(always)]
fn merge_stats((max, sum): (f32, f32), (m, l): (f32, f32)) -> (f32, f32) {
    let new_max = fmax(max, m);
    let base = if new_max == f32::NEG_INFINITY {
        0.0
    } else {
        new_max
    };
    (new_max, fma(sum, exp2(max - base), l * exp2(m - base)))
}

/// Pass 1 body for cache type `T` and head dimension `D`.
///
/// # Safety
/// Launched with `plan_aggregate`'s stats dims and host-validated params (module header).
#[inline(always)]
pub unsafe fn window_stats_body<T: CacheElem + QkTile, const D: usize>(p: &AggregateParams) {
    allow_dependent_grid();
    let geom = p.cache.geometry;
    let group = geom.group_size.max(1);
    // SAFETY: forwarded from the caller.
    let Some(cta) = (unsafe { StatsCta::new(p, agg_rows(D as u32, T::BYTES)) }) else {
        return; // uniform over the CTA: no barrier is skipped by part of it
    };
    let StatsCta {
        seq,
        kv_head,
        window_len,
        last,
        rows,
        row_base,
        head_slot,
        keys: (key_lo, key_hi),
        ..
    } = cta;
    let row_tiles = agg_row_tiles(D as u32, T::BYTES);

    // SAFETY: the launch reserved the stats map.
    let smem = unsafe { Layout::new::<T, D>(group, false) };
    let my_rows = lane_rows::<T>(row_base, row_tiles);
    let seen = my_rows.map(|half| half.map(|r| row_position(r, rows, &geom, window_len, last)));
    // The least and the most position this lane's rows see.
    let mut bounds = (i32::MAX, i32::MIN);
    for (m, half) in my_rows.iter().enumerate() {
        for (i, &row) in half.iter().enumerate() {
            if (m as u32) < row_tiles && row < rows {
                bounds = (bounds.0.min(seen[m][i]), bounds.1.max(seen[m][i]));
            }
        }
    }
    // SAFETY: all threads take part.
    let warp_rows =
        unsafe { WarpRows::stage::<T, D>(p, &smem, (seq, kv_head), row_base, rows, bounds.1) };
    let mut stats = [[(f32::NEG_INFINITY, 0.0f32); 2]; 2];
    let tile_keys = smem.tiles.tile_keys;

    let consume = |t, tile, positions| {
        let range = (key_lo + t * tile_keys, key_hi);
        let fold_group = |_, c: &Group, pos: &GroupPositions, seen_keys| {
            // Each row's scores in the log2 domain folded into its (max, sum), with masks;
            // `masked` is a constant in each of the two copies below.
            let mut fold = |masked: bool| {
                for m in 0..2 {
                    if m as u32 >= row_tiles {
                        continue;
                    }
                    for i in 0..2 {
                        let mut x = [0.0f32; 2 * GROUP_NTILES];
                        let mut tile_max = f32::NEG_INFINITY;
                        for nt in 0..GROUP_NTILES {
                            for j in 0..2 {
                                let v = c[m][nt][2 * i + j] * p.scale_log2;
                                x[2 * nt + j] = if masked && pos[nt][j] > seen[m][i] {
                                    f32::NEG_INFINITY
                                } else {
                                    v
                                };
                                tile_max = fmax(tile_max, x[2 * nt + j]);
                            }
                        }
                        let (max, sum) = stats[m][i];
                        let new_max = fmax(max, tile_max);
                        // Unmasked, every score is finite: so is the new max.
                        let base = if masked && new_max == f32::NEG_INFINITY {
                            0.0
                        } else {
                            new_max
                        };
                        let mut total = sum * exp2(max - base);
                        for k in 0..2 * GROUP_NTILES {
                            total += exp2(x[k] - base);
                        }
                        stats[m][i] = (new_max, total);
                    }
                }
            };
            let visible = seen_keys == Seen::All;
            if visible && p.scale_log2 >= 0.0 {
                // Every score visible and the scale not negative: the max of the scaled
                // scores is the scaled max of the raw ones (rounding is monotonic), and each
                // exponent is one FMA; maxima and sums by pairs (short dependency chains).
                for m in 0..2 {
                    if m as u32 >= row_tiles {
                        continue;
                    }
                    for i in 0..2 {
                        let raw = |k: usize| c[m][k / 2][2 * i + k % 2];
                        let (max, sum) = stats[m][i];
                        let new_max = fmax(max, p.scale_log2 * pairwise(raw, fmax));
                        let term = |k: usize| exp2(fma(raw(k), p.scale_log2, -new_max));
                        let total = fma(sum, exp2(max - new_max), pairwise(term, |a, b| a + b));
                        stats[m][i] = (new_max, total);
                    }
                }
            } else {
                fold(!visible);
            }
        };
        // SAFETY: the tile is staged; the warp is converged.
        unsafe {
            T::each_group::<D>(
                &warp_rows,
                (tile, positions, tile_keys),
                range,
                bounds,
                fold_group,
            )
        };
    };
    // SAFETY: all threads take part with the same range; every warp is done with a tile when
    // `consume` returns.
    unsafe { KeyStream::start(p, smem.tiles, head_slot, (key_lo, key_hi)).walk(consume) };
    for (m, half) in my_rows.iter().enumerate() {
        for (i, &row) in half.iter().enumerate() {
            // SAFETY: the whole warp; the workspace holds every row (plan).
            unsafe { cta.write_row(p, row, stats[m][i], (m as u32) < row_tiles && row < rows) };
        }
    }
}

/// What a pass-1 CTA works on (grid `(row_chunk * key_splits + split, kv_head, seq)`): its
/// chunk's window rows from `row_base` of `(seq, kv_head)`, against the keys of its split.
pub(crate) struct StatsCta {
    pub(crate) seq: u32,
    pub(crate) kv_head: u32,
    split: u32,
    splits: u32,
    pub(crate) window_len: u32,
    pub(crate) last: i32,
    /// Window rows of `(seq, kv_head)`.
    pub(crate) rows: u32,
    pub(crate) row_base: u32,
    pub(crate) head_slot: u64,
    /// The split's keys `lo..hi` of the head slot.
    pub(crate) keys: (u32, u32),
}

impl StatsCta {
    /// This CTA's work with chunks of `chunk_rows` rows, or `None` when its chunk lies past
    /// the window (the same answer for every thread of the CTA).
    ///
    /// # Safety
    /// Launched with `plan_aggregate`'s stats grid and host-validated params.
    #[inline(always)]
    pub(crate) unsafe fn new(p: &AggregateParams, chunk_rows: u32) -> Option<Self> {
        let geom = p.cache.geometry;
        let (kv_head, seq) = (block_idx_y(), block_idx_z());
        let splits = p.key_splits.max(1);
        let (chunk, split) = (block_idx_x() / splits, block_idx_x() % splits);
        // SAFETY: seq < num_seqs (grid).
        let (window_len, last, _) = unsafe { seq_info(p, seq) };
        let rows = window_len * geom.group_size.max(1);
        let row_base = chunk * chunk_rows;
        if row_base >= rows {
            return None;
        }
        let head_slot = geom.head_slot(seq, p.layer_idx, kv_head);
        // SAFETY: head_slot is in range (grid and validated layer).
        let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
        let key_lo = (split * p.split_kvs).min(len);
        Some(Self {
            seq,
            kv_head,
            split,
            splits,
            window_len,
            last,
            rows,
            row_base,
            head_slot,
            keys: (key_lo, len.min(key_lo + p.split_kvs)),
        })
    }

    /// Merges row `row`'s (max, sum) over its four lanes (`tig`) and, where `valid`, lane
    /// `tig == 0` writes it: as the row's final stats with one key split, else as this split's
    /// partial.
    ///
    /// # Safety
    /// The whole warp calls it; the workspace holds stats and partials for the row (plan).
    #[inline(always)]
    pub(crate) unsafe fn write_row(
        &self,
        p: &AggregateParams,
        row: u32,
        mut s: (f32, f32),
        valid: bool,
    ) {
        let (seq, kv_head) = (self.seq, self.kv_head);
        let mut mask = 1;
        while mask < 4 {
            // SAFETY: the whole warp runs these shuffles.
            let other = unsafe { (shfl_xor(s.0, mask), shfl_xor(s.1, mask)) };
            s = merge_stats(s, other);
            mask *= 2;
        }
        if lane_id().is_multiple_of(4) && valid {
            // SAFETY: forwarded from the caller.
            unsafe {
                if self.splits == 1 {
                    write_stats(p, p.stats_row(seq, kv_head, row), s);
                } else {
                    let at = p.partial_row(seq, kv_head, row, self.split) * 2;
                    store::<f32>(p.partials, at, s.0);
                    store::<f32>(p.partials, at + 1, s.1);
                }
            }
        }
    }
}

/// Writes a row's final (max, 1/sum), or (0, 0) for a row that saw no key.
#[inline(always)]
unsafe fn write_stats(p: &AggregateParams, stats_row: u64, (max, sum): (f32, f32)) {
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
    allow_dependent_grid();
    wait_for_prior_grid();
    let (kv_head, seq) = (block_idx_y(), block_idx_z());
    let row = block_idx_x() * AGG_WARPS + warp_id();
    let lane = lane_id();
    // SAFETY: seq < num_seqs (grid).
    let (window_len, _, _) = unsafe { seq_info(p, seq) };
    if row >= window_len * p.cache.geometry.group_size {
        return; // uniform over the warp
    }
    let mut s = (f32::NEG_INFINITY, 0.0f32);
    let mut split = lane;
    while split < p.key_splits {
        let at = p.partial_row(seq, kv_head, row, split) * 2;
        // SAFETY: pass 1 wrote every split of this row.
        let partial = unsafe { (load::<f32>(p.partials, at), load::<f32>(p.partials, at + 1)) };
        s = merge_stats(s, partial);
        split += WARP_SIZE;
    }
    let mut mask = 1;
    while mask < WARP_SIZE {
        // SAFETY: the whole warp runs these shuffles.
        let other = unsafe { (shfl_xor(s.0, mask), shfl_xor(s.1, mask)) };
        s = merge_stats(s, other);
        mask *= 2;
    }
    if lane == 0 {
        // SAFETY: stats holds a row for every (seq, kv_head, row).
        unsafe { write_stats(p, p.stats_row(seq, kv_head, row), s) };
    }
}

/// What the row chunks of a pass-2 CTA share: its sequence, head and keys, and how a score
/// becomes the metric's term.
pub(crate) struct Scores<'a> {
    p: &'a AggregateParams,
    smem: Layout,
    seq: u32,
    kv_head: u32,
    head_slot: u64,
    window_len: u32,
    last: i32,
    skip: i32,
    group: u32,
    rows: u32,
    /// The keys scored: the owned ones and their halo inside the head slot.
    keys: (u32, u32),
    /// The column of the first key scored (key `owned - SCORE_HALO + c` is column `c`).
    first_column: u32,
    /// 2 for L2 (`a^2`), 1 for L1 (`a`).
    power: f32,
}

impl Scores<'_> {
    /// The position up to which row `row` counts keys (`i32::MIN`: past the window).
    #[inline(always)]
    fn counted(&self, row: u32) -> i32 {
        let (rows, window_len, last) = (self.rows, self.window_len, self.last);
        row_position(row, rows, &self.p.cache.geometry, window_len, last).saturating_sub(self.skip)
    }

    /// The least and the most position the rows of the chunk at `row_base` count (a row's
    /// position grows with its query).
    #[cfg(kvc_hopper)]
    #[inline(always)]
    fn chunk_bounds(&self, row_base: u32, chunk_rows: u32) -> (i32, i32) {
        let end = self.rows.min(row_base + chunk_rows);
        (self.counted(row_base), self.counted(end - 1))
    }

    /// The column of key `key` of tile `t` for query head `g`.
    #[inline(always)]
    fn column(&self, g: u32, t: u32, key: u32) -> usize {
        (g * SCORE_COLUMNS + self.first_column + t * self.smem.tiles.tile_keys + key) as usize
    }
}

/// Row `row` of `(seq, kv_head)`'s (max, 1/sum) in the log2 domain: from pass 1, or (log2 of
/// the sum, 1) from the caller's log-sum-exp.
///
/// # Safety
/// `row` is a row of the sequence's window; pass 1 wrote stats for every row of the window, or
/// `lse` holds the window.
#[inline(always)]
pub(crate) unsafe fn row_stats(
    p: &AggregateParams,
    (seq, kv_head): (u32, u32),
    row: u32,
) -> (f32, f32) {
    if p.lse != 0 {
        let geom = p.cache.geometry;
        let (i, g) = geom.window_row(row);
        let at = p.lse_elem(seq, i, kv_head * geom.group_size + g);
        // SAFETY: as the caller promised.
        return (
            unsafe { load::<f32>(p.lse, at) } * core::f32::consts::LOG2_E,
            1.0,
        );
    }
    let at = p.stats_row(seq, kv_head, row) * 2;
    // SAFETY: as the caller promised.
    unsafe { (load::<f32>(p.stats, at), load::<f32>(p.stats, at + 1)) }
}

/// A pass-2 CTA's keys: the head slot of grid `(key_range, kv_head, seq)`, its window, and the
/// range of `score_kvs` keys it owns.
pub(crate) struct ScoreRange {
    /// `(seq, kv_head)`.
    pub(crate) head: (u32, u32),
    /// The sequence's window length, last position and `metric_skip`.
    pub(crate) window: (u32, i32, i32),
    pub(crate) head_slot: u64,
    /// The head slot's live keys.
    pub(crate) len: u32,
    /// The owned keys, `owned..owned_end`.
    pub(crate) owned: (u32, u32),
}

impl ScoreRange {
    /// This CTA's, or `None` when it has nothing to do (no window, or a range past the keys).
    ///
    /// # Safety
    /// Launched with `plan_aggregate`'s scores grid and host-validated params.
    #[inline(always)]
    pub(crate) unsafe fn new(p: &AggregateParams) -> Option<Self> {
        let geom = p.cache.geometry;
        let (range, kv_head, seq) = (block_idx_x(), block_idx_y(), block_idx_z());
        // SAFETY: seq < num_seqs (grid).
        let (window_len, last, skip) = unsafe { seq_info(p, seq) };
        let head_slot = geom.head_slot(seq, p.layer_idx, kv_head);
        // SAFETY: head_slot is in range.
        let len = unsafe { load::<i32>(p.cache.context_lens, head_slot) } as u32;
        let owned = range * p.score_kvs;
        if window_len == 0 || owned >= len {
            return None;
        }
        Some(Self {
            head: (seq, kv_head),
            window: (window_len, last, skip),
            head_slot,
            len,
            owned: (owned, len.min(owned + p.score_kvs)),
        })
    }
}

/// Pass 2 body for cache type `T` and head dimension `D`.
///
/// # Safety
/// Launched with `plan_aggregate`'s scores dims after pass 1 (and its merge) wrote `stats`, or
/// alone with the window's log-sum-exp in `lse`.
#[inline(always)]
pub unsafe fn window_scores_body<T: CacheElem + QkTile, const D: usize>(p: &AggregateParams) {
    // Only the row stats come from the launches before (pass 1 or its merge): each row
    // chunk waits for them before it reads them (`wait_for_prior_grid`), so that the first
    // chunk's copies run under the launch before.
    let geom = p.cache.geometry;
    let group = geom.group_size.max(1);
    // SAFETY: the scores grid.
    let Some(ScoreRange {
        head: (seq, kv_head),
        window: (window_len, last, skip),
        head_slot,
        len,
        owned: (owned, owned_end),
    }) = (unsafe { ScoreRange::new(p) })
    else {
        return; // uniform over the CTA
    };
    let kstart = owned.saturating_sub(SCORE_HALO);
    let scores = Scores {
        p,
        // SAFETY: the launch reserved the scores map.
        smem: unsafe { Layout::new::<T, D>(group, true) },
        seq,
        kv_head,
        head_slot,
        window_len,
        last,
        skip,
        group,
        rows: window_len * group,
        keys: (kstart, len.min(owned_end + SCORE_HALO)),
        first_column: kstart + SCORE_HALO - owned,
        // a^2 = 2^(2 (s - max)) / sum^2 (L2), a = 2^(s - max) / sum (L1).
        power: if p.record == record::L2 { 2.0 } else { 1.0 },
    };
    let smem = scores.smem;
    let thread = thread_idx_x();

    let mut item = thread;
    while item < group * SCORE_COLUMNS {
        // SAFETY: inside the columns map.
        unsafe { *smem.columns.add(item as usize) = 0.0 };
        item += THREADS;
    }
    // The pool block ids of the blocks the owned keys lie in, for the metric update at the
    // end: copied now, landed (and visible) after the first query staging's wait and barrier.
    let (first_block, blocks) = geom.block_span(owned, owned_end);
    let table = p.cache.block_tables + geom.block_table_at(head_slot, first_block) * 4;
    let mut b = thread;
    while b < blocks {
        // SAFETY: b < blocks <= OWNED_BLOCKS ids; the blocks of keys owned..owned_end (below
        // len) are in the table.
        unsafe {
            copy_async_word(
                shared_addr(smem.owned_ids.wrapping_add(b as usize)),
                table + b as u64 * 4,
            )
        };
        b += THREADS;
    }
    // SAFETY: closes this thread's group.
    unsafe { commit_async_copies() };

    let chunk_rows = agg_rows(D as u32, T::BYTES);
    let mut row_base = 0;
    while row_base < scores.rows {
        // SAFETY: every thread takes part; the barrier before it ends every read of the
        // previous chunk's shared memory.
        unsafe {
            sync_threads();
            T::score_chunk::<D>(&scores, row_base);
        }
        row_base += chunk_rows;
    }
    // SAFETY: all threads reach it; the columns are complete after it.
    unsafe { sync_threads() };

    let update = OwnedUpdate::<_, OWNED_QUADS> {
        p,
        owned: (owned, owned_end),
        columns: (shared_addr(smem.columns), SCORE_COLUMNS),
        threads: THREADS,
        // SAFETY: owned key k's block is among the ids, landed (after the first chunk's wait
        // and barrier), each a validated pool block; its quad's 4 slots lie in that block,
        // 16-byte aligned (`OwnedUpdate`).
        quad: |k: u32| unsafe {
            let block = *smem
                .owned_ids
                .add((geom.logical_block(owned + k) - first_block) as usize)
                as u32;
            let slot = geom.pool_slot(block, geom.slot_in_block(owned + k));
            (slot, load_chunk(p.cache.metric + slot * 4))
        },
    };
    // SAFETY: every thread, after the barrier that completes the columns.
    unsafe { with_pool_half!(p.pool_half, update.add) }
}

/// Pass 2's metric update of a CTA's owned keys `owned.0..owned.1`, `QUADS` quads of 4
/// consecutive keys a thread at most, consecutive quads on consecutive threads (of
/// `threads`): the quad's pooling windows lie in `SPAN_CHUNKS` aligned 16-byte chunks of a
/// query head's columns, read conflict-free across the warp, and its 4 metrics come in and go
/// out as 16 bytes (a quad lies in one block: it starts at a multiple of 4 from a range
/// start that is one too, and blocks hold a multiple of 4 keys). Every quad's slot and
/// metrics are fetched before any is added, so that global metrics cost one round trip.
pub(crate) struct OwnedUpdate<'a, Q, const QUADS: usize> {
    pub(crate) p: &'a AggregateParams,
    pub(crate) owned: (u32, u32),
    /// Shared address of the first query head's column 0 (16-byte aligned; column
    /// `SCORE_HALO + k` is owned key `k`'s), and the words between heads (a multiple of 4).
    pub(crate) columns: (u32, u32),
    pub(crate) threads: u32,
    /// `quad(k)`, `k` a multiple of 4 below the range's keys: owned key `k`'s pool slot (its
    /// quad's first) and the quad's 4 metrics.
    pub(crate) quad: Q,
}

/// 16-byte chunks of columns from a quad's first key's: its keys and `SCORE_HALO` after.
const SPAN_CHUNKS: usize = (2 * SCORE_HALO as usize + 4) / 4;

impl<Q: Fn(u32) -> (u64, Chunk), const QUADS: usize> OwnedUpdate<'_, Q, QUADS> {
    /// Adds to each owned key's metric the group sum of its max-pooled columns (half width
    /// `H`, so that the windows unroll over registers): key `k` gets, per query head, the
    /// greatest of columns `k + SCORE_HALO - H ..= k + SCORE_HALO + H` (zero past the head
    /// slot's keys: the contract's zero padding); a last partial quad stores word by word.
    ///
    /// # Safety
    /// Threads `0..threads`, after the barrier that completes the columns (a head holds the
    /// owned keys' and `2 SCORE_HALO` more); the range holds at most `QUADS * threads`
    /// quads; `quad` gives validated, 16-byte-aligned slots; `H <= SCORE_HALO`.
    #[inline(always)]
    pub(crate) unsafe fn add<const H: usize>(&self) {
        const HALO: usize = SCORE_HALO as usize;
        // Quad q's windows lie in chunks `first..=last` of its SPAN_CHUNKS from column 4 q.
        let (first, last) = ((HALO - H) / 4, (HALO + 3 + H) / 4);
        let geom = self.p.cache.geometry;
        let (owned, owned_end) = self.owned;
        let keys = owned_end - owned;
        let group = geom.group_size.max(1);
        let (columns, stride) = self.columns;
        let firsts: [u32; QUADS] =
            core::array::from_fn(|i| 4 * (thread_idx_x() + i as u32 * self.threads));
        let quads = firsts.map(|k| {
            if k < keys {
                (self.quad)(k)
            } else {
                (0, [0; 4])
            }
        });
        for (&k, &(slot, metric)) in firsts.iter().zip(&quads) {
            if k >= keys {
                continue;
            }
            let mut total = [0.0f32; 4];
            for g in 0..group {
                let head = columns + (g * stride + k) * 4;
                let chunks: [Chunk; SPAN_CHUNKS] = core::array::from_fn(|c| {
                    if (first..=last).contains(&c) {
                        // SAFETY: inside the head's columns (k + 4 <= the owned keys, so the
                        // span ends 2 SCORE_HALO past them), 16-byte aligned (caller).
                        unsafe { load_shared_chunk(head + 16 * c as u32) }
                    } else {
                        [0; 4]
                    }
                });
                let column = |j: usize| f32::from_bits(chunks[j / 4][j % 4]);
                for (i, sum) in total.iter_mut().enumerate() {
                    let lo = HALO + i - H;
                    let mut pooled = column(lo);
                    for d in 1..2 * H + 1 {
                        pooled = fmax(pooled, column(lo + d));
                    }
                    *sum += pooled;
                }
            }
            let value: Chunk =
                core::array::from_fn(|i| (f32::from_bits(metric[i]) + total[i]).to_bits());
            // SAFETY: the quad's slots (caller), which this thread alone writes, and only
            // those of keys before the range's end.
            unsafe {
                if k + 4 <= keys {
                    store_chunk(self.p.cache.metric + slot * 4, value);
                } else {
                    for (i, &word) in value.iter().enumerate() {
                        if k + (i as u32) < keys {
                            store::<u32>(self.p.cache.metric, slot + i as u64, word);
                        }
                    }
                }
            }
        }
    }
}

/// One row chunk of pass 2 with the rows as the product's rows (`Q K^T`): each warp's column
/// sums of a key tile (its rows' part) meet the other warps' in shared memory (`parts`), summed
/// into the columns in warp order while the next tile is computed.
///
/// # Safety
/// Every thread calls it after a barrier that ended every read of the chunk's shared memory.
#[inline(always)]
unsafe fn rows_major_chunk<T: CacheElem + QkTile, const D: usize>(s: &Scores, row_base: u32) {
    // The stats of the launch before, read below.
    wait_for_prior_grid();
    let (p, smem, group, rows) = (s.p, s.smem, s.group, s.rows);
    let (kstart, kend) = s.keys;
    let row_tiles = agg_row_tiles(D as u32, T::BYTES);
    let tile_keys = smem.tiles.tile_keys;
    let (lane, warp, thread) = (lane_id(), warp_id(), thread_idx_x());
    let (gid, tig) = (lane / 4, lane % 4);
    let l2 = p.record == record::L2;
    let (power, mul) = (s.power, s.power * p.scale_log2);
    // Sums the warps' parts of tile `t` into the columns, in warp order.
    let reduce = |t: u32| {
        let parts = smem
            .parts
            .wrapping_add(((t % 2) * AGG_WARPS * group * tile_keys) as usize);
        let mut item = thread;
        while item < group * tile_keys {
            let (g, key) = (item / tile_keys, item % tile_keys);
            let mut total = 0.0f32;
            for w in 0..AGG_WARPS {
                // SAFETY: inside the parts map.
                total += unsafe { *parts.add(((w * group + g) * tile_keys + key) as usize) };
            }
            // Keys past the range add zero (masked) to columns no pooling reads.
            // SAFETY: the column is inside the map (whole tiles of the range, plan); only this
            // thread touches it between barriers.
            unsafe { *smem.columns.add(s.column(g, t, key)) += total };
            item += THREADS;
        }
    };
    let my_rows = lane_rows::<T>(row_base, row_tiles);
    let mut counted = [[i32::MIN; 2]; 2];
    let mut sub = [[0.0f32; 2]; 2];
    let mut inv = [[0.0f32; 2]; 2];
    // The least and the most position this lane's rows count.
    let mut bounds = (i32::MAX, i32::MIN);
    for (m, half) in my_rows.iter().enumerate() {
        for (i, &row) in half.iter().enumerate() {
            if (m as u32) < row_tiles && row < rows {
                counted[m][i] = s.counted(row);
                bounds = (bounds.0.min(counted[m][i]), bounds.1.max(counted[m][i]));
                // SAFETY: row < rows.
                let (max, inv_sum) = unsafe { row_stats(p, (s.seq, s.kv_head), row) };
                sub[m][i] = power * max;
                inv[m][i] = if l2 { inv_sum * inv_sum } else { inv_sum };
            }
        }
    }
    // SAFETY: all threads take part, after the caller's barrier.
    let warp_rows =
        unsafe { WarpRows::stage::<T, D>(p, &smem, (s.seq, s.kv_head), row_base, rows, bounds.1) };
    let mut tiles = 0;
    let consume = |t, tile, positions| {
        if t > 0 {
            reduce(t - 1);
        }
        tiles = t + 1;
        let mut acc = [[0.0f32; 2]; MAX_TILE_NTILES];
        let sum_group = |grp: usize, c: &Group, pos: &GroupPositions, seen_keys| {
            // `masked` is a constant in each of the two copies below.
            let mut fold = |masked: bool| {
                for m in 0..2 {
                    if m as u32 >= row_tiles {
                        continue;
                    }
                    for nt in 0..GROUP_NTILES {
                        for e in 0..4 {
                            let (i, j) = (e / 2, e % 2);
                            let v = exp2(fma(c[m][nt][e], mul, -sub[m][i]));
                            let acc_e = &mut acc[grp * GROUP_NTILES + nt][j];
                            if !masked || pos[nt][j] <= counted[m][i] {
                                *acc_e = fma(v, inv[m][i], *acc_e);
                            }
                        }
                    }
                }
            };
            if seen_keys == Seen::All {
                fold(false);
            } else {
                fold(true);
            }
        };
        // SAFETY: the tile is staged; the warp is converged.
        unsafe {
            T::each_group::<D>(
                &warp_rows,
                (tile, positions, tile_keys),
                (kstart + t * tile_keys, kend),
                bounds,
                sum_group,
            )
        };
        // A thread's rows belong to query head gid % G: sum over the lanes of that
        // head, then lanes gid < G write their head's part.
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
        if gid < group {
            let parts = smem
                .parts
                .wrapping_add(((((t % 2) * AGG_WARPS + warp) * group + gid) * tile_keys) as usize);
            for nt in 0..(tile_keys / 8) as usize {
                for j in 0..2 {
                    let key = 8 * nt + 2 * tig as usize + j;
                    // SAFETY: inside this warp's part of the parts map.
                    unsafe { *parts.add(key) = acc[nt][j] };
                }
            }
        }
    };
    // SAFETY: all threads take part with the same range; the barrier after it ends every
    // warp's writes of the last tile's parts.
    unsafe {
        KeyStream::start(p, smem.tiles, s.head_slot, (kstart, kend)).walk(consume);
        sync_threads();
    }
    if tiles > 0 {
        reduce(tiles - 1);
    }
}

/// One row chunk of pass 2 with the keys as the product's rows (`K Q^T`; `agg_keys_major`):
/// `wgmma.m64n64k16` with the 64-key tile as A (warp `w` holds keys `16 w + gid` and `+ 8`)
/// and the chunk's 128 query rows as B in two halves of 64, the second half's product running
/// while the first is folded. A lane's query columns `64 h + 8 j + 2 tig + e` belong to query
/// head `(2 tig + e) % G` (G divides 8), so a key's sum per head is the lane's own terms, then
/// at most two shuffles over its quad: whole in the warp, added straight into the columns.
/// Each row's normalisation is folded into the exponent: `a^p = 2^(p s scale_log2 - sub)` with
/// `sub = p (max - log2(1/sum))`, `+inf` for a row that sees nothing or is past the window
/// (a zero term).
///
/// # Safety
/// As [`rows_major_chunk`]; `agg_keys_major` holds for `T` and `D`.
#[cfg(kvc_hopper)]
#[inline(always)]
unsafe fn keys_major_chunk<T: CacheElem + Wgmma16, const D: usize>(s: &Scores, row_base: u32) {
    let (p, smem, group, rows) = (s.p, s.smem, s.group, s.rows);
    let chunk_rows = agg_rows(D as u32, T::BYTES);
    let tile_keys = smem.tiles.tile_keys;
    let (lane, warp, thread) = (lane_id(), warp_id(), thread_idx_x());
    let tig = lane % 4;
    let mul = s.power * p.scale_log2;
    let (least, most) = s.chunk_bounds(row_base, chunk_rows);
    // The chunk rows' counted positions (for the masked folds) and `sub`, one row a thread,
    // in the parts map, read after the next barrier; the stats come from the launch before
    // (pass 1 or its merge), which the first chunk waits for before it reads them.
    let counted = smem.parts as *mut i32;
    let subs = smem.parts.wrapping_add(chunk_rows as usize);
    let write_subs = || {
        if row_base == 0 {
            wait_for_prior_grid();
        }
        if thread < chunk_rows {
            let row = row_base + thread;
            let sub = if row < rows {
                // SAFETY: row < rows; the caller waited for the stats.
                let (max, inv_sum) = unsafe { row_stats(p, (s.seq, s.kv_head), row) };
                s.power * (max - log2(inv_sum))
            } else {
                f32::INFINITY
            };
            // SAFETY: the map holds 2 chunk_rows words (plan).
            unsafe {
                *counted.add(thread as usize) = s.counted(row);
                *subs.add(thread as usize) = sub;
            }
        }
    };
    let stage = || {
        // SAFETY: all threads take part; nothing reads the query rows meanwhile.
        unsafe { WarpRows::stage::<T, D>(p, &smem, (s.seq, s.kv_head), row_base, rows, most) }
    };
    let keys_from = || {
        // SAFETY: all threads take part with the same range, after the caller's barrier; the
        // key tiles lie apart from the query rows (`wgmma`).
        unsafe { KeyStream::start(p, smem.tiles, s.head_slot, s.keys) }
    };
    let (stream, warp_rows) = if row_base == 0 && p.key_splits > 1 {
        // After the merge of pass 1's splits (short and latency-bound), the first chunk
        // copies its first key tiles and its query rows before it waits for the stats: the
        // copies run under the merge. After pass 1 itself (one split: long prompts, full
        // windows) they would compete with its last wave (measured slower).
        let stream = keys_from();
        let warp_rows = stage();
        write_subs();
        // SAFETY: all threads reach it.
        unsafe { sync_threads() };
        (stream, warp_rows)
    } else {
        // After pass 1 itself the wait comes first (the early copies would compete with its
        // last wave); the staging barrier publishes the subs.
        write_subs();
        let warp_rows = stage();
        (keys_from(), warp_rows)
    };
    // `sub` of this lane's query columns `64 h + 8 j + 2 tig + e`, as `[h][j][e]`.
    let sub: [[[f32; 2]; 8]; 2] = core::array::from_fn(|h| {
        core::array::from_fn(|j| {
            // SAFETY: written before a barrier above.
            core::array::from_fn(|e| unsafe { *subs.add(64 * h + 8 * j + 2 * tig as usize + e) })
        })
    });
    let q_base = shared_addr(warp_rows.q_tile);
    let keys = [16 * warp + lane / 4, 16 * warp + lane / 4 + 8];
    let consume = |t: u32, tile: *const u8, positions: *const i32| {
        // SAFETY: the tile's positions are staged.
        let (pos, two) = unsafe {
            (
                keys.map(|k| *positions.add(k as usize)),
                [
                    *positions.add(lane as usize),
                    *positions.add(lane as usize + 32),
                ],
            )
        };
        // Every warp votes on all the tile's positions against the same bound.
        // SAFETY: the warp is converged.
        if unsafe { ballot(two[0] <= most || two[1] <= most) } == 0 {
            return; // uniform over the CTA
        }
        let k_base = shared_addr(tile);
        // Query half `half`'s product into `acc` (a separate variable per half, so that the
        // accumulators stay in registers).
        let start = |acc: &mut [[f32; 16]; 2], half: u32| {
            for panel in 0..(D / 64) as u32 {
                let a = descriptor(k_base + panel * tile_keys * PANEL_ROW_BYTES);
                let b = descriptor(q_base + (panel * chunk_rows + 64 * half) * PANEL_ROW_BYTES);
                // SAFETY: every warp of the CTA is here with the same staged, fenced tiles.
                unsafe {
                    if panel == 0 {
                        T::first_panel_n64(acc, a, b);
                    } else {
                        T::panel_n64(acc, a, b);
                    }
                }
            }
            // SAFETY: as above.
            unsafe { wgmma_commit() };
        };
        let (mut acc0, mut acc1) = ([[0.0f32; 16]; 2], [[0.0f32; 16]; 2]);
        // SAFETY: as above; nothing writes the accumulators before the MMAs.
        unsafe { wgmma_fence() };
        start(&mut acc0, 0);
        start(&mut acc1, 1);
        // Whether the warp's keys are all counted by every row of the chunk: no masks.
        // SAFETY: the warp is converged.
        let all = unsafe { ballot(pos[0] <= least && pos[1] <= least) } == u32::MAX;
        let mut sums = [[0.0f32; 2]; 2];
        // Adds query half `h`'s terms, by key row and column parity; `masked` is a constant in
        // each copy.
        let mut fold = |h: usize, acc: &[[f32; 16]; 2], masked: bool| {
            for (r, sums_r) in sums.iter_mut().enumerate() {
                for (e, sum) in sums_r.iter_mut().enumerate() {
                    let term = |j: usize| {
                        let at = 4 * j + 2 * r + e;
                        let x = exp2(fma(acc[at / 16][at % 16], mul, -sub[h][j][e]));
                        let column = 64 * h + 8 * j + 2 * tig as usize + e;
                        // SAFETY: inside the chunk's counted positions.
                        if masked && pos[r] > unsafe { *counted.add(column) } {
                            0.0
                        } else {
                            x
                        }
                    };
                    *sum += pairwise(term, |a, b| a + b);
                }
            }
        };
        // SAFETY: every warp of the CTA is here.
        unsafe { finish_groups(&mut acc0, true) };
        if all {
            fold(0, &acc0, false);
        } else {
            fold(0, &acc0, true);
        }
        // SAFETY: as above.
        unsafe { finish_groups(&mut acc1, false) };
        if all {
            fold(1, &acc1, false);
        } else {
            fold(1, &acc1, true);
        }
        // SAFETY: the whole warp is here.
        let sharing = unsafe { share_heads(&mut sums, group) };
        if tig < sharing {
            for (r, sums_r) in sums.iter().enumerate() {
                for (e, &sum) in sums_r.iter().enumerate() {
                    if (e as u32) < group.min(2) {
                        let column = s.column(2 * tig + e as u32, t, keys[r]);
                        // SAFETY: inside the columns map (whole tiles of the range, plan);
                        // this lane is the only writer of this key and head.
                        unsafe { *smem.columns.add(column) += sum };
                    }
                }
            }
        }
    };
    // SAFETY: every thread; every warp is done with a tile when `consume` returns.
    unsafe { stream.walk(consume) };
}

/// Completes a keys-major fold's sums over the lanes of a quad that share query heads:
/// `sums[r][e]` of lane `tig` (`lane % 4`) holds query head `(2 tig + e) % G` of its key row
/// `r`. Lanes `tig` and `tig ^ m` share heads for the masks `m` from `G / 2` up to 2; with
/// `G = 1` both parities are head 0. Returns `sharing`: lanes `tig < sharing` then hold the
/// whole sums of heads `2 tig + e`, `e < min(G, 2)`.
///
/// # Safety
/// The whole warp calls it.
#[cfg(kvc_hopper)]
#[inline(always)]
pub(crate) unsafe fn share_heads(sums: &mut [[f32; 2]; 2], group: u32) -> u32 {
    if group == 1 {
        for sums_r in sums.iter_mut() {
            sums_r[0] += sums_r[1];
        }
    }
    let sharing = (group / 2).max(1);
    let mut mask = sharing;
    while mask < 4 {
        for sums_r in sums.iter_mut() {
            for v in sums_r.iter_mut() {
                // SAFETY: the whole warp runs these shuffles (caller).
                *v += unsafe { shfl_xor(*v, mask) };
            }
        }
        mask *= 2;
    }
    sharing
}

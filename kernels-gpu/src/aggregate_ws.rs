//! Pass 1 of the window aggregation (SPEC §4), warp-specialized: the Hopper module's 16-bit
//! types at `D = 128` (`agg_ws_stats`; docs/PERF.md, "v6 probe" and "Plan for v6"). The
//! contract is `aggregate::window_stats_body`'s: grid `(row_chunk * key_splits + split,
//! kv_head, seq)`, one chunk of `WS_ROWS` window rows against one split of the head slot's keys,
//! each row's (max, sum) of its visible scores in the log2 domain written as stats or partials.
//!
//! A CTA is three warpgroups. Warp 8 (the producer's first warp) brings the split's key tiles
//! of `WS_TILE_KEYS` keys into a ring of `WS_STAGES` tiles: its lane `b` issues the TMA boxes
//! of block `b` of a tile (two 64-dim panels through the tensor map `p.k_map`, landing in the
//! swizzled layout `wgmma` reads) and a bulk copy of the block's positions, all completing on
//! the stage's `full` mbarrier; the lane loads its block id one tile ahead. Warpgroups 0 and 1
//! (the consumers) own rows `64 c..` of the chunk: each tile's product (`m64n128k16`, query
//! rows as A, keys as B) is waited for and folded, and a warp arrives on the stage's `empty`
//! mbarrier when done with it; a tile whose keys no row of the warpgroup sees is skipped. No
//! CTA barrier is met per tile. (Products started under the previous tile's fold gained nothing
//! in the probe: docs/PERF.md, "v6 probe".)
//! `setmaxnreg` moves the producer's registers to the consumers (the entries' `.maxntid 384`
//! comes from build.rs).
//!
//! Pass 2 (`window_scores_ws_body`, `agg_ws_scores`: the window's rows are one chunk) has the
//! same CTA and producer, and `aggregate::window_scores_body`'s contract: grid `(key_range,
//! kv_head, seq)`, a range of `score_kvs` owned keys walked with `SCORE_HALO` keys on each side
//! (from the block holding the first of the halo before, since the producer brings whole
//! blocks). Consumer `c` multiplies keys `64 c..` of each tile by all the rows (`m64n128k16`,
//! keys as A: `aggregate::keys_major_chunk`'s order), so a key's sums per query head are whole
//! in one quad and are stored straight into the column sums. Tile `t + 1`'s product runs while
//! tile `t` is folded (two accumulator sets: 1.4 us of ~38 on an H100), so every tile is
//! multiplied. Warps 9-11 (`stage_owned`) copy the owned keys' block ids and metrics into
//! shared memory while the consumers walk, so that at the end the consumers add to each owned
//! key's metric the group sum of its max-pooled columns from shared memory alone, 4
//! consecutive keys a thread, consecutive quads on consecutive threads (16-byte conflict-free
//! column reads, 16-byte metric stores): ~1.4 us after the walk where global loads and runs of
//! 8 keys a thread took ~5 (docs/PERF.md, "v9").

use kvc_abi::geometry::Geometry;
use kvc_abi::params::{record, AggregateParams};
use kvc_abi::plan::{
    ws_smem, WsSmem, PANEL_ROW_BYTES, SCORE_HALO, WS_ROWS, WS_SCORE_COLUMNS, WS_SCORE_KEYS,
    WS_STAGES, WS_TILE_BYTES, WS_TILE_KEYS,
};

use crate::aggregate::{
    pairwise, row_position, row_stats, share_heads, stage_queries, with_pool_half, OwnedUpdate,
    RowLayout, ScoreRange, StatsCta,
};
use crate::gpu::math::{exp2, fma, fmax, log2, CacheElem};
use crate::gpu::mem::load;
use crate::gpu::mma::{copy_async_chunk, load_shared_chunk, shared_addr, wait_async_copies};
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::{allow_dependent_grid, wait_for_prior_grid};
use crate::gpu::thread::{lane_id, sync_threads, thread_idx_x, warp_id};
use crate::gpu::tma::{
    acquire_tensor_map, arrive, arrive_expect_bytes, copy_bulk, copy_tile, init_barrier,
    named_arrive, named_sync, registers_to_consumer, registers_to_producer, sync_consumers,
    wait_barrier,
};
use crate::gpu::warp::{ballot, max_i32, sync_warp};
use crate::gpu::wgmma::{commit, descriptor, fence, wait_all, Wgmma16};

/// Consumer threads: warpgroups 0 and 1.
const CONSUMERS: u32 = 256;
/// Consumer warps, the arrivals a stage's `empty` barrier waits for.
const CONSUMER_WARPS: u32 = 8;
/// Warps 9-11, which stage pass 2's owned metrics (`stage_owned`).
const STAGER_WARPS: u32 = 3;
/// Quads of owned keys a pass-2 consumer thread updates, at most (`OwnedUpdate`).
const OWNED_QUADS: usize = WS_SCORE_KEYS.div_ceil(4 * CONSUMERS) as usize;
/// Pass 2's named barriers (0 is the CTA's, 1 the consumers'): the stagers wait at
/// `PROLOGUE` until the consumers have staged their rows, and the consumers wait at `STAGED`
/// until the stagers' copies have landed.
const PROLOGUE: u32 = 2;
const STAGED: u32 = 3;
/// The threads of those barriers: the consumers and the stagers.
const STAGED_THREADS: u32 = CONSUMERS + 32 * STAGER_WARPS;
/// Bytes of one 64-dim panel of a key tile, and of the query rows.
const PANEL_TILE: u32 = WS_TILE_KEYS * PANEL_ROW_BYTES;
const PANEL_Q: u32 = WS_ROWS * PANEL_ROW_BYTES;
/// Bytes a stage's `full` barrier waits for: the tile's rows and its keys' positions.
const STAGE_BYTES: u32 = WS_TILE_BYTES + WS_TILE_KEYS * 4;

/// Half a tile's product for one consumer: 64 rows by 64 keys (`m64n64k16` accumulators).
type Half = [[f32; 16]; 2];

/// The key ring in shared memory.
struct Ring {
    k_tiles: u32,
    positions: u32,
    positions_ptr: *const i32,
    barriers: u32,
}

impl Ring {
    /// The ring of the shared-memory map `map` from its 1024-byte-aligned base `base_ptr`.
    fn new(map: &WsSmem, base_ptr: *mut u8) -> Self {
        let base = shared_addr(base_ptr);
        Self {
            k_tiles: base + map.k_tiles,
            positions: base + map.positions,
            positions_ptr: base_ptr.wrapping_add(map.positions as usize) as *const i32,
            barriers: base + map.barriers,
        }
    }

    /// Thread 0 initialises the barriers; every thread of the CTA then meets.
    ///
    /// # Safety
    /// Every thread of the CTA calls it once, before any use of the ring.
    unsafe fn init(&self) {
        if thread_idx_x() == 0 {
            for stage in 0..WS_STAGES {
                // SAFETY: the ring's barriers, initialised before the CTA barrier below.
                unsafe {
                    init_barrier(self.full(stage), 1);
                    init_barrier(self.empty(stage), CONSUMER_WARPS);
                }
            }
        }
        // SAFETY: every thread reaches it (caller).
        unsafe { sync_threads() };
    }

    fn full(&self, stage: u32) -> u32 {
        self.barriers + 8 * stage
    }

    fn empty(&self, stage: u32) -> u32 {
        self.barriers + 8 * (WS_STAGES + stage)
    }

    /// Shared address of tile `t`'s stage.
    fn tile(&self, t: u32) -> u32 {
        self.k_tiles + (t % WS_STAGES) * WS_TILE_BYTES
    }

    /// Position of key `key` (of `WS_TILE_KEYS`) of tile `t`.
    ///
    /// # Safety
    /// Tile `t` has landed and its stage is not released.
    unsafe fn position(&self, t: u32, key: u32) -> i32 {
        // SAFETY: inside the stage's positions; landed (caller).
        unsafe {
            *self
                .positions_ptr
                .add(((t % WS_STAGES) * WS_TILE_KEYS + key) as usize)
        }
    }

    /// Waits until tile `t` has landed.
    ///
    /// # Safety
    /// The producer brings tile `t`.
    unsafe fn land(&self, t: u32) {
        // SAFETY: the stage's barrier completes its phase `t / WS_STAGES` when tile t lands.
        unsafe { wait_barrier(self.full(t % WS_STAGES), (t / WS_STAGES) & 1) };
    }

    /// This warp is done with tile `t`: its stage may be refilled once all consumer warps are.
    ///
    /// # Safety
    /// Each consumer warp calls it once per tile, converged, after its last read of the tile.
    unsafe fn done(&self, t: u32) {
        if lane_id() == 0 {
            // SAFETY: one of the CONSUMER_WARPS arrivals of this phase.
            unsafe { arrive(self.empty(t % WS_STAGES)) };
        }
    }
}

/// Pass 1 body, warp-specialized (module header), for 16-bit cache type `T` at `D = 128`.
///
/// # Safety
/// Launched with `plan_aggregate`'s stats dims (`WS_THREADS` threads, `ws_smem` bytes) and
/// host-validated params whose `k_map` is the tensor map over the K pool (boxes of 64 elements
/// by `B` rows, 128-byte swizzle).
#[inline(always)]
pub unsafe fn window_stats_ws_body<T: CacheElem + Wgmma16>(p: &AggregateParams) {
    allow_dependent_grid();
    let geom = p.cache.geometry;
    // SAFETY: forwarded from the caller.
    let Some(cta) = (unsafe { StatsCta::new(p, WS_ROWS) }) else {
        return; // uniform over the CTA, before any barrier
    };
    let ((seq, kv_head), (window_len, last)) = ((cta.seq, cta.kv_head), (cta.window_len, cta.last));
    let (rows, row_base, head_slot, (key_lo, key_hi)) =
        (cta.rows, cta.row_base, cta.head_slot, cta.keys);
    let ntiles = (key_hi - key_lo).div_ceil(WS_TILE_KEYS);

    let map = ws_smem(false);
    let base_ptr = aligned_base();
    let base = shared_addr(base_ptr);
    let ring = Ring::new(&map, base_ptr);
    // SAFETY: every thread, once.
    unsafe { ring.init() };
    // SAFETY: every thread, after the set-up.
    if !unsafe { consumes(p, &ring, head_slot, (key_lo, key_hi), ntiles) } {
        return;
    }
    let q_tile = base + map.q_tile;
    // SAFETY: the consumers only, from here on; then every consumer meets.
    unsafe {
        let q_tile = base_ptr.wrapping_add(map.q_tile as usize);
        stage_ws_queries::<T>(p, q_tile, (seq, kv_head), row_base, rows);
        sync_consumers();
    }

    let (consumer, warp, lane) = (thread_idx_x() / 128, warp_id() % 4, lane_id());
    let my_rows = [0, 8].map(|d| row_base + 64 * consumer + 16 * warp + lane / 4 + d);
    let seen = my_rows.map(|r| row_position(r, rows, &geom, window_len, last));
    // The least position any of the warp's rows sees (rows past the window see nothing).
    let mine = my_rows
        .iter()
        .zip(seen)
        .map(|(&r, s)| if r < rows { s } else { i32::MAX })
        .fold(i32::MAX, i32::min);
    // SAFETY: the warp is converged.
    let least = unsafe { -max_i32(-mine) };
    let mut stats = [(f32::NEG_INFINITY, 0.0f32); 2];

    let c = Consumer {
        p,
        ring: &ring,
        q_tile,
        consumer,
        lane,
        keys: (key_lo, key_hi),
        least,
        seen,
    };
    // The most position any row of this consumer's warpgroup sees (row positions grow with
    // the row): a tile whose keys all lie beyond it is neither multiplied nor folded, the same
    // choice in every warp of the warpgroup.
    let group_rows = row_base + 64 * consumer;
    let group_most = if group_rows < rows {
        row_position(
            (group_rows + 63).min(rows - 1),
            rows,
            &geom,
            window_len,
            last,
        )
    } else {
        i32::MIN
    };
    let (mut h0, mut h1) = ([[0.0f32; 16]; 2], [[0.0f32; 16]; 2]);
    for t in 0..ntiles {
        // SAFETY: the producer brings every tile in order; the warpgroup takes the same branch
        // (the tile's positions and its rows are the same for its four warps); each warp
        // releases the tile after its last read.
        unsafe {
            ring.land(t);
            let (least_key, most_key) = c.tile_positions(t);
            if least_key <= group_most {
                c.issue::<T>((&mut h0, &mut h1), t);
                wait((&mut h0, &mut h1));
                c.fold(&mut stats, (&h0, &h1), t, most_key);
            }
            ring.done(t);
        }
    }
    for (i, &row) in my_rows.iter().enumerate() {
        // SAFETY: the whole warp; the workspace holds every row (plan).
        unsafe { cta.write_row(p, row, stats[i], row < rows) };
    }
}

/// Stages the query rows `row_base..row_base + WS_ROWS` of `(seq, kv_head)` (zero past `rows`)
/// into the query tile at `q_tile`, in the swizzled panels `wgmma` reads, fenced for it.
///
/// # Safety
/// The consumers together, and nothing else touches the query tile meanwhile; they meet at
/// a barrier before the rows are read.
#[inline(always)]
unsafe fn stage_ws_queries<T: CacheElem>(
    p: &AggregateParams,
    q_tile: *mut u8,
    (seq, kv_head): (u32, u32),
    row_base: u32,
    rows: u32,
) {
    let layout = RowLayout {
        stride: PANEL_ROW_BYTES,
        data: 128 * 2,
        rows: WS_ROWS,
        swizzled: true,
    };
    // SAFETY: the query tile holds WS_ROWS rows (both maps); forwarded from the caller.
    unsafe {
        stage_queries::<T>(
            p,
            q_tile,
            layout,
            (seq, kv_head),
            (row_base, WS_ROWS),
            rows,
            CONSUMERS,
        )
    };
}

/// Splits the CTA after the ring's set-up: the producer warpgroup gives its registers to the
/// consumers and its first warp brings the `ntiles` tiles of `keys` (`produce`), then `false`;
/// the consumers take the registers, then `true`.
///
/// # Safety
/// Every thread of the CTA calls it once, after [`Ring::init`], as `produce`'s caller must.
#[inline(always)]
unsafe fn consumes(
    p: &AggregateParams,
    ring: &Ring,
    head_slot: u64,
    keys: (u32, u32),
    ntiles: u32,
) -> bool {
    if warp_id() >= CONSUMERS / 32 {
        // SAFETY: the whole producer warpgroup; warp 8 then produces.
        unsafe {
            registers_to_producer();
            if warp_id() == CONSUMERS / 32 {
                produce(p, ring, head_slot, keys, ntiles);
            }
        }
        return false;
    }
    // SAFETY: both consumer warpgroups.
    unsafe { registers_to_consumer() };
    true
}

/// Warps 9-11 of pass 2 (idle otherwise): the pool block ids of the CTA's owned keys' blocks
/// into `WsSmem::ids`, and each block's metrics into `WsSmem::metrics` (block `b`'s at `b *
/// B`), by `cp.async` while the consumers walk; then they arrive at the barrier the consumers
/// meet before the metric update (`STAGED`), so that the update reads no
/// global memory before its stores. The metrics are read after the launch before has
/// completed (it, or one before it, may have written them). Where the blocks are comes
/// through `WsSmem::owned` (thread 0 writes it before the CTA's first barrier): a value
/// carried in registers from before the split into these warps' 24 made ptxas spill it for
/// the whole kernel.
///
/// # Safety
/// Called once by every thread of warps 9-11 of a pass-2 CTA (`ws_smem(true)`), after the
/// CTA barrier that follows [`keep_owned`].
#[inline(always)]
unsafe fn stage_owned(p: &AggregateParams) {
    let map = ws_smem(true);
    let base_ptr = aligned_base();
    let ids = base_ptr.wrapping_add(map.ids as usize) as *mut i32;
    let metrics = base_ptr.wrapping_add(map.metrics as usize) as *mut f32;
    // SAFETY: written by `keep_owned` before the CTA barrier (caller).
    let (first, blocks) = unsafe {
        let owned = base_ptr.wrapping_add(map.owned as usize);
        (
            *(owned as *const u64),
            *(owned.wrapping_add(8) as *const u32),
        )
    };
    let geom = p.cache.geometry;
    let block_keys = geom.block_size.max(1);
    let stager = thread_idx_x() - (CONSUMERS + 32);
    // SAFETY: the consumers arrive once, after their prologue.
    unsafe { named_sync::<PROLOGUE, STAGED_THREADS>() };
    wait_for_prior_grid();
    let mut b = stager;
    while b < blocks {
        // SAFETY: an owned key's block, in the head slot's table.
        let id = unsafe { load::<i32>(p.cache.block_tables, first + b as u64) };
        let src = p.cache.metric + geom.pool_slot(id as u32, 0) * 4;
        // SAFETY: b < WS_OWNED_BLOCKS ids and `b * B + B <= WS_SCORE_KEYS` metrics (the range
        // starts at a block); a block's metrics are `B * 4` bytes from a 16-byte-aligned slot
        // (B >= 8), which no thread writes during the kernel but the metric update, after
        // the barrier these copies are waited for before.
        unsafe {
            *ids.add(b as usize) = id;
            let dst = shared_addr(metrics.wrapping_add((b * block_keys) as usize) as *mut u8);
            let mut chunk = 0;
            while chunk < block_keys * 4 {
                copy_async_chunk(dst + chunk, Some(src), chunk as u64);
                chunk += 16;
            }
        }
        b += 32 * STAGER_WARPS;
    }
    // SAFETY: this thread's copies; the consumers sync at the barrier once.
    unsafe {
        wait_async_copies();
        named_arrive::<STAGED, STAGED_THREADS>();
    }
}

/// Thread 0 of a pass-2 CTA keeps where its owned keys' blocks are for [`stage_owned`]: the
/// block-table word of the first, and how many (the range starts at a block).
///
/// # Safety
/// Thread 0 alone, before the CTA barrier of [`Ring::init`]; `ws_smem(true)`'s map.
#[inline(always)]
unsafe fn keep_owned(geom: &Geometry, head_slot: u64, (owned, owned_end): (u32, u32)) {
    let map = ws_smem(true);
    let at = aligned_base().wrapping_add(map.owned as usize);
    let (first, blocks) = geom.block_span(owned, owned_end);
    // SAFETY: the 16 bytes of `WsSmem::owned` (caller).
    unsafe {
        *(at as *mut u64) = geom.block_table_at(head_slot, first);
        *(at.wrapping_add(8) as *mut u32) = blocks;
    }
}

/// The dynamic shared memory's base aligned up to 1024 bytes (the maps' slack allows it).
fn aligned_base() -> *mut u8 {
    let raw = dynamic_f32() as *mut u8;
    raw.wrapping_add((shared_addr(raw).wrapping_neg() % 1024) as usize)
}

/// Waits for a tile's product (both halves).
///
/// # Safety
/// The warpgroup together, after the product's commit.
#[inline(always)]
unsafe fn wait((h0, h1): (&mut Half, &mut Half)) {
    // SAFETY: forwarded; the second wait only hands back the second half.
    unsafe {
        wait_all(h0);
        wait_all(h1);
    }
}

/// What a consumer warp needs per tile.
struct Consumer<'a> {
    p: &'a AggregateParams,
    ring: &'a Ring,
    q_tile: u32,
    consumer: u32,
    lane: u32,
    /// The split's key range.
    keys: (u32, u32),
    /// The least position any of the warp's rows sees.
    least: i32,
    /// The positions this lane's two rows see.
    seen: [i32; 2],
}

impl Consumer<'_> {
    /// Starts tile `t`'s product (`m64n128k16`): keys `64 h..` of the tile into half `h`.
    ///
    /// # Safety
    /// The warpgroup together; the tile landed; the query rows are staged and fenced; nothing
    /// touches the accumulators until [`wait`].
    #[inline(always)]
    unsafe fn issue<T: Wgmma16>(&self, (h0, h1): (&mut Half, &mut Half), t: u32) {
        let q = |panel: u32| {
            descriptor(self.q_tile + panel * PANEL_Q + self.consumer * 64 * PANEL_ROW_BYTES)
        };
        let tile = self.ring.tile(t);
        let k = |panel: u32| descriptor(tile + panel * PANEL_TILE);
        // SAFETY: forwarded from the caller.
        unsafe {
            fence();
            T::first_panel_n128(h0, h1, q(0), k(0));
            T::panel_n128(h0, h1, q(1), k(1));
            commit();
        }
    }

    /// The least and the most position of tile `t`'s keys (those past the range included).
    ///
    /// # Safety
    /// The warp is converged; tile `t` landed and this warp has not released it.
    #[inline(always)]
    unsafe fn tile_positions(&self, t: u32) -> (i32, i32) {
        let (mut least, mut most) = (i32::MAX, i32::MIN);
        for k in 0..WS_TILE_KEYS / 32 {
            // SAFETY: a key of the tile, which is held (caller).
            let position = unsafe { self.ring.position(t, self.lane * (WS_TILE_KEYS / 32) + k) };
            least = least.min(position);
            most = most.max(position);
        }
        // SAFETY: the warp is converged.
        unsafe { (-max_i32(-least), max_i32(most)) }
    }

    /// Folds tile `t`'s scores into the two rows' (max, sum), `most_key` the most position of
    /// its keys. Register `r` of half `h` holds row `lane / 4 + 8 (r % 4 / 2)` and key `64 h +
    /// 8 (r / 4) + 2 (lane % 4) + r % 2` (`gpu::wgmma`).
    ///
    /// # Safety
    /// The warp is converged; tile `t` landed and this warp has not released it.
    #[inline(always)]
    unsafe fn fold(
        &self,
        stats: &mut [(f32, f32); 2],
        (h0, h1): (&Half, &Half),
        t: u32,
        most_key: i32,
    ) {
        let (p, lane) = (self.p, self.lane);
        let (key_lo, key_hi) = self.keys;
        let key0 = key_lo + t * WS_TILE_KEYS;
        let value = |h: usize, r: usize| {
            if h == 0 {
                h0[r / 16][r % 16]
            } else {
                h1[r / 16][r % 16]
            }
        };
        let local = |h: usize, r: usize| {
            64 * h as u32 + 8 * (r / 4) as u32 + 2 * (lane % 4) + (r % 2) as u32
        };
        let visible =
            key0 + WS_TILE_KEYS <= key_hi && most_key <= self.least && p.scale_log2 >= 0.0;
        for i in 0..2 {
            let (max, sum) = stats[i];
            // The row's 32 terms `(h, r)`: r = 4 j + 2 i + e.
            let term = |k: usize| (k / 16, 4 * (k % 16 / 2) + 2 * i + k % 2);
            if visible {
                // Every score visible, the scale not negative: the max of the scaled scores is
                // the scaled max of the raw ones, each exponent one FMA; four chains each.
                let mut m4 = [f32::NEG_INFINITY; 4];
                for k in 0..32 {
                    let (h, r) = term(k);
                    m4[k % 4] = fmax(m4[k % 4], value(h, r));
                }
                let raw_max = fmax(fmax(m4[0], m4[1]), fmax(m4[2], m4[3]));
                let new_max = fmax(max, p.scale_log2 * raw_max);
                let mut s4 = [0.0f32; 4];
                for k in 0..32 {
                    let (h, r) = term(k);
                    s4[k % 4] += exp2(fma(value(h, r), p.scale_log2, -new_max));
                }
                let total = fma(sum, exp2(max - new_max), (s4[0] + s4[1]) + (s4[2] + s4[3]));
                stats[i] = (new_max, total);
            } else {
                let mut x = [0.0f32; 32];
                let mut tile_max = f32::NEG_INFINITY;
                for k in 0..32 {
                    let (h, r) = term(k);
                    let key = local(h, r);
                    // SAFETY: key < WS_TILE_KEYS; the tile is held (caller).
                    let position = unsafe { self.ring.position(t, key) };
                    x[k] = if key0 + key < key_hi && position <= self.seen[i] {
                        value(h, r) * p.scale_log2
                    } else {
                        f32::NEG_INFINITY
                    };
                    tile_max = fmax(tile_max, x[k]);
                }
                let new_max = fmax(max, tile_max);
                let base = if new_max == f32::NEG_INFINITY {
                    0.0
                } else {
                    new_max
                };
                let mut total = sum * exp2(max - base);
                for k in 0..32 {
                    total += exp2(x[k] - base);
                }
                stats[i] = (new_max, total);
            }
        }
    }
}

/// Warp 8: the split's tiles in order into the ring (module header).
///
/// # Safety
/// Called by warp 8 alone; the head slot's first `key_hi` keys are in validated pool blocks;
/// `p.k_map` is the tensor map of the module header.
#[inline(always)]
unsafe fn produce(
    p: &AggregateParams,
    ring: &Ring,
    head_slot: u64,
    (key_lo, key_hi): (u32, u32),
    ntiles: u32,
) {
    if ntiles == 0 {
        return;
    }
    let geom = p.cache.geometry;
    let lane = lane_id();
    let block_keys = geom.block_size.max(1);
    let blocks = WS_TILE_KEYS / block_keys;
    let table = p.cache.block_tables + geom.block_table_at(head_slot, 0) * 4;
    let (first, last) = (key_lo / block_keys, (key_hi - 1) / block_keys);
    // Block `lane` of tile t (past the range: the range's last block again, whose keys the
    // consumers mask by index).
    // SAFETY: the logical block is within the head slot's table (at most its last live block).
    let id_of =
        |t: u32| unsafe { load::<i32>(table, (first + t * blocks + lane).min(last) as u64) };
    // SAFETY: the map was written by the host before the launch.
    unsafe { acquire_tensor_map(p.k_map) };
    let mut id = if lane < blocks { id_of(0) } else { 0 };
    for t in 0..ntiles {
        let next = if lane < blocks && t + 1 < ntiles {
            id_of(t + 1)
        } else {
            0
        };
        let stage = t % WS_STAGES;
        // SAFETY: the stage's barriers; its previous tile was released by every consumer warp
        // when `empty` completes that phase.
        unsafe {
            if t >= WS_STAGES {
                wait_barrier(ring.empty(stage), (t / WS_STAGES - 1) & 1);
            }
            if lane == 0 {
                arrive_expect_bytes(ring.full(stage), STAGE_BYTES);
            }
            sync_warp();
            if lane < blocks {
                let slot = id as u32 * block_keys;
                let rows = ring.tile(t) + lane * block_keys * PANEL_ROW_BYTES;
                copy_tile(rows, p.k_map, (0, slot), ring.full(stage));
                copy_tile(rows + PANEL_TILE, p.k_map, (64, slot), ring.full(stage));
                copy_bulk(
                    ring.positions + (stage * WS_TILE_KEYS + lane * block_keys) * 4,
                    p.cache.position + slot as u64 * 4,
                    block_keys * 4,
                    ring.full(stage),
                );
            }
        }
        id = next;
    }
}

/// Pass 2 body, warp-specialized (module header), for 16-bit cache type `T` at `D = 128`.
///
/// # Safety
/// Launched with `plan_aggregate`'s scores dims (`WS_THREADS` threads, `ws_smem(true)` bytes)
/// where `agg_ws_scores` holds, after pass 1 (and its merge) wrote `stats` or alone with `lse`;
/// host-validated params whose `k_map` is the tensor map of the module header.
#[inline(always)]
pub unsafe fn window_scores_ws_body<T: CacheElem + Wgmma16>(p: &AggregateParams) {
    let geom = p.cache.geometry;
    let group = geom.group_size.max(1);
    // SAFETY: the scores grid.
    let Some(range) = (unsafe { ScoreRange::new(p) }) else {
        return; // uniform over the CTA, before any barrier
    };
    let ((seq, kv_head), (window_len, last, skip)) = (range.head, range.window);
    let (head_slot, len, (owned, owned_end)) = (range.head_slot, range.len, range.owned);
    // The walk: whole blocks from the one holding the first key of the halo before.
    let block_keys = geom.block_size.max(1);
    let walk = (
        owned.saturating_sub(SCORE_HALO) / block_keys * block_keys,
        len.min(owned_end + SCORE_HALO),
    );
    let ntiles = (walk.1 - walk.0).div_ceil(WS_TILE_KEYS);

    let map = ws_smem(true);
    let base_ptr = aligned_base();
    let ring = Ring::new(&map, base_ptr);
    if thread_idx_x() == 0 {
        // SAFETY: thread 0, before the barrier of the ring's set-up.
        unsafe { keep_owned(&geom, head_slot, (owned, owned_end)) };
    }
    // SAFETY: every thread, once.
    unsafe { ring.init() };
    // SAFETY: every thread, after the set-up.
    if !unsafe { consumes(p, &ring, head_slot, walk, ntiles) } {
        if warp_id() > CONSUMERS / 32 {
            // SAFETY: warps 9-11, once.
            unsafe { stage_owned(p) };
        }
        return;
    }
    let thread = thread_idx_x();
    let rows = window_len * group;
    let columns = base_ptr.wrapping_add(map.columns as usize) as *mut f32;
    let counted = base_ptr.wrapping_add(map.rows as usize) as *mut i32;
    let subs = counted.wrapping_add(WS_ROWS as usize) as *mut f32;
    // SAFETY: the consumers only, from here on (`rows <= WS_ROWS`: agg_ws_scores); they meet
    // below before the rows are read.
    unsafe {
        let q_tile = base_ptr.wrapping_add(map.q_tile as usize);
        stage_ws_queries::<T>(p, q_tile, (seq, kv_head), 0, rows)
    };
    let mut item = thread;
    while item < group * WS_SCORE_COLUMNS {
        // SAFETY: inside the column sums (group <= WS_MAX_GROUP: agg_ws_scores).
        unsafe { *columns.add(item as usize) = 0.0 };
        item += CONSUMERS;
    }
    // a^2 = 2^(2 (s - max)) / sum^2 (L2), a = 2^(s - max) / sum (L1): row `r`'s term is
    // `2^(power scale_log2 s - sub[r])`. The stats come from the launch before (pass 1 or its
    // merge); rows past the window count nothing and add zero.
    let power = if p.record == record::L2 { 2.0 } else { 1.0 };
    wait_for_prior_grid();
    if thread < WS_ROWS {
        let row = thread;
        let (position, sub) = if row < rows {
            // SAFETY: a row of the window, whose stats the launch before wrote (or `lse`).
            let (max, inv_sum) = unsafe { row_stats(p, (seq, kv_head), row) };
            (
                row_position(row, rows, &geom, window_len, last).saturating_sub(skip),
                power * (max - log2(inv_sum)),
            )
        } else {
            (i32::MIN, f32::INFINITY)
        };
        // SAFETY: inside the rows map.
        unsafe {
            *counted.add(row as usize) = position;
            *subs.add(row as usize) = sub;
        }
    }
    // SAFETY: both consumer warpgroups; then the stagers may start (`stage_owned`).
    unsafe {
        sync_consumers();
        named_arrive::<PROLOGUE, STAGED_THREADS>();
    }

    let (consumer, warp, lane) = (thread / 128, warp_id() % 4, lane_id());
    let tig = lane % 4;
    let c = ScoreConsumer {
        p,
        ring: &ring,
        q_tile: shared_addr(base_ptr) + map.q_tile,
        consumer,
        keys: [16 * warp + lane / 4, 16 * warp + lane / 4 + 8],
        walk,
        owned,
        columns,
        counted,
        // SAFETY: written before the barrier above; a row's counted position grows with it.
        least: unsafe { *counted },
        mul: power * p.scale_log2,
        // `sub` of this lane's query columns `64 h + 8 j + 2 tig + e`, as `[h][j][e]`.
        sub: core::array::from_fn(|h| {
            core::array::from_fn(|j| {
                // SAFETY: written before the barrier above.
                core::array::from_fn(|e| unsafe {
                    *subs.add(64 * h + 8 * j + 2 * tig as usize + e)
                })
            })
        }),
    };
    // Two accumulator sets: tile t + 1's product runs while tile t is folded. Every tile is
    // multiplied (a window at the end of its prompt counts nearly every key), and no issue
    // depends on a tile's data (with one that did, ptxas serialised the products: C7518):
    // after the pairs, a last product is issued again on the last tile when there is no next
    // one, and dropped.
    let (mut a0, mut a1) = ([[0.0f32; 16]; 2], [[0.0f32; 16]; 2]);
    let (mut b0, mut b1) = ([[0.0f32; 16]; 2], [[0.0f32; 16]; 2]);
    // SAFETY: the producer brings every tile in order; a product is waited for before its
    // fold, and each warp releases a tile after its fold and after every product on it.
    unsafe {
        if ntiles > 0 {
            ring.land(0);
            c.start::<T>((&mut a0, &mut a1), 0);
            wait((&mut a0, &mut a1));
            let mut t = 0;
            while t + 2 < ntiles {
                ring.land(t + 1);
                c.start::<T>((&mut b0, &mut b1), t + 1);
                c.scores((&a0, &a1), t);
                ring.done(t);
                wait((&mut b0, &mut b1));
                ring.land(t + 2);
                c.start::<T>((&mut a0, &mut a1), t + 2);
                c.scores((&b0, &b1), t + 1);
                ring.done(t + 1);
                wait((&mut a0, &mut a1));
                t += 2;
            }
            let last = (t + 1).min(ntiles - 1);
            if last > t {
                ring.land(last);
            }
            c.start::<T>((&mut b0, &mut b1), last);
            c.scores((&a0, &a1), t);
            wait((&mut b0, &mut b1));
            ring.done(t);
            if last > t {
                c.scores((&b0, &b1), last);
                ring.done(last);
            }
        }
    }
    // SAFETY: both consumer warpgroups, and warps 9-11 arrive; the column sums, and the
    // owned keys' block ids and metrics (`stage_owned`), are complete after it.
    unsafe { named_sync::<STAGED, STAGED_THREADS>() };
    let (ids, metrics) = (
        base_ptr.wrapping_add(map.ids as usize) as *const i32,
        shared_addr(base_ptr) + map.metrics,
    );
    let update = OwnedUpdate::<_, OWNED_QUADS> {
        p,
        owned: (owned, owned_end),
        columns: (shared_addr(base_ptr) + map.columns, WS_SCORE_COLUMNS),
        threads: CONSUMERS,
        // SAFETY: k < score_kvs: inside the staged ids and metrics (16-byte aligned); the id
        // is a validated pool block, whose slots hold the quad (`OwnedUpdate`).
        quad: |k: u32| unsafe {
            let block = *ids.add((k / block_keys) as usize) as u32;
            (
                geom.pool_slot(block, geom.slot_in_block(owned + k)),
                load_shared_chunk(metrics + 4 * k),
            )
        },
    };
    // SAFETY: the consumers, after the barrier that completes the column sums, ids and
    // metrics; at most OWNED_QUADS quads a thread (score_kvs <= WS_SCORE_KEYS).
    unsafe { with_pool_half!(p.pool_half, update.add) }
}

/// What a pass-2 consumer warp needs per tile.
struct ScoreConsumer<'a> {
    p: &'a AggregateParams,
    ring: &'a Ring,
    q_tile: u32,
    consumer: u32,
    /// This lane's two keys among the consumer's 64 of a tile (its rows of the product).
    keys: [u32; 2],
    /// The walk's keys.
    walk: (u32, u32),
    /// The first owned key: key `k` sums into column `k + SCORE_HALO - owned`.
    owned: u32,
    columns: *mut f32,
    /// Each row's counted position.
    counted: *const i32,
    /// The least position a row counts (the first row's).
    least: i32,
    /// `power * scale_log2`.
    mul: f32,
    sub: [[[f32; 2]; 8]; 2],
}

impl ScoreConsumer<'_> {
    /// Starts tile `t`'s product, the consumer's 64 keys by all the rows (`m64n128k16`, half
    /// `h` the rows `64 h..`).
    ///
    /// # Safety
    /// The warpgroup together; tile `t` landed and this warp has not released it; the query
    /// rows are staged and fenced; nothing touches the accumulators until [`wait`].
    #[inline(always)]
    unsafe fn start<T: Wgmma16>(&self, (h0, h1): (&mut Half, &mut Half), t: u32) {
        let tile = self.ring.tile(t) + 64 * self.consumer * PANEL_ROW_BYTES;
        // SAFETY: the warpgroup together on the landed tile and the staged rows (caller).
        unsafe {
            fence();
            T::first_panel_n128(h0, h1, descriptor(tile), descriptor(self.q_tile));
            T::panel_n128(
                h0,
                h1,
                descriptor(tile + WS_TILE_KEYS * PANEL_ROW_BYTES),
                descriptor(self.q_tile + WS_ROWS * PANEL_ROW_BYTES),
            );
            commit();
        }
    }

    /// Tile `t`'s product (waited for): each key's terms summed per query head and stored into
    /// its column. Register `r` of half `h` holds key row `keys[r % 4 / 2]` and query row `64 h
    /// + 8 (r / 4) + 2 tig + r % 2` (`gpu::wgmma`).
    ///
    /// # Safety
    /// The warp is converged; tile `t` landed and this warp has not released it.
    #[inline(always)]
    unsafe fn scores(&self, (h0, h1): (&Half, &Half), t: u32) {
        let (lane, mine) = (lane_id(), 64 * self.consumer);
        let tig = lane % 4;
        let (least, walk_hi) = (self.least, self.walk.1);
        let key0 = self.walk.0 + t * WS_TILE_KEYS + mine;
        // SAFETY: keys of the held tile (caller).
        let position = |k: u32| unsafe { self.ring.position(t, mine + k) };
        let pos = self.keys.map(position);
        // Whether every row counts the warp's keys: no masks.
        // SAFETY: the warp is converged.
        let all = unsafe { ballot(pos[0] <= least && pos[1] <= least) } == u32::MAX;
        let mut sums = [[0.0f32; 2]; 2];
        let mut fold = |h: usize, acc: &Half, masked: bool| {
            for (r, sums_r) in sums.iter_mut().enumerate() {
                for (e, sum) in sums_r.iter_mut().enumerate() {
                    let term = |j: usize| {
                        let at = 4 * j + 2 * r + e;
                        let x = exp2(fma(acc[at / 16][at % 16], self.mul, -self.sub[h][j][e]));
                        let row = 64 * h + 8 * j + 2 * tig as usize + e;
                        // SAFETY: inside the rows map.
                        if masked && pos[r] > unsafe { *self.counted.add(row) } {
                            0.0
                        } else {
                            x
                        }
                    };
                    *sum += pairwise(term, |a, b| a + b);
                }
            }
        };
        if all {
            fold(0, h0, false);
            fold(1, h1, false);
        } else {
            fold(0, h0, true);
            fold(1, h1, true);
        }
        let group = self.p.cache.geometry.group_size;
        // SAFETY: the whole warp is here.
        let sharing = unsafe { share_heads(&mut sums, group) };
        if tig < sharing {
            for (r, sums_r) in sums.iter().enumerate() {
                let key = key0 + self.keys[r];
                // Keys past the walk, and before the halo, have no column; the others' lie
                // within WS_SCORE_COLUMNS (score_kvs <= WS_SCORE_KEYS, plan).
                if key < walk_hi && key + SCORE_HALO >= self.owned {
                    let column = key + SCORE_HALO - self.owned;
                    for (e, &sum) in sums_r.iter().enumerate() {
                        if (e as u32) < group.min(2) {
                            let head = 2 * tig + e as u32;
                            // SAFETY: inside the column sums; this lane alone writes this key
                            // and head, once.
                            unsafe {
                                *self
                                    .columns
                                    .add((head * WS_SCORE_COLUMNS + column) as usize) = sum
                            };
                        }
                    }
                }
            }
        }
    }
}

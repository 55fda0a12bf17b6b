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

use kvc_abi::params::AggregateParams;
use kvc_abi::plan::{ws_smem, PANEL_ROW_BYTES, WS_ROWS, WS_STAGES, WS_TILE_BYTES, WS_TILE_KEYS};

use crate::aggregate::{row_position, stage_queries, RowLayout, StatsCta};
use crate::gpu::math::{exp2, fma, fmax, CacheElem};
use crate::gpu::mem::load;
use crate::gpu::mma::shared_addr;
use crate::gpu::smem::dynamic_f32;
use crate::gpu::sync::allow_dependent_grid;
use crate::gpu::thread::{lane_id, sync_threads, thread_idx_x, warp_id};
use crate::gpu::tma::{
    acquire_tensor_map, arrive, arrive_expect_bytes, copy_bulk, copy_tile, init_barrier,
    registers_to_consumer, registers_to_producer, sync_consumers, wait_barrier,
};
use crate::gpu::warp::{max_i32, sync_warp};
use crate::gpu::wgmma::{commit, descriptor, fence, wait_all, Wgmma16};

/// Consumer threads: warpgroups 0 and 1.
const CONSUMERS: u32 = 256;
/// Consumer warps, the arrivals a stage's `empty` barrier waits for.
const CONSUMER_WARPS: u32 = 8;
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
    let ntiles = (key_hi - key_lo).div_ceil(WS_TILE_KEYS);

    let map = ws_smem();
    let raw = dynamic_f32() as *mut u8;
    let base_ptr = raw.wrapping_add((shared_addr(raw).wrapping_neg() % 1024) as usize);
    let base = shared_addr(base_ptr);
    let ring = Ring {
        k_tiles: base + map.k_tiles,
        positions: base + map.positions,
        positions_ptr: base_ptr.wrapping_add(map.positions as usize) as *const i32,
        barriers: base + map.barriers,
    };
    if thread_idx_x() == 0 {
        for stage in 0..WS_STAGES {
            // SAFETY: the ring's barriers, initialised before the CTA barrier below.
            unsafe {
                init_barrier(ring.full(stage), 1);
                init_barrier(ring.empty(stage), CONSUMER_WARPS);
            }
        }
    }
    // SAFETY: every thread reaches it.
    unsafe { sync_threads() };
    if warp_id() >= CONSUMERS / 32 {
        // SAFETY: the whole producer warpgroup; warp 8 then produces.
        unsafe {
            registers_to_producer();
            if warp_id() == CONSUMERS / 32 {
                produce(p, &ring, head_slot, (key_lo, key_hi), ntiles);
            }
        }
        return;
    }
    // SAFETY: both consumer warpgroups.
    unsafe { registers_to_consumer() };
    let q_tile = base + map.q_tile;
    let layout = RowLayout {
        stride: PANEL_ROW_BYTES,
        data: 128 * 2,
        rows: WS_ROWS,
        swizzled: true,
    };
    // SAFETY: the consumers only, from here on; the query tile holds WS_ROWS rows; then the
    // copies are fenced for `wgmma` and every consumer meets.
    unsafe {
        stage_queries::<T>(
            p,
            base_ptr.wrapping_add(map.q_tile as usize),
            layout,
            (seq, kv_head),
            (row_base, WS_ROWS),
            rows,
            CONSUMERS,
        );
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

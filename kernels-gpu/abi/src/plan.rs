//! Launch plans: grid, block, shared memory and work split of every kernel, computed once from
//! the geometry and the device. The device code carves its shared memory and walks its tiles
//! with the same functions, so no constant is written twice.

use crate::dtype::DType;
use crate::geometry::Geometry;
use crate::params::AppendParams;

/// Threads in a warp.
pub const WARP_SIZE: u32 = 32;
/// Bytes of the widest vector load a thread issues.
pub const VECTOR_BYTES: u32 = 16;

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchDims {
    /// CTAs in x, y, z.
    pub grid: [u32; 3],
    /// Threads per CTA in x, y, z.
    pub block: [u32; 3],
    /// Dynamic shared memory per CTA.
    pub smem_bytes: u32,
}

/// What the planner needs to know of the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceProps {
    /// Streaming multiprocessors.
    pub num_sms: u32,
}

/// What the planner needs to know of one kernel on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelProps {
    /// CTAs of the kernel one SM holds at once (the driver's occupancy for the launch's block
    /// and shared memory).
    pub ctas_per_sm: u32,
}

// ---------------------------------------------------------------------------------------------
// Paged decode attention (SPEC §3)

/// Warps per decode CTA.
pub const DECODE_WARPS: u32 = 4;
/// Threads per merge CTA.
pub const MERGE_THREADS: u32 = 128;
/// A partition is never shorter than this many KVs (a shorter one costs more to merge than it
/// gains in parallelism).
pub const MIN_PARTITION_KVS: u32 = 512;

/// How one warp of the decode kernel covers K/V rows. A row (one KV's `D` values) is split over
/// `lanes_per_row` lanes, each loading `chunks_per_lane` 16-byte chunks of it; the warp loads
/// `32 / lanes_per_row` consecutive rows per load instruction and `tile_rows` rows per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeTile {
    /// Elements in one 16-byte chunk.
    pub vec_elems: u32,
    /// Lanes that share one row (a power of two, at most 32).
    pub lanes_per_row: u32,
    /// 16-byte chunks one lane loads of each row it covers.
    pub chunks_per_lane: u32,
    /// Rows one lane covers per tile.
    pub rows_per_lane: u32,
    /// Rows one warp covers per tile.
    pub tile_rows: u32,
}

impl DecodeTile {
    /// Elements of a row one lane holds, `chunks_per_lane * vec_elems` (4 or 8).
    #[inline(always)]
    pub const fn lane_elems(&self) -> u32 {
        self.chunks_per_lane * self.vec_elems
    }

    /// Rows of different row groups one load instruction of the warp covers.
    #[inline(always)]
    pub const fn row_groups(&self) -> u32 {
        WARP_SIZE / self.lanes_per_row
    }

    /// Element offset inside a row of chunk `chunk` of lane `lane`.
    #[inline(always)]
    pub const fn lane_elem(&self, lane: u32, chunk: u32) -> u32 {
        ((lane % self.lanes_per_row) + chunk * self.lanes_per_row) * self.vec_elems
    }

    /// Row (relative to the tile) of the `i`-th row covered by `lane`.
    #[inline(always)]
    pub const fn lane_row(&self, lane: u32, i: u32) -> u32 {
        i * self.row_groups() + lane / self.lanes_per_row
    }
}

/// The decode tile for head dimension `head_dim`, element size `elem_bytes` and group size
/// `group_size`. Each lane keeps 8 (4 with `G >= 8`, to bound registers) 16-byte loads of K and
/// as many of V in flight per tile.
pub const fn decode_tile(head_dim: u32, elem_bytes: u32, group_size: u32) -> DecodeTile {
    let vec_elems = VECTOR_BYTES / elem_bytes;
    let chunks_per_row = head_dim / vec_elems;
    let lanes_per_row = if chunks_per_row < WARP_SIZE {
        chunks_per_row
    } else {
        WARP_SIZE
    };
    let chunks_per_lane = chunks_per_row / lanes_per_row;
    let loads = if group_size >= 8 { 4 } else { 8 };
    let rows_per_lane = if loads > chunks_per_lane {
        loads / chunks_per_lane
    } else {
        1
    };
    DecodeTile {
        vec_elems,
        lanes_per_row,
        chunks_per_lane,
        rows_per_lane,
        tile_rows: (WARP_SIZE / lanes_per_row) * rows_per_lane,
    }
}

/// The smallest block size the kernels support (partition starts are multiples of it).
pub const MIN_BLOCK_SIZE: u32 = 8;

/// Rows of one tile of the tensor-core decode (16-bit caches): the `k = 16` of one
/// `mma.m16n8k16` of `P V`.
pub const MMA_TILE_ROWS: u32 = 16;

/// Tiles one warp of the tensor-core decode loads per step: 2 for `D = 64`, else 1, so that a
/// step is at least 8 KiB of K and V per warp.
pub const fn mma_tiles_per_step(head_dim: u32) -> u32 {
    if head_dim <= 64 {
        2
    } else {
        1
    }
}

/// Steps of K and V each warp of the tensor-core decode has in shared memory: it copies step
/// `i + 1` in (`cp.async`) while it computes on step `i`.
pub const MMA_STAGES: u32 = 2;

/// 16-byte chunks of K and V together one lane copies per step: `D / 16` of each per tile.
pub const fn mma_lane_chunks(head_dim: u32) -> u32 {
    mma_tiles_per_step(head_dim) * head_dim / 8
}

/// Staged 16-byte chunks of K (and as many of V) of one tile: 16 rows of `D / 8`.
pub const fn mma_tile_chunks(head_dim: u32) -> u32 {
    MMA_TILE_ROWS * MmaTile::row_chunks(head_dim)
}

/// How a lane of the tensor-core decode maps onto rows and columns (`mma.m16n8k16`, with
/// `gid = lane / 4`, `tig = lane % 4`; see the fragment layouts in the kernel's `gpu::mma`).
/// The query heads of the group are the rows `m` of `S = Q K^T` and of `O = P V` (at most 8
/// of 16 are used). A dot product does not care in which order its terms come, so the columns
/// are assigned to make every load a 16-byte one: K rows and the query load the same 8
/// consecutive elements into the 4 registers of two `k16` steps, and V is loaded along rows
/// and paired into B fragments with byte permutes, its output columns permuted to match.
pub struct MmaTile;

impl MmaTile {
    /// Tile row (key) whose K lane `lane` loads for the `n8` half `half` of `S`.
    #[inline(always)]
    pub const fn k_row(lane: u32, half: u32) -> u32 {
        8 * half + lane / 4
    }

    /// First element of the 8 that lane `lane` loads of a K row (and of its query row) for
    /// `k16` steps `2 chunk` and `2 chunk + 1`.
    #[inline(always)]
    pub const fn k_elem(lane: u32, chunk: u32) -> u32 {
        32 * chunk + 8 * (lane % 4)
    }

    /// Tile row whose score lane `lane` holds in element `e` of the `S` half `half` (the
    /// accumulator columns `2 tig + e`); the same row is `k` index `8 half + 2 tig + e` of the
    /// `P V` step.
    #[inline(always)]
    pub const fn score_row(lane: u32, half: u32, e: u32) -> u32 {
        8 * half + 2 * (lane % 4) + e
    }

    /// Tile row of the `r`-th (0..4) V row lane `lane` loads: rows `2 tig`, `2 tig + 1`,
    /// `2 tig + 8`, `2 tig + 9`, the `k` rows of its B fragments.
    #[inline(always)]
    pub const fn v_row(lane: u32, r: u32) -> u32 {
        2 * (lane % 4) + r % 2 + 8 * (r / 2)
    }

    /// First element of the 8 that lane `lane` loads of a V row in chunk `chunk` (each chunk
    /// covers 64 columns).
    #[inline(always)]
    pub const fn v_elem(lane: u32, chunk: u32) -> u32 {
        64 * chunk + 8 * (lane / 4)
    }

    /// 16-byte chunks in a row of `head_dim` 16-bit elements.
    #[inline(always)]
    pub const fn row_chunks(head_dim: u32) -> u32 {
        head_dim / 8
    }

    /// Chunk (0..16 * row_chunks) where 16-byte chunk `chunk` of tile row `row` is staged in
    /// shared memory: rows one after another, chunks permuted within each group of 8 by an
    /// XOR with the row, so that the fragment reads ([`Self::k_row`], [`Self::v_row`]) of any
    /// 8 lanes hit 8 different bank groups.
    #[inline(always)]
    pub const fn staged_chunk(head_dim: u32, row: u32, chunk: u32) -> u32 {
        let swizzle = (((row >> 1) & 3) << 1) ^ ((row & 1) << 2);
        row * Self::row_chunks(head_dim) + (chunk ^ swizzle)
    }

    /// Tile row and chunk lane `lane` copies in its `i`-th copy of a tile: consecutive lanes
    /// take consecutive chunks of a row, so every copy instruction reads whole rows.
    #[inline(always)]
    pub const fn copy_chunk(head_dim: u32, i: u32, lane: u32) -> (u32, u32) {
        let n = i * 32 + lane;
        (
            n / Self::row_chunks(head_dim),
            n % Self::row_chunks(head_dim),
        )
    }

    /// Output column of accumulator element `half` (0: column `2 tig`, 1: `2 tig + 1`) of the
    /// `n8` tile for V chunk `chunk`, word `word` (0..4) and element `e` (0..2) of that word.
    #[inline(always)]
    pub const fn out_elem(lane: u32, chunk: u32, word: u32, e: u32, half: u32) -> u32 {
        64 * chunk + 8 * (2 * (lane % 4) + half) + 2 * word + e
    }
}

/// Rows one warp of the decode kernel covers per step: [`mma_tiles_per_step`] tiles of
/// [`MMA_TILE_ROWS`] on the tensor-core path (16-bit caches), else [`decode_tile`]'s
/// `tile_rows`.
pub const fn decode_warp_rows(head_dim: u32, elem_bytes: u32, group_size: u32) -> u32 {
    if elem_bytes == 2 {
        MMA_TILE_ROWS * mma_tiles_per_step(head_dim)
    } else {
        decode_tile(head_dim, elem_bytes, group_size).tile_rows
    }
}

/// The longest partition, in words of `G + 2` per row: the bound a shared-memory stash of
/// each row's scores, position and metric once set (36 KiB). The stash now lives in the
/// workspace (docs/PERF.md decode v3.5), but every split was planned and measured under this
/// bound (16x8192 takes 6 partitions of 1408 KVs by it), so it stays until a measurement says
/// otherwise.
pub const PARTITION_WORDS: u32 = 9216;

/// Longest partition for group size `group_size`, in whole 64-row tiles. Recording or not,
/// the split is the same (so is the output).
pub const fn max_partition_kvs(group_size: u32) -> u32 {
    PARTITION_WORDS / (group_size + 2) / 64 * 64
}

/// A split policy must keep at least this fraction of the device's resident CTA slots busy
/// over all waves (`ctas / (waves * resident)`) before it takes fewer partitions.
pub const WAVE_EFFICIENCY: f32 = 0.95;

/// CTAs per SM the split policy plans for, at most: two CTAs of four warps already stream K/V
/// at 0.9-0.97 of copy (H100, docs/PERF.md decode v3). A third, where registers and shared
/// memory allow it, helps grids of several waves, which the hardware fills by itself; planning
/// a one-wave grid for it splits more finely than pays (1x32768 0.74 of copy against 0.76)
/// and splits 256x1024, which needs no merge (0.90 against 0.97).
pub const PLANNED_CTAS_PER_SM: u32 = 2;

/// Shared memory of one decode CTA, in 4-byte words: per warp and query head of the group the
/// warp's `(max, sum)` and `D` accumulators (merged across warps at the end), the CTA's
/// `(max, sum)` per head, the `(max, 1 / sum)` recording normalises with, and a ticket word.
/// Recording needs no more: its scores go to the workspace (`DecodeParams::stash`), so a
/// recording CTA takes the shared memory of a plain one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSmem {
    /// `[DECODE_WARPS, G, 2]` f32.
    pub warp_ml: u32,
    /// `[DECODE_WARPS, G, D]` f32.
    pub warp_acc: u32,
    /// `[G, 2]` f32: the CTA's (max, sum) of `exp2(score - max)` per query head.
    pub cta_ml: u32,
    /// `[G, 2]` f32: the head slot's global (max, 1 / sum), what recorded probabilities use.
    pub record_ml: u32,
    /// One u32: the CTA's ticket (work index) when the grid is ticketed.
    pub ticket: u32,
    /// `[DECODE_WARPS, MMA_STAGES, 32 * mma_lane_chunks]` 16-byte chunks (16-bit caches
    /// only): each warp's steps of K and V in flight, per stage the K tiles then the V tiles,
    /// each [`mma_tile_chunks`] laid out by [`MmaTile::staged_chunk`].
    pub staging: u32,
    /// `[partition_kvs / MIN_BLOCK_SIZE]` u32, last (the launch sizes it, [`Self::bytes_for`]):
    /// the block ids of the partition's logical blocks, loaded once so that no load of K or V
    /// waits on a table load.
    pub blocks: u32,
}

impl DecodeSmem {
    /// Word of `(warp, g)`'s max in `warp_ml`; its sum is the next word.
    #[inline(always)]
    pub const fn ml_word(&self, group_size: u32, warp: u32, g: u32) -> u32 {
        self.warp_ml + (warp * group_size + g) * 2
    }

    /// Word of `(warp, g, d)` in `warp_acc`.
    #[inline(always)]
    pub const fn acc_word(&self, group_size: u32, head_dim: u32, warp: u32, g: u32, d: u32) -> u32 {
        self.warp_acc + (warp * group_size + g) * head_dim + d
    }

    /// Bytes of the map for partitions of `partition_kvs` KVs.
    pub const fn bytes_for(&self, partition_kvs: u32) -> u32 {
        (self.blocks + partition_kvs.div_ceil(MIN_BLOCK_SIZE)) * 4
    }

    /// Word of staged chunk `chunk` of `(warp, stage)` in `staging`.
    #[inline(always)]
    pub const fn staging_word(&self, head_dim: u32, warp: u32, stage: u32, chunk: u32) -> u32 {
        let chunks = mma_lane_chunks(head_dim) * WARP_SIZE;
        self.staging + ((warp * MMA_STAGES + stage) * chunks + chunk) * 4
    }
}

/// The decode shared-memory map for group size `group_size`, head dimension `head_dim` and
/// element size `elem_bytes` (2: the tensor-core path, which stages K and V).
pub const fn decode_smem(group_size: u32, head_dim: u32, elem_bytes: u32) -> DecodeSmem {
    let staging = 0;
    let staging_words = if elem_bytes == 2 {
        DECODE_WARPS * MMA_STAGES * mma_lane_chunks(head_dim) * WARP_SIZE * 4
    } else {
        0
    };
    let warp_ml = staging + staging_words;
    let warp_acc = warp_ml + DECODE_WARPS * group_size * 2;
    let cta_ml = warp_acc + DECODE_WARPS * group_size * head_dim;
    let record_ml = cta_ml + group_size * 2;
    let ticket = record_ml + group_size * 2;
    DecodeSmem {
        warp_ml,
        warp_acc,
        cta_ml,
        record_ml,
        ticket,
        staging,
        blocks: ticket + 1,
    }
}

/// u32 words of the decode handshake counters of a cache of `geometry`: one ticket word, then
/// one arrival count per `(seq, kv_head)` (see [`crate::params::DecodeParams::arrival_word`]).
/// Zero before every launch: the cache allocates them zeroed, and each launch's last user of
/// a word resets it.
pub const fn decode_counter_words(geometry: &Geometry) -> u64 {
    1 + geometry.num_seqs as u64 * geometry.num_kv_heads as u64
}

/// A planned decode: the attention launch, the merge launch when the KV range is split, and
/// the workspace (f32 partials of the split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    /// Grid `(num_partitions, H, num_seqs)`, one CTA of `DECODE_WARPS` warps per partition of
    /// a head slot.
    pub decode: LaunchDims,
    /// Grid `(Hq, num_seqs)`; `None` when every head slot fits one partition, or when
    /// recording (the CTA that leaves a head slot's handshake last merges it).
    pub merge: Option<LaunchDims>,
    /// KVs per partition (a multiple of the block size).
    pub partition_kvs: u32,
    /// Partitions of the longest head slot.
    pub num_partitions: u32,
    /// Rows `(seq, q_head, partition)` of the partials (0 without a merge).
    pub partial_rows: u64,
    /// f32 words of the score stash (`DecodeParams::stash`; 0 without recording).
    pub stash_words: u64,
}

impl DecodePlan {
    /// Byte offset of `partial_ml` in the workspace (`partial_acc` starts at 0).
    pub const fn partial_ml_offset(&self, head_dim: u32) -> u64 {
        self.partial_rows * head_dim as u64 * 4
    }

    /// Byte offset of the score stash in the workspace, after the partials, 128-byte aligned
    /// (the decode drops it from L2 by whole lines).
    pub const fn stash_offset(&self, head_dim: u32) -> u64 {
        (self.partial_rows * (head_dim as u64 + 2) * 4).next_multiple_of(128)
    }

    /// Bytes of workspace the plan needs: the partials, then the score stash.
    pub const fn workspace_bytes(&self, head_dim: u32) -> u64 {
        self.stash_offset(head_dim) + self.stash_words * 4
    }
}

/// Plans a decode over all sequence rows of `geometry` for one layer whose longest head slot
/// holds `max_context_len` KVs; `record` reserves the score stash.
///
/// Split policy (flash-decoding): each head slot's KV range is split into the fewest
/// partitions that keep [`WAVE_EFFICIENCY`] of the device's resident CTA slots
/// (`num_sms * min(ctas_per_sm, PLANNED_CTAS_PER_SM)`) busy over all waves (or the best split if none does), no
/// partition shorter than `MIN_PARTITION_KVS`; a merge kernel combines them.
/// `partition_kvs` overrides the policy. Either way a partition is whole CTA tiles, at most
/// [`max_partition_kvs`] unless the context needs longer ones, and long enough that a head
/// slot has at most `num_sms` partitions: the partitions of a recording launch wait for each
/// other, so all of a head slot's must be able to run at once.
pub fn plan_decode(
    geometry: &Geometry,
    dtype: DType,
    max_context_len: u32,
    props: &DeviceProps,
    kernel: &KernelProps,
    partition_kvs: Option<u32>,
    record: bool,
) -> DecodePlan {
    let warp_rows = decode_warp_rows(geometry.head_dim, dtype.elem_bytes(), geometry.group_size);
    let cta_rows = warp_rows * DECODE_WARPS;
    let head_slots = (geometry.num_seqs * geometry.num_kv_heads).max(1);
    let resident = props.num_sms * kernel.ctas_per_sm.clamp(1, PLANNED_CTAS_PER_SM);
    let longest = max_partition_kvs(geometry.group_size) / cta_rows * cta_rows;
    let policy = split_policy(head_slots, max_context_len, resident, cta_rows, longest);
    // At most one partition per SM: longer than `longest` for contexts past num_sms of those.
    let per_sm = max_context_len
        .div_ceil(props.num_sms.max(1))
        .next_multiple_of(cta_rows);
    let partition_kvs = partition_kvs
        .unwrap_or(policy)
        .max(per_sm)
        .next_multiple_of(cta_rows)
        .clamp(cta_rows, longest.max(per_sm));
    let num_partitions = max_context_len.div_ceil(partition_kvs).max(1);
    let decode = LaunchDims {
        grid: [num_partitions, geometry.num_kv_heads, geometry.num_seqs],
        block: [DECODE_WARPS * WARP_SIZE, 1, 1],
        smem_bytes: decode_smem(geometry.group_size, geometry.head_dim, dtype.elem_bytes())
            .bytes_for(partition_kvs),
    };
    let (merge, partial_rows) = if num_partitions > 1 {
        let dims = LaunchDims {
            grid: [geometry.num_q_heads(), geometry.num_seqs, 1],
            block: [MERGE_THREADS, 1, 1],
            smem_bytes: 0,
        };
        let rows = geometry.num_seqs as u64 * geometry.num_q_heads() as u64 * num_partitions as u64;
        ((!record).then_some(dims), rows)
    } else {
        (None, 0)
    };
    let stash_words = if record {
        geometry.num_seqs as u64
            * geometry.num_q_heads() as u64
            * num_partitions as u64
            * crate::params::stash_rows(partition_kvs) as u64
    } else {
        0
    };
    DecodePlan {
        decode,
        merge,
        partition_kvs,
        num_partitions,
        partial_rows,
        stash_words,
    }
}

/// The policy's partition length (see [`plan_decode`]).
fn split_policy(
    head_slots: u32,
    max_context_len: u32,
    resident: u32,
    cta_rows: u32,
    longest: u32,
) -> u32 {
    if max_context_len == 0 {
        return cta_rows;
    }
    let most = (max_context_len / MIN_PARTITION_KVS).max(1);
    let mut splits = max_context_len.div_ceil(longest.max(1)).min(most);
    let mut best = (0.0f32, max_context_len.div_ceil(splits));
    while splits <= most {
        let partition_kvs = max_context_len.div_ceil(splits).next_multiple_of(cta_rows);
        let ctas = head_slots * max_context_len.div_ceil(partition_kvs.max(1));
        let efficiency = ctas as f32 / (ctas.div_ceil(resident) * resident) as f32;
        if efficiency >= WAVE_EFFICIENCY {
            return partition_kvs;
        }
        if efficiency > best.0 {
            best = (efficiency, partition_kvs);
        }
        splits += 1;
    }
    best.1
}

// ---------------------------------------------------------------------------------------------
// append_kv (SPEC §2)

/// Warps per append CTA; each warp copies one `(token, kv_head)` row of K and of V.
pub const APPEND_WARPS: u32 = 4;
/// Threads per append CTA.
pub const APPEND_THREADS: u32 = APPEND_WARPS * WARP_SIZE;

/// The append launch: `scatter_ctas` CTAs copy rows, then enough CTAs for one patch pair per
/// thread.
pub fn plan_append(params: &AppendParams) -> LaunchDims {
    let patch_ctas = params.num_patches.div_ceil(APPEND_THREADS);
    LaunchDims {
        grid: [params.scatter_ctas + patch_ctas, 1, 1],
        block: [APPEND_THREADS, 1, 1],
        smem_bytes: 0,
    }
}

/// CTAs that scatter `rows` rows.
pub const fn append_scatter_ctas(rows: u64) -> u32 {
    rows.div_ceil(APPEND_WARPS as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_rows_with_16_byte_chunks() {
        // f16, D=128: 16 chunks a row, 16 lanes a row, 2 rows a load, 8 loads a lane.
        let t = decode_tile(128, 2, 4);
        assert_eq!(
            (
                t.lanes_per_row,
                t.chunks_per_lane,
                t.rows_per_lane,
                t.tile_rows
            ),
            (16, 1, 8, 16)
        );
        assert_eq!(t.lane_elems(), 8);
        // f32, D=256: 64 chunks a row, a lane takes 2 chunks of each row.
        let t = decode_tile(256, 4, 1);
        assert_eq!(
            (
                t.lanes_per_row,
                t.chunks_per_lane,
                t.rows_per_lane,
                t.tile_rows
            ),
            (32, 2, 4, 4)
        );
        assert_eq!(t.lane_elem(3, 1), (3 + 32) * 4);
        // f16, D=64: 4 rows a load.
        let t = decode_tile(64, 2, 8);
        assert_eq!((t.lanes_per_row, t.rows_per_lane, t.tile_rows), (8, 4, 16));
        assert_eq!(t.lane_row(9, 2), 2 * 4 + 1);
        for d in [64, 128, 256] {
            for bytes in [2, 4] {
                for g in [1, 2, 4, 8] {
                    let t = decode_tile(d, bytes, g);
                    assert!(t.lane_elems() == 4 || t.lane_elems() == 8);
                    assert_eq!(t.lanes_per_row * t.lane_elems(), d);
                }
            }
        }
    }

    #[test]
    fn mma_tile_loads_every_element_once_and_writes_every_column_once() {
        let rows = MMA_TILE_ROWS as usize;
        for d in [64u32, 128, 256] {
            let n = rows * d as usize;
            let (mut k, mut v) = ([0u32; 16 * 256], [0u32; 16 * 256]);
            for lane in 0..WARP_SIZE {
                for half in 0..2 {
                    for chunk in 0..d / 32 {
                        let row = MmaTile::k_row(lane, half) as usize;
                        for e in 0..8 {
                            k[row * d as usize + (MmaTile::k_elem(lane, chunk) + e) as usize] += 1;
                        }
                    }
                }
                for r in 0..4 {
                    for chunk in 0..d / 64 {
                        let row = MmaTile::v_row(lane, r) as usize;
                        for e in 0..8 {
                            v[row * d as usize + (MmaTile::v_elem(lane, chunk) + e) as usize] += 1;
                        }
                    }
                }
            }
            assert!(k[..n].iter().chain(&v[..n]).all(|&c| c == 1), "D={d}");
            // The 4 lanes of a group (one query row) hold every score row and every output
            // column exactly once.
            for gid in 0..8 {
                let mut scores = [0u32; 16];
                let mut cols = [0u32; 256];
                for tig in 0..4 {
                    let lane = 4 * gid + tig;
                    for half in 0..2 {
                        for e in 0..2 {
                            scores[MmaTile::score_row(lane, half, e) as usize] += 1;
                            for chunk in 0..d / 64 {
                                for word in 0..4 {
                                    cols[MmaTile::out_elem(lane, chunk, word, e, half) as usize] +=
                                        1;
                                }
                            }
                        }
                    }
                }
                let cols = &cols[..d as usize];
                assert!(scores.iter().chain(cols).all(|&c| c == 1), "D={d}");
            }
        }
    }

    #[test]
    fn staged_tiles_are_permutations_read_without_bank_conflicts() {
        for d in [64u32, 128, 256] {
            let mut seen = [false; 16 * 32];
            for i in 0..mma_tile_chunks(d) / 32 {
                for lane in 0..32 {
                    let (row, chunk) = MmaTile::copy_chunk(d, i, lane);
                    let at = MmaTile::staged_chunk(d, row, chunk) as usize;
                    assert!(!seen[at], "D={d}");
                    seen[at] = true;
                }
            }
            assert!(seen[..mma_tile_chunks(d) as usize].iter().all(|&s| s));
            // A 16-byte shared access is served 8 lanes at a time; 8 lanes without a
            // conflict touch 8 different groups of 4 banks (chunk index mod 8).
            for phase in 0..4 {
                let lanes = phase * 8..phase * 8 + 8;
                for half in 0..2 {
                    for c in 0..d / 32 {
                        let mut mask = 0u32;
                        for l in lanes.clone() {
                            let chunk = MmaTile::k_elem(l, c) / 8;
                            mask |=
                                1 << (MmaTile::staged_chunk(d, MmaTile::k_row(l, half), chunk) % 8);
                        }
                        assert_eq!(mask, 0xff, "K, D={d}");
                    }
                }
                for r in 0..4 {
                    for c in 0..d / 64 {
                        let mut mask = 0u32;
                        for l in lanes.clone() {
                            let chunk = MmaTile::v_elem(l, c) / 8;
                            mask |=
                                1 << (MmaTile::staged_chunk(d, MmaTile::v_row(l, r), chunk) % 8);
                        }
                        assert_eq!(mask, 0xff, "V, D={d}");
                    }
                }
            }
        }
    }

    #[test]
    fn three_tensor_core_ctas_share_an_sm() {
        // An H100/H200 SM has 228 KiB of shared memory, 1 KiB of it reserved per CTA; recording
        // CTAs take the same map (their scores go to the workspace).
        for g in [1, 2, 4] {
            let bytes = decode_smem(g, 128, 2).bytes_for(max_partition_kvs(g));
            assert!(3 * (bytes + 1024) <= 228 * 1024, "G={g}");
        }
    }

    fn geometry(num_seqs: u32) -> Geometry {
        Geometry {
            num_seqs,
            num_layers: 1,
            num_kv_heads: 8,
            group_size: 4,
            head_dim: 128,
            block_size: 16,
            max_blocks_per_head: 4096,
            num_blocks: 1 << 20,
        }
    }

    /// Every chunk of a swizzled tile has its own 16 bytes inside the tile, in its panel and
    /// row, at the place the hardware's 128-byte swizzle reads it from: address bits 4-6 are
    /// the chunk's index in its panel row XOR bits 7-9.
    #[test]
    fn swizzled_chunks_tile_their_panels_as_the_hardware_reads_them() {
        for rows in [32, 64, 128] {
            for panels in [1, 2, 4] {
                let base = 3 * 1024;
                let bytes = rows * panels * PANEL_ROW_BYTES;
                let mut seen = [false; 128 * 4 * 8];
                for row in 0..rows {
                    for chunk in 0..8 * panels {
                        let at = swizzled_chunk(base, rows, row, chunk);
                        assert!(at >= base && at + 16 <= base + bytes && at % 16 == 0);
                        let slot = ((at - base) / 16) as usize;
                        assert!(!seen[slot], "chunk {chunk} of row {row} overlaps");
                        seen[slot] = true;
                        let offset = at - base;
                        assert_eq!(offset / (rows * PANEL_ROW_BYTES), chunk / 8);
                        assert_eq!(offset % (rows * PANEL_ROW_BYTES) / PANEL_ROW_BYTES, row);
                        assert_eq!(((at >> 4) & 7) ^ ((at >> 7) & 7), chunk % 8);
                    }
                }
            }
        }
    }

    #[test]
    fn aggregation_tiles_fit_shared_memory_and_cover_the_keys() {
        // 227 KiB: the most dynamic shared memory a CTA may take on sm_90; sm_80's 163 KiB
        // holds every map of rows up to 256 bytes.
        let most = 227 * 1024;
        for dtype in DType::ALL {
            for head_dim in [64, 128, 256] {
                let bytes = dtype.elem_bytes();
                let tile_keys = agg_tile_keys(head_dim, bytes);
                // A pass-2 CTA's columns hold its whole tiles: the first column is at most
                // SCORE_HALO, it walks at most MAX_SCORE_KEYS + 2 SCORE_HALO keys.
                let walked = (MAX_SCORE_KEYS + 2 * SCORE_HALO).div_ceil(tile_keys) * tile_keys;
                assert!(SCORE_HALO + walked <= SCORE_COLUMNS);
                // Whole MMA groups per tile, whole 16-byte chunks per copying thread.
                assert_eq!(tile_keys % AGG_GROUP_KEYS, 0);
                let per_key = AGG_WARPS * WARP_SIZE / tile_keys;
                assert_eq!((head_dim * bytes / VECTOR_BYTES) % per_key, 0);
                assert_eq!(MAX_SCORE_KEYS % tile_keys, 0);
                for group in [1, 2, 4, 8] {
                    for hopper in [false, true] {
                        let stats = aggregate_smem(head_dim, bytes, group, false, hopper);
                        let scores = aggregate_smem(head_dim, bytes, group, true, hopper);
                        assert!(stats.bytes <= scores.bytes && scores.bytes <= most);
                        assert!(hopper || scores.bytes <= 163 * 1024 || head_dim * bytes > 256);
                        for offset in [
                            scores.k_tiles,
                            scores.positions,
                            scores.parts,
                            scores.columns,
                        ] {
                            assert_eq!(offset % 16, 0);
                        }
                        if agg_wgmma(bytes, hopper) {
                            // Swizzle atoms of 8 rows of 128 bytes: every tile and panel
                            // 1024-byte aligned, query rows apart from the key tiles.
                            let panel_rows = [agg_rows(head_dim, bytes), tile_keys];
                            assert!(panel_rows.iter().all(|rows| rows % 8 == 0));
                            assert_eq!(scores.row_bytes % 128, 0);
                            assert_eq!(scores.k_tiles % 1024, 0);
                            assert_eq!((tile_keys * scores.row_bytes) % 1024, 0);
                            assert!(scores.k_tiles >= agg_rows(head_dim, bytes) * scores.row_bytes);
                        }
                    }
                }
            }
        }
        // With wgmma, pass 1 at D = 128 fits three CTAs in an SM's 228 KiB (1 KiB reserved
        // per CTA), with two key tiles; pass 2 keeps three.
        let stats = aggregate_smem(128, 2, 4, false, true);
        assert_eq!(
            (stats.stages, aggregate_smem(128, 2, 4, true, true).stages),
            (2, 3)
        );
        assert!(3 * (stats.bytes + 1024) <= 228 * 1024);
        // Llama-3.1-8B, w = 32, one prompt of 32768: pass 1 in about one wave of two CTAs per
        // SM, pass 2 in equal ranges of at most MAX_SCORE_KEYS keys filling whole waves.
        let g = geometry(1);
        let p = plan_aggregate(&g, DType::F16, 32, 32768, (264, 264), false);
        assert_eq!(p.row_chunks, 1);
        assert_eq!(p.split_kvs % 64, 0);
        assert!(p.key_splits * p.split_kvs >= 32768 && p.key_splits <= 33);
        // 16 tiles walked a CTA: 1008 keys owned, 33 CTAs a head, 264 in all.
        assert_eq!(p.score_kvs, MAX_SCORE_KEYS - 2 * SCORE_HALO);
        assert_eq!(p.scores.grid, [33, 8, 1]);
        // A short prompt on many SMs: small ranges, never below one key tile walked.
        let p = plan_aggregate(&g, DType::F32, 24, 300, (264, 264), true);
        assert_eq!(p.score_kvs, agg_tile_keys(128, 4) - 2 * SCORE_HALO);
        assert!(p.scores.grid[0] * p.score_kvs >= 300);
        // The warp-specialized pass 2 there: one CTA an SM, 17 tiles walked a CTA, 2144 keys
        // owned, 16 CTAs a head, 128 in all (one wave).
        let p = plan_aggregate(&g, DType::F16, 32, 32768, (132, 132), true);
        assert_eq!((p.score_kvs, p.scores.grid), (2144, [16, 8, 1]));
        assert_eq!(p.scores.block, [WS_THREADS, 1, 1]);
        assert_eq!(p.scores.smem_bytes, ws_smem(true).bytes);
        let ws = ws_smem(true);
        assert!(ws.bytes <= most && ws.rows % 16 == 0 && ws.columns % 16 == 0);
        // The owned keys' metrics land by 16-byte copies; the table word is a u64.
        assert!(ws.metrics % 16 == 0 && ws.owned % 8 == 0);
        assert!(ws_smem(false).bytes < ws.bytes);
        // Every range's walk, its halo included, is whole tiles within the most keys a CTA
        // owns (the warp-specialized walk: a block or the halo before, the halo after, less
        // than a block short of whole tiles).
        for dtype in DType::ALL {
            for head_dim in [64, 128, 256] {
                for block_size in [8, 16, 32] {
                    let g = Geometry {
                        head_dim,
                        block_size,
                        ..g
                    };
                    for (len, resident) in [(32768, 264), (4096, 132), (100, 1000), (1 << 20, 8)] {
                        let p = plan_aggregate(&g, dtype, 32, len, (264, resident), true);
                        assert!(p.scores.grid[0] * p.score_kvs >= len);
                        if agg_ws_scores(head_dim, dtype.elem_bytes(), g.group_size, 32, true) {
                            let walk = block_size.max(SCORE_HALO) + p.score_kvs + SCORE_HALO;
                            assert_eq!(p.score_kvs % block_size, 0);
                            assert!(p.score_kvs <= WS_SCORE_KEYS);
                            assert!(walk.next_multiple_of(WS_TILE_KEYS) - walk < block_size);
                        } else {
                            let walk = p.score_kvs + 2 * SCORE_HALO;
                            assert_eq!(walk % agg_tile_keys(head_dim, dtype.elem_bytes()), 0);
                            assert!(walk <= MAX_SCORE_KEYS);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn decode_split_fills_the_device_in_whole_waves() {
        let props = DeviceProps { num_sms: 132 };
        // A kernel that fits 3 CTAs per SM is planned for PLANNED_CTAS_PER_SM of them.
        let k = KernelProps { ctas_per_sm: 3 };
        let resident = 132 * PLANNED_CTAS_PER_SM;
        for (batch, context) in [(1, 32768), (16, 8192), (64, 4096), (256, 1024)] {
            let plan = |record| {
                plan_decode(
                    &geometry(batch),
                    DType::F16,
                    context,
                    &props,
                    &k,
                    None,
                    record,
                )
            };
            let p = plan(false);
            let ctas = batch * 8 * p.num_partitions;
            let efficiency = ctas as f32 / (ctas.div_ceil(resident) * resident) as f32;
            assert!(
                efficiency >= 0.85,
                "{batch}x{context}: {p:?}, efficiency {efficiency}"
            );
            assert!(p.partition_kvs * p.num_partitions >= context);
            assert!(p.partition_kvs >= MIN_PARTITION_KVS.min(context));
            assert_eq!(p.partition_kvs % (16 * DECODE_WARPS), 0);
            assert_eq!(
                p.partial_rows,
                if p.num_partitions > 1 {
                    batch as u64 * 32 * p.num_partitions as u64
                } else {
                    0
                }
            );
            assert_eq!(p.merge.is_some(), p.num_partitions > 1);
            // A recording launch merges in its last CTA of each head slot.
            let r = plan(true);
            assert_eq!(r.merge, None);
            assert_eq!(r.partial_rows, p.partial_rows);
        }
        let p = plan_decode(&geometry(1), DType::F16, 0, &props, &k, None, false);
        assert_eq!(p.num_partitions, 1);
        let p = plan_decode(&geometry(1), DType::F16, 700, &props, &k, None, false);
        assert!(p.partition_kvs >= MIN_PARTITION_KVS);
        let p = plan_decode(
            &geometry(64),
            DType::F16,
            4096,
            &props,
            &k,
            Some(1000),
            false,
        );
        assert_eq!((p.partition_kvs, p.num_partitions), (1024, 4));
        // Partitions never exceed the bound, and recording never changes the split.
        let p = plan_decode(&geometry(64), DType::F16, 16384, &props, &k, None, false);
        assert!(p.partition_kvs <= max_partition_kvs(4));
        let r = plan_decode(&geometry(64), DType::F16, 16384, &props, &k, None, true);
        assert_eq!(
            (r.partition_kvs, r.num_partitions),
            (p.partition_kvs, p.num_partitions)
        );
        assert_eq!(r.decode.smem_bytes, p.decode.smem_bytes);
        assert_eq!((p.stash_words, r.merge), (0, None));
        assert_eq!(
            r.stash_words,
            64 * 32 * r.num_partitions as u64 * r.partition_kvs as u64
        );
        assert_eq!(
            r.workspace_bytes(128),
            p.workspace_bytes(128) + 4 * r.stash_words
        );
        assert_eq!(r.stash_offset(128) % 128, 0);
        // f32 partitions are whole tiles of as few as 8 rows; the stash rounds each up to
        // whole 128-byte lines.
        let wide = Geometry {
            head_dim: 256,
            group_size: 8,
            ..geometry(2)
        };
        let f = plan_decode(&wide, DType::F32, 4000, &props, &k, Some(840), true);
        assert_eq!(
            (f.partition_kvs, crate::params::stash_rows(840)),
            (840, 864)
        );
        assert_eq!(f.stash_words, 2 * 64 * f.num_partitions as u64 * 864);
        // At most one partition per SM, so that recording CTAs can wait for each other: past
        // 132 of the longest partitions, longer ones, whose block ids take more shared memory.
        let p = plan_decode(&geometry(1), DType::F16, 131072, &props, &k, Some(64), true);
        assert!(p.num_partitions <= 132);
        for context in [132 * 1536, 132 * 1536 + 1, 1 << 20] {
            let p = plan_decode(&geometry(1), DType::F16, context, &props, &k, None, true);
            assert!(p.num_partitions <= 132, "{context}");
            assert!(p.partition_kvs * p.num_partitions >= context);
            let smem = decode_smem(4, 128, 2);
            assert_eq!(p.decode.smem_bytes, smem.bytes_for(p.partition_kvs));
            assert_eq!(
                p.partition_kvs > max_partition_kvs(4),
                context > 132 * 1536,
                "{context}"
            );
        }
    }

    /// A compression step's high keys, key bytes below them and evictable flags follow its
    /// other arrays, 16-byte aligned, with a row of whole histogram chunks for every work head
    /// slot; the candidate lists, a row per chunk, end the workspace.
    #[test]
    fn compress_digests_follow_the_schedule_arrays() {
        for (seqs, group_heads, longest) in [(1, 8, 1), (3, 8, 4097), (16, 1, 8192), (2, 4, 100)] {
            let plan = plan_compress(&geometry(seqs), seqs, group_heads, longest, 132);
            let [key_high, key_mid, evictable] = plan.digest_offsets(seqs);
            let stride = plan.key_stride();
            assert_eq!(
                stride,
                longest.div_ceil(HIST_CHUNK_KVS).max(1) as u64 * 4096
            );
            assert_eq!(key_high % 16, 0);
            let before = plan.offsets(seqs)[5] + plan.hist_bytes();
            assert!(key_high >= before);
            let kvs = plan.num_work_heads as u64 * stride;
            assert_eq!(key_mid, key_high + 2 * kvs);
            assert_eq!(evictable, key_mid + kvs);
            assert_eq!(key_mid % 16, 0);
            let candidates = plan.candidates_offset(seqs);
            assert_eq!(candidates % 16, 0);
            assert!(candidates >= evictable + kvs / 8);
            let chunks = plan.num_work_heads as u64 * plan.chunks_per_head as u64;
            assert_eq!(
                plan.workspace_bytes(seqs),
                candidates + chunks * crate::params::compress::CANDIDATE_WORDS as u64 * 4
            );
        }
    }

    /// The host-mapped words of a compression step: the inputs in `seq_in`'s layout, then the
    /// status, the per-sequence reports and the per-head results, each word once; and
    /// `sched_init`'s grid covers everything it clears.
    #[test]
    fn compress_host_words_and_the_clear_are_laid_out_once() {
        use crate::params::compress::{
            IO_HEAD_BLOCKS, IO_HEAD_EVICTIONS, IO_HEAD_WORDS, SEQ_IN_WORDS, SEQ_OUT_WORDS,
        };
        use crate::params::CompressParams;
        for (seqs, group_heads, longest) in [(1, 8, 1), (3, 8, 4097), (16, 1, 8192), (2, 4, 100)] {
            let g = geometry(seqs);
            let plan = plan_compress(&g, seqs, group_heads, longest, 132);
            let mut p: CompressParams = bytemuck::Zeroable::zeroed();
            p.cache.geometry = g;
            p.num_work_seqs = seqs;
            p.group_heads = group_heads;
            p.chunks_per_head = plan.chunks_per_head;
            let w = plan.num_work_heads;
            // Room for the largest case (16 sequences of 8 head slots).
            let mut words = [0u32; 512];
            assert!(p.io_words() as usize <= words.len());
            let words = &mut words[..p.io_words() as usize];
            let mut mark = |word: u64| words[word as usize] += 1;
            for s in 0..seqs {
                (0..SEQ_IN_WORDS).for_each(|f| mark(p.io_seq_in_word(s, f)));
                (0..SEQ_OUT_WORDS).for_each(|f| mark(p.io_seq_out_word(s, f)));
            }
            mark(p.io_status_word());
            for h in 0..w {
                mark(p.io_head_word(h, IO_HEAD_BLOCKS));
                mark(p.io_head_word(h, IO_HEAD_EVICTIONS));
            }
            assert!(words.iter().all(|&n| n == 1), "{words:?}");
            assert_eq!(
                p.io_words(),
                (seqs * (SEQ_IN_WORDS + SEQ_OUT_WORDS) + 1 + w * IO_HEAD_WORDS) as u64
            );
            assert!(p.io_seq_in_word(seqs - 1, SEQ_IN_WORDS - 1) < p.io_status_word());
            assert_eq!(p.hist_clear_words() * 4, plan.hist_bytes());
            let [_, seq_out, _, _, _, hist] = plan.offsets(seqs);
            let cleared = hist - seq_out + plan.hist_bytes();
            let grid = plan.init.grid[0] as u64;
            assert!(grid * INIT_CTA_BYTES as u64 >= cleared);
            assert!((grid - 1) * (INIT_CTA_BYTES as u64) < cleared.max(1));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Observation-window aggregation (SPEC §4)

/// Warps per aggregation CTA; each takes `agg_row_tiles` 16-row MMA tiles of query rows.
pub const AGG_WARPS: u32 = 4;
/// Key tiles of an aggregation CTA, most: one computed while the next ones are copied.
pub const AGG_STAGES: u32 = 3;

/// Key tiles of an aggregation CTA (`columns`: pass 2): [`AGG_STAGES`], but two for pass 1
/// with `wgmma`, whose query rows have their own shared memory: 66 KiB at `D = 128` instead
/// of 82, so three CTAs fit an SM (registers allow three), where a key tile computed takes
/// longer than the next one's copy.
pub const fn agg_stages(elem_bytes: u32, columns: bool, hopper: bool) -> u32 {
    if agg_wgmma(elem_bytes, hopper) && !columns {
        2
    } else {
        AGG_STAGES
    }
}
/// Slots of key-tile block ids: those of two tiles ahead of the tile being issued are in
/// flight while it is issued, and a slot is rewritten only after a barrier.
pub const AGG_ID_SLOTS: u32 = 4;
/// Keys one MMA group of a warp covers (four 8-key tiles: independent accumulator chains).
pub const AGG_GROUP_KEYS: u32 = 32;
/// Most keys pass 2 owns per CTA (it adds their metric); sizes its column sums.
pub const MAX_SCORE_KEYS: u32 = 1024;
/// Most pool blocks a pass-2 CTA's owned keys lie in: at most `MAX_SCORE_KEYS - 2 SCORE_HALO`
/// keys from any key (the range need not start at a block) span at most
/// `(MAX_SCORE_KEYS - 2 SCORE_HALO) / 8 + 1` blocks of the least block size (8).
pub const OWNED_BLOCKS: u32 = MAX_SCORE_KEYS / 8;
/// Keys on each side of a pass-2 range whose scores it also sums, for max-pooling.
pub const SCORE_HALO: u32 = 8;
/// Column sums per query head of a pass-2 CTA: its owned keys, the halo on each side and the
/// rest of its last key tile (so that whole tiles are summed without bounds checks).
pub const SCORE_COLUMNS: u32 = MAX_SCORE_KEYS + 2 * SCORE_HALO + 2 * 64;
/// Widest max-pool the kernels support (`2 * SCORE_HALO + 1`).
pub const MAX_POOL_KERNEL: u32 = 2 * SCORE_HALO + 1;
/// Bound on the pass-1 partials, in f32 words (64 MiB), so that long windows never split keys
/// into more memory than this.
pub const MAX_PARTIAL_WORDS: u64 = 16 << 20;

/// Bytes of one row of a shared-memory tile of `head_dim` elements of `elem_bytes`: padded by
/// 16 bytes so that the 8 rows one `ldmatrix` reads fall in different banks.
pub const fn tile_row_bytes(head_dim: u32, elem_bytes: u32) -> u32 {
    head_dim * elem_bytes + 16
}

/// 16-row MMA tiles of query rows per warp: two (sharing every key fragment, half the shared
/// memory reads per MMA) while a row is at most 256 bytes, else one (registers, shared memory).
pub const fn agg_row_tiles(head_dim: u32, elem_bytes: u32) -> u32 {
    if head_dim * elem_bytes <= 256 {
        2
    } else {
        1
    }
}

/// Query rows an aggregation CTA holds at once.
pub const fn agg_rows(head_dim: u32, elem_bytes: u32) -> u32 {
    AGG_WARPS * 16 * agg_row_tiles(head_dim, elem_bytes)
}

/// Keys per staged key tile: 64 while a row is at most 256 bytes, else 32 (shared memory).
pub const fn agg_tile_keys(head_dim: u32, elem_bytes: u32) -> u32 {
    if head_dim * elem_bytes <= 256 {
        64
    } else {
        AGG_GROUP_KEYS
    }
}

/// Shared memory of the aggregation kernels, in bytes from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregateSmem {
    /// `[agg_rows]` rows of `row_bytes`: the query rows.
    pub q_tile: u32,
    /// `[stages, tile_keys]` rows of `row_bytes`: the key tiles. For 16-bit types with
    /// `mma.sync` they overlay the query rows, which are dead once each warp holds its A
    /// fragments; with `wgmma` (the Hopper module), which reads the query rows from shared
    /// memory throughout, they follow them.
    pub k_tiles: u32,
    /// Bytes from one staged row to the next: `tile_row_bytes` (padded, for `ldmatrix` and
    /// the f32 path), or with `wgmma` a row's bytes, stored as 128-byte-swizzled panels of
    /// 64 elements (`[panel][row][128 bytes]`, every tile 1024-byte aligned).
    pub row_bytes: u32,
    /// `[stages, tile_keys]` i32 positions of the key tiles.
    pub positions: u32,
    /// `[AGG_ID_SLOTS, tile_keys]` i32 block ids of the keys of the tiles being fetched.
    pub block_ids: u32,
    /// Pass 2: `[2, AGG_WARPS, G, tile_keys]` f32 per-warp column sums of a key tile (two, so
    /// that one is summed while the next is written); with `agg_keys_major`, `[2, agg_rows]`
    /// words instead: the positions up to which the chunk's rows count keys (i32), then their
    /// exponent offsets (f32).
    pub parts: u32,
    /// Pass 2: `[G, SCORE_COLUMNS]` f32 column sums of the CTA's keys.
    pub columns: u32,
    /// Pass 2: `[OWNED_BLOCKS]` i32 pool block ids of the blocks the CTA's owned keys lie in,
    /// in order from the first owned key's.
    pub owned_ids: u32,
    /// `[AGG_WARPS]` i32: the most position any row of each warp sees, for the skip of key
    /// groups no row of the CTA sees (with `wgmma`, whose warps multiply together).
    pub warp_most: u32,
    /// Key tiles (`agg_stages`).
    pub stages: u32,
    /// Bytes in all.
    pub bytes: u32,
}

/// Bytes of one row of a `wgmma` operand panel: 64 16-bit elements.
pub const PANEL_ROW_BYTES: u32 = 128;

/// Address of 16-byte chunk `chunk` of row `row` in the tile at `base` (1024-byte aligned) of
/// `rows` rows (a multiple of 8) stored as 128-byte-swizzled panels for `wgmma`: panel `chunk
/// / 8` of the tile, then the row, then chunk `chunk % 8` of it at `(chunk % 8) ^ (row % 8)`
/// (the hardware's 128-byte swizzle, which XORs address bits 4-6 with bits 7-9).
pub const fn swizzled_chunk(base: u32, rows: u32, row: u32, chunk: u32) -> u32 {
    base + (chunk / 8) * rows * PANEL_ROW_BYTES
        + row * PANEL_ROW_BYTES
        + ((chunk % 8) ^ (row % 8)) * 16
}

/// Whether the aggregation computes `Q K^T` with `wgmma` (the Hopper module, 16-bit types).
pub const fn agg_wgmma(elem_bytes: u32, hopper: bool) -> bool {
    hopper && elem_bytes == 2
}

/// Whether pass 1 is the warp-specialized kernel (docs/PERF.md, "v6 probe" and "Plan for
/// v6"): the Hopper module's 16-bit types at `D = 128`. A CTA is two consumer warpgroups,
/// each owning 64 of the chunk's [`WS_ROWS`] query rows, and a producer warpgroup whose lanes
/// bring the key tiles by TMA into a ring of [`WS_STAGES`] tiles of [`WS_TILE_KEYS`] keys.
pub const fn agg_ws_stats(head_dim: u32, elem_bytes: u32, hopper: bool) -> bool {
    agg_wgmma(elem_bytes, hopper) && head_dim == 128
}
/// Whether pass 2 is the warp-specialized kernel too: as [`agg_ws_stats`], where the window's
/// rows are one chunk ([`WS_ROWS`]) and a group at most [`WS_MAX_GROUP`] heads. Its CTA is the
/// same three warpgroups; consumer `c` multiplies keys `64 c..` of each key tile (keys-major,
/// as `agg_keys_major`) by all the rows, and owns a key range of at most [`WS_SCORE_KEYS`].
pub const fn agg_ws_scores(
    head_dim: u32,
    elem_bytes: u32,
    group_size: u32,
    window: u32,
    hopper: bool,
) -> bool {
    agg_ws_stats(head_dim, elem_bytes, hopper)
        && group_size <= WS_MAX_GROUP
        && window * group_size <= WS_ROWS
}
/// Threads of the warp-specialized passes: warps 0-7 consume, warpgroup 2 produces.
pub const WS_THREADS: u32 = 384;
/// Most query heads a group of the warp-specialized pass 2 (its column sums are sized for them).
pub const WS_MAX_GROUP: u32 = 4;
/// Most keys a warp-specialized pass-2 CTA owns: one wave of CTAs covers a 32768-key prompt of
/// 8 KV heads on 132 SMs (2144 keys a CTA) with room to spare.
pub const WS_SCORE_KEYS: u32 = 3072;
/// Column sums per query head of a warp-specialized pass-2 CTA: its owned keys and the halo
/// on each side.
pub const WS_SCORE_COLUMNS: u32 = WS_SCORE_KEYS + 2 * SCORE_HALO;
/// Query rows of a warp-specialized CTA (`agg_rows` at `D = 128`, 16-bit): pass 1's chunk, or
/// pass 2's whole window.
pub const WS_ROWS: u32 = 128;
/// Keys of one key tile of the warp-specialized passes.
pub const WS_TILE_KEYS: u32 = 128;
/// Key tiles in the warp-specialized passes' ring.
pub const WS_STAGES: u32 = 4;
/// Most pool blocks a warp-specialized pass-2 CTA's owned keys lie in: its range starts at a
/// block (`score_kvs` is a multiple of the block size), at the least block size (8).
pub const WS_OWNED_BLOCKS: u32 = WS_SCORE_KEYS / 8;

/// The shared-memory map of the warp-specialized passes, in bytes from a 1024-byte-aligned
/// base (the kernel aligns the dynamic base up; [`WsSmem::bytes`] counts the slack).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WsSmem {
    /// The query rows: 128 rows of `D = 128` 16-bit elements in two swizzled panels.
    pub q_tile: u32,
    /// `[WS_STAGES]` key tiles of 128 rows in two swizzled panels.
    pub k_tiles: u32,
    /// `[WS_STAGES, WS_TILE_KEYS]` i32 positions of the key tiles' keys.
    pub positions: u32,
    /// `[WS_STAGES]` `full` mbarriers (a tile's bytes landed), then `[WS_STAGES]` `empty` ones
    /// (the 8 consumer warps are done with it).
    pub barriers: u32,
    /// Pass 2: `[WS_ROWS]` i32 counted positions, then `[WS_ROWS]` f32 exponent offsets of
    /// the rows.
    pub rows: u32,
    /// Pass 2: `[WS_MAX_GROUP, WS_SCORE_COLUMNS]` f32 column sums.
    pub columns: u32,
    /// Pass 2: `[WS_OWNED_BLOCKS]` i32 pool block ids of the owned keys' blocks, in order, and
    /// `[WS_SCORE_KEYS]` f32 metrics of those blocks' slots (the owned keys' first), for the
    /// metric update.
    pub ids: u32,
    /// Pass 2: see `ids`.
    pub metrics: u32,
    /// Pass 2: the block-table word of the first owned key's block (u64), then the owned
    /// keys' blocks (u32), for the warps that stage `ids` and `metrics`.
    pub owned: u32,
    /// Bytes to reserve.
    pub bytes: u32,
}

/// Bytes of one key tile of the warp-specialized passes.
pub const WS_TILE_BYTES: u32 = WS_TILE_KEYS * 128 * 2;

/// The shared memory of the warp-specialized pass 1, or pass 2 (`columns`) ([`WsSmem`]).
pub const fn ws_smem(columns: bool) -> WsSmem {
    let k_tiles = WS_ROWS * 128 * 2;
    let positions = k_tiles + WS_STAGES * WS_TILE_BYTES;
    let barriers = positions + WS_STAGES * WS_TILE_KEYS * 4;
    let rows = barriers + 2 * WS_STAGES * 8;
    let columns_at = rows + 2 * WS_ROWS * 4;
    let ids = columns_at + WS_MAX_GROUP * WS_SCORE_COLUMNS * 4;
    let metrics = ids + WS_OWNED_BLOCKS * 4;
    let owned = metrics + WS_SCORE_KEYS * 4;
    let end = if columns { owned + 16 } else { rows };
    WsSmem {
        q_tile: 0,
        k_tiles,
        positions,
        barriers,
        rows,
        columns: columns_at,
        ids,
        metrics,
        owned,
        bytes: 1024 + end,
    }
}

/// Threads and shared-memory bytes of a CTA of pass 1 (`columns` false) or pass 2
/// (`columns` true), as [`plan_aggregate`] launches them.
pub const fn agg_cta(
    head_dim: u32,
    elem_bytes: u32,
    (group_size, window): (u32, u32),
    columns: bool,
    hopper: bool,
) -> (u32, u32) {
    let ws = if columns {
        agg_ws_scores(head_dim, elem_bytes, group_size, window, hopper)
    } else {
        agg_ws_stats(head_dim, elem_bytes, hopper)
    };
    if ws {
        (WS_THREADS, ws_smem(columns).bytes)
    } else {
        (
            AGG_WARPS * WARP_SIZE,
            aggregate_smem(head_dim, elem_bytes, group_size, columns, hopper).bytes,
        )
    }
}

/// Whether pass 2 multiplies keys by query rows (`K Q^T`: a 64-key tile as `wgmma`'s 64 rows,
/// the chunk's 128 query rows as two halves of 64 columns): the Hopper module's 16-bit types
/// where a key tile is 64 keys (a row at most 256 bytes). Each key's column sums are then
/// whole in the warp that holds its row of the product, so they go straight into the column
/// sums, with no per-warp parts summed in shared memory each tile.
pub const fn agg_keys_major(head_dim: u32, elem_bytes: u32, hopper: bool) -> bool {
    agg_wgmma(elem_bytes, hopper) && agg_tile_keys(head_dim, elem_bytes) == 64
}

/// The shared-memory map of an aggregation kernel (pass 2 adds its column sums); `hopper`:
/// the Hopper module's kernels (`agg_wgmma`).
pub const fn aggregate_smem(
    head_dim: u32,
    elem_bytes: u32,
    group_size: u32,
    columns: bool,
    hopper: bool,
) -> AggregateSmem {
    let wgmma = agg_wgmma(elem_bytes, hopper);
    let row = if wgmma {
        head_dim * elem_bytes
    } else {
        tile_row_bytes(head_dim, elem_bytes)
    };
    let stages = agg_stages(elem_bytes, columns, hopper);
    let keys = stages * agg_tile_keys(head_dim, elem_bytes);
    let q_tile = 0;
    let q_end = q_tile + agg_rows(head_dim, elem_bytes) * row;
    let k_tiles = if wgmma {
        q_end.next_multiple_of(1024)
    } else if elem_bytes == 2 {
        q_tile
    } else {
        q_end
    };
    let k_end = k_tiles + keys * row;
    let positions = if k_end > q_end { k_end } else { q_end };
    let block_ids = positions + keys * 4;
    let parts = block_ids + AGG_ID_SLOTS * agg_tile_keys(head_dim, elem_bytes) * 4;
    let part_bytes = if agg_keys_major(head_dim, elem_bytes, hopper) {
        2 * agg_rows(head_dim, elem_bytes) * 4
    } else {
        2 * AGG_WARPS * group_size * agg_tile_keys(head_dim, elem_bytes) * 4
    };
    let (part_bytes, column_bytes, id_bytes) = if columns {
        (part_bytes, group_size * SCORE_COLUMNS * 4, OWNED_BLOCKS * 4)
    } else {
        (0, 0, 0)
    };
    let columns = parts + part_bytes;
    let owned_ids = columns + column_bytes;
    AggregateSmem {
        q_tile,
        k_tiles,
        row_bytes: row,
        positions,
        block_ids,
        parts,
        columns,
        owned_ids,
        warp_most: owned_ids + id_bytes,
        stages,
        bytes: owned_ids + id_bytes + AGG_WARPS * 4,
    }
}

/// The planned aggregation: pass 1, the merge of its key splits (when split), pass 2, and
/// the workspace (stats, then partials).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregatePlan {
    /// Grid `(row_chunks * key_splits, H, num_seqs)`.
    pub stats: LaunchDims,
    /// Grid `(ceil(rows / AGG_WARPS), H, num_seqs)`, one warp per row.
    pub merge: Option<LaunchDims>,
    /// Grid `(ceil(max_len / score_kvs), H, num_seqs)`.
    pub scores: LaunchDims,
    /// Key splits of pass 1 (1: no merge).
    pub key_splits: u32,
    /// Keys per split of pass 1 (a multiple of the key tile).
    pub split_kvs: u32,
    /// Keys each pass-2 CTA owns: whole key tiles less `2 SCORE_HALO` (its walk with the halo
    /// is whole tiles), at most `MAX_SCORE_KEYS - 2 SCORE_HALO`.
    pub score_kvs: u32,
    /// Query row chunks of `agg_rows` per `(seq, kv_head)`.
    pub row_chunks: u32,
    /// f32 words of `stats`.
    pub stats_words: u64,
}

impl AggregatePlan {
    /// Byte offset of the partials in the workspace (`stats` starts at 0).
    pub const fn partials_offset(&self) -> u64 {
        self.stats_words * 4
    }

    /// Bytes of workspace: the stats and the partials.
    pub const fn workspace_bytes(&self) -> u64 {
        self.partials_offset() + self.stats_words * self.key_splits as u64 * 4
    }
}

/// Plans an aggregation of windows of up to `window` queries over head slots of up to
/// `max_context_len` keys, with `resident` CTAs of pass 1 and of pass 2 on the device at once.
/// Pass 1 splits the keys so that its grid fills about one wave (within
/// [`MAX_PARTIAL_WORDS`]); pass 2 gives each CTA an equal range of keys so that its grid fills
/// whole waves, within [`MAX_SCORE_KEYS`].
pub fn plan_aggregate(
    geometry: &Geometry,
    dtype: DType,
    window: u32,
    max_context_len: u32,
    (stats_resident, scores_resident): (u32, u32),
    hopper: bool,
) -> AggregatePlan {
    let (head_dim, elem_bytes) = (geometry.head_dim, dtype.elem_bytes());
    let threads = [AGG_WARPS * WARP_SIZE, 1, 1];
    let rows = window * geometry.group_size;
    let row_chunks = rows.div_ceil(agg_rows(head_dim, elem_bytes)).max(1);
    let heads = geometry.num_kv_heads * geometry.num_seqs;
    // Pass 1's key tiles (its splits are whole tiles); pass 2's are `agg_tile_keys`.
    let stats_tile_keys = if agg_ws_stats(head_dim, elem_bytes, hopper) {
        WS_TILE_KEYS
    } else {
        agg_tile_keys(head_dim, elem_bytes)
    };
    let ws_scores = agg_ws_scores(head_dim, elem_bytes, geometry.group_size, window, hopper);
    let key_tiles = max_context_len.div_ceil(stats_tile_keys).max(1);
    let stats_words = heads as u64 * rows as u64 * 2;
    let by_memory = (MAX_PARTIAL_WORDS / stats_words.max(1)).max(1) as u32;
    let key_splits = stats_resident
        .div_ceil(row_chunks * heads)
        .clamp(1, key_tiles)
        .min(by_memory);
    let split_kvs = key_tiles.div_ceil(key_splits) * stats_tile_keys;
    let key_splits = max_context_len.div_ceil(split_kvs).max(1);
    // A pass-2 CTA walks its keys and SCORE_HALO on each side in whole key tiles: owning `t`
    // tiles less the halo, its walk is `t` tiles, not `t + 1` with the last one mostly halo.
    // `t` is the fewest (at most the most keys a CTA owns) whose CTAs fit the resident ones.
    // The warp-specialized walk starts at a block (its tiles are whole blocks), so its owned
    // keys are whole blocks and the halo before them is a block at least.
    let (tile_keys, most_keys) = if ws_scores {
        (WS_TILE_KEYS, WS_SCORE_KEYS)
    } else {
        (agg_tile_keys(head_dim, elem_bytes), MAX_SCORE_KEYS)
    };
    let block = geometry.block_size.max(1);
    let owns = |tiles: u32| {
        if ws_scores {
            (tiles * tile_keys - block.max(SCORE_HALO) - SCORE_HALO) / block * block
        } else {
            tiles * tile_keys - 2 * SCORE_HALO
        }
    };
    let mut score_tiles = 1;
    while owns(score_tiles + 1) <= most_keys
        && max_context_len.div_ceil(owns(score_tiles)) * heads > scores_resident
    {
        score_tiles += 1;
    }
    let score_kvs = owns(score_tiles);
    let cta = |columns| {
        agg_cta(
            head_dim,
            elem_bytes,
            (geometry.group_size, window),
            columns,
            hopper,
        )
    };
    let (stats_threads, stats_smem) = cta(false);
    let (scores_threads, scores_smem) = cta(true);
    let stats = LaunchDims {
        grid: [
            row_chunks * key_splits,
            geometry.num_kv_heads,
            geometry.num_seqs,
        ],
        block: [stats_threads, 1, 1],
        smem_bytes: stats_smem,
    };
    let merge = (key_splits > 1).then_some(LaunchDims {
        grid: [
            rows.div_ceil(AGG_WARPS),
            geometry.num_kv_heads,
            geometry.num_seqs,
        ],
        block: threads,
        smem_bytes: 0,
    });
    let scores = LaunchDims {
        grid: [
            max_context_len.div_ceil(score_kvs).max(1),
            geometry.num_kv_heads,
            geometry.num_seqs,
        ],
        block: [scores_threads, 1, 1],
        smem_bytes: scores_smem,
    };
    AggregatePlan {
        stats,
        merge,
        scores,
        key_splits,
        split_kvs,
        score_kvs,
        row_chunks,
        stats_words,
    }
}

// ---------------------------------------------------------------------------------------------
// Compression step (SPEC §5-§7)

/// Threads per CTA of the scheduling and compaction kernels.
pub const COMPRESS_THREADS: u32 = 256;
/// Bytes one CTA of `sched_init` clears (8 16-byte stores a thread).
pub const INIT_CTA_BYTES: u32 = COMPRESS_THREADS * 16 * 8;
/// KVs one histogram CTA reads.
pub const HIST_CHUNK_KVS: u32 = 4096;
/// Threads per CTA of the last histogram pass (`compress::LISTED_PASS`), which mostly reads
/// its chunk's candidate list, a few entries a thread: small CTAs, so that its many short,
/// latency-bound CTAs fit an SM in larger numbers and run in fewer waves.
pub const LISTED_THREADS: u32 = 64;
/// Threads per CTA of the budget and digit kernels (`sched_budget`, `sched_digit`): a warp
/// per head slot; a budget CTA scans all head slots of its sequence, a digit CTA one slice of
/// [`crate::params::compress::SLICE_HEADS`] of its group.
pub const SCAN_THREADS: u32 = 512;
/// Warps per budget or digit CTA.
pub const SCAN_WARPS: u32 = SCAN_THREADS / WARP_SIZE;
const _: () = assert!(SCAN_WARPS == crate::params::compress::SLICE_HEADS);
/// Threads of a compaction CTA (one head slot each), `compact` then `compact_narrow`: the
/// narrow CTAs fit an SM four at a time (100 registers a thread, allocated 256 a warp), the
/// 16 warps of two wide CTAs in four independent ones, so that fewer of an SM's warps wait
/// in a CTA's latency-bound select and scans while the others copy, which pays when
/// head slots are many (rate 8 on an H100: 16 x 8192, 31 head slots an SM, compaction 1.647
/// ms against 1.664; 2 x 8192, 3.9 an SM, 0.218 against 0.227); with about two an SM or
/// fewer, narrow CTAs leave SMs half empty of warps and wide ones are faster (1 x 32768:
/// 0.420 against 0.492 ms). docs/PERF.md, compression v20.
pub const COMPACT_THREADS: [u32; 2] = [256, 128];
/// Head slots per SM from which a step compacts with narrow CTAs (`COMPACT_THREADS[1]`):
/// between the 1.9 and the 3.9 measured.
pub const COMPACT_NARROW_HEADS_PER_SM: u32 = 3;

/// Logical KVs one scan tile of a compaction CTA of `threads` covers (each thread examines
/// 8 at once).
pub const fn compact_tile(threads: u32) -> u32 {
    8 * threads
}

/// Moves a compaction round gathers before it copies: each queue is refilled while it holds
/// fewer. Larger rounds mean fewer barriers and more copies in flight per round.
pub const fn compact_round(threads: u32) -> u32 {
    4 * threads
}

/// Capacity of each of the compaction kernel's hole and mover queues, in entries a thread:
/// refilled while below `compact_round` entries, a tile adds at most `compact_tile`.
pub const COMPACT_QUEUE_PER_THREAD: u32 = 12;
const _: () = assert!(compact_round(1) + compact_tile(1) == COMPACT_QUEUE_PER_THREAD);

/// Capacity of each of the compaction kernel's hole and mover queues.
pub const fn compact_queue(threads: u32) -> u32 {
    COMPACT_QUEUE_PER_THREAD * threads
}

/// Shared memory of a compaction CTA of `threads`, in u32 words from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompactSmem {
    /// `[RADIX_BINS]` select histogram, at word 0.
    pub bins: usize,
    /// `[8]` select and queue state.
    pub state: usize,
    /// `[8, warps]` ballot counts (8 indices examined per thread per tile).
    pub warp_counts: usize,
    /// `[compact_queue]` hole logical indices (then pool slots, during a round's moves).
    pub holes: usize,
    /// `[compact_queue]` mover logical indices (then pool slots, during a round's moves).
    pub movers: usize,
    /// `[compact_queue]` each queued mover's metric bits, as its scan read them.
    pub mover_metrics: usize,
    /// `[compact_queue]` each queued mover's position, as its scan read it.
    pub mover_positions: usize,
    /// Words in all.
    pub words: usize,
}

/// The shared-memory map of a compaction CTA of `threads`.
pub const fn compact_smem(threads: u32) -> CompactSmem {
    let queue = compact_queue(threads) as usize;
    let bins = 0;
    let state = bins + crate::params::compress::RADIX_BINS as usize;
    let warp_counts = state + 8;
    let holes = warp_counts + 8 * (threads / WARP_SIZE) as usize;
    let movers = holes + queue;
    let mover_metrics = movers + queue;
    let mover_positions = mover_metrics + queue;
    CompactSmem {
        bins,
        state,
        warp_counts,
        holes,
        movers,
        mover_metrics,
        mover_positions,
        words: mover_positions + queue,
    }
}

/// The compression launches for `num_work_seqs` sequences of `geometry` whose longest head
/// slot holds `max_context_len` KVs, groups of `group_heads` head slots, on a device of
/// `num_sms` SMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressPlan {
    /// Grid `(ceil(cleared bytes / INIT_CTA_BYTES))`.
    pub init: LaunchDims,
    /// Grid `(W * chunks_per_head)`.
    pub hist: LaunchDims,
    /// The same grid in CTAs of `LISTED_THREADS`, for `compress::LISTED_PASS`.
    pub hist_listed: LaunchDims,
    /// Grid `(num_work_seqs)`.
    pub budget: LaunchDims,
    /// Grid `(num_groups * slices)`.
    pub digit: LaunchDims,
    /// Grid `(W)` of `COMPACT_THREADS[0]` (entry `compact`) or, with `compact_narrow`,
    /// `COMPACT_THREADS[1]` (entry `compact_narrow`).
    pub compact: LaunchDims,
    /// Whether the step compacts with narrow CTAs (`COMPACT_NARROW_HEADS_PER_SM`).
    pub compact_narrow: bool,
    /// Histogram CTAs per work head slot.
    pub chunks_per_head: u32,
    /// Head slots compressed, `W`.
    pub num_work_heads: u32,
    /// Selection groups (budgets shared by `group_heads` head slots).
    pub num_groups: u32,
    /// Digit CTAs per group.
    pub slices: u32,
}

impl CompressPlan {
    /// Byte offsets in the workspace: `[seq_in, seq_out, heads, groups, status, hist]`.
    /// `sched_init` clears everything from `seq_out` to the end of the histograms' tickets.
    pub const fn offsets(&self, num_work_seqs: u32) -> [u64; 6] {
        let seq_in = 0;
        let seq_out =
            seq_in + num_work_seqs as u64 * crate::params::compress::SEQ_IN_WORDS as u64 * 4;
        let heads =
            seq_out + num_work_seqs as u64 * crate::params::compress::SEQ_OUT_WORDS as u64 * 4;
        let groups =
            heads + self.num_work_heads as u64 * crate::params::compress::HEAD_WORDS as u64 * 4;
        let status =
            groups + self.num_groups as u64 * crate::params::compress::GROUP_WORDS as u64 * 4;
        // 16-byte aligned: the digit and budget kernels read bins 4 at a time.
        let hist = (status + 4).next_multiple_of(16);
        [seq_in, seq_out, heads, groups, status, hist]
    }

    /// Bytes from `hist` that must be zero at launch: the histograms and the tickets
    /// (`CompressParams::ticket_word`).
    pub const fn hist_bytes(&self) -> u64 {
        crate::params::compress::tickets_end(self.num_work_heads, self.num_groups) * 4
    }

    /// KVs per work head slot in the high keys and evictable flags
    /// (`CompressParams::key_stride`).
    pub const fn key_stride(&self) -> u64 {
        crate::params::compress::key_stride(self.chunks_per_head)
    }

    /// Byte offsets of the high keys, the key bytes below them and the evictable flags
    /// (`CompressParams::key_high`, `key_mid`, `evictable`), after the partial sums of groups
    /// of several slices (`CompressParams::partial_word`); each 16-byte aligned (rows are
    /// whole histogram chunks).
    pub const fn digest_offsets(&self, num_work_seqs: u32) -> [u64; 3] {
        use crate::params::compress::{partial_words, partials_at};
        let words = partials_at(self.num_work_heads, self.num_groups)
            + partial_words(self.num_groups, self.slices);
        let key_high = (self.offsets(num_work_seqs)[5] + words * 4).next_multiple_of(16);
        let kvs = self.num_work_heads as u64 * self.key_stride();
        [key_high, key_high + 2 * kvs, key_high + 3 * kvs]
    }

    /// Byte offset of histogram pass 2's candidate lists (`CompressParams::candidates`),
    /// after the evictable flags, 16-byte aligned.
    pub const fn candidates_offset(&self, num_work_seqs: u32) -> u64 {
        let kvs = self.num_work_heads as u64 * self.key_stride();
        (self.digest_offsets(num_work_seqs)[2] + kvs / 8).next_multiple_of(16)
    }

    /// Bytes of workspace in all: the arrays of `offsets`, then those of `digest_offsets`,
    /// then the candidate lists.
    pub const fn workspace_bytes(&self, num_work_seqs: u32) -> u64 {
        let chunks = self.num_work_heads as u64 * self.chunks_per_head as u64;
        self.candidates_offset(num_work_seqs)
            + chunks * crate::params::compress::CANDIDATE_WORDS as u64 * 4
    }
}

/// Plans a compression step.
pub fn plan_compress(
    geometry: &Geometry,
    num_work_seqs: u32,
    group_heads: u32,
    max_context_len: u32,
    num_sms: u32,
) -> CompressPlan {
    let num_work_heads = num_work_seqs * geometry.num_layers * geometry.num_kv_heads;
    let compact_narrow = num_work_heads >= COMPACT_NARROW_HEADS_PER_SM * num_sms;
    let compact_threads = COMPACT_THREADS[compact_narrow as usize];
    let num_groups = num_work_heads / group_heads.max(1);
    let chunks_per_head = max_context_len.div_ceil(HIST_CHUNK_KVS).max(1);
    let dims = |grid: u32, smem_words: u32| LaunchDims {
        grid: [grid.max(1), 1, 1],
        block: [COMPRESS_THREADS, 1, 1],
        smem_bytes: smem_words * 4,
    };
    let scan_dims = |grid: u32, smem_words: u32| LaunchDims {
        block: [SCAN_THREADS, 1, 1],
        ..dims(grid, smem_words)
    };
    let bins = crate::params::compress::RADIX_BINS;
    let slices = crate::params::compress::slices(group_heads);
    let mut plan = CompressPlan {
        init: dims(1, 0),
        // The bins and, in pass 2, the chunk's candidate count.
        hist: dims(num_work_heads * chunks_per_head, bins + 1),
        hist_listed: LaunchDims {
            block: [LISTED_THREADS, 1, 1],
            ..dims(num_work_heads * chunks_per_head, bins + 1)
        },
        budget: scan_dims(num_work_seqs, 2 * SCAN_WARPS),
        digit: scan_dims(num_groups * slices, SCAN_WARPS * bins + 2),
        compact: LaunchDims {
            block: [compact_threads, 1, 1],
            ..dims(num_work_heads, compact_smem(compact_threads).words as u32)
        },
        compact_narrow,
        chunks_per_head,
        num_work_heads,
        num_groups,
        slices,
    };
    let [_, seq_out, _, _, _, hist] = plan.offsets(num_work_seqs);
    let cleared = hist - seq_out + plan.hist_bytes();
    plan.init = dims(cleared.div_ceil(INIT_CTA_BYTES as u64) as u32, 0);
    plan
}

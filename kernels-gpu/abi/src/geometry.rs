//! Cache geometry and its index math (SPEC §1-2). Every index into the pools, the block tables
//! and the per-head-slot arrays is computed here and nowhere else: device kernels, launchers,
//! validation, the CPU reference and the tests all call these functions.

use bytemuck::{Pod, Zeroable};

/// Shape of one per-head paged cache. Plain numbers, identical on host and device.
///
/// A *head slot* is one `(seq, layer, kv_head)`: the unit that owns blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Geometry {
    /// Sequence rows of the block tables (`num_seqs`).
    pub num_seqs: u32,
    /// Layers `L`.
    pub num_layers: u32,
    /// KV heads per layer `H`.
    pub num_kv_heads: u32,
    /// Query heads per KV head `G`.
    pub group_size: u32,
    /// Head dimension `D`, in elements.
    pub head_dim: u32,
    /// Block size `B` in KVs, a power of two.
    pub block_size: u32,
    /// Capacity of one head slot's block table, in blocks.
    pub max_blocks_per_head: u32,
    /// Blocks in the one physical pool.
    pub num_blocks: u32,
}

impl Geometry {
    /// Query heads per layer, `Hq = H * G`.
    #[inline(always)]
    pub const fn num_q_heads(&self) -> u32 {
        self.num_kv_heads * self.group_size
    }

    /// Head slots in the whole cache, `num_seqs * L * H`.
    #[inline(always)]
    pub const fn num_head_slots(&self) -> u64 {
        self.num_seqs as u64 * self.num_layers as u64 * self.num_kv_heads as u64
    }

    /// Index of head slot `(seq, layer, kv_head)` in `context_lens` `[num_seqs, L, H]`.
    #[inline(always)]
    pub const fn head_slot(&self, seq: u32, layer: u32, kv_head: u32) -> u64 {
        (seq as u64 * self.num_layers as u64 + layer as u64) * self.num_kv_heads as u64
            + kv_head as u64
    }

    /// Entries of `block_tables` `[num_seqs, L, H, max_blocks_per_head]`.
    #[inline(always)]
    pub const fn block_table_len(&self) -> u64 {
        self.num_head_slots() * self.max_blocks_per_head as u64
    }

    /// Index in `block_tables` of logical block `logical_block` of head slot `head_slot`.
    #[inline(always)]
    pub const fn block_table_at(&self, head_slot: u64, logical_block: u32) -> u64 {
        head_slot * self.max_blocks_per_head as u64 + logical_block as u64
    }

    /// Window query and query head of the group of row `row` of a KV head's window rows
    /// (`row = i G + g`; `G` is a power of two, validated, so no division).
    #[inline(always)]
    pub const fn window_row(&self, row: u32) -> (u32, u32) {
        (
            row >> self.group_size.trailing_zeros(),
            row & (self.group_size - 1),
        )
    }

    /// The logical block holding logical KV `logical_idx` of a head slot.
    #[inline(always)]
    pub const fn logical_block(&self, logical_idx: u32) -> u32 {
        logical_idx >> self.block_size.trailing_zeros()
    }

    /// The slot inside its block of logical KV `logical_idx`.
    #[inline(always)]
    pub const fn slot_in_block(&self, logical_idx: u32) -> u32 {
        logical_idx & (self.block_size - 1)
    }

    /// The logical blocks holding logical KVs `start..end` of a head slot (`start < end`): the
    /// first, and how many.
    #[inline(always)]
    pub const fn block_span(&self, start: u32, end: u32) -> (u32, u32) {
        let first = self.logical_block(start);
        (first, self.logical_block(end - 1) + 1 - first)
    }

    /// Blocks needed to hold `len` KVs (`block_size` is a power of two).
    #[inline(always)]
    pub const fn blocks_for(&self, len: u32) -> u32 {
        ((len as u64 + self.block_size as u64 - 1) >> self.block_size.trailing_zeros()) as u32
    }

    /// Index of `(block_id, slot)` in `metric` and `position` `[num_blocks, B]`.
    #[inline(always)]
    pub const fn pool_slot(&self, block_id: u32, slot: u32) -> u64 {
        block_id as u64 * self.block_size as u64 + slot as u64
    }

    /// Element index of the first of the `D` values of `(block_id, slot)` in `k_pool`/`v_pool`
    /// `[num_blocks, B, D]`.
    #[inline(always)]
    pub const fn kv_elem(&self, block_id: u32, slot: u32) -> u64 {
        self.pool_slot(block_id, slot) * self.head_dim as u64
    }

    /// Elements of one pool, `num_blocks * B * D`.
    #[inline(always)]
    pub const fn pool_elems(&self) -> u64 {
        self.num_blocks as u64 * self.block_size as u64 * self.head_dim as u64
    }

    /// Slots of the pool, `num_blocks * B` (the length of `metric` and `position`).
    #[inline(always)]
    pub const fn pool_slots(&self) -> u64 {
        self.num_blocks as u64 * self.block_size as u64
    }
}

/// The cache as a kernel sees it: the geometry and the device addresses of its arrays.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct CacheView {
    /// Shape of the cache the pointers below address.
    pub geometry: Geometry,
    /// `[num_blocks, B, D]`, cache dtype.
    pub k_pool: u64,
    /// `[num_blocks, B, D]`, cache dtype.
    pub v_pool: u64,
    /// `[num_blocks, B]`, f32: the running eviction score of each KV.
    pub metric: u64,
    /// `[num_blocks, B]`, i32: the token position of each KV.
    pub position: u64,
    /// `[num_seqs, L, H, max_blocks_per_head]`, i32 block ids.
    pub block_tables: u64,
    /// `[num_seqs, L, H]`, i32 live KVs per head slot.
    pub context_lens: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct, asymmetric extents so that a swapped pair of indices shows.
    const G: Geometry = Geometry {
        num_seqs: 3,
        num_layers: 5,
        num_kv_heads: 7,
        group_size: 2,
        head_dim: 64,
        block_size: 16,
        max_blocks_per_head: 11,
        num_blocks: 1000,
    };

    #[test]
    fn head_slot_is_row_major_seq_layer_head() {
        assert_eq!(G.head_slot(0, 0, 0), 0);
        assert_eq!(G.head_slot(0, 0, 1), 1);
        assert_eq!(G.head_slot(0, 1, 0), 7);
        assert_eq!(G.head_slot(1, 0, 0), 35);
        assert_eq!(G.head_slot(2, 4, 6), 2 * 35 + 4 * 7 + 6);
        assert_eq!(G.num_head_slots(), 105);
    }

    #[test]
    fn window_row_is_query_major() {
        for group_size in [1, 2, 4, 8] {
            let g = Geometry { group_size, ..G };
            for row in 0..100 {
                assert_eq!(g.window_row(row), (row / group_size, row % group_size));
            }
        }
    }

    #[test]
    fn block_table_is_head_slot_major() {
        assert_eq!(G.block_table_at(0, 3), 3);
        assert_eq!(G.block_table_at(2, 0), 22);
        assert_eq!(G.block_table_len(), 105 * 11);
    }

    #[test]
    fn logical_index_splits_into_block_and_slot() {
        for idx in [0u32, 1, 15, 16, 17, 97, 131071] {
            assert_eq!(G.logical_block(idx), idx / 16);
            assert_eq!(G.slot_in_block(idx), idx % 16);
        }
        assert_eq!(G.blocks_for(0), 0);
        assert_eq!(G.blocks_for(1), 1);
        assert_eq!(G.blocks_for(16), 1);
        assert_eq!(G.blocks_for(17), 2);
        assert_eq!(G.block_span(0, 1), (0, 1));
        assert_eq!(G.block_span(0, 16), (0, 1));
        assert_eq!(G.block_span(15, 17), (0, 2));
        assert_eq!(G.block_span(24, 1032), (1, 64));
    }

    #[test]
    fn pool_is_token_major() {
        assert_eq!(G.pool_slot(0, 5), 5);
        assert_eq!(G.pool_slot(3, 5), 3 * 16 + 5);
        assert_eq!(G.kv_elem(3, 5), (3 * 16 + 5) * 64);
        assert_eq!(G.pool_elems(), 1000 * 16 * 64);
        assert_eq!(G.pool_slots(), 16000);
    }

    #[test]
    fn indices_are_64_bit() {
        let big = Geometry {
            num_blocks: u32::MAX,
            head_dim: 256,
            block_size: 32,
            ..G
        };
        assert_eq!(
            big.kv_elem(u32::MAX - 1, 31),
            ((u32::MAX as u64 - 1) * 32 + 31) * 256
        );
    }
}

/// The order in which eviction compares metrics (SPEC §5, §8), as an unsigned key: smaller
/// key = evicted earlier. Finite values and infinities keep their order, `-0.0` equals `0.0`,
/// and every NaN is one key above `+inf` (the most valuable: evicted last). Host and device
/// both order by this key, so their schedules agree bit for bit.
#[inline(always)]
pub const fn metric_key(metric: f32) -> u32 {
    if metric.is_nan() {
        return u32::MAX;
    }
    let bits = if metric == 0.0 { 0 } else { metric.to_bits() };
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

#[cfg(test)]
mod metric_key_tests {
    use super::metric_key;

    #[test]
    fn metric_key_orders_like_the_floats_with_nan_last() {
        let ordered = [
            f32::NEG_INFINITY,
            -1e30,
            -1.0,
            -f32::MIN_POSITIVE,
            0.0,
            f32::MIN_POSITIVE,
            0.5,
            1.0,
            3e38,
            f32::INFINITY,
        ];
        for w in ordered.windows(2) {
            assert!(metric_key(w[0]) < metric_key(w[1]), "{} !< {}", w[0], w[1]);
        }
        assert_eq!(metric_key(-0.0), metric_key(0.0));
        assert_eq!(metric_key(f32::NAN), u32::MAX);
        assert_eq!(metric_key(-f32::NAN), u32::MAX);
        assert!(metric_key(f32::INFINITY) < metric_key(f32::NAN));
    }

    /// Over bit patterns spread across every exponent and sign (and the NaNs among them):
    /// keys compare as the floats do, and every NaN is `u32::MAX`.
    #[test]
    fn metric_key_agrees_with_float_comparison() {
        let values = (0..1u64 << 32)
            .step_by(65_521)
            .map(|bits| f32::from_bits(bits as u32))
            .chain([0.0, -0.0, 1.0, f32::INFINITY, f32::NEG_INFINITY, -0.0]);
        let mut previous = 0.0f32;
        for v in values {
            if v.is_nan() {
                assert_eq!(metric_key(v), u32::MAX, "{:#x}", v.to_bits());
                continue;
            }
            // Each number against the one before it: the walk rises through the positive
            // patterns and falls through the negative ones, and the tail adds both zeros and
            // the infinities, so less, greater and equal all occur.
            assert_eq!(
                metric_key(previous).cmp(&metric_key(v)),
                previous.partial_cmp(&v).unwrap(),
                "{previous} vs {v}"
            );
            previous = v;
        }
    }
}

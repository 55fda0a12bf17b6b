//! The CPU reference: every kernel's contract written as plain loops over logical KVs, with
//! f64 accumulation and no tiling, following SPEC.md literally. The CPU backend runs these;
//! the GPU tests compare the kernels against them.

mod aggregate;
mod append;
mod compact;
mod decode;
mod schedule;

pub use aggregate::{aggregate, AggregateRef};
pub use append::append_kv;
pub use compact::compact;
pub use decode::{decode, RecordArgs};
pub use schedule::{
    eviction_order, evictions_for, schedule_seq, HeadSchedule, SeqInput, SeqSchedule,
};

use kvc_abi::{DType, Geometry};

use crate::dtype::read_elem;

/// The cache arrays on the host that attention reads (`metric` is passed apart, to be written).
pub struct HostCache<'a> {
    /// Shape of the cache.
    pub geometry: Geometry,
    /// Element type of `k_pool`/`v_pool`.
    pub dtype: DType,
    /// `[num_blocks, B, D]` K bytes of the cache dtype.
    pub k_pool: &'a [u8],
    /// V bytes, laid out as `k_pool`.
    pub v_pool: &'a [u8],
    /// `[num_blocks, B]` token positions.
    pub position: &'a [i32],
    /// `[num_seqs, L, H, max_blocks_per_head]` block ids, -1 unused.
    pub block_tables: &'a [i32],
    /// `[num_seqs, L, H]` live KVs per head slot.
    pub context_lens: &'a [i32],
}

/// The cache arrays on the host, for kernels that write them.
pub struct HostCacheMut<'a> {
    /// Shape of the cache.
    pub geometry: Geometry,
    /// Element type of `k_pool`/`v_pool`.
    pub dtype: DType,
    /// `[num_blocks, B, D]` K bytes of the cache dtype.
    pub k_pool: &'a mut [u8],
    /// V bytes, laid out as `k_pool`.
    pub v_pool: &'a mut [u8],
    /// `[num_blocks, B]` running eviction scores.
    pub metric: &'a mut [f32],
    /// `[num_blocks, B]` token positions.
    pub position: &'a mut [i32],
    /// `[num_seqs, L, H, max_blocks_per_head]` block ids, -1 unused.
    pub block_tables: &'a mut [i32],
    /// `[num_seqs, L, H]` live KVs per head slot.
    pub context_lens: &'a mut [i32],
}

impl HostCache<'_> {
    /// Live KVs of a head slot.
    pub fn len(&self, head_slot: u64) -> u32 {
        self.context_lens[head_slot as usize] as u32
    }

    /// The physical `(block_id, slot)` of logical KV `logical_idx` of a head slot.
    pub fn locate(&self, head_slot: u64, logical_idx: u32) -> (u32, u32) {
        let g = &self.geometry;
        let block =
            self.block_tables[g.block_table_at(head_slot, g.logical_block(logical_idx)) as usize];
        (block as u32, g.slot_in_block(logical_idx))
    }

    /// The `D` values of K (or V, with `pool = v_pool`) of logical KV `logical_idx`, widened.
    pub fn row(&self, pool: &[u8], head_slot: u64, logical_idx: u32) -> Vec<f64> {
        let (block, slot) = self.locate(head_slot, logical_idx);
        let first = self.geometry.kv_elem(block, slot) as usize;
        (0..self.geometry.head_dim as usize)
            .map(|d| read_elem(self.dtype, pool, first + d))
            .collect()
    }
}

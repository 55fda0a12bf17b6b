//! The per-head paged KV cache (SPEC §2): one pool of blocks for all sequences, layers and
//! heads, block tables and lengths per head slot, and the host allocator.
//!
//! The host owns the truth about which block belongs to which head slot: `block_tables`,
//! `context_lens` and `last_position` live in host memory, and on the CUDA backend every
//! change is sent to the device copy in the same launch that needs it (as patches, see
//! `ops::append`). So the tables are valid by construction, and a table imported with
//! [`PagedKvCache::from_snapshot`] is validated once, on import.

use std::borrow::Cow;
use std::sync::Arc;

use cudarc::driver::CudaSlice;
use kvc_abi::plan::decode_counter_words;
use kvc_abi::{CacheView, DType, Geometry};

use crate::allocator::BlockAllocator;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::ops;
use crate::ops::append::{AppendMeta, Patch};
use crate::reference::{self, AggregateRef, HostCache, HostCacheMut, RecordArgs};
use crate::tensor::{Storage, Tensor};
use crate::validate;

/// Shape and element type of a cache (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Sequence rows: the batch slots an engine maps its requests to.
    pub num_seqs: u32,
    /// Layers `L`.
    pub num_layers: u32,
    /// KV heads per layer `H`.
    pub num_kv_heads: u32,
    /// Query heads per KV head `G` (1, 2, 4 or 8).
    pub group_size: u32,
    /// Head dimension `D` (64, 128 or 256).
    pub head_dim: u32,
    /// KVs per block `B` (8, 16 or 32).
    pub block_size: u32,
    /// Capacity of one head slot, in blocks.
    pub max_blocks_per_head: u32,
    /// Blocks in the shared pool.
    pub num_blocks: u32,
    /// Element type of K, V, queries and outputs.
    pub dtype: DType,
}

impl CacheConfig {
    /// The geometry the kernels see.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            num_seqs: self.num_seqs,
            num_layers: self.num_layers,
            num_kv_heads: self.num_kv_heads,
            group_size: self.group_size,
            head_dim: self.head_dim,
            block_size: self.block_size,
            max_blocks_per_head: self.max_blocks_per_head,
            num_blocks: self.num_blocks,
        }
    }
}

/// A host copy of every array of a cache, in the layouts of SPEC §2. Block-table entries past
/// a head slot's live blocks are -1.
#[derive(Clone, Debug, PartialEq)]
pub struct CacheSnapshot {
    /// `[num_blocks, B, D]`, little-endian bytes of the cache dtype.
    pub k_pool: Vec<u8>,
    /// `[num_blocks, B, D]`, little-endian bytes of the cache dtype.
    pub v_pool: Vec<u8>,
    /// `[num_blocks, B]`.
    pub metric: Vec<f32>,
    /// `[num_blocks, B]`.
    pub position: Vec<i32>,
    /// `[num_seqs, L, H, max_blocks_per_head]`.
    pub block_tables: Vec<i32>,
    /// `[num_seqs, L, H]`.
    pub context_lens: Vec<i32>,
    /// `[num_seqs]`: the newest position appended to the sequence, -1 before the first.
    pub last_position: Vec<i32>,
}

/// Device copies of the cache arrays.
pub(crate) struct DeviceArrays {
    pub(crate) gpu: Arc<Gpu>,
    pub(crate) k_pool: CudaSlice<u8>,
    pub(crate) v_pool: CudaSlice<u8>,
    pub(crate) metric: CudaSlice<u8>,
    pub(crate) position: CudaSlice<u8>,
    pub(crate) block_tables: CudaSlice<u8>,
    pub(crate) context_lens: CudaSlice<u8>,
    /// Decode recording's state between calls.
    pub(crate) recording: RecordingState,
    /// Window aggregation's `[num_seqs, 3]` i32 per-sequence inputs (window length, last
    /// position, metric_skip), copied once per prefill, not once per layer: a copy before
    /// the first kernel cost each call a few microseconds of the stream.
    pub(crate) windows: HeldArray,
    /// The TMA tensor map over `k_pool` that the warp-specialized passes read their key tiles
    /// through (`kvc_abi::plan::agg_ws_stats`), encoded and copied on first use: it depends on
    /// the pool alone.
    k_map: Option<CudaSlice<u8>>,
}

/// What decode recording keeps on the device between calls.
pub(crate) struct RecordingState {
    /// `[decode_counter_words]` u32 handshake counters: allocated zeroed, left zero by every
    /// launch.
    pub(crate) counters: CudaSlice<u8>,
    /// `[num_seqs]` i32 thresholds `last_position - metric_skip`, copied once per decode step,
    /// not once per layer.
    pub(crate) thresholds: HeldArray,
}

/// An i32 array kept on the device between calls and copied there only when the values a
/// call passes differ from the last ones copied.
pub(crate) struct HeldArray {
    /// The device copy.
    pub(crate) buf: CudaSlice<u8>,
    /// What `buf` holds (`None` before the first copy).
    held: Option<Vec<i32>>,
}

impl HeldArray {
    /// Room for `len` values, none held yet.
    fn new(gpu: &Gpu, len: usize) -> Result<Self> {
        Ok(Self {
            buf: gpu.alloc(len * 4)?,
            held: None,
        })
    }

    /// Makes the device copy hold `values`, copying them (stream-ordered, after the launches
    /// queued before) unless it holds them already.
    pub(crate) fn update(&mut self, gpu: &Gpu, values: &[i32]) -> Result<()> {
        if self.held.as_deref() != Some(values) {
            gpu.write_at(bytemuck::cast_slice(values), &mut self.buf, 0)?;
            self.held = Some(values.to_vec());
        }
        Ok(())
    }
}

impl DeviceArrays {
    /// Device address of the tensor map over `k_pool` as a 2-D tensor `[slots, D]` of 16-bit
    /// elements, boxes of 64 elements by one block's rows (`AggregateParams::k_map`).
    pub(crate) fn k_map(&mut self, g: Geometry) -> Result<u64> {
        if let Some(map) = &self.k_map {
            return Ok(self.gpu.addr(map));
        }
        // TMA coordinates are signed 32-bit: no GPU today holds a K pool this large.
        if g.pool_slots() > i32::MAX as u64 {
            return Err(Error::Unsupported {
                what: "pool slots for the TMA aggregation",
                value: format!("{} (at most {})", g.pool_slots(), i32::MAX),
            });
        }
        let gpu = &self.gpu;
        let map = gpu.tensor_map(
            gpu.addr(&self.k_pool),
            g.pool_slots(),
            g.head_dim * 2,
            g.block_size,
        )?;
        let map = self.k_map.insert(gpu.upload(&map)?);
        Ok(self.gpu.addr(map))
    }

    /// The cache as a kernel sees it.
    pub(crate) fn view(&self, geometry: Geometry) -> CacheView {
        let gpu = &self.gpu;
        CacheView {
            geometry,
            k_pool: gpu.addr(&self.k_pool),
            v_pool: gpu.addr(&self.v_pool),
            metric: gpu.addr(&self.metric),
            position: gpu.addr(&self.position),
            block_tables: gpu.addr(&self.block_tables),
            context_lens: gpu.addr(&self.context_lens),
        }
    }
}

/// Pools, metric and position of the CPU backend, in the layouts of SPEC §2.
pub(crate) struct HostArrays {
    pub(crate) k_pool: Vec<u8>,
    pub(crate) v_pool: Vec<u8>,
    pub(crate) metric: Vec<f32>,
    pub(crate) position: Vec<i32>,
}

impl HostArrays {
    /// The cache as the reference reads it, with the metric apart (decode and aggregation
    /// write it).
    pub(crate) fn view<'a>(
        &'a mut self,
        geometry: Geometry,
        dtype: DType,
        block_tables: &'a [i32],
        context_lens: &'a [i32],
    ) -> (HostCache<'a>, &'a mut [f32]) {
        let cache = HostCache {
            geometry,
            dtype,
            k_pool: &self.k_pool,
            v_pool: &self.v_pool,
            position: &self.position,
            block_tables,
            context_lens,
        };
        (cache, &mut self.metric)
    }

    /// The cache as the reference changes it.
    pub(crate) fn view_mut<'a>(
        &'a mut self,
        geometry: Geometry,
        dtype: DType,
        block_tables: &'a mut [i32],
        context_lens: &'a mut [i32],
    ) -> HostCacheMut<'a> {
        HostCacheMut {
            geometry,
            dtype,
            k_pool: &mut self.k_pool,
            v_pool: &mut self.v_pool,
            metric: &mut self.metric,
            position: &mut self.position,
            block_tables,
            context_lens,
        }
    }
}

/// Pools, metric and position: host vectors on the CPU backend, device buffers on CUDA.
pub(crate) enum Arrays {
    Host(HostArrays),
    Cuda(Box<DeviceArrays>),
}

/// The per-head paged KV cache of one model.
pub struct PagedKvCache {
    pub(crate) config: CacheConfig,
    pub(crate) allocator: BlockAllocator,
    pub(crate) block_tables: Vec<i32>,
    pub(crate) context_lens: Vec<i32>,
    pub(crate) last_position: Vec<i32>,
    pub(crate) arrays: Arrays,
}

impl std::fmt::Debug for PagedKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PagedKvCache")
            .field("config", &self.config)
            .field("backend", &self.backend().describe())
            .field("free_blocks", &self.allocator.num_free())
            .finish()
    }
}

impl PagedKvCache {
    /// An empty cache: every block free, every length 0, pools zeroed.
    pub fn new(backend: &Backend, config: CacheConfig) -> Result<Self> {
        validate::config(&config)?;
        let g = config.geometry();
        let pool_bytes = (g.pool_elems() * config.dtype.elem_bytes() as u64) as usize;
        let snapshot = CacheSnapshot {
            k_pool: vec![0; pool_bytes],
            v_pool: vec![0; pool_bytes],
            metric: vec![0.0; g.pool_slots() as usize],
            position: vec![-1; g.pool_slots() as usize],
            block_tables: vec![-1; g.block_table_len() as usize],
            context_lens: vec![0; g.num_head_slots() as usize],
            last_position: vec![-1; g.num_seqs as usize],
        };
        Self::from_any_snapshot(backend, config, Cow::Owned(snapshot))
    }

    /// A cache holding a copy of `snapshot`, validated (SPEC §8): sizes, live block ids inside
    /// the pool, no block owned by two head slots, lengths within the block table. The blocks
    /// no head slot owns are free. The snapshot is borrowed: a CUDA cache uploads the pools
    /// straight from it (one snapshot can seed many caches without a host copy of its pools).
    pub fn from_snapshot(
        backend: &Backend,
        config: CacheConfig,
        snapshot: &CacheSnapshot,
    ) -> Result<Self> {
        Self::from_any_snapshot(backend, config, Cow::Borrowed(snapshot))
    }

    /// [`PagedKvCache::from_snapshot`] for a borrowed or an owned snapshot: a CPU cache takes
    /// an owned snapshot's arrays without copying them (`new`'s zeroed pools).
    fn from_any_snapshot(
        backend: &Backend,
        config: CacheConfig,
        snapshot: Cow<'_, CacheSnapshot>,
    ) -> Result<Self> {
        validate::config(&config)?;
        let g = config.geometry();
        let owned = validate::snapshot(&g, config.dtype, &snapshot)?;
        let mut block_tables = snapshot.block_tables.clone();
        for head_slot in 0..g.num_head_slots() {
            let live = g.blocks_for(snapshot.context_lens[head_slot as usize] as u32);
            for logical_block in live..g.max_blocks_per_head {
                block_tables[g.block_table_at(head_slot, logical_block) as usize] = -1;
            }
        }
        let (context_lens, last_position) = (
            snapshot.context_lens.clone(),
            snapshot.last_position.clone(),
        );
        let arrays = match backend {
            Backend::Cpu => {
                let snapshot = snapshot.into_owned();
                Arrays::Host(HostArrays {
                    k_pool: snapshot.k_pool,
                    v_pool: snapshot.v_pool,
                    metric: snapshot.metric,
                    position: snapshot.position,
                })
            }
            Backend::Cuda(gpu) => Arrays::Cuda(Box::new(DeviceArrays {
                gpu: gpu.clone(),
                k_pool: gpu.upload(&snapshot.k_pool)?,
                v_pool: gpu.upload(&snapshot.v_pool)?,
                metric: gpu.upload(bytemuck::cast_slice(&snapshot.metric))?,
                position: gpu.upload(bytemuck::cast_slice(&snapshot.position))?,
                block_tables: gpu.upload(bytemuck::cast_slice(&block_tables))?,
                context_lens: gpu.upload(bytemuck::cast_slice(&snapshot.context_lens))?,
                recording: RecordingState {
                    counters: gpu.alloc(decode_counter_words(&g) as usize * 4)?,
                    thresholds: HeldArray::new(gpu, g.num_seqs as usize)?,
                },
                windows: HeldArray::new(gpu, g.num_seqs as usize * 3)?,
                k_map: None,
            })),
        };
        Ok(Self {
            config,
            allocator: BlockAllocator::from_in_use(&owned),
            block_tables,
            context_lens,
            last_position,
            arrays,
        })
    }

    /// The configuration.
    pub fn config(&self) -> CacheConfig {
        self.config
    }

    /// The geometry the kernels see.
    pub fn geometry(&self) -> Geometry {
        self.config.geometry()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.config.dtype
    }

    /// The backend holding the pools.
    pub fn backend(&self) -> Backend {
        match &self.arrays {
            Arrays::Host(_) => Backend::Cpu,
            Arrays::Cuda(d) => Backend::Cuda(d.gpu.clone()),
        }
    }

    /// The block allocator (read-only: blocks change hands through the cache's operations).
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// Randomises the order in which free blocks are handed out (see
    /// [`BlockAllocator::shuffle_free`]).
    pub fn shuffle_free_blocks<R: rand::Rng + ?Sized>(&mut self, rng: &mut R) {
        self.allocator.shuffle_free(rng);
    }

    /// Live KVs of head slot `(seq, layer, kv_head)`; indices must be in range.
    pub fn context_len(&self, seq: u32, layer: u32, kv_head: u32) -> u32 {
        self.context_lens[self.geometry().head_slot(seq, layer, kv_head) as usize] as u32
    }

    /// The longest head slot of `layer`.
    pub fn max_context_len(&self, layer: u32) -> u32 {
        let g = self.geometry();
        (0..g.num_seqs)
            .flat_map(|seq| (0..g.num_kv_heads).map(move |h| (seq, h)))
            .map(|(seq, h)| self.context_len(seq, layer, h))
            .max()
            .unwrap_or(0)
    }

    /// The live blocks of head slot `(seq, layer, kv_head)`, in logical order.
    pub fn blocks_of(&self, seq: u32, layer: u32, kv_head: u32) -> &[i32] {
        let g = self.geometry();
        let head_slot = g.head_slot(seq, layer, kv_head);
        let start = g.block_table_at(head_slot, 0) as usize;
        let live = g.blocks_for(self.context_lens[head_slot as usize] as u32) as usize;
        &self.block_tables[start..start + live]
    }

    /// The newest position appended to `seq`, or -1.
    pub fn last_position(&self, seq: u32) -> i32 {
        self.last_position[seq as usize]
    }

    /// A host copy of every array. On CUDA the tables and lengths are read back from the
    /// device, so the copy shows what the kernels see.
    pub fn snapshot(&self) -> Result<CacheSnapshot> {
        Ok(match &self.arrays {
            Arrays::Host(host) => CacheSnapshot {
                k_pool: host.k_pool.clone(),
                v_pool: host.v_pool.clone(),
                metric: host.metric.clone(),
                position: host.position.clone(),
                block_tables: self.block_tables.clone(),
                context_lens: self.context_lens.clone(),
                last_position: self.last_position.clone(),
            },
            Arrays::Cuda(d) => CacheSnapshot {
                k_pool: d.gpu.download(&d.k_pool)?,
                v_pool: d.gpu.download(&d.v_pool)?,
                metric: bytemuck::pod_collect_to_vec(&d.gpu.download(&d.metric)?),
                position: bytemuck::pod_collect_to_vec(&d.gpu.download(&d.position)?),
                block_tables: bytemuck::pod_collect_to_vec(&d.gpu.download(&d.block_tables)?),
                context_lens: bytemuck::pod_collect_to_vec(&d.gpu.download(&d.context_lens)?),
                last_position: self.last_position.clone(),
            },
        })
    }

    /// Checks the cache's invariants against a fresh snapshot (the device copy on CUDA): every
    /// live block id inside the pool and owned by one head slot, lengths within the tables,
    /// the allocator's allocated set equal to the owned blocks, and the host's tables equal to
    /// the device's. For tests and debugging; costs a full download.
    pub fn verify(&self) -> Result<()> {
        let snapshot = self.snapshot()?;
        let g = self.geometry();
        let owned = validate::snapshot(&g, self.config.dtype, &snapshot)?;
        if snapshot.block_tables != self.block_tables || snapshot.context_lens != self.context_lens
        {
            return Err(Error::invalid(
                "cache",
                "device tables that differ from the host's",
                "the host's block tables and lengths on the device",
            ));
        }
        let free = self.allocator.free_set()?;
        for (block, &owned) in owned.iter().enumerate() {
            if owned == (free[block / 64] >> (block % 64) & 1 == 1) {
                return Err(Error::invalid(
                    "cache",
                    format!("block {block} owned {owned}, allocated {}", !owned),
                    "the allocator's allocated blocks equal to the owned ones",
                ));
            }
        }
        Ok(())
    }

    /// Appends the K/V of new tokens of `layer` (SPEC §2): `new_tokens[seq]` tokens for each
    /// sequence row, in order, their rows of `k`/`v` `[num_tokens, H, D]` consecutive per
    /// sequence, each written to the next logical slot of every head slot `(seq, layer, h)`.
    /// Blocks are allocated as needed; `metric` starts at 0 and `position` is taken from
    /// `positions` (one per token). All or nothing: on any error the cache is unchanged.
    pub fn append_kv(
        &mut self,
        layer: u32,
        k: &Tensor,
        v: &Tensor,
        positions: &[i32],
        new_tokens: &[u32],
    ) -> Result<()> {
        let needed = validate::append(self, layer, k, v, positions, new_tokens)?;
        let blocks = self.allocator.allocate(needed as u32)?;
        let g = self.geometry();
        let mut next_block = blocks.into_iter();
        let mut patches = Vec::new();
        for (seq, &n) in new_tokens.iter().enumerate() {
            for kv_head in 0..g.num_kv_heads {
                let head_slot = g.head_slot(seq as u32, layer, kv_head);
                let len = self.context_lens[head_slot as usize] as u32;
                for logical_block in g.blocks_for(len)..g.blocks_for(len + n) {
                    let index = g.block_table_at(head_slot, logical_block);
                    let block = next_block.next().map_or(-1, |b| b as i32);
                    self.block_tables[index as usize] = block;
                    patches.push(Patch::table(index, block));
                }
            }
        }
        let backend_error = || validate::backend_mismatch("k");
        match &mut self.arrays {
            Arrays::Host(host) => {
                let (Storage::Host(k_new), Storage::Host(v_new)) = (&k.storage, &v.storage) else {
                    return Err(backend_error());
                };
                let cache = host.view_mut(
                    g,
                    self.config.dtype,
                    &mut self.block_tables,
                    &mut self.context_lens,
                );
                reference::append_kv(cache, layer, k_new, v_new, positions, new_tokens);
            }
            Arrays::Cuda(d) => {
                let (Storage::Cuda { buf: k_new, .. }, Storage::Cuda { buf: v_new, .. }) =
                    (&k.storage, &v.storage)
                else {
                    return Err(backend_error());
                };
                let mut dest_slots = Vec::with_capacity(k.elems() / g.head_dim as usize);
                for (seq, &n) in new_tokens.iter().enumerate() {
                    for within in 0..n {
                        for kv_head in 0..g.num_kv_heads {
                            let head_slot = g.head_slot(seq as u32, layer, kv_head);
                            let logical = self.context_lens[head_slot as usize] as u32 + within;
                            let index = g.block_table_at(head_slot, g.logical_block(logical));
                            let block = self.block_tables[index as usize] as u32;
                            dest_slots.push(g.pool_slot(block, g.slot_in_block(logical)) as u32);
                        }
                    }
                }
                for (seq, &n) in new_tokens.iter().enumerate() {
                    for kv_head in 0..g.num_kv_heads {
                        let head_slot = g.head_slot(seq as u32, layer, kv_head);
                        self.context_lens[head_slot as usize] += n as i32;
                        if n > 0 {
                            patches.push(Patch::len(
                                &g,
                                head_slot,
                                self.context_lens[head_slot as usize],
                            ));
                        }
                    }
                }
                let meta = AppendMeta {
                    dest_slots,
                    positions,
                    patches,
                };
                ops::append::append_kv(d, g, self.config.dtype, k_new, v_new, &meta)?;
            }
        }
        let mut token = 0usize;
        for (seq, &n) in new_tokens.iter().enumerate() {
            for &p in &positions[token..token + n as usize] {
                self.last_position[seq] = self.last_position[seq].max(p);
            }
            token += n as usize;
        }
        Ok(())
    }

    /// Returns every block of sequence row `seq` to the allocator and empties its head slots
    /// (SPEC §7: a sequence that finishes). Returns the number of blocks freed.
    pub fn free_sequence(&mut self, seq: u32) -> Result<u32> {
        let g = self.geometry();
        validate::seq(&g, seq)?;
        let mut blocks = Vec::new();
        let mut patches = Vec::new();
        for layer in 0..g.num_layers {
            for kv_head in 0..g.num_kv_heads {
                let head_slot = g.head_slot(seq, layer, kv_head);
                for logical_block in 0..g.blocks_for(self.context_lens[head_slot as usize] as u32) {
                    let index = g.block_table_at(head_slot, logical_block);
                    blocks.push(self.block_tables[index as usize] as u32);
                    patches.push(Patch::table(index, -1));
                }
                patches.push(Patch::len(&g, head_slot, 0));
            }
        }
        self.allocator.free_owned(&blocks)?;
        for layer in 0..g.num_layers {
            for kv_head in 0..g.num_kv_heads {
                let head_slot = g.head_slot(seq, layer, kv_head);
                let first = g.block_table_at(head_slot, 0) as usize;
                self.block_tables[first..first + g.max_blocks_per_head as usize].fill(-1);
                self.context_lens[head_slot as usize] = 0;
            }
        }
        self.last_position[seq as usize] = -1;
        if let Arrays::Cuda(d) = &self.arrays {
            ops::append::apply_patches(d, g, self.config.dtype, patches)?;
        }
        Ok(blocks.len() as u32)
    }

    /// Observation-window score aggregation after a prefill of `layer` (SPEC §4): the window
    /// queries `q` `[num_seqs, w, Hq, D]` of each sequence row score every key of its head
    /// slots, causally by position, and each key's metric grows by the group sum of its
    /// (max-pooled) squared attention (or attention). Works in memory linear in the window
    /// and the prompt, also for `w` equal to the prompt length. It reads the keys twice: once
    /// for each query's softmax max and sum, once for the probabilities.
    pub fn aggregate(&mut self, layer: u32, q: &Tensor, args: &AggregateArgs) -> Result<()> {
        self.aggregate_from(layer, q, None, args)
    }

    /// [`PagedKvCache::aggregate`] given each window query's log-sum-exp `lse` `[num_seqs, w,
    /// Hq]` f32, the natural log of `sum exp(scale * q . k)` over the keys the query sees, as
    /// the prefill's attention computed it (FlashAttention's `softmax_lse`): the probabilities
    /// are `exp(scale * q . k - lse)`, and the keys are read once. Entries of queries past a
    /// sequence's window length are not read. A wrong `lse` scales that query's probabilities
    /// (a NaN one gives NaN metrics, which are never evicted first).
    pub fn aggregate_with_lse(
        &mut self,
        layer: u32,
        q: &Tensor,
        lse: &Tensor,
        args: &AggregateArgs,
    ) -> Result<()> {
        self.aggregate_from(layer, q, Some(lse), args)
    }

    fn aggregate_from(
        &mut self,
        layer: u32,
        q: &Tensor,
        lse: Option<&Tensor>,
        args: &AggregateArgs,
    ) -> Result<()> {
        validate::aggregate(self, layer, q, lse, args)?;
        let g = self.geometry();
        let max_context_len = self.max_context_len(layer);
        let window = q.shape()[1] as u32;
        let lse = lse.map(|t| &t.storage);
        match (&mut self.arrays, &q.storage, lse) {
            (Arrays::Host(host), Storage::Host(q), None | Some(Storage::Host(_))) => {
                let (cache, metric) =
                    host.view(g, self.config.dtype, &self.block_tables, &self.context_lens);
                let reference_args = AggregateRef {
                    q,
                    lse: match lse {
                        Some(Storage::Host(lse)) => Some(lse),
                        _ => None,
                    },
                    window,
                    window_lens: args.window_lens,
                    scale: args.scale,
                    metric: args.metric,
                    metric_skip: args.metric_skip,
                    last_position: &self.last_position,
                    pool_kernel: args.pool_kernel,
                };
                reference::aggregate(&cache, layer, &reference_args, metric);
                Ok(())
            }
            (Arrays::Cuda(d), Storage::Cuda { buf: q, .. }, None | Some(Storage::Cuda { .. })) => {
                let seq_info = (0..g.num_seqs as usize)
                    .flat_map(|s| {
                        [
                            args.window_lens[s] as i32,
                            self.last_position[s],
                            args.metric_skip[s],
                        ]
                    })
                    .collect();
                let job = ops::aggregate::AggregateJob {
                    layer,
                    max_context_len,
                    q,
                    lse: match lse {
                        Some(Storage::Cuda { buf, .. }) => Some(buf),
                        _ => None,
                    },
                    window,
                    args,
                    seq_info,
                };
                ops::aggregate::aggregate(d, g, self.config.dtype, job)
            }
            _ => Err(validate::backend_mismatch("q")),
        }
    }

    /// Paged decode attention of `layer` (SPEC §3): for every sequence row and query head,
    /// softmax(`scale * q . K`) `V` over the live KVs of its head slot, written to `out`
    /// `[num_seqs, Hq, D]` in the cache dtype. A head slot with no live KVs gives zeros.
    /// With `args.record`, the attention each KV got is added to its `metric` in the same pass.
    pub fn decode(
        &mut self,
        layer: u32,
        q: &Tensor,
        out: &mut Tensor,
        args: &DecodeArgs,
    ) -> Result<()> {
        validate::decode(self, layer, q, out, args)?;
        let g = self.geometry();
        let max_context_len = self.max_context_len(layer);
        match (&mut self.arrays, &q.storage, &mut out.storage) {
            (Arrays::Host(host), Storage::Host(q), Storage::Host(out)) => {
                let (cache, metric) =
                    host.view(g, self.config.dtype, &self.block_tables, &self.context_lens);
                let record = args.record.map(|r| RecordArgs {
                    metric: r.metric,
                    last_position: &self.last_position,
                    metric_skip: r.metric_skip,
                });
                reference::decode(&cache, layer, q, args.scale, out, metric, record.as_ref());
                Ok(())
            }
            (Arrays::Cuda(d), Storage::Cuda { buf: q, .. }, Storage::Cuda { buf: out, .. }) => {
                let thresholds: Option<Vec<i32>> = args.record.map(|r| {
                    self.last_position
                        .iter()
                        .zip(r.metric_skip)
                        .map(|(&last, &skip)| last.saturating_sub(skip))
                        .collect()
                });
                let job = ops::decode::DecodeJob {
                    layer,
                    max_context_len,
                    q,
                    out,
                    args,
                    thresholds: thresholds.as_deref(),
                };
                ops::decode::decode(d, g, self.config.dtype, job)
            }
            _ => Err(validate::backend_mismatch("q")),
        }
    }
}

/// Options of [`PagedKvCache::aggregate`] (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AggregateArgs<'a> {
    /// Softmax scale applied to `q . k`; must be finite.
    pub scale: f32,
    /// Squared attention (L2) or attention (L1).
    pub metric: Metric,
    /// `[num_seqs]`, each `>= 0`: a query at position `p` counts only keys with position
    /// `<= p - metric_skip`.
    pub metric_skip: &'a [i32],
    /// `[num_seqs]`: how many queries of each sequence row's window are given (the first
    /// `window_lens[seq]` rows of `q[seq]`, its last prompt tokens in order); 0 skips the row.
    /// At most the window extent of `q` and the tokens written (`last_position + 1`).
    pub window_lens: &'a [u32],
    /// Odd max-pool width over neighbouring logical keys, 1 (no pooling) to
    /// [`kvc_abi::plan::MAX_POOL_KERNEL`]; [`AggregateArgs::DEFAULT_POOL_KERNEL`] is 7.
    pub pool_kernel: u32,
}

impl<'a> AggregateArgs<'a> {
    /// The pooling width of SPEC §4's default.
    pub const DEFAULT_POOL_KERNEL: u32 = 7;

    /// The usual options: scale `1 / sqrt(head_dim)`, squared attention (L2), max-pool
    /// [`AggregateArgs::DEFAULT_POOL_KERNEL`].
    pub fn for_head_dim(head_dim: u32, metric_skip: &'a [i32], window_lens: &'a [u32]) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            metric: Metric::L2,
            metric_skip,
            window_lens,
            pool_kernel: Self::DEFAULT_POOL_KERNEL,
        }
    }
}

/// What attention statistic accumulates into `metric` (SPEC §3, §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// Squared attention probability, summed over the query heads of a group (the paper's).
    L2,
    /// Attention probability, summed over the query heads of a group.
    L1,
}

impl Metric {
    /// The kernels' code for it.
    pub(crate) fn code(self) -> u32 {
        match self {
            Metric::L2 => kvc_abi::params::record::L2,
            Metric::L1 => kvc_abi::params::record::L1,
        }
    }
}

/// Metric recording of one decode step (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recording<'a> {
    /// Squared attention (L2) or attention (L1).
    pub metric: Metric,
    /// `[num_seqs]`, each `>= 0`: the KVs of a sequence with position `> last_position -
    /// metric_skip` are not recorded (the newest tokens, which no later query has seen yet).
    pub metric_skip: &'a [i32],
}

/// Options of [`PagedKvCache::decode`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeArgs<'a> {
    /// Softmax scale applied to `q . k` (usually `1 / sqrt(D)`); must be finite.
    pub scale: f32,
    /// KVs per partition of the split (flash-decoding) path; `None` lets the planner choose
    /// from the batch, the lengths and the SM count. Results agree up to float rounding
    /// whatever the split. Ignored by the CPU backend.
    pub partition_kvs: Option<u32>,
    /// Metric recording in the same pass, or `None`.
    pub record: Option<Recording<'a>>,
}

impl DecodeArgs<'static> {
    /// The usual scale `1 / sqrt(head_dim)`, the planner's split, no recording.
    pub fn for_head_dim(head_dim: u32) -> Self {
        Self {
            scale: 1.0 / (head_dim as f32).sqrt(),
            partition_kvs: None,
            record: None,
        }
    }
}

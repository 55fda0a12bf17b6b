//! Input validation for every public entry point (SPEC §8). Both backends call the same
//! functions before touching anything, so they reject the same inputs with the same errors.

use kvc_abi::{DType, Geometry};

use crate::backend::Backend;
use crate::cache::{AggregateArgs, CacheConfig, CacheSnapshot, DecodeArgs, PagedKvCache};
use crate::compress::{Budget, CompressArgs};
use crate::error::{Error, Result};
use crate::gpu::{BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS};
use crate::tensor::Tensor;

/// A cache configuration the kernels support, whose indices fit their integer types.
pub(crate) fn config(config: &CacheConfig) -> Result<()> {
    let g = config.geometry();
    for (arg, value) in [
        ("num_seqs", g.num_seqs),
        ("num_layers", g.num_layers),
        ("num_kv_heads", g.num_kv_heads),
        ("max_blocks_per_head", g.max_blocks_per_head),
        ("num_blocks", g.num_blocks),
    ] {
        if value == 0 {
            return Err(Error::invalid(arg, value, "at least 1"));
        }
    }
    if !HEAD_DIMS.contains(&g.head_dim) {
        return Err(Error::Unsupported {
            what: "head_dim",
            value: format!("{} (supported: {HEAD_DIMS:?})", g.head_dim),
        });
    }
    if !BLOCK_SIZES.contains(&g.block_size) {
        return Err(Error::Unsupported {
            what: "block_size",
            value: format!("{} (supported: {BLOCK_SIZES:?})", g.block_size),
        });
    }
    if !GROUP_SIZES.contains(&g.group_size) {
        return Err(Error::Unsupported {
            what: "group_size",
            value: format!("{} (supported: {GROUP_SIZES:?})", g.group_size),
        });
    }
    if g.num_blocks > i32::MAX as u32 || g.pool_slots() > u32::MAX as u64 {
        return Err(Error::invalid(
            "num_blocks",
            g.num_blocks,
            "block ids that fit i32 and pool slots that fit u32",
        ));
    }
    if g.max_blocks_per_head as u64 * g.block_size as u64 > i32::MAX as u64 {
        return Err(Error::invalid(
            "max_blocks_per_head",
            g.max_blocks_per_head,
            "lengths that fit i32",
        ));
    }
    if g.block_table_len() + g.num_head_slots() > u32::MAX as u64 {
        return Err(Error::invalid(
            "max_blocks_per_head",
            g.max_blocks_per_head,
            "block_tables and context_lens of at most 2^32 entries together",
        ));
    }
    Ok(())
}

/// A snapshot that is a consistent cache for `geometry`: array sizes, live block ids inside
/// the pool, no block owned by two head slots, lengths within the block table. Returns which
/// blocks are owned.
pub(crate) fn snapshot(g: &Geometry, dtype: DType, s: &CacheSnapshot) -> Result<Vec<bool>> {
    let pool_bytes = g.pool_elems() * dtype.elem_bytes() as u64;
    let sizes: [(&'static str, usize, u64); 7] = [
        ("k_pool", s.k_pool.len(), pool_bytes),
        ("v_pool", s.v_pool.len(), pool_bytes),
        ("metric", s.metric.len(), g.pool_slots()),
        ("position", s.position.len(), g.pool_slots()),
        ("block_tables", s.block_tables.len(), g.block_table_len()),
        ("context_lens", s.context_lens.len(), g.num_head_slots()),
        ("last_position", s.last_position.len(), g.num_seqs as u64),
    ];
    for (arg, len, expected) in sizes {
        if len as u64 != expected {
            return Err(Error::invalid(
                arg,
                format!("{len} entries"),
                format!("{expected} entries"),
            ));
        }
    }
    let capacity = g.max_blocks_per_head as u64 * g.block_size as u64;
    let mut owner: Vec<Option<u64>> = vec![None; g.num_blocks as usize];
    for head_slot in 0..g.num_head_slots() {
        let len = s.context_lens[head_slot as usize];
        if len < 0 || len as u64 > capacity {
            return Err(Error::invalid(
                "context_lens",
                format!("{len} at head slot {head_slot}"),
                format!("0..={capacity} (max_blocks_per_head * block_size)"),
            ));
        }
        for logical_block in 0..g.blocks_for(len as u32) {
            let block = s.block_tables[g.block_table_at(head_slot, logical_block) as usize];
            if block < 0 || block as u32 >= g.num_blocks {
                return Err(Error::invalid(
                    "block_tables",
                    format!(
                        "block {block} at head slot {head_slot}, logical block {logical_block}"
                    ),
                    format!("a block id in 0..{}", g.num_blocks),
                ));
            }
            if let Some(other) = owner[block as usize].replace(head_slot) {
                return Err(Error::invalid(
                    "block_tables",
                    format!("block {block} owned by head slots {other} and {head_slot}"),
                    "each block owned by at most one head slot",
                ));
            }
        }
    }
    Ok(owner.into_iter().map(|o| o.is_some()).collect())
}

/// A tensor argument of the cache's dtype, `shape` and backend.
pub(crate) fn tensor(
    arg: &'static str,
    t: &Tensor,
    dtype: DType,
    shape: &[usize],
    backend: &Backend,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::invalid(
            arg,
            format!("dtype {}", t.dtype().name()),
            format!("the cache dtype {}", dtype.name()),
        ));
    }
    if t.shape() != shape {
        return Err(Error::invalid(
            arg,
            format!("shape {:?}", t.shape()),
            format!("shape {shape:?}"),
        ));
    }
    if !t.backend().same_as(backend) {
        return Err(Error::invalid(
            arg,
            format!("a tensor on {}", t.backend().describe()),
            format!("a tensor on the cache's backend, {}", backend.describe()),
        ));
    }
    Ok(())
}

/// The error for a tensor whose storage is not on the cache's backend.
pub(crate) fn backend_mismatch(arg: &'static str) -> Error {
    Error::invalid(
        arg,
        "a tensor on another backend",
        "a tensor on the cache's backend",
    )
}

/// A layer index of the cache.
pub(crate) fn layer(g: &Geometry, layer: u32) -> Result<()> {
    if layer >= g.num_layers {
        return Err(Error::invalid(
            "layer",
            layer,
            format!("< num_layers {}", g.num_layers),
        ));
    }
    Ok(())
}

/// A sequence row of the cache.
pub(crate) fn seq(g: &Geometry, seq: u32) -> Result<()> {
    if seq >= g.num_seqs {
        return Err(Error::invalid(
            "seq",
            seq,
            format!("< num_seqs {}", g.num_seqs),
        ));
    }
    Ok(())
}

/// Decode inputs (SPEC §3): `q` and `out` of shape `[num_seqs, Hq, D]`, a finite scale.
pub(crate) fn decode(
    cache: &PagedKvCache,
    layer_idx: u32,
    q: &Tensor,
    out: &Tensor,
    args: &DecodeArgs,
) -> Result<()> {
    let g = cache.geometry();
    layer(&g, layer_idx)?;
    let shape = [
        g.num_seqs as usize,
        g.num_q_heads() as usize,
        g.head_dim as usize,
    ];
    tensor("q", q, cache.dtype(), &shape, &cache.backend())?;
    tensor("out", out, cache.dtype(), &shape, &cache.backend())?;
    finite_scale(args.scale)?;
    if args.partition_kvs == Some(0) {
        return Err(Error::invalid(
            "partition_kvs",
            0,
            "at least 1 KV per partition",
        ));
    }
    if let Some(r) = &args.record {
        metric_skip(&g, r.metric_skip)?;
    }
    Ok(())
}

/// A finite softmax scale.
fn finite_scale(scale: f32) -> Result<()> {
    if !scale.is_finite() {
        return Err(Error::invalid("scale", scale, "a finite softmax scale"));
    }
    Ok(())
}

/// `arg` has one value per sequence row.
fn one_per_seq(g: &Geometry, arg: &'static str, len: usize) -> Result<()> {
    if len != g.num_seqs as usize {
        return Err(Error::invalid(
            arg,
            format!("{len} values"),
            format!("one per sequence row ({})", g.num_seqs),
        ));
    }
    Ok(())
}

/// One `metric_skip >= 0` per sequence row.
pub(crate) fn metric_skip(g: &Geometry, metric_skip: &[i32]) -> Result<()> {
    one_per_seq(g, "metric_skip", metric_skip.len())?;
    if let Some((seq, skip)) = metric_skip.iter().enumerate().find(|(_, &s)| s < 0) {
        return Err(Error::invalid(
            "metric_skip",
            format!("{skip} at seq {seq}"),
            "a count >= 0",
        ));
    }
    Ok(())
}

/// `append_kv` inputs (SPEC §2): `k`/`v` of shape `[num_tokens, H, D]`, one count per sequence
/// row summing to `num_tokens`, a non-negative position per token, and room in every head
/// slot's block table. Returns the blocks the append needs.
pub(crate) fn append(
    cache: &PagedKvCache,
    layer_idx: u32,
    k: &Tensor,
    v: &Tensor,
    positions: &[i32],
    new_tokens: &[u32],
) -> Result<u64> {
    let g = cache.geometry();
    layer(&g, layer_idx)?;
    one_per_seq(&g, "new_tokens", new_tokens.len())?;
    let num_tokens: u64 = new_tokens.iter().map(|&n| n as u64).sum();
    let shape = [
        num_tokens as usize,
        g.num_kv_heads as usize,
        g.head_dim as usize,
    ];
    tensor("k", k, cache.dtype(), &shape, &cache.backend())?;
    tensor("v", v, cache.dtype(), &shape, &cache.backend())?;
    if positions.len() as u64 != num_tokens {
        return Err(Error::invalid(
            "positions",
            format!("{} positions", positions.len()),
            format!("one per new token ({num_tokens})"),
        ));
    }
    if let Some((i, p)) = positions.iter().enumerate().find(|(_, &p)| p < 0) {
        return Err(Error::invalid(
            "positions",
            format!("{p} at token {i}"),
            "a position >= 0",
        ));
    }
    let capacity = g.max_blocks_per_head as u64 * g.block_size as u64;
    let mut blocks = 0u64;
    for (seq, &n) in new_tokens.iter().enumerate() {
        if n == 0 {
            continue;
        }
        for kv_head in 0..g.num_kv_heads {
            let len = cache.context_len(seq as u32, layer_idx, kv_head) as u64;
            if len + n as u64 > capacity {
                return Err(Error::invalid(
                    "new_tokens",
                    format!("{n} at seq {seq} (head {kv_head} holds {len})"),
                    format!("at most {capacity} KVs per head slot"),
                ));
            }
            blocks += (g.blocks_for((len + n as u64) as u32) - g.blocks_for(len as u32)) as u64;
        }
    }
    Ok(blocks)
}

/// Window aggregation inputs (SPEC §4): `q` `[num_seqs, w, Hq, D]`, window lengths within `w`
/// and within what each sequence has written, an odd pool width the kernels support,
/// `metric_skip`, a finite scale.
pub(crate) fn aggregate(
    cache: &PagedKvCache,
    layer_idx: u32,
    q: &Tensor,
    lse: Option<&Tensor>,
    args: &AggregateArgs,
) -> Result<()> {
    let g = cache.geometry();
    layer(&g, layer_idx)?;
    let window = match q.shape() {
        [_, w, _, _] if *w > 0 => *w,
        _ => {
            return Err(Error::invalid(
                "q",
                format!("shape {:?}", q.shape()),
                "[num_seqs, w, Hq, D] with w >= 1",
            ))
        }
    };
    let shape = [
        g.num_seqs as usize,
        window,
        g.num_q_heads() as usize,
        g.head_dim as usize,
    ];
    tensor("q", q, cache.dtype(), &shape, &cache.backend())?;
    if let Some(lse) = lse {
        if lse.dtype() != DType::F32 {
            return Err(Error::invalid(
                "lse",
                format!("dtype {}", lse.dtype().name()),
                "f32",
            ));
        }
        tensor("lse", lse, DType::F32, &shape[..3], &cache.backend())?;
    }
    one_per_seq(&g, "window_lens", args.window_lens.len())?;
    for (seq, &w) in args.window_lens.iter().enumerate() {
        let written = cache.last_position(seq as u32) as i64 + 1;
        if w as usize > window || w as i64 > written {
            return Err(Error::invalid(
                "window_lens",
                format!("{w} at seq {seq}"),
                format!(
                    "at most the window extent of q ({window}) and the tokens written ({written})"
                ),
            ));
        }
    }
    metric_skip(&g, args.metric_skip)?;
    if args.pool_kernel.is_multiple_of(2) {
        return Err(Error::invalid(
            "pool_kernel",
            args.pool_kernel,
            "an odd max-pool width (1 = none)",
        ));
    }
    if args.pool_kernel > kvc_abi::plan::MAX_POOL_KERNEL {
        return Err(Error::Unsupported {
            what: "pool_kernel",
            value: format!(
                "{} (at most {})",
                args.pool_kernel,
                kvc_abi::plan::MAX_POOL_KERNEL
            ),
        });
    }
    finite_scale(args.scale)?;
    Ok(())
}

/// Compression inputs (SPEC §5): distinct sequence rows, one budget and one protected window
/// each, rates `>= 1`.
pub(crate) fn compress(cache: &PagedKvCache, args: &CompressArgs) -> Result<()> {
    let g = cache.geometry();
    for &s in args.seqs {
        seq(&g, s)?;
    }
    // A sorted copy rather than a hash set: a few sequences, checked on every step.
    let mut sorted = args.seqs.to_vec();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
        return Err(Error::invalid("seqs", pair[0], "distinct sequence rows"));
    }
    for (arg, len) in [
        ("budgets", args.budgets.len()),
        ("protected", args.protected.len()),
    ] {
        if len != args.seqs.len() {
            return Err(Error::invalid(
                arg,
                format!("{len} values"),
                format!("one per entry of seqs ({})", args.seqs.len()),
            ));
        }
    }
    for (i, budget) in args.budgets.iter().enumerate() {
        if let Budget::Rate(rate) = *budget {
            if !(rate.is_finite() && rate >= 1.0) {
                return Err(Error::invalid(
                    "budgets",
                    format!("Rate({rate}) at entry {i}"),
                    "a finite compression rate >= 1",
                ));
            }
        }
    }
    Ok(())
}

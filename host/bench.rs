//! Measurement shared by `kvc bench` and the criterion benches: CUDA-event timing with
//! medians, the device-to-device copy roofline measured in the same process, and the bytes
//! each op must move.

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::backend::Backend;
use crate::cache::{CacheConfig, CacheSnapshot, PagedKvCache};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::tensor::Tensor;

/// Milliseconds of repeated runs of one thing.
#[derive(Clone, Debug)]
pub struct Timing {
    /// Each run's time, in order.
    pub samples_ms: Vec<f64>,
}

impl Timing {
    /// The median sample.
    pub fn median_ms(&self) -> f64 {
        let mut s = self.samples_ms.clone();
        s.sort_by(f64::total_cmp);
        s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
    }

    /// The fastest sample.
    pub fn min_ms(&self) -> f64 {
        self.samples_ms
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
    }
}

/// Times `run(i)` for `i` in `0..warmup + reps` with CUDA events around each call, queued
/// back to back without synchronising in between; the first `warmup` calls are dropped.
pub fn time_gpu(
    gpu: &Gpu,
    warmup: usize,
    reps: usize,
    mut run: impl FnMut(usize) -> Result<()>,
) -> Result<Timing> {
    let ctx = gpu.context();
    let event = || {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(Error::driver("creating an event"))
    };
    for i in 0..warmup {
        run(i)?;
    }
    let mut events = Vec::with_capacity(reps);
    for i in 0..reps {
        let (start, end) = (event()?, event()?);
        start
            .record(gpu.stream())
            .map_err(Error::driver("recording an event"))?;
        run(warmup + i)?;
        end.record(gpu.stream())
            .map_err(Error::driver("recording an event"))?;
        events.push((start, end));
    }
    gpu.synchronize()?;
    let samples_ms = events
        .iter()
        .map(|(s, e)| s.elapsed_ms(e).map(|ms| ms as f64))
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::driver("reading an event"))?;
    Ok(Timing { samples_ms })
}

/// Device-to-device copy of `bytes` bytes: its timing and GB/s counting bytes read plus
/// written (decimal GB). The yardstick every bandwidth figure is divided by.
pub fn copy_bandwidth(gpu: &Gpu, bytes: usize) -> Result<(Timing, f64)> {
    let src = gpu.alloc(bytes)?;
    let mut dst = gpu.alloc(bytes)?;
    let timing = time_gpu(gpu, 3, 20, |_| {
        gpu.stream()
            .memcpy_dtod(&src, &mut dst)
            .map_err(Error::driver("copying on the device"))
    })?;
    let gbps = 2.0 * bytes as f64 / (timing.median_ms() * 1e6);
    Ok((timing, gbps))
}

/// Bytes of live K and V in `layer` of `cache`: what decode must read.
pub fn decode_kv_bytes(cache: &PagedKvCache, layer: u32) -> u64 {
    let g = cache.geometry();
    let kvs: u64 = (0..g.num_seqs)
        .flat_map(|seq| (0..g.num_kv_heads).map(move |h| (seq, h)))
        .map(|(seq, h)| cache.context_len(seq, layer, h) as u64)
        .sum();
    2 * kvs * g.head_dim as u64 * cache.dtype().elem_bytes() as u64
}

/// A cache on `gpu` whose every head slot holds `context_len` KVs of cheap random data, its
/// blocks shuffled through the pool (as after much allocation and freeing). Enough layers to
/// rotate through a working set of at least five times the L2 cache.
pub fn filled_cache(
    gpu: &Arc<Gpu>,
    config: CacheConfig,
    context_len: u32,
    seed: u64,
) -> Result<PagedKvCache> {
    PagedKvCache::from_snapshot(
        &Backend::Cuda(gpu.clone()),
        config,
        &filled_snapshot(config, context_len, seed),
    )
}

/// The snapshot of [`filled_cache`]: every head slot `context_len` KVs, positions in logical
/// order (as after a prefill), metrics uniform in [0, 1).
pub fn filled_snapshot(config: CacheConfig, context_len: u32, seed: u64) -> CacheSnapshot {
    let g = config.geometry();
    let blocks_per_head = g.blocks_for(context_len);
    let head_slots = g.num_head_slots() as usize;
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut order: Vec<i32> = (0..g.num_blocks as i32).collect();
    order.shuffle(&mut rng);
    let mut block_tables = vec![-1; g.block_table_len() as usize];
    for (hs, blocks) in order
        .chunks(blocks_per_head as usize)
        .take(head_slots)
        .enumerate()
    {
        let first = g.block_table_at(hs as u64, 0) as usize;
        block_tables[first..first + blocks.len()].copy_from_slice(blocks);
    }
    let slots = g.pool_slots() as usize;
    let mut position = vec![-1; slots];
    for hs in 0..head_slots {
        for j in 0..context_len {
            let block = block_tables[g.block_table_at(hs as u64, g.logical_block(j)) as usize];
            position[g.pool_slot(block as u32, g.slot_in_block(j)) as usize] = j as i32;
        }
    }
    CacheSnapshot {
        k_pool: random_pool(config.dtype, g.pool_elems() as usize, &mut rng),
        v_pool: random_pool(config.dtype, g.pool_elems() as usize, &mut rng),
        metric: (0..slots).map(|_| rng.random::<f32>()).collect(),
        position,
        block_tables,
        context_lens: vec![context_len as i32; head_slots],
        last_position: vec![context_len as i32 - 1; g.num_seqs as usize],
    }
}

/// Random elements of magnitude below 1, made from random bits (fast for gigabytes: each
/// random u64 fills 8 bytes, masked per element).
fn random_pool(dtype: DType, elems: usize, rng: &mut SmallRng) -> Vec<u8> {
    let mut bytes = vec![0u8; elems * dtype.elem_bytes() as usize];
    // Each element's sign, then an exponent below that of 1.0, then its mantissa: values in
    // (-1, 1).
    let mask: u64 = match dtype {
        DType::F16 => 0xbbff_bbff_bbff_bbff,
        DType::Bf16 => 0xbf7f_bf7f_bf7f_bf7f,
        DType::F32 => 0xbf7f_ffff_bf7f_ffff,
    };
    for chunk in bytes.chunks_mut(8) {
        let word = (rng.random::<u64>() & mask).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    bytes
}

/// A benchmark's observation window `[1, w, Hq, D]` of `dtype` on `backend` (`shape`): cheap
/// deterministic queries in [-2, 2), and each query's log-sum-exp as a uniform softmax over
/// `prompt` keys would give (the time does not depend on the values).
pub fn window_inputs(
    backend: &Backend,
    dtype: DType,
    shape: [usize; 4],
    prompt: u32,
) -> Result<(Tensor, Tensor)> {
    let q: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i * 7919) % 200) as f32 / 50.0 - 2.0)
        .collect();
    let q = Tensor::from_f32(backend, dtype, &shape, &q)?;
    let lse = Tensor::full(
        backend,
        DType::F32,
        &shape[..3],
        (prompt as f64).ln() as f32,
    )?;
    Ok((q, lse))
}

/// Layers a benchmark cache needs so that rotating through them touches at least five times
/// the L2 cache (capped at `max_layers`).
pub fn rotation_layers(gpu: &Gpu, bytes_per_layer: u64, max_layers: u32) -> u32 {
    (5 * gpu.l2_bytes())
        .div_ceil(bytes_per_layer.max(1))
        .clamp(1, max_layers as u64) as u32
}

#[cfg(test)]
mod tests {
    use super::random_pool;
    use crate::dtype::{decode, DType};
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    /// Every element of every dtype lies in (-1, 1), and the bits vary (not a constant pool).
    #[test]
    fn random_pools_hold_values_below_one() {
        let mut rng = SmallRng::seed_from_u64(rand::random());
        for dtype in [DType::F16, DType::Bf16, DType::F32] {
            // An odd count: the last random word is cut short.
            let values = decode(dtype, &random_pool(dtype, 4099, &mut rng));
            assert_eq!(values.len(), 4099);
            assert!(values.iter().all(|v| v.abs() < 1.0), "{dtype:?}");
            let distinct: std::collections::HashSet<u32> =
                values.iter().map(|v| v.to_bits()).collect();
            assert!(
                distinct.len() > 1000,
                "{dtype:?}: {} distinct",
                distinct.len()
            );
        }
    }
}

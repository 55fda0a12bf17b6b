//! Shared test helpers: GPU discovery (skip or fail), random poisoned caches, tolerances.
#![allow(dead_code)]

use std::io::Write;

use half::{bf16, f16};
use kvcompress::{Backend, CacheConfig, CacheSnapshot, DType, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The CUDA backend, or `None` after printing why the test is skipped. With
/// `KVC_REQUIRE_GPU=1` a missing GPU fails the test instead.
pub fn gpu_or_skip(test: &str) -> Option<Backend> {
    match Backend::cuda(0) {
        Ok(backend) => Some(backend),
        Err(e @ Error::CudaUnavailable { .. }) => {
            if std::env::var("KVC_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("{test}: KVC_REQUIRE_GPU=1 but {e}");
            }
            // Written past the test harness's output capture, so the skip shows in the log.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {e} (set KVC_REQUIRE_GPU=1 to fail instead)"
            );
            None
        }
        Err(e) => panic!("{test}: CUDA present but unusable: {e}"),
    }
}

/// A fresh seed for a case, printed with every failure of it; `KVC_SEED=<seed>` replays one.
pub fn fresh_seed() -> u64 {
    std::env::var("KVC_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random)
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// The bit pattern of a NaN of `dtype`, as little-endian bytes.
pub fn nan_bytes(dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F16 => f16::NAN.to_le_bytes().to_vec(),
        DType::Bf16 => bf16::NAN.to_le_bytes().to_vec(),
        DType::F32 => f32::NAN.to_le_bytes().to_vec(),
    }
}

/// Sentinel of `position` in slots that hold no live KV.
pub const POSITION_POISON: i32 = i32::MIN;

/// A cache snapshot with the given live length per head slot (`lens[head_slot]`, for every
/// layer), its blocks scattered at random through a pool with `spare_blocks` unused blocks.
/// Live K/V are uniform in [-1, 1]; every other pool element is NaN, every other metric NaN
/// and every other position `POSITION_POISON`, so a kernel that reads or writes outside the
/// live range shows.
pub fn random_snapshot(config: &CacheConfig, lens: &[u32], rng: &mut StdRng) -> CacheSnapshot {
    let g = config.geometry();
    assert_eq!(lens.len() as u64, g.num_head_slots());
    let b = g.block_size as usize;
    let d = g.head_dim as usize;
    let mb = g.max_blocks_per_head as usize;
    let elem = config.dtype.elem_bytes() as usize;
    let slots = g.num_blocks as usize * b;
    let nan = nan_bytes(config.dtype);
    let mut k_pool: Vec<u8> = nan.iter().copied().cycle().take(slots * d * elem).collect();
    let mut v_pool = k_pool.clone();
    let mut metric = vec![f32::NAN; slots];
    let mut position = vec![POSITION_POISON; slots];
    let mut block_tables = vec![-1i32; lens.len() * mb];
    let mut order: Vec<u32> = (0..g.num_blocks).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), rng);
    let mut next = order.into_iter();
    for (hs, &len) in lens.iter().enumerate() {
        let nblocks = (len as usize).div_ceil(b);
        assert!(nblocks <= mb, "case needs more than max_blocks_per_head");
        for lb in 0..nblocks {
            block_tables[hs * mb + lb] = next.next().expect("pool too small for case") as i32;
        }
        for j in 0..len as usize {
            let block = block_tables[hs * mb + j / b] as usize;
            let slot = block * b + j % b;
            for x in 0..d {
                let value: f32 = rng.random_range(-1.0..1.0);
                let value_v: f32 = rng.random_range(-1.0..1.0);
                put(config.dtype, &mut k_pool, slot * d + x, value);
                put(config.dtype, &mut v_pool, slot * d + x, value_v);
            }
            metric[slot] = rng.random_range(0.0..1.0);
            position[slot] = j as i32;
        }
    }
    let last_position = (0..g.num_seqs)
        .map(|_| lens.iter().copied().max().unwrap_or(0) as i32 - 1)
        .collect();
    CacheSnapshot {
        k_pool,
        v_pool,
        metric,
        position,
        block_tables,
        context_lens: lens.iter().map(|&l| l as i32).collect(),
        last_position,
    }
}

/// Writes `x` rounded to `dtype` as element `i` of a byte buffer.
pub fn put(dtype: DType, bytes: &mut [u8], i: usize, x: f32) {
    kvcompress::dtype::write_elem(dtype, bytes, i, x as f64);
}

/// Random values uniform in `[-amplitude, amplitude]`, already representable in `dtype`.
pub fn random_values(dtype: DType, n: usize, amplitude: f32, rng: &mut StdRng) -> Vec<f32> {
    let raw: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-amplitude..amplitude))
        .collect();
    kvcompress::dtype::decode(dtype, &kvcompress::dtype::encode(dtype, &raw))
}

/// A config with the pool and tables sized for `lens` plus `spare_blocks` blocks.
#[allow(clippy::too_many_arguments)]
pub fn config_for(
    dtype: DType,
    head_dim: u32,
    block_size: u32,
    group_size: u32,
    num_seqs: u32,
    num_layers: u32,
    num_kv_heads: u32,
    lens: &[u32],
    spare_blocks: u32,
) -> CacheConfig {
    let max_blocks = lens
        .iter()
        .map(|&l| l.div_ceil(block_size))
        .max()
        .unwrap_or(0);
    let used: u32 = lens.iter().map(|&l| l.div_ceil(block_size)).sum();
    CacheConfig {
        num_seqs,
        num_layers,
        num_kv_heads,
        group_size,
        head_dim,
        block_size,
        max_blocks_per_head: max_blocks + 2,
        num_blocks: used + spare_blocks,
        dtype,
    }
}

/// Checks `actual` against `expected` (the reference, already in `dtype`) with the library's
/// tolerance table (docs/tolerances.md); `label(i)` names element `i` in messages.
pub fn assert_close(
    dtype: DType,
    actual: &[f32],
    expected: &[f32],
    context: &str,
    label: impl Fn(usize) -> String,
) {
    if let Err((i, what)) = kvcompress::tolerance::check_close(dtype, actual, expected) {
        panic!("{context}: {}: {what}", label(i));
    }
}

/// Asserts two snapshots are equal bit for bit (NaN poison included).
pub fn assert_same_snapshot(actual: &CacheSnapshot, expected: &CacheSnapshot, context: &str) {
    assert!(
        actual.k_pool == expected.k_pool,
        "{context}: k_pool differs"
    );
    assert!(
        actual.v_pool == expected.v_pool,
        "{context}: v_pool differs"
    );
    let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&actual.metric) == bits(&expected.metric),
        "{context}: metric differs"
    );
    assert!(
        actual.position == expected.position,
        "{context}: position differs"
    );
    assert_eq!(
        actual.block_tables, expected.block_tables,
        "{context}: block_tables differ"
    );
    assert_eq!(
        actual.context_lens, expected.context_lens,
        "{context}: context_lens differ"
    );
    assert_eq!(
        actual.last_position, expected.last_position,
        "{context}: last_position differs"
    );
}

/// Names element `i` of a `[num_seqs, Hq, D]` output.
pub fn out_label(q_shape: [usize; 3]) -> impl Fn(usize) -> String {
    let [_, hq, d] = q_shape;
    move |i| format!("(seq {}, q_head {}, d {})", i / (hq * d), i / d % hq, i % d)
}

/// Sets the metric of every live slot to 0, so that recorded values are all there is.
pub fn zero_live_metrics(snapshot: &mut CacheSnapshot) {
    for (m, &p) in snapshot.metric.iter_mut().zip(&snapshot.position) {
        if p != POSITION_POISON {
            *m = 0.0;
        }
    }
}

/// Compares metrics with the library's rule (NaN poison bit for bit, values to 1e-4).
pub fn assert_metric_close(actual: &[f32], expected: &[f32], context: &str) {
    if let Err((slot, what)) = kvcompress::tolerance::check_metrics(actual, expected) {
        panic!("{context}: slot {slot}: {what}");
    }
}

/// Each window query's natural log-sum-exp of `scale * q . k` over the keys of `layer` it sees
/// (position at most its own, SPEC §4), by hand in f64: `[num_seqs, window, Hq]`, 0 past a
/// sequence's window length.
#[allow(clippy::too_many_arguments)]
pub fn window_lse(
    c: &CacheConfig,
    s: &CacheSnapshot,
    layer: usize,
    q: &[f32],
    window: usize,
    window_lens: &[u32],
    scale: f64,
) -> Vec<f64> {
    let (l, h, g, d, b, mb) = extents(c);
    let k = kvcompress::dtype::decode(c.dtype, &s.k_pool);
    let mut lse = vec![0.0f64; c.num_seqs as usize * window * h * g];
    for (seq, &w) in window_lens.iter().enumerate() {
        let w = w as usize;
        for head in 0..h {
            let hs = (seq * l + layer) * h + head;
            let slots: Vec<usize> = (0..s.context_lens[hs] as usize)
                .map(|j| s.block_tables[hs * mb + j / b] as usize * b + j % b)
                .collect();
            for qh in head * g..(head + 1) * g {
                for i in 0..w {
                    let p = s.last_position[seq] as i64 - (w - 1 - i) as i64;
                    let row = (seq * window + i) * h * g + qh;
                    let scores: Vec<f64> = slots
                        .iter()
                        .filter(|&&slot| s.position[slot] as i64 <= p)
                        .map(|&slot| {
                            scale
                                * (0..d)
                                    .map(|x| q[row * d + x] as f64 * k[slot * d + x] as f64)
                                    .sum::<f64>()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    lse[row] = max + scores.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
                }
            }
        }
    }
    lse
}

/// A config's extents as `usize`: (layers, KV heads, group size, head dim, block size, blocks
/// per head).
pub fn extents(c: &CacheConfig) -> (usize, usize, usize, usize, usize, usize) {
    (
        c.num_layers as usize,
        c.num_kv_heads as usize,
        c.group_size as usize,
        c.head_dim as usize,
        c.block_size as usize,
        c.max_blocks_per_head as usize,
    )
}

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

/// A fresh seed for a case, printed with every failure of it.
pub fn fresh_seed() -> u64 {
    rand::random()
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

/// Comparison tolerance for attention outputs of one dtype; see docs/tolerances.md.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// Allowed error in units in the last place of the reference rounded to the dtype.
    pub ulps: f64,
    /// Absolute floor, for values near zero where an ulp is tiny.
    pub atol: f64,
    /// Relative floor (f32 only).
    pub rtol: f64,
    /// Bound on ||out - ref|| / ||ref|| over the whole output.
    pub rel_l2: f64,
}

impl Tol {
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F16 => Tol {
                ulps: 1.0,
                atol: 1e-5,
                rtol: 0.0,
                rel_l2: 1e-3,
            },
            DType::Bf16 => Tol {
                ulps: 1.0,
                atol: 1e-5,
                rtol: 0.0,
                rel_l2: 8e-3,
            },
            DType::F32 => Tol {
                ulps: 0.0,
                atol: 1e-5,
                rtol: 1e-4,
                rel_l2: 1e-5,
            },
        }
    }
}

/// The distance between `x` (a value of `dtype`) and the next representable value away from 0.
pub fn ulp(dtype: DType, x: f32) -> f64 {
    match dtype {
        DType::F16 => {
            let h = f16::from_f32(x.abs());
            (f16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
        }
        DType::Bf16 => {
            let h = bf16::from_f32(x.abs());
            (bf16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
        }
        DType::F32 => {
            let a = x.abs();
            (f32::from_bits(a.to_bits() + 1) as f64 - a as f64).abs()
        }
    }
}

/// Checks `actual` against `expected` (the reference, already in `dtype`) element by element,
/// plus finiteness and a relative L2 bound. `label(i)` names element `i` in messages.
pub fn assert_close(
    dtype: DType,
    actual: &[f32],
    expected: &[f32],
    context: &str,
    label: impl Fn(usize) -> String,
) {
    assert_eq!(actual.len(), expected.len(), "{context}: length");
    let tol = Tol::for_dtype(dtype);
    let mut err2 = 0.0f64;
    let mut ref2 = 0.0f64;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            a.is_finite(),
            "{context}: {} is {a}, expected {e}",
            label(i)
        );
        let diff = (a as f64 - e as f64).abs();
        let allowed = tol.ulps * ulp(dtype, e) + tol.atol + tol.rtol * (e as f64).abs();
        assert!(
            diff <= allowed,
            "{context}: {} = {a}, expected {e}, diff {diff:e} > tolerance {allowed:e}",
            label(i)
        );
        err2 += diff * diff;
        ref2 += (e as f64) * (e as f64);
    }
    let rel_l2 = if ref2 > 0.0 {
        (err2 / ref2).sqrt()
    } else {
        err2.sqrt()
    };
    assert!(
        rel_l2 <= tol.rel_l2,
        "{context}: relative L2 error {rel_l2:e} > {:e}",
        tol.rel_l2
    );
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

/// Compares metrics: NaN poison bit for bit, recorded values to a relative 1e-4 (the GPU
/// normalises with f32 `ex2.approx`; see docs/tolerances.md) plus 1e-10 absolute.
pub fn assert_metric_close(actual: &[f32], expected: &[f32], context: &str) {
    assert_eq!(actual.len(), expected.len(), "{context}: metric length");
    for (slot, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if e.is_nan() {
            assert_eq!(
                a.to_bits(),
                e.to_bits(),
                "{context}: poisoned metric of slot {slot} changed"
            );
            continue;
        }
        let diff = (a as f64 - e as f64).abs();
        let allowed = 1e-4 * (e as f64).abs() + 1e-10;
        assert!(
            diff <= allowed,
            "{context}: metric of slot {slot} = {a:e}, expected {e:e}, diff {diff:e} > {allowed:e}"
        );
    }
}

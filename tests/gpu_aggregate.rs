//! Window aggregation on the GPU against the CPU reference (SPEC §4): every dtype, head
//! dimension, block size and group size; ragged prompts and windows; L1 and L2; metric_skip
//! 0 and > 0; max-pool widths 1 to 17; a full-range window; heads of different lengths, each
//! with the softmax stats computed and with a given log-sum-exp (pass 2 alone); and a
//! 32768-token prompt with `w = n`, checked by the exact L1 mass (every query's softmax sums to
//! 1 per head).

mod common;

use common::{
    assert_metric_close, config_for, fresh_seed, gpu_or_skip, random_snapshot, random_values, rng,
    window_lse, zero_live_metrics,
};
use kvcompress::gpu::{BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS};
use kvcompress::{AggregateArgs, Backend, CacheConfig, DType, Metric, PagedKvCache, Tensor};
use rand::Rng;

/// Runs one aggregation on both backends from the same snapshot and compares every metric.
/// KV head `k` of a prompt holds `k * head_shrink` fewer KVs than the prompt (as after a
/// compression that evicted at a different rate per head).
#[allow(clippy::too_many_arguments)]
fn check(
    gpu: &Backend,
    name: &str,
    config: CacheConfig,
    (prompts, head_shrink): (&[u32], u32),
    window: usize,
    window_lens: &[u32],
    args: (Metric, &[i32], u32, f32),
    q_amplitude: f32,
) {
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let (metric, skip, pool, scale_sign) = args;
    let h = config.num_kv_heads as usize;
    let lens: Vec<u32> = prompts
        .iter()
        .flat_map(|&p| {
            (0..config.num_layers)
                .flat_map(move |_| (0..h as u32).map(move |k| p - k * head_shrink))
        })
        .collect();
    let mut snapshot = random_snapshot(&config, &lens, &mut rng);
    zero_live_metrics(&mut snapshot);
    snapshot.last_position = prompts.iter().map(|&p| p as i32 - 1).collect();
    let hq = (config.num_kv_heads * config.group_size) as usize;
    let shape = [
        config.num_seqs as usize,
        window,
        hq,
        config.head_dim as usize,
    ];
    let q_values = random_values(config.dtype, shape.iter().product(), q_amplitude, &mut rng);
    let args = AggregateArgs {
        scale: scale_sign / (config.head_dim as f32).sqrt(),
        metric,
        metric_skip: skip,
        window_lens,
        pool_kernel: pool,
    };
    let layer = config.num_layers - 1;
    // The log-sum-exp a prefill would give, off by up to 0.5 either way (so that a kernel
    // that computed its own would not match).
    let lse: Vec<f32> = window_lse(
        &config,
        &snapshot,
        layer as usize,
        &q_values,
        window,
        window_lens,
        args.scale as f64,
    )
    .iter()
    .map(|&x| (x + rng.random_range(-0.5..0.5)) as f32)
    .collect();
    for with_lse in [false, true] {
        let name = if with_lse {
            format!("{name}, given lse")
        } else {
            name.to_string()
        };
        let mut metrics = Vec::new();
        for backend in [gpu, &Backend::Cpu] {
            let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
            let q = Tensor::from_f32(backend, config.dtype, &shape, &q_values).unwrap();
            let done = if with_lse {
                let lse = Tensor::from_f32(backend, DType::F32, &shape[..3], &lse).unwrap();
                cache.aggregate_with_lse(layer, &q, &lse, &args)
            } else {
                cache.aggregate(layer, &q, &args)
            };
            done.unwrap_or_else(|e| panic!("{name} on {}: {e}", backend.describe()));
            metrics.push(cache.snapshot().unwrap().metric);
        }
        assert_metric_close(&metrics[0], &metrics[1], &format!("{name} (seed {seed})"));
        assert!(
            metrics[1].iter().zip(&snapshot.metric).any(|(a, b)| a != b),
            "{name}: nothing recorded (seed {seed})"
        );
    }
}

#[test]
fn aggregation_matches_reference_for_every_dtype_head_dim_block_and_group_size() {
    let Some(gpu) =
        gpu_or_skip("aggregation_matches_reference_for_every_dtype_head_dim_block_and_group_size")
    else {
        return;
    };
    // (metric, metric_skip per sequence, pool width, sign of the scale): a negative scale
    // takes the kernels' general path where a positive one takes the fast path.
    let variants: [(Metric, [i32; 3], u32, f32); 4] = [
        (Metric::L2, [0, 0, 0], 7, 1.0),
        (Metric::L1, [2, 0, 5], 1, 1.0),
        (Metric::L2, [1, 3, 0], 17, -1.0),
        (Metric::L1, [0, 0, 0], 3, 1.0),
    ];
    let mut n = 0;
    for dtype in DType::ALL {
        for head_dim in HEAD_DIMS {
            for block_size in BLOCK_SIZES {
                for group_size in GROUP_SIZES {
                    let (metric, skip, pool, sign) = variants[n % variants.len()];
                    n += 1;
                    // Three prompts: long enough for several key tiles, one shorter than the
                    // window extent, one of a single token; two layers, the last one read.
                    let prompts = [303u32, 22, 1];
                    let lens: Vec<u32> = prompts
                        .iter()
                        .flat_map(|&p| std::iter::repeat_n(p, 4))
                        .collect();
                    let config =
                        config_for(dtype, head_dim, block_size, group_size, 3, 2, 2, &lens, 4);
                    let name = format!("{} d{head_dim} b{block_size} g{group_size} {metric:?} skip {skip:?} pool {pool} scale sign {sign}", dtype.name());
                    check(
                        &gpu,
                        &name,
                        config,
                        (&prompts, 0),
                        24,
                        &[24, 20, 1],
                        (metric, &skip, pool, sign),
                        4.0,
                    );
                }
            }
        }
    }
}

#[test]
fn aggregation_matches_reference_on_long_prompts_and_full_windows() {
    let Some(gpu) = gpu_or_skip("aggregation_matches_reference_on_long_prompts_and_full_windows")
    else {
        return;
    };
    /// dtype, head dim, group size, prompts, window extent, window lengths, KV heads, KVs
    /// fewer per head.
    type Case<'a> = (DType, u32, u32, &'a [u32], usize, &'a [u32], u32, u32);
    let cases: [Case; 7] = [
        (DType::F16, 128, 4, &[4096], 32, &[32], 2, 0),
        // The bench's shape: on 132 SMs the warp-specialized pass 2 owns 2144 keys a CTA, so
        // its consumer threads update two or three quads of owned keys each.
        (DType::F16, 128, 4, &[32768], 32, &[32], 8, 0),
        // Two sequences of heads of different lengths, the window's rows one chunk: the
        // Hopper module's warp-specialized pass 2 over several ranges a head.
        (DType::Bf16, 128, 2, &[5000, 2100], 64, &[64, 40], 3, 300),
        (DType::Bf16, 64, 2, &[1536, 700], 1536, &[1536, 700], 2, 0),
        (DType::F32, 128, 1, &[1000], 1000, &[1000], 2, 0),
        // An odd number of heads of different lengths (as after a compression at a different
        // rate per head): ranges past a head's keys, and neighbouring CTAs of unequal walks.
        (DType::F16, 128, 4, &[3000], 48, &[40], 3, 700),
        (DType::Bf16, 64, 2, &[2500, 900], 900, &[900, 900], 3, 200),
    ];
    for (dtype, head_dim, group_size, prompts, window, window_lens, heads, shrink) in cases {
        let lens: Vec<u32> = prompts
            .iter()
            .flat_map(|&p| std::iter::repeat_n(p, heads as usize))
            .collect();
        let config = config_for(
            dtype,
            head_dim,
            16,
            group_size,
            prompts.len() as u32,
            1,
            heads,
            &lens,
            2,
        );
        let name = format!(
            "{} d{head_dim} g{group_size} prompts {prompts:?} window {window} heads {heads} shrink {shrink}",
            dtype.name()
        );
        let skip = vec![1; prompts.len()];
        check(
            &gpu,
            &name,
            config,
            (prompts, shrink),
            window,
            window_lens,
            (Metric::L2, &skip, 7, 1.0),
            6.0,
        );
    }
}

#[test]
fn full_range_window_over_32768_tokens_has_exact_l1_mass_and_is_deterministic() {
    let Some(gpu) =
        gpu_or_skip("full_range_window_over_32768_tokens_has_exact_l1_mass_and_is_deterministic")
    else {
        return;
    };
    let n = 32768u32;
    let (heads, group) = (2u32, 4u32);
    let lens = vec![n; heads as usize];
    let config = config_for(DType::F16, 128, 16, group, 1, 1, heads, &lens, 0);
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let mut snapshot = random_snapshot(&config, &lens, &mut rng);
    zero_live_metrics(&mut snapshot);
    snapshot.last_position = vec![n as i32 - 1];
    let shape = [1, n as usize, (heads * group) as usize, 128];
    let q = Tensor::from_f32(
        &gpu,
        DType::F16,
        &shape,
        &random_values(DType::F16, shape.iter().product(), 8.0, &mut rng),
    )
    .unwrap();
    let args = AggregateArgs {
        scale: 1.0 / 128f32.sqrt(),
        metric: Metric::L1,
        metric_skip: &[0],
        window_lens: &[n],
        pool_kernel: 1,
    };
    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut cache = PagedKvCache::from_snapshot(&gpu, config, &snapshot).unwrap();
        cache.aggregate(0, &q, &args).unwrap();
        runs.push(cache.snapshot().unwrap());
    }
    let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&runs[0].metric) == bits(&runs[1].metric),
        "full-range aggregation is not deterministic (seed {seed})"
    );
    let s = &runs[0];
    for head in 0..heads as usize {
        let mb = config.max_blocks_per_head as usize;
        let mut mass = 0.0f64;
        for j in 0..n as usize {
            let slot = s.block_tables[head * mb + j / 16] as usize * 16 + j % 16;
            let m = s.metric[slot];
            assert!(
                m.is_finite() && m >= 0.0,
                "head {head} key {j}: metric {m} (seed {seed})"
            );
            mass += m as f64;
        }
        let expected = (n * group) as f64;
        assert!(
            (mass - expected).abs() <= 1e-4 * expected,
            "head {head}: L1 mass {mass}, expected {expected} (seed {seed})"
        );
    }
}

/// One cache through the calls of a prefill and the next: layers 0 and 1 with the same
/// windows (the second call reuses what the first uploaded), layer 2 with other windows and
/// `metric_skip`, then layer 0 again with the first ones; every metric equals the reference's
/// after the same calls.
#[test]
fn consecutive_calls_with_same_and_changed_windows_match_reference() {
    let Some(gpu) = gpu_or_skip("consecutive_calls_with_same_and_changed_windows_match_reference")
    else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let prompts = [300u32, 1000];
    let (layers, heads, group) = (3u32, 2u32, 4u32);
    let lens: Vec<u32> = prompts
        .iter()
        .flat_map(|&p| std::iter::repeat_n(p, (heads * layers) as usize))
        .collect();
    let config = config_for(DType::F16, 64, 16, group, 2, layers, heads, &lens, 0);
    let mut snapshot = random_snapshot(&config, &lens, &mut rng);
    zero_live_metrics(&mut snapshot);
    snapshot.last_position = prompts.iter().map(|&p| p as i32 - 1).collect();
    let window = 24usize;
    let shape = [2, window, (heads * group) as usize, 64];
    let q_values = random_values(DType::F16, shape.iter().product(), 4.0, &mut rng);
    let first = AggregateArgs {
        scale: 1.0 / 8.0,
        metric: Metric::L2,
        metric_skip: &[0, 3],
        window_lens: &[24, 16],
        pool_kernel: 7,
    };
    let second = AggregateArgs {
        metric_skip: &[2, 0],
        window_lens: &[9, 24],
        ..first
    };
    let mut metrics = Vec::new();
    for backend in [&gpu, &Backend::Cpu] {
        let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
        let q = Tensor::from_f32(backend, DType::F16, &shape, &q_values).unwrap();
        for (layer, args) in [(0, &first), (1, &first), (2, &second), (0, &first)] {
            cache.aggregate(layer, &q, args).unwrap_or_else(|e| {
                panic!("layer {layer} on {}: {e} (seed {seed})", backend.describe())
            });
        }
        metrics.push(cache.snapshot().unwrap().metric);
    }
    assert_metric_close(
        &metrics[0],
        &metrics[1],
        &format!("consecutive calls (seed {seed})"),
    );
}

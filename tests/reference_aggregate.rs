//! The CPU reference window aggregation against a naive formulation written here from SPEC §4
//! alone: dense scores with explicit causal and skip masks, an explicit max-pool with zero
//! padding, its own index arithmetic, f64.

mod common;

use common::{config_for, extents, fresh_seed, random_snapshot, random_values, rng, window_lse};
use kvcompress::{
    AggregateArgs, Backend, CacheConfig, CacheSnapshot, DType, Metric, PagedKvCache, Tensor,
};
use rand::Rng;

/// The metric each pool slot gains, by hand, given each query's log-sum-exp (`lse`, as from
/// [`window_lse`]): `a = exp(score - lse)`.
#[allow(clippy::too_many_arguments)]
fn naive_aggregate(
    c: &CacheConfig,
    s: &CacheSnapshot,
    layer: usize,
    (q, lse): (&[f32], &[f64]),
    window: usize,
    window_lens: &[u32],
    skip: &[i32],
    metric: Metric,
    pool: usize,
    scale: f64,
) -> Vec<f64> {
    let (l, h, g, d, b, mb) = extents(c);
    let k: Vec<f32> = kvcompress::dtype::decode(c.dtype, &s.k_pool);
    let mut gained = vec![0.0f64; s.metric.len()];
    for seq in 0..c.num_seqs as usize {
        let w = window_lens[seq] as usize;
        for head in 0..h {
            let hs = (seq * l + layer) * h + head;
            let len = s.context_lens[hs] as usize;
            let slot = |j: usize| s.block_tables[hs * mb + j / b] as usize * b + j % b;
            let mut total = vec![0.0f64; len];
            for gq in 0..g {
                let qh = head * g + gq;
                let mut m = vec![0.0f64; len];
                for i in 0..w {
                    let p = s.last_position[seq] as i64 - (w - 1 - i) as i64;
                    let row = (seq * window + i) * h * g + qh;
                    let qrow = &q[row * d..][..d];
                    let score = |j: usize| {
                        scale
                            * (0..d)
                                .map(|x| qrow[x] as f64 * k[slot(j) * d + x] as f64)
                                .sum::<f64>()
                    };
                    for (j, mj) in m.iter_mut().enumerate() {
                        if s.position[slot(j)] as i64 <= p - skip[seq] as i64 {
                            let a = (score(j) - lse[row]).exp();
                            *mj += if metric == Metric::L2 { a * a } else { a };
                        }
                    }
                }
                for (j, t) in total.iter_mut().enumerate() {
                    let mut pooled = 0.0f64;
                    for off in -(pool as i64 / 2)..=(pool as i64 / 2) {
                        let n = j as i64 + off;
                        let v = if n < 0 || n >= len as i64 {
                            0.0
                        } else {
                            m[n as usize]
                        };
                        pooled = pooled.max(v);
                    }
                    *t += pooled;
                }
            }
            for (j, t) in total.iter().enumerate() {
                gained[slot(j)] += t;
            }
        }
    }
    gained
}

/// Checks that every live slot of `after` holds its metric in `before` plus `gained`, and that
/// enough slots gained.
fn assert_gained(after: &CacheSnapshot, before: &CacheSnapshot, gained: &[f64], context: &str) {
    let mut nonzero = 0;
    for (slot, (&now, &was)) in after.metric.iter().zip(&before.metric).enumerate() {
        if was.is_nan() {
            assert!(now.is_nan(), "{context}: dead slot {slot} changed");
            continue;
        }
        let expected = was as f64 + gained[slot];
        assert!(
            (now as f64 - expected).abs() <= 1e-6 * expected.abs() + 1e-12,
            "{context}: slot {slot} metric {now}, expected {expected}"
        );
        nonzero += (gained[slot] > 0.0) as usize;
    }
    assert!(nonzero > 200, "{context}: only {nonzero} slots gained");
}

#[test]
fn reference_aggregation_matches_naive_formulation() {
    let cases = [
        (
            "f16 d64 b16 g4 L2 pool 7",
            DType::F16,
            64,
            16,
            4,
            Metric::L2,
            7,
            [3, 0],
        ),
        (
            "bf16 d128 b8 g2 L1 pool 1",
            DType::Bf16,
            128,
            8,
            2,
            Metric::L1,
            1,
            [0, 5],
        ),
        (
            "f32 d64 b32 g1 L2 pool 3",
            DType::F32,
            64,
            32,
            1,
            Metric::L2,
            3,
            [1, 1],
        ),
        (
            "f16 d64 b16 g8 L1 pool 17",
            DType::F16,
            64,
            16,
            8,
            Metric::L1,
            17,
            [0, 0],
        ),
    ];
    for (name, dtype, head_dim, block_size, group_size, metric, pool, skip) in cases {
        let seed = fresh_seed();
        let mut rng = rng(seed);
        // 2 seqs x 1 layer x 2 heads: a prompt of 120 and one of 45 tokens (all heads alike).
        let lens = [120u32, 120, 45, 45];
        let config = config_for(dtype, head_dim, block_size, group_size, 2, 1, 2, &lens, 3);
        let mut snapshot = random_snapshot(&config, &lens, &mut rng);
        snapshot.last_position = vec![119, 44];
        let window = 50usize;
        let window_lens = [50u32, 45]; // the second covers its whole prompt
        let hq = (2 * group_size) as usize;
        let q_values = random_values(dtype, 2 * window * hq * head_dim as usize, 4.0, &mut rng);
        let q = Tensor::from_f32(
            &Backend::Cpu,
            dtype,
            &[2, window, hq, head_dim as usize],
            &q_values,
        )
        .unwrap();
        let args = AggregateArgs {
            scale: 1.0 / (head_dim as f32).sqrt(),
            metric,
            metric_skip: &skip,
            window_lens: &window_lens,
            pool_kernel: pool,
        };
        let scale = args.scale as f64;
        let lse = window_lse(
            &config,
            &snapshot,
            0,
            &q_values,
            window,
            &window_lens,
            scale,
        );
        let naive = |lse: &[f64]| {
            naive_aggregate(
                &config,
                &snapshot,
                0,
                (&q_values, lse),
                window,
                &window_lens,
                &skip,
                metric,
                pool as usize,
                scale,
            )
        };
        let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
        cache.aggregate(0, &q, &args).unwrap();
        assert_gained(
            &cache.snapshot().unwrap(),
            &snapshot,
            &naive(&lse),
            &format!("{name} (seed {seed})"),
        );
        // A caller's log-sum-exp, off from the softmax's own by up to 1 either way, is what
        // the probabilities are divided by.
        let given: Vec<f32> = lse
            .iter()
            .map(|&x| (x + rng.random_range(-1.0..1.0)) as f32)
            .collect();
        let given_t =
            Tensor::from_f32(&Backend::Cpu, DType::F32, &[2, window, hq], &given).unwrap();
        let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
        cache.aggregate_with_lse(0, &q, &given_t, &args).unwrap();
        let given: Vec<f64> = given.iter().map(|&x| x as f64).collect();
        assert_gained(
            &cache.snapshot().unwrap(),
            &snapshot,
            &naive(&given),
            &format!("{name}, given lse (seed {seed})"),
        );
    }
}

#[test]
fn l1_mass_of_a_window_is_one_per_query_and_head() {
    // Without pooling and skip, every query's probabilities sum to 1 over the keys it sees.
    let lens = [64u32];
    let config = config_for(DType::F32, 64, 16, 4, 1, 1, 1, &lens, 0);
    let mut rng = rng(fresh_seed());
    let mut snapshot = random_snapshot(&config, &lens, &mut rng);
    snapshot.metric = vec![0.0; snapshot.metric.len()];
    snapshot.last_position = vec![63];
    let q_values = random_values(DType::F32, 64 * 4 * 64, 3.0, &mut rng);
    let q = Tensor::from_f32(&Backend::Cpu, DType::F32, &[1, 64, 4, 64], &q_values).unwrap();
    let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
    let args = AggregateArgs {
        scale: 0.125,
        metric: Metric::L1,
        metric_skip: &[0],
        window_lens: &[64],
        pool_kernel: 1,
    };
    cache.aggregate(0, &q, &args).unwrap();
    let mass: f64 = cache
        .snapshot()
        .unwrap()
        .metric
        .iter()
        .map(|&m| m as f64)
        .sum();
    assert!(
        (mass - 64.0 * 4.0).abs() < 1e-3,
        "L1 mass {mass}, expected 256"
    );
}

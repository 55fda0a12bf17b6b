//! The CPU reference decode against a naive dense softmax attention written here from SPEC §3
//! and §2 alone (its own index arithmetic, f64).

mod common;

use common::{
    assert_close, config_for, fresh_seed, out_label, random_snapshot, random_values, rng,
};
use kvcompress::{
    Backend, CacheConfig, CacheSnapshot, DType, DecodeArgs, Metric, PagedKvCache, Recording, Tensor,
};

/// Dense attention over the live KVs of every head slot of `layer`, gathered by hand; also the
/// squared attention summed over each group, per pool slot, for KVs with position <=
/// `thresholds[seq]` (SPEC §3 recording, L2).
fn naive_decode(
    config: &CacheConfig,
    s: &CacheSnapshot,
    layer: usize,
    q: &[f32],
    scale: f64,
    thresholds: &[i32],
) -> (Vec<f64>, Vec<f64>) {
    let (l, h, g, d, b) = (
        config.num_layers as usize,
        config.num_kv_heads as usize,
        config.group_size as usize,
        config.head_dim as usize,
        config.block_size as usize,
    );
    let mb = config.max_blocks_per_head as usize;
    let k: Vec<f32> = kvcompress::dtype::decode(config.dtype, &s.k_pool);
    let v: Vec<f32> = kvcompress::dtype::decode(config.dtype, &s.v_pool);
    let mut out = vec![0.0f64; config.num_seqs as usize * h * g * d];
    let mut recorded = vec![0.0f64; s.metric.len()];
    for seq in 0..config.num_seqs as usize {
        for qh in 0..h * g {
            let hs = (seq * l + layer) * h + qh / g;
            let len = s.context_lens[hs] as usize;
            let row = |j: usize| (s.block_tables[hs * mb + j / b] as usize * b + j % b) * d;
            let qrow = &q[(seq * h * g + qh) * d..][..d];
            let scores: Vec<f64> = (0..len)
                .map(|j| {
                    scale
                        * (0..d)
                            .map(|x| qrow[x] as f64 * k[row(j) + x] as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for j in 0..len {
                let a = (scores[j] - m).exp() / z;
                let slot = row(j) / d;
                if s.position[slot] <= thresholds[seq] {
                    recorded[slot] += a * a;
                }
                for x in 0..d {
                    out[(seq * h * g + qh) * d + x] += a * v[row(j) + x] as f64;
                }
            }
        }
    }
    (out, recorded)
}

#[test]
fn reference_decode_matches_naive_dense_attention() {
    let cases = [
        ("f32 d64 b8 g1", DType::F32, 64, 8, 1),
        ("f16 d128 b16 g4", DType::F16, 128, 16, 4),
        ("bf16 d256 b32 g2", DType::Bf16, 256, 32, 2),
        ("f16 d64 b16 g8", DType::F16, 64, 16, 8),
    ];
    for (name, dtype, head_dim, block_size, group_size) in cases {
        let seed = fresh_seed();
        let mut rng = rng(seed);
        let (num_seqs, num_layers, num_kv_heads) = (2, 2, 2);
        let b = block_size;
        let lens: Vec<u32> = [0, 1, b - 1, b, b + 1, 97, 300, 2 * b]
            .into_iter()
            .cycle()
            .take((num_seqs * num_layers * num_kv_heads) as usize)
            .collect();
        let config = config_for(
            dtype,
            head_dim,
            block_size,
            group_size,
            num_seqs,
            num_layers,
            num_kv_heads,
            &lens,
            5,
        );
        let snapshot = random_snapshot(&config, &lens, &mut rng);
        let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
        let q_shape = [
            num_seqs as usize,
            (num_kv_heads * group_size) as usize,
            head_dim as usize,
        ];
        let q_values = random_values(dtype, q_shape.iter().product(), 4.0, &mut rng);
        let q = Tensor::from_f32(&Backend::Cpu, dtype, &q_shape, &q_values).unwrap();
        for layer in 0..num_layers {
            let mut out = Tensor::full(&Backend::Cpu, dtype, &q_shape, f32::NAN).unwrap();
            let args = DecodeArgs::for_head_dim(head_dim);
            cache.decode(layer, &q, &mut out, &args).unwrap();
            let no_record = vec![-1; num_seqs as usize];
            let (expected, _) = naive_decode(
                &config,
                &snapshot,
                layer as usize,
                &q_values,
                args.scale as f64,
                &no_record,
            );
            let expected: Vec<f32> = kvcompress::dtype::decode(
                dtype,
                &kvcompress::dtype::encode(
                    dtype,
                    &expected.iter().map(|&x| x as f32).collect::<Vec<_>>(),
                ),
            );
            let context = format!("{name} layer {layer} seed {seed}");
            assert_close(
                dtype,
                &out.to_f32().unwrap(),
                &expected,
                &context,
                out_label(q_shape),
            );
        }
    }
}

#[test]
fn empty_head_slot_gives_zeros() {
    let lens = [0u32, 5];
    let config = config_for(DType::F16, 64, 16, 2, 1, 1, 2, &lens, 1);
    let mut rng = rng(fresh_seed());
    let mut cache = PagedKvCache::from_snapshot(
        &Backend::Cpu,
        config,
        &random_snapshot(&config, &lens, &mut rng),
    )
    .unwrap();
    let q = Tensor::full(&Backend::Cpu, DType::F16, &[1, 4, 64], 1.0).unwrap();
    let mut out = Tensor::full(&Backend::Cpu, DType::F16, &[1, 4, 64], f32::NAN).unwrap();
    cache
        .decode(0, &q, &mut out, &DecodeArgs::for_head_dim(64))
        .unwrap();
    let out = out.to_f32().unwrap();
    assert!(
        out[..2 * 64].iter().all(|&x| x == 0.0),
        "head slot of length 0 must give zeros"
    );
    assert!(out[2 * 64..].iter().all(|x| x.is_finite()));
}

#[test]
fn reference_recording_matches_naive_squared_attention() {
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let lens = [0u32, 1, 15, 16, 17, 97, 300, 40];
    let config = config_for(DType::F32, 64, 16, 4, 2, 1, 4, &lens, 3);
    let snapshot = random_snapshot(&config, &lens, &mut rng);
    let mut cache = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
    let q_shape = [2, 16, 64];
    let q_values = random_values(DType::F32, 2 * 16 * 64, 4.0, &mut rng);
    let q = Tensor::from_f32(&Backend::Cpu, DType::F32, &q_shape, &q_values).unwrap();
    let mut out = Tensor::full(&Backend::Cpu, DType::F32, &q_shape, f32::NAN).unwrap();
    let metric_skip = [3, 0];
    let args = DecodeArgs {
        record: Some(Recording {
            metric: Metric::L2,
            metric_skip: &metric_skip,
        }),
        ..DecodeArgs::for_head_dim(64)
    };
    cache.decode(0, &q, &mut out, &args).unwrap();
    let thresholds: Vec<i32> = (0..2)
        .map(|seq| snapshot.last_position[seq] - metric_skip[seq])
        .collect();
    let (_, recorded) = naive_decode(
        &config,
        &snapshot,
        0,
        &q_values,
        args.scale as f64,
        &thresholds,
    );
    let after = cache.snapshot().unwrap();
    let mut touched = 0;
    for (slot, ((&now, &before), &rec)) in after
        .metric
        .iter()
        .zip(&snapshot.metric)
        .zip(&recorded)
        .enumerate()
    {
        if before.is_nan() {
            assert!(
                now.is_nan(),
                "slot {slot}: a dead slot was recorded (seed {seed})"
            );
            continue;
        }
        let expected = before as f64 + rec;
        let diff = (now as f64 - expected).abs();
        assert!(
            diff <= 1e-6 * expected.abs() + 1e-12,
            "slot {slot}: metric {now} expected {expected} (seed {seed})"
        );
        touched += (rec > 0.0) as usize;
    }
    assert!(touched > 300, "only {touched} slots recorded (seed {seed})");
}

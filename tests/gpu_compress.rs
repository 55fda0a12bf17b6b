//! The compression step on the GPU against the CPU reference (SPEC §5-§7): schedules and
//! compaction agree exactly (reports, and every array of the cache bit for bit), ties, NaN
//! and infinite metrics included, in every mode and budget kind; an explicit budget above
//! what can be freed fails on both and changes nothing; and 200 decode steps with recording
//! and compression every 16 keep both caches consistent and equal.

mod common;

use common::{
    assert_close, assert_metric_close, assert_same_snapshot, fresh_seed, gpu_or_skip, out_label,
    random_values, rng,
};
use kvc_abi::plan::{plan_compress, COMPACT_NARROW_HEADS_PER_SM};
use kvcompress::{
    Backend, Budget, CacheConfig, CacheSnapshot, CompressArgs, DType, DecodeArgs, Error, Metric,
    Mode, PagedKvCache, Recording, Tensor,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

/// A cache whose head slots hold random lengths of KVs with distinct positions in a random
/// logical order; metrics from `metric(rng)`.
fn random_cache(
    rng: &mut StdRng,
    config: CacheConfig,
    max_len: u32,
    last: i32,
    metric: &dyn Fn(&mut StdRng) -> f32,
) -> CacheSnapshot {
    let g = config.geometry();
    let slots = g.num_head_slots() as usize;
    let lens: Vec<u32> = (0..slots).map(|_| rng.random_range(0..=max_len)).collect();
    let mut s = common::random_snapshot(&config, &lens, rng);
    s.last_position = vec![last; config.num_seqs as usize];
    let b = config.block_size as usize;
    for (hs, &len) in lens.iter().enumerate() {
        let mut positions: Vec<i32> = (0..=last).collect();
        positions.shuffle(rng);
        for (j, &position) in positions.iter().take(len as usize).enumerate() {
            let slot = s.block_tables[hs * config.max_blocks_per_head as usize + j / b] as usize
                * b
                + j % b;
            s.position[slot] = position;
            s.metric[slot] = metric(rng);
        }
    }
    s
}

fn config(
    dtype: DType,
    head_dim: u32,
    block_size: u32,
    num_seqs: u32,
    layers: u32,
    heads: u32,
    max_len: u32,
) -> CacheConfig {
    let mb = max_len.div_ceil(block_size) + 2;
    CacheConfig {
        num_seqs,
        num_layers: layers,
        num_kv_heads: heads,
        group_size: 2,
        head_dim,
        block_size,
        max_blocks_per_head: mb,
        num_blocks: num_seqs * layers * heads * mb,
        dtype,
    }
}

#[test]
fn compress_matches_reference_exactly() {
    let Some(gpu) = gpu_or_skip("compress_matches_reference_exactly") else {
        return;
    };
    /// A name and a metric distribution.
    type Palette = (&'static str, fn(&mut StdRng) -> f32);
    let palettes: [Palette; 4] = [
        ("continuous", |r| r.random_range(0.0..1.0)),
        ("ties", |r| [0.0f32, 0.25, 0.5, 1.0][r.random_range(0..4)]),
        ("all equal", |_| 0.5),
        ("nan and inf", |r| {
            [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0, 0.3][r.random_range(0..6)]
        }),
    ];
    let shapes = [
        (DType::F16, 128, 16, 3000u32),
        (DType::Bf16, 64, 8, 700),
        (DType::F32, 256, 32, 9000),
    ];
    let budgets = [
        Budget::Rate(8.0),
        Budget::Rate(2.0),
        Budget::MaxTokens(100),
        Budget::Blocks(12),
        Budget::Blocks(1_000_000),
        Budget::Rate(64.0),
    ];
    let modes = [Mode::Variable, Mode::PerLayer, Mode::Uniform];
    let mut case = 0;
    for &(dtype, head_dim, block_size, max_len) in &shapes {
        for (palette, metric) in &palettes {
            let seed = fresh_seed();
            let mut rng = rng(seed);
            let cfg = config(dtype, head_dim, block_size, 3, 2, 3, max_len);
            let snapshot = random_cache(&mut rng, cfg, max_len, max_len as i32 + 40, metric);
            for mode in modes {
                let budget = budgets[case % budgets.len()];
                case += 1;
                let name = format!(
                    "{} d{head_dim} b{block_size} {palette} {mode:?} {budget:?} (seed {seed})",
                    dtype.name()
                );
                let args = CompressArgs {
                    seqs: &[2, 0],
                    budgets: &[budget, Budget::Rate(4.0)],
                    protected: &[rng.random_range(0..64), 7],
                    sinks: rng.random_range(0..4),
                    mode,
                };
                compress_on_both(&gpu, cfg, &snapshot, &args, &name);
            }
        }
    }
}

/// Compresses `snapshot` on the GPU and the CPU with `args`: the reports, the freed blocks,
/// every array of the caches and the allocators agree exactly (or both refuse the budget).
fn compress_on_both(
    gpu: &Backend,
    cfg: CacheConfig,
    snapshot: &CacheSnapshot,
    args: &CompressArgs,
    name: &str,
) {
    let mut on_gpu = PagedKvCache::from_snapshot(gpu, cfg, snapshot).unwrap();
    let mut on_cpu = PagedKvCache::from_snapshot(&Backend::Cpu, cfg, snapshot).unwrap();
    match (on_gpu.compress(args), on_cpu.compress(args)) {
        (Ok(g), Ok(c)) => {
            assert_eq!(g.seqs, c.seqs, "{name}: sequence reports");
            assert_eq!(g.heads, c.heads, "{name}: head reports");
            assert_eq!(
                on_gpu.allocator().free_blocks(),
                on_cpu.allocator().free_blocks(),
                "{name}: free lists"
            );
            assert!(
                g.heads.iter().any(|h| h.blocks_freed > 0)
                    || g.seqs.iter().all(|s| s.freed_blocks == 0),
                "{name}"
            );
        }
        (
            Err(Error::InvalidArgument { arg: "budgets", .. }),
            Err(Error::InvalidArgument { arg: "budgets", .. }),
        ) => {}
        (g, c) => panic!("{name}: GPU {g:?} vs CPU {c:?}"),
    }
    assert_same_snapshot(
        &on_gpu.snapshot().unwrap(),
        &on_cpu.snapshot().unwrap(),
        name,
    );
    on_gpu.verify().unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(
        on_gpu.allocator().num_free(),
        on_cpu.allocator().num_free(),
        "{name}"
    );
}

/// Groups larger than the scan CTAs: 520 head slots a sequence (more than the budget kernel's
/// threads, several head slots per warp; 33 digit and final CTAs per group in `variable` mode,
/// the last one partly filled, and one partly filled CTA per group of 13 in `per_layer`), few
/// KVs each, so that the ties at the threshold are shared out across chunks of head slots.
/// Steps of all the sequences (enough head slots for the device's SMs) compact in narrow CTAs
/// (`CompressPlan::compact_narrow`), steps of one in either, by the device's SM count; the
/// other tests' few head slots take wide ones.
#[test]
fn compress_with_many_head_slots_per_sequence_matches_reference() {
    let Some(gpu) = gpu_or_skip("compress_with_many_head_slots_per_sequence_matches_reference")
    else {
        return;
    };
    let Backend::Cuda(device) = &gpu else {
        unreachable!("gpu_or_skip gives a CUDA backend")
    };
    let num_sms = device.props().num_sms;
    let (max_len, layers, heads) = (120, 40, 13);
    let seqs = (COMPACT_NARROW_HEADS_PER_SM * num_sms).div_ceil(layers * heads) + 1;
    let cfg = config(DType::F16, 64, 8, seqs, layers, heads, max_len);
    let narrow = |work_seqs: u32, group_heads: u32| {
        plan_compress(&cfg.geometry(), work_seqs, group_heads, max_len, num_sms).compact_narrow
    };
    let all: Vec<u32> = (0..seqs).rev().collect();
    // Four metric values (ties everywhere), or the same with a little noise (few ties).
    for (palette, noise) in [("ties", 0.0f32), ("continuous", 0.01)] {
        let seed = fresh_seed();
        let mut rng = rng(seed);
        let snapshot = random_cache(&mut rng, cfg, max_len, max_len as i32 + 40, &|r| {
            [0.0f32, 0.5, 1.0, 2.0][r.random_range(0..4)] + noise * r.random::<f32>()
        });
        for (mode, budget) in [
            (Mode::Variable, Budget::Rate(8.0)),
            (Mode::Variable, Budget::Blocks(300)),
            (Mode::PerLayer, Budget::Rate(3.0)),
            (Mode::Uniform, Budget::MaxTokens(40)),
        ] {
            let group_heads = mode.group_heads(layers, heads);
            for work in [&all[..1], &all[..]] {
                let is_narrow = narrow(work.len() as u32, group_heads);
                assert!(is_narrow || work.len() == 1, "all sequences compact narrow");
                let name = format!(
                    "520 head slots, {} sequences ({} compaction), {palette} {mode:?} \
                     {budget:?} (seed {seed})",
                    work.len(),
                    if is_narrow { "narrow" } else { "wide" }
                );
                let mut budgets = vec![Budget::Rate(2.0); work.len()];
                budgets[0] = budget;
                let protected: Vec<u32> =
                    (0..work.len()).map(|_| rng.random_range(0..16)).collect();
                let args = CompressArgs {
                    seqs: work,
                    budgets: &budgets,
                    protected: &protected,
                    sinks: rng.random_range(0..3),
                    mode,
                };
                compress_on_both(&gpu, cfg, &snapshot, &args, &name);
            }
        }
    }
}

#[test]
fn continual_compression_keeps_both_caches_consistent_and_equal() {
    let Some(gpu) = gpu_or_skip("continual_compression_keeps_both_caches_consistent_and_equal")
    else {
        return;
    };
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let (seqs, layers, heads, group, d) = (2u32, 2u32, 2u32, 2u32, 64usize);
    let prompt = 300u32;
    let cfg = CacheConfig {
        num_seqs: seqs,
        num_layers: layers,
        num_kv_heads: heads,
        group_size: group,
        head_dim: d as u32,
        block_size: 16,
        max_blocks_per_head: 64,
        num_blocks: seqs * layers * heads * 64,
        dtype: DType::F16,
    };
    let mut caches = [
        PagedKvCache::new(&gpu, cfg).unwrap(),
        PagedKvCache::new(&Backend::Cpu, cfg).unwrap(),
    ];
    let hq = (heads * group) as usize;
    let metric_skip = [1, 1];
    for step in 0..=200u32 {
        let new = if step == 0 { prompt } else { 1 };
        let tokens = (new * seqs) as usize;
        let kv = random_values(DType::F16, tokens * heads as usize * d, 1.0, &mut rng);
        let q = random_values(DType::F16, seqs as usize * hq * d, 4.0, &mut rng);
        let positions: Vec<i32> = (0..seqs)
            .flat_map(|s| {
                let first = caches[1].last_position(s) + 1;
                (0..new as i32).map(move |t| first + t)
            })
            .collect();
        let mut outs = Vec::new();
        for cache in caches.iter_mut() {
            let b = cache.backend();
            for layer in 0..layers {
                let t =
                    Tensor::from_f32(&b, DType::F16, &[tokens, heads as usize, d], &kv).unwrap();
                cache
                    .append_kv(layer, &t, &t, &positions, &[new; 2])
                    .unwrap();
                let qt = Tensor::from_f32(&b, DType::F16, &[seqs as usize, hq, d], &q).unwrap();
                let mut out =
                    Tensor::full(&b, DType::F16, &[seqs as usize, hq, d], f32::NAN).unwrap();
                let args = DecodeArgs {
                    record: Some(Recording {
                        metric: Metric::L2,
                        metric_skip: &metric_skip,
                    }),
                    ..DecodeArgs::for_head_dim(d as u32)
                };
                cache.decode(layer, &qt, &mut out, &args).unwrap();
                outs.push(out.to_f32().unwrap());
            }
        }
        for layer in 0..layers as usize {
            let context = format!("step {step} layer {layer} (seed {seed})");
            assert_close(
                DType::F16,
                &outs[layer],
                &outs[layers as usize + layer],
                &context,
                out_label([seqs as usize, hq, d]),
            );
        }
        if step % 16 == 0 {
            // Metrics differ in the last bits between backends, which can change a decision;
            // so the GPU cache is first given the CPU's metrics, then both compress the same.
            let cpu = caches[1].snapshot().unwrap();
            let mut gpu_snapshot = caches[0].snapshot().unwrap();
            assert_metric_close(
                &gpu_snapshot.metric,
                &cpu.metric,
                &format!("step {step} metrics (seed {seed})"),
            );
            gpu_snapshot.metric = cpu.metric.clone();
            caches[0] = PagedKvCache::from_snapshot(&gpu, cfg, &gpu_snapshot).unwrap();
            let args = CompressArgs {
                seqs: &[0, 1],
                budgets: &[Budget::Rate(2.0), Budget::MaxTokens(120)],
                protected: &[8, 8],
                sinks: 2,
                mode: Mode::Variable,
            };
            let reports: Vec<_> = caches
                .iter_mut()
                .map(|c| c.compress(&args).unwrap())
                .collect();
            assert_eq!(reports[0], reports[1], "step {step} (seed {seed})");
            let (g, c) = (caches[0].snapshot().unwrap(), caches[1].snapshot().unwrap());
            assert_same_snapshot(
                &g,
                &c,
                &format!("step {step} after compression (seed {seed})"),
            );
            // The protected window survives: the newest 8 positions of each sequence.
            for seq in 0..seqs {
                let last = caches[1].last_position(seq);
                for i in 0..layers * heads {
                    let hs = (seq * layers * heads + i) as usize;
                    let b = 16usize;
                    let mut kept: Vec<i32> = (0..c.context_lens[hs] as usize)
                        .map(|j| c.position[c.block_tables[hs * 64 + j / b] as usize * b + j % b])
                        .collect();
                    kept.sort_unstable();
                    for p in last - 7..=last {
                        assert!(
                            kept.binary_search(&p).is_ok(),
                            "step {step}: position {p} of seq {seq} evicted (seed {seed})"
                        );
                    }
                }
            }
        }
        for cache in &caches {
            cache.verify().unwrap_or_else(|e| {
                panic!(
                    "step {step} on {}: {e} (seed {seed})",
                    cache.backend().describe()
                )
            });
        }
    }
}

//! `kvc verify`: every kernel on the CUDA device against the CPU reference, on random inputs of
//! a model's shape, with the tolerances of the test suite; a mismatch exits non-zero.

use kvcompress::bench::filled_snapshot;
use kvcompress::tolerance::{check_close, check_metrics};
use kvcompress::{
    AggregateArgs, Backend, Budget, CacheConfig, DType, DecodeArgs, Metric, PagedKvCache,
    Recording, Tensor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{AnyResult, Preset, WholeBatch};

/// One check's outcome.
struct Row {
    kernel: &'static str,
    dtype: DType,
    result: Result<String, String>,
}

/// Runs `kvc verify`; `Err` when any check fails.
pub fn verify(model: Preset, batch: u32, context: u32, layers: u32, seed: u64) -> AnyResult {
    let gpu = Backend::cuda(0)?;
    let (preset_layers, kv_heads, q_heads, head_dim) = crate::demo::geometry(model);
    let layers = layers.min(preset_layers);
    println!(
        "device: {}   shape: {} ({} of {} layers, {} KV heads, {} query heads, D {}), batch {} x context {}",
        gpu.describe(),
        crate::preset_name(model),
        layers,
        preset_layers,
        kv_heads,
        q_heads,
        head_dim,
        batch,
        context
    );
    let mut rows = Vec::new();
    for dtype in DType::ALL {
        let blocks = (context + 16).div_ceil(16) + 1;
        let config = CacheConfig {
            num_seqs: batch,
            num_layers: layers,
            num_kv_heads: kv_heads,
            group_size: q_heads / kv_heads,
            head_dim,
            block_size: 16,
            max_blocks_per_head: blocks,
            num_blocks: batch * layers * kv_heads * blocks,
            dtype,
        };
        let snapshot = filled_snapshot(config, context, seed);
        let mut caches = [
            PagedKvCache::from_snapshot(&gpu, config, &snapshot)?,
            PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot)?,
        ];
        let mut rng = StdRng::seed_from_u64(seed);
        let hq = q_heads as usize;
        let d = head_dim as usize;

        let q: Vec<f32> = (0..batch as usize * hq * d)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let skip = vec![1; batch as usize];
        let args = DecodeArgs {
            record: Some(Recording {
                metric: Metric::L2,
                metric_skip: &skip,
            }),
            ..DecodeArgs::for_head_dim(head_dim)
        };
        let mut outs = Vec::new();
        for cache in caches.iter_mut() {
            let b = cache.backend();
            let qt = Tensor::from_f32(&b, dtype, &[batch as usize, hq, d], &q)?;
            let mut out = Tensor::full(&b, dtype, &[batch as usize, hq, d], f32::NAN)?;
            cache.decode(layers - 1, &qt, &mut out, &args)?;
            outs.push(out.to_f32()?);
        }
        let metrics = [caches[0].snapshot()?.metric, caches[1].snapshot()?.metric];
        rows.push(Row {
            kernel: "decode + L2 recording",
            dtype,
            result: check_close(dtype, &outs[0], &outs[1])
                .map_err(|(i, e)| format!("output {i}: {e}"))
                .and_then(|worst| {
                    check_metrics(&metrics[0], &metrics[1])
                        .map(|()| format!("max error {:.2} of tolerance", worst))
                        .map_err(|(i, e)| format!("slot {i}: {e}"))
                }),
        });

        let window = 32.min(context);
        let wq: Vec<f32> = (0..batch as usize * window as usize * hq * d)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let window_lens = vec![window; batch as usize];
        let agg = AggregateArgs::for_head_dim(head_dim, &skip, &window_lens);
        for cache in caches.iter_mut() {
            let qt = Tensor::from_f32(
                &cache.backend(),
                dtype,
                &[batch as usize, window as usize, hq, d],
                &wq,
            )?;
            cache.aggregate(0, &qt, &agg)?;
        }
        let metrics = [caches[0].snapshot()?.metric, caches[1].snapshot()?.metric];
        rows.push(Row {
            kernel: "window aggregation",
            dtype,
            result: check_metrics(&metrics[0], &metrics[1])
                .map(|()| "metrics within 1e-4".to_string())
                .map_err(|(i, e)| format!("slot {i}: {e}")),
        });
        // The same window given its log-sum-exp (as a prefill's attention returns it), on the
        // last layer: a uniform softmax's ln(context) plus up to 4.
        let lse: Vec<f32> = (0..batch as usize * window as usize * hq)
            .map(|_| (context as f32).ln() + rng.random_range(0.0..4.0))
            .collect();
        for cache in caches.iter_mut() {
            let b = cache.backend();
            let qt = Tensor::from_f32(&b, dtype, &[batch as usize, window as usize, hq, d], &wq)?;
            let lse =
                Tensor::from_f32(&b, DType::F32, &[batch as usize, window as usize, hq], &lse)?;
            cache.aggregate_with_lse(layers - 1, &qt, &lse, &agg)?;
        }
        let metrics = [caches[0].snapshot()?.metric, caches[1].snapshot()?.metric];
        rows.push(Row {
            kernel: "window aggregation, given lse",
            dtype,
            result: check_metrics(&metrics[0], &metrics[1])
                .map(|()| "metrics within 1e-4".to_string())
                .map_err(|(i, e)| format!("slot {i}: {e}")),
        });
        // Compression acts on both from the same metrics (the GPU's differ in the last bits).
        let mut snapshot = caches[0].snapshot()?;
        snapshot.metric = metrics[1].clone();
        caches[0] = PagedKvCache::from_snapshot(&gpu, config, &snapshot)?;

        let kv: Vec<f32> = (0..batch as usize * 16 * kv_heads as usize * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let positions: Vec<i32> = (0..batch)
            .flat_map(|_| (0..16).map(move |t| context as i32 + t))
            .collect();
        for cache in caches.iter_mut() {
            let t = Tensor::from_f32(
                &cache.backend(),
                dtype,
                &[batch as usize * 16, kv_heads as usize, d],
                &kv,
            )?;
            cache.append_kv(0, &t, &t, &positions, &vec![16; batch as usize])?;
        }
        rows.push(Row {
            kernel: "append_kv",
            dtype,
            result: same(&caches).map(|()| "bit-exact".to_string()),
        });

        let batch_args = WholeBatch::new(batch, Budget::Rate(8.0));
        let args = batch_args.args();
        let reports = [caches[0].compress(&args)?, caches[1].compress(&args)?];
        rows.push(Row {
            kernel: "compress (rate 8)",
            dtype,
            result: if reports[0] != reports[1] {
                Err("reports differ".to_string())
            } else {
                same(&caches)
                    .map(|()| format!("bit-exact, {} blocks freed", reports[0].freed_blocks()))
            },
        });
    }
    println!("| kernel | dtype | result |");
    println!("|---|---|---|");
    let mut failed = 0;
    for row in &rows {
        let (mark, text) = match &row.result {
            Ok(t) => ("ok", t.clone()),
            Err(e) => {
                failed += 1;
                ("MISMATCH", e.clone())
            }
        };
        println!("| {} | {} | {mark}: {text} |", row.kernel, row.dtype.name());
    }
    if failed > 0 {
        return Err(format!("{failed} of {} checks failed", rows.len()).into());
    }
    Ok(())
}

/// Whether both caches hold the same arrays, bit for bit.
fn same(caches: &[PagedKvCache; 2]) -> Result<(), String> {
    let (a, b) = (
        caches[0].snapshot().map_err(|e| e.to_string())?,
        caches[1].snapshot().map_err(|e| e.to_string())?,
    );
    let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let checks = [
        ("k_pool", a.k_pool == b.k_pool),
        ("v_pool", a.v_pool == b.v_pool),
        ("metric", bits(&a.metric) == bits(&b.metric)),
        ("position", a.position == b.position),
        ("block_tables", a.block_tables == b.block_tables),
        ("context_lens", a.context_lens == b.context_lens),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(format!("{name} differs")),
        None => Ok(()),
    }
}

//! `kvc bench`: kernels at standard shapes, CUDA-event medians, GB/s, and the fraction of a
//! device-to-device copy measured in the same run.

use kvcompress::bench::{
    copy_bandwidth, decode_kv_bytes, filled_cache, rotation_layers, time_gpu, window_inputs,
};
use kvcompress::{
    AggregateArgs, Backend, Budget, CacheConfig, DType, DecodeArgs, Metric, PagedKvCache,
    Recording, Tensor,
};
use serde_json::json;

use crate::{AnyResult, Dtype, WholeBatch};

/// Cache geometry of a benchmark (defaults: Llama-3.1-8B, f16, B=16).
#[derive(clap::Args)]
pub struct ModelArgs {
    #[arg(long, value_enum, default_value_t = Dtype::F16)]
    dtype: Dtype,
    #[arg(long, default_value_t = 128)]
    head_dim: u32,
    #[arg(long, default_value_t = 8)]
    kv_heads: u32,
    #[arg(long, default_value_t = 4)]
    group_size: u32,
    #[arg(long, default_value_t = 16)]
    block_size: u32,
}

impl ModelArgs {
    /// A config for `batch` sequence rows of `context` KVs per head slot and `layers` layers.
    fn config(&self, batch: u32, context: u32, layers: u32) -> CacheConfig {
        let blocks_per_head = context.div_ceil(self.block_size);
        CacheConfig {
            num_seqs: batch,
            num_layers: layers,
            num_kv_heads: self.kv_heads,
            group_size: self.group_size,
            head_dim: self.head_dim,
            block_size: self.block_size,
            max_blocks_per_head: blocks_per_head,
            num_blocks: batch * layers * self.kv_heads * blocks_per_head,
            dtype: self.dtype.into(),
        }
    }

    /// Bytes of K (or V) of `batch` x `context` KVs in one layer.
    fn layer_k_bytes(&self, batch: u32, context: u32) -> u64 {
        batch as u64
            * self.kv_heads as u64
            * context as u64
            * self.head_dim as u64
            * DType::from(self.dtype).elem_bytes() as u64
    }

    fn describe(&self) -> String {
        format!(
            "{} D={} H={} G={} B={}",
            DType::from(self.dtype).name(),
            self.head_dim,
            self.kv_heads,
            self.group_size,
            self.block_size
        )
    }
}

/// Timing and output options of a benchmark.
#[derive(clap::Args)]
pub struct BenchOpts {
    /// Timed runs per shape (after 5 warm-up runs).
    #[arg(long, default_value_t = 50)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// The CUDA device and the copy bandwidth measured now (the yardstick of this run).
fn bench_device() -> Result<(std::sync::Arc<kvcompress::gpu::Gpu>, f64), Box<dyn std::error::Error>>
{
    let Backend::Cuda(gpu) = Backend::cuda(0)? else {
        unreachable!("Backend::cuda returns CUDA")
    };
    gpu.hold_freed_memory()?;
    let (_, copy_gbps) = copy_bandwidth(&gpu, 1 << 30)?;
    Ok((gpu, copy_gbps))
}

/// The JSON report of one benchmark: the card, the kernel, the geometry, the copy bandwidth of
/// this run and the rows.
fn report_json(
    gpu: &kvcompress::gpu::Gpu,
    kernel: &str,
    model: &ModelArgs,
    copy_gbps: f64,
    rows: Vec<serde_json::Value>,
) -> serde_json::Value {
    json!({
        "device": gpu.name(), "ptx_target": gpu.ptx_target(), "kernel": kernel, "model": model.describe(),
        "copy_gbps": copy_gbps, "results": rows,
    })
}

/// Prints a report as JSON, or as a markdown table of `columns` (key, header, decimals).
fn print_report(
    report: &serde_json::Value,
    title: &str,
    columns: &[(&str, &str, usize)],
    json: bool,
) {
    if json {
        println!("{report}");
        return;
    }
    println!(
        "device: {} (PTX {})   copy (D2D, 1 GiB, read+write): {:.0} GB/s",
        report["device"].as_str().unwrap_or(""),
        report["ptx_target"].as_str().unwrap_or(""),
        report["copy_gbps"].as_f64().unwrap_or(f64::NAN)
    );
    println!("{title}");
    println!(
        "| {} |",
        columns.iter().map(|c| c.1).collect::<Vec<_>>().join(" | ")
    );
    println!("|{}", "---|".repeat(columns.len()));
    for row in report["results"].as_array().into_iter().flatten() {
        let cells: Vec<String> = columns
            .iter()
            .map(|&(key, _, decimals)| match &row[key] {
                serde_json::Value::String(s) => s.clone(),
                v => format!("{:.*}", decimals, v.as_f64().unwrap_or(f64::NAN)),
            })
            .collect();
        println!("| {} |", cells.join(" | "));
    }
}

/// `BATCHxCONTEXT`.
fn parse_shape(shape: &str) -> Result<(u32, u32), String> {
    shape
        .split_once('x')
        .and_then(|(b, c)| Some((b.parse::<u32>().ok()?, c.parse::<u32>().ok()?)))
        .ok_or_else(|| format!("bad shape {shape:?}: expected BATCHxCONTEXT"))
}

pub fn bench_compress(
    shapes: &[String],
    layers: u32,
    rate: f32,
    model: &ModelArgs,
    opts: &BenchOpts,
) -> AnyResult {
    let (gpu, copy_gbps) = bench_device()?;
    let backend = Backend::Cuda(gpu.clone());
    let mut rows = Vec::new();
    for shape in shapes {
        let (batch, context) = parse_shape(shape)?;
        let config = model.config(batch, context, layers);
        let snapshot = kvcompress::bench::filled_snapshot(config, context, 1);
        // One decode step over every layer, in the same run.
        let mut cache = PagedKvCache::from_snapshot(&backend, config, &snapshot)?;
        let q_shape = [
            batch as usize,
            (model.kv_heads * model.group_size) as usize,
            model.head_dim as usize,
        ];
        let q = Tensor::full(&backend, model.dtype.into(), &q_shape, 0.5)?;
        let mut out = Tensor::full(&backend, model.dtype.into(), &q_shape, 0.0)?;
        let decode_args = DecodeArgs::for_head_dim(model.head_dim);
        let step = time_gpu(&gpu, 2, 10, |_| {
            (0..layers).try_for_each(|l| cache.decode(l, &q, &mut out, &decode_args))
        })?;
        drop(cache);
        let batch_args = WholeBatch::new(batch, Budget::Rate(rate));
        let args = batch_args.args();
        let mut samples = Vec::new();
        for _ in 0..opts.reps.clamp(3, 7) {
            let mut cache = PagedKvCache::from_snapshot(&backend, config, &snapshot)?;
            // As in an engine, the step follows a decode step, not the multi-GB upload of a
            // fresh cache (right after which each driver call took 15-27 us instead of 2-5:
            // docs/PERF.md, compression v10).
            (0..layers).try_for_each(|l| cache.decode(l, &q, &mut out, &decode_args))?;
            gpu.synchronize()?;
            let (report, times) = cache.compress_timed(&args)?;
            samples.push((times, report.freed_blocks()));
        }
        samples.sort_by(|a, b| a.0.step_ms.total_cmp(&b.0.step_ms));
        let (times, freed) = samples[samples.len() / 2];
        let total_ms = times.step_ms;
        // The steps' spread: the host's time to the first launch varies by tens of us from
        // step to step (docs/PERF.md, compression v16-v17), which the median alone hides.
        let (fastest, slowest) = (samples[0].0.step_ms, samples[samples.len() - 1].0.step_ms);
        let row_bytes = (model.head_dim * DType::from(model.dtype).elem_bytes()) as f64;
        let moved_bytes = times.moved_kvs as f64 * (2.0 * row_bytes + 8.0);
        let moves_gbps = 2.0 * moved_bytes / (times.compact_ms * 1e6);
        // What the step spends outside the schedule and the compaction: host work until the
        // first launch, `sched_init` (the inputs' copy and the clear), and the rest (launch
        // latency, the wait for the compaction's end).
        let outside_ms = total_ms - times.schedule_ms - times.compact_ms;
        rows.push(json!({
            "shape": shape, "layers": layers, "rate": rate,
            "setup_ms": times.setup_ms,
            "outside_kernels_ms": outside_ms,
            "schedule_ms": times.schedule_ms, "compact_ms": times.compact_ms, "host_ms": times.host_ms,
            "total_ms": total_ms, "total_min_ms": fastest, "total_max_ms": slowest,
            "total_range_ms": format!("{fastest:.3}-{slowest:.3}"),
            "decode_step_ms": step.median_ms(), "over_decode_step": total_ms / step.median_ms(),
            "blocks_freed": freed, "moved_mb": moved_bytes / 1e6,
            "compact_gbps_on_moved": moves_gbps, "compact_fraction_of_copy": moves_gbps / copy_gbps,
        }));
    }
    let report = report_json(&gpu, "compress", model, copy_gbps, rows);
    let columns = [
        ("shape", "batch x context", 0),
        ("schedule_ms", "schedule ms", 3),
        ("compact_ms", "compact ms", 3),
        ("host_ms", "host ms (during compact)", 3),
        ("outside_kernels_ms", "outside schedule + compact ms", 3),
        ("setup_ms", "of which setup", 3),
        ("total_ms", "total ms", 3),
        ("total_range_ms", "total min-max ms", 0),
        ("decode_step_ms", "decode step ms", 3),
        ("over_decode_step", "total / step", 2),
        ("moved_mb", "moved MB", 0),
        (
            "compact_fraction_of_copy",
            "compaction BW on moved / copy",
            2,
        ),
    ];
    print_report(
        &report,
        &format!(
            "compression step (variable, rate {rate}, {layers} layers) {}",
            model.describe()
        ),
        &columns,
        opts.json,
    );
    Ok(())
}

pub fn bench_decode(shapes: &[String], model: &ModelArgs, opts: &BenchOpts) -> AnyResult {
    let (gpu, copy_gbps) = bench_device()?;
    let mut rows = Vec::new();
    for shape in shapes {
        let (batch, context) = parse_shape(shape)?;
        let layers = rotation_layers(&gpu, 2 * model.layer_k_bytes(batch, context), 8);
        let mut cache = filled_cache(&gpu, model.config(batch, context, layers), context, 1)?;
        let backend = cache.backend();
        let q_shape = [
            batch as usize,
            (model.kv_heads * model.group_size) as usize,
            model.head_dim as usize,
        ];
        let q: Vec<f32> = (0..q_shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect();
        let q = Tensor::from_f32(&backend, model.dtype.into(), &q_shape, &q)?;
        let mut out = Tensor::full(&backend, model.dtype.into(), &q_shape, 0.0)?;
        let args = DecodeArgs::for_head_dim(model.head_dim);
        let timing = time_gpu(&gpu, 5, opts.reps, |i| {
            cache.decode(i as u32 % layers, &q, &mut out, &args)
        })?;
        let metric_skip = vec![0; batch as usize];
        let record = DecodeArgs {
            record: Some(Recording {
                metric: Metric::L2,
                metric_skip: &metric_skip,
            }),
            ..args
        };
        let recorded = time_gpu(&gpu, 5, opts.reps, |i| {
            cache.decode(i as u32 % layers, &q, &mut out, &record)
        })?;
        let bytes = decode_kv_bytes(&cache, 0);
        let ms = timing.median_ms();
        let gbps = bytes as f64 / (ms * 1e6);
        rows.push(json!({
            "shape": shape, "batch": batch, "context": context, "layers_rotated": layers,
            "median_ms": ms, "min_ms": timing.min_ms(), "kv_bytes": bytes,
            "gbps": gbps, "fraction_of_copy": gbps / copy_gbps,
            "l2_record_median_ms": recorded.median_ms(),
            "l2_record_over_off": recorded.median_ms() / ms,
        }));
    }
    let report = report_json(&gpu, "decode", model, copy_gbps, rows);
    let columns = [
        ("shape", "batch x context", 0),
        ("median_ms", "median ms", 4),
        ("min_ms", "min ms", 4),
        ("gbps", "GB/s (K+V)", 0),
        ("fraction_of_copy", "of copy", 2),
        ("l2_record_median_ms", "L2 recording ms", 4),
        ("l2_record_over_off", "recording / off", 3),
    ];
    print_report(
        &report,
        &format!("decode {}", model.describe()),
        &columns,
        opts.json,
    );
    Ok(())
}

pub fn bench_append(shapes: &[String], model: &ModelArgs, opts: &BenchOpts) -> AnyResult {
    let (gpu, copy_gbps) = bench_device()?;
    let backend = Backend::Cuda(gpu.clone());
    let mut rows = Vec::new();
    for shape in shapes {
        let (batch, tokens) = parse_shape(shape)?;
        // Every call appends to a layer of its own, so the cache never fills and each call
        // allocates and writes fresh blocks, as in an engine.
        let (warmup, reps) = (2, opts.reps.clamp(3, 20));
        let layers = (warmup + reps) as u32;
        let mut cache = PagedKvCache::new(&backend, model.config(batch, tokens, layers))?;
        let rows_shape = [
            (batch * tokens) as usize,
            model.kv_heads as usize,
            model.head_dim as usize,
        ];
        let k = Tensor::full(&backend, model.dtype.into(), &rows_shape, 0.25)?;
        let v = Tensor::full(&backend, model.dtype.into(), &rows_shape, -0.5)?;
        let positions: Vec<i32> = (0..batch).flat_map(|_| 0..tokens as i32).collect();
        let new_tokens = vec![tokens; batch as usize];
        let timing = time_gpu(&gpu, warmup, reps, |i| {
            cache.append_kv(i as u32, &k, &v, &positions, &new_tokens)
        })?;
        // K and V rows, each read from the new tensors and written into the pool.
        let kv_bytes = 2 * model.layer_k_bytes(batch, tokens);
        let ms = timing.median_ms();
        let gbps = 2.0 * kv_bytes as f64 / (ms * 1e6);
        rows.push(json!({
            "shape": shape, "batch": batch, "tokens_per_seq": tokens, "median_ms": ms,
            "min_ms": timing.min_ms(), "kv_bytes": kv_bytes, "gbps": gbps,
            "fraction_of_copy": gbps / copy_gbps,
        }));
    }
    let report = report_json(&gpu, "append", model, copy_gbps, rows);
    let columns = [
        ("shape", "batch x new tokens", 0),
        ("median_ms", "median ms (host + device)", 4),
        ("min_ms", "min ms", 4),
        ("gbps", "GB/s (K+V read + written)", 0),
        ("fraction_of_copy", "of copy", 2),
    ];
    print_report(
        &report,
        &format!("append_kv, one layer {}", model.describe()),
        &columns,
        opts.json,
    );
    Ok(())
}

pub fn bench_aggregate(
    prompts: &[u32],
    window: u32,
    model: &ModelArgs,
    opts: &BenchOpts,
) -> AnyResult {
    let (gpu, copy_gbps) = bench_device()?;
    let mut rows = Vec::new();
    for &prompt in prompts {
        let w = if window == 0 {
            prompt
        } else {
            window.min(prompt)
        };
        let layers = rotation_layers(&gpu, model.layer_k_bytes(1, prompt), 8);
        let mut cache = filled_cache(&gpu, model.config(1, prompt, layers), prompt, 1)?;
        let q_shape = [
            1,
            w as usize,
            (model.kv_heads * model.group_size) as usize,
            model.head_dim as usize,
        ];
        let (q, lse) = window_inputs(&cache.backend(), model.dtype.into(), q_shape, prompt)?;
        let window_lens = [w];
        let args = AggregateArgs::for_head_dim(model.head_dim, &[0], &window_lens);
        let reps = if w > 4096 { 3 } else { opts.reps };
        for (given_lse, stats) in [(false, "2 passes"), (true, "given lse")] {
            let timing = time_gpu(&gpu, 2, reps, |i| {
                let layer = i as u32 % layers;
                if given_lse {
                    cache.aggregate_with_lse(layer, &q, &lse, &args)
                } else {
                    cache.aggregate(layer, &q, &args)
                }
            })?;
            let k_bytes = model.layer_k_bytes(1, prompt);
            let ms = timing.median_ms();
            let gbps = k_bytes as f64 / (ms * 1e6);
            rows.push(json!({
                "prompt": prompt, "window": w, "stats": stats, "layers_rotated": layers,
                "median_ms": ms, "min_ms": timing.min_ms(), "k_bytes": k_bytes, "gbps": gbps,
                "fraction_of_copy": gbps / copy_gbps,
            }));
        }
    }
    let report = report_json(&gpu, "aggregate", model, copy_gbps, rows);
    let columns = [
        ("prompt", "prompt", 0),
        ("window", "window", 0),
        ("stats", "softmax stats", 0),
        ("median_ms", "median ms", 4),
        ("gbps", "GB/s (K)", 0),
        ("fraction_of_copy", "of copy", 2),
    ];
    print_report(
        &report,
        &format!(
            "window aggregation (L2, pool 7) {}, one layer",
            model.describe()
        ),
        &columns,
        opts.json,
    );
    Ok(())
}

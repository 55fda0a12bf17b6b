//! `kvc`: the kvcompress command. `demo` runs the cache on a small model and checks the
//! device against the CPU reference; `bench` measures kernels against the copy roofline.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use kvcompress::bench::{copy_bandwidth, decode_kv_bytes, filled_cache, rotation_layers, time_gpu};
use kvcompress::{
    Backend, CacheConfig, DType, DecodeArgs, Metric, PagedKvCache, Recording, Tensor,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

#[derive(Parser)]
#[command(name = "kvc", version, about = "KV-Compress kernels: demo, benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Append a prompt and decode on a small model, on CUDA when present (else the CPU
    /// reference), and compare the device with the CPU reference.
    Demo {
        #[arg(long, value_enum, default_value_t = Device::Auto)]
        device: Device,
        /// Prompt length in tokens.
        #[arg(long, default_value_t = 300)]
        context: u32,
        /// Decode steps after the prompt.
        #[arg(long, default_value_t = 20)]
        steps: u32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Benchmark a kernel on the CUDA device.
    Bench {
        #[command(subcommand)]
        kernel: BenchKernel,
    },
}

#[derive(Subcommand)]
enum BenchKernel {
    /// Paged decode attention, Llama-3.1-8B geometry by default (32 query heads, 8 KV heads).
    Decode {
        /// Batch x context shapes, comma-separated.
        #[arg(
            long,
            default_value = "1x32768,16x8192,64x4096,256x1024",
            value_delimiter = ','
        )]
        shapes: Vec<String>,
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
        /// Timed runs per shape (after 5 warm-up runs).
        #[arg(long, default_value_t = 50)]
        reps: usize,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Device {
    Auto,
    Cuda,
    Cpu,
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F16,
    Bf16,
    F32,
}

impl From<Dtype> for DType {
    fn from(d: Dtype) -> Self {
        match d {
            Dtype::F16 => DType::F16,
            Dtype::Bf16 => DType::Bf16,
            Dtype::F32 => DType::F32,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo {
            device,
            context,
            steps,
            seed,
        } => demo(device, context, steps, seed),
        Command::Bench {
            kernel:
                BenchKernel::Decode {
                    shapes,
                    dtype,
                    head_dim,
                    kv_heads,
                    group_size,
                    block_size,
                    reps,
                    json,
                },
        } => bench_decode(
            &shapes,
            dtype.into(),
            head_dim,
            kv_heads,
            group_size,
            block_size,
            reps,
            json,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvc: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult = Result<(), Box<dyn std::error::Error>>;

fn demo(device: Device, context: u32, steps: u32, seed: u64) -> AnyResult {
    let backend = match device {
        Device::Auto => Backend::auto(),
        Device::Cuda => Backend::cuda(0)?,
        Device::Cpu => Backend::Cpu,
    };
    println!("device: {}", backend.describe());
    let config = CacheConfig {
        num_seqs: 2,
        num_layers: 2,
        num_kv_heads: 2,
        group_size: 4,
        head_dim: 64,
        block_size: 16,
        max_blocks_per_head: (context + steps).div_ceil(16) + 1,
        num_blocks: 4 * 2 * 2 * ((context + steps).div_ceil(16) + 1),
        dtype: DType::F16,
    };
    let mut caches = vec![PagedKvCache::new(&backend, config)?];
    if !matches!(backend, Backend::Cpu) {
        caches.push(PagedKvCache::new(&Backend::Cpu, config)?);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (h, hq, d) = (
        config.num_kv_heads as usize,
        (config.num_kv_heads * config.group_size) as usize,
        config.head_dim as usize,
    );
    let mut worst = 0.0f32;
    for step in 0..=steps {
        let new = if step == 0 { context } else { 1 };
        let tokens = (new * config.num_seqs) as usize;
        let positions: Vec<i32> = (0..config.num_seqs)
            .flat_map(|_| (0..new as i32).map(|p| p + caches[0].last_position(0) + 1))
            .collect();
        let k: Vec<f32> = (0..tokens * h * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let v: Vec<f32> = (0..tokens * h * d)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let q: Vec<f32> = (0..config.num_seqs as usize * hq * d)
            .map(|_| rng.random_range(-3.0..3.0))
            .collect();
        let mut outputs = Vec::new();
        for cache in &mut caches {
            let b = cache.backend();
            for layer in 0..config.num_layers {
                let kt = Tensor::from_f32(&b, config.dtype, &[tokens, h, d], &k)?;
                let vt = Tensor::from_f32(&b, config.dtype, &[tokens, h, d], &v)?;
                cache.append_kv(
                    layer,
                    &kt,
                    &vt,
                    &positions,
                    &vec![new; config.num_seqs as usize],
                )?;
            }
            let qt = Tensor::from_f32(&b, config.dtype, &[config.num_seqs as usize, hq, d], &q)?;
            let mut out = Tensor::full(
                &b,
                config.dtype,
                &[config.num_seqs as usize, hq, d],
                f32::NAN,
            )?;
            cache.decode(
                config.num_layers - 1,
                &qt,
                &mut out,
                &DecodeArgs::for_head_dim(config.head_dim),
            )?;
            outputs.push(out.to_f32()?);
        }
        if let [device_out, reference_out] = outputs.as_slice() {
            let diff = device_out
                .iter()
                .zip(reference_out)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            worst = worst.max(diff);
        }
    }
    let cache = &caches[0];
    println!(
        "appended a {context}-token prompt and {steps} decode tokens to {} sequences x {} layers x {} KV heads",
        config.num_seqs, config.num_layers, config.num_kv_heads
    );
    println!(
        "blocks in use: {} of {} (block size {}), context length per head slot: {}",
        cache.allocator().num_allocated(),
        config.num_blocks,
        config.block_size,
        cache.context_len(0, 0, 0)
    );
    if caches.len() > 1 {
        println!("largest |device - CPU reference| over all decode outputs: {worst:.2e}");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_decode(
    shapes: &[String],
    dtype: DType,
    head_dim: u32,
    kv_heads: u32,
    group_size: u32,
    block_size: u32,
    reps: usize,
    json: bool,
) -> AnyResult {
    let Backend::Cuda(gpu) = Backend::cuda(0)? else {
        unreachable!("Backend::cuda returns CUDA")
    };
    let (_, copy_gbps) = copy_bandwidth(&gpu, 1 << 30)?;
    let mut rows = Vec::new();
    for shape in shapes {
        let (batch, context) = shape
            .split_once('x')
            .and_then(|(b, c)| Some((b.parse::<u32>().ok()?, c.parse::<u32>().ok()?)))
            .ok_or_else(|| format!("bad shape {shape:?}: expected BATCHxCONTEXT"))?;
        let blocks_per_head = context.div_ceil(block_size);
        let layer_bytes = 2
            * batch as u64
            * kv_heads as u64
            * context as u64
            * head_dim as u64
            * dtype.elem_bytes() as u64;
        let layers = rotation_layers(&gpu, layer_bytes, 8);
        let config = CacheConfig {
            num_seqs: batch,
            num_layers: layers,
            num_kv_heads: kv_heads,
            group_size,
            head_dim,
            block_size,
            max_blocks_per_head: blocks_per_head,
            num_blocks: batch * layers * kv_heads * blocks_per_head,
            dtype,
        };
        let mut cache = filled_cache(&gpu, config, context, 1)?;
        let backend = cache.backend();
        let q_shape = [
            batch as usize,
            (kv_heads * group_size) as usize,
            head_dim as usize,
        ];
        let q: Vec<f32> = (0..q_shape.iter().product::<usize>())
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect();
        let q = Tensor::from_f32(&backend, dtype, &q_shape, &q)?;
        let mut out = Tensor::full(&backend, dtype, &q_shape, 0.0)?;
        let args = DecodeArgs::for_head_dim(head_dim);
        let timing = time_gpu(&gpu, 5, reps, |i| {
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
        let recorded = time_gpu(&gpu, 5, reps, |i| {
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
    let report = json!({
        "device": gpu.name(), "kernel": "decode", "dtype": dtype.name(), "head_dim": head_dim,
        "kv_heads": kv_heads, "group_size": group_size, "block_size": block_size,
        "copy_gbps": copy_gbps, "results": rows,
    });
    if json {
        println!("{report}");
    } else {
        println!(
            "device: {}   copy (D2D, 1 GiB, read+write): {copy_gbps:.0} GB/s",
            gpu.name()
        );
        println!(
            "decode {} D={head_dim} H={kv_heads} G={group_size} B={block_size}",
            dtype.name()
        );
        println!("| batch x context | median ms | min ms | GB/s (K+V) | of copy | L2 recording ms | recording / off |");
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            let f = |key: &str| r[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {:.4} | {:.4} | {:.0} | {:.2} | {:.4} | {:.3} |",
                r["shape"].as_str().unwrap_or(""),
                f("median_ms"),
                f("min_ms"),
                f("gbps"),
                f("fraction_of_copy"),
                f("l2_record_median_ms"),
                f("l2_record_over_off")
            );
        }
    }
    Ok(())
}

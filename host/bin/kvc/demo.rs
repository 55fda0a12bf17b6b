//! `kvc demo`: what KV-Compress buys and what it costs, on synthetic but structured data.
//!
//! The data (docs/DEMO.md): per head slot, keys are noise plus a head-specific direction `u`
//! scaled by a per-token weight: a few heavy hitters, four needles, a recency ramp; focused
//! heads weigh these strongly, diffuse heads weakly. Queries (the observation window and the
//! held-out future queries) point along `u`. Values are a per-head mean plus noise, so an
//! evicted KV that mattered changes the output. Everything is seeded.
//!
//! Pipeline: append the prompt of every layer, aggregate the observation window's squared
//! attention into the metrics, then for each rate and each method (variable per-head rates,
//! uniform rates, random eviction at the same memory) compress a copy, measure memory and the
//! fidelity of held-out attention outputs against the uncompressed cache, then decode more
//! tokens with metric recording and continual compression and measure again.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kvcompress::{
    AggregateArgs, Backend, Budget, CacheConfig, CacheSnapshot, CompressArgs, DType, DecodeArgs,
    Metric, Mode, PagedKvCache, Recording, Tensor,
};
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::{AnyResult, Device, Preset};

/// A standard normal sample (Box-Muller).
fn normal<R: Rng + ?Sized>(rng: &mut R) -> f32 {
    let u: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let v: f64 = rng.random();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Options of `kvc demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub model: Preset,
    /// Sequences.
    #[arg(long, default_value_t = 2)]
    pub batch: u32,
    /// Prompt tokens (default: 1024 for tiny, 8192 otherwise, 4096 for llama-3.1-70b).
    #[arg(long)]
    pub context: Option<u32>,
    /// Compression rates, comma-separated.
    #[arg(long, default_value = "2,4,8,16,32,64", value_delimiter = ',')]
    pub rates: Vec<f32>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG of fidelity and memory against the compression rate.
    #[arg(long)]
    pub plot: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Observation-window queries.
    #[arg(long, default_value_t = 32)]
    pub window: u32,
    /// Decode steps after compression (compressing again every 16).
    #[arg(long, default_value_t = 32)]
    pub steps: u32,
}

/// Geometry of a preset: layers, KV heads, query heads, head dimension.
pub fn geometry(model: Preset) -> (u32, u32, u32, u32) {
    match model {
        Preset::Llama31_8b | Preset::Mistral7bV02 => (32, 8, 32, 128),
        Preset::Llama31_70b => (80, 8, 64, 128),
        Preset::Tiny => (2, 4, 8, 64),
    }
}

/// Held-out query sets the fidelity is measured on.
const HELD_OUT: usize = 4;
/// Decode steps between continual compressions.
const COMPRESS_EVERY: u32 = 16;
/// Needles per head slot.
const NEEDLES: usize = 4;
/// Newest tokens never evicted.
const PROTECTED: u32 = 32;
/// First tokens never evicted.
const SINKS: u32 = 4;

/// The seeded synthetic model: one direction per (layer, kv head), which heads are focused,
/// and the heavy-hitter and needle positions of every head slot.
struct Synthetic {
    config: CacheConfig,
    prompt: u32,
    directions: Vec<Vec<f32>>,
    /// Per (layer, kv head): the mean of its values.
    value_means: Vec<Vec<f32>>,
    focused: Vec<bool>,
    /// Per head slot `(seq, layer, head)`: per-token extra weight along the direction.
    weights: Vec<Vec<f32>>,
    needles: Vec<Vec<u32>>,
}

impl Synthetic {
    fn new(config: CacheConfig, prompt: u32, rng: &mut StdRng) -> Self {
        let (l, h, d) = (
            config.num_layers as usize,
            config.num_kv_heads as usize,
            config.head_dim as usize,
        );
        let directions = (0..l * h)
            .map(|_| {
                let v: Vec<f32> = (0..d).map(|_| normal(rng)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter().map(|x| x / norm).collect()
            })
            .collect();
        let value_means = (0..l * h)
            .map(|_| (0..d).map(|_| normal(rng)).collect())
            .collect();
        let focused = (0..l * h).map(|i| (i / h + i % h) % 2 == 0).collect();
        let slots = config.num_seqs as usize * l * h;
        let mut weights = Vec::with_capacity(slots);
        let mut needles = Vec::with_capacity(slots);
        for slot in 0..slots {
            let focus = (slot % (l * h) / h + slot % h) % 2 == 0;
            let (heavy, needle) = if focus { (6.0, 9.0) } else { (1.5, 3.0) };
            let mut w: Vec<f32> = (0..prompt)
                .map(|_| if rng.random_bool(0.03) { heavy } else { 0.0 })
                .collect();
            let mut candidates: Vec<u32> = (SINKS..(prompt * 9 / 10).max(SINKS + 1)).collect();
            candidates.shuffle(rng);
            let picked: Vec<u32> = candidates.into_iter().take(NEEDLES).collect();
            for &p in &picked {
                w[p as usize] = needle;
            }
            weights.push(w);
            needles.push(picked);
        }
        Self {
            config,
            prompt,
            directions,
            value_means,
            focused,
            weights,
            needles,
        }
    }

    /// K and V of token `pos` of every head of one layer and sequence: `[H, D]` each.
    fn kv(&self, seq: u32, layer: u32, pos: u32, rng: &mut StdRng) -> (Vec<f32>, Vec<f32>) {
        let (h, d) = (
            self.config.num_kv_heads as usize,
            self.config.head_dim as usize,
        );
        let mut k = Vec::with_capacity(h * d);
        let mut v = Vec::with_capacity(h * d);
        for head in 0..h {
            let slot = (seq as usize * self.config.num_layers as usize + layer as usize) * h + head;
            // Scores come out near `weight` (focused heads) over unit noise.
            let extra = self.weights[slot].get(pos as usize).copied().unwrap_or(0.0);
            let recency = 4.0 * (pos as f32 / self.prompt as f32).min(1.0).powi(8);
            let weight = extra + recency;
            let dir = &self.directions[layer as usize * h + head];
            k.extend(dir.iter().map(|&u| normal(rng) + weight * u));
            // Values share a per-head mean (as real value vectors share large components),
            // so a head that attends broadly has a stable output.
            let mean = &self.value_means[layer as usize * h + head];
            v.extend(mean.iter().map(|&m| m + normal(rng)));
        }
        (k, v)
    }

    /// One query per query head of one layer for every sequence: `[num_seqs, Hq, D]`.
    fn queries(&self, layer: u32, rng: &mut StdRng) -> Vec<f32> {
        let (h, g, d) = (
            self.config.num_kv_heads as usize,
            self.config.group_size as usize,
            self.config.head_dim as usize,
        );
        let mut q = Vec::with_capacity(self.config.num_seqs as usize * h * g * d);
        for _ in 0..self.config.num_seqs {
            for qh in 0..h * g {
                let head = layer as usize * h + qh / g;
                let amplitude = if self.focused[head] { 1.0 } else { 0.6 };
                let dir = &self.directions[head];
                q.extend(
                    dir.iter()
                        .map(|&u| amplitude * (d as f32).sqrt() * u + 0.5 * normal(rng)),
                );
            }
        }
        q
    }
}

/// Fidelity of one cache against the reference outputs on the same held-out queries.
fn fidelity(
    cache: &mut PagedKvCache,
    queries: &[Vec<Vec<f32>>],
    reference: &[Vec<Vec<f32>>],
) -> kvcompress::Result<(f64, f64)> {
    let outputs = outputs(cache, queries)?;
    let head_dim = cache.config().head_dim as usize;
    let (mut err2, mut ref2, mut cos_sum, mut count) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (out, expected) in outputs.iter().flatten().zip(reference.iter().flatten()) {
        for (a, e) in out.chunks(head_dim).zip(expected.chunks(head_dim)) {
            let dot: f64 = a.iter().zip(e).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
            let ne: f64 = e.iter().map(|x| (*x as f64).powi(2)).sum();
            err2 += a
                .iter()
                .zip(e)
                .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                .sum::<f64>();
            ref2 += ne;
            cos_sum += dot / (na.sqrt() * ne.sqrt()).max(f64::MIN_POSITIVE);
            count += 1;
        }
    }
    Ok((
        (err2 / ref2.max(f64::MIN_POSITIVE)).sqrt(),
        cos_sum / count.max(1) as f64,
    ))
}

/// Decode outputs of every layer on the held-out query sets.
fn outputs(
    cache: &mut PagedKvCache,
    queries: &[Vec<Vec<f32>>],
) -> kvcompress::Result<Vec<Vec<Vec<f32>>>> {
    let c = cache.config();
    let shape = [
        c.num_seqs as usize,
        (c.num_kv_heads * c.group_size) as usize,
        c.head_dim as usize,
    ];
    let backend = cache.backend();
    queries
        .iter()
        .map(|per_layer| {
            per_layer
                .iter()
                .enumerate()
                .map(|(layer, q)| {
                    let q = Tensor::from_f32(&backend, c.dtype, &shape, q)?;
                    let mut out = Tensor::full(&backend, c.dtype, &shape, 0.0)?;
                    cache.decode(
                        layer as u32,
                        &q,
                        &mut out,
                        &DecodeArgs::for_head_dim(c.head_dim),
                    )?;
                    out.to_f32()
                })
                .collect()
        })
        .collect()
}

/// Fraction of needles still in the cache.
fn needles_kept(s: &CacheSnapshot, config: &CacheConfig, synthetic: &Synthetic) -> f64 {
    let (b, mb) = (
        config.block_size as usize,
        config.max_blocks_per_head as usize,
    );
    let (mut kept, mut total) = (0usize, 0usize);
    for (slot, needles) in synthetic.needles.iter().enumerate() {
        let positions: std::collections::HashSet<i32> = (0..s.context_lens[slot] as usize)
            .map(|j| s.position[s.block_tables[slot * mb + j / b] as usize * b + j % b])
            .collect();
        kept += needles
            .iter()
            .filter(|&&p| positions.contains(&(p as i32)))
            .count();
        total += needles.len();
    }
    kept as f64 / total.max(1) as f64
}

/// Appends generated tokens at positions `first..first + count` of every sequence to one
/// layer. Each token's K and V depend only on `(seed, seq, layer, position)`, so any order of
/// appends generates the same cache. Returns the time spent uploading and appending, apart
/// from generating the data on the host.
fn append_tokens(
    cache: &mut PagedKvCache,
    synthetic: &Synthetic,
    layer: u32,
    first: u32,
    count: u32,
    seed: u64,
) -> kvcompress::Result<Duration> {
    let c = cache.config();
    let (h, d) = (c.num_kv_heads as usize, c.head_dim as usize);
    let mut k = Vec::new();
    let mut v = Vec::new();
    let mut positions = Vec::new();
    for seq in 0..c.num_seqs {
        for pos in first..first + count {
            let token = ((seq as u64) << 48) ^ ((layer as u64) << 32) ^ pos as u64;
            let mut rng = StdRng::seed_from_u64(seed ^ token.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let (kt, vt) = synthetic.kv(seq, layer, pos, &mut rng);
            k.extend(kt);
            v.extend(vt);
            positions.push(pos as i32);
        }
    }
    let backend = cache.backend();
    let tokens = (c.num_seqs * count) as usize;
    let start = Instant::now();
    let k = Tensor::from_f32(&backend, c.dtype, &[tokens, h, d], &k)?;
    let v = Tensor::from_f32(&backend, c.dtype, &[tokens, h, d], &v)?;
    cache.append_kv(layer, &k, &v, &positions, &vec![count; c.num_seqs as usize])?;
    backend.synchronize()?;
    Ok(start.elapsed())
}

/// Runs `kvc demo`.
pub fn demo(args: DemoArgs) -> AnyResult {
    let backend = match args.device {
        Device::Auto => Backend::auto(),
        Device::Cuda => Backend::cuda(0)?,
        Device::Cpu => Backend::Cpu,
    };
    let (layers, kv_heads, q_heads, head_dim) = geometry(args.model);
    let context = args.context.unwrap_or(match args.model {
        Preset::Tiny => 1024,
        Preset::Llama31_70b => 4096,
        Preset::Llama31_8b | Preset::Mistral7bV02 => 8192,
    });
    let block_size = 16;
    let total = context + args.steps;
    let blocks_per_head = total.div_ceil(block_size) + 1;
    let config = CacheConfig {
        num_seqs: args.batch,
        num_layers: layers,
        num_kv_heads: kv_heads,
        group_size: q_heads / kv_heads,
        head_dim,
        block_size,
        max_blocks_per_head: blocks_per_head,
        num_blocks: args.batch * layers * kv_heads * blocks_per_head,
        dtype: DType::F16,
    };
    let mut rng = StdRng::seed_from_u64(args.seed);
    let synthetic = Synthetic::new(config, context, &mut rng);
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((args.rates.len() * 3 + 2) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    // Prefill: append every layer's prompt, then aggregate the window into the metrics.
    bar.set_message("prefill");
    let mut base = PagedKvCache::new(&backend, config)?;
    let start = Instant::now();
    let data_seed = args.seed ^ 0x5eed;
    let mut append = Duration::ZERO;
    for layer in 0..layers {
        append += append_tokens(&mut base, &synthetic, layer, 0, context, data_seed)?;
    }
    let prefill_ms = start.elapsed().as_secs_f64() * 1e3;
    let append_ms = append.as_secs_f64() * 1e3;
    let window = args.window.min(context);
    let mut aggregate = Duration::ZERO;
    let shape = [
        config.num_seqs as usize,
        window as usize,
        q_heads as usize,
        head_dim as usize,
    ];
    let metric_skip = vec![0; args.batch as usize];
    let window_lens = vec![window; args.batch as usize];
    for layer in 0..layers {
        let mut q = Vec::new();
        for _ in 0..window {
            q.push(synthetic.queries(layer, &mut rng));
        }
        // [w][seqs, Hq, D] -> [seqs, w, Hq, D]
        let per_seq = (q_heads * head_dim) as usize;
        let mut ordered = Vec::with_capacity(shape.iter().product());
        for seq in 0..args.batch as usize {
            for qi in &q {
                ordered.extend_from_slice(&qi[seq * per_seq..(seq + 1) * per_seq]);
            }
        }
        let q = Tensor::from_f32(&backend, DType::F16, &shape, &ordered)?;
        let agg = AggregateArgs::for_head_dim(head_dim, &metric_skip, &window_lens);
        let start = Instant::now();
        base.aggregate(layer, &q, &agg)?;
        backend.synchronize()?;
        aggregate += start.elapsed();
    }
    let aggregate_ms = aggregate.as_secs_f64() * 1e3;
    let snapshot = base.snapshot()?;
    let blocks_before = base.allocator().num_allocated();
    let kvs_before: u64 = snapshot.context_lens.iter().map(|&l| l as u64).sum();
    bar.inc(1);

    // The reference: held-out queries now, and after `steps` more tokens.
    bar.set_message("reference");
    let held_out: Vec<Vec<Vec<f32>>> = (0..HELD_OUT)
        .map(|_| {
            (0..layers)
                .map(|l| synthetic.queries(l, &mut rng))
                .collect()
        })
        .collect();
    let reference_now = outputs(&mut base, &held_out)?;
    for layer in 0..layers {
        append_tokens(&mut base, &synthetic, layer, context, args.steps, data_seed)?;
    }
    let reference_later = outputs(&mut base, &held_out)?;
    drop(base);
    bar.inc(1);

    let mut results = Vec::new();
    for &rate in &args.rates {
        let mut row = serde_json::Map::new();
        row.insert("rate".into(), json!(rate));
        // Uniform rates go first and set the memory: the others free exactly as many blocks.
        let mut uniform_blocks: Vec<u32> = Vec::new();
        for (method, mode, random) in [
            ("uniform", Mode::Uniform, false),
            ("variable", Mode::Variable, false),
            ("random", Mode::Variable, true),
        ] {
            bar.set_message(format!("rate {rate} {method}"));
            let mut start_snapshot = snapshot.clone();
            if random {
                let mut metric_rng = StdRng::seed_from_u64(args.seed ^ rate.to_bits() as u64);
                for m in start_snapshot.metric.iter_mut().filter(|m| !m.is_nan()) {
                    *m = metric_rng.random();
                }
            }
            let mut cache = PagedKvCache::from_snapshot(&backend, config, &start_snapshot)?;
            let seqs: Vec<u32> = (0..args.batch).collect();
            let budgets: Vec<Budget> = if uniform_blocks.is_empty() {
                vec![Budget::Rate(rate); args.batch as usize]
            } else {
                uniform_blocks.iter().map(|&n| Budget::Blocks(n)).collect()
            };
            let protected = vec![PROTECTED; args.batch as usize];
            let compress = CompressArgs {
                seqs: &seqs,
                budgets: &budgets,
                protected: &protected,
                sinks: SINKS,
                mode,
            };
            let (report, times) = cache.compress_timed(&compress)?;
            if uniform_blocks.is_empty() {
                uniform_blocks = report.seqs.iter().map(|s| s.freed_blocks).collect();
            }
            let after = cache.snapshot()?;
            let blocks_after = cache.allocator().num_allocated();
            let kvs_after: u64 = after.context_lens.iter().map(|&l| l as u64).sum();
            let (rel_l2, cosine) = fidelity(&mut cache, &held_out, &reference_now)?;
            let needles = needles_kept(&after, &config, &synthetic);
            // Decode `steps` more tokens with recording, compressing every 16 steps to the
            // same memory, then measure again (not for random eviction, whose metrics are noise).
            let later = if random {
                Value::Null
            } else {
                let keep = kvs_after.div_ceil((args.batch * layers * kv_heads) as u64) as u32;
                let mut decode_ms = 0.0;
                let skip = vec![1; args.batch as usize];
                for t in 0..args.steps {
                    let mut step = Duration::ZERO;
                    for layer in 0..layers {
                        step += append_tokens(
                            &mut cache,
                            &synthetic,
                            layer,
                            context + t,
                            1,
                            data_seed,
                        )?;
                        let queries = synthetic.queries(layer, &mut rng);
                        let start = Instant::now();
                        let q = Tensor::from_f32(
                            &backend,
                            DType::F16,
                            &[args.batch as usize, q_heads as usize, head_dim as usize],
                            &queries,
                        )?;
                        let mut out = Tensor::full(&backend, DType::F16, q.shape(), 0.0)?;
                        let record = DecodeArgs {
                            record: Some(Recording {
                                metric: Metric::L2,
                                metric_skip: &skip,
                            }),
                            ..DecodeArgs::for_head_dim(head_dim)
                        };
                        cache.decode(layer, &q, &mut out, &record)?;
                        backend.synchronize()?;
                        step += start.elapsed();
                    }
                    decode_ms += step.as_secs_f64() * 1e3;
                    if (t + 1) % COMPRESS_EVERY == 0 {
                        let budgets = vec![Budget::MaxTokens(keep); args.batch as usize];
                        cache.compress(&CompressArgs {
                            budgets: &budgets,
                            ..compress
                        })?;
                    }
                }
                let (rel_l2, cosine) = fidelity(&mut cache, &held_out, &reference_later)?;
                json!({
                    "steps": args.steps, "rel_l2_error": rel_l2, "cosine": cosine,
                    "blocks": cache.allocator().num_allocated(),
                    "decode_ms_per_step": decode_ms / args.steps.max(1) as f64,
                })
            };
            row.insert(
                method.into(),
                json!({
                    "theoretical_rate": kvs_before as f64 / kvs_after.max(1) as f64,
                    "physical_rate": blocks_before as f64 / blocks_after.max(1) as f64,
                    "blocks_before": blocks_before, "blocks_after": blocks_after,
                    "rel_l2_error": rel_l2, "cosine": cosine, "needles_kept": needles,
                    "schedule_ms": times.schedule_ms, "compact_ms": times.compact_ms, "host_ms": times.host_ms,
                    "step_ms": times.step_ms, "after_decode": later,
                }),
            );
            bar.inc(1);
        }
        results.push(Value::Object(row));
    }
    bar.finish_and_clear();
    let report = json!({
        "device": backend.describe(), "model": crate::preset_name(args.model),
        "layers": layers, "kv_heads": kv_heads, "q_heads": q_heads, "head_dim": head_dim,
        "batch": args.batch, "context": context, "window": window, "steps": args.steps,
        "block_size": block_size, "dtype": "f16", "seed": args.seed,
        "prefill": {"total_ms": prefill_ms, "append_ms": append_ms, "aggregate_ms": aggregate_ms},
        "results": results,
    });
    if let Some(path) = &args.plot {
        plot(path, &report)?;
    }
    if args.json {
        println!("{report}");
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Value) {
    println!(
        "device: {}   model: {} ({} layers, {} KV heads, {} query heads, D {})   batch {} x prompt {}",
        r["device"].as_str().unwrap_or(""),
        r["model"].as_str().unwrap_or(""),
        r["layers"],
        r["kv_heads"],
        r["q_heads"],
        r["head_dim"],
        r["batch"],
        r["context"]
    );
    println!(
        "prefill: synthetic prompt {:.1} ms, of which upload + append_kv {:.1} ms; window aggregation (w={}) {:.1} ms",
        r["prefill"]["total_ms"].as_f64().unwrap_or(0.0),
        r["prefill"]["append_ms"].as_f64().unwrap_or(0.0),
        r["window"],
        r["prefill"]["aggregate_ms"].as_f64().unwrap_or(0.0)
    );
    println!("fidelity on held-out queries against the uncompressed cache (f16, B=16, {} protected, {} sinks):", PROTECTED, SINKS);
    println!("| rate | method | blocks after | physical rate | theoretical | rel. L2 error | cosine | needles kept | after {} steps: rel. L2 / cosine | compress ms |", r["steps"]);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in r["results"].as_array().into_iter().flatten() {
        for method in ["variable", "uniform", "random"] {
            let m = &row[method];
            let f = |k: &str| m[k].as_f64().unwrap_or(f64::NAN);
            let later = if m["after_decode"].is_null() {
                "-".to_string()
            } else {
                format!(
                    "{:.4} / {:.4}",
                    m["after_decode"]["rel_l2_error"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    m["after_decode"]["cosine"].as_f64().unwrap_or(f64::NAN)
                )
            };
            println!(
                "| {} | {method} | {} of {} | {:.2}x | {:.2}x | {:.4} | {:.4} | {:.0}% | {later} | {:.2} |",
                row["rate"],
                m["blocks_after"],
                m["blocks_before"],
                f("physical_rate"),
                f("theoretical_rate"),
                f("rel_l2_error"),
                f("cosine"),
                100.0 * f("needles_kept"),
                f("step_ms")
            );
        }
    }
}

/// Fidelity (cosine, relative L2 error) and memory against the compression rate, per method.
fn plot(path: &std::path::Path, r: &Value) -> AnyResult {
    let root = SVGBackend::new(path, (1200, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let rows = r["results"].as_array().cloned().unwrap_or_default();
    let rates: Vec<f64> = rows
        .iter()
        .map(|row| row["rate"].as_f64().unwrap_or(1.0))
        .collect();
    let x_max = rates.iter().copied().fold(2.0, f64::max).log2() + 0.5;
    let series = |method: &str, key: &str| -> Vec<(f64, f64)> {
        rows.iter()
            .map(|row| {
                (
                    row["rate"].as_f64().unwrap_or(1.0).log2(),
                    row[method][key].as_f64().unwrap_or(f64::NAN),
                )
            })
            .collect()
    };
    let colors = [("variable", RED), ("uniform", BLUE), ("random", BLACK)];
    for (panel, (title, key, y_range)) in panels.iter().zip([
        ("cosine to uncompressed output", "cosine", (0.0f64, 1.0f64)),
        ("relative L2 error", "rel_l2_error", (0.0, 1.5)),
        (
            "physical compression rate",
            "physical_rate",
            (0.0, rates.iter().copied().fold(2.0, f64::max) * 1.2),
        ),
    ]) {
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(44)
            .build_cartesian_2d(0.5..x_max, y_range.0..y_range.1)?;
        chart.configure_mesh().x_desc("log2(rate)").draw()?;
        for (method, color) in colors {
            let points = series(method, key);
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
                .label(method)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart.draw_series(
                points
                    .into_iter()
                    .map(|p| Circle::new(p, 3, color.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

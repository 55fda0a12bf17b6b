//! criterion benches of observation-window aggregation: the CPU reference on a small shape
//! (what runs without a GPU), and the CUDA kernels at Llama-3.1-8B geometry (w = 32 over a
//! 32768-token prompt, one layer) timed with CUDA events (`iter_custom`), each both ways: the
//! two passes, and pass 2 alone given the window's log-sum-exp. `kvc bench aggregate` prints
//! the same GPU figures against the in-run copy bandwidth.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvcompress::bench::{filled_cache, filled_snapshot, rotation_layers, time_gpu, window_inputs};
use kvcompress::{AggregateArgs, Backend, CacheConfig, DType, PagedKvCache, Tensor};

const HEADS: u32 = 8;
const GROUP: u32 = 4;
const HEAD_DIM: u32 = 128;
const WINDOW: u32 = 32;

fn config(heads: u32, prompt: u32, layers: u32) -> CacheConfig {
    let blocks = prompt.div_ceil(16);
    CacheConfig {
        num_seqs: 1,
        num_layers: layers,
        num_kv_heads: heads,
        group_size: GROUP,
        head_dim: HEAD_DIM,
        block_size: 16,
        max_blocks_per_head: blocks,
        num_blocks: layers * heads * blocks,
        dtype: DType::F16,
    }
}

/// The window queries `[1, WINDOW, heads * GROUP, HEAD_DIM]` and their log-sum-exp.
fn inputs(backend: &Backend, heads: u32, prompt: u32) -> (Tensor, Tensor) {
    let shape = [
        1,
        WINDOW as usize,
        (heads * GROUP) as usize,
        HEAD_DIM as usize,
    ];
    window_inputs(backend, DType::F16, shape, prompt).unwrap()
}

fn reference(c: &mut Criterion) {
    let backend = Backend::Cpu;
    let (heads, prompt) = (2, 1024);
    let config = config(heads, prompt, 1);
    let mut cache =
        PagedKvCache::from_snapshot(&backend, config, &filled_snapshot(config, prompt, 1)).unwrap();
    let (q, lse) = inputs(&backend, heads, prompt);
    let args = AggregateArgs::for_head_dim(HEAD_DIM, &[0], &[WINDOW]);
    let mut group = c.benchmark_group("aggregate_reference");
    group.throughput(Throughput::Bytes((heads * prompt * HEAD_DIM * 2) as u64));
    group.bench_function("w=32 over 1024, H=2 G=4 D=128, two passes", |b| {
        b.iter(|| cache.aggregate(0, &q, &args).unwrap())
    });
    group.bench_function("w=32 over 1024, H=2 G=4 D=128, given lse", |b| {
        b.iter(|| cache.aggregate_with_lse(0, &q, &lse, &args).unwrap())
    });
    group.finish();
}

fn cuda(c: &mut Criterion) {
    let Ok(Backend::Cuda(gpu)) = Backend::cuda(0) else {
        eprintln!("SKIPPED aggregate_cuda benches: no CUDA device");
        return;
    };
    // As in `kvc bench`: no release of freed memory to the driver while a loop is timed.
    gpu.hold_freed_memory().unwrap();
    let prompt = 32768;
    let k_bytes = (HEADS * prompt * HEAD_DIM * 2) as u64;
    let layers = rotation_layers(&gpu, k_bytes, 8);
    let mut cache = filled_cache(&gpu, config(HEADS, prompt, layers), prompt, 1).unwrap();
    let (q, lse) = inputs(&cache.backend(), HEADS, prompt);
    let args = AggregateArgs::for_head_dim(HEAD_DIM, &[0], &[WINDOW]);
    let mut group = c.benchmark_group("aggregate_cuda");
    group
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Bytes(k_bytes));
    for given_lse in [false, true] {
        let name = if given_lse {
            "w=32 over 32768, given lse"
        } else {
            "w=32 over 32768, two passes"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let timing = time_gpu(&gpu, 0, iters as usize, |i| {
                    let layer = i as u32 % layers;
                    if given_lse {
                        cache.aggregate_with_lse(layer, &q, &lse, &args)
                    } else {
                        cache.aggregate(layer, &q, &args)
                    }
                })
                .unwrap();
                Duration::from_secs_f64(timing.samples_ms.iter().sum::<f64>() / 1e3)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, reference, cuda);
criterion_main!(benches);

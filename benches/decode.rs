//! criterion benches of paged decode attention: the CPU reference on a small shape (what runs
//! without a GPU), and the CUDA kernel at Llama-3.1-8B geometry timed with CUDA events
//! (`iter_custom`, no synchronisation inside the timed loop). `kvc bench decode` prints the
//! same GPU figures against the in-run copy bandwidth.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvcompress::bench::{decode_kv_bytes, filled_cache, rotation_layers, time_gpu};
use kvcompress::{Backend, CacheConfig, DType, DecodeArgs, PagedKvCache, Tensor};

fn config(batch: u32, context: u32, layers: u32) -> CacheConfig {
    let blocks = context.div_ceil(16);
    CacheConfig {
        num_seqs: batch,
        num_layers: layers,
        num_kv_heads: 8,
        group_size: 4,
        head_dim: 128,
        block_size: 16,
        max_blocks_per_head: blocks,
        num_blocks: batch * layers * 8 * blocks,
        dtype: DType::F16,
    }
}

fn reference(c: &mut Criterion) {
    let backend = Backend::Cpu;
    let config = CacheConfig {
        num_seqs: 1,
        num_layers: 1,
        num_kv_heads: 2,
        group_size: 4,
        head_dim: 128,
        block_size: 16,
        max_blocks_per_head: 64,
        num_blocks: 128,
        dtype: DType::F16,
    };
    let mut cache = PagedKvCache::new(&backend, config).unwrap();
    let kv: Vec<f32> = (0..1024 * 2 * 128)
        .map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let kv = Tensor::from_f32(&backend, DType::F16, &[1024, 2, 128], &kv).unwrap();
    cache
        .append_kv(0, &kv, &kv, &(0..1024).collect::<Vec<_>>(), &[1024])
        .unwrap();
    let q = Tensor::full(&backend, DType::F16, &[1, 8, 128], 0.25).unwrap();
    let mut out = Tensor::full(&backend, DType::F16, &[1, 8, 128], 0.0).unwrap();
    let mut group = c.benchmark_group("decode_reference");
    group.throughput(Throughput::Bytes(decode_kv_bytes(&cache, 0)));
    group.bench_function("1x1024 H=2 G=4 D=128", |b| {
        b.iter(|| {
            cache
                .decode(0, &q, &mut out, &DecodeArgs::for_head_dim(128))
                .unwrap()
        })
    });
    group.finish();
}

fn cuda(c: &mut Criterion) {
    let Ok(Backend::Cuda(gpu)) = Backend::cuda(0) else {
        eprintln!("SKIPPED decode_cuda benches: no CUDA device");
        return;
    };
    // As in `kvc bench`: no release of freed memory to the driver while a loop is timed.
    gpu.hold_freed_memory().unwrap();
    let mut group = c.benchmark_group("decode_cuda");
    group
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    for (batch, context) in [(1u32, 32768u32), (16, 8192), (64, 4096), (256, 1024)] {
        let layer_bytes = 2 * batch as u64 * 8 * context as u64 * 128 * 2;
        let layers = rotation_layers(&gpu, layer_bytes, 8);
        let mut cache = filled_cache(&gpu, config(batch, context, layers), context, 1).unwrap();
        let backend = cache.backend();
        let q = Tensor::full(&backend, DType::F16, &[batch as usize, 32, 128], 0.25).unwrap();
        let mut out = Tensor::full(&backend, DType::F16, &[batch as usize, 32, 128], 0.0).unwrap();
        let args = DecodeArgs::for_head_dim(128);
        group.throughput(Throughput::Bytes(decode_kv_bytes(&cache, 0)));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{batch}x{context}")),
            |b| {
                b.iter_custom(|iters| {
                    let timing = time_gpu(&gpu, 0, iters as usize, |i| {
                        cache.decode(i as u32 % layers, &q, &mut out, &args)
                    })
                    .unwrap();
                    Duration::from_secs_f64(timing.samples_ms.iter().sum::<f64>() / 1e3)
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, reference, cuda);
criterion_main!(benches);

//! criterion benches of what runs on the CPU: one compression step on the CPU reference
//! backend (scheduling, compaction and the allocator update together), and the block
//! allocator under the churn of decode (one block per head slot, then freeing a sequence).
//! The GPU compression step is `kvc bench compress`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvcompress::bench::filled_snapshot;
use kvcompress::PagedKvCache;
use kvcompress::{Backend, BlockAllocator, Budget, CacheConfig, CompressArgs, DType, Mode};

fn compress_reference(c: &mut Criterion) {
    let (layers, heads, context) = (4u32, 8u32, 2048u32);
    let config = CacheConfig {
        num_seqs: 1,
        num_layers: layers,
        num_kv_heads: heads,
        group_size: 4,
        head_dim: 128,
        block_size: 16,
        max_blocks_per_head: context / 16,
        num_blocks: layers * heads * context / 16,
        dtype: DType::F16,
    };
    let snapshot = filled_snapshot(config, context, 3);
    let args = CompressArgs {
        seqs: &[0],
        budgets: &[Budget::Rate(8.0)],
        protected: &[32],
        sinks: 4,
        mode: Mode::Variable,
    };
    let mut group = c.benchmark_group("compress_reference");
    group.sample_size(10);
    group.throughput(Throughput::Elements((layers * heads * context) as u64));
    group.bench_function("1x2048 4 layers x 8 heads rate 8", |b| {
        b.iter_batched(
            || PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap(),
            |mut cache| cache.compress(&args).unwrap(),
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn allocator(c: &mut Criterion) {
    // Llama-3.1-8B: 32 layers x 8 KV heads = 256 head slots per sequence, 64 sequences.
    let head_slots = 64 * 256;
    let mut group = c.benchmark_group("allocator");
    group.throughput(Throughput::Elements(head_slots as u64));
    group.bench_function("one block per head slot, 64 seqs x 256, then free", |b| {
        let mut alloc = BlockAllocator::new(1 << 20);
        b.iter(|| {
            let blocks: Vec<u32> = (0..head_slots)
                .flat_map(|_| alloc.allocate(1).unwrap())
                .collect();
            alloc.free(&blocks).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, compress_reference, allocator);
criterion_main!(benches);

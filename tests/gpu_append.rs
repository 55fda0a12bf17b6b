//! `append_kv` and `free_sequence` on the GPU against the CPU reference (SPEC §2): after every
//! call the whole cache (pools, metric, position, tables, lengths) is equal bit for bit, NaN
//! poison included.

mod common;

use common::{
    assert_same_snapshot, config_for, fresh_seed, gpu_or_skip, random_snapshot, random_values, rng,
};
use kvcompress::{Backend, DType, PagedKvCache, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Appends the same random tokens on both caches.
fn append_both(caches: [&mut PagedKvCache; 2], layer: u32, new_tokens: &[u32], rng: &mut StdRng) {
    let config = caches[0].config();
    let num_tokens: u32 = new_tokens.iter().sum();
    let shape = [
        num_tokens as usize,
        config.num_kv_heads as usize,
        config.head_dim as usize,
    ];
    let elems = shape.iter().product();
    let k = random_values(config.dtype, elems, 1.0, rng);
    let v = random_values(config.dtype, elems, 1.0, rng);
    let mut positions = Vec::new();
    for (seq, &n) in new_tokens.iter().enumerate() {
        let start = caches[0].last_position(seq as u32) + 1;
        positions.extend(start..start + n as i32);
    }
    for cache in caches {
        let backend = cache.backend();
        let k = Tensor::from_f32(&backend, config.dtype, &shape, &k).unwrap();
        let v = Tensor::from_f32(&backend, config.dtype, &shape, &v).unwrap();
        cache
            .append_kv(layer, &k, &v, &positions, new_tokens)
            .unwrap();
    }
}

#[test]
fn append_and_free_match_reference_bit_for_bit() {
    let Some(gpu) = gpu_or_skip("append_and_free_match_reference_bit_for_bit") else {
        return;
    };
    let cases = [
        (DType::F16, 128, 16),
        (DType::Bf16, 64, 8),
        (DType::F32, 256, 32),
    ];
    for (dtype, head_dim, block_size) in cases {
        let seed = fresh_seed();
        let mut rng = rng(seed);
        let name = format!("{} d{head_dim} b{block_size} (seed {seed})", dtype.name());
        let (num_seqs, num_layers, num_kv_heads) = (3u32, 2u32, 2u32);
        let lens: Vec<u32> = (0..num_seqs * num_layers * num_kv_heads)
            .map(|_| rng.random_range(0..3 * block_size))
            .collect();
        let mut config = config_for(
            dtype,
            head_dim,
            block_size,
            2,
            num_seqs,
            num_layers,
            num_kv_heads,
            &lens,
            200,
        );
        config.max_blocks_per_head += 40;
        let snapshot = random_snapshot(&config, &lens, &mut rng);
        let mut on_gpu = PagedKvCache::from_snapshot(&gpu, config, &snapshot).unwrap();
        let mut on_cpu = PagedKvCache::from_snapshot(&Backend::Cpu, config, &snapshot).unwrap();
        let shuffle_seed = rng.random();
        on_gpu.shuffle_free_blocks(&mut StdRng::seed_from_u64(shuffle_seed));
        on_cpu.shuffle_free_blocks(&mut StdRng::seed_from_u64(shuffle_seed));

        // A prefill chunk for two of the three sequence rows, on both layers.
        for layer in 0..num_layers {
            append_both([&mut on_gpu, &mut on_cpu], layer, &[100, 0, 37], &mut rng);
            assert_same_snapshot(
                &on_gpu.snapshot().unwrap(),
                &on_cpu.snapshot().unwrap(),
                &format!("{name} prefill layer {layer}"),
            );
        }
        // Decode steps: one token for every row, crossing block boundaries.
        for step in 0..2 * block_size + 1 {
            for layer in 0..num_layers {
                append_both([&mut on_gpu, &mut on_cpu], layer, &[1, 1, 1], &mut rng);
            }
            if step % 7 == 0 {
                assert_same_snapshot(
                    &on_gpu.snapshot().unwrap(),
                    &on_cpu.snapshot().unwrap(),
                    &format!("{name} decode step {step}"),
                );
            }
        }
        assert_same_snapshot(
            &on_gpu.snapshot().unwrap(),
            &on_cpu.snapshot().unwrap(),
            &format!("{name} after decode"),
        );
        assert_eq!(on_gpu.allocator().num_free(), on_cpu.allocator().num_free());

        let freed = on_gpu.free_sequence(1).unwrap();
        assert_eq!(on_cpu.free_sequence(1).unwrap(), freed);
        assert_same_snapshot(
            &on_gpu.snapshot().unwrap(),
            &on_cpu.snapshot().unwrap(),
            &format!("{name} after free"),
        );
        append_both([&mut on_gpu, &mut on_cpu], 0, &[0, 50, 0], &mut rng);
        assert_same_snapshot(
            &on_gpu.snapshot().unwrap(),
            &on_cpu.snapshot().unwrap(),
            &format!("{name} reuse after free"),
        );
    }
}

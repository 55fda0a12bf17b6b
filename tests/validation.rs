//! Bad input (SPEC §8): every violation is a typed error naming the argument, nothing is
//! launched, and the cache is left exactly as it was. Runs on the CPU backend, and on CUDA
//! too when a GPU is present.

mod common;

use common::{assert_same_snapshot, config_for, fresh_seed, gpu_or_skip, random_snapshot, rng};
use kvcompress::{
    AggregateArgs, Backend, CacheConfig, CacheSnapshot, DType, DecodeArgs, Error, Metric,
    PagedKvCache, Recording, Tensor,
};

fn base() -> (CacheConfig, CacheSnapshot) {
    let lens = [20u32, 0, 33, 5];
    let config = config_for(DType::F16, 64, 16, 2, 2, 1, 2, &lens, 3);
    let snapshot = random_snapshot(&config, &lens, &mut rng(fresh_seed()));
    (config, snapshot)
}

/// Asserts an `InvalidArgument` naming `arg`.
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>, arg: &str) {
    match result {
        Err(Error::InvalidArgument { arg: a, .. }) if a == arg => {}
        other => panic!("expected InvalidArgument for `{arg}`, got {other:?}"),
    }
}

fn assert_unsupported<T: std::fmt::Debug>(result: Result<T, Error>, what: &str) {
    match result {
        Err(Error::Unsupported { what: w, .. }) if w == what => {}
        other => panic!("expected Unsupported `{what}`, got {other:?}"),
    }
}

fn assert_unchanged(cache: &PagedKvCache, before: &CacheSnapshot, free_before: u32) {
    assert_same_snapshot(&cache.snapshot().unwrap(), before, "after a rejected call");
    assert_eq!(
        cache.allocator().num_free(),
        free_before,
        "allocator changed"
    );
}

fn configs_are_checked(backend: &Backend) {
    let (config, _) = base();
    assert_unsupported(
        PagedKvCache::new(
            backend,
            CacheConfig {
                head_dim: 96,
                ..config
            },
        ),
        "head_dim",
    );
    assert_unsupported(
        PagedKvCache::new(
            backend,
            CacheConfig {
                block_size: 12,
                ..config
            },
        ),
        "block_size",
    );
    assert_unsupported(
        PagedKvCache::new(
            backend,
            CacheConfig {
                block_size: 64,
                ..config
            },
        ),
        "block_size",
    );
    assert_unsupported(
        PagedKvCache::new(
            backend,
            CacheConfig {
                group_size: 3,
                ..config
            },
        ),
        "group_size",
    );
    assert_invalid(
        PagedKvCache::new(
            backend,
            CacheConfig {
                num_layers: 0,
                ..config
            },
        ),
        "num_layers",
    );
    assert_invalid(
        PagedKvCache::new(
            backend,
            CacheConfig {
                num_blocks: 0,
                ..config
            },
        ),
        "num_blocks",
    );
    assert_invalid(
        PagedKvCache::new(
            backend,
            CacheConfig {
                num_blocks: u32::MAX,
                ..config
            },
        ),
        "num_blocks",
    );
}

fn snapshots_are_checked(backend: &Backend) {
    let (config, good) = base();
    let mb = config.max_blocks_per_head as usize;
    let mut s = good.clone();
    s.block_tables[0] = config.num_blocks as i32;
    assert_invalid(
        PagedKvCache::from_snapshot(backend, config, &s),
        "block_tables",
    );
    let mut s = good.clone();
    s.block_tables[0] = -3;
    assert_invalid(
        PagedKvCache::from_snapshot(backend, config, &s),
        "block_tables",
    );
    let mut s = good.clone();
    s.block_tables[2 * mb] = s.block_tables[0]; // head slot 2 takes head slot 0's first block
    assert_invalid(
        PagedKvCache::from_snapshot(backend, config, &s),
        "block_tables",
    );
    let mut s = good.clone();
    s.context_lens[1] = (config.max_blocks_per_head * config.block_size + 1) as i32;
    assert_invalid(
        PagedKvCache::from_snapshot(backend, config, &s),
        "context_lens",
    );
    let mut s = good.clone();
    s.context_lens[1] = -1;
    assert_invalid(
        PagedKvCache::from_snapshot(backend, config, &s),
        "context_lens",
    );
    let mut s = good.clone();
    s.metric.pop();
    assert_invalid(PagedKvCache::from_snapshot(backend, config, &s), "metric");
    let mut s = good;
    s.k_pool.push(0);
    assert_invalid(PagedKvCache::from_snapshot(backend, config, &s), "k_pool");
}

fn decode_inputs_are_checked(backend: &Backend) {
    let (config, snapshot) = base();
    let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
    let before = cache.snapshot().unwrap();
    let free = cache.allocator().num_free();
    let shape = [2, 4, 64];
    let q = Tensor::full(backend, DType::F16, &shape, 1.0).unwrap();
    let mut out = Tensor::full(backend, DType::F16, &shape, f32::NAN).unwrap();
    let args = DecodeArgs::for_head_dim(64);
    assert_invalid(cache.decode(1, &q, &mut out, &args), "layer");
    let bad_q = Tensor::full(backend, DType::F16, &[2, 2, 64], 1.0).unwrap();
    assert_invalid(cache.decode(0, &bad_q, &mut out, &args), "q");
    let bad_q = Tensor::full(backend, DType::Bf16, &shape, 1.0).unwrap();
    assert_invalid(cache.decode(0, &bad_q, &mut out, &args), "q");
    let mut bad_out = Tensor::full(backend, DType::F16, &[2, 4, 32], 1.0).unwrap();
    assert_invalid(cache.decode(0, &q, &mut bad_out, &args), "out");
    for scale in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert_invalid(
            cache.decode(0, &q, &mut out, &DecodeArgs { scale, ..args }),
            "scale",
        );
    }
    let zero_split = DecodeArgs {
        partition_kvs: Some(0),
        ..args
    };
    assert_invalid(cache.decode(0, &q, &mut out, &zero_split), "partition_kvs");
    for metric_skip in [&[0][..], &[0, 0, 0], &[0, -1]] {
        let record = DecodeArgs {
            record: Some(Recording {
                metric: Metric::L2,
                metric_skip,
            }),
            ..args
        };
        assert_invalid(cache.decode(0, &q, &mut out, &record), "metric_skip");
    }
    assert!(
        out.to_f32().unwrap().iter().all(|x| x.is_nan()),
        "a rejected decode wrote out"
    );
    assert_unchanged(&cache, &before, free);
}

fn aggregate_inputs_are_checked(backend: &Backend) {
    let (config, mut snapshot) = base();
    snapshot.last_position = vec![32, 4];
    let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
    let before = cache.snapshot().unwrap();
    let free = cache.allocator().num_free();
    let q = Tensor::full(backend, DType::F16, &[2, 8, 4, 64], 0.5).unwrap();
    let good = AggregateArgs {
        scale: 0.125,
        metric: Metric::L2,
        metric_skip: &[0, 0],
        window_lens: &[8, 5],
        pool_kernel: 7,
    };
    let with = |f: &dyn Fn(&mut AggregateArgs)| {
        let mut a = good;
        f(&mut a);
        a
    };
    assert_invalid(cache.aggregate(1, &q, &good), "layer");
    // The second sequence wrote 5 tokens; a window of 6 is larger than its prompt.
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.window_lens = &[8, 6])),
        "window_lens",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.window_lens = &[9, 5])),
        "window_lens",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.window_lens = &[8])),
        "window_lens",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.pool_kernel = 6)),
        "pool_kernel",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.pool_kernel = 0)),
        "pool_kernel",
    );
    assert_unsupported(
        cache.aggregate(0, &q, &with(&|a| a.pool_kernel = 19)),
        "pool_kernel",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.metric_skip = &[0, -2])),
        "metric_skip",
    );
    assert_invalid(
        cache.aggregate(0, &q, &with(&|a| a.scale = f32::NAN)),
        "scale",
    );
    let bad_q = Tensor::full(backend, DType::F16, &[2, 8, 2, 64], 0.5).unwrap();
    assert_invalid(cache.aggregate(0, &bad_q, &good), "q");
    let bad_q = Tensor::full(backend, DType::F16, &[2, 4, 64], 0.5).unwrap();
    assert_invalid(cache.aggregate(0, &bad_q, &good), "q");
    // The log-sum-exp is f32 `[num_seqs, w, Hq]`; the other arguments are checked as without.
    let lse = Tensor::full(backend, DType::F32, &[2, 8, 4], 3.0).unwrap();
    for bad_lse in [
        Tensor::full(backend, DType::F16, &[2, 8, 4], 3.0).unwrap(),
        Tensor::full(backend, DType::F32, &[2, 8, 2], 3.0).unwrap(),
        Tensor::full(backend, DType::F32, &[2, 8, 4, 1], 3.0).unwrap(),
    ] {
        assert_invalid(cache.aggregate_with_lse(0, &q, &bad_lse, &good), "lse");
    }
    assert_invalid(cache.aggregate_with_lse(0, &bad_q, &lse, &good), "q");
    assert_invalid(
        cache.aggregate_with_lse(0, &q, &lse, &with(&|a| a.window_lens = &[8, 6])),
        "window_lens",
    );
    assert_unchanged(&cache, &before, free);
    // The valid calls go through.
    cache.aggregate(0, &q, &good).unwrap();
    cache.aggregate_with_lse(0, &q, &lse, &good).unwrap();
}

fn append_inputs_are_checked(backend: &Backend) {
    let (config, snapshot) = base();
    let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
    let before = cache.snapshot().unwrap();
    let free = cache.allocator().num_free();
    let kv = |tokens: usize| Tensor::full(backend, DType::F16, &[tokens, 2, 64], 0.5).unwrap();
    let (k, v) = (kv(3), kv(3));
    let positions = [40, 41, 42];
    assert_invalid(cache.append_kv(1, &k, &v, &positions, &[3, 0]), "layer");
    assert_invalid(cache.append_kv(0, &k, &v, &positions, &[3]), "new_tokens");
    assert_invalid(cache.append_kv(0, &k, &v, &positions, &[2, 0]), "k");
    assert_invalid(cache.append_kv(0, &k, &kv(2), &positions, &[3, 0]), "v");
    let v16 = Tensor::full(backend, DType::Bf16, &[3, 2, 64], 0.5).unwrap();
    assert_invalid(cache.append_kv(0, &k, &v16, &positions, &[3, 0]), "v");
    assert_invalid(
        cache.append_kv(0, &k, &v, &positions[..2], &[3, 0]),
        "positions",
    );
    assert_invalid(
        cache.append_kv(0, &k, &v, &[40, -1, 42], &[3, 0]),
        "positions",
    );
    // More than a head slot's block table holds.
    let capacity = (config.max_blocks_per_head * config.block_size) as usize;
    let big = capacity - 4;
    let positions: Vec<i32> = (0..big as i32).collect();
    assert_invalid(
        cache.append_kv(0, &kv(big), &kv(big), &positions, &[0, big as u32]),
        "new_tokens",
    );
    assert_invalid(cache.free_sequence(2), "seq");
    assert_unchanged(&cache, &before, free);
}

fn out_of_blocks_leaves_cache_untouched(backend: &Backend) {
    let lens = [16u32, 16];
    let mut config = config_for(DType::F32, 64, 16, 1, 1, 1, 2, &lens, 3);
    config.max_blocks_per_head = 64;
    let snapshot = random_snapshot(&config, &lens, &mut rng(fresh_seed()));
    let mut cache = PagedKvCache::from_snapshot(backend, config, &snapshot).unwrap();
    let before = cache.snapshot().unwrap();
    // 2 heads x 2 new blocks = 4 blocks, only 3 free.
    let kv = Tensor::full(backend, DType::F32, &[32, 2, 64], 0.5).unwrap();
    let positions: Vec<i32> = (16..48).collect();
    match cache.append_kv(0, &kv, &kv, &positions, &[32]) {
        Err(Error::OutOfBlocks { needed: 4, free: 3 }) => {}
        other => panic!("expected OutOfBlocks {{ needed: 4, free: 3 }}, got {other:?}"),
    }
    assert_unchanged(&cache, &before, 3);
}

fn tensors_on_another_backend_are_rejected(gpu: &Backend) {
    let (config, snapshot) = base();
    let mut cache = PagedKvCache::from_snapshot(gpu, config, &snapshot).unwrap();
    let q = Tensor::full(&Backend::Cpu, DType::F16, &[2, 4, 64], 1.0).unwrap();
    let mut out = Tensor::full(gpu, DType::F16, &[2, 4, 64], 1.0).unwrap();
    assert_invalid(
        cache.decode(0, &q, &mut out, &DecodeArgs::for_head_dim(64)),
        "q",
    );
}

fn all_checks(backend: &Backend) {
    configs_are_checked(backend);
    snapshots_are_checked(backend);
    decode_inputs_are_checked(backend);
    aggregate_inputs_are_checked(backend);
    append_inputs_are_checked(backend);
    out_of_blocks_leaves_cache_untouched(backend);
}

#[test]
fn bad_input_is_rejected_on_the_cpu_backend() {
    all_checks(&Backend::Cpu);
}

#[test]
fn bad_input_is_rejected_on_the_cuda_backend() {
    let Some(gpu) = gpu_or_skip("bad_input_is_rejected_on_the_cuda_backend") else {
        return;
    };
    all_checks(&gpu);
    tensors_on_another_backend_are_rejected(&gpu);
}

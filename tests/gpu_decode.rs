//! Paged decode attention on the GPU against the CPU reference (SPEC §3): every dtype, head
//! dimension, block size and group size; ragged and long head slots; scattered blocks in a
//! NaN-poisoned pool; outputs poisoned before launch; split and single-pass paths.

mod common;

use common::{
    assert_close, config_for, fresh_seed, gpu_or_skip, out_label, random_snapshot, random_values,
    rng,
};
use kvcompress::gpu::{BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS};
use kvcompress::{Backend, DType, DecodeArgs, PagedKvCache, Tensor};

/// One decode case: caches on both backends from one random snapshot, one random query.
struct Case {
    name: String,
    seed: u64,
    gpu_cache: PagedKvCache,
    cpu_cache: PagedKvCache,
    dtype: DType,
    q_shape: [usize; 3],
    q_values: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn case(
    gpu: &Backend,
    name: String,
    dtype: DType,
    head_dim: u32,
    block_size: u32,
    group_size: u32,
    num_seqs: u32,
    num_layers: u32,
    num_kv_heads: u32,
    lens: &[u32],
    q_amplitude: f32,
) -> Case {
    let seed = fresh_seed();
    let mut rng = rng(seed);
    let config = config_for(
        dtype,
        head_dim,
        block_size,
        group_size,
        num_seqs,
        num_layers,
        num_kv_heads,
        lens,
        7,
    );
    let snapshot = random_snapshot(&config, lens, &mut rng);
    let q_shape = [
        num_seqs as usize,
        (num_kv_heads * group_size) as usize,
        head_dim as usize,
    ];
    let q_values = random_values(dtype, q_shape.iter().product(), q_amplitude, &mut rng);
    Case {
        name,
        seed,
        gpu_cache: PagedKvCache::from_snapshot(gpu, config, snapshot.clone()).unwrap(),
        cpu_cache: PagedKvCache::from_snapshot(&Backend::Cpu, config, snapshot).unwrap(),
        dtype,
        q_shape,
        q_values,
    }
}

impl Case {
    /// Runs the GPU decode of `layer` into a NaN-poisoned output.
    fn gpu(&self, layer: u32, args: &DecodeArgs) -> Vec<f32> {
        let backend = self.gpu_cache.backend();
        let q = Tensor::from_f32(&backend, self.dtype, &self.q_shape, &self.q_values).unwrap();
        let mut out = Tensor::full(&backend, self.dtype, &self.q_shape, f32::NAN).unwrap();
        self.gpu_cache.decode(layer, &q, &mut out, args).unwrap();
        out.to_f32().unwrap()
    }

    fn cpu(&self, layer: u32, args: &DecodeArgs) -> Vec<f32> {
        let q = Tensor::from_f32(&Backend::Cpu, self.dtype, &self.q_shape, &self.q_values).unwrap();
        let mut out = Tensor::full(&Backend::Cpu, self.dtype, &self.q_shape, f32::NAN).unwrap();
        self.cpu_cache.decode(layer, &q, &mut out, args).unwrap();
        out.to_f32().unwrap()
    }

    fn check(&self, layer: u32, args: &DecodeArgs, what: &str) {
        let actual = self.gpu(layer, args);
        let expected = self.cpu(layer, args);
        let context = format!("{} layer {layer} {what} (seed {})", self.name, self.seed);
        assert_close(
            self.dtype,
            &actual,
            &expected,
            &context,
            out_label(self.q_shape),
        );
    }
}

#[test]
fn decode_matches_reference_for_every_dtype_head_dim_block_and_group_size() {
    let Some(gpu) =
        gpu_or_skip("decode_matches_reference_for_every_dtype_head_dim_block_and_group_size")
    else {
        return;
    };
    for dtype in DType::ALL {
        for head_dim in HEAD_DIMS {
            for block_size in BLOCK_SIZES {
                for group_size in GROUP_SIZES {
                    let b = block_size;
                    // 3 seqs x 2 layers x 2 heads; layer 1 holds the hostile lengths.
                    let lens: Vec<u32> =
                        [3, 40, 0, 1, b - 1, b, b + 1, 97, 700, 2 * b + 3, 1, 0].to_vec();
                    let name = format!("{} d{head_dim} b{block_size} g{group_size}", dtype.name());
                    let c = case(
                        &gpu, name, dtype, head_dim, block_size, group_size, 3, 2, 2, &lens, 4.0,
                    );
                    c.check(1, &DecodeArgs::for_head_dim(head_dim), "auto split");
                    c.check(0, &DecodeArgs::for_head_dim(head_dim), "auto split");
                }
            }
        }
    }
}

#[test]
fn decode_matches_reference_on_long_contexts() {
    let Some(gpu) = gpu_or_skip("decode_matches_reference_on_long_contexts") else {
        return;
    };
    let cases: [(DType, u32, u32, u32, Vec<u32>); 4] = [
        (DType::F16, 128, 16, 4, vec![32768, 4097, 0, 12345]),
        (DType::Bf16, 64, 8, 8, vec![32768, 8191]),
        (DType::F32, 256, 32, 1, vec![20000, 32768]),
        (DType::F16, 128, 16, 4, vec![131072]),
    ];
    for (dtype, head_dim, block_size, group_size, lens) in cases {
        let name = format!(
            "{} d{head_dim} b{block_size} g{group_size} lens {:?}",
            dtype.name(),
            lens
        );
        let c = case(
            &gpu,
            name,
            dtype,
            head_dim,
            block_size,
            group_size,
            1,
            1,
            lens.len() as u32,
            &lens,
            8.0,
        );
        c.check(0, &DecodeArgs::for_head_dim(head_dim), "auto split");
    }
}

#[test]
fn split_and_single_pass_agree() {
    let Some(gpu) = gpu_or_skip("split_and_single_pass_agree") else {
        return;
    };
    let lens = [5000u32, 1, 0, 2048, 777, 4096];
    let c = case(
        &gpu,
        "f16 d128 b16 g4".into(),
        DType::F16,
        128,
        16,
        4,
        2,
        1,
        3,
        &lens,
        6.0,
    );
    let args = |partition_kvs| DecodeArgs {
        partition_kvs,
        ..DecodeArgs::for_head_dim(128)
    };
    for partition_kvs in [None, Some(1 << 20), Some(256), Some(1000)] {
        c.check(
            0,
            &args(partition_kvs),
            &format!("partition_kvs {partition_kvs:?}"),
        );
    }
    let single = c.gpu(0, &args(Some(1 << 20)));
    let split = c.gpu(0, &args(Some(256)));
    let context = format!("{} single vs split (seed {})", c.name, c.seed);
    assert_close(DType::F16, &split, &single, &context, |i| {
        format!("element {i}")
    });
}

#[test]
fn decode_reads_nothing_outside_the_live_range_and_writes_nothing_but_out() {
    let Some(gpu) =
        gpu_or_skip("decode_reads_nothing_outside_the_live_range_and_writes_nothing_but_out")
    else {
        return;
    };
    let lens = [33u32, 0, 16, 100];
    let c = case(
        &gpu,
        "bf16 d64 b16 g2".into(),
        DType::Bf16,
        64,
        16,
        2,
        2,
        1,
        2,
        &lens,
        4.0,
    );
    let before = c.gpu_cache.snapshot().unwrap();
    c.check(0, &DecodeArgs::for_head_dim(64), "poisoned tails");
    let after = c.gpu_cache.snapshot().unwrap();
    assert!(
        before.k_pool == after.k_pool && before.v_pool == after.v_pool,
        "decode wrote the pools"
    );
    let bits = |m: &[f32]| m.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&before.metric),
        bits(&after.metric),
        "decode wrote metric"
    );
    assert_eq!(before.position, after.position, "decode wrote position");
    assert_eq!(before.block_tables, after.block_tables);
    assert_eq!(before.context_lens, after.context_lens);
}

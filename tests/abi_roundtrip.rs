//! The by-value params ABI (rustc's unstable `extern "ptx-kernel"` aggregate passing): an echo
//! kernel writes back the bytes it received, which must equal what the host pushed. Every
//! field gets a distinct value so a swapped or shifted field shows.

mod common;

use common::gpu_or_skip;
use kvcompress::abi::params::{AggregateParams, AppendParams, CompressParams, DecodeParams};
use kvcompress::abi::{CacheView, Geometry};
use kvcompress::gpu::{EchoParams, Gpu};

fn distinct_view() -> CacheView {
    CacheView {
        geometry: Geometry {
            num_seqs: 0x1111_0001,
            num_layers: 0x1111_0002,
            num_kv_heads: 0x1111_0003,
            group_size: 0x1111_0004,
            head_dim: 0x1111_0005,
            block_size: 0x1111_0006,
            max_blocks_per_head: 0x1111_0007,
            num_blocks: 0x1111_0008,
        },
        k_pool: 0x2222_0000_0000_0001,
        v_pool: 0x2222_0000_0000_0002,
        metric: 0x2222_0000_0000_0003,
        position: 0x2222_0000_0000_0004,
        block_tables: 0x2222_0000_0000_0005,
        context_lens: 0x2222_0000_0000_0006,
    }
}

/// Sends `params` through its echo kernel and checks the bytes that came back.
fn echoes<P: EchoParams>(gpu: &Gpu, params: P, name: &str) {
    let (sent, received) = gpu.echo(params).unwrap();
    assert_eq!(bytemuck::bytes_of(&sent), received.as_slice(), "{name}");
}

#[test]
fn params_arrive_byte_for_byte() {
    let Some(backend) = gpu_or_skip("params_arrive_byte_for_byte") else {
        return;
    };
    let kvcompress::Backend::Cuda(gpu) = backend else {
        unreachable!("gpu_or_skip returns CUDA")
    };
    let decode = DecodeParams {
        cache: distinct_view(),
        q: 0x3333_0000_0000_0001,
        out: 0,
        partial_acc: 0x3333_0000_0000_0003,
        partial_ml: 0x3333_0000_0000_0004,
        layer_idx: 0x4444_0001,
        partition_kvs: 0x4444_0002,
        num_partitions: 0x4444_0003,
        scale_log2: -1.234_567_9,
        record: 0x4444_0004,
        reserved: 0x4444_0005,
        thresholds: 0x3333_0000_0000_0006,
        counters: 0x3333_0000_0000_0007,
        stash: 0x3333_0000_0000_0008,
    };
    echoes(&gpu, decode, "DecodeParams");

    let append = AppendParams {
        cache: distinct_view(),
        k_new: 0x5555_0000_0000_0001,
        v_new: 0x5555_0000_0000_0002,
        meta: 0,
        num_tokens: 0x6666_0001,
        num_patches: 0x6666_0002,
        row_bytes: 0x6666_0003,
        scatter_ctas: 0x6666_0004,
    };
    echoes(&gpu, append, "AppendParams");

    let aggregate = AggregateParams {
        cache: distinct_view(),
        q: 0x7777_0000_0000_0001,
        stats: 0,
        partials: 0x7777_0000_0000_0003,
        seq_info: 0x7777_0000_0000_0004,
        k_map: 0x7777_0000_0000_0005,
        lse: 0x7777_0000_0000_0006,
        layer_idx: 0x8888_0001,
        window: 0x8888_0002,
        key_splits: 0x8888_0003,
        split_kvs: 0x8888_0004,
        scale_log2: 0.456_789_1,
        record: 0x8888_0005,
        pool_half: 0x8888_0006,
        score_kvs: 0x8888_0007,
    };
    echoes(&gpu, aggregate, "AggregateParams");

    let compress = CompressParams {
        cache: distinct_view(),
        seq_in: 0x9999_0000_0000_0001,
        seq_out: 0x9999_0000_0000_0002,
        heads: 0,
        groups: 0x9999_0000_0000_0004,
        hist: 0x9999_0000_0000_0005,
        status: 0x9999_0000_0000_0006,
        key_high: 0x9999_0000_0000_0007,
        evictable: 0x9999_0000_0000_0008,
        key_mid: 0x9999_0000_0000_0009,
        candidates: 0x9999_0000_0000_000a,
        num_work_seqs: 0xaaaa_0001,
        group_heads: 0xaaaa_0002,
        sinks: 0xaaaa_0003,
        pass: 0xaaaa_0004,
        chunks_per_head: 0xaaaa_0005,
        row_bytes: 0xaaaa_0006,
        host_io: 0x9999_0000_0000_000b,
    };
    echoes(&gpu, compress, "CompressParams");
}

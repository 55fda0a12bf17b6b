//! kvcompress device code: `no_std` Rust compiled to PTX by rustc's nvptx64 backend
//! (see TOOLCHAIN.md). Each kernel is a generic `*_body` in its own module; this file lists the
//! instantiations, one `extern "ptx-kernel"` entry each, named `<op>_<dtype>_d<D>_g<G>`.
//! The host's entry table (`host/gpu.rs`) must name exactly these; `tests/ptx_entries.rs`
//! checks it.
#![no_std]
#![feature(abi_ptx, stdarch_nvptx, asm_experimental_arch, f16, core_intrinsics)]
#![feature(gpu_launch_sized_workgroup_mem, gpu_intrinsics, link_llvm_intrinsics)]
#![allow(internal_features)]
// Per-lane loops index several parallel register arrays by the same row/head/column index,
// as the math is written; LLVM unrolls them fully.
#![allow(clippy::needless_range_loop)]

mod aggregate;
#[cfg(kvc_hopper)]
mod aggregate_ws;
mod append;
mod compact;
mod decode;
mod decode_merge;
mod decode_mma;
mod echo;
mod gpu;
mod schedule;

use kvc_abi::params::{AggregateParams, AppendParams, CompressParams, DecodeParams};
use kvc_abi::plan::COMPACT_THREADS;

use gpu::math::{Bf16, F16, F32};

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // SAFETY: `trap` aborts the kernel; the host sees a launch error.
    unsafe { core::arch::nvptx::trap() }
}

/// Emits `#[no_mangle] extern "ptx-kernel"` shims; the body is the generic function.
macro_rules! entries {
    ($params:ty => $($name:ident = $body:expr;)*) => {$(
        /// Kernel entry point; see the module of its body.
        ///
        /// # Safety
        /// Launched by the host with the plan and validated params of its op.
        #[no_mangle]
        pub unsafe extern "ptx-kernel" fn $name(p: $params) {
            // SAFETY: forwarded from the host's launch contract.
            unsafe { $body(&p) }
        }
    )*};
}

entries! { DecodeParams =>
    paged_decode_f16_d64_g1 = decode_mma::decode_mma_body::<F16, 64, 1, false>;
    paged_decode_f16_d64_g2 = decode_mma::decode_mma_body::<F16, 64, 2, false>;
    paged_decode_f16_d64_g4 = decode_mma::decode_mma_body::<F16, 64, 4, false>;
    paged_decode_f16_d64_g8 = decode_mma::decode_mma_body::<F16, 64, 8, false>;
    paged_decode_f16_d128_g1 = decode_mma::decode_mma_body::<F16, 128, 1, false>;
    paged_decode_f16_d128_g2 = decode_mma::decode_mma_body::<F16, 128, 2, false>;
    paged_decode_f16_d128_g4 = decode_mma::decode_mma_body::<F16, 128, 4, false>;
    paged_decode_f16_d128_g8 = decode_mma::decode_mma_body::<F16, 128, 8, false>;
    paged_decode_f16_d256_g1 = decode_mma::decode_mma_body::<F16, 256, 1, false>;
    paged_decode_f16_d256_g2 = decode_mma::decode_mma_body::<F16, 256, 2, false>;
    paged_decode_f16_d256_g4 = decode_mma::decode_mma_body::<F16, 256, 4, false>;
    paged_decode_f16_d256_g8 = decode_mma::decode_mma_body::<F16, 256, 8, false>;
    paged_decode_bf16_d64_g1 = decode_mma::decode_mma_body::<Bf16, 64, 1, false>;
    paged_decode_bf16_d64_g2 = decode_mma::decode_mma_body::<Bf16, 64, 2, false>;
    paged_decode_bf16_d64_g4 = decode_mma::decode_mma_body::<Bf16, 64, 4, false>;
    paged_decode_bf16_d64_g8 = decode_mma::decode_mma_body::<Bf16, 64, 8, false>;
    paged_decode_bf16_d128_g1 = decode_mma::decode_mma_body::<Bf16, 128, 1, false>;
    paged_decode_bf16_d128_g2 = decode_mma::decode_mma_body::<Bf16, 128, 2, false>;
    paged_decode_bf16_d128_g4 = decode_mma::decode_mma_body::<Bf16, 128, 4, false>;
    paged_decode_bf16_d128_g8 = decode_mma::decode_mma_body::<Bf16, 128, 8, false>;
    paged_decode_bf16_d256_g1 = decode_mma::decode_mma_body::<Bf16, 256, 1, false>;
    paged_decode_bf16_d256_g2 = decode_mma::decode_mma_body::<Bf16, 256, 2, false>;
    paged_decode_bf16_d256_g4 = decode_mma::decode_mma_body::<Bf16, 256, 4, false>;
    paged_decode_bf16_d256_g8 = decode_mma::decode_mma_body::<Bf16, 256, 8, false>;
    paged_decode_f32_d64_g1 = decode::decode_body::<F32, 64, 1, false>;
    paged_decode_f32_d64_g2 = decode::decode_body::<F32, 64, 2, false>;
    paged_decode_f32_d64_g4 = decode::decode_body::<F32, 64, 4, false>;
    paged_decode_f32_d64_g8 = decode::decode_body::<F32, 64, 8, false>;
    paged_decode_f32_d128_g1 = decode::decode_body::<F32, 128, 1, false>;
    paged_decode_f32_d128_g2 = decode::decode_body::<F32, 128, 2, false>;
    paged_decode_f32_d128_g4 = decode::decode_body::<F32, 128, 4, false>;
    paged_decode_f32_d128_g8 = decode::decode_body::<F32, 128, 8, false>;
    paged_decode_f32_d256_g1 = decode::decode_body::<F32, 256, 1, false>;
    paged_decode_f32_d256_g2 = decode::decode_body::<F32, 256, 2, false>;
    paged_decode_f32_d256_g4 = decode::decode_body::<F32, 256, 4, false>;
    paged_decode_f32_d256_g8 = decode::decode_body::<F32, 256, 8, false>;
    paged_decode_rec_f16_d64_g1 = decode_mma::decode_mma_body::<F16, 64, 1, true>;
    paged_decode_rec_f16_d64_g2 = decode_mma::decode_mma_body::<F16, 64, 2, true>;
    paged_decode_rec_f16_d64_g4 = decode_mma::decode_mma_body::<F16, 64, 4, true>;
    paged_decode_rec_f16_d64_g8 = decode_mma::decode_mma_body::<F16, 64, 8, true>;
    paged_decode_rec_f16_d128_g1 = decode_mma::decode_mma_body::<F16, 128, 1, true>;
    paged_decode_rec_f16_d128_g2 = decode_mma::decode_mma_body::<F16, 128, 2, true>;
    paged_decode_rec_f16_d128_g4 = decode_mma::decode_mma_body::<F16, 128, 4, true>;
    paged_decode_rec_f16_d128_g8 = decode_mma::decode_mma_body::<F16, 128, 8, true>;
    paged_decode_rec_f16_d256_g1 = decode_mma::decode_mma_body::<F16, 256, 1, true>;
    paged_decode_rec_f16_d256_g2 = decode_mma::decode_mma_body::<F16, 256, 2, true>;
    paged_decode_rec_f16_d256_g4 = decode_mma::decode_mma_body::<F16, 256, 4, true>;
    paged_decode_rec_f16_d256_g8 = decode_mma::decode_mma_body::<F16, 256, 8, true>;
    paged_decode_rec_bf16_d64_g1 = decode_mma::decode_mma_body::<Bf16, 64, 1, true>;
    paged_decode_rec_bf16_d64_g2 = decode_mma::decode_mma_body::<Bf16, 64, 2, true>;
    paged_decode_rec_bf16_d64_g4 = decode_mma::decode_mma_body::<Bf16, 64, 4, true>;
    paged_decode_rec_bf16_d64_g8 = decode_mma::decode_mma_body::<Bf16, 64, 8, true>;
    paged_decode_rec_bf16_d128_g1 = decode_mma::decode_mma_body::<Bf16, 128, 1, true>;
    paged_decode_rec_bf16_d128_g2 = decode_mma::decode_mma_body::<Bf16, 128, 2, true>;
    paged_decode_rec_bf16_d128_g4 = decode_mma::decode_mma_body::<Bf16, 128, 4, true>;
    paged_decode_rec_bf16_d128_g8 = decode_mma::decode_mma_body::<Bf16, 128, 8, true>;
    paged_decode_rec_bf16_d256_g1 = decode_mma::decode_mma_body::<Bf16, 256, 1, true>;
    paged_decode_rec_bf16_d256_g2 = decode_mma::decode_mma_body::<Bf16, 256, 2, true>;
    paged_decode_rec_bf16_d256_g4 = decode_mma::decode_mma_body::<Bf16, 256, 4, true>;
    paged_decode_rec_bf16_d256_g8 = decode_mma::decode_mma_body::<Bf16, 256, 8, true>;
    paged_decode_rec_f32_d64_g1 = decode::decode_body::<F32, 64, 1, true>;
    paged_decode_rec_f32_d64_g2 = decode::decode_body::<F32, 64, 2, true>;
    paged_decode_rec_f32_d64_g4 = decode::decode_body::<F32, 64, 4, true>;
    paged_decode_rec_f32_d64_g8 = decode::decode_body::<F32, 64, 8, true>;
    paged_decode_rec_f32_d128_g1 = decode::decode_body::<F32, 128, 1, true>;
    paged_decode_rec_f32_d128_g2 = decode::decode_body::<F32, 128, 2, true>;
    paged_decode_rec_f32_d128_g4 = decode::decode_body::<F32, 128, 4, true>;
    paged_decode_rec_f32_d128_g8 = decode::decode_body::<F32, 128, 8, true>;
    paged_decode_rec_f32_d256_g1 = decode::decode_body::<F32, 256, 1, true>;
    paged_decode_rec_f32_d256_g2 = decode::decode_body::<F32, 256, 2, true>;
    paged_decode_rec_f32_d256_g4 = decode::decode_body::<F32, 256, 4, true>;
    paged_decode_rec_f32_d256_g8 = decode::decode_body::<F32, 256, 8, true>;
    paged_decode_merge_f16 = decode_merge::decode_merge_body::<F16>;
    paged_decode_merge_bf16 = decode_merge::decode_merge_body::<Bf16>;
    paged_decode_merge_f32 = decode_merge::decode_merge_body::<F32>;
    abi_echo_decode = echo::echo_body::<DecodeParams>;
}

entries! { AppendParams =>
    append_kv = append::append_body;
    abi_echo_append = echo::echo_body::<AppendParams>;
}

/// Pass 1 at `D = 128` for 16-bit type `$t`: warp-specialized in the Hopper module
/// (`agg_ws_stats`), else the common body.
#[cfg(kvc_hopper)]
macro_rules! stats_d128 {
    ($t:ty) => {
        aggregate_ws::window_stats_ws_body::<$t>
    };
}
#[cfg(not(kvc_hopper))]
macro_rules! stats_d128 {
    ($t:ty) => {
        aggregate::window_stats_body::<$t, 128>
    };
}

entries! { AggregateParams =>
    window_stats_f16_d64 = aggregate::window_stats_body::<F16, 64>;
    window_stats_f16_d128 = stats_d128!(F16);
    window_stats_f16_d256 = aggregate::window_stats_body::<F16, 256>;
    window_stats_bf16_d64 = aggregate::window_stats_body::<Bf16, 64>;
    window_stats_bf16_d128 = stats_d128!(Bf16);
    window_stats_bf16_d256 = aggregate::window_stats_body::<Bf16, 256>;
    window_stats_f32_d64 = aggregate::window_stats_body::<F32, 64>;
    window_stats_f32_d128 = aggregate::window_stats_body::<F32, 128>;
    window_stats_f32_d256 = aggregate::window_stats_body::<F32, 256>;
    window_stats_merge = aggregate::window_stats_merge_body;
    window_scores_f16_d64 = aggregate::window_scores_body::<F16, 64>;
    window_scores_f16_d128 = aggregate::window_scores_body::<F16, 128>;
    window_scores_f16_d256 = aggregate::window_scores_body::<F16, 256>;
    window_scores_bf16_d64 = aggregate::window_scores_body::<Bf16, 64>;
    window_scores_bf16_d128 = aggregate::window_scores_body::<Bf16, 128>;
    window_scores_bf16_d256 = aggregate::window_scores_body::<Bf16, 256>;
    window_scores_f32_d64 = aggregate::window_scores_body::<F32, 64>;
    window_scores_f32_d128 = aggregate::window_scores_body::<F32, 128>;
    window_scores_f32_d256 = aggregate::window_scores_body::<F32, 256>;
    abi_echo_aggregate = echo::echo_body::<AggregateParams>;
}

// Pass 2 warp-specialized, where the window's rows are one chunk (`agg_ws_scores`).
#[cfg(kvc_hopper)]
entries! { AggregateParams =>
    window_scores_ws_f16_d128 = aggregate_ws::window_scores_ws_body::<F16>;
    window_scores_ws_bf16_d128 = aggregate_ws::window_scores_ws_body::<Bf16>;
}

entries! { CompressParams =>
    sched_hist0 = schedule::sched_hist_body::<0>;
    sched_hist1 = schedule::sched_hist_body::<1>;
    sched_hist2 = schedule::sched_hist_body::<2>;
    sched_hist3 = schedule::sched_hist_body::<3>;
    sched_init = schedule::sched_init_body;
    sched_budget = schedule::sched_budget_body;
    sched_digit = schedule::sched_digit_body;
    compact = compact::compact_body::<{ COMPACT_THREADS[0] }>;
    compact_narrow = compact::compact_body::<{ COMPACT_THREADS[1] }>;
    abi_echo_compress = echo::echo_body::<CompressParams>;
}

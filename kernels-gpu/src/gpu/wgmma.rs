//! Warpgroup matrix multiply-accumulate (`wgmma.mma_async`, sm_90a: the Hopper module only,
//! `cfg(kvc_hopper)`) with both operands in shared memory, K-major, in 128-byte-swizzled panels
//! (`kvc_abi::plan::swizzled_chunk`, which staging uses): a tile of `n`
//! rows of `64 p` 16-bit elements is `p` panels of `n` rows of 128 bytes, panel `i` at
//! `i * n * 128`, and 16-byte chunk `c` of a row `r` sits at chunk `c ^ (r % 8)` of its panel
//! row; every tile starts 1024-byte aligned (docs/PERF.md, "The sm_90a route": layout and
//! descriptors checked on an H100).
//!
//! Accumulators of `m64nNk16` (f32): warp `w` of the warpgroup holds rows `16 w + lane / 4`
//! and `+ 8`; registers `4 j .. 4 j + 3` are columns `8 j + 2 (lane % 4)`, `+ 1` of the first
//! row, then of the second: per 8 columns, the C fragment of `mma.m16n8k16` (`gpu::mma`).

use core::arch::asm;

use crate::gpu::math::{Bf16, F16};

/// The matrix descriptor of a K-major operand whose first row starts at shared address
/// `addr` (1024-byte aligned) in a swizzled panel: 128-byte swizzle (mode 1), 8-row groups
/// 1024 bytes apart.
#[inline(always)]
pub fn descriptor(addr: u32) -> u64 {
    ((addr as u64 >> 4) & 0x3fff) | 1 << 16 | (1024u64 >> 4) << 32 | 1 << 62
}

/// Orders this thread's earlier generic-proxy writes to shared memory (stores, `cp.async`
/// after its wait) before later `wgmma` reads of it by the CTA (the async proxy): each writer
/// calls it before the barrier that publishes the tile.
#[inline(always)]
pub fn fence_async_proxy() {
    // SAFETY: a fence; no operands.
    unsafe { asm!("fence.proxy.async.shared::cta;", options(nostack)) };
}

/// `m64n32k16` over one panel (4 k-steps of 16) for 16-bit inputs of this type.
pub trait Wgmma16 {
    /// `acc += A B^T` for the 64 rows of A at descriptor `a` and the 32 rows of B at
    /// descriptor `b` (both K-major, one panel of 64 elements): the fence, four MMAs, and the
    /// wait for them, in one piece, so that nothing touches `acc` while they run.
    ///
    /// # Safety
    /// All 128 threads of the warpgroup call it together with the same descriptors, which
    /// point at staged, fenced (`fence_async_proxy`) panels no thread writes meanwhile.
    unsafe fn panel(acc: &mut [f32; 16], a: u64, b: u64);
}

/// Implements [`Wgmma16`] for `$elem` with the PTX input type `$ptx`.
macro_rules! wgmma16 {
    ($elem:ty, $ptx:literal) => {
        impl Wgmma16 for $elem {
            #[inline(always)]
            unsafe fn panel(acc: &mut [f32; 16], a: u64, b: u64) {
                macro_rules! mma {
                    () => {
                        concat!(
                            "wgmma.mma_async.sync.aligned.m64n32k16.f32.", $ptx, ".", $ptx, " ",
                            "{{{c0}, {c1}, {c2}, {c3}, {c4}, {c5}, {c6}, {c7}, ",
                            "{c8}, {c9}, {c10}, {c11}, {c12}, {c13}, {c14}, {c15}}}, ",
                            "da, db, p, 1, 1, 0, 0;\n"
                        )
                    };
                }
                let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15] = acc;
                // SAFETY: forwarded from the caller; the block's registers are its own.
                unsafe {
                    // Four k-steps of 16 elements, each 32 bytes further along the rows (2 in
                    // the descriptors' address field).
                    asm!(
                        concat!(
                            "{{\n.reg .pred p;\n.reg .b64 da, db;\n",
                            "setp.ne.b32 p, {one}, 0;\n",
                            "mov.b64 da, {a};\nmov.b64 db, {b};\n",
                            "wgmma.fence.sync.aligned;\n",
                            mma!(), "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
                            mma!(), "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
                            mma!(), "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
                            mma!(),
                            "wgmma.commit_group.sync.aligned;\n",
                            "wgmma.wait_group.sync.aligned 0;\n}}"
                        ),
                        one = in(reg32) 1u32,
                        a = in(reg64) a,
                        b = in(reg64) b,
                        c0 = inout(reg32) *c0, c1 = inout(reg32) *c1,
                        c2 = inout(reg32) *c2, c3 = inout(reg32) *c3,
                        c4 = inout(reg32) *c4, c5 = inout(reg32) *c5,
                        c6 = inout(reg32) *c6, c7 = inout(reg32) *c7,
                        c8 = inout(reg32) *c8, c9 = inout(reg32) *c9,
                        c10 = inout(reg32) *c10, c11 = inout(reg32) *c11,
                        c12 = inout(reg32) *c12, c13 = inout(reg32) *c13,
                        c14 = inout(reg32) *c14, c15 = inout(reg32) *c15,
                        options(nostack),
                    );
                }
            }
        }
    };
}

wgmma16!(F16, "f16");
wgmma16!(Bf16, "bf16");

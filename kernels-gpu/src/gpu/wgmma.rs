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

/// `m64n32k16` over one panel (4 k-steps of 16) for 16-bit inputs of this type: `acc += A
/// B^T` for the 64 rows of A at descriptor `a` and the 32 rows of B at descriptor `b` (both
/// K-major, one panel of 64 elements). The MMAs are issued, not waited for: the caller
/// brackets a group's panels with [`fence`] and [`commit`] and reads `acc` only after
/// [`wait_pending`] or [`wait_all`] handed it back.
pub trait Wgmma16 {
    /// A panel after the first of a tile: adds to `acc`.
    ///
    /// # Safety
    /// All 128 threads of the warpgroup call it together, after [`fence`], with the same
    /// descriptors, which point at staged, fenced (`fence_async_proxy`) panels no thread
    /// writes meanwhile.
    unsafe fn panel(acc: &mut [f32; 16], a: u64, b: u64);

    /// A tile's first panel: its first MMA ignores `acc` (`scale-d` false), so `acc` is only
    /// written and nothing need clear it first (a write by another instruction between the
    /// fence and the MMAs makes ptxas serialize them).
    ///
    /// # Safety
    /// As [`Wgmma16::panel`].
    unsafe fn first_panel(acc: &mut [f32; 16], a: u64, b: u64);

    /// As [`Wgmma16::panel`] for `m64n64k16`: 64 rows of B, accumulators as the
    /// `[[f32; 16]; 2]` that [`wait_pending`] and [`wait_all`] hand back (register `16 h + i`
    /// of the instruction is `acc[h][i]`).
    ///
    /// # Safety
    /// As [`Wgmma16::panel`].
    unsafe fn panel_n64(acc: &mut [[f32; 16]; 2], a: u64, b: u64);

    /// As [`Wgmma16::first_panel`] for `m64n64k16` (see [`Wgmma16::panel_n64`]).
    ///
    /// # Safety
    /// As [`Wgmma16::panel`].
    unsafe fn first_panel_n64(acc: &mut [[f32; 16]; 2], a: u64, b: u64);

    /// As [`Wgmma16::panel`] for `m64n128k16`: 128 rows of B, the accumulators in two halves
    /// as [`wait_pending`] and [`wait_all`] hand them back (registers `0..32` of the
    /// instruction in `lo`, the first 64 rows of B; `32..64` in `hi`).
    ///
    /// # Safety
    /// As [`Wgmma16::panel`].
    unsafe fn panel_n128(lo: &mut [[f32; 16]; 2], hi: &mut [[f32; 16]; 2], a: u64, b: u64);

    /// As [`Wgmma16::first_panel`] for `m64n128k16` (see [`Wgmma16::panel_n128`]).
    ///
    /// # Safety
    /// As [`Wgmma16::panel`].
    unsafe fn first_panel_n128(lo: &mut [[f32; 16]; 2], hi: &mut [[f32; 16]; 2], a: u64, b: u64);
}

/// `wgmma.fence`: before a group's first MMA, once its accumulators were last written.
///
/// # Safety
/// All 128 threads of the warpgroup call it together.
#[inline(always)]
pub unsafe fn fence() {
    // SAFETY: forwarded from the caller.
    unsafe { asm!("wgmma.fence.sync.aligned;", options(nostack)) };
}

/// `wgmma.commit_group`: the MMAs issued since the last commit form one group.
///
/// # Safety
/// All 128 threads of the warpgroup call it together.
#[inline(always)]
pub unsafe fn commit() {
    // SAFETY: forwarded from the caller.
    unsafe { asm!("wgmma.commit_group.sync.aligned;", options(nostack)) };
}

/// Defines a wait for all but `$n` committed groups that hands back `acc`, the accumulators
/// of a group it completes (named as operands so that nothing reads them before it).
macro_rules! wait_groups {
    ($(#[$doc:meta])* $name:ident = $n:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// All 128 threads of the warpgroup call it together.
        #[inline(always)]
        pub unsafe fn $name(acc: &mut [[f32; 16]; 2]) {
            let [[c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15],
                [c16, c17, c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31]] =
                acc;
            // SAFETY: forwarded from the caller.
            unsafe {
                asm!(
                    // The accumulators appear in a comment: operands only to order them.
                    concat!("wgmma.wait_group.sync.aligned ", $n, "; // {0} {1} {2} {3} {4} {5} {6} {7} {8} {9} {10} {11} {12} {13} {14} {15} {16} {17} {18} {19} {20} {21} {22} {23} {24} {25} {26} {27} {28} {29} {30} {31}"),
                    inout(reg32) *c0, inout(reg32) *c1, inout(reg32) *c2, inout(reg32) *c3,
                    inout(reg32) *c4, inout(reg32) *c5, inout(reg32) *c6, inout(reg32) *c7,
                    inout(reg32) *c8, inout(reg32) *c9, inout(reg32) *c10, inout(reg32) *c11,
                    inout(reg32) *c12, inout(reg32) *c13, inout(reg32) *c14, inout(reg32) *c15,
                    inout(reg32) *c16, inout(reg32) *c17, inout(reg32) *c18, inout(reg32) *c19,
                    inout(reg32) *c20, inout(reg32) *c21, inout(reg32) *c22, inout(reg32) *c23,
                    inout(reg32) *c24, inout(reg32) *c25, inout(reg32) *c26, inout(reg32) *c27,
                    inout(reg32) *c28, inout(reg32) *c29, inout(reg32) *c30, inout(reg32) *c31,
                    options(nostack),
                );
            }
        }
    };
}

wait_groups! {
    /// Waits for every committed group but the last.
    wait_pending = "1"
}

wait_groups! {
    /// Waits for every committed group.
    wait_all = "0"
}

/// One `wgmma.mma_async` of `$ptx` inputs on the accumulators `c0`-`c15` (`n32`) or
/// `c0`-`c31` (`n64`) with descriptors `da` and `db` and the `scale-d` predicate `$scale`.
macro_rules! mma {
    (n32, $ptx:literal, $scale:literal) => {
        concat!(
            "wgmma.mma_async.sync.aligned.m64n32k16.f32.",
            $ptx,
            ".",
            $ptx,
            " ",
            "{{{c0}, {c1}, {c2}, {c3}, {c4}, {c5}, {c6}, {c7}, ",
            "{c8}, {c9}, {c10}, {c11}, {c12}, {c13}, {c14}, {c15}}}, ",
            "da, db, ",
            $scale,
            ", 1, 1, 0, 0;\n"
        )
    };
    (n128, $ptx:literal, $scale:literal) => {
        concat!(
            "wgmma.mma_async.sync.aligned.m64n128k16.f32.",
            $ptx,
            ".",
            $ptx,
            " ",
            "{{{c0}, {c1}, {c2}, {c3}, {c4}, {c5}, {c6}, {c7}, {c8}, {c9}, {c10}, {c11}, {c12}, {c13}, {c14}, {c15}, ",
            "{c16}, {c17}, {c18}, {c19}, {c20}, {c21}, {c22}, {c23}, {c24}, {c25}, {c26}, {c27}, {c28}, {c29}, {c30}, {c31}, ",
            "{c32}, {c33}, {c34}, {c35}, {c36}, {c37}, {c38}, {c39}, {c40}, {c41}, {c42}, {c43}, {c44}, {c45}, {c46}, {c47}, ",
            "{c48}, {c49}, {c50}, {c51}, {c52}, {c53}, {c54}, {c55}, {c56}, {c57}, {c58}, {c59}, {c60}, {c61}, {c62}, {c63}}}, ",
            "da, db, ",
            $scale,
            ", 1, 1, 0, 0;\n"
        )
    };
    (n64, $ptx:literal, $scale:literal) => {
        concat!(
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.",
            $ptx,
            ".",
            $ptx,
            " ",
            "{{{c0}, {c1}, {c2}, {c3}, {c4}, {c5}, {c6}, {c7}, ",
            "{c8}, {c9}, {c10}, {c11}, {c12}, {c13}, {c14}, {c15}, ",
            "{c16}, {c17}, {c18}, {c19}, {c20}, {c21}, {c22}, {c23}, ",
            "{c24}, {c25}, {c26}, {c27}, {c28}, {c29}, {c30}, {c31}}}, ",
            "da, db, ",
            $scale,
            ", 1, 1, 0, 0;\n"
        )
    };
}

/// The asm text of one panel (four k-steps of `mma!($shape, $ptx, ..)`, each 32 bytes further
/// along the rows: 2 in the descriptors' address field), the first with the `scale-d`
/// predicate `$first`.
macro_rules! panel_asm {
    ($shape:ident, $ptx:literal, $first:literal) => {
        concat!(
            "{{\n.reg .pred p, z;\n.reg .b64 da, db;\n",
            "setp.ne.b32 p, {one}, 0;\n",
            "setp.eq.b32 z, {one}, 0;\n",
            "mov.b64 da, {a};\nmov.b64 db, {b};\n",
            mma!($shape, $ptx, $first),
            "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
            mma!($shape, $ptx, "p"),
            "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
            mma!($shape, $ptx, "p"),
            "add.s64 da, da, 2;\nadd.s64 db, db, 2;\n",
            mma!($shape, $ptx, "p"),
            "}}"
        )
    };
}

/// Defines `$name` of [`Wgmma16`] for `$ptx` inputs: one `$shape` panel (`panel_asm!`), the
/// first k-step with the `scale-d` predicate `$first` (`p` true: add to `acc`; `z` false:
/// overwrite it), the accumulators (`$acc`, destructured by `$pat` into the registers
/// `$c`) passed as `$dir` (`inout` or `out`) operands.
macro_rules! panel_fn {
    ($name:ident, $shape:ident, $ptx:literal, $first:literal, $dir:ident, $acc:ty, $pat:pat,
     [$($c:ident),*]) => {
        #[inline(always)]
        unsafe fn $name(acc: &mut $acc, a: u64, b: u64) {
            let $pat = acc;
            // SAFETY: forwarded from the caller; the block's registers are its own.
            unsafe {
                asm!(
                    panel_asm!($shape, $ptx, $first),
                    one = in(reg32) 1u32,
                    a = in(reg64) a,
                    b = in(reg64) b,
                    $($c = $dir(reg32) *$c,)*
                    options(nostack),
                );
            }
        }
    };
}

/// Defines `$name` (`m64n32k16`) and `$n64` (`m64n64k16`) of [`Wgmma16`] for `$ptx` inputs
/// with the first k-step's predicate `$first` and operands `$dir`.
macro_rules! panel_fns {
    ($name:ident, $n64:ident, $ptx:literal, $first:literal, $dir:ident) => {
        panel_fn!(
            $name,
            n32,
            $ptx,
            $first,
            $dir,
            [f32; 16],
            [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15],
            [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15]
        );
        panel_fn!(
            $n64,
            n64,
            $ptx,
            $first,
            $dir,
            [[f32; 16]; 2],
            [
                [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15],
                [c16, c17, c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31]
            ],
            [
                c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15, c16, c17,
                c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31
            ]
        );
    };
}

/// Defines `$name` (`m64n128k16`) of [`Wgmma16`] for `$ptx` inputs with the first k-step's
/// predicate `$first` and operands `$dir`, the accumulators in two halves.
macro_rules! panel_fn_n128 {
    ($name:ident, $ptx:literal, $first:literal, $dir:ident) => {
        #[inline(always)]
        unsafe fn $name(lo: &mut [[f32; 16]; 2], hi: &mut [[f32; 16]; 2], a: u64, b: u64) {
            let [[c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15], [c16, c17, c18, c19, c20, c21, c22, c23, c24, c25, c26, c27, c28, c29, c30, c31]] = lo;
            let [[c32, c33, c34, c35, c36, c37, c38, c39, c40, c41, c42, c43, c44, c45, c46, c47], [c48, c49, c50, c51, c52, c53, c54, c55, c56, c57, c58, c59, c60, c61, c62, c63]] = hi;
            // SAFETY: forwarded from the caller; the block's registers are its own.
            unsafe {
                asm!(
                    panel_asm!(n128, $ptx, $first),
                    one = in(reg32) 1u32,
                    a = in(reg64) a,
                    b = in(reg64) b,
                    c0 = $dir(reg32) *c0,
                    c1 = $dir(reg32) *c1,
                    c2 = $dir(reg32) *c2,
                    c3 = $dir(reg32) *c3,
                    c4 = $dir(reg32) *c4,
                    c5 = $dir(reg32) *c5,
                    c6 = $dir(reg32) *c6,
                    c7 = $dir(reg32) *c7,
                    c8 = $dir(reg32) *c8,
                    c9 = $dir(reg32) *c9,
                    c10 = $dir(reg32) *c10,
                    c11 = $dir(reg32) *c11,
                    c12 = $dir(reg32) *c12,
                    c13 = $dir(reg32) *c13,
                    c14 = $dir(reg32) *c14,
                    c15 = $dir(reg32) *c15,
                    c16 = $dir(reg32) *c16,
                    c17 = $dir(reg32) *c17,
                    c18 = $dir(reg32) *c18,
                    c19 = $dir(reg32) *c19,
                    c20 = $dir(reg32) *c20,
                    c21 = $dir(reg32) *c21,
                    c22 = $dir(reg32) *c22,
                    c23 = $dir(reg32) *c23,
                    c24 = $dir(reg32) *c24,
                    c25 = $dir(reg32) *c25,
                    c26 = $dir(reg32) *c26,
                    c27 = $dir(reg32) *c27,
                    c28 = $dir(reg32) *c28,
                    c29 = $dir(reg32) *c29,
                    c30 = $dir(reg32) *c30,
                    c31 = $dir(reg32) *c31,
                    c32 = $dir(reg32) *c32,
                    c33 = $dir(reg32) *c33,
                    c34 = $dir(reg32) *c34,
                    c35 = $dir(reg32) *c35,
                    c36 = $dir(reg32) *c36,
                    c37 = $dir(reg32) *c37,
                    c38 = $dir(reg32) *c38,
                    c39 = $dir(reg32) *c39,
                    c40 = $dir(reg32) *c40,
                    c41 = $dir(reg32) *c41,
                    c42 = $dir(reg32) *c42,
                    c43 = $dir(reg32) *c43,
                    c44 = $dir(reg32) *c44,
                    c45 = $dir(reg32) *c45,
                    c46 = $dir(reg32) *c46,
                    c47 = $dir(reg32) *c47,
                    c48 = $dir(reg32) *c48,
                    c49 = $dir(reg32) *c49,
                    c50 = $dir(reg32) *c50,
                    c51 = $dir(reg32) *c51,
                    c52 = $dir(reg32) *c52,
                    c53 = $dir(reg32) *c53,
                    c54 = $dir(reg32) *c54,
                    c55 = $dir(reg32) *c55,
                    c56 = $dir(reg32) *c56,
                    c57 = $dir(reg32) *c57,
                    c58 = $dir(reg32) *c58,
                    c59 = $dir(reg32) *c59,
                    c60 = $dir(reg32) *c60,
                    c61 = $dir(reg32) *c61,
                    c62 = $dir(reg32) *c62,
                    c63 = $dir(reg32) *c63,
                    options(nostack),
                );
            }
        }
    };
}

/// Implements [`Wgmma16`] for `$elem` with the PTX input type `$ptx`.
macro_rules! wgmma16 {
    ($elem:ty, $ptx:literal) => {
        impl Wgmma16 for $elem {
            panel_fns!(panel, panel_n64, $ptx, "p", inout);
            panel_fns!(first_panel, first_panel_n64, $ptx, "z", out);
            panel_fn_n128!(panel_n128, $ptx, "p", inout);
            panel_fn_n128!(first_panel_n128, $ptx, "z", out);
        }
    };
}

wgmma16!(F16, "f16");
wgmma16!(Bf16, "bf16");

//! Warp-level matrix multiply-accumulate (`mma.sync.m16n8k16`, sm_80+) and the shared-memory
//! matrix loads that feed it (`ldmatrix`).
//!
//! Fragment layouts (PTX ISA, m16n8k16, 16-bit inputs), with `gid = lane / 4` and
//! `tig = lane % 4`: A (16x16, row-major) register 0 = row gid, columns 2tig..2tig+1;
//! register 1 = row gid+8; registers 2, 3 = the same rows, columns +8. B (16x8, "col") register
//! 0 = rows (k) 2tig..2tig+1 of column (n) gid; register 1 = k + 8. C/D (16x8 f32): c0, c1 =
//! row gid, columns 2tig, 2tig+1; c2, c3 = row gid+8. A matrix stored with its rows
//! contiguous (a query row, a key row) is exactly what `ldmatrix` without `.trans` turns into
//! these fragments.

use core::arch::asm;

use crate::gpu::math::{Bf16, F16};
use crate::gpu::mem::{load_words, Chunk};

/// The 32-bit shared-memory address of a pointer into dynamic shared memory.
#[inline(always)]
pub fn shared_addr<T>(ptr: *const T) -> u32 {
    let addr: u64;
    // SAFETY: converts a generic address to the shared window; no memory is touched.
    unsafe {
        asm!("cvta.to.shared.u64 {a}, {p};", a = out(reg64) addr, p = in(reg64) ptr as u64, options(pure, nomem, nostack));
    }
    addr as u32
}

// The aggregation's `mma.sync` path is its only user; the Hopper module uses `wgmma` there.
#[cfg(not(kvc_hopper))]
load_words! {
    /// Four 8x8 b16 matrices from shared memory; lanes `8m..8m+8` give the row addresses of
    /// matrix `m`, and lane `l` receives row `l / 4`, columns `2 (l % 4)..+2` of each.
    ///
    /// # Safety
    /// Every lane's address is a 16-byte-aligned shared address of 16 readable bytes; the warp
    /// is converged.
    ldmatrix_x4(u32, reg32) = "ldmatrix.sync.aligned.m8n8.x4.shared.b16", readonly, nostack
}

/// A 16-bit input type of `mma.sync.m16n8k16` (f32 accumulators).
pub trait Mma16 {
    /// `d = a * b + c`.
    ///
    /// # Safety
    /// The warp is converged.
    unsafe fn mma(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4];

    /// `(x0, x1)` as two packed pairs of this type, `hi` (rounded to nearest) and `lo` (the
    /// rounded remainder), so that `hi + lo` carries about twice this type's precision; `x0`
    /// goes in the low half of each word.
    fn split(x0: f32, x1: f32) -> (u32, u32);
}

/// Implements [`Mma16`] for `$elem` with the PTX input type `$ptx`; `$widen` turns the
/// packed `hi` into the f32 registers `w0` (low half) and `w1` (high half).
macro_rules! mma16 {
    ($elem:ty, $ptx:literal, $widen:literal) => {
        impl Mma16 for $elem {
            #[inline(always)]
            fn split(x0: f32, x1: f32) -> (u32, u32) {
                let (hi, lo): (u32, u32);
                // SAFETY: register-only arithmetic.
                unsafe {
                    asm!(
                        concat!(
                            "{{ .reg .b16 h0, h1; .reg .b32 w0, w1, r0, r1;\n",
                            "cvt.rn.", $ptx, "x2.f32 {hi}, {x1}, {x0};\n",
                            $widen, "\n",
                            "sub.f32 r0, {x0}, w0;\n",
                            "sub.f32 r1, {x1}, w1;\n",
                            "cvt.rn.", $ptx, "x2.f32 {lo}, r1, r0; }}"
                        ),
                        hi = out(reg32) hi,
                        lo = out(reg32) lo,
                        x0 = in(reg32) x0,
                        x1 = in(reg32) x1,
                        options(pure, nomem, nostack),
                    );
                }
                (hi, lo)
            }

            #[inline(always)]
            unsafe fn mma(a: [u32; 4], b: [u32; 2], c: [f32; 4]) -> [f32; 4] {
                let (d0, d1, d2, d3): (f32, f32, f32, f32);
                // SAFETY: a register-only warp instruction.
                unsafe {
                    asm!(
                        concat!("mma.sync.aligned.m16n8k16.row.col.f32.", $ptx, ".", $ptx, ".f32 {{{d0}, {d1}, {d2}, {d3}}}, {{{a0}, {a1}, {a2}, {a3}}}, {{{b0}, {b1}}}, {{{c0}, {c1}, {c2}, {c3}}};"),
                        d0 = out(reg32) d0, d1 = out(reg32) d1, d2 = out(reg32) d2, d3 = out(reg32) d3,
                        a0 = in(reg32) a[0], a1 = in(reg32) a[1], a2 = in(reg32) a[2], a3 = in(reg32) a[3],
                        b0 = in(reg32) b[0], b1 = in(reg32) b[1],
                        c0 = in(reg32) c[0], c1 = in(reg32) c[1], c2 = in(reg32) c[2], c3 = in(reg32) c[3],
                        options(pure, nomem, nostack),
                    );
                }
                [d0, d1, d2, d3]
            }
        }
    };
}

mma16!(
    F16,
    "f16",
    "mov.b32 {{h0, h1}}, {hi}; cvt.f32.f16 w0, h0; cvt.f32.f16 w1, h1;"
);
mma16!(
    Bf16,
    "bf16",
    "shl.b32 w0, {hi}, 16; and.b32 w1, {hi}, 0xffff0000;"
);

/// The word of 16-bit halves `(a.lo, b.lo)` (`high` false) or `(a.hi, b.hi)` (`high` true),
/// `a`'s half in the low half (`prmt`).
#[inline(always)]
pub fn pair_halves(a: u32, b: u32, high: bool) -> u32 {
    let selector: u32 = if high { 0x7632 } else { 0x5410 };
    let d: u32;
    // SAFETY: register-only byte permute.
    unsafe {
        asm!(
            "prmt.b32 {d}, {a}, {b}, {s};",
            d = out(reg32) d,
            a = in(reg32) a,
            b = in(reg32) b,
            s = in(reg32) selector,
            options(pure, nomem, nostack),
        );
    }
    d
}

/// Starts an asynchronous copy (`cp.async`, sm_80+) of the 16 bytes at global `src + offset`
/// to shared `dst`, or of 16 zero bytes when `src` is `None` (nothing is read). The thread
/// must [`wait_async_copies`] (and the CTA synchronise) before the bytes are read. A row's
/// chunks share one `src` and differ in `offset`, so that the choice between a row and zeros
/// is made once a row, and a constant offset becomes part of the copy's address.
///
/// # Safety
/// `dst` is a 16-byte-aligned shared address of 16 writable bytes; with `Some`, `src +
/// offset` is a 16-byte-aligned global address of 16 bytes no thread writes during the kernel.
#[inline(always)]
pub unsafe fn copy_async_chunk(dst: u32, src: Option<u64>, offset: u64) {
    // With `None`, the address is `offset` and the source size 0: nothing is read.
    let (base, bytes) = match src {
        Some(addr) => (addr, 16u32),
        None => (0, 0),
    };
    // SAFETY: forwarded from the caller; with a source size of 0 nothing is read.
    unsafe {
        asm!(
            "cp.async.cg.shared.global [{dst}], [{src}], 16, {bytes};",
            dst = in(reg32) dst,
            src = in(reg64) base + offset,
            bytes = in(reg32) bytes,
            options(nostack),
        );
    }
}

/// Starts an asynchronous copy (`cp.async`, sm_80+) of the 4 bytes at global `src` to shared
/// `dst`; as [`copy_async_chunk`].
///
/// # Safety
/// `dst` is a 4-byte-aligned shared address of 4 writable bytes; `src` a 4-byte-aligned global
/// address of 4 bytes no thread writes until the copy has landed.
#[inline(always)]
pub unsafe fn copy_async_word(dst: u32, src: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "cp.async.ca.shared.global [{dst}], [{src}], 4;",
            dst = in(reg32) dst,
            src = in(reg64) src,
            options(nostack),
        );
    }
}

/// Closes the group of this thread's asynchronous copies started since the last commit (an
/// empty group when there were none).
///
/// # Safety
/// None.
#[inline(always)]
pub unsafe fn commit_async_copies() {
    // SAFETY: bookkeeping of this thread's own copies.
    unsafe { asm!("cp.async.commit_group;", options(nostack)) };
}

/// Waits until every committed group of this thread's copies but the most recent one has
/// landed; the landed bytes are then visible to this thread.
///
/// # Safety
/// None beyond the copies' own.
#[inline(always)]
pub unsafe fn wait_async_copies_but_last() {
    // SAFETY: waits on this thread's own copies.
    unsafe { asm!("cp.async.wait_group 1;", options(nostack)) };
}

load_words! {
    /// Loads 16 bytes from shared memory.
    ///
    /// # Safety
    /// `addr` is a 16-byte-aligned shared address of 16 readable bytes.
    load_shared_chunk(u32, reg32) = "ld.shared.v4.u32", readonly, nostack
}

/// Waits until this thread's asynchronous copies have landed.
///
/// # Safety
/// None beyond the copies' own; other threads see the bytes only after a barrier.
#[inline(always)]
pub unsafe fn wait_async_copies() {
    // SAFETY: waits on this thread's own copies.
    unsafe { asm!("cp.async.wait_all;", options(nostack)) };
}

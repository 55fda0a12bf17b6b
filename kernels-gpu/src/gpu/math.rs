//! Fast math and the cache element types.

unsafe extern "C" {
    #[link_name = "llvm.nvvm.ex2.approx.ftz.f"]
    fn ex2_approx_ftz(x: f32) -> f32;
    #[cfg(kvc_hopper)]
    #[link_name = "llvm.nvvm.lg2.approx.ftz.f"]
    fn lg2_approx(x: f32) -> f32;
}

/// `2^x` by the SFU (`ex2.approx.ftz.f32`, about 2 ulp); `exp2(-inf) = 0`.
#[inline(always)]
pub fn exp2(x: f32) -> f32 {
    // SAFETY: a pure arithmetic intrinsic, defined for every input.
    unsafe { ex2_approx_ftz(x) }
}

/// `log2 x` by the SFU (`lg2.approx.ftz.f32`, absolute error about `2^-22`); `log2 0 = -inf`.
#[cfg(kvc_hopper)]
#[inline(always)]
pub fn log2(x: f32) -> f32 {
    // SAFETY: a pure arithmetic intrinsic, defined for every input.
    unsafe { lg2_approx(x) }
}

/// `a * b + c` with one rounding (`fma.rn.f32`). Rust never contracts `a * b + c` by itself.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    core::intrinsics::fmaf32(a, b, c)
}

/// `x`, hidden from the optimiser, so that a loop bounded by it stays a loop (LLVM fully
/// unrolls loops with constant trip counts, which for long bodies pushes the enclosing loop
/// out of its unroll budget and its arrays into local memory).
#[inline(always)]
pub fn opaque(x: u32) -> u32 {
    let y: u32;
    // SAFETY: a register move.
    unsafe {
        core::arch::asm!("mov.b32 {y}, {x};", y = out(reg32) y, x = in(reg32) x, options(pure, nomem, nostack));
    }
    y
}

/// `max` that ignores neither operand's infinities (`fmax.f32`).
#[inline(always)]
pub fn fmax(a: f32, b: f32) -> f32 {
    a.max(b)
}

/// An element type of the cache. Loads widen to f32; stores round to nearest even.
pub trait CacheElem: Copy {
    /// Bytes of one element.
    const BYTES: u32;
    /// Elements in a 16-byte chunk.
    const PER_CHUNK: usize = 16 / Self::BYTES as usize;

    /// Widens the elements of a 16-byte chunk into `out[..PER_CHUNK]`.
    fn unpack(chunk: [u32; 4], out: &mut [f32]);

    /// Rounds `x` to this type; returns its bits in the low `8 * BYTES` bits.
    fn bits_from_f32(x: f32) -> u32;
}

/// IEEE half precision.
#[derive(Clone, Copy)]
pub struct F16;
/// bfloat16.
#[derive(Clone, Copy)]
pub struct Bf16;
/// IEEE single precision.
#[derive(Clone, Copy)]
pub struct F32;

impl CacheElem for F16 {
    const BYTES: u32 = 2;

    #[inline(always)]
    fn unpack(chunk: [u32; 4], out: &mut [f32]) {
        for (w, word) in chunk.iter().enumerate() {
            out[2 * w] = f16::from_bits(*word as u16) as f32;
            out[2 * w + 1] = f16::from_bits((*word >> 16) as u16) as f32;
        }
    }

    #[inline(always)]
    fn bits_from_f32(x: f32) -> u32 {
        (x as f16).to_bits() as u32
    }
}

impl CacheElem for Bf16 {
    const BYTES: u32 = 2;

    #[inline(always)]
    fn unpack(chunk: [u32; 4], out: &mut [f32]) {
        for (w, word) in chunk.iter().enumerate() {
            out[2 * w] = f32::from_bits(*word << 16);
            out[2 * w + 1] = f32::from_bits(*word & 0xffff_0000);
        }
    }

    #[inline(always)]
    fn bits_from_f32(x: f32) -> u32 {
        let bits = x.to_bits();
        if x.is_nan() {
            // Quiet NaN with the sign kept, as the host's `half::bf16::from_f32`.
            (bits >> 16) | 0x0040
        } else {
            // Round to nearest, ties to even, on the 16 bits that are dropped.
            (bits + 0x7fff + ((bits >> 16) & 1)) >> 16
        }
    }
}

impl CacheElem for F32 {
    const BYTES: u32 = 4;

    #[inline(always)]
    fn unpack(chunk: [u32; 4], out: &mut [f32]) {
        for (w, word) in chunk.iter().enumerate() {
            out[w] = f32::from_bits(*word);
        }
    }

    #[inline(always)]
    fn bits_from_f32(x: f32) -> u32 {
        x.to_bits()
    }
}

/// Stores `x` rounded to `T` as element `index` of the array of `T` at `base`.
///
/// # Safety
/// As [`crate::gpu::mem::store`] for an element of `T::BYTES` bytes.
#[inline(always)]
pub unsafe fn store_elem<T: CacheElem>(base: u64, index: u64, x: f32) {
    let bits = T::bits_from_f32(x);
    // SAFETY: forwarded from the caller; the width matches T.
    unsafe {
        match T::BYTES {
            2 => crate::gpu::mem::store::<u16>(base, index, bits as u16),
            _ => crate::gpu::mem::store::<u32>(base, index, bits),
        }
    }
}

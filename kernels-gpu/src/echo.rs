//! ABI echo: writes the bytes of the params struct the kernel received back to device memory,
//! so `tests/abi_roundtrip.rs` can compare them with what the host pushed. rustc's
//! `extern "ptx-kernel"` aggregate ABI is unstable; this catches a change.

use kvc_abi::params::{AggregateParams, AppendParams, CompressParams, DecodeParams};

use crate::gpu::mem::store;
use crate::gpu::thread::{block_idx_x, thread_idx_x};

/// A params struct with a field the echo may overwrite with the struct's own bytes.
pub trait Echo: Copy {
    /// Device address of at least `size_of::<Self>()` writable bytes.
    fn echo_dst(&self) -> u64;
}

impl Echo for DecodeParams {
    fn echo_dst(&self) -> u64 {
        self.out
    }
}

impl Echo for AggregateParams {
    fn echo_dst(&self) -> u64 {
        self.stats
    }
}

impl Echo for CompressParams {
    fn echo_dst(&self) -> u64 {
        self.heads
    }
}

impl Echo for AppendParams {
    fn echo_dst(&self) -> u64 {
        self.meta
    }
}

/// Copies the params bytes, one u32 word per step, from thread 0 of CTA 0.
///
/// # Safety
/// `p.echo_dst()` addresses `size_of::<P>()` writable, 4-byte-aligned bytes.
#[inline(always)]
pub unsafe fn echo_body<P: Echo>(p: &P) {
    if block_idx_x() != 0 || thread_idx_x() != 0 {
        return;
    }
    let words = core::mem::size_of::<P>() / 4;
    let src = p as *const P as *const u32;
    for w in 0..words {
        // SAFETY: P is a Pod params struct of whole u32 words; the caller sized the target.
        unsafe { store::<u32>(p.echo_dst(), w as u64, *src.add(w)) };
    }
}

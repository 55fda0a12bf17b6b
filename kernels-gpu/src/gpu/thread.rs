//! Thread, warp and block indices, and the CTA barrier.

use core::arch::nvptx;

use kvc_abi::plan::WARP_SIZE;

/// `threadIdx.x`.
#[inline(always)]
pub fn thread_idx_x() -> u32 {
    // SAFETY: reads a special register; valid in any kernel.
    unsafe { nvptx::_thread_idx_x() as u32 }
}

/// `blockIdx.x`.
#[inline(always)]
pub fn block_idx_x() -> u32 {
    // SAFETY: reads a special register; valid in any kernel.
    unsafe { nvptx::_block_idx_x() as u32 }
}

/// `gridDim.x`.
#[inline(always)]
pub fn grid_dim_x() -> u32 {
    // SAFETY: reads a special register; valid in any kernel.
    unsafe { nvptx::_grid_dim_x() as u32 }
}

/// `blockIdx.y`.
#[inline(always)]
pub fn block_idx_y() -> u32 {
    // SAFETY: reads a special register; valid in any kernel.
    unsafe { nvptx::_block_idx_y() as u32 }
}

/// `blockIdx.z`.
#[inline(always)]
pub fn block_idx_z() -> u32 {
    // SAFETY: reads a special register; valid in any kernel.
    unsafe { nvptx::_block_idx_z() as u32 }
}

/// Lane of this thread in its warp (CTAs are one-dimensional).
#[inline(always)]
pub fn lane_id() -> u32 {
    thread_idx_x() % WARP_SIZE
}

/// Warp of this thread in its CTA (CTAs are one-dimensional).
#[inline(always)]
pub fn warp_id() -> u32 {
    thread_idx_x() / WARP_SIZE
}

/// `__syncthreads()`.
///
/// # Safety
/// Every thread of the CTA must reach the same call.
#[inline(always)]
pub unsafe fn sync_threads() {
    // SAFETY: the caller guarantees the whole CTA arrives.
    unsafe { nvptx::_syncthreads() }
}

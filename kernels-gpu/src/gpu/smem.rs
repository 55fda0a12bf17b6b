//! Dynamic shared memory.

use core::intrinsics::gpu::gpu_launch_sized_workgroup_mem;

/// The CTA's dynamic shared memory as f32 words; its size is the launch's `smem_bytes`, which
/// the host takes from the same plan function that gives the kernel its offsets.
#[inline(always)]
pub fn dynamic_f32() -> *mut f32 {
    gpu_launch_sized_workgroup_mem::<f32>()
}

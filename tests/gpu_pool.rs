//! `Gpu::hold_freed_memory`: after it, memory this process frees stays reserved in the
//! device's default memory pool across a synchronize; before it, the pool hands it back to the
//! driver (a release threshold of 0), which is what slowed the benchmarks' timed loops.

mod common;

use common::gpu_or_skip;
use cudarc::driver::sys;
use kvcompress::gpu::Gpu;
use kvcompress::{Backend, DType, Tensor};

/// Bytes of one buffer: far above anything the pool keeps for itself.
const BYTES: usize = 256 << 20;

/// Bytes the device's default pool holds from the driver now.
fn reserved(gpu: &Gpu) -> u64 {
    let mut pool = std::ptr::null_mut();
    let mut bytes = 0u64;
    // SAFETY: live locals of the types the driver writes (a pool handle; the attribute is a
    // u64); the device is the backend's.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, gpu.context().cu_device())
            .result()
            .unwrap();
        sys::cuMemPoolGetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT,
            (&mut bytes as *mut u64).cast(),
        )
        .result()
        .unwrap();
    }
    bytes
}

/// Allocates, frees and synchronizes a `BYTES` buffer; returns the pool's reserved bytes while
/// the buffer was live and after the synchronize.
fn free_one(backend: &Backend, gpu: &Gpu) -> (u64, u64) {
    let buffer = Tensor::full(backend, DType::F32, &[BYTES / 4], 1.0).unwrap();
    gpu.synchronize().unwrap();
    let live = reserved(gpu);
    drop(buffer);
    gpu.synchronize().unwrap();
    (live, reserved(gpu))
}

#[test]
fn held_memory_stays_in_the_pool() {
    let Some(backend) = gpu_or_skip("held_memory_stays_in_the_pool") else {
        return;
    };
    let Backend::Cuda(gpu) = &backend else {
        unreachable!("gpu_or_skip returns CUDA")
    };
    // The driver's default first, so that the check below can tell the two apart.
    let (live, after) = free_one(&backend, gpu);
    assert!(live >= BYTES as u64, "{live} bytes reserved while live");
    assert!(
        after < BYTES as u64,
        "{after} bytes still reserved with the default threshold"
    );
    gpu.hold_freed_memory().unwrap();
    let (live, after) = free_one(&backend, gpu);
    assert!(live >= BYTES as u64, "{live} bytes reserved while live");
    assert!(
        after >= BYTES as u64,
        "{after} bytes reserved once freed and held"
    );
}

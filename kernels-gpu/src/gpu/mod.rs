//! The only code that touches `core::arch::nvptx`, inline PTX and LLVM's NVVM intrinsics:
//! small wrappers every kernel uses.

pub mod math;
pub mod mem;
pub mod mma;
pub mod smem;
pub mod sync;
pub mod thread;
#[cfg(kvc_hopper)]
pub mod tma;
pub mod warp;
#[cfg(kvc_hopper)]
pub mod wgmma;

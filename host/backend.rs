//! Where the cache and tensors live: the CPU reference or a CUDA device. Both run the same
//! public API; the CPU backend runs the `reference` implementations.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::Gpu;

/// The backend of a cache and of the tensors passed to it.
#[derive(Clone, Debug)]
pub enum Backend {
    /// The CPU reference: plain loops, f64 accumulation. Slow, exact to the contract.
    Cpu,
    /// A CUDA device running the PTX kernels.
    Cuda(Arc<Gpu>),
}

impl Backend {
    /// CUDA device `ordinal`; [`crate::Error::CudaUnavailable`] without a driver or device.
    pub fn cuda(ordinal: usize) -> Result<Self> {
        Ok(Backend::Cuda(Gpu::new(ordinal)?))
    }

    /// CUDA device 0 when there is one, else the CPU reference.
    pub fn auto() -> Self {
        Self::cuda(0).unwrap_or(Backend::Cpu)
    }

    /// "cpu" or the CUDA device's name.
    pub fn describe(&self) -> String {
        match self {
            Backend::Cpu => "cpu (reference)".to_string(),
            Backend::Cuda(gpu) => format!("cuda ({})", gpu.name()),
        }
    }

    /// Whether two backends are the same device.
    pub fn same_as(&self, other: &Backend) -> bool {
        match (self, other) {
            (Backend::Cpu, Backend::Cpu) => true,
            (Backend::Cuda(a), Backend::Cuda(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Waits for queued device work (a no-op on the CPU).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Backend::Cpu => Ok(()),
            Backend::Cuda(gpu) => gpu.synchronize(),
        }
    }
}

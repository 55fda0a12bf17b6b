//! A dense, row-major tensor of a cache dtype on one backend: queries, outputs, new K/V.

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::backend::Backend;
use crate::dtype::{self, DType};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Where a buffer's bytes are.
pub(crate) enum Storage {
    Host(Vec<u8>),
    Cuda { gpu: Arc<Gpu>, buf: CudaSlice<u8> },
}

impl Storage {
    /// A copy of `bytes` on `backend`.
    pub(crate) fn new(backend: &Backend, bytes: &[u8]) -> Result<Self> {
        Ok(match backend {
            Backend::Cpu => Storage::Host(bytes.to_vec()),
            Backend::Cuda(gpu) => Storage::Cuda {
                gpu: gpu.clone(),
                buf: gpu.upload(bytes)?,
            },
        })
    }

    /// The backend holding the bytes.
    pub(crate) fn backend(&self) -> Backend {
        match self {
            Storage::Host(_) => Backend::Cpu,
            Storage::Cuda { gpu, .. } => Backend::Cuda(gpu.clone()),
        }
    }

    /// A host copy of the bytes (waits for queued device work).
    pub(crate) fn to_host(&self) -> Result<Vec<u8>> {
        match self {
            Storage::Host(bytes) => Ok(bytes.clone()),
            Storage::Cuda { gpu, buf } => gpu.download(buf),
        }
    }
}

/// A dense row-major tensor of `dtype` elements on one backend.
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    pub(crate) storage: Storage,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("backend", &self.backend().describe())
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl Tensor {
    /// A tensor holding `bytes`, the little-endian elements of `dtype` in row-major order.
    pub fn from_bytes(
        backend: &Backend,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<Self> {
        let elems: usize = shape.iter().product();
        let expected = elems * dtype.elem_bytes() as usize;
        if bytes.len() != expected {
            return Err(Error::invalid(
                "bytes",
                format!("{} bytes", bytes.len()),
                format!("{expected} bytes for shape {shape:?} of {}", dtype.name()),
            ));
        }
        Ok(Self {
            storage: Storage::new(backend, bytes)?,
            dtype,
            shape: shape.to_vec(),
        })
    }

    /// A tensor of `values` rounded to `dtype`.
    pub fn from_f32(
        backend: &Backend,
        dtype: DType,
        shape: &[usize],
        values: &[f32],
    ) -> Result<Self> {
        let elems: usize = shape.iter().product();
        if values.len() != elems {
            return Err(Error::invalid(
                "values",
                format!("{} values", values.len()),
                format!("{elems} for shape {shape:?}"),
            ));
        }
        Self::from_bytes(backend, dtype, shape, &dtype::encode(dtype, values))
    }

    /// A tensor with every element `value` (NaN makes an output whose unwritten elements show).
    pub fn full(backend: &Backend, dtype: DType, shape: &[usize], value: f32) -> Result<Self> {
        let elems: usize = shape.iter().product();
        Self::from_f32(backend, dtype, shape, &vec![value; elems])
    }

    /// The backend holding the data.
    pub fn backend(&self) -> Backend {
        self.storage.backend()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The extents, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Elements in all.
    pub fn elems(&self) -> usize {
        self.shape.iter().product()
    }

    /// A host copy of the bytes (waits for queued device work).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.storage.to_host()
    }

    /// A host copy widened to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        Ok(dtype::decode(self.dtype, &self.to_bytes()?))
    }
}

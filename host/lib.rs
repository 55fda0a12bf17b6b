//! # kvcompress
//!
//! GPU kernels for KV-cache compression after KV-Compress (Rehg 2024, arXiv:2410.00161): a
//! per-head paged KV cache whose blocks each belong to one `(sequence, layer, KV head)`, so
//! that evicting KVs at a different rate per head frees whole blocks.
//!
//! Kernels are Rust compiled to PTX (`kernels-gpu/`), launched through `cudarc` on the CUDA
//! backend; the CPU backend runs the reference implementations in [`mod@reference`], which every
//! kernel is tested against. Both backends share one API: [`PagedKvCache`] with
//! [`PagedKvCache::append_kv`] and [`PagedKvCache::decode`].
//!
//! ```
//! use kvcompress::{Backend, CacheConfig, DType, DecodeArgs, PagedKvCache, Tensor};
//!
//! # fn main() -> kvcompress::Result<()> {
//! let backend = Backend::Cpu; // or Backend::auto() for CUDA when present
//! let config = CacheConfig {
//!     num_seqs: 1, num_layers: 1, num_kv_heads: 2, group_size: 2, head_dim: 64,
//!     block_size: 16, max_blocks_per_head: 8, num_blocks: 64, dtype: DType::F16,
//! };
//! let mut cache = PagedKvCache::new(&backend, config)?;
//! // A 20-token prompt for sequence row 0, layer 0: K and V are [tokens, H, D].
//! let kv: Vec<f32> = (0..20 * 2 * 64).map(|i| (i % 7) as f32 * 0.1).collect();
//! let k = Tensor::from_f32(&backend, DType::F16, &[20, 2, 64], &kv)?;
//! let v = Tensor::from_f32(&backend, DType::F16, &[20, 2, 64], &kv)?;
//! let positions: Vec<i32> = (0..20).collect();
//! cache.append_kv(0, &k, &v, &positions, &[20])?;
//! // One query per query head: [num_seqs, H * G, D].
//! let q = Tensor::full(&backend, DType::F16, &[1, 4, 64], 0.5)?;
//! let mut out = Tensor::full(&backend, DType::F16, &[1, 4, 64], 0.0)?;
//! cache.decode(0, &q, &mut out, &DecodeArgs::for_head_dim(64))?;
//! assert_eq!(cache.context_len(0, 0, 1), 20);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod allocator;
pub mod backend;
pub mod bench;
pub mod cache;
pub mod compress;
pub mod dtype;
pub mod error;
pub mod gpu;
mod ops;
pub mod reference;
pub mod tensor;
pub mod tolerance;
mod validate;

pub use allocator::BlockAllocator;
pub use backend::Backend;
pub use cache::{
    AggregateArgs, CacheConfig, CacheSnapshot, DecodeArgs, Metric, PagedKvCache, Recording,
};
pub use compress::{
    Budget, CompressArgs, CompressReport, CompressTimes, HeadReport, Mode, SeqReport,
};
pub use dtype::DType;
pub use error::{Error, Result};
pub use kvc_abi as abi;
pub use kvc_abi::Geometry;
pub use tensor::Tensor;

/// The example of docs/INTEGRATION.md, compiled and run as a doc test.
#[cfg(doctest)]
#[doc = include_str!("../docs/INTEGRATION.md")]
pub struct IntegrationGuide;

//! The one error type of the crate (SPEC §8): every rejected input names its argument and value.

use cudarc::driver::DriverError;

/// Everything a public entry point can fail with. A call that returns an error has launched
/// nothing and left the cache untouched.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An argument is out of its contract.
    #[error("invalid argument `{arg}` = {value}: expected {expected}")]
    InvalidArgument {
        /// The argument's name in the signature (or `args.field`).
        arg: &'static str,
        /// What was passed.
        value: String,
        /// What the contract asks for.
        expected: String,
    },
    /// A valid request this build does not support (dtype, head size, ...).
    #[error("unsupported {what}: {value}")]
    Unsupported {
        /// The property: "dtype", "head_dim", ...
        what: &'static str,
        /// The value asked for.
        value: String,
    },
    /// The block pool cannot hold what was asked; nothing was allocated.
    #[error("out of cache blocks: {needed} needed, {free} free")]
    OutOfBlocks {
        /// Blocks the call needed.
        needed: u64,
        /// Blocks the pool had free.
        free: u64,
    },
    /// No CUDA driver library (`source` is `None`) or no usable device; the CPU reference
    /// backend still works.
    #[error("CUDA backend unavailable: {}", match source {
        Some(e) => e.to_string(),
        None => "no CUDA driver library found".to_string(),
    })]
    CudaUnavailable {
        /// The driver's error, when a driver was found.
        source: Option<DriverError>,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error during {during}: {source}")]
    Driver {
        /// What the crate was doing.
        during: &'static str,
        /// The driver's error.
        source: DriverError,
    },
    /// A kernel launch was refused.
    #[error("launching {entry} (grid {grid:?}, block {block:?}, {smem_bytes} B shared memory) failed: {source}")]
    Launch {
        /// The kernel's entry point.
        entry: String,
        /// CTAs in x, y, z.
        grid: [u32; 3],
        /// Threads per CTA in x, y, z.
        block: [u32; 3],
        /// Dynamic shared memory per CTA.
        smem_bytes: u32,
        /// The driver's error.
        source: DriverError,
    },
    /// The loaded PTX lacks a kernel the host table names.
    #[error("PTX module has no entry point `{name}`")]
    MissingEntry {
        /// The entry point looked for.
        name: String,
    },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::InvalidArgument`] from anything printable.
    pub(crate) fn invalid(
        arg: &'static str,
        value: impl std::fmt::Display,
        expected: impl std::fmt::Display,
    ) -> Self {
        Error::InvalidArgument {
            arg,
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// Wraps a driver error with what was being done.
    pub(crate) fn driver(during: &'static str) -> impl FnOnce(DriverError) -> Self {
        move |source| Error::Driver { during, source }
    }
}

//! CUDA launchers: validated inputs in, `*Params` built, plan taken, kernel launched. No index
//! math lives here beyond calling `kvc_abi`.

pub(crate) mod aggregate;
pub(crate) mod append;
pub(crate) mod compress;
pub(crate) mod decode;

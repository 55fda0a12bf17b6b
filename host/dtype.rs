//! Element conversions on the host: the cache stores raw little-endian bytes of its dtype.

use half::{bf16, f16};

pub use kvc_abi::DType;

/// Reads element `i` of a byte buffer of `dtype` as f64 (exact: every f16/bf16/f32 is an f64).
#[inline]
pub fn read_elem(dtype: DType, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        DType::F16 => f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f64(),
        DType::Bf16 => bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f64(),
        DType::F32 => f32::from_le_bytes([
            bytes[4 * i],
            bytes[4 * i + 1],
            bytes[4 * i + 2],
            bytes[4 * i + 3],
        ]) as f64,
    }
}

/// Writes `x` rounded (to nearest, ties to even) to `dtype` as element `i` of a byte buffer.
#[inline]
pub fn write_elem(dtype: DType, bytes: &mut [u8], i: usize, x: f64) {
    match dtype {
        DType::F16 => bytes[2 * i..2 * i + 2].copy_from_slice(&f16::from_f64(x).to_le_bytes()),
        DType::Bf16 => bytes[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f64(x).to_le_bytes()),
        DType::F32 => bytes[4 * i..4 * i + 4].copy_from_slice(&(x as f32).to_le_bytes()),
    }
}

/// Encodes f32 values as bytes of `dtype`.
pub fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * dtype.elem_bytes() as usize];
    for (i, &x) in values.iter().enumerate() {
        write_elem(dtype, &mut bytes, i, x as f64);
    }
    bytes
}

/// Decodes bytes of `dtype` into f32 values.
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let n = bytes.len() / dtype.elem_bytes() as usize;
    (0..n).map(|i| read_elem(dtype, bytes, i) as f32).collect()
}

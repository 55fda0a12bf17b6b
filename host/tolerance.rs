//! How closely a kernel must match the CPU reference, per dtype (docs/tolerances.md). Shared by
//! the tests and `kvc verify`, so both hold the kernels to the same standard.

// `!(diff <= allowed)` on purpose: a NaN difference must fail the check (STYLE.md §7).
#![allow(clippy::neg_cmp_op_on_partial_ord)]

use half::{bf16, f16};

use crate::dtype::DType;

/// Comparison tolerance for attention outputs of one dtype.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tol {
    /// Allowed error in units in the last place of the reference rounded to the dtype.
    pub ulps: f64,
    /// Absolute floor, for values near zero where an ulp is tiny.
    pub atol: f64,
    /// Relative floor (f32).
    pub rtol: f64,
    /// Bound on `||out - ref|| / ||ref||` over the whole output.
    pub rel_l2: f64,
}

impl Tol {
    /// The tolerance of outputs stored as `dtype` (reference computed in f64, rounded to `dtype`).
    pub fn for_dtype(dtype: DType) -> Self {
        match dtype {
            DType::F16 => Tol {
                ulps: 1.0,
                atol: 1e-5,
                rtol: 0.0,
                rel_l2: 1e-3,
            },
            DType::Bf16 => Tol {
                ulps: 1.0,
                atol: 1e-5,
                rtol: 0.0,
                rel_l2: 8e-3,
            },
            DType::F32 => Tol {
                ulps: 0.0,
                atol: 1e-5,
                rtol: 1e-4,
                rel_l2: 1e-5,
            },
        }
    }

    /// The error allowed at reference value `expected`.
    pub fn allowed(&self, dtype: DType, expected: f32) -> f64 {
        self.ulps * ulp(dtype, expected) + self.atol + self.rtol * (expected as f64).abs()
    }
}

/// The distance from `|x|` (a value of `dtype`) to the next representable value away from 0.
pub fn ulp(dtype: DType, x: f32) -> f64 {
    match dtype {
        DType::F16 => {
            let h = f16::from_f32(x.abs());
            (f16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
        }
        DType::Bf16 => {
            let h = bf16::from_f32(x.abs());
            (bf16::from_bits(h.to_bits() + 1).to_f64() - h.to_f64()).abs()
        }
        DType::F32 => {
            let a = x.abs();
            (f32::from_bits(a.to_bits() + 1) as f64 - a as f64).abs()
        }
    }
}

/// The first element of `actual` outside the tolerance of `dtype` against `expected`, or a
/// non-finite one, or a relative L2 error over the bound: `Err((index, description))`. On
/// success, the largest `error / allowed` ratio (at most 1).
pub fn check_close(dtype: DType, actual: &[f32], expected: &[f32]) -> Result<f64, (usize, String)> {
    if actual.len() != expected.len() {
        return Err((
            0,
            format!("{} values, expected {}", actual.len(), expected.len()),
        ));
    }
    let tol = Tol::for_dtype(dtype);
    let (mut err2, mut ref2, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let diff = (a as f64 - e as f64).abs();
        let allowed = tol.allowed(dtype, e);
        if !a.is_finite() || !(diff <= allowed) {
            return Err((
                i,
                format!("{a}, expected {e}, diff {diff:e} > tolerance {allowed:e}"),
            ));
        }
        worst = worst.max(diff / allowed);
        err2 += diff * diff;
        ref2 += e as f64 * e as f64;
    }
    let rel_l2 = if ref2 > 0.0 {
        (err2 / ref2).sqrt()
    } else {
        err2.sqrt()
    };
    if !(rel_l2 <= tol.rel_l2) {
        return Err((
            0,
            format!("relative L2 error {rel_l2:e} > {:e}", tol.rel_l2),
        ));
    }
    Ok(worst)
}

/// Metrics: NaN poison bit for bit, recorded values to a relative `1e-4` plus `1e-10`
/// absolute (the GPU normalises with f32 `ex2.approx`). `Err((slot, description))`.
pub fn check_metrics(actual: &[f32], expected: &[f32]) -> Result<(), (usize, String)> {
    for (slot, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        if e.is_nan() {
            if a.to_bits() != e.to_bits() {
                return Err((slot, format!("poisoned metric changed to {a}")));
            }
            continue;
        }
        let diff = (a as f64 - e as f64).abs();
        let allowed = 1e-4 * (e as f64).abs() + 1e-10;
        if !(diff <= allowed) {
            return Err((
                slot,
                format!("metric {a:e}, expected {e:e}, diff {diff:e} > {allowed:e}"),
            ));
        }
    }
    if actual.len() != expected.len() {
        return Err((0, "metric length".to_string()));
    }
    Ok(())
}

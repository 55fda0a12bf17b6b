//! Cache element types (SPEC §1): f16, bf16 and f32, always accumulated in f32.

/// Element type of the K/V pools, the queries and the attention output.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary16.
    F16 = 0,
    /// bfloat16: f32's exponent, 8 bits of mantissa.
    Bf16 = 1,
    /// IEEE binary32.
    F32 = 2,
}

impl DType {
    /// Every supported type, in the order the kernel entry tables use.
    pub const ALL: [DType; 3] = [DType::F16, DType::Bf16, DType::F32];

    /// Bytes of one element.
    pub const fn elem_bytes(self) -> u32 {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
        }
    }

    /// The name used in kernel entry points and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F32 => "f32",
        }
    }
}

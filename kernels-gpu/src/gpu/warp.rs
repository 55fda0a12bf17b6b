//! Warp shuffles and butterfly reductions. All lanes of the warp must take part.

unsafe extern "C" {
    #[link_name = "llvm.nvvm.shfl.sync.bfly.f32"]
    fn shfl_sync_bfly_f32(mask: u32, value: f32, lane_mask: i32, clamp: i32) -> f32;
}

/// All 32 lanes take part.
const FULL_MASK: u32 = 0xffff_ffff;

/// The value of lane `lane_id ^ lane_mask`.
///
/// # Safety
/// Every lane of the warp must execute the same call (converged warp).
#[inline(always)]
pub unsafe fn shfl_xor(value: f32, lane_mask: u32) -> f32 {
    // SAFETY: the caller guarantees all 32 lanes participate, as FULL_MASK says.
    unsafe { shfl_sync_bfly_f32(FULL_MASK, value, lane_mask as i32, 0x1f) }
}

/// Sum over the `width` consecutive lanes (a power of two) that share `lane_id / width`.
///
/// # Safety
/// As [`shfl_xor`].
#[inline(always)]
pub unsafe fn sum_within(mut value: f32, width: u32) -> f32 {
    let mut mask = width / 2;
    while mask > 0 {
        // SAFETY: forwarded from the caller.
        value += unsafe { shfl_xor(value, mask) };
        mask /= 2;
    }
    value
}

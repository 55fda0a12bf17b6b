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

/// Bit `l` set for every lane `l` whose `pred` is true.
///
/// # Safety
/// Every lane of the warp must execute the same call.
#[inline(always)]
pub unsafe fn ballot(pred: bool) -> u32 {
    let mask: u32;
    // SAFETY: the caller guarantees a converged warp.
    unsafe {
        core::arch::asm!(
            "{{ .reg .pred p; setp.ne.u32 p, {v}, 0; vote.sync.ballot.b32 {m}, p, 0xffffffff; }}",
            m = out(reg32) mask,
            v = in(reg32) pred as u32,
            options(nomem, nostack),
        );
    }
    mask
}

/// The maximum of `value` over the warp's lanes, every lane gets it (`redux.sync`, sm_80+;
/// only the Hopper module's aggregation uses it).
///
/// # Safety
/// As [`ballot`].
#[cfg(kvc_hopper)]
#[inline(always)]
pub unsafe fn max_i32(value: i32) -> i32 {
    let out: i32;
    // SAFETY: the caller guarantees a converged warp.
    unsafe {
        core::arch::asm!(
            "redux.sync.max.s32 {o}, {v}, 0xffffffff;",
            o = out(reg32) out,
            v = in(reg32) value,
            options(nomem, nostack),
        );
    }
    out
}

/// Bits of the lanes below this one.
#[inline(always)]
pub fn lanemask_lt() -> u32 {
    let mask: u32;
    // SAFETY: reads a special register.
    unsafe {
        core::arch::asm!("mov.u32 {m}, %lanemask_lt;", m = out(reg32) mask, options(pure, nomem, nostack));
    }
    mask
}

/// A u32 from lane `src` of the warp.
///
/// # Safety
/// As [`ballot`].
#[inline(always)]
pub unsafe fn shfl_idx_u32(value: u32, src: u32) -> u32 {
    let out: u32;
    // SAFETY: the caller guarantees a converged warp.
    unsafe {
        core::arch::asm!(
            "shfl.sync.idx.b32 {o}, {v}, {s}, 0x1f, 0xffffffff;",
            o = out(reg32) out,
            v = in(reg32) value,
            s = in(reg32) src,
            options(nomem, nostack),
        );
    }
    out
}

/// A u32 from lane `lane_id ^ lane_mask`.
///
/// # Safety
/// As [`ballot`].
#[inline(always)]
pub unsafe fn shfl_xor_u32(value: u32, lane_mask: u32) -> u32 {
    let out: u32;
    // SAFETY: the caller guarantees a converged warp.
    unsafe {
        core::arch::asm!(
            "shfl.sync.bfly.b32 {o}, {v}, {m}, 0x1f, 0xffffffff;",
            o = out(reg32) out,
            v = in(reg32) value,
            m = in(reg32) lane_mask,
            options(nomem, nostack),
        );
    }
    out
}

/// Sum over the warp's lanes (wrapping at 2^64); every lane gets it.
///
/// # Safety
/// As [`ballot`].
#[inline(always)]
pub unsafe fn warp_sum_u64(mut value: u64) -> u64 {
    let mut mask = 16;
    while mask > 0 {
        // SAFETY: forwarded from the caller.
        let (lo, hi) = unsafe {
            (
                shfl_xor_u32(value as u32, mask),
                shfl_xor_u32((value >> 32) as u32, mask),
            )
        };
        value = value.wrapping_add((hi as u64) << 32 | lo as u64);
        mask /= 2;
    }
    value
}

/// A u32 from lane `lane_id - delta` (unchanged in lanes below `delta`).
///
/// # Safety
/// As [`ballot`].
#[inline(always)]
pub unsafe fn shfl_up_u32(value: u32, delta: u32) -> u32 {
    let out: u32;
    // SAFETY: the caller guarantees a converged warp.
    unsafe {
        core::arch::asm!(
            "shfl.sync.up.b32 {o}, {v}, {d}, 0, 0xffffffff;",
            o = out(reg32) out,
            v = in(reg32) value,
            d = in(reg32) delta,
            options(nomem, nostack),
        );
    }
    out
}

/// Inclusive prefix sum over the warp's lanes.
///
/// # Safety
/// As [`ballot`].
#[inline(always)]
pub unsafe fn inclusive_scan_u32(mut value: u32) -> u32 {
    let lane = crate::gpu::thread::lane_id();
    let mut delta = 1;
    while delta < 32 {
        // SAFETY: forwarded from the caller.
        let up = unsafe { shfl_up_u32(value, delta) };
        if lane >= delta {
            value += up;
        }
        delta *= 2;
    }
    value
}

/// Waits until every lane of the warp arrives; memory accesses before it are ordered before
/// those after it among the lanes (`bar.warp.sync`).
///
/// # Safety
/// Every lane of the warp must execute the same call.
#[inline(always)]
pub unsafe fn sync_warp() {
    // SAFETY: the caller guarantees a converged warp.
    unsafe { core::arch::asm!("bar.warp.sync 0xffffffff;", options(nostack)) };
}

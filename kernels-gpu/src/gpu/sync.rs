//! Atomics and memory ordering at GPU scope, for CTAs that hand results to each other within
//! one launch.

use core::arch::asm;

/// `atomicAdd` at GPU scope with the ordering `$sem`, returning the old value.
macro_rules! atomic_add {
    ($(#[$doc:meta])* $name:ident = $sem:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// `addr` is a 4-byte-aligned global address of a u32 that other threads access only
        /// atomically during the kernel.
        #[inline(always)]
        pub unsafe fn $name(addr: u64, value: u32) -> u32 {
            let old: u32;
            // SAFETY: forwarded from the caller.
            unsafe {
                asm!(
                    concat!("atom.", $sem, ".gpu.global.add.u32 {old}, [{addr}], {value};"),
                    old = out(reg32) old,
                    addr = in(reg64) addr,
                    value = in(reg32) value,
                    options(nostack),
                );
            }
            old
        }
    };
}

atomic_add! {
    /// `atomicAdd(addr, value)` without ordering; returns the old value.
    atomic_add_relaxed = "relaxed"
}

atomic_add! {
    /// `atomicAdd(addr, value)` with acquire and release semantics; returns the old value.
    /// The release makes every write this thread has observed (through a preceding CTA
    /// barrier, its CTA's writes too) visible to the thread whose add comes later; the acquire
    /// makes the writes before every earlier add visible to this thread (and, through a
    /// following CTA barrier, to its CTA): the last of a set of CTAs to count in sees all
    /// their results.
    atomic_add_acq_rel = "acq_rel"
}

/// Adds `value` with release semantics at GPU scope: every write this thread has observed
/// (including, through a preceding CTA barrier, its CTA's writes) is visible to a thread
/// that acquires the new value.
///
/// # Safety
/// As [`atomic_add_relaxed`].
#[inline(always)]
pub unsafe fn red_add_release(addr: u64, value: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "red.release.gpu.global.add.u32 [{addr}], {value};",
            addr = in(reg64) addr,
            value = in(reg32) value,
            options(nostack),
        );
    }
}

/// Loads with acquire semantics at GPU scope (pairs with [`red_add_release`]).
///
/// # Safety
/// As [`atomic_add_relaxed`].
#[inline(always)]
pub unsafe fn load_acquire(addr: u64) -> u32 {
    let value: u32;
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "ld.acquire.gpu.global.u32 {value}, [{addr}];",
            value = out(reg32) value,
            addr = in(reg64) addr,
            options(nostack),
        );
    }
    value
}

/// Sleeps about `ns` nanoseconds (a polite spin-wait).
#[inline(always)]
pub fn nanosleep(ns: u32) {
    // SAFETY: only delays the calling thread.
    unsafe {
        asm!("nanosleep.u32 {ns};", ns = in(reg32) ns, options(nomem, nostack));
    }
}

/// `__threadfence()`: orders this thread's earlier writes before its later ones for every
/// thread of the GPU.
#[inline(always)]
pub fn fence_gpu() {
    // SAFETY: a fence has no operands and no effect besides ordering.
    unsafe {
        asm!("fence.acq_rel.gpu;", options(nostack));
    }
}

/// Adds `value` to a u32 in shared memory (integer: the result does not depend on order).
///
/// # Safety
/// `addr` is a 4-byte-aligned shared address.
#[inline(always)]
pub unsafe fn shared_add(addr: u32, value: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("red.shared.add.u32 [{addr}], {value};", addr = in(reg32) addr, value = in(reg32) value, options(nostack));
    }
}

/// Adds `value` to a u32 in shared memory and returns the old value.
///
/// # Safety
/// As [`shared_add`].
#[inline(always)]
pub unsafe fn shared_fetch_add(addr: u32, value: u32) -> u32 {
    let old: u32;
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("atom.shared.add.u32 {old}, [{addr}], {value};", old = out(reg32) old, addr = in(reg32) addr, value = in(reg32) value, options(nostack));
    }
    old
}

/// Lowers a u32 in shared memory to `value` if smaller.
///
/// # Safety
/// As [`shared_add`].
#[inline(always)]
pub unsafe fn shared_min(addr: u32, value: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("red.shared.min.u32 [{addr}], {value};", addr = in(reg32) addr, value = in(reg32) value, options(nostack));
    }
}

/// Adds `value` to a u32 in global memory, without ordering.
///
/// # Safety
/// `addr` is a 4-byte-aligned global address accessed only atomically during the kernel.
#[inline(always)]
pub unsafe fn global_add(addr: u64, value: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("red.relaxed.gpu.global.add.u32 [{addr}], {value};", addr = in(reg64) addr, value = in(reg32) value, options(nostack));
    }
}

/// Programmatic dependent launch, the waiting side (Hopper module; nothing in the portable
/// one): returns once the grid this one was launched after (with programmatic stream
/// serialization, `Gpu::launch_chained`) has completed and its writes are visible. A grid
/// launched otherwise passes at once. Call it before the first read of anything an earlier
/// launch wrote.
#[inline(always)]
pub fn wait_for_prior_grid() {
    #[cfg(kvc_hopper)]
    // SAFETY: no operands; it is not `nomem`, so no memory access moves above it.
    unsafe {
        asm!("griddepcontrol.wait;", options(nostack));
    }
}

/// Programmatic dependent launch, the allowing side (Hopper module; nothing in the portable
/// one): once every CTA of this grid has called it or exited, the grid launched after it
/// with programmatic stream serialization may start its CTAs (which wait in
/// [`wait_for_prior_grid`] until this grid completes).
#[inline(always)]
pub fn allow_dependent_grid() {
    #[cfg(kvc_hopper)]
    // SAFETY: no operands, no memory effect.
    unsafe {
        asm!("griddepcontrol.launch_dependents;", options(nostack, nomem));
    }
}

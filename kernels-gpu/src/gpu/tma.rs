//! The Tensor Memory Accelerator (sm_90: the Hopper module only, `cfg(kvc_hopper)`): tile
//! copies through a tensor map, 1-D bulk copies, and the shared-memory `mbarrier`s they
//! complete on. A copy's bytes count against its barrier's transaction count; a waiter that
//! sees the phase complete also sees the bytes (docs/PERF.md, "Plan for v5", checked on an H100
//! by `scripts/tma-smoke`). Also the warp-specialized kernels' register rebalancing between
//! warpgroups (`setmaxnreg`).

use core::arch::asm;

/// Initialises the `mbarrier` at shared address `bar` for `count` arrivals a phase, and makes
/// the initialisation visible to the asynchronous proxy that completes copies on it.
///
/// # Safety
/// `bar` is an 8-byte-aligned shared address no copy or waiter uses yet; a barrier orders the
/// initialisation before any other thread's use.
#[inline(always)]
pub unsafe fn init_barrier(bar: u32, count: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "mbarrier.init.shared.b64 [{bar}], {count};",
            "fence.mbarrier_init.release.cluster;",
            bar = in(reg32) bar,
            count = in(reg32) count,
            options(nostack),
        );
    }
}

/// Acquires the tensor map at global address `map` for this CTA's later copies through it:
/// the map was written by a host copy, outside the tensor-map proxy (once per CTA, then a
/// barrier before other threads use it).
///
/// # Safety
/// `map` is a 64-byte-aligned global address of a 128-byte tensor map no thread writes.
#[inline(always)]
pub unsafe fn acquire_tensor_map(map: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "fence.proxy.tensormap::generic.acquire.sys [{map}], 128;",
            map = in(reg64) map,
            options(nostack),
        );
    }
}

/// Arrives on the barrier at `bar`, first raising the bytes its current phase waits for by
/// `bytes`.
///
/// # Safety
/// `bar` is an initialised barrier; the copies that bring `bytes` complete on this phase.
#[inline(always)]
pub unsafe fn arrive_expect_bytes(bar: u32, bytes: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "{{\n.reg .b64 state;\n",
            "mbarrier.arrive.expect_tx.shared.b64 state, [{bar}], {bytes};\n}}",
            bar = in(reg32) bar,
            bytes = in(reg32) bytes,
            options(nostack),
        );
    }
}

/// Arrives on the barrier at `bar` (one of its phase's expected arrivals).
///
/// # Safety
/// `bar` is an initialised barrier expecting this arrival.
#[inline(always)]
pub unsafe fn arrive(bar: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "{{\n.reg .b64 state;\n",
            "mbarrier.arrive.shared.b64 state, [{bar}];\n}}",
            bar = in(reg32) bar,
            options(nostack),
        );
    }
}

/// Waits until the phase of parity `parity` of the barrier at `bar` has completed; the bytes
/// copied on it are then visible to this thread.
///
/// # Safety
/// `bar` is an initialised barrier whose phase of that parity completes.
#[inline(always)]
pub unsafe fn wait_barrier(bar: u32, parity: u32) {
    loop {
        let done: u32;
        // SAFETY: forwarded from the caller.
        unsafe {
            asm!(
                "{{\n.reg .pred p;\n",
                "mbarrier.try_wait.parity.shared.b64 p, [{bar}], {parity};\n",
                "selp.u32 {done}, 1, 0, p;\n}}",
                bar = in(reg32) bar,
                parity = in(reg32) parity,
                done = out(reg32) done,
                options(nostack),
            );
        }
        if done != 0 {
            return;
        }
    }
}

/// Starts the copy of the box at element coordinates `(x, y)` of the 2-D tensor map at global
/// `map` into shared memory at `dst`, completing on the barrier at `bar`.
///
/// # Safety
/// `map` was acquired ([`acquire_tensor_map`]) and its box lies inside the tensor; `dst` is
/// aligned as the map's swizzle needs (1024 bytes for 128-byte swizzle) and holds the box;
/// the barrier's phase expects the box's bytes.
#[inline(always)]
pub unsafe fn copy_tile(dst: u32, map: u64, (x, y): (u32, u32), bar: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [{dst}], [{map}, {{{x}, {y}}}], [{bar}];",
            dst = in(reg32) dst,
            map = in(reg64) map,
            x = in(reg32) x,
            y = in(reg32) y,
            bar = in(reg32) bar,
            options(nostack),
        );
    }
}

/// Starts the copy of `bytes` bytes (a multiple of 16) from global `src` (16-byte aligned) into
/// shared memory at `dst` (16-byte aligned), completing on the barrier at `bar`.
///
/// # Safety
/// Both ranges are valid and no thread writes them meanwhile; the barrier's phase expects the
/// bytes.
#[inline(always)]
pub unsafe fn copy_bulk(dst: u32, src: u64, bytes: u32, bar: u32) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [{dst}], [{src}], {bytes}, [{bar}];",
            dst = in(reg32) dst,
            src = in(reg64) src,
            bytes = in(reg32) bytes,
            bar = in(reg32) bar,
            options(nostack),
        );
    }
}

/// Defines a `setmaxnreg` of this warpgroup's registers a thread to `$count`.
macro_rules! set_registers {
    ($(#[$doc:meta])* $name:ident = $op:literal $count:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// All four warps of a warpgroup call it together; the kernel's launch bounds leave
        /// the registers (build.rs gives the warp-specialized entries `.maxntid`).
        #[inline(always)]
        pub unsafe fn $name() {
            // SAFETY: forwarded from the caller.
            unsafe {
                asm!(
                    concat!("setmaxnreg.", $op, ".sync.aligned.u32 ", $count, ";"),
                    options(nostack),
                )
            };
        }
    };
}

set_registers! {
    /// The producer warpgroup gives up its registers down to 24 a thread.
    registers_to_producer = "dec" "24"
}

set_registers! {
    /// A consumer warpgroup takes registers up to 240 a thread (2 x 240 + 24 warpgroup
    /// shares: the whole register file at 384 threads).
    registers_to_consumer = "inc" "240"
}

/// `bar.sync 1, 256`: the two consumer warpgroups (warps 0-7) of a warp-specialized CTA meet;
/// the producer takes no part.
///
/// # Safety
/// Exactly the 256 consumer threads call it, each the same number of times.
#[inline(always)]
pub unsafe fn sync_consumers() {
    // SAFETY: barrier 1 is the consumers' alone (caller).
    unsafe { named_sync::<1, 256>() };
}

/// `bar.sync ID, COUNT`: waits until `COUNT` threads (a multiple of 32) have arrived at named
/// barrier `ID`, this one included; what the arriving threads wrote to shared memory before is
/// then visible to this one.
///
/// # Safety
/// Barrier `ID` is used by exactly `COUNT` threads per phase, each syncing or arriving
/// ([`named_arrive`]) once; the CTA's other barriers have other ids.
#[inline(always)]
pub unsafe fn named_sync<const ID: u32, const COUNT: u32>() {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("bar.sync {id}, {count};", id = const ID, count = const COUNT, options(nostack))
    };
}

/// `bar.arrive ID, COUNT`: arrives at named barrier `ID` without waiting ([`named_sync`]).
///
/// # Safety
/// As [`named_sync`].
#[inline(always)]
pub unsafe fn named_arrive<const ID: u32, const COUNT: u32>() {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("bar.arrive {id}, {count};", id = const ID, count = const COUNT, options(nostack))
    };
}

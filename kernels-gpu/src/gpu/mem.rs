//! Global memory access through `u64` device addresses (the form every `*Params` carries).

use core::arch::asm;

/// A 16-byte chunk as four 32-bit words.
pub type Chunk = [u32; 4];

/// Defines `unsafe fn $name(addr) -> Chunk`: one PTX instruction `$op` that loads four 32-bit
/// registers from `[addr]` (`$class` is the address's register class). The caller's safety
/// contract is the function's own documentation.
macro_rules! load_words {
    ($(#[$doc:meta])* $name:ident($addr:ty, $class:ident) = $op:literal, $($option:ident),*) => {
        $(#[$doc])*
        #[inline(always)]
        pub unsafe fn $name(addr: $addr) -> Chunk {
            let (a, b, c, d): (u32, u32, u32, u32);
            // SAFETY: forwarded from the caller.
            unsafe {
                core::arch::asm!(
                    concat!($op, " {{{a}, {b}, {c}, {d}}}, [{addr}];"),
                    a = out(reg32) a,
                    b = out(reg32) b,
                    c = out(reg32) c,
                    d = out(reg32) d,
                    addr = in($class) addr,
                    options($($option),*),
                );
            }
            [a, b, c, d]
        }
    };
}
pub(crate) use load_words;

load_words! {
    /// Loads 16 bytes of read-only data through the non-coherent cache.
    ///
    /// # Safety
    /// `addr` is a 16-byte-aligned global address of 16 readable bytes that no thread writes
    /// during the kernel.
    load_chunk_nc(u64, reg64) = "ld.global.nc.v4.u32", pure, readonly, nostack
}

load_words! {
    /// Loads 16 bytes.
    ///
    /// # Safety
    /// `addr` is a 16-byte-aligned global address of 16 readable bytes.
    load_chunk(u64, reg64) = "ld.global.v4.u32", readonly, nostack
}

/// Stores 16 bytes.
///
/// # Safety
/// `addr` is a 16-byte-aligned global address of 16 writable bytes no other thread accesses.
#[inline(always)]
pub unsafe fn store_chunk(addr: u64, value: Chunk) {
    // SAFETY: the caller guarantees the address is valid, aligned and ours alone.
    unsafe {
        asm!(
            "st.global.v4.u32 [{addr}], {{{a}, {b}, {c}, {d}}};",
            addr = in(reg64) addr,
            a = in(reg32) value[0],
            b = in(reg32) value[1],
            c = in(reg32) value[2],
            d = in(reg32) value[3],
            options(nostack),
        );
    }
}

/// An L2 policy (`createpolicy`) that keeps the lines stored with it (`evict_last`) over
/// lines read or written normally: for scratch a kernel writes and soon reads back while it
/// streams much more data through L2.
#[inline(always)]
pub fn l2_keep_policy() -> u64 {
    let policy: u64;
    // SAFETY: createpolicy only builds a value in a register.
    unsafe {
        asm!(
            "createpolicy.fractional.L2::evict_last.b64 {policy}, 1.0;",
            policy = out(reg64) policy,
            options(pure, nomem, nostack),
        );
    }
    policy
}

/// Stores a 32-bit word at `addr` under L2 policy `policy` ([`l2_keep_policy`]).
///
/// # Safety
/// `addr` is a valid, 4-byte-aligned global address that no other thread accesses.
#[inline(always)]
pub unsafe fn store_word_kept(addr: u64, value: u32, policy: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "st.global.L2::cache_hint.b32 [{addr}], {value}, {policy};",
            addr = in(reg64) addr,
            value = in(reg32) value,
            policy = in(reg64) policy,
            options(nostack),
        );
    }
}

/// Drops the 128-byte L2 line at `addr` without writing it back to DRAM: its bytes become
/// undefined. For scratch that has been read for the last time.
///
/// # Safety
/// `addr` is a 128-byte-aligned global address of 128 bytes that no thread reads again before
/// writing them, and that no other thread accesses meanwhile.
#[inline(always)]
pub unsafe fn discard_l2_line(addr: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "discard.global.L2 [{addr}], 128;",
            addr = in(reg64) addr,
            options(nostack),
        );
    }
}

/// Loads element `index` of an array of `T` at `base`.
///
/// # Safety
/// `base + index * size_of::<T>()` is a valid, aligned global address of a `T`.
#[inline(always)]
pub unsafe fn load<T: Copy>(base: u64, index: u64) -> T {
    // SAFETY: forwarded from the caller.
    unsafe { (base as *const T).add(index as usize).read() }
}

/// Loads element `index` of an array of 4-byte `T` at `base` through the non-coherent cache.
///
/// # Safety
/// As [`load`], and no thread writes the element during the kernel.
#[inline(always)]
pub unsafe fn load_nc<T: Copy>(base: u64, index: u64) -> T {
    const { assert!(core::mem::size_of::<T>() == 4) };
    let bits: u32;
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!(
            "ld.global.nc.u32 {bits}, [{addr}];",
            bits = out(reg32) bits,
            addr = in(reg64) base + index * 4,
            options(pure, readonly, nostack),
        );
        core::mem::transmute_copy(&bits)
    }
}

/// Stores element `index` of an array of `T` at `base`.
///
/// # Safety
/// `base + index * size_of::<T>()` is a valid, aligned global address of a `T` that no other
/// thread accesses.
#[inline(always)]
pub unsafe fn store<T: Copy>(base: u64, index: u64, value: T) {
    // SAFETY: forwarded from the caller.
    unsafe { (base as *mut T).add(index as usize).write(value) }
}

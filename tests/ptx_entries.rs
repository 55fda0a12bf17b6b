//! The PTX the host embeds (no GPU needed): its entry points are exactly the host's table, it
//! calls nothing unresolved, no kernel uses local memory, and the committed fallback copy
//! equals a fresh build.

use std::collections::BTreeSet;
use std::io::Write;

use kvcompress::gpu::{entry_points, PTX, PTX_SOURCE};

/// The committed copy `build.rs` falls back to without the pinned nightly.
const COMMITTED: &str = include_str!("../kernels-gpu/ptx/kvc.ptx");

fn entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| l.strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim().to_string())
        .collect()
}

#[test]
fn ptx_entries_equal_the_host_table() {
    let in_ptx = entries(PTX);
    let in_host: BTreeSet<String> = entry_points().into_iter().collect();
    let missing: Vec<_> = in_host.difference(&in_ptx).collect();
    let extra: Vec<_> = in_ptx.difference(&in_host).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing in PTX: {missing:?}; not in the host table: {extra:?}"
    );
}

#[test]
fn ptx_has_no_unresolved_calls() {
    assert!(
        !PTX.contains(".extern .func"),
        "the PTX calls an unresolved function; the module will not load"
    );
}

#[test]
fn no_kernel_can_panic() {
    // A reachable panic (a division by a runtime zero, an unchecked index) compiles to a
    // `core::panicking` function that traps; kernels guard every such case instead.
    assert!(
        !PTX.contains("panicking"),
        "a kernel has a panic path (search the PTX for `panicking`)"
    );
}

#[test]
fn no_kernel_uses_local_memory() {
    // Per-lane arrays must be fully unrolled into registers (build.rs raises LLVM's unroll
    // threshold for that); a `.local` depot means spills or a runtime-indexed array.
    assert!(!PTX.contains(".local"), "a kernel uses local memory");
}

#[test]
fn committed_ptx_equals_a_fresh_build() {
    if PTX_SOURCE != "fresh" {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED committed_ptx_equals_a_fresh_build: the pinned nightly is missing, so build.rs \
             used the committed PTX and there is no fresh build to compare"
        );
        return;
    }
    assert!(
        PTX == COMMITTED,
        "kernels-gpu/ptx/kvc.ptx is stale: copy the fresh build over it (scripts/update-ptx)"
    );
}

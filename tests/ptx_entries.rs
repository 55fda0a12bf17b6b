//! The PTX modules the host embeds (no GPU needed): each one's entry points are exactly the
//! host's table, it calls nothing unresolved, no kernel uses local memory or can panic, and
//! the committed fallback copies equal a fresh build. The portable module has no Hopper-only
//! instruction; the Hopper one has the waits of the chained launches, and its aggregation pass
//! 2 multiplies in the order the plan sizes its shared memory for.

use std::collections::BTreeSet;
use std::io::Write;

use kvcompress::abi::plan::agg_keys_major;
use kvcompress::abi::DType;
use kvcompress::gpu::{entry_points, PTX, PTX_SM90A, PTX_SOURCE};

/// The committed copies `build.rs` falls back to without the pinned nightly.
const COMMITTED: &str = include_str!("../kernels-gpu/ptx/kvc.ptx");
const COMMITTED_SM90A: &str = include_str!("../kernels-gpu/ptx/kvc_sm90a.ptx");

/// Each module: its name, its text, its committed copy, and whether it is the Hopper one.
const MODULES: [(&str, &str, &str, bool); 2] = [
    ("kvc.ptx", PTX, COMMITTED, false),
    ("kvc_sm90a.ptx", PTX_SM90A, COMMITTED_SM90A, true),
];

fn entries(ptx: &str) -> BTreeSet<String> {
    ptx.lines()
        .filter_map(|l| l.strip_prefix(".visible .entry "))
        .map(|l| l.split('(').next().unwrap_or(l).trim().to_string())
        .collect()
}

#[test]
fn ptx_entries_equal_the_host_table() {
    for (name, ptx, _, hopper) in MODULES {
        let in_host: BTreeSet<String> = entry_points(hopper).into_iter().collect();
        let in_ptx = entries(ptx);
        let missing: Vec<_> = in_host.difference(&in_ptx).collect();
        let extra: Vec<_> = in_ptx.difference(&in_host).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{name}: missing in PTX: {missing:?}; not in the host table: {extra:?}"
        );
    }
}

/// Text no module may contain, and what it would mean.
const FORBIDDEN: [(&str, &str); 3] = [
    (
        ".extern .func",
        "calls an unresolved function; the module will not load",
    ),
    // A reachable panic (a division by a runtime zero, an unchecked index) compiles to a
    // `core::panicking` function that traps; kernels guard every such case instead.
    (
        "panicking",
        "has a panic path (search the PTX for `panicking`)",
    ),
    // Per-lane arrays must be fully unrolled into registers (build.rs raises LLVM's unroll
    // threshold for that); a `.local` depot means spills or a runtime-indexed array.
    (".local", "uses local memory"),
];

#[test]
fn no_kernel_calls_unresolved_functions_panics_or_uses_local_memory() {
    for (name, ptx, _, _) in MODULES {
        for (text, meaning) in FORBIDDEN {
            assert!(!ptx.contains(text), "{name} {meaning}");
        }
    }
}

#[test]
fn each_module_has_its_targets_instructions() {
    assert!(PTX.contains(".target sm_80"), "kvc.ptx targets sm_80");
    assert!(
        PTX_SM90A.contains(".target sm_90a"),
        "kvc_sm90a.ptx targets sm_90a"
    );
    assert!(
        !PTX.contains("griddepcontrol"),
        "kvc.ptx must load on Ampere: no Hopper-only instruction"
    );
    assert!(
        PTX_SM90A.contains("griddepcontrol.wait"),
        "kvc_sm90a.ptx: the chained compression kernels wait for the kernel before them"
    );
    assert!(
        PTX_SM90A.contains("wgmma.mma_async") && !PTX.contains("wgmma"),
        "the aggregation multiplies with wgmma in kvc_sm90a.ptx alone"
    );
}

/// The text of entry `name` in `ptx`: from its `.entry` line to the next one.
fn entry_text<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".visible .entry {name}("))
        .unwrap_or_else(|| panic!("no entry {name}"));
    let rest = &ptx[start + 1..];
    &ptx[start..start + 1 + rest.find(".visible .entry ").unwrap_or(rest.len())]
}

/// The host sizes pass 2's shared memory by `agg_keys_major` (its parts map is 1 KiB
/// keys-major, 8 KiB or more rows-major): the Hopper module's pass-2 kernels must take the
/// order the plan assumes, which their `wgmma` shapes show (`m64n64k16` keys by rows,
/// `m64n32k16` rows by keys).
#[test]
fn hopper_pass_two_multiplies_in_the_order_the_plan_sizes() {
    for dtype in [DType::F16, DType::Bf16] {
        for head_dim in [64, 128, 256] {
            let name = format!("window_scores_{}_d{head_dim}", dtype.name());
            let text = entry_text(PTX_SM90A, &name);
            let keys_major = agg_keys_major(head_dim, dtype.elem_bytes(), true);
            assert_eq!(
                (text.contains("m64n64k16"), text.contains("m64n32k16")),
                (keys_major, !keys_major),
                "{name}: agg_keys_major is {keys_major}"
            );
        }
    }
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
    for (name, ptx, committed, _) in MODULES {
        assert!(
            ptx == committed,
            "kernels-gpu/ptx/{name} is stale: copy the fresh build over it (scripts/update-ptx)"
        );
    }
}

//! Builds `kernels-gpu/` to PTX with the pinned nightly (TOOLCHAIN.md), twice: the portable
//! module for `sm_80` (runs on Ampere and later) and the Hopper module for `sm_90a` (the same
//! sources with `cfg(kvc_hopper)`, which turns on Hopper-only instructions), and hands them to
//! the host crate through `OUT_DIR`. Without that nightly the committed copies in
//! `kernels-gpu/ptx/` are used instead, with a warning; `tests/ptx_entries.rs` fails when a
//! committed copy differs from a fresh build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvc_abi::plan::WS_THREADS;

/// The nightly that compiles the device crate (also in `kernels-gpu/rust-toolchain.toml`).
const NIGHTLY: &str = "nightly-2026-05-20";

/// Variables of the outer cargo that would leak into the inner one and break it.
const OUTER_VARS: [&str; 9] = [
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
    "CARGO_MAKEFLAGS",
];

/// One PTX module: its file name (in `OUT_DIR` and `kernels-gpu/ptx/`), its codegen flags and
/// the launch bounds its entries get in the PTX (rustc emits none).
struct Module {
    file: &'static str,
    flags: &'static [&'static str],
    max_threads: &'static [(&'static str, u32)],
}

const MODULES: [Module; 2] = [
    Module {
        file: "kvc.ptx",
        flags: &[
            "-C",
            "target-cpu=sm_80",
            // PTX ISA 7.4 (still sm_80 code): L2 cache policies and `discard.global.L2`
            // (the decode's score stash, `gpu/mem.rs`).
            "-C",
            "target-feature=+ptx74",
        ],
        max_threads: &[],
    },
    Module {
        file: "kvc_sm90a.ptx",
        flags: &[
            "-C",
            "target-cpu=sm_90a",
            // PTX ISA 8.3 (the target's default is 8.0): the warp-specialized pass 1 acquires
            // its tensor map, written by a host copy, with `fence.proxy.tensormap`
            // (`gpu/tma.rs`).
            "-C",
            "target-feature=+ptx83",
            "--cfg",
            "kvc_hopper",
        ],
        // The warp-specialized passes (`aggregate_ws.rs`): ptxas must know their 384 threads
        // to budget the registers that `setmaxnreg` moves between their warpgroups.
        max_threads: &[
            ("window_stats_f16_d128", WS_THREADS),
            ("window_stats_bf16_d128", WS_THREADS),
            ("window_scores_ws_f16_d128", WS_THREADS),
            ("window_scores_ws_bf16_d128", WS_THREADS),
        ],
    },
];

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in [
        "kernels-gpu/src",
        "kernels-gpu/abi/src",
        "kernels-gpu/Cargo.toml",
        "kernels-gpu/abi/Cargo.toml",
        "kernels-gpu/ptx",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let mut source = "fresh";
    for module in &MODULES {
        let ptx = match build_ptx(&root, &out_dir, module) {
            Ok(ptx) => ptx,
            Err(why) => {
                let committed = format!("kernels-gpu/ptx/{}", module.file);
                println!("cargo:warning=using the committed {committed}: {why}");
                source = "committed";
                fs::read_to_string(root.join(&committed))
                    .unwrap_or_else(|e| panic!("the committed PTX {committed} is missing: {e}"))
            }
        };
        fs::write(out_dir.join(module.file), ptx).expect("OUT_DIR is writable");
    }
    println!("cargo:rustc-env=KVC_PTX_SOURCE={source}");
}

/// Runs the inner cargo of TOOLCHAIN.md for `module` and returns the PTX text.
fn build_ptx(root: &Path, out_dir: &Path, module: &Module) -> Result<String, String> {
    // A target directory per module, so that neither build invalidates the other's.
    let target_dir = out_dir.join("kernels-target").join(module.file);
    let mut cmd = Command::new("cargo");
    for var in OUTER_VARS {
        cmd.env_remove(var);
    }
    for (var, _) in env::vars() {
        if var.starts_with("CARGO_PROFILE_") || var.starts_with("CARGO_CFG_") {
            cmd.env_remove(var);
        }
    }
    cmd.env("RUSTUP_AUTO_INSTALL", "0");
    cmd.arg(format!("+{NIGHTLY}"))
        .args([
            "rustc",
            "--release",
            "--target",
            "nvptx64-nvidia-cuda",
            "-Zbuild-std=core",
            "--manifest-path",
        ])
        .arg(root.join("kernels-gpu/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--")
        .args(module.flags)
        .args([
            "--emit=asm",
            "-C",
            "linker=true",
            // Fully unroll the per-lane loops over rows, heads and columns, so that the
            // per-lane arrays stay in registers (no `.local` memory).
            "-C",
            "llvm-args=-unroll-threshold=3000",
        ]);
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run cargo +{NIGHTLY}: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        return Err(format!(
            "cargo +{NIGHTLY} failed (install: rustup toolchain install {NIGHTLY} --profile minimal --component rust-src): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let ptx_path = target_dir.join("nvptx64-nvidia-cuda/release/deps/kvc_kernels.s");
    let ptx = fs::read_to_string(&ptx_path)
        .map_err(|e| format!("no PTX at {}: {e}", ptx_path.display()))?;
    module
        .max_threads
        .iter()
        .try_fold(ptx, |ptx, &(entry, threads)| {
            bound_threads(ptx, entry, threads)
        })
}

/// Gives `entry` the launch bounds `.maxntid threads, 1, 1` and `.minnctapersm 1` (without
/// the latter ptxas ignores `setmaxnreg`: C7508), between its parameter list and its body.
fn bound_threads(ptx: String, entry: &str, threads: u32) -> Result<String, String> {
    let head = format!(".entry {entry}(");
    let start = ptx
        .find(&head)
        .ok_or_else(|| format!("no entry {entry} in the PTX"))?;
    let body = start
        + ptx[start..]
            .find("\n{")
            .ok_or_else(|| format!("no body after entry {entry}"))?;
    Ok(format!(
        "{}\n.maxntid {threads}, 1, 1\n.minnctapersm 1{}",
        &ptx[..body],
        &ptx[body..]
    ))
}

//! Builds `kernels-gpu/` to PTX with the pinned nightly (TOOLCHAIN.md) and hands it to the
//! host crate through `OUT_DIR/kvc.ptx`. Without that nightly the committed copy
//! `kernels-gpu/ptx/kvc.ptx` is used instead, with a warning; `tests/ptx_entries.rs` fails when
//! the committed copy differs from a fresh build.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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

fn main() {
    let root =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for path in [
        "kernels-gpu/src",
        "kernels-gpu/abi/src",
        "kernels-gpu/Cargo.toml",
        "kernels-gpu/abi/Cargo.toml",
        "kernels-gpu/ptx/kvc.ptx",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    let committed = root.join("kernels-gpu/ptx/kvc.ptx");
    let (ptx, source) = match build_ptx(&root, &out_dir) {
        Ok(ptx) => (ptx, "fresh"),
        Err(why) => {
            println!("cargo:warning=using the committed kernels-gpu/ptx/kvc.ptx: {why}");
            let ptx = fs::read_to_string(&committed)
                .expect("the committed PTX kernels-gpu/ptx/kvc.ptx is missing");
            (ptx, "committed")
        }
    };
    fs::write(out_dir.join("kvc.ptx"), ptx).expect("OUT_DIR is writable");
    println!("cargo:rustc-env=KVC_PTX_SOURCE={source}");
}

/// Runs the inner cargo of TOOLCHAIN.md and returns the PTX text.
fn build_ptx(root: &Path, out_dir: &Path) -> Result<String, String> {
    let target_dir = out_dir.join("kernels-target");
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
        .args([
            "--",
            "-C",
            "target-cpu=sm_80",
            // PTX ISA 7.4 (still sm_80 code): L2 cache policies and `discard.global.L2`
            // (the decode's score stash, `gpu/mem.rs`).
            "-C",
            "target-feature=+ptx74",
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
    fs::read_to_string(&ptx_path).map_err(|e| format!("no PTX at {}: {e}", ptx_path.display()))
}

# Runs the sm_90a smoke kernels through the driver API and compares them with PyTorch's A @ B:
# smoke.cubin (one wgmma.mma_async m64n64k16 from no-swizzle 8x8 core matrices) and
# swizzled.cubin (four k16 steps over A 64x64 and B 64x64 in the 128-byte swizzled layout),
# each for a few descriptor choices; the right one prints an error near 1e-6.
import ctypes
import sys

import torch

torch.zeros(1, device="cuda")
cuda = ctypes.CDLL("libcuda.so.1")


def ok(rc, what):
    if rc != 0:
        sys.exit(f"{what}: CUresult {rc}")


def kernel(path, name):
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    ok(cuda.cuModuleLoadData(ctypes.byref(mod), open(path, "rb").read()), "cuModuleLoadData")
    ok(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, name), "cuModuleGetFunction")
    return fn


def run(fn, pa, pb, desc_words):
    d = torch.full((128, 32), float("nan"), dtype=torch.float32, device="cuda")
    desc = torch.tensor(desc_words, dtype=torch.int64, device="cuda")
    args = [ctypes.c_uint64(x.data_ptr()) for x in (pa, pb, d, desc)]
    params = (ctypes.c_void_p * 4)(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    ok(cuda.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, None, params, None), "cuLaunchKernel")
    torch.cuda.synchronize()
    # Thread 32 w + lane holds, for j in 0..8, rows 16 w + lane / 4 (+ 8) and columns
    # 8 j + 2 (lane % 4) (+ 1) in registers 4 j .. 4 j + 3.
    out = torch.full((64, 64), float("nan"))
    for t in range(128):
        w, lane = divmod(t, 32)
        for j in range(8):
            for k in range(4):
                out[16 * w + lane // 4 + 8 * (k // 2), 8 * j + 2 * (lane % 4) + k % 2] = d[t, 4 * j + k].item()
    return out


def template(lbo, sbo, mode):
    word = ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (mode << 62)
    return word - (1 << 64) if word >= 1 << 63 else word  # as the int64 torch holds


torch.manual_seed(0)
A = torch.randn(64, 16, dtype=torch.float16, device="cuda")
B = torch.randn(16, 64, dtype=torch.float16, device="cuda")
ref = (A.float() @ B.float()).cpu()


def core(m):  # [rows, 16] -> core matrices [rows / 8][2][8][8]
    return m.reshape(m.shape[0] // 8, 8, 2, 8).permute(0, 2, 1, 3).contiguous()


fn = kernel(sys.argv[1], b"wgmma_smoke")
for lbo, sbo in [(128, 256), (256, 128)]:
    t = template(lbo, sbo, 0)
    err = (run(fn, core(A), core(B.t().contiguous()), [t, t]) - ref).abs().max().item()
    print(f"no swizzle, LBO {lbo} SBO {sbo}: max |wgmma - torch| = {err:.3g} (ref max {ref.abs().max().item():.3g})")

A = torch.randn(64, 64, dtype=torch.float16, device="cuda")
B = torch.randn(64, 64, dtype=torch.float16, device="cuda")
ref = (A.float() @ B.float()).cpu()


def swizzled(m):  # [64, 64] K-major -> row r's chunk c at chunk c ^ (r % 8)
    chunks = m.reshape(64, 8, 8)
    out = torch.empty_like(chunks)
    for r in range(64):
        for c in range(8):
            out[r, c ^ (r % 8)] = chunks[r, c]
    return out.contiguous()


fn = kernel(sys.argv[2], b"wgmma_swizzled")
for lbo, sbo, mode in [(16, 1024, 1), (0, 1024, 1), (16, 1024, 2)]:
    t = template(lbo, sbo, mode)
    err = (run(fn, swizzled(A), swizzled(B.t().contiguous()), [t, t]) - ref).abs().max().item()
    print(f"128-byte swizzle, LBO {lbo} SBO {sbo} mode {mode}: max |wgmma - torch| = {err:.3g} (ref max {ref.abs().max().item():.3g})")

# Runs smoke.cubin (one wgmma.mma_async m64n64k16, f16 in, f32 out) through the driver API
# and compares it with torch's A @ B, for two (LBO, SBO) descriptor choices (the first is right: max error ~2e-6).
import ctypes, sys
import torch
torch.zeros(1, device="cuda")
cuda = ctypes.CDLL("libcuda.so.1")
def ok(rc, what):
    if rc != 0:
        sys.exit(f"{what}: CUresult {rc}")
mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
data = open(sys.argv[1], "rb").read()
ok(cuda.cuModuleLoadData(ctypes.byref(mod), data), "cuModuleLoadData")
ok(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"wgmma_smoke"), "cuModuleGetFunction")
torch.manual_seed(0)
A = torch.randn(64, 16, dtype=torch.float16, device="cuda")
B = torch.randn(16, 64, dtype=torch.float16, device="cuda")
ref = A.float() @ B.float()
def pack(m):  # [rows, 16] -> core matrices [rows/8][2][8][8]
    r = m.shape[0]
    return m.reshape(r // 8, 8, 2, 8).permute(0, 2, 1, 3).contiguous()
pa, pb = pack(A), pack(B.t().contiguous())
d = torch.empty(128, 32, dtype=torch.float32, device="cuda")
# Thread t = 32 w + lane holds, for j in 0..8: rows 16 w + lane / 4 (+ 8), cols 8 j + 2 (lane % 4) + (0, 1).
rows, cols = torch.empty(128, 32, dtype=torch.long), torch.empty(128, 32, dtype=torch.long)
for t in range(128):
    w, lane = divmod(t, 32)
    for j in range(8):
        for k in range(4):
            rows[t, 4 * j + k] = 16 * w + lane // 4 + 8 * (k // 2)
            cols[t, 4 * j + k] = 8 * j + 2 * (lane % 4) + k % 2
for lbo, sbo in [(128, 256), (256, 128)]:
    tmpl = ((lbo >> 4) << 16) | ((sbo >> 4) << 32)
    desc = torch.tensor([tmpl, tmpl], dtype=torch.int64, device="cuda")
    d.fill_(float("nan"))
    args = [ctypes.c_uint64(x.data_ptr()) for x in (pa, pb, d, desc)]
    params = (ctypes.c_void_p * 4)(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    ok(cuda.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, None, params, None), "cuLaunchKernel")
    torch.cuda.synchronize()
    out = torch.full((64, 64), float("nan"))
    out[rows.flatten(), cols.flatten()] = d.cpu().flatten()
    err = (out - ref.cpu()).abs().max().item()
    print(f"LBO {lbo} SBO {sbo}: max |wgmma - torch| = {err:.3g} (ref max {ref.abs().max().item():.3g})")

# Runs tma.cubin through the driver API: a paged f16 K pool [blocks, B, D] viewed as a 2-D
# tensor [slots, D] by a tensor map (cuTensorMapEncodeTiled, 128-byte swizzle, boxes of 64
# elements by `rows`), TMA tile loads of whole blocks (and of half blocks, as pass 2's halo
# needs) into a 16 KiB shared tile, compared byte for byte with the layout wgmma reads:
# panel p of the tile at p * 64 * 128 bytes, tile row r at r * 128, its 16-byte chunk c at
# chunk c ^ (r % 8). Prints one line per case; "equal" is the pass.
import ctypes
import sys

import torch

torch.zeros(1, device="cuda")
cuda = ctypes.CDLL("libcuda.so.1")


def ok(rc, what):
    if rc != 0:
        sys.exit(f"{what}: CUresult {rc}")


mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
ok(cuda.cuModuleLoadData(ctypes.byref(mod), open(sys.argv[1], "rb").read()), "cuModuleLoadData")
ok(cuda.cuModuleGetFunction(ctypes.byref(fn), mod, b"tma_rows"), "cuModuleGetFunction")

B, D = 16, 128
blocks = 64
torch.manual_seed(0)
pool = torch.randn(blocks, B, D, dtype=torch.float16, device="cuda")
pool_bytes = pool.view(torch.uint8).reshape(blocks * B, D * 2).cpu()


def tensor_map(rows):
    """The 128-byte CUtensorMap over the pool as [slots, D], boxes of 64 x rows, in device memory."""
    buf = ctypes.create_string_buffer(192)
    tmap = ctypes.c_void_p((ctypes.addressof(buf) + 63) & ~63)  # the driver wants 64-byte alignment
    dims = (ctypes.c_uint64 * 2)(D, blocks * B)
    strides = (ctypes.c_uint64 * 1)(D * 2)
    box = (ctypes.c_uint32 * 2)(64, rows)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    # FLOAT16 = 6, INTERLEAVE_NONE = 0, SWIZZLE_128B = 3, L2_PROMOTION_128B = 2, OOB_FILL_NONE = 0
    ok(cuda.cuTensorMapEncodeTiled(tmap, 6, 2, ctypes.c_void_p(pool.data_ptr()), dims, strides, box, elem, 0, 3, 2, 0), "cuTensorMapEncodeTiled")
    return torch.tensor(bytearray(ctypes.string_at(tmap.value, 128)), dtype=torch.uint8, device="cuda")


def run(rows, starts):
    """Tile rows 0..64 from pool slots starting at each of `starts` (rows apiece), both panels."""
    tmap = tensor_map(rows)
    jobs, expect = [], torch.zeros(16384, dtype=torch.uint8)
    for i, start in enumerate(starts):
        for p in range(2):
            jobs += [p * 8192 + i * rows * 128, 64 * p, start]
            for j in range(rows):
                r, slot = i * rows + j, start + j
                for c in range(8):
                    src = pool_bytes[slot, p * 128 + c * 16 : p * 128 + c * 16 + 16]
                    at = p * 8192 + r * 128 + (c ^ (r % 8)) * 16
                    expect[at : at + 16] = src
    jobs_d = torch.tensor(jobs, dtype=torch.int32, device="cuda")
    out = torch.full((16384,), 0xAB, dtype=torch.uint8, device="cuda")
    args = [ctypes.c_uint64(tmap.data_ptr()), ctypes.c_uint64(jobs_d.data_ptr()), ctypes.c_uint32(len(jobs) // 3), ctypes.c_uint32(len(starts) * 2 * rows * 128), ctypes.c_uint64(out.data_ptr())]
    params = (ctypes.c_void_p * 5)(*[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    ok(cuda.cuLaunchKernel(fn, 1, 1, 1, 128, 1, 1, 0, None, params, None), "cuLaunchKernel")
    ok(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    got = out.cpu()
    bad = (got != expect).nonzero()
    return "equal" if bad.numel() == 0 else f"{bad.numel()} bytes differ, first at {bad[0].item()}"


# Whole blocks (a 64-key tile of a head slot: 4 shuffled blocks of 16 rows), then half blocks
# from their middle (pass 2's ranges start 8 keys before their owned keys).
print("boxes of 16 rows, whole blocks:", run(16, [b * B for b in (37, 2, 60, 11)]))
print("boxes of 8 rows, half blocks:", run(8, [b * B + h for b, h in ((5, 8), (40, 0), (40, 8), (7, 8), (63, 0), (63, 8), (1, 8), (22, 0))]))

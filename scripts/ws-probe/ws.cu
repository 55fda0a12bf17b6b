// Probe for aggregation v6 (docs/PERF.md, "Plan for v6" and "v6 probe"): both passes of the
// window aggregation as warp-specialized kernels, outside the crate, to learn what the
// structure gives before porting it. A CTA is two consumer warpgroups (warps 0-7) and a
// producer (warp 8; with 128-key tiles its whole warpgroup, which gives its registers to the
// consumers by setmaxnreg) whose lanes issue TMA boxes of whole paged K blocks (16 rows x 64
// dims, 128-byte swizzle) into a ring of STAGES key tiles of TILE keys, completed on mbarriers
// (full: the tile's bytes landed; empty: the 8 consumer warps are done with it). Consumers
// never meet at a CTA barrier a tile.
// - stats_ws (pass 1): consumer c owns rows 64 c.. of the KV head's 128 window rows, multiplies
//   every tile (wgmma m64nTILEk16) and folds it into per-lane online (max, sum).
// - scores_ws (pass 2, TILE 128 only): keys-major; consumer c takes keys 64 c.. of each tile
//   (m64n128k16), sums a^2 per key and head into shared column sums, max-pools them at the end.
// - both_ws (TILE 128 only): both passes in one persistent launch, items in list order with heads
//   in turn, the last pass-1 item of a head merging its partials for the head's pass-2 items.
// Knobs (-D): TILE 64 or 128, STAGES, CPS (CTAs an SM: launch bounds), OVERLAP (pass 1: tile
// t + 1's product under tile t's fold), PINGPONG (tiles one at a time, the consumers taking
// turns at the tensor cores), POLY (one exponential in four on the FMA pipe), and the subtraction probes MMA=0 (no products), FOLD=0
// (no exponentials) and STREAM=0 (each stage loaded once, then reused: no K traffic). Both
// passes are checked against naive kernels in every run (not meaningful under the subtraction
// probes) and timed with events over back-to-back launches, against a device-to-device copy
// of K.
// Usage on the GPU machine: scripts/ws-probe/run.
#include <cuda.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <tuple>
#include <utility>
#include <vector>

#define CK(x)                                                                    \
  do {                                                                           \
    cudaError_t e_ = (x);                                                        \
    if (e_ != cudaSuccess) {                                                     \
      printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));          \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)
#define CU(x)                                                                    \
  do {                                                                           \
    CUresult r_ = (x);                                                           \
    if (r_ != CUDA_SUCCESS) {                                                    \
      printf("%s:%d CUresult %d\n", __FILE__, __LINE__, (int)r_);                \
      exit(1);                                                                   \
    }                                                                            \
  } while (0)

constexpr int D = 128, BLK = 16, ROWS = 128, G = 4;
#ifndef TILE
#define TILE 128
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef FOLD
#define FOLD 1
#endif
#ifndef MMA
#define MMA 1
#endif
#ifndef POLY
#define POLY 0
#endif
#ifndef PINGPONG
#define PINGPONG 0
#endif
#ifndef STREAM
#define STREAM 1
#endif
#ifndef CPS
#define CPS 1
#endif
#ifndef OVERLAP
#define OVERLAP 1
#endif
constexpr int TILE_BYTES = TILE * D * 2;
constexpr int PANEL_TILE = TILE * 128;
constexpr int Q_BYTES = ROWS * D * 2;
constexpr int PANEL_Q = ROWS * 128;
constexpr int NB = TILE / BLK;  // K blocks a tile
// Consumer warpgroups = warps 0-7, producer = warp 8. 128-key tiles need more registers than
// 384 / 288 threads get: the producer is then a whole warpgroup that gives its registers to the
// consumers (setmaxnreg 24 / 240).
constexpr bool REBALANCE = TILE == 128;
constexpr int THREADS = REBALANCE ? 384 : 288;
constexpr int RING_SMEM = 1024 + Q_BYTES + STAGES * TILE_BYTES + 16 * STAGES + 16;

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void bar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void bar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void bar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nW:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra W;\n}" ::"r"(bar),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void tma_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                       uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
__device__ __forceinline__ uint64_t desc(uint32_t addr) {
  return ((uint64_t)(addr >> 4) & 0x3fff) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) |
         (1ull << 62);
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// 2^x on the FMA and integer pipes instead of the SFU (x >= -126): x = i + f with i the
// nearest integer (the 1.5 * 2^23 shift), 2^f for |f| <= 0.5 by a degree-4 polynomial
// (relative error < 5e-5), and i added to the exponent bits.
__device__ __forceinline__ float ex2_fma(float x) {
  x = fmaxf(x, -126.f);
  float j = x + 12582912.f;
  float f = x - (j - 12582912.f);
  float p = fmaf(fmaf(fmaf(fmaf(0.00961813f, f, 0.0555041f), f, 0.240227f), f, 0.693147f), f, 1.f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(j) << 23));
}
// One in four exponentials of a fold on the FMA pipe under POLY (FlashAttention-4's balance).
__device__ __forceinline__ float ex2_mix(float x, int j) {
  return (POLY && j % 4 == 3) ? ex2_fma(x) : ex2(x);
}
__device__ __forceinline__ void consumers_sync() {
  asm volatile("bar.sync 1, 256;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void pin(float (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(a[i])::"memory");
}

#define R8(b) "+f"(a[b + 0]), "+f"(a[b + 1]), "+f"(a[b + 2]), "+f"(a[b + 3]), \
              "+f"(a[b + 4]), "+f"(a[b + 5]), "+f"(a[b + 6]), "+f"(a[b + 7])

// One k-step of m64nNk16, f16 in, f32 accumulate (N / 2 registers a thread); scale_d 0
// overwrites.
template <int N>
__device__ __forceinline__ void mma(float (&a)[N / 2], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (N == 128) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
        "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
        "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63},"
        " %64, %65, p, 1, 1, 0, 0;\n}"
        : R8(0), R8(8), R8(16), R8(24), R8(32), R8(40), R8(48), R8(56)
        : "l"(da), "l"(db), "r"(scale_d));
  } else {
    static_assert(N == 64);
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
        "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31},"
        " %32, %33, p, 1, 1, 0, 0;\n}"
        : R8(0), R8(8), R8(16), R8(24)
        : "l"(da), "l"(db), "r"(scale_d));
  }
}

// The whole product of 64 A rows (panels at a, panel stride pa) and N B rows (at b, stride
// pb) over D = 128: 2 panels x 4 k-steps, committed as one group.
template <int N>
__device__ __forceinline__ void issue(float (&acc)[N / 2], uint32_t a, int pa, uint32_t b, int pb) {
#if MMA
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
  for (int p = 0; p < 2; p++)
#pragma unroll
    for (int s = 0; s < 4; s++) mma<N>(acc, desc(a + p * pa) + 2 * s, desc(b + p * pb) + 2 * s, p | s);
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
#else
  pin(acc);
  (void)a;
  (void)b;
  (void)pa;
  (void)pb;
#endif
}
template <int N>
__device__ __forceinline__ void wait_all(float (&a)[N]) {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  pin(a);
}

// Named barrier 2 + c: consumer c's turn at the tensor cores (consumer c syncs, the other
// arrives).
__device__ __forceinline__ void my_turn(int ci) {
  if (ci == 0)
    asm volatile("bar.sync 2, 256;" ::: "memory");
  else
    asm volatile("bar.sync 3, 256;" ::: "memory");
}
__device__ __forceinline__ void your_turn(int ci) {
  if (ci == 0)
    asm volatile("bar.arrive 3, 256;" ::: "memory");
  else
    asm volatile("bar.arrive 2, 256;" ::: "memory");
}

// Shared memory: the head's query rows, the key ring and its mbarriers (full: a tile's bytes
// landed, one arrival with its byte count; empty: the 8 consumer warps are done with it).
struct Ring {
  uint32_t qs, ks, bars;
  __device__ uint32_t full(int s) const { return bars + 8 * s; }
  __device__ uint32_t empty(int s) const { return bars + 8 * (STAGES + s); }
  __device__ uint32_t qbar() const { return bars + 16 * STAGES; }
  __device__ uint32_t stage(int t) const { return ks + (t % STAGES) * TILE_BYTES; }
  __device__ void land(int t) const { bar_wait(full(t % STAGES), (t / STAGES) & 1); }
  __device__ void done(int t) const {
    if (threadIdx.x % 32 == 0) bar_arrive(empty(t % STAGES));
  }
};

__device__ Ring ring_setup(unsigned char* raw) {
  uint32_t base = (smem_u32(raw) + 1023) & ~1023u;
  Ring r{base, base + Q_BYTES, base + Q_BYTES + STAGES * TILE_BYTES};
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; s++) {
      bar_init(r.full(s), 1);
      bar_init(r.empty(s), 8);
    }
    bar_init(r.qbar(), 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  return r;
}

// Ring tile t into its stage: the warp waits for the stage to be free, lane 0 announces the
// bytes, lane b < NB issues block `id`'s two boxes.
__device__ __forceinline__ void load_tile(const Ring& r, const CUtensorMap* kmap, int t, int id) {
  int s = t % STAGES, lane = threadIdx.x % 32;
  if (t >= STAGES) bar_wait(r.empty(s), ((t / STAGES) - 1) & 1);
  if (lane == 0) bar_expect(r.full(s), TILE_BYTES);
  __syncwarp();
  if (lane < NB) {
    uint32_t dst = r.ks + s * TILE_BYTES + lane * BLK * 128;
    tma_2d(dst, kmap, 0, id * BLK, r.full(s));
    tma_2d(dst + PANEL_TILE, kmap, 64, id * BLK, r.full(s));
  }
}

// Warp 8: the head's query rows, then `n` tiles (tile t is tile t % tiles of the range: a
// repeat walks the range again). Lane b < NB issues block b's two boxes; its block id is loaded
// one tile ahead, so the table's latency runs under the wait for a free stage.
__device__ void produce(const Ring& r, const CUtensorMap* kmap, const CUtensorMap* qmap,
                        const int* ids, int h, int tiles, int n) {
  int lane = threadIdx.x % 32;
  if (lane == 0) {
    bar_expect(r.qbar(), Q_BYTES);
    for (int p = 0; p < 2; p++)
      for (int i = 0; i < 2; i++)
        tma_2d(r.qs + p * PANEL_Q + i * 64 * 128, qmap, 64 * p, h * ROWS + 64 * i, r.qbar());
  }
  int id = lane < NB ? __ldg(ids + lane) : 0;
  for (int t = 0; t < n; t++) {
    int next = (lane < NB && t + 1 < n) ? __ldg(ids + ((t + 1) % tiles) * NB + lane) : 0;
    if (!STREAM && t >= STAGES) {  // the stage keeps its tile: hand it over again
      bar_wait(r.empty(t % STAGES), ((t / STAGES) - 1) & 1);
      if (lane == 0) bar_arrive(r.full(t % STAGES));
    } else {
      load_tile(r, kmap, t, id);
    }
    id = next;
  }
}

// Ring tiles t0 .. t0 + n (n even, >= 2), a0 taking even ones and a1 odd: a tile's product runs
// under the fold of the tile before; nothing is in flight across an iteration (ptxas
// serializes every wgmma otherwise).
template <int N, typename Issue, typename Fold>
__device__ __forceinline__ void walk_overlapped(const Ring& r, int t0, int n, float (&a0)[N],
                                                float (&a1)[N], Issue issue_t, Fold fold_t) {
  r.land(t0);
  issue_t(a0, t0);
  wait_all(a0);
  for (int t = t0; t < t0 + n - 2; t += 2) {
    r.land(t + 1);
    issue_t(a1, t + 1);
    r.done(t);
    fold_t(a0, t);
    wait_all(a1);
    r.land(t + 2);
    issue_t(a0, t + 2);
    r.done(t + 1);
    fold_t(a1, t + 1);
    wait_all(a0);
  }
  int t = t0 + n - 1;
  r.land(t);
  issue_t(a1, t);
  r.done(t - 1);
  fold_t(a0, t - 1);
  wait_all(a1);
  r.done(t);
  fold_t(a1, t);
}

// Tiles one at a time, the two consumers taking turns at the tensor cores: consumer c issues
// tile t's product once the other issued its own (named barrier 2 + c), so that one folds while
// the other's product runs (FlashAttention-3's ping-pong).
template <int N, typename Issue, typename Fold>
__device__ __forceinline__ void walk_pingpong(const Ring& r, int n, int ci, float (&a)[N],
                                              Issue issue_t, Fold fold_t) {
  if (ci == 1) your_turn(ci);
  for (int t = 0; t < n; t++) {
    r.land(t);
    my_turn(ci);
    issue_t(a, t);
    if (!(ci == 1 && t == n - 1)) your_turn(ci);
    wait_all(a);
    r.done(t);
    fold_t(a, t);
  }
}

// Splits the CTA by role: the producer's threads run `produce` and return true, the consumers
// take the registers the producer gives up and return false.
__device__ bool produced(const Ring& r, const CUtensorMap* kmap, const CUtensorMap* qmap,
                         const int* ids, int tiles, int n) {
  if (threadIdx.x >= 256) {
    if constexpr (REBALANCE) asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x < 288) produce(r, kmap, qmap, ids, blockIdx.y, tiles, n);
    return true;
  }
  if constexpr (REBALANCE) asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  return false;
}

// Pass 1's fold: online (max, sum) of a thread's two rows over its columns of one tile.
constexpr int NACC = TILE / 2;
__device__ __forceinline__ void fold(const float (&a)[NACC], float c, float (&m)[2],
                                     float (&l)[2]) {
#if !FOLD
  m[0] = fmaxf(m[0], a[0]);
  (void)c;
  (void)l;
#else
#pragma unroll
  for (int r = 0; r < 2; r++) {
    float x[4] = {m[r], -INFINITY, -INFINITY, -INFINITY};  // four chains of maxima
#pragma unroll
    for (int j = 0; j < NACC / 4; j++) x[j % 4] = fmaxf(x[j % 4], fmaxf(a[4 * j + 2 * r], a[4 * j + 2 * r + 1]));
    x[0] = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    float t = fmaxf(m[r], x[0]);
    float mc = t * c;
    float acc[4] = {l[r] * ex2(fmaf(m[r], c, -mc)), 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NACC / 4; j++) {
      acc[(2 * j) % 4] += ex2_mix(fmaf(a[4 * j + 2 * r], c, -mc), 2 * j);
      acc[(2 * j + 1) % 4] += ex2_mix(fmaf(a[4 * j + 2 * r + 1], c, -mc), 2 * j + 1);
    }
    l[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    m[r] = t;
  }
#endif
}

// A thread's two rows' (max, sum) merged over the row's four lanes.
__device__ __forceinline__ void quad_merge(float (&m)[2], float (&l)[2], float c) {
#pragma unroll
  for (int i = 0; i < 2; i++) {
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
      float mo = __shfl_xor_sync(~0u, m[i], x), lo = __shfl_xor_sync(~0u, l[i], x);
      float mn = fmaxf(m[i], mo);
      l[i] = l[i] * ex2((m[i] - mn) * c) + lo * ex2((mo - mn) * c);
      m[i] = mn;
    }
  }
}

// Pass 1. grid (splits, heads): consumer c owns rows 64 c.., multiplies every tile (query rows
// as A, keys as B: m64nTILEk16). out[h][split][row] = (max, sum) of raw scores.
__global__ void __launch_bounds__(THREADS, CPS)
    stats_ws(const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap qmap,
             const int* __restrict__ table, int blocks_per_head, int tiles, int repeat, float c,
             float2* __restrict__ out) {
  extern __shared__ unsigned char raw[];
  Ring r = ring_setup(raw);
  int h = blockIdx.y, split = blockIdx.x, n = tiles * repeat;
  if (produced(r, &kmap, &qmap, table + (size_t)h * blocks_per_head + (size_t)split * tiles * NB, tiles, n))
    return;
  int ci = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  uint32_t q = r.qs + ci * 64 * 128;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  float a0[NACC], a1[NACC];
  bar_wait(r.qbar(), 0);
#if PINGPONG
  walk_pingpong(
      r, n, ci, a0, [&](auto& x, int t) { issue<TILE>(x, q, PANEL_Q, r.stage(t), PANEL_TILE); },
      [&](auto& x, int) { fold(x, c, m, l); });
  (void)a1;
#elif OVERLAP
  walk_overlapped(
      r, 0, n, a0, a1, [&](auto& x, int t) { issue<TILE>(x, q, PANEL_Q, r.stage(t), PANEL_TILE); },
      [&](auto& x, int) { fold(x, c, m, l); });
#else
  for (int t = 0; t < n; t++) {
    r.land(t);
    issue<TILE>(a0, q, PANEL_Q, r.stage(t), PANEL_TILE);
    wait_all(a0);
    r.done(t);
    fold(a0, c, m, l);
  }
  (void)a1;
#endif
  quad_merge(m, l, c);
#pragma unroll
  for (int i = 0; i < 2; i++) {
    if (lane % 4 == 0) {
      int row = ci * 64 + warp * 16 + lane / 4 + 8 * i;
      out[((size_t)h * gridDim.x + split) * ROWS + row] = make_float2(m[i], l[i]);
    }
  }
}

#if TILE == 128
// Pass 2's per-tile work: a thread's two keys' a^2 summed over its 16 rows of each of its two
// heads, completed over the quad's other lane of the same heads, stored as column sums.
// Keys-major accumulators: register 4 j + 2 kh + e is key 16 w + lane / 4 + 8 kh of the
// consumer's 64, row 8 j + 2 (lane % 4) + e, whose head is 2 (lane % 2) + e.
__device__ __forceinline__ void column_sums(const float (&a)[64], const float (&bias)[32], float c2,
                                            float* cols, int key0) {
  int lane = threadIdx.x % 32;
#pragma unroll
  for (int kh = 0; kh < 2; kh++) {
    float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#if FOLD
#pragma unroll
    for (int j = 0; j < 16; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) s[j % 2][e] += ex2_mix(fmaf(a[4 * j + 2 * kh + e], c2, -bias[2 * j + e]), 2 * j + e);
#else
    s[0][0] = a[2 * kh];
    (void)bias;
    (void)c2;
#endif
#pragma unroll
    for (int e = 0; e < 2; e++) {
      float v = s[0][e] + s[1][e];
      v += __shfl_xor_sync(~0u, v, 2);
      if (lane % 4 < 2) cols[(key0 + 8 * kh) * G + 2 * (lane % 2) + e] = v;
    }
  }
}

// Pass 2's end: each of the range's keys gets the sum over heads of the max of its column sums
// over its 7 neighbours in the range (zero outside), written to out[key].
__device__ void pool_range(const float* cols, int keys, float* out) {
  for (int k = threadIdx.x; k < keys; k += 256) {
    float total = 0.f;
#pragma unroll
    for (int g = 0; g < G; g++) {
      float v = 0.f;
#pragma unroll
      for (int d = -3; d <= 3; d++)
        if (k + d >= 0 && k + d < keys) v = fmaxf(v, cols[(k + d) * G + g]);
      total += v;
    }
    out[k] = total;
  }
}

// Pass 2. grid (splits, heads): consumer c takes keys 64 c.. of every 128-key tile (keys as A,
// the 128 query rows as B: m64n128k16). bias[h][row] = 2 c max + 2 log2(sum), so that a^2 =
// ex2(2 c s - bias). Column sums of the CTA's keys in shared memory; at the end each key's
// metric is the sum over heads of the max over its 7 neighbours in the range (zero outside).
__global__ void __launch_bounds__(THREADS, CPS)
    scores_ws(const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap qmap,
              const int* __restrict__ table, int blocks_per_head, int tiles, int repeat, float c,
              const float* __restrict__ bias_rows, float* __restrict__ metric) {
  extern __shared__ unsigned char raw[];
  Ring r = ring_setup(raw);
  float* cols = (float*)(raw + (r.bars + 16 * STAGES + 16 - smem_u32(raw)));
  int h = blockIdx.y, split = blockIdx.x, n = tiles * repeat;
  if (produced(r, &kmap, &qmap, table + (size_t)h * blocks_per_head + (size_t)split * tiles * NB, tiles, n))
    return;
  int ci = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  float bias[32];
#pragma unroll
  for (int j = 0; j < 16; j++)
#pragma unroll
    for (int e = 0; e < 2; e++) bias[2 * j + e] = __ldg(bias_rows + h * ROWS + 8 * j + 2 * (lane % 4) + e);
  float c2 = 2.f * c;
  int kofs = ci * 64 * 128;  // the consumer's 64 keys in each panel of a tile
  int key_in = 64 * ci + 16 * warp + lane / 4;
  float a0[64], a1[64];
  bar_wait(r.qbar(), 0);
#if PINGPONG
  walk_pingpong(
      r, n, ci, a0, [&](auto& x, int t) { issue<128>(x, r.stage(t) + kofs, PANEL_TILE, r.qs, PANEL_Q); },
      [&](auto& x, int t) { column_sums(x, bias, c2, cols, (t % tiles) * TILE + key_in); });
  (void)a1;
#else
  walk_overlapped(
      r, 0, n, a0, a1, [&](auto& x, int t) { issue<128>(x, r.stage(t) + kofs, PANEL_TILE, r.qs, PANEL_Q); },
      [&](auto& x, int t) { column_sums(x, bias, c2, cols, (t % tiles) * TILE + key_in); });
#endif
  consumers_sync();
  int keys = tiles * TILE;
  pool_range(cols, keys, metric + ((size_t)h * gridDim.x + split) * keys);
}

// Both passes in one persistent launch (one CTA an SM, all resident), heads in turn: the CTA
// takes items b, b + gridDim.x, .. of `items` ({pass, head, split}: pass 1 of head h + 1 is
// listed before pass 2 of head h, so that pass 2 finds K in L2). The key ring runs on across
// items; the query rows are double-buffered (qfull / qempty per buffer). A pass-1 item writes
// its rows' partials and counts itself in count[h]; the last one of a head merges the head's
// partials into bias[h] and publishes ready[h] = epoch (the launch's number, so that repeated
// launches need no reset). A pass-2 item waits for ready[h] first. Every item waits only on
// items listed before it, whose CTAs are resident: no deadlock.
constexpr int BOTH_EXTRA = 64;  // qfull[2], qempty[2], the "last" flag
__global__ void __launch_bounds__(THREADS, 1)
    both_ws(const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap qmap,
            const int* __restrict__ table, int blocks_per_head, int tiles, int splits, float c,
            const int4* __restrict__ items, int nitems, int epoch, float2* partials, float* bias_rows,
            int* count, int* ready, float* __restrict__ metric) {
  extern __shared__ unsigned char raw[];
  Ring r = ring_setup(raw);
  uint32_t extra = r.bars + 16 * STAGES + 16;
  auto qfull = [&](int b) { return extra + 8 * b; };
  auto qempty = [&](int b) { return extra + 16 + 8 * b; };
  volatile int* last = (volatile int*)(raw + (extra + 32 - smem_u32(raw)));
  uint32_t q1 = (extra + BOTH_EXTRA + 1023) & ~1023u;
  float* cols = (float*)(raw + (q1 + Q_BYTES - smem_u32(raw)));
  auto qbuf = [&](int k) { return k % 2 ? q1 : r.qs; };
  if (threadIdx.x == 0) {
    for (int b = 0; b < 2; b++) {
      bar_init(qfull(b), 1);
      bar_init(qempty(b), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  if (threadIdx.x >= 256) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (threadIdx.x >= 288) return;
    int lane = threadIdx.x % 32, tg = 0, k = 0;
    for (int i = blockIdx.x; i < nitems; i += gridDim.x, k++) {
      int4 it = items[i];
      if (k >= 2) bar_wait(qempty(k % 2), ((k / 2) - 1) & 1);
      if (lane == 0) {
        bar_expect(qfull(k % 2), Q_BYTES);
        for (int p = 0; p < 2; p++)
          for (int j = 0; j < 2; j++)
            tma_2d(qbuf(k) + p * PANEL_Q + j * 64 * 128, &qmap, 64 * p, it.y * ROWS + 64 * j, qfull(k % 2));
      }
      const int* ids = table + (size_t)it.y * blocks_per_head + (size_t)it.z * tiles * NB;
      int id = lane < NB ? __ldg(ids + lane) : 0;
      for (int t = 0; t < tiles; t++, tg++) {
        int next = (lane < NB && t + 1 < tiles) ? __ldg(ids + (t + 1) * NB + lane) : 0;
        load_tile(r, &kmap, tg, id);
        id = next;
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  int ci = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  float c2 = 2.f * c;
  int tg = 0, k = 0, keys = tiles * TILE;
  float a0[64], a1[64];
  for (int i = blockIdx.x; i < nitems; i += gridDim.x, k++, tg += tiles) {
    int4 it = items[i];
    int h = it.y, split = it.z;
    bar_wait(qfull(k % 2), (k / 2) & 1);
    uint32_t qs = qbuf(k);
    if (it.x == 1) {
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
      uint32_t q = qs + ci * 64 * 128;
      walk_overlapped(
          r, tg, tiles, a0, a1, [&](auto& x, int t) { issue<128>(x, q, PANEL_Q, r.stage(t), PANEL_TILE); },
          [&](auto& x, int) { fold(x, c, m, l); });
      if (lane == 0) bar_arrive(qempty(k % 2));
      quad_merge(m, l, c);
#pragma unroll
      for (int j = 0; j < 2; j++) {
        if (lane % 4 == 0)
          partials[((size_t)h * splits + split) * ROWS + ci * 64 + warp * 16 + lane / 4 + 8 * j] = make_float2(m[j], l[j]);
      }
      __threadfence();
      consumers_sync();
      if (threadIdx.x == 0) {
        *last = atomicAdd(count + h, 1) == splits * epoch - 1;
        __threadfence();
      }
      consumers_sync();
      if (*last) {
        if (threadIdx.x < ROWS) {
          float mm = -INFINITY, ll = 0.f;
          for (int sp = 0; sp < splits; sp += 8) {  // splits a multiple of 8: loads 8 at a time
            float2 v[8];
#pragma unroll
            for (int u = 0; u < 8; u++) v[u] = __ldcg(partials + ((size_t)h * splits + sp + u) * ROWS + threadIdx.x);
#pragma unroll
            for (int u = 0; u < 8; u++) {
              float mn = fmaxf(mm, v[u].x);
              ll = ll * ex2((mm - mn) * c) + v[u].y * ex2((v[u].x - mn) * c);
              mm = mn;
            }
          }
          bias_rows[h * ROWS + threadIdx.x] = 2.f * c * mm + 2.f * log2f(ll);
        }
        consumers_sync();
        if (threadIdx.x == 0) {
          __threadfence();
          asm volatile("st.release.gpu.global.b32 [%0], %1;" ::"l"(ready + h), "r"(epoch) : "memory");
        }
      }
    } else {
      if (lane == 0) {
        int v;
        do {
          asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(ready + h) : "memory");
        } while (v < epoch);
      }
      __syncwarp();
      float bias[32];
#pragma unroll
      for (int j = 0; j < 16; j++)
#pragma unroll
        for (int e = 0; e < 2; e++) bias[2 * j + e] = __ldcg(bias_rows + h * ROWS + 8 * j + 2 * (lane % 4) + e);
      int kofs = ci * 64 * 128, key_in = 64 * ci + 16 * warp + lane / 4;
      walk_overlapped(
          r, tg, tiles, a0, a1, [&](auto& x, int t) { issue<128>(x, r.stage(t) + kofs, PANEL_TILE, qs, PANEL_Q); },
          [&](auto& x, int t) { column_sums(x, bias, c2, cols, (t - tg) * TILE + key_in); });
      if (lane == 0) bar_arrive(qempty(k % 2));
      consumers_sync();
      pool_range(cols, keys, metric + ((size_t)h * splits + split) * keys);
      consumers_sync();
    }
  }
}
#endif

// Naive pass 1: one thread per (head, split, row), f32.
__global__ void stats_naive(const half* pool, const half* qv, const int* table, int blocks_per_head,
                            int keys_per_split, int splits, float c, float2* out) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  int h = blockIdx.y;
  if (i >= splits * ROWS) return;
  int split = i / ROWS, row = i % ROWS;
  const half* qr = qv + ((size_t)h * ROWS + row) * D;
  float m = -INFINITY, l = 0.f;
  for (int k = split * keys_per_split; k < (split + 1) * keys_per_split; k++) {
    int slot = table[(size_t)h * blocks_per_head + k / BLK] * BLK + k % BLK;
    const half* kr = pool + (size_t)slot * D;
    float s = 0.f;
    for (int d = 0; d < D; d++) s += __half2float(qr[d]) * __half2float(kr[d]);
    float mn = fmaxf(m, s);
    l = l * exp2f((m - mn) * c) + exp2f((s - mn) * c);
    m = mn;
  }
  out[((size_t)h * splits + split) * ROWS + row] = make_float2(m, l);
}

// Naive pass 2's column sums: one thread per (head, key), f32; cols[h][key][g].
__global__ void cols_naive(const half* pool, const half* qv, const int* table, int blocks_per_head,
                           int keys, float c, const float* bias_rows, float* cols) {
  int k = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y;
  if (k >= keys) return;
  int slot = table[(size_t)h * blocks_per_head + k / BLK] * BLK + k % BLK;
  const half* kr = pool + (size_t)slot * D;
  float v[G] = {};
  for (int row = 0; row < ROWS; row++) {
    const half* qr = qv + ((size_t)h * ROWS + row) * D;
    float s = 0.f;
    for (int d = 0; d < D; d++) s += __half2float(qr[d]) * __half2float(kr[d]);
    v[row % G] += exp2f(2.f * c * s - bias_rows[h * ROWS + row]);
  }
  for (int g = 0; g < G; g++) cols[((size_t)h * keys + k) * G + g] = v[g];
}

__global__ void poison(float* p, size_t n) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) p[i] = NAN;
}

static CUtensorMap make_map(void* base, uint64_t rows, uint32_t box_rows) {
  CUtensorMap m;
  cuuint64_t dims[2] = {D, rows};
  cuuint64_t strides[1] = {D * 2};
  cuuint32_t box[2] = {64, box_rows};
  cuuint32_t elem[2] = {1, 1};
  CU(cuTensorMapEncodeTiled(&m, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, base, dims, strides, box, elem,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
  return m;
}

#if TILE == 128
// The kernels' metric against the naive column sums, pooled within ranges of `range` keys as
// the kernels do: (keys off by more than 1e-3 relative, the worst relative error).
static std::pair<size_t, double> check_metric(const std::vector<float>& cols, const std::vector<float>& met,
                                              int heads, int keys, int range) {
  size_t bad = 0;
  double worst = 0;
  for (int h = 0; h < heads; h++)
    for (int k = 0; k < keys; k++) {
      int lo = k / range * range, hi = lo + range;
      double want = 0;
      for (int g = 0; g < G; g++) {
        double v = 0;
        for (int d = -3; d <= 3; d++)
          if (k + d >= lo && k + d < hi) v = std::max(v, (double)cols[((size_t)h * keys + k + d) * G + g]);
        want += v;
      }
      double got = met[(size_t)h * keys + k], e = fabs(got - want) / std::max(want, 1e-30);
      if (!(e <= 1e-3)) bad++;
      if (!(e <= worst)) worst = e;
    }
  return {bad, worst};
}
#endif

template <typename F>
static float time_us(int reps, F launch) {
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; i++) launch();
  CK(cudaEventRecord(e0));
  for (int i = 0; i < reps; i++) launch();
  CK(cudaEventRecord(e1));
  CK(cudaEventSynchronize(e1));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, e0, e1));
  CK(cudaGetLastError());
  return ms / reps * 1e3f;
}

// Usage: ws HEADS KEYS SPLITS REPS [REPEAT [BOTH_SPLITS [BOTH_LEAD]]]: KEYS a head, SPLITS CTAs
// a head, each walking its range REPEAT times (REPEAT > 1: K from L2, the compute's own rate);
// BOTH_SPLITS > 0 also runs both passes in one persistent launch (both_ws).
int main(int argc, char** argv) {
  int heads = argc > 1 ? atoi(argv[1]) : 8;
  int keys = argc > 2 ? atoi(argv[2]) : 32768;
  int splits = argc > 3 ? atoi(argv[3]) : 16;
  int reps = argc > 4 ? atoi(argv[4]) : 20;
  int repeat = argc > 5 ? atoi(argv[5]) : 1;
  int both_splits = argc > 6 ? atoi(argv[6]) : 0;
  int both_lead = argc > 7 ? atoi(argv[7]) : 2;
  int tiles = keys / TILE / splits;
  if (tiles * TILE * splits != keys || (tiles * repeat) % 2 || tiles * repeat < 2) {
    printf("KEYS must split into an even number of %d-key tiles a CTA\n", TILE);
    return 2;
  }
  int bph = keys / BLK;
  size_t nblocks = (size_t)heads * bph, kbytes = nblocks * BLK * D * 2;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<half> hk(nblocks * BLK * D), hq((size_t)heads * ROWS * D);
  for (auto& x : hk) x = __float2half(nd(rng));
  for (auto& x : hq) x = __float2half(nd(rng));
  std::vector<int> perm(nblocks);
  for (size_t i = 0; i < nblocks; i++) perm[i] = (int)i;
  std::shuffle(perm.begin(), perm.end(), rng);
  half *dk, *dq, *dcopy;
  int* dt;
  float2 *dout, *dref, *dfull;
  float *dbias, *dmetric, *dcols;
  size_t nout = (size_t)heads * splits * ROWS;
  CK(cudaMalloc(&dk, kbytes));
  CK(cudaMalloc(&dcopy, kbytes));
  CK(cudaMalloc(&dq, hq.size() * 2));
  CK(cudaMalloc(&dt, nblocks * 4));
  CK(cudaMalloc(&dout, nout * 8));
  CK(cudaMalloc(&dref, nout * 8));
  CK(cudaMalloc(&dfull, heads * ROWS * 8));
  CK(cudaMalloc(&dbias, heads * ROWS * 4));
  CK(cudaMalloc(&dmetric, (size_t)heads * keys * 4));
  CK(cudaMalloc(&dcols, (size_t)heads * keys * G * 4));
  CK(cudaMemcpy(dk, hk.data(), kbytes, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dq, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(dt, perm.data(), nblocks * 4, cudaMemcpyHostToDevice));
  CUtensorMap kmap = make_map(dk, nblocks * BLK, BLK), qmap = make_map(dq, (uint64_t)heads * ROWS, 64);
  float c = 1.4426950408889634f / sqrtf((float)D);
  CK(cudaFuncSetAttribute(stats_ws, cudaFuncAttributeMaxDynamicSharedMemorySize, RING_SMEM));
  int occ = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, stats_ws, THREADS, RING_SMEM));
  printf("pass 1: %d CTAs an SM, %d CTAs\n", occ, splits * heads);

  // Pass 1 against the naive one.
  poison<<<(nout * 2 + 255) / 256, 256>>>((float*)dout, nout * 2);
  stats_naive<<<dim3((splits * ROWS + 127) / 128, heads), 128>>>(dk, dq, dt, bph, keys / splits, splits, c, dref);
  stats_ws<<<dim3(splits, heads), THREADS, RING_SMEM>>>(kmap, qmap, dt, bph, tiles, repeat, c, dout);
  CK(cudaDeviceSynchronize());
  std::vector<float2> o(nout), r(nout);
  CK(cudaMemcpy(o.data(), dout, nout * 8, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(r.data(), dref, nout * 8, cudaMemcpyDeviceToHost));
  double worst = 0;
  size_t bad = 0;
  for (size_t i = 0; i < nout; i++) {  // log-sum-exp in log2 units, a repeat adding log2(repeat)
    double a = o[i].x * c + log2((double)o[i].y), b = r[i].x * c + log2((double)r[i].y) + log2((double)repeat);
    double e = fabs(a - b);
    if (!(e <= 1e-3)) bad++;
    if (!(e <= worst)) worst = e;
  }
  float us1 = time_us(reps, [&] {
    stats_ws<<<dim3(splits, heads), THREADS, RING_SMEM>>>(kmap, qmap, dt, bph, tiles, repeat, c, dout);
  });
  float us_copy = time_us(reps, [&] { CK(cudaMemcpyAsync(dcopy, dk, kbytes, cudaMemcpyDeviceToDevice)); });
  double copy_gbs = 2.0 * kbytes / (us_copy * 1e-6) / 1e9;
  printf("check pass 1: %zu of %zu rows off, worst |lse2 diff| %.3g\n", bad, nout, worst);
  printf("POLY %d PINGPONG %d STREAM %d CPS %d MMA %d FOLD %d TILE %d STAGES %d OVERLAP %d heads %d keys %d splits %d repeat %d:"
         " pass1 %.2f us, %.0f GB/s of K walked, copy %.0f GB/s (read+write): %.2f of copy\n",
         POLY, PINGPONG, STREAM, CPS, MMA, FOLD, TILE, STAGES, OVERLAP, heads, keys, splits, repeat, us1,
         kbytes * repeat / (us1 * 1e-6) / 1e9, copy_gbs, kbytes * repeat / (us1 * 1e-6) / 1e9 / copy_gbs);
#if TILE == 128
  // Pass 2 with the naive pass 1's stats of whole heads.
  int keys_cta = tiles * TILE;
  int smem2 = RING_SMEM + keys_cta * G * 4;
  CK(cudaFuncSetAttribute(scores_ws, cudaFuncAttributeMaxDynamicSharedMemorySize, smem2));
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, scores_ws, THREADS, smem2));
  stats_naive<<<dim3(1, heads), 128>>>(dk, dq, dt, bph, keys, 1, c, dfull);
  std::vector<float2> full(heads * ROWS);
  CK(cudaMemcpy(full.data(), dfull, full.size() * 8, cudaMemcpyDeviceToHost));
  std::vector<float> bias(heads * ROWS);
  for (size_t i = 0; i < bias.size(); i++) bias[i] = 2.f * c * full[i].x + 2.f * log2f(full[i].y);
  CK(cudaMemcpy(dbias, bias.data(), bias.size() * 4, cudaMemcpyHostToDevice));
  poison<<<(heads * keys + 255) / 256, 256>>>(dmetric, (size_t)heads * keys);
  cols_naive<<<dim3((keys + 127) / 128, heads), 128>>>(dk, dq, dt, bph, keys, c, dbias, dcols);
  scores_ws<<<dim3(splits, heads), THREADS, smem2>>>(kmap, qmap, dt, bph, tiles, repeat, c, dbias, dmetric);
  CK(cudaDeviceSynchronize());
  std::vector<float> cols((size_t)heads * keys * G), met((size_t)heads * keys);
  CK(cudaMemcpy(cols.data(), dcols, cols.size() * 4, cudaMemcpyDeviceToHost));
  CK(cudaMemcpy(met.data(), dmetric, met.size() * 4, cudaMemcpyDeviceToHost));
  std::tie(bad, worst) = check_metric(cols, met, heads, keys, keys_cta);
  float us2 = time_us(reps, [&] {
    scores_ws<<<dim3(splits, heads), THREADS, smem2>>>(kmap, qmap, dt, bph, tiles, repeat, c, dbias, dmetric);
  });
  printf("check pass 2: %zu of %d keys off, worst relative %.3g; %d CTAs an SM\n", bad, heads * keys, worst, occ);
  printf("POLY %d PINGPONG %d STREAM %d CPS %d MMA %d FOLD %d TILE %d STAGES %d heads %d keys %d splits %d repeat %d:"
         " pass2 %.2f us, %.0f GB/s of K walked: %.2f of copy; pass1 + pass2 %.2f us\n",
         POLY, PINGPONG, STREAM, CPS, MMA, FOLD, TILE, STAGES, heads, keys, splits, repeat, us2,
         kbytes * repeat / (us2 * 1e-6) / 1e9, kbytes * repeat / (us2 * 1e-6) / 1e9 / copy_gbs, us1 + us2);

  // Both passes in one persistent launch: BOTH_SPLITS items a head and pass, pass 1 of head
  // h + BOTH_LEAD listed before pass 2 of head h.
  if (both_splits > 0) {
    int bs = both_splits, btiles = keys / TILE / bs, bkeys = btiles * TILE;
    if (btiles * TILE * bs != keys || btiles % 2 || bs % 8) {
      printf("both: KEYS must split into %d ranges of an even number of tiles, splits a multiple of 8\n", bs);
      return 2;
    }
    std::vector<int4> items;
    for (int step = 0; step < heads + both_lead; step++) {
      if (step < heads)
        for (int sp = 0; sp < bs; sp++) items.push_back(make_int4(1, step, sp, 0));
      if (step >= both_lead)
        for (int sp = 0; sp < bs; sp++) items.push_back(make_int4(2, step - both_lead, sp, 0));
    }
    int4* ditems;
    float2* dpart;
    float* dbias2;
    int *dcount, *dready;
    CK(cudaMalloc(&ditems, items.size() * sizeof(int4)));
    CK(cudaMalloc(&dpart, (size_t)heads * bs * ROWS * 8));
    CK(cudaMalloc(&dbias2, heads * ROWS * 4));
    CK(cudaMalloc(&dcount, heads * 4));
    CK(cudaMalloc(&dready, heads * 4));
    CK(cudaMemset(dcount, 0, heads * 4));
    CK(cudaMemset(dready, 0, heads * 4));
    CK(cudaMemcpy(ditems, items.data(), items.size() * sizeof(int4), cudaMemcpyHostToDevice));
    int sms = 0;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    int smem3 = RING_SMEM + BOTH_EXTRA + 1024 + Q_BYTES + bkeys * G * 4;
    CK(cudaFuncSetAttribute(both_ws, cudaFuncAttributeMaxDynamicSharedMemorySize, smem3));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, both_ws, THREADS, smem3));
    if (occ < 1) {
      printf("both: does not fit (%d bytes of shared memory)\n", smem3);
      return 2;
    }
    int epoch = 0;
    auto launch = [&] {
      epoch++;
      both_ws<<<sms, THREADS, smem3>>>(kmap, qmap, dt, bph, btiles, bs, c, ditems, (int)items.size(), epoch,
                                       dpart, dbias2, dcount, dready, dmetric);
    };
    poison<<<(heads * keys + 255) / 256, 256>>>(dmetric, (size_t)heads * keys);
    launch();
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(met.data(), dmetric, met.size() * 4, cudaMemcpyDeviceToHost));
    std::tie(bad, worst) = check_metric(cols, met, heads, keys, bkeys);
    float us3 = time_us(reps, launch);
    printf("check both: %zu of %d keys off, worst relative %.3g\n", bad, heads * keys, worst);
    printf("both passes, one launch of %d CTAs, %d items a head and pass, lead %d heads, %d stages: %.2f us,"
           " %.2f of copy (K counted once)\n",
           sms, bs, both_lead, STAGES, us3, kbytes / (us3 * 1e-6) / 1e9 / copy_gbs);
  }
#endif
  return 0;
}

// kvscope_gemv: y (m, n) = x (m, k) @ W (n_w, k)^T for the few rows of a decode step (m <= MT, MT = 1, 2, 4, 8 or
// 16 picked by the host), float accumulation, one of three epilogues:
//   GEMV_STORE     out[r, n] = round(acc + bias[n])                        (bias optional)
//   GEMV_RESIDUAL  out[r, n] = round(out[r, n] + acc), then + bias[n]      (h += x W^T in place; torch's addmm_ rounds
//                                                                          once, its bias add a second time)
//   GEMV_SILU_MUL  out[r, n] = round(round(silu(round(acc_n))) * round(acc_{n+f}))   (W = [gate; up], n_w = 2f)
//
// Layout: W rows contiguous (row stride k), k a multiple of VEC_ELEMS (16 bytes), x rows 16-byte aligned (row stride
// ldx), out rows ldo apart. A block has GEMV_WARPS warps; a warp owns GEMV_ROWS rows of W (in SILU_MUL: gate row n
// and up row n + f) and walks them in 16-byte vectors, each lane taking vectors lane, lane + 32, ... . Per trip a
// lane issues U vectors x GEMV_ROWS rows of W loads before any arithmetic (U*2 independent 16-byte loads in flight per
// thread to cover HBM latency), then loads each x row's vector once (L1-resident, kept in registers) and uses it for
// both W rows. W loads bypass L1 (no reuse) so L1 keeps x. Sums: 5 shuffle-xor steps per (row, x row) accumulator;
// then lane t holds the result of accumulator t (GEMV_ROWS * MT <= 32).
//
// RMSNorm prologue (norm_w not null): x is the residual stream and the product takes RMSNorm(x) * norm_w instead,
// rounded where kvscope_rms_norm rounds: xn = round(round(x * rstd) * norm_w). Each block computes rstd of its m
// rows itself (threads over 16-byte vectors, shuffles, then warp partials added in warp order: every block gets the
// same value), so the normalised rows are never written: one launch less per norm. `stamp` (not null): block (0, 0)
// writes the global timer into it as the kernel starts (the instrument's in-graph marks, as kvscope_rms_norm does).
//
// Split-K (gridDim.y > 1): block (bx, s) covers k-vectors [s * kv_per_split, (s + 1) * kv_per_split) and writes its
// raw float sums to partial[s][r][w_row]; kvscope_gemv_reduce then adds the splits in order s = 0, 1, ... (the same
// order every run: deterministic) and applies the epilogue.

#define GEMV_WARPS 4
#define GEMV_ROWS 2
#define GEMV_STORE 0
#define GEMV_RESIDUAL 1
#define GEMV_SILU_MUL 2

// a 16-byte load through the read-only path, kept in L1 (x and the norm weights: every warp of an SM reads them)
__device__ __forceinline__ uint4 load_ro(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// a 16-byte load that skips L1 and asks L2 to fetch the whole 256-byte sector group (W is read exactly once)
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
#if __CUDA_ARCH__ >= 800
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
#else
    v = load_ro(p);
#endif
    return v;
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.f + __expf(-g)); }

// the epilogue of one output element; acc: the row's sum (STORE / RESIDUAL) or the gate's (SILU_MUL), up: the up
// row's sum (SILU_MUL only)
__device__ __forceinline__ void gemv_epilogue(elem_t* __restrict__ out, const elem_t* __restrict__ bias, int mode,
                                              long long ldo, int r, int n, float acc, float up) {
    elem_t* o = out + (long long)r * ldo + n;
    if (mode == GEMV_SILU_MUL) {
        *o = from_f(rnd(silu_f(rnd(acc))) * rnd(up));
    } else if (mode == GEMV_RESIDUAL) {
        float v = to_f(*o) + acc;
        if (bias != nullptr) v = rnd(v) + to_f(bias[n]);
        *o = from_f(v);
    } else {
        *o = from_f(bias != nullptr ? acc + to_f(bias[n]) : acc);
    }
}

// rstd[r] = 1 / sqrt(mean(x[r]^2) + eps) for r < m, computed by the whole block (every thread must call it)
template <int MT>
__device__ __forceinline__ void block_rstd(float* rstd, const elem_t* __restrict__ x, int m, int k, long long ldx,
                                           float eps) {
    __shared__ float part[GEMV_WARPS][MT];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float ss[MT];
#pragma unroll
    for (int r = 0; r < MT; ++r) ss[r] = 0.f;
    for (int kv = threadIdx.x; kv < k / VEC_ELEMS; kv += blockDim.x) {
#pragma unroll
        for (int r = 0; r < MT; ++r) {
            if (r < m) {
                Vec16 a;
                a.raw = load_ro(reinterpret_cast<const uint4*>(x + (long long)r * ldx) + kv);
#pragma unroll
                for (int j = 0; j < VEC_ELEMS; ++j) { const float f = to_f(a.e[j]); ss[r] = fmaf(f, f, ss[r]); }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MT; ++r) {
        float v = ss[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
        if (lane == 0) part[warp][r] = v;
    }
    __syncthreads();
    if (threadIdx.x < MT) {
        float t = 0.f;
#pragma unroll
        for (int q = 0; q < GEMV_WARPS; ++q) t += part[q][threadIdx.x];
        rstd[threadIdx.x] = rsqrtf(t / (float)k + eps);
    }
    __syncthreads();
}

// one trip of a lane: U vectors of each of its W rows at base, base + 32, ... (below kv1); a whole trip takes no
// per-load predicate
template <int U>
__device__ __forceinline__ void load_trip(Vec16 (&wv)[U][GEMV_ROWS], const uint4* const (&wp)[GEMV_ROWS], int base,
                                          int kv1) {
    if (base + 32 * (U - 1) < kv1) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int q = 0; q < GEMV_ROWS; ++q) wv[u][q].raw = load_stream(wp[q] + base + 32 * u);
    } else {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int q = 0; q < GEMV_ROWS; ++q)
                wv[u][q].raw = base + 32 * u < kv1 ? load_stream(wp[q] + base + 32 * u) : uint4{0u, 0u, 0u, 0u};
    }
}

// the arithmetic of one trip: each x row's vector loaded once (normalised when NORM) and used for both W rows
template <int MT, int U, bool NORM>
__device__ __forceinline__ void fma_trip(float (&acc)[GEMV_ROWS][MT], const Vec16 (&wv)[U][GEMV_ROWS],
                                         const elem_t* __restrict__ x, long long ldx, int m,
                                         const elem_t* __restrict__ norm_w, const float* rstd, int base, int kv1) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int kv = base + 32 * u;
        if (kv >= kv1) break;
        float wf[GEMV_ROWS][VEC_ELEMS];
#pragma unroll
        for (int q = 0; q < GEMV_ROWS; ++q)
#pragma unroll
            for (int j = 0; j < VEC_ELEMS; ++j) wf[q][j] = to_f(wv[u][q].e[j]);
        Vec16 nv;  // the norm weights of this vector (L1-resident, shared by the rows of x)
        if (NORM) nv.raw = load_ro(reinterpret_cast<const uint4*>(norm_w) + kv);
        Vec16 xv[MT];
#pragma unroll
        for (int r = 0; r < MT; ++r)
            if (r < m) xv[r].raw = load_ro(reinterpret_cast<const uint4*>(x + (long long)r * ldx) + kv);
#pragma unroll
        for (int r = 0; r < MT; ++r) {
            if (r < m) {
#pragma unroll
                for (int j = 0; j < VEC_ELEMS; ++j) {
                    float xf = to_f(xv[r].e[j]);
                    if (NORM) xf = rnd(rnd(xf * rstd[r]) * to_f(nv.e[j]));
#pragma unroll
                    for (int q = 0; q < GEMV_ROWS; ++q) acc[q][r] = fmaf(xf, wf[q][j], acc[q][r]);
                }
            }
        }
    }
}

// a warp's sums over k-vectors [kv0, kv1) of its W rows. PIPE: the next trip's W loads are issued before this trip's
// arithmetic (two register buffers: loads stay in flight while the lane computes); else one trip at a time.
template <int MT, int U, bool NORM, bool PIPE>
__device__ __forceinline__ void warp_sums(float (&acc)[GEMV_ROWS][MT], const uint4* const (&wp)[GEMV_ROWS],
                                          const elem_t* __restrict__ x, long long ldx, int m,
                                          const elem_t* __restrict__ norm_w, const float* rstd, int kv0, int kv1) {
    const int lane = threadIdx.x & 31;
    int base = kv0 + lane;
    if (!PIPE) {
        for (; base < kv1; base += 32 * U) {
            Vec16 wv[U][GEMV_ROWS];
            load_trip<U>(wv, wp, base, kv1);
            fma_trip<MT, U, NORM>(acc, wv, x, ldx, m, norm_w, rstd, base, kv1);
        }
        return;
    }
    if (base >= kv1) return;
    Vec16 cur[U][GEMV_ROWS];
    load_trip<U>(cur, wp, base, kv1);
    for (; base < kv1; base += 32 * U) {
        Vec16 nxt[U][GEMV_ROWS];
        const int next = base + 32 * U;
        if (next < kv1) load_trip<U>(nxt, wp, next, kv1);
        fma_trip<MT, U, NORM>(acc, cur, x, ldx, m, norm_w, rstd, base, kv1);
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int q = 0; q < GEMV_ROWS; ++q) cur[u][q].raw = nxt[u][q].raw;
    }
}

template <int MT, int U, bool PIPE>
__device__ __forceinline__ void gemv_tile(elem_t* __restrict__ out, const elem_t* __restrict__ x,
                                          const elem_t* __restrict__ w, const elem_t* __restrict__ bias,
                                          float* __restrict__ partial, int m, int n_w, int k, long long ldx,
                                          long long ldo, int mode, int kv_per_split,
                                          const elem_t* __restrict__ norm_w, float eps,
                                          unsigned long long* stamp) {
    if (stamp != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *stamp = global_timer_ns();
    __shared__ float rstd[MT];
    if (norm_w != nullptr) block_rstd<MT>(rstd, x, m, k, ldx, eps);  // before any warp leaves: it synchronises
    const int lane = threadIdx.x & 31;
    const int gw = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);  // this warp's index in the grid
    const int f = n_w / 2;
    int row[GEMV_ROWS];
    bool valid[GEMV_ROWS];
#pragma unroll
    for (int q = 0; q < GEMV_ROWS; ++q) {
        row[q] = mode == GEMV_SILU_MUL ? gw + q * f : gw * GEMV_ROWS + q;
        valid[q] = mode == GEMV_SILU_MUL ? gw < f : row[q] < n_w;
        if (!valid[q]) row[q] = 0;  // a legal row to load from; its sums are never stored
    }
    if (!valid[0]) return;  // the whole warp leaves together: no shuffle waits on it
    const int kv_all = k / VEC_ELEMS;
    const int kv0 = blockIdx.y * kv_per_split;
    const int kv1 = min(kv_all, kv0 + kv_per_split);
    const uint4* wp[GEMV_ROWS];
#pragma unroll
    for (int q = 0; q < GEMV_ROWS; ++q) wp[q] = reinterpret_cast<const uint4*>(w + (long long)row[q] * k);

    float acc[GEMV_ROWS][MT];
#pragma unroll
    for (int q = 0; q < GEMV_ROWS; ++q)
#pragma unroll
        for (int r = 0; r < MT; ++r) acc[q][r] = 0.f;
    if (norm_w != nullptr) warp_sums<MT, U, true, PIPE>(acc, wp, x, ldx, m, norm_w, rstd, kv0, kv1);
    else warp_sums<MT, U, false, PIPE>(acc, wp, x, ldx, m, norm_w, rstd, kv0, kv1);

    // every lane ends with every sum; lane t keeps accumulator t = (q, r) = (t / MT, t % MT)
    float mine = 0.f;
#pragma unroll
    for (int q = 0; q < GEMV_ROWS; ++q)
#pragma unroll
        for (int r = 0; r < MT; ++r) {
            float v = acc[q][r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            if (lane == q * MT + r) mine = v;
        }
    const int q = lane / MT, r = lane % MT;
    const float up = __shfl_sync(0xffffffffu, mine, (lane + MT) & 31);  // SILU_MUL: lane (0, r) gets (1, r)'s sum
    int my_row = -1;  // row[q] when lane t's row is a real one (unrolled selects: no local-memory array)
#pragma unroll
    for (int p = 0; p < GEMV_ROWS; ++p)
        if (p == q && valid[p]) my_row = row[p];
    if (my_row < 0 || r >= m) return;
    if (gridDim.y > 1) {  // split-K: raw sums, reduced by kvscope_gemv_reduce
        partial[((long long)blockIdx.y * m + r) * n_w + my_row] = mine;
    } else if (mode == GEMV_SILU_MUL) {
        if (q == 0) gemv_epilogue(out, bias, mode, ldo, r, gw, mine, up);
    } else {
        gemv_epilogue(out, bias, mode, ldo, r, my_row, mine, 0.f);
    }
}

// kvscope_gemv_m<MT>: one trip at a time, U vectors per row per trip; kvscope_gemv_m<MT>p: pipelined (PIPE)
#define GEMV_ENTRY(MT, U, PIPE, SUFFIX)                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32)                                                  \
        kvscope_gemv_m##MT##SUFFIX(elem_t* __restrict__ out, const elem_t* __restrict__ x,                         \
                                   const elem_t* __restrict__ w, const elem_t* __restrict__ bias,                  \
                                   float* __restrict__ partial, int m, int n_w, int k, long long ldx,              \
                                   long long ldo, int mode, int kv_per_split, const elem_t* __restrict__ norm_w,   \
                                   float eps, unsigned long long* stamp) {                                         \
        gemv_tile<MT, U, PIPE>(out, x, w, bias, partial, m, n_w, k, ldx, ldo, mode, kv_per_split, norm_w, eps,     \
                               stamp);                                                                             \
    }

GEMV_ENTRY(1, 8, false, )
GEMV_ENTRY(2, 8, false, )
GEMV_ENTRY(4, 4, false, )
GEMV_ENTRY(8, 4, false, )
GEMV_ENTRY(16, 2, false, )
GEMV_ENTRY(1, 4, true, p)
GEMV_ENTRY(2, 4, true, p)
GEMV_ENTRY(4, 2, true, p)
GEMV_ENTRY(8, 2, true, p)
GEMV_ENTRY(16, 1, true, p)

// split-K's second pass: one thread per output (r, n), splits added in order, then the epilogue
extern "C" __global__ void kvscope_gemv_reduce(elem_t* __restrict__ out, const float* __restrict__ partial,
                                               const elem_t* __restrict__ bias, int m, int n_w, int n_out, int splits,
                                               long long ldo, int mode) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)m * n_out) return;
    const int r = (int)(i / n_out), n = (int)(i % n_out);
    const int f = n_w / 2;
    float acc = 0.f, up = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float* p = partial + ((long long)s * m + r) * n_w;
        acc += p[n];
        if (mode == GEMV_SILU_MUL) up += p[n + f];
    }
    gemv_epilogue(out, bias, mode, ldo, r, n, acc, up);
}

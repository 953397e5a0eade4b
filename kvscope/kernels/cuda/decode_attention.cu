// kvscope_decode_attention: one new query token per sequence against the KV cache, grouped-query attention,
// split-KV ("flash-decoding"), float accumulation.
//   q        (B, H, D): element (b, h, d) at q[b * q_stride_b + h * q_stride_h + d]
//   k_cache, v_cache (B, S_max, H_kv, D) contiguous (one layer's views of the token-major cache), or, when
//            `block_table` is not null, one layer's pools (n_blocks, block_size, H_kv, D) contiguous (paged)
//   block_table (B, max_blocks) int32 on the device, or null (the token-major layout): position t of sequence b
//            lives in pool row block_table[b * max_blocks + t / block_size] * block_size + t % block_size of the pool
//            viewed as (n_blocks * block_size, H_kv, D); s_max is then max_blocks * block_size, and block_size a
//            power of two from 8 to 256 (checked on the host; see "Paged layout" below)
//   lengths  (B,) int64 on the device: sequence b attends to cache positions 0 .. lengths[b] - 1 (the new token's
//            own K/V included); clamped to [0, S_max]; a sequence of length 0 gets a zero output
//   window   a sliding window (Mistral's), or 0 for none: sequence b attends only to its last `window` positions,
//            max(0, len - window) .. len - 1 (the query at position len - 1 sees exactly `window` keys with itself)
//   out      (B, H, D) contiguous, the element type; written directly when n_splits == 1
//   part_o   (B, H, n_splits, D) float, part_lse (B, H, n_splits) float: each split's normalised output and its
//            log2-sum-exp2 (n_splits > 1), combined by kvscope_decode_attention_merge, or, when `counters` is not
//            null, by the kernel itself (fused merge, see da_fused_merge)
//   counters (B, gridDim.y) int32 or null: the fused merge's arrival counts; must be zero at launch, and the kernel
//            leaves them zero (the merging block resets its count), so one zeroed buffer serves every later launch
//            and CUDA-graph replay on the same stream
// Query head h uses KV head h / G (G = H / H_kv), as in the Hugging Face checkpoints' repeat-interleave grouping.
//
// Grid (n_splits, H_kv * head_chunks, B), DA_WARPS warps per block. A block takes one (sequence, KV head, split)
// and GP query heads of that KV head's group (G <= GP: all of them, so K and V are read once per group; larger
// groups take several chunks of GP). Each split covers ceil(n / n_splits) positions of the n the sequence attends
// (its device length, or the window's last positions of it), so the work follows the real length, not S_max.
// Inside a block, LT = D / VEC_ELEMS lanes share one cache row, each loading 16 bytes of K and of V; a warp covers
// 32 / LT positions per load and DA_UNROLL loads of K and V are in flight before the first use. Scores: per-lane
// partial dot products of all GP heads, reduced over the LT lanes by a butterfly that halves the heads held at each
// step (lane l_in ends with head l_in / (LT / GP)). Softmax online in base 2 (q pre-scaled by scale * log2(e)), the
// accumulator rescaled only when some maximum grew. Warps are combined through shared memory at the end of the
// split.
//
// Paged layout. A warp loads tiles of SPAN consecutive positions (DM_TILE = 16 on the tensor cores; DA_UNROLL * 32 / LT
// = 4, 8 or 16 on the CUDA cores), and with a block table every tile starts at a multiple of SPAN: the window's first
// position is rounded down to one (the positions before it are masked and never loaded, nor their blocks looked up)
// and each split's length rounded up to one. Block sizes are powers of two >= 8 and SPAN <= 16, so a tile lies in one
// block (block_size >= SPAN) or, at block_size 8 with SPAN 16, in the halves of two: one table read per tile (two in
// that case) gives the pool row of every position of the tile. Each warp reads the table entries of its next tile one
// tile ahead, so the read's latency hides behind a tile of work. Table entries are read only for positions attended
// (below the device length, from the window's first position on), and only those rows of the pools are loaded.

#define DA_WARPS 4
#define DA_UNROLL 4
#define DA_STAGES 3
#define DA_TILE_BYTES (DA_UNROLL * 2 * 32 * 16)  // one warp's DA_UNROLL loads of K and V, 16 bytes a lane
#define DA_MAX_SPLITS 1024
#define DA_FULL 0xffffffffu
#define DA_NEG_INF __int_as_float(0xff800000)  // -inf without math headers (NVRTC)

// 16 bytes global -> shared without passing through registers; src_bytes 0 fills zeros and reads nothing
__device__ __forceinline__ unsigned da_smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void da_copy16(unsigned dst, const elem_t* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void da_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void da_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ uint4 da_lds(unsigned addr) {
    uint4 r;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "r"(addr)
                 : "memory");
    return r;
}

__device__ __forceinline__ float da_exp2(float x) { return exp2f(x); }

// x[GP] partial sums of GP heads on each of LT lanes -> the full sum of head l_in / (LT / GP) on every lane
template <int GP, int LT>
__device__ __forceinline__ float da_reduce_heads(float (&x)[GP], int l_in) {
#pragma unroll
    for (int level = 0; (GP >> level) > 1; ++level) {
        const int h = GP >> level, off = LT >> (level + 1);
        const bool upper = (l_in & off) != 0;
#pragma unroll
        for (int k = 0; k < h / 2; ++k) {
            const float send = upper ? x[k] : x[k + h / 2];
            const float keep = upper ? x[k + h / 2] : x[k];
            x[k] = keep + __shfl_xor_sync(DA_FULL, send, off);
        }
    }
    float s = x[0];
#pragma unroll
    for (int off = LT / GP / 2; off >= 1; off >>= 1) s += __shfl_xor_sync(DA_FULL, s, off);
    return s;
}

// ---- fused merge: the last of a (sequence, head group)'s n_splits blocks to finish combines their partials ---------
// Every block has written its heads' part_o / part_lse rows (n_splits > 1). Each thread fences its own stores, the
// block meets, then one thread counts the block in counters[b * gridDim.y + group] (atomicAdd); the block that sees
// n_splits - 1 before its own count is the last one: every other block's partials are then visible (their fences came
// before their counts), it fences again (no load below moves above the observed count), sets the count back to zero
// for the next launch and merges, reading the partials from the L2 (ld.global.cg, never a stale L1 line).
// `sf`: the block's shared memory (smem_floats floats, free by now). Merge: the weights 2^(lse - max) of up to `hp`
// heads in shared memory (one coalesced copy of their log-sum-exps, then one warp per head); then every thread takes
// DA_FM_ITEMS (head, 4 dimensions) items at once and sums over the splits, DA_FM_ITEMS * DA_FM_SPLITS float4 loads
// in flight per step.
#define DA_FM_ITEMS 1   // (head, 4 dimensions) items a thread sums at once
#define DA_FM_SPLITS 32 // splits a thread loads per item before using them
__device__ __forceinline__ float4 da_ldcg4(const float* p) {
    float4 r;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(r.x), "=f"(r.y), "=f"(r.z), "=f"(r.w) : "l"(p));
    return r;
}
__device__ __forceinline__ float da_ldcg(const float* p) {
    float r;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(r) : "l"(p));
    return r;
}

template <int D>
__device__ __forceinline__ void da_fused_merge(elem_t* __restrict__ out, const float* part_o, const float* part_lse,
                                               int* counters, float* sf, int smem_floats, long long row0,
                                               int valid_heads, int n_splits) {
    constexpr int Q = D / 4;  // float4 columns of a row
    static_assert(D % 4 == 0, "head size");
    int* counter = counters + (long long)blockIdx.z * gridDim.y + blockIdx.y;
    __threadfence();  // this thread's partials reach the device scope before the block is counted
    __syncthreads();  // every thread has fenced (and the shared bytes are free)
    int prev = 0;
    if (threadIdx.x == 0) prev = atomicAdd(counter, 1);
    if (!__syncthreads_or(threadIdx.x == 0 && prev == n_splits - 1)) return;
    __threadfence();  // the loads below come after the observed count
    if (threadIdx.x == 0) atomicExch(counter, 0);  // every block of the group has counted: zero for the next launch

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const int hp = min(valid_heads, smem_floats / (n_splits + 1));  // >= 1: n_splits <= DA_MAX_SPLITS
    float* s_w = sf;                   // [hp][n_splits] weights
    float* s_inv = sf + hp * n_splits;  // [hp] 1 / sum of the weights (0: no position)
    for (int h0 = 0; h0 < valid_heads; h0 += hp) {
        const int nh = min(hp, valid_heads - h0);
        // the heads' log-sum-exps, consecutive rows of part_lse: one coalesced copy, DA_FM_SPLITS loads in flight
        const float* lse0 = part_lse + (row0 + h0) * n_splits;
        const int n_w = nh * n_splits;
        for (int i0 = threadIdx.x; i0 < n_w; i0 += DA_FM_SPLITS * blockDim.x) {
            float x[DA_FM_SPLITS];
#pragma unroll
            for (int j = 0; j < DA_FM_SPLITS; ++j) {
                const int i = i0 + j * blockDim.x;
                x[j] = da_ldcg(lse0 + min(i, n_w - 1));  // unconditional (a valid address): loads batch up
            }
#pragma unroll
            for (int j = 0; j < DA_FM_SPLITS; ++j)
                if (i0 + j * blockDim.x < n_w) s_w[i0 + j * blockDim.x] = x[j];
        }
        __syncthreads();
        for (int hh = warp; hh < nh; hh += n_warps) {  // in place: 2^(lse - max), each lane on its own splits
            float* w = s_w + hh * n_splits;
            float mx = DA_NEG_INF;
            for (int s = lane; s < n_splits; s += 32) mx = fmaxf(mx, w[s]);
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DA_FULL, mx, off));
            float sum = 0.f;
            for (int s = lane; s < n_splits; s += 32) {
                const float e = mx == DA_NEG_INF ? 0.f : exp2f(w[s] - mx);
                w[s] = e;
                sum += e;
            }
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(DA_FULL, sum, off);
            if (lane == 0) s_inv[hh] = sum > 0.f ? 1.f / sum : 0.f;
        }
        __syncthreads();
        const int items = nh * Q;
        for (int i0 = threadIdx.x; i0 < items; i0 += DA_FM_ITEMS * blockDim.x) {
            const float* src[DA_FM_ITEMS];
            const float* wrow[DA_FM_ITEMS];
            float4 acc[DA_FM_ITEMS];
            int n_ok = 0;
#pragma unroll
            for (int k = 0; k < DA_FM_ITEMS; ++k) {
                const int i = i0 + k * blockDim.x;
                const int hh = i < items ? i / Q : 0, c = i < items ? i % Q : 0;
                n_ok += i < items;
                src[k] = part_o + (row0 + h0 + hh) * n_splits * D + c * 4;
                wrow[k] = s_w + hh * n_splits;
                acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
            for (int s0 = 0; s0 < n_splits; s0 += DA_FM_SPLITS) {
                // every load of the step issued before the first use, unconditionally (a split past the last
                // reads the last again, an item past this thread's reads row 0; neither is added)
                float4 v[DA_FM_ITEMS][DA_FM_SPLITS];
#pragma unroll
                for (int k = 0; k < DA_FM_ITEMS; ++k)
#pragma unroll
                    for (int j = 0; j < DA_FM_SPLITS; ++j)
                        v[k][j] = da_ldcg4(src[k] + (long long)min(s0 + j, n_splits - 1) * D);
#pragma unroll
                for (int k = 0; k < DA_FM_ITEMS; ++k)
#pragma unroll
                    for (int j = 0; j < DA_FM_SPLITS; ++j) {
                        if (k < n_ok && s0 + j < n_splits) {  // the items valid for this thread are a prefix
                            const float w = wrow[k][s0 + j];
                            acc[k].x = fmaf(w, v[k][j].x, acc[k].x);
                            acc[k].y = fmaf(w, v[k][j].y, acc[k].y);
                            acc[k].z = fmaf(w, v[k][j].z, acc[k].z);
                            acc[k].w = fmaf(w, v[k][j].w, acc[k].w);
                        }
                    }
            }
#pragma unroll
            for (int k = 0; k < DA_FM_ITEMS; ++k) {
                if (k < n_ok) {
                    const int i = i0 + k * blockDim.x, hh = i / Q, c = i % Q;
                    const float inv = s_inv[hh];
                    elem_t* o = out + (row0 + h0 + hh) * D + c * 4;
                    o[0] = from_f(acc[k].x * inv);
                    o[1] = from_f(acc[k].y * inv);
                    o[2] = from_f(acc[k].z * inv);
                    o[3] = from_f(acc[k].w * inv);
                }
            }
        }
        __syncthreads();  // the weights of these heads are read: the next heads may overwrite them
    }
}

// Which block this is, shared by both kernels: grid (split, (KV head, chunk of ROWS query heads of its group), sequence).
// Its KV head, its first query head and how many of its ROWS are real heads, and the positions [start, end) of its
// split of the positions the sequence attends: [lo, len) with lo = max(0, len - window) with a window (window > 0),
// else 0, len clamped to [0, s_max]; an empty range when the split lies past the end. Paged (`span` > 0, the
// kernel's tile of positions): the splits cover [lo rounded down to a multiple of span, len) in lengths that are
// multiples of span, so every tile starts at a multiple of span; positions below lo are then masked (`da_attended`).
struct DaBlock {
    int split, b, kvh, head0, valid_heads;
    long long lo, start, end;
};

template <int ROWS>
__device__ __forceinline__ DaBlock da_block(const long long* __restrict__ lengths, int n_heads, int n_kv_heads,
                                            int s_max, int n_splits, int window, int span) {
    const int split = blockIdx.x, group = blockIdx.y, b = blockIdx.z;
    const int g_size = n_heads / n_kv_heads, n_chunks = (g_size + ROWS - 1) / ROWS;
    const int kvh = group / n_chunks, chunk = group % n_chunks;
    const int head0 = kvh * g_size + chunk * ROWS;
    const int valid_heads = min(ROWS, g_size - chunk * ROWS);
    long long len = lengths[b];
    len = len < 0 ? 0 : (len > s_max ? s_max : len);
    const long long first = (window > 0 && len > window) ? len - window : 0;  // the window's first position
    const long long base = span > 0 ? first & ~(long long)(span - 1) : first;  // paged: a multiple of SPAN
    long long per_split = (len - base + n_splits - 1) / n_splits;
    if (span > 0) per_split = (per_split + span - 1) & ~(long long)(span - 1);
    const long long start = base + (long long)split * per_split;
    const long long end = min(len, start + per_split);
    return DaBlock{split, b, kvh, head0, valid_heads, first, start, end};
}

// position t is attended by its block: lo <= t < end, one unsigned comparison (t < lo wraps past end - lo)
__device__ __forceinline__ bool da_attended(long long t, long long lo, long long end) {
    return (unsigned long long)(t - lo) < (unsigned long long)(end - lo);
}

// Paged layout: the table entries (physical blocks) of a warp's tile of SPAN positions from t0, a multiple of SPAN
// with t0 < end: x for its positions t0 .. t0 + 7 (read at max(t0, lo): a tile's first positions may lie before the
// window, whose block may no longer be the sequence's), y for t0 + 8 .. t0 + 15 when a tile of 16 spans two blocks of
// 8 (read only when t0 + 8 is below end), else x. `tab`: the sequence's row of the table.
template <int SPAN>
__device__ __forceinline__ int2 da_page_lookup(const int* __restrict__ tab, long long t0, long long lo, long long end,
                                               int block_shift) {
    int2 p;
    p.x = __ldg(tab + (max(t0, lo) >> block_shift));
    p.y = (SPAN > 8 && block_shift == 3 && t0 + 8 < end) ? __ldg(tab + ((t0 + 8) >> block_shift)) : p.x;
    return p;
}

// The rows of a warp's tile of positions from t0: position t0 + o at row r.x + o for o < 8 and r.y + o for o >= 8, in
// the pools (paged: `paged`, the tile's table entries p from da_page_lookup) or in the token-major cache viewed as
// (B * s_max, H_kv, D) (row b * s_max + t).
__device__ __forceinline__ longlong2 da_tile_rows(bool paged, int2 p, long long t0, long long seq_row,
                                                  int block_shift) {
    if (!paged) return make_longlong2(seq_row + t0, seq_row + t0);
    const long long lo = ((long long)p.x << block_shift) + (t0 & ((1LL << block_shift) - 1));
    // block size 8: y is used by tiles of 16 only, which start at multiples of 16
    return make_longlong2(lo, block_shift == 3 ? ((long long)p.y << 3) - 8 : lo);
}

// The end of a split block, shared by both kernels: each of the block's WARPS left, per head row of ROWS, its running
// max m (log2 units), its sum l and its unnormalised output o[D] in shared memory; one (head, dim) per thread and
// step, they are combined into the block's result for positions [start, end): the output itself when there is one
// split, else the split's partial output and log-sum-exp for the merge. Rows (b, h) of (B, H, ...) from head0.
template <int WARPS, int ROWS, int D>
__device__ __forceinline__ void da_combine_warps(elem_t* __restrict__ out, float* __restrict__ part_o,
                                                 float* __restrict__ part_lse, const float (*s_o)[ROWS][D],
                                                 const float (*s_m)[ROWS], const float (*s_l)[ROWS], int valid_heads,
                                                 int b, int n_heads, int head0, int n_splits, int split) {
    for (int i = threadIdx.x; i < valid_heads * D; i += blockDim.x) {
        const int h = i / D, d = i % D;
        float mm = DA_NEG_INF;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) mm = fmaxf(mm, s_m[w][h]);
        float lsum = 0.f, acc = 0.f;
        if (mm != DA_NEG_INF) {
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const float wt = da_exp2(s_m[w][h] - mm);
                lsum += s_l[w][h] * wt;
                acc += s_o[w][h][d] * wt;
            }
        }
        const float res = lsum > 0.f ? acc / lsum : 0.f;
        const long long oh = (long long)b * n_heads + head0 + h;  // row of (b, h) in (B, H, ...)
        if (n_splits == 1) {
            out[oh * D + d] = from_f(res);
        } else {
            part_o[(oh * n_splits + split) * D + d] = res;
            if (d == 0) part_lse[oh * n_splits + split] = lsum > 0.f ? mm + __log2f(lsum) : DA_NEG_INF;
        }
    }
}

template <int D, int GP>
__device__ __forceinline__ void da_split(elem_t* __restrict__ out, float* __restrict__ part_o,
                                         float* __restrict__ part_lse, int* counters, const elem_t* __restrict__ q,
                                         const elem_t* __restrict__ k_cache, const elem_t* __restrict__ v_cache,
                                         const long long* __restrict__ lengths,
                                         const int* __restrict__ block_table, int max_blocks, int block_size,
                                         long long q_stride_b, long long q_stride_h, int n_heads, int n_kv_heads,
                                         int s_max, int n_splits, int window, float scale_log2) {
    constexpr int V = VEC_ELEMS;
    constexpr int LT = D / V;    // lanes per cache row
    constexpr int TPW = 32 / LT;  // positions per warp per load
    constexpr int HL = LT / GP;   // lanes holding the same head after the reduction
    constexpr int STEP = DA_UNROLL * TPW;
    static_assert(D % V == 0 && LT <= 32 && 32 % LT == 0 && GP <= LT, "unsupported head size / group");
    // per warp, DA_STAGES tiles of DA_UNROLL loads of K and of V (each lane reads back only its own 16-byte slots);
    // after the loop the same bytes hold the warps' partial results
    __shared__ __align__(16) unsigned char smem[DA_WARPS * DA_STAGES * DA_TILE_BYTES];
    static_assert(DA_WARPS * GP * (D + 2) * (int)sizeof(float) <= DA_WARPS * DA_STAGES * DA_TILE_BYTES, "smem");
    float(*s_acc)[GP][D] = reinterpret_cast<float(*)[GP][D]>(smem);                       // [DA_WARPS][GP][D]
    float(*s_m)[GP] = reinterpret_cast<float(*)[GP]>(smem + DA_WARPS * GP * D * sizeof(float));  // [DA_WARPS][GP]
    float(*s_l)[GP] = s_m + DA_WARPS;                                                       // [DA_WARPS][GP]

    const bool paged = block_table != nullptr;  // uniform: the same branch in every thread
    const DaBlock blk = da_block<GP>(lengths, n_heads, n_kv_heads, s_max, n_splits, window, paged ? STEP : 0);
    const int split = blk.split, b = blk.b, kvh = blk.kvh, head0 = blk.head0, valid_heads = blk.valid_heads;
    const long long lo = blk.lo, start = blk.start, end = blk.end;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tg = lane / LT, l_in = lane % LT;
    const int hsel = l_in / HL;

    float qf[GP][V];  // this lane's slice of every query head, scaled to base 2
#pragma unroll
    for (int g = 0; g < GP; ++g) {
        if (g < valid_heads) {
            Vec16 r;
            r.raw = *reinterpret_cast<const uint4*>(q + b * q_stride_b + (head0 + g) * q_stride_h + l_in * V);
#pragma unroll
            for (int e = 0; e < V; ++e) qf[g][e] = to_f(r.e[e]) * scale_log2;
        } else {
#pragma unroll
            for (int e = 0; e < V; ++e) qf[g][e] = 0.f;
        }
    }
    float acc[GP][V];
#pragma unroll
    for (int g = 0; g < GP; ++g)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[g][e] = 0.f;
    float m = DA_NEG_INF, l = 0.f;  // running maximum and sum of head hsel over this lane's positions

    const long long row = (long long)n_kv_heads * D;  // elements between consecutive rows
    const elem_t* kb = k_cache + (long long)kvh * D + l_in * V;  // + row * (the position's row)
    const elem_t* vb = v_cache + (long long)kvh * D + l_in * V;
    const long long seq_row = (long long)b * s_max;  // the token-major layout: the sequence's first row
    const int* tab = paged ? block_table + (long long)b * max_blocks : nullptr;  // the sequence's table row
    const int block_shift = paged ? __ffs(block_size) - 1 : 0;

    // tile `it` of this warp: positions start + (it * DA_WARPS + warp) * STEP + u * TPW + tg, u < DA_UNROLL
    const long long first = start + (long long)warp * STEP;
    const int n_tiles = first < end ? (int)((end - first + DA_WARPS * STEP - 1) / (DA_WARPS * STEP)) : 0;
    const unsigned slots = da_smem_addr(smem) + warp * DA_STAGES * DA_TILE_BYTES + lane * 16;  // + stage, u, K|V
    int2 pg = make_int2(0, 0);  // paged: the table entries of the next tile to issue (da_page_lookup)
    auto lookup = [&](int it) {
        if (paged && it < n_tiles) pg = da_page_lookup<STEP>(tab, first + (long long)it * DA_WARPS * STEP, lo, end,
                                                             block_shift);
    };
    auto issue = [&](int it) {
        const unsigned st = slots + (it % DA_STAGES) * DA_TILE_BYTES;
        const long long t0 = first + (long long)it * DA_WARPS * STEP;
        const longlong2 r = da_tile_rows(paged, pg, t0, seq_row, block_shift);
#pragma unroll
        for (int u = 0; u < DA_UNROLL; ++u) {
            const int o = u * TPW + tg;  // the position's offset in the tile
            const bool ok = da_attended(t0 + o, lo, end);
            const long long off = ok ? ((u * TPW < 8 ? r.x : r.y) + o) * row : 0;
            da_copy16(st + (2 * u) * 512, kb + off, ok ? 16 : 0);
            da_copy16(st + (2 * u + 1) * 512, vb + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int it = 0; it < DA_STAGES - 1; ++it) {
        lookup(it);
        if (it < n_tiles) issue(it);
        da_commit();  // one group per tile, empty ones too, so that the wait below counts tiles
    }
    lookup(DA_STAGES - 1);
    for (int it = 0; it < n_tiles; ++it) {
        if (it + DA_STAGES - 1 < n_tiles) issue(it + DA_STAGES - 1);
        lookup(it + DA_STAGES);  // used at the next step: the read's latency hides behind this tile
        da_commit();
        da_wait<DA_STAGES - 1>();  // tile `it` has landed
        const unsigned st = slots + (it % DA_STAGES) * DA_TILE_BYTES;
        const long long t0 = first + (long long)it * DA_WARPS * STEP;
        float s[DA_UNROLL];
#pragma unroll
        for (int u = 0; u < DA_UNROLL; ++u) {
            Vec16 kv;
            kv.raw = da_lds(st + (2 * u) * 512);
            float kf[V];
#pragma unroll
            for (int e = 0; e < V; ++e) kf[e] = to_f(kv.e[e]);
            float part[GP];
#pragma unroll
            for (int g = 0; g < GP; ++g) {
                float a = 0.f;
#pragma unroll
                for (int e = 0; e < V; ++e) a = fmaf(qf[g][e], kf[e], a);
                part[g] = a;
            }
            const float sc = da_reduce_heads<GP, LT>(part, l_in);
            s[u] = da_attended(t0 + u * TPW + tg, lo, end) ? sc : DA_NEG_INF;
        }
        float mx = s[0];
#pragma unroll
        for (int u = 1; u < DA_UNROLL; ++u) mx = fmaxf(mx, s[u]);
#pragma unroll
        for (int off = LT; off < 32; off <<= 1) mx = fmaxf(mx, __shfl_xor_sync(DA_FULL, mx, off));
        const float m_new = fmaxf(m, mx);  // finite: some position of the tile is attended (t0, or lo)
        const float alpha = da_exp2(m - m_new);
        if (__any_sync(DA_FULL, m_new > m)) {
#pragma unroll
            for (int g = 0; g < GP; ++g) {
                const float a = __shfl_sync(DA_FULL, alpha, g * HL);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[g][e] *= a;
            }
        }
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < DA_UNROLL; ++u) {
            const float p = da_exp2(s[u] - m_new);
            psum += p;
            Vec16 vv;
            vv.raw = da_lds(st + (2 * u + 1) * 512);
            float vf[V];
#pragma unroll
            for (int e = 0; e < V; ++e) vf[e] = to_f(vv.e[e]);
#pragma unroll
            for (int g = 0; g < GP; ++g) {
                const float pg = __shfl_sync(DA_FULL, p, tg * LT + g * HL);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[g][e] = fmaf(pg, vf[e], acc[g][e]);
            }
        }
        l = l * alpha + psum;
        m = m_new;
    }
    da_wait<0>();  // no copy may land in the bytes reused below

    // the warp's positions together: sums over the lanes of other rows (same l_in); m is already shared
#pragma unroll
    for (int off = LT; off < 32; off <<= 1) {
        l += __shfl_xor_sync(DA_FULL, l, off);
#pragma unroll
        for (int g = 0; g < GP; ++g)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[g][e] += __shfl_xor_sync(DA_FULL, acc[g][e], off);
    }
    __syncthreads();  // every warp is done with its tiles: the shared bytes now hold partial results
    if (tg == 0) {
#pragma unroll
        for (int g = 0; g < GP; ++g)
#pragma unroll
            for (int e = 0; e < V; ++e) s_acc[warp][g][l_in * V + e] = acc[g][e];
        if (l_in % HL == 0) {
            s_m[warp][hsel] = m;
            s_l[warp][hsel] = l;
        }
    }
    __syncthreads();

    // the block's warps together
    da_combine_warps<DA_WARPS, GP, D>(out, part_o, part_lse, s_acc, s_m, s_l, valid_heads, b, n_heads, head0,
                                      n_splits, split);
    if (counters != nullptr && n_splits > 1)
        da_fused_merge<D>(out, part_o, part_lse, counters, reinterpret_cast<float*>(smem),
                          (int)(sizeof(smem) / sizeof(float)), (long long)b * n_heads + head0, valid_heads, n_splits);
}

#define DA_ENTRY(D, GP)                                                                                              \
    extern "C" __global__ void __launch_bounds__(DA_WARPS * 32) kvscope_decode_attention_d##D##_g##GP(              \
        elem_t* out, float* part_o, float* part_lse, int* counters, const elem_t* q, const elem_t* k_cache,          \
        const elem_t* v_cache, const long long* lengths, const int* block_table, int max_blocks, int block_size,     \
        long long q_stride_b, long long q_stride_h, int n_heads, int n_kv_heads, int s_max, int n_splits,            \
        int window, float scale_log2) {                                                                              \
        da_split<D, GP>(out, part_o, part_lse, counters, q, k_cache, v_cache, lengths, block_table, max_blocks,      \
                        block_size, q_stride_b, q_stride_h, n_heads, n_kv_heads, s_max, n_splits, window,            \
                        scale_log2);                                                                                 \
    }

DA_ENTRY(64, 1)
DA_ENTRY(64, 2)
DA_ENTRY(64, 4)
DA_ENTRY(64, 8)
DA_ENTRY(128, 1)
DA_ENTRY(128, 2)
DA_ENTRY(128, 4)
DA_ENTRY(128, 8)

// ---- tensor-core variant (bf16 / fp16): kvscope_decode_attention_mma_d<D> -------------------------------------------
// Same arguments, grid and semantics; up to DM_ROWS query heads of a KV head's group per block (the rows of the mma,
// padded), DM_WARPS warps, DM_STAGES * 2 * DM_TILE * D * 2 bytes of dynamic shared memory. Each warp takes tiles of
// DM_TILE positions: K and V copied into shared memory (cp.async, 16 bytes a lane, each row's 16-byte chunks swizzled
// by the row so that ldmatrix reads without bank conflicts), S = Q K^T and O += P V on the tensor cores
// (mma.m16n8k16, float accumulation; P rounded to the element type as flash attention does, the softmax sum taken
// over the rounded P so that the output stays a weighted average), the online softmax in base 2 on the scores.
#if !defined(KV_F32)
#define DM_WARPS 4
#define DM_STAGES 3
#define DM_TILE 16
#define DM_ROWS 16

__device__ __forceinline__ unsigned dm_pack(float lo, float hi) {  // two floats -> one register of two elements
    unsigned r;
#if defined(KV_BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

__device__ __forceinline__ void dm_mma(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if defined(KV_BF16)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
#endif
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void dm_ldsm(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}

__device__ __forceinline__ void dm_ldsm_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}

template <int D>
__device__ __forceinline__ void dm_split(elem_t* __restrict__ out, float* __restrict__ part_o,
                                         float* __restrict__ part_lse, int* counters, const elem_t* __restrict__ q,
                                         const elem_t* __restrict__ k_cache, const elem_t* __restrict__ v_cache,
                                         const long long* __restrict__ lengths,
                                         const int* __restrict__ block_table, int max_blocks, int block_size,
                                         long long q_stride_b, long long q_stride_h, int n_heads, int n_kv_heads,
                                         int s_max, int n_splits, int window, float scale_log2) {
    constexpr int C = D / 8;                     // 16-byte chunks of a cache row
    constexpr int KS = D / 16;                   // k-steps of S = Q K^T
    constexpr int NT = D / 8;                    // n-tiles of O = P V
    constexpr int ROW_BYTES = C * 16;
    constexpr int TILE_BYTES = DM_TILE * ROW_BYTES;  // K (or V) of one tile
    constexpr int STAGE_BYTES = 2 * TILE_BYTES;
    constexpr int STEP = DM_WARPS * DM_TILE;         // positions of one round of the block's warps
    static_assert(D % 16 == 0 && C % 2 == 0, "head size");
    static_assert(DM_WARPS * DM_ROWS * (D + 2) * (int)sizeof(float) <= DM_WARPS * DM_STAGES * STAGE_BYTES, "smem");
    extern __shared__ __align__(16) unsigned char dm_smem[];
    float(*s_o)[DM_ROWS][D] = reinterpret_cast<float(*)[DM_ROWS][D]>(dm_smem);  // [DM_WARPS][DM_ROWS][D]
    float(*s_m)[DM_ROWS] = reinterpret_cast<float(*)[DM_ROWS]>(dm_smem + DM_WARPS * DM_ROWS * D * sizeof(float));
    float(*s_l)[DM_ROWS] = s_m + DM_WARPS;

    const bool paged = block_table != nullptr;  // uniform: the same branch in every thread
    const DaBlock blk = da_block<DM_ROWS>(lengths, n_heads, n_kv_heads, s_max, n_splits, window, paged ? DM_TILE : 0);
    const int split = blk.split, b = blk.b, kvh = blk.kvh, head0 = blk.head0, valid_heads = blk.valid_heads;
    const long long lo = blk.lo, start = blk.start, end = blk.end;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t4 = lane & 3;  // the mma fragments' row group and column pair
    const bool row0 = g < valid_heads, row1 = g + 8 < valid_heads;

    unsigned qa[KS][4];  // Q as the A operand: rows g / g + 8 (heads), columns ks*16 + t4*2 (+8)
    {
        const elem_t* q0 = q + b * q_stride_b + (long long)(head0 + g) * q_stride_h + t4 * 2;
        const elem_t* q1 = q0 + 8 * q_stride_h;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            qa[ks][0] = row0 ? *reinterpret_cast<const unsigned*>(q0 + ks * 16) : 0u;
            qa[ks][1] = row1 ? *reinterpret_cast<const unsigned*>(q1 + ks * 16) : 0u;
            qa[ks][2] = row0 ? *reinterpret_cast<const unsigned*>(q0 + ks * 16 + 8) : 0u;
            qa[ks][3] = row1 ? *reinterpret_cast<const unsigned*>(q1 + ks * 16 + 8) : 0u;
        }
    }
    float o[NT][4];  // O: rows g / g + 8, columns dn*8 + t4*2 + {0, 1}
#pragma unroll
    for (int dn = 0; dn < NT; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
    float m0 = DA_NEG_INF, m1 = DA_NEG_INF, l0 = 0.f, l1 = 0.f;  // rows g and g + 8; l over this lane's columns

    const long long row = (long long)n_kv_heads * D;  // elements between consecutive rows
    const elem_t* kb = k_cache + (long long)kvh * D;  // + row * (the position's row)
    const elem_t* vb = v_cache + (long long)kvh * D;
    const long long seq_row = (long long)b * s_max;  // the token-major layout: the sequence's first row
    const int* tab = paged ? block_table + (long long)b * max_blocks : nullptr;  // the sequence's table row
    const int block_shift = paged ? __ffs(block_size) - 1 : 0;
    const long long first = start + (long long)warp * DM_TILE;
    const int n_tiles = first < end ? (int)((end - first + STEP - 1) / STEP) : 0;
    const unsigned base = da_smem_addr(dm_smem) + warp * DM_STAGES * STAGE_BYTES;
    int2 pg = make_int2(0, 0);  // paged: the table entries of the next tile to issue (da_page_lookup)
    auto lookup = [&](int it) {
        if (paged && it < n_tiles) pg = da_page_lookup<DM_TILE>(tab, first + (long long)it * STEP, lo, end,
                                                                block_shift);
    };
    auto issue = [&](int it) {
        const unsigned st = base + (it % DM_STAGES) * STAGE_BYTES;
        const long long t0 = first + (long long)it * STEP;
        const longlong2 r = da_tile_rows(paged, pg, t0, seq_row, block_shift);
#pragma unroll
        for (int i = 0; i < C / 2; ++i) {
            const int j = lane + 32 * i, t = j / C, c = j % C;  // 16 rows of C chunks, consecutive lanes along a row
            const bool ok = da_attended(t0 + t, lo, end);
            // rows t < 8 are those of i < C / 4 (32 lanes cover 32 / C rows per i)
            const long long off = ok ? ((i < C / 4 ? r.x : r.y) + t) * row + c * 8 : 0;
            const unsigned dst = st + t * ROW_BYTES + ((c ^ (t & 7)) << 4);
            da_copy16(dst, kb + off, ok ? 16 : 0);
            da_copy16(dst + TILE_BYTES, vb + off, ok ? 16 : 0);
        }
    };
#pragma unroll
    for (int it = 0; it < DM_STAGES - 1; ++it) {
        lookup(it);
        if (it < n_tiles) issue(it);
        da_commit();
    }
    lookup(DM_STAGES - 1);
    // ldmatrix rows of this lane: S's B operand (tokens (lane/16)*8 + lane%8, chunk 2ks + (lane/8)%2) and, transposed,
    // O's B operand (tokens ((lane/8)%2)*8 + lane%8, chunk dn + lane/16)
    const int tk = (lane >> 4) * 8 + (lane & 7), ck = (lane >> 3) & 1;
    const int tv = ((lane >> 3) & 1) * 8 + (lane & 7), cv = lane >> 4;
    for (int it = 0; it < n_tiles; ++it) {
        // ldmatrix reads rows that other lanes copied, so the warp meets twice a tile: before the copies into the
        // stage that the previous tile's ldmatrix read (write after read), and after the wait, so that every lane's
        // copies of this tile have landed before any lane reads them (cp.async.wait_group covers the lane's own)
        __syncwarp();
        if (it + DM_STAGES - 1 < n_tiles) issue(it + DM_STAGES - 1);
        lookup(it + DM_STAGES);  // used at the next step: the read's latency hides behind this tile
        da_commit();
        da_wait<DM_STAGES - 1>();
        __syncwarp();
        const unsigned st = base + (it % DM_STAGES) * STAGE_BYTES;
        const long long t0 = first + (long long)it * STEP;
        float s[2][4];  // S: rows g / g + 8, tokens nt*8 + t4*2 + {0, 1}
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            unsigned r0, r1, r2, r3;
            const int c = 2 * ks + ck;
            dm_ldsm(st + tk * ROW_BYTES + ((c ^ (tk & 7)) << 4), r0, r1, r2, r3);
            dm_mma(s[0], qa[ks], r0, r1);
            dm_mma(s[1], qa[ks], r2, r3);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[nt][e] = da_attended(t0 + nt * 8 + t4 * 2 + (e & 1), lo, end) ? s[nt][e] * scale_log2 : DA_NEG_INF;
        float mx0 = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float mx1 = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        mx0 = fmaxf(mx0, __shfl_xor_sync(DA_FULL, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(DA_FULL, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(DA_FULL, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(DA_FULL, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);  // finite: some position is attended (t0, or lo)
        const float a0 = da_exp2(m0 - n0), a1 = da_exp2(m1 - n1);
        if (__any_sync(DA_FULL, n0 > m0 || n1 > m1)) {
#pragma unroll
            for (int dn = 0; dn < NT; ++dn) {
                o[dn][0] *= a0;
                o[dn][1] *= a0;
                o[dn][2] *= a1;
                o[dn][3] *= a1;
            }
        }
        float p[2][4];
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) p[nt][e] = rnd(da_exp2(s[nt][e] - (e < 2 ? n0 : n1)));
        l0 = l0 * a0 + ((p[0][0] + p[0][1]) + (p[1][0] + p[1][1]));
        l1 = l1 * a1 + ((p[0][2] + p[0][3]) + (p[1][2] + p[1][3]));
        m0 = n0;
        m1 = n1;
        const unsigned pa[4] = {dm_pack(p[0][0], p[0][1]), dm_pack(p[0][2], p[0][3]), dm_pack(p[1][0], p[1][1]),
                                dm_pack(p[1][2], p[1][3])};
#pragma unroll
        for (int dn = 0; dn < NT; dn += 2) {
            unsigned r0, r1, r2, r3;
            const int c = dn + cv;
            dm_ldsm_t(st + TILE_BYTES + tv * ROW_BYTES + ((c ^ (tv & 7)) << 4), r0, r1, r2, r3);
            dm_mma(o[dn], pa, r0, r1);
            dm_mma(o[dn + 1], pa, r2, r3);
        }
    }
    da_wait<0>();
    l0 += __shfl_xor_sync(DA_FULL, l0, 1);
    l0 += __shfl_xor_sync(DA_FULL, l0, 2);
    l1 += __shfl_xor_sync(DA_FULL, l1, 1);
    l1 += __shfl_xor_sync(DA_FULL, l1, 2);
    __syncthreads();  // every warp is done with its tiles: the shared bytes now hold partial results
#pragma unroll
    for (int dn = 0; dn < NT; ++dn) {
        s_o[warp][g][dn * 8 + t4 * 2] = o[dn][0];
        s_o[warp][g][dn * 8 + t4 * 2 + 1] = o[dn][1];
        s_o[warp][g + 8][dn * 8 + t4 * 2] = o[dn][2];
        s_o[warp][g + 8][dn * 8 + t4 * 2 + 1] = o[dn][3];
    }
    if (t4 == 0) {
        s_m[warp][g] = m0;
        s_m[warp][g + 8] = m1;
        s_l[warp][g] = l0;
        s_l[warp][g + 8] = l1;
    }
    __syncthreads();
    da_combine_warps<DM_WARPS, DM_ROWS, D>(out, part_o, part_lse, s_o, s_m, s_l, valid_heads, b, n_heads, head0,
                                           n_splits, split);
    if (counters != nullptr && n_splits > 1)
        da_fused_merge<D>(out, part_o, part_lse, counters, reinterpret_cast<float*>(dm_smem),
                          DM_WARPS * DM_STAGES * STAGE_BYTES / (int)sizeof(float), (long long)b * n_heads + head0,
                          valid_heads, n_splits);
}

#define DM_ENTRY(D)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(DM_WARPS * 32) kvscope_decode_attention_mma_d##D(                  \
        elem_t* out, float* part_o, float* part_lse, int* counters, const elem_t* q, const elem_t* k_cache,          \
        const elem_t* v_cache, const long long* lengths, const int* block_table, int max_blocks, int block_size,     \
        long long q_stride_b, long long q_stride_h, int n_heads, int n_kv_heads, int s_max, int n_splits,            \
        int window, float scale_log2) {                                                                              \
        dm_split<D>(out, part_o, part_lse, counters, q, k_cache, v_cache, lengths, block_table, max_blocks,          \
                    block_size, q_stride_b, q_stride_h, n_heads, n_kv_heads, s_max, n_splits, window, scale_log2);   \
    }

DM_ENTRY(64)
DM_ENTRY(128)
#endif  // !KV_F32

// out[r, :] = sum_s 2^(lse[r, s] - M) * part_o[r, s, :] / sum_s 2^(lse[r, s] - M), one block of DA_MERGE_WARPS warps
// per row r = (b, h): the weights in shared memory, warp w sums the splits w, w + DA_MERGE_WARPS, ... for every
// dimension (lane, lane + 32, ...: D <= 32 * DA_MERGE_DIMS), several loads in flight, then the warps' sums are added.
// A row whose splits all saw no position (length 0) gets zeros.
#define DA_MERGE_WARPS 8
#define DA_MERGE_DIMS 4
extern "C" __global__ void __launch_bounds__(DA_MERGE_WARPS * 32) kvscope_decode_attention_merge(
    elem_t* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_lse, int n_splits,
    int d) {
    __shared__ float s_w[DA_MAX_SPLITS];
    __shared__ float s_red[DA_MERGE_WARPS][32 * DA_MERGE_DIMS];
    __shared__ float s_max[DA_MERGE_WARPS], s_sum[DA_MERGE_WARPS];
    const long long r = blockIdx.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float* lse = part_lse + r * n_splits;
    float mx = DA_NEG_INF;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) mx = fmaxf(mx, lse[s]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(DA_FULL, mx, off));
    if (lane == 0) s_max[warp] = mx;
    __syncthreads();
    mx = DA_NEG_INF;
#pragma unroll
    for (int w = 0; w < DA_MERGE_WARPS; ++w) mx = fmaxf(mx, s_max[w]);
    float wsum = 0.f;
    for (int s = threadIdx.x; s < n_splits; s += blockDim.x) {
        const float w = mx == DA_NEG_INF ? 0.f : exp2f(lse[s] - mx);
        s_w[s] = w;
        wsum += w;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) wsum += __shfl_xor_sync(DA_FULL, wsum, off);
    if (lane == 0) s_sum[warp] = wsum;
    __syncthreads();
    wsum = 0.f;
#pragma unroll
    for (int w = 0; w < DA_MERGE_WARPS; ++w) wsum += s_sum[w];
    const float* po = part_o + r * (long long)n_splits * d;
    float acc[DA_MERGE_DIMS];
#pragma unroll
    for (int j = 0; j < DA_MERGE_DIMS; ++j) acc[j] = 0.f;
#pragma unroll 4
    for (int s = warp; s < n_splits; s += DA_MERGE_WARPS) {
        const float w = s_w[s];
#pragma unroll
        for (int j = 0; j < DA_MERGE_DIMS; ++j) {
            const int i = lane + 32 * j;
            if (i < d) acc[j] = fmaf(w, po[(long long)s * d + i], acc[j]);
        }
    }
#pragma unroll
    for (int j = 0; j < DA_MERGE_DIMS; ++j) s_red[warp][lane + 32 * j] = acc[j];
    __syncthreads();
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < DA_MERGE_WARPS; ++w) o += s_red[w][i];
        out[r * d + i] = from_f(wsum > 0.f ? o / wsum : 0.f);
    }
}

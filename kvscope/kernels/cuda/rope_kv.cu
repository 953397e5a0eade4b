// kvscope_rope_kv: rotate-half RoPE over the query and key heads of a fused projection, in place, and write the
// rotated keys and the values into the KV cache, in one pass.
//   qkv    (B, S, H + 2*H_kv, D) contiguous: query heads, key heads, value heads of B*S tokens
//   cos    (S_max, D), sin_rot (S_max, D): tables; sin_rot's first half is -sin, its second +sin
//   k_cache, v_cache (B, S_max, H_kv, D) contiguous (one layer's views of the token-major cache)
//   lengths: null (prefill: token s of every sequence sits at position s) or (B,) int64 on the device (decode:
//            token s of sequence b sits at lengths[b] + s)
// The slots entries (kvscope_rope_kv_slots_vec / _scalar) write a paged cache instead: qkv is (T, 1, H + 2*H_kv, D),
// T tokens of any sequences; lengths (T,) int64 is each token's position (its row of the tables); slots (T,) int64
// the pool row its key and value go to, k_cache / v_cache being pools (n_blocks, block_size, H_kv, D) contiguous
// viewed as (n_blocks * block_size, H_kv, D); a negative slot writes nothing (a padding row of a CUDA-graph bucket),
// though its query and key heads are still rotated in qkv. The plain entries keep their arguments (the C++ benchmark
// launches them as they are).
// Rounding follows torch's three-kernel form: round(round(x * cos) + x_partner * sin_rot).
// One thread per (token, head, V pairs of dimensions (j, j + D/2)); vec: V = VEC_ELEMS (D/2 a multiple of it).

template <int V>
__device__ __forceinline__ void rope_kv_at(elem_t* __restrict__ qkv, const elem_t* __restrict__ cos,
                                           const elem_t* __restrict__ sin_rot, elem_t* __restrict__ k_cache,
                                           elem_t* __restrict__ v_cache, const long long* __restrict__ lengths,
                                           const long long* __restrict__ slots, int n_tokens, int s_len, int n_heads,
                                           int n_kv_heads, int d, int s_max) {
    const int half = d / 2, per_head = half / V, all_heads = n_heads + 2 * n_kv_heads;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * all_heads * per_head) return;
    const int p = (int)(idx % per_head);
    const int h = (int)((idx / per_head) % all_heads);
    const long long t = idx / ((long long)per_head * all_heads);
    const int b = (int)(t / s_len), s = (int)(t % s_len);
    const long long pos = (lengths == nullptr ? 0 : lengths[b]) + s;
    const int j = p * V;
    elem_t* x = qkv + (t * all_heads + h) * d;
    elem_t* dst = nullptr;  // cache row of this key / value head, or none for a query head (or a negative slot)
    if (h >= n_heads) {
        const int kvh = (h - n_heads) % n_kv_heads;
        elem_t* base = h < n_heads + n_kv_heads ? k_cache : v_cache;
        const long long row = slots == nullptr ? (long long)b * s_max + pos : slots[t];  // (B * S_max) or pool rows
        if (row >= 0) dst = base + (row * n_kv_heads + kvh) * d;
    }
    if (V == VEC_ELEMS) {
        Vec16 lo, hi;
        lo.raw = *reinterpret_cast<const uint4*>(x + j);
        hi.raw = *reinterpret_cast<const uint4*>(x + j + half);
        if (h < n_heads + n_kv_heads) {
            Vec16 clo, chi, slo, shi, olo, ohi;
            clo.raw = *reinterpret_cast<const uint4*>(cos + pos * d + j);
            chi.raw = *reinterpret_cast<const uint4*>(cos + pos * d + j + half);
            slo.raw = *reinterpret_cast<const uint4*>(sin_rot + pos * d + j);
            shi.raw = *reinterpret_cast<const uint4*>(sin_rot + pos * d + j + half);
#pragma unroll
            for (int e = 0; e < V; ++e) {
                const float a = to_f(lo.e[e]), c = to_f(hi.e[e]);
                olo.e[e] = from_f(rnd(a * to_f(clo.e[e])) + c * to_f(slo.e[e]));
                ohi.e[e] = from_f(rnd(c * to_f(chi.e[e])) + a * to_f(shi.e[e]));
            }
            *reinterpret_cast<uint4*>(x + j) = olo.raw;
            *reinterpret_cast<uint4*>(x + j + half) = ohi.raw;
            lo = olo; hi = ohi;
        }
        if (dst != nullptr) {
            *reinterpret_cast<uint4*>(dst + j) = lo.raw;
            *reinterpret_cast<uint4*>(dst + j + half) = hi.raw;
        }
    } else {
        elem_t lo = x[j], hi = x[j + half];
        if (h < n_heads + n_kv_heads) {
            const float a = to_f(lo), c = to_f(hi);
            lo = from_f(rnd(a * to_f(cos[pos * d + j])) + c * to_f(sin_rot[pos * d + j]));
            hi = from_f(rnd(c * to_f(cos[pos * d + j + half])) + a * to_f(sin_rot[pos * d + j + half]));
            x[j] = lo;
            x[j + half] = hi;
        }
        if (dst != nullptr) {
            dst[j] = lo;
            dst[j + half] = hi;
        }
    }
}

extern "C" __global__ void kvscope_rope_kv_vec(elem_t* qkv, const elem_t* cos, const elem_t* sin_rot,
                                               elem_t* k_cache, elem_t* v_cache, const long long* lengths,
                                               int n_tokens, int s_len, int n_heads, int n_kv_heads, int d,
                                               int s_max) {
    rope_kv_at<VEC_ELEMS>(qkv, cos, sin_rot, k_cache, v_cache, lengths, nullptr, n_tokens, s_len, n_heads,
                          n_kv_heads, d, s_max);
}

extern "C" __global__ void kvscope_rope_kv_scalar(elem_t* qkv, const elem_t* cos, const elem_t* sin_rot,
                                                  elem_t* k_cache, elem_t* v_cache, const long long* lengths,
                                                  int n_tokens, int s_len, int n_heads, int n_kv_heads, int d,
                                                  int s_max) {
    rope_kv_at<1>(qkv, cos, sin_rot, k_cache, v_cache, lengths, nullptr, n_tokens, s_len, n_heads, n_kv_heads, d,
                  s_max);
}

// the paged cache: one token per row of qkv (s_len 1), its position lengths[t], its pool row slots[t] (< 0: none)
extern "C" __global__ void kvscope_rope_kv_slots_vec(elem_t* qkv, const elem_t* cos, const elem_t* sin_rot,
                                                     elem_t* k_cache, elem_t* v_cache, const long long* lengths,
                                                     const long long* slots, int n_tokens, int n_heads,
                                                     int n_kv_heads, int d) {
    rope_kv_at<VEC_ELEMS>(qkv, cos, sin_rot, k_cache, v_cache, lengths, slots, n_tokens, 1, n_heads, n_kv_heads, d,
                          0);
}

extern "C" __global__ void kvscope_rope_kv_slots_scalar(elem_t* qkv, const elem_t* cos, const elem_t* sin_rot,
                                                        elem_t* k_cache, elem_t* v_cache, const long long* lengths,
                                                        const long long* slots, int n_tokens, int n_heads,
                                                        int n_kv_heads, int d) {
    rope_kv_at<1>(qkv, cos, sin_rot, k_cache, v_cache, lengths, slots, n_tokens, 1, n_heads, n_kv_heads, d, 0);
}

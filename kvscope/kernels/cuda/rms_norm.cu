// kvscope_rms_norm: out[r] = round(x[r] * rsqrt(mean(x[r]^2) + eps)) * w, one block per row, float statistics.
// x rows may be strided (x_stride elements apart), out is contiguous. `stamp`, when not null, receives the global
// timer at the start of block 0: the kernel then also marks a region boundary inside a CUDA graph.
// vec: 16-byte loads (dim, x_stride multiples of VEC_ELEMS, aligned pointers); scalar: any layout.

template <int V>
__device__ __forceinline__ void rms_norm_row(elem_t* __restrict__ out, const elem_t* __restrict__ x,
                                             const elem_t* __restrict__ w, int dim, float eps) {
    __shared__ float warp_sums[32];
    float ss = 0.f;
    for (int i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
        if (V == VEC_ELEMS) {
            Vec16 a; a.raw = *reinterpret_cast<const uint4*>(x + i);
#pragma unroll
            for (int j = 0; j < V; ++j) { float f = to_f(a.e[j]); ss += f * f; }
        } else {
            float f = to_f(x[i]); ss += f * f;
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float t = lane < n_warps ? warp_sums[lane] : 0.f;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (lane == 0) warp_sums[0] = t;
    }
    __syncthreads();
    const float rstd = rsqrtf(warp_sums[0] / (float)dim + eps);
    for (int i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
        if (V == VEC_ELEMS) {
            Vec16 a, g, o;
            a.raw = *reinterpret_cast<const uint4*>(x + i);
            g.raw = *reinterpret_cast<const uint4*>(w + i);
#pragma unroll
            for (int j = 0; j < V; ++j) o.e[j] = from_f(rnd(to_f(a.e[j]) * rstd) * to_f(g.e[j]));
            *reinterpret_cast<uint4*>(out + i) = o.raw;
        } else {
            out[i] = from_f(rnd(to_f(x[i]) * rstd) * to_f(w[i]));
        }
    }
}

extern "C" __global__ void kvscope_rms_norm_vec(elem_t* __restrict__ out, const elem_t* __restrict__ x,
                                                const elem_t* __restrict__ w, int dim, long long x_stride,
                                                float eps, unsigned long long* stamp) {
    if (stamp != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *stamp = global_timer_ns();
    const long long r = blockIdx.x;
    rms_norm_row<VEC_ELEMS>(out + r * dim, x + r * x_stride, w, dim, eps);
}

extern "C" __global__ void kvscope_rms_norm_scalar(elem_t* __restrict__ out, const elem_t* __restrict__ x,
                                                   const elem_t* __restrict__ w, int dim, long long x_stride,
                                                   float eps, unsigned long long* stamp) {
    if (stamp != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *stamp = global_timer_ns();
    const long long r = blockIdx.x;
    rms_norm_row<1>(out + r * dim, x + r * x_stride, w, dim, eps);
}

// kvscope_silu_mul: out = round(silu(gate)) * up, rounded, elementwise over (rows, f); gate and up rows may be
// strided (in_stride elements apart, e.g. the two halves of one fused gate/up product), out is contiguous.
// Grid: (column blocks, row blocks), each block walking rows blockIdx.y, + gridDim.y, ... (gridDim.y <= 65,535).
// vec: 16-byte accesses (f, in_stride multiples of VEC_ELEMS, aligned pointers).

template <int V>
__device__ __forceinline__ void silu_mul_at(elem_t* __restrict__ out, const elem_t* __restrict__ gate,
                                            const elem_t* __restrict__ up, int f, long long in_stride,
                                            long long r) {
    const int c = (blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (c >= f) return;
    const elem_t* g = gate + r * in_stride + c;
    const elem_t* u = up + r * in_stride + c;
    elem_t* o = out + r * (long long)f + c;
    if (V == VEC_ELEMS) {
        Vec16 a, b, y;
        a.raw = *reinterpret_cast<const uint4*>(g);
        b.raw = *reinterpret_cast<const uint4*>(u);
#pragma unroll
        for (int j = 0; j < V; ++j) {
            float x = to_f(a.e[j]);
            y.e[j] = from_f(rnd(x / (1.f + __expf(-x))) * to_f(b.e[j]));
        }
        *reinterpret_cast<uint4*>(o) = y.raw;
    } else {
        float x = to_f(*g);
        *o = from_f(rnd(x / (1.f + __expf(-x))) * to_f(*u));
    }
}

extern "C" __global__ void kvscope_silu_mul_vec(elem_t* __restrict__ out, const elem_t* __restrict__ gate,
                                                const elem_t* __restrict__ up, int f, long long in_stride,
                                                long long n_rows) {
    for (long long r = blockIdx.y; r < n_rows; r += gridDim.y) silu_mul_at<VEC_ELEMS>(out, gate, up, f, in_stride, r);
}

extern "C" __global__ void kvscope_silu_mul_scalar(elem_t* __restrict__ out, const elem_t* __restrict__ gate,
                                                   const elem_t* __restrict__ up, int f, long long in_stride,
                                                   long long n_rows) {
    for (long long r = blockIdx.y; r < n_rows; r += gridDim.y) silu_mul_at<1>(out, gate, up, f, in_stride, r);
}

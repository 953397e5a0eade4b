// kvscope kernels: shared element type helpers, prepended to every kernel source by kvscope.kernels.launch.
// Exactly one of KV_BF16, KV_F16, KV_F32 is defined before this text. No CUDA headers are needed: bf16 and fp16
// values travel as raw 16-bit words and are converted with bit operations / PTX conversions.

#if defined(KV_BF16)
typedef unsigned short elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ elem_t from_f(float f) {
#if __CUDA_ARCH__ >= 800
    elem_t h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));  // one instruction on Ampere and later
    return h;
#else
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (elem_t)((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                           // round to nearest even
    return (elem_t)(u >> 16);
#endif
}
#elif defined(KV_F16)
typedef unsigned short elem_t;
__device__ __forceinline__ float to_f(elem_t v) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ elem_t from_f(float f) { elem_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
#elif defined(KV_F32)
typedef float elem_t;
__device__ __forceinline__ float to_f(elem_t v) { return v; }
__device__ __forceinline__ elem_t from_f(float f) { return f; }
#else
#error "define KV_BF16, KV_F16 or KV_F32"
#endif

// one 16-byte vector of elements
#define VEC_ELEMS (16 / (int)sizeof(elem_t))
union Vec16 {
    uint4 raw;
    elem_t e[VEC_ELEMS];
};

// round a float through the element type (what a torch kernel writing elem_t would store)
__device__ __forceinline__ float rnd(float f) { return to_f(from_f(f)); }

// the GPU's nanosecond global timer
__device__ __forceinline__ unsigned long long global_timer_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

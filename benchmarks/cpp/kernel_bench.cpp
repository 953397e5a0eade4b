// kvscope_kernel_bench: launch each of kvscope's kernels from the fatbins the CMake build wrote, for ncu and nsys.
//
//   build/kvscope_kernel_bench [--dtype bf16|f16|f32] [--kernel SUBSTRING] [--reps N] [--dir FOLDER]
//                              [--tokens N] [--dim N]
//   ncu --clock-control none --nvtx --nvtx-include "kvscope/" -k regex:kvscope_ build/kvscope_kernel_bench --reps 3
//
// The fatbins are loaded with the runtime's library API (cudaLibraryLoadFromFile), so the kernels run exactly as
// built, without NVRTC. Each kernel gets one NVTX range (domain "kvscope", message "<kernel> <dtype> <shape>") around
// its timed launches; the time printed is the mean of CUDA-event-timed launches after one warm-up launch. Inputs are
// filled with a constant byte pattern (finite in every element type): the figures are for bandwidth, not values.
// Shapes follow qwen2.5-3b (dim 2048, FFN 11008, 16 query heads, 2 KV heads, head size 128); --tokens sets the rows.
// A kernel added to kvscope/kernels/cuda needs an entry in `cases()` below to be launched here.

#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

struct Dtype {
  std::string tag;  // fatbin suffix: f32, bf16, f16
  size_t bytes;     // element size
};

struct Shape {
  int tokens = 512;  // rows (batch x sequence)
  int dim = 2048;
  int ffn = 11008;
  int heads = 16;
  int kv_heads = 2;
  int head_dim = 128;
};

void check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) {
    std::fprintf(stderr, "kvscope_kernel_bench: %s: %s\n", what, cudaGetErrorString(rc));
    std::exit(1);
  }
}

// device buffers freed at exit of the case
struct Buffers {
  std::vector<void*> ptrs;
  void* get(size_t bytes) {
    void* p = nullptr;
    check(cudaMalloc(&p, bytes < 16 ? 16 : bytes), "cudaMalloc");
    check(cudaMemset(p, 0x3c, bytes < 16 ? 16 : bytes), "cudaMemset");  // 0x3c3c: ~0.0115 bf16, ~1.06 f16
    ptrs.push_back(p);
    return p;
  }
  ~Buffers() {
    for (void* p : ptrs) cudaFree(p);
  }
};

// one kernel launch: its symbol, source stem, launch shape, argument values and the bytes it must move
struct Case {
  std::string stem;    // kvscope/kernels/cuda/<stem>.cu
  std::string symbol;  // extern "C" name
  std::string shape;   // for the NVTX message and the printout
  dim3 grid, block;
  std::vector<std::vector<unsigned char>> args;  // each argument's bytes, in the kernel's order
  double bytes;                                  // least bytes read + written
};

template <typename T>
std::vector<unsigned char> arg(T v) {
  std::vector<unsigned char> out(sizeof(T));
  std::memcpy(out.data(), &v, sizeof(T));
  return out;
}

int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

std::vector<Case> cases(const Dtype& dt, const Shape& s, Buffers& buf) {
  std::vector<Case> out;
  const size_t e = dt.bytes;
  const int per_vec = static_cast<int>(16 / e);
  const long long n = s.tokens;
  // RMSNorm over (tokens, dim), one block per row
  for (int vec = 1; vec >= 0; --vec) {
    void* o = buf.get(n * s.dim * e);
    void* x = buf.get(n * s.dim * e);
    void* w = buf.get(s.dim * e);
    int per_thread = vec ? per_vec : 1;
    int threads = std::min(1024, std::max(32, ceil_div(s.dim / per_thread, 32) * 32));
    Case c{"rms_norm", vec ? "kvscope_rms_norm_vec" : "kvscope_rms_norm_scalar",
           "rows=" + std::to_string(n) + " dim=" + std::to_string(s.dim), dim3(n), dim3(threads), {},
           static_cast<double>((2 * n * s.dim + s.dim) * e)};
    c.args = {arg(o), arg(x), arg(w), arg<int>(s.dim), arg<long long>(s.dim), arg<float>(1e-6f),
              arg<void*>(nullptr)};
    out.push_back(c);
  }
  // SiLU(gate) * up over the halves of a fused (tokens, 2*ffn) product
  for (int vec = 1; vec >= 0; --vec) {
    void* o = buf.get(n * s.ffn * e);
    void* gu = buf.get(2 * n * s.ffn * e);
    int per_thread = vec ? per_vec : 1;
    int cols = ceil_div(s.ffn, per_thread);
    Case c{"silu_mul", vec ? "kvscope_silu_mul_vec" : "kvscope_silu_mul_scalar",
           "rows=" + std::to_string(n) + " ffn=" + std::to_string(s.ffn),
           dim3(ceil_div(cols, 256), static_cast<unsigned>(std::min<long long>(n, 65535))), dim3(256), {},
           static_cast<double>(3 * n * s.ffn * e)};
    c.args = {arg(o), arg(gu), arg(static_cast<unsigned char*>(gu) + s.ffn * e), arg<int>(s.ffn),
              arg<long long>(2LL * s.ffn), arg<long long>(n)};
    out.push_back(c);
  }
  // RoPE + KV-cache write of a prefill of `tokens` positions (batch 1)
  for (int vec = 1; vec >= 0; --vec) {
    const int all_heads = s.heads + 2 * s.kv_heads;
    void* qkv = buf.get(n * all_heads * s.head_dim * e);
    void* cs = buf.get(n * s.head_dim * e);
    void* sn = buf.get(n * s.head_dim * e);
    void* k = buf.get(n * s.kv_heads * s.head_dim * e);
    void* v = buf.get(n * s.kv_heads * s.head_dim * e);
    int per_head = (s.head_dim / 2) / (vec ? per_vec : 1);
    long long total = n * all_heads * per_head;
    Case c{"rope_kv", vec ? "kvscope_rope_kv_vec" : "kvscope_rope_kv_scalar",
           "tokens=" + std::to_string(n) + " heads=" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads) +
               " d=" + std::to_string(s.head_dim),
           dim3(ceil_div(total, 256)), dim3(256), {},
           static_cast<double>((2 * n * all_heads * s.head_dim + 2 * n * s.head_dim) * e)};
    c.args = {arg(qkv), arg(cs), arg(sn), arg(k), arg(v), arg<void*>(nullptr), arg<int>(static_cast<int>(n)),
              arg<int>(static_cast<int>(n)), arg<int>(s.heads), arg<int>(s.kv_heads), arg<int>(s.head_dim),
              arg<int>(static_cast<int>(n))};
    out.push_back(c);
  }
  // the one-thread timestamp kernel (built for every dtype; it has no element type)
  void* slot = buf.get(8);
  Case c{"stamp", "kvscope_stamp", "1 thread", dim3(1), dim3(1), {}, 8.0};
  c.args = {arg(slot)};
  out.push_back(c);
  return out;
}

int run(int argc, char** argv) {
  std::string dtype = "bf16", filter, dir;
  int reps = 20;
  Shape shape;
  if (const char* env = std::getenv("KVSCOPE_KERNELS_DIR")) dir = env;
  if (dir.empty()) dir = KVSCOPE_KERNELS_DEFAULT_DIR;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvscope_kernel_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--dtype") dtype = value();
    else if (a == "--kernel") filter = value();
    else if (a == "--reps") reps = std::atoi(value().c_str());
    else if (a == "--dir") dir = value();
    else if (a == "--tokens") shape.tokens = std::atoi(value().c_str());
    else if (a == "--dim") shape.dim = std::atoi(value().c_str());
    else {
      std::fprintf(stderr, "kvscope_kernel_bench: unknown argument %s (see the comment at the top of "
                   "benchmarks/cpp/kernel_bench.cpp)\n", a.c_str());
      return 2;
    }
  }
  Dtype dt;
  if (dtype == "bf16" || dtype == "f16") dt = {dtype, 2};
  else if (dtype == "f32") dt = {dtype, 4};
  else {
    std::fprintf(stderr, "kvscope_kernel_bench: --dtype must be bf16, f16 or f32, got %s\n", dtype.c_str());
    return 2;
  }
  if (reps < 1 || shape.tokens < 1 || shape.dim < 1) {
    std::fprintf(stderr, "kvscope_kernel_bench: --reps, --tokens and --dim must be >= 1\n");
    return 2;
  }
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
  std::printf("# %s sm_%d%d, %s, kernels from %s\n", prop.name, prop.major, prop.minor, dt.tag.c_str(), dir.c_str());
  std::printf("%-26s %-36s %10s %10s\n", "kernel", "shape", "us", "GB/s");

  nvtxDomainHandle_t domain = nvtxDomainCreateA("kvscope");
  cudaStream_t stream;
  check(cudaStreamCreate(&stream), "cudaStreamCreate");
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  Buffers buf;
  std::string loaded_stem;
  cudaLibrary_t lib = nullptr;
  for (Case& c : cases(dt, shape, buf)) {
    if (!filter.empty() && c.symbol.find(filter) == std::string::npos) continue;
    if (c.stem != loaded_stem) {
      if (lib != nullptr) check(cudaLibraryUnload(lib), "cudaLibraryUnload");
      std::string path = dir + "/" + c.stem + "." + dt.tag + ".fatbin";
      check(cudaLibraryLoadFromFile(&lib, path.c_str(), nullptr, nullptr, 0, nullptr, nullptr, 0), path.c_str());
      loaded_stem = c.stem;
    }
    cudaKernel_t kernel;
    check(cudaLibraryGetKernel(&kernel, lib, c.symbol.c_str()), c.symbol.c_str());
    std::vector<void*> ptrs;
    for (auto& a : c.args) ptrs.push_back(a.data());
    auto launch = [&]() {
      check(cudaLaunchKernel(reinterpret_cast<const void*>(kernel), c.grid, c.block, ptrs.data(), 0, stream),
            c.symbol.c_str());
    };
    launch();  // warm-up (first launch loads the module on the device)
    std::string message = c.symbol + " " + dt.tag + " " + c.shape;
    nvtxEventAttributes_t attr{};
    attr.version = NVTX_VERSION;
    attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attr.message.ascii = message.c_str();
    nvtxDomainRangePushEx(domain, &attr);
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    for (int r = 0; r < reps; ++r) launch();
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    nvtxDomainRangePop(domain);
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.f;
    check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    double us = 1e3 * ms / reps;
    std::printf("%-26s %-36s %10.2f %10.1f\n", c.symbol.c_str(), c.shape.c_str(), us, c.bytes / (us * 1e3));
  }
  if (lib != nullptr) check(cudaLibraryUnload(lib), "cudaLibraryUnload");
  check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  return 0;
}

}  // namespace

int main(int argc, char** argv) { return run(argc, argv); }

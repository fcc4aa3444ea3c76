// Launch-shape variants of the fused backward and the one-layer SGD step (D=4, float32),
// standalone: which grid and how many packs per thread reach the copy bandwidth on this GPU.
// dwf_kernels._C's kernels (csrc/cuda/dwf_cuda_kernels.cuh) are grid-stride loops over 16-byte
// packs, one pack per thread per iteration. Its SGD step runs as many blocks as the device holds
// at once ("resident x1"); its backward did so until 2026-11-28 and since covers the work with one
// thread per pack ("all blocks x1"). The triton backend launches one program per block of elements
// (no loop) with two 16-byte accesses per thread and operand. Each variant must compute the same
// result as the first, every element compared on the device, and is timed with CUDA events over
// back-to-back launches, median of 20.
//
//     nvcc -O3 -arch=sm_90 -o /tmp/bw bench/cuda_backward_variants.cu && /tmp/bw [log2 N, default 26]
//
// Needs only the CUDA toolkit (no torch); bench/gpu_check.sh runs it (stage variants), and
// bench/results/gpu-h200/ holds a run of the backward's variants.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(call)                                                                           \
  do {                                                                                        \
    cudaError_t e = (call);                                                                   \
    if (e != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

constexpr int kD = 4;
constexpr int kThreads = 256;

// One pack (4 floats) of all D factor gradients: g_d = gw * prod_{k != d} f_k + 2 s f_d.
__device__ __forceinline__ void pack_gradients(const float4 (&f)[kD], float4 g, float two_s, float4 (&out)[kD]) {
  const float* fv[kD];
#pragma unroll
  for (int d = 0; d < kD; ++d) fv[d] = reinterpret_cast<const float*>(&f[d]);
  const float* gv = reinterpret_cast<const float*>(&g);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float prefix[kD + 1], suffix[kD + 1];
    prefix[0] = 1.f;
    suffix[kD] = 1.f;
#pragma unroll
    for (int d = 0; d < kD; ++d) prefix[d + 1] = prefix[d] * fv[d][j];
#pragma unroll
    for (int d = kD - 1; d >= 0; --d) suffix[d] = suffix[d + 1] * fv[d][j];
#pragma unroll
    for (int d = 0; d < kD; ++d)
      reinterpret_cast<float*>(&out[d])[j] = gv[j] * (prefix[d] * suffix[d + 1]) + two_s * fv[d][j];
  }
}

// The U packs of the thread at `base`: D factors, D buffers (when B is given) and grad_w, every load
// issued before any math.
template <int U>
__device__ __forceinline__ void load_packs(const float4* F, const float4* B,
                                           const float4* __restrict__ GW, int64_t base, int64_t packs,
                                           float4 (&f)[U][kD], float4 (&b)[U][kD], float4 (&g)[U]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t p = base + int64_t(u) * kThreads;
    if (p < packs) {
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        f[u][d] = F[d * packs + p];
        if (B != nullptr) b[u][d] = B[d * packs + p];
      }
      g[u] = GW[p];
    }
  }
}

// U packs per thread per iteration, all loads issued before any math; grid-stride when the grid is
// smaller than the work. kStep false: the backward, the D factor gradients into GF (9N elements at
// D=4). kStep true: the one-layer SGD step with momentum, in place: the same gradients, then
// buffer = momentum * buffer + gradient and factor -= lr * buffer (17N elements at D=4).
template <int U, bool kStep>
__global__ void __launch_bounds__(kThreads)
    fused_pass(float4* __restrict__ F, float4* __restrict__ B, const float4* __restrict__ GW,
               float4* __restrict__ GF, float two_s, float lr, float momentum, int64_t packs) {
  const int64_t stride = int64_t(gridDim.x) * kThreads * U;
  for (int64_t base = int64_t(blockIdx.x) * kThreads * U + threadIdx.x; base < packs; base += stride) {
    float4 f[U][kD], b[U][kD], g[U];
    load_packs<U>(F, kStep ? B : nullptr, GW, base, packs, f, b, g);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = base + int64_t(u) * kThreads;
      if (p >= packs) continue;
      float4 grad[kD];
      pack_gradients(f[u], g[u], two_s, grad);
#pragma unroll
      for (int d = 0; d < kD; ++d) {
        if (!kStep) {
          GF[d * packs + p] = grad[d];
          continue;
        }
        float* fv = reinterpret_cast<float*>(&f[u][d]);
        float* bv = reinterpret_cast<float*>(&b[u][d]);
        const float* gv = reinterpret_cast<const float*>(&grad[d]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          bv[j] = momentum * bv[j] + gv[j];
          fv[j] = fv[j] - lr * bv[j];
        }
        F[d * packs + p] = f[u][d];
        B[d * packs + p] = b[u][d];
      }
    }
  }
}

template <int U>
constexpr auto backward = fused_pass<U, false>;
template <int U>
constexpr auto sgd_step = fused_pass<U, true>;

template <typename Kernel>
int resident(Kernel kernel) {
  int per_sm = 0, device = 0, sms = 0;
  CHECK(cudaGetDevice(&device));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  return per_sm * sms;
}

template <typename Launch>
float median_ms(Launch launch, int reps = 20, int calls = 10) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  std::vector<float> t;
  for (int r = 0; r < reps; ++r) {
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < calls; ++i) launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms = 0;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms / calls);
  }
  CHECK(cudaGetLastError());
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Counts the elements where a and b differ (NaN counts: an unwritten output was poisoned with NaN).
__global__ void count_differences(const float* a, const float* b, int64_t n, unsigned long long* count) {
  unsigned long long local = 0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    local += !(a[i] == b[i]);
  if (local) atomicAdd(count, local);
}

__global__ void fill(float* x, int64_t n, uint32_t seed) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    x[i] = 0.5f + float(h & 0xffffff) / float(1 << 24);
  }
}

int main(int argc, char** argv) {
  const int log2n = argc > 1 ? std::atoi(argv[1]) : 26;
  const int64_t n = int64_t(1) << log2n, packs = n / 4;
  float *F, *GW, *GF, *ref, *copy_src, *copy_dst;
  unsigned long long* differences;
  CHECK(cudaMalloc(&differences, sizeof(unsigned long long)));
  CHECK(cudaMalloc(&F, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&GW, n * sizeof(float)));
  CHECK(cudaMalloc(&GF, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&ref, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&copy_src, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&copy_dst, kD * n * sizeof(float)));
  fill<<<1024, 256>>>(F, kD * n, 1u);
  fill<<<1024, 256>>>(GW, n, 2u);
  fill<<<1024, 256>>>(copy_src, kD * n, 3u);
  CHECK(cudaDeviceSynchronize());
  const float two_s = 2e-4f;
  const double bytes = double(2 * kD + 1) * n * sizeof(float);
  const double copy_bytes = 2.0 * kD * n * sizeof(float);
  const float copy_ms = median_ms([&] {
    CHECK(cudaMemcpyAsync(copy_dst, copy_src, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
  });
  const double copy_gbs = copy_bytes / copy_ms / 1e6;
  std::printf("N=2^%d fp32 D=%d: copy %.3f ms, %.1f GB/s (read + write)\n", log2n, kD, copy_ms, copy_gbs);
  std::printf("| variant | grid | ms | GB/s | %% of copy | equal |\n|---|---|---|---|---|---|\n");
  bool first = true;
  auto run = [&](const char* name, auto kernel, int64_t grid) {
    CHECK(cudaMemset(GF, 0xff, kD * n * sizeof(float)));  // NaN: every element must be written
    const float ms = median_ms([&] {
      kernel<<<grid, kThreads>>>(reinterpret_cast<float4*>(F), nullptr, reinterpret_cast<const float4*>(GW),
                                 reinterpret_cast<float4*>(GF), two_s, 0.f, 0.f, packs);
    });
    CHECK(cudaDeviceSynchronize());
    if (first) CHECK(cudaMemcpy(ref, GF, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
    CHECK(cudaMemset(differences, 0, sizeof(unsigned long long)));
    count_differences<<<1024, 256>>>(GF, ref, kD * n, differences);
    unsigned long long count = 0;
    CHECK(cudaMemcpy(&count, differences, sizeof(count), cudaMemcpyDeviceToHost));
    const bool equal = count == 0;
    first = false;
    const double gbs = bytes / ms / 1e6;
    std::printf("| %s | %lld | %.3f | %.1f | %.1f%% | %s |\n", name, (long long)grid, ms, gbs, 100 * gbs / copy_gbs,
                equal ? "yes" : "NO");
  };
  const int64_t all1 = (packs + kThreads - 1) / kThreads, all2 = (packs + 2 * kThreads - 1) / (2 * kThreads);
  const int64_t all4 = (packs + 4 * kThreads - 1) / (4 * kThreads);
  run("resident x1", backward<1>, std::min<int64_t>(all1, resident(backward<1>)));
  run("resident x2", backward<2>, std::min<int64_t>(all2, resident(backward<2>)));
  run("resident x4", backward<4>, std::min<int64_t>(all4, resident(backward<4>)));
  run("2 waves x1", backward<1>, std::min<int64_t>(all1, 2 * resident(backward<1>)));
  run("4 waves x1", backward<1>, std::min<int64_t>(all1, 4 * resident(backward<1>)));
  run("all blocks x1 (no loop; the extension's)", backward<1>, all1);
  run("all blocks x2 (no loop, as triton)", backward<2>, all2);
  run("all blocks x4 (no loop)", backward<4>, all4);
  run("resident x1 again", backward<1>, std::min<int64_t>(all1, resident(backward<1>)));

  // The SGD step: every variant starts from the same factors and buffers (F0, B0) for its checked
  // step, then is timed stepping on (lr 1e-6: the values stay in range).
  float *F0, *B0, *B, *ref_b;
  CHECK(cudaMalloc(&F0, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&B0, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&B, kD * n * sizeof(float)));
  CHECK(cudaMalloc(&ref_b, kD * n * sizeof(float)));
  CHECK(cudaMemcpy(F0, F, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
  fill<<<1024, 256>>>(B0, kD * n, 4u);
  CHECK(cudaDeviceSynchronize());
  const double step_bytes = double(4 * kD + 1) * n * sizeof(float);
  std::printf("\nSGD step with momentum, in place, (4D+1)N elements\n");
  std::printf("| variant | grid | ms | GB/s | %% of copy | equal |\n|---|---|---|---|---|---|\n");
  first = true;
  auto step = [&](const char* name, auto kernel, int64_t grid) {
    auto launch = [&] {
      kernel<<<grid, kThreads>>>(reinterpret_cast<float4*>(F), reinterpret_cast<float4*>(B),
                                 reinterpret_cast<const float4*>(GW), nullptr, two_s, 1e-6f, 0.9f, packs);
    };
    CHECK(cudaMemcpy(F, F0, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
    CHECK(cudaMemcpy(B, B0, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
    launch();
    CHECK(cudaDeviceSynchronize());
    if (first) {
      CHECK(cudaMemcpy(ref, F, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
      CHECK(cudaMemcpy(ref_b, B, kD * n * sizeof(float), cudaMemcpyDeviceToDevice));
    }
    CHECK(cudaMemset(differences, 0, sizeof(unsigned long long)));
    count_differences<<<1024, 256>>>(F, ref, kD * n, differences);
    count_differences<<<1024, 256>>>(B, ref_b, kD * n, differences);
    unsigned long long count = 0;
    CHECK(cudaMemcpy(&count, differences, sizeof(count), cudaMemcpyDeviceToHost));
    first = false;
    const float ms = median_ms(launch);
    const double gbs = step_bytes / ms / 1e6;
    std::printf("| %s | %lld | %.3f | %.1f | %.1f%% | %s |\n", name, (long long)grid, ms, gbs, 100 * gbs / copy_gbs,
                count == 0 ? "yes" : "NO");
  };
  step("resident x1 (the extension's)", sgd_step<1>, std::min<int64_t>(all1, resident(sgd_step<1>)));
  step("4 waves x1", sgd_step<1>, std::min<int64_t>(all1, 4 * resident(sgd_step<1>)));
  step("all blocks x1 (no loop)", sgd_step<1>, all1);
  step("all blocks x2 (no loop, as triton)", sgd_step<2>, all2);
  step("resident x1 again", sgd_step<1>, std::min<int64_t>(all1, resident(sgd_step<1>)));
  return 0;
}

// Just enough of CUDA's execution model, on the host, to run csrc/cuda/dwf_cuda_kernels.cuh's
// kernels unchanged under g++ on CPU tensors:
//   - a launch runs its blocks one after another; each CUDA thread of a block is a fiber (ucontext)
//     on the calling thread, resumed in turn, so execution is deterministic and needs no locks;
//   - __syncthreads() and each step of __shfl_down_sync() are barriers: a fiber stops there until
//     every thread of the block has reached the same barrier (the kernels' barriers are all
//     block-uniform; a thread that reaches a different one, or exits while others wait, is reported
//     as divergence instead of running on wrongly);
//   - __shared__ variables become function statics, one copy for the block that is running;
//   - threadIdx, blockIdx, blockDim and gridDim are set before each fiber runs;
//   - every vector access must be aligned to its size, as on a GPU (where a misaligned one faults;
//     the CPU would tolerate it): the kernels report each access through DWF_CHECK_ALIGNED, and a
//     launch with a misaligned one throws;
//   - every launch is recorded (grid, block size, widest access), so tests can see which kernels
//     ran, with which grid, and whether they took the vector path.
// It checks the kernels' logic (indexing, packs, tails, grid-stride loops, block and grid
// reductions), not the GPU's memory model or its timing.
#pragma once

#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define DWF_CHECK_ALIGNED(address, bytes) ::cuda_on_host::check_aligned(address, bytes)

struct EmulatedDim3 {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx, blockDim, gridDim;

namespace cuda_on_host {

constexpr size_t kStackBytes = 64 * 1024;

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  uint64_t barriers = 0;  // barriers passed so far
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;  // one per CUDA thread (kept between launches: stacks are reused)
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int current = 0;
};

inline thread_local Block* block_state = nullptr;
inline thread_local std::string fault;  // the first fault of the running launch

struct LaunchRecord {
  int64_t grid;
  int threads;
  size_t widest_access;  // bytes: 16 on the vector paths; 0 when the kernel touched no global pack
};
inline thread_local std::vector<LaunchRecord> launch_log;  // launches since the test last took it

// Stops the thread before a misaligned access, as the GPU would (the launch then fails).
inline void check_aligned(const void* address, size_t bytes) {
  if (!launch_log.empty() && bytes > launch_log.back().widest_access) launch_log.back().widest_access = bytes;
  if (reinterpret_cast<uintptr_t>(address) % bytes != 0) {
    throw std::runtime_error("misaligned " + std::to_string(bytes) + "-byte access (address % " +
                             std::to_string(bytes) + " = " +
                             std::to_string(reinterpret_cast<uintptr_t>(address) % bytes) + ") in block " +
                             std::to_string(blockIdx.x) + ", thread " + std::to_string(threadIdx.x));
  }
}

inline void fiber_main() {
  Block& block = *block_state;
  try {
    (*block.body)();
  } catch (const std::exception& e) {  // unwinds this fiber's stack only
    if (fault.empty()) fault = e.what();
  }
  block.fibers[block.current].done = true;
  // returning resumes uc_link: the scheduler
}

// Stops the running fiber at a barrier until the scheduler resumes it.
inline void barrier() {
  Block& block = *block_state;
  Fiber& fiber = block.fibers[block.current];
  ++fiber.barriers;
  swapcontext(&fiber.context, &block.scheduler);
}

// Runs body() as grid x threads CUDA threads, block after block.
inline void launch(int64_t grid, int threads, const std::function<void()>& body) {
  if (grid < 1 || grid > INT32_MAX || threads < 1 || threads > 1024 || threads % 32 != 0) {
    throw std::invalid_argument("cuda_on_host::launch: bad launch configuration");
  }
  launch_log.push_back({grid, threads, 0});
  static thread_local Block block;
  if (int(block.fibers.size()) < threads) block.fibers.resize(threads);
  block.lanes.assign(threads, 0);
  block.body = &body;
  Block* const saved = block_state;
  block_state = &block;
  fault.clear();
  for (int64_t b = 0; b < grid; ++b) {
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = block.fibers[t];
      fiber.barriers = 0;
      fiber.done = false;
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &block.scheduler;
      makecontext(&fiber.context, fiber_main, 0);
    }
    // Passes: each resumes every thread once; it runs to its next barrier or to its end. All
    // threads must then stand at the same barrier (or all be done) before the next pass.
    for (uint64_t pass = 0;; ++pass) {
      for (int t = 0; t < threads; ++t) {
        block.current = t;
        threadIdx.x = unsigned(t);
        blockIdx.x = unsigned(b);
        blockDim.x = unsigned(threads);
        gridDim.x = unsigned(grid);
        swapcontext(&block.scheduler, &block.fibers[t].context);
      }
      if (!fault.empty()) break;  // a thread faulted: the launch fails (below)
      const Fiber& first = block.fibers[0];
      for (int t = 1; t < threads; ++t) {
        const Fiber& fiber = block.fibers[t];
        if (fiber.done != first.done || fiber.barriers != first.barriers) {
          block_state = saved;
          throw std::runtime_error("cuda_on_host: divergent barrier in block " + std::to_string(b) + ": thread " +
                                   std::to_string(t) + " is not where thread 0 is");
        }
      }
      if (first.done) break;
    }
    if (!fault.empty()) break;
  }
  block_state = saved;
  if (!fault.empty()) throw std::runtime_error("cuda_on_host: " + fault);
}

}  // namespace cuda_on_host

inline void __syncthreads() { cuda_on_host::barrier(); }

// The value of lane + offset of this warp; the caller's own where that lane is past the warp.
template <typename T>
T __shfl_down_sync(unsigned /*mask: all lanes*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of at most 8 bytes");
  cuda_on_host::Block& block = *cuda_on_host::block_state;
  const int t = int(threadIdx.x), lane = t % 32;
  std::memcpy(&block.lanes[t], &value, sizeof(T));
  cuda_on_host::barrier();  // every lane has published its value
  T result = value;
  if (lane + offset < 32 && t + offset < int(blockDim.x)) std::memcpy(&result, &block.lanes[t + offset], sizeof(T));
  cuda_on_host::barrier();  // every lane has read before any lane publishes again
  return result;
}

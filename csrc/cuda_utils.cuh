// Small helpers shared by the CUDA kernels of bgpo.
#pragma once

#include <cstdint>

namespace bgpo {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Sum over the block; every thread gets the result.  `scratch` holds kThreads / 32 values.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "block size");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(kFullMask, value, offset);
  }
  if (lane == 0) {
    scratch[warp] = value;
  }
  __syncthreads();
  T total = lane < kWarps ? scratch[lane] : T(0);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    total += __shfl_xor_sync(kFullMask, total, offset);
  }
  __syncthreads();  // scratch may be reused right away
  return total;
}

// Inclusive prefix sum over the block in thread order; `scratch` holds kThreads / 32 values.
template <int kThreads, typename T>
__device__ __forceinline__ T block_inclusive_scan(T value, T* scratch) {
  static_assert(kThreads % kWarpSize == 0 && kThreads / kWarpSize <= kWarpSize, "block size");
  constexpr int kWarps = kThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset *= 2) {
    const T other = __shfl_up_sync(kFullMask, value, offset);
    if (lane >= offset) {
      value += other;
    }
  }
  if (lane == kWarpSize - 1) {
    scratch[warp] = value;
  }
  __syncthreads();
  T before = T(0);
  for (int w = 0; w < warp && w < kWarps; ++w) {
    before += scratch[w];
  }
  __syncthreads();
  return value + before;
}

}  // namespace cuda
}  // namespace bgpo

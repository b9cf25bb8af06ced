// bgpo_C::fused_elbo_loss_fwd / _bwd on CUDA: the row kernel (one block per masked row of a tile,
// warp-shuffle reductions, fp32 arithmetic for every input dtype) plugged into the device-generic driver
// of fused_elbo_loss.cpp, whose matmuls run on cuBLAS (bf16/fp16 operands, fp32 accumulation).
#include "cuda_utils.cuh"
#include "fused_elbo_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

namespace bgpo {
namespace elbo {
namespace {

constexpr int kRowThreads = 512;
constexpr int kRowWarps = kRowThreads / cuda::kWarpSize;

// A partial logsumexp: max m and sum s of exp(x - m).  The empty state is (-inf, 0).
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) {
    return {m, a.s + b.s};  // both empty (NaN in s still propagates)
  }
  return {m, a.s * expf(a.m - m) + b.s * expf(b.m - m)};
}

__device__ __forceinline__ void accumulate(MaxSum& acc, float x) {
  if (x > acc.m) {
    acc.s = acc.s * expf(acc.m - x) + 1.0f;  // from the empty state: 0 * exp(-inf) + 1
    acc.m = x;
  } else if (x != -INFINITY) {  // -inf adds nothing (and exp(-inf - -inf) would be NaN); NaN propagates
    acc.s += expf(x - acc.m);
  }
}

// The combined state of the block, valid in thread 0.
__device__ __forceinline__ MaxSum block_logsumexp(MaxSum acc, MaxSum* scratch) {
  const int lane = static_cast<int>(threadIdx.x) % cuda::kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / cuda::kWarpSize;
#pragma unroll
  for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
    const MaxSum other{__shfl_xor_sync(cuda::kFullMask, acc.m, offset),
                       __shfl_xor_sync(cuda::kFullMask, acc.s, offset)};
    acc = combine(acc, other);
  }
  if (lane == 0) {
    scratch[warp] = acc;
  }
  __syncthreads();
  if (warp == 0) {
    acc = lane < kRowWarps ? scratch[lane] : MaxSum{-INFINITY, 0.0f};
#pragma unroll
    for (int offset = cuda::kWarpSize / 2; offset > 0; offset /= 2) {
      const MaxSum other{__shfl_xor_sync(cuda::kFullMask, acc.m, offset),
                         __shfl_xor_sync(cuda::kFullMask, acc.s, offset)};
      acc = combine(acc, other);
    }
  }
  return acc;
}

// Calls z_new = fn(v, z) on every element of the row this thread owns (float4 accesses when kVec4),
// storing z_new when `store`.
template <bool kVec4, typename Fn>
__device__ __forceinline__ void for_each_element(float* __restrict__ z, int64_t width, bool store, Fn&& fn) {
  if constexpr (kVec4) {
    float4* z4 = reinterpret_cast<float4*>(z);
    const int64_t n4 = width / 4;
    for (int64_t k = threadIdx.x; k < n4; k += kRowThreads) {
      float4 x = z4[k];
      const int64_t v = 4 * k;
      x.x = fn(v, x.x);
      x.y = fn(v + 1, x.y);
      x.z = fn(v + 2, x.z);
      x.w = fn(v + 3, x.w);
      if (store) {
        z4[k] = x;
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < width; v += kRowThreads) {
      const float x = fn(v, z[v]);
      if (store) {
        z[v] = x;
      }
    }
  }
}

// One block per row of the chunk; see RowChunk (fused_elbo_loss.h).  Forward (coef == nullptr): the
// tile is the whole vocabulary; lse and z[y] - lse.  Backward: dz on the tile's columns [v0, v0 + width).
template <typename scalar_t, bool kVec4>
__global__ void __launch_bounds__(kRowThreads) elbo_rows_kernel(const RowChunk c) {
  __shared__ MaxSum scratch[kRowWarps];

  const int64_t i = blockIdx.x;
  const int64_t width = c.width;
  const int64_t target = c.targets[i];
  // An out-of-range target is a device-side assert (kept in release builds); where asserts are compiled
  // out, the row's lse becomes NaN, so that the loss and every gradient it touches are NaN, never garbage.
  const bool valid = target >= 0 && target < c.vocab;
  CUDA_KERNEL_ASSERT(valid);
  float* __restrict__ z = c.logits + i * width;
  const scalar_t* __restrict__ bias = c.bias != nullptr ? static_cast<const scalar_t*>(c.bias) + c.v0 : nullptr;
  const float cap = c.softcap;
  const bool capped = cap > 0.0f;

  // The logit the loss sees: cap * tanh((z + bias) / cap), each part optional.
  auto effective = [&](int64_t v, float x) {
    if (bias != nullptr) {
      x += static_cast<float>(bias[v]);
    }
    return capped ? cap * tanhf(x / cap) : x;
  };

  if (c.coef == nullptr) {
    MaxSum acc{-INFINITY, 0.0f};
    for_each_element<kVec4>(z, width, bias != nullptr || capped, [&](int64_t v, float x) {
      const float e = effective(v, x);
      accumulate(acc, e);
      return e;
    });
    acc = block_logsumexp(acc, scratch);  // its __syncthreads makes the stored logits visible to the block
    if (threadIdx.x == 0) {
      const float lse = valid ? acc.m + logf(acc.s) : NAN;
      c.lse[i] = lse;
      c.logp[i] = valid ? z[target] - lse : NAN;
    }
    return;
  }

  // dz = coef * (onehot(target) - softmax) * (1 - tanh^2 if capped).
  const float lse = valid ? c.lse[i] : NAN;
  const float coef = c.coef[i];
  const int64_t j = target - c.v0;  // the target's column in this tile (outside [0, width): not in it)
  scalar_t* __restrict__ low = c.grad_low != nullptr ? static_cast<scalar_t*>(c.grad_low) + i * width : nullptr;
  for_each_element<kVec4>(z, width, c.write_grad_f32, [&](int64_t v, float x) {
    const float e = effective(v, x);
    float g = (v == j ? 1.0f : 0.0f) - expf(e - lse);
    if (capped) {
      const float t = e / cap;
      g *= 1.0f - t * t;
    }
    g *= coef;
    if (low != nullptr) {
      low[v] = static_cast<scalar_t>(g);
    }
    return g;
  });
}

void cuda_row_kernel(const RowChunk& c) {
  if (c.n_rows == 0) {
    return;
  }
  TORCH_CHECK(c.n_rows <= static_cast<int64_t>(INT32_MAX), "fused_elbo_loss: too many rows in one chunk");
  const bool vec4 = c.width % 4 == 0 && reinterpret_cast<uintptr_t>(c.logits) % 16 == 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(c.n_rows));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.dtype, "bgpo_fused_elbo_rows_cuda", [&] {
    if (vec4) {
      elbo_rows_kernel<scalar_t, true><<<grid, kRowThreads, 0, stream>>>(c);
    } else {
      elbo_rows_kernel<scalar_t, false><<<grid, kRowThreads, 0, stream>>>(c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

constexpr Device kCuda{&cuda_row_kernel, /*cuda=*/true};

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                                const at::Tensor& masked, const at::Tensor& elbo_weight,
                                                std::optional<double> softcap, int64_t chunk_size) {
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  return forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, kCuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias) {
  const c10::cuda::OptionalCUDAGuard guard(hidden.device());
  return backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
                  need_hidden, need_weight, need_bias, kCuda);
}

}  // namespace
}  // namespace elbo
}  // namespace bgpo

TORCH_LIBRARY_IMPL(bgpo_C, CUDA, m) {
  m.impl("fused_elbo_loss_fwd", &bgpo::elbo::forward_cuda);
  m.impl("fused_elbo_loss_bwd", &bgpo::elbo::backward_cuda);
}

// bgpo_C::random_mask and bgpo_C::philox_randint / philox_rand on CUDA.
//
// random_mask: one block per sequence.  The bernoulli scheme is a map over columns.  The stratified
// scheme masks the l lowest 48-bit keys (draw << 16 | column) among the maskable columns: an MSB radix
// select with 8-bit digits (one histogram bin per thread, at most six passes, Philox recomputed in each
// pass instead of storing keys), which stops as soon as the chosen bin is taken whole.  The columns
// masked are those whose key prefix is <= the selected prefix, exactly the reference's rank < l.
#include "cuda_utils.cuh"
#include "random_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <tuple>

namespace bgpo {
namespace mask {
namespace {

constexpr int kThreads = 256;  // = the number of radix bins
constexpr int kDigitBits = 8;
static_assert((1 << kDigitBits) == kThreads, "one histogram bin per thread");

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    random_mask_kernel(const scalar_t* __restrict__ input_ids, const bool* __restrict__ maskable,
                       const int64_t* __restrict__ sequence_ids, scalar_t* __restrict__ noisy,
                       bool* __restrict__ masked, float* __restrict__ weight, int64_t columns, Params p) {
  __shared__ int32_t scratch[kThreads / cuda::kWarpSize];
  __shared__ int32_t histogram[kThreads];
  __shared__ uint64_t chosen_prefix;
  __shared__ int32_t chosen_need;
  __shared__ bool chosen_whole;

  const int64_t b = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const bool* row_maskable = maskable + b * columns;
  const scalar_t* row_in = input_ids + b * columns;
  scalar_t* row_out = noisy + b * columns;
  bool* row_masked = masked + b * columns;
  const int64_t sequence_id = sequence_ids[b];
  const scalar_t fill = static_cast<scalar_t>(p.mask_id);

  int32_t local = 0;
  for (int64_t i = tid; i < columns; i += kThreads) {
    local += row_maskable[i] ? 1 : 0;
  }
  const int64_t num_maskable = cuda::block_sum<kThreads>(local, scratch);

  if (p.scheme == Scheme::kBernoulli) {
    const float rate = bernoulli_rate(p, sequence_id);
    for (int64_t i = tid; i < columns; i += kThreads) {
      const bool m =
          row_maskable[i] && philox::rand(p.seed, column_offset(sequence_id, p.sample_index, i)) < rate;
      row_masked[i] = m;
      row_out[i] = m ? fill : row_in[i];
    }
    if (tid == 0) {
      weight[b] = bernoulli_weight(p, num_maskable, rate);
    }
    return;
  }

  const int64_t count = stratified_count(p, sequence_id, num_maskable);
  const bool take_all = count >= num_maskable;  // also L = 0
  uint64_t prefix = 0;
  int shift = kKeyBits;
  if (!take_all) {
    int32_t need = static_cast<int32_t>(count);  // 1 <= need < L <= 2**16
    for (int digit_shift = kKeyBits - kDigitBits; digit_shift >= 0; digit_shift -= kDigitBits) {
      histogram[tid] = 0;
      __syncthreads();
      for (int64_t i = tid; i < columns; i += kThreads) {
        if (row_maskable[i]) {
          const uint64_t key = column_key(p.seed, sequence_id, p.sample_index, i);
          if ((key >> (digit_shift + kDigitBits)) == prefix) {
            atomicAdd(&histogram[(key >> digit_shift) & (kThreads - 1)], 1);
          }
        }
      }
      __syncthreads();
      const int32_t mine = histogram[tid];
      const int32_t inclusive = cuda::block_inclusive_scan<kThreads>(mine, scratch);
      if (inclusive >= need && inclusive - mine < need) {  // exactly one thread: the bin holding rank `need`
        chosen_prefix = (prefix << kDigitBits) | static_cast<uint64_t>(tid);
        chosen_need = need - (inclusive - mine);
        chosen_whole = chosen_need == mine;
      }
      __syncthreads();
      prefix = chosen_prefix;
      need = chosen_need;
      shift = digit_shift;
      const bool whole = chosen_whole;
      __syncthreads();  // everyone has read the shared choice before the next pass overwrites it
      if (whole) {
        break;  // every key with this prefix is among the `count` lowest
      }
    }
  }
  for (int64_t i = tid; i < columns; i += kThreads) {
    const bool m = row_maskable[i] &&
                   (take_all || (column_key(p.seed, sequence_id, p.sample_index, i) >> shift) <= prefix);
    row_masked[i] = m;
    row_out[i] = m ? fill : row_in[i];
  }
  if (tid == 0) {
    weight[b] = stratified_weight(p, num_maskable, count);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_mask_cuda(
    const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids, int64_t mask_id,
    int64_t seed, int64_t sample_index, int64_t num_samples, std::string_view scheme, double t_min,
    bool stratify_t, bool length_normalize) {
  const Params p = make_params(input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples,
                               scheme, t_min, stratify_t, length_normalize);
  const c10::cuda::OptionalCUDAGuard guard(input_ids.device());
  const Buffers buffers = make_buffers(input_ids, maskable, sequence_ids);
  const int64_t B = buffers.ids.size(0);
  const int64_t C = buffers.ids.size(1);
  if (B == 0) {
    return buffers.outputs();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(buffers.ids.scalar_type(), "bgpo_random_mask_cuda", [&] {
    random_mask_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        buffers.ids.const_data_ptr<scalar_t>(), buffers.maskable.const_data_ptr<bool>(),
        buffers.sequence_ids.const_data_ptr<int64_t>(), buffers.noisy.mutable_data_ptr<scalar_t>(),
        buffers.masked.mutable_data_ptr<bool>(), buffers.weight.mutable_data_ptr<float>(), C, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return buffers.outputs();
}

// ------------------------------------------------------------------------------------------------
// philox_randint / philox_rand: elementwise, for tests and for users who want the stream itself.
// ------------------------------------------------------------------------------------------------

constexpr int kMapThreads = 256;

template <typename offset_t, bool kUniform>
__global__ void __launch_bounds__(kMapThreads)
    philox_kernel(const offset_t* __restrict__ offsets, int64_t n, uint64_t seed, void* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kMapThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kMapThreads + threadIdx.x; i < n; i += stride) {
    // A 32-bit offset is zero-extended, as Triton does (its high counter word is 0).
    uint64_t offset;
    if constexpr (sizeof(offset_t) == 8) {
      offset = static_cast<uint64_t>(offsets[i]);
    } else {
      offset = static_cast<uint64_t>(static_cast<uint32_t>(offsets[i]));
    }
    const uint32_t word = philox::randint(seed, offset);
    if constexpr (kUniform) {
      static_cast<float*>(out)[i] = philox::uint_to_uniform(word);
    } else {
      static_cast<int64_t*>(out)[i] = static_cast<int64_t>(word);
    }
  }
}

template <bool kUniform>
at::Tensor philox_cuda(int64_t seed, const at::Tensor& offsets) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
              "philox: offset must be an int32 or int64 tensor, got ", offsets.scalar_type());
  const c10::cuda::OptionalCUDAGuard guard(offsets.device());
  const at::Tensor flat = offsets.contiguous();
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(kUniform ? at::kFloat : at::kLong));
  const int64_t n = flat.numel();
  if (n == 0) {
    return out;
  }
  const int64_t blocks = std::min<int64_t>((n + kMapThreads - 1) / kMapThreads, int64_t{1} << 16);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (flat.scalar_type() == at::kLong) {
    philox_kernel<int64_t, kUniform><<<static_cast<unsigned>(blocks), kMapThreads, 0, stream>>>(
        flat.const_data_ptr<int64_t>(), n, static_cast<uint64_t>(seed), out.mutable_data_ptr());
  } else {
    philox_kernel<int32_t, kUniform><<<static_cast<unsigned>(blocks), kMapThreads, 0, stream>>>(
        flat.const_data_ptr<int32_t>(), n, static_cast<uint64_t>(seed), out.mutable_data_ptr());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace mask
}  // namespace bgpo

TORCH_LIBRARY_IMPL(bgpo_C, CUDA, m) {
  m.impl("random_mask", &bgpo::mask::random_mask_cuda);
  m.impl("philox_randint", &bgpo::mask::philox_cuda<false>);
  m.impl("philox_rand", &bgpo::mask::philox_cuda<true>);
}

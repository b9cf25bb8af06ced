// bgpo_C::random_mask and bgpo_C::philox_randint / philox_rand on the CPU, and the argument checks
// shared with the CUDA implementation.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "random_mask.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>
#include <tuple>
#include <vector>

namespace bgpo {
namespace mask {

Params make_params(const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids,
                   int64_t mask_id, int64_t seed, int64_t sample_index, int64_t num_samples,
                   std::string_view scheme, double t_min, bool stratify_t, bool length_normalize) {
  TORCH_CHECK(input_ids.dim() == 2, "random_mask: input_ids must be 2-D (B, L), got ", input_ids.dim(), "-D");
  TORCH_CHECK(at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false),
              "random_mask: input_ids must have an integer dtype, got ", input_ids.scalar_type());
  TORCH_CHECK(maskable.scalar_type() == at::kBool, "random_mask: maskable must be bool, got ",
              maskable.scalar_type());
  TORCH_CHECK(maskable.sizes() == input_ids.sizes(), "random_mask: maskable must have shape ", input_ids.sizes(),
              ", got ", maskable.sizes());
  TORCH_CHECK(sequence_ids.scalar_type() == at::kLong, "random_mask: sequence_ids must be int64, got ",
              sequence_ids.scalar_type());
  TORCH_CHECK(sequence_ids.dim() == 1 && sequence_ids.size(0) == input_ids.size(0),
              "random_mask: sequence_ids must have shape (", input_ids.size(0), ",), got ", sequence_ids.sizes());
  TORCH_CHECK(maskable.device() == input_ids.device() && sequence_ids.device() == input_ids.device(),
              "random_mask: input_ids, maskable and sequence_ids must be on one device");
  TORCH_CHECK(input_ids.size(1) <= kMaxColumns, "random_mask: at most ", kMaxColumns, " columns, got ",
              input_ids.size(1));
  TORCH_CHECK(num_samples >= 1 && num_samples <= kMaxSamples, "random_mask: num_samples must be in [1, ",
              kMaxSamples, "], got ", num_samples);
  TORCH_CHECK(sample_index >= 0 && sample_index < num_samples, "random_mask: sample_index must be in [0, ",
              num_samples, "), got ", sample_index);
  TORCH_CHECK(t_min >= 0.0 && t_min < 1.0, "random_mask: t_min must be in [0, 1), got ", t_min);
  Params p{};
  if (scheme == "stratified") {
    p.scheme = Scheme::kStratified;
  } else if (scheme == "bernoulli") {
    p.scheme = Scheme::kBernoulli;
  } else {
    TORCH_CHECK(false, "random_mask: scheme must be 'stratified' or 'bernoulli', got '", std::string(scheme), "'");
  }
  p.seed = static_cast<uint64_t>(seed);
  p.sample_index = sample_index;
  p.num_samples = num_samples;
  p.mask_id = mask_id;
  // The reference rounds 1/n and 1 - t_min from double to fp32 once, as here.
  p.inv_n = static_cast<float>(1.0 / static_cast<double>(num_samples));
  p.span = static_cast<float>(1.0 - t_min);
  p.stratify_t = stratify_t;
  p.length_normalize = length_normalize;
  return p;
}

Buffers make_buffers(const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids) {
  Buffers buffers{input_ids.contiguous(), maskable.contiguous(), sequence_ids.contiguous(), {}, {}, {}};
  buffers.noisy = at::empty_like(buffers.ids);
  buffers.masked = at::empty_like(buffers.maskable);
  buffers.weight = at::empty({buffers.ids.size(0)}, buffers.ids.options().dtype(at::kFloat));
  return buffers;
}

namespace {

// One sequence: fills masked[0:C) and returns its weight.  `keys` is scratch of at least C entries.
float mask_row(const Params& p, const bool* maskable, bool* masked, int64_t C, int64_t sequence_id,
               std::vector<uint64_t>& keys) {
  int64_t num_maskable = 0;
  for (int64_t i = 0; i < C; ++i) {
    num_maskable += maskable[i] ? 1 : 0;
  }
  if (p.scheme == Scheme::kBernoulli) {
    const float rate = bernoulli_rate(p, sequence_id);
    for (int64_t i = 0; i < C; ++i) {
      masked[i] = maskable[i] &&
                  philox::rand(p.seed, column_offset(sequence_id, p.sample_index, i)) < rate;
    }
    return bernoulli_weight(p, num_maskable, rate);
  }
  const int64_t count = stratified_count(p, sequence_id, num_maskable);
  if (count >= num_maskable) {  // every maskable position (also L = 0: nothing)
    std::copy(maskable, maskable + C, masked);
  } else {
    // The count lowest keys among the maskable columns: select the count-th smallest key as threshold.
    keys.clear();
    for (int64_t i = 0; i < C; ++i) {
      if (maskable[i]) {
        keys.push_back(column_key(p.seed, sequence_id, p.sample_index, i));
      }
    }
    std::nth_element(keys.begin(), keys.begin() + (count - 1), keys.end());
    const uint64_t threshold = keys[static_cast<size_t>(count - 1)];
    for (int64_t i = 0; i < C; ++i) {
      masked[i] = maskable[i] && column_key(p.seed, sequence_id, p.sample_index, i) <= threshold;
    }
  }
  return stratified_weight(p, num_maskable, count);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> random_mask_cpu(
    const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids, int64_t mask_id,
    int64_t seed, int64_t sample_index, int64_t num_samples, std::string_view scheme, double t_min,
    bool stratify_t, bool length_normalize) {
  const Params p = make_params(input_ids, maskable, sequence_ids, mask_id, seed, sample_index, num_samples,
                               scheme, t_min, stratify_t, length_normalize);
  const Buffers buffers = make_buffers(input_ids, maskable, sequence_ids);
  const int64_t B = buffers.ids.size(0);
  const int64_t C = buffers.ids.size(1);
  if (B == 0) {
    return buffers.outputs();
  }
  const bool* maskable_ptr = buffers.maskable.const_data_ptr<bool>();
  const int64_t* seq_ptr = buffers.sequence_ids.const_data_ptr<int64_t>();
  bool* masked_ptr = buffers.masked.mutable_data_ptr<bool>();
  float* weight_ptr = buffers.weight.mutable_data_ptr<float>();
  AT_DISPATCH_INTEGRAL_TYPES(buffers.ids.scalar_type(), "bgpo_random_mask_cpu", [&] {
    const scalar_t* in = buffers.ids.const_data_ptr<scalar_t>();
    scalar_t* out = buffers.noisy.mutable_data_ptr<scalar_t>();
    const scalar_t fill = static_cast<scalar_t>(p.mask_id);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(C, 1));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> keys;
      keys.reserve(static_cast<size_t>(C));
      for (int64_t b = begin; b < end; ++b) {
        bool* row_mask = masked_ptr + b * C;
        weight_ptr[b] = mask_row(p, maskable_ptr + b * C, row_mask, C, seq_ptr[b], keys);
        for (int64_t i = 0; i < C; ++i) {
          out[b * C + i] = row_mask[i] ? fill : in[b * C + i];
        }
      }
    });
  });
  return buffers.outputs();
}

// The uint32 word of 64-bit offsets (int64 tensor) or zero-extended 32-bit offsets (int32 tensor).
template <typename Fn>
void for_each_offset(const at::Tensor& offsets, Fn&& fn) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
              "philox: offset must be an int32 or int64 tensor, got ", offsets.scalar_type());
  const at::Tensor flat = offsets.contiguous();
  const int64_t n = flat.numel();
  if (flat.scalar_type() == at::kLong) {
    const int64_t* src = flat.const_data_ptr<int64_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        fn(i, static_cast<uint64_t>(src[i]));
      }
    });
  } else {
    const int32_t* src = flat.const_data_ptr<int32_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        fn(i, static_cast<uint64_t>(static_cast<uint32_t>(src[i])));
      }
    });
  }
}

at::Tensor philox_randint_cpu(int64_t seed, const at::Tensor& offsets) {
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kLong));
  int64_t* dst = out.mutable_data_ptr<int64_t>();
  const uint64_t key = static_cast<uint64_t>(seed);
  for_each_offset(offsets, [&](int64_t i, uint64_t offset) {
    dst[i] = static_cast<int64_t>(philox::randint(key, offset));
  });
  return out;
}

at::Tensor philox_rand_cpu(int64_t seed, const at::Tensor& offsets) {
  at::Tensor out = at::empty(offsets.sizes(), offsets.options().dtype(at::kFloat));
  float* dst = out.mutable_data_ptr<float>();
  const uint64_t key = static_cast<uint64_t>(seed);
  for_each_offset(offsets, [&](int64_t i, uint64_t offset) { dst[i] = philox::rand(key, offset); });
  return out;
}

}  // namespace
}  // namespace mask
}  // namespace bgpo

TORCH_LIBRARY_IMPL(bgpo_C, CPU, m) {
  m.impl("random_mask", &bgpo::mask::random_mask_cpu);
  m.impl("philox_randint", &bgpo::mask::philox_randint_cpu);
  m.impl("philox_rand", &bgpo::mask::philox_rand_cpu);
}

// bgpo.random_mask: the per-sequence arithmetic shared by the CPU (random_mask.cpp) and CUDA
// (random_mask_cuda.cu) kernels, so that both follow python/bgpo/ops/random_mask.py bit for bit.
//
// Offset layout (defined once, in random_mask.py):
//   offset = sequence_id * 2**32 + c,  c = j * 2**16 + i (column draw),  c = 2**31 + d (sequence draw d)
#pragma once

#include <cstdint>

#include "philox.h"

namespace bgpo {
namespace mask {

constexpr int64_t kMaxColumns = int64_t{1} << 16;
constexpr int64_t kMaxSamples = int64_t{1} << 15;
constexpr uint64_t kSequenceDraw = uint64_t{1} << 31;

enum class Scheme : int { kStratified = 0, kBernoulli = 1 };

// Everything a kernel needs besides the tensors; built and validated on the host by make_params.
struct Params {
  uint64_t seed;         // the 64-bit seed in two's complement
  int64_t sample_index;  // j
  int64_t num_samples;   // n
  int64_t mask_id;
  Scheme scheme;
  float inv_n;  // fp32(1 / n), for stratify_t
  float span;   // fp32(1 - t_min)
  bool stratify_t;
  bool length_normalize;
};

// IEEE single-precision steps that the compiler may not fuse into an FMA (nvcc fuses by default and
// GCC does under -ffp-contract=fast): the torch reference rounds after every operation.
// On the host a volatile store forces the rounded result to memory, which no contraction can cross;
// these run once per sequence, so the cost is nil.
BGPO_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  volatile float r = a * b;
  return r;
#endif
}

BGPO_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  volatile float r = a + b;
  return r;
#endif
}

BGPO_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  volatile float r = a - b;
  return r;
#endif
}

BGPO_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  volatile float r = a / b;
  return r;
#endif
}

BGPO_HOST_DEVICE uint64_t column_offset(int64_t sequence_id, int64_t sample_index, int64_t column) {
  // Unsigned arithmetic: the bits equal the int64 arithmetic of the reference, wrapping included.
  return (static_cast<uint64_t>(sequence_id) << 32) + (static_cast<uint64_t>(sample_index) << 16) +
         static_cast<uint64_t>(column);
}

BGPO_HOST_DEVICE uint64_t sequence_offset(int64_t sequence_id, int64_t draw) {
  return (static_cast<uint64_t>(sequence_id) << 32) + kSequenceDraw + static_cast<uint64_t>(draw);
}

// The composite sort key of the stratified scheme: unique per column, so ties in the 32-bit draw go to
// the lower column.  48 significant bits.
BGPO_HOST_DEVICE uint64_t column_key(uint64_t seed, int64_t sequence_id, int64_t sample_index, int64_t column) {
  return (static_cast<uint64_t>(philox::randint(seed, column_offset(sequence_id, sample_index, column))) << 16) |
         static_cast<uint64_t>(column);
}
constexpr int kKeyBits = 48;

// l_j: how many of the L maskable positions sample j masks (0 when L = 0).
BGPO_HOST_DEVICE int64_t stratified_count(const Params& p, int64_t sequence_id, int64_t num_maskable) {
  if (num_maskable <= 0) {
    return 0;
  }
  const int64_t L = num_maskable;
  const int64_t n = p.num_samples;
  const uint64_t draw = philox::randint(p.seed, sequence_offset(sequence_id, 0));
  const int64_t k = static_cast<int64_t>(draw % static_cast<uint64_t>(L * n));
  // round((k + j*L) / n), half up, in integers; always >= 0.
  const int64_t rounded = (2 * (k + p.sample_index * L) + n) / (2 * n);
  const int64_t wrapped = ((rounded - 1) % L + L) % L;  // Python's floor modulo
  return wrapped + 1;
}

// t_j of the bernoulli scheme, in (t_min, 1]: t = 1 - fp32(1 - t_min) * u, rounded after each step.
BGPO_HOST_DEVICE float bernoulli_rate(const Params& p, int64_t sequence_id) {
  float u;
  if (p.stratify_t) {
    const float u0 = philox::rand(p.seed, sequence_offset(sequence_id, 0));
    u = mul_rn(add_rn(u0, static_cast<float>(p.sample_index)), p.inv_n);
  } else {
    u = philox::rand(p.seed, sequence_offset(sequence_id, p.sample_index));
  }
  return sub_rn(1.0f, mul_rn(u, p.span));
}

// The MC weight: L / l_j (stratified) or 1 / t_j (bernoulli), optionally / L; 1 where nothing is maskable.
BGPO_HOST_DEVICE float stratified_weight(const Params& p, int64_t num_maskable, int64_t count) {
  if (num_maskable <= 0) {
    return 1.0f;
  }
  const float w = div_rn(static_cast<float>(num_maskable), static_cast<float>(count > 0 ? count : 1));
  return p.length_normalize ? div_rn(w, static_cast<float>(num_maskable)) : w;
}

BGPO_HOST_DEVICE float bernoulli_weight(const Params& p, int64_t num_maskable, float rate) {
  if (num_maskable <= 0) {
    return 1.0f;
  }
  const float w = div_rn(1.0f, rate);
  return p.length_normalize ? div_rn(w, static_cast<float>(num_maskable)) : w;
}

}  // namespace mask
}  // namespace bgpo

#include <ATen/core/Tensor.h>

#include <string_view>
#include <tuple>

namespace bgpo {
namespace mask {

// Validates the arguments of bgpo_C::random_mask (shapes, dtypes, devices, ranges) and derives Params.
Params make_params(const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids,
                   int64_t mask_id, int64_t seed, int64_t sample_index, int64_t num_samples,
                   std::string_view scheme, double t_min, bool stratify_t, bool length_normalize);

// The tensors a masking kernel reads (contiguous) and writes (allocated), for the CPU and CUDA launchers.
struct Buffers {
  at::Tensor ids, maskable, sequence_ids;  // inputs, contiguous
  at::Tensor noisy, masked, weight;        // outputs: (B, L) ids, (B, L) bool, (B,) fp32

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {noisy, masked, weight}; }
};

Buffers make_buffers(const at::Tensor& input_ids, const at::Tensor& maskable, const at::Tensor& sequence_ids);

}  // namespace mask
}  // namespace bgpo

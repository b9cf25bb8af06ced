// Philox4x32-10 for host and device code, bit-identical to Triton's tl.randint / tl.rand (SPEC §5)
// and to the PyTorch reference in python/bgpo/philox.py.
//
//   key     (k0, k1)          = low / high 32 bits of the 64-bit seed (two's complement if negative)
//   counter (c0, c1, c2, c3)  = low / high 32 bits of the 64-bit offset, 0, 0
//   10 rounds of the Philox S-box (multipliers 0xD2511F53 / 0xCD9E8D57, Weyl increments
//   0x9E3779B9 / 0xBB67AE85); randint is the first output word.
//   rand: reinterpret the word as int32 x, x = ~x if x < 0, u = fp32(x) * fp32(4.6566127342e-10).
//
// Header-only; every function is usable from __host__ and __device__ code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BGPO_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BGPO_HOST_DEVICE inline
#endif

namespace bgpo {
namespace philox {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
constexpr int kRounds = 10;
// fp32(4.6566127342e-10) = 0x2FFFFFFF, one ulp below 2**-31: the scale of Triton's uint_to_uniform_float.
constexpr float kRandScale = 4.6566127342e-10f;

struct Words {
  uint32_t x0, x1, x2, x3;
};

BGPO_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// The four output words of Philox4x32-10 for key (k0, k1) and counter (c0, c1, c2, c3).
BGPO_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                     uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    const uint32_t prev0 = c0;
    const uint32_t prev2 = c2;
    c0 = mulhi32(kMul1, prev2) ^ c1 ^ k0;
    c2 = mulhi32(kMul0, prev0) ^ c3 ^ k1;
    c1 = kMul1 * prev2;  // unsigned arithmetic wraps: the low 32 bits of the product
    c3 = kMul0 * prev0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Words{c0, c1, c2, c3};
}

// tl.randint(seed, offset) for a 64-bit seed and a 64-bit offset (a 32-bit offset is zero-extended by
// the caller: its high counter word is 0).
BGPO_HOST_DEVICE uint32_t randint(uint64_t seed, uint64_t offset) {
  return philox4x32_10(static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32), 0u, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32))
      .x0;
}

// Triton's uint_to_uniform_float for a 32-bit word: a float in [0, 1).
BGPO_HOST_DEVICE float uint_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);  // two's-complement reinterpretation (well defined since C++20,
                                           // implementation-defined but universal before)
  if (x < 0) {
    x = ~x;
  }
  // int32 -> fp32 rounds to nearest even on host and device; a single multiply cannot be contracted.
  return static_cast<float>(x) * kRandScale;
}

// tl.rand(seed, offset).
BGPO_HOST_DEVICE float rand(uint64_t seed, uint64_t offset) {
  return uint_to_uniform(randint(seed, offset));
}

}  // namespace philox
}  // namespace bgpo

// bgpo.fused_elbo_loss: masked-row cross-entropy without materialising the (rows x V) logits.
//
// For masked row r of sequence b (flat index r = b * L + l), with z = W h_r (+ bias), optionally
// soft-capped (cap * tanh(z / cap)):
//   forward   lse_r = logsumexp(z),  logp_r = z[y_r] - lse_r,  elbo_b = w_b * sum_{r in b} logp_r
//   backward  dz_r  = c_b * (onehot(y_r) - softmax(z)) * (1 - tanh^2 if capped),  c_b = grad_elbo_b * w_b
//             grad h_r = dz_r W,   grad W = sum_r dz_r^T h_r,   grad bias = sum_r dz_r
//
// The driver (fused_elbo_loss.cpp, device-generic) walks the masked rows chunk by chunk: the logits of a
// chunk come from one matmul (at::mm: MKL/oneDNN on the CPU, cuBLAS on the GPU) into an fp32 buffer,
// then one row kernel (CPU: OpenMP over rows; CUDA: a block per row) computes logsumexp and the target
// log-prob, or the logits gradient in place.  Extra memory: O(chunk * V + rows * H), never O(rows * V).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace bgpo {
namespace elbo {

// One chunk of rows for a row kernel.  All pointers are device pointers of the chunk's device.
struct RowChunk {
  float* logits;         // (n_rows, vocab) fp32, row-major: W h without bias.  Overwritten: with the bias-added,
                         // soft-capped logits when the kernel computes lse, with dz when `coef` is set.
  void* grad_low;        // optional (n_rows, vocab) of `dtype`: dz rounded to the input dtype.
  bool write_grad_f32;   // whether dz is written in place into `logits` (when `coef` is set).
  const void* bias;      // optional (vocab,) of `dtype`.
  at::ScalarType dtype;  // dtype of hidden / weight / bias.
  const int64_t* rows;   // (n_rows,) flat row indices b * seq_len + l.
  const int64_t* targets;  // (B * seq_len,) target ids, read at `rows`.
  int64_t n_rows;
  int64_t vocab;
  int64_t seq_len;
  float softcap;         // <= 0: no soft-cap.
  bool compute_lse;      // compute logsumexp (write lse[row], logp[row]); else read lse[row].
  float* lse;            // (B * seq_len,) fp32.
  float* logp;           // (B * seq_len,) fp32, written when compute_lse.
  const float* coef;     // optional (B,) fp32 per-sequence coefficient c_b: write the gradient.
};

using RowKernel = void (*)(const RowChunk&);

// The device-generic forward / backward of the bgpo_C::fused_elbo_loss_fwd / _bwd contract.
// `default_chunk_elements` bounds the logits held at once when chunk_size == 0 (rows = it / V).
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                           const at::Tensor& masked, const at::Tensor& elbo_weight,
                                           std::optional<double> softcap, int64_t chunk_size, RowKernel kernel,
                                           int64_t default_chunk_elements);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias, RowKernel kernel, int64_t default_chunk_elements);

// Default logits per chunk: 2**21 (8 MB fp32) on the CPU, as the torch backend; 2**25 (128 MB fp32, plus
// 64 MB for the bf16/fp16 copy of the gradient) on the GPU, where cuBLAS needs tall chunks to be efficient.
constexpr int64_t kCpuChunkElements = int64_t{1} << 21;
constexpr int64_t kCudaChunkElements = int64_t{1} << 25;

}  // namespace elbo
}  // namespace bgpo

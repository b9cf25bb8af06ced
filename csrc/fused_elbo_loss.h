// bgpo.fused_elbo_loss: masked-row cross-entropy without materialising the (rows x V) logits.
//
// For masked row r of sequence b, with z = W h_r (+ bias), optionally soft-capped (cap * tanh(z / cap)):
//   forward   lse_r = logsumexp(z),  logp_r = z[y_r] - lse_r,  elbo_b = w_b * sum_{r in b} logp_r
//   backward  dz_r  = c_b * (onehot(y_r) - softmax(z)) * (1 - tanh^2 if capped),  c_b = grad_elbo_b * w_b
//             grad h_r = dz_r W,   grad W = sum_r dz_r^T h_r,   grad bias = sum_r dz_r
//
// The driver (fused_elbo_loss.cpp, device-generic: the CPU and CUDA backends run the same host code and
// differ only in the row kernel and the GEMM precision) gathers the N masked rows once, then
//   forward:  row chunks of R rows x the whole vocabulary: one GEMM (at::mm: MKL/oneDNN on the CPU,
//             cuBLAS on the GPU) into an fp32 buffer, then one row kernel for logsumexp and z[y];
//   backward: vocabulary tiles OUTER, row blocks inner (as the torch backend): per tile [v0, v0 + Vt),
//             recompute the logits of the rows, form dz in place (row kernel), then
//               grad_h (N, H) fp32 += dz W[v0:v1]        grad_W[v0:v1] = dz^T h   (GEMMs)
//             so every grad-W tile is finished when its rows are done and written ONCE in the output
//             dtype: no (V, H) fp32 buffer, no atomics, deterministic.
// Extra memory: see plan_tiles and README ("The C++/CUDA backends").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace bgpo {
namespace elbo {

// One block of rows x one vocabulary tile for a row kernel.  All pointers are device pointers of the
// block's device, all arrays are contiguous and indexed by the row's position i in the block.
struct RowChunk {
  float* logits;          // (n_rows, width) fp32 row-major: W[v0:v0+width] h without bias.  Overwritten:
                          // with the bias-added, soft-capped logits (forward), with dz (backward, when
                          // write_grad_f32).
  void* grad_low;         // optional (n_rows, width) of `dtype`: dz rounded to the input dtype.
  bool write_grad_f32;    // whether dz is written in place into `logits` (backward).
  const void* bias;       // optional (vocab,) of `dtype`, read at v0 + j.
  at::ScalarType dtype;   // the compute dtype: hidden's and bias's (W's too, unless fp32 under autocast).
  const int64_t* targets;  // (n_rows,) target ids.  Out of [0, vocab): TORCH_CHECK (CPU), device assert (CUDA).
  int64_t n_rows;
  int64_t vocab;          // V, for the target check
  int64_t v0;             // first vocabulary column of the tile
  int64_t width;          // columns of the tile (the whole vocabulary in forward)
  float softcap;          // <= 0: no soft-cap.
  float* lse;             // (n_rows,) fp32: written in forward, read in backward.
  float* logp;            // (n_rows,) fp32 z[y] - lse, written in forward.
  const float* coef;      // backward: (n_rows,) fp32 per-row coefficient c_b; nullptr in forward.
};

using RowKernel = void (*)(const RowChunk&);

// Where the device-specific parts differ: the row kernel and the sizes of the tiles.
struct Device {
  RowKernel kernel;
  bool cuda;  // GEMMs on bf16/fp16 operands with fp32 accumulation (cuBLAS); the CPU converts to fp32 first
};

// The tiling of one call: R rows per block, Vt vocabulary columns per tile (backward; forward: Vt = V).
// A host function of the sizes only (not of the data), shared by both devices and by the Python
// workspace declaration (torch.ops.bgpo_C.fused_elbo_loss_tiles), so that the CPU tests cover the CUDA
// backend's tiling too, N = 0 included.
struct Tiles {
  int64_t rows;
  int64_t width;
};
Tiles plan_tiles(bool backward, int64_t num_rows, int64_t vocab, int64_t hidden, int64_t chunk_size, bool cuda);

// The op bgpo_C::fused_elbo_loss_tiles: [rows, width] of plan_tiles.
std::vector<int64_t> tiles_op(bool backward, int64_t num_rows, int64_t vocab, int64_t hidden, int64_t chunk_size,
                              bool cuda);

// The device-generic forward / backward of the bgpo_C::fused_elbo_loss_fwd / _bwd contract.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                           const at::Tensor& masked, const at::Tensor& elbo_weight,
                                           std::optional<double> softcap, int64_t chunk_size, Device device);

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias, Device device);

// Logits held at once (R x Vt), when chunk_size == 0: 2**21 (8 MB fp32) on the CPU, as the torch backend;
// 2**25 (128 MB fp32, plus 64 MB for the bf16/fp16 copy of dz) on the GPU, where cuBLAS needs large tiles.
constexpr int64_t kCpuChunkElements = int64_t{1} << 21;
constexpr int64_t kCudaChunkElements = int64_t{1} << 25;
// Backward vocabulary tile: Vt x H weight elements at most (CPU 2**18: its fp32 copy and the fp32 grad-W
// tile are 1 MB each; CUDA 2**24: Vt = 4096 at H = 4096), never narrower than kMinTileWidth columns.
constexpr int64_t kCpuTileElements = int64_t{1} << 18;
constexpr int64_t kCudaTileElements = int64_t{1} << 24;
constexpr int64_t kMinTileWidth = 512;

}  // namespace elbo
}  // namespace bgpo

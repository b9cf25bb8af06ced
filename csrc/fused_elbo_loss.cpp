// bgpo_C::fused_elbo_loss_fwd / _bwd: the device-generic driver (fused_elbo_loss.h) and the CPU row kernel.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "fused_elbo_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace bgpo {
namespace elbo {

Tiles plan_tiles(bool backward, int64_t num_rows, int64_t vocab, int64_t hidden, int64_t chunk_size, bool cuda) {
  TORCH_CHECK(num_rows >= 0 && vocab > 0 && hidden > 0 && chunk_size >= 0,
              "fused_elbo_loss_tiles: expected num_rows >= 0, vocab > 0, hidden > 0, chunk_size >= 0, got ",
              num_rows, ", ", vocab, ", ", hidden, ", ", chunk_size);
  int64_t width = vocab;
  if (backward) {
    const int64_t tile_elements = cuda ? kCudaTileElements : kCpuTileElements;
    width = std::min(vocab, std::max(kMinTileWidth, tile_elements / hidden));
  }
  const int64_t chunk_elements = cuda ? kCudaChunkElements : kCpuChunkElements;
  const int64_t rows = chunk_size > 0 ? chunk_size : std::max<int64_t>(1, chunk_elements / width);
  // Never divides by the row count: N = 0 gets a valid (unused) plan on every device.
  return {std::max<int64_t>(1, std::min(rows, std::max<int64_t>(num_rows, 1))), width};
}

std::vector<int64_t> tiles_op(bool backward, int64_t num_rows, int64_t vocab, int64_t hidden, int64_t chunk_size,
                              bool cuda) {
  const Tiles t = plan_tiles(backward, num_rows, vocab, hidden, chunk_size, cuda);
  return {t.rows, t.width};
}

namespace {

// ------------------------------------------------------------------------------------------------
// Argument checks (the public Python op checks as well; these guard direct calls of torch.ops.bgpo_C).
// No layout is assumed anywhere: every input may be strided, transposed or expanded (stride 0); the
// driver gathers what the kernels read into contiguous buffers of its own.
// ------------------------------------------------------------------------------------------------

void check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
                  const at::Tensor& elbo_weight, std::optional<double> softcap, int64_t chunk_size) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be 3-D (B, L, H), got ", hidden.dim(), "-D");
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
              ": hidden must be float32, bfloat16 or float16, got ", dtype);
  const int64_t B = hidden.size(0);
  const int64_t L = hidden.size(1);
  const int64_t H = hidden.size(2);
  TORCH_CHECK(H > 0, op, ": hidden must have a non-empty last dimension");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H, op, ": weight must have shape (V, ", H, "), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row");
  // An fp32 W with bf16/fp16 rows is autocast's case: its tiles are rounded to hidden's dtype as they are used.
  TORCH_CHECK(weight.scalar_type() == dtype || weight.scalar_type() == at::kFloat, op,
              ": weight must have the dtype of hidden (", dtype, ") or float32, got ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype, op, ": bias must have the dtype of hidden (", dtype, "), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->device() == hidden.device(), op, ": bias must be on the device of hidden");
  }
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == B && targets.size(1) == L, op,
              ": targets must have shape (", B, ", ", L, "), got ", targets.sizes());
  TORCH_CHECK(at::isIntegralType(targets.scalar_type(), /*includeBool=*/false), op,
              ": targets must have an integer dtype, got ", targets.scalar_type());
  TORCH_CHECK(masked.scalar_type() == at::kBool && masked.sizes() == targets.sizes(), op,
              ": masked must be a bool tensor of shape (", B, ", ", L, ")");
  TORCH_CHECK(elbo_weight.dim() == 1 && elbo_weight.size(0) == B, op, ": elbo_weight must have shape (", B,
              ",), got ", elbo_weight.sizes());
  TORCH_CHECK(at::isFloatingType(elbo_weight.scalar_type()), op, ": elbo_weight must be floating point");
  for (const at::Tensor* t : {&weight, &targets, &masked, &elbo_weight}) {
    TORCH_CHECK(t->device() == hidden.device(), op, ": all tensors must be on the device of hidden (",
                hidden.device(), "), got one on ", t->device());
  }
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, op, ": softcap must be None or > 0, got ",
              softcap.value_or(0.0));
  TORCH_CHECK(chunk_size >= 0, op, ": chunk_size must be >= 0 (0: default), got ", chunk_size);
}

// The masked positions and what the kernels read of them, gathered once into contiguous buffers.
struct Gathered {
  c10::List<std::optional<at::Tensor>> at;  // (b, l) index pair of the N masked positions, row-major order
  at::Tensor b;                             // (N,) the sequence of each row
  at::Tensor h;                             // (N, H) hidden rows, input dtype
  at::Tensor y;                             // (N,) int64 targets
  int64_t n = 0;
};

Gathered gather(const at::Tensor& hidden, const at::Tensor& targets, const at::Tensor& masked) {
  // The one host synchronisation of a call on the GPU: N sizes the buffers.
  const at::Tensor index = at::nonzero(masked);  // (N, 2) int64
  Gathered g;
  g.b = index.select(1, 0);
  g.at.push_back(g.b);
  g.at.push_back(index.select(1, 1));
  g.h = at::index(hidden, g.at).contiguous();
  g.y = at::index(targets, g.at).to(at::kLong).contiguous();
  g.n = index.size(0);
  return g;
}

// W[v0 : v0 + n] as a GEMM operand in the compute dtype (hidden's): a view of W when it has that dtype,
// else -- an fp32 W against bf16/fp16 rows, autocast -- the slice rounded to it, so the products are those
// of autocast's copy of W, which is never made whole.
at::Tensor weight_tile(const at::Tensor& weight, int64_t v0, int64_t n, at::ScalarType compute) {
  const at::Tensor w = weight.narrow(0, v0, n);
  return w.scalar_type() == compute ? w : w.to(compute);
}

// (n, V) fp32 logits of the forward into `out` (contiguous) from rows h (n, H) and weight (V, H).
// CPU GEMMs with bf16/fp16 operands run in fp32 on vocabulary blocks of the weight converted on the fly
// (at most kWeightBlockElements, 16 MB): exact inputs, fp32 accumulation.  There is no mixed-dtype GEMM
// on the CPU; on CUDA cuBLAS takes bf16/fp16 operands and accumulates and writes fp32, on the whole W
// unless W is fp32 (autocast): then on blocks of it rounded to the rows' dtype.
constexpr int64_t kWeightBlockElements = int64_t{1} << 22;

void forward_logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight) {
  const auto compute = h.scalar_type();
  if (compute == at::kFloat) {
    at::mm_out(out, h, weight.t());
    return;
  }
  if (h.is_cuda() && weight.scalar_type() == compute) {
    at::mm_out(out, h, weight.t(), at::kFloat);
    return;
  }
  const at::Tensor rows = h.is_cuda() ? h : h.to(at::kFloat);
  const int64_t V = weight.size(0);
  const int64_t block = std::max<int64_t>(1, std::min(V, kWeightBlockElements / weight.size(1)));
  for (int64_t start = 0; start < V; start += block) {
    const int64_t n = std::min(block, V - start);
    at::Tensor out_block = out.narrow(1, start, n);
    const at::Tensor w = weight_tile(weight, start, n, compute);
    if (h.is_cuda()) {
      at::mm_out(out_block, rows, w.t(), at::kFloat);
    } else {
      at::mm_out(out_block, rows, w.to(at::kFloat).t());
    }
  }
}

// A contiguous (rows, cols) view of the first rows * cols elements of a flat buffer.
at::Tensor block_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.narrow(0, 0, rows * cols).view({rows, cols});
}

RowChunk make_chunk(const at::Tensor& logits, const at::Tensor& bias, at::ScalarType dtype, const int64_t* targets,
                    int64_t vocab, int64_t v0, float softcap) {
  RowChunk c{};
  c.logits = logits.mutable_data_ptr<float>();
  c.bias = bias.defined() ? bias.const_data_ptr() : nullptr;
  c.dtype = dtype;
  c.targets = targets;
  c.n_rows = logits.size(0);
  c.vocab = vocab;
  c.v0 = v0;
  c.width = logits.size(1);
  c.softcap = softcap;
  return c;
}

float cap_of(std::optional<double> softcap) { return softcap.has_value() ? static_cast<float>(*softcap) : 0.0f; }

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                           const at::Tensor& masked, const at::Tensor& elbo_weight,
                                           std::optional<double> softcap, int64_t chunk_size, Device device) {
  check_inputs("fused_elbo_loss_fwd", hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size);
  const int64_t B = hidden.size(0);
  const int64_t L = hidden.size(1);
  const int64_t V = weight.size(0);
  const Gathered g = gather(hidden, targets, masked);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor lse_rows = at::empty({g.n}, f32);
  at::Tensor logp_rows = at::empty({g.n}, f32);
  if (g.n > 0) {
    const Tiles t = plan_tiles(/*backward=*/false, g.n, V, hidden.size(2), chunk_size, device.cuda);
    const at::Tensor buffer = at::empty({t.rows * V}, f32);
    for (int64_t start = 0; start < g.n; start += t.rows) {
      const int64_t n = std::min(t.rows, g.n - start);
      at::Tensor logits = block_view(buffer, n, V);
      forward_logits(logits, g.h.narrow(0, start, n), weight);
      RowChunk c = make_chunk(logits, bias_c, hidden.scalar_type(), g.y.const_data_ptr<int64_t>() + start, V, 0,
                              cap_of(softcap));
      c.lse = lse_rows.mutable_data_ptr<float>() + start;
      c.logp = logp_rows.mutable_data_ptr<float>() + start;
      device.kernel(c);
    }
  }
  // Scattered back by position (the positions are distinct), then summed per sequence: no atomics,
  // deterministic on every device.
  at::Tensor lse = at::zeros({B, L}, f32);
  lse.index_put_(g.at, lse_rows);
  at::Tensor logp = at::zeros({B, L}, f32);
  logp.index_put_(g.at, logp_rows);
  at::Tensor elbo = logp.sum(1).mul_(elbo_weight.to(at::kFloat));
  return {elbo, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias, Device device) {
  check_inputs("fused_elbo_loss_bwd", hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size);
  const int64_t B = hidden.size(0);
  const int64_t L = hidden.size(1);
  const int64_t H = hidden.size(2);
  const int64_t V = weight.size(0);
  TORCH_CHECK(grad_elbo.dim() == 1 && grad_elbo.size(0) == B && grad_elbo.device() == hidden.device(),
              "fused_elbo_loss_bwd: grad_elbo must have shape (", B, ",) on the device of hidden");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == B && lse.size(1) == L &&
                  lse.device() == hidden.device(),
              "fused_elbo_loss_bwd: lse must be a float32 tensor of shape (", B, ", ", L, ")");
  TORCH_CHECK(!need_bias || bias.has_value(), "fused_elbo_loss_bwd: need_bias without a bias");
  const auto dtype = hidden.scalar_type();  // the compute dtype (W may be fp32 under autocast)
  const auto f32 = hidden.options().dtype(at::kFloat);
  // A distinct empty tensor per missing gradient: outputs of an operator must not alias each other.
  const auto empty = [&] { return at::empty({0}, weight.options()); };
  at::Tensor grad_hidden = need_hidden ? at::zeros({B, L, H}, hidden.options()) : empty();
  at::Tensor grad_weight = need_weight ? at::empty({V, H}, weight.options()) : empty();
  at::Tensor grad_bias = need_bias ? at::empty({V}, bias->options()) : empty();
  const Gathered g = gather(hidden, targets, masked);
  if (g.n == 0 || !(need_hidden || need_weight || need_bias)) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_hidden, grad_weight, grad_bias};
  }

  // c_b = dloss/delbo_b * w_b: the per-row coefficient (the rows of one sequence share it).
  const at::Tensor coef = grad_elbo.to(at::kFloat).mul(elbo_weight.to(at::kFloat)).index_select(0, g.b);
  at::Tensor lse_rows = at::index(lse, g.at).contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  // GEMM operands: bf16/fp16 on CUDA (cuBLAS accumulates in fp32), fp32 copies on the CPU.
  const bool low = dtype != at::kFloat;
  const bool cpu_low = low && !device.cuda;
  const bool cuda_low = low && device.cuda;
  const at::Tensor h = cpu_low ? g.h.to(at::kFloat) : g.h;
  at::Tensor grad_h = need_hidden ? at::zeros({g.n, H}, f32) : at::Tensor();  // fp32 accumulator over tiles

  const Tiles t = plan_tiles(/*backward=*/true, g.n, V, H, chunk_size, device.cuda);
  const bool one_block = t.rows >= g.n;  // then each grad-W tile is one GEMM, written straight into grad_W
  const at::Tensor buffer = at::empty({t.rows * t.width}, f32);
  // On CUDA bf16/fp16, the GEMMs take dz rounded to the input dtype; the fp32 dz is kept only for grad bias.
  const bool need_low = cuda_low && (need_hidden || need_weight);
  const at::Tensor low_buffer = need_low ? at::empty({t.rows * t.width}, hidden.options()) : at::Tensor();
  const bool need_f32 = !need_low || need_bias;

  for (int64_t v0 = 0; v0 < V; v0 += t.width) {
    const int64_t vn = std::min(t.width, V - v0);
    const at::Tensor w_tile = weight_tile(weight, v0, vn, dtype);
    const at::Tensor w = cpu_low ? w_tile.to(at::kFloat) : w_tile;
    at::Tensor grad_w_tile = need_weight ? grad_weight.narrow(0, v0, vn) : at::Tensor();
    at::Tensor grad_w_acc = need_weight && !one_block ? at::zeros({vn, H}, f32) : at::Tensor();
    at::Tensor grad_b_acc = need_bias ? at::zeros({vn}, f32) : at::Tensor();
    for (int64_t r0 = 0; r0 < g.n; r0 += t.rows) {
      const int64_t n = std::min(t.rows, g.n - r0);
      const at::Tensor hr = h.narrow(0, r0, n);
      at::Tensor dz = block_view(buffer, n, vn);
      if (cuda_low) {
        at::mm_out(dz, hr, w.t(), at::kFloat);
      } else {
        at::mm_out(dz, hr, w.t());
      }
      at::Tensor dz_low = need_low ? block_view(low_buffer, n, vn) : at::Tensor();
      RowChunk c = make_chunk(dz, bias_c, dtype, g.y.const_data_ptr<int64_t>() + r0, V, v0, cap_of(softcap));
      c.lse = lse_rows.mutable_data_ptr<float>() + r0;  // read only in backward
      c.coef = coef.const_data_ptr<float>() + r0;
      c.write_grad_f32 = need_f32;
      c.grad_low = need_low ? dz_low.mutable_data_ptr() : nullptr;
      device.kernel(c);
      const at::Tensor& d = need_low ? dz_low : dz;
      if (need_bias) {
        grad_b_acc.add_(dz.sum(0));
      }
      if (need_hidden) {
        at::Tensor gh = grad_h.narrow(0, r0, n);
        if (cuda_low) {
          at::addmm_out(gh, gh, d, w, at::kFloat);
        } else {
          gh.addmm_(d, w);
        }
      }
      if (need_weight && !one_block) {
        if (cuda_low) {
          at::addmm_out(grad_w_acc, grad_w_acc, d.t(), hr, at::kFloat);
        } else {
          grad_w_acc.addmm_(d.t(), hr);
        }
      } else if (need_weight) {
        if (cpu_low) {
          grad_w_tile.copy_(at::mm(d.t(), hr));  // fp32 tile (Vt x H), rounded once (or kept: fp32 W)
        } else if (cuda_low && grad_weight.scalar_type() != dtype) {
          at::mm_out(grad_w_tile, d.t(), hr, at::kFloat);  // fp32 W (autocast): its fp32 gradient, not rounded
        } else {
          at::mm_out(grad_w_tile, d.t(), hr);  // straight into grad W (cuBLAS: fp32 accumulation)
        }
      }
    }
    if (need_weight && !one_block) {
      grad_w_tile.copy_(grad_w_acc);
    }
    if (need_bias) {
      grad_bias.narrow(0, v0, vn).copy_(grad_b_acc);
    }
  }
  if (need_hidden) {
    grad_hidden.index_put_(g.at, grad_h.to(dtype));
  }
  return {grad_hidden, grad_weight, grad_bias};
}

namespace {

// ------------------------------------------------------------------------------------------------
// The CPU row kernel: rows in parallel (OpenMP through at::parallel_for), vectorisable inner loops.
// Each row is written by one thread only: deterministic whatever the thread count.
// ------------------------------------------------------------------------------------------------

// z <- cap * tanh((z + bias) / cap), each part optional.
template <typename scalar_t>
void transform_row(float* z, const scalar_t* bias, int64_t n, float cap) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t v = 0; v < n; ++v) {
      z[v] += static_cast<float>(bias[v]);
    }
  }
  if (cap > 0.0f) {
    for (int64_t v = 0; v < n; ++v) {
      z[v] = cap * std::tanh(z[v] / cap);
    }
  }
}

float logsumexp_row(const float* z, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t v = 0; v < V; ++v) {
    m = std::max(m, z[v]);
  }
  if (!std::isfinite(m)) {
    return m;  // +inf or nan propagate; -inf cannot happen with finite logits
  }
  // fp32 sums over blocks of 1024, combined in double: accurate for V in the 10**5 range.
  constexpr int64_t kBlock = 1024;
  double total = 0.0;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t stop = std::min(V, start + kBlock);
    float s = 0.0f;
    for (int64_t v = start; v < stop; ++v) {
      s += std::exp(z[v] - m);
    }
    total += static_cast<double>(s);
  }
  return m + static_cast<float>(std::log(total));
}

template <typename scalar_t>
void cpu_rows(const RowChunk& c) {
  const scalar_t* bias = c.bias != nullptr ? static_cast<const scalar_t*>(c.bias) + c.v0 : nullptr;
  const int64_t W = c.width;
  const float cap = c.softcap;
  at::parallel_for(0, c.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = c.targets[i];
      TORCH_CHECK(y >= 0 && y < c.vocab, "fused_elbo_loss: target ", y, " of a masked position is outside [0, ",
                  c.vocab, ")");
      float* z = c.logits + i * W;
      transform_row(z, bias, W, cap);
      if (c.coef == nullptr) {  // forward: the tile is the whole vocabulary
        const float lse = logsumexp_row(z, W);
        c.lse[i] = lse;
        c.logp[i] = z[y] - lse;
        continue;
      }
      // dz = coef * (onehot(y) - softmax(z)) * (1 - tanh^2 if capped), with tanh = z / cap, on columns
      // [v0, v0 + W).  On the CPU dz is always built in the fp32 row; the copy in the input dtype follows.
      const float lse = c.lse[i];
      const float coef = c.coef[i];
      const int64_t j = y - c.v0;  // the target's column in this tile, if it is in it
      const bool has_target = j >= 0 && j < W;
      const float zy = has_target ? z[j] : 0.0f;
      for (int64_t v = 0; v < W; ++v) {
        float g = -coef * std::exp(z[v] - lse);
        if (cap > 0.0f) {
          const float t = z[v] / cap;
          g *= 1.0f - t * t;
        }
        z[v] = g;
      }
      if (has_target) {
        z[j] += cap > 0.0f ? coef * (1.0f - (zy / cap) * (zy / cap)) : coef;
      }
      if (c.grad_low != nullptr) {
        scalar_t* low = static_cast<scalar_t*>(c.grad_low) + i * W;
#pragma omp simd
        for (int64_t v = 0; v < W; ++v) {
          low[v] = static_cast<scalar_t>(z[v]);
        }
      }
    }
  });
}

void cpu_row_kernel(const RowChunk& c) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.dtype, "bgpo_fused_elbo_rows_cpu",
                                  [&] { cpu_rows<scalar_t>(c); });
}

constexpr Device kCpu{&cpu_row_kernel, /*cuda=*/false};

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                               const at::Tensor& masked, const at::Tensor& elbo_weight,
                                               std::optional<double> softcap, int64_t chunk_size) {
  return forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, kCpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias) {
  return backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
                  need_hidden, need_weight, need_bias, kCpu);
}

}  // namespace
}  // namespace elbo
}  // namespace bgpo

TORCH_LIBRARY_IMPL(bgpo_C, CPU, m) {
  m.impl("fused_elbo_loss_fwd", &bgpo::elbo::forward_cpu);
  m.impl("fused_elbo_loss_bwd", &bgpo::elbo::backward_cpu);
}

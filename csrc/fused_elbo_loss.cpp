// bgpo_C::fused_elbo_loss_fwd / _bwd: the device-generic chunk driver and the CPU row kernel.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include "fused_elbo_loss.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace bgpo {
namespace elbo {
namespace {

// ------------------------------------------------------------------------------------------------
// Argument checks (the public Python op checks as well; these guard direct calls of torch.ops.bgpo_C)
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
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == H, op, ": weight must have shape (V, ", H, "), got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one row");
  TORCH_CHECK(weight.scalar_type() == dtype, op, ": weight must have the dtype of hidden (", dtype, "), got ",
              weight.scalar_type());
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

int64_t rows_per_chunk(int64_t chunk_size, int64_t num_rows, int64_t vocab, int64_t default_elements) {
  const int64_t rows = chunk_size > 0 ? chunk_size : default_elements / vocab;
  return std::max<int64_t>(1, std::min<int64_t>(rows, std::max<int64_t>(num_rows, 1)));
}

// CPU GEMMs with bf16/fp16 operands run in fp32 on vocabulary blocks of the weight converted on the fly
// (at most this many elements, 16 MB): exact inputs, fp32 accumulation, one rounding at the end.  The
// conversion costs 1/chunk_rows of the GEMM's work, and fp32 GEMMs are as fast as bf16 ones on CPUs without
// AMX.  (There is no mixed-dtype GEMM on the CPU; CUDA has cuBLAS's, see below.)
constexpr int64_t kCpuWeightBlockElements = int64_t{1} << 22;

int64_t vocab_block(int64_t vocab, int64_t hidden) {
  return std::max<int64_t>(1, std::min<int64_t>(vocab, kCpuWeightBlockElements / std::max<int64_t>(hidden, 1)));
}

// The fp32 logits of a chunk of rows (without bias) into `out` (n, V), from h (n, H) and weight (V, H).
void chunk_logits(at::Tensor& out, const at::Tensor& h, const at::Tensor& weight) {
  if (h.scalar_type() == at::kFloat) {
    at::mm_out(out, h, weight.t());
  } else if (h.is_cuda()) {
    at::mm_out(out, h, weight.t(), at::kFloat);  // cuBLAS: bf16/fp16 inputs, fp32 accumulate and output
  } else {
    const at::Tensor h32 = h.to(at::kFloat);
    const int64_t V = weight.size(0);
    const int64_t block = vocab_block(V, weight.size(1));
    for (int64_t start = 0; start < V; start += block) {
      const int64_t n = std::min(block, V - start);
      at::Tensor out_block = out.narrow(1, start, n);
      at::mm_out(out_block, h32, weight.narrow(0, start, n).to(at::kFloat).t());
    }
  }
}

// grad h (n, H) in the input dtype from dz (n, V): fp32 dz on the CPU, dz in the input dtype on CUDA.
at::Tensor chunk_grad_hidden(const at::Tensor& dz, const at::Tensor& dz_low, const at::Tensor& weight) {
  if (weight.scalar_type() == at::kFloat) {
    return at::mm(dz, weight);
  }
  if (weight.is_cuda()) {
    return at::mm(dz_low, weight);  // bf16/fp16 tensor cores, fp32 accumulation inside cuBLAS
  }
  const int64_t V = weight.size(0);
  const int64_t block = vocab_block(V, weight.size(1));
  at::Tensor acc = at::zeros({dz.size(0), weight.size(1)}, dz.options());
  for (int64_t start = 0; start < V; start += block) {
    const int64_t n = std::min(block, V - start);
    acc.addmm_(dz.narrow(1, start, n), weight.narrow(0, start, n).to(at::kFloat));
  }
  return acc.to(weight.scalar_type());
}

struct Prepared {
  at::Tensor hidden;   // (B * L, H) contiguous
  at::Tensor weight;   // (V, H) contiguous
  at::Tensor bias;     // (V,) contiguous or undefined
  at::Tensor targets;  // (B * L,) int64
  at::Tensor rows;     // (num_masked,) int64 flat indices, ascending
  int64_t B, L, H, V;
};

Prepared prepare(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& targets, const at::Tensor& masked) {
  Prepared p;
  p.B = hidden.size(0);
  p.L = hidden.size(1);
  p.H = hidden.size(2);
  p.V = weight.size(0);
  p.hidden = hidden.contiguous().view({p.B * p.L, p.H});
  p.weight = weight.contiguous();
  if (bias.has_value()) {
    p.bias = bias->contiguous();
  }
  p.targets = targets.to(at::kLong).contiguous().view({p.B * p.L});
  // Masked rows only: the work scales with them.  (On the GPU this synchronises once, for the count.)
  p.rows = at::nonzero(masked.reshape({p.B * p.L})).view({-1});
  return p;
}

RowChunk make_chunk(const Prepared& p, const at::Tensor& logits, const at::Tensor& rows, float softcap) {
  RowChunk c{};
  c.logits = logits.mutable_data_ptr<float>();
  c.grad_low = nullptr;
  c.write_grad_f32 = false;
  c.bias = p.bias.defined() ? p.bias.const_data_ptr() : nullptr;
  c.dtype = p.weight.scalar_type();
  c.rows = rows.const_data_ptr<int64_t>();
  c.targets = p.targets.const_data_ptr<int64_t>();
  c.n_rows = rows.numel();
  c.vocab = p.V;
  c.seq_len = p.L;
  c.softcap = softcap;
  return c;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                           const at::Tensor& masked, const at::Tensor& elbo_weight,
                                           std::optional<double> softcap, int64_t chunk_size, RowKernel kernel,
                                           int64_t default_chunk_elements) {
  check_inputs("fused_elbo_loss_fwd", hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size);
  const Prepared p = prepare(hidden, weight, bias, targets, masked);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor lse = at::zeros({p.B * p.L}, f32);
  at::Tensor logp = at::zeros({p.B * p.L}, f32);
  const int64_t num_rows = p.rows.numel();
  if (num_rows > 0) {
    const int64_t step = rows_per_chunk(chunk_size, num_rows, p.V, default_chunk_elements);
    at::Tensor buffer = at::empty({step, p.V}, f32);
    for (int64_t start = 0; start < num_rows; start += step) {
      const int64_t n = std::min(step, num_rows - start);
      const at::Tensor rows = p.rows.narrow(0, start, n);
      at::Tensor logits = buffer.narrow(0, 0, n);
      chunk_logits(logits, at::index_select(p.hidden, 0, rows), p.weight);
      RowChunk c = make_chunk(p, logits, rows, softcap.has_value() ? static_cast<float>(*softcap) : 0.0f);
      c.compute_lse = true;
      c.lse = lse.mutable_data_ptr<float>();
      c.logp = logp.mutable_data_ptr<float>();
      c.coef = nullptr;
      kernel(c);
    }
  }
  // Per-sequence sums without atomics: deterministic on every device.
  at::Tensor elbo = logp.view({p.B, p.L}).sum(1).mul_(elbo_weight.to(at::kFloat));
  return {elbo, lse.view({p.B, p.L})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias, RowKernel kernel, int64_t default_chunk_elements) {
  check_inputs("fused_elbo_loss_bwd", hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size);
  const int64_t B = hidden.size(0);
  const int64_t L = hidden.size(1);
  TORCH_CHECK(grad_elbo.dim() == 1 && grad_elbo.size(0) == B && grad_elbo.device() == hidden.device(),
              "fused_elbo_loss_bwd: grad_elbo must have shape (", B, ",) on the device of hidden");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == B && lse.size(1) == L &&
                  lse.device() == hidden.device(),
              "fused_elbo_loss_bwd: lse must be a float32 tensor of shape (", B, ", ", L, ")");
  TORCH_CHECK(!need_bias || bias.has_value(), "fused_elbo_loss_bwd: need_bias without a bias");
  const Prepared p = prepare(hidden, weight, bias, targets, masked);
  const auto dtype = p.weight.scalar_type();
  const bool low = dtype != at::kFloat;
  const bool on_cuda = hidden.is_cuda();
  const auto f32 = hidden.options().dtype(at::kFloat);

  // c_b = dloss/delbo_b * w_b: the per-ROW coefficient of the gradient (rows of one sequence share it).
  const at::Tensor coef = grad_elbo.to(at::kFloat).mul(elbo_weight.to(at::kFloat)).contiguous();
  at::Tensor lse_flat = lse.contiguous().view({p.B * p.L});
  at::Tensor grad_hidden = need_hidden ? at::zeros({p.B * p.L, p.H}, p.hidden.options()) : at::Tensor();
  at::Tensor grad_weight = need_weight ? at::zeros({p.V, p.H}, f32) : at::Tensor();  // fp32 accumulator
  at::Tensor grad_bias = need_bias ? at::zeros({p.V}, f32) : at::Tensor();

  const int64_t num_rows = p.rows.numel();
  if (num_rows > 0 && (need_hidden || need_weight || need_bias)) {
    const int64_t step = rows_per_chunk(chunk_size, num_rows, p.V, default_chunk_elements);
    at::Tensor buffer = at::empty({step, p.V}, f32);
    // On CUDA, dz in the input dtype feeds the bf16/fp16 GEMMs (cuBLAS accumulates grad W in fp32, in place);
    // on the CPU every GEMM takes the fp32 dz.
    const bool need_low = low && on_cuda && (need_hidden || need_weight);
    at::Tensor low_buffer = need_low ? at::empty({step, p.V}, p.weight.options()) : at::Tensor();
    const bool need_f32 = !low || need_bias || !on_cuda;
    for (int64_t start = 0; start < num_rows; start += step) {
      const int64_t n = std::min(step, num_rows - start);
      const at::Tensor rows = p.rows.narrow(0, start, n);
      const at::Tensor h = at::index_select(p.hidden, 0, rows);
      at::Tensor dz = buffer.narrow(0, 0, n);
      chunk_logits(dz, h, p.weight);
      at::Tensor dz_low = need_low ? low_buffer.narrow(0, 0, n) : at::Tensor();
      RowChunk c = make_chunk(p, dz, rows, softcap.has_value() ? static_cast<float>(*softcap) : 0.0f);
      c.compute_lse = false;
      c.lse = lse_flat.mutable_data_ptr<float>();
      c.logp = nullptr;
      c.coef = coef.const_data_ptr<float>();
      c.write_grad_f32 = need_f32;
      c.grad_low = need_low ? dz_low.mutable_data_ptr() : nullptr;
      kernel(c);
      if (need_bias) {
        grad_bias.add_(dz.sum(0));
      }
      if (need_hidden) {
        grad_hidden.index_copy_(0, rows, chunk_grad_hidden(dz, dz_low, p.weight));
      }
      if (need_weight) {
        if (!low) {
          grad_weight.addmm_(dz.t(), h);
        } else if (on_cuda) {
          at::addmm_out(grad_weight, grad_weight, dz_low.t(), h, at::kFloat);
        } else {
          grad_weight.addmm_(dz.t(), h.to(at::kFloat));
        }
      }
    }
  }
  // A distinct empty tensor per missing gradient: outputs of an operator must not alias each other.
  const auto empty = [&] { return at::empty({0}, p.weight.options()); };
  return {
      need_hidden ? grad_hidden.view({p.B, p.L, p.H}) : empty(),
      need_weight ? grad_weight.to(dtype) : empty(),
      need_bias ? grad_bias.to(dtype) : empty(),
  };
}

namespace {

// ------------------------------------------------------------------------------------------------
// The CPU row kernel: rows in parallel (OpenMP through at::parallel_for), vectorisable inner loops.
// ------------------------------------------------------------------------------------------------

// z <- cap * tanh((z + bias) / cap), each part optional.
template <typename scalar_t>
void transform_row(float* z, const scalar_t* bias, int64_t V, float cap) {
  if (bias != nullptr) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      z[v] += static_cast<float>(bias[v]);
    }
  }
  if (cap > 0.0f) {
    for (int64_t v = 0; v < V; ++v) {
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
  const scalar_t* bias = static_cast<const scalar_t*>(c.bias);
  scalar_t* grad_low = static_cast<scalar_t*>(c.grad_low);
  const int64_t V = c.vocab;
  const float cap = c.softcap;
  at::parallel_for(0, c.n_rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = c.rows[i];
      const int64_t y = c.targets[row];
      TORCH_CHECK(y >= 0 && y < V, "fused_elbo_loss: target ", y, " at masked row ", row, " is outside [0, ", V,
                  ")");
      float* z = c.logits + i * V;
      transform_row(z, bias, V, cap);
      float lse;
      if (c.compute_lse) {
        lse = logsumexp_row(z, V);
        c.lse[row] = lse;
        c.logp[row] = z[y] - lse;
      } else {
        lse = c.lse[row];
      }
      if (c.coef == nullptr) {
        continue;
      }
      // dz = coef * (onehot(y) - softmax(z)) * (1 - tanh^2 if capped), with tanh = z / cap.  On the CPU dz
      // is always built in the fp32 row (write_grad_f32 only matters on the GPU); the copy in the input
      // dtype follows.
      const float coef = c.coef[row / c.seq_len];
      const float zy = z[y];
      scalar_t* low = grad_low != nullptr ? grad_low + i * V : nullptr;
      for (int64_t v = 0; v < V; ++v) {
        float g = -coef * std::exp(z[v] - lse);
        if (cap > 0.0f) {
          const float t = z[v] / cap;
          g *= 1.0f - t * t;
        }
        z[v] = g;
      }
      if (cap > 0.0f) {
        const float ty = zy / cap;
        z[y] += coef * (1.0f - ty * ty);
      } else {
        z[y] += coef;
      }
      if (low != nullptr) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
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

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, const at::Tensor& targets,
                                               const at::Tensor& masked, const at::Tensor& elbo_weight,
                                               std::optional<double> softcap, int64_t chunk_size) {
  return forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size, &cpu_row_kernel,
                 kCpuChunkElements);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_elbo, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& targets, const at::Tensor& masked,
    const at::Tensor& elbo_weight, const at::Tensor& lse, std::optional<double> softcap, int64_t chunk_size,
    bool need_hidden, bool need_weight, bool need_bias) {
  return backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
                  need_hidden, need_weight, need_bias, &cpu_row_kernel, kCpuChunkElements);
}

}  // namespace
}  // namespace elbo
}  // namespace bgpo

TORCH_LIBRARY_IMPL(bgpo_C, CPU, m) {
  m.impl("fused_elbo_loss_fwd", &bgpo::elbo::forward_cpu);
  m.impl("fused_elbo_loss_bwd", &bgpo::elbo::backward_cpu);
}

// The operator schemas of the bgpo_C library.  The CPU implementations are registered next to their
// kernels (random_mask.cpp, fused_elbo_loss.cpp), the CUDA ones in the .cu files, each with
// TORCH_LIBRARY_IMPL.  Python reaches them as torch.ops.bgpo_C.<name>; bgpo.ops._cpp registers them as
// the "cpu" and "cuda" backends of bgpo.
#include <torch/library.h>

#include "fused_elbo_loss.h"

TORCH_LIBRARY(bgpo_C, m) {
  // Philox4x32-10 as Triton's tl.randint (uint32 words held in int64) and tl.rand (fp32 in [0, 1)).
  m.def("philox_randint(int seed, Tensor offset) -> Tensor");
  m.def("philox_rand(int seed, Tensor offset) -> Tensor");
  // The backend contract of bgpo.random_mask (python/bgpo/ops/random_mask.py).
  m.def(
      "random_mask(Tensor input_ids, Tensor maskable, Tensor sequence_ids, int mask_id, int seed, "
      "int sample_index, int num_samples, str scheme, float t_min, bool stratify_t, bool length_normalize) "
      "-> (Tensor noisy_ids, Tensor masked, Tensor elbo_weight)");
  // The backend contract of bgpo.fused_elbo_loss (python/bgpo/ops/fused_elbo_loss.py).
  m.def(
      "fused_elbo_loss_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor masked, "
      "Tensor elbo_weight, float? softcap, int chunk_size) -> (Tensor elbo, Tensor lse)");
  m.def(
      "fused_elbo_loss_bwd(Tensor grad_elbo, Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor masked, Tensor elbo_weight, Tensor lse, float? softcap, int chunk_size, bool need_hidden, "
      "bool need_weight, bool need_bias) -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");
  // [rows per block, vocabulary columns per tile] of a fused_elbo_loss call (fused_elbo_loss.h, plan_tiles):
  // a function of the sizes only, for the workspace declaration of bgpo.ops._cpp and the tests.
  m.def("fused_elbo_loss_tiles(bool backward, int num_rows, int vocab, int hidden, int chunk_size, bool cuda) "
        "-> int[]",
        &bgpo::elbo::tiles_op);
}

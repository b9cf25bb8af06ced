"""Tile configurations of the fused ELBO kernels: one default per architecture, tuning only on request.

Every kernel has a list per architecture (sm_80: A100, 164 KB shared memory; sm_90: H100/H200, 228 KB).
The first entry of each list is the fixed default that runs unless ``BGPO_TRITON_AUTOTUNE=1`` is set in
the environment; with it, the autotuner times the whole list once per key -- (H, V, a power-of-two
bucket of the masked-row count N, the operand dtypes) -- and caches the winner for the process.
Under the interpreter a single small config is used.  Every bf16/fp16 config compiles without register
spills (``python -m bgpo_kernels._compile_check --arch 80|90 --strict``).

The keys name the same three tile sizes in every kernel, with a kernel-specific role:
    fwd, dz   BLOCK_N rows x BLOCK_V vocabulary columns, BLOCK_H the reduction step over H;
    grad_w    a BLOCK_V x BLOCK_H tile of grad W, BLOCK_N the reduction step over the rows;
    grad_h    a BLOCK_N x BLOCK_H tile of grad h, BLOCK_V the reduction step over the vocabulary chunk.
"""
from __future__ import annotations

import os

import torch
import triton

from ._utils import is_interpreter

AUTOTUNE_ENV = "BGPO_TRITON_AUTOTUNE"
INTERPRET = is_interpreter()


def _config(n, v, h, warps, stages):
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=warps, num_stages=stages)


INTERPRETER = [_config(16, 32, 32, 4, 1)]

# The forward holds a (BN x BV) fp32 logit tile and pipelines (BN + BV) x BH operands per stage:
# (128 + 128) x 64 x 2 B = 32 KB of bf16 per stage.
FWD = {
    80: [_config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 3), _config(64, 128, 64, 4, 4),
         _config(64, 128, 32, 4, 4), _config(64, 64, 32, 4, 3), _config(32, 128, 32, 4, 3)],
    90: [_config(128, 128, 64, 8, 4), _config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 4),
         _config(64, 128, 64, 4, 4), _config(64, 128, 32, 4, 4), _config(64, 64, 32, 4, 3)],
}
# dz: the forward's logit tile, then the softmax gradient stored in the input dtype.
DZ = FWD
# grad W = dzᵀ h per vocabulary chunk and grad h += dz W_chunk: plain matmul tiles, fp32 accumulators.
GRAD_W = {
    80: [_config(64, 128, 128, 8, 3), _config(32, 128, 128, 8, 4), _config(64, 128, 64, 8, 4),
         _config(32, 64, 64, 4, 3)],
    90: [_config(64, 128, 128, 8, 4), _config(64, 128, 128, 8, 3), _config(64, 256, 128, 8, 3),
         _config(32, 128, 64, 4, 4)],
}
GRAD_H = {
    80: [_config(128, 64, 128, 8, 3), _config(128, 32, 128, 8, 4), _config(64, 64, 128, 4, 4),
         _config(64, 32, 64, 4, 3)],
    90: [_config(128, 64, 128, 8, 4), _config(128, 64, 128, 8, 3), _config(64, 64, 256, 8, 3),
         _config(64, 64, 128, 4, 4)],
}


def configs(table: dict) -> list:
    """What the autotuner is given: everything (pruned per device at launch), or the interpreter's one."""
    return INTERPRETER if INTERPRET else table[80] + table[90]


def pruner(table: dict):
    """``early_config_prune``: the list of the tensor's architecture; only its default unless tuning is on."""
    def prune(all_configs, named_args, **kwargs):
        device = next(a.device for a in named_args.values() if hasattr(a, "data_ptr"))  # the first tensor
        if device.type != "cuda":
            return all_configs[:1]
        major, _ = torch.cuda.get_device_capability(device)
        listed = table[90] if major >= 9 else table[80]
        return listed if os.environ.get(AUTOTUNE_ENV, "0") == "1" else listed[:1]
    return prune


def n_bucket(n: int) -> int:
    """The autotune key's row count: the next power of two (N changes with every batch)."""
    return triton.next_power_of_2(max(n, 1))

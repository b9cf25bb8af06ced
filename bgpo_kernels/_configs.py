"""Tile configurations of the fused ELBO kernels: one default per architecture, tuning only on request.

Every kernel has a list per architecture (sm_80: A100, 164 KB shared memory; sm_90: H100/H200, 228 KB)
and operand size (bf16/fp16 or fp32).
The first entry of each list is the fixed default that runs unless ``BGPO_TRITON_AUTOTUNE=1`` is set in
the environment; with it, the autotuner times the whole list once per key -- (H, V, a power-of-two
bucket of the masked-row count N, the operand dtypes) -- and caches the winner for the process.
Under the interpreter a single small config is used.  Every config compiles without register spills,
fp32 with IEEE and with TF32 products too (``python -m bgpo_kernels._compile_check --arch 80|90 --strict``).

The keys name the same three tile sizes in every kernel, with a kernel-specific role:
    fwd, dz   BLOCK_N rows x BLOCK_V vocabulary columns, BLOCK_H the reduction step over H;
    grad_w    a BLOCK_V x BLOCK_H tile of grad W, BLOCK_N the reduction step over the rows;
    grad_h    a BLOCK_N x BLOCK_H tile of grad h, BLOCK_V the reduction step over the vocabulary chunk.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from ._utils import is_interpreter

AUTOTUNE_ENV = "BGPO_TRITON_AUTOTUNE"
INTERPRET = is_interpreter()


def _config(n, v, h, warps, stages):
    return triton.Config({"BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}, num_warps=warps, num_stages=stages)


INTERPRETER = [_config(16, 32, 32, 4, 1)]


@dataclass(frozen=True)
class Table:
    """One kernel's configurations per architecture (80, 90), for 2-byte operands (bf16/fp16, tensor cores)
    and for fp32 operands, whose tiles are twice the bytes and whose IEEE products run as FMAs on registers
    (the half-precision tiles spill up to 11 KB per thread there)."""
    half: dict
    fp32: dict

    def for_operands(self, arch: int, element_size: int) -> list:
        """The list for operands of ``element_size`` bytes (that of the kernel's first tensor) on ``arch``."""
        return (self.fp32 if element_size == 4 else self.half)[arch]

    def everything(self) -> list:
        return [c for lists in (self.half, self.fp32) for arch in sorted(lists) for c in lists[arch]]


# The forward holds a (BN x BV) fp32 logit tile and pipelines (BN + BV) x BH operands per stage:
# (128 + 128) x 64 x 2 B = 32 KB of bf16 per stage.  fp32 (every tile spill-free with Triton 3.6 and 3.8):
# BH = 32 here and 64-wide tiles in the backward keep the FMA path's unrolled operand fragments in registers.
_FWD_FP32 = [_config(64, 128, 32, 8, 3), _config(128, 64, 32, 8, 3), _config(64, 64, 32, 4, 3),
             _config(64, 128, 16, 8, 4)]
FWD = Table(
    half={80: [_config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 3), _config(64, 128, 64, 4, 4),
               _config(64, 128, 32, 4, 4), _config(64, 64, 32, 4, 3), _config(32, 128, 32, 4, 3)],
          90: [_config(128, 128, 64, 8, 4), _config(128, 128, 64, 8, 3), _config(64, 256, 64, 8, 4),
               _config(64, 128, 64, 4, 4), _config(64, 128, 32, 4, 4), _config(64, 64, 32, 4, 3)]},
    fp32={80: _FWD_FP32, 90: _FWD_FP32},
)
# dz: the forward's logit tile, then the softmax gradient stored in the input dtype.
DZ = FWD
# grad W = dzᵀ h per vocabulary chunk and grad h += dz W_chunk: plain matmul tiles, fp32 accumulators.
_GRAD_W_FP32 = [_config(16, 128, 64, 8, 3), _config(16, 128, 64, 4, 3), _config(16, 64, 64, 4, 3)]
GRAD_W = Table(
    half={80: [_config(64, 128, 128, 8, 3), _config(32, 128, 128, 8, 4), _config(64, 128, 64, 8, 4),
               _config(32, 64, 64, 4, 3)],
          90: [_config(64, 128, 128, 8, 4), _config(64, 128, 128, 8, 3), _config(64, 256, 128, 8, 3),
               _config(32, 128, 64, 4, 4)]},
    fp32={80: _GRAD_W_FP32, 90: _GRAD_W_FP32},
)
_GRAD_H_FP32 = [_config(128, 32, 64, 8, 3), _config(128, 16, 64, 8, 3), _config(64, 32, 64, 4, 3)]
GRAD_H = Table(
    half={80: [_config(128, 64, 128, 8, 3), _config(128, 32, 128, 8, 4), _config(64, 64, 128, 4, 4),
               _config(64, 32, 64, 4, 3)],
          90: [_config(128, 64, 128, 8, 4), _config(128, 64, 128, 8, 3), _config(64, 64, 256, 8, 3),
               _config(64, 64, 128, 4, 4)]},
    fp32={80: _GRAD_H_FP32, 90: _GRAD_H_FP32},
)


def configs(table: Table) -> list:
    """What the autotuner is given: everything (pruned per device and dtype at launch), or the interpreter's one."""
    return INTERPRETER if INTERPRET else table.everything()


def pruner(table: Table):
    """``early_config_prune``: the list of the tensors' architecture and operand size (those of the first
    tensor argument, the rows); only its default unless tuning is on."""
    def prune(all_configs, named_args, **kwargs):
        rows = next(a for a in named_args.values() if hasattr(a, "data_ptr"))
        if rows.device.type != "cuda":
            return all_configs[:1]
        major, _ = torch.cuda.get_device_capability(rows.device)
        listed = table.for_operands(90 if major >= 9 else 80, rows.element_size())
        return listed if os.environ.get(AUTOTUNE_ENV, "0") == "1" else listed[:1]
    return prune


def n_bucket(n: int) -> int:
    """The autotune key's row count: the next power of two (N changes with every batch)."""
    return triton.next_power_of_2(max(n, 1))

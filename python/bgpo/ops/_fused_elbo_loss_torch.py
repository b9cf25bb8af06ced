"""The ``"torch"`` backend of ``bgpo.fused_elbo_loss``: pure PyTorch, on the masked rows only.

One (row block x vocabulary tile) of logits at a time: an online logsumexp across tiles in forward, the
logits recomputed in backward, where each vocabulary tile's grad W is finished in fp32 and written in
the output dtype at once.  Extra memory O(tile + rows·H + tile width·H), never O(rows·V) nor an fp32
(V, H) buffer; work proportional to the number of masked rows.  It is the fallback wherever no compiled
backend runs; the contract of ``forward`` / ``backward`` is in ``bgpo.ops.fused_elbo_loss``'s docstring.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..backends import Backend, register_backend

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "MIN_TILE_V", "forward", "backward", "workspace_bytes"]

# The torch backend's tile holds at most this many logits (1 MB in fp32), at least MIN_TILE_V columns wide.
# Small tiles cost nothing on the CPU (measured: 2**17..2**21 within 5% at V = 126464, H = 256) and keep
# the op's extra memory under 1% of the full-logits path's there (benchmarks/fused_elbo_loss.py).
DEFAULT_CHUNK_ELEMENTS = 2**18
MIN_TILE_V = 512


def _tiles(num_rows: int, vocab: int, hidden_size: int, chunk_size: int) -> tuple[int, int]:
    """(rows per block R, vocabulary columns per tile Vt) of the torch backend.

    The tile width depends on H only (its weight slice Vt x H holds about DEFAULT_CHUNK_ELEMENTS, never
    fewer than MIN_TILE_V columns), the row block fills the rest of the budget: R x Vt logits.
    ``chunk_size`` > 0 fixes R.  The number of masked rows only decides how many row blocks there are.
    """
    width = min(vocab, max(MIN_TILE_V, DEFAULT_CHUNK_ELEMENTS // hidden_size))
    rows = chunk_size if chunk_size > 0 else max(1, DEFAULT_CHUNK_ELEMENTS // width)
    return max(1, min(rows, num_rows)), width


def _tile_logits(h32, w32, bias, v0, v1, softcap):
    """fp32 logits of the rows ``h32`` against the vocabulary columns [v0, v1) (``w32``: those rows of W),
    and the soft-cap's tanh (or None).

    The operands are fp32 copies of bf16/fp16 inputs (exact: every bf16/fp16 value is an fp32 value), so
    the logits are the fp32-accumulated products, never rounded to the input dtype before the logsumexp:
    ℓ agrees to fp32 accuracy with the C++ and Triton backends, which accumulate in fp32 too.  (A bf16
    matmul would round each logit to 8 bits of mantissa: at |z| ~ 30 that is an error of ~0.1 nat per row.)
    """
    z = F.linear(h32, w32, None if bias is None else bias[v0:v1].float())
    if softcap is None:
        return z, None
    capped = torch.tanh(z.div_(softcap))
    return capped * softcap, capped


def _weight_tile(weight, v0, v1, compute_dtype):
    """fp32 values of W[v0:v1] as the compute dtype (hidden's) holds them: a view of an fp32 W, an exact fp32
    copy of a bf16/fp16 slice, or -- W of another dtype than hidden, the fp32 master weight under autocast
    -- the slice rounded to the compute dtype first, so the products are those of autocast's copy of W,
    which is never made whole."""
    tile = weight[v0:v1]
    if tile.dtype != compute_dtype:
        tile = tile.to(compute_dtype)
    return tile.float()


def _gather_rows(hidden, targets, masked):
    """(flat indices into B*L of the masked positions in row-major order, their hidden rows in fp32, their
    targets).

    The op's one host synchronisation on this backend: ``nonzero`` must learn the number of masked rows N
    to size its output (the work is proportional to N, not to B·L).
    """
    B, L, H = hidden.shape
    rows = masked.reshape(-1).nonzero().squeeze(1)
    return rows, hidden.reshape(B * L, H)[rows].float(), targets.reshape(B * L)[rows]


def _forward_tile(h32, y, w32, bias, v0, v1, softcap, m, s, target_logit):
    """Fold vocabulary columns [v0, v1) into the running max ``m``, sum ``s`` (logsumexp = m + log s) and
    target logit, in place.

    A function of its own so that the tile's logits are freed before the next tile's are allocated.
    """
    z, _ = _tile_logits(h32, w32, bias, v0, v1, softcap)
    m_new = torch.maximum(m, z.amax(dim=1))
    in_tile = (y >= v0) & (y < v1)
    picked = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
    target_logit.copy_(torch.where(in_tile, picked, target_logit))
    s.mul_(torch.exp(m - m_new)).add_(z.sub_(m_new.unsqueeze(1)).exp_().sum(dim=1))
    m.copy_(m_new)


def forward(hidden, weight, bias, targets, masked, elbo_weight, softcap, chunk_size):
    """Online logsumexp over vocabulary tiles (running max m and sum s per row), row block by row block;
    only masked rows are computed."""
    B, L, _ = hidden.shape
    V = weight.shape[0]
    rows, h32, y = _gather_rows(hidden, targets, masked)
    N = rows.numel()
    m = torch.full((N,), -torch.inf, dtype=torch.float32, device=hidden.device)
    s = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    R, Vt = _tiles(N, V, h32.shape[1], chunk_size)
    for v0 in range(0, V, Vt):
        v1 = min(v0 + Vt, V)
        w32 = _weight_tile(weight, v0, v1, hidden.dtype)
        for r0 in range(0, N, R):
            r = slice(r0, r0 + R)
            _forward_tile(h32[r], y[r], w32, bias, v0, v1, softcap, m[r], s[r], target_logit[r])
        del w32  # freed before the next tile's copy is made: one tile's copy live at a time
    lse_rows = m + torch.log(s)
    lse = torch.zeros(B * L, dtype=torch.float32, device=hidden.device)
    lse[rows] = lse_rows
    per_sequence = torch.zeros(B, dtype=torch.float32, device=hidden.device)
    per_sequence.index_add_(0, rows // L, target_logit - lse_rows)
    return per_sequence * elbo_weight.float(), lse.view(B, L)


def _backward_tile(h32, y, lse, coef, w32, bias, v0, v1, softcap, grad_h, grad_w, grad_b):
    """Add one (row block x vocabulary tile)'s share to grad h, grad W and grad bias (those not None).

    ``dz = coef * (onehot - softmax)`` is built in place in the tile's logits, freed on return.
    """
    z, capped = _tile_logits(h32, w32, bias, v0, v1, softcap)
    dz = z.sub_(lse.unsqueeze(1)).exp_()
    # softmax - onehot: -1 at the target column of the rows whose target lies in this tile, as a scatter of
    # 0 or -1 per row (indexing by the rows' nonzero() would cost a host synchronisation per tile)
    in_tile = (y >= v0) & (y < v1)
    dz.scatter_add_(1, (y - v0).clamp_(0, v1 - v0 - 1).unsqueeze(1), in_tile.to(dz.dtype).neg_().unsqueeze(1))
    dz.mul_(-coef.unsqueeze(1))
    if capped is not None:  # d(cap * tanh(z / cap))/dz = 1 - tanh²
        dz.mul_(1.0 - capped.square_())
    if grad_h is not None:
        grad_h.addmm_(dz, w32)
    if grad_w is not None:
        grad_w.addmm_(dz.t(), h32)
    if grad_b is not None:
        grad_b += dz.sum(dim=0)


def backward(grad_elbo, hidden, weight, bias, targets, masked, elbo_weight, lse, softcap, chunk_size,
             need_hidden, need_weight, need_bias):
    """Vocabulary tiles outer, row blocks inner: grad W and grad bias of a tile are complete (in fp32) when
    its rows are done and are written in the output dtype at once, so no (V, H) fp32 buffer exists;
    grad h accumulates over tiles in an (N, H) fp32 buffer."""
    B, L, H = hidden.shape
    V = weight.shape[0]
    rows, h32, y = _gather_rows(hidden, targets, masked)
    N = rows.numel()
    lse_rows = lse.reshape(B * L)[rows]
    # ∂loss/∂logp_r = gℓ_b * w_b for the sequence b of row r.
    coef = (grad_elbo.float() * elbo_weight.float())[rows // L]
    grad_h = torch.zeros(N, H, dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    grad_bias = torch.empty_like(bias) if need_bias else weight.new_empty(0)
    R, Vt = _tiles(N, V, H, chunk_size)
    for v0 in range(0, V, Vt):
        v1 = min(v0 + Vt, V)
        w32 = _weight_tile(weight, v0, v1, hidden.dtype)
        grad_w_tile = torch.zeros(v1 - v0, H, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_b_tile = torch.zeros(v1 - v0, dtype=torch.float32, device=weight.device) if need_bias else None
        for r0 in range(0, N, R):
            r = slice(r0, r0 + R)
            _backward_tile(h32[r], y[r], lse_rows[r], coef[r], w32, bias, v0, v1, softcap,
                           None if grad_h is None else grad_h[r], grad_w_tile, grad_b_tile)
        if need_weight:
            grad_weight[v0:v1] = grad_w_tile
        if need_bias:
            grad_bias[v0:v1] = grad_b_tile
        del w32, grad_w_tile, grad_b_tile  # freed before the next tile's are allocated
    grad_hidden = hidden.new_empty(0)
    if need_hidden:
        # contiguous whatever hidden's layout (zeros_like would keep a transposed hidden's strides, which
        # the flat (B*L, H) view below cannot address)
        grad_hidden = hidden.new_zeros(B, L, H)
        grad_hidden.view(B * L, H)[rows] = grad_h.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias


def workspace_bytes(phase, hidden, weight, chunk_size, need_weight=False):
    """The bytes the torch backend holds inside one call beyond its outputs (``bgpo.memory.track_fake_memory``).

    The masked-row count N is data, unknown on fake tensors: it is taken to be B·L, which makes this
    exact when every position is masked and an upper bound otherwise.  With s the input's element size
    and low = 1 for bf16/fp16 inputs (0 for fp32, whose "fp32 copies" are views):

    * gathering the rows holds them in the input dtype and in fp32 at once: N·H·(s + 4·low);
    * then the fp32 rows (N·H·4) stay, with per tile the fp32 weight slice (Vt·H·4·low) and an R x Vt
      fp32 logits tile; a W of another dtype (autocast) is rounded through a slice in the compute dtype,
      Vt·H·(s + 4) for the two;
    * forward adds the running max, sum and target logit (3·N·4);
    * backward adds grad h's fp32 buffer (N·H·4), the fp32 grad-W tile (Vt·H·4, if W needs a gradient),
      and at its end grad h in the input dtype (N·H·s) in place of the tiles.

    Soft-capping adds up to two more logits tiles (2·R·Vt·4), not counted (it is not an argument here).
    (Checked against the CPU allocator in tests/test_memory.py.)
    """
    B, L, H = hidden.shape
    V = weight.shape[0]
    N = B * L
    R, Vt = _tiles(N, V, H, chunk_size)
    size = hidden.element_size()
    low = int(hidden.dtype != torch.float32)
    gather = N * H * (size + 4 * low)
    rows32 = N * H * 4
    weight_slice = Vt * H * (size + 4) if weight.dtype != hidden.dtype else Vt * H * 4 * low
    tile = weight_slice + R * Vt * 4
    if phase == "forward":
        return max(gather, rows32 + tile) + 3 * N * 4
    grad_w_tile = Vt * H * 4 * int(bool(need_weight))
    return max(gather, rows32 + N * H * 4 + max(tile + grad_w_tile, N * H * size))


register_backend(
    "fused_elbo_loss",
    Backend("torch", SimpleNamespace(forward=forward, backward=backward, workspace_bytes=workspace_bytes,
                                     weight_dtype_free=True),  # W of another dtype: rounded per tile
            available=lambda d: None),
)

"""The binary-basis algebra shared by the quantizers (quant/qbb.py) and distillation (distill.py).

    W ≈ Σ_{i<N} α_i ⊙ B_i  (+ μ)          B_i ∈ {−1,+1}^{rows×cols}, α_i and μ per row and group   (QBB eq. 1)

Every function works on the grouped layout [rows, ngroups, G]: columns past `cols` are zero padding,
where the signs are 0 so that padding never counts, and α [rows, ng, N], μ [rows, ng] broadcast over
the last axis. Pack / unpack convert between this layout and format.BinaryBasis (the file's form).
This module depends on format.py and torch only, so that quant/ and distill.py can both import it.
"""
from __future__ import annotations

import numpy as np
import torch

from .format import BinaryBasis, full_scales


class BasisError(ValueError):
    pass


def groups_view(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, cols] -> zero-padded [rows, ngroups, G] and the valid-column mask [ngroups, G]."""
    rows, cols = w.shape
    ng = -(-cols // group)
    pad = ng * group - cols
    wp = torch.nn.functional.pad(w, (0, pad)).reshape(rows, ng, group)
    valid = torch.ones(ng * group, dtype=torch.bool, device=w.device)
    if pad:
        valid[cols:] = False
    return wp, valid.reshape(ng, group)


def grouped_signs(signs: torch.Tensor, group: int) -> torch.Tensor:
    """bool [N, rows, cols] -> float ±1 [N, rows, ng, G], 0 in the padding."""
    n, rows, cols = signs.shape
    return groups_view(torch.where(signs, 1.0, -1.0).reshape(n * rows, cols), group)[0].reshape(n, rows, -1, group)


def flat_signs(s: torch.Tensor, cols: int) -> torch.Tensor:
    """float ±1 [N, rows, ng, G] -> bool [N, rows, cols]."""
    return (s > 0).reshape(s.shape[0], s.shape[1], -1)[:, :, :cols]


def unpack(bb: BinaryBasis, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A one-class BinaryBasis -> grouped signs ±1 [N, rows, ng, G] (0 in padding), α [rows, ng, N],
    μ [rows, ng] or None."""
    if bb.n_classes != 1 or bb.sparse_mask is not None or bb.colscale is not None:
        raise BasisError("not a plain planes + scales (+ offset) code (several classes, a sparse part "
                         "or column scales)")
    signs = grouped_signs(torch.from_numpy(np.asarray(bb.signs, bool)).to(device), bb.group)
    alpha = torch.from_numpy(full_scales(bb)[:, :, 0, :].copy()).to(device)
    mu = None if bb.offsets is None else torch.from_numpy(np.asarray(bb.offsets, np.float32)[:, :, 0].copy()).to(device)
    return signs, alpha, mu


def pack(s: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, group: int, cols: int) -> BinaryBasis:
    """The inverse of unpack: grouped signs, α, μ -> BinaryBasis (free fp32 scales, one class)."""
    return BinaryBasis(signs=flat_signs(s, cols).cpu().numpy(),
                       scales=alpha.detach()[:, :, None, :].cpu().numpy().astype(np.float32), group=group,
                       offsets=None if mu is None else mu.detach()[:, :, None].cpu().numpy().astype(np.float32))


def reconstruct(s: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None) -> torch.Tensor:
    """Σ α_i s_i + μ, grouped [rows, ng, G] (the same sum as format.dequantize; μ also lands on the
    padding, which the losses mask out)."""
    w = alpha[..., 0, None] * s[0]
    for i in range(1, len(s)):
        w = w + alpha[..., i, None] * s[i]
    return w if mu is None else w + mu[..., None]


def level_codes(n: int, device=None) -> torch.Tensor:
    """±1 [2^N, N]: row c holds the signs of level c (bit i of c = s_i)."""
    code = torch.arange(2 ** n, device=device)
    return torch.where((code[:, None] >> torch.arange(n, device=device)) & 1 == 1, 1.0, -1.0)


def _grid_search(wg, alpha, mu, combos):
    """The group's levels Σ_i ±α_i + μ sorted ([rows, ng, 2^N] values and codes) and, for every weight,
    the position of its nearest level among them ([rows, ng, G]): one sort and one search, whatever N."""
    # a broadcast sum, not alpha @ combos.T: under CUDA autocast a matmul would round the levels, and
    # their gradient, to bf16
    levels = (alpha[..., None, :] * combos).sum(-1)                            # [rows, ng, 2^N]
    if mu is not None:
        levels = levels + mu[..., None]
    vals, order = levels.sort(-1)
    with torch.no_grad():
        mids = ((vals[..., 1:] + vals[..., :-1]) / 2).contiguous()
        pos = torch.searchsorted(mids, wg.detach().contiguous())
    return vals, order, pos


def nearest_level(wg: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, combos: torch.Tensor
                  ) -> torch.Tensor:
    """Grid projection: for fixed scales, every weight's nearest of the 2^N levels Σ_i ±α_i + μ of its
    group (exact minimiser of ‖W − Ŵ‖² over the signs; LQ-Net's QEM step), as its value [rows, ng, G],
    differentiable in α and μ exactly as Σ α_i s_i + μ is (∂/∂α_i = s_i, ∂/∂μ = 1). combos: level_codes(N)."""
    vals, _, pos = _grid_search(wg, alpha, mu, combos)
    return vals.gather(-1, pos)


def nearest_signs(wg: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, valid: torch.Tensor,
                  combos: torch.Tensor | None = None) -> torch.Tensor:
    """nearest_level's signs ±1 [N, rows, ng, G] (0 where valid is 0). combos: level_codes(N), when the
    caller keeps it."""
    n = alpha.shape[-1]
    combos = level_codes(n, wg.device) if combos is None else combos
    _, order, pos = _grid_search(wg, alpha, mu, combos)
    c = order.gather(-1, pos)
    return torch.stack([torch.where((c >> i) & 1 == 1, valid, -valid) for i in range(n)])


def paretoq_grid(w: torch.Tensor, n: int, group: int, offset: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ParetoQ's quantizer per bit width (facebookresearch/ParetoQ: models/utils_quant.py, train.py),
    initialised per row and group from the weights and written as binary-basis scales:
      N = 1  Ŵ = α·sign(W),  α = mean|W|                                    → α₀ = α
      N = 2  Stretched Elastic Quant, q ∈ {±¼, ±¾}, α = max|W|             → α₁ = α/2, α₀ = α/4
             (SEQ's grid is exactly our N = 2 with α₁ = 2α₀: zero-free, balanced)
      N ≥ 3  LSQ, q ∈ [−2^{N−1}, 2^{N−1} − 1] · d, d = max|W| / (2^{N−1} − 1)
             q = Σ 2^{i−1} s_i − ½  ⇒  α_i = d·2^{i−1}, μ = −d/2 (the grid contains 0)
    Returns α [rows, ng, N] and μ [rows, ng] (None unless offset; without one, N ≥ 3 drops the −d/2)."""
    wg, valid = groups_view(w.float(), group)
    a = (wg.abs() * valid).amax(-1).clamp(min=1e-5)                           # [rows, ng]
    if n == 1:
        a = (wg.abs() * valid).sum(-1) / valid.sum(-1).clamp(min=1)
        alpha = a.clamp(min=1e-5)[..., None]
        mu_val = torch.zeros_like(a)
    elif n == 2:
        alpha = torch.stack([a / 4, a / 2], -1)
        mu_val = torch.zeros_like(a)
    else:
        d = a / (2 ** (n - 1) - 1)
        alpha = d[..., None] * 2.0 ** (torch.arange(n, device=w.device) - 1)
        mu_val = -d / 2
    return alpha, (mu_val if offset else None)

"""Data-free baselines: sign × mean|w| per group (rtn) and the greedy residual cascade."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..format import BinaryBasis
from .base import Quantizer, QuantizerError, groups_view, register


def residual_cascade(w: torch.Tensor, bases: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy cascade: B_1 = sign(W), α_1 = mean|W| per group; each next basis fits the residual
    R_i = W − Σ_{k<i} α_k B_k the same way (QBB step 1; for one basis this is XNOR-Net's α = mean|W|).
    Returns signs bool [N, rows, cols] and scales [rows, ngroups, N]."""
    rows, cols = w.shape
    wg, valid = groups_view(w.float(), group)
    count = valid.sum(-1).clamp(min=1).to(wg.dtype)          # real columns per group
    r = wg.clone()
    signs, scales = [], []
    for _ in range(bases):
        b = r >= 0
        alpha = (r.abs() * valid).sum(-1) / count               # mean |R| over real columns
        r = r - alpha[..., None] * torch.where(b, 1.0, -1.0)
        signs.append(b.reshape(rows, -1)[:, :cols])
        scales.append(alpha)
    return torch.stack(signs), torch.stack(scales, -1)


@register
@dataclasses.dataclass
class RTN(Quantizer):
    """One basis, α = mean|w| per group (bases must be 1: more bases is the residual method)."""
    name = "rtn"

    def check(self) -> None:
        super().check()
        if self.bases != 1:
            raise QuantizerError("--method rtn has one basis; use --method residual for N > 1")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        signs, scales = residual_cascade(w, 1, self.group)
        return BinaryBasis(signs=signs.cpu().numpy(), scales=scales[:, :, None, :].cpu().numpy().astype(np.float32),
                           group=self.group)


@register
@dataclasses.dataclass
class Residual(Quantizer):
    """N bases, each fit greedily to the residual of the previous ones."""
    name = "residual"

    def quantize(self, w, hessian=None) -> BinaryBasis:
        signs, scales = residual_cascade(w, self.bases, self.group)
        return BinaryBasis(signs=signs.cpu().numpy(), scales=scales[:, :, None, :].cpu().numpy().astype(np.float32),
                           group=self.group)

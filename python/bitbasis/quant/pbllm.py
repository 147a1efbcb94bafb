"""PB-LLM, post-training variant (Shang et al., ICLR 2024; hahnyuan/PB-LLM gptq_pb/gptq.py).

A fraction `salient` of the weights, chosen by Hessian saliency s = w² / U_jj² (U = chol(H⁻¹) upper,
one threshold per layer), stays 8-bit (per-row asymmetric min-max); the rest is binarized per row,
ŵ = α·sign(w − μ) + μ with μ = mean(w), α = mean|w − μ| over the row's non-salient entries.
GPTQ compensation runs column by column over both parts (error feedback inside each 128-column
block, lazy update after it).

Stored as one sign plane with a per-row group (OFFSET) plus the SPARSE part: salient mask, u8 codes
and per-row (scale, min). The reference fits μ and α to the row with salient entries zeroed (its
comment: "seems to have problem"); here they are fitted to the non-salient entries only.
"""
from __future__ import annotations

import dataclasses

import torch

from ..format import BinaryBasis, row_group
from .base import Quantizer, QuantizerError, register
from .gptq import BLOCK, check_inputs, f16, prepare


def salient_mask(W: torch.Tensor, U: torch.Tensor, fraction: float) -> torch.Tensor:
    """The exact top `fraction` of entries by s = w² / U_jj² (one threshold per layer; ties broken
    by position so the result is deterministic)."""
    sal = (W ** 2 / torch.diag(U)[None, :] ** 2).flatten()
    k = int(round(fraction * sal.numel()))
    mask = torch.zeros(sal.numel(), dtype=torch.bool, device=W.device)
    if k:
        mask[torch.argsort(sal, descending=True, stable=True)[:k]] = True
    return mask.reshape(W.shape)


def minmax8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's 8-bit per-row asymmetric min-max grid as stored: value = scale·code + min (fp16)."""
    zero = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(1).values, zero)
    xmax = torch.maximum(w.max(1).values, zero)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    scale = (xmax - xmin) / 255
    z = torch.round(-xmin / scale)
    s16 = torch.clamp(f16(scale), min=2.0 ** -24)
    return s16, f16(-s16 * z)


def pbllm(w: torch.Tensor, hessian: torch.Tensor, salient: float, percdamp: float = 0.01,
          blocksize: int = BLOCK) -> tuple[BinaryBasis, torch.Tensor]:
    rows, cols = w.shape
    hs, hm = minmax8(w.detach().float())                   # the reference fits the 8-bit grid to W first
    W, U = prepare(w, hessian, percdamp)
    mask = salient_mask(W, U, salient)
    keep = ~mask
    cnt = keep.sum(1).clamp(min=1)
    mu = (W * keep).sum(1) / cnt                                           # μ = mean(w)
    alpha = ((W - mu[:, None]).abs() * keep).sum(1) / cnt                  # α = mean|w − μ|
    mu, alpha = f16(mu), f16(alpha)
    Q = torch.zeros_like(W)
    signs = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, x, m = i1 + i, W1[:, i], mask[:, i1 + i]
            b = x - mu >= 0
            q_bin = alpha * torch.where(b, 1.0, -1.0) + mu                 # ŵ = α·sign(w − μ) + μ
            c = torch.clamp(torch.round((x - hm) / hs), 0, 255)
            q_hi = hs * c + hm                                              # 8-bit: scale·code + min
            q = torch.where(m, q_hi, q_bin)
            signs[:, col], codes[:, col], Q[:, col] = b & ~m, c.to(torch.uint8), q
            err = (x - q) / U1[i, i]
            W1[:, i:] -= err[:, None] @ U1[i:i + 1, i:]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    bb = BinaryBasis(signs=signs[None].cpu().numpy(), scales=alpha[:, None, None, None].cpu().numpy(),
                     offsets=mu[:, None, None].cpu().numpy(), group=row_group(cols),
                     sparse_mask=mask.cpu().numpy(), sparse_codes=codes[mask].cpu().numpy(),
                     sparse_zs=torch.stack([hs, hm], 1).cpu().numpy())
    return bb, Q


@register
@dataclasses.dataclass
class PBLLM(Quantizer):
    """Partially binarized: `salient` fraction 8-bit, the rest one sign plane per row (ignores --bases
    and --group)."""
    name = "pbllm"
    needs_hessian = True
    salient: float = 0.1
    percdamp: float = 0.01

    def check(self) -> None:
        super().check()
        if not 0 <= self.salient < 1:
            raise QuantizerError(f"salient={self.salient}: must be a fraction in [0, 1)")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        check_inputs(w, hessian, self.name)
        return pbllm(w, hessian, self.salient, self.percdamp)[0]

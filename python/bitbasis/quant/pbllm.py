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

import numpy as np
import torch

from ..format import BinaryBasis, row_group
from .base import Quantizer, QuantizerError, affine_binarize, register
from .gptq import BLOCK, check_inputs, f16, gptq_loop, prepare


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
    mu, alpha, _ = affine_binarize(W, keep, cnt)                           # μ = mean(w), α = mean|w − μ|
    mu, alpha = f16(mu), f16(alpha)
    maskn, mun, alphan, hsn, hmn = (t.cpu().numpy() for t in (mask, mu, alpha, hs, hm))
    signs = np.zeros((rows, cols), bool)
    codes = np.zeros((rows, cols), np.uint8)
    one = np.float32(1)

    def column(j, x, cur):
        m = maskn[:, j]
        b = x - mun >= 0
        q_bin = alphan * np.where(b, one, -one) + mun                       # ŵ = α·sign(w − μ) + μ
        c = np.clip(np.round((x - hmn) / hsn), 0, 255)
        q_hi = hsn * c + hmn                                                # 8-bit: scale·code + min
        signs[:, j], codes[:, j] = b & ~m, c
        return np.where(m, q_hi, q_bin)

    Q = gptq_loop(W, U, column=column, blocksize=blocksize)
    bb = BinaryBasis(signs=signs[None], scales=alphan[:, None, None, None],
                     offsets=mun[:, None, None], group=row_group(cols),
                     sparse_mask=maskn, sparse_codes=codes[maskn],
                     sparse_zs=torch.stack([hs, hm], 1).cpu().numpy())
    return bb, Q


@register
@dataclasses.dataclass
class PBLLM(Quantizer):
    """Partially binarized: `salient` fraction 8-bit, the rest one sign plane per row (ignores --bases
    and --group)."""
    name = "pbllm"
    uses_bases = False
    uses_group = False
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

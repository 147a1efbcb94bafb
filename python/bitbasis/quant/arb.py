"""ARB-LLM (Li et al., ICLR 2025; ZHITENGLI/ARB-LLM binary_arb.py, bigptq_arb.py).

BiLLM's pipeline and masks (same saliency search, same block-wise compensation), with the alternating
refined binarization in place of the one-shot affine fit, per row over each class of a block:
  order 1 (ARB, alg. 1): repeat `iters` times: μ += mean(W − Ŵ); α = ⟨B, W − μ⟩/⟨B, B⟩; B = sign(W − μ).
  order 2 (salient columns): μ += mean(W − Ŵ); α_1, α_2 by the same closed form, each given the
          other; (B_1, B_2) = the nearest of the four values μ ± α_1 ± α_2.
rc=True, ARB-RC: no mean, W ≈ diag(α) B diag(k), row scales α and column scales k fitted by
  alternating least squares. The reference keeps a column-scale vector per class and per plane; the
  format holds one column scale per column (COLSCALE), so here one k per column is shared by all
  classes and planes, and the row scales stay per row, block, class and plane.
Stored like BiLLM: N = 2 planes, COLMASK + ELEMCLASS, OFFSET (or COLSCALE with rc).
"""
from __future__ import annotations

import dataclasses

import torch

from ..format import BinaryBasis
from .base import Quantizer, QuantizerError, masked_mean, pm1, register
from .billm import binary_residual_gptq, braq
from .gptq import check_inputs


def arb_order1(x, mask, iters):
    m = mask.to(x.dtype)
    cnt = m.sum(1).clamp(min=1)
    _, (b,), (alpha,), mu = braq(x, mask, 1)
    for _ in range(iters):
        q = alpha[:, None] * pm1(b) + mu[:, None]
        mu = mu + masked_mean(x - q, m, cnt)                              # 1. fix α, B: update μ
        alpha = masked_mean(pm1(b) * (x - mu[:, None]), m, cnt)           # 2. α = ⟨B, W−μ⟩/⟨B,B⟩
        b = x - mu[:, None] >= 0                                          # 3. B = sign(W − μ)
    return [b & mask], [alpha], mu


def arb_order2(x, mask, iters):
    m = mask.to(x.dtype)
    cnt = m.sum(1).clamp(min=1)
    _, (b1, b2), (a1, a2), mu = braq(x, mask, 2)
    for _ in range(iters):
        q = a1[:, None] * pm1(b1) + a2[:, None] * pm1(b2) + mu[:, None]
        mu = mu + masked_mean(x - q, m, cnt)
        y = x - mu[:, None]
        a1 = masked_mean(pm1(b1) * (y - a2[:, None] * pm1(b2)), m, cnt)
        a2 = masked_mean(pm1(b2) * (y - a1[:, None] * pm1(b1)), m, cnt)
        v = torch.stack([-a1 - a2, -a1 + a2, a1 - a2, a1 + a2], 1)[:, None, :]   # (B1, B2) = (-,-) (-,+) (+,-) (+,+)
        best = torch.argmin((y[..., None] - v).abs(), -1)
        b1, b2 = best >= 2, (best % 2) == 1
    return [b1 & mask, b2 & mask], [a1, a2], mu


def fit_arb(iters):
    def fit(W1, colmask, m_conc, m_sparse):
        rows, n = W1.shape
        signs = torch.zeros(2, rows, n, dtype=torch.bool, device=W1.device)
        scales = torch.zeros(rows, 3, 2, device=W1.device)
        offsets = torch.zeros(rows, 3, device=W1.device)
        m_sal = colmask[None, :].expand(rows, n)
        for c, m, fn in ((0, m_conc, arb_order1), (1, m_sal, arb_order2), (2, m_sparse, arb_order1)):
            bs, alphas, mu = fn(W1, m, iters)
            for i, (b, a) in enumerate(zip(bs, alphas)):
                signs[i] |= b
                scales[:, c, i] = a
            offsets[:, c] = mu
        return signs, scales, offsets, None
    return fit


def fit_arb_rc(iters):
    """W[r, j] ≈ k_j · Σ_p a[r, class(r, j), p] · B_p[r, j], no mean (ARB-RC, one k per column)."""
    def fit(W1, colmask, m_conc, m_sparse):
        rows, n = W1.shape
        dev = W1.device
        cls = torch.zeros(rows, n, dtype=torch.int64, device=dev)
        cls[m_sparse] = 2
        cls[:, colmask] = 1
        masks = [(cls == c).to(W1.dtype) for c in range(3)]
        cnts = [m.sum(1).clamp(min=1) for m in masks]
        r_idx = torch.arange(rows, device=dev)[:, None]
        # init: order 1 of |W| per class; the salient class fits its residual with a second plane
        b = torch.zeros(2, rows, n, dtype=torch.bool, device=dev)
        b[0] = W1 >= 0
        a = torch.zeros(rows, 3, 2, device=dev)
        for c in range(3):
            a[:, c, 0] = masked_mean(W1.abs(), masks[c], cnts[c])
        res = W1 - a[r_idx, cls, 0] * pm1(b[0])
        b[1] = (res >= 0) & (cls == 1)
        a[:, 1, 1] = masked_mean(res.abs(), masks[1], cnts[1])
        k = torch.ones(n, device=dev)
        for _ in range(iters):
            D = a[r_idx, cls, 0] * pm1(b[0]) + a[r_idx, cls, 1] * pm1(b[1]) * masks[1]
            k = (W1 * D).sum(0) / (D * D).sum(0).clamp(min=1e-30)        # column scales, least squares
            kb = [k[None, :] * pm1(b[p]) for p in range(2)]
            for c in range(3):
                for p in range(2 if c == 1 else 1):                       # row scales, least squares
                    other = a[:, c, 1 - p][:, None] * kb[1 - p] if c == 1 else 0
                    num = (masks[c] * kb[p] * (W1 - other)).sum(1)
                    den = (masks[c] * kb[p] * kb[p]).sum(1).clamp(min=1e-30)
                    a[:, c, p] = num / den
            # salient class: (B_1, B_2) = the nearest of k·(±a_1 ± a_2)
            a1, a2 = a[:, 1, 0][:, None], a[:, 1, 1][:, None]
            v = torch.stack([-a1 - a2, -a1 + a2, a1 - a2, a1 + a2], -1) * k[None, :, None]
            best = torch.argmin((W1[..., None] - v).abs(), -1)
            sal = cls == 1
            b[0] = torch.where(sal, best >= 2, b[0])
            b[1] = sal & ((best % 2) == 1)
        return b, a, torch.zeros(rows, 3, device=dev), k
    return fit


@register
@dataclasses.dataclass
class ARB(Quantizer):
    """ARB-LLM on BiLLM's structure (ignores --bases: 2 planes; --group is the block size).
    Options: iters (15), rc (row x column scales, no mean), up_lim (50)."""
    name = "arb"
    uses_bases = False
    needs_hessian = True
    iters: int = 15
    rc: bool = False
    up_lim: int = 50
    percdamp: float = 0.01

    def check(self) -> None:
        super().check()
        if self.iters < 0:
            raise QuantizerError(f"iters={self.iters}: must be >= 0")
        if not isinstance(self.rc, bool):
            raise QuantizerError(f"rc={self.rc!r}: must be true or false")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        check_inputs(w, hessian, self.name)
        fit = fit_arb_rc(self.iters) if self.rc else fit_arb(self.iters)
        return binary_residual_gptq(w, hessian, self.group, fit, self.up_lim, self.percdamp,
                                    colscale=self.rc, offset=not self.rc)[0]

"""BiLLM (Huang et al., ICML 2024; Aaronhuang-778/BiLLM bigptq.py, binary.py, utils/autosearch.py).

Per block of `group` (128) columns, with saliency s = w² / U_jj² (U = chol(H⁻¹) upper):
  1. salient columns: rank columns by Σ_rows s; try the top 1..up_lim-1 as the salient set and keep
     the count with the lowest error; salient columns get residual (order-2) binarization
     W ≈ α_o·B_o + μ_o + α_r·B_r + μ_r  (binary residual approximation, eq. 5-6).
  2. the other entries: search a break-point p over the 0.10..0.90 percentiles of |s| (81 steps),
     split into concentrated (|s| < p) and sparse (|s| ≥ p), binarize each group on its own
     (order 1, eq. 8-9).
  Both searches score candidates by the binarization error of the saliency matrix itself, as the
  reference code does (utils/autosearch.py binarizes `target_weights`, not W).
Binarization is affine per row and group: μ = mean(r), α = mean|r − μ|, B = sign(r − μ).
Compensation is block-wise only: Err = (W − Q)/U_jj, W[:, end:] -= Err·U[blk, end:].

Stored with N = 2 planes: COLMASK (salient columns, class 1, both planes), ELEMCLASS (the sparse group,
class 2), OFFSET; classes 0 and 2 have α_1 = 0. The papers' "1.08-1.11 bit" counts one sign bit per
weight plus the salient columns' second plane; the true cost (bitbasis info) is much higher.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..format import BinaryBasis
from .base import Quantizer, QuantizerError, affine_binarize, masked_mean, pm1, register
from .gptq import check_inputs, f16, gptq_loop, prepare


def braq(x: torch.Tensor, mask: torch.Tensor, order: int):
    """BiLLM's high_order_residual: `order` affine binarizations, each of the previous residual,
    per row over the masked entries. Returns (ŵ·mask, signs [order], alphas [order], μ = Σ μ_i)."""
    m = mask.to(x.dtype)
    cnt = m.sum(1).clamp(min=1)
    r = x * m
    out = torch.zeros_like(x)
    signs, alphas, mu_total = [], [], torch.zeros(x.shape[0], device=x.device)
    for _ in range(order):
        mu, alpha, b = affine_binarize(r, m, cnt)
        q = (alpha[:, None] * pm1(b) + mu[:, None]) * m
        out, r = out + q, r - q
        signs.append(b & mask)
        alphas.append(alpha)
        mu_total = mu_total + mu
    return out, signs, alphas, mu_total


def _braq_error(x: torch.Tensor, m: torch.Tensor, order: int) -> torch.Tensor:
    """braq() for a batch of candidate masks m [T, rows|1, n] (float 0/1) on x [rows, n], with
    torch.sign as the reference (0 stays 0). Returns the binarized values [T, rows, n]."""
    cnt = m.sum(-1, keepdim=True).clamp(min=1)
    r = x * m
    out = torch.zeros_like(r)
    for _ in range(order):
        mu = r.sum(-1, keepdim=True) / cnt
        d = (r - mu) * m
        alpha = d.abs().sum(-1, keepdim=True) / cnt
        q = (alpha * torch.sign(d) + mu) * m
        out, r = out + q, r - q
    return out


def _group_errors(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Order-1 affine binarization error of the runs v[r, lo:hi] of rows sorted ascending, in closed
    form: Σ(v − μ − α·sign(v − μ))² = Σ(v − μ)² − n·α², α = mean|v − μ| from prefix sums.
    v [rows, n] float64 sorted; lo, hi [rows, P] int64. Returns [rows, P]."""
    rows, n = v.shape
    zero = torch.zeros(rows, 1, dtype=v.dtype, device=v.device)
    P1 = torch.cat([zero, v.cumsum(1)], 1)                     # prefix sums, [rows, n+1]
    P2 = torch.cat([zero, (v * v).cumsum(1)], 1)
    cnt = (hi - lo).to(v.dtype)
    c1 = cnt.clamp(min=1)
    S = P1.gather(1, hi) - P1.gather(1, lo)
    Q = P2.gather(1, hi) - P2.gather(1, lo)
    mu = S / c1
    j = torch.searchsorted(v.contiguous(), mu.contiguous()).clamp(min=lo, max=hi)  # first index ≥ μ
    below = P1.gather(1, j) - P1.gather(1, lo)
    nb = (j - lo).to(v.dtype)
    abs_sum = mu * nb - below + (S - below) - mu * (cnt - nb)
    alpha = abs_sum / c1
    return (Q - cnt * mu * mu - cnt * alpha * alpha).clamp(min=0)


def _salient_column_errors(s: torch.Tensor, order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Σ error of braq(s, A, 2) + braq(s, B, 2) for every candidate salient set A = the first
    `count` columns of `order` (B its complement), in closed form per row.

    With v sorted: order 1 gives μ1 = mean, α1 = mean|v − μ1|; the residual r = v − μ1 − α1·b has
    mean μ2 = −α1(n₊ − n₋)/n and α2 = mean|r − μ2|, which splits into |v − θ₊| over v ≥ μ1 and
    |v − θ₋| over v < μ1 (θ± = μ1 ± α1 + μ2); the error is Σ(v − μ1)² − n(α1² + μ2² + α2²).
    Every sum below a threshold comes from cumulative tables over the sorted row."""
    rows, n = s.shape
    T = len(counts)
    v, idx = torch.sort(s.double(), 1)                         # [R, n]
    rank = torch.empty(n, dtype=torch.int64, device=s.device)
    rank[order] = torch.arange(n, device=s.device)
    inA = rank[idx][:, None, :] < counts[None, :, None]        # [R, T, n]: sorted entry k in A?
    cA = torch.zeros(rows, T, n + 1, dtype=torch.int32, device=s.device)
    torch.cumsum(inA, 2, dtype=torch.int32, out=cA[..., 1:])   # A's count below sorted index k
    sA = torch.zeros(rows, T, n + 1, dtype=v.dtype, device=s.device)
    torch.cumsum(inA * v[:, None, :], 2, out=sA[..., 1:])      # A's sum below sorted index k
    del inA
    sAll = torch.cat([torch.zeros(rows, 1, dtype=v.dtype, device=s.device), v.cumsum(1)], 1)
    so = s[:, order].double()                                  # totals of A straight from column order
    nA = counts.to(v.dtype)[None, :].expand(rows, -1)
    SA, QA = so.cumsum(1)[:, counts - 1], (so * so).cumsum(1)[:, counts - 1]
    S_all, Q_all = so.sum(1, keepdim=True), (so * so).sum(1, keepdim=True)
    vc = v.contiguous()
    total = 0
    for inside, nn_, S, q in ((True, nA, SA, QA), (False, n - nA, S_all - SA, Q_all - QA)):
        def below(t):   # (count, sum) of the set's values < t, t [R, T]
            k = torch.searchsorted(vc, t.contiguous())
            c, sm = cA.gather(2, k[..., None])[..., 0].to(v.dtype), sA.gather(2, k[..., None])[..., 0]
            if inside:
                return c, sm
            return k.to(v.dtype) - c, sAll.gather(1, k) - sm
        n1 = nn_.clamp(min=1)
        mu1 = S / n1
        c0, s0 = below(mu1)
        a1 = (mu1 * c0 - s0 + (S - s0) - mu1 * (nn_ - c0)) / n1
        mu2 = -a1 * ((nn_ - c0) - c0) / n1
        tp, tm = mu1 + a1 + mu2, mu1 - a1 + mu2
        cp, sp_ = below(tp)
        cp, sp_ = cp - c0, sp_ - s0                             # run v ≥ μ1, below θ₊
        npos, spos = nn_ - c0, S - s0
        abs_p = tp * cp - sp_ + (spos - sp_) - tp * (npos - cp)
        cm, sm = below(tm)
        abs_m = tm * cm - sm + (s0 - sm) - tm * (c0 - cm)
        a2 = (abs_p + abs_m) / n1
        total = total + (q - nn_ * mu1 * mu1 - nn_ * (a1 * a1 + mu2 * mu2 + a2 * a2)).clamp(min=0)
    return total.sum(0)


def search_masks(s: torch.Tensor, up_lim: int = 50, chunk: int = 1 << 19):
    """BiLLM's structural search on a block's saliency s [rows, n]. Returns the salient-column mask
    [n], the concentrated mask and the sparse mask [rows, n] (disjoint, covering the block).

    The reference scores every candidate (1..up_lim-1 salient columns, then 81 break-points) by
    binarizing the saliency matrix; the same errors come here in closed form from each row's sorted
    values (tests check the choice against the brute force)."""
    rows, n = s.shape
    order = torch.argsort(s.abs().sum(0), descending=True, stable=True)
    counts = torch.arange(1, min(up_lim, n), device=s.device)  # reference: range(1, up_lim)
    per = max(1, chunk // (len(counts) * n))
    errs = sum(_salient_column_errors(s[r0:r0 + per], order, counts) for r0 in range(0, rows, per))
    n_sal = int(counts[int(torch.argmin(errs))])               # first minimum, as `<` in the loop
    colmask = torch.zeros(n, dtype=torch.bool, device=s.device)
    colmask[order[:n_sal]] = True

    m3 = colmask[None, :].expand(rows, n)
    rest = (s * ~m3).abs()
    pcts = np.quantile(rest.cpu().numpy().reshape(-1), np.linspace(0.10, 0.90, 81))  # zeros included, as the reference
    v = torch.sort(rest[:, ~colmask].double(), 1).values       # each row's non-salient saliencies
    p = torch.as_tensor(pcts, dtype=v.dtype, device=v.device)[None, :].expand(rows, -1).contiguous()
    k = torch.searchsorted(v.contiguous(), p)                  # concentrated = |s| < p: the first k
    lo, hi = torch.zeros_like(k), torch.full_like(k, v.shape[1])
    err = (_group_errors(v, lo, k) + _group_errors(v, k, hi)).sum(0)   # salient part is the same for all p
    split = float(pcts[int(torch.argmin(err))])
    return colmask, (rest < split) & ~m3, (rest >= split) & ~m3


def block_values(signs, scales, offsets, colscale, cls) -> torch.Tensor:
    """The dequantizer's arithmetic on one block (format.dequantize order: planes ascending, then μ,
    then the column scale), from the stored fp16 values."""
    r = torch.arange(cls.shape[0], device=cls.device)[:, None]
    v = scales[r, cls, 0] * pm1(signs[0])
    for i in range(1, signs.shape[0]):
        v = v + scales[r, cls, i] * pm1(signs[i])
    if offsets is not None:
        v = v + offsets[r, cls]
    if colscale is not None:
        v = v * colscale[None, :]
    return v


def fit_billm(W1: torch.Tensor, colmask, m_conc, m_sparse):
    """BiLLM's binarization of one block given its masks: salient order 2, the two groups order 1.
    Returns signs bool [2, rows, n], scales [rows, 3, 2], offsets [rows, 3], colscale None."""
    rows, n = W1.shape
    signs = torch.zeros(2, rows, n, dtype=torch.bool, device=W1.device)
    scales = torch.zeros(rows, 3, 2, device=W1.device)
    offsets = torch.zeros(rows, 3, device=W1.device)
    m_sal = colmask[None, :].expand(rows, n)
    for c, m, order in ((0, m_conc, 1), (1, m_sal, 2), (2, m_sparse, 1)):
        _, bs, alphas, mu = braq(W1, m, order)
        for i in range(order):
            signs[i] |= bs[i]
            scales[:, c, i] = alphas[i]
        offsets[:, c] = mu
    return signs, scales, offsets, None


def binary_residual_gptq(w, hessian, group: int, fit, up_lim: int = 50, percdamp: float = 0.01,
                         colscale: bool = False, offset: bool = True):
    """The BiLLM / ARB-LLM loop: per block of `group` columns, search masks on the saliency, binarize
    with `fit`, compensate the following columns block-wise. Returns (BinaryBasis, Q)."""
    rows, cols = w.shape
    W, U = prepare(w, hessian, percdamp)
    ng = -(-cols // group)
    signs = torch.zeros(2, rows, cols, dtype=torch.bool, device=W.device)
    scales = torch.zeros(rows, ng, 3, 2, device=W.device)
    offsets = torch.zeros(rows, ng, 3, device=W.device)
    colmask = torch.zeros(cols, dtype=torch.bool, device=W.device)
    elemclass = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    ks = torch.ones(cols, device=W.device)

    def block(i1, i2, W1):
        g, U1 = i1 // group, U[i1:i2, i1:i2]
        s = W1 ** 2 / torch.diag(U1)[None, :] ** 2               # saliency (reference: w²/U_jj²)
        cm, m_conc, m_sparse = search_masks(s, up_lim)
        sg, sc, of, k = fit(W1, cm, m_conc, m_sparse)
        sc, of = f16(sc), f16(of)
        k = f16(k) if k is not None else None
        cls = torch.zeros(rows, i2 - i1, dtype=torch.int64, device=W.device)
        cls[m_sparse] = 2
        cls[:, cm] = 1
        signs[:, :, i1:i2], scales[:, g], offsets[:, g] = sg, sc, of
        colmask[i1:i2], elemclass[:, i1:i2] = cm, m_sparse
        if k is not None:
            ks[i1:i2] = k
        return block_values(sg, sc, of if offset else None, k, cls)

    Q = gptq_loop(W, U, block=block, blocksize=group)              # block-wise compensation only
    bb = BinaryBasis(signs=signs.cpu().numpy(), scales=scales.cpu().numpy(), group=group,
                     offsets=offsets.cpu().numpy() if offset else None, colmask=colmask.cpu().numpy(),
                     elemclass=elemclass.cpu().numpy(), colscale=ks.cpu().numpy() if colscale else None)
    return bb, Q


@register
@dataclasses.dataclass
class BiLLM(Quantizer):
    """BiLLM: salient columns residual-binarized, the rest split at a searched break-point
    (ignores --bases: always 2 planes; --group is the block size, 128 in the paper)."""
    name = "billm"
    uses_bases = False
    needs_hessian = True
    up_lim: int = 50
    percdamp: float = 0.01

    def check(self) -> None:
        super().check()
        if self.up_lim < 2:
            raise QuantizerError(f"up_lim={self.up_lim}: must be >= 2")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        check_inputs(w, hessian, self.name)
        return binary_residual_gptq(w, hessian, self.group, fit_billm, self.up_lim, self.percdamp)[0]

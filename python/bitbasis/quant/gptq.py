"""GPTQ (Frantar et al., arXiv 2210.17323; IST-DASLab/gptq) exported as k bit-planes.

Also the shared Hessian machinery of the calibrated methods (PB-LLM, BiLLM, ARB-LLM): dead columns,
damping, the upper Cholesky factor of H⁻¹, and fp16 rounding of the stored parameters.

Every value a quantizer compensates against is computed from the fp16 parameters the file will hold,
in the summation order of `format.dequantize`, so the file is exactly what GPTQ compensated.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..format import BinaryBasis
from .base import Quantizer, QuantizerError, all_finite, register

BLOCK = 128  # GPTQ's lazy-update block (columns)


def f16(x: torch.Tensor) -> torch.Tensor:
    """The value a reader will see after the fp16 round trip (kept in float32)."""
    return x.to(torch.float16).to(torch.float32)


def check_inputs(w: torch.Tensor, hessian: torch.Tensor | None, name: str) -> None:
    if hessian is None:
        raise QuantizerError(f"--method {name} needs calibration (a Hessian)")
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise QuantizerError(f"{name}: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not all_finite(w):
        raise QuantizerError(f"{name}: weight holds NaN or Inf values")
    if not all_finite(hessian):
        raise QuantizerError(f"{name}: Hessian holds NaN or Inf values (calibration activations overflowed?)")


def prepare(w: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's preamble: W float32 copy with dead columns zeroed, and U = chol(H⁻¹) upper.

    dead columns (diag H = 0, inputs never active): H_jj = 1, W[:, j] = 0.
    damping: H += percdamp · mean(diag H) · I (keeps the Cholesky factorisation stable)."""
    W = w.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float32, copy=True).to(W.device)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    try:
        L = torch.linalg.cholesky(H)
        U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise QuantizerError("Hessian is not positive definite even after damping "
                             "(too little calibration data for this layer?)") from None
    return W, U


# --- k-bit min-max codes on the fp16 grid -------------------------------------------------------

def minmax_params(x: torch.Tensor, bits: int, mse: bool = False, grid: int = 100, maxshrink: float = 0.8,
                  norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's per-row asymmetric min-max (quant.py find_params, perchannel, sym=False):
    the range always includes 0; d = (xmax - xmin)/maxq, z = round(-xmin/d).
    Returned as the stored fp16 pair: α_0 = d/2 (POW2 scale) and μ = d·((2^k-1)/2 - z).
    mse=True is the reference's optional range search: shrink [xmin, xmax] by p = 1, 0.99, ...,
    1 − maxshrink and keep, per row, the grid with the lowest Σ|ŵ − x|^norm (p = 1 is min-max)."""
    maxq = 2 ** bits - 1
    zero = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero)
    xmax = torch.maximum(x.max(1).values, zero)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    a0, mu = _grid(xmin, xmax, maxq)
    if mse:
        best = torch.full_like(xmin, float("inf"))
        for i in range(int(maxshrink * grid)):
            p = 1 - i / grid
            a1, m1 = _grid(p * xmin, p * xmax, maxq)
            q = torch.clamp(torch.round((x - m1[:, None]) / (2 * a1[:, None]) + maxq / 2), 0, maxq)
            # |e|^norm as exp(norm · log|e|) (log 0 = −inf gives 0): torch's pow with a float exponent
            # runs one element at a time (~30 ns each), which made this search 85% of a Gemma 3
            # calibration; log and exp vectorize (~3x faster, the same values to ~1e-7 relative)
            e = (a1[:, None] * (2 * q - maxq) + m1[:, None] - x).abs_()
            err = e.log_().mul_(norm).exp_().sum(1)
            better = err < best
            best = torch.where(better, err, best)
            a0, mu = torch.where(better, a1, a0), torch.where(better, m1, mu)
    return a0, mu


def _grid(xmin: torch.Tensor, xmax: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = (xmax - xmin) / maxq
    z = torch.round(-xmin / d)
    a0 = f16(d / 2)                                  # spec: α_i = d·2^(i-1), POW2 stores α_0
    a0 = torch.clamp(a0, min=2.0 ** -24)             # a range below fp16's smallest step
    mu = f16(2 * a0 * (maxq / 2 - z))                # spec: μ = d·((2^k - 1)/2 - z)
    return a0, mu


def codes_and_values(x: np.ndarray, a0: np.ndarray, mu: np.ndarray, bits: int):
    """Round-to-nearest on the stored grid ŵ(q) = 2α_0·(q - (2^k-1)/2) + μ, q in [0, 2^k-1].
    x, a0, mu [rows] float32. Returns q (float) and ŵ computed as the dequantizer does: the planes
    sum α_0·(2q - maxq) exactly in fp32, then μ is added once."""
    maxq = 2 ** bits - 1
    q = np.clip(np.round((x - mu) / (2 * a0) + maxq / 2), 0, maxq)
    return q, a0 * (2 * q - maxq) + mu


def gptq_loop(W: torch.Tensor, U: torch.Tensor, column=None, block=None, blocksize: int = BLOCK) -> torch.Tensor:
    """The error feedback shared by every calibrated quantizer: GPTQ's Algorithm 1 with lazy batch
    updates (arXiv 2210.17323, sec. 3-4). W is overwritten (prepare()'s private copy); returns Q.

    column(j, w_j, cur) -> ŵ_j: quantize column j (numpy float32 [rows], already compensated for
        every earlier column); cur(a, b) gives the current weights of columns a..b-1 (a >= j), e.g.
        to fit a group's grid at its first column. Then, inside the block (OBS update, GPTQ eq. 2
        with the Cholesky rows of H⁻¹):
            err_j = (w_j − ŵ_j) / U_jj,    W[:, j+1:blk] −= err_j · U[j, j+1:blk]
    block(i1, i2, W_blk) -> Ŵ_blk: quantize a whole block at once (BiLLM), no column-wise update:
            Err = (W_blk − Ŵ_blk) / diag(U_blk)
    After each block, the lazy batch update of the columns not yet reached:
            W[:, blk_end:] −= Err · U[blk, blk_end:]

    The column loop runs in numpy: it issues ~10 operations on one column per step, where torch's
    per-call overhead costs ~10x numpy's; every operation is the same IEEE float32 one, so the
    result does not depend on which library ran it."""
    dev = W.device
    if column is not None:
        W, U = W.cpu(), U.cpu()
        Wn, Un = W.numpy(), U.numpy()
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    Qn = Q.numpy() if column is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        if block is not None:
            W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
            Q1 = block(i1, i2, W1)
            Q[:, i1:i2] = Q1
            Err1 = (W1 - Q1) / torch.diag(U1)[None, :]
        else:
            W1t, U1 = Wn[:, i1:i2].T.copy(), Un[i1:i2, i1:i2]           # block transposed: columns contiguous
            Err1n = np.zeros_like(W1t)
            buf = np.empty_like(W1t)

            def cur(a, b, W1t=W1t, i1=i1, i2=i2):
                if b <= i2:
                    return W1t[a - i1:b - i1].T
                return np.concatenate([W1t[a - i1:].T, Wn[:, i2:b]], 1)
            for i in range(i2 - i1):
                w = W1t[i]
                q = column(i1 + i, w, cur)
                Qn[:, i1 + i] = q
                err = (w - q) / U1[i, i]                                  # err = (w_q − ŵ_q)/U_qq
                k = i2 - i1 - i - 1
                np.multiply(U1[i, i + 1:, None], err[None, :], out=buf[:k])
                W1t[i + 1:] -= buf[:k]                                    # column-wise update
                Err1n[i] = err
            Err1 = torch.from_numpy(np.ascontiguousarray(Err1n.T))
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                                  # lazy block update
    return Q.to(dev)


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, percdamp: float = 0.01,
         blocksize: int = BLOCK, mse: bool = False, act_order: bool = False) -> tuple[BinaryBasis, torch.Tensor]:
    """GPTQ (Algorithm 1 with lazy batch updates) with per-group min-max grids (static_groups off:
    a group's grid is fitted to the already-compensated weights when its first column is reached).
    mse: the reference's range search for each grid (minmax_params). act_order: quantize columns in
    order of decreasing diag(H) (the reference's --act-order); the file's groups are contiguous, so
    every grid is then fitted up front on the weights before compensation (its static_groups).
    Returns the BinaryBasis and the in-memory quantized matrix Q (what the file dequantizes to)."""
    rows, cols = w.shape
    perm = torch.argsort(torch.diag(hessian), descending=True, stable=True) if act_order else None
    if act_order:
        W, U = prepare(w[:, perm], hessian[perm][:, perm], percdamp)
    else:
        W, U = prepare(w, hessian, percdamp)
    codes = np.zeros((rows, cols), np.int64)
    ng = -(-cols // group)
    a0s = np.zeros((rows, ng), np.float32)
    mus = np.zeros((rows, ng), np.float32)
    if act_order:                                    # static grids on the original column order
        Wo = torch.empty_like(W)
        Wo[:, perm] = W
        for g in range(ng):
            a0, mu = minmax_params(Wo[:, g * group:(g + 1) * group], bits, mse)
            a0s[:, g], mus[:, g] = a0.cpu().numpy(), mu.cpu().numpy()
        orig = perm.cpu().numpy()

    def column(j, x, cur):
        if act_order:
            j = int(orig[j])
        g = j // group
        if j % group == 0 and not act_order:   # new group: fit its grid to the current (compensated) weights
            a0, mu = minmax_params(torch.from_numpy(cur(j, min(j + group, cols))), bits, mse)
            a0s[:, g], mus[:, g] = a0.numpy(), mu.numpy()
        q, v = codes_and_values(x, a0s[:, g], mus[:, g], bits)
        codes[:, j] = q
        return v

    Q = gptq_loop(W, U, column=column, blocksize=blocksize)
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    planes = np.stack([(codes >> b) & 1 == 1 for b in range(bits)])      # q = Σ 2^i b_i
    bb = BinaryBasis(signs=planes, scales=a0s[:, :, None, None], offsets=mus[:, :, None], group=group, pow2=True)
    return bb, Q


@register
@dataclasses.dataclass
class GPTQ(Quantizer):
    """k-bit GPTQ (k = --bases, 1..4), asymmetric grid per group of --group columns, its range
    searched by mse (default) or min-max (mse=false).
    Stored as k sign planes with POW2 scales and an offset: ≈ k + 32/G bits per weight."""
    name = "gptq"
    needs_hessian = True
    percdamp: float = 0.01
    mse: bool = True           # range search per grid (the reference's Quantizer(mse=True)); halves the
                               # 2-bit layer error on SmolLM2 (docs/quant_table.json)
    act_order: bool = False    # columns in order of decreasing diag(H), static grids

    def check(self) -> None:
        super().check()
        if not 1 <= self.bases <= 4:
            raise QuantizerError(f"--method gptq: --bases {self.bases} bits, must be 1..4")
        if not 0 <= self.percdamp < 1:
            raise QuantizerError(f"percdamp={self.percdamp}: must be in [0, 1)")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        check_inputs(w, hessian, self.name)
        return gptq(w, hessian, self.bases, self.group, self.percdamp, mse=self.mse, act_order=self.act_order)[0]

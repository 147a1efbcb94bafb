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
from .base import Quantizer, QuantizerError, register

BLOCK = 128  # GPTQ's lazy-update block (columns)


def f16(x: torch.Tensor) -> torch.Tensor:
    """The value a reader will see after the fp16 round trip (kept in float32)."""
    return x.to(torch.float16).to(torch.float32)


def check_inputs(w: torch.Tensor, hessian: torch.Tensor | None, name: str) -> None:
    if hessian is None:
        raise QuantizerError(f"--method {name} needs calibration (a Hessian)")
    if w.ndim != 2 or hessian.shape != (w.shape[1], w.shape[1]):
        raise QuantizerError(f"{name}: weight {tuple(w.shape)} and Hessian {tuple(hessian.shape)} do not match")
    if not torch.isfinite(w).all():
        raise QuantizerError(f"{name}: weight holds NaN or Inf values")
    if not torch.isfinite(hessian).all():
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

def minmax_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's per-row asymmetric min-max (quant.py find_params, perchannel, sym=False):
    the range always includes 0; d = (xmax - xmin)/maxq, z = round(-xmin/d).
    Returned as the stored fp16 pair: α_0 = d/2 (POW2 scale) and μ = d·((2^k-1)/2 - z)."""
    maxq = 2 ** bits - 1
    zero = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(1).values, zero)
    xmax = torch.maximum(x.max(1).values, zero)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    d = (xmax - xmin) / maxq
    z = torch.round(-xmin / d)
    a0 = f16(d / 2)                                  # spec: α_i = d·2^(i-1), POW2 stores α_0
    a0 = torch.clamp(a0, min=2.0 ** -24)             # a range below fp16's smallest step
    mu = f16(2 * a0 * (maxq / 2 - z))                # spec: μ = d·((2^k - 1)/2 - z)
    return a0, mu


def codes_and_values(x: torch.Tensor, a0: torch.Tensor, mu: torch.Tensor, bits: int):
    """Round-to-nearest on the stored grid ŵ(q) = 2α_0·(q - (2^k-1)/2) + μ, q in [0, 2^k-1].
    x [rows, n]; a0, mu [rows]. Returns q (int) and ŵ computed as the dequantizer does: the planes
    sum α_0·(2q - maxq) exactly in fp32, then μ is added once."""
    maxq = 2 ** bits - 1
    a0, mu = a0[:, None], mu[:, None]
    q = torch.clamp(torch.round((x - mu) / (2 * a0) + maxq / 2), 0, maxq)
    return q, a0 * (2 * q - maxq) + mu


def gptq(w: torch.Tensor, hessian: torch.Tensor, bits: int, group: int, percdamp: float = 0.01,
         blocksize: int = BLOCK) -> tuple[BinaryBasis, torch.Tensor]:
    """GPTQ (Algorithm 1 with lazy batch updates) with per-group min-max grids (static_groups off:
    a group's grid is fitted to the already-compensated weights when its first column is reached).
    Returns the BinaryBasis and the in-memory quantized matrix Q (what the file dequantizes to)."""
    rows, cols = w.shape
    W, U = prepare(w, hessian, percdamp)
    Q = torch.zeros_like(W)
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=W.device)
    ng = -(-cols // group)
    a0s = torch.zeros(rows, ng, device=W.device)
    mus = torch.zeros(rows, ng, device=W.device)
    a0 = mu = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:   # new group: fit its grid to the current (compensated) weights
                g = col // group
                a0, mu = minmax_params(W1[:, i:i + group] if i + group <= i2 - i1 else
                                       torch.cat([W1[:, i:], W[:, i2:col + group]], 1), bits)
                a0s[:, g], mus[:, g] = a0, mu
            q, v = codes_and_values(W1[:, i:i + 1], a0, mu, bits)
            codes[:, col], Q1[:, i] = q[:, 0].long(), v[:, 0]
            err = (W1[:, i] - Q1[:, i]) / U1[i, i]                       # err = (w_q - ŵ_q)/U_qq
            W1[:, i:] -= err[:, None] @ U1[i:i + 1, i:]                   # column-wise update
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                                  # lazy block update
    planes = torch.stack([(codes >> b) & 1 == 1 for b in range(bits)])   # q = Σ 2^i b_i
    bb = BinaryBasis(signs=planes.cpu().numpy(), scales=a0s[:, :, None, None].cpu().numpy(),
                     offsets=mus[:, :, None].cpu().numpy(), group=group, pow2=True)
    return bb, Q


@register
@dataclasses.dataclass
class GPTQ(Quantizer):
    """k-bit GPTQ (k = --bases, 1..4), asymmetric min-max per group of --group columns.
    Stored as k sign planes with POW2 scales and an offset: ≈ k + 32/G bits per weight."""
    name = "gptq"
    needs_hessian = True
    percdamp: float = 0.01

    def check(self) -> None:
        super().check()
        if not 1 <= self.bases <= 4:
            raise QuantizerError(f"--method gptq: --bases {self.bases} bits, must be 1..4")
        if not 0 <= self.percdamp < 1:
            raise QuantizerError(f"percdamp={self.percdamp}: must be in [0, 1)")

    def quantize(self, w, hessian=None) -> BinaryBasis:
        check_inputs(w, hessian, self.name)
        return gptq(w, hessian, self.bases, self.group, self.percdamp)[0]

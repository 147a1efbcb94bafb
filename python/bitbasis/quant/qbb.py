"""QBB — Quantization with Binary Bases (NeurIPS 2024, seed 001; no public code).

    W ≈ Σ_{i<N} α_i ⊙ B_i  (+ μ)          B_i ∈ {−1,+1}^{rows×cols}, α_i and μ per row and group   (QBB eq. 1)

Step 1, initialisation (`init`):
  int4     a 4-bit asymmetric min-max code per group, W = d·(q − z), is exactly 4 bit planes:
           q − 7.5 = Σ_{i=0..3} 2^{i−1} s_i  ⇒  α_i = d·2^{i−1}, μ = d·(7.5 − z)  (lossless for N = 4).
           N < 4 keeps the N most significant planes; N > 4 adds cascade planes on the residual.
  gptq4    the same, from the GPTQ 4-bit code (needs calibration: a Hessian per layer).
  cascade  the analytic residual cascade (quant.simple.residual_cascade).
Step 2, per layer and data-free: Adam on ‖W − Σ α_i B_i − μ‖² (or tr(ΔW H ΔWᵀ) with a Hessian),
  latent real B with a straight-through sign; one basis is updated per step (cycling) while every
  scale updates every step (QBB eq. 4 and its iterative schedule).
Then a closed-form least-squares refit of the scales for the final signs (never worse; checked).
Step 3, data-free distillation of the scales: bitbasis.distill (option distill_steps).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..format import BinaryBasis
from .base import Quantizer, QuantizerError, groups_view, register
from .simple import residual_cascade

INITS = ("int4", "gptq4", "cascade")
PRESETS = {"": {}, "fast": {"iters": 100}, "paper": {"iters": 15000}}


# --- step 1: initialisation ----------------------------------------------------------------------

def rtn4(w: torch.Tensor, group: int) -> BinaryBasis:
    """Data-free 4-bit round-to-nearest, asymmetric min-max per group (GPTQ's quantizer: the range
    includes 0), as 4 planes: POW2 scales α_i = α_0·2^i with α_0 = d/2, OFFSET μ = d·(7.5 − z)."""
    rows, cols = w.shape
    wg, valid = groups_view(w.float(), group)
    big = torch.finfo(torch.float32).max
    xmin = torch.where(valid, wg, big).amin(-1).clamp(max=0)
    xmax = torch.where(valid, wg, -big).amax(-1).clamp(min=0)
    dead = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(dead, -1.0, xmin), torch.where(dead, 1.0, xmax)
    d = (xmax - xmin) / 15
    z = torch.round(-xmin / d)
    q = torch.clamp(torch.round(wg / d[..., None]) + z[..., None], 0, 15).to(torch.int64)
    q = q.reshape(rows, -1)[:, :cols]
    signs = torch.stack([(q >> i) & 1 == 1 for i in range(4)])
    alpha0 = (d / 2)[:, :, None, None]
    return BinaryBasis(signs=signs.cpu().numpy(), scales=alpha0.cpu().numpy().astype(np.float32), group=group,
                       offsets=(d * (7.5 - z))[:, :, None].cpu().numpy().astype(np.float32), pow2=True)


def basis_tensors(bb: BinaryBasis, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A one-class BinaryBasis -> signs bool [N, rows, cols], α [rows, ng, N], μ [rows, ng] or None."""
    from ..format import full_scales
    if bb.n_classes != 1 or bb.sparse_mask is not None or bb.colscale is not None:
        raise QuantizerError("a QBB initialisation must be a plain planes + scales (+ offset) code")
    signs = torch.from_numpy(np.asarray(bb.signs, bool)).to(device)
    alpha = torch.from_numpy(full_scales(bb)[:, :, 0, :].copy()).to(device)
    mu = None if bb.offsets is None else torch.from_numpy(np.asarray(bb.offsets, np.float32)[:, :, 0].copy()).to(device)
    return signs, alpha, mu


def pm1(signs: torch.Tensor) -> torch.Tensor:
    return torch.where(signs, 1.0, -1.0)


def reconstruct(signs: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, group: int) -> torch.Tensor:
    """Σ α_i s_i + μ as float32 [rows, cols] (the same sum as format.dequantize)."""
    n, rows, cols = signs.shape
    gidx = torch.arange(cols, device=signs.device) // group
    w = torch.zeros(rows, cols, device=signs.device)
    for i in range(n):
        w += alpha[:, gidx, i] * pm1(signs[i])
    if mu is not None:
        w += mu[:, gidx]
    return w


def layer_loss(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """‖ΔW‖² (or tr(ΔW H ΔWᵀ)) per weight: the objective of step 2."""
    e = w - w_hat
    if hessian is None:
        return float((e * e).mean())
    return float(((e @ hessian) * e).sum() / e.numel())


def refit(w: torch.Tensor, signs: torch.Tensor, group: int, offset: bool,
          col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form least squares of the scales for fixed signs, per row and group:
    min_{α, μ} Σ_j c_j (w_j − Σ_i α_i s_ij − μ)²  ⇒  (AᵀCA) [α; μ] = AᵀC w  with A = [s_1 … s_N 1]."""
    n, rows, cols = signs.shape
    wg, valid = groups_view(w.float(), group)                       # [rows, ng, G]
    c = valid.float().expand_as(wg)
    if col_weight is not None:
        c = c * groups_view(col_weight.float()[None], group)[0]
    a = [groups_view(pm1(signs[i]), group)[0] for i in range(n)]
    if offset:
        a.append(torch.ones_like(wg))
    a = torch.stack(a, -1)                                          # [rows, ng, G, K]
    ca = a * c[..., None]
    gram = ca.transpose(-1, -2) @ a                                 # [rows, ng, K, K]
    rhs = (ca * wg[..., None]).sum(-2)                              # [rows, ng, K]
    k = gram.shape[-1]
    # A tiny ridge keeps groups with repeated planes (or a constant plane next to μ) solvable.
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    gram = gram + ridge[..., None, None] * torch.eye(k, device=w.device)
    sol = torch.linalg.solve(gram, rhs[..., None])[..., 0]
    return sol[..., :n].contiguous(), (sol[..., n].contiguous() if offset else None)


# --- step 2: gradient descent with a straight-through sign ---------------------------------------

class _SignSTE(torch.autograd.Function):
    """sign in the forward pass, identity in the backward pass (BinaryConnect's straight-through
    estimator; the latent is clamped to [−1, 1] after each step, which plays the role of the clip)."""
    @staticmethod
    def forward(ctx, u):
        return torch.where(u >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        return g


def descend(w: torch.Tensor, signs: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None, group: int,
            iters: int, lr: float, scale_lr: float, hessian: torch.Tensor | None = None,
            progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[float]]:
    """QBB step 2. Returns the signs / scales of the lowest loss seen (the straight-through updates
    oscillate, so the last iterate is not always the best) and the loss history."""
    n, rows, cols = signs.shape
    gidx = torch.arange(cols, device=w.device) // group
    latent = [torch.nn.Parameter(pm1(signs[i]) * 0.5) for i in range(n)]
    a = torch.nn.Parameter(alpha.clone())
    m = torch.nn.Parameter(mu.clone()) if mu is not None else None
    step_scale = scale_lr * float(alpha.abs().mean())               # lr relative to the scales' size
    opt_s = torch.optim.Adam([p for p in (a, m) if p is not None], lr=step_scale)
    opt_b = [torch.optim.Adam([u], lr=lr) for u in latent]          # one state per basis
    best = (math.inf, signs.clone(), alpha.clone(), None if mu is None else mu.clone())
    hist = []
    for t in range(iters + 1):
        k = t % n                                                   # the basis updated this step
        with torch.no_grad():
            fixed = sum(a[:, gidx, i] * pm1(latent[i] >= 0) for i in range(n) if i != k)
        w_hat = fixed + a[:, gidx, k] * _SignSTE.apply(latent[k])
        if m is not None:
            w_hat = w_hat + m[:, gidx]
        e = w - w_hat
        loss = (e * e).mean() if hessian is None else ((e @ hessian) * e).sum() / e.numel()
        lv = float(loss)
        hist.append(lv)
        if lv < best[0]:                                            # loss of the current signs/scales
            best = (lv, torch.stack([u.detach() >= 0 for u in latent]), a.detach().clone(),
                    None if m is None else m.detach().clone())
        if t == iters:
            break
        opt_s.zero_grad(set_to_none=True)
        opt_b[k].zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        opt_b[k].step()
        with torch.no_grad():
            latent[k].clamp_(-1, 1)
        if progress is not None:
            progress(t, lv)
    return best[1], best[2], best[3], hist


# --- the quantizer -------------------------------------------------------------------------------

@register
@dataclasses.dataclass
class QBB(Quantizer):
    """QBB: N binary bases with per-row, per-group scales (module docstring)."""
    name = "qbb"
    init: str = "int4"           # int4 | gptq4 | cascade
    iters: int = 300             # gradient steps per layer (step 2); preset=paper: 15000
    lr: float = 0.02             # Adam lr of the latent signs (latents live in [−1, 1])
    scale_lr: float = 0.01       # Adam lr of α, μ relative to mean |α| of the layer
    offset: bool | None = None   # store μ per group (OFFSET); default: only when N ≥ 4 (int4 is lossless then)
    refit: bool = True           # closed-form least-squares scales for the final signs
    preset: str = ""             # "", fast, paper
    distill_steps: int = 0       # step 3 (bitbasis.distill); 0 = off
    distill_lr: float = 1e-4
    distill_seqs: int = 64
    distill_len: int = 128
    distill_batch: int = 4
    distill_ckpt: str = ""       # checkpoint file (default: under BITBASIS_CACHE)
    seed: int = 0
    device: str = ""             # cpu | cuda (default: cuda when present)

    def check(self) -> None:
        super().check()
        if self.init not in INITS:
            raise QuantizerError(f"init={self.init}: must be one of {', '.join(INITS)}")
        if self.preset not in PRESETS:
            raise QuantizerError(f"preset={self.preset}: must be one of {', '.join(p for p in PRESETS if p)}")
        for k, v in PRESETS[self.preset].items():
            setattr(self, k, v)
        if self.iters < 0 or self.distill_steps < 0:
            raise QuantizerError("iters and distill_steps must be >= 0")
        if not (self.lr > 0 and self.scale_lr >= 0 and self.distill_lr > 0):
            raise QuantizerError("lr and distill_lr must be > 0, scale_lr >= 0")
        if self.distill_steps and (self.distill_seqs < 1 or self.distill_len < 8 or self.distill_batch < 1):
            raise QuantizerError("distill_seqs >= 1, distill_len >= 8, distill_batch >= 1")
        if self.offset is None:
            self.offset = self.bases >= 4
        if self.init == "gptq4":
            from . import METHODS
            if "gptq" not in METHODS:
                raise QuantizerError("init=gptq4 needs the gptq method (quant/gptq.py), which is not installed")

    @property
    def needs_hessian(self) -> bool:   # GPTQ initialisation is calibrated
        return self.init == "gptq4"

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # step 1
    def initialise(self, w: torch.Tensor, hessian: torch.Tensor | None):
        n, g, dev = self.bases, self.group, w.device
        if self.init == "cascade":
            mu = None
            r = w
            if self.offset:                                        # μ = group mean, cascade on W − μ
                wg, valid = groups_view(w, g)
                mu = (wg * valid).sum(-1) / valid.sum(-1).clamp(min=1)
                r = w - mu[:, torch.arange(w.shape[1], device=dev) // g]
            signs, alpha = residual_cascade(r, n, g)
            return signs, alpha, mu, True
        if self.init == "gptq4":
            from . import get_quantizer
            bb4 = get_quantizer("gptq", bases=4, group=g).quantize(w, hessian)
        else:
            bb4 = rtn4(w, g)
        from ..format import round_trip
        signs, alpha, mu = basis_tensors(round_trip(bb4), dev)     # the 4-bit model as its file holds it
        if n < 4:                                                  # keep the most significant planes
            signs, alpha = signs[4 - n:], alpha[..., 4 - n:]
        elif n > 4:                                                # cascade planes on the residual
            res = w - reconstruct(signs, alpha, mu, g)
            s2, a2 = residual_cascade(res, n - 4, g)
            signs, alpha = torch.cat([signs, s2.to(dev)]), torch.cat([alpha, a2.to(dev)], -1)
        if not self.offset:
            mu = None
        return signs, alpha, mu, n != 4 or not self.offset        # scales to refit before step 2?

    def quantize(self, w, hessian=None, progress=None) -> BinaryBasis:
        dev = self.torch_device()
        torch.manual_seed(self.seed)
        w = w.to(dev, torch.float32)
        h = None if hessian is None else hessian.to(dev, torch.float32)
        signs, alpha, mu, stale = self.initialise(w, h)
        signs, alpha = signs.to(dev), alpha.to(dev)
        cw = None if h is None else h.diagonal()                   # refit weights: diag(H)
        if stale and self.refit:                                   # truncated / cascaded: fit the scales first
            alpha, mu = self._refit_if_better(w, h, signs, alpha, mu, cw)
        if self.iters:
            s2, a2, m2, _ = descend(w, signs, alpha, mu, self.group, self.iters, self.lr, self.scale_lr, h, progress)
            if self.refit:
                a2, m2 = self._refit_if_better(w, h, s2, a2, m2, cw)
            before = layer_loss(w, reconstruct(signs, alpha, mu, self.group), h)
            if layer_loss(w, reconstruct(s2, a2, m2, self.group), h) <= before:
                signs, alpha, mu = s2, a2, m2
        elif self.refit:
            alpha, mu = self._refit_if_better(w, h, signs, alpha, mu, cw)
        return self.to_basis(signs, alpha, mu)

    def _refit_if_better(self, w, h, signs, alpha, mu, cw):
        a2, m2 = refit(w, signs, self.group, mu is not None, cw)
        if h is None:                                              # exact least squares: never worse
            return a2, m2
        old = layer_loss(w, reconstruct(signs, alpha, mu, self.group), h)
        new = layer_loss(w, reconstruct(signs, a2, m2, self.group), h)
        return (a2, m2) if new <= old else (alpha, mu)             # diag(H) is only an approximation

    def to_basis(self, signs, alpha, mu) -> BinaryBasis:
        return BinaryBasis(signs=signs.cpu().numpy(), scales=alpha[:, :, None, :].cpu().numpy().astype(np.float32),
                           group=self.group,
                           offsets=None if mu is None else mu[:, :, None].cpu().numpy().astype(np.float32))

"""QBB — Quantization with Binary Bases (NeurIPS 2024, seed 001; no public code).

    W ≈ Σ_{i<N} α_i ⊙ B_i  (+ μ)          B_i ∈ {−1,+1}^{rows×cols}, α_i and μ per row and group   (QBB eq. 1)

Step 1, initialisation (`init`):
  int4     a 4-bit asymmetric min-max code per group, W = d·(q − z), is exactly 4 bit planes:
           q − 7.5 = Σ_{i=0..3} 2^{i−1} s_i  ⇒  α_i = d·2^{i−1}, μ = d·(7.5 − z)  (lossless for N = 4).
           N < 4 keeps the N most significant planes; N > 4 adds cascade planes on the residual.
  gptq4    the same, from the GPTQ 4-bit code (needs calibration: a Hessian per layer).
  gptq     the GPTQ N-bit code itself (mse range search), whose codes are exactly N planes plus an
           offset: q − (2^N−1)/2 = Σ_{i<N} 2^{i−1} s_i; lossless with respect to that GPTQ model, and a
           far better N < 4 start than truncating a 4-bit code (it was compensated at N bits).
  cascade  the analytic residual cascade (quant.simple.residual_cascade).
Step 2, per layer and data-free:
  alternate  exact alternating minimisation of ‖W − Ŵ‖² (LQ-Net's QEM): every weight to its nearest of
             the 2^N levels Σ ±α_i + μ of its group, then least-squares scales; `rounds` times.
  descend    the paper's gradient descent: Adam on ‖W − Σ α_i B_i − μ‖² (tr(ΔW H ΔWᵀ) with a Hessian),
             latent real B with a straight-through sign, ONE basis updated per step (cycling) while
             every scale updates every step (QBB eq. 4); `iters` steps; the best iterate is kept.
  Then a closed-form least-squares refit of the scales for the final signs (never worse; checked).
  With calibration (hessian=true, or init=gptq4 | gptq): `compensate` rounds of GPTQ on the fixed QBB levels
  (each column to its nearest level, error spread over later columns), each followed by a refit; a
  round is kept only when tr(ΔW H ΔWᵀ) drops.
Step 3, data-free distillation of the scales: bitbasis.distill (option distill_steps).

Measured on SmolLM2 layers: alternation gives almost all of the per-layer gain;
the straight-through descent adds < 0.5 % lower error at several times the cost.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from ..basis import (BasisError, flat_signs, grouped_signs, level_codes, nearest_signs,  # noqa: F401 (re-exported)
                     reconstruct, unpack)
from ..format import BinaryBasis, dequantize
from .base import Quantizer, QuantizerError, groups_view, register
from .simple import residual_cascade

INITS = ("int4", "gptq4", "gptq", "cascade")
PRESETS = {"": {}, "fast": {"rounds": 4, "iters": 0}, "paper": {"iters": 15000}}


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
    """basis.unpack with the quantizer's error type."""
    try:
        return unpack(bb, device)
    except BasisError as e:
        raise QuantizerError(f"a QBB initialisation must be a plain planes + scales (+ offset) code: {e}") from None


def layer_loss(wg: torch.Tensor, w_hat: torch.Tensor, valid: torch.Tensor, hessian: torch.Tensor | None = None):
    """‖ΔW‖² (or tr(ΔW H ΔWᵀ)) per weight: the objective of step 2 (a 0-d tensor)."""
    e = (wg - w_hat) * valid
    if hessian is None:
        return (e * e).sum() / valid.sum() / wg.shape[0]
    rows, cols = wg.shape[0], hessian.shape[0]
    e = e.reshape(rows, -1)[:, :cols]
    return ((e @ hessian) * e).sum() / e.numel()


def refit(wg: torch.Tensor, s: torch.Tensor, valid: torch.Tensor, offset: bool,
          col_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Closed-form least squares of the scales for fixed signs, per row and group:
    min_{α, μ} Σ_j c_j (w_j − Σ_i α_i s_ij − μ)²  ⇒  (AᵀCA) [α; μ] = AᵀC w  with A = [s_1 … s_N 1]."""
    n = s.shape[0]
    c = valid if col_weight is None else valid * col_weight            # [ng, G]
    a = list(s) + ([valid.expand_as(wg)] if offset else [])
    k = len(a)
    ca = [x * c for x in a]
    gram = torch.stack([torch.stack([(ca[i] * a[j]).sum(-1) for j in range(k)], -1) for i in range(k)], -2)
    rhs = torch.stack([(x * wg).sum(-1) for x in ca], -1)             # [rows, ng, K]
    # A tiny ridge keeps groups with repeated planes (or a constant plane next to μ) solvable.
    ridge = 1e-6 * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    gram = gram + ridge[..., None, None] * torch.eye(k, device=wg.device)
    sol = torch.linalg.solve(gram, rhs[..., None])[..., 0]
    return sol[..., :n].contiguous(), (sol[..., n].contiguous() if offset else None)


# --- step 2: gradient descent with a straight-through sign, and exact alternation ------------------

class _SignSTE(torch.autograd.Function):
    """sign in the forward pass, identity in the backward pass (BinaryConnect's straight-through
    estimator; the latent is clamped to [−1, 1] after each step, which plays the role of the clip)."""
    @staticmethod
    def forward(ctx, u):
        return torch.where(u >= 0, 1.0, -1.0)

    @staticmethod
    def backward(ctx, g):
        return g


def descend(wg, s, alpha, mu, valid, iters: int, lr: float, scale_lr: float, hessian=None, progress=None):
    """QBB step 2: Adam on ‖W − Σ α_i STE(U_i) − μ‖², the latent U_k of ONE basis per step (k = t mod N),
    every scale every step. U_k starts at s_k · min(1, |T_k| / α_k) with T_k = W − Σ_{i≠k} α_i s_i − μ
    (the target basis k fits): elements whose sign barely matters start near 0 and flip first. With a
    constant start Adam moves every latent at the same speed and flips them all at once.
    Returns the signs / scales of the lowest loss seen (straight-through steps oscillate) and the
    loss history."""
    n = s.shape[0]
    full = reconstruct(s, alpha, mu)
    latent = []
    for k in range(n):
        ak = alpha[..., k, None]
        target = wg - full + ak * s[k]
        latent.append(torch.nn.Parameter(s[k] * (target.abs() / ak.abs().clamp(min=1e-12)).clamp(max=1)))
    del full, target
    a = torch.nn.Parameter(alpha.clone())
    m = torch.nn.Parameter(mu.clone()) if mu is not None else None
    step_scale = scale_lr * float(alpha.abs().mean())               # lr relative to the scales' size
    opt_s = torch.optim.Adam([p for p in (a, m) if p is not None], lr=step_scale)
    opt_b = [torch.optim.Adam([u], lr=lr) for u in latent]          # one state per basis
    cur = s.clone()                                                 # the signs of the latents, ±1 / 0
    best = (math.inf, s, alpha, mu)
    hist = []
    for t in range(iters + 1):
        k = t % n                                                   # the basis updated this step
        sk = _SignSTE.apply(latent[k]) * valid                     # the others are frozen signs
        w_hat = reconstruct([sk if i == k else cur[i] for i in range(n)], a, m)
        loss = layer_loss(wg, w_hat, valid, hessian)
        lv = float(loss.detach())
        hist.append(lv)
        if lv < best[0]:                                            # loss of the current signs/scales
            best = (lv, cur.clone(), a.detach().clone(), None if m is None else m.detach().clone())
        if t == iters:
            break
        opt_s.zero_grad(set_to_none=True)
        opt_b[k].zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        opt_b[k].step()
        with torch.no_grad():
            latent[k].clamp_(-1, 1)
            cur[k] = torch.where(latent[k] >= 0, 1.0, -1.0) * valid
        if progress is not None:
            progress(t, lv)
    return best[1], best[2], best[3], hist


def alternate(wg, s, alpha, mu, valid, rounds: int, hessian=None):
    """Alternating exact minimisation: nearest-level signs for the scales, then least-squares scales
    for the signs. Each half-step can only lower ‖ΔW‖²; with a Hessian a round is kept only when it
    lowers tr(ΔW H ΔWᵀ) too. Stops early when a round gains less than 1e-4 relative."""
    cur = float(layer_loss(wg, reconstruct(s, alpha, mu), valid, hessian))
    for _ in range(rounds):
        s2 = nearest_signs(wg, alpha, mu, valid)
        a2, m2 = refit(wg, s2, valid, mu is not None)
        new = float(layer_loss(wg, reconstruct(s2, a2, m2), valid, hessian))
        if new >= cur:
            break
        s, alpha, mu, cur, old = s2, a2, m2, new, cur
        if old - new < 1e-4 * old:
            break
    return s, alpha, mu


def gptq_signs(w: torch.Tensor, hessian: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor | None,
               group: int, percdamp: float = 0.01, blocksize: int = 128) -> torch.Tensor:
    """GPTQ (Algorithm 1 with lazy batch updates; quant/gptq.py's preamble) with the fixed QBB levels
    Σ_i ±α_i + μ of each group as the grid: every column goes to its nearest level, and its error
    err = (w_q − ŵ_q)/U_qq is spread over the columns not yet quantized. Returns grouped signs."""
    from .gptq import gptq_loop, prepare
    rows, cols = w.shape
    n = alpha.shape[-1]
    W, U = prepare(w, hessian, percdamp)
    levels = alpha @ level_codes(n, w.device).T                                                   # [rows, ng, 2^N]
    if mu is not None:
        levels = levels + mu[..., None]
    levels = levels.cpu().numpy()
    codes = np.zeros((rows, cols), np.int64)
    r = np.arange(rows)

    def column(j, x, cur):
        lv = levels[:, j // group]
        c = np.abs(x[:, None] - lv).argmin(1)                                   # the nearest level
        codes[:, j] = c
        return lv[r, c]

    gptq_loop(W, U, column=column, blocksize=blocksize)
    codes = torch.from_numpy(codes).to(w.device)
    return grouped_signs(torch.stack([(codes >> i) & 1 == 1 for i in range(n)]), group)


# --- the quantizer -------------------------------------------------------------------------------

@register
@dataclasses.dataclass
class QBB(Quantizer):
    """QBB: N binary bases with per-row, per-group scales (module docstring)."""
    name = "qbb"
    init: str = "int4"           # int4 | gptq4 | gptq | cascade
    rounds: int = 8              # exact alternation rounds (nearest-level signs / least-squares scales)
    iters: int = 50              # gradient steps per layer (step 2); preset=paper: 15000
    lr: float = 0.02             # Adam lr of the latent signs (latents live in [−1, 1])
    scale_lr: float = 0.01       # Adam lr of α, μ relative to mean |α| of the layer
    offset: bool | None = None   # store μ per group (OFFSET); default: N ≥ 4 or init=gptq (lossless starts)
    refit: bool = True           # closed-form least-squares scales for the final signs
    hessian: bool = False        # calibrate: activation-weighted objective + GPTQ compensation on QBB levels
    compensate: int = 2          # with a Hessian: rounds of GPTQ on the levels, each followed by a refit
    preset: str = ""             # "", fast, paper
    distill_steps: int = 0       # step 3 (bitbasis.distill); 0 = off
    distill_lr: float = 1e-4
    distill_seqs: int = 64
    distill_len: int = 128
    distill_batch: int = 4
    distill_ckpt: str = ""       # checkpoint file (default: under BITBASIS_CACHE)
    distill_train: str = "scales"  # scales (the paper) | signs (latent weights too, straight-through)
    distill_sign_lr: float = 0.01  # Adam lr of the latent weights, in units of the group's mean |α|
    distill_gen_batch: int = 0   # sequences the teacher writes at once (0: max(distill_batch, 8))
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
        if self.iters < 0 or self.rounds < 0 or self.distill_steps < 0:
            raise QuantizerError("iters, rounds and distill_steps must be >= 0")
        if not (self.lr > 0 and self.scale_lr >= 0 and self.distill_lr > 0 and self.distill_sign_lr > 0):
            raise QuantizerError("lr, distill_lr and distill_sign_lr must be > 0, scale_lr >= 0")
        if self.distill_train not in ("scales", "signs"):
            raise QuantizerError(f"distill_train={self.distill_train}: must be scales or signs")
        if self.distill_gen_batch < 0:
            raise QuantizerError("distill_gen_batch must be >= 0")
        if self.distill_steps and (self.distill_seqs < 1 or self.distill_len < 8 or self.distill_batch < 1):
            raise QuantizerError("distill_seqs >= 1, distill_len >= 8, distill_batch >= 1")
        if self.offset is None:
            self.offset = self.bases >= 4 or self.init == "gptq"
        if self.init in ("gptq4", "gptq"):
            from . import METHODS
            if "gptq" not in METHODS:
                raise QuantizerError(f"init={self.init} needs the gptq method (quant/gptq.py), which is not installed")

    @property
    def needs_hessian(self) -> bool:   # GPTQ initialisation / the weighted objective are calibrated
        return self.init in ("gptq4", "gptq") or bool(self.hessian)

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # step 1
    def initialise(self, w: torch.Tensor, hessian: torch.Tensor | None):
        """Step 1: grouped signs, α, μ, and whether the scales still need a least-squares fit."""
        n, g, dev = self.bases, self.group, w.device
        wg, valid = groups_view(w, g)
        valid = valid.float()
        if self.init == "cascade":
            mu = None
            r = w
            if self.offset:                                        # μ = group mean, cascade on W − μ
                mu = (wg * valid).sum(-1) / valid.sum(-1).clamp(min=1)
                r = w - mu[:, torch.arange(w.shape[1], device=dev) // g]
            signs, alpha = residual_cascade(r, n, g)
            return grouped_signs(signs.to(dev), g), alpha.to(dev), mu, True
        if self.init == "gptq":                                    # the GPTQ N-bit model, as N planes
            from . import get_quantizer
            from ..format import round_trip
            s, alpha, mu = basis_tensors(round_trip(get_quantizer("gptq", bases=n, group=g).quantize(w, hessian)), dev)
            return s, alpha, (mu if self.offset else None), not self.offset
        if self.init == "gptq4":
            from . import get_quantizer
            # min-max grid (mse=False): the QBB results in docs/results.md were measured with it
            bb4 = get_quantizer("gptq", bases=4, group=g, mse=False).quantize(w, hessian)
        else:
            bb4 = rtn4(w, g)
        from ..format import round_trip
        s, alpha, mu = basis_tensors(round_trip(bb4), dev)         # the 4-bit model as its file holds it
        if n < 4:                                                  # keep the most significant planes
            s, alpha = s[4 - n:], alpha[..., 4 - n:]
        elif n > 4:                                                # cascade planes on the residual
            res = (wg - reconstruct(s, alpha, mu)).reshape(w.shape[0], -1)[:, :w.shape[1]]
            s2, a2 = residual_cascade(res, n - 4, g)
            s, alpha = torch.cat([s, grouped_signs(s2.to(dev), g)]), torch.cat([alpha, a2.to(dev)], -1)
        if not self.offset:
            mu = None
        return s, alpha, mu, n != 4 or not self.offset

    def quantize(self, w, hessian=None, progress=None) -> BinaryBasis:
        return self.to_basis(*self.stages(w, hessian, progress)[-1][1:], cols=w.shape[1])

    def stages(self, w, hessian=None, progress=None) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """[(stage, grouped signs, α, μ)] after init, alternation, gradient descent (the last is the result)."""
        dev = self.torch_device()
        torch.manual_seed(self.seed)
        w = w.to(dev, torch.float32)
        h = None if hessian is None else hessian.to(dev, torch.float32)
        wg, valid = groups_view(w, self.group)
        valid = valid.float()
        cw = None if h is None else groups_view(h.diagonal()[None], self.group)[0][0]   # refit weights diag(H)
        s, alpha, mu, stale = self.initialise(w, h)
        if stale and self.refit:                                   # truncated / cascaded: fit the scales first
            alpha, mu = self._refit_if_better(wg, valid, h, s, alpha, mu, cw)
        out = [("init", s, alpha, mu)]
        if self.rounds:
            s, alpha, mu = alternate(wg, s, alpha, mu, valid, self.rounds, h)
            out.append(("alternate", s, alpha, mu))
        if self.iters:
            s2, a2, m2, _ = descend(wg, s, alpha, mu, valid, self.iters, self.lr, self.scale_lr, h, progress)
            if self.refit:
                a2, m2 = self._refit_if_better(wg, valid, h, s2, a2, m2, cw)
            before = layer_loss(wg, reconstruct(s, alpha, mu), valid, h)
            if layer_loss(wg, reconstruct(s2, a2, m2), valid, h) <= before:
                s, alpha, mu = s2, a2, m2
            out.append(("descend", s, alpha, mu))
        elif self.refit and not stale and not self.rounds:         # the bare initialisation, refitted
            alpha, mu = self._refit_if_better(wg, valid, h, s, alpha, mu, cw)
            out.append(("refit", s, alpha, mu))
        if h is not None and self.compensate:
            from .gptq import f16
            cur = float(layer_loss(wg, reconstruct(s, alpha, mu), valid, h))
            for _ in range(self.compensate):                       # keep a round only if tr(ΔW H ΔWᵀ) drops
                a2, m2 = f16(alpha), None if mu is None else f16(mu)
                s2 = gptq_signs(w, h, a2, m2, self.group)
                a2, m2 = self._refit_if_better(wg, valid, h, s2, a2, m2, cw)
                new = float(layer_loss(wg, reconstruct(s2, a2, m2), valid, h))
                if new >= cur:
                    break
                s, alpha, mu, cur = s2, a2, m2, new
            out.append(("compensate", s, alpha, mu))
        return out

    def _refit_if_better(self, wg, valid, h, s, alpha, mu, cw):
        a2, m2 = refit(wg, s, valid, mu is not None, cw)
        if h is None:                                              # exact least squares: never worse
            return a2, m2
        old = layer_loss(wg, reconstruct(s, alpha, mu), valid, h)
        new = layer_loss(wg, reconstruct(s, a2, m2), valid, h)
        return (a2, m2) if new <= old else (alpha, mu)             # diag(H) is only an approximation

    def to_basis(self, s, alpha, mu, cols: int) -> BinaryBasis:
        return BinaryBasis(signs=flat_signs(s, cols).cpu().numpy(),
                           scales=alpha[:, :, None, :].cpu().numpy().astype(np.float32), group=self.group,
                           offsets=None if mu is None else mu[:, :, None].cpu().numpy().astype(np.float32))

    def distill_config(self):
        """Step 3's settings (the distill_* options) as a distill.DistillConfig."""
        from ..distill import DistillConfig
        return DistillConfig(steps=self.distill_steps, seqs=self.distill_seqs, length=self.distill_len,
                             batch=self.distill_batch, lr=self.distill_lr, train=self.distill_train,
                             sign_lr=self.distill_sign_lr, gen_batch=self.distill_gen_batch, seed=self.seed,
                             device=self.device, ckpt=self.distill_ckpt)

    # whole model: convert() calls this when a quantizer has it
    def quantize_model(self, model_dir, calib: dict | None = None, progress: bool = True) -> dict[str, BinaryBasis]:
        """{hf_name: BinaryBasis} for every block linear: per layer (data-free, or through calibration
        for init=gptq4), then step 3, the data-free distillation of the scales, when distill_steps > 0."""
        from tqdm import tqdm
        from .. import arch as A, hf
        from ..arch import is_block_linear
        model_dir = Path(model_dir)
        if self.needs_hessian:
            from ..calibrate import quantize_model as calibrated
            quantized = calibrated(model_dir, self, calib or {}, progress=progress)
        else:
            cfg = hf.load_config(model_dir)
            n_layers = int(cfg["num_hidden_layers"])
            sd = hf.load_state_dict(model_dir)
            arch = A.for_config(cfg)
            names = [k for k in sd if is_block_linear(hf.gguf_name(k, n_layers, arch))]
            quantized = {}
            bar = tqdm(names, desc=f"qbb N={self.bases} per layer", disable=not progress, unit="linear")
            for k in bar:
                w = torch.from_numpy(sd[k])
                quantized[k] = self.quantize(w)
                if progress:
                    rel = float(((torch.from_numpy(dequantize(quantized[k])) - w) ** 2).mean() / (w ** 2).mean())
                    bar.set_postfix(rel_err=f"{rel:.4f}")
        if self.distill_steps:
            from ..distill import distill
            quantized = distill(model_dir, quantized, self.distill_config(), progress=progress)
        return quantized

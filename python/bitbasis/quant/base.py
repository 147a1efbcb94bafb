"""The quantizer interface that every method plugs into."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..basis import groups_view  # noqa: F401 (its home is basis.py; quantizers import it from here)
from ..format import BinaryBasis


class QuantizerError(ValueError):
    """Impossible options or input for a quantizer."""


@dataclasses.dataclass
class Quantizer:
    """Base class. Subclasses set `name`, `needs_hessian`, and implement `quantize`.

    quantize(w, hessian) -> BinaryBasis
        w:       float32 [rows, cols] (PyTorch order: out x in), on any device
        hessian: float32 [cols, cols] (H = 2/n Σ x xᵀ of the layer's inputs) or None
    """
    bases: int = 1
    group: int = 128
    name = "base"
    needs_hessian = False
    uses_bases = True    # False: a fixed structure that --bases cannot change (the CLI refuses --bases)
    uses_group = True

    def check(self) -> None:
        if not 1 <= self.bases <= 8:
            raise QuantizerError(f"--bases {self.bases}: must be 1..8")
        if self.group < 64 or self.group % 64:
            raise QuantizerError(f"--group {self.group}: must be a multiple of 64 (64, 128, 256, ...)")

    def quantize(self, w: torch.Tensor, hessian: torch.Tensor | None = None) -> BinaryBasis:
        raise NotImplementedError

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()}

    def for_tensor(self, name: str) -> "Quantizer":
        """The quantizer of one tensor (HF name); a bit plan (bitbasis.plan) gives each its own."""
        return self

    def covers(self, name: str) -> bool:
        """Whether this quantizer is asked to quantize `name` beyond the block linears (the head)."""
        return False


METHODS: dict[str, Callable[..., Quantizer]] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


def get_quantizer(method: str, **opts) -> Quantizer:
    if method not in METHODS:
        raise QuantizerError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    cls = METHODS[method]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(opts) - fields)
    if unknown:                      # a typo (--opt salinet=0.2) must not silently run the default
        known = sorted(fields - {"bases", "group"})
        raise QuantizerError(f"--opt {unknown[0]}: not an option of --method {method} "
                             f"(its options: {', '.join(known) or 'none'})")
    q = cls(**{k: v for k, v in opts.items() if v is not None})
    q.check()
    return q


# --- per-row affine binarization (BiLLM binary.py, PB-LLM's binary part, ARB's starting point) -----

def pm1(b: torch.Tensor) -> torch.Tensor:
    """bool -> ±1.0 (as b·2 − 1: several times faster than torch.where with scalars on the CPU)."""
    return b.to(torch.float32) * 2 - 1


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in x. min/max propagate NaN and keep ±Inf, and torch.aminmax is ~20x faster
    than torch.isfinite(x).all() on the CPU (the checks cost seconds per conversion otherwise)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def masked_mean(x: torch.Tensor, m: torch.Tensor, cnt: torch.Tensor) -> torch.Tensor:
    """Per-row mean of x over the entries where m (0/1) is 1; cnt = the row's count (≥ 1)."""
    return (x * m).sum(1) / cnt


def affine_binarize(x: torch.Tensor, m: torch.Tensor, cnt: torch.Tensor):
    """ŵ = α·sign(x − μ) + μ per row over the masked entries: μ = mean(x), α = mean|x − μ|
    (BiLLM eq. 1 with a mean, PB-LLM sec. 3.2). Returns μ, α [rows] and the signs B = x − μ ≥ 0."""
    mu = masked_mean(x, m, cnt)
    d = x - mu[:, None]
    return mu, masked_mean(d.abs(), m, cnt), d >= 0

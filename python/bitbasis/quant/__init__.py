"""Quantizers. Each turns one weight matrix (and, for calibrated methods, its Hessian) into a
`format.BinaryBasis`; the converter packs and writes every result the same way."""
from __future__ import annotations

from .base import Quantizer, QuantizerError, get_quantizer, register, METHODS  # noqa: F401
from . import simple  # noqa: F401  (registers rtn, residual)

for _mod in ("gptq", "pbllm", "billm", "arb", "qbb"):
    try:
        __import__(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:  # a method not written yet
        if _e.name != f"{__name__}.{_mod}":
            raise

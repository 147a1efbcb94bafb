"""`bitbasis ppl`: perplexity of a GGUF or HF directory."""
from __future__ import annotations

import os


def run(a) -> int:
    from ..perplexity import perplexity_cli
    return perplexity_cli(a)


def add_parser(sub) -> None:
    q = sub.add_parser("ppl", help="perplexity of a GGUF or HF directory on a text", description=(
        "Perplexity with the llama.cpp protocol (context 512, score the second half of each window) "
        "or the papers' protocol (context 2048, non-overlapping windows, every token)."))
    q.add_argument("model", help="bitbasis GGUF, HF directory, or 'smollm2'")
    q.add_argument("--text", default="eval", help="text file, or 'eval'/'calib' for the built-in split (default eval)")
    q.add_argument("--protocol", choices=["llamacpp", "papers"], default="llamacpp")
    q.add_argument("--ctx", type=int, default=None, help="context length (default 512 / 2048 by protocol)")
    q.add_argument("--windows", type=int, default=None, help="score at most this many windows")
    q.add_argument("--backend", choices=["auto", "engine", "torch"], default="auto",
                   help="C++ engine (default for GGUF when available) or the PyTorch reference")
    q.add_argument("-t", "--threads", type=int, default=None,
                   help="engine threads (default: this machine's physical cores)")
    q.add_argument("--precise-acts", action="store_true",
                   help="engine: a second int8 pass over each activation's rounding residual "
                        "(BITBASIS_PRECISE_ACTS=1): float-reference accuracy at about twice the matmul time")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=run)

"""`bitbasis export`: a bitbasis GGUF rewritten for another engine (today: stock llama.cpp)."""
from __future__ import annotations

import sys


def run(a) -> int:
    from ..export_llamacpp import export_llamacpp
    report = export_llamacpp(a.model, a.output, force=a.force)
    exact = sum(t != "F32" for _, t, _ in report)
    for name, t, why in report:
        print(f"  {name:32s} {t:6s} {why}", file=sys.stderr if a.quiet else sys.stdout)
    print(f"wrote {a.output}: {exact} of {len(report)} binary-basis weights in llama.cpp low-bit types, "
          f"{len(report) - exact} dequantized to F32 (reasons above)")
    return 0


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="rewrite a bitbasis GGUF for stock llama.cpp (Q1_0 / Q2_0 / TQ1_0)",
                       description="Write a bitbasis GGUF as a file stock llama.cpp runs: every binary-basis "
                                   "weight that a llama.cpp type holds exactly in that type (N = 1, G = 128 -> "
                                   "Q1_0; 2-bit codes with zero point 1 -> Q2_0; ternary, G = 256 -> TQ1_0), "
                                   "the others dequantized to F32, each with the reason it did not fit.")
    e.add_argument("model", help="bitbasis GGUF")
    e.add_argument("--to", required=True, choices=["llamacpp"], help="target engine")
    e.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    e.add_argument("--force", action="store_true", help="overwrite an existing output file")
    e.add_argument("-q", "--quiet", action="store_true", help="the per-tensor lines to stderr")
    e.set_defaults(func=run)

#!/usr/bin/env python3
"""Perplexity (log scale) against true bits per weight: bitbasis rows (docs/quant_table.json) and
llama.cpp rows (docs/llamacpp_rows.json, when present) on one chart -> docs/ppl_vs_bpw.png.

x = true bpw of the block linears (bytes of everything that encodes them × 8 / weights, as
`bitbasis info`'s block bpw; llama.cpp rows: the same over their block tensors). y = perplexity with
the llama.cpp protocol (ctx 512), the protocol both tables measure with the same windows; f32 is the
dashed line.

    python tools/plot_ppl_bpw.py [--table docs/quant_table.json] [--llamacpp docs/llamacpp_rows.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FAMILY = {"rtn": ("o", "tab:gray"), "gptq": ("s", "tab:blue"), "pbllm": ("^", "tab:green"),
          "billm": ("D", "tab:red"), "arb": ("v", "tab:purple"), "qbb": ("P", "tab:brown")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", default=str(ROOT / "docs" / "quant_table.json"))
    ap.add_argument("--llamacpp", default=str(ROOT / "docs" / "llamacpp_rows.json"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "ppl_vs_bpw.png"))
    a = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(Path(a.table).read_text())["rows"]
    fig, ax = plt.subplots(figsize=(9, 6))
    seen = set()
    for name, r in rows.items():
        p = r.get("ppl_llamacpp")
        if not p:
            continue
        if r["method"] in ("f32", "f16"):
            ax.axhline(p["ppl"], ls="--", color="k", lw=1)
            ax.text(1.0, p["ppl"] * 1.08, f"{name} {p['ppl']:.1f}", fontsize=8)
            continue
        marker, color = FAMILY.get(r["method"], ("x", "k"))
        label = r["method"] if r["method"] not in seen else None
        seen.add(r["method"])
        ax.errorbar(r["block_bpw"], p["ppl"], yerr=p.get("stderr"), fmt=marker, color=color, label=label, ms=7)
        tag = "" if p.get("windows") == 40 and p.get("backend") == "engine" else \
            f" ({p.get('windows')} win, {p.get('backend', '?').replace('-reference', '')})"
        ax.annotate(name + tag, (r["block_bpw"], p["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    lc = Path(a.llamacpp)
    if lc.is_file():
        first = True
        for r in json.loads(lc.read_text()):
            if r.get("ppl_llamacpp") is None or r.get("type") == "F32":
                continue
            x = r.get("block_bpw") or r["bpw"]
            ax.errorbar(x, r["ppl_llamacpp"], yerr=r.get("se_llamacpp"), fmt="*", color="tab:orange", ms=10,
                        label="llama.cpp" if first else None)
            first = False
            ax.annotate(r["method"].replace("llama.cpp ", ""), (x, r["ppl_llamacpp"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=8, color="tab:orange")
    else:
        print(f"{lc} not found: plotting without llama.cpp rows", file=sys.stderr)
    ax.set_yscale("log")
    ax.margins(x=0.08)
    ax.set_xlabel("true bits per weight of the block linears (bitbasis info: block bpw)")
    ax.set_ylabel("perplexity, llama.cpp protocol (ctx 512), log scale")
    ax.set_title("SmolLM2-135M on the held-out plays: perplexity vs true bpw")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Held-out perplexity vs teacher tokens seen during distillation (docs/qat_curve.png).
Reads the JSON lines that `bitbasis distill --eval-log` writes ({step, tokens, ppl}; torch, llama.cpp
protocol on the first --eval-windows windows), one file per curve, labelled by its name.
  python tools/plot_qat_curve.py -o docs/qat_curve.png docs/qat_curve/*.evals.jsonl [--ref NAME=PPL ...]"""
import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("-o", "--output", default="docs/qat_curve.png")
    p.add_argument("--ref", action="append", default=[], help="horizontal line NAME=PPL (e.g. f32=37.43)")
    a = p.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for f in a.logs:
        recs = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r["step"])   # a resumed run repeats a step
        recs = [r for r in recs if r["tokens"] > 0]
        if recs:
            ax.plot([r["tokens"] / 1e6 for r in recs], [r["ppl"] for r in recs], marker="o", ms=3,
                    label=Path(f).name.replace(".evals.jsonl", ""))
    for ref in a.ref:
        name, val = ref.rsplit("=", 1)
        ax.axhline(float(val), ls="--", lw=0.8, color="grey", label=f"{name} ({val})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("teacher tokens seen (millions)")
    ax.set_ylabel("held-out perplexity (torch, 8 windows)")
    ax.set_title("SmolLM2-135M, quantization-aware distillation on one H200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.output, dpi=120)
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()

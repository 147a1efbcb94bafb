#!/usr/bin/env python3
"""Issue 19's table and plot: perplexity against whole-file MiB for bitbasis files and llama.cpp's types,
measured in one run on the same text and windows (SmolLM2, held-out plays, llama.cpp protocol: ctx 512,
second half of each window scored, 40 windows).

bitbasis rows: the C++ engine's perplexity (`bitbasis ppl FILE --protocol llamacpp --windows 40`), the
file's size and block bpw as `bitbasis info` counts them, and what the embedding / head are stored as.
llama.cpp rows: `tools/llamacpp_ppl.py --table` (llama-cpp-python: llama.cpp's own tokenizer and forward,
the same windows), quantized here from the f32 export with the importance matrix given.

Rows are kept in the JSON as they finish: a stopped run started again skips them.

    python tools/quality_table.py -o docs/quality_table.json --png docs/quality_vs_mib.png \\
        --bitbasis "recipe=smol.gguf" "recipe + 4-bit embed/head=smol-e4.gguf" \\
        --llamacpp-src smol-f32.gguf --imatrix smol-imatrix.gguf --keep DIR \\
        --types F32 Q8_0 Q4_K_M+imatrix Q4_0+imatrix Q2_K+imatrix IQ2_XXS IQ1_S
    python tools/quality_table.py -o docs/quality_table.json --png docs/quality_vs_mib.png --md   # redraw, print
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tools"))
MIB = 1024 * 1024


def bitbasis_row(name: str, path: str, windows: int, threads: int) -> dict:
    from bitbasis import data
    from bitbasis.gguf_io import read_model, summarize
    from bitbasis.perplexity import run_perplexity
    s = summarize(read_model(path))
    res = run_perplexity(path, data.text_file("eval"), protocol="llamacpp", max_windows=windows,
                         backend="engine", threads=threads)
    return {"method": f"bitbasis {name}", "file": path, "bytes": s["file_bytes"], "block_bpw": s["block_bpw"],
            "edge": {k: v[0] for k, v in s["edge"].items()}, "ppl_llamacpp": res["ppl"],
            "se_llamacpp": res["stderr"], "windows_llamacpp": res["windows"], "seconds_llamacpp": res["seconds"],
            "engine": res["backend"],
            "command_llamacpp": f"bitbasis ppl {path} --protocol llamacpp --windows {windows} -t {threads}"}


def save(rows: list[dict], out: str) -> None:
    with open(out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(out + ".tmp", out)


def markdown(rows: list[dict]) -> str:
    lines = ["| file | whole file MiB | block bpw | embedding / head | ppl | windows |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        edge = r.get("edge") or {}
        if edge:
            e = ", ".join(f"{k.split('.')[0]} {v}" for k, v in edge.items())
        else:
            e = f"token_embd {r.get('token_embd_type')}"
        lines.append(f"| {r['method']} | {r['bytes'] / MIB:.1f} | {r['block_bpw']:.3f} | {e} | "
                     f"{r['ppl_llamacpp']:.2f} ± {r['se_llamacpp']:.2f} | {r['windows_llamacpp']} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    f32 = [r for r in rows if r.get("type") == "F32"]
    for r in rows:
        if r in f32:
            continue
        ours = r["method"].startswith("bitbasis")
        ax.errorbar(r["bytes"] / MIB, r["ppl_llamacpp"], yerr=r["se_llamacpp"], fmt="o" if ours else "s",
                    color="tab:blue" if ours else "tab:gray", ms=7, capsize=2)
        ax.annotate(r["method"].replace("bitbasis ", "").replace("llama.cpp ", ""), (r["bytes"] / MIB, r["ppl_llamacpp"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=7)
    if f32:
        ax.axhline(f32[0]["ppl_llamacpp"], ls="--", color="k", lw=1, label=f"f32 {f32[0]['ppl_llamacpp']:.2f}")
    ax.plot([], [], "o", color="tab:blue", label="bitbasis (engine)")
    ax.plot([], [], "s", color="tab:gray", label="llama.cpp (llama-cpp-python)")
    ax.set_xlabel("whole file (MiB)")
    wins = sorted({r["windows_llamacpp"] for r in rows})
    ax.set_ylabel(f"perplexity, held-out plays (llama.cpp protocol, {'/'.join(map(str, wins))} windows)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs file size")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True, help="rows JSON (kept and extended)")
    ap.add_argument("--png", help="the plot")
    ap.add_argument("--md", action="store_true", help="print the markdown table")
    ap.add_argument("--bitbasis", nargs="*", default=[], metavar="NAME=FILE")
    ap.add_argument("--llamacpp-src", help="f32 GGUF to quantize with llama.cpp (tools/llamacpp_ppl.py --table)")
    ap.add_argument("--imatrix")
    ap.add_argument("--types", nargs="*", default=["F32", "Q8_0", "Q4_K_M+imatrix", "Q4_0+imatrix", "Q2_K+imatrix",
                                                   "IQ2_XXS", "IQ1_S"])
    ap.add_argument("--keep", default=".", help="where the llama.cpp files go")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    rows = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else []
    if a.llamacpp_src:
        from llamacpp_ppl import make_table
        tmp = a.out + ".llamacpp.json"
        save([r for r in rows if not r["method"].startswith("bitbasis")], tmp)
        lc = make_table(tmp, a.llamacpp_src, a.imatrix, a.types, a.windows, None, a.threads, a.keep, ("llamacpp",))
        rows = [r for r in rows if r["method"].startswith("bitbasis")] + lc
        os.remove(tmp)
        save(rows, a.out)
    for spec in a.bitbasis:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"--bitbasis {spec!r}: expected NAME=FILE")
        if any(r["method"] == f"bitbasis {name}" and r["file"] == path for r in rows):
            continue
        t0 = time.time()
        rows.append(bitbasis_row(name, path, a.windows, a.threads))
        print(json.dumps(rows[-1]), f"({time.time() - t0:.0f} s)", flush=True)
        save(rows, a.out)
    if a.png:
        plot(rows, a.png)
    if a.md:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

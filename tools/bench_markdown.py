#!/usr/bin/env python3
"""Markdown tables of a `bitbasis bench kernels --json` result, for docs/results.md:
one row per (shape, N, G, threads), one column per kernel; GEMV cells are "time / % of the read
bandwidth", GEMM cells "GOP/s".

    python tools/bench_markdown.py docs/bench/kernels-HOST-DATE.json [--sets llama2-7b,smollm2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from bitbasis.bench import load_result  # noqa: E402


def _time(t: float) -> str:
    return f"{t * 1e6:.0f} µs" if t < 1e-2 else f"{t * 1e3:.1f} ms"


def tables(res: dict, sets: list[str] | None = None) -> str:
    m = res["meta"]
    bw = ", ".join(f"{k} thread(s) {v:.2f} GB/s" for k, v in res["bandwidth_gbs"].items())
    out = [f"CPU {m['cpu_model']} ({m['cpu_features']}); {m['compiler']}; commit {m['git_commit']}; {m['date']}",
           f"read bandwidth measured in the same run: {bw}; load average {m.get('loadavg_start')} -> "
           f"{m.get('loadavg_end')}; time = best of repetitions over ≥ {m['min_time_s']} s"]
    out += [f"note: {n}" for n in m.get("notes", [])]
    cases = res["cases"]
    for s in sets or list(dict.fromkeys(c["model"] for c in cases)):
        for op in ("gemv", "gemm"):
            cs = [c for c in cases if c["model"] == s and c["op"] == op]
            if not cs:
                continue
            kernels = list(dict.fromkeys(c["kernel"] for c in cs))
            what = "time / % of read bandwidth" if op == "gemv" else f"GOP/s, {cs[0]['tokens']} tokens"
            out += ["", f"**{s} {op.upper()}** ({what})", "",
                    "| shape | N | G | thr | " + " | ".join(kernels) + " |",
                    "|---|---|---|---|" + "---|" * len(kernels)]
            keys = list(dict.fromkeys((tuple(c["shape"]), c["planes"], c["group"], c["threads"]) for c in cs))
            for shape, n, g, th in keys:
                by = {c["kernel"]: c for c in cs if (tuple(c["shape"]), c["planes"], c["group"], c["threads"]) ==
                      (shape, n, g, th)}
                cells = []
                for k in kernels:
                    c = by.get(k)
                    if c is None:
                        cells.append("–")
                    elif op == "gemv":
                        cells.append(f"{_time(c['time_s'])} / {c['pct_bandwidth']:.0f}%")
                    else:
                        cells.append(f"{c['gops']:.1f}")
                best = min(by.values(), key=lambda c: c["time_s"])   # bold: the fastest kernel
                cells = [f"**{v}**" if by.get(k) is best else v for k, v in zip(kernels, cells)]
                out.append(f"| {shape[0]}x{shape[1]} | {n} | {g} | {th} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json")
    p.add_argument("--sets", default=None, help="shape sets to include, comma-separated (default: all)")
    a = p.parse_args()
    try:
        kind, res = load_result(a.json)
    except ValueError as e:
        print(f"bench_markdown: {e}", file=sys.stderr)
        return 1
    if kind != "bitbasis-bench-kernels":
        print(f"bench_markdown: {a.json} is not a kernel benchmark result", file=sys.stderr)
        return 1
    print(tables(res, a.sets.split(",") if a.sets else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())

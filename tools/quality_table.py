#!/usr/bin/env python3
"""Issue 19's table and plot: perplexity against whole-file MiB for bitbasis files and llama.cpp's types,
measured in one run on the same text and windows (SmolLM2, held-out plays, llama.cpp protocol: ctx 512,
second half of each window scored, 40 windows).

bitbasis rows: the C++ engine's perplexity (as `bitbasis ppl FILE --protocol llamacpp --windows 40`), the
file's size and block bpw as `bitbasis info` counts them, and what the embedding / head are stored as.
llama.cpp rows: llama-cpp-python (llama.cpp's own tokenizer and forward, the same windows) on files
quantized from the f32 export with the importance matrix given (a file already in --keep is reused).

The run resumes: each finished row is appended to the output as one JSON line (flushed and synced), and
a row whose (method, file, windows) is already there is skipped, so a stopped run started again only
measures what is missing. A half-written last line (the run killed mid-write) is ignored.

A bitbasis file can be made by the run itself: `--convert FILE=ARGS` runs `bitbasis convert ARGS -o FILE`
(as a user runs it, its output in FILE.log) just before FILE's row when FILE is missing, and the row records
that convert's wall time, user and system CPU and the load average before and after (kept beside the file
in FILE.convert.json, so a resumed run still reports a convert an earlier run made). So one invocation
makes and measures every row of the table.

    python tools/quality_table.py -o docs/quality_table.jsonl \\
        --llamacpp-src smol-f32.gguf --imatrix smol-imatrix.gguf --keep DIR \\
        --types F32 Q8_0 Q4_K_M+imatrix Q4_0+imatrix Q2_K+imatrix IQ2_XXS IQ1_S \\
        --bitbasis "recipe=smol.gguf" "recipe, 4-bit embed/head=smol-e4.gguf" "plan 2.5=p25.gguf" \\
        --convert "p25.gguf=smollm2 --target-bpw 2.5"
    python tools/quality_table.py -o docs/quality_table.jsonl --png docs/quality_vs_mib.png --md   # redraw, print
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "tools"))
MIB = 1024 * 1024
OFF_SCALE = 8.0        # the plot's y axis ends at 8x the f32 perplexity (above it: a collapsed model)


def load_rows(path: str) -> list[dict]:
    rows = []
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:          # the line a killed run was writing
                continue
    return rows


def append_row(path: str, row: dict) -> None:
    """One JSON line per finished row; synced, so a crash right after loses nothing measured."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run_convert(path: str, args: str) -> dict:
    """`bitbasis convert ARGS -o PATH` in a child process (this checkout's package), its output in PATH.log;
    returns (and keeps in PATH.convert.json) its command, wall time, CPU time and the load around it."""
    cmd = ["bitbasis", "convert", *shlex.split(args), "-o", path]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                     os.environ.get("PYTHONPATH")])))
    before, ru0, t0 = load_avg(), resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(path + ".log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "bitbasis", *cmd[1:]], stdout=log, stderr=subprocess.STDOUT,
                             env=env)
    wall, ru1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        tail = Path(path + ".log").read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"error: {shlex.join(cmd)} exited {rc}: {tail[0]} (log: {path}.log)")
    info = {"command": shlex.join(cmd), "wall_seconds": round(wall, 1),
            "user_seconds": round(ru1.ru_utime - ru0.ru_utime, 1),
            "sys_seconds": round(ru1.ru_stime - ru0.ru_stime, 1), "load_before": before, "load_after": load_avg()}
    Path(path + ".convert.json").write_text(json.dumps(info) + "\n")
    return info


def bitbasis_row(name: str, path: str, windows: int, threads: int) -> dict:
    from bitbasis import data
    from bitbasis.gguf_io import read_model, summarize
    from bitbasis.perplexity import run_perplexity
    s = summarize(read_model(path))
    load = load_avg()
    res = run_perplexity(path, data.text_file("eval"), protocol="llamacpp", max_windows=windows,
                         backend="engine", threads=threads)
    return {"method": f"bitbasis {name}", "file": path, "bytes": s["file_bytes"], "block_bpw": s["block_bpw"],
            "edge": {k: v[0] for k, v in s["edge"].items()}, "ppl_llamacpp": res["ppl"],
            "se_llamacpp": res["stderr"], "windows_llamacpp": res["windows"], "seconds_llamacpp": res["seconds"],
            "engine": res["backend"], "load": load,
            "command_llamacpp": f"bitbasis ppl {path} --protocol llamacpp --windows {windows} -t {threads}"}


def llamacpp_row(spec: str, src: str, imatrix: str | None, keep: str, windows: int, threads: int) -> dict:
    """One llama.cpp type ("Q4_0+imatrix": with the importance matrix; the types that need one always get
    it): quantized from `src` unless the file is already in `keep`, then its perplexity."""
    from bitbasis import data
    from llamacpp_ppl import NEEDS_IMATRIX, gguf_sizes, llamacpp_perplexity, llamacpp_quantize
    qtype = spec.removesuffix("+imatrix")
    use_im = qtype in NEEDS_IMATRIX or spec.endswith("+imatrix")
    qsec = None
    if qtype == "F32":
        path = src
    else:
        path = str(Path(keep) / f"smol-{qtype}{'-imat' if use_im else ''}.gguf")
        if not Path(path).exists():
            t0 = time.time()
            llamacpp_quantize(src, path, qtype, threads, imatrix if use_im else None)
            qsec = time.time() - t0
    load = load_avg()
    res = llamacpp_perplexity(path, data.read_text("eval"), None, windows, threads, "llamacpp")
    return {"method": f"llama.cpp {qtype}" + (" imatrix" if use_im else ""), "type": qtype,
            "imatrix": imatrix if use_im else None, "file": path, "quant_seconds": qsec,
            **gguf_sizes(path, gguf_sizes(src)["params"]), "ppl_llamacpp": res["ppl"], "se_llamacpp": res["stderr"],
            "windows_llamacpp": res["windows"], "seconds_llamacpp": res["seconds"], "engine": res["engine"],
            "load": load,
            "command_llamacpp": f"python tools/llamacpp_ppl.py {path} --windows {windows} -t {threads}"}


def markdown(rows: list[dict]) -> str:
    lines = ["| file | whole file MiB | block bpw | embedding / head | ppl | windows | convert wall / user CPU |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        edge = r.get("edge") or {}
        if edge:
            e = ", ".join(f"{k.split('.')[0]} {v}" for k, v in edge.items())
        else:
            e = f"token_embd {r.get('token_embd_type')} (tied)"
        bpw = f"{r['block_bpw']:.3f}" if r.get("block_bpw") else "-"
        c = r.get("convert")
        made = f"{c['wall_seconds']:.0f} s / {c['user_seconds']:.0f} s" if c else "-"
        lines.append(f"| {r['method']} | {r['bytes'] / MIB:.1f} | {bpw} | {e} | "
                     f"{r['ppl_llamacpp']:.2f} ± {r['se_llamacpp']:.2f} | {r['windows_llamacpp']} | {made} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    f32 = [r for r in rows if r.get("type") == "F32"]
    # a collapsed model (the papers' 1-2 bit baselines score 10^2-10^6) would squash every useful row into
    # the bottom tenth of a log axis: rows above `top` are drawn at the top edge, their value in the label
    top = OFF_SCALE * (f32[0]["ppl_llamacpp"] if f32 else min(r["ppl_llamacpp"] for r in rows))
    for r in rows:
        if r in f32:
            continue
        ours, off = r["method"].startswith("bitbasis"), r["ppl_llamacpp"] > top
        label = r["method"].replace("bitbasis ", "").replace("llama.cpp ", "")
        y = top if off else r["ppl_llamacpp"]
        ax.errorbar(r["bytes"] / MIB, y, yerr=None if off else r["se_llamacpp"],
                    fmt=("^" if off else "o") if ours else "s", color="tab:blue" if ours else "tab:gray", ms=6, capsize=2)
        if off:                                 # several sit side by side on the top edge: labels run down
            ax.annotate(f"{label}: {r['ppl_llamacpp']:.3g} (off scale)", (r["bytes"] / MIB, y), textcoords="offset points",
                        xytext=(4, -6), fontsize=6, rotation=90, va="top")
        else:
            ax.annotate(label, (r["bytes"] / MIB, y), textcoords="offset points", xytext=(5, 4), fontsize=6)
    if f32:
        ax.axhline(f32[0]["ppl_llamacpp"], ls="--", color="k", lw=1,
                   label=f"f32 {f32[0]['ppl_llamacpp']:.2f} ({f32[0]['bytes'] / MIB:.0f} MiB)")
    ax.plot([], [], "o", color="tab:blue", label="bitbasis (engine)")
    ax.plot([], [], "s", color="tab:gray", label="llama.cpp (llama-cpp-python)")
    ax.set_xlabel("whole file (MiB)")
    wins = sorted({r["windows_llamacpp"] for r in rows})
    ax.set_ylabel(f"perplexity, held-out plays (llama.cpp protocol, {'/'.join(map(str, wins))} windows)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: perplexity vs file size (one run, same windows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out + ".tmp.png", dpi=120)
    os.replace(out + ".tmp.png", out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", required=True, help="rows, one JSON line each (kept and extended)")
    ap.add_argument("--png", help="the plot")
    ap.add_argument("--md", action="store_true", help="print the markdown table")
    ap.add_argument("--bitbasis", nargs="*", default=[], metavar="NAME=FILE")
    ap.add_argument("--convert", nargs="*", default=[], metavar="FILE=ARGS",
                    help="make a missing --bitbasis FILE first with `bitbasis convert ARGS -o FILE`")
    ap.add_argument("--llamacpp-src", help="f32 GGUF to quantize with llama.cpp")
    ap.add_argument("--imatrix", help="llama.cpp importance matrix (tools/llamacpp_ppl.py --make-imatrix)")
    ap.add_argument("--types", nargs="*", default=["F32", "Q8_0", "Q4_K_M+imatrix", "Q4_0+imatrix", "Q2_K+imatrix",
                                                   "IQ2_XXS", "IQ1_S"])
    ap.add_argument("--keep", default=".", help="where the llama.cpp files go (and are reused from)")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args()
    jobs = []                                   # (method, file, run): llama.cpp's types first, then ours
    if a.llamacpp_src:
        from llamacpp_ppl import NEEDS_IMATRIX
        for spec in a.types:
            qtype = spec.removesuffix("+imatrix")
            use_im = qtype in NEEDS_IMATRIX or spec.endswith("+imatrix")
            path = a.llamacpp_src if qtype == "F32" else str(Path(a.keep) / f"smol-{qtype}{'-imat' if use_im else ''}.gguf")
            jobs.append((f"llama.cpp {qtype}" + (" imatrix" if use_im else ""), path,
                         lambda spec=spec: llamacpp_row(spec, a.llamacpp_src, a.imatrix, a.keep, a.windows, a.threads)))
    recipes = {}
    for spec in a.convert:
        path, _, args = spec.partition("=")
        if not args:
            ap.error(f"--convert {spec!r}: expected FILE=ARGS")
        recipes[path] = args
    files = {spec.rpartition("=")[2] for spec in a.bitbasis}
    for path in recipes:
        if path not in files:
            ap.error(f"--convert {path}: not a --bitbasis file")
    for spec in a.bitbasis:
        name, _, path = spec.rpartition("=")   # a name may hold "=" (N=2), a path does not
        if not path:
            ap.error(f"--bitbasis {spec!r}: expected NAME=FILE")
        if not Path(path).is_file() and path not in recipes:
            ap.error(f"--bitbasis {spec!r}: {path}: no such file (nor a --convert for it)")

        def run(name=name, path=path):
            if not Path(path).is_file():
                run_convert(path, recipes[path])
            row = bitbasis_row(name, path, a.windows, a.threads)
            made = Path(path + ".convert.json")     # this run's convert, or an earlier (stopped) run's
            return {**row, "convert": json.loads(made.read_text())} if made.is_file() else row
        jobs.append((f"bitbasis {name}", path, run))
    done = {(r["method"], r["file"], r["windows_llamacpp"]) for r in load_rows(a.out)}
    for method, path, run in jobs:
        if (method, path, a.windows) in done:
            continue                            # measured by an earlier (stopped) run
        t0 = time.time()
        row = run()
        append_row(a.out, row)
        print(json.dumps(row), f"({time.time() - t0:.0f} s)", flush=True)
    rows = load_rows(a.out)
    if a.png:
        plot(rows, a.png)
    if a.md:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

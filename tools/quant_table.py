#!/usr/bin/env python3
"""Issue 4's quantizer table on SmolLM2: convert, measure, write docs/quant_table.json.

Each row: `bitbasis convert` under /usr/bin/time -v (wall, CPU and peak memory), the honest size
(`bitbasis info`'s numbers), the papers' bit count, and engine perplexity with both protocols
(llama.cpp: ctx 512, second half of each window scored; papers: ctx 2048, every token).
Rows are resumable: a row whose file and measurements exist is skipped, so the script can be
stopped and started again; --redo NAME forces a row.

    python tools/quant_table.py                      # every row, default settings
    python tools/quant_table.py --only gptq-2 billm  # some rows
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> (convert arguments, papers' bit count: a number, or a function of the file)
ROWS = {
    "f32": (["--method", "f32"], 32.0),
    "rtn-1": (["--method", "rtn", "--bases", "1"], 1.0),
    "gptq-1": (["--method", "gptq", "--bases", "1"], 1.0),           # mse range search (default)
    "gptq-2": (["--method", "gptq", "--bases", "2"], 2.0),
    "gptq-3": (["--method", "gptq", "--bases", "3"], 3.0),
    "gptq-4": (["--method", "gptq", "--bases", "4"], 4.0),
    "gptq-2-minmax": (["--method", "gptq", "--bases", "2", "--opt", "mse=false"], 2.0),   # the reference's default
    "gptq-2-act": (["--method", "gptq", "--bases", "2", "--opt", "act_order=true"], 2.0),
    "pbllm-10": (["--method", "pbllm", "--opt", "salient=0.1"], 1 + 7 * 0.1),  # (1−f)·1 + f·8 bits
    "pbllm-20": (["--method", "pbllm", "--opt", "salient=0.2"], 1 + 7 * 0.2),
    "pbllm-30": (["--method", "pbllm", "--opt", "salient=0.3"], 1 + 7 * 0.3),
    "billm": (["--method", "billm"], "colmask"),     # 1 + fraction of salient columns (2nd plane)
    "arb": (["--method", "arb"], "colmask"),
    "arb-rc": (["--method", "arb", "--opt", "rc=true"], "colmask"),
}
CALIBRATED = {"gptq", "pbllm", "billm", "arb"}


def papers_bits_colmask(path: Path) -> float:
    """BiLLM's convention: one sign bit per weight, plus the second plane of the salient columns."""
    sys.path.insert(0, str(ROOT / "python"))
    from bitbasis import format as bbf
    from bitbasis.gguf_io import read_model
    mf = read_model(path)
    n = second = 0
    for p in mf.packed.values():
        bb = bbf.unpack(p)
        n += p.rows * p.cols
        if bb.colmask is not None:
            second += p.rows * int(bb.colmask.sum())
    return 1 + second / n


def git_state() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "python/bitbasis", "cpp"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return rev + ("+dirty" if dirty else "")


def timed(cmd: list[str], log: Path, adopt: bool = False) -> dict:
    """Run under /usr/bin/time -v with nice; wall seconds, CPU seconds, peak RSS (MiB).
    adopt: only read the log of a finished run."""
    if not adopt:
        with open(log, "w") as f:
            r = subprocess.run(["/usr/bin/time", "-v", "nice", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if not adopt and r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")

    def grab(key):
        m = re.search(rf"{re.escape(key)}: (.+)", text)
        return m.group(1).strip() if m else None
    h, m_, s = ([0, 0] + grab("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"))[-3:]
    return {"wall_s": round(int(h) * 3600 + int(m_) * 60 + float(s), 1),
            "cpu_s": round(float(grab("User time (seconds)")) + float(grab("System time (seconds)")), 1),
            "peak_rss_mib": round(int(grab("Maximum resident set size (kbytes)")) / 1024, 1),
            "load": None if adopt else os.getloadavg()[1]}


def ppl(path: Path, protocol: str, windows: int, log: Path, backend: str = "auto") -> dict:
    cmd = ["bitbasis", "ppl", str(path), "--protocol", protocol, "--windows", str(windows), "--json",
           "--backend", backend]
    with open(log, "w") as f:
        r = subprocess.run(["nice", *cmd], stdout=subprocess.PIPE, stderr=f, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: res[k] for k in ("ppl", "stderr", "windows", "tokens_scored", "seconds", "backend") if k in res}


def row_file(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.json"


def load_row(out_dir: Path, name: str) -> dict:
    f = row_file(out_dir, name)
    return json.loads(f.read_text()) if f.is_file() else {}


def save_row(out_dir: Path, name: str, row: dict) -> None:
    tmp = row_file(out_dir, name).with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, row_file(out_dir, name))


def convert_row(name: str, a, out_dir: Path) -> None:
    args, papers = ROWS[name]
    f = out_dir / f"{name}.gguf"
    row = load_row(out_dir, name)
    if name not in a.redo and f.is_file() and "convert" in row:
        return
    log = out_dir / f"{name}.convert.log"
    adopt = name not in a.redo and f.is_file() and log.is_file() and "Exit status: 0" in log.read_text(errors="replace")
    cmd = ["bitbasis", "convert", "smollm2", "-o", str(f), "--force", "-q", "--seed", str(a.seed), *args]
    if args[1] in CALIBRATED:
        cmd += ["--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen)]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
    row = {"method": args[1], "args": " ".join(args), "commit": git_state(),
           "calib": f"{a.calib_samples}x{a.calib_seqlen}" if args[1] in CALIBRATED else None}
    row["convert"] = timed(cmd, log, adopt)   # adopt: a finished run whose runner was stopped
    sys.path.insert(0, str(ROOT / "python"))
    from bitbasis.gguf_io import read_model, summarize
    s = summarize(read_model(f))
    row.update(file_bytes=s["file_bytes"], block_bpw=s["block_bpw"], file_bpw=s["file_bpw"],
               papers_bits=papers_bits_colmask(f) if papers == "colmask" else papers)
    save_row(out_dir, name, row)


def ppl_row(name: str, a, out_dir: Path) -> bool:
    """Measure both protocols once the row's file exists; False when it does not yet."""
    row = load_row(out_dir, name)
    if "convert" not in row:
        return False
    for proto, win in (("llamacpp", a.windows), ("papers", a.papers_windows)):
        key = f"ppl_{proto}"
        if not win or key in row and row[key].get("windows") == win and name not in a.redo:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}: ppl {proto}", flush=True)
        res = ppl(out_dir / f"{name}.gguf", proto, win, out_dir / f"{name}.{proto}.log", a.backend)
        res["commit"] = git_state()
        row = load_row(out_dir, name)
        row[key] = res
        save_row(out_dir, name, row)
    return True


def merge(names, a, out_dir: Path) -> None:
    table = {"settings": {
        "model": "SmolLM2-135M-Instruct", "text": "bitbasis eval split (held-out plays)",
        "calib": f"{a.calib_samples} samples x {a.calib_seqlen} tokens of the calibration plays, seed {a.seed}",
        "ppl_llamacpp": f"engine, ctx 512, second half of each window scored, {a.windows} windows",
        "ppl_papers": f"engine, ctx 2048, every token scored, {a.papers_windows} windows",
        "machine": f"{os.cpu_count()} cores shared with other jobs; convert under nice; see each row's load",
        "papers_bits": "the papers' convention: sign bits (+ 8-bit salient values for PB-LLM, + the second "
                       "plane of salient columns for BiLLM/ARB); true bpw = block_bpw (bitbasis info)"},
        "rows": {n: load_row(out_dir, n) for n in names if load_row(out_dir, n)}}
    Path(a.out).write_text(json.dumps(table, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="row names (default: all)")
    ap.add_argument("--redo", nargs="*", default=[], help="rows to convert and measure again")
    ap.add_argument("--lane", choices=("both", "convert", "ppl", "merge"), default="both",
                    help="convert only, measure only (waits for the convert lane's files), both in turn, "
                         "or only write --out from the rows measured so far")
    ap.add_argument("--dir", default="/work/out/qt", help="where the .gguf files, logs and per-row JSON go")
    ap.add_argument("--out", default=str(ROOT / "docs" / "quant_table.json"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="llama.cpp protocol windows (ctx 512)")
    ap.add_argument("--papers-windows", type=int, default=2, help="papers protocol windows (ctx 2048; 0: skip)")
    ap.add_argument("--backend", default="auto", choices=("auto", "engine", "torch"), help="bitbasis ppl --backend")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out_dir = Path(a.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = a.only or list(ROWS)
    if a.lane in ("both", "convert"):
        for name in names:
            convert_row(name, a, out_dir)
            if a.lane == "both":
                ppl_row(name, a, out_dir)
    if a.lane == "ppl":
        todo = list(names)
        while todo:
            todo = [n for n in todo if not ppl_row(n, a, out_dir)]
            if todo:
                time.sleep(20)
    merge(list(ROWS), a, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    "gptq-1": (["--method", "gptq", "--bases", "1"], 1.0),
    "gptq-2": (["--method", "gptq", "--bases", "2"], 2.0),
    "gptq-3": (["--method", "gptq", "--bases", "3"], 3.0),
    "gptq-4": (["--method", "gptq", "--bases", "4"], 4.0),
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


def timed(cmd: list[str], log: Path) -> dict:
    """Run under /usr/bin/time -v with nice; wall seconds, CPU seconds, peak RSS (MiB)."""
    with open(log, "w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", "nice", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}); see {log}")

    def grab(key):
        m = re.search(rf"{re.escape(key)}: (.+)", text)
        return m.group(1).strip() if m else None
    h, m_, s = ([0, 0] + grab("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":"))[-3:]
    return {"wall_s": round(int(h) * 3600 + int(m_) * 60 + float(s), 1),
            "cpu_s": round(float(grab("User time (seconds)")) + float(grab("System time (seconds)")), 1),
            "peak_rss_mib": round(int(grab("Maximum resident set size (kbytes)")) / 1024, 1),
            "load": os.getloadavg()[1]}


def ppl(path: Path, protocol: str, windows: int, log: Path) -> dict:
    cmd = ["bitbasis", "ppl", str(path), "--protocol", protocol, "--windows", str(windows), "--json"]
    with open(log, "w") as f:
        r = subprocess.run(["nice", *cmd], stdout=subprocess.PIPE, stderr=f, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {k: res[k] for k in ("ppl", "stderr", "windows", "tokens_scored", "seconds", "backend") if k in res}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="row names (default: all)")
    ap.add_argument("--redo", nargs="*", default=[], help="rows to convert and measure again")
    ap.add_argument("--dir", default="/work/out/qt", help="where the .gguf files and logs go")
    ap.add_argument("--out", default=str(ROOT / "docs" / "quant_table.json"))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="llama.cpp protocol windows (ctx 512)")
    ap.add_argument("--papers-windows", type=int, default=5, help="papers protocol windows (ctx 2048)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out_dir = Path(a.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    table = json.loads(out.read_text()) if out.is_file() else {"rows": {}}
    table["settings"] = {"model": "SmolLM2-135M-Instruct", "text": "bitbasis eval split (held-out plays)",
                         "calib_samples": a.calib_samples, "calib_seqlen": a.calib_seqlen,
                         "ppl_llamacpp": f"ctx 512, {a.windows} windows", "ppl_papers": f"ctx 2048, {a.papers_windows} windows",
                         "machine": f"{os.cpu_count()} cores, shared"}

    def save():
        out.write_text(json.dumps(table, indent=1) + "\n")

    for name in a.only or ROWS:
        args, papers = ROWS[name]
        f = out_dir / f"{name}.gguf"
        row = table["rows"].get(name, {})
        if name in a.redo or not f.is_file() or "convert" not in row:
            cmd = ["bitbasis", "convert", "smollm2", "-o", str(f), "--force", "-q", "--seed", str(a.seed), *args]
            if args[1] in CALIBRATED:
                cmd += ["--calib-samples", str(a.calib_samples), "--calib-seqlen", str(a.calib_seqlen)]
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
            row = {"method": args[1], "args": " ".join(args), "commit": git_state()}
            row["convert"] = timed(cmd, out_dir / f"{name}.convert.log")
            sys.path.insert(0, str(ROOT / "python"))
            from bitbasis.gguf_io import read_model, summarize
            s = summarize(read_model(f))
            row.update(file_bytes=s["file_bytes"], block_bpw=s["block_bpw"], file_bpw=s["file_bpw"],
                       papers_bits=papers_bits_colmask(f) if papers == "colmask" else papers)
            table["rows"][name] = row
            save()
        for proto, win in (("llamacpp", a.windows), ("papers", a.papers_windows)):
            key = f"ppl_{proto}"
            if key in row and row[key].get("windows") == win and name not in a.redo:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {name}: ppl {proto}", flush=True)
            row[key] = ppl(f, proto, win, out_dir / f"{name}.{proto}.log")
            row[key]["commit"] = git_state()
            save()
        print(f"  {name}: block bpw {row['block_bpw'] or 32:.3f}  ppl {row['ppl_llamacpp']['ppl']:.2f} / "
              f"{row['ppl_papers']['ppl']:.2f}  convert {row['convert']['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

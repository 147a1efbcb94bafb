#!/usr/bin/env python3
"""Convert SmolLM2 with several settings and measure each file: true bpw, size, perplexity.
Appends one JSON line per setting to OUT (so an interrupted run keeps what it measured).

    python tools/measure.py OUT.jsonl f32 rtn:1 residual:1 residual:2 residual:3 residual:4 \
        --windows 40 --protocol llamacpp
Each setting is METHOD[:BASES[:GROUP]][,key=value...] (method options, as `convert --opt`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))


def parse_setting(s: str) -> tuple[str, int, int, dict]:
    head, *opts = s.split(",")
    parts = head.split(":")
    method = parts[0]
    bases = int(parts[1]) if len(parts) > 1 else 1
    group = int(parts[2]) if len(parts) > 2 else 128
    extra = {}
    for o in opts:
        k, v = o.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    return method, bases, group, extra


def main() -> int:
    from bitbasis import hf
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.perplexity import run_perplexity
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("settings", nargs="+")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--protocol", default="llamacpp", choices=["llamacpp", "papers", "both"])
    p.add_argument("--backend", default="auto")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--keep", default=str(Path(hf.cache_dir()) / "measured"), help="where the files go")
    a = p.parse_args()
    Path(a.keep).mkdir(parents=True, exist_ok=True)
    model_dir = hf.default_model_dir()
    for s in a.settings:
        method, bases, group, extra = parse_setting(s)
        tag = s.replace(":", "-").replace(",", "_").replace("=", "")
        path = Path(a.keep) / f"smollm2-{tag}.gguf"
        calib = {"samples": a.calib_samples, "seqlen": a.calib_seqlen, "seed": 0}
        t0 = time.time()
        summary = convert(model_dir, path, ConvertOptions(method=method, bases=bases, group=group,
                                                          extra=extra or None, calib=calib, force=True), progress=True)
        qtime = time.time() - t0
        row = {"setting": s, "method": method, "bases": bases, "group": group, "extra": extra,
               "file": str(path), "file_bytes": summary["file_bytes"], "block_bpw": summary["block_bpw"],
               "file_bpw": summary["file_bpw"], "quant_seconds": qtime,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "calib": calib if method in ("gptq", "pbllm", "billm", "arb", "qbb") else None}
        protos = ["llamacpp", "papers"] if a.protocol == "both" else [a.protocol]
        for proto in protos:
            res = run_perplexity(str(path), "eval", proto, None, a.windows if proto == "llamacpp" else None,
                                 a.backend, a.threads)
            row[f"ppl_{proto}"] = res["ppl"]
            row[f"se_{proto}"] = res["stderr"]
            row[f"windows_{proto}"] = res["windows"]
            row["backend"] = res["backend"]
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the command modules."""
from __future__ import annotations

import json
import os
import sys


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(s: dict, out=None) -> None:
    out = out or sys.stdout           # looked up per call: a test's captured stdout, not the import-time one
    bpw = s.get("block_bpw")
    print(f"file        {_human(s['file_bytes'])} ({s['file_bytes']} bytes), {s['params']:,} parameters", file=out)
    if bpw is not None:
        print(f"block bpw   {bpw:.3f} true bits per weight over {s['quantized_weights']:,} quantized weights", file=out)
    print(f"file bpw    {s['file_bpw']:.3f} (everything: embeddings, norms, head, metadata)", file=out)
    edge = s.get("edge") or {}
    if edge:
        tied = "" if "output.weight" in edge else " (the head is tied to it)"
        print("embed/head  " + ", ".join(f"{n.split('.')[0]} {form}" + (f" ({bpw:.3f} bpw)" if bpw else "")
                                         for n, (form, bpw) in edge.items()) + tied, file=out)
    if "seconds" in s:
        print(f"time        {s['seconds']:.1f} s", file=out)


def parse_opts(opts) -> dict:
    extra = {}
    for kv in opts or []:
        if "=" not in kv:
            raise ValueError(f"--opt {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    return extra


# --- commands -----------------------------------------------------------------------------------


def add_sampling(p, temp: float) -> None:
    """Engine and sampling options shared by generate, chat and serve."""
    p.add_argument("-t", "--threads", type=int, default=None,
                   help="engine threads (default: this machine's physical cores; more than the cores is warned)")
    p.add_argument("--temp", type=float, default=temp, help=f"temperature, 0 = greedy (default {temp})")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--repeat-penalty", type=float, default=1.0,
                   help="divide the logits of recently seen tokens by this (llama.cpp's; 1.0 = off, the default)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repeat penalty looks back (default 64, -1 = all)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when the text contains TEXT (not printed); repeatable")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ctx", type=int, default=0, help="context length (default: the model's)")


def sampling_of(a):
    from ..engine import Sampling
    return Sampling(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                    repeat_penalty=a.repeat_penalty, repeat_last_n=a.repeat_last_n)


def check_threads(n: int | None) -> None:
    """A thread count above the cores only slows the engine down (threads wait for each other).
    None: the default (bitbasis.engine.default_threads)."""
    if n is None:
        return
    cores = os.cpu_count() or 1
    if n < 1:
        raise ValueError(f"--threads must be at least 1 (got {n})")
    if n > cores:
        print(f"bitbasis: warning: {n} threads on {cores} cores; more threads than cores slow the engine down",
              file=sys.stderr)


def n_predict(n: int) -> int | None:
    """-n: a count, or -1 for 'until the end of text or of the context'."""
    if n == -1:
        return None
    if n < 0:
        raise ValueError(f"-n must be -1 (until the end of text or context) or a count >= 0 (got {n})")
    return n

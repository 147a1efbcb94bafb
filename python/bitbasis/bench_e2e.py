"""End-to-end benchmark (`bitbasis bench e2e`): prompt and decode tokens/s and peak memory of the
bitbasis engine and of llama.cpp (through the optional `llama-cpp-python` package), same threads.

Per (model, threads) one measurement runs in a fresh subprocess, so its peak RSS is that engine's
alone: load the model, warm up on 8 tokens, reset, then
  prompt: eval of `prompt` token ids in one call (one batch), timed up to the logits of the last one;
  decode: `decode` single-token evals, each feeding the argmax of the previous logits (greedy).
The token ids are fixed pseudo-random ids (the text does not matter for speed). Repetitions are
interleaved (every model once, then every model again, ...) so that load from other processes on a
shared machine falls on all engines alike; the table shows medians and the JSON keeps every run.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMACPP = "llama.cpp"
OURS = "bitbasis"


class BenchError(ValueError):
    """A model that would not load or a measurement that failed; the message says which."""


# --- one measurement (runs in the child process) -------------------------------------------------

def _rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _open(engine: str, path: str, threads: int, n_ctx: int):
    """(eval(tokens) -> logits of the last token, reset(), n_vocab, info) for one engine."""
    if engine == OURS:
        from .engine import Model
        m = Model(path, threads=threads, n_ctx=n_ctx)
        return m.eval, m.reset, m.n_vocab, {"kernel": m.kernel, "threads": m.threads}
    if engine == LLAMACPP:
        import llama_cpp
        llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                              verbose=False)
        n_vocab = llm.n_vocab()

        def ev(tokens):
            llm.eval(list(tokens))
            # llama_get_logits_ith waits for the (possibly asynchronous) graph to finish
            ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
            return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
        return ev, llm.reset, n_vocab, {"llama_cpp_python": llama_cpp.__version__,
                                        "system_info": llama_cpp.llama_print_system_info().decode().strip()}
    raise BenchError(f"unknown engine {engine!r}")


def measure(engine: str, path: str, threads: int, prompt: int, decode: int, n_ctx: int = 512,
            seed: int = 0) -> dict:
    """One prompt + decode measurement in this process (call it in a fresh one for a clean RSS)."""
    if prompt < 1 or decode < 0 or prompt + decode + 1 > n_ctx:
        raise BenchError(f"prompt {prompt} + decode {decode} must be positive and fit n_ctx {n_ctx}")
    rss_base = _rss_bytes()
    t0 = time.perf_counter()
    ev, reset, n_vocab, info = _open(engine, path, threads, n_ctx)
    load_s = time.perf_counter() - t0
    ids = np.random.default_rng(seed).integers(0, n_vocab, prompt).tolist()
    ev(ids[:8])   # warm-up: pages in the weights, spins up the threads
    reset()
    t0 = time.perf_counter()
    logits = ev(ids)
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode):
        logits = ev([int(np.argmax(logits))])
    decode_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux: KiB
    return {"engine": engine, "model": path, "threads": threads, "prompt_tokens": prompt, "decode_tokens": decode,
            "load_s": load_s, "prompt_s": prompt_s, "decode_s": decode_s,
            "prompt_tok_s": prompt / prompt_s, "decode_tok_s": decode / decode_s if decode else None,
            "peak_rss_bytes": peak, "base_rss_bytes": rss_base, "info": info}


def _child_main(spec: str) -> int:
    try:
        print(json.dumps(measure(**json.loads(spec))))
    except Exception as e:   # reported to the parent as one line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    return 0


def measure_subprocess(engine: str, path: str, threads: int, prompt: int, decode: int, n_ctx: int = 512,
                       omp_wait_policy: str | None = "PASSIVE", timeout: float | None = None) -> dict:
    spec = json.dumps(dict(engine=engine, path=path, threads=threads, prompt=prompt, decode=decode, n_ctx=n_ctx))
    env = dict(os.environ)
    if omp_wait_policy:
        # llama.cpp's CPU backend syncs its OpenMP threads at every op; with the default spin-wait a
        # thread that the OS has descheduled (a busy machine) stalls the others for a whole time slice
        env["OMP_WAIT_POLICY"] = omp_wait_policy
        # ours runs as users get it (unless BITBASIS_SPIN is set): a 50 µs spin, then sleep, and pieces of
        # work for whichever thread is free (cpp/src/threadpool.h), which a shared machine does not stall
    pkg_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    r = subprocess.run([sys.executable, "-m", "bitbasis.bench_e2e", "--child", spec], capture_output=True,
                       text=True, env=env, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"exit code {r.returncode}"]
        raise BenchError(f"{engine} on {path}: {tail[0]}")
    res = json.loads(lines[-1])
    if "error" in res:
        raise BenchError(f"{engine} on {path}: {res['error']}")
    return res


# --- the benchmark -------------------------------------------------------------------------------

def llamacpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
        return True
    except Exception:
        return False


def _cpu_flags() -> str:
    """The SIMD flags that matter for these kernels, from /proc/cpuinfo."""
    want = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_vpopcntdq",
            "avx512_bitalg", "avx512_bf16", "avxvnni", "neon", "asimd", "asimddp", "sve")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in want if f in have)
    except OSError:
        pass
    return ""


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _label(engine: str, path: str) -> str:
    return f"{engine}:{Path(path).name}"


def run(models: list[tuple[str, str]], threads=(1, 2), prompt: int = 128, decode: int = 64, reps: int = 3,
        n_ctx: int = 512, omp_wait_policy: str | None = "PASSIVE", log=print) -> dict:
    """models: [(engine, path)]. Every rep runs every (model, threads) once, models interleaved."""
    from .bench import _cpu_model, _git_commit
    for engine, path in models:
        if not os.path.isfile(path):
            raise BenchError(f"{path}: no such file")
    meta = {"cpu_model": _cpu_model(), "cpu_flags": _cpu_flags(), "machine": platform.machine(),
            "os_cpus": os.cpu_count(), "threads": list(threads), "prompt_tokens": prompt, "decode_tokens": decode,
            "reps": reps, "n_ctx": n_ctx, "git_commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": _loadavg(), "bitbasis_lib": os.environ.get("BITBASIS_LIB"),
            "omp_wait_policy": omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"),
            "method": "fresh subprocess per run; warm-up 8 tokens; prompt = one eval of the prompt ids; "
                      "decode = single-token greedy evals; runs interleaved across models; medians"}
    # ours, theirs, ours, theirs, ...; every other rep in reverse, so no model always follows the same one
    ours = [m for m in models if m[0] == OURS]
    theirs = [m for m in models if m[0] != OURS]
    order = [m for pair in zip(ours, theirs) for m in pair] + ours[len(theirs):] + theirs[len(ours):]
    runs = []
    for rep in range(reps):
        for th in threads:
            for engine, path in (order if rep % 2 == 0 else order[::-1]):
                r = measure_subprocess(engine, path, th, prompt, decode, n_ctx, omp_wait_policy)
                r["rep"] = rep
                r["loadavg"] = _loadavg()
                runs.append(r)
                log(f"rep {rep} {_label(engine, path):40s} t={th} prompt {r['prompt_tok_s']:8.2f} tok/s  "
                    f"decode {r['decode_tok_s'] or 0:8.2f} tok/s  peak RSS {r['peak_rss_bytes'] / 2**20:7.1f} MiB")
    meta["loadavg_end"] = _loadavg()
    from .bench import KIND_E2E
    return {"kind": KIND_E2E, "version": 1, "meta": meta, "runs": runs, "summary": summarize(runs, models, threads)}


def summarize(runs: list[dict], models: list[tuple[str, str]], threads) -> list[dict]:
    rows = []
    for th in threads:
        for engine, path in models:
            rs = [r for r in runs if r["engine"] == engine and r["model"] == path and r["threads"] == th]
            if not rs:
                continue
            p = [r["prompt_tok_s"] for r in rs]
            d = [r["decode_tok_s"] for r in rs if r["decode_tok_s"]]
            rows.append({
                "engine": engine, "model": path, "label": _label(engine, path), "threads": th, "runs": len(rs),
                "file_bytes": os.path.getsize(path),
                "prompt_tok_s": statistics.median(p), "prompt_min": min(p), "prompt_max": max(p),
                "decode_tok_s": statistics.median(d) if d else None,
                "decode_min": min(d) if d else None, "decode_max": max(d) if d else None,
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                "base_rss_bytes": min(r["base_rss_bytes"] for r in rs),
                "kernel": rs[0]["info"].get("kernel"),
            })
    return rows


def table(result: dict, baseline: str | None = None) -> str:
    """Medians per (model, threads); x-columns are ratios to `baseline` (a label) at the same threads."""
    m = result["meta"]
    rows = result["summary"]
    lines = [f"cpu: {m['cpu_model']} ({m['os_cpus']} cpus; {m['cpu_flags']})",
             f"commit {m['git_commit']}  {m['date']}  prompt {m['prompt_tokens']}  decode {m['decode_tokens']}  "
             f"reps {m['reps']}  OMP_WAIT_POLICY {m.get('omp_wait_policy')}  "
             f"loadavg {m['loadavg_start']} -> {m['loadavg_end']}"]
    if baseline:
        lines.append(f"ratios (x) against {baseline} at the same thread count; spread = (max-min)/median")
    lines.append("MiB = file size; peak RSS = the whole measuring process; -base = minus its RSS before the engine "
                 "is imported and the model loaded (interpreter, numpy)")
    lines.append(f"{'model':44s} {'thr':>3s} {'MiB':>7s} {'prompt t/s':>10s} {'spread':>6s} {'x':>5s} "
                 f"{'decode t/s':>10s} {'spread':>6s} {'x':>5s} {'peak RSS':>9s} {'-base':>8s}")
    for r in rows:
        base = next((b for b in rows if b["label"] == baseline and b["threads"] == r["threads"]), None)

        def ratio(key):
            return f"{r[key] / base[key]:5.2f}" if base and base[key] and r[key] else f"{'':5s}"

        def spread(key, lo, hi):
            return f"{(r[hi] - r[lo]) / r[key]:6.0%}" if r[key] else f"{'':6s}"
        dec = f"{r['decode_tok_s']:10.2f}" if r["decode_tok_s"] else f"{'n/a':>10s}"
        lines.append(f"{r['label'][:44]:44s} {r['threads']:3d} {r['file_bytes'] / 2**20:7.1f} "
                     f"{r['prompt_tok_s']:10.2f} {spread('prompt_tok_s', 'prompt_min', 'prompt_max')} "
                     f"{ratio('prompt_tok_s')} {dec} {spread('decode_tok_s', 'decode_min', 'decode_max')} "
                     f"{ratio('decode_tok_s')} {r['peak_rss_bytes'] / 2**20:7.1f}Mi "
                     f"{(r['peak_rss_bytes'] - r['base_rss_bytes']) / 2**20:6.1f}Mi")
    return "\n".join(lines)


def main_e2e(args) -> int:
    models = [(OURS, p) for p in args.model]
    note = None
    if args.llamacpp:
        if llamacpp_available():
            models += [(LLAMACPP, p) for p in args.llamacpp]
        else:
            note = "llama-cpp-python is not importable: benchmarking bitbasis only (pip install llama-cpp-python)"
            print(note, file=sys.stderr)
    try:
        threads = tuple(int(v) for v in args.threads.split(","))
    except ValueError:
        raise BenchError(f"--threads {args.threads!r}: expected comma-separated integers") from None
    if any(t < 1 for t in threads) or args.reps < 1:
        raise BenchError("threads and --reps must be at least 1")
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    res = run(models, threads, args.prompt, args.decode, args.reps, args.ctx, args.omp_wait_policy or None, log=log)
    if note:
        res["meta"]["note"] = note
    baseline = args.baseline
    if baseline is None and args.llamacpp and note is None:
        baseline = _label(LLAMACPP, args.llamacpp[0])
    elif baseline is not None and ":" not in baseline:   # a bare file name: match it in any engine
        baseline = next((r["label"] for r in res["summary"] if Path(r["model"]).name == baseline
                         or r["model"] == baseline), baseline)
    res["meta"]["baseline"] = baseline
    print(table(res, baseline))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def add_command(bsub) -> None:
    """Registers `e2e` under the `bench` subparsers."""
    p = bsub.add_parser("e2e", help="prompt/decode tokens/s and peak RSS of the engine vs llama.cpp")
    p.add_argument("model", nargs="+", help="GGUF file(s) for the bitbasis engine")
    p.add_argument("--llamacpp", nargs="+", default=[], metavar="GGUF",
                   help="GGUF file(s) for llama.cpp (needs the llama-cpp-python package)")
    p.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens (default 64)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions; the table shows medians (default 3)")
    p.add_argument("--ctx", type=int, default=512, help="context of both engines (default 512)")
    p.add_argument("--baseline", default=None,
                   help="label or file name the ratio columns divide by (default: the first --llamacpp file)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of the measured processes (default PASSIVE: llama.cpp's OpenMP spin-wait "
                        "collapses when other processes share the cores; ACTIVE spins; '' leaves it unset). Ours runs its "
                        "default pool (BITBASIS_SPIN=<us> from the environment if set)")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    p.add_argument("--quiet", action="store_true", help="print only the final table")

    def _run(args):
        return main_e2e(args)
    p.set_defaults(func=_run)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2]))
    print("usage: bitbasis bench e2e MODEL.gguf [--llamacpp OTHER.gguf ...] (see --help)", file=sys.stderr)
    sys.exit(2)

"""The model half of tools/emulate.sh: logits on emulated CPUs against this machine's.

    python tools/emulate.py --build B --work W [--smol A.gguf B.gguf]     (tools/emulate.sh runs it)

x86 (qemu-x86_64 -cpu Haswell: AVX2/FMA/F16C, no AVX-512; -cpu Nehalem: SSE4.2, no AVX): `worker`
(below) runs inside the emulator on the native build's libbitbasis.so (BITBASIS_LIB) and loads real
converted SmolLM2 files through bitbasis.Model, torch-free (numpy + cffi; checked). It asks the
library for the CPU features and the kernels (bbk_kernels() through bitbasis.bench) and opens the
files with every selection the dispatcher offers: the default, BITBASIS_ISA=<isa> and
BITBASIS_KERNEL=<name> for every compiled-in ISA and kernel. A supported selection evaluates 8
tokens (a batch of 7: GEMM, then 1: GEMV), all logits: every kernel on the first file, the default
kernel on every file (emulated AVX2 runs ~200x slower than native); a selection that resolves to a
kernel already evaluated is checked for the kernel's name. An unsupported one must be refused with
a one-line EngineError naming what was asked for (not a crash).
Both architectures: cpp/tools/forward_logits.cpp (the C API: bb_model_open, bb_eval all_logits) runs
tiny random-weight llamas converted here (dense F32 with a Q8_0 head, residual N=2, GPTQ N=3
(POW2 + OFFSET), PB-LLM (SPARSE), BiLLM (COLMASK + ELEMCLASS: the scalar fallback inside SIMD
kernels)) with the default kernel on 1 and 3 threads and every other supported kernel on 2: the
x86 build under the emulated x86 CPUs, the static aarch64 build under qemu-aarch64 -cpu max (NEON +
dotprod) and -cpu cortex-a53 (NEON without dotprod). It evaluates ceil(n/2) tokens at once, then
one at a time.

The emulated CPU must report what it should (features, default kernel, no AVX-512 / dotprod kernel
supported where the CPU lacks it), so that a CPU detector silently falling back to scalar cannot
pass. Reference: the native run of the same kernel where this CPU has it, else the native default
kernel. Error: max|a - b| / max|b| over all [tokens x vocab] logits (b the reference); tolerance
1e-3. One line per (CPU, program, selection): PASS or FAIL; exit status 0 when all pass.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-3
SMOL_TOKENS = [504, 2365, 6354, 16438, 27003, 690, 260, 23790]   # "The quick brown fox jumps over the lazy"
TINY_TOKENS = [17, 300, 45, 511, 260, 88, 401, 33]
TINY_VOCAB = 512

# What each emulated CPU must report (cpu_features() names), and the ISA of its default kernel.
X86_CPUS = {
    "Haswell": dict(has={"popcnt", "fma", "f16c", "avx2"}, lacks={"avx512f"}, default_isa="avx2"),
    "Nehalem": dict(has={"popcnt"}, lacks={"fma", "f16c", "avx2", "avx512f"}, default_isa="scalar"),
}
ARM_CPUS = {
    "max": dict(has={"neon", "dotprod"}, lacks=set(), default_isa="neon"),
    "cortex-a53": dict(has={"neon"}, lacks={"dotprod"}, default_isa="neon"),
}
TINY_MODELS = [  # name, method, bases, group, embedding/head type
    ("dense-f32", "f32", 1, 64, "Q8_0"),
    ("residual-n2", "residual", 2, 128, "Q8_0"),
    ("gptq-n3", "gptq", 3, 64, "F16"),
    ("pbllm", "pbllm", 1, 64, "Q8_0"),
    ("billm", "billm", 2, 64, "Q8_0"),
]
FAILS: list[str] = []


def report(ok: bool, cpu: str, what: str, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {cpu:<18} {what:<44} {detail}", flush=True)
    if not ok:
        FAILS.append(f"{cpu} {what}")


def rel_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not np.isfinite(a).all():
        return float("inf")
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def status(rc: int) -> str:
    if rc < 0 or rc > 128:   # qemu-user dies of the guest's fatal signal itself
        try:
            return f"killed by {signal.Signals(-rc if rc < 0 else rc - 128).name}"
        except ValueError:
            pass
    return f"exit status {rc}"


def stderr_lines(stderr: str) -> list[str]:
    """A program's stderr without qemu's notes on CPUID bits TCG does not emulate (hle, rtm, pcid...)."""
    return [x for x in stderr.strip().splitlines() if not x.startswith("qemu-x86_64: warning:")]


def why(r: subprocess.CompletedProcess) -> str:
    return f"{status(r.returncode)}: {(stderr_lines(r.stderr) or ['no output'])[-1][:150]}"


def after_env(msg: str) -> str:
    """An engine refusal from its BITBASIS_... part on (the file name before it is long)."""
    return msg[max(0, msg.find("BITBASIS")):][:90]


def check_cpu(who: str, exp: dict, info: dict, program: str) -> None:
    feats = set(info["features"].split())
    isa_of = {k["name"]: k["isa"] for k in info["kernels"]}
    wrong = [f"lacks {f}" for f in sorted(exp["has"] - feats)] + [f"has {f}" for f in sorted(exp["lacks"] & feats)]
    if isa_of.get(info["default"]) != exp["default_isa"]:
        wrong.append(f"default not an {exp['default_isa']} kernel")
    wrong += [f"{k['name']} supported" for k in info["kernels"] if k["supported"] and
              (k["isa"] == "avx512" or k["isa"] == "avx2" and "avx2" in exp["lacks"] or
               "dotprod" in k["name"] and "dotprod" in exp["lacks"])]
    wrong += [f"imported {m}" for m in info.get("torch", [])]
    report(not wrong, who, f"{program}: cpu features, kernels",
           f"features '{info['features']}', default {info['default']}" + (f" -- {', '.join(wrong)}" if wrong else ""))


# --- x86: bitbasis.Model on real files, inside the emulator ---------------------------------------------

def worker(a) -> int:
    import numpy as np
    from bitbasis import bench
    from bitbasis.engine import EngineError, Model
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w", buffering=1)

    def note(**kv):   # flushed before each step: after a crash the log says where it happened
        log.write(json.dumps(kv) + "\n")
        log.flush()
        os.fsync(log.fileno())

    ks = bench.kernels()   # bbk_kernels(): name, isa, supported on this (emulated) CPU
    ffi, lib = bench.kernel_lib()
    p = lib.bbk_default_kernel()
    default = ffi.string(p if p != ffi.NULL else lib.bbk_error()).decode()
    note(step="info", features=ffi.string(lib.bbk_cpu_features()).decode(), kernels=ks, default=default,
         torch=sorted(m for m in sys.modules if m.split(".")[0] == "torch")[:3])
    sels = [""] + [f"BITBASIS_ISA={i}" for i in dict.fromkeys(k["isa"] for k in ks)]
    sels += [f"BITBASIS_KERNEL={k['name']}" for k in ks]
    done: dict = {}   # kernel -> files it evaluated
    for sel in sels:
        os.environ.pop("BITBASIS_ISA", None)
        os.environ.pop("BITBASIS_KERNEL", None)
        if sel:
            var, val = sel.split("=")
            os.environ[var] = val
        for i, path in enumerate(a.models):
            name = Path(path).stem
            note(step="start", sel=sel or "default", model=name)
            t0, c0 = time.time(), time.process_time()
            try:
                m = Model(path, threads=a.threads)
            except EngineError as e:
                note(step="done", sel=sel or "default", model=name, refused=str(e))
                continue
            file = None
            if name not in done.get(m.kernel, []) and (a.plan == "all" or i == 0 or m.kernel == default):
                m.reset()
                lg = [m.eval(a.tokens[:-1], all_logits=True), m.eval(a.tokens[-1:], all_logits=True)]
                file = f"{name}.{m.kernel}.npy"
                np.save(out / file, np.concatenate(lg))
                done.setdefault(m.kernel, []).append(name)
            m.close()
            note(step="done", sel=sel or "default", model=name, kernel=m.kernel, file=file,
                 seconds=round(time.time() - t0, 1), cpu_seconds=round(time.process_time() - c0, 1))
    note(step="end")
    return 0


def run_worker(prefix: list[str], out: Path, models: list[Path], lib: Path, threads: int, plan: str):
    """(info or None, [(selection, model, done-event or None)] in order, '' or why the process died)."""
    env = {k: v for k, v in os.environ.items() if k not in ("BITBASIS_ISA", "BITBASIS_KERNEL")}
    env.update(BITBASIS_LIB=str(lib), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "python"),
                                                                               env.get("PYTHONPATH")])))
    cmd = prefix + [sys.executable, str(Path(__file__).resolve()), "worker", "--out", str(out), "--threads",
                    str(threads), "--plan", plan, "--tokens", *map(str, SMOL_TOKENS), "--", *map(str, models)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = out / "log.jsonl"
    events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    died = "" if r.returncode == 0 and events and events[-1]["step"] == "end" else why(r)
    info = next((e for e in events if e["step"] == "info"), None)
    ends = {(e["sel"], e["model"]): e for e in events if e["step"] == "done"}
    steps = [(e["sel"], e["model"], ends.get((e["sel"], e["model"]))) for e in events if e["step"] == "start"]
    return info, steps, died


def check_python(cpu: str, info, steps, died: str, out: Path, native: dict, native_default: str) -> None:
    import numpy as np
    who = f"x86 {cpu}"
    if info is None:
        report(False, who, "python: cpu features, kernels", f"process {died}")
        return
    check_cpu(who, X86_CPUS[cpu], info, "python")
    supported = {k["name"] for k in info["kernels"] if k["supported"]}
    isa_ok = {k["isa"] for k in info["kernels"] if k["supported"]}
    isa_of = {k["name"]: k["isa"] for k in info["kernels"]}
    for sel in dict.fromkeys(s for s, _, _ in steps):
        evs = [(m, e) for s, m, e in steps if s == sel]
        what = f"python {sel}"
        if any(e is None for _, e in evs):
            report(False, who, what, f"on {next(m for m, e in evs if e is None)}: process {died}")
            continue
        var, _, val = sel.partition("=")
        refuse = bool(val) and (val not in supported if var == "BITBASIS_KERNEL" else val not in isa_ok)
        msgs = [e.get("refused") for _, e in evs]
        if refuse or any(msgs):
            ok = refuse and all(msgs) and all("\n" not in x.strip() and val.split("-")[0] in x for x in msgs)
            report(ok, who, what, f"refused: {after_env(msgs[0])}" if msgs[0] else
                   f"not refused: opened with {evs[0][1]['kernel']}")
            continue
        kernels = {e["kernel"] for _, e in evs}
        k = evs[0][1]["kernel"]
        want = info["default"] if var == "default" else val if var == "BITBASIS_KERNEL" else None
        if len(kernels) > 1 or (want and k != want) or (var == "BITBASIS_ISA" and isa_of.get(k) != val):
            report(False, who, what, f"-> {', '.join(sorted(kernels))}, expected {want or 'a ' + val + ' kernel'}")
            continue
        parts, ok = [], True
        for m, e in evs:
            if not e["file"]:
                continue
            ref_k = k if (k, m) in native else native_default
            if (ref_k, m) not in native:
                ok = False
                parts.append(f"{m.replace('smol-', '')}: no native {ref_k or 'default'} reference")
                continue
            err = rel_err(np.load(out / e["file"]), native[(ref_k, m)])
            ok &= err <= TOL
            parts.append(f"{m.replace('smol-', '')} {err:.1e} vs native {ref_k} ({e['cpu_seconds']:.0f} cpu-s)")
        report(ok, who, what, f"-> {k}: max rel err " + ("; ".join(parts) if parts else "as above"))


# --- both architectures: cpp/tools/forward_logits.cpp on tiny models -----------------------------------

def make_tiny(models: Path) -> list[Path]:
    """Tiny random llamas (tests/conftest.py tiny_llama_dir) with SmolLM2's tokenizer cut to 512 ids
    (every byte and the first merges), so that the block linears and not a 49152-row head take the
    time under qemu; group 64/128 with widths 192 and 448 leaves partial groups."""
    out = [models / f"tiny-{n}.gguf" for n, *_ in TINY_MODELS]
    if all(p.exists() for p in out):
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_llama_dir
    from bitbasis import data
    from bitbasis.convert import ConvertOptions, convert
    d = models / "tiny-llama"
    if not (d / "config.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        tiny_llama_dir(d, vocab_size=TINY_VOCAB, hidden_size=192, intermediate_size=448, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        spec = json.loads((d / "tokenizer.json").read_text())
        vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < TINY_VOCAB}
        spec["model"]["vocab"] = vocab
        spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                                   if ("".join(m) if isinstance(m, list) else m.replace(" ", "")) in vocab]
        spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < TINY_VOCAB]
        (d / "tokenizer.json").write_text(json.dumps(spec))
    text = models / "calib.txt"   # a few kB: tokenizing the whole calibration text takes longer than the rest
    text.write_text(data.read_text("calib")[:16000])
    calib = {"samples": 8, "seqlen": 64, "text": str(text), "checkpoint": "none"}
    for (_, method, bases, group, embed), p in zip(TINY_MODELS, out):
        if not p.exists():
            convert(d, p, ConvertOptions(method=method, bases=bases, group=group, embed_type=embed, calib=calib,
                                         force=True), progress=False)
    return out


def driver(prefix: list[str], exe: Path, model: Path, threads: int, out: Path, env: dict | None = None):
    e = {k: v for k, v in os.environ.items() if k not in ("BITBASIS_ISA", "BITBASIS_KERNEL")}
    e.update(env or {})
    r = subprocess.run(prefix + [str(exe), str(model), str(threads), str(out), *map(str, TINY_TOKENS)],
                       env=e, capture_output=True, text=True)
    kernel = r.stdout.split()[1] if r.returncode == 0 and r.stdout.startswith("kernel ") else None
    return r, kernel


def driver_info(prefix: list[str], exe: Path):
    r = subprocess.run(prefix + [str(exe), "--info"], capture_output=True, text=True)
    if r.returncode != 0:
        return why(r)
    kv = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines() if ": " in line)
    ks = [item.split() for item in kv.get("kernels", "").split(";") if item]
    return {"features": kv.get("features", ""), "default": kv.get("default", ""),
            "kernels": [{"name": n, "isa": i, "supported": s == "1"} for n, i, s in ks]}


def native_driver_refs(exe: Path, tiny: list[Path], work: Path) -> tuple[dict, str]:
    import numpy as np
    info = driver_info([], exe)
    if isinstance(info, str):
        report(False, "x86 native", "forward_logits --info (the reference)", info)
        return {}, ""
    refs = {}
    for k in (k["name"] for k in info["kernels"] if k["supported"]):
        for model in tiny:
            out = work / f"{model.stem}.{k}.f32"
            r, _ = driver([], exe, model, 2, out, {"BITBASIS_KERNEL": k})
            if r.returncode != 0:
                report(False, "x86 native", f"forward_logits {k} (the reference)", f"{model.stem}: {why(r)}")
                break
            refs[(k, model.stem)] = np.fromfile(out, np.float32).reshape(len(TINY_TOKENS), -1)
    return refs, info["default"]


def check_driver(who: str, exp: dict, prefix: list[str], exe: Path, tiny: list[Path], native: dict,
                 native_default: str, work: Path, refuse_isa: str) -> None:
    import numpy as np
    info = driver_info(prefix, exe)
    if isinstance(info, str):
        report(False, who, "forward_logits: cpu features, kernels", info)
        return
    check_cpu(who, exp, info, "forward_logits")
    runs = [(info["default"], 1, {}), (info["default"], 3, {})]
    runs += [(k["name"], 2, {"BITBASIS_KERNEL": k["name"]}) for k in info["kernels"]
             if k["supported"] and k["name"] != info["default"]]
    for kernel, threads, env in runs:
        what = f"forward_logits {kernel} {threads}t" + ("" if env else " (default)")
        t0, worst, bad = time.time(), (-1.0, ""), []
        ref_k = kernel if (kernel, tiny[0].stem) in native else native_default
        for model in tiny:
            out = work / f"{model.stem}.{kernel}.{threads}.f32"
            r, got_k = driver(prefix, exe, model, threads, out, env)
            if r.returncode != 0 or got_k != kernel:
                bad.append(f"{model.stem}: {why(r) if r.returncode else 'ran ' + str(got_k)}")
                continue
            ref = native.get((ref_k, model.stem))
            if ref is None:
                bad.append(f"{model.stem}: no native {ref_k or 'default'} reference")
                continue
            err = rel_err(np.fromfile(out, np.float32).reshape(ref.shape), ref)
            if err > TOL:
                bad.append(f"{model.stem}: rel err {err:.1e}")
            worst = max(worst, (err, model.stem))
        report(not bad, who, what, "; ".join(bad)[:200] if bad else
               f"max rel err {worst[0]:.1e} ({worst[1]}) vs native {ref_k}, {len(tiny)} models, {time.time() - t0:.0f} s")
    r, _ = driver(prefix, exe, tiny[0], 1, work / "refused.f32", {"BITBASIS_ISA": refuse_isa})
    msg = stderr_lines(r.stderr)
    report(r.returncode == 1 and len(msg) == 1 and refuse_isa in msg[0], who,
           f"forward_logits BITBASIS_ISA={refuse_isa}",
           f"refused: {after_env(msg[0])}" if r.returncode == 1 and msg else why(r))


def main(a) -> int:
    import numpy as np
    build, work = Path(a.build).resolve(), Path(a.work).resolve()
    lib, x86_exe, arm_exe = build / "libbitbasis.so", work / "forward_logits", work / "aarch64" / "forward_logits"
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tiny = make_tiny(models)
    smol = [Path(p) for p in a.smol or []]
    if not smol:
        from bitbasis import hf
        from bitbasis.convert import ConvertOptions, convert
        for n in (1, 2):
            smol.append(models / f"smol-residual-n{n}-g128.gguf")
            if not smol[-1].exists():
                convert(hf.default_model_dir(), smol[-1], ConvertOptions(method="residual", bases=n), progress=False)
    print(f"== models ({time.time() - t0:.0f} s): {' '.join(p.name for p in tiny + smol)}", flush=True)

    t0 = time.time()
    info, steps, died = run_worker([], work / "python-native", smol, lib, a.threads, "all")
    native = {(e["kernel"], m): np.load(work / "python-native" / e["file"]) for _, m, e in steps if e and e.get("file")}
    if died or info is None:
        report(False, "x86 native", "python: the reference logits", died)
    print(f"== x86 native python (the reference): {' '.join(sorted({k for k, _ in native})) or 'none'}, "
          f"{time.time() - t0:.0f} s", flush=True)
    for cpu in X86_CPUS:
        t0 = time.time()
        out = work / f"python-{cpu}"
        check_python(cpu, *run_worker([a.qemu_x86, "-cpu", cpu], out, smol, lib, a.threads, "first"), out,
                     native, info["default"] if info else "")
        print(f"== x86 {cpu} python: {time.time() - t0:.0f} s", flush=True)

    refs, ref_default = native_driver_refs(x86_exe, tiny, work)
    for arch, cpus, prefix, exe, refuse in (
            ("x86", X86_CPUS, [a.qemu_x86, "-cpu"], x86_exe, "avx512"),
            ("aarch64", ARM_CPUS, [a.qemu_aarch64, "-L", a.sysroot, "-cpu"], arm_exe, "avx2")):
        for cpu, exp in cpus.items():
            t0 = time.time()
            check_driver(f"{arch} {cpu}", exp, prefix + [cpu], exe, tiny, refs, ref_default, work, refuse)
            print(f"== {arch} {cpu} forward_logits: {time.time() - t0:.0f} s", flush=True)
    return 1 if FAILS else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    w = sub.add_parser("worker", help="(inside the emulator) evaluate models with every kernel selection")
    w.add_argument("--out", required=True)
    w.add_argument("--threads", type=int, default=2)
    w.add_argument("--plan", choices=["first", "all"], default="first",
                   help="every kernel on the first file and the default on all (first), or every kernel on all")
    w.add_argument("--tokens", type=int, nargs="+", required=True)
    w.add_argument("models", nargs="+")
    p.add_argument("--build", help="native cmake build directory (libbitbasis.so)")
    p.add_argument("--work", help="work directory (forward_logits, aarch64/forward_logits, models, logits)")
    p.add_argument("--smol", nargs="*", help="converted SmolLM2 files (default: convert residual N=1, N=2 here)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--qemu-x86", default=os.environ.get("QEMU_X86_64", "qemu-x86_64"))
    p.add_argument("--qemu-aarch64", default=os.environ.get("QEMU_AARCH64", "qemu-aarch64"))
    p.add_argument("--sysroot", default=os.environ.get("AARCH64_SYSROOT", "/usr/aarch64-linux-gnu"))
    a = p.parse_args()
    if a.cmd != "worker" and not (a.build and a.work):
        p.error("--build and --work are required")
    sys.exit(worker(a) if a.cmd == "worker" else main(a))

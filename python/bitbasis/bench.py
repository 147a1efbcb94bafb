"""Kernel benchmark (`bitbasis bench kernels`) and a Python handle on the C++ kernels.

The kernel entry points (`bbk_*`, cpp/src/kernels_capi.cpp) are test/benchmark hooks, not part of
the model API in bitbasis.h, so they are declared here and opened from the same library.

For every kernel × planes N × group size × shape × threads the benchmark times GEMV (one token) and
GEMM (a prompt of `--tokens` tokens) on a random weight, and reports per case: time (best of the
repetitions; the median is kept in the JSON), effective GB/s of weight bytes (every component
tensor), that as % of the STREAM-style read bandwidth measured in the same run with the same thread
count, and GOP/s = 2·rows·cols·tokens / time (dense-equivalent multiply-adds).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import format as fmt

_CDEF = """
const char *bbk_error(void);
const char *bbk_kernels(void);
const char *bbk_default_kernel(void);
const char *bbk_cpu_features(void);
const char *bbk_compiler(void);
int bbk_matmul(const char *kernel, int repack, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags,
               const uint8_t *planes, const uint16_t *scales, const uint16_t *offsets, const uint8_t *colmask,
               const uint8_t *elemclass, const uint8_t *smask, const uint8_t *scodes, const uint16_t *zs,
               const uint16_t *colscale, const float *x, int n_tok, float *y);
int bbk_bench(const char *kernel, int64_t rows, int64_t cols, int n_planes, int group, uint32_t flags, int n_tok,
              int n_threads, double min_seconds, double *best, double *median, double *weight_bytes);
double bbk_read_bandwidth(int64_t bytes, int n_threads, double min_seconds);
"""

SHAPES = {  # (rows, cols) = (out, in) of the linear layers
    "smollm2": [(576, 576), (1536, 576), (576, 1536)],
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
}


class KernelError(ValueError):
    """A kernel call the C++ side rejected (message from bbk_error)."""


@lru_cache(maxsize=4)
def kernel_lib(path: str | None = None):
    """(ffi, lib) for the bbk_* entry points of libbitbasis (BITBASIS_LIB or the built package)."""
    from cffi import FFI
    if path is None:
        from ._native import _library_path
        path = str(_library_path())
    ffi = FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen(path)


def _err(ffi, lib) -> str:
    return ffi.string(lib.bbk_error()).decode()


def kernels(path: str | None = None) -> list[dict]:
    """Compiled-in kernels: [{name, isa, supported}], fastest first per ISA."""
    ffi, lib = kernel_lib(path)
    out = []
    for item in ffi.string(lib.bbk_kernels()).decode().split(";"):
        if item:
            name, isa, ok = item.split()
            out.append({"name": name, "isa": isa, "supported": ok == "1"})
    return out


def matmul(p: fmt.Packed, x: np.ndarray, kernel: str = "", repack: bool = False, path: str | None = None) -> np.ndarray:
    """Y = W x through a C++ kernel ("" = the default one), for a packed tensor and x [cols] or
    [tokens, cols]. Activations are int8-quantized per group inside, exactly as the engine does."""
    ffi, lib = kernel_lib(path)
    fmt.validate(p)
    x = np.ascontiguousarray(np.atleast_2d(x), np.float32)
    if x.shape[1] != p.cols:
        raise KernelError(f"x has {x.shape[1]} columns, tensor has {p.cols}")
    y = np.zeros((x.shape[0], p.rows), np.float32)
    keep = []

    def ptr(suffix: str, ctype: str):
        a = p.parts.get(suffix)
        if a is None:
            return ffi.NULL
        a = np.ascontiguousarray(a)
        keep.append(a)
        return ffi.cast(ctype, a.ctypes.data)

    rc = lib.bbk_matmul(kernel.encode(), int(repack), p.rows, p.cols, p.n_planes, p.group, p.flags,
                        ptr("bbp", "uint8_t *"), ptr("bbs", "uint16_t *"), ptr("bbo", "uint16_t *"),
                        ptr("bbc", "uint8_t *"), ptr("bbe", "uint8_t *"), ptr("bbm", "uint8_t *"),
                        ptr("bbv", "uint8_t *"), ptr("bbz", "uint16_t *"), ptr("bbk", "uint16_t *"),
                        ffi.cast("float *", x.ctypes.data), x.shape[0], ffi.cast("float *", y.ctypes.data))
    if rc != 0:
        raise KernelError(_err(ffi, lib))
    return y if x.shape[0] > 1 else y[0]


# --- benchmark -----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _shape_list(spec: str) -> list[tuple[int, int]]:
    """A named shape set (SHAPES) or one explicit ROWSxCOLS."""
    if spec in SHAPES:
        return SHAPES[spec]
    try:
        rows, cols = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise KernelError(f"unknown shape {spec!r}: a set ({', '.join(SHAPES)}) or ROWSxCOLS") from None
    if rows < 1 or cols < 1:
        raise KernelError(f"shape {spec!r} must be positive")
    return [(rows, cols)]


def run(kernel_names: list[str] | None = None, planes=(1, 2, 3, 4), groups=(64, 128), shapes=("smollm2", "llama2-7b"),
        threads=(1, 2), tokens: int = 128, min_time: float = 0.2, bw_bytes: int = 256 << 20, flags: int = fmt.OFFSET,
        skip_slow_gemm: bool = True, path: str | None = None, log=print) -> dict:
    """Run the benchmark grid; returns the JSON-able result."""
    ffi, lib = kernel_lib(path)
    known = kernels(path)
    if kernel_names is None:
        kernel_names = [k["name"] for k in known if k["supported"]]
    else:
        by = {k["name"]: k for k in known}
        for n in kernel_names:
            if n not in by:
                raise KernelError(f"unknown kernel {n!r} (built: {', '.join(by)})")
            if not by[n]["supported"]:
                raise KernelError(f"kernel {n!r} is not supported by this CPU")
    meta = {
        "cpu_model": _cpu_model(), "machine": platform.machine(), "cpu_features": ffi.string(lib.bbk_cpu_features()).decode(),
        "os_cpus": os.cpu_count(), "threads": list(threads), "compiler": ffi.string(lib.bbk_compiler()).decode(),
        "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "default_kernel": (ffi.string(lib.bbk_default_kernel()).decode() if lib.bbk_default_kernel() != ffi.NULL else None),
        "tokens_gemm": tokens, "min_time_s": min_time, "flags": flags,
        "time_is": "best of repetitions (median also recorded)",
        "gops_is": "2*rows*cols*tokens / time (dense-equivalent)",
    }
    bandwidth = {}
    for th in threads:
        gbs = lib.bbk_read_bandwidth(bw_bytes, th, max(min_time, 0.1))
        if gbs < 0:
            raise KernelError(_err(ffi, lib))
        bandwidth[str(th)] = gbs
        log(f"read bandwidth, {th} thread(s): {gbs:.2f} GB/s ({bw_bytes >> 20} MiB buffer)")
    cases = []
    best, med, wbytes = ffi.new("double *"), ffi.new("double *"), ffi.new("double *")
    for shape_set in shapes:
        for rows, cols in _shape_list(shape_set):
            for name in kernel_names:
                for n in planes:
                    for g in groups:
                        for th in threads:
                            for ntok in (1, tokens):
                                # the scalar reference on a 7B-size GEMM takes minutes: skipped unless asked
                                if skip_slow_gemm and name == "scalar" and ntok > 1 and rows * cols > 1 << 20:
                                    continue
                                rc = lib.bbk_bench(name.encode(), rows, cols, n, g, flags, ntok, th, min_time, best, med, wbytes)
                                if rc != 0:
                                    raise KernelError(_err(ffi, lib))
                                t = best[0]
                                c = {"op": "gemv" if ntok == 1 else "gemm", "kernel": name, "shape": [rows, cols],
                                     "model": shape_set, "planes": n, "group": g, "threads": th, "tokens": ntok,
                                     "time_s": t, "median_s": med[0], "weight_bytes": wbytes[0],
                                     "weight_gbs": wbytes[0] / t / 1e9, "gops": 2.0 * rows * cols * ntok / t / 1e9}
                                c["pct_bandwidth"] = 100.0 * c["weight_gbs"] / bandwidth[str(th)]
                                cases.append(c)
                                log(_row(c))
    return {"meta": meta, "bandwidth_gbs": bandwidth, "cases": cases}


HEADER = f"{'op':4s} {'kernel':15s} {'shape':>11s} {'N':>1s} {'G':>4s} {'thr':>3s} {'time':>10s} {'GB/s':>6s} {'%bw':>5s} {'GOP/s':>7s}"


def _row(c: dict) -> str:
    t = c["time_s"]
    ts = f"{t * 1e6:8.1f}us" if t < 1e-2 else f"{t * 1e3:8.2f}ms"
    return (f"{c['op']:4s} {c['kernel']:15s} {c['shape'][0]:>5d}x{c['shape'][1]:<5d} {c['planes']:1d} {c['group']:4d} "
            f"{c['threads']:3d} {ts:>10s} {c['weight_gbs']:6.2f} {c['pct_bandwidth']:5.1f} {c['gops']:7.1f}")


def table(result: dict) -> str:
    lines = [f"cpu: {result['meta']['cpu_model']} ({result['meta']['cpu_features']})",
             f"compiler: {result['meta']['compiler']}  commit: {result['meta']['git_commit']}",
             "read bandwidth: " + ", ".join(f"{k} thr {v:.2f} GB/s" for k, v in result["bandwidth_gbs"].items()),
             HEADER]
    lines += [_row(c) for c in result["cases"]]
    return "\n".join(lines)


def main_kernels(args) -> int:
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    if args.smoke:   # CI: checks the output format in seconds, not the speed
        opts = dict(planes=(1,), groups=(128,), shapes=("smollm2",), threads=(1,), tokens=4, min_time=0.0,
                    bw_bytes=16 << 20)
    else:
        opts = dict(planes=ints(args.planes), groups=ints(args.groups), shapes=tuple(args.shapes.split(",")),
                    threads=ints(args.threads), tokens=args.tokens, min_time=args.min_time, flags=args.flags)
    for s in opts["shapes"]:
        _shape_list(s)   # fail before the bandwidth test
    names = args.kernels.split(",") if args.kernels else None
    quiet = args.quiet
    t0 = time.time()
    if not quiet:
        print(HEADER, flush=True)
    res = run(names, path=args.lib, log=(lambda *_: None) if quiet else (lambda s: print(s, flush=True)), **opts)
    res["meta"]["wall_s"] = time.time() - t0
    if quiet:
        print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0

"""Kernel benchmark (`bitbasis bench kernels`) and a Python handle on the C++ kernels.

The kernel entry points (`bbk_*`, cpp/src/kernels_capi.cpp) are test/benchmark hooks, not part of
the model API in bitbasis.h, so they are declared here and opened from the same library.

For every kernel × planes N × group size × shape × threads the benchmark times GEMV (one token) and
GEMM (a prompt of `--tokens` tokens) on a random weight, and reports per case: time (best of the
repetitions; the median is kept in the JSON), effective GB/s of weight bytes (every component
tensor), that as % of the STREAM-style read bandwidth measured in the same run with the same thread
count, and GOP/s = 2·rows·cols·tokens / time (dense-equivalent multiply-adds).

The kernels are reached either through cffi (this machine's library) or, for a cross-compiled build,
through a driver program speaking a line protocol (cpp/bench/bench_kernels.cpp, `--runner CMD`,
e.g. under qemu-aarch64; such results are labelled emulated and `bench compare` refuses them).
`compare` merges the JSON of several machines into one table; `plot_*` draw PNGs (matplotlib, Agg).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import format as fmt


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
    from ._native import _cdef_from_header, _header_text
    ffi = FFI()
    ffi.cdef(_cdef_from_header(_header_text("bitbasis_kernels.h")))
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


def hadamard(x: np.ndarray, block: int, seed: int, kernel: str = "", path: str | None = None) -> np.ndarray:
    """H·x for each row of x (float32) through a C++ kernel's online rotation (kernels.h hadamard_f32), the engine's
    counterpart of rotate.online_transform."""
    ffi, lib = kernel_lib(path)
    y = np.array(np.atleast_2d(x), np.float32, order="C")
    if lib.bbk_hadamard(kernel.encode(), ffi.cast("float *", y.ctypes.data), y.shape[0], y.shape[1], block, seed) != 0:
        raise KernelError(_err(ffi, lib))
    return y.reshape(np.shape(x))


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


# --- where the kernels run: this process (cffi) or a driver program (--runner) -------------------

KIND_KERNELS, KIND_E2E = "bitbasis-bench-kernels", "bitbasis-bench-e2e"
VERSION = 2   # of the kernels JSON; files without "kind"/"version" (written before them) are version 1.
# 2: cases carry "copies" (tensor copies cycled through so the weights come from memory, not the cache);
# version 1 timed one cache-hot copy.
EMULATED_NOTE = "emulated (qemu) — timings not comparable"


class _Native:
    """The bbk_* entry points of a library loaded into this process."""
    emulated = None

    def __init__(self, path: str | None):
        if path is None:
            from ._native import _library_path
            path = str(_library_path())
        self.path = os.path.abspath(path)
        self.ffi, self.lib = kernel_lib(path)
        self._out = [self.ffi.new("double *") for _ in range(3)] + [self.ffi.new("int *")]

    def _s(self, p) -> str:
        return self.ffi.string(p).decode()

    def kernels(self) -> str:
        return self._s(self.lib.bbk_kernels())

    def default_kernel(self) -> str | None:
        k = self.lib.bbk_default_kernel()
        return None if k == self.ffi.NULL else self._s(k)

    def features(self) -> str:
        return self._s(self.lib.bbk_cpu_features())

    def compiler(self) -> str:
        return self._s(self.lib.bbk_compiler())

    def machine(self) -> str:
        return platform.machine()

    def cpu_model(self) -> str:
        return _cpu_model()

    def auto_footprint(self) -> int:
        return int(self.lib.bbk_auto_footprint())

    def bandwidth(self, nbytes: int, threads: int, min_s: float) -> float:
        gbs = self.lib.bbk_read_bandwidth(nbytes, threads, min_s)
        if gbs < 0:
            raise KernelError(_err(self.ffi, self.lib))
        return gbs

    def bench(self, name, rows, cols, n, g, flags, ntok, threads, min_s, footprint) -> tuple[float, float, float, int]:
        best, med, wbytes, copies = self._out
        if self.lib.bbk_bench(name.encode(), rows, cols, n, g, flags, ntok, threads, min_s, footprint,
                              best, med, wbytes, copies) != 0:
            raise KernelError(_err(self.ffi, self.lib))
        return best[0], med[0], wbytes[0], copies[0]

    def close(self):
        pass


class _Runner:
    """The same entry points in another program (cpp/bench/bench_kernels.cpp), one request per line.
    A command starting with qemu-* is emulation: its timings are labelled as such."""

    def __init__(self, command: str):
        self.argv = shlex.split(command)
        if not self.argv:
            raise KernelError("--runner: empty command")
        tool = os.path.basename(self.argv[0])
        self.emulated = "qemu" if tool.startswith("qemu") else None
        self._err = tempfile.TemporaryFile(mode="w+")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                         text=True, bufsize=1)
        except OSError as e:
            raise KernelError(f"--runner {command!r}: {e.strerror or e}") from None

    def _ask(self, request: str) -> str:
        try:
            self.proc.stdin.write(request + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=10)
            self._err.seek(0)
            tail = self._err.read().strip().splitlines()[-1:] or ["no output"]
            raise KernelError(f"runner {' '.join(self.argv)!r} exited ({self.proc.returncode}): {tail[0]}")
        status, _, value = line.rstrip("\n").partition("\t")
        if status == "err":
            raise KernelError(value)
        if status != "ok":
            raise KernelError(f"runner {' '.join(self.argv)!r}: unexpected reply {line.strip()[:80]!r} "
                              "(not a bench_kernels program?)")
        return value

    def kernels(self) -> str:
        return self._ask("kernels")

    def default_kernel(self) -> str | None:
        try:
            return self._ask("default")
        except KernelError:
            return None

    def features(self) -> str:
        return self._ask("features")

    def compiler(self) -> str:
        return self._ask("compiler")

    def machine(self) -> str:
        return self._ask("machine")

    def cpu_model(self) -> str:
        if not self.emulated:
            return _cpu_model()
        cpu = self.argv[self.argv.index("-cpu") + 1] if "-cpu" in self.argv[:-1] else "default"
        return f"{self.machine()} under {os.path.basename(self.argv[0])} -cpu {cpu} on {_cpu_model()}"

    def auto_footprint(self) -> None:   # not in the line protocol; the cases record their copies
        return None

    def bandwidth(self, nbytes: int, threads: int, min_s: float) -> float:
        return float(self._ask(f"bandwidth {nbytes} {threads} {min_s!r}"))

    def bench(self, name, rows, cols, n, g, flags, ntok, threads, min_s, footprint) -> tuple[float, float, float, int]:
        best, med, wbytes, copies = self._ask(
            f"bench {name} {rows} {cols} {n} {g} {flags} {ntok} {threads} {min_s!r} {footprint}").split()
        return float(best), float(med), float(wbytes), int(copies)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._err.close()


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


def _dirty_sources() -> list[str] | None:
    """Tracked files under cpp/ (and CMakeLists.txt) that differ from the commit: the library timed
    may not be the commit's when this is not empty."""
    try:
        root = Path(__file__).resolve().parents[2]
        r = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "cpp",
                            "CMakeLists.txt"], capture_output=True, text=True, timeout=10)
        return [ln[3:] for ln in r.stdout.splitlines()] if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


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
        skip_slow_gemm: bool = True, path: str | None = None, log=print, groups_n1=None, ops=("gemv", "gemm"),
        runner: str | None = None, checkpoint=None, footprint: int = -1) -> dict:
    """Run the benchmark grid; returns the JSON-able result. groups_n1: the group sizes for N = 1
    (default: `groups`). runner: a bench_kernels command line instead of the library at `path`.
    footprint: bytes of tensor copies each case cycles through (-1: 4x the L3 cache, at most 512 MiB; 0: one cache-hot copy).
    checkpoint(result so far) is called after every case (meta.complete is False until the end)."""
    if not set(ops) <= {"gemv", "gemm"} or not ops:
        raise KernelError(f"ops {','.join(ops)!r}: expected gemv and/or gemm")
    be = _Runner(runner) if runner else _Native(path)
    try:
        return _run(be, kernel_names, planes, groups, shapes, threads, tokens, min_time, bw_bytes, flags,
                    skip_slow_gemm, log, groups_n1 or groups, ops, checkpoint, footprint)
    finally:
        be.close()


def _run(be, kernel_names, planes, groups, shapes, threads, tokens, min_time, bw_bytes, flags, skip_slow_gemm, log,
         groups_n1, ops, checkpoint=None, footprint=-1) -> dict:
    known = []
    for item in be.kernels().split(";"):
        if item:
            name, isa, ok = item.split()
            known.append({"name": name, "isa": isa, "supported": ok == "1"})
    if kernel_names is None:
        kernel_names = [k["name"] for k in known if k["supported"]]
    else:
        by = {k["name"]: k for k in known}
        for n in kernel_names:
            if n not in by:
                raise KernelError(f"unknown kernel {n!r} (built: {', '.join(by)})")
            if not by[n]["supported"]:
                raise KernelError(f"kernel {n!r} is not supported by this CPU")
    isa = {k["name"]: k["isa"] for k in known}
    meta = {
        "cpu_model": be.cpu_model(), "machine": be.machine(), "cpu_features": be.features(),
        "os_cpus": os.cpu_count(), "threads": list(threads), "compiler": be.compiler(),
        "git_commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "default_kernel": be.default_kernel(), "kernel_isa": {n: isa[n] for n in kernel_names},
        "tokens_gemm": tokens, "min_time_s": min_time, "flags": flags, "loadavg_start": _loadavg(),
        "footprint_bytes": footprint, "auto_footprint_bytes": be.auto_footprint(),
        "cache_is": ("cold: each call uses the next of `copies` tensor copies (footprint_bytes; -1 = 4x L3, at most 512 MiB)"
                     if footprint else "hot: one tensor copy, timed repeatedly (may sit in the cache)"),
        "time_is": "best of repetitions (median also recorded)",
        "gops_is": "2*rows*cols*tokens / time (dense-equivalent)",
        "emulated": be.emulated, "runner": " ".join(be.argv) if isinstance(be, _Runner) else None,
        "library": getattr(be, "path", None), "dirty_sources": _dirty_sources(),
    }
    if be.emulated:
        meta["timing_note"] = EMULATED_NOTE
        log(f"*** {EMULATED_NOTE} ***")
    notes = []
    meta["notes"], meta["complete"] = notes, False
    bandwidth = {}
    res = {"kind": KIND_KERNELS, "version": VERSION, "meta": meta, "bandwidth_gbs": bandwidth, "cases": []}
    cases = res["cases"]
    for th in threads:
        gbs = be.bandwidth(bw_bytes, th, max(min_time, 0.1))
        bandwidth[str(th)] = gbs
        log(f"read bandwidth, {th} thread(s): {gbs:.2f} GB/s ({bw_bytes >> 20} MiB buffer)")
    log(HEADER)
    for shape_set in shapes:
        for rows, cols in _shape_list(shape_set):
            for name in kernel_names:
                for n in planes:
                    for g in (groups_n1 if n == 1 else groups):
                        for th in threads:
                            for ntok in [t for op, t in (("gemv", 1), ("gemm", tokens)) if op in ops]:
                                # the scalar reference on a 7B-size GEMM takes minutes: skipped unless asked
                                if skip_slow_gemm and name == "scalar" and ntok > 1 and rows * cols > 1 << 20:
                                    _note(notes, "scalar GEMM above 1M weights skipped (minutes per case)")
                                    continue
                                # "<k>-rows" has <k>'s gemv (kernels.h): timed once, under <k>
                                if ntok == 1 and name.endswith("-rows") and name[:-5] in kernel_names:
                                    _note(notes, "GEMV of <k>-rows kernels not timed: it is <k>'s GEMV")
                                    continue
                                t, med, wbytes, copies = be.bench(name, rows, cols, n, g, flags, ntok, th, min_time,
                                                                  footprint)
                                c = {"op": "gemv" if ntok == 1 else "gemm", "kernel": name, "shape": [rows, cols],
                                     "model": shape_set, "planes": n, "group": g, "threads": th, "tokens": ntok,
                                     "time_s": t, "median_s": med, "weight_bytes": wbytes, "copies": copies,
                                     "weight_gbs": wbytes / t / 1e9, "gops": 2.0 * rows * cols * ntok / t / 1e9}
                                c["pct_bandwidth"] = 100.0 * c["weight_gbs"] / bandwidth[str(th)]
                                cases.append(c)
                                log(_row(c))
                                if checkpoint:
                                    checkpoint(res)
    meta["loadavg_end"] = _loadavg()
    meta["complete"] = True
    return res


def _note(notes: list, s: str) -> None:
    if s not in notes:
        notes.append(s)


HEADER = (f"{'op':4s} {'kernel':19s} {'shape':>11s} {'N':>1s} {'G':>4s} {'thr':>3s} {'time':>10s} {'GB/s':>6s} "
          f"{'%bw':>5s} {'GOP/s':>7s}")


def _row(c: dict) -> str:
    t = c["time_s"]
    ts = f"{t * 1e6:8.1f}us" if t < 1e-2 else f"{t * 1e3:8.2f}ms"
    return (f"{c['op']:4s} {c['kernel']:19s} {c['shape'][0]:>5d}x{c['shape'][1]:<5d} {c['planes']:1d} {c['group']:4d} "
            f"{c['threads']:3d} {ts:>10s} {c['weight_gbs']:6.2f} {c['pct_bandwidth']:5.1f} {c['gops']:7.1f}")


def table(result: dict) -> str:
    m = result["meta"]
    note = [f"*** {m['timing_note']} ***"] if m.get("emulated") else []
    lines = note + [f"cpu: {m['cpu_model']} ({m['cpu_features']})",
                    f"compiler: {m['compiler']}  commit: {m['git_commit']}",
                    "read bandwidth: " + ", ".join(f"{k} thr {v:.2f} GB/s" for k, v in result["bandwidth_gbs"].items()),
                    HEADER]
    lines += [_row(c) for c in result["cases"]]
    lines += [f"note: {s}" for s in m.get("notes", [])] + note
    return "\n".join(lines)


def main_kernels(args) -> int:
    def ints(s):
        try:
            return tuple(int(v) for v in s.split(","))
        except ValueError:
            raise KernelError(f"{s!r}: expected comma-separated integers") from None
    if args.smoke:   # CI: checks the output format in seconds, not the speed
        opts = dict(planes=(1,), groups=(128,), shapes=("smollm2",), threads=(1,), tokens=4, min_time=0.0,
                    bw_bytes=16 << 20, footprint=1 << 20)
    else:
        opts = dict(planes=ints(args.planes), groups=ints(args.groups), shapes=tuple(args.shapes.split(",")),
                    threads=ints(args.threads), tokens=args.tokens, min_time=args.min_time, flags=args.flags,
                    groups_n1=ints(args.groups_n1) if args.groups_n1 else None, ops=tuple(args.ops.split(",")))
        if args.footprint_mib is not None:
            if args.footprint_mib < 0:
                raise KernelError(f"--footprint-mib {args.footprint_mib}: must be >= 0")
            opts["footprint"] = int(args.footprint_mib * (1 << 20))
    for s in opts["shapes"]:
        _shape_list(s)   # fail before the bandwidth test
    if args.plot:
        _pyplot()        # fail before the run when matplotlib is missing
    names = args.kernels.split(",") if args.kernels else None
    quiet = args.quiet
    t0 = time.time()

    def save(res):   # after every case, so an interrupted run keeps what it measured (meta.complete false)
        res["meta"]["wall_s"] = time.time() - t0
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, args.json)
    res = run(names, path=args.lib, runner=args.runner, checkpoint=save if args.json else None,
              log=(lambda *_: None) if quiet else (lambda s: print(s, flush=True)), **opts)
    res["meta"]["wall_s"] = time.time() - t0
    if quiet:
        print(table(res))
    elif res["meta"].get("emulated"):
        print(f"*** {EMULATED_NOTE} ***")
    if args.json:
        save(res)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_kernels(res, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


# --- reading results back, comparing machines -----------------------------------------------------

def load_result(path: str, allow_emulated: bool = False) -> tuple[str, dict]:
    """(kind, result) of a `bench kernels` or `bench e2e` JSON; ValueError naming the file otherwise."""
    try:
        res = json.loads(Path(path).read_text())
    except OSError as e:
        raise KernelError(f"{path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KernelError(f"{path}: not JSON ({e})") from None
    if not isinstance(res, dict) or not isinstance(res.get("meta"), dict):
        raise KernelError(f"{path}: not a bitbasis bench result (no meta)")
    kind = res.get("kind")
    if kind is None:   # written before "kind" existed: tell the two apart by their keys
        if isinstance(res.get("cases"), list) and isinstance(res.get("bandwidth_gbs"), dict):
            kind = KIND_KERNELS
        elif isinstance(res.get("summary"), list) and isinstance(res.get("runs"), list):
            kind = KIND_E2E
        else:
            raise KernelError(f"{path}: not a bitbasis bench result (neither kernel cases nor e2e summary)")
    if kind not in (KIND_KERNELS, KIND_E2E):
        raise KernelError(f"{path}: unknown result kind {kind!r} (expected {KIND_KERNELS} or {KIND_E2E})")
    version = res.get("version", 1)
    if not isinstance(version, int) or version < 1 or version > VERSION:
        raise KernelError(f"{path}: {kind} version {version!r}; this bitbasis reads version {VERSION}")
    if res["meta"].get("emulated") and not allow_emulated:
        raise KernelError(f"{path}: {res['meta'].get('timing_note', EMULATED_NOTE)}; refusing to compare it")
    need = ("cases", "bandwidth_gbs") if kind == KIND_KERNELS else ("summary",)
    for key in need:
        if key not in res:
            raise KernelError(f"{path}: {kind} result without {key!r}")
    return kind, res


def _machine_line(label: str, path: str, res: dict) -> str:
    m = res["meta"]
    if "bandwidth_gbs" in res:
        bw = ", ".join(f"{k} thr {v:.1f} GB/s" for k, v in res["bandwidth_gbs"].items())
        isa = m.get("cpu_features", "?")
    else:
        bw, isa = "", m.get("cpu_flags", "?")
    threads = ",".join(str(t) for t in m.get("threads", []))
    partial = " (INCOMPLETE run)" if m.get("complete") is False else ""
    if "bandwidth_gbs" in res and (res.get("version", 1) < 2 or not m.get("footprint_bytes")):
        partial += " (cache-hot timing: one tensor copy)"
    return (f"{label}{partial}: {m.get('cpu_model', '?')} | ISA {isa} | threads {threads}" + (f" | read {bw}" if bw else "")
            + (f" | {m['compiler']}" if m.get("compiler") else "")
            + f" | commit {m.get('git_commit', '?')} {m.get('date', '')} ({Path(path).name})")


KERNEL_METRICS = {"gops": "GOP/s", "gbs": "weight GB/s", "pct": "% of read bandwidth", "us": "time (us)"}
E2E_METRICS = {"decode": "decode tok/s", "prompt": "prompt tok/s"}


def _kernel_value(c: dict, metric: str) -> float:
    return {"gops": c["gops"], "gbs": c["weight_gbs"], "pct": c["pct_bandwidth"], "us": c["time_s"] * 1e6}[metric]


def _best_cases(res: dict, per_kernel: bool) -> dict:
    """{case key: case}; without per_kernel the fastest kernel of the machine per case."""
    out = {}
    for c in res["cases"]:
        key = (c.get("model", ""), c["op"], c["tokens"], tuple(c["shape"]), c["planes"], c["group"], c["threads"])
        if per_kernel:
            key += (c["kernel"],)
        if key not in out or c["time_s"] < out[key]["time_s"]:
            out[key] = c
    return out


def compare(paths: list[str], metric: str | None = None, per_kernel: bool = False) -> tuple[str, dict]:
    """Merge results of several machines: (table text, {"kind", "machines", "rows"}). Rows = cases,
    columns = machines; x columns = speed relative to the first machine (its time / this time)."""
    if not paths:
        raise KernelError("compare: no files")
    loaded = [load_result(p) for p in paths]
    kinds = {k for k, _ in loaded}
    if len(kinds) > 1:
        which = ", ".join(f"{Path(p).name}: {'kernels' if k == KIND_KERNELS else 'e2e'}"
                          for p, (k, _) in zip(paths, loaded))
        raise KernelError(f"compare: mixed result kinds ({which}); compare files of one kind")
    kind = kinds.pop()
    metrics = KERNEL_METRICS if kind == KIND_KERNELS else E2E_METRICS
    metric = metric or next(iter(metrics))
    if metric not in metrics:
        raise KernelError(f"compare: metric {metric!r} is not one of {', '.join(metrics)} for "
                          f"{'kernel' if kind == KIND_KERNELS else 'e2e'} results")
    labels = [f"M{i + 1}" for i in range(len(paths))]
    machines = [{"label": lab, "file": str(p), "cpu_model": r["meta"].get("cpu_model"),
                 "isa": r["meta"].get("cpu_features", r["meta"].get("cpu_flags")),
                 "threads": r["meta"].get("threads"), "git_commit": r["meta"].get("git_commit"),
                 "bandwidth_gbs": r.get("bandwidth_gbs")} for lab, p, (_, r) in zip(labels, paths, loaded)]
    head = [_machine_line(lab, p, r) for lab, p, (_, r) in zip(labels, paths, loaded)]
    rows = []
    if kind == KIND_KERNELS:
        per = [_best_cases(r, per_kernel) for _, r in loaded]
        order = {}   # shapes and sets in the order the grid ran them
        for d in per:
            for k in d:
                order.setdefault(k[0], len(order))
                order.setdefault(k[3], len(order))
        keys = sorted({k for d in per for k in d},
                      key=lambda k: (order[k[0]], k[1] != "gemv", k[2], order[k[3]], k[4:]))
        for key in keys:
            cells = [d.get(key) for d in per]
            op = key[1] if key[1] == "gemv" else f"{key[1]}{key[2]}"   # gemm128: GEMM of 128 tokens
            name = f"{op} {key[0]} {key[3][0]}x{key[3][1]} N{key[4]} G{key[5]} t{key[6]}"
            if per_kernel:
                name += f" {key[7]}"
            rows.append({"case": name, "values": [_kernel_value(c, metric) if c else None for c in cells],
                         "times": [c["time_s"] if c else None for c in cells],
                         "kernels": [c["kernel"] if c else None for c in cells]})
        head.append(f"values: {metrics[metric]}" + ("" if per_kernel else "; fastest kernel of each machine named"))
    else:
        keys, per = [], []
        for _, r in loaded:
            d = {}
            for s in r["summary"]:
                key = (s.get("label") or f"{s['engine']}:{Path(s['model']).name}", s["threads"])
                d[key] = s
                if key not in keys:
                    keys.append(key)
            per.append(d)
        for key in keys:
            cells = [d.get(key) for d in per]
            vals = [c.get(f"{metric}_tok_s") if c else None for c in cells]
            rows.append({"case": f"{key[0]} t{key[1]}", "values": vals,
                         "times": [1.0 / v if v else None for v in vals], "kernels": [None] * len(cells)})
        head.append(f"values: {metrics[metric]} (medians)")
    head.append("xMi = speed relative to M1 (M1's time / Mi's time)" if len(paths) > 1 else "")
    text = "\n".join([h for h in head if h] + _format_rows(rows, labels))
    return text, {"kind": kind, "metric": metric, "machines": machines, "rows": rows}


def _format_rows(rows: list[dict], labels: list[str]) -> list[str]:
    def cell(v, k):
        if v is None:
            return "-"
        s = f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3g}"
        return f"{s} {k}" if k else s
    cells = [[cell(v, k) for v, k in zip(r["values"], r["kernels"])] for r in rows]
    ratios = [[f"{r['times'][0] / t:.2f}" if r["times"][0] and t else "-" for t in r["times"][1:]] for r in rows]
    w0 = max([len("case")] + [len(r["case"]) for r in rows])
    ws = [max([len(lab)] + [len(c[i]) for c in cells]) for i, lab in enumerate(labels)]
    rl = [f"x{lab}" for lab in labels[1:]]
    out = [f"{'case':{w0}s}  " + "  ".join(f"{lab:>{w}s}" for lab, w in zip(labels, ws))
           + "".join(f"  {r:>6s}" for r in rl)]
    for r, c, x in zip(rows, cells, ratios):
        out.append(f"{r['case']:{w0}s}  " + "  ".join(f"{v:>{w}s}" for v, w in zip(c, ws))
                   + "".join(f"  {v:>6s}" for v in x))
    return out


def main_compare(args) -> int:
    if args.plot:
        _pyplot()
    text, merged = compare(args.files, args.metric, args.per_kernel)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(merged, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        results = [load_result(p)[1] for p in args.files]
        loaded = [(f"M{i + 1} {r['meta'].get('cpu_model', '')}"[:48], r) for i, r in enumerate(results)]
        if merged["kind"] == KIND_KERNELS:
            plot_kernels_compare(loaded, args.plot)
        else:
            plot_e2e_compare(loaded, args.plot, merged["metric"])
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main_plot(args) -> int:
    """`bench plot RESULT.json OUT.png`: the --plot of a saved (or interrupted) kernel run."""
    _pyplot()
    kind, res = load_result(args.file, allow_emulated=True)
    if kind != KIND_KERNELS:
        raise KernelError(f"{args.file}: an e2e result; `bench plot` draws kernel results (see bench compare --plot)")
    plot_kernels(res, args.output)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# --- plots ------------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")   # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _panels(cases: list[dict]) -> list[tuple]:
    """(shape set, op, tokens, threads) in a stable order: one panel each."""
    seen = []
    for c in cases:
        k = (c.get("model", ""), c["op"], c["tokens"], c["threads"])
        if k not in seen:
            seen.append(k)
    return sorted(seen, key=lambda k: (k[0], k[1] != "gemv", k[2], k[3]))


def _aggregate(cases: list[dict], bandwidth: dict | None) -> float | None:
    """Throughput over the shapes of a panel as if run one after another (a layer's worth): total
    work / total time, GOP/s; or with `bandwidth` the total bytes / total time as % of it."""
    if not cases:
        return None
    t = sum(c["time_s"] for c in cases)
    if bandwidth is not None:
        return 100.0 * sum(c["weight_bytes"] for c in cases) / t / 1e9 / bandwidth[str(cases[0]["threads"])]
    return sum(2.0 * c["shape"][0] * c["shape"][1] * c["tokens"] for c in cases) / t / 1e9


def _draw(series_of_panel, panels, path: str, title: str, ylabel_of) -> dict:
    """series_of_panel(panel) -> {series label: {N: value}}; one subplot per panel, N on x.
    Returns {panel: series} (what was drawn)."""
    plt = _pyplot()
    sets = sorted({p[0] for p in panels}, key=lambda s: [p[0] for p in panels].index(s))
    cols_of = {s: [p for p in panels if p[0] == s] for s in sets}
    ncol = max(len(v) for v in cols_of.values())
    fig, axes = plt.subplots(len(sets), ncol, figsize=(3.6 * ncol, 3.0 * len(sets)), squeeze=False)
    styles, drawn = {}, {}
    for i, s in enumerate(sets):
        for j in range(ncol):
            ax = axes[i][j]
            if j >= len(cols_of[s]):
                ax.axis("off")
                continue
            panel = cols_of[s][j]
            xs_all = set()
            drawn[panel] = series_of_panel(panel)
            for label, pts in drawn[panel].items():
                if label not in styles:
                    i_style = len(styles)
                    styles[label] = dict(color=f"C{i_style % 10}", marker="os^vD<>ph*"[i_style % 10],   # same in every panel
                                         linestyle=("-", "--", ":", "-.")[i_style // 10 % 4])
                xs = sorted(x for x in pts if pts[x] is not None)
                xs_all.update(xs)
                ax.plot(xs, [pts[x] for x in xs], label=label, **styles[label])
            op = panel[1] if panel[1] == "gemv" else f"gemm {panel[2]} tok"
            ax.set_title(f"{s} · {op} · {panel[3]} thr", fontsize=9)
            ax.set_xlabel("N (planes)", fontsize=8)
            ax.set_ylabel(ylabel_of(panel), fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.set_xticks(sorted(xs_all))
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(labels) + 3) // 4), 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return drawn


def plot_kernels(res: dict, path: str) -> dict:
    """Throughput vs N per kernel (and group size): GEMV as % of the measured read bandwidth (it
    streams the weight), GEMM as GOP/s; each point totals the shapes of its set."""
    cases = res["cases"]
    if not cases:
        raise KernelError("plot: no cases")
    groups = sorted({c["group"] for c in cases})

    def series(panel):
        out = {}
        for c in cases:
            if (c.get("model", ""), c["op"], c["tokens"], c["threads"]) != panel:
                continue
            label = c["kernel"] + (f" G{c['group']}" if len(groups) > 1 else "")
            out.setdefault(label, {}).setdefault(c["planes"], []).append(c)
        bw = res["bandwidth_gbs"] if panel[1] == "gemv" else None
        return {lab: {n: _aggregate(cs, bw) for n, cs in pts.items()} for lab, pts in out.items()}

    m = res["meta"]
    title = f"{m.get('cpu_model', '?')} — {m.get('git_commit', '')} {m.get('date', '')[:10]}"
    if m.get("emulated"):
        title = f"{m.get('timing_note', EMULATED_NOTE)} — {title}"
    if m.get("complete") is False:
        title += " (incomplete run)"
    return _draw(series, _panels(cases), path, title,
          lambda p: "% of read bandwidth" if p[1] == "gemv" else "GOP/s (dense-equivalent)")


def plot_kernels_compare(loaded: list[tuple[str, dict]], path: str) -> dict:
    """Several machines: the fastest kernel of each per case, GOP/s vs N (bandwidths differ)."""
    allc = [c for _, r in loaded for c in r["cases"]]
    best = [(lab, _best_cases(r, per_kernel=False)) for lab, r in loaded]

    def series(panel):
        out = {}
        for lab, d in best:
            groups = sorted({k[5] for k in d})
            for key, c in d.items():
                if (key[0], key[1], key[2], key[6]) != panel:
                    continue
                name = lab + (f" G{key[5]}" if len(groups) > 1 else "")
                out.setdefault(name, {}).setdefault(key[4], []).append(c)
        return {lab: {n: _aggregate(cs, None) for n, cs in pts.items()} for lab, pts in out.items()}

    return _draw(series, _panels(allc), path, "bench compare: fastest kernel per machine",
                 lambda p: "GOP/s (dense-equivalent)")


def plot_e2e_compare(loaded: list[tuple[str, dict]], path: str, metric: str) -> None:
    plt = _pyplot()
    keys = []
    for _, r in loaded:
        for s in r["summary"]:
            k = (s.get("label") or s["model"], s["threads"])
            if k not in keys:
                keys.append(k)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(keys) * len(loaded) / 2), 3.6))
    width = 0.8 / len(loaded)
    for i, (lab, r) in enumerate(loaded):
        d = {(s.get("label") or s["model"], s["threads"]): s.get(f"{metric}_tok_s") or 0.0 for s in r["summary"]}
        ax.bar([x + i * width for x in range(len(keys))], [d.get(k, 0.0) for k in keys], width, label=lab)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"{k[0]} t{k[1]}" for k in keys], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(E2E_METRICS[metric])
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

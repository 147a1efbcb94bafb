"""The C++ kernels: every SIMD path equals the scalar reference (cpp/tests/test_kernels.cpp, built
here with cmake), the scalar reference equals the Python dequantizer (format.dequantize) on tensors
written by the Python packer, and the NEON kernels pass the same C++ test under qemu."""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bitbasis import format as fmt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def kbuild() -> Path:
    """A cmake build of libbitbasis + test_kernels inside this checkout (a cmake cache is tied to its source
    directory, so a build shared between clones breaks); reruns are incremental. Not under build/, where
    an editable install looks for its library."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    d = ROOT / ".kernel-test-build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(d), "-DCMAKE_BUILD_TYPE=Release", "-DBITBASIS_TESTS=ON"],
                ["cmake", "--build", str(d), "--target", "bitbasis", "test_kernels", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return d


@pytest.fixture(scope="session")
def klib(kbuild) -> str:
    return str(kbuild / "libbitbasis.so")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_cpp_kernels_equal_scalar(kbuild):
    r = subprocess.run([str(kbuild / "test_kernels")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    m = re.search(r"(\d+) checks, (\d+) failed", r.stdout)
    assert m and int(m.group(1)) > 1000 and m.group(2) == "0", r.stdout[-2000:]
    # the SIMD kernels this CPU supports were compiled in and ran (not silently skipped)
    listed = re.search(r"kernels: (.*)", r.stdout).group(1).split()
    flags = _cpu_flags()
    if "avx512_vpopcntdq" in flags:
        assert "avx512-vpopcnt" in listed
    if "avx512_vnni" in flags:
        assert "avx512-vnni" in listed
    if "avx2" in flags and "fma" in flags:
        assert "avx2-bytemask" in listed


# --- scalar reference vs the Python dequantizer ----------------------------------------------------

def random_bb(rng, rows: int, cols: int, n: int, group: int, flags: int) -> fmt.BinaryBasis:
    """A random tensor with the given flags, as a quantizer would hand it to the packer."""
    ng = fmt.n_groups(cols, group)
    c = 1 + bool(flags & fmt.COLMASK) + bool(flags & fmt.ELEMCLASS)
    s = 1 if flags & fmt.POW2 else n
    kw = {}
    if flags & fmt.OFFSET:
        kw["offsets"] = rng.normal(0, 0.02, (rows, ng, c)).astype(np.float32)
    if flags & fmt.COLMASK:
        kw["colmask"] = rng.random(cols) < 0.2
    if flags & fmt.ELEMCLASS:
        kw["elemclass"] = rng.random((rows, cols)) < 0.3
    if flags & fmt.SPARSE:
        m = rng.random((rows, cols)) < 0.03
        kw.update(sparse_mask=m, sparse_codes=rng.integers(0, 256, int(m.sum()), dtype=np.uint8),
                  sparse_zs=np.stack([rng.uniform(0.005, 0.02, rows), rng.uniform(-1.5, -0.5, rows)], 1).astype(np.float32))
    if flags & fmt.COLSCALE:
        kw["colscale"] = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    scales = (rng.uniform(0.01, 0.1, (rows, ng, c, s)) * rng.choice([-1, 1], (rows, ng, c, s))).astype(np.float32)
    return fmt.BinaryBasis(signs=rng.random((n, rows, cols)) < 0.5, scales=scales, group=group,
                           pow2=bool(flags & fmt.POW2), **kw)


QK = 32   # activation block of the engine (kernels.h)


def kernel_semantics(bb: fmt.BinaryBasis, x: np.ndarray) -> np.ndarray:
    """What every kernel computes (kernels.h), from format.dequantize: activations (times the column
    scale) int8-quantized per block of QK = 32 columns, d = max|x|/127, q = round(x/d); dense elements
    multiply d·q, sparse elements multiply the raw x."""
    rows, cols = bb.shape
    g = bb.group
    ng = fmt.n_groups(cols, g)
    k = np.ones(cols, np.float32) if bb.colscale is None else np.asarray(bb.colscale, np.float32)
    xs = np.zeros(ng * g, np.float32)
    xs[:cols] = x.astype(np.float32) * k
    xq = np.zeros(ng * g, np.float64)
    for i in range(ng * g // QK):
        v = xs[i * QK:(i + 1) * QK]
        amax = np.float32(np.abs(v).max())
        if amax > 0:
            q = np.clip(np.rint(v * (np.float32(127.0) / amax)), -127, 127)
            xq[i * QK:(i + 1) * QK] = np.float64(amax / np.float32(127.0)) * q
    dense = fmt.dequantize(dataclasses.replace(bb, colscale=None, sparse_mask=None, sparse_codes=None, sparse_zs=None))
    sp = np.zeros((rows, cols), bool) if bb.sparse_mask is None else np.asarray(bb.sparse_mask, bool)
    w = fmt.dequantize(bb).astype(np.float64)
    return np.where(sp, 0.0, dense.astype(np.float64)) @ xq[:cols] + np.where(sp, w, 0.0) @ x.astype(np.float64)


def _close(got, ref, tol):
    scale = np.abs(ref).mean() + 1e-30
    err = np.abs(got - ref) / (np.abs(ref) + scale)
    return err.max(), err.max() <= tol


ALL_FLAGS = [0, fmt.OFFSET, fmt.POW2, fmt.OFFSET | fmt.POW2, fmt.COLMASK, fmt.ELEMCLASS, fmt.COLMASK | fmt.ELEMCLASS,
             fmt.SPARSE, fmt.COLSCALE, fmt.SPARSE | fmt.COLSCALE | fmt.OFFSET, 63]


@pytest.mark.parametrize("flags", ALL_FLAGS)
def test_scalar_matches_python_dequantize(klib, flags):
    from bitbasis import bench
    rng = np.random.default_rng(flags + 1)
    for rows, cols, n, g in ((7, 200, 1, 64), (13, 333, 3, 128), (5, 130, 8, 192)):
        bb = fmt.round_trip(random_bb(rng, rows, cols, n, g, flags))
        p = fmt.pack(bb)
        x = rng.normal(size=(2, cols)).astype(np.float32)
        ref = np.stack([kernel_semantics(bb, xi) for xi in x])
        for kern in ["scalar"] + [k["name"] for k in bench.kernels(klib) if k["supported"] and k["name"] != "scalar"]:
            for repack in (False, True):   # on-disk layout, and the kernel's load-time repack
                y = bench.matmul(p, x, kernel=kern, repack=repack, path=klib)
                err, ok = _close(y, ref, 1e-5)
                assert ok, f"{kern} repack={repack} [{rows}x{cols}] N={n} G={g} flags={flags}: rel err {err:.3g}"
        # and the quantized product is close to the float one (activation quantization error only)
        err, ok = _close(bench.matmul(p, x[0], kernel="scalar", path=klib), fmt.dequantize(bb) @ x[0], 0.05)
        assert ok, f"int8 activations too far from float: {err:.3g}"


def test_matmul_bad_input_is_value_error(klib):
    from bitbasis import bench
    rng = np.random.default_rng(0)
    p = fmt.pack(random_bb(rng, 4, 64, 1, 64, 0))
    with pytest.raises(ValueError, match="columns"):
        bench.matmul(p, np.zeros(63, np.float32), path=klib)
    with pytest.raises(ValueError, match="unknown kernel"):
        bench.matmul(p, np.zeros(64, np.float32), kernel="no-such-kernel", path=klib)


# --- NEON under qemu ---------------------------------------------------------------------------------

def test_neon_under_qemu(tmp_path):
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user)")
    if not Path("/usr/aarch64-linux-gnu").is_dir():
        pytest.skip("no aarch64 sysroot at /usr/aarch64-linux-gnu")
    r = subprocess.run(["sh", str(ROOT / "tools" / "neon_test.sh"), "--quick", str(tmp_path)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    results = re.findall(r"(\d+) checks, (\d+) failed", r.stdout)
    assert len(results) == 2 and all(f == "0" and int(c) > 1000 for c, f in results), r.stdout[-3000:]
    assert "kernels: neon-dotprod neon-bytemask" in r.stdout            # -cpu max: both NEON kernels run
    assert "neon-dotprod(unsupported) neon-bytemask" in r.stdout       # cortex-a53: dispatch skips sdot


def test_outlier_channel_leaves_other_blocks_alone(klib):
    """Each block of QK = 32 activations has its own int8 scale (kernels.h), so an outlier channel
    (SmolLM2 has channels hundreds of times the others) coarsens only its own block: the product is
    linear across blocks, y(x) = y(outlier's block alone) + y(the rest alone). With one scale per
    group of G = 128 the outlier's scale flattened the other 127 columns of its group."""
    from bitbasis import bench
    rng = np.random.default_rng(7)
    rows, cols = 64, 512
    p = fmt.pack(fmt.round_trip(random_bb(rng, rows, cols, 2, 128, fmt.OFFSET)))
    x = rng.normal(size=cols).astype(np.float32)
    x[37] = 300.0                                   # block 1 (columns 32..63) of group 0
    blk = np.zeros(cols, bool)
    blk[32:64] = True
    parts = np.stack([np.where(blk, x, 0), np.where(blk, 0, x)]).astype(np.float32)
    kernels = ["scalar"] + [k["name"] for k in bench.kernels(klib) if k["supported"] and k["name"] != "scalar"]
    for kern in kernels:
        y = bench.matmul(p, x, kernel=kern, path=klib)
        y_parts = bench.matmul(p, parts, kernel=kern, path=klib).sum(0)
        err, ok = _close(y, y_parts, 1e-5)
        assert ok, f"{kern}: the outlier changed other blocks' quantization (rel err {err:.3g})"


@pytest.mark.parametrize("n", [576, 1536, 640])
def test_hadamard_matches_numpy(klib, n):
    """Every kernel set's online rotation (fast Walsh–Hadamard transform, kernels.h hadamard_f32, signs from the
    seed by the engine's splitmix64) equals rotate.online_transform's H·x in float64, to f32 rounding, on the
    widths that are not powers of two (SmolLM2's 576 and 1536, Gemma 3's 640); test_kernels.cpp pins the
    variants to the scalar one."""
    from bitbasis import bench, rotate
    x = np.random.default_rng(n).standard_normal((3, n)).astype(np.float32)
    b = rotate.online_block(n)
    assert (n // b) * b == n and b == {576: 64, 1536: 512, 640: 128}[n]
    want = rotate.online_transform(x.astype(np.float64), b, 12345)
    ran = 0
    for k in bench.kernels(klib):
        if k["supported"]:
            got = bench.hadamard(x, b, 12345, kernel=k["name"], path=klib)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), k["name"]
            ran += 1
    assert ran >= 2
    with pytest.raises(bench.KernelError, match="not a power of two"):
        bench.hadamard(x, 48, 0, path=klib)

"""The golden test vectors of the binary-basis format (formats/vectors/, formats/vectors/README.md):
the Python reader reproduces them, the generator (tools/make_vectors.py) reproduces the committed files
byte for byte, and the C++ reader, loader and every kernel this CPU supports reproduce them
(cpp/tests/test_vectors.cpp, built here with cmake).

A failure here means a reader or a kernel changed, never that the vectors should be regenerated."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitbasis import format as bbf
from bitbasis import gguf_io

ROOT = Path(__file__).resolve().parents[1]
VEC = ROOT / "formats" / "vectors"
QK = 32


def _generator():
    spec = importlib.util.spec_from_file_location("make_vectors", ROOT / "tools" / "make_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_vectors", mod)   # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


GEN = _generator()
FILES = sorted(GEN.FILES)


def test_committed_files():
    """Every file the generator writes is committed, nothing else, and the set stays small."""
    assert sorted(p.name for p in VEC.glob("*.gguf")) == FILES
    assert sum((VEC / f).stat().st_size for f in FILES) < 600_000
    assert (VEC / "README.md").exists()


# --- the Python reader ------------------------------------------------------------------------------

def _cases(mf: gguf_io.ModelFile) -> list[str]:
    assert all(n.endswith(".weight") for n in mf.packed)
    return [n[: -len(".weight")] for n in mf.packed]


def check_acts_exact(x: np.ndarray, colscale: np.ndarray | None) -> None:
    """Every 32-column block of x·k (float32, as the engine forms it) is q·2^E, max |q| = 127, or zero."""
    xs = x.astype(np.float32) * (np.float32(1) if colscale is None else colscale.astype(np.float32))
    for c0 in range(0, len(xs), QK):
        blk = xs[c0:c0 + QK].astype(np.float64)
        amax = np.abs(blk).max()
        if amax == 0:
            continue
        d = amax / 127
        e = np.frexp(d)
        assert e[0] == 0.5, f"block at column {c0}: d = {d} is not a power of two"
        q = blk / d
        assert np.array_equal(q, np.round(q)) and np.abs(q).max() == 127, f"block at column {c0}"


def check_file(path: Path) -> int:
    """Everything the Python reader must reproduce in one vector file; returns its number of cases."""
    mf = gguf_io.read_model(path)
    assert int(mf.kv["bitbasis.version"]) == 1
    assert mf.arch == "bitbasis-vectors"
    cases = _cases(mf)
    assert cases
    for case in cases:
        p = mf.packed[f"{case}.weight"]
        bb = bbf.unpack(p, case)
        w = mf.weight(f"{case}.weight")                     # gguf_io + format.dequantize
        want = mf.dense[f"{case}.dequant"]
        assert w.dtype == np.float32 and w.shape == want.shape == (p.rows, p.cols), case
        bad = np.argwhere(w != want)
        assert not len(bad), f"{path.name} {case}: {len(bad)} dequantized values differ, first {bad[0]}"
        # the packer reproduces the stored components byte for byte
        again = bbf.pack(bb)
        assert again.header == p.header, case
        assert sorted(again.parts) == sorted(p.parts), case
        for suf, a in p.parts.items():
            assert np.array_equal(again.parts[suf].view(np.uint8), a.view(np.uint8)), f"{case}.{suf}"
        x, y = mf.dense[f"{case}.x"], mf.dense[f"{case}.y"]
        assert x.shape == (3, p.cols) and y.shape == (3, p.rows), case
        for v in x:
            check_acts_exact(v, None if bb.colscale is None else np.asarray(bb.colscale, np.float32))
        ref = x.astype(np.float64) @ w.astype(np.float64).T              # [3, rows]
        scale = np.abs(ref).mean(axis=1, keepdims=True) + 1e-30
        err = np.abs(y - ref) / (np.abs(ref) + scale)
        assert err.max() <= 1e-6, f"{path.name} {case}: y rel err {err.max():.3g}"
    return len(cases)


@pytest.mark.parametrize("name", FILES)
def test_python_reader_reproduces(name):
    assert check_file(VEC / name) >= 5


def test_coverage():
    """The committed vectors cover every feature of the format (so that a trimmed set cannot pass)."""
    planes, groups, flags, widths, classes = set(), set(), set(), set(), set()
    nnz0 = zero_scales = subnormal = False
    for name in FILES:
        mf = gguf_io.read_model(VEC / name)
        for p in mf.packed.values():
            planes.add(p.n_planes)
            groups.add(p.group)
            flags.add(p.flags)
            widths.add(p.cols)
            bb = bbf.unpack(p)
            classes.add(bb.n_classes)
            if p.flags & bbf.SPARSE:
                nnz0 |= not bb.sparse_mask.any()
            zero_scales |= bool((bbf.full_scales(bb) == 0).any())
            s = np.abs(p.parts["bbs"].astype(np.float32))
            subnormal |= bool(((s > 0) & (s < 2.0 ** -14)).any())
    assert planes == set(range(1, 9))
    for f in (bbf.OFFSET, bbf.COLMASK, bbf.ELEMCLASS, bbf.SPARSE, bbf.POW2, bbf.COLSCALE):
        assert any(fl & f for fl in flags), f"flag {f} not covered"
    assert bbf.KNOWN_FLAGS in flags and 0 in flags
    assert {64, 128, 192, 256, 65536} <= groups and any(g % 128 == 64 and g > 64 for g in groups)
    assert any(c % 64 for c in widths) and any(c % 32 for c in widths) and any(c % 64 == 0 for c in widths)
    assert 1 in widths
    assert classes == {1, 2, 3}
    assert nnz0 and zero_scales and subnormal


# --- the generator ----------------------------------------------------------------------------------

def test_generator_reproduces_committed_files(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_vectors.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == FILES
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (VEC / name).read_bytes(), (
            f"tools/make_vectors.py no longer writes {name} byte for byte: the generator, the packer or the "
            f"GGUF writer changed (the committed vectors are golden: fix the change, do not regenerate)")


# --- the C++ engine ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def vbuild() -> Path:
    """libbitbasis + cpp/tests/test_vectors.cpp, in the build directory test_kernels.py uses (incremental)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    d = ROOT / ".kernel-test-build"
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(d), "-DCMAKE_BUILD_TYPE=Release", "-DBITBASIS_TESTS=ON"],
                ["cmake", "--build", str(d), "--target", "bitbasis", "test_vectors", "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return d


def _run(exe: Path, *args: str, cwd: Path = ROOT, env_vectors: str | None = None, timeout: int = 600):
    env = {k: v for k, v in os.environ.items() if k not in ("BITBASIS_VECTORS", "BITBASIS_ISA", "BITBASIS_KERNEL")}
    if env_vectors is not None:
        env["BITBASIS_VECTORS"] = env_vectors
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _summary(out: str) -> tuple[int, int, int, int, int]:
    m = re.search(r"test_vectors: (\d+) files, (\d+) tensors, (\d+) kernels: (\d+) checks, (\d+) failed", out)
    assert m, out[-3000:]
    return tuple(int(g) for g in m.groups())


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_cpp_reproduces_vectors(vbuild):
    r = _run(vbuild / "test_vectors", str(VEC))
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    n_files, n_tensors, n_kernels, n_checks, n_failed = _summary(out)
    n_cases = sum(len(_cases(gguf_io.read_model(VEC / f))) for f in FILES)
    assert (n_files, n_tensors, n_failed) == (len(FILES), n_cases, 0), out[-3000:]
    assert n_checks > 10 * n_cases
    # one line per file and supported kernel, every one OK; the SIMD kernels of this CPU took part
    ran = set(re.findall(r"^\S+\.gguf\s+(\S+)\s+y.*: OK$", out, re.M))
    assert "scalar" in ran and len(ran) == n_kernels, out[-3000:]
    flags = _cpu_flags()
    if "avx2" in flags and "fma" in flags:
        assert "avx2-bytemask" in ran
    if "avx512_vpopcntdq" in flags:
        assert "avx512-vpopcnt" in ran
    if "avx512_vnni" in flags:
        assert "avx512-vnni" in ran
    if "asimddp" in flags:
        assert "neon-dotprod" in ran


def test_cpp_finds_vectors(vbuild, tmp_path):
    """DIR from argv, else $BITBASIS_VECTORS, else ./formats/vectors; nothing found: a failure, except
    with --quick and no DIR given (tools/sanitize.sh), where it skips."""
    exe = vbuild / "test_vectors"
    r = _run(exe, "--quick", env_vectors=str(VEC), cwd=tmp_path)
    assert r.returncode == 0 and "(BITBASIS_VECTORS)" in r.stdout and _summary(r.stdout)[4] == 0, r.stdout[-3000:]
    r = _run(exe, "--quick", cwd=ROOT)
    assert r.returncode == 0 and "(default)" in r.stdout and _summary(r.stdout)[4] == 0, r.stdout[-3000:]
    r = _run(exe, "--quick", cwd=tmp_path)
    assert r.returncode == 0 and "vectors not found" in r.stdout and "skipped" in r.stdout, r.stdout
    r = _run(exe, cwd=tmp_path)
    assert r.returncode != 0 and "FAIL" in r.stdout, r.stdout
    r = _run(exe, "--quick", str(tmp_path / "nowhere"), cwd=ROOT)
    assert r.returncode != 0 and "FAIL" in r.stdout, r.stdout


def _tamper(src: Path, dst: Path, tensor: str, index: int, fn) -> None:
    """Copy src to dst with element `index` of F32 tensor `tensor` replaced by fn(value)."""
    import gguf
    data = bytearray(src.read_bytes())
    t = next(t for t in gguf.GGUFReader(src).tensors if t.name == tensor)
    off = int(t.data_offset) + 4 * index
    v = np.frombuffer(bytes(data[off:off + 4]), np.float32)[0]
    data[off:off + 4] = np.float32(fn(v)).tobytes()
    dst.write_bytes(bytes(data))


def test_checkers_catch_a_wrong_value(vbuild, tmp_path):
    """Neither checker is vacuous: one dequantized value one ulp off, or one y value 1e-4 off, fails both."""
    src = VEC / "bbv1_planes.gguf"
    for what, tensor, fn in (("dequant", "n4_g128_pow2_offset.dequant", lambda v: np.nextafter(v, np.float32(np.inf))),
                             ("y", "n8_g576_offset.y", lambda v: v * (1 + 1e-4) + 1e-3)):
        d = tmp_path / what
        d.mkdir()
        _tamper(src, d / src.name, tensor, 5, fn)
        with pytest.raises(AssertionError):
            check_file(d / src.name)
        r = _run(vbuild / "test_vectors", "--quick", str(d))
        assert r.returncode != 0 and _summary(r.stdout)[4] > 0, r.stdout[-3000:]
        assert tensor.split(".")[0] in r.stdout

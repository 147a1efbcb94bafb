#!/usr/bin/env python3
"""Golden test vectors for the binary-basis format (formats/binary_basis_v1.md).

    python tools/make_vectors.py [--out DIR]      # default: formats/vectors

Writes a few small GGUF files through the one packer (bitbasis.format.pack) and the one GGUF writer
(bitbasis.gguf_io.write_model). Every binary-basis weight `<case>.weight` comes with plain F32
tensors in the same file:

    <case>.dequant  [rows, cols]   the dequantized matrix (exact: see below)
    <case>.x        [n_vec, cols]  activation vectors
    <case>.y        [n_vec, rows]  y = W x, computed in float64 from <case>.dequant, stored f32

Every value is chosen so that the vectors are exact, whatever order a reader sums in:
  - scales, offsets, sparse (scale, min) and column scales are fp16 values whose exponents span a
    few binades only, so Σ α_i s_i + μ, the column-scale product and zs·code + min are exact in
    float32 (the script checks that its float64 evaluation of the spec equals format.dequantize's
    float32 one bit for bit);
  - every 32-column activation block, after the column scale, holds integers q times one power of two
    2^E with max |q| = 127, so the engine's int8 quantization (d = max|x·k|/127, q = round(x·k/d);
    cpp/src/kernels.h, QActs) gives d = 2^E and the exact q: a kernel's integer part is exact and
    only its float summation order differs from y.

Deterministic (fixed seeds, no time stamps): re-running writes byte-identical files; the tests check
that. The committed files are golden: readers must reproduce them; never re-run this script to make a
failing test pass (formats/vectors/README.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from bitbasis import format as bbf  # noqa: E402
from bitbasis import gguf_io  # noqa: E402

QK = 32            # the engine's activation block (cpp/src/kernels.h)
N_VEC = 3          # activation vectors per tensor
ARCH = "bitbasis-vectors"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    rows: int
    cols: int
    n: int
    group: int
    flags: int
    class_planes: tuple[int, ...] = ()   # planes used by classes 1.. (the rest get zero scales)
    sparse_density: float = 0.05
    scale_kind: str = "normal"           # "normal" | "subnormal" (fp16 subnormal scales)


F = bbf
FILES: dict[str, tuple[str, list[Case]]] = {
    "bbv1_planes.gguf": (
        "one class: N = 1..8 planes, OFFSET, POW2, group sizes 64..1024, per-row groups, odd widths",
        [
            Case("n1_g64", 5, 200, 1, 64, 0),
            Case("n2_g128_offset", 7, 77, 2, 128, F.OFFSET),
            Case("n3_g64_pow2_offset", 9, 130, 3, 64, F.POW2 | F.OFFSET),
            Case("n4_g128_pow2_offset", 37, 333, 4, 128, F.POW2 | F.OFFSET),
            Case("n5_g192", 6, 200, 5, 192, 0),
            Case("n6_g256_offset", 4, 255, 6, 256, F.OFFSET),
            Case("n7_g64_pow2", 3, 96, 7, 64, F.POW2),
            Case("n8_g576_offset", 11, 600, 8, 576, F.OFFSET),
            Case("n8_g128_pow2_offset", 13, 256, 8, 128, F.POW2 | F.OFFSET),
            Case("n1_g320_rowgroup", 16, 300, 1, bbf.row_group(300), 0),
            Case("n4_g1024_offset", 8, 1000, 4, 1024, F.OFFSET),
        ],
    ),
    "bbv1_classes.gguf": (
        "column classes (COLMASK), element classes (ELEMCLASS), both (3 classes), classes using fewer planes",
        [
            Case("n2_g64_colmask", 6, 200, 2, 64, F.COLMASK, (2,)),
            Case("n3_g128_elemclass_offset", 8, 77, 3, 128, F.ELEMCLASS | F.OFFSET, (1,)),
            Case("n4_g64_colmask_elemclass_offset", 9, 130, 4, 64, F.COLMASK | F.ELEMCLASS | F.OFFSET, (4, 2)),
            Case("n3_g192_colmask_elemclass_pow2_offset", 5, 250, 3, 192,
                 F.COLMASK | F.ELEMCLASS | F.POW2 | F.OFFSET, (3, 3)),
            Case("n8_g64_colmask_elemclass", 3, 64, 8, 64, F.COLMASK | F.ELEMCLASS, (5, 1)),
            Case("n1_g128_elemclass", 4, 300, 1, 128, F.ELEMCLASS, (1,)),
            Case("n2_g320_colmask_offset_rowgroup", 7, 260, 2, bbf.row_group(260), F.COLMASK | F.OFFSET, (2,)),
        ],
    ),
    "bbv1_sparse_colscale.gguf": (
        "SPARSE values (incl. nnz = 0), COLSCALE, and every flag at once",
        [
            Case("n1_g64_sparse", 7, 200, 1, 64, F.SPARSE, sparse_density=0.06),
            Case("n2_g128_sparse_offset_nnz0", 3, 77, 2, 128, F.SPARSE | F.OFFSET, sparse_density=0.0),
            Case("n3_g64_sparse_pow2_offset", 37, 150, 3, 64, F.SPARSE | F.POW2 | F.OFFSET, sparse_density=0.04),
            Case("n2_g64_colscale", 6, 200, 2, 64, F.COLSCALE),
            Case("n4_g128_colscale_pow2_offset", 5, 77, 4, 128, F.COLSCALE | F.POW2 | F.OFFSET),
            Case("n1_g320_colscale_rowgroup", 9, 300, 1, bbf.row_group(300), F.COLSCALE),
            Case("n2_g64_sparse_colscale_offset", 17, 130, 2, 64, F.SPARSE | F.COLSCALE | F.OFFSET,
                 sparse_density=0.08),
            Case("n3_g64_allflags", 9, 200, 3, 64, bbf.KNOWN_FLAGS, (3, 3)),
            Case("n8_g128_allflags", 5, 333, 8, 128, bbf.KNOWN_FLAGS, (8, 8)),
        ],
    ),
    "bbv1_edges.gguf": (
        "edges: 1x1, one column, fp16 subnormal scales, the largest group (65536), cols a multiple of G",
        [
            Case("n1_g64_1x1", 1, 1, 1, 64, 0),
            Case("n8_g64_1col_offset", 5, 1, 8, 64, F.OFFSET),
            Case("n2_g64_subnormal_offset", 4, 100, 2, 64, F.OFFSET, scale_kind="subnormal"),
            Case("n2_g65536_offset", 2, 100, 2, 65536, F.OFFSET),
            Case("n3_g64_nopad", 4, 128, 3, 64, 0),
        ],
    ),
}


# --- exact values ---------------------------------------------------------------------------------

def f16_normal(rng, shape, emin: int, emax: int, signed: bool = True) -> np.ndarray:
    """fp16 normal values with full 11-bit significands and exponents in [emin, emax] (float64)."""
    m = rng.integers(1024, 2048, shape).astype(np.float64)
    e = rng.integers(emin, emax + 1, shape)
    v = m * np.exp2(e - 10.0)
    if signed:
        v *= np.where(rng.random(shape) < 0.3, -1.0, 1.0)
    return v


def f16_subnormal(rng, shape) -> np.ndarray:
    """fp16 subnormals (m · 2^-24, m < 1024) and a few of the smallest normals."""
    v = rng.integers(1, 1024, shape).astype(np.float64) * 2.0 ** -24
    v = np.where(rng.random(shape) < 0.2, rng.integers(1024, 2048, shape) * 2.0 ** -24, v)
    return v * np.where(rng.random(shape) < 0.3, -1.0, 1.0)


def colscale_values(rng, cols: int) -> np.ndarray:
    """k = ±m·2^f, m in {1, 3, 5, 7}, f in [-3, 0]; every 32-column block has a power of two (m = 1),
    which carries the block's |q| = 127."""
    m = rng.choice([1, 3, 5, 7], cols, p=[0.4, 0.2, 0.2, 0.2]).astype(np.float64)
    for b0 in range(0, cols, QK):
        if not (m[b0:b0 + QK] == 1).any():
            m[b0 + rng.integers(0, min(QK, cols - b0))] = 1
    f = rng.integers(-3, 1, cols)
    sign = np.where(rng.random(cols) < 0.25, -1.0, 1.0)
    return sign * m * np.exp2(f)


def split_pow2(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """k = ±m·2^f with m an odd integer -> (m, ±2^f)."""
    m = np.empty(len(k))
    for j, v in enumerate(np.abs(np.asarray(k, np.float64))):
        while v != np.floor(v):
            v *= 2
        while v % 2 == 0:
            v /= 2
        m[j] = v
    return m, np.asarray(k, np.float64) / m


def activations(rng, cols: int, colscale: np.ndarray | None, kind: str) -> np.ndarray:
    """One activation vector whose blocks quantize exactly (module docstring)."""
    k = np.ones(cols) if colscale is None else colscale
    m, p = split_pow2(k)                      # k = m · p, m odd integer, p = ±2^f
    x = np.zeros(cols)
    n_blocks = -(-cols // QK)
    for b in range(n_blocks):
        c0, c1 = b * QK, min(cols, (b + 1) * QK)
        if kind == "wide" and n_blocks > 2 and b == 1:
            continue                           # an all-zero block: d = 0
        e = {"plain": rng.integers(-4, 1), "wide": rng.integers(-12, 9), "small": rng.integers(-2, 3)}[kind]
        mb = m[c0:c1]
        tmax = 127 // mb.astype(np.int64)
        if kind == "small":
            tmax = np.minimum(tmax, 2)
        t = np.array([rng.integers(-tm, tm + 1) for tm in tmax], np.float64)
        if kind == "small":
            t[rng.random(c1 - c0) < 0.5] = 0
        ones = np.nonzero(mb == 1)[0]
        jstar = ones[rng.integers(0, len(ones))]
        t[jstar] = 127.0 if rng.random() < 0.5 else -127.0
        # x·k = (t·2^e / p) · m · p = (t·m) · 2^e = q · 2^e
        x[c0:c1] = t * np.exp2(e) / p[c0:c1]
    assert np.array_equal(x.astype(np.float32).astype(np.float64), x)
    return x


def check_exact_acts(x: np.ndarray, colscale: np.ndarray | None) -> None:
    """Each block of x·k (float32, as the engine forms it) is q·2^E with max |q| = 127, or all zero."""
    xs = x.astype(np.float32) * (np.float32(1) if colscale is None else colscale.astype(np.float32))
    for c0 in range(0, len(xs), QK):
        blk = xs[c0:c0 + QK].astype(np.float64)
        amax = np.abs(blk).max()
        if amax == 0:
            continue
        d = amax / 127
        assert d == 2.0 ** np.round(np.log2(d)), (c0, amax)
        q = blk / d
        assert np.array_equal(q, np.round(q)) and np.abs(q).max() == 127, (c0, q)


# --- one tensor -----------------------------------------------------------------------------------

def make_bb(case: Case, rng) -> bbf.BinaryBasis:
    rows, cols, n, g, flags = case.rows, case.cols, case.n, case.group, case.flags
    ng = bbf.n_groups(cols, g)
    c = 1 + bool(flags & F.COLMASK) + bool(flags & F.ELEMCLASS)
    assert len(case.class_planes) == c - 1, case
    if case.scale_kind == "subnormal":
        scales = f16_subnormal(rng, (rows, ng, c, n))
        offsets = f16_subnormal(rng, (rows, ng, c))
    elif flags & F.POW2:
        # GPTQ-like: α_i = α_0·2^i, so α_0 small enough that Σ_i α_0 2^i stays exact and O(1)
        scales = f16_normal(rng, (rows, ng, c, 1), -9, -7, signed=False)
        scales = scales * np.exp2(np.arange(n))          # full scales; pack keeps [..., :1]
        offsets = f16_normal(rng, (rows, ng, c), -9, n - 9)
    else:
        scales = f16_normal(rng, (rows, ng, c, n), -7, -3)
        offsets = f16_normal(rng, (rows, ng, c), -7, -3)
    for ci, used in enumerate(case.class_planes, start=1):
        assert 1 <= used <= n
        if flags & F.POW2:
            assert used == n, "POW2 derives every plane's scale from α_0"
        scales[:, :, ci, used:] = 0.0                        # spec: unused planes have zero scales
    bb = bbf.BinaryBasis(signs=rng.random((n, rows, cols)) < 0.5,
                         scales=(scales[..., :1] if flags & F.POW2 else scales).astype(np.float32),
                         group=g, pow2=bool(flags & F.POW2))
    if flags & F.OFFSET:
        bb.offsets = offsets.astype(np.float32)
    if flags & F.COLMASK:
        bb.colmask = rng.random(cols) < 0.25
    if flags & F.ELEMCLASS:
        ec = rng.random((rows, cols)) < 0.3
        if bb.colmask is not None:
            ec &= ~bb.colmask[None, :]
        bb.elemclass = ec
    if flags & F.SPARSE:
        m = rng.random((rows, cols)) < case.sparse_density
        if case.sparse_density > 0 and rows > 2:
            m[0, :] = False                                  # a row without sparse values
            m[1, cols - 1] = True                            # the last column (next to padding)
        bb.sparse_mask = m
        bb.sparse_codes = rng.integers(0, 256, int(m.sum())).astype(np.uint8)
        zs0 = f16_normal(rng, (rows,), -8, -6, signed=False)
        zs1 = -(128 + rng.integers(-6, 7, rows)) * zs0      # fp16: exponent of zs0 + 7, exact
        bb.sparse_zs = np.stack([zs0, zs1], 1).astype(np.float32)
    if flags & F.COLSCALE:
        bb.colscale = colscale_values(rng, cols).astype(np.float32)
    return bb


def dequant_f64(bb: bbf.BinaryBasis) -> np.ndarray:
    """The spec evaluated in float64, independently of format.dequantize."""
    rows, cols = bb.shape
    n, g = bb.n_planes, bb.group
    s = np.asarray(bb.scales, np.float64)
    if bb.pow2:
        s = s[..., :1] * np.exp2(np.arange(n))
    w = np.zeros((rows, cols))
    for r in range(rows):
        for j in range(cols):
            cl = 0
            if bb.colmask is not None and bb.colmask[j]:
                cl = 1
            elif bb.elemclass is not None and bb.elemclass[r, j]:
                cl = bb.n_classes - 1
            v = sum(s[r, j // g, cl, i] * (1 if bb.signs[i, r, j] else -1) for i in range(n))
            if bb.offsets is not None:
                v += float(bb.offsets[r, j // g, cl])
            if bb.colscale is not None:
                v *= float(bb.colscale[j])
            w[r, j] = v
    if bb.sparse_mask is not None:
        idx = 0
        for r in range(rows):
            for j in range(cols):
                if bb.sparse_mask[r, j]:
                    w[r, j] = float(bb.sparse_zs[r, 0]) * int(bb.sparse_codes[idx]) + float(bb.sparse_zs[r, 1])
                    idx += 1
    return w


def make_case(case: Case):
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    bb = make_bb(case, rng)
    packed = bbf.pack(bb)
    bbf.validate(packed, case.name)
    got = bbf.unpack(packed, case.name)           # what every reader sees (fp16 round trip)
    w32 = bbf.dequantize(got)
    w64 = dequant_f64(got)
    # exactness: the float64 spec equals the float32 dequantizer bit for bit, and every input survived fp16
    assert np.array_equal(w64, w32.astype(np.float64)), f"{case.name}: dequantization is not exact in float32"
    assert np.array_equal(np.asarray(got.scales, np.float32), np.asarray(bb.scales, np.float32)), case.name
    colscale = None if got.colscale is None else np.asarray(got.colscale, np.float64)
    if colscale is not None:
        assert np.array_equal(colscale, np.asarray(bb.colscale, np.float64)), case.name
    xs = np.stack([activations(rng, case.cols, colscale, kind) for kind in ("plain", "wide", "small")[:N_VEC]])
    for x in xs:
        check_exact_acts(x, colscale)
    y = xs @ w64.T                                # [n_vec, rows], float64
    return packed, w32, xs.astype(np.float32), y.astype(np.float32)


def write_file(path: Path, description: str, cases: list[Case]) -> None:
    dense, packed = [], []
    for case in cases:
        p, w, x, y = make_case(case)
        packed.append((f"{case.name}.weight", p))
        dense += [(f"{case.name}.dequant", w, "F32"), (f"{case.name}.x", x, "F32"), (f"{case.name}.y", y, "F32")]
    mt = gguf_io.ModelTensors(
        arch=ARCH,
        kv=[("bitbasis.vectors.description", description, None)],
        dense=dense, packed=packed, method="vectors",
        settings={"generator": "tools/make_vectors.py", "file": path.name, "n_vec": N_VEC, "qk": QK})
    gguf_io.write_model(path, mt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "formats" / "vectors"), help="output directory")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for fname, (description, cases) in FILES.items():
        write_file(out / fname, description, cases)
        (out / fname).chmod(0o644)   # write_model's temporary file is 0600
        size = (out / fname).stat().st_size
        total += size
        print(f"{out / fname}: {len(cases)} tensors, {size} bytes")
    print(f"total {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())

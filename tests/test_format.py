"""Pack -> unpack is exact; dequantize follows the spec; padding and validation rules hold."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bitbasis import format as bbf


def random_bb(rng, rows, cols, n, group, *, offsets=False, colmask=False, elemclass=False,
              sparse=False, pow2=False, colscale=False) -> bbf.BinaryBasis:
    ng = bbf.n_groups(cols, group)
    c = 1 + colmask + elemclass
    s = 1 if pow2 else n
    # fp16-representable values so that pack -> unpack is exact
    f16 = lambda *shape: rng.standard_normal(shape).astype(np.float16).astype(np.float32)
    bb = bbf.BinaryBasis(signs=rng.random((n, rows, cols)) < 0.5, scales=np.abs(f16(rows, ng, c, s)),
                         group=group, pow2=pow2)
    if offsets:
        bb.offsets = f16(rows, ng, c)
    if colmask:
        bb.colmask = rng.random(cols) < 0.2
    if elemclass:
        ec = rng.random((rows, cols)) < 0.3
        if colmask:
            ec &= ~bb.colmask[None, :]
        bb.elemclass = ec
    if sparse:
        m = rng.random((rows, cols)) < 0.1
        bb.sparse_mask = m
        bb.sparse_codes = rng.integers(0, 256, int(m.sum()), dtype=np.uint8)
        bb.sparse_zs = f16(rows, 2)
    if colscale:
        bb.colscale = f16(cols)
    return bb


def assert_same(a: bbf.BinaryBasis, b: bbf.BinaryBasis):
    assert np.array_equal(a.signs, b.signs)
    assert np.array_equal(np.asarray(a.scales, np.float32), np.asarray(b.scales, np.float32))
    for f in ("offsets", "colmask", "elemclass", "sparse_mask", "sparse_codes", "sparse_zs", "colscale"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert np.array_equal(np.asarray(x), np.asarray(y)), f


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 300), n=st.integers(1, 8),
       group=st.sampled_from([64, 128, 256]), flags=st.integers(0, 63), seed=st.integers(0, 2**31))
def test_pack_unpack_exact(rows, cols, n, group, flags, seed):
    rng = np.random.default_rng(seed)
    bb = random_bb(rng, rows, cols, n, group, offsets=bool(flags & 1), colmask=bool(flags & 2),
                   elemclass=bool(flags & 4), sparse=bool(flags & 8), pow2=bool(flags & 16),
                   colscale=bool(flags & 32))
    p = bbf.pack(bb)
    assert p.flags == bb.flags
    back = bbf.unpack(p)
    assert_same(bb, back)
    assert np.array_equal(bbf.dequantize(bb), bbf.dequantize(back))


def test_dequantize_matches_definition(rng):
    """Element by element, the spec's formula written out with loops."""
    bb = random_bb(rng, 3, 150, 3, 64, offsets=True, colmask=True, elemclass=True, sparse=True, colscale=True)
    w = bbf.dequantize(bb)
    codes = iter(bb.sparse_codes)
    for r in range(3):
        for j in range(150):
            g = j // 64
            c = 1 if bb.colmask[j] else (2 if bb.elemclass[r, j] else 0)
            v = np.float32(0)
            for i in range(3):
                v += bb.scales[r, g, c, i] * (1 if bb.signs[i, r, j] else -1)
            v = (v + bb.offsets[r, g, c]) * bb.colscale[j]
            if bb.sparse_mask[r, j]:
                v = bb.sparse_zs[r, 0] * np.float32(next(codes)) + bb.sparse_zs[r, 1]
            assert w[r, j] == pytest.approx(v, rel=1e-6, abs=1e-6)


def test_pow2_is_integer_code_algebra(rng):
    """k-bit code q = Σ 2^i b_i: α_i = d 2^(i-1), μ = d((2^k-1)/2 - z) reproduces d (q - z)."""
    k, d, z = 3, np.float32(0.5), np.float32(3.0)
    q = rng.integers(0, 2 ** k, (2, 64))
    signs = np.stack([(q >> i) & 1 for i in range(k)]).astype(bool)
    bb = bbf.BinaryBasis(signs=signs, scales=np.full((2, 1, 1, 1), d / 2, np.float32), group=64, pow2=True,
                         offsets=np.full((2, 1, 1), d * ((2 ** k - 1) / 2 - z), np.float32))
    assert np.allclose(bbf.dequantize(bb), d * (q - z), atol=1e-6)


def test_padding_bits_are_zero_and_checked(rng):
    bb = random_bb(rng, 2, 70, 2, 64)
    p = bbf.pack(bb)
    assert p.parts["bbp"].shape == (2, 2, 2, 8)
    tail = bbf.unpack_bits(p.parts["bbp"].transpose(0, 2, 1, 3), 128)[..., 70:]
    assert not tail.any()
    p.parts["bbp"][0, 1, 0, 7] |= 0x80  # a set padding bit is a format violation
    with pytest.raises(bbf.FormatError, match="padding"):
        bbf.validate(p, "w")


@pytest.mark.parametrize("mutate, match", [
    (lambda p: p.parts.pop("bbs"), "components"),
    (lambda p: setattr(p, "flags", p.flags | 64), "unknown flag"),
    (lambda p: setattr(p, "n_planes", 9), "planes"),
    (lambda p: setattr(p, "group", 96), "multiple of 64"),
    (lambda p: p.parts.__setitem__("bbs", p.parts["bbs"][:, :1]), "shape"),
    (lambda p: setattr(p, "rows", 0), "positive"),
])
def test_validate_rejects(rng, mutate, match):
    p = bbf.pack(random_bb(rng, 4, 130, 2, 64))
    mutate(p)
    with pytest.raises(bbf.FormatError, match=match):
        bbf.validate(p, "w")


def test_sparse_count_checked(rng):
    p = bbf.pack(random_bb(rng, 4, 130, 1, 64, sparse=True))
    p.parts["bbv"] = np.concatenate([p.parts["bbv"], np.zeros(3, np.uint8)])
    with pytest.raises(bbf.FormatError, match="sparse-mask bits"):
        bbf.validate(p, "w")


def test_permute_rows_commutes_with_dequantize(rng):
    bb = random_bb(rng, 6, 100, 2, 64, offsets=True, sparse=True, elemclass=True)
    perm = rng.permutation(6)
    assert np.array_equal(bbf.dequantize(bbf.permute_rows(bb, perm)), bbf.dequantize(bb)[perm])


def test_true_bpw_counts_every_byte(rng):
    bb = random_bb(rng, 8, 256, 1, 128)
    p = bbf.pack(bb)
    # 256 sign bits + 2 fp16 scales per row
    assert p.nbytes == 8 * (256 // 8 + 2 * 2)
    assert p.true_bpw == pytest.approx(1.125)

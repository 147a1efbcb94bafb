"""QBB (quant/qbb.py): initialisation, least-squares refit, alternation, gradient descent."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bitbasis import format as bbf
from bitbasis.quant import QuantizerError, get_quantizer
from bitbasis.quant.base import groups_view
from bitbasis.quant.qbb import (QBB, alternate, descend, grouped_signs, layer_loss, nearest_signs,
                                reconstruct, refit, rtn4)


def _w(rows=48, cols=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-ish tails and a per-row scale, like LLM weights; 200 columns leave a padded last group
    return (torch.randn(rows, cols, generator=g) ** 3 * 0.02 * (1 + torch.rand(rows, 1, generator=g))).float()


def _grouped(w, group=128):
    wg, valid = groups_view(w, group)
    return wg, valid.float()


def test_int4_init_reproduces_the_4bit_model():
    w = _w()
    q = get_quantizer("qbb", bases=4, group=128, init="int4", offset=True, rounds=0, iters=0, refit=False)
    got = bbf.dequantize(bbf.round_trip(q.quantize(w)))
    want = bbf.dequantize(bbf.round_trip(rtn4(w, 128)))     # the 4-bit model through the same packer
    np.testing.assert_array_equal(got, want)
    # and that 4-bit model is a real 4-bit code: within half a step of W
    d = (w.reshape(-1).abs().max() * 2 / 15).item()
    assert np.abs(want - w.numpy()).max() <= d


def test_rtn4_codes_match_asymmetric_minmax():
    w = _w(8, 128)
    bb = rtn4(w, 128)
    q = sum((bb.signs[i].astype(np.int64) << i) for i in range(4))
    d = 2 * bb.scales[:, 0, 0, 0]
    z = 7.5 - bb.offsets[:, 0, 0] / d
    np.testing.assert_allclose(z, np.round(z), atol=1e-4)
    np.testing.assert_allclose(bbf.dequantize(bb), d[:, None] * (q - z[:, None]), atol=1e-6)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_refit_never_increases_the_error_and_is_least_squares(n, offset):
    w = _w(seed=n)
    wg, valid = _grouped(w)
    g = torch.Generator().manual_seed(7)
    for trial in range(5):
        s = grouped_signs(torch.rand(n, *w.shape, generator=g) < 0.5, 128)
        alpha = torch.rand(w.shape[0], 2, n, generator=g) * 0.05
        mu = torch.randn(w.shape[0], 2, generator=g) * 0.01 if offset else None
        before = float(layer_loss(wg, reconstruct(s, alpha, mu), valid))
        a2, m2 = refit(wg, s, valid, offset)
        after = float(layer_loss(wg, reconstruct(s, a2, m2), valid))
        assert after <= before * (1 + 1e-6)
    # one (row, group) against numpy's least squares, padded group included
    r, gi = 3, 1
    cols = valid[gi] > 0
    a = [s[i, r, gi][cols].numpy() for i in range(n)] + ([np.ones(int(cols.sum()))] if offset else [])
    sol = np.linalg.lstsq(np.stack(a, 1), wg[r, gi][cols].numpy(), rcond=None)[0]
    np.testing.assert_allclose(a2[r, gi].numpy(), sol[:n], rtol=1e-3, atol=1e-6)


def test_nearest_signs_is_the_exact_minimiser():
    w = _w(6, 128)
    wg, valid = _grouped(w)
    n = 3
    alpha = torch.tensor([0.01, 0.02, 0.05]).expand(6, 1, n).contiguous()
    mu = torch.full((6, 1), 0.003)
    s = nearest_signs(wg, alpha, mu, valid)
    best = float(layer_loss(wg, reconstruct(s, alpha, mu), valid))
    levels = [sum(a * c for a, c in zip([0.01, 0.02, 0.05], comb)) + 0.003
              for comb in itertools.product([-1, 1], repeat=n)]
    brute = np.mean(np.min((w.numpy()[..., None] - np.array(levels)) ** 2, -1))
    assert best == pytest.approx(brute, rel=1e-5)


def test_alternation_lowers_the_error():
    w = _w()
    wg, valid = _grouped(w)
    q = get_quantizer("qbb", bases=2, group=128, rounds=0, iters=0)
    s, alpha, mu, _ = q.initialise(w, None)
    alpha, mu = refit(wg, s, valid, False)
    l0 = float(layer_loss(wg, reconstruct(s, alpha, mu), valid))
    s2, a2, m2 = alternate(wg, s, alpha, mu, valid, 5)
    assert float(layer_loss(wg, reconstruct(s2, a2, m2), valid)) < 0.95 * l0


def test_one_gradient_step_lowers_the_layer_loss():
    w = _w()
    wg, valid = _grouped(w)
    q = get_quantizer("qbb", bases=2, group=128)
    s, alpha, mu, _ = q.initialise(w, None)          # top-2 planes of int4, scales not refitted yet
    _, _, _, hist = descend(wg, s, alpha, mu, valid, iters=1, lr=0.02, scale_lr=0.05)
    assert hist[1] < hist[0]


def test_descend_with_hessian_keeps_best_and_quantize_never_loses_to_its_init():
    w = _w()
    x = torch.randn(512, w.shape[1], generator=torch.Generator().manual_seed(3))
    h = 2 / 512 * x.T @ x
    q = get_quantizer("qbb", bases=2, group=128, rounds=3, iters=20)
    wg, valid = _grouped(w)
    st = q.stages(w, h)
    losses = [float(layer_loss(wg, reconstruct(s, a, m), valid, h)) for _, s, a, m in st]
    assert [n for n, *_ in st] == ["init", "alternate", "descend", "compensate"]
    assert all(b <= a for a, b in zip(losses, losses[1:]))


def test_quantize_export_shapes_and_bits():
    w = _w(32, 300)
    for n, off in ((2, False), (4, True), (5, True)):
        bb = get_quantizer("qbb", bases=n, group=128, iters=5).quantize(w)
        p = bbf.pack(bb)
        bbf.validate(p)
        assert p.parts["bbs"].shape == (32, 3, 1, n)
        assert ("bbo" in p.parts) == off
        assert not bb.pow2


def test_cascade_and_int4_inits_and_more_than_four_planes():
    w = _w()
    errs = {}
    for init in ("cascade", "int4"):
        for n in (2, 5):
            bb = get_quantizer("qbb", bases=n, group=128, init=init, rounds=0, iters=0).quantize(w)
            errs[init, n] = float(((bbf.dequantize(bb) - w.numpy()) ** 2).mean())
    assert errs["cascade", 5] < errs["cascade", 2]
    assert errs["int4", 5] < errs["int4", 2]


def test_fixed_seed_reproduces():
    w = _w()
    a = get_quantizer("qbb", bases=3, group=128, iters=10, seed=1).quantize(w)
    b = get_quantizer("qbb", bases=3, group=128, iters=10, seed=1).quantize(w)
    for k, v in bbf.pack(a).parts.items():
        assert v.tobytes() == bbf.pack(b).parts[k].tobytes()


@pytest.mark.parametrize("opt", [{"init": "fp8"}, {"preset": "slow"}, {"iters": -1}, {"lr": 0.0}])
def test_bad_options_are_clear_errors(opt):
    with pytest.raises(QuantizerError):
        get_quantizer("qbb", bases=2, **opt)


def test_gptq_init_needs_calibration():
    q = QBB(bases=2, init="int4")
    assert not q.needs_hessian
    try:
        q2 = get_quantizer("qbb", bases=2, init="gptq4")
    except QuantizerError as e:
        assert "gptq" in str(e)
    else:
        assert q2.needs_hessian


def test_gptq_compensation_on_qbb_levels_lowers_the_weighted_error():
    w = _w(32, 256)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1024, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = 2 / 1024 * x.T @ x
    st = get_quantizer("qbb", bases=2, group=128, hessian=True, rounds=3, iters=0, compensate=2).stages(w, h)
    assert [n for n, *_ in st] == ["init", "alternate", "compensate"]
    wg, valid = _grouped(w)
    before, after = (float(layer_loss(wg, reconstruct(*st[i][1:]), valid, h)) for i in (1, 2))
    assert after < 0.9 * before


def test_gptq4_init_reproduces_the_gptq_4bit_model_exactly():
    """Issue 5: from a GPTQ 4-bit model, whose codes are exactly 4 bit-planes plus an offset, the start
    is lossless: N = 4 with no further step dequantizes to GPTQ's own weights, bit for bit."""
    w = _w(32, 256)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(512, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = 2 / 512 * x.T @ x
    q = get_quantizer("qbb", bases=4, group=128, init="gptq4", offset=True, rounds=0, iters=0, refit=False,
                      compensate=0)
    got = bbf.dequantize(bbf.round_trip(q.quantize(w, h)))
    want = bbf.dequantize(bbf.round_trip(get_quantizer("gptq", bases=4, group=128, mse=False).quantize(w, h)))
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - w.numpy()).max() > 0                 # a real 4-bit code, not the float weights


@pytest.mark.parametrize("n", [2, 3])
def test_gptq_init_is_the_gptq_n_bit_model_exactly(n):
    """init=gptq: the GPTQ N-bit code (mse grid) is N planes plus an offset, so the start dequantizes
    to GPTQ's own N-bit weights, bit for bit; the Hessian-weighted descent then never raises tr(ΔW H ΔWᵀ)."""
    w = _w(32, 256)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(512, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    h = 2 / 512 * x.T @ x
    q = get_quantizer("qbb", bases=n, group=128, init="gptq", rounds=0, iters=0, refit=False, compensate=0)
    assert q.offset and q.needs_hessian
    got = bbf.dequantize(bbf.round_trip(q.quantize(w, h)))
    want = bbf.dequantize(bbf.round_trip(get_quantizer("gptq", bases=n, group=128).quantize(w, h)))
    np.testing.assert_array_equal(got, want)
    st = get_quantizer("qbb", bases=n, group=128, init="gptq", rounds=0, iters=40, compensate=0).stages(w, h)
    assert [s for s, *_ in st] == ["init", "descend"]
    wg, valid = _grouped(w)
    before, after = (float(layer_loss(wg, reconstruct(*st[i][1:]), valid, h)) for i in (0, 1))
    assert after < before

"""GPTQ: identity Hessian = round-to-nearest, compensation helps, the file is what was compensated."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitbasis import format as bbf
from bitbasis.quant import QuantizerError, get_quantizer
from bitbasis.quant.gptq import gptq


def correlated_hessian(cols, n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.1
    return 2.0 / n * X.T @ X


def rel_err(w, q, H):
    d = w - q
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum())


def rtn_minmax(w, bits, group):
    """GPTQ's reference quantizer (quant.py, perchannel, sym=False) applied group by group."""
    maxq = 2 ** bits - 1
    out = torch.empty_like(w)
    for c0 in range(0, w.shape[1], group):
        x = w[:, c0:c0 + group]
        xmin = torch.clamp(x.min(1).values, max=0)
        xmax = torch.clamp(x.max(1).values, min=0)
        d = (xmax - xmin) / maxq
        z = torch.round(-xmin / d)
        q = torch.clamp(torch.round(x / d[:, None]) + z[:, None], 0, maxq)
        out[:, c0:c0 + group] = d[:, None] * (q - z[:, None])
    return out


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_identity_hessian_is_round_to_nearest(bits):
    torch.manual_seed(bits)
    w = torch.randn(48, 256)
    bb, Q = gptq(w, torch.eye(256), bits, 128)
    R = rtn_minmax(w, bits, 128)
    step = (w.max() - w.min()) / (2 ** bits - 1)
    off = (Q - R).abs() > 1e-2 * step          # fp16 storage of the grid moves values by < maxq·2^-11 step
    assert off.float().mean() < 2e-3            # only exact ties may round the other way


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_packed_file_equals_compensated_matrix_bit_for_bit(bits):
    torch.manual_seed(10 + bits)
    w = torch.randn(40, 320) * torch.rand(1, 320) * 3   # 320 columns: a padded last group
    bb, Q = gptq(w, correlated_hessian(320), bits, 128)
    deq = bbf.dequantize(bbf.unpack(bbf.pack(bb)))
    assert np.array_equal(deq, Q.numpy())


def test_compensation_beats_round_to_nearest():
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    H = correlated_hessian(256)
    for bits in (2, 3):
        _, Q = gptq(w, H, bits, 128)
        assert rel_err(w, Q, H) < 0.8 * rel_err(w, rtn_minmax(w, bits, 128), H)


def test_dead_columns_are_zeroed_not_nan():
    torch.manual_seed(4)
    w = torch.randn(16, 128)
    H = correlated_hessian(128)
    H[5, :] = 0
    H[:, 5] = 0
    bb, Q = gptq(w, H, 2, 128)
    assert torch.isfinite(Q).all()
    half_step = torch.from_numpy(bb.scales[:, 0, 0, 0])                # α_0 = d/2
    assert (Q[:, 5].abs() <= half_step * 1.001).all()  # a dead column is zeroed, then rounded to the grid


def test_true_bpw_k_plus_32_over_g():
    torch.manual_seed(5)
    w = torch.randn(32, 256)
    for bits in (1, 2, 4):
        bb, _ = gptq(w, correlated_hessian(256), bits, 128)
        assert bbf.pack(bb).true_bpw == pytest.approx(bits + 32 / 128)


def test_bad_input_is_a_clear_error():
    q = get_quantizer("gptq", bases=2, group=128)
    w = torch.randn(8, 128)
    with pytest.raises(QuantizerError, match="Hessian"):
        q.quantize(w, None)
    w[2, 3] = float("nan")
    with pytest.raises(QuantizerError, match="NaN"):
        q.quantize(w, torch.eye(128))
    with pytest.raises(QuantizerError, match="1..4"):
        get_quantizer("gptq", bases=5)


def heavy_tailed(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.05) ** 0.5


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_mse_range_search_is_never_worse_than_min_max(bits):
    from bitbasis.quant.gptq import minmax_params
    x = heavy_tailed(64, 128, bits)
    maxq = 2 ** bits - 1

    def lp_err(a0, mu):
        q = torch.clamp(torch.round((x - mu[:, None]) / (2 * a0[:, None]) + maxq / 2), 0, maxq)
        return ((a0[:, None] * (2 * q - maxq) + mu[:, None] - x).abs() ** 2.4).sum(1)
    e_mm, e_mse = lp_err(*minmax_params(x, bits)), lp_err(*minmax_params(x, bits, mse=True))
    assert (e_mse <= e_mm).all()
    assert (e_mse < 0.95 * e_mm).float().mean() > 0.5     # outliers: a shrunk range wins on most rows


def test_mse_lowers_the_layer_error_on_heavy_tailed_weights():
    w = heavy_tailed(64, 256, 7)
    H = correlated_hessian(256)
    _, Q_mm = gptq(w, H, 2, 128)
    bb, Q = gptq(w, H, 2, 128, mse=True)
    assert rel_err(w, Q, H) < 0.8 * rel_err(w, Q_mm, H)
    assert np.array_equal(bbf.dequantize(bbf.unpack(bbf.pack(bb))), Q.numpy())


@pytest.mark.parametrize("bits", [2, 3])
def test_act_order(bits):
    torch.manual_seed(20 + bits)
    w = torch.randn(40, 320) * torch.rand(1, 320) * 3
    # identity Hessian: no compensation, static grids on W = round-to-nearest in any order
    _, Q = gptq(w, torch.eye(320) * torch.rand(320), bits, 128, act_order=True)
    R = rtn_minmax(w, bits, 128)
    step = (w.max() - w.min()) / (2 ** bits - 1)
    assert ((Q - R).abs() > 1e-2 * step).float().mean() < 2e-3
    # a real Hessian: the permutation is undone, the file holds Q, and the error drops vs plain order
    H = correlated_hessian(320, seed=bits) + torch.diag(torch.rand(320) * 5)
    bb, Q = gptq(w, H, bits, 128, act_order=True)
    assert np.array_equal(bbf.dequantize(bbf.unpack(bbf.pack(bb))), Q.numpy())
    assert rel_err(w, Q, H) < rel_err(w, gptq(w, H, bits, 128)[1], H)


def test_quantizer_options():
    q = get_quantizer("gptq", bases=2)
    assert q.mse and not q.act_order                      # mse on by default, act-order off as the reference
    w, H = heavy_tailed(16, 128, 3), correlated_hessian(128)
    a = bbf.dequantize(get_quantizer("gptq", bases=2, mse=False).quantize(w, H))
    assert np.array_equal(a, gptq(w, H, 2, 128)[1].numpy())

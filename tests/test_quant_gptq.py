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

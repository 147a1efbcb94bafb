"""BiLLM and ARB-LLM: residual binarization, the structural search, better than rtn, exact file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitbasis import format as bbf
from bitbasis.format import BinaryBasis
from bitbasis.quant import get_quantizer
from bitbasis.quant.arb import arb_order1, arb_order2, fit_arb, fit_arb_rc
from bitbasis.quant.billm import _braq_error, binary_residual_gptq, braq, fit_billm, search_masks
from bitbasis.quant.simple import residual_cascade

from test_quant_gptq import correlated_hessian, rel_err

FITS = {"billm": (fit_billm, {}), "arb": (fit_arb(15), {}),
        "arb-rc": (fit_arb_rc(15), dict(colscale=True, offset=False))}


def weights(seed, rows=64, cols=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (0.5 + 3 * torch.rand(1, cols, generator=g))


def test_residual_binarization_lowers_the_error():
    w = weights(0)
    mask = torch.ones_like(w, dtype=torch.bool)
    e1 = ((w - braq(w, mask, 1)[0]) ** 2).sum()
    e2 = ((w - braq(w, mask, 2)[0]) ** 2).sum()
    assert e2 < 0.5 * e1


def test_arb_refinement_never_worse_than_one_shot():
    w = weights(1)
    m = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    for order, fn in ((1, arb_order1), (2, arb_order2)):
        q0 = braq(w, m, order)[0]
        bs, alphas, mu = fn(w, m, 15)
        q = sum(a[:, None] * torch.where(b, 1.0, -1.0) for b, a in zip(bs, alphas)) + mu[:, None]
        assert ((w - q) ** 2 * m).sum() <= ((w - q0) ** 2 * m).sum() + 1e-4


def brute_force_search(s, up_lim=50):
    """The reference's loops (utils/autosearch.py structural_searching)."""
    rows, n = s.shape
    top = torch.argsort(s.abs().sum(0), descending=True, stable=True)
    best, n_sal = float("inf"), None
    for i in range(1, min(up_lim, n)):
        m = torch.zeros(1, 1, n)
        m[..., top[:i]] = 1
        e = ((s - _braq_error(s, m, 2) - _braq_error(s, 1 - m, 2)) ** 2).mean().item()
        if e < best:
            best, n_sal = e, i
    m3 = torch.zeros(rows, n, dtype=torch.bool)
    m3[:, top[:n_sal]] = True
    g3 = _braq_error(s, m3[None].float(), 2)
    rest = (s * ~m3).abs()
    best, frac = float("inf"), None
    for p in np.quantile(rest.numpy().reshape(-1), np.linspace(0.1, 0.9, 81)):
        m2 = ((rest >= float(p)) & ~m3)[None].float()
        m1 = ((rest < float(p)) & ~m3)[None].float()
        e = ((s - _braq_error(s, m1, 1) - _braq_error(s, m2, 1) - g3) ** 2).mean().item()
        if e < best:
            best, frac = e, float(m2.mean())
    return n_sal, frac


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_search_matches_the_reference_loops(seed):
    s = weights(seed, rows=96, cols=128) ** 2
    colmask, m_conc, m_sparse = search_masks(s)
    n_sal, frac = brute_force_search(s)
    assert int(colmask.sum()) == n_sal
    assert float(m_sparse.float().mean()) == pytest.approx(frac)
    assert not (m_conc & m_sparse).any() and not (m_sparse[:, colmask]).any()
    assert (m_conc | m_sparse | colmask[None, :]).all()


def rtn(w, group=128):
    s, a = residual_cascade(w, 1, group)
    return torch.from_numpy(bbf.dequantize(BinaryBasis(signs=s.numpy(), scales=a[:, :, None, :].numpy(), group=group)))


@pytest.mark.parametrize("name", list(FITS))
def test_beats_rtn_on_activation_weighted_loss_and_file_is_exact(name):
    w = weights(5, rows=48, cols=320)
    H = correlated_hessian(320, seed=5)
    fit, kw = FITS[name]
    bb, Q = binary_residual_gptq(w, H, 128, fit, **kw)
    assert rel_err(w, Q, H) < 0.7 * rel_err(w, rtn(w), H)
    assert np.array_equal(bbf.dequantize(bbf.unpack(bbf.pack(bb))), Q.numpy())
    assert bb.n_planes == 2 and bb.colmask is not None and bb.elemclass is not None
    assert (bb.colscale is not None) == (name == "arb-rc")


def test_arb_improves_on_billm():
    w = weights(6, rows=64, cols=256)
    H = correlated_hessian(256, seed=6)
    e_billm = rel_err(w, binary_residual_gptq(w, H, 128, fit_billm)[1], H)
    e_arb = rel_err(w, binary_residual_gptq(w, H, 128, fit_arb(15))[1], H)
    assert e_arb < e_billm


def test_registered_with_options():
    q = get_quantizer("arb", rc=True, iters=3)
    assert q.needs_hessian and q.rc and q.iters == 3
    assert get_quantizer("billm").needs_hessian

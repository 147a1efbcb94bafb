"""PB-LLM: exact salient fraction chosen by Hessian saliency, 8-bit salient part, exact file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitbasis import format as bbf
from bitbasis.quant import QuantizerError, get_quantizer
from bitbasis.quant.pbllm import pbllm, salient_mask
from bitbasis.quant.gptq import prepare

from test_quant_gptq import correlated_hessian, rel_err


@pytest.mark.parametrize("frac", [0.0, 0.05, 0.1, 0.3])
def test_salient_fraction_is_exact(frac):
    torch.manual_seed(0)
    w = torch.randn(30, 200)
    bb, _ = pbllm(w, correlated_hessian(200), frac)
    assert int(bb.sparse_mask.sum()) == round(frac * w.numel())
    assert bbf.pack(bb).parts["bbv"].size == max(1, round(frac * w.numel()))


def test_salient_entries_are_the_most_salient():
    torch.manual_seed(1)
    w = torch.randn(24, 128) * torch.rand(1, 128) * 4
    H = correlated_hessian(128)
    W, U = prepare(w, H)
    m = salient_mask(W, U, 0.2)
    s = W ** 2 / torch.diag(U)[None, :] ** 2
    assert s[m].min() >= s[~m].max()


def test_packed_file_equals_compensated_matrix_bit_for_bit():
    torch.manual_seed(2)
    w = torch.randn(33, 300) * 2
    bb, Q = pbllm(w, correlated_hessian(300), 0.1)
    assert np.array_equal(bbf.dequantize(bbf.unpack(bbf.pack(bb))), Q.numpy())
    assert bb.group == bbf.row_group(300) and bb.n_planes == 1


def test_more_salient_weights_lower_the_error():
    torch.manual_seed(3)
    w = torch.randn(64, 256)
    H = correlated_hessian(256)
    errs = [rel_err(w, pbllm(w, H, f)[1], H) for f in (0.0, 0.1, 0.3)]
    assert errs[0] > errs[1] > errs[2]


def test_bad_fraction_is_an_error():
    with pytest.raises(QuantizerError, match="salient"):
        get_quantizer("pbllm", salient=1.5)

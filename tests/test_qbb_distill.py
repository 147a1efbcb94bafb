"""QBB step 3 (bitbasis/distill.py) and the whole-model path through convert."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bitbasis import distill as D
from bitbasis import format as bbf
from bitbasis.convert import ConvertOptions, convert
from bitbasis.quant import get_quantizer

SMALL = dict(iters=3, rounds=2, distill_seqs=4, distill_len=16, distill_batch=2)


def test_basis_linear_starts_exactly_at_the_quantized_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 100, generator=g) * 0.05
    for n in (2, 4):
        bb = get_quantizer("qbb", bases=n, group=64, iters=3).quantize(w)
        m = D.BasisLinear(bb)
        np.testing.assert_array_equal(m.weight().detach().numpy(), bbf.dequantize(bb))
        for k, v in bbf.pack(m.export(bb)).parts.items():     # untrained scales export byte-identical
            assert v.tobytes() == bbf.pack(bb).parts[k].tobytes()


def test_zero_distill_steps_leave_the_file_unchanged(tiny_dir, tmp_path):
    from bitbasis import hf
    from bitbasis.gguf_io import read_model
    q = get_quantizer("qbb", bases=2, group=64, **SMALL)
    q0 = get_quantizer("qbb", bases=2, group=64, distill_steps=0, **SMALL)
    whole = q0.quantize_model(tiny_dir, progress=False)
    assert D.distill(tiny_dir, whole, q0.distill_config(), progress=False) is whole   # zero steps: untouched
    sd = hf.load_state_dict(tiny_dir)
    for k, bb in whole.items():                                               # == the per-layer quantizer
        ref = bbf.pack(q.quantize(torch.from_numpy(sd[k])))
        for suf, v in bbf.pack(bb).parts.items():
            assert v.tobytes() == ref.parts[suf].tobytes(), (k, suf)
    # convert() takes the whole-model path and writes exactly those bases
    out = tmp_path / "a.gguf"
    convert(tiny_dir, out, ConvertOptions(method="qbb", bases=2, group=64, extra=dict(SMALL, distill_steps=0)),
            progress=False)
    np.testing.assert_array_equal(read_model(out).weight("blk.1.ffn_down.weight"),
                                  bbf.dequantize(bbf.round_trip(whole["model.layers.1.mlp.down_proj.weight"])))


def _distilled(tiny_dir, ckpt, steps=4):
    q = get_quantizer("qbb", bases=2, group=64, distill_steps=steps, distill_ckpt=str(ckpt), distill_lr=1e-2, **SMALL)
    return q, q.quantize_model(tiny_dir, progress=False)


def test_distillation_trains_scales_only_and_resumes(tiny_dir, tmp_path, monkeypatch):
    q0 = get_quantizer("qbb", bases=2, group=64, **SMALL)
    base = q0.quantize_model(tiny_dir, progress=False)
    _, full = _distilled(tiny_dir, tmp_path / "full.pt")
    for k, bb in base.items():
        np.testing.assert_array_equal(full[k].signs, bb.signs)       # signs frozen
    assert any(not np.array_equal(full[k].scales, bb.scales) for k, bb in base.items())
    hist = torch.load(tmp_path / "full.pt", weights_only=False)["history"]
    assert len(hist) == 4 and np.isfinite(hist).all()

    # interrupt after two steps (a checkpoint is written at the interruption), then rerun: same result
    import dataclasses
    from bitbasis.quant.qbb import QBB
    every_step = QBB.distill_config
    monkeypatch.setattr(QBB, "distill_config", lambda self: dataclasses.replace(every_step(self), ckpt_every=1))
    calls = {"n": 0}
    orig = D.loss_fn

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(*a)
    monkeypatch.setattr(D, "loss_fn", flaky)
    with pytest.raises(KeyboardInterrupt):
        _distilled(tiny_dir, tmp_path / "cut.pt")
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(D, "loss_fn", orig)
    _, resumed = _distilled(tiny_dir, tmp_path / "cut.pt")
    for k in full:
        np.testing.assert_allclose(resumed[k].scales, full[k].scales, rtol=1e-5, atol=1e-8)


def test_checkpoint_of_other_settings_is_refused(tiny_dir, tmp_path):
    _distilled(tiny_dir, tmp_path / "c.pt", steps=2)
    with pytest.raises(D.CheckpointError, match="other settings"):
        _distilled(tiny_dir, tmp_path / "c.pt", steps=3)


def test_sign_training_starts_at_the_file_and_its_export_is_what_it_computes():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 200, generator=g) * 0.05
    for n, offset in ((2, False), (3, True)):
        bb = get_quantizer("qbb", bases=n, group=64, iters=0, offset=offset).quantize(w)
        m = D.BasisLinear(bb, train_signs=True)
        np.testing.assert_allclose(m.weight().detach().numpy(), bbf.dequantize(bb), rtol=0, atol=1e-6)
        with torch.no_grad():                       # move the latents: some signs must follow
            m.u.add_(torch.randn(m.u.shape, generator=g) * 2)
            m.a.add_(0.1)
        m.clip_latent()
        out = m.export(bb)
        assert not np.array_equal(out.signs, bb.signs)
        np.testing.assert_allclose(bbf.dequantize(bbf.round_trip(out)), m.weight().detach().numpy(),
                                   rtol=0, atol=1e-3 * float(np.abs(out.scales).max()))   # fp16 scales in the file
        alpha, mu = m.scales()                      # clipped to one unit past the extreme levels
        reach = alpha.abs().sum(-1) / m.unit + 1
        centre = torch.zeros_like(reach) if mu is None else mu / m.unit
        assert bool(((m.u - centre[..., None]).abs() <= reach[..., None] + 1e-5).all())


def test_sign_training_lowers_the_distillation_loss(tiny_dir, tmp_path):
    q = get_quantizer("qbb", bases=2, group=64, distill_steps=24, distill_ckpt=str(tmp_path / "s.pt"),
                      distill_train="signs", distill_sign_lr=0.05, distill_lr=1e-2, device="cpu",
                      **dict(SMALL, distill_seqs=8))
    base = get_quantizer("qbb", bases=2, group=64, **SMALL).quantize_model(tiny_dir, progress=False)
    out = q.quantize_model(tiny_dir, progress=False)
    assert any(not np.array_equal(out[k].signs, bb.signs) for k, bb in base.items())
    kl = np.array(torch.load(tmp_path / "s.pt", weights_only=False)["history"])
    assert kl[-6:].mean() < kl[12:18].mean(), kl       # after every block is swapped in (step 12), it falls

"""Calibration pipeline: clear errors on bad input, determinism, and every calibrated method end to end
on the tiny model."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bitbasis import format as bbf
from bitbasis.calibrate import (CalibrationError, calibration_tokens, quantize_model, relative_error,
                                sample_windows)
from bitbasis.convert import ConvertOptions, convert
from bitbasis.gguf_io import read_model

CALIB = {"samples": 4, "seqlen": 32, "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    from bitbasis import data
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(data.read_text("calib")[:20000])
    return p


def test_windows_are_seeded_and_in_range():
    toks = np.arange(1000)
    a, b = sample_windows(toks, 8, 64, 1), sample_windows(toks, 8, 64, 1)
    assert np.array_equal(a, b) and a.shape == (8, 64)
    assert not np.array_equal(a, sample_windows(toks, 8, 64, 2))
    assert (np.diff(a, axis=1) == 1).all() and a.max() < 1000


def test_short_or_empty_text_is_a_clear_error(tmp_path, tiny_dir):
    with pytest.raises(CalibrationError, match="fewer than one sample"):
        sample_windows(np.arange(100), 4, 128, 0)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    from bitbasis import hf
    with pytest.raises(CalibrationError, match="empty"):
        calibration_tokens(hf.load_tokenizer(tiny_dir), str(empty))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    from bitbasis.quant import get_quantizer
    with pytest.raises(CalibrationError, match="fewer than one sample"):
        quantize_model(tiny_dir, get_quantizer("gptq", bases=2), dict(CALIB, text=str(short)), progress=False)
    with pytest.raises(CalibrationError, match="does not exist"):
        quantize_model(tiny_dir, get_quantizer("gptq", bases=2), dict(CALIB, text=str(tmp_path / "nope")), progress=False)


def test_nan_weights_are_rejected(tmp_path, tiny_dir, calib_text):
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    f = next(bad.glob("*.safetensors"))
    sd = load_file(str(f))
    k = next(k for k in sd if "layers.1.mlp.down_proj" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    from bitbasis.quant import get_quantizer
    with pytest.raises(CalibrationError, match="NaN"):
        quantize_model(bad, get_quantizer("gptq", bases=2), dict(CALIB, text=str(calib_text)), progress=False)


def test_relative_error_is_one_for_zero_and_zero_for_exact():
    w = torch.randn(4, 8)
    H = torch.eye(8)
    assert relative_error(w, w, H) == 0
    assert relative_error(w, torch.zeros_like(w), H) == pytest.approx(1)


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("pbllm", {"salient": 0.1}), ("billm", {}),
                                          ("arb", {"rc": True})])
def test_convert_tiny_with_each_method(tmp_path, tiny_dir, calib_text, method, extra):
    out = tmp_path / f"{method}.gguf"
    calib = dict(CALIB, text=str(calib_text))
    s = convert(tiny_dir, out, ConvertOptions(method=method, bases=2, group=64 if method == "gptq" else 128,
                                              calib=calib, extra=extra), progress=False)
    mf = read_model(out)
    assert mf.kv["bitbasis.method"] == method
    assert len(mf.packed) == 2 * 7
    for name, p in mf.packed.items():
        w = mf.weight(name)
        assert np.isfinite(w).all() and w.std() > 0, name
    assert s["file_bytes"] == out.stat().st_size


def test_calibration_is_deterministic_and_model_holds_the_file(tiny_dir, calib_text, tmp_path):
    from bitbasis import hf
    from bitbasis.quant import get_quantizer
    calib = dict(CALIB, text=str(calib_text))
    q = get_quantizer("gptq", bases=3, group=64)
    a = quantize_model(tiny_dir, q, calib, progress=False)
    b = quantize_model(tiny_dir, q, calib, progress=False)
    assert a.keys() == b.keys()
    for k in a:
        pa, pb = bbf.pack(a[k]), bbf.pack(b[k])
        assert all(np.array_equal(pa.parts[s], pb.parts[s]) for s in pa.parts), k
    # the calibrated result differs from data-free rounding of the original weights: the Hessians
    # and the quantized inputs of later blocks were used
    sd = hf.load_state_dict(tiny_dir)
    k = "model.layers.1.self_attn.o_proj.weight"
    from bitbasis.quant.gptq import gptq
    plain = gptq(torch.from_numpy(sd[k]), torch.eye(sd[k].shape[1]), 3, 64)[1].numpy()
    assert not np.array_equal(bbf.dequantize(a[k]), plain)


@pytest.mark.parametrize("method", ["gptq", "billm"])
def test_interrupted_quantization_resumes_to_the_same_file(tmp_path, tiny_dir, calib_text, method, monkeypatch):
    """Stop a calibrated convert inside block 1; the rerun re-quantizes only block 1 (block 0 comes
    from its checkpoint) and writes the same bytes as a run that was never interrupted."""
    import bitbasis.quant as quant_pkg
    from bitbasis.quant import get_quantizer

    calib = dict(CALIB, text=str(calib_text), checkpoint=str(tmp_path / "ckpt"))
    opts = ConvertOptions(method=method, bases=2, group=64, calib=calib)
    calls = []

    def quantizer_stopping_after(n):
        q = get_quantizer(method, bases=2, group=64)
        real = q.quantize

        def quantize(w, h=None):
            if len(calls) == n:
                raise KeyboardInterrupt
            calls.append(1)
            return real(w, h)
        q.quantize = quantize           # an instance attribute: settings() (dataclass fields) unchanged
        return q

    monkeypatch.setattr(quant_pkg, "get_quantizer", lambda *a, **k: quantizer_stopping_after(10))
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dir, tmp_path / "resumed.gguf", opts, progress=False)
    assert not (tmp_path / "resumed.gguf").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["blk-000.npz"]
    calls.clear()
    monkeypatch.setattr(quant_pkg, "get_quantizer", lambda *a, **k: quantizer_stopping_after(10 ** 6))
    convert(tiny_dir, tmp_path / "resumed.gguf", opts, progress=False)
    assert len(calls) == 7                          # block 1 only
    assert not (tmp_path / "ckpt").exists()         # removed once the run completed
    monkeypatch.undo()
    whole = dict(calib, checkpoint="none")
    convert(tiny_dir, tmp_path / "whole.gguf", ConvertOptions(method=method, bases=2, group=64, calib=whole),
            progress=False)
    assert (tmp_path / "resumed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert not (tmp_path / "ckpt").exists()


def test_checkpoint_of_other_shapes_is_a_clear_error(tmp_path, tiny_dir, calib_text):
    from bitbasis.calibrate import Checkpoints
    from bitbasis.quant import get_quantizer
    ck = Checkpoints(tmp_path / "ckpt")
    bb = bbf.BinaryBasis(signs=np.ones((1, 3, 64), bool), scales=np.ones((3, 1, 1, 1), np.float32), group=64)
    ck.save(0, {"model.layers.0.self_attn.q_proj.weight": bb})
    back = ck.load(0)["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(back.signs, bb.signs) and back.group == 64 and back.offsets is None
    calib = dict(CALIB, text=str(calib_text), checkpoint=str(tmp_path / "ckpt"))
    with pytest.raises(CalibrationError, match="checkpoint does not match"):
        quantize_model(tiny_dir, get_quantizer("gptq", bases=2, group=64), calib, progress=False)
    (tmp_path / "ckpt" / "blk-000.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="unreadable calibration checkpoint"):
        quantize_model(tiny_dir, get_quantizer("gptq", bases=2, group=64), calib, progress=False)

"""The importance matrix made for llama.cpp's IQ types (tools/llamacpp_ppl.py): llama.cpp tensor names,
one value per input column, the mean of x² of the linear's actual input, llama-imatrix's GGUF layout,
and llama_model_quantize taking it (IQ2_XXS refuses without it). Tiny random models, seconds."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import llamacpp_ppl as L  # noqa: E402

from conftest import tiny_llama_dir  # noqa: E402

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from bitbasis import data
    p = tmp_path_factory.mktemp("im") / "calib.txt"
    p.write_text(data.read_text("calib")[:6000])
    return p


def test_imatrix_names_sizes_and_values(tiny_dir, calib_file):
    from bitbasis import hf
    from bitbasis.calibrate import calibration_tokens, sample_windows
    im = L.compute_imatrix(tiny_dir, chunks=3, chunk_size=32, seed=1, text=str(calib_file), progress=False)
    cfg = hf.load_config(tiny_dir)
    want = {f"blk.{i}.{n}.weight": cfg["intermediate_size"] if n == "ffn_down" else cfg["hidden_size"]
            for i in range(cfg["num_hidden_layers"]) for n in LINEARS}
    assert {k: v.size for k, v in im["sums"].items()} == want
    assert set(im["counts"].values()) == {3 * 32}
    # q, k, v read the same normed input; gate and up too
    s = im["sums"]
    assert np.array_equal(s["blk.1.attn_q.weight"], s["blk.1.attn_v.weight"])
    assert np.array_equal(s["blk.1.ffn_gate.weight"], s["blk.1.ffn_up.weight"])
    # layer 0's q input recomputed by hand: RMSNorm(embedding) of the same windows, Σx² per column
    model, tok = hf.load_torch_model(tiny_dir), hf.load_tokenizer(tiny_dir)
    ids = torch.as_tensor(sample_windows(calibration_tokens(tok, str(calib_file)), 3, 32, 1))
    with torch.inference_mode():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    np.testing.assert_allclose(s["blk.0.attn_q.weight"], x.double().square().sum((0, 1)).numpy(), rtol=1e-5)
    assert not np.allclose(s["blk.0.attn_q.weight"], s["blk.1.attn_q.weight"])


def test_imatrix_file_roundtrip_and_checks(tmp_path):
    im = {"sums": {"blk.0.attn_q.weight": np.arange(1, 9, dtype=np.float64),
                   "blk.0.ffn_down.weight": np.full(16, 6.0)},
          "counts": {"blk.0.attn_q.weight": 4, "blk.0.ffn_down.weight": 3},
          "chunk_count": 1, "chunk_size": 4, "dataset": "test"}
    L.save_imatrix(tmp_path / "im.gguf", im)
    m = L.load_imatrix(tmp_path / "im.gguf")
    np.testing.assert_allclose(m["blk.0.attn_q.weight"], np.arange(1, 9) / 4)  # mean of x²
    np.testing.assert_allclose(m["blk.0.ffn_down.weight"], 2.0)
    L.check_imatrix(m, {"blk.0.attn_q.weight": 8, "blk.0.ffn_down.weight": 16})
    with pytest.raises(L.LlamaCppError, match="no entry for tensor blk.1.attn_q.weight"):
        L.check_imatrix(m, {"blk.1.attn_q.weight": 8})
    with pytest.raises(L.LlamaCppError, match="has 16 values, the tensor has 32 columns"):
        L.check_imatrix(m, {"blk.0.ffn_down.weight": 32})
    with pytest.raises(L.LlamaCppError, match="no such file"):
        L.load_imatrix(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(L.LlamaCppError, match="not a GGUF"):
        L.load_imatrix(tmp_path / "junk.gguf")


def test_iq2_xxs_quantizes_only_with_the_imatrix(tmp_path, calib_file):
    pytest.importorskip("llama_cpp")
    from bitbasis.convert import ConvertOptions, convert
    # 256-wide rows so that IQ2_XXS applies (576-wide SmolLM2 rows fall back to IQ4_NL)
    d = tiny_llama_dir(tmp_path / "tiny256", hidden_size=256, intermediate_size=512)
    f32 = tmp_path / "f32.gguf"
    convert(d, f32, ConvertOptions(method="f32"), progress=False)
    with pytest.raises(L.LlamaCppError, match="needs an importance matrix"):
        L.llamacpp_quantize(str(f32), str(tmp_path / "x.gguf"), "IQ2_XXS")
    im = L.compute_imatrix(d, chunks=2, chunk_size=32, text=str(calib_file), progress=False)
    L.save_imatrix(tmp_path / "im.gguf", im)
    L.llamacpp_quantize(str(f32), str(tmp_path / "iq2.gguf"), "IQ2_XXS", threads=1,
                        imatrix=str(tmp_path / "im.gguf"))
    s = L.gguf_sizes(tmp_path / "iq2.gguf")
    assert s["block_types"].get("IQ2_XXS", 0) >= 10 and 2.0 < s["block_bpw"] < 2.7
    bad = L.load_imatrix(tmp_path / "im.gguf")
    bad["blk.0.ffn_down.weight"] = bad["blk.0.ffn_down.weight"][:256]
    with pytest.raises(L.LlamaCppError, match="blk.0.ffn_down.weight has 256 values"):
        L.llamacpp_quantize(str(f32), str(tmp_path / "y.gguf"), "IQ2_XXS", imatrix=bad)

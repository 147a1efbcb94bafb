"""The token embedding and output head as binary-basis tensors (issue 19 item 4): convert stores them,
the engine looks rows up (embedding) and runs the head through the kernels, and both agree with the
PyTorch reference over the same file; tied checkpoints keep one tensor, untied ones two."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_llama_dir
from test_engine import _torch_logits

CALIB = {"samples": 2, "seqlen": 32, "seed": 0, "device": "cpu", "checkpoint": "none"}


def _random_norms(d):
    """RMSNorm scales away from 1 (as real models have): the rows of a quantized embedding sit on a grid,
    and with unit scales the first int8 activation rounding would meet exact .5 ties, which torch and the
    engine break differently (not an error, but it would blur what this test pins)."""
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(0)
    for k in sd:
        if "norm" in k:
            sd[k] = (1 + 0.3 * rng.standard_normal(sd[k].shape)).astype(np.float32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return _random_norms(tiny_llama_dir(tmp_path_factory.mktemp("tied") / "m"))


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return _random_norms(tiny_llama_dir(tmp_path_factory.mktemp("untied") / "m", tie_word_embeddings=False))


@pytest.fixture(scope="module")
def files(tied_dir, untied_dir, tmp_path_factory):
    """Converted once for every test here: {name: (path, summary)}."""
    from bitbasis import data
    from bitbasis.convert import ConvertOptions, convert
    d = tmp_path_factory.mktemp("qe")
    (d / "calib.txt").write_text(data.read_text("calib")[:20000])
    calib = dict(CALIB, text=str(d / "calib.txt"))
    out = {}
    for name, src, method, embed, head in (("tied-gptq", tied_dir, "gptq", (4, 64), (4, 64)),
                                           ("tied-gptq-embed-only", tied_dir, "gptq", (4, 64), None),
                                           ("untied-residual", untied_dir, "residual", (4, 64), (4, 64))):
        opts = ConvertOptions(method=method, bases=2, group=128, calib=calib, embed_bases=embed, head_bases=head,
                              extra={"mse": False} if method == "gptq" else None)
        out[name] = (d / f"{name}.gguf", convert(src, d / f"{name}.gguf", opts, progress=False))
    return out


@pytest.mark.parametrize("name", ["tied-gptq", "untied-residual"])
def test_quantized_embedding_and_head_match_reference(files, capsys, monkeypatch, name):
    """The engine (lookup of dequantized rows; the head through the binary-basis kernels) against the
    float PyTorch reference over the same file. With BITBASIS_PRECISE_ACTS=1 the engine reaches the float
    reference (model.h), so the comparison is tight: the int8 path's own rounding would otherwise flip at
    the boundaries the quantized embedding's few distinct values sit near, token by token."""
    from bitbasis.cli import main
    from bitbasis.engine import Model
    from bitbasis.gguf_io import read_model
    from bitbasis.reference import torch_model_from_gguf
    tied = name.startswith("tied")
    out, s = files[name]
    mf = read_model(out)
    emb = mf.packed["token_embd.weight"]
    assert (emb.n_planes, emb.group) == (4, 64)
    assert ("output.weight" in mf.packed) == (not tied) and "output.weight" not in mf.dense
    assert "token_embd.weight" not in mf.dense
    # block bpw counts the block linears only (N=2 G=128 here), not the 4-bit embedding / head
    blk = [p for n, p in mf.packed.items() if n.startswith("blk.")]
    assert s["block_bpw"] == pytest.approx(8 * sum(p.nbytes for p in blk) / sum(p.rows * p.cols for p in blk))
    assert s["block_bpw"] < 2.5 and s["edge"]["token_embd.weight"][1] > 4

    ids = list(range(300, 340))
    monkeypatch.setenv("BITBASIS_PRECISE_ACTS", "1")
    m = Model(str(out), threads=2)
    lg = m.logits(ids)
    m.reset()
    steps = np.stack([m.eval([t]) for t in ids])
    ref_model, _ = torch_model_from_gguf(out)
    assert ref_model.config.tie_word_embeddings == tied
    ref = _torch_logits(ref_model, ids)
    scale = float(np.abs(ref).max())
    for ours in (lg, steps):
        d = np.abs(ours - ref)
        assert d.mean() <= 1e-5 * scale and d.max() <= 1e-3 * scale, (d.mean(), d.max(), scale)
    # the lookup is the dequantized row: the reference's embedding is format.dequantize's
    assert np.array_equal(ref_model.model.embed_tokens.weight.detach().numpy(), mf.weight("token_embd.weight"))

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "token_embd binary basis N=4 G=64" in text
    assert ("the head is tied to it" in text) == tied


def test_tied_embedding_rounded_alone_or_quantized_as_the_head(files, tied_dir):
    """A tied checkpoint with only the embedding planned: one tensor, rounded to nearest (H = I), that the
    head shares; with the head planned alike, the one tensor is quantized as the head (GPTQ on the head's
    Hessian): close to the f32 weights both ways (4-bit min-max: ~0.13 mean|w|), not the same tensor."""
    from bitbasis import hf
    from bitbasis.gguf_io import read_model
    w = hf.load_state_dict(tied_dir)["model.embed_tokens.weight"]
    got = []
    for name in ("tied-gptq-embed-only", "tied-gptq"):
        mf = read_model(files[name][0])
        assert "output.weight" not in mf.packed and "output.weight" not in mf.dense
        got.append(mf.weight("token_embd.weight"))
        err = np.abs(got[-1] - w).mean()
        assert 0 < err < 0.2 * np.abs(w).mean(), err
    assert not np.array_equal(*got)


def test_recipe_defaults_and_overrides():
    """convert's (and demo's) defaults are the recipe: the 3.4 bpw plan over GPTQ with act_order;
    --bases/--group ask for a uniform model, other methods get none of the recipe's options."""
    from bitbasis.cli.convert import recipe_options
    from bitbasis.convert import ConvertError, DEFAULT_RECIPE as R
    o = recipe_options()
    assert (o.method, o.target_bpw, o.extra["act_order"], o.rotate) == ("gptq", R["target_bpw"], True, True)
    assert (o.embed_bases, o.head_bases) == (R["embed_bases"], R["head_bases"])
    u = recipe_options(bases=2)
    assert u.target_bpw is None and (u.bases, u.group) == (2, R["group"])
    assert recipe_options(opt=["act_order=false"]).extra["act_order"] is False
    e = recipe_options(embed_bases="4:128", head_bases="none")
    assert e.embed_bases == (4, 128) and e.head_bases is None
    r = recipe_options(method="residual", bases=2)
    assert r.target_bpw is None and r.extra == {} and r.embed_bases is None
    with pytest.raises(ConvertError, match="--embed-bases '4x'"):
        recipe_options(embed_bases="4x")


def test_default_convert_quantizes_the_embedding(untied_dir, tmp_path):
    """`bitbasis convert` writes the recipe's embedding and head forms (4 bases, G = 64) without being asked,
    also for a uniform --bases model (uniform, unrotated, 2 x 32 calibration tokens: the embedding's 49152
    rows are most of the time)."""
    from bitbasis.cli import main
    from bitbasis.convert import DEFAULT_RECIPE as R
    from bitbasis.gguf_io import read_model, summarize
    out = tmp_path / "d.gguf"
    assert main(["convert", str(untied_dir), "-o", str(out), "-q", "--bases", "2", "--group", "64", "--no-rotate",
                 "--calib-samples", "2", "--calib-seqlen", "32", "--no-checkpoint", "--no-check",
                 "--distill-steps", "0"]) == 0
    edge = summarize(read_model(out))["edge"]
    assert edge["token_embd.weight"][0] == "binary basis N={} G={}".format(*R["embed_bases"])
    assert edge["output.weight"][0] == "binary basis N={} G={}".format(*R["head_bases"])

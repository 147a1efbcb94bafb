"""Bit plans (bitbasis.plan), rotations (bitbasis.rotate), the quantized head and option checking, on
tiny random models (hidden 192 = 64·3: the rotation's odd factor is exercised as SmolLM2's 576 = 64·9)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import tiny_llama_dir

TINY = dict(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, intermediate_size=320)


@pytest.fixture(scope="module")
def tiny192(tmp_path_factory):
    """A tiny Llama with random (not unit) RMSNorm scales, so folding them is tested too."""
    from safetensors.numpy import load_file, save_file
    d = tiny_llama_dir(tmp_path_factory.mktemp("tiny192") / "m", **TINY)
    sd = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(0)
    for k in sd:
        if "norm" in k:
            sd[k] = (1 + 0.5 * rng.standard_normal(sd[k].shape)).astype(np.float32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from bitbasis import data
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(data.read_text("calib")[:20000])
    return {"samples": 2, "seqlen": 32, "seed": 0, "device": "cpu", "text": str(p), "checkpoint": "none"}


@pytest.mark.parametrize("n", [576, 1536, 640, 64, 9])
def test_rotation_is_orthogonal_for_any_width(n):
    from bitbasis.rotate import rotation
    Q = rotation(n, seed=1)
    assert np.abs(Q @ Q.T - np.eye(n)).max() < 1e-12
    assert not np.allclose(Q, rotation(n, seed=2))                       # the seed matters


def test_rotation_leaves_f32_logits_unchanged(tiny192, tmp_path):
    import torch
    from bitbasis import hf
    from bitbasis.hf import rotated_checkpoint
    rot = rotated_checkpoint(tiny192, seed=3, root=tmp_path, progress=None)
    assert rotated_checkpoint(tiny192, seed=3, root=tmp_path, progress=None) == rot      # made once
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = hf.load_torch_model(tiny192)(ids).logits
        b = hf.load_torch_model(rot)(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
    w0 = hf.load_state_dict(tiny192)["model.layers.0.self_attn.q_proj.weight"]
    w1 = hf.load_state_dict(rot)["model.layers.0.self_attn.q_proj.weight"]
    assert np.abs(w0 - w1).max() > 1e-2                                   # the weights did change


def _brute_force(items, budget):
    best = None
    for combo in itertools.product(*[[(n, o) for o in opts] for n, opts in items.items()]):
        bits, err = sum(o[0] for _, o in combo), sum(o[1] for _, o in combo)
        if bits <= budget and (best is None or err < best[0]):
            best = (err, {n: o[2] for n, o in combo})
    return best


def test_allocation_meets_the_budget_and_is_near_optimal():
    from bitbasis.plan import PlanError, allocate
    rng = np.random.default_rng(0)
    items = {}
    for t in range(5):                          # 5 tensors, 4 options each: err falls with bits
        size = int(rng.integers(1, 5)) * 1000
        errs = np.sort(rng.uniform(0, 10, 4))[::-1] * size
        items[f"t{t}"] = [(size * (b + 1), float(errs[b]), (b + 1, 64)) for b in range(4)]
    total = sum(opts[0][0] for opts in items.values())   # every tensor at 1 bit
    for budget in (total, int(1.7 * total), int(2.6 * total), 4 * total):
        got = allocate(items, budget)
        bits = sum(next(o[0] for o in items[n] if o[2] == c) for n, c in got.items())
        err = sum(next(o[1] for o in items[n] if o[2] == c) for n, c in got.items())
        assert bits <= budget
        assert err <= 1.2 * _brute_force(items, budget)[0] + 1e-9
    with pytest.raises(PlanError, match="below the cheapest"):
        allocate(items, total - 1)


def test_plan_meets_its_budget_and_rules_and_info_prints_it(tiny192, calib, tmp_path, capsys):
    from bitbasis.cli import main
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.gguf_io import read_model
    import torch
    out = tmp_path / "plan.gguf"
    assert torch.is_grad_enabled()
    convert(tiny192, out, ConvertOptions(method="residual", bases=2, group=128, calib=calib, target_bpw=2.3,
                                         tensor_types=[r"blk\.1\.attn_v=4:64"]), progress=False)
    assert torch.is_grad_enabled()      # the Fisher pass gave the process its grad mode back (it once did not)
    mf = read_model(out)
    blk = {n: p for n, p in mf.packed.items() if n.startswith("blk.")}
    bpw = 8 * sum(p.nbytes for p in blk.values()) / sum(p.rows * p.cols for p in blk.values())
    assert 2.29 <= bpw <= 2.3 + 1e-9
    assert (blk["blk.1.attn_v.weight"].n_planes, blk["blk.1.attn_v.weight"].group) == (4, 64)
    assert len({(p.n_planes, p.group) for p in blk.values()}) > 1              # not uniform: it chose
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "plan" in text and "target 2.3" in text and r"blk\.1\.attn_v=4:64" in text


def test_rotated_gptq_with_a_quantized_head_runs_in_the_engine(tiny192, calib, tmp_path):
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.engine import Model
    from bitbasis.gguf_io import read_model
    out = tmp_path / "rot.gguf"
    s = convert(tiny192, out, ConvertOptions(method="gptq", bases=3, group=192, calib=calib, rotate=True,
                                             head_bases=(4, 192), extra={"mse": False}, check=True),
                progress=False)
    mf = read_model(out)
    assert "output.weight" in mf.packed and mf.packed["output.weight"].n_planes == 4
    assert "token_embd.weight" in mf.dense
    ppl_q, ppl_f = s["check_ppl"]                         # random weights: about as good as f32 (≈ vocab)
    assert np.isfinite(ppl_q) and ppl_q < 2 * ppl_f and "warning" not in s
    logits = Model(str(out), threads=1).logits([1, 2, 3])
    assert np.isfinite(logits).all()


@pytest.mark.parametrize("args,message", [
    (["--method", "pbllm", "--opt", "salinet=0.2"], "--opt salinet: not an option of --method pbllm"),
    (["--method", "pbllm", "--bases", "2"], "--bases: --method pbllm does not use it"),
    (["--method", "residual", "--calib-samples", "8"], "--calib-samples: --method residual does not use it"),
    (["--method", "billm", "--target-bpw", "2.5"], "--method billm: bit plans"),
    (["--method", "gptq", "--tensor-type", "ffn_down"], "expected REGEX=N"),
])
def test_options_a_method_ignores_are_refused(tiny192, tmp_path, capsys, args, message):
    from bitbasis.cli import main
    out = tmp_path / "x.gguf"
    assert main(["convert", str(tiny192), "-o", str(out), "--no-rotate", "--no-check", "-q", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("n,b", [(576, 64), (1536, 512), (640, 128), (2048, 512), (192, 64)])
def test_online_rotation_is_an_orthogonal_block_hadamard(n, b):
    """rotate.online_transform is H = blockdiag(H_b/√b)·diag(s): orthogonal, b the largest power of two dividing
    n up to 512, ±1/√b entries inside the diagonal blocks and zeros outside, signs that depend on the seed."""
    from bitbasis.rotate import online_block, online_signs, online_transform
    assert online_block(n) == b
    H = online_transform(np.eye(n), b, 9).T                              # column j = H·e_j
    assert np.abs(H @ H.T - np.eye(n)).max() < 1e-12
    blocks = np.kron(np.eye(n // b), np.ones((b, b))) > 0
    assert np.allclose(np.abs(H[blocks]), 1 / np.sqrt(b)) and not H[~blocks].any()
    s = online_signs(n, 9)
    assert set(np.unique(s)) == {-1.0, 1.0} and not np.array_equal(s, online_signs(n, 10))


def test_online_rotation_option_and_errors(tiny192, tmp_path, capsys):
    """convert --online-rotation down stores {block, seed} (with the residual rotation too: they act on
    different widths), info prints it; a checkpoint with an invalid online rotation is refused in one line."""
    import json
    import shutil
    from bitbasis import hf
    from bitbasis.cli import main
    out = tmp_path / "o.gguf"
    assert main(["convert", str(tiny192), "-o", str(out), "--method", "f32", "--rotate", "--online-rotation", "down",
                 "--seed", "4", "-q", "--no-check"]) == 0
    from bitbasis.gguf_io import read_model
    kv = read_model(out).kv
    assert (kv["bitbasis.online_rotation.ffn_down.block"], kv["bitbasis.online_rotation.ffn_down.seed"]) == (64, 4)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "online rot. ffn_down.block 64, ffn_down.seed 4" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(tiny192, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, bitbasis_online_rotation={"ffn_down": {"block": 96,
                                                                                                   "seed": 0}})))
    with pytest.raises(hf.CheckpointError, match="block 96 is not a power of two"):
        hf.load_torch_model(bad)

"""HF -> GGUF conversion: stock readers open our files, values survive, bad input fails cleanly."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitbasis import format as bbf
from bitbasis import hf
from bitbasis.convert import ConvertOptions, convert
from bitbasis.gguf_io import read_model

BITBASIS = [sys.executable, "-m", "bitbasis.cli"]


def run_cli(*args, **kw):
    return subprocess.run([*BITBASIS, *map(str, args)], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_files(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tinyconv")
    files = {}
    for method, n in (("f32", 1), ("rtn", 1), ("residual", 3)):
        files[method] = out / f"{method}.gguf"
        convert(tiny_dir, files[method], ConvertOptions(method=method, bases=n, group=64), progress=False)
    return files


def test_stock_reader_lists_every_tensor(tiny_files):
    import gguf
    for method, path in tiny_files.items():
        r = gguf.GGUFReader(str(path))
        names = {t.name for t in r.tensors}
        mf = read_model(path)
        expect = set(mf.dense) | {f"{n}.{s}" for n, p in mf.packed.items() for s in p.parts}
        assert names == expect
        if method != "f32":
            assert len(mf.packed) == 2 * 7  # 2 blocks x 7 linears
            assert all(n.endswith(".bbp") or n.split(".")[-1] in bbf.SUFFIXES for n in names if n.startswith("blk.") and "norm" not in n)


def test_gguf_dump_opens_our_files(tiny_files):
    dump = shutil.which("gguf-dump") or str(Path(sys.executable).parent / "gguf-dump")
    r = subprocess.run([dump, str(tiny_files["residual"])], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "blk.0.attn_q.weight.bbp" in r.stdout and "bitbasis.version" in r.stdout


def test_f32_export_is_lossless(tiny_dir, tiny_files):
    sd = hf.load_state_dict(tiny_dir)
    mf = read_model(tiny_files["f32"])
    cfg = hf.load_config(tiny_dir)
    w = sd["model.layers.1.mlp.down_proj.weight"]
    assert np.array_equal(mf.dense["blk.1.ffn_down.weight"], w)
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    perm = hf.qk_row_permutation(q.shape[0], cfg["num_attention_heads"])
    assert np.array_equal(mf.dense["blk.0.attn_q.weight"], q[perm])


def test_residual_file_holds_the_cascade(tiny_dir, tiny_files):
    import torch
    from bitbasis.quant.simple import residual_cascade
    sd = hf.load_state_dict(tiny_dir)
    w = sd["model.layers.0.mlp.up_proj.weight"]
    mf = read_model(tiny_files["residual"])
    got = mf.weight("blk.0.ffn_up.weight")
    signs, scales = residual_cascade(torch.from_numpy(w), 3, 64)
    expect = bbf.dequantize(bbf.BinaryBasis(signs=signs.numpy(), scales=scales[:, :, None].numpy(), group=64))
    assert np.allclose(got, expect, atol=2e-3 * np.abs(w).max())
    # more bases, less error; and the error is far below the weight scale
    err = [np.linalg.norm(read_model(tiny_files[m]).weight("blk.0.ffn_up.weight") - w) for m in ("rtn", "residual")]
    assert err[1] < 0.6 * err[0]


def test_torch_reference_matches_hf_on_f32(tiny_dir, tiny_files):
    import torch
    from bitbasis.reference import torch_model_from_gguf
    ids = torch.arange(1, 40)[None] * 37 % 49152
    ref = hf.load_torch_model(tiny_dir)
    ours, _ = torch_model_from_gguf(tiny_files["f32"])
    with torch.inference_mode():
        a, b = ref(ids).logits, ours(ids).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_summary_reports_true_bpw(tiny_files):
    r = run_cli("info", tiny_files["rtn"])
    assert r.returncode == 0, r.stderr
    mf = read_model(tiny_files["rtn"])
    bpw = 8 * sum(p.nbytes for p in mf.packed.values()) / sum(p.rows * p.cols for p in mf.packed.values())
    assert f"{bpw:.3f}" in r.stdout
    assert bpw > 1.0  # signs alone are 1 bit; scales cost more


# --- bad input: one line, non-zero exit, no partial file -----------------------------------------

def _assert_clean_failure(r, out: Path, needle: str):
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("bitbasis: error:"), r.stderr
    assert needle.lower() in lines[-1].lower(), lines[-1]
    assert "Traceback" not in r.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def test_missing_directory(tmp_path):
    out = tmp_path / "o.gguf"
    _assert_clean_failure(run_cli("convert", tmp_path / "nope", "-o", out, "-q"), out, "not a directory")


def test_unsupported_architecture(tmp_path, tiny_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o.gguf"
    _assert_clean_failure(run_cli("convert", d, "-o", out, "-q"), out, "unsupported architecture")


def test_corrupt_safetensors(tmp_path, tiny_dir):
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    st = next(d.glob("*.safetensors"))
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 3])
    out = tmp_path / "o.gguf"
    _assert_clean_failure(run_cli("convert", d, "-o", out, "-q"), out, "safetensors")


def test_nan_weights(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file, save_file
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    st = next(d.glob("*.safetensors"))
    sd = load_file(str(st))
    k = next(k for k in sd if "up_proj" in k)
    sd[k][0, 0] = float("nan")
    save_file(sd, str(st), metadata={"format": "pt"})
    out = tmp_path / "o.gguf"
    _assert_clean_failure(run_cli("convert", d, "-o", out, "-q"), out, "nan")


@pytest.mark.parametrize("args, needle", [
    (["--bases", "9"], "bases"),
    (["--group", "100"], "group"),
    (["--method", "nope"], "unknown method"),
    (["--method", "rtn", "--bases", "2"], "one basis"),
])
def test_impossible_options(tmp_path, tiny_dir, args, needle):
    out = tmp_path / "o.gguf"
    _assert_clean_failure(run_cli("convert", tiny_dir, "-o", out, "-q", *args), out, needle)


def test_rtn_defaults_to_one_basis(tmp_path, tiny_dir):
    """`--method rtn` alone used to take the recipe's --bases 3 and then refuse it (session 13's table queue)."""
    out = tmp_path / "o.gguf"
    r = run_cli("convert", tiny_dir, "-o", out, "-q", "--method", "rtn", "--no-check")
    assert r.returncode == 0, r.stderr
    assert {p.n_planes for p in read_model(out).packed.values()} == {1}


def test_interrupted_convert_leaves_nothing(tmp_path, tiny_dir):
    """SIGINT in the middle of writing: no output and no temp file."""
    import signal
    import time
    out = tmp_path / "o.gguf"
    p = subprocess.Popen([*BITBASIS, "convert", str(tiny_dir), "-o", str(out), "--method", "residual",
                          "--bases", "8", "--group", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".o.gguf.*")) and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    p.wait(60)
    if p.returncode == 0:
        pytest.skip("conversion finished before the signal arrived")
    assert not out.exists()
    assert not list(tmp_path.glob(".o.gguf.*"))


def test_existing_output_needs_force(tmp_path, tiny_dir):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    r = run_cli("convert", tiny_dir, "-o", out, "-q", "--method", "rtn", "--bases", "1")
    assert r.returncode != 0 and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run_cli("convert", tiny_dir, "-o", out, "-q", "--method", "rtn", "--bases", "1", "--force")
    assert r.returncode == 0, r.stderr
    assert read_model(out).packed

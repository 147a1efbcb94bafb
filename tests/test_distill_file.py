"""`bitbasis distill`: QBB's step 3 on an existing file (cli.distill.distill_file), and the reader that
turns a file's packed tensors back into the checkpoint's row order (convert.quantized_from_file)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bitbasis import format as bbf
from bitbasis.cli.distill import distill_file
from bitbasis.convert import ConvertError, ConvertOptions, convert, quantized_from_file
from bitbasis.distill import DistillConfig
from bitbasis.gguf_io import read_model

SMALL = {"seqs": 4, "length": 16, "batch": 2, "lr": 1e-2}


def cfg(**kw):
    return DistillConfig(**dict(SMALL, **kw))


@pytest.fixture(scope="module")
def qbb_file(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "qbb2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="qbb", bases=2, group=64, extra={"rounds": 1, "iters": 2}),
            progress=False)
    return out


def test_reading_a_file_back_inverts_the_writer(tiny_dir, qbb_file, tmp_path):
    from bitbasis.convert import write_converted
    quantized, kv = quantized_from_file(qbb_file, tiny_dir)
    assert len(quantized) == 2 * 7 and kv["bitbasis.method"] == "qbb"
    # q/k rows back in the checkpoint's order: writing them again gives the same tensors
    again = tmp_path / "again.gguf"
    write_converted(tiny_dir, again, ConvertOptions(method="qbb", bases=2, group=64), None, quantized,
                    progress=False)
    a, b = read_model(qbb_file), read_model(again)
    for name, p in a.packed.items():
        for suf, v in p.parts.items():
            assert v.tobytes() == b.packed[name].parts[suf].tobytes(), (name, suf)


def test_zero_steps_leave_the_tensors_unchanged(tiny_dir, qbb_file, tmp_path):
    out = tmp_path / "d0.gguf"
    distill_file(qbb_file, out, tiny_dir, cfg(steps=0), progress=False)
    a, b = read_model(qbb_file), read_model(out)
    assert a.packed.keys() == b.packed.keys()
    for name, p in a.packed.items():
        for suf, v in p.parts.items():
            assert v.tobytes() == b.packed[name].parts[suf].tobytes(), (name, suf)
    assert '"distilled"' in b.kv["bitbasis.settings"]


def test_distillation_moves_scales_not_signs(tiny_dir, qbb_file, tmp_path):
    out = tmp_path / "d3.gguf"
    s = distill_file(qbb_file, out, tiny_dir, cfg(steps=3, ckpt=str(tmp_path / "c.pt")), progress=False)
    assert s["file_bytes"] == out.stat().st_size
    a, b = read_model(qbb_file), read_model(out)
    moved = 0
    for name, p in a.packed.items():
        ua, ub = bbf.unpack(p, name), bbf.unpack(b.packed[name], name)
        np.testing.assert_array_equal(ua.signs, ub.signs)
        moved += not np.array_equal(bbf.full_scales(ua), bbf.full_scales(ub))
    assert moved > 0
    with pytest.raises(FileExistsError):
        distill_file(qbb_file, out, tiny_dir, cfg(steps=0), progress=False)


def test_bad_inputs_are_named(tiny_dir, qbb_file, tmp_path):
    from conftest import tiny_llama_dir
    other = tiny_llama_dir(tmp_path / "other", intermediate_size=256)
    with pytest.raises(ConvertError, match="has shape"):
        quantized_from_file(qbb_file, other)
    f32 = tmp_path / "f32.gguf"
    convert(tiny_dir, f32, ConvertOptions(method="f32"), progress=False)
    with pytest.raises(ConvertError, match="no binary-basis tensors"):
        distill_file(f32, tmp_path / "x.gguf", tiny_dir, cfg(steps=1), progress=False)
    r = subprocess.run([sys.executable, "-m", "bitbasis.cli", "distill", str(qbb_file), "-o", str(tmp_path / "y.gguf"),
                        "--model", str(tiny_dir), "--batch", "0", "-q"], capture_output=True, text=True)
    assert r.returncode != 0 and "batch >= 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "y.gguf").exists()

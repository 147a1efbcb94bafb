"""convert's distillation stage (the CPU recipe, issue 19): after GPTQ only the scales train, against the
f32 model on calibration windows, so the distilled file holds the same signs and plan with other scales
(GPTQ's POW2 scales stay POW2: one trained correction per group, the same bits);
`--distill-steps` sets its length, 0 turns it off, and methods other than the recipe's refuse it."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bitbasis import format as bbf
from bitbasis.convert import ConvertError, ConvertOptions, convert
from bitbasis.gguf_io import read_model, summarize

CALIB = {"samples": 2, "seqlen": 32, "seed": 0, "device": "cpu", "checkpoint": "none"}
DISTILL = {"steps": 2, "seqs": 4, "length": 16, "batch": 2, "lr": 1e-2, "loss": "kl", "swap": 0.0,
           "calib_frac": 1.0, "keep_pow2": True}


def test_distilled_convert_moves_scales_not_signs(tiny_dir, tmp_path):
    files = {}
    for name, dist in (("plain", None), ("distilled", dict(DISTILL, ckpt=str(tmp_path / "c.pt")))):
        files[name] = tmp_path / f"{name}.gguf"
        convert(tiny_dir, files[name], ConvertOptions(method="gptq", bases=2, group=64, calib=CALIB, distill=dist),
                progress=False)
    a, b = read_model(files["plain"]), read_model(files["distilled"])
    assert a.packed.keys() == b.packed.keys()
    assert summarize(a)["block_bpw"] == summarize(b)["block_bpw"]        # keep_pow2: the same bits
    moved = 0
    for name, p in a.packed.items():
        ua, ub = bbf.unpack(p, name), bbf.unpack(b.packed[name], name)
        np.testing.assert_array_equal(ua.signs, ub.signs)
        assert ua.pow2 and ub.pow2, name
        moved += not np.array_equal(bbf.full_scales(ua), bbf.full_scales(ub))
    assert moved == len(a.packed)                  # every linear's scales trained
    settings = json.loads(str(b.kv["bitbasis.settings"]))
    assert settings["distilled"]["steps"] == 2 and settings["distilled"]["train"] == "scales"
    assert "distilled" not in json.loads(str(a.kv["bitbasis.settings"]))


def test_distill_steps_option():
    from bitbasis.cli.convert import recipe_options
    from bitbasis.convert import DEFAULT_RECIPE as R
    assert recipe_options().distill == R["distill"]
    assert recipe_options(distill_steps=0).distill is None
    assert recipe_options(distill_steps=7).distill["steps"] == 7
    with pytest.raises(ConvertError, match="--distill-steps 5: --method residual does not use it"):
        recipe_options(method="residual", bases=2, distill_steps=5)
    with pytest.raises(ConvertError, match="--distill-steps -1: must be >= 0"):
        recipe_options(distill_steps=-1)

"""Seed corpus for fuzz/fuzz_gguf.cpp: tiny llama files written by the real converter.

    python fuzz/make_corpus.py OUT_DIR

A 1-layer random llama (tests/conftest.py tiny_llama_dir) with a 64-token vocabulary cut from
SmolLM2's tokenizer keeps every file small (the interesting bytes are the header and metadata),
converted dense (F32, F16/Q8_0) and binary basis (rtn, residual), plus one file per binary-basis
flag (OFFSET, COLMASK, ELEMCLASS, SPARSE, POW2, COLSCALE and all of them) through a seed-only
quantizer that adds random components to the residual cascade, so the validator sees every
component tensor. ffn 96 with group 64 leaves padding columns in the last group of ffn_down.
Two hand-written minimal models (tests/test_limits.py) put most mutations into the header.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from bitbasis import format as bbf  # noqa: E402
from bitbasis.convert import ConvertOptions, convert  # noqa: E402
from bitbasis.quant.base import register  # noqa: E402
from bitbasis.quant.simple import Residual  # noqa: E402

FLAG_NAMES = {"offset": bbf.OFFSET, "colmask": bbf.COLMASK, "elemclass": bbf.ELEMCLASS, "sparse": bbf.SPARSE,
              "pow2": bbf.POW2, "colscale": bbf.COLSCALE}


@register
@dataclasses.dataclass
class FuzzSeed(Residual):
    """Residual cascade plus random optional components (seed files only, never a real method)."""
    name = "fuzzseed"
    flags: int = 0

    def quantize(self, w, hessian=None) -> bbf.BinaryBasis:
        bb = super().quantize(w, hessian)
        rng = np.random.default_rng(abs(hash(tuple(w.shape))) % 2**32)
        rows, cols = bb.shape
        ng, n = bb.scales.shape[1], bb.n_planes
        f16 = lambda *s: rng.standard_normal(s).astype(np.float16).astype(np.float32) * 0.01
        c = 1 + bool(self.flags & bbf.COLMASK) + bool(self.flags & bbf.ELEMCLASS)
        bb.scales = np.repeat(bb.scales[:, :, :1, :], c, axis=2)
        if self.flags & bbf.POW2:
            bb.pow2 = True
            bb.scales = bb.scales[..., :1]
        if self.flags & bbf.OFFSET:
            bb.offsets = f16(rows, ng, c)
        if self.flags & bbf.COLMASK:
            bb.colmask = rng.random(cols) < 0.2
        if self.flags & bbf.ELEMCLASS:
            ec = rng.random((rows, cols)) < 0.3
            bb.elemclass = ec & ~bb.colmask[None, :] if bb.colmask is not None else ec
        if self.flags & bbf.SPARSE:
            m = rng.random((rows, cols)) < 0.02
            bb.sparse_mask, bb.sparse_codes = m, rng.integers(0, 256, int(m.sum()), dtype=np.uint8)
            bb.sparse_zs = np.abs(f16(rows, 2))
        if self.flags & bbf.COLSCALE:
            bb.colscale = 1 + np.abs(f16(cols))
        return bb


def tiny_dir(path: Path) -> Path:
    from conftest import tiny_llama_dir
    tiny_llama_dir(path, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    # A 64-token BPE tokenizer (the first ids of SmolLM2's, no merges): kilobytes, not megabytes.
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i < 64}
    spec["model"]["merges"] = spec["model"]["merges"][:8]
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["id"] < 64]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bb-fuzz-seeds-"))
    try:
        d = tiny_dir(tmp / "tiny")
        runs = [("f32", "f32", 1, 64, "F32", None), ("f16", "f16", 1, 64, "Q8_0", None),
                ("rtn", "rtn", 1, 64, "Q8_0", None), ("res2", "residual", 2, 64, "F16", None),
                ("res3-g128", "residual", 3, 128, "Q8_0", None)]
        runs += [(f"flag-{k}", "fuzzseed", 2, 64, "F16", {"flags": v}) for k, v in FLAG_NAMES.items()]
        runs.append(("flag-all", "fuzzseed", 3, 64, "Q8_0", {"flags": bbf.KNOWN_FLAGS & ~bbf.POW2}))
        runs.append(("flag-all-pow2", "fuzzseed", 2, 128, "F16", {"flags": bbf.KNOWN_FLAGS}))
        # The smallest files the engine loads (tests/test_limits.py writes them byte by byte):
        # ~1.6 kB, so nearly every mutation lands in the header, the metadata or the tensor infos.
        from test_limits import valid_model
        for tag, bb in (("hand-dense", False), ("hand-bb", True)):
            (out / f"seed-{tag}").write_bytes(valid_model(bb).build())
        for tag, method, n, g, embed, extra in runs:
            f = out / f"seed-{tag}"
            convert(d, tmp / "x.gguf", ConvertOptions(method=method, bases=n, group=g, embed_type=embed,
                                                     extra=extra, force=True), progress=False)
            shutil.copyfile(tmp / "x.gguf", f)
            print(f"{f.name}: {f.stat().st_size} bytes")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "build" / "fuzz" / "seeds")

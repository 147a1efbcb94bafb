"""A bitbasis file's block linears as a compact .pt, and back (for the lent GPU, which takes 64 MiB a
call: the token embedding and norms come from the teacher there, so only the planes and scales
travel; a 62 MB N = 2 file becomes 30 MB). The rebuilt file is byte-identical (sha256 checked).
  here:  python tools/device/start_pt.py pack FILE.gguf OUT.pt [MODEL]
  there: python tools/device/start_pt.py unpack IN.pt FILE.gguf [MODEL]"""
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from bitbasis import format as bbf
from bitbasis import hf
from bitbasis.convert import ConvertOptions, quantized_from_file, write_converted


def pack(src, dst, model):
    quantized, kv = quantized_from_file(src, model)
    out = {}
    for k, bb in quantized.items():
        d = dataclasses.asdict(bb)
        d["signs_shape"] = bb.signs.shape
        d["signs"] = np.packbits(np.asarray(bb.signs, bool).ravel())
        out[k] = d
    torch.save({"quantized": out, "method": str(kv["bitbasis.method"]),
                "settings": str(kv.get("bitbasis.settings", "{}"))}, dst)


def unpack(src, dst, model):
    s = torch.load(src, weights_only=False)
    quantized = {}
    for k, d in s["quantized"].items():
        shape = d.pop("signs_shape")
        d["signs"] = np.unpackbits(d["signs"], count=int(np.prod(shape))).astype(bool).reshape(shape)
        quantized[k] = bbf.BinaryBasis(**d)
    first = next(iter(quantized.values()))
    write_converted(model, dst, ConvertOptions(method=s["method"], bases=first.n_planes, group=first.group),
                    None, quantized, progress=False, settings=json.loads(s["settings"]))


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    model = hf.resolve_model_dir(sys.argv[4] if len(sys.argv) > 4 else "smollm2")
    (pack if verb == "pack" else unpack)(a, b, Path(model))

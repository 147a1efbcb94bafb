"""`bitbasis info`: what a GGUF is (a bitbasis file, a dense one, or a llama.cpp quantized one), its
sizes and true bits per weight, and whether the engine runs it."""
from __future__ import annotations

import math
import os
from collections import Counter

from ._common import _human, print_summary

# tensor types gguf-py's reader dequantizes and the bitbasis file path below handles
_DENSE = {0, 1, 8, 24, 25, 26}


def _llamacpp_file(a, tensors) -> int:
    """A file with llama.cpp's quantized types: name them, and say what would make it work here."""
    from .. import llamacpp_types as lt
    from ..gguf_io import read_metadata
    md = read_metadata(a.model, prefixes=("general.",))
    ft = md.get("general.file_type")
    mix = lt.FTYPE_NAMES.get(int(ft), f"file type {ft}") if isinstance(ft, int) else "mixed types"
    linears = Counter(lt.type_name(t) for name, t, shape in tensors if len(shape) == 2 and name.startswith("blk."))
    params = sum(math.prod(shape) for _, _, shape in tensors)
    size = os.path.getsize(a.model)
    print(f"{a.model}: {md.get('general.architecture', '?')}, llama.cpp {mix} "
          f"(block linears: {', '.join(f'{n} x{c}' for n, c in linears.most_common())})")
    print(f"file        {_human(size)} ({size} bytes), {params:,} parameters")
    print(f"file bpw    {8.0 * size / max(params, 1):.3f} (everything: embeddings, norms, head, metadata)")
    foreign = sorted({lt.type_name(t) for _, t, _ in tensors if t not in lt.ENGINE_TYPES})
    if foreign:
        from ..arch import ARCHS
        how = (f"`bitbasis convert {a.model} -o OUT.gguf` makes one from this file (dequantized once)"
               if md.get("general.architecture") in ARCHS else "`bitbasis convert` makes one from the model's "
               "Hugging Face checkpoint, if its architecture is supported")
        print(f"engine      cannot run {', '.join(foreign)} tensors (it runs F32, F16, Q8_0, Q1_0, Q2_0, TQ1_0, "
              f"TQ2_0 and binary basis): {how}")
    else:
        print("engine      runs it: the low-bit tensors map losslessly onto binary-basis tensors at load")
    if a.tensors:
        for name, t, shape in tensors:
            print(f"  {name:32s} {lt.type_name(t)} {list(shape)}")
    return 0


def run(a) -> int:
    from ..gguf_io import check_structure, read_model, summarize
    from .. import format as bbf
    tensors = check_structure(a.model) if os.path.isfile(a.model) else None
    if tensors and any(t not in _DENSE for _, t, _ in tensors):
        return _llamacpp_file(a, tensors)
    mf = read_model(a.model)
    s = summarize(mf)
    if "bitbasis.method" in mf.kv:
        what = f"method {s['method']}"
    else:   # no binary-basis tensors: say what the linears are stored as
        kinds = Counter(t for n, t in mf.dense_types.items() if n.startswith("blk.") and mf.dense[n].ndim == 2)
        what = "dense " + "/".join(k for k, _ in kinds.most_common()) if kinds else "dense"
    print(f"{a.model}: {mf.arch}, {what}")
    print_summary(s)
    settings = _settings(mf.kv)
    if "rotation" in settings:
        print(f"rotation    {settings['rotation'].get('kind')}, seed {settings['rotation'].get('seed')}")
    from ..rotate import ONLINE_KV
    online = {k[len(ONLINE_KV):]: v for k, v in mf.kv.items() if k.startswith(ONLINE_KV)}
    if online:
        print("online rot. " + ", ".join(f"{k} {v}" for k, v in sorted(online.items()))
              + " (randomized block Hadamard on the input, applied at run time)")
    if "plan" in settings:
        from ..plan import describe
        for line in describe(settings["plan"]):
            print(line)
    if a.tensors:
        for name, p in mf.packed.items():
            print(f"  {name:32s} {bbf.describe(p)}")
        for name, t in mf.dense_types.items():
            print(f"  {name:32s} {t} {list(mf.dense[name].shape)}")
    return 0


def _settings(kv) -> dict:
    import json
    try:
        s = json.loads(str(kv.get("bitbasis.settings", "{}")))
    except json.JSONDecodeError:
        return {}
    return s if isinstance(s, dict) else {}


def add_parser(sub) -> None:
    i = sub.add_parser("info", help="what a GGUF is, its sizes and true bits per weight")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=run)

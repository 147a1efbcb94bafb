"""`bitbasis info`: sizes and true bits per weight of a GGUF."""
from __future__ import annotations


from ._common import print_summary


def run(a) -> int:
    from ..gguf_io import read_model, summarize
    from .. import format as bbf
    mf = read_model(a.model)
    s = summarize(mf)
    print(f"{a.model}: {mf.arch}, method {s['method']}")
    print_summary(s)
    settings = _settings(mf.kv)
    if "rotation" in settings:
        print(f"rotation    {settings['rotation'].get('kind')}, seed {settings['rotation'].get('seed')}")
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
    i = sub.add_parser("info", help="sizes and true bits per weight of a GGUF")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=run)

"""`bitbasis demo`: the main job on the embedded SmolLM2."""
from __future__ import annotations

import os

from ..convert import DEFAULT_RECIPE as R
from ._common import parse_opts, print_summary


def run(a) -> int:
    """The main job on the embedded model: convert, then show size, bits and perplexity."""
    from .. import data, hf
    from ..convert import ConvertOptions, convert
    from ..perplexity import run_perplexity
    model_dir = hf.default_model_dir()
    rot = "-rot" if not a.no_rotate else ""
    out = a.output or str(hf.cache_dir() / f"smollm2-{a.method}-n{a.bases}-g{a.group}{rot}.gguf")
    extra = parse_opts(a.opt) if a.opt else ({"rounds": 0, "iters": 0} if a.method == "qbb" else {})
    calib = {"samples": R["calib_samples"], "seqlen": R["calib_seqlen"], "seed": 0}
    s = convert(model_dir, out, ConvertOptions(method=a.method, bases=a.bases, group=a.group, force=True,
                                               extra=extra or None, calib=calib, rotate=not a.no_rotate,
                                               check=True), progress=True)
    print(f"wrote {out}")
    print_summary(s)
    if "warning" in s:
        print(f"bitbasis: warning: {s['warning']}")
    text = data.text_file("eval")
    res = run_perplexity(out, text, protocol="llamacpp", max_windows=a.windows, threads=a.threads)
    print(f"perplexity  {res['ppl']:.2f} ± {res['stderr']:.2f} ({res['protocol']}, {res['windows']} windows, "
          f"{res['backend']}) on the held-out plays")
    try:
        from ..engine import Model
        m = Model(out, threads=a.threads)
        print("sample     ", end="", flush=True)
        for piece in m.generate("To be, or not to be,", max_tokens=32, temperature=0.0):
            print(piece, end="", flush=True)
        print()
    except ImportError:
        pass
    return 0


def add_parser(sub) -> None:
    m = sub.add_parser("demo", help="convert the embedded SmolLM2, report size, bpw, perplexity, a sample",
                       description="The main job on the embedded SmolLM2-135M-Instruct with convert's default, "
                       f"the best CPU recipe measured: a rotation folded into the weights, GPTQ N={R['bases']} "
                       f"G={R['group']} on {R['calib_samples']}x{R['calib_seqlen']} calibration tokens (a few "
                       "minutes on a 2-core laptop); other settings and their costs are in docs/results.md.")
    m.add_argument("--method", default=R["method"])
    m.add_argument("--bases", type=int, default=R["bases"])
    m.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option")
    m.add_argument("--group", type=int, default=R["group"])
    m.add_argument("--no-rotate", action="store_true", help="no rotation")
    m.add_argument("--windows", type=int, default=20)
    m.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    m.add_argument("-o", "--output")
    m.set_defaults(func=run)

"""`bitbasis demo`: the main job on the embedded SmolLM2."""
from __future__ import annotations

import os

from ..convert import DEFAULT_RECIPE as R
from ._common import print_summary


def run(a) -> int:
    """The main job on the embedded model: convert with convert's defaults (the recipe), then show size,
    bits and perplexity."""
    from .. import data, hf
    from ..convert import convert
    from ..perplexity import run_perplexity
    from .convert import recipe_options
    model_dir = hf.default_model_dir()
    opts = recipe_options(method=a.method, bases=a.bases, group=a.group, opt=a.opt,
                          rotate=False if a.no_rotate else None, force=True)
    if opts.method == "qbb" and not a.opt:
        opts.extra = {"rounds": 0, "iters": 0}
    rot = "-rot" if opts.rotate else ""
    shape = f"p{opts.target_bpw:g}" if opts.target_bpw else f"n{opts.bases}-g{opts.group}"
    out = a.output or str(hf.cache_dir() / f"smollm2-{opts.method}-{shape}{rot}.gguf")
    s = convert(model_dir, out, opts, progress=True)
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
                       f"the best CPU recipe measured: a rotation folded into the weights, a bit plan at "
                       f"{R['target_bpw']} block bpw over GPTQ (act_order) on {R['calib_samples']}x"
                       f"{R['calib_seqlen']} calibration tokens and a 4-bit token embedding, then {R['distill']['steps']} steps "
                       "of distillation of the scales against the f32 model (the blocks' calibration alone is about "
                       "12 minutes of CPU time on a 2-core machine); other settings and their costs are in "
                       "docs/results.md.")
    m.add_argument("--method", default=R["method"])
    m.add_argument("--bases", type=int, help="a uniform model of N bases instead of the recipe's plan")
    m.add_argument("--group", type=int, help="with --bases: columns per scale group")
    m.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option")
    m.add_argument("--no-rotate", action="store_true", help="no rotation")
    m.add_argument("--windows", type=int, default=20)
    m.add_argument("-t", "--threads", type=int, default=None,
                   help="engine threads (default: this machine's physical cores)")
    m.add_argument("-o", "--output")
    m.set_defaults(func=run)

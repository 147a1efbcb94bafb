"""`bitbasis convert`: an HF checkpoint into a bitbasis GGUF."""
from __future__ import annotations

import sys

from ._common import parse_opts, print_summary

BASELINES = ("rtn", "residual", "pbllm", "billm", "arb", "qbb")   # the papers' methods, kept as they are


def options_from_args(a):
    """ConvertOptions from the parsed arguments, the recipe's defaults filled in; an option the method
    would ignore is refused (one line), never dropped silently."""
    from ..convert import ConvertOptions, ConvertError, DEFAULT_RECIPE, DENSE_METHODS
    from ..quant import METHODS
    R = DEFAULT_RECIPE
    dense = a.method in DENSE_METHODS
    cls = METHODS.get(a.method)
    if not dense and cls is None:
        raise ConvertError(f"unknown method {a.method!r}; known: {', '.join(DENSE_METHODS + tuple(sorted(METHODS)))}")
    for flag, val, used in (("--bases", a.bases, not dense and cls.uses_bases),
                            ("--group", a.group, not dense and cls.uses_group),
                            ("--calib-samples", a.calib_samples, not dense and cls.needs_hessian),
                            ("--calib-seqlen", a.calib_seqlen, not dense and cls.needs_hessian),
                            ("--calib-text", a.calib_text, not dense and cls.needs_hessian)):
        if val is not None and not used:
            raise ConvertError(f"{flag}: --method {a.method} does not use it")
    if a.opt and dense:
        raise ConvertError(f"--opt: --method {a.method} has no options")
    calib = {"samples": a.calib_samples or R["calib_samples"], "seqlen": a.calib_seqlen or R["calib_seqlen"],
             "device": a.device, "seed": a.seed}
    if a.calib_text:
        calib["text"] = a.calib_text
    if a.no_checkpoint or a.checkpoint_dir:
        calib["checkpoint"] = "none" if a.no_checkpoint else a.checkpoint_dir
    # the recipe's method gets the recipe's plan, options and embedding/head unless told otherwise;
    # --bases/--group ask for a uniform model instead of the plan's target
    recipe = a.method == R["method"]
    target = a.target_bpw
    if recipe and target is None and a.bases is None and a.group is None:
        target = R["target_bpw"]
    extra = dict(R["opts"], **parse_opts(a.opt)) if recipe else parse_opts(a.opt)
    head, embed = (_bases_arg(flag, val, a.group or R["group"], R[key] if recipe else None)
                   for flag, val, key in (("--head-bases", a.head_bases, "head_bases"),
                                          ("--embed-bases", a.embed_bases, "embed_bases")))
    if a.distill_steps is not None and (not recipe or a.distill_steps < 0):
        raise ConvertError(f"--distill-steps {a.distill_steps}: " + ("must be >= 0" if recipe else
                           f"--method {a.method} does not use it (`bitbasis distill` runs on its file)"))
    dist = R["distill"] if recipe else None
    if a.distill_steps is not None:
        dist = dict(R["distill"] or {}, steps=a.distill_steps) if a.distill_steps else None
    # rtn is one basis by definition, so its default is 1, not the recipe's 3 (which it would refuse)
    bases = a.bases or (1 if a.method == "rtn" else R["bases"])
    return ConvertOptions(method=a.method, bases=bases, group=a.group or R["group"],
                          embed_type=a.embed_type, calib=calib, extra=extra, force=a.force,
                          rotate=(not dense) if a.rotate is None else a.rotate, target_bpw=target,
                          tensor_types=a.tensor_type, head_bases=head, embed_bases=embed,
                          check=not a.no_check, distill=dist,
                          online=("ffn_down",) if a.online_rotation == "down" else ())


def recipe_options(**given):
    """ConvertOptions of `bitbasis convert`'s defaults with some flags (argument names) set: the demo's
    way to run exactly the recipe convert runs."""
    import argparse
    p = argparse.ArgumentParser()
    add_parser(p.add_subparsers())
    a = p.parse_args(["convert", "smollm2", "-o", "-"])
    vars(a).update(given)
    return options_from_args(a)


def _bases_arg(flag: str, val: str | None, group: int, default):
    """--head-bases / --embed-bases N[:G] as (N, G); `default` when not given, None for 'none'."""
    from ..convert import ConvertError
    if val is None:
        return default
    if val == "none":
        return None
    n, _, g = val.partition(":")
    if not n.isdigit() or (g and not g.isdigit()):
        raise ConvertError(f"{flag} {val!r}: expected N or N:G")
    return int(n), int(g) if g else group


def run(a) -> int:
    from .. import hf
    from ..convert import convert
    opts = options_from_args(a)
    s = convert(hf.resolve_model_dir(a.model), a.output, opts, progress=not a.quiet)
    print(f"wrote {a.output}")
    print_summary(s)
    if "worst_layer" in s:
        print(f"worst layer {s['worst_layer'][0]} rel. err {s['worst_layer'][1]:.4f}")
    if "check_ppl" in s:
        print(f"check       perplexity {s['check_ppl'][0]:.2f} on calibration tokens (f32 {s['check_ppl'][1]:.2f})")
    if "warning" in s:
        print(f"bitbasis: warning: {s['warning']}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    from ..convert import DEFAULT_RECIPE as R
    c = sub.add_parser("convert", help="HF checkpoint -> bitbasis GGUF", description=(
        "Convert an HF checkpoint directory (or 'smollm2') into a GGUF. f32/f16 keep every weight "
        "dense; the other methods store block linear weights in the binary-basis type "
        "(formats/binary_basis_v1.md). Embeddings and head use --embed-type unless --head-bases. "
        f"The default is the best CPU recipe measured (docs/results.md §27): a rotation folded into the "
        f"weights, then a bit plan at {R['target_bpw']} block bpw (N and G per tensor from a Fisher "
        f"sensitivity) over GPTQ with act_order, on {R['calib_samples']}x{R['calib_seqlen']} calibration "
        f"tokens{_edge_text(R)} (the papers' 128x2048 is --calib-samples 128 --calib-seqlen 2048). "
        f"--bases/--group make a uniform model instead (GPTQ N={R['bases']} G={R['group']} by default)."))
    c.add_argument("model", help="HF checkpoint directory, a llama.cpp GGUF of a supported architecture "
                                 "(dequantized once into the cache; its tokenizer kept as it is), or 'smollm2'")
    c.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    c.add_argument("--method", default=R["method"],
                   help=f"f32, f16 (dense); gptq (default); baselines, the papers' methods as published: "
                        f"{', '.join(BASELINES)}")
    c.add_argument("--bases", "-N", type=int, help=f"number of binary bases / bits (default {R['bases']}; rtn: 1)")
    c.add_argument("--group", "-G", type=int,
                   help=f"columns per scale group (multiple of 64, default {R['group']})")
    c.add_argument("--embed-type", default="Q8_0", choices=["F32", "F16", "Q8_0"],
                   help="storage of token embedding and (unless --head-bases) output head (default Q8_0)")
    c.add_argument("--rotate", dest="rotate", action="store_true", default=None,
                   help="fold a random orthogonal rotation into the weights (default for quantized methods)")
    c.add_argument("--no-rotate", dest="rotate", action="store_false", help="no rotation")
    c.add_argument("--online-rotation", choices=["down", "none"], default="none",
                   help="down: a randomized block Hadamard H on ffn_down's input, folded into W_down (W·Hᵀ) and "
                        "applied by the engine at run time (x ← H·x, a fast Walsh-Hadamard transform per token): "
                        "flattens the SwiGLU output's outliers before int8 activations and GPTQ (default none)")
    c.add_argument("--target-bpw", type=float, metavar="BPW",
                   help="bit plan: choose N and G per block linear from a measured (Fisher) sensitivity so the "
                        f"block bpw meets BPW (gptq, residual; default {R['target_bpw']} for gptq without "
                        "--bases/--group)")
    c.add_argument("--tensor-type", action="append", metavar="REGEX=N[:G]",
                   help="pin tensors whose GGUF name matches REGEX to N bases (and group G), as llama.cpp's "
                        "--tensor-type; the first matching rule wins; '^output' quantizes the head")
    c.add_argument("--head-bases", metavar="N[:G]", help="store the output head as N bases (group G) too "
                   f"(GPTQ on the head's own Hessian; 'none': --embed-type; default {_ng(R['head_bases'])} for gptq)")
    c.add_argument("--embed-bases", metavar="N[:G]",
                   help="store the token embedding as N bases (group G) too (round to nearest on the grid: a "
                        "lookup table has no activations); a tied head planned alike shares it ('none': "
                        f"--embed-type; default {_ng(R['embed_bases'])} for gptq)")
    c.add_argument("--calib-samples", type=int, help=f"calibration samples (default {R['calib_samples']})")
    c.add_argument("--calib-seqlen", type=int, help=f"tokens per calibration sample (default {R['calib_seqlen']})")
    c.add_argument("--calib-text", help="calibration text file (default: the calibration plays)")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    c.add_argument("--seed", type=int, default=0, help="calibration sampling and rotation seed")
    c.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where calibrated methods keep per-block checkpoints; an interrupted run started "
                        "again with the same settings resumes from them (default: under the cache, "
                        "keyed by model, method and calibration settings; removed when the run completes)")
    c.add_argument("--no-checkpoint", action="store_true", help="keep no per-block checkpoints")
    c.add_argument("--distill-steps", type=int, metavar="STEPS",
                   help="then distil the scales for STEPS steps on calibration windows, the f32 model the teacher "
                        f"(the recipe's other distill settings; gptq only; 0: none; default "
                        f"{(R['distill'] or {}).get('steps', 0)}; `bitbasis distill` runs other settings on a file)")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, e.g. salient=0.1")
    c.add_argument("--no-check", action="store_true",
                   help="skip the check after writing (perplexity of the file against f32 on 512 "
                        "calibration tokens; a collapsed model is warned about)")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=run)


def _ng(v) -> str:
    return f"{v[0]}:{v[1]}" if v else "none"


def _edge_text(R) -> str:
    if not (R["embed_bases"] or R["head_bases"]):
        return ""
    return f", token embedding {_ng(R['embed_bases'])} and head {_ng(R['head_bases'])} as N:G binary bases"

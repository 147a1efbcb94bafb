"""The `bitbasis` command."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def print_summary(s: dict, out=sys.stdout) -> None:
    bpw = s.get("block_bpw")
    print(f"file        {_human(s['file_bytes'])} ({s['file_bytes']} bytes), {s['params']:,} parameters", file=out)
    if bpw is not None:
        print(f"block bpw   {bpw:.3f} true bits per weight over {s['quantized_weights']:,} quantized weights", file=out)
    print(f"file bpw    {s['file_bpw']:.3f} (everything: embeddings, norms, head, metadata)", file=out)
    if "seconds" in s:
        print(f"time        {s['seconds']:.1f} s", file=out)


def _parse_opts(opts) -> dict:
    extra = {}
    for kv in opts or []:
        if "=" not in kv:
            raise ValueError(f"--opt {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v
    return extra


# --- commands -----------------------------------------------------------------------------------

def cmd_convert(a) -> int:
    from . import hf
    from .convert import ConvertOptions, convert
    model_dir = hf.resolve_model_dir(a.model)
    extra = _parse_opts(a.opt)
    calib = {"samples": a.calib_samples, "seqlen": a.calib_seqlen, "device": a.device, "seed": a.seed}
    if a.calib_text:
        calib["text"] = a.calib_text
    if a.no_checkpoint or a.checkpoint_dir:
        calib["checkpoint"] = "none" if a.no_checkpoint else a.checkpoint_dir
    opts = ConvertOptions(method=a.method, bases=a.bases, group=a.group, embed_type=a.embed_type,
                          calib=calib, extra=extra, force=a.force)
    s = convert(model_dir, a.output, opts, progress=not a.quiet)
    print(f"wrote {a.output}")
    print_summary(s)
    return 0


def cmd_distill(a) -> int:
    from . import hf
    from .convert import distill_file
    opts = {"steps": a.steps, "seqs": a.seqs, "len": a.length, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "train": a.train, "sign_lr": a.sign_lr, "gen_batch": a.gen_batch, "device": a.device}
    if a.ckpt:
        opts["ckpt"] = a.ckpt
    s = distill_file(a.input, a.output, hf.resolve_model_dir(a.model), opts, force=a.force, progress=not a.quiet)
    print(f"wrote {a.output}")
    print_summary(s)
    return 0


def cmd_info(a) -> int:
    from .gguf_io import read_model, summarize
    from . import format as bbf
    mf = read_model(a.model)
    s = summarize(mf)
    print(f"{a.model}: {mf.arch}, method {s['method']}")
    print_summary(s)
    if a.tensors:
        for name, p in mf.packed.items():
            print(f"  {name:32s} {bbf.describe(p)}")
        for name, t in mf.dense_types.items():
            print(f"  {name:32s} {t} {list(mf.dense[name].shape)}")
    return 0


def cmd_ppl(a) -> int:
    from .perplexity import perplexity_cli
    return perplexity_cli(a)


def cmd_data(a) -> int:
    from . import data
    if a.which == "split":
        for role, plays in data.SPLIT.items():
            print(f"{role}: {', '.join(plays)}")
        return 0
    path = data.text_file(a.which)
    print(path)
    return 0


def cmd_demo(a) -> int:
    """The main job on the embedded model: convert, then show size, bits and perplexity."""
    from . import data, hf
    from .convert import ConvertOptions, convert
    from .perplexity import run_perplexity
    model_dir = hf.default_model_dir()
    out = a.output or str(hf.cache_dir() / f"smollm2-{a.method}-n{a.bases}-g{a.group}.gguf")
    extra = _parse_opts(a.opt) if a.opt else ({"rounds": 0, "iters": 0} if a.method == "qbb" else {})
    s = convert(model_dir, out, ConvertOptions(method=a.method, bases=a.bases, group=a.group, force=True,
                                               extra=extra or None), progress=True)
    print(f"wrote {out}")
    print_summary(s)
    text = data.text_file("eval")
    res = run_perplexity(out, text, protocol="llamacpp", max_windows=a.windows, threads=a.threads)
    print(f"perplexity  {res['ppl']:.2f} ± {res['stderr']:.2f} ({res['protocol']}, {res['windows']} windows, "
          f"{res['backend']}) on the held-out plays")
    try:
        from .engine import Model
        m = Model(out, threads=a.threads)
        print("sample     ", end="", flush=True)
        for piece in m.generate("To be, or not to be,", max_tokens=32, temperature=0.0):
            print(piece, end="", flush=True)
        print()
    except ImportError:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bitbasis", description=(
        "Quantize Hugging Face LLMs into ~1-2.5 bit binary-basis GGUF files and run them on the CPU. "
        "MODEL may be 'smollm2' (the embedded SmolLM2-135M-Instruct) or an HF checkpoint directory."))
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("convert", help="HF checkpoint -> bitbasis GGUF", description=(
        "Convert an HF checkpoint directory (or 'smollm2') into a GGUF. f32/f16 keep every weight "
        "dense; the other methods store block linear weights in the binary-basis type "
        "(formats/binary_basis_v1.md). Embeddings and head use --embed-type."))
    c.add_argument("model", help="HF checkpoint directory, or 'smollm2'")
    c.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    c.add_argument("--method", default="residual",
                   help="f32, f16, rtn, residual, gptq, pbllm, billm, arb, qbb (default residual)")
    c.add_argument("--bases", "-N", type=int, default=2, help="number of binary bases / bits (1..8, default 2)")
    c.add_argument("--group", "-G", type=int, default=128, help="columns per scale group (multiple of 64, default 128)")
    c.add_argument("--embed-type", default="Q8_0", choices=["F32", "F16", "Q8_0"],
                   help="storage of token embedding and output head (default Q8_0)")
    c.add_argument("--calib-samples", type=int, default=128, help="calibration samples (default 128, as the papers)")
    c.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per calibration sample (default 2048)")
    c.add_argument("--calib-text", help="calibration text file (default: the calibration plays)")
    c.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--checkpoint-dir", metavar="DIR",
                   help="where calibrated methods keep per-block checkpoints; an interrupted run started "
                        "again with the same settings resumes from them (default: under the cache, "
                        "keyed by model, method and calibration settings; removed when the run completes)")
    c.add_argument("--no-checkpoint", action="store_true", help="keep no per-block checkpoints")
    c.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option, e.g. salient=0.1")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("distill", help="data-free distillation of the scales of a bitbasis file (QBB step 3)",
                       description=(
        "QBB's data-free distillation on an existing file: the full-precision MODEL writes its own "
        "training text from random first tokens; only the scales (and offsets) of the block linears "
        "train, on KL + MSE of the logits, teacher blocks swapped for student blocks progressively; "
        "the sign planes stay. Works on files whose linears are plain planes + scales (qbb, gptq, rtn, "
        "residual). A checkpoint every 10 steps: a rerun with the same settings resumes. "
        "--train signs goes beyond the paper: the signs train too (latent weights, straight-through "
        "nearest-level quantizer, cosine learning-rate decay); same file format and bits."))
    t.add_argument("input", help="bitbasis GGUF to distill")
    t.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    t.add_argument("--model", default="smollm2", help="the full-precision teacher: HF directory or 'smollm2' (default)")
    t.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    t.add_argument("--seqs", type=int, default=64, help="teacher-written sequences (default 64)")
    t.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    t.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    t.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the relative scale corrections (default 1e-4)")
    t.add_argument("--train", choices=("scales", "signs"), default="scales",
                   help="what trains: the scales only (the paper, default) or the signs too")
    t.add_argument("--sign-lr", type=float, default=0.01,
                   help="--train signs: Adam learning rate of the latent weights, in units of each group's mean |α| (default 0.01)")
    t.add_argument("--gen-batch", type=int, default=0,
                   help="sequences the teacher writes at once (default: max(batch, 8); larger is faster on a GPU)")
    t.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt", help="checkpoint file (default: under the cache, keyed by settings)")
    t.add_argument("--force", action="store_true", help="overwrite an existing output file")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_distill)

    i = sub.add_parser("info", help="sizes and true bits per weight of a GGUF")
    i.add_argument("model")
    i.add_argument("--tensors", action="store_true", help="list every tensor")
    i.set_defaults(func=cmd_info)

    q = sub.add_parser("ppl", help="perplexity of a GGUF or HF directory on a text", description=(
        "Perplexity with the llama.cpp protocol (context 512, score the second half of each window) "
        "or the papers' protocol (context 2048, non-overlapping windows, every token)."))
    q.add_argument("model", help="bitbasis GGUF, HF directory, or 'smollm2'")
    q.add_argument("--text", default="eval", help="text file, or 'eval'/'calib' for the built-in split (default eval)")
    q.add_argument("--protocol", choices=["llamacpp", "papers"], default="llamacpp")
    q.add_argument("--ctx", type=int, default=None, help="context length (default 512 / 2048 by protocol)")
    q.add_argument("--windows", type=int, default=None, help="score at most this many windows")
    q.add_argument("--backend", choices=["auto", "engine", "torch"], default="auto",
                   help="C++ engine (default for GGUF when available) or the PyTorch reference")
    q.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    q.add_argument("--precise-acts", action="store_true",
                   help="engine: a second int8 pass over each activation's rounding residual "
                        "(BITBASIS_PRECISE_ACTS=1): float-reference accuracy at about twice the matmul time")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_ppl)

    d = sub.add_parser("data", help="paths of the built-in text (shakespeare plays)")
    d.add_argument("which", choices=["eval", "calib", "split"])
    d.set_defaults(func=cmd_data)

    m = sub.add_parser("demo", help="convert the embedded SmolLM2, report size, bpw, perplexity, a sample",
                       description="The main job on the embedded SmolLM2-135M-Instruct. The default (QBB with "
                       "4 bases from a 4-bit start, data-free, ~20 s) is the setting that still gives a usable "
                       "model on a 135M network; lower-bit settings and their costs are in docs/results.md.")
    m.add_argument("--method", default="qbb")
    m.add_argument("--bases", type=int, default=4)
    m.add_argument("--opt", action="append", metavar="KEY=VALUE", help="method option")
    m.add_argument("--group", type=int, default=128)
    m.add_argument("--windows", type=int, default=20)
    m.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1)
    m.add_argument("-o", "--output")
    m.set_defaults(func=cmd_demo)

    _add_engine_commands(sub)
    return p


def _add_engine_commands(sub) -> None:
    """generate / chat / bench live in their own modules once the engine exists."""
    for modname in ("bitbasis.cli_engine", "bitbasis.cli_bench"):
        try:
            mod = __import__(modname, fromlist=["add_commands"])
        except ModuleNotFoundError as e:
            if e.name != modname:
                raise
            continue
        mod.add_commands(sub)


def main(argv=None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        return a.func(a) or 0
    except KeyboardInterrupt:
        print("bitbasis: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FileExistsError, ImportError, RuntimeError) as e:
        if os.environ.get("BITBASIS_DEBUG"):
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"bitbasis: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

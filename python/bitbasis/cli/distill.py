"""`bitbasis distill`: QBB's data-free distillation of a bitbasis file's scales (or signs)."""
from __future__ import annotations


from ._common import print_summary


def run(a) -> int:
    from .. import hf
    from ..convert import distill_file
    opts = {"steps": a.steps, "seqs": a.seqs, "len": a.length, "batch": a.batch, "lr": a.lr, "seed": a.seed,
            "train": a.train, "sign_lr": a.sign_lr, "gen_batch": a.gen_batch, "device": a.device}
    if a.ckpt:
        opts["ckpt"] = a.ckpt
    s = distill_file(a.input, a.output, hf.resolve_model_dir(a.model), opts, force=a.force, progress=not a.quiet)
    print(f"wrote {a.output}")
    print_summary(s)
    return 0


def add_parser(sub) -> None:
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
    t.set_defaults(func=run)

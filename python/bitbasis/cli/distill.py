"""`bitbasis distill`: distillation of a bitbasis file from its full-precision model — QBB's step 3
(scales) or quantization-aware distillation (signs too); one process, or one rank under torchrun."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ._common import print_summary


def distill_file(path, out, model_dir: Path, cfg, force: bool = False, progress: bool = True) -> dict | None:
    """Distil the block linears of the file at `path` (plain planes + scales (+ offsets): qbb, gptq,
    rtn, residual) against the FP model in model_dir (distill.distill with DistillConfig cfg) and write
    `out` atomically; the file's settings gain a "distilled" entry. Returns the summary of `out`, or
    None when the run stopped at a checkpoint (stop_at, time_limit) and on the ranks of a data-parallel
    run that do not write (all but rank 0)."""
    from ..convert import ConvertOptions, quantized_from_file, write_converted
    from ..distill import close_distributed, distill, init_distributed

    model_dir = Path(model_dir)
    cfg.check()
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    model_dir = teacher_dir(path, model_dir)
    quantized, kv = quantized_from_file(path, model_dir)
    first = next(iter(quantized.values()))
    t0 = time.time()
    done = distill(model_dir, quantized, cfg, progress=progress)
    d = init_distributed(cfg.torch_device())
    close_distributed(d)
    if done is None or not d.main:
        return None                                   # stopped at a checkpoint, or not the writing rank
    method = str(kv.get("bitbasis.method", "qbb"))
    try:
        settings = json.loads(str(kv.get("bitbasis.settings", "{}")))
    except json.JSONDecodeError:
        settings = {}
    settings["distilled"] = cfg.settings()
    s = write_converted(model_dir, out, ConvertOptions(method=method, bases=first.n_planes, group=first.group,
                                                       force=force), None, done, progress=False, settings=settings)
    s["seconds"] = time.time() - t0
    return s


def teacher_dir(path, model_dir: Path) -> Path:
    """The checkpoint the file's linears belong to: a file converted with a rotation (convert --rotate,
    the default) holds rotated weights, so its teacher is the same rotation of model_dir (exact: the
    rotated model computes the same function), made once and cached by hf.rotated_checkpoint; likewise an online rotation's fold."""
    from ..gguf_io import read_model
    from ..hf import rotated_checkpoint
    try:
        settings = json.loads(str(read_model(path).kv.get("bitbasis.settings", "{}")))
    except json.JSONDecodeError:
        settings = {}
    rot, online = (settings.get(k) if isinstance(settings, dict) else None for k in ("rotation", "online_rotation"))
    if not rot and not online:
        return Path(model_dir)
    return rotated_checkpoint(Path(model_dir), int((rot or {}).get("seed", 0)), progress=None, residual=bool(rot),
                              online=online)


def config_of(a):
    from ..distill import DistillConfig
    return DistillConfig(steps=a.steps, seqs=a.seqs, length=a.length, batch=a.batch, lr=a.lr, train=a.train,
                         sign_lr=a.sign_lr, loss=a.loss, swap=a.swap, latent=a.latent, grid=a.grid,
                         calib_frac=a.calib_frac, weight_decay=a.weight_decay, clip=a.clip, gen_batch=a.gen_batch,
                         seed=a.seed, device=a.device, ckpt=a.ckpt or "", ckpt_every=a.ckpt_every,
                         eval_every=a.eval_every, eval_windows=a.eval_windows, eval_log=a.eval_log or "",
                         stop_at=a.stop_at, time_limit=a.time_limit, fsdp=a.fsdp,
                         embed_bases=a.embed_bases or "", head_bases=a.head_bases or "")


def run(a) -> int:
    from .. import hf
    s = distill_file(a.input, a.output, hf.resolve_model_dir(a.model), config_of(a), force=a.force,
                     progress=not a.quiet)
    if s is not None:
        print(f"wrote {a.output}")
        print_summary(s)
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("distill", help="distil a bitbasis file from its full-precision model (QBB step 3 / QAT)",
                       description=(
        "Distillation on an existing file: the full-precision MODEL writes its own training text from "
        "random first tokens (optionally mixed with calibration text) and is the teacher (KL on the logits). "
        "--train scales (default, QBB's step 3): only the scales and offsets of the block linears train, "
        "teacher blocks swapped for student blocks progressively. --train signs: quantization-aware "
        "distillation — latent weights whose nearest levels on the stored grid are the signs "
        "(straight-through), learned scales and offsets; same file format and bits. AdamW, cosine decay, "
        "clipping, bf16 on CUDA. Works on files whose linears are plain planes + scales (qbb, gptq, rtn, "
        "residual). Checkpoints resume across runs. Under torchrun the same command is one rank of a "
        "data-parallel job (gloo on CPU, nccl on CUDA), or with --fsdp of a sharded one; rank 0 writes."))
    t.add_argument("input", help="bitbasis GGUF to distill")
    t.add_argument("-o", "--output", required=True, help="output .gguf (written atomically)")
    t.add_argument("--model", default="smollm2", help="the full-precision teacher: HF directory or 'smollm2' (default)")
    t.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    t.add_argument("--seqs", type=int, default=64, help="training sequences (default 64)")
    t.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    t.add_argument("--batch", type=int, default=4, help="sequences per step over all ranks (default 4)")
    t.add_argument("--lr", type=float, default=1e-4, help="learning rate of the relative scale corrections (default 1e-4)")
    t.add_argument("--train", choices=("scales", "signs"), default="scales",
                   help="what trains: the scales only (the paper, default) or the signs too (QAT)")
    t.add_argument("--sign-lr", type=float, default=0.01,
                   help="--train signs: learning rate of the latent weights, in units of each group's mean |α| (default 0.01)")
    t.add_argument("--loss", choices=("kl", "kl+mse", "cakld"), default="kl+mse",
                   help="forward KL, KL + MSE of the logits (QBB, default), or BitDistiller's confidence-aware KL")
    t.add_argument("--swap", type=float, default=0.5,
                   help="fraction of the steps over which student blocks replace teacher blocks, first block first (default 0.5; 0: all at once)")
    t.add_argument("--latent", choices=("file", "teacher"), default="file",
                   help="--train signs: latents start at the file's weights (default; step 0 is the file) or the teacher's")
    t.add_argument("--grid", choices=("file", "paretoq"), default="file",
                   help="start from the file's scales (default) or ParetoQ's per-bit-width grid of the teacher's weights")
    t.add_argument("--calib-frac", type=float, default=0.0,
                   help="fraction of the sequences taken from the calibration text instead of the teacher (default 0; "
                        "0.5 gave QAT a clearly lower held-out perplexity than 0, docs/results.md §31)")
    t.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    t.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default 1)")
    t.add_argument("--gen-batch", type=int, default=0,
                   help="sequences the teacher writes at once (default: max(batch, 8); larger is faster on a GPU)")
    t.add_argument("--device", default="", help="cpu or cuda (default: cuda when present)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--ckpt", help="checkpoint file (default: under the cache, keyed by settings)")
    t.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints (default 50)")
    t.add_argument("--eval-every", type=int, default=0,
                   help="steps between held-out perplexities of the student (torch, llama.cpp protocol; default 0: none)")
    t.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation (default 8)")
    t.add_argument("--eval-log", help="append the evaluations as JSON lines {step, tokens, ppl} here")
    t.add_argument("--stop-at", type=int, default=0,
                   help="checkpoint and stop after this step, writing no file; the same command continues (default 0: run to the end)")
    t.add_argument("--time-limit", type=float, default=0,
                   help="checkpoint and stop after this many seconds of training (for time-limited machines; default 0: none)")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard teacher and student over the processes with FSDP2 (fully_shard per "
                        "block) for models that do not fit one device, instead of a copy per process; needs --swap 0")
    t.add_argument("--embed-bases", metavar="N:G",
                   help="quantize the token embedding (a Q8_0/dense one in the file) as N bases in groups of G and "
                        "train it with the block linears (e.g. 4:64; default: as in the file)")
    t.add_argument("--head-bases", metavar="N:G",
                   help="likewise the output head (e.g. 4:64). A model whose head is tied to its embedding has one "
                        "tensor: either option quantizes it")
    t.add_argument("--force", action="store_true", help="overwrite an existing output file")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run)

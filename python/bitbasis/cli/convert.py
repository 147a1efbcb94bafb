"""`bitbasis convert`: an HF checkpoint into a bitbasis GGUF."""
from __future__ import annotations


from ._common import parse_opts, print_summary


def run(a) -> int:
    from .. import hf
    from ..convert import ConvertOptions, convert
    model_dir = hf.resolve_model_dir(a.model)
    extra = parse_opts(a.opt)
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


def add_parser(sub) -> None:
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
    c.set_defaults(func=run)

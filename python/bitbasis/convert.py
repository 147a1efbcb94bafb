"""HF checkpoint directory -> bitbasis GGUF."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from . import arch as A
from . import format as bbf
from . import hf
from .arch import is_block_linear
from .gguf_io import ModelTensors, read_model, summarize, write_model
from .rotate import RotationError, online_block, online_kv

DENSE_METHODS = ("f32", "f16")


class ConvertError(ValueError):
    pass


@dataclasses.dataclass
class ConvertOptions:
    method: str = "residual"
    bases: int = 2
    group: int = 128
    embed_type: str = "Q8_0"       # token embedding and output head
    calib: dict | None = None      # calibration options for methods that need a Hessian
    extra: dict | None = None      # method-specific options (salient fraction, ...)
    force: bool = False            # never overwrite an existing output unless asked
    rotate: bool = False           # fold a random orthogonal rotation into the weights first (bitbasis.rotate)
    online: tuple = ()             # sites of an online rotation applied at run time: ("ffn_down",) (bitbasis.rotate)
    target_bpw: float | None = None          # a bit plan for this block bpw (bitbasis.plan)
    tensor_types: list | None = None         # plan rules: ["REGEX=N[:G]", ...]
    head_bases: tuple[int, int] | None = None   # quantize the output head too: (N, G)
    embed_bases: tuple[int, int] | None = None  # quantize the token embedding too: (N, G)
    check: bool = False            # after writing: warn when the model has collapsed (collapse_check)
    distill: dict | None = None    # then distil the quantized linears' scales: DistillConfig fields (bitbasis.distill)


# The best CPU recipe measured (docs/results.md §27, §33, §38): the CLI's and the demo's defaults. A rotation, then
# a bit plan at 3.4 block bpw (N, G per tensor from the Fisher sensitivity) over GPTQ with act_order, on 64 x
# 512 calibration tokens (32 x 512: 45.60, 64 x 512: 45.35, one run on 40 windows), and the token embedding as 4
# bases in groups of 64 (4.5 bpw: -13.5 MiB for +0.5% perplexity; 576 columns are 9 whole groups, where
# 128 pads a fifth group to 4.72 bpw), and the output head likewise, by GPTQ on its own Hessian (43.20 -> 43.59 for
# -13.5 MiB, 88.8 -> 75.3 MiB, §39; the head is 21% of decode bytes in Q8_0). Then a
# short distillation of the scales (EfficientQAT's E2E-QP: KL to the f32 logits on 4 x 1024 calibration
# tokens, one correction per group so GPTQ's POW2 scales and bits stay): 45.43 -> 43.25 at 3.400 bpw, 40 windows (§38).
# bases/group: the uniform setting when --bases/--group replace the plan.
DEFAULT_RECIPE = dict(method="gptq", target_bpw=3.4, opts={"act_order": True}, bases=3, group=192, rotate=True,
                      calib_samples=64, calib_seqlen=512, embed_bases=(4, 64), head_bases=(4, 64),
                      distill=dict(steps=4, seqs=16, length=256, batch=4, lr=2e-3, loss="kl", swap=0.0,
                                   calib_frac=1.0, keep_pow2=True))
COLLAPSE_RATIO = 4.0               # perplexity of the file / of the f32 model above which it has collapsed


def convert(model_dir: str | Path, out: str | Path, opts: ConvertOptions, progress: bool = True) -> dict:
    from .quant import get_quantizer, QuantizerError

    model_dir = Path(model_dir)
    if Path(out).exists() and not opts.force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    if opts.embed_type not in ("F32", "F16", "Q8_0"):
        raise ConvertError(f"--embed-type {opts.embed_type}: must be F32, F16 or Q8_0")
    cfg = hf.load_config(model_dir)             # a clear error for a directory that is not a checkpoint
    quantizer = None
    if opts.method not in DENSE_METHODS:
        try:
            quantizer = get_quantizer(opts.method, bases=opts.bases, group=opts.group, **(opts.extra or {}))
        except QuantizerError as e:
            raise ConvertError(str(e)) from None
    planned = opts.target_bpw is not None or opts.tensor_types or opts.head_bases or opts.embed_bases
    if planned and (quantizer is None or hasattr(quantizer, "quantize_model")):
        raise ConvertError(f"--method {opts.method}: no bit plan (--target-bpw, --tensor-type, --head-bases, "
                           f"--embed-bases) "
                           f"for dense or whole-model methods")
    t0 = time.time()
    source_dir = model_dir
    if opts.rotate or opts.online:
        seed = int((opts.calib or {}).get("seed") or 0)
        try:
            online = {site: {"block": online_block(int(cfg.get("intermediate_size") or 0)), "seed": seed}
                      for site in opts.online}
            model_dir = hf.rotated_checkpoint(model_dir, seed, progress=print if progress else None,
                                              residual=opts.rotate, online=online)
        except RotationError as e:
            raise ConvertError(str(e)) from None
    if planned:
        from . import plan as bbplan
        try:
            p = bbplan.make_plan(model_dir, opts.method, quantizer.bases, quantizer.group, opts.target_bpw,
                                 bbplan.parse_tensor_types(opts.tensor_types), opts.head_bases, opts.calib,
                                 progress=progress, embed=opts.embed_bases)
            quantizer = bbplan.PlannedQuantizer(p, opts.extra, cfg)
        except (bbplan.PlanError, QuantizerError) as e:
            raise ConvertError(str(e)) from None
        if progress:
            print(f"plan: block bpw {p.bpw():.4f}" + (f" (target {opts.target_bpw})" if opts.target_bpw else ""))
    quantized: dict[str, bbf.BinaryBasis] = {}
    errors: dict[str, float] = {}
    if quantizer is not None and hasattr(quantizer, "quantize_model"):  # whole-model methods (QBB)
        quantized = quantizer.quantize_model(model_dir, opts.calib or {}, progress=progress)
    elif quantizer is not None and quantizer.needs_hessian:
        from .calibrate import quantize_model
        quantized = quantize_model(model_dir, quantizer, opts.calib or {}, progress=progress, errors=errors)
    settings = dict(quantizer.settings()) if quantizer else {}
    if opts.rotate:
        settings["rotation"] = {"kind": "randomized Hadamard x random orthogonal, residual + per-head V/O",
                                "seed": int((opts.calib or {}).get("seed") or 0)}
    if opts.online:
        settings["online_rotation"] = hf.online_spec(hf.load_config(model_dir), model_dir)
    if opts.distill and quantized:
        # EfficientQAT's end-to-end stage on the CPU: only the scales of the quantized linears train (KL to
        # the f32 model's logits); the signs, the plan and the bits stay. The teacher is model_dir, i.e.
        # the rotated checkpoint when rotating (the same function); the embedding, quantized below, is f32
        # while training
        from .distill import DistillConfig, DistillError, close_distributed, distill, init_distributed
        dcfg = DistillConfig(**dict(opts.distill, device=(opts.calib or {}).get("device") or ""))
        try:
            quantized = distill(model_dir, quantized, dcfg, progress=progress)
        except DistillError as e:
            raise ConvertError(str(e)) from None
        close_distributed(init_distributed(dcfg.torch_device()))
        settings["distilled"] = dcfg.settings()
    s = write_converted(model_dir, out, opts, quantizer, quantized, progress=progress, settings=settings)
    s["seconds"] = time.time() - t0
    if errors:
        worst = max(errors, key=errors.get)
        s["worst_layer"] = (worst, errors[worst])
    if opts.check and quantizer is not None:
        s.update(collapse_check(source_dir, out))
    return s


def collapse_check(model_dir: Path, path, tokens: int = 512) -> dict:
    """Perplexity of the written file (engine) against the f32 model (transformers) on the same
    calibration tokens: a file COLLAPSE_RATIO times worse has collapsed (e.g. residual N = 2 on
    SmolLM2, 459,675), and the caller warns. Returns {"check_ppl": (file, f32)} and maybe "warning"."""
    import math
    import torch
    from . import data
    from .perplexity import score_window
    try:
        from .engine import Model
    except ImportError:                        # no native library: nothing to run the file with
        return {}
    tokens = min(tokens, int(hf.load_config(model_dir).get("max_position_embeddings") or tokens))
    text = data.read_text("calib")[:20 * tokens]               # a prefix: tokenizing all plays costs seconds
    ids = np.asarray(hf.load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"][:tokens], np.int64)
    with torch.no_grad():
        ref = hf.load_torch_model(model_dir)(torch.as_tensor(ids[None])).logits[0].numpy()
    m = Model(str(path), threads=2)
    got = np.asarray(m.logits(ids.tolist()), np.float32)
    ppl_q = math.exp(float(score_window(got, ids, 0).mean()))
    ppl_f = math.exp(float(score_window(ref, ids, 0).mean()))
    out = {"check_ppl": (ppl_q, ppl_f)}
    if not ppl_q <= COLLAPSE_RATIO * ppl_f:    # NaN counts as collapsed
        out["warning"] = (f"{path}: the model has collapsed: perplexity {ppl_q:.1f} on {len(ids)} calibration "
                          f"tokens against {ppl_f:.1f} for f32 (try more bases, --method gptq, or a rotation)")
    return out


def write_converted(model_dir: Path, out, opts: ConvertOptions, quantizer, quantized: dict[str, bbf.BinaryBasis],
                    progress: bool = True, settings: dict | None = None) -> dict:
    """Write the GGUF: `quantized` {hf_name: BinaryBasis} for the block linears it holds (the rest are
    quantized here, data-free), every other weight dense; llama.cpp's names, q/k row order and norm
    convention (Gemma: the file holds 1 + w)."""
    from tqdm import tqdm
    import torch

    cfg = hf.load_config(model_dir)
    arch = A.for_config(cfg)
    sd = hf.load_state_dict(model_dir)
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    kv = hf.arch_kv(cfg, Path(model_dir).name) + hf.tokenizer_kv(model_dir, cfg)
    kv += [(k, v, _uint32()) for k, v in online_kv(hf.online_spec(cfg, Path(model_dir)))]   # the engine applies it

    covers = (lambda k: k in quantized or quantizer is not None and quantizer.covers(k))
    emb_k, head_k = "model.embed_tokens.weight", "lm_head.weight"
    if head_k not in sd and covers(head_k):          # a tied head quantized
        if covers(emb_k) and _same_setting(quantizer, quantized, emb_k, head_k):
            quantized = dict(quantized)                  # one tensor serves both, quantized for the head
            quantized[emb_k] = quantized.pop(head_k, None) or _quantize_uncalibrated(quantizer, head_k, sd[emb_k])
        else:
            sd[head_k] = sd[emb_k]                       # its own tensor
    names = {k: hf.gguf_name(k, n_layers, arch) for k in sd if not k.endswith("rotary_emb.inv_freq")}
    dense, packed = [], []
    it = tqdm(sorted(names.items(), key=lambda kv_: _order(kv_[1])), desc=f"convert {opts.method}",
              disable=not progress, unit="tensor")
    for hf_name, g_name in it:
        w = sd[hf_name]
        perm = None
        if arch.permute_qk and g_name.endswith(("attn_q.weight", "attn_k.weight")):
            perm = hf.qk_row_permutation(w.shape[0], n_head if "attn_q" in g_name else n_kv)
        if arch.norm_offset and g_name.endswith("norm.weight"):
            w = w + np.float32(arch.norm_offset)
        if hf_name in quantized or (quantizer is not None and (is_block_linear(g_name) or quantizer.covers(hf_name))):
            bb = quantized.get(hf_name)
            if bb is None:
                bb = _quantize_uncalibrated(quantizer, hf_name, w)
            if perm is not None:
                bb = bbf.permute_rows(bb, perm)
            packed.append((g_name, bbf.pack(bb)))
            continue
        if perm is not None:
            w = w[perm]
        if opts.method == "f32":
            kind = "F32"
        elif g_name in ("token_embd.weight", "output.weight"):
            kind = opts.embed_type
        else:
            kind = "F16"
        dense.append((g_name, w, kind))
    factors = A.llama3_rope_factors(cfg)
    if factors is not None:
        dense.append(("rope_freqs.weight", factors, "F32"))
    if settings is None:
        settings = quantizer.settings() if quantizer else {}
    if opts.calib and quantizer is not None and quantizer.needs_hessian:
        settings["calibration"] = {k: v for k, v in opts.calib.items() if k != "checkpoint"}
    mt = ModelTensors(arch=arch.name, kv=kv, dense=dense, packed=packed, method=opts.method, settings=settings)
    write_model(out, mt, force=opts.force)
    return summarize(read_model(out))


def _uint32():
    import gguf
    return gguf.GGUFValueType.UINT32


def _quantize_uncalibrated(quantizer, hf_name: str, w: np.ndarray) -> bbf.BinaryBasis:
    """A tensor no calibration pass has quantized: a data-free method's block linear, or the token
    embedding. The embedding is a lookup table, not a product with activations: no input statistics
    weigh its columns, so a calibrated method gets H = I, under which GPTQ's error feedback vanishes
    and it rounds each weight to the nearest point of its (range-searched) grid."""
    import torch
    q = quantizer.for_tensor(hf_name)
    H = torch.eye(w.shape[1], dtype=torch.float32) if q.needs_hessian else None
    return q.quantize(torch.from_numpy(w), H)


def _same_setting(quantizer, quantized, emb_k: str, head_k: str) -> bool:
    """Whether a tied checkpoint's embedding and head are planned in the same form (N, G), so that one
    tensor, quantized as the head (its Hessian when calibrated), serves both."""
    plan = getattr(quantizer, "plan", None)
    return plan is not None and plan.tensors.get("token_embd.weight") == plan.tensors.get("output.weight")


def quantized_from_file(path, model_dir: Path) -> tuple[dict[str, bbf.BinaryBasis], dict]:
    """The block linears of a bitbasis GGUF as {hf_name: BinaryBasis} in the HF checkpoint's row order
    (llama.cpp's q/k row permutation undone), checked against the checkpoint's shapes; and the file's
    KV metadata. The inverse of write_converted for the packed tensors."""
    mf = read_model(path)
    cfg = hf.load_config(model_dir)
    arch = A.for_config(cfg)
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    sd = hf.load_state_dict(model_dir)
    out = {}
    for hf_name, w in sd.items():
        g_name = hf.gguf_name(hf_name, n_layers, arch) if not hf_name.endswith("rotary_emb.inv_freq") else None
        if g_name not in mf.packed:
            continue
        bb = bbf.unpack(mf.packed[g_name], g_name)
        if bb.shape != tuple(w.shape):
            raise ConvertError(f"{path}: {g_name} has shape {list(bb.shape)}, the checkpoint {model_dir} "
                               f"has {list(w.shape)} (a file of another model?)")
        if arch.permute_qk and g_name.endswith(("attn_q.weight", "attn_k.weight")):
            perm = hf.qk_row_permutation(bb.shape[0], n_head if "attn_q" in g_name else n_kv)
            bb = bbf.permute_rows(bb, np.argsort(perm))
        out[hf_name] = bb
    if not out:
        raise ConvertError(f"{path}: no binary-basis tensors (a dense f32/f16 file?)")
    missing = [k for k in sd if not k.endswith("rotary_emb.inv_freq") and k not in out
               and is_block_linear(hf.gguf_name(k, n_layers, arch))]
    if missing:
        raise ConvertError(f"{path}: {len(missing)} block linears of {model_dir} are not binary-basis "
                           f"tensors in the file (first: {missing[0]})")
    return out, mf.kv


def _order(name: str):
    """Token embedding first, then blocks in order, then the head: the order llama.cpp writes."""
    if name.startswith("blk."):
        parts = name.split(".")
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if name.startswith("token_embd") else 2, 0, name)

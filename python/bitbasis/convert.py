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


def convert(model_dir: str | Path, out: str | Path, opts: ConvertOptions, progress: bool = True) -> dict:
    from .quant import get_quantizer, QuantizerError

    model_dir = Path(model_dir)
    if Path(out).exists() and not opts.force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    if opts.embed_type not in ("F32", "F16", "Q8_0"):
        raise ConvertError(f"--embed-type {opts.embed_type}: must be F32, F16 or Q8_0")
    hf.load_config(model_dir)                   # a clear error for a directory that is not a checkpoint
    quantizer = None
    if opts.method not in DENSE_METHODS:
        try:
            quantizer = get_quantizer(opts.method, bases=opts.bases, group=opts.group, **(opts.extra or {}))
        except QuantizerError as e:
            raise ConvertError(str(e)) from None
    t0 = time.time()
    quantized: dict[str, bbf.BinaryBasis] = {}
    if quantizer is not None and hasattr(quantizer, "quantize_model"):  # whole-model methods (QBB)
        quantized = quantizer.quantize_model(model_dir, opts.calib or {}, progress=progress)
    elif quantizer is not None and quantizer.needs_hessian:
        from .calibrate import quantize_model
        quantized = quantize_model(model_dir, quantizer, opts.calib or {}, progress=progress)
    s = write_converted(model_dir, out, opts, quantizer, quantized, progress=progress)
    s["seconds"] = time.time() - t0
    return s


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
        if is_block_linear(g_name) and (hf_name in quantized or quantizer is not None):
            bb = quantized.get(hf_name)
            if bb is None:
                bb = quantizer.quantize(torch.from_numpy(w), None)
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


def distill_file(path, out, model_dir: Path, distill_opts: dict, force: bool = False,
                 progress: bool = True) -> dict:
    """QBB's step 3 on an existing file: data-free distillation of the scales (bitbasis.distill) of
    any file whose block linears are plain planes + scales (+ offsets): qbb, gptq, rtn, residual.
    The signs stay; the file's settings gain a "distilled" entry."""
    import json
    from .distill import distill
    from .quant import get_quantizer, QuantizerError

    model_dir = Path(model_dir)
    if Path(out).exists() and not force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    quantized, kv = quantized_from_file(path, model_dir)
    first = next(iter(quantized.values()))
    opts = {f"distill_{k}": v for k, v in distill_opts.items() if k not in ("seed", "device")}
    try:
        q = get_quantizer("qbb", bases=first.n_planes, group=first.group, seed=distill_opts.get("seed", 0),
                          device=distill_opts.get("device") or "", **opts)
    except (QuantizerError, TypeError) as e:
        raise ConvertError(f"distill: {e}") from None
    if q.distill_steps < 0:
        raise ConvertError("distill: steps must be >= 0")
    t0 = time.time()
    done = distill(model_dir, quantized, q, progress=progress)
    method = str(kv.get("bitbasis.method", "qbb"))
    try:
        settings = json.loads(str(kv.get("bitbasis.settings", "{}")))
    except json.JSONDecodeError:
        settings = {}
    settings["distilled"] = {k: v for k, v in q.settings().items() if k.startswith("distill_") or k == "seed"}
    s = write_converted(model_dir, out, ConvertOptions(method=method, bases=first.n_planes, group=first.group,
                                                       force=force), q, done, progress=False, settings=settings)
    s["seconds"] = time.time() - t0
    return s


def _order(name: str):
    """Token embedding first, then blocks in order, then the head: the order llama.cpp writes."""
    if name.startswith("blk."):
        parts = name.split(".")
        return (1, int(parts[1]), ".".join(parts[2:]))
    return (0 if name.startswith("token_embd") else 2, 0, name)

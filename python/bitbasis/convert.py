"""HF checkpoint directory -> bitbasis GGUF."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from . import format as bbf
from . import hf
from .gguf_io import ModelTensors, read_model, summarize, write_model

LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
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


def is_block_linear(gguf_name: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.endswith(LINEAR_SUFFIXES)


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
    quantized here, data-free), every other weight dense; llama.cpp's names and q/k row order."""
    from tqdm import tqdm
    import torch

    cfg = hf.load_config(model_dir)
    sd = hf.load_state_dict(model_dir)
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    kv = hf.arch_kv(cfg, Path(model_dir).name) + hf.tokenizer_kv(model_dir, cfg)

    names = {k: hf.gguf_name(k, n_layers) for k in sd if not k.endswith("rotary_emb.inv_freq")}
    dense, packed = [], []
    it = tqdm(sorted(names.items(), key=lambda kv_: _order(kv_[1])), desc=f"convert {opts.method}",
              disable=not progress, unit="tensor")
    for hf_name, g_name in it:
        w = sd[hf_name]
        perm = None
        if g_name.endswith(("attn_q.weight", "attn_k.weight")):
            perm = hf.qk_row_permutation(w.shape[0], n_head if "attn_q" in g_name else n_kv)
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
    factors = hf.llama3_rope_factors(cfg)
    if factors is not None:
        dense.append(("rope_freqs.weight", factors, "F32"))
    if settings is None:
        settings = quantizer.settings() if quantizer else {}
    if opts.calib and quantizer is not None and quantizer.needs_hessian:
        settings["calibration"] = {k: v for k, v in opts.calib.items() if k != "checkpoint"}
    mt = ModelTensors(arch="llama", kv=kv, dense=dense, packed=packed, method=opts.method, settings=settings)
    write_model(out, mt, force=opts.force)
    return summarize(read_model(out))


def quantized_from_file(path, model_dir: Path) -> tuple[dict[str, bbf.BinaryBasis], dict]:
    """The block linears of a bitbasis GGUF as {hf_name: BinaryBasis} in the HF checkpoint's row order
    (llama.cpp's q/k row permutation undone), checked against the checkpoint's shapes; and the file's
    KV metadata. The inverse of write_converted for the packed tensors."""
    mf = read_model(path)
    cfg = hf.load_config(model_dir)
    n_layers, n_head = int(cfg["num_hidden_layers"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    sd = hf.load_state_dict(model_dir)
    out = {}
    for hf_name, w in sd.items():
        g_name = hf.gguf_name(hf_name, n_layers) if not hf_name.endswith("rotary_emb.inv_freq") else None
        if g_name not in mf.packed:
            continue
        bb = bbf.unpack(mf.packed[g_name], g_name)
        if bb.shape != tuple(w.shape):
            raise ConvertError(f"{path}: {g_name} has shape {list(bb.shape)}, the checkpoint {model_dir} "
                               f"has {list(w.shape)} (a file of another model?)")
        if g_name.endswith(("attn_q.weight", "attn_k.weight")):
            perm = hf.qk_row_permutation(bb.shape[0], n_head if "attn_q" in g_name else n_kv)
            bb = bbf.permute_rows(bb, np.argsort(perm))
        out[hf_name] = bb
    if not out:
        raise ConvertError(f"{path}: no binary-basis tensors (a dense f32/f16 file?)")
    missing = [k for k in sd if not k.endswith("rotary_emb.inv_freq") and k not in out
               and is_block_linear(hf.gguf_name(k, n_layers))]
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

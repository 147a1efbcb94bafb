"""Calibration: GPTQ's layer-by-layer pipeline for every Hessian-based quantizer.

Capture the inputs of block 0 on `samples` random windows of `seqlen` calibration tokens; then for each
block k: hooks accumulate H = 2/n Σ x xᵀ over the n calibration tokens for every linear (q, k, v share
one input, so one Hessian; gate and up share another), each linear is quantized, the weights the file
will hold (pack → unpack → dequantize) are written back into the block, and block k is re-run with
them to give the inputs of block k+1. Only one block's activations (inputs and outputs) are held.

Each finished block's quantized linears are checkpointed (one small .npz per block, under the cache,
keyed by the model, the quantizer settings and the calibration options), so an interrupted run resumes:
finished blocks are not re-quantized, only re-run with their stored weights to rebuild the next block's
inputs, which gives the same bytes as an uninterrupted run. The checkpoints go when the run completes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import arch as A
from . import format as bbf

MAX_CHUNK_TOKENS = 4096  # tokens per forward chunk (bounds attention and MLP activation memory)


class CalibrationError(ValueError):
    """Calibration input that cannot be used (empty or short text, bad options, NaN weights)."""


def resolve_device(spec: str | None) -> str:
    import torch
    if spec in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("--device cuda: no CUDA device available (use --device cpu)")
    if spec not in ("cpu", "cuda"):
        raise CalibrationError(f"--device {spec!r}: must be cpu or cuda")
    return spec


def calibration_tokens(tokenizer, text_spec: str | None) -> np.ndarray:
    from . import data
    if text_spec:
        p = Path(text_spec)
        if not p.is_file():
            raise CalibrationError(f"calibration text {p} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
    else:
        text = data.read_text("calib")
    if not text.strip():
        raise CalibrationError(f"calibration text {text_spec or 'calib'} is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, np.int64)


def sample_windows(tokens: np.ndarray, samples: int, seqlen: int, seed: int) -> np.ndarray:
    """`samples` windows of `seqlen` tokens at random offsets (GPTQ's get_wikitext2 sampling)."""
    if samples < 1 or seqlen < 2:
        raise CalibrationError(f"calibration needs samples >= 1 and seqlen >= 2 (got {samples}, {seqlen})")
    if len(tokens) < seqlen:
        raise CalibrationError(f"calibration text has {len(tokens)} tokens, fewer than one sample of "
                               f"{seqlen} (use a longer text or a smaller --calib-seqlen)")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(tokens) - seqlen + 1, size=samples)
    return np.stack([tokens[s:s + seqlen] for s in starts])


class _Captured(Exception):
    pass


def _block_inputs(model, ids, dev, chunk):
    """Run the model past its blocks and keep what block 0 receives (GPTQ's Catcher) and the keyword
    arguments each block receives: they differ by layer type (Gemma 3's sliding-window layers get
    their own mask and RoPE). Every block is replaced by a pass-through while this runs."""
    import torch
    layers = model.model.layers
    inps, kws = [], [dict() for _ in layers]
    orig = list(layers)

    class Catcher(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k
            self.attention_type = getattr(orig[k], "attention_type", None)

        def forward(self, x, *args, **kwargs):
            if self.k == 0:
                inps.append(x.detach())
            kws[self.k].update(kwargs)
            if self.k == len(orig) - 1:
                raise _Captured
            return x

    for k in range(len(layers)):
        layers[k] = Catcher(k)
    try:
        with torch.no_grad():
            for i in range(0, len(ids), chunk):
                try:
                    model(torch.as_tensor(ids[i:i + chunk], device=dev), use_cache=False)
                except _Captured:
                    pass
    finally:
        for k, m in enumerate(orig):
            layers[k] = m
    for kw in kws:
        kw.pop("past_key_values", None)
        kw["use_cache"] = False
    return torch.cat(inps), kws


def _run_block(layer, inps, kw, chunk):
    import torch
    outs = torch.empty_like(inps)
    with torch.no_grad():
        for i in range(0, len(inps), chunk):
            y = layer(inps[i:i + chunk], **kw)
            outs[i:i + chunk] = y[0] if isinstance(y, tuple) else y
    return outs


def _linears(layer, arch: A.Arch):
    """The block linears of one decoder layer, by their path in it (the registry's list)."""
    return {name: layer.get_submodule(name) for name in arch.linears}


@contextlib.contextmanager
def _one_thread():
    """Column-by-column quantizers issue many tiny ops: on the CPU, thread hand-offs cost far
    more than they save (20x slower with 2 busy threads), so they run on one thread."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _hessian_source(name: str, lins: dict, arch: A.Arch) -> str:
    """The linear whose input (and so Hessian) `name` shares: q for k and v, gate for up."""
    parent, _, leaf = name.rpartition(".")
    if leaf in arch.shared_input:
        src = (parent + "." if parent else "") + arch.shared_input[leaf]
        if src in lins:
            return src
    return name


def relative_error(w, wq, H) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² through the Hessian: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)."""
    d = w - wq
    return float(((d @ H) * d).sum() / ((w @ H) * w).sum().clamp(min=1e-30))


class Checkpoints:
    """Per-block results of one calibration run: blk-KKK.npz holds {linear name: BinaryBasis}."""

    FIELDS = ("signs", "scales", "offsets", "colmask", "elemclass", "sparse_mask", "sparse_codes",
              "sparse_zs", "colscale")

    def __init__(self, root: Path | None):
        self.root = root

    @classmethod
    def for_run(cls, model_dir: Path, quantizer, calib_opts: dict) -> "Checkpoints":
        where = calib_opts.get("checkpoint")
        if where == "none":
            return cls(None)
        if where:
            return cls(Path(where))
        from . import hf
        return cls(hf.cache_dir() / "calib-checkpoints" / run_key(model_dir, quantizer, calib_opts))

    def path(self, k: int) -> Path:
        return self.root / f"blk-{k:03d}.npz"

    def load(self, k: int) -> dict[str, bbf.BinaryBasis] | None:
        if self.root is None or not self.path(k).is_file():
            return None
        try:
            with np.load(self.path(k)) as z:
                names = json.loads(str(z["names"]))
                out = {}
                for i, name in enumerate(names):
                    f = {fld: z[f"{i}.{fld}"] for fld in self.FIELDS if f"{i}.{fld}" in z}
                    out[name] = bbf.BinaryBasis(group=int(z[f"{i}.group"]), pow2=bool(z[f"{i}.pow2"]), **f)
                return out
        except (OSError, ValueError, KeyError) as e:
            raise CalibrationError(f"{self.path(k)}: unreadable calibration checkpoint ({e}); "
                                   f"remove {self.root} to start over") from None

    def save(self, k: int, bbs: dict[str, bbf.BinaryBasis]) -> None:
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        arrays = {"names": np.array(json.dumps(list(bbs)))}
        for i, bb in enumerate(bbs.values()):
            arrays[f"{i}.group"], arrays[f"{i}.pow2"] = np.array(bb.group), np.array(bb.pow2)
            arrays.update({f"{i}.{fld}": getattr(bb, fld) for fld in self.FIELDS
                           if getattr(bb, fld) is not None})
        tmp = self.path(k).with_suffix(".tmp")
        with open(tmp, "wb") as f:                      # a file object: np.savez would add ".npz"
            np.savez(f, **arrays)
        os.replace(tmp, self.path(k))                   # a half-written checkpoint is never read

    def clear(self) -> None:
        if self.root is not None and self.root.is_dir():
            shutil.rmtree(self.root, ignore_errors=True)


def run_key(model_dir: Path, quantizer, calib_opts: dict) -> str:
    """What the result depends on: the weights (path, sizes, mtimes), the quantizer settings, the
    calibration options and text, and the format version."""
    h = hashlib.sha256()
    model_dir = Path(model_dir).resolve()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    h.update(json.dumps([str(model_dir), bbf.VERSION, [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                        for p in files]]).encode())
    h.update(json.dumps(quantizer.settings(), sort_keys=True, default=str).encode())
    opts = {k: v for k, v in calib_opts.items() if k != "checkpoint"}
    if opts.get("text") and Path(opts["text"]).is_file():
        st = Path(opts["text"]).stat()
        opts["text_stat"] = (st.st_size, st.st_mtime_ns)
    h.update(json.dumps(opts, sort_keys=True, default=str).encode())
    return f"{quantizer.name}-{h.hexdigest()[:16]}"


def _quantize_head(model, inps, chunk, n_tok, quantizer, errors) -> bbf.BinaryBasis:
    """The output head as one more calibrated linear: H from the final norm's outputs on the quantized
    model's last hidden states (the head's real inputs)."""
    import torch
    H = None
    with torch.no_grad():
        for i in range(0, len(inps), chunk):
            x = model.model.norm(inps[i:i + chunk]).reshape(-1, inps.shape[-1]).float()
            H = x.t() @ x if H is None else H.addmm_(x.t(), x)
    H *= 2.0 / n_tok
    W = model.lm_head.weight.data.float()
    with _one_thread():
        bb = bbf.round_trip(quantizer.for_tensor("lm_head.weight").quantize(W, H))
        err = relative_error(W, torch.from_numpy(bbf.dequantize(bb)).to(W.device), H)
    if errors is not None:
        errors["lm_head.weight"] = err
    return bb


def quantize_model(model_dir, quantizer, calib_opts: dict, progress: bool = True,
                   errors: dict | None = None) -> dict[str, bbf.BinaryBasis]:
    """{HF name: BinaryBasis} of every block linear (and the head when the quantizer covers it);
    `errors`, when given, receives each one's relative error tr(ΔW H ΔWᵀ)/tr(W H Wᵀ)."""
    import torch
    from tqdm import tqdm
    from . import hf
    from .quant.base import all_finite

    samples = int(calib_opts.get("samples") or 128)
    seqlen = int(calib_opts.get("seqlen") or 2048)
    seed = int(calib_opts.get("seed") or 0)
    dev = resolve_device(calib_opts.get("device"))
    model_dir = Path(model_dir)
    model = hf.load_torch_model(model_dir)
    arch = A.for_config(hf.load_config(model_dir))
    for name, p in model.named_parameters():
        if not all_finite(p):
            raise CalibrationError(f"{model_dir}: weight {name} holds NaN or Inf values")
    tok = hf.load_tokenizer(model_dir)
    ids = sample_windows(calibration_tokens(tok, calib_opts.get("text")), samples, seqlen, seed)
    chunk = max(1, MAX_CHUNK_TOKENS // seqlen)

    model.to(dev)
    inps, kws = _block_inputs(model, ids, dev, chunk)
    layers = model.model.layers
    n_tok = samples * seqlen
    out: dict[str, bbf.BinaryBasis] = {}
    n_lin = sum(len(_linears(l, arch)) for l in layers)
    ckpt = Checkpoints.for_run(model_dir, quantizer, calib_opts)
    bar = tqdm(total=n_lin, desc=f"calibrate {quantizer.name}", disable=not progress, unit="linear")
    t0 = time.time()
    for k, layer in enumerate(layers):
        lins = _linears(layer, arch)
        done = ckpt.load(k)
        if done is not None:                                    # resumed: weights from the checkpoint
            for name, m in lins.items():
                bb = done.get(f"model.layers.{k}.{name}.weight")
                if bb is None or bb.shape != tuple(m.weight.shape):
                    raise CalibrationError(f"{ckpt.path(k)}: checkpoint does not match {name} of block {k}; "
                                           f"remove {ckpt.root} to start over")
                m.weight.data = torch.from_numpy(bbf.dequantize(bb)).to(m.weight.device, m.weight.dtype)
                out[f"model.layers.{k}.{name}.weight"] = bb
            bar.update(len(lins))
            if progress:
                bar.write(f"blk {k:3d} resumed from {ckpt.path(k)}")
            inps = _run_block(layer, inps, kws[k], chunk)
            continue
        # Hessians: H = 2/n Σ x xᵀ, one per distinct input
        sums: dict[str, torch.Tensor] = {}
        hooks = []
        for name, m in lins.items():
            if _hessian_source(name, lins, arch) != name:
                continue

            def hook(mod, args, _out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                sums[name].addmm_(x.t(), x)
            hooks.append(m.register_forward_hook(hook))
        try:
            _run_block(layer, inps, kws[k], chunk)
        finally:
            for h in hooks:
                h.remove()
        errs = []
        for name, m in lins.items():
            H = sums[_hessian_source(name, lins, arch)] * (2.0 / n_tok)
            if not all_finite(H):
                raise CalibrationError(f"block {k} {name}: calibration activations overflowed (NaN/Inf)")
            W = m.weight.data.float()
            with _one_thread():
                q = quantizer.for_tensor(f"model.layers.{k}.{name}.weight")   # a bit plan: its own N, G
                bb = bbf.round_trip(q.quantize(W, H))             # exactly what the file will hold
                Wq = torch.from_numpy(bbf.dequantize(bb)).to(W.device)
                err = relative_error(W, Wq, H)
            m.weight.data = Wq.to(m.weight.dtype)
            out[f"model.layers.{k}.{name}.weight"] = bb
            errs.append(f"{name.rsplit('.', 1)[-1].replace('_proj', '')} {err:.4f}")
            if errors is not None:
                errors[f"model.layers.{k}.{name}.weight"] = err
            bar.update(1)
            bar.set_postfix(blk=k, layer=name.rsplit(".", 1)[-1], err=f"{err:.4f}")
        if progress:
            bar.write(f"blk {k:3d} rel. err tr(ΔW H ΔWᵀ)/tr(W H Wᵀ): " + ", ".join(errs))
        del sums
        ckpt.save(k, {n: b for n, b in out.items() if n.startswith(f"model.layers.{k}.")})
        inps = _run_block(layer, inps, kws[k], chunk)               # inputs of block k+1 (quantized)
        if not all_finite(inps):
            raise CalibrationError(f"block {k}: outputs hold NaN or Inf after quantization")
    bar.close()
    if quantizer.covers("lm_head.weight"):                      # a quantized head: its Hessian is of the
        out["lm_head.weight"] = _quantize_head(model, inps, chunk, n_tok, quantizer, errors)  # final norm's output
        if progress and errors is not None:
            print(f"head rel. err {errors['lm_head.weight']:.4f}")
    ckpt.clear()
    if progress:
        print(f"calibrated {n_lin} linears in {time.time() - t0:.1f} s "
              f"({samples} samples x {seqlen} tokens, {dev})")
    return out

"""Perplexity with two protocols.

llamacpp: windows of `ctx` (512) tokens, non-overlapping; within each window only the second half is
          scored (llama.cpp's `llama-perplexity`: tokens first = ctx/2 .. ctx-1).
papers:   windows of `ctx` (2048) tokens, non-overlapping; every token after the first is scored
          (GPTQ / PB-LLM / BiLLM evaluation code).
The ± is the standard error of the mean negative log-likelihood carried to perplexity (as
llama.cpp prints it): ppl · σ(nll) / sqrt(n).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .gguf_io import read_metadata

PROTOCOLS = {"llamacpp": 512, "papers": 2048}


def windows(n_tokens: int, ctx: int, max_windows: int | None) -> list[int]:
    starts = list(range(0, n_tokens - ctx + 1, ctx))
    if max_windows is not None:
        starts = starts[:max_windows]
    if not starts:
        raise ValueError(f"text has {n_tokens} tokens, fewer than one window of {ctx}")
    return starts


def score_window(logits: np.ndarray, tokens: np.ndarray, first: int) -> np.ndarray:
    """NLL of tokens[i+1] under logits[i] for i in [first, len-1)."""
    lg = logits[first:-1].astype(np.float64)
    m = lg.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(lg - m).sum(-1)))
    tgt = tokens[first + 1:]
    return lse - lg[np.arange(len(tgt)), tgt]


def summarize_nll(nll: np.ndarray) -> tuple[float, float]:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    se = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    return ppl, ppl * se


def perplexity(logits_fn, tokens: np.ndarray, protocol: str = "llamacpp", ctx: int | None = None,
               max_windows: int | None = None, progress: bool = True, bos: int | None = None) -> dict:
    """bos: the model's tokenizer puts BOS first (add_bos; Gemma needs it). As llama-perplexity: the
    text starts with it (tokenized with add_bos) and each window has it in place of its first token,
    which is never a scored target."""
    from tqdm import tqdm
    if bos is not None:
        tokens = np.concatenate([[bos], np.asarray(tokens)])
    ctx = ctx or PROTOCOLS[protocol]
    first = ctx // 2 if protocol == "llamacpp" else 0
    starts = windows(len(tokens), ctx, max_windows)
    nlls = []
    t0 = time.time()
    bar = tqdm(starts, desc=f"ppl {protocol} ctx {ctx}", disable=not progress, unit="win")
    for s in bar:
        w = tokens[s:s + ctx]
        if bos is not None:
            w = w.copy()
            w[0] = bos
        nlls.append(score_window(np.asarray(logits_fn(w), np.float32), w, first))
        if progress:
            bar.set_postfix(ppl=f"{math.exp(np.concatenate(nlls).mean()):.2f}")
    nll = np.concatenate(nlls)
    ppl, se = summarize_nll(nll)
    return {"ppl": ppl, "stderr": se, "protocol": protocol, "ctx": ctx, "windows": len(starts),
            "tokens_scored": int(len(nll)), "seconds": time.time() - t0}


def bos_first(md: dict) -> int | None:
    """The BOS id when a GGUF's tokenizer metadata says to put it first (tokenizer.ggml.add_bos_token)."""
    if md.get("tokenizer.ggml.add_bos_token") and md.get("tokenizer.ggml.bos_token_id") is not None:
        return int(md["tokenizer.ggml.bos_token_id"])
    return None


def torch_logits_fn(model):
    import torch

    def fn(tokens):
        with torch.inference_mode():
            ids = torch.as_tensor(np.asarray(tokens, np.int64))[None]
            return model(ids).logits[0].float().numpy()
    return fn


def run_perplexity(model_spec: str, text_spec: str | Path, protocol: str = "llamacpp", ctx: int | None = None,
                   max_windows: int | None = None, backend: str = "auto", threads: int | None = None,
                   progress: bool = True) -> dict:
    from . import data, hf
    text = data.read_text(str(text_spec))
    is_gguf = str(model_spec).endswith(".gguf") and Path(model_spec).is_file()
    if not is_gguf and model_spec != hf.DEFAULT_MODEL and not Path(model_spec).exists():
        raise FileNotFoundError(f"{model_spec}: no such file or directory")
    if is_gguf:
        if backend in ("auto", "engine"):
            try:
                from .engine import Model
                m = Model(str(model_spec), threads=threads)
                tokens = np.asarray(m.tokenize(text), np.int64)
                res = perplexity(m.logits, tokens, protocol, ctx, max_windows, progress, m.bos_first)
                res["backend"] = "engine" + ("+precise-acts" if m.precise_acts else "")
                return res
            except ImportError:
                if backend == "engine":
                    raise
        from .reference import tokenizer_from_gguf, torch_model_from_gguf
        model, _ = torch_model_from_gguf(model_spec)
        tok = tokenizer_from_gguf(model_spec)
        bos = bos_first(read_metadata(model_spec, ("tokenizer.ggml.",)))
        be = "torch-reference"
    else:
        d = hf.resolve_model_dir(str(model_spec))
        model = hf.load_torch_model(d)
        tok = hf.load_tokenizer(d)
        bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) else None
        be = "transformers"
    import torch
    if threads:   # None: torch's own default (the physical cores), as the engine's
        torch.set_num_threads(threads)
    tokens = np.asarray(tok(text, add_special_tokens=False)["input_ids"], np.int64)
    res = perplexity(torch_logits_fn(model), tokens, protocol, ctx, max_windows, progress, bos)
    res["backend"] = be
    return res


def perplexity_cli(a) -> int:
    import json
    import os
    if getattr(a, "precise_acts", False):
        os.environ["BITBASIS_PRECISE_ACTS"] = "1"     # read by the engine when it opens the model
    res = run_perplexity(a.model, a.text, a.protocol, a.ctx, a.windows, a.backend, a.threads)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"perplexity {res['ppl']:.4f} ± {res['stderr']:.4f}  ({res['protocol']}, ctx {res['ctx']}, "
              f"{res['windows']} windows, {res['tokens_scored']} tokens, {res['backend']}, {res['seconds']:.1f} s)")
    return 0

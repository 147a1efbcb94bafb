"""The PyTorch reference forward over a bitbasis GGUF: dequantize every weight, undo llama.cpp's
conventions (q/k row permutation, Gemma's 1 + w norms), and run transformers' own implementation of
the file's architecture (bitbasis.arch). It is the yardstick the C++ engine is checked against."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import arch as A
from . import hf
from .gguf_io import GGUFFileError, ModelFile, read_model
from .rotate import RotationError, install_online, online_spec_from_kv


def config_from_gguf(mf: ModelFile):
    """(transformers config, model class, Arch) of a file."""
    try:
        arch = A.for_gguf(mf.arch, f"{mf.path}: ")
        tied = "output.weight" not in mf.dense and "output.weight" not in mf.packed
        cfg = A.hf_config(arch, mf.kv, _rows(mf, "token_embd.weight"), tied, f"{mf.path}: ")
    except A.ArchError as e:
        raise GGUFFileError(str(e)) from None
    model_cls, cfg_cls = A.torch_class(arch, cfg)
    return cfg_cls(**cfg), model_cls, arch


def _rows(mf: ModelFile, name: str) -> int:
    if name in mf.packed:
        return int(mf.packed[name].rows)
    if name not in mf.dense:
        raise GGUFFileError(f"{mf.path}: tensor {name} is missing")
    return int(mf.dense[name].shape[0])


def torch_model_from_gguf(path: str | Path):
    import torch
    mf = read_model(path)
    cfg, model_cls, arch = config_from_gguf(mf)
    model = model_cls(cfg).eval()
    n_layers = cfg.num_hidden_layers
    want = model.state_dict()
    sd = {}
    for hf_name in want:
        g = hf.gguf_name(hf_name, n_layers, arch)
        if g == "output.weight" and cfg.tie_word_embeddings:
            g = "token_embd.weight"
        if g not in mf.dense and g not in mf.packed:
            raise GGUFFileError(f"{path}: tensor {g} is missing")
        w = mf.weight(g)
        if arch.permute_qk and g.endswith(("attn_q.weight", "attn_k.weight")):
            n = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            perm = hf.qk_row_permutation(w.shape[0], n)
            un = np.empty_like(w)
            un[perm] = w
            w = un
        if arch.norm_offset and g.endswith("norm.weight"):
            w = w - np.float32(arch.norm_offset)
        expect = tuple(want[hf_name].shape)
        if tuple(w.shape) != expect:
            raise GGUFFileError(f"{path}: tensor {g} has shape {tuple(w.shape)}, expected {expect}")
        sd[hf_name] = torch.from_numpy(np.array(w, np.float32, copy=True))
    model.load_state_dict(sd, strict=True)
    try:                                   # the file's W_down holds W·Hᵀ: its input is rotated at run time
        install_online(model, online_spec_from_kv(mf.kv, cfg.intermediate_size, f"{path}: "))
    except RotationError as e:
        raise GGUFFileError(str(e)) from None
    if "rope_freqs.weight" in mf.dense:
        rot = model.model.rotary_emb
        f = torch.from_numpy(mf.dense["rope_freqs.weight"])
        rot.inv_freq = rot.inv_freq / f
        rot.original_inv_freq = rot.inv_freq
    return model, mf


def tokenizer_from_gguf(path: str | Path):
    """The file's tokenizer, rebuilt from its GGUF metadata: by bitbasis.tokenizer (in ~0.2 s, no
    transformers or torch import) for the kinds it builds — byte-level BPE ("gpt2") and
    SentencePiece BPE ("llama") of llama-architecture files, the same tokenizer as transformers'
    GGUF loader gives (tests/test_tokenizer_fast.py) — else by transformers (10+ s for a 50k
    vocabulary)."""
    from . import tokenizer
    tok = tokenizer.from_gguf(path)
    if tok is not None:
        return tok
    import logging
    from transformers import AutoTokenizer
    p = Path(path).resolve()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)

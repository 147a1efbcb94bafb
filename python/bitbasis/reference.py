"""The PyTorch reference forward over a bitbasis GGUF: dequantize every weight, undo llama.cpp's
rotary row permutation, and run transformers' own Llama implementation. It is the yardstick the C++
engine is checked against."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import hf
from .gguf_io import GGUFFileError, ModelFile, read_model


def config_from_gguf(mf: ModelFile):
    from transformers import LlamaConfig
    kv = mf.kv
    if mf.arch != "llama":
        raise GGUFFileError(f"{mf.path}: architecture {mf.arch!r} not supported (llama only)")
    a = "llama"
    try:
        n_embd = int(kv[f"{a}.embedding_length"])
        n_head = int(kv[f"{a}.attention.head_count"])
        cfg = dict(
            vocab_size=int(mf.dense["token_embd.weight"].shape[0]),
            hidden_size=n_embd,
            intermediate_size=int(kv[f"{a}.feed_forward_length"]),
            num_hidden_layers=int(kv[f"{a}.block_count"]),
            num_attention_heads=n_head,
            num_key_value_heads=int(kv.get(f"{a}.attention.head_count_kv", n_head)),
            rms_norm_eps=float(kv[f"{a}.attention.layer_norm_rms_epsilon"]),
            max_position_embeddings=int(kv.get(f"{a}.context_length", 2048)),
            head_dim=int(kv.get(f"{a}.attention.key_length", n_embd // n_head)),
            tie_word_embeddings="output.weight" not in mf.dense and "output.weight" not in mf.packed,
            rope_theta=float(kv.get(f"{a}.rope.freq_base", 10000.0)),
            bos_token_id=kv.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=kv.get("tokenizer.ggml.eos_token_id"),
        )
    except KeyError as e:
        raise GGUFFileError(f"{mf.path}: missing metadata key {e}") from None
    c = LlamaConfig(**cfg)
    return c


def torch_model_from_gguf(path: str | Path):
    import torch
    from transformers import LlamaForCausalLM
    mf = read_model(path)
    cfg = config_from_gguf(mf)
    model = LlamaForCausalLM(cfg).eval()
    n_layers = cfg.num_hidden_layers
    gname = {k: hf.gguf_name(k, n_layers) for k in model.state_dict() if "rotary" not in k}
    sd = {}
    for hf_name, g in gname.items():
        if g == "output.weight" and cfg.tie_word_embeddings:
            g = "token_embd.weight"
        if g not in mf.dense and g not in mf.packed:
            raise GGUFFileError(f"{path}: tensor {g} is missing")
        w = mf.weight(g)
        if g.endswith(("attn_q.weight", "attn_k.weight")):
            n = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            perm = hf.qk_row_permutation(w.shape[0], n)
            un = np.empty_like(w)
            un[perm] = w
            w = un
        expect = tuple(model.state_dict()[hf_name].shape)
        if tuple(w.shape) != expect:
            raise GGUFFileError(f"{path}: tensor {g} has shape {tuple(w.shape)}, expected {expect}")
        sd[hf_name] = torch.from_numpy(np.array(w, np.float32, copy=True))
    model.load_state_dict(sd, strict=False)
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

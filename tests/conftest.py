"""Shared fixtures. Real-model fixtures convert SmolLM2 once per test session (cached under
BITBASIS_CACHE, default ~/.cache/bitbasis, so repeated runs are fast)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    from bitbasis import hf
    return hf.default_model_dir()


def _converted(tmp_root: Path, smol_dir: Path, method: str, bases: int = 1, group: int = 128, **extra) -> Path:
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_root / f"smol-{method}-n{bases}-g{group}.gguf"
    if not out.exists():
        convert(smol_dir, out, ConvertOptions(method=method, bases=bases, group=group, extra=extra or None),
                progress=False)
    return out


@pytest.fixture(scope="session")
def model_files(tmp_path_factory, smol_dir):
    """factory: model_files(method, bases, group) -> path of a converted SmolLM2 file."""
    root = tmp_path_factory.mktemp("models")
    return lambda method, bases=1, group=128, **extra: _converted(root, smol_dir, method, bases, group, **extra)


@pytest.fixture(scope="session")
def eval_text() -> str:
    from bitbasis import data
    return data.read_text("eval")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def tiny_llama_dir(path: Path, **over) -> Path:
    """A tiny random-weight Llama built by transformers itself, with SmolLM2's real tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from bitbasis import hf
    src = hf.default_model_dir()
    cfg = dict(vocab_size=49152, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=True, rms_norm_eps=1e-5)
    cfg.update(over)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    m.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / f).exists():
            (path / f).write_bytes((src / f).read_bytes())
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"))

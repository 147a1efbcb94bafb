"""A GGUF file's tokenizer, built straight from its metadata with `tokenizers` in well under a
second. It is the tokenizer transformers' GGUF loader (`AutoTokenizer.from_pretrained(dir,
gguf_file=...)`) builds from the same file — the same BPE model, pre-tokenizer, decoder,
post-processor and added tokens (tests/test_tokenizer_fast.py compares them) — without importing
transformers (~2 s) or torch, and without gguf-py's reader (seconds for a 50k vocabulary).

Built here, as transformers' converters in `transformers.integrations.gguf` build them:
  - tokenizer.ggml.model "gpt2": byte-level BPE (SmolLM2, Qwen, Llama 3), the split regex chosen
    by tokenizer.ggml.pre, in a file of any architecture the engine runs (bitbasis.arch);
  - tokenizer.ggml.model "llama": SentencePiece BPE with byte fallback (Llama 2, Mistral), the
    merges from the file or, when it has none, derived from the vocabulary and its scores, in a
    file of architecture "llama".
`from_gguf` returns None for anything else (other tokenizer kinds, Gemma's and Phi-3's SentencePiece
vocabularies, which transformers builds with their own normalizers), and
`reference.tokenizer_from_gguf` then asks transformers. Only the file is read: transformers also
lets a tokenizer_config.json or config.json that happens to sit beside the file change the result.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from .arch import ARCHS
from .gguf_io import GGUFFileError, read_metadata

CONTROL, USER_DEFINED = 3, 4   # llama.cpp token types (gguf.TokenType)

# tokenizer.ggml.pre -> the split regex its merges were learned with (transformers'
# GGUF_PRE_TOKENIZER_SPLITS; the Qwen 2 and 3.5 ones are those of their tokenizers)
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3),
    "tekken": _TEKKEN,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    "qwen35": _QWEN35,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O),
}

_KINDS = ("gpt2", "llama")
_ARCHS = {"gpt2": tuple(ARCHS), "llama": ("llama",)}   # architectures per tokenizer kind


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (the alphabet of a byte-level vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _foreign(spell: dict[int, str]):
    """`foreign(token)`: whether a token has a character outside the byte alphabet `spell`."""
    return re.compile("[^" + "".join(re.escape(c) for c in spell.values()) + "]").search


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece vocabulary implies: every split of a token into two tokens, best
    score first (transformers' tokenization_utils_base.generate_merges, same order and ties)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:], score) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


class Tokenizer:
    """The part of a transformers tokenizer that bitbasis uses, over a `tokenizers.Tokenizer`
    (`backend_tokenizer`): `tok(text)["input_ids"]`, `encode`, `decode`, `convert_ids_to_tokens`,
    `convert_tokens_to_ids`, the special tokens and their ids, `chat_template`."""

    def __init__(self, backend, special: dict[str, str | None], add_bos_token: bool, add_eos_token: bool,
                 chat_template: str | None, name_or_path: str = ""):
        self.backend_tokenizer = backend
        self.bos_token, self.eos_token = special.get("bos_token"), special.get("eos_token")
        self.unk_token, self.pad_token = special.get("unk_token"), special.get("pad_token")
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.chat_template = chat_template
        self.name_or_path = name_or_path

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (as transformers)."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list]:
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        encs = self.backend_tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs], "attention_mask": [[1] * len(e.ids) for e in encs]}

    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(ids)] if isinstance(ids, int) else [int(i) for i in ids]
        return self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, seqs: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens) for s in seqs]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        t = self.backend_tokenizer
        return t.id_to_token(int(ids)) if isinstance(ids, int) else [t.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        t = self.backend_tokenizer
        return t.token_to_id(tokens) if isinstance(tokens, str) else [t.token_to_id(s) for s in tokens]

    def __repr__(self) -> str:
        return (f"<bitbasis.tokenizer.Tokenizer {os.path.basename(self.name_or_path)!r}: {len(self)} tokens, "
                f"bos {self.bos_token!r}, eos {self.eos_token!r}>")


def from_gguf(path: str | os.PathLike) -> Tokenizer | None:
    """The tokenizer of a GGUF file, or None when its kind is not one built here (see the module
    docstring). GGUFFileError for a damaged file or inconsistent tokenizer metadata."""
    path = str(path)
    md = read_metadata(path, ("general.architecture", "tokenizer."))
    kind = md.get("tokenizer.ggml.model")
    if kind not in _KINDS or md.get("general.architecture") not in _ARCHS[kind]:
        return None
    if "tokenizer.ggml.merges" not in md and "tokenizer.ggml.scores" not in md:
        return None   # nothing to rebuild the merges from (transformers fails on these too)
    return build(md, path)


def _metadata(md: dict, path: str) -> dict[str, Any]:
    """The tokenizer keys, type- and length-checked."""
    def fail(msg):
        raise GGUFFileError(f"{path}: {msg}")

    def strings(key):
        v = md.get(key)
        if v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v[:1])):
            fail(f"{key} must be an array of strings")
        return v

    tokens = strings("tokenizer.ggml.tokens")
    if not tokens:
        fail("no tokenizer.ggml.tokens (the vocabulary)")
    n = len(tokens)
    out = {"tokens": tokens, "merges": strings("tokenizer.ggml.merges")}
    for key in ("token_type", "scores"):
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None:
            if getattr(v, "ndim", 0) != 1 or v.dtype.kind not in "iuf":
                fail(f"tokenizer.ggml.{key} must be a numeric array")
            if len(v) != n:
                fail(f"tokenizer.ggml.{key} has {len(v)} entries for {n} tokens")
        out[key] = v
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = md.get(f"tokenizer.ggml.{key}")
        if i is not None and (not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n):
            fail(f"tokenizer.ggml.{key} = {i!r} is not a token id (vocabulary of {n})")
        out[name] = None if i is None else tokens[i]
    for key in ("add_bos_token", "add_eos_token"):
        v = md.get(f"tokenizer.ggml.{key}")
        if v is not None and not isinstance(v, (bool, int)):
            fail(f"tokenizer.ggml.{key} must be a bool")
        out[key] = None if v is None else bool(v)
    template = md.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        fail("tokenizer.chat_template must be a string")
    out["chat_template"] = template
    pre = md.get("tokenizer.ggml.pre")
    out["pre"] = pre if isinstance(pre, str) else None
    return out


def build(md: dict, path: str = "") -> Tokenizer:
    """The tokenizer from the metadata of a file (read_metadata's dict), kind "gpt2" or "llama"."""
    m = _metadata(md, path)
    kind = md["tokenizer.ggml.model"]
    special = {k: m[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    add_bos = m["add_bos_token"] if m["add_bos_token"] is not None else kind == "llama"   # llama.cpp's default
    add_bos = add_bos and special["bos_token"] is not None
    add_eos = bool(m["add_eos_token"]) and special["eos_token"] is not None
    try:
        tok = _backend(m, kind == "gpt2", special, add_bos, add_eos, path)
    except GGUFFileError:
        raise
    except Exception as e:   # tokenizers refuses the vocabulary, merges or special tokens
        raise GGUFFileError(f"{path}: tokenizer: {type(e).__name__}: {e}".splitlines()[0]) from None
    return Tokenizer(tok, special, add_bos, add_eos, m["chat_template"], path)


def _backend(m: dict, byte_level: bool, special: dict, add_bos: bool, add_eos: bool, path: str):
    """The tokenizers.Tokenizer, step by step as transformers makes it."""
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    tokens = m["tokens"]
    types = m["token_type"] if m["token_type"] is not None else np.zeros(len(tokens), np.int64)
    # a token outside the byte alphabet of a byte-level vocabulary
    foreign = _foreign(bytes_to_unicode()) if byte_level else (lambda t: None)
    if byte_level:
        # transformers' byte_level_tokenizer + GPT2Tokenizer: such tokens are respelled byte by byte
        spell = bytes_to_unicode()
        vocab = {"".join(spell[b] for b in t.encode("utf-8")) if foreign(t) else t: i for i, t in enumerate(tokens)}
        tok = Backend(BPE(vocab=vocab, merges=_merges(m, vocab, path), dropout=None, continuing_subword_prefix="",
                          end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        defaults = ["<|endoftext|>"]                  # GPT2Tokenizer's unk/bos/eos
    else:
        # transformers' sentencepiece_tokenizer + LlamaTokenizer (legacy=False, add_prefix_space)
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Backend(BPE(vocab=vocab, merges=_merges(m, vocab, path), fuse_unk=True, byte_fallback=True,
                          dropout=None))
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
        defaults = ["<unk>", "<s>", "</s>"]          # LlamaTokenizer's unk/bos/eos
    # added in transformers' order: the builder class's defaults; the file's control tokens (special;
    # in a byte-level vocabulary one outside the alphabet is a llama.cpp mislabel, left out) and its
    # user-defined ones (not special, only if in the vocabulary); its bos/eos/unk/pad
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in defaults])
    control = [AddedToken(tokens[i], normalized=False, special=True) for i in np.flatnonzero(types == CONTROL)
               if not foreign(tokens[i])]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(tokens[i], normalized=False, special=False) for i in np.flatnonzero(types == USER_DEFINED)
            if tok.token_to_id(tokens[i]) is not None]
    if user:
        tok.add_tokens(user)
    named = [AddedToken(t, special=True, normalized=False) for t in special.values() if t is not None]
    if named:
        tok.add_special_tokens(named)
    split = PRE_SPLITS.get(m["pre"])
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    # TokenizersBackend.update_post_processor
    bos, eos = special["bos_token"], special["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    st = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=st)
    return tok


def _merges(m: dict, vocab: dict[str, int], path: str) -> list[tuple[str, ...]]:
    if m["merges"] is not None:
        return [tuple(x.split(" ")) for x in m["merges"]]
    if m["scores"] is None:
        raise GGUFFileError(f"{path}: tokenizer.ggml.merges and tokenizer.ggml.scores are both missing")
    return generate_merges(vocab, dict(zip(m["tokens"], m["scores"].tolist())))

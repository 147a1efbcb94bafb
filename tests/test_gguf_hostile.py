"""Hostile GGUF files: the engine must refuse each with a clear EngineError (a ValueError) naming
the reason, and never read out of bounds or crash. The corpus is made by mutating a small converted
file (the tiny random llama, residual N=2, G=128: ffn_down has 320 columns, so padding bits exist)."""
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


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_dir):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("hostile") / "tiny-res2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="residual", bases=2, group=128), progress=False)
    return out


class Layout:
    """Byte offsets of the fields of a GGUF file, found with the stock gguf reader."""

    def __init__(self, path):
        import gguf
        r = gguf.GGUFReader(str(path), "r")
        self.fields = {k: f.offset for k, f in r.fields.items()}
        self.tensors = {}
        for t in r.tensors:
            off = t.field.offset
            nlen = len(t.name.encode())
            nd = len(t.shape)
            type_at = off + 8 + nlen + 4 + 8 * nd
            self.tensors[t.name] = dict(info=off, ndims_at=off + 8 + nlen, dims_at=off + 8 + nlen + 4,
                                        type_at=type_at, offset_at=type_at + 4, data=int(t.data_offset),
                                        nbytes=int(t.n_bytes))
        self.data_start = int(r.data_offset)

    def value_at(self, key: str) -> int:
        """Offset of the value of a scalar field (after key length, key and type)."""
        return self.fields[key] + 8 + len(key.encode()) + 4

    def array_items_at(self, key: str) -> int:
        return self.value_at(key) + 4 + 8


def _put(buf: bytearray, at: int, fmt: str, value) -> bytearray:
    b = bytearray(buf)
    struct.pack_into("<" + fmt, b, at, value)
    return b


def mutations(raw: bytes, lay: Layout) -> list[tuple[str, bytes, str]]:
    """(label, file bytes, expected words in the error)."""
    q = "blk.0.attn_q.weight"
    down = "blk.0.ffn_down.weight"
    t_q = lay.tensors[q + ".bbp"]
    t_emb = lay.tensors["token_embd.weight"]
    hdr = lay.array_items_at("bitbasis.tensor." + q)
    m = [
        ("empty", b"", "smaller than a GGUF header"),
        ("truncated header", raw[:20], "smaller than a GGUF header"),
        ("truncated metadata", raw[:5000], "truncated"),
        ("truncated tensor infos", raw[:t_emb["info"] + 10], "truncated"),
        ("truncated data", raw[:lay.data_start + 100], "past the end"),
        ("truncated last byte", raw[:-1], "past the end"),
        ("wrong magic", b"GGUX" + raw[4:], "magic"),
        ("version 1", bytes(_put(raw, 4, "I", 1)), "version"),
        ("version 99", bytes(_put(raw, 4, "I", 99)), "version"),
        ("absurd tensor count", bytes(_put(raw, 8, "Q", 1 << 40)), "tensor count"),
        ("absurd kv count", bytes(_put(raw, 16, "Q", 1 << 40)), "metadata count"),
        ("huge key length", bytes(_put(raw, 24, "Q", 1 << 50)), "string length"),
        ("unknown value type", bytes(_put(raw, lay.value_at("general.architecture") - 4, "I", 77)),
         "unknown value type"),
        ("offset past the end", bytes(_put(raw, t_emb["offset_at"], "Q", 1 << 40)), "past the end"),
        ("offset near 2^64", bytes(_put(raw, t_emb["offset_at"], "Q", (1 << 64) - 32)), "past the end"),
        ("misaligned offset", bytes(_put(raw, t_emb["offset_at"], "Q",
                                         t_emb["data"] - lay.data_start + 1)), "aligned"),
        ("unknown tensor type", bytes(_put(raw, t_emb["type_at"], "I", 99)), "unsupported tensor type"),
        ("Q4_K tensor type", bytes(_put(raw, t_q["type_at"], "I", 12)), "unsupported tensor type"),
        ("too many dims", bytes(_put(raw, t_emb["ndims_at"], "I", 9)), "dimensions"),
        ("zero dim", bytes(_put(raw, t_emb["dims_at"], "Q", 0)), "dimension"),
        ("overflowing dims", bytes(_put(raw, t_emb["dims_at"] + 8, "Q", 1 << 62)), "overflow"),
        ("huge dim", bytes(_put(raw, t_emb["dims_at"] + 8, "Q", 1 << 40)), "past the end"),
        ("unknown flag", bytes(_put(raw, hdr + 16, "i", 64)), "unknown flag"),
        ("9 planes", bytes(_put(raw, hdr + 8, "i", 9)), "planes"),
        ("bad group", bytes(_put(raw, hdr + 12, "i", 100)), "group size"),
        ("negative rows", bytes(_put(raw, hdr, "i", -5)), "out of range"),
        ("header rows != planes", bytes(_put(raw, hdr, "i", 64)), "shape"),
        ("flag without component", bytes(_put(raw, hdr + 16, "i", 1)), "missing"),
        ("component type", bytes(_put(raw, lay.tensors[q + ".bbs"]["type_at"], "I", 0)), "expected"),
        ("bitbasis version 2", bytes(_put(raw, lay.value_at("bitbasis.version"), "I", 2)), "version"),
        ("missing block count", raw.replace(b"llama.block_count", b"llama.block_counx"),
         "missing metadata key llama.block_count"),
        ("wrong architecture", raw.replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00llamb", 1),
         "architecture"),
        ("orphan component", raw.replace(b"blk.1.attn_k.weight.bbs", b"blk.1.attn_x.weight.bbs"), "header"),
    ]
    # a padding bit (column 320 of ffn_down, G=128: last group starts at 256) set in plane 0 of row 0
    t_down = lay.tensors[down + ".bbp"]
    b = bytearray(raw)
    b[t_down["data"] + (2 * 2 + 0) * 16 + (320 - 256) // 8] |= 1
    m.append(("padding bit", bytes(b), "padding bits"))
    return m


def test_valid_file_loads(tiny_gguf):
    m = Model(tiny_gguf, threads=2)
    lg = m.logits([1, 2, 3, 4])
    assert lg.shape == (4, m.n_vocab) and np.isfinite(lg).all()
    with pytest.raises(EngineError, match="outside the vocabulary"):
        m.eval([m.n_vocab])
    with pytest.raises(EngineError, match="outside the vocabulary"):
        m.eval([-1])


def test_named_mutations(tiny_gguf, tmp_path):
    raw = tiny_gguf.read_bytes()
    lay = Layout(tiny_gguf)
    failures = []
    for label, data, words in mutations(raw, lay):
        p = tmp_path / "m.gguf"
        p.write_bytes(data)
        try:
            Model(p, threads=1)
            failures.append(f"{label}: loaded")
        except EngineError as e:
            if words not in str(e):
                failures.append(f"{label}: error {str(e)!r} lacks {words!r}")
            assert isinstance(e, ValueError) and "\n" not in str(e)
    assert not failures, "\n".join(failures)


_RUNNER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from bitbasis.engine import EngineError, Model
    for p in json.loads(sys.argv[1]):
        print(p, flush=True)
        try:
            m = Model(p, threads=2)
        except EngineError as e:
            print("refused", e, flush=True)
            continue
        lg = m.logits([1, 2, 3, 4, 5])
        m.reset()
        m.eval([7])
        print("loaded", lg.shape, flush=True)
    print("DONE", flush=True)
""")


def test_random_byte_flips_never_crash(tiny_gguf, tmp_path):
    """Random flips (most in the header and metadata, some anywhere) in a subprocess: a crash or
    a non-EngineError exception fails the test with the file that caused it."""
    raw = tiny_gguf.read_bytes()
    lay = Layout(tiny_gguf)
    rng = np.random.default_rng(7)
    # the tensor infos and the binary-basis components of the first block are the juicy parts
    hot_lo = lay.tensors["token_embd.weight"]["info"] - 2000
    paths = []
    for i in range(160):
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 6))):
            r = rng.random()
            if r < 0.45:
                pos = int(rng.integers(hot_lo, lay.data_start))
            elif r < 0.6:
                pos = int(rng.integers(0, 4096))
            else:
                pos = int(rng.integers(0, len(b)))
            b[pos] ^= 1 << int(rng.integers(0, 8))
        p = tmp_path / f"flip{i}.gguf"
        p.write_bytes(bytes(b))
        paths.append(str(p))
    res = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(paths)], capture_output=True, text=True,
                         timeout=600)
    tail = (res.stdout[-2000:] + res.stderr[-3000:])
    assert res.returncode == 0, f"engine crashed or raised (exit {res.returncode}):\n{tail}"
    assert "DONE" in res.stdout
    refused = res.stdout.count("\nrefused")
    assert refused > 0, "no flipped file was refused: the corpus does not exercise the checks"

"""llama.cpp's low-bit types both ways (issue 17 items 4, 5): our codecs of Q1_0/Q2_0/TQ1_0/TQ2_0 against
gguf-py's and llama.cpp's own decoders; files in those types run in our engine exactly as the
binary-basis tensors they map to; `bitbasis export --to llamacpp` writes Q1_0 that runs identically
here (and in llama.cpp, where llama-cpp-python is installed); llama.cpp's other types are named."""
from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from bitbasis import format as bbf
from bitbasis import llamacpp_types as lt
from bitbasis.engine import engine_available

needs_engine = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")
TYPES = [lt.Q1_0, lt.Q2_0, lt.TQ1_0, lt.TQ2_0]


def _random(t, rows, cols, rng):
    top = {lt.Q1_0: 2, lt.Q2_0: 4, lt.TQ2_0: 4, lt.TQ1_0: 3}[t]
    codes = rng.integers(0, top, (rows, cols)).astype(np.uint8)
    d = (rng.standard_normal((rows, cols // lt.layout(t)[0])) * 0.05).astype(np.float16)
    return codes, d


def _ggml_base():
    """llama.cpp's libggml-base from the llama-cpp-python wheel, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    return ctypes.CDLL(path) if os.path.exists(path) else None


@pytest.mark.parametrize("t", TYPES, ids=lt.type_name)
def test_codec_round_trip_and_references(t):
    rng = np.random.default_rng(t)
    rows, cols = 3, 512
    codes, d = _random(t, rows, cols, rng)
    raw = lt.encode(t, codes, d)
    assert raw.nbytes == rows * cols // lt.layout(t)[0] * lt.layout(t)[1]
    c2, d2 = lt.decode(t, raw, rows, cols)
    assert np.array_equal(c2, codes) and np.array_equal(d2.view(np.uint16), d.view(np.uint16))
    w = lt.dequantize(t, raw, rows, cols)
    v = (2.0 * codes - 1) if t == lt.Q1_0 else codes - 1.0
    assert np.array_equal(w, (v.reshape(rows, -1, lt.layout(t)[0]) * d.astype(np.float32)[..., None]).reshape(rows, cols))
    if t in (lt.TQ1_0, lt.TQ2_0):   # gguf-py's decoders, written independently of ours
        import gguf
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t)).reshape(rows, cols)
        assert np.array_equal(ref, w)
    lib = _ggml_base()
    if lib is not None:             # llama.cpp's own dequantize_row_*
        out = np.zeros(rows * cols, np.float32)
        getattr(lib, "dequantize_row_" + lt.type_name(t).lower())(
            raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(rows * cols))
        assert np.array_equal(out.reshape(rows, cols), w)


def test_hand_made_blocks():
    one = np.float16(1.0).tobytes()
    q1 = np.frombuffer(one + bytes([0b101] + [0] * 15), np.uint8)          # elements 0 and 2 are +d
    assert lt.dequantize(lt.Q1_0, q1, 1, 128)[0, :4].tolist() == [1, -1, 1, -1]
    q2 = np.frombuffer(one + bytes([0b11100100, 0b00011011] + [0] * 14), np.uint8)   # codes 0 1 2 3 3 2 1 0
    assert lt.dequantize(lt.Q2_0, q2, 1, 64)[0, :9].tolist() == [-1, 0, 1, 2, 2, 1, 0, -1, -1]
    assert lt.type_name(12) == "Q4_K" and lt.type_name(6) == "Q5_0" and lt.type_name(99) == "type 99"


# --- files --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """The tiny llama with widths that are whole Q1_0 / TQ blocks (256, 512)."""
    from conftest import tiny_llama_dir
    return tiny_llama_dir(tmp_path_factory.mktemp("wide"), hidden_size=256, intermediate_size=512)


@pytest.fixture(scope="module")
def wide_f32(wide_dir, tmp_path_factory):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("wide-f32") / "f32.gguf"
    convert(wide_dir, out, ConvertOptions(method="f32"), progress=False)
    return out


def _rewrite(src, dst, linears: dict, extra_kv: list[bytes] = (), embd=None):
    """`src` with each block linear replaced by linears[name] = (type, bytes) or a bbf.Packed (written
    as binary-basis components), and optionally the token embedding by `embd` = (type, bytes)."""
    import gguf
    from bitbasis.export_llamacpp import _kv, _raw_fields, _write_gguf
    r = gguf.GGUFReader(str(src), "r")
    tensors, kvs = [], _raw_fields(r, lambda k: False) + list(extra_kv)
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        new = embd if t.name == "token_embd.weight" and embd else linears.get(t.name)
        if isinstance(new, bbf.Packed):
            hdr = struct.pack("<IQ", 4, 5) + b"".join(struct.pack("<I", x) for x in new.header)
            kvs.append(_kv(f"bitbasis.tensor.{t.name}", 9, hdr))
            for suf, a in new.parts.items():
                tensors.append((f"{t.name}.{suf}", a.shape, 24 if a.dtype == np.uint8 else 1, a.tobytes()))
        elif new is not None:
            tensors.append((t.name, shape, new[0], new[1]))
        else:
            tensors.append((t.name, shape, int(t.tensor_type), np.asarray(t.data).tobytes()))
    if any(isinstance(v, bbf.Packed) for v in linears.values()):
        kvs.append(_kv("bitbasis.version", 4, struct.pack("<I", 1)))
    _write_gguf(str(dst), kvs, tensors, 32)
    return dst


def _linears(path):
    import gguf
    return {t.name: tuple(int(x) for x in reversed(t.shape)) for t in gguf.GGUFReader(str(path), "r").tensors
            if t.name.startswith("blk.") and len(t.shape) == 2}


def _as_binary_basis(t, codes, d) -> bbf.Packed:
    """The binary-basis tensor a low-bit one is (the Python side of the mapping the engine makes in C++)."""
    G = lt.layout(t)[0]
    if t == lt.Q1_0:
        bb = bbf.BinaryBasis(signs=codes[None].astype(bool), scales=d.astype(np.float32)[:, :, None, None], group=G)
    else:   # (c − 1)·d = d/2·s0 + d·s1 + d/2
        half = (d.astype(np.float32) / 2)[:, :, None]
        signs = np.stack([(codes & 1).astype(bool), (codes >> 1 & 1).astype(bool)])
        bb = bbf.BinaryBasis(signs=signs, scales=half[..., None], group=G, offsets=half, pow2=True)
    return bbf.pack(bb)


@needs_engine
@pytest.mark.parametrize("t", TYPES, ids=lt.type_name)
def test_engine_runs_lowbit_file_as_its_binary_basis(wide_f32, tmp_path, t):
    """A file whose linears (and, for Q1_0, the token embedding) are in llama.cpp's low-bit type gives
    the same logits, bit for bit, as the file of the binary-basis tensors it maps to."""
    from bitbasis.engine import Model
    rng = np.random.default_rng(t)
    low, bb = {}, {}
    for name, (rows, cols) in _linears(wide_f32).items():
        codes, d = _random(t, rows, cols, rng)
        low[name] = (t, lt.encode(t, codes, d).tobytes())
        bb[name] = _as_binary_basis(t, codes, d)
    embd = None
    if t == lt.Q1_0:   # a Q1_0 token embedding (also the tied output head) in both files
        codes, d = _random(t, 49152, 256, rng)
        embd = (t, lt.encode(t, codes, d).tobytes())
    a = Model(_rewrite(wide_f32, tmp_path / "low.gguf", low, embd=embd), threads=2, n_ctx=64)
    b = Model(_rewrite(wide_f32, tmp_path / "bb.gguf", bb, embd=embd), threads=2, n_ctx=64)
    toks = a.tokenize("The quick brown fox jumps over the lazy dog.")
    la, lb = a.logits(toks), b.logits(toks)
    assert np.isfinite(la).all() and np.array_equal(la, lb)


@pytest.fixture(scope="module")
def wide_n1(wide_dir, tmp_path_factory):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("wide-n1") / "n1.gguf"
    convert(wide_dir, out, ConvertOptions(method="residual", bases=1, group=128), progress=False)
    return out


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bitbasis.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@needs_engine
def test_export_q1_0_runs_the_same(wide_n1, tmp_path):
    from bitbasis.engine import Model
    out = tmp_path / "q1.gguf"
    p = _cli("export", wide_n1, "--to", "llamacpp", "-o", out)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(" Q1_0 ") == 14 and "14 of 14" in p.stdout
    import gguf
    r = gguf.GGUFReader(str(out), "r")
    assert not [k for k in r.fields if k.startswith("bitbasis.")]
    assert {int(t.tensor_type) for t in r.tensors if t.name.startswith("blk.") and len(t.shape) == 2} == {lt.Q1_0}
    a, b = Model(wide_n1, threads=2, n_ctx=64), Model(out, threads=2, n_ctx=64)
    toks = a.tokenize("Once upon a time there was a tiny model.")
    la, lb = a.logits(toks), b.logits(toks)
    assert np.array_equal(la, lb)
    try:
        import llama_cpp
    except ImportError:
        return
    # stock llama.cpp loads and runs the exported file; its own int8 activations differ from ours a little
    m = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    m.eval(toks)
    ll = np.array(m.scores[:len(toks)])
    assert np.abs(ll - lb).max() < 0.05 * np.abs(lb).max()


@needs_engine
def test_export_says_why_a_tensor_does_not_fit(tiny_dir, tmp_path):
    """The default tiny llama (ffn_down 320 columns) at N = 2, G = 128: nothing fits; every weight is F32
    with its reason, and the file still runs."""
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.engine import Model
    src = tmp_path / "res2.gguf"
    convert(tiny_dir, src, ConvertOptions(method="residual", bases=2, group=128), progress=False)
    out = tmp_path / "out.gguf"
    p = _cli("export", src, "--to", "llamacpp", "-o", out)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("  blk.")]
    assert len(lines) == 14 and all(" F32 " in ln and "N = 2" in ln for ln in lines), p.stdout
    a, b = Model(src, threads=2, n_ctx=64), Model(out, threads=2, n_ctx=64)
    toks = a.tokenize("Hello world")
    assert np.abs(a.logits(toks) - b.logits(toks)).max() < 0.05 * np.abs(a.logits(toks)).max()
    assert _cli("export", src, "--to", "llamacpp", "-o", out).returncode == 1   # exists: --force
    dense = tmp_path / "f32.gguf"
    convert(tiny_dir, dense, ConvertOptions(method="f32"), progress=False)
    p = _cli("export", dense, "--to", "llamacpp", "-o", tmp_path / "x.gguf")
    assert p.returncode == 1 and "no binary-basis tensors" in p.stderr and len(p.stderr.splitlines()) == 1


@needs_engine
def test_llamacpp_types_are_named(wide_f32, tmp_path):
    """A file with Q5_0 linears (made with gguf-py's quantizer): info names the type and says what
    to do; generate and ppl fail with one line naming Q5_0, not a number."""
    import gguf
    low = {}
    for name, (rows, cols) in _linears(wide_f32).items():
        w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        low[name] = (6, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q5_0).tobytes())
    path = _rewrite(wide_f32, tmp_path / "q5.gguf", low)
    p = _cli("info", path)
    assert p.returncode == 0 and "Q5_0 x14" in p.stdout and "bitbasis convert" in p.stdout, p.stdout + p.stderr
    for cmd in (("generate", "-m", path, "-p", "hi", "-n", "2"), ("ppl", path, "--ctx", "64", "--windows", "1")):
        p = _cli(*cmd)
        err = p.stderr.strip().splitlines()
        assert p.returncode == 1 and "Q5_0" in err[-1] and "bitbasis convert" in err[-1], p.stderr
        assert "type 6" not in p.stderr and "Traceback" not in p.stderr


def test_python_reader_reads_q1_0_and_names_what_it_cannot(wide_f32, tmp_path):
    """read_model (the PyTorch reference's reader) dequantizes Q1_0 with our decoder; Q2_0, which
    gguf-py does not know, is a one-line error naming it."""
    from bitbasis.gguf_io import GGUFFileError, read_model
    rng = np.random.default_rng(5)
    for t in (lt.Q1_0, lt.Q2_0):
        low, ref = {}, {}
        for name, (rows, cols) in _linears(wide_f32).items():
            codes, d = _random(t, rows, cols, rng)
            raw = lt.encode(t, codes, d)
            low[name], ref[name] = (t, raw.tobytes()), lt.dequantize(t, raw, rows, cols)
        path = _rewrite(wide_f32, tmp_path / f"{lt.type_name(t)}.gguf", low)
        if t == lt.Q1_0:
            mf = read_model(path)
            assert all(np.array_equal(mf.dense[n], w) and mf.dense_types[n] == "Q1_0" for n, w in ref.items())
        else:
            with pytest.raises(GGUFFileError, match="Q2_0"):
                read_model(path)


@needs_engine
def test_llamacpp_q1_0_perplexity_in_both_engines(wide_f32, wide_n1, tmp_path, eval_text):
    """Issue 17's Q1_0 proof, both ways, on the tiny llama of whole 128-column blocks: a file made by
    llama.cpp's own quantizer (every linear Q1_0) and the `export --to llamacpp` of an N = 1, G = 128
    file each get the same perplexity (±0.5%) from our engine as from llama.cpp, the token embedding
    (= tied head) Q8_0 in both. (A random model's perplexity sits near its 49152-id vocabulary, where
    small logit differences show.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf
    from bitbasis.engine import Model
    from bitbasis.perplexity import perplexity
    made, exported = tmp_path / "llamacpp-q1.gguf", tmp_path / "export-q1.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q1_0
    params.token_embedding_type = params.output_tensor_type = 8   # Q8_0 (its default Q6_K is not run here)
    assert llama_cpp.llama_model_quantize(str(wide_f32).encode(), str(made).encode(), ctypes.byref(params)) == 0
    assert {int(t.tensor_type) for t in gguf.GGUFReader(str(made), "r").tensors
            if t.name.startswith("blk.") and len(t.shape) == 2} == {lt.Q1_0}
    assert _cli("export", wide_n1, "--to", "llamacpp", "-o", exported).returncode == 0
    # the same token windows for both (llama.cpp's own tokenizer splits this text differently from the
    # file's tokenizer.json in places, which would move the figure by itself)
    for path in (made, exported):
        with Model(path, threads=2, n_ctx=128) as m:
            tokens = np.asarray(m.tokenize(eval_text[:40000]), np.int64)
            ours = perplexity(m.logits, tokens, ctx=128, max_windows=10, progress=False)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)

        def theirs_logits(w):
            llm.reset()
            llm.eval([int(t) for t in w])
            return np.asarray(llm.scores[:len(w)], np.float32)
        theirs = perplexity(theirs_logits, tokens, ctx=128, max_windows=10, progress=False)
        print(f"{path.name}: ours {ours['ppl']:.1f} llama.cpp {theirs['ppl']:.1f} ratio {ours['ppl'] / theirs['ppl']:.4f}")
        assert ours["tokens_scored"] == theirs["tokens_scored"] == 10 * 63
        assert ours["ppl"] == pytest.approx(theirs["ppl"], rel=5e-3), (path.name, ours["ppl"], theirs["ppl"])

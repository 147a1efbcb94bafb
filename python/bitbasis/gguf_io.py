"""The one GGUF writer and the one (Python) GGUF reader of bitbasis.

Writing goes through the stock `gguf` package; binary-basis weights are written as their component
tensors (formats/binary_basis_v1.md). Reading uses `gguf.GGUFReader` and reassembles them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from . import format as bbf
from . import llamacpp_types


class GGUFFileError(ValueError):
    """A GGUF file that cannot be read as a bitbasis model."""


# --- atomic output ------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = True):
    """Yield a temporary path beside `path`; rename it over `path` only if the body succeeds.
    Interrupts (Ctrl-C, SIGTERM) remove the temporary file, so no partial output is ever left."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    if path.parent and not path.parent.exists():
        raise FileNotFoundError(f"output directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    old_term = None
    try:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            old_term = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; the output gets what open() would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if old_term is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, old_term)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --- writer -------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelTensors:
    """What goes into a file: float tensors with their storage type, and packed binary-basis ones."""
    arch: str
    kv: list[tuple[str, Any, Any]]                 # (key, value, gguf.GGUFValueType or None)
    dense: list[tuple[str, np.ndarray, str]]      # (name, float32 array, "F32"|"F16"|"Q8_0")
    packed: list[tuple[str, bbf.Packed]]
    method: str = "f32"
    settings: dict | None = None


def _add_dense(w, name: str, arr: np.ndarray, kind: str) -> None:
    import gguf
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if kind == "Q8_0" and arr.ndim == 2 and arr.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    elif kind in ("F16", "Q8_0") and arr.ndim >= 2:  # Q8_0 falls back to F16 for odd widths
        w.add_tensor(name, arr.astype(np.float16))
    else:  # norms and 1-D tensors stay F32, as llama.cpp does
        w.add_tensor(name, arr)


def write_model(path: str | os.PathLike, mt: ModelTensors, force: bool = True) -> None:
    import gguf
    with atomic_output(path, force=force) as tmp:
        w = gguf.GGUFWriter(tmp, mt.arch)
        for key, value, vtype in mt.kv:
            if vtype is None:
                w.add_key_value(key, value, _guess_type(value))
            elif vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(key, value)
            else:
                w.add_key_value(key, value, vtype)
        if mt.packed:
            w.add_uint32("bitbasis.version", bbf.VERSION)
            w.add_string("bitbasis.method", mt.method)
            w.add_string("bitbasis.settings", json.dumps(mt.settings or {}, sort_keys=True))
            for name, p in mt.packed:
                w.add_array(f"bitbasis.tensor.{name}", [int(x) for x in p.header])
        for name, arr, kind in mt.dense:
            _add_dense(w, name, arr, kind)
        for name, p in mt.packed:
            for suf in bbf.SUFFIXES:
                if suf in p.parts:
                    a = p.parts[suf]
                    a = a.view(np.int8) if a.dtype == np.uint8 else a
                    w.add_tensor(f"{name}.{suf}", np.ascontiguousarray(a))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()


def _guess_type(value):
    import gguf
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, int):
        return gguf.GGUFValueType.UINT32
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    return gguf.GGUFValueType.ARRAY


# --- reader -------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelFile:
    path: str
    kv: dict[str, Any]
    dense: dict[str, np.ndarray]        # dequantized to float32, numpy (PyTorch) shape order
    dense_types: dict[str, str]
    packed: dict[str, bbf.Packed]
    file_size: int

    @property
    def arch(self) -> str:
        return self.kv.get("general.architecture", "?")

    def weight(self, name: str) -> np.ndarray:
        if name in self.packed:
            return bbf.dequantize(bbf.unpack(self.packed[name], name))
        return self.dense[name]

    @property
    def n_params(self) -> int:
        n = sum(int(a.size) for a in self.dense.values())
        return n + sum(p.rows * p.cols for p in self.packed.values())


_VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
               "tokenizer.ggml.scores")


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """A metadata array left undecoded; `length` is its element count."""
    length: int


def _field_value(f):
    try:
        return f.contents()
    except Exception as e:  # a field the reader parsed but cannot decode
        raise GGUFFileError(f"metadata key {f.name}: {e}") from None


# The C++ reader's limits (cpp/src/gguf.cpp), far above any real model.
_MAX_TENSORS = _MAX_KV = 1 << 20
_MAX_KEY_LEN, _MAX_NAME_LEN, _MAX_ALIGNMENT = 1 << 16, 1024, 1 << 16
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value types
_STRING, _ARRAY = 8, 9


def check_structure(path: str) -> list[tuple[str, int, tuple[int, ...]]]:
    """Walk the GGUF header with the limits of the C++ reader before gguf.GGUFReader sees it; returns
    (name, ggml type, numpy shape) of every tensor.
    GGUFReader trusts what a file declares: an array count past the end of the file loops without
    progress (a hang), a tensor offset near 2^64 wraps around and reads other bytes, and odd dims,
    misaligned offsets, over-long names and nested arrays go through. Raises GGUFFileError."""
    import mmap
    import struct

    def fail(msg):
        raise GGUFFileError(f"{path}: {msg}")

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            fail(f"truncated file: {size} bytes is smaller than a GGUF header (24)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def get(fmt, what):
        nonlocal pos
        n = struct.calcsize(fmt)
        if n > size - pos:
            fail(f"truncated file: {what} needs {n} bytes at offset {pos}")
        pos += n
        return struct.unpack_from(fmt, buf, pos - n)[0]

    def string(cap, what):
        nonlocal pos
        n = get("<Q", what)
        if n > min(cap, size - pos):
            fail(f"{what}: string length {n} at offset {pos - 8} exceeds the limit {min(cap, size - pos)}")
        pos += n
        return bytes(buf[pos - n:pos])

    with buf:
        if buf[:4] != b"GGUF":
            fail("bad magic: not a GGUF file")
        pos = 4
        version = get("<I", "header")
        if version not in (2, 3):
            fail(f"unsupported GGUF version {version} (2 and 3 are supported)")
        n_tensors, n_kv = get("<Q", "header"), get("<Q", "header")
        # every kv takes >= 13 bytes, every tensor info >= 32
        if n_tensors > _MAX_TENSORS or n_tensors > (size - pos) // 32:
            fail(f"tensor count {n_tensors} is impossible for a file of {size} bytes (limit {_MAX_TENSORS})")
        if n_kv > _MAX_KV or n_kv > (size - pos) // 13:
            fail(f"metadata count {n_kv} is impossible for a file of {size} bytes (limit {_MAX_KV})")
        keys, alignment = set(), 32
        for _ in range(n_kv):
            key = string(_MAX_KEY_LEN, "metadata").decode("utf-8", "replace")
            vtype = get("<I", "metadata")
            if vtype == _STRING:
                string(size, "metadata")
            elif vtype == _ARRAY:
                etype, n = get("<I", "metadata"), get("<Q", "metadata")
                if etype == _STRING:
                    if n > (size - pos) // 8:
                        fail(f"truncated file: metadata key '{key}': array of {n} strings exceeds the file")
                    for _ in range(n):
                        string(size, "metadata")
                elif etype in _SCALAR_SIZE:
                    if n > (size - pos) // _SCALAR_SIZE[etype]:
                        fail(f"truncated file: metadata key '{key}': array of {n} exceeds the file")
                    pos += n * _SCALAR_SIZE[etype]
                else:
                    fail(f"metadata key '{key}': array of " + ("arrays" if etype == _ARRAY else f"unknown type {etype}")
                         + " is not supported")
            elif vtype in _SCALAR_SIZE:
                if _SCALAR_SIZE[vtype] > size - pos:
                    fail(f"truncated file: metadata needs {_SCALAR_SIZE[vtype]} bytes at offset {pos}")
                if key == "general.alignment":
                    if vtype != 4:
                        fail("general.alignment must be u32")
                    alignment = struct.unpack_from("<I", buf, pos)[0]
                pos += _SCALAR_SIZE[vtype]
            else:
                fail(f"metadata key '{key}': unknown value type {vtype}")
            if key in keys:
                fail(f"duplicate metadata key '{key}'")
            keys.add(key)
        if alignment == 0 or alignment & (alignment - 1) or alignment > _MAX_ALIGNMENT:
            fail(f"general.alignment {alignment} is not a power of two in [1, 65536]")
        tensors, names, infos = [], set(), []
        for _ in range(n_tensors):
            name = string(_MAX_NAME_LEN, "tensor info").decode("utf-8", "replace")
            nd = get("<I", "tensor info")
            if not 1 <= nd <= 4:
                fail(f"tensor '{name}': {nd} dimensions (1..4 supported)")
            dims = [get("<Q", "tensor info") for _ in range(nd)]
            ttype, offset = get("<I", "tensor info"), get("<Q", "tensor info")
            total = 1
            for d, e in enumerate(dims):
                if not 1 <= e < 1 << 63:
                    fail(f"tensor '{name}': dimension {d} is {e}")
                total *= e
                if total >= 1 << 63:
                    fail(f"tensor '{name}': element count overflows")
            try:   # llama.cpp's own table: it knows types gguf-py may not (Q2_0)
                blck, bbytes = llamacpp_types.layout(ttype)
            except KeyError:
                fail(f"tensor '{name}': unsupported tensor type {ttype}")
            if dims[0] % blck:
                fail(f"tensor '{name}': row of {dims[0]} elements is not a multiple of the block size {blck}")
            nbytes = total // blck * bbytes
            if nbytes >= 1 << 63:
                fail(f"tensor '{name}': byte size overflows")
            if offset % alignment:
                fail(f"tensor '{name}': data offset {offset} is not aligned to {alignment}")
            if name in names:
                fail(f"duplicate tensor name '{name}'")
            names.add(name)
            tensors.append((name, offset, nbytes))
            infos.append((name, ttype, tuple(reversed(dims))))
        data_start = -(-pos // alignment) * alignment
        if tensors and data_start > size:
            fail(f"truncated file: tensor data would start at {data_start}, file has {size} bytes")
        for name, offset, nbytes in tensors:
            if offset + nbytes > size - data_start:
                fail(f"tensor '{name}': data [{offset}, +{nbytes}) extends past the end of the file (data section "
                     f"holds {size - data_start} bytes; truncated file?)")
    return infos


_SCALAR_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
                12: "<f8"}


def read_metadata(path: str | os.PathLike, prefixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The metadata of a GGUF file without its tensors, read straight from the header (no gguf-py:
    a 50k-string vocabulary takes milliseconds here, seconds through GGUFReader). Only the keys
    starting with one of `prefixes` (all keys if None) are decoded: strings as str, bools as bool,
    numbers as int/float, numeric arrays as numpy arrays, string arrays as lists of str; the others
    are walked over. Every count and length is checked against the bytes left, with check_structure's
    limits, so a damaged or hostile file raises GGUFFileError (one line) and never reads past the end."""
    import mmap
    import struct

    path = str(path)

    def fail(msg):
        raise GGUFFileError(f"{path}: {msg}")

    if not os.path.isfile(path):
        fail("no such file")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            fail(f"truncated file: {size} bytes is smaller than a GGUF header (24)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def get(fmt, what):
        nonlocal pos
        n = struct.calcsize(fmt)
        if n > size - pos:
            fail(f"truncated file: {what} needs {n} bytes at offset {pos}")
        pos += n
        return struct.unpack_from(fmt, buf, pos - n)[0]

    def raw_string(cap, what):
        nonlocal pos
        n = get("<Q", what)
        if n > min(cap, size - pos):
            fail(f"{what}: string length {n} at offset {pos - 8} exceeds the limit {min(cap, size - pos)}")
        pos += n
        return buf[pos - n:pos]

    def text(raw, what):
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{what}: not UTF-8 ({e.reason} at byte {e.start})")

    def string_array(n, keep, what):   # the vocabulary: a tight loop (50k-250k strings)
        nonlocal pos
        p, length, raws = pos, struct.Struct("<Q").unpack_from, []
        for _ in range(n):
            if p + 8 > size:
                fail(f"truncated file: {what}: string length needs 8 bytes at offset {p}")
            (m,) = length(buf, p)
            p += 8
            if m > size - p:
                fail(f"{what}: string length {m} at offset {p - 8} exceeds the limit {size - p}")
            if keep:
                raws.append(buf[p:p + m])
            p += m
        pos = p
        if not keep:
            return None
        try:
            return [r.decode("utf-8") for r in raws]
        except UnicodeDecodeError as e:
            fail(f"{what}: a string is not UTF-8 ({e.reason})")

    out: dict[str, Any] = {}
    with buf:
        if buf[:4] != b"GGUF":
            fail("bad magic: not a GGUF file")
        pos = 4
        version = get("<I", "header")
        if version not in (2, 3):
            fail(f"unsupported GGUF version {version} (2 and 3 are supported)")
        get("<Q", "header")   # tensor count: the tensors are not read here
        n_kv = get("<Q", "header")
        if n_kv > _MAX_KV or n_kv > (size - pos) // 13:   # every kv takes >= 13 bytes
            fail(f"metadata count {n_kv} is impossible for a file of {size} bytes (limit {_MAX_KV})")
        seen = set()
        for _ in range(n_kv):
            key = text(raw_string(_MAX_KEY_LEN, "metadata key"), "metadata key")
            if key in seen:
                fail(f"duplicate metadata key {key!r}")
            seen.add(key)
            keep = prefixes is None or key.startswith(prefixes)
            what = f"metadata key {key!r}"
            vtype = get("<I", what)
            if vtype == _STRING:
                raw = raw_string(size, what)
                value = text(raw, what) if keep else None
            elif vtype in _SCALAR_SIZE:
                value = get(_SCALAR_FORMAT[vtype], what)
                value = bool(value) if vtype == 7 else value
            elif vtype == _ARRAY:
                etype, n = get("<I", what), get("<Q", what)
                if etype == _STRING:
                    if n > (size - pos) // 8:
                        fail(f"truncated file: {what}: array of {n} strings exceeds the file")
                    value = string_array(n, keep, what)
                elif etype in _SCALAR_SIZE:
                    if n > (size - pos) // _SCALAR_SIZE[etype]:
                        fail(f"truncated file: {what}: array of {n} exceeds the file")
                    value = np.frombuffer(buf, _ARRAY_DTYPE[etype], int(n), pos).copy() if keep else None
                    value = value.astype(bool) if keep and etype == 7 else value
                    pos += n * _SCALAR_SIZE[etype]
                else:
                    fail(f"{what}: array of " + ("arrays" if etype == _ARRAY else f"unknown type {etype}")
                         + " is not supported")
            else:
                fail(f"{what}: unknown value type {vtype}")
            if keep:
                out[key] = value
    return out


def read_model(path: str | os.PathLike) -> ModelFile:
    import gguf
    path = str(path)
    if not os.path.isfile(path):
        raise GGUFFileError(f"{path}: no such file")
    known = {int(t) for t in gguf.GGMLQuantizationType}
    for name, t, _ in check_structure(path):
        if t not in known:
            raise GGUFFileError(f"{path}: tensor {name} has llama.cpp type {llamacpp_types.type_name(t)}, which this "
                                f"gguf-py cannot read (the engine can: bitbasis generate / ppl)")
    try:
        r = gguf.GGUFReader(path, "r")
    except Exception as e:
        raise GGUFFileError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    # The vocabulary arrays (~50k strings) take tens of seconds to decode through GGUFReader and
    # nothing here needs them (the tokenizer is rebuilt by transformers): keep their length only.
    kv = {k: (LazyArray(len(f.data)) if k in _VOCAB_KEYS else _field_value(f)) for k, f in r.fields.items()}
    version = kv.get("bitbasis.version")
    if version is not None and int(version) > bbf.VERSION:
        raise GGUFFileError(f"{path}: bitbasis format version {version} is newer than this reader ({bbf.VERSION})")
    headers = {k[len("bitbasis.tensor."):]: v for k, v in kv.items() if k.startswith("bitbasis.tensor.")}
    tensors = {t.name: t for t in r.tensors}
    dense, dense_types, packed = {}, {}, {}
    component = {f"{n}.{s}" for n in headers for s in bbf.SUFFIXES}
    for name, t in tensors.items():
        if name in component:
            continue
        if name.rsplit(".", 1)[-1] in bbf.SUFFIXES:
            raise GGUFFileError(f"{path}: component tensor {name} has no bitbasis.tensor header")
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            if int(t.tensor_type) in llamacpp_types.LOWBIT:   # gguf-py has no Q1_0 decoder
                arr = llamacpp_types.dequantize(int(t.tensor_type), np.asarray(t.data), int(np.prod(shape[:-1])),
                                                shape[-1])
            else:
                arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except Exception as e:
            raise GGUFFileError(f"{path}: tensor {name} of type {t.tensor_type.name}: {e}") from None
        dense[name] = np.asarray(arr, np.float32).reshape(shape)
        dense_types[name] = t.tensor_type.name
    for name, hdr in headers.items():
        if not isinstance(hdr, list) or len(hdr) != 5:
            raise GGUFFileError(f"{path}: bitbasis.tensor.{name} must be 5 integers, got {hdr!r}")
        rows, cols, n, g, flags = (int(x) for x in hdr)
        parts = {}
        for suf in bbf.SUFFIXES:
            t = tensors.get(f"{name}.{suf}")
            if t is not None:
                shape = tuple(int(x) for x in reversed(t.shape))
                a = np.asarray(t.data)
                if a.dtype == np.int8:
                    a = a.view(np.uint8)
                parts[suf] = a.reshape(shape)
        p = bbf.Packed(rows, cols, n, g, flags, parts)
        try:
            bbf.validate(p, name)
        except bbf.FormatError as e:
            raise GGUFFileError(f"{path}: {e}") from None
        packed[name] = p
    return ModelFile(path, kv, dense, dense_types, packed, os.path.getsize(path))


EDGE_TENSORS = ("token_embd.weight", "output.weight")
_DENSE_BPW = {"F32": 32.0, "F16": 16.0, "Q8_0": 8.5}


def summarize(mf: ModelFile) -> dict:
    """Sizes and honest bit counts of a model file: block bpw over the block linears' binary-basis
    tensors, the token embedding and head described on their own (edge: {name: (form, bpw)})."""
    blk = [p for n, p in mf.packed.items() if n not in EDGE_TENSORS]
    q_bytes = sum(p.nbytes for p in blk)
    q_weights = sum(p.rows * p.cols for p in blk)
    edge = {}
    for n in EDGE_TENSORS:
        if n in mf.packed:
            p = mf.packed[n]
            edge[n] = (f"binary basis N={p.n_planes} G={p.group}", p.true_bpw)
        elif n in mf.dense_types:
            edge[n] = (mf.dense_types[n], _DENSE_BPW.get(mf.dense_types[n]))
    return {
        "edge": edge,
        "file_bytes": mf.file_size,
        "params": mf.n_params,
        "quantized_weights": q_weights,
        "block_bpw": (8.0 * q_bytes / q_weights) if q_weights else None,
        "file_bpw": 8.0 * mf.file_size / mf.n_params,
        "method": mf.kv.get("bitbasis.method", "f32/f16"),
    }

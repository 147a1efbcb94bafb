"""`bitbasis export --to llamacpp`: a bitbasis GGUF rewritten for stock llama.cpp.

Every binary-basis weight whose values a llama.cpp type holds exactly is written in that type
(bitbasis.llamacpp_types):
  N 1, no offset, G a multiple of 128                      -> Q1_0  (d = α; a wider group repeats d)
  N 2, α1 = 2·α0 and μ = α0 (2-bit codes, zero point 1)     -> Q2_0  (d = α1, c = b0 + 2·b1); TQ1_0 when
                                                              G is a multiple of 256 and no code is 3
  N 2, no offset, α0 = α1 (ternary: s0 + s1 in {-2, 0, 2})  -> TQ1_0 (G a multiple of 256) or Q2_0 (d = 2·α0)
Any other weight (more planes, other scale ratios, class masks, sparse outliers, column scales,
widths that are not whole blocks) is written dequantized as F32 — exact, but not small — and the
report says why it did not fit. Dense tensors (embedding, norms, head) and the metadata are copied as
they are; the bitbasis.* keys are dropped, so the file is a plain llama.cpp model.
"""
from __future__ import annotations

import dataclasses
import struct
from collections import Counter

import numpy as np

from . import format as bbf
from . import llamacpp_types as lt
from .gguf_io import GGUFFileError, atomic_output


@dataclasses.dataclass
class Fit:
    type: int | None                 # the llama.cpp type, or None: written as F32
    reason: str                      # why (not) that type
    codes: np.ndarray | None = None  # [rows, cols] for encode()
    d: np.ndarray | None = None      # float16 [rows, cols // block]


def fit(p: bbf.Packed, name: str = "tensor") -> Fit:
    """The llama.cpp type that holds binary-basis tensor `p` exactly, with its codes and scales."""
    extra = p.flags & ~(bbf.OFFSET | bbf.POW2)
    if extra:
        names = [n for n, f in (("COLMASK", bbf.COLMASK), ("ELEMCLASS", bbf.ELEMCLASS), ("SPARSE", bbf.SPARSE),
                                ("COLSCALE", bbf.COLSCALE)) if extra & f]
        return Fit(None, f"flag {'+'.join(names)}: llama.cpp types have one scale per block and no outlier "
                         f"classes, sparse values or column scales")
    if p.n_planes > 2:
        return Fit(None, f"N = {p.n_planes} planes: llama.cpp's binary-like types hold 1 (Q1_0) or 2 (Q2_0, TQ*)")
    bb = bbf.unpack(p, name)
    rows, cols, G = p.rows, p.cols, p.group
    sc = bbf.full_scales(bb)[:, :, 0, :]                 # [rows, ngroups, N] float32 (exact f16 values)
    bits = bb.signs.astype(np.uint8)                     # [N, rows, cols], 1 = +1
    if p.n_planes == 1:
        if bb.offsets is not None:
            return Fit(None, "N = 1 with an offset μ: Q1_0 is ±d, without one")
        if G % 128 or cols % 128:
            return Fit(None, f"N = 1, G = {G}, {cols} columns: Q1_0 needs G and the width multiples of 128")
        d = np.repeat(sc[:, :, 0], G // 128, axis=1)[:, : cols // 128]
        return Fit(lt.Q1_0, "N = 1, G = 128 (a sign and one scale per 128)", bits[0], d.astype(np.float16))
    a0, a1 = sc[:, :, 0], sc[:, :, 1]
    if bb.offsets is not None:
        mu = bb.offsets[:, :, 0]
        if not (np.array_equal(a1, 2 * a0) and np.array_equal(mu, a0)):
            return Fit(None, "N = 2 whose scales are not α1 = 2·α0 with μ = α0 (2-bit codes with zero point 1, "
                             "Q2_0's (c − 1)·d)")
        codes, dg = bits[0] + 2 * bits[1], a1
    else:
        if not np.array_equal(a0, a1):
            return Fit(None, "N = 2 without an offset and with α0 ≠ α1 (not ternary, no llama.cpp type)")
        codes, dg = bits[0] + bits[1], 2 * a0               # t = (s0 + s1)/2 + 1, w = (t − 1)·2α
    if not np.all(np.isfinite(dg.astype(np.float16))):
        return Fit(None, "a scale d overflows fp16")
    ternary = codes.max(initial=0) <= 2
    for t, why in ((lt.TQ1_0, "ternary codes"), (lt.Q2_0, "2-bit codes")):
        blck = lt.layout(t)[0]
        if t == lt.TQ1_0 and not ternary:
            continue
        if G % blck == 0 and cols % blck == 0:
            d = np.repeat(dg, G // blck, axis=1)[:, : cols // blck].astype(np.float16)
            return Fit(t, f"N = 2, G = {G}, {why}", codes, d)
    return Fit(None, f"N = 2, G = {G}, {cols} columns: Q2_0 needs G and the width multiples of 64 "
                     f"(TQ1_0: 256)")


def _raw_fields(r, skip) -> list[bytes]:
    """The metadata key-values of reader `r` as their exact bytes, less the keys `skip` accepts."""
    raw = r.data
    out = []
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or skip(name):
            continue
        end = f.offset + sum(int(p.nbytes) for p in f.parts)
        out.append(bytes(raw[f.offset:end]))
    return out


def _kv(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def _write_gguf(path: str, kvs: list[bytes], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
                alignment: int) -> None:
    """A GGUF v3 file: metadata blobs as given, tensors (name, numpy shape, ggml type, bytes) in order.
    Written by hand because gguf-py's writer does not know every type number llama.cpp has (Q2_0)."""
    head = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for kv in kvs:
        head += kv
    offset = 0
    for name, shape, t, data in tensors:
        nb = name.encode()
        head += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", int(x)) for x in reversed(shape))   # ggml order
        head += struct.pack("<IQ", t, offset)
        offset += -(-len(data) // alignment) * alignment
    head += b"\0" * (-len(head) % alignment)
    with open(path, "wb") as f:
        f.write(head)
        for _, _, _, data in tensors:
            f.write(data)
            f.write(b"\0" * (-len(data) % alignment))


def export_llamacpp(src: str, out: str, force: bool = False) -> list[tuple[str, str, str]]:
    """Write `src` (a bitbasis GGUF) as a llama.cpp GGUF at `out` (atomically). Returns one
    (tensor, type written, reason) row per binary-basis weight."""
    import gguf
    from .gguf_io import read_model
    src = str(src)
    mf = read_model(src)          # validates every binary-basis tensor (a clear error for a bad file)
    if not mf.packed:
        raise GGUFFileError(f"{src}: no binary-basis tensors (method {mf.kv.get('bitbasis.method', 'f32/f16')}): "
                            f"llama.cpp reads it as it is")
    r = gguf.GGUFReader(src, "r")   # read_model checked the structure first
    alignment = int(mf.kv.get("general.alignment", 32))
    components = {f"{n}.{s}" for n in mf.packed for s in bbf.SUFFIXES}
    order = []   # tensors in the source's order, each binary-basis weight where its first component was
    for t in r.tensors:
        if t.name in components:
            base = t.name.rsplit(".", 1)[0]
            if base not in order:
                order.append(base)
        else:
            order.append(t.name)
    by_name = {t.name: t for t in r.tensors}
    tensors, report, kinds = [], [], Counter()
    for name in order:
        if name in mf.packed:
            p = mf.packed[name]
            f = fit(p, name)
            if f.type is None:
                w = bbf.dequantize(bbf.unpack(p, name)).astype(np.float32)
                tensors.append((name, (p.rows, p.cols), 0, w.tobytes()))
                report.append((name, "F32", f.reason))
                kinds[0] += p.rows * p.cols
            else:
                tensors.append((name, (p.rows, p.cols), f.type, lt.encode(f.type, f.codes, f.d).tobytes()))
                report.append((name, lt.type_name(f.type), f.reason))
                kinds[f.type] += p.rows * p.cols
        else:
            t = by_name[name]
            shape = tuple(int(x) for x in reversed(t.shape))
            tensors.append((name, shape, int(t.tensor_type), bytes(np.asarray(t.data).tobytes())))
    kvs = _raw_fields(r, lambda k: k.startswith("bitbasis.") or k == "general.file_type")
    main = max((t for t in kinds if t), key=lambda t: kinds[t], default=None)
    if main is not None:   # llama_ftype, for display (llama.cpp reads each tensor's own type)
        kvs.append(_kv("general.file_type", 4, struct.pack("<I", lt.FTYPE[main])))
    with atomic_output(out, force=force) as tmp:
        _write_gguf(tmp, kvs, tensors, alignment)
    return report

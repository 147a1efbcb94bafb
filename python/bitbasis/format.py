"""The binary-basis tensor type, v1 (spec: formats/binary_basis_v1.md).

One packer, one unpacker, one dequantizer, shared by every quantizer. A quantizer produces a
`BinaryBasis` (signs as ±1 planes, scales, optional classes / sparse values) in memory; `pack` turns it
into the component arrays written to GGUF; `unpack` reverses that exactly; `dequantize` evaluates
W ≈ Σ α_i s_i + μ with the rules of the spec.
"""
from __future__ import annotations

import dataclasses

import numpy as np

VERSION = 1
OFFSET, COLMASK, ELEMCLASS, SPARSE, POW2, COLSCALE = 1, 2, 4, 8, 16, 32
KNOWN_FLAGS = OFFSET | COLMASK | ELEMCLASS | SPARSE | POW2 | COLSCALE
MAX_PLANES = 8
SUFFIXES = ("bbp", "bbs", "bbo", "bbc", "bbe", "bbm", "bbv", "bbz", "bbk")


class FormatError(ValueError):
    """A binary-basis tensor that breaks a rule of the spec."""


def n_groups(cols: int, group: int) -> int:
    return -(-cols // group)


def check_group(group: int) -> None:
    if group < 64 or group % 64 or group > 65536:
        raise FormatError(f"group size {group} must be a multiple of 64 in [64, 65536]")


def row_group(cols: int) -> int:
    """The group size that makes one group per row (per-row scales)."""
    return max(64, -(-cols // 64) * 64)


@dataclasses.dataclass
class BinaryBasis:
    """A quantized matrix in unpacked form (numpy, float32 / bool).

    signs:    bool [N, rows, cols]   True = +1
    scales:   float32 [rows, ngroups, C, N]  (with pow2: only [..., :1] is stored, α_i = α_0·2^i)
    offsets:  float32 [rows, ngroups, C] or None
    colmask:  bool [cols] or None    class 1 columns
    elemclass: bool [rows, cols] or None   class C-1 elements (where colmask is not set)
    sparse_mask: bool [rows, cols] or None; sparse_codes uint8 [nnz]; sparse_zs float32 [rows, 2]
    colscale: float32 [cols] or None
    """
    signs: np.ndarray
    scales: np.ndarray
    group: int
    offsets: np.ndarray | None = None
    colmask: np.ndarray | None = None
    elemclass: np.ndarray | None = None
    sparse_mask: np.ndarray | None = None
    sparse_codes: np.ndarray | None = None
    sparse_zs: np.ndarray | None = None
    colscale: np.ndarray | None = None
    pow2: bool = False

    @property
    def n_planes(self) -> int:
        return self.signs.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.signs.shape[1], self.signs.shape[2]

    @property
    def n_classes(self) -> int:
        return 1 + (self.colmask is not None) + (self.elemclass is not None)

    @property
    def flags(self) -> int:
        f = 0
        f |= OFFSET if self.offsets is not None else 0
        f |= COLMASK if self.colmask is not None else 0
        f |= ELEMCLASS if self.elemclass is not None else 0
        f |= SPARSE if self.sparse_mask is not None else 0
        f |= POW2 if self.pow2 else 0
        f |= COLSCALE if self.colscale is not None else 0
        return f


@dataclasses.dataclass
class Packed:
    """Component arrays exactly as stored in GGUF (suffix -> numpy array) plus the header."""
    rows: int
    cols: int
    n_planes: int
    group: int
    flags: int
    parts: dict[str, np.ndarray]

    @property
    def header(self) -> list[int]:
        return [self.rows, self.cols, self.n_planes, self.group, self.flags]

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.parts.values())

    @property
    def true_bpw(self) -> float:
        return 8.0 * self.nbytes / (self.rows * self.cols)


# --- bit packing --------------------------------------------------------------------------------

def _pad_cols(a: np.ndarray, cols_padded: int) -> np.ndarray:
    pad = cols_padded - a.shape[-1]
    if pad == 0:
        return a
    width = [(0, 0)] * (a.ndim - 1) + [(0, pad)]
    return np.pad(a, width)


def pack_bits(bits: np.ndarray, group: int) -> np.ndarray:
    """bool [..., cols] -> uint8 [..., ngroups, G/8], LSB first, padding bits 0."""
    cols = bits.shape[-1]
    ng = n_groups(cols, group)
    b = _pad_cols(bits.astype(bool), ng * group)
    packed = np.packbits(b, axis=-1, bitorder="little")
    return packed.reshape(*bits.shape[:-1], ng, group // 8)


def unpack_bits(packed: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [..., ngroups, G/8] -> bool [..., cols]."""
    flat = packed.reshape(*packed.shape[:-2], -1)
    bits = np.unpackbits(flat, axis=-1, bitorder="little").astype(bool)
    return bits[..., :cols]


# --- pack / unpack ------------------------------------------------------------------------------

def pack(bb: BinaryBasis) -> Packed:
    check_group(bb.group)
    n, rows, cols = bb.signs.shape
    if not 1 <= n <= MAX_PLANES:
        raise FormatError(f"{n} planes: must be 1..{MAX_PLANES}")
    ng, c = n_groups(cols, bb.group), bb.n_classes
    s = 1 if bb.pow2 else n
    scales = np.asarray(bb.scales, np.float32)
    if scales.shape != (rows, ng, c, n) and scales.shape != (rows, ng, c, s):
        raise FormatError(f"scales shape {scales.shape}, expected {(rows, ng, c, s)}")
    parts: dict[str, np.ndarray] = {}
    planes = pack_bits(np.asarray(bb.signs, bool), bb.group)          # [N, rows, ng, G/8]
    parts["bbp"] = np.ascontiguousarray(planes.transpose(1, 2, 0, 3))  # [rows, ng, N, G/8]
    parts["bbs"] = np.ascontiguousarray(scales[..., :s].astype(np.float16))
    if bb.offsets is not None:
        parts["bbo"] = np.asarray(bb.offsets, np.float32).reshape(rows, ng, c).astype(np.float16)
    if bb.colmask is not None:
        parts["bbc"] = pack_bits(np.asarray(bb.colmask, bool).reshape(cols), bb.group)
    if bb.elemclass is not None:
        ec = np.asarray(bb.elemclass, bool).reshape(rows, cols)
        if bb.colmask is not None:
            ec = ec & ~np.asarray(bb.colmask, bool)[None, :]
        parts["bbe"] = pack_bits(ec, bb.group)
    if bb.sparse_mask is not None:
        m = np.asarray(bb.sparse_mask, bool).reshape(rows, cols)
        codes = np.asarray(bb.sparse_codes, np.uint8).reshape(-1)
        if codes.size != int(m.sum()):
            raise FormatError(f"{codes.size} sparse codes for {int(m.sum())} mask bits")
        parts["bbm"] = pack_bits(m, bb.group)
        parts["bbv"] = codes if codes.size else np.zeros(1, np.uint8)
        parts["bbz"] = np.asarray(bb.sparse_zs, np.float32).reshape(rows, 2).astype(np.float16)
    if bb.colscale is not None:
        parts["bbk"] = np.asarray(bb.colscale, np.float32).reshape(cols).astype(np.float16)
    return Packed(rows, cols, n, bb.group, bb.flags, parts)


def validate(p: Packed, name: str = "tensor") -> None:
    """Every rule of the spec; raises FormatError naming the tensor and the rule."""
    rows, cols, n, g, flags = p.header
    if rows < 1 or cols < 1:
        raise FormatError(f"{name}: shape [{rows}, {cols}] must be positive")
    if not 1 <= n <= MAX_PLANES:
        raise FormatError(f"{name}: {n} planes, must be 1..{MAX_PLANES}")
    try:
        check_group(g)
    except FormatError as e:
        raise FormatError(f"{name}: {e}") from None
    if flags & ~KNOWN_FLAGS:
        raise FormatError(f"{name}: unknown flag bits {flags & ~KNOWN_FLAGS:#x} (newer writer?)")
    ng = n_groups(cols, g)
    c = 1 + bool(flags & COLMASK) + bool(flags & ELEMCLASS)
    s = 1 if flags & POW2 else n
    expect = {"bbp": ((rows, ng, n, g // 8), np.uint8), "bbs": ((rows, ng, c, s), np.float16)}
    if flags & OFFSET:
        expect["bbo"] = ((rows, ng, c), np.float16)
    if flags & COLMASK:
        expect["bbc"] = ((ng, g // 8), np.uint8)
    if flags & ELEMCLASS:
        expect["bbe"] = ((rows, ng, g // 8), np.uint8)
    if flags & SPARSE:
        expect["bbm"] = ((rows, ng, g // 8), np.uint8)
        expect["bbz"] = ((rows, 2), np.float16)
    if flags & COLSCALE:
        expect["bbk"] = ((cols,), np.float16)
    present = set(p.parts)
    want = set(expect) | ({"bbv"} if flags & SPARSE else set())
    if present != want:
        raise FormatError(f"{name}: components {sorted(present)} do not match flags {flags} "
                          f"(expected {sorted(want)})")
    for suf, (shape, dt) in expect.items():
        a = p.parts[suf]
        if tuple(a.shape) != shape or a.dtype.itemsize != np.dtype(dt).itemsize:
            raise FormatError(f"{name}.{suf}: shape {tuple(a.shape)} {a.dtype}, expected {shape} {np.dtype(dt)}")
    pad = ng * g - cols
    if pad:
        for suf in ("bbp", "bbc", "bbe", "bbm"):
            if suf in p.parts:
                a = p.parts[suf].view(np.uint8)
                if suf == "bbp":  # [rows, ng, N, G/8] -> [rows, N, ng, G/8]
                    a = a.transpose(0, 2, 1, 3)
                tail = unpack_bits(a, ng * g)[..., cols:]
                if tail.any():
                    raise FormatError(f"{name}.{suf}: padding bits past column {cols} are not zero")
    if flags & SPARSE:
        nnz = int(np.unpackbits(p.parts["bbm"].view(np.uint8)).sum())
        v = p.parts["bbv"]
        if v.ndim != 1 or v.size != max(nnz, 1):
            raise FormatError(f"{name}.bbv: {v.size} codes for {nnz} sparse-mask bits")


def unpack(p: Packed, name: str = "tensor") -> BinaryBasis:
    validate(p, name)
    rows, cols, n, g, flags = p.header
    planes = p.parts["bbp"].view(np.uint8).transpose(2, 0, 1, 3)  # [N, rows, ng, G/8]
    signs = unpack_bits(planes, cols)
    scales = p.parts["bbs"].astype(np.float32)
    kw: dict = {}
    if flags & OFFSET:
        kw["offsets"] = p.parts["bbo"].astype(np.float32)
    if flags & COLMASK:
        kw["colmask"] = unpack_bits(p.parts["bbc"].view(np.uint8), cols)
    if flags & ELEMCLASS:
        kw["elemclass"] = unpack_bits(p.parts["bbe"].view(np.uint8), cols)
    if flags & SPARSE:
        m = unpack_bits(p.parts["bbm"].view(np.uint8), cols)
        kw["sparse_mask"] = m
        kw["sparse_codes"] = p.parts["bbv"].view(np.uint8)[: int(m.sum())].copy()
        kw["sparse_zs"] = p.parts["bbz"].astype(np.float32)
    if flags & COLSCALE:
        kw["colscale"] = p.parts["bbk"].astype(np.float32)
    return BinaryBasis(signs=signs, scales=scales, group=g, pow2=bool(flags & POW2), **kw)


def full_scales(bb: BinaryBasis) -> np.ndarray:
    """[rows, ngroups, C, N] with POW2 expanded (α_i = α_0 · 2^i)."""
    s = np.asarray(bb.scales, np.float32)
    if bb.pow2:
        s = s[..., :1] * (2.0 ** np.arange(bb.n_planes, dtype=np.float32))
    return s


def class_index(bb: BinaryBasis) -> np.ndarray:
    """int [rows, cols]: the class of every element (spec: 'class c = ...')."""
    rows, cols = bb.shape
    cls = np.zeros((rows, cols), np.int64)
    if bb.elemclass is not None:
        cls[np.asarray(bb.elemclass, bool)] = bb.n_classes - 1
    if bb.colmask is not None:
        cls[:, np.asarray(bb.colmask, bool)] = 1
    return cls


def dequantize(bb: BinaryBasis) -> np.ndarray:
    """float32 [rows, cols]. Summation order fixed by the spec: planes ascending, then μ, then
    column scale, then sparse replacement."""
    rows, cols = bb.shape
    scales = full_scales(bb)                                  # [rows, ng, C, N]
    cls = class_index(bb)
    gidx = np.arange(cols) // bb.group
    r = np.arange(rows)[:, None]
    alpha = scales[r, gidx[None, :], cls]                     # [rows, cols, N]
    w = np.zeros((rows, cols), np.float32)
    for i in range(bb.n_planes):
        w += alpha[..., i] * np.where(bb.signs[i], np.float32(1), np.float32(-1))
    if bb.offsets is not None:
        w += np.asarray(bb.offsets, np.float32)[r, gidx[None, :], cls]
    if bb.colscale is not None:
        w *= np.asarray(bb.colscale, np.float32)[None, :]
    if bb.sparse_mask is not None:
        m = np.asarray(bb.sparse_mask, bool)
        zs = np.asarray(bb.sparse_zs, np.float32)
        rr = np.nonzero(m)[0]
        w[m] = zs[rr, 0] * bb.sparse_codes.astype(np.float32) + zs[rr, 1]
    return w


def round_trip(bb: BinaryBasis) -> BinaryBasis:
    """What a reader will see: every float through fp16. Quantizers use it so that the weights
    they compensate against are the ones the file holds."""
    return unpack(pack(bb))


def describe(p: Packed) -> str:
    return (f"[{p.rows}x{p.cols}] N={p.n_planes} G={p.group} flags={p.flags} "
            f"{p.nbytes} B {p.true_bpw:.3f} bpw")


def permute_rows(bb: BinaryBasis, perm: np.ndarray) -> BinaryBasis:
    """Reorder output rows (llama.cpp's rotary permutation of q/k) without touching any value."""
    perm = np.asarray(perm)
    kw = dict(group=bb.group, pow2=bb.pow2, colmask=bb.colmask, colscale=bb.colscale)
    kw["signs"] = bb.signs[:, perm]
    kw["scales"] = np.asarray(bb.scales)[perm]
    if bb.offsets is not None:
        kw["offsets"] = np.asarray(bb.offsets)[perm]
    if bb.elemclass is not None:
        kw["elemclass"] = np.asarray(bb.elemclass)[perm]
    if bb.sparse_mask is not None:
        m = np.asarray(bb.sparse_mask, bool)
        starts = np.concatenate([[0], np.cumsum(m.sum(1))])
        kw["sparse_mask"] = m[perm]
        kw["sparse_codes"] = np.concatenate([bb.sparse_codes[starts[r]:starts[r + 1]] for r in perm]) \
            if m.any() else np.zeros(0, np.uint8)
        kw["sparse_zs"] = np.asarray(bb.sparse_zs)[perm]
    return BinaryBasis(**kw)

"""llama.cpp's tensor types (ggml_type): their names, and the low-bit ones that hold binary-basis
tensors exactly, in both directions (cpp/src/llamacpp_types.h is the engine's side).

    Q1_0  (41): blocks of 128: fp16 d, 128 sign bits      w = ±d          = N 1, G 128, no offset
    Q2_0  (42): blocks of 64:  fp16 d, 64 2-bit codes c    w = (c − 1)·d   = N 2, G 64,  α0 = d/2, α1 = d, μ = d/2
    TQ2_0 (35): blocks of 256: 64 bytes of 2-bit codes, d  w = (c − 1)·d   (the same, G 256)
    TQ1_0 (34): blocks of 256: 52 bytes of base-3 trits, d w = (t − 1)·d   (ternary only)

(c − 1)·d = d/2·s0 + d·s1 + d/2 with s_i = 2·bit_i(c) − 1: GPTQ's 2-bit codes with zero point 1
(formats/binary_basis_v1.md). Block layouts are ggml's (ggml/src/ggml-common.h); the decoders here are
written from those layouts, independently of llama.cpp's code, and the tests hold them against
gguf-py's TQ decoders and, where llama-cpp-python is installed, llama.cpp's own dequantize_row_*.
"""
from __future__ import annotations

import numpy as np

# ggml_type -> (name, elements per block, bytes per block); ggml/include/ggml.h, ggml.c's type traits
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}
TQ1_0, TQ2_0, Q1_0, Q2_0 = 34, 35, 41, 42
LOWBIT = (Q1_0, Q2_0, TQ1_0, TQ2_0)
# what the engine runs directly (besides binary-basis tensors)
ENGINE_TYPES = (0, 1, 8) + LOWBIT
# llama_ftype (general.file_type, include/llama.h): the name of a file's quantization mix
FTYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
               12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
               19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL",
               26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16",
               36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0"}
# the llama_ftype of a file mostly of each low-bit type
FTYPE = {TQ1_0: 36, TQ2_0: 37, Q1_0: 40, Q2_0: 41}


def type_name(t: int) -> str:
    """ggml's name of tensor type number `t` ("Q4_K"), or "type N" for a number ggml does not have."""
    e = GGML_TYPES.get(int(t))
    return e[0] if e else f"type {int(t)}"


def layout(t: int) -> tuple[int, int]:
    """(elements, bytes) of one block of type `t`; KeyError for an unknown number."""
    _, blck, nbytes = GGML_TYPES[int(t)]
    return blck, nbytes


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)


def _tq1_trits(b: np.ndarray, n: int) -> np.ndarray:
    """Trit n of base-3 fixed-point bytes `b` (a byte is q = ceil(v·256/243) for v = Σ t_n 3^(4-n)):
    the integer part of 3·(q·3^n mod 256)/256."""
    return ((((b * _POW3[n]).astype(np.uint8)).astype(np.uint16) * 3) >> 8).astype(np.uint8)


def decode(t: int, raw: np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint8 [rows, cols], d float16 [rows, cols // block]) of a low-bit tensor's bytes. Codes are
    the sign bit for Q1_0 (1 = +d), c in 0..3 for Q2_0/TQ2_0, the trit 0..2 for TQ1_0."""
    blck, nbytes = layout(t)
    if cols % blck:
        raise ValueError(f"{type_name(t)} needs rows of a multiple of {blck} columns, not {cols}")
    b = np.frombuffer(np.asarray(raw).tobytes(), np.uint8).reshape(rows * (cols // blck), nbytes)
    if t == Q1_0:
        d, codes = b[:, :2], np.unpackbits(b[:, 2:], axis=1, bitorder="little")
    elif t == Q2_0:
        d = b[:, :2]
        codes = ((b[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).reshape(-1, 64)
    elif t == TQ2_0:
        d = b[:, 64:]
        q = b[:, :64].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        codes = (q & 3).reshape(-1, 256)   # element 128h + 32l + m from bits 2l of byte 32h + m
    elif t == TQ1_0:
        d = b[:, 52:]
        parts = [np.concatenate([_tq1_trits(b[:, 0:32], n) for n in range(5)], axis=1),
                 np.concatenate([_tq1_trits(b[:, 32:48], n) for n in range(5)], axis=1),
                 np.concatenate([_tq1_trits(b[:, 48:52], n) for n in range(4)], axis=1)]
        codes = np.concatenate(parts, axis=1)
    else:
        raise ValueError(f"{type_name(t)} is not one of llama.cpp's low-bit types (Q1_0, Q2_0, TQ1_0, TQ2_0)")
    d = np.ascontiguousarray(d).view(np.float16).reshape(rows, cols // blck)
    return codes.reshape(rows, cols).astype(np.uint8), d


def dequantize(t: int, raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """float32 [rows, cols] of a low-bit tensor, as llama.cpp's dequantize_row_* computes it."""
    codes, d = decode(t, raw, rows, cols)
    blck = layout(t)[0]
    v = (2.0 * codes - 1.0) if t == Q1_0 else (codes.astype(np.float32) - 1.0)
    return (v.reshape(rows, -1, blck) * d.astype(np.float32)[:, :, None]).reshape(rows, cols).astype(np.float32)


def encode(t: int, codes: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The bytes (uint8) of a low-bit tensor from codes [rows, cols] and fp16 d [rows, cols // block]."""
    blck, nbytes = layout(t)
    rows, cols = codes.shape
    c = np.asarray(codes, np.uint8).reshape(-1, blck)
    dd = np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8)
    if t == Q1_0:
        out = np.concatenate([dd, np.packbits(c, axis=1, bitorder="little")], axis=1)
    elif t == Q2_0:
        q = (c.reshape(-1, 16, 4) << np.array([0, 2, 4, 6], np.uint8)).sum(axis=2, dtype=np.uint8)
        out = np.concatenate([dd, q], axis=1)
    elif t == TQ2_0:
        q = (c.reshape(-1, 2, 4, 32) << np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).sum(axis=2, dtype=np.uint8)
        out = np.concatenate([q.reshape(-1, 64), dd], axis=1)
    elif t == TQ1_0:
        if c.max(initial=0) > 2:
            raise ValueError("TQ1_0 holds ternary codes only")

        def pack(x, n):   # n trits a byte, the first most significant, as a fraction of 3^5 (4: last trit 0)
            x = x.reshape(x.shape[0], n, -1).astype(np.uint16)
            v = sum(x[:, i] * 3 ** (4 - i) for i in range(n))
            return ((v * 256 + 242) // 243).astype(np.uint8)
        out = np.concatenate([pack(c[:, :160], 5), pack(c[:, 160:240], 5), pack(c[:, 240:], 4), dd], axis=1)
    else:
        raise ValueError(f"{type_name(t)} is not one of llama.cpp's low-bit types")
    assert out.shape[1] == nbytes
    return np.ascontiguousarray(out).reshape(rows, (cols // blck) * nbytes)

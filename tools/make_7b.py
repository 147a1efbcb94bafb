#!/usr/bin/env python3
"""A Llama-2-7B-shaped test bed with random weights, without downloading anything.

Writes, through the shared writer (bitbasis.gguf_io.write_model):
  OUT/7b-L{layers}-bb{N}.gguf   binary-basis linears (random signs, random per-group scales, the
                                residual method's layout: one class, no offsets), group 128,
                                token embedding and output head Q8_0
  OUT/7b-L{layers}-bb{N}-head{T}.gguf  the same with the output head stored as T (--head-type)
  OUT/7b-L{layers}-f16.gguf     the same shapes as plain F16, for llama.cpp to quantize
  OUT/7b-L{layers}-{TYPE}.gguf  that F16 file quantized by llama.cpp (llama_model_quantize)

Shapes are Llama-2-7B's (hidden 4096, ffn 11008, 32 heads, untied output head); the vocabulary
and tokenizer are SmolLM2's (49152 ids) so both engines load a real tokenizer; the benchmark feeds
token ids, so the text never matters. Speed does not depend on the weight values.
--layers trims the depth (decode time per token is linear in the layer count plus the fixed cost of
the embedding row and the output head).

    python tools/make_7b.py -o /work/out/7b --layers 8 --bases 1,2 --quantize Q4_0,Q2_K,TQ1_0
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT / "python"))
sys.path.insert(0, str(_ROOT / "tools"))

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
STD = 0.02   # weight scale of a trained 7B model's linears, roughly


def config(layers=32, hidden=4096, ffn=11008, heads=32, kv_heads=None, vocab=49152) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads, "vocab_size": vocab,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """(rows, cols) = (out, in) of each block linear."""
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
            "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}


def _kv(cfg: dict, tokenizer_dir: Path, name: str) -> list:
    from bitbasis import hf
    return hf.arch_kv(cfg, name) + hf.tokenizer_kv(tokenizer_dir, cfg)


def random_basis(rng, rows: int, cols: int, n_planes: int, group: int):
    """A random BinaryBasis with the residual method's layout: N sign planes, one scale per group
    and plane, the later planes smaller (as a residual cascade's are)."""
    from bitbasis import format as bbf
    ng = bbf.n_groups(cols, group)
    signs = np.unpackbits(rng.integers(0, 256, (n_planes, rows, -(-cols // 8)), dtype=np.uint8),
                          axis=-1)[..., :cols].astype(bool)
    decay = 0.5 ** np.arange(n_planes, dtype=np.float32)
    scales = (STD * 0.8 * (0.75 + 0.5 * rng.random((rows, ng, 1, 1), dtype=np.float32)) * decay).astype(np.float32)
    return bbf.BinaryBasis(signs=signs, scales=scales, group=group)


def _dense_common(rng, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    embd = (rng.standard_normal((v, h), dtype=np.float32) * STD)
    head = (rng.standard_normal((v, h), dtype=np.float32) * STD)
    return embd, head


def write_bitbasis(path: Path, cfg: dict, tokenizer_dir: Path, n_planes: int, group: int = 128, seed: int = 0,
                   embed_type: str = "Q8_0", head_type: str | None = None, log=print) -> None:
    from bitbasis import format as bbf
    from bitbasis.gguf_io import ModelTensors, write_model
    rng = np.random.default_rng(seed)
    embd, head = _dense_common(rng, cfg)
    h = cfg["hidden_size"]
    dense = [("token_embd.weight", embd, embed_type)]
    packed = []
    for i in range(cfg["num_hidden_layers"]):
        dense += [(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32), "F32"),
                  (f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32), "F32")]
        for name, (rows, cols) in linear_shapes(cfg).items():
            packed.append((f"blk.{i}.{name}.weight", bbf.pack(random_basis(rng, rows, cols, n_planes, group))))
        log(f"  layer {i} packed")
    dense.append(("output_norm.weight", np.ones(h, np.float32), "F32"))
    if head_type == "BB4":          # the default recipe's head form: 4 binary bases, group 64 (random, no offset)
        packed.append(("output.weight", bbf.pack(random_basis(rng, head.shape[0], h, 4, 64))))
    else:
        dense.append(("output.weight", head, head_type or embed_type))
    settings = {"bases": n_planes, "group": group, "random": True, "seed": seed}
    write_model(path, ModelTensors(arch="llama", kv=_kv(cfg, tokenizer_dir, f"random-7b-bb{n_planes}"), dense=dense,
                                   packed=packed, method="residual", settings=settings))


def write_f16(path: Path, cfg: dict, tokenizer_dir: Path, seed: int = 0, log=print) -> None:
    """Plain F16 linears. One random layer is reused for every layer: write_model keeps every tensor
    in memory until it writes, and the values do not change the speed of any kernel."""
    from bitbasis.gguf_io import ModelTensors, write_model
    rng = np.random.default_rng(seed)
    embd, head = _dense_common(rng, cfg)
    h = cfg["hidden_size"]
    layer = {name: (rng.standard_normal(shape, dtype=np.float32) * STD).astype(np.float16)
             for name, shape in linear_shapes(cfg).items()}
    dense = [("token_embd.weight", embd, "F16")]
    for i in range(cfg["num_hidden_layers"]):
        dense += [(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32), "F32"),
                  (f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32), "F32")]
        dense += [(f"blk.{i}.{name}.weight", w, "F16") for name, w in layer.items()]
    dense += [("output_norm.weight", np.ones(h, np.float32), "F32"), ("output.weight", head, "F16")]
    write_model(path, ModelTensors(arch="llama", kv=_kv(cfg, tokenizer_dir, "random-7b-f16"), dense=dense, packed=[],
                                   method="f16"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out-dir", required=True)
    p.add_argument("--layers", type=int, default=32, help="blocks (default 32, Llama-2-7B's)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--bases", default="1,2", help="binary-basis files to write, comma-separated N (default 1,2; '' none)")
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--head-type", default="Q8_0", choices=("F32", "F16", "Q8_0", "BB4"),
                   help="storage of the output head in the binary-basis files (default Q8_0; BB4: 4 binary bases "
                        "of group 64, 5.0 bpw, the form the default recipe gives SmolLM2's head)")
    p.add_argument("--no-f16", action="store_true", help="skip the F16 file (and the llama.cpp quantizations)")
    p.add_argument("--quantize", default="Q4_0,Q2_K,TQ1_0", help="llama.cpp types made from the F16 file ('' none)")
    p.add_argument("--tokenizer-dir", default=None, help="HF dir with tokenizer.json (default: the SmolLM2 cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-t", "--threads", type=int, default=2, help="threads of llama.cpp's quantizer")
    p.add_argument("--force", action="store_true", help="rewrite files that exist")
    a = p.parse_args()

    from bitbasis import hf
    tok_dir = Path(a.tokenizer_dir) if a.tokenizer_dir else hf.resolve_model_dir("smollm2")
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(a.layers, a.hidden, a.ffn, a.heads, a.kv_heads, vocab=49152)
    stem = f"7b-L{a.layers}"

    def need(path: Path) -> bool:
        if path.exists() and not a.force:
            print(f"{path} exists (--force rewrites it)")
            return False
        return True

    for n in [int(v) for v in a.bases.split(",") if v]:
        path = out / (f"{stem}-bb{n}.gguf" if a.head_type == "Q8_0" else f"{stem}-bb{n}-head{a.head_type}.gguf")
        if need(path):
            t0 = time.time()
            write_bitbasis(path, cfg, tok_dir, n, a.group, a.seed, head_type=a.head_type, log=lambda *_: None)
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)", flush=True)
    if a.no_f16:
        return 0
    f16 = out / f"{stem}-f16.gguf"
    if need(f16):
        t0 = time.time()
        write_f16(f16, cfg, tok_dir, a.seed)
        print(f"wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)", flush=True)
    from llamacpp_ppl import llamacpp_quantize
    for q in [v for v in a.quantize.split(",") if v]:
        path = out / f"{stem}-{q}.gguf"
        if need(path):
            t0 = time.time()
            try:
                llamacpp_quantize(str(f16), str(path), q, threads=a.threads)
            except (RuntimeError, AttributeError) as e:
                print(f"{q}: {e}")
                continue
            print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB, {time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

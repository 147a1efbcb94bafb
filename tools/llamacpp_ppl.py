#!/usr/bin/env python3
"""llama.cpp through the PyPI `llama-cpp-python` build: perplexity, quantization with an importance
matrix, and the comparison table against bitbasis.

Perplexity follows `llama-perplexity` (tools/perplexity/perplexity.cpp): the text tokenized by llama.cpp
itself, non-overlapping windows of n_ctx tokens, the first token replaced by BOS when the vocab adds one,
only the second half of each window scored, ppl ± the standard error of the mean NLL. `--protocol papers`
scores every token of 2048-token windows instead, as python/bitbasis/perplexity.py defines it.

The importance matrix is what `llama-imatrix` (tools/imatrix/imatrix.cpp) computes, made here from the
float model with transformers: for every linear of every block, per input column, the sum of x² over
all calibration tokens and the token count; llama.cpp quantizes with their ratio, the mean of x²
(quantize.cpp load_imatrix). It is saved in llama-imatrix's GGUF format (`<tensor>.in_sum2`,
`<tensor>.counts`), so `llama-quantize --imatrix` reads it too, and handed to `llama_model_quantize` as
its null-terminated `llama_model_imatrix_data` array (src/llama-quant.cpp).

    python tools/llamacpp_ppl.py MODEL.gguf --windows 40 -t 2                 # llamacpp protocol
    python tools/llamacpp_ppl.py MODEL.gguf --protocol papers --windows 10    # ctx 2048, every token
    python tools/llamacpp_ppl.py --make-imatrix imatrix.gguf --chunks 128     # from the calibration plays
    python tools/llamacpp_ppl.py --quantize F32.gguf OUT.gguf IQ2_XXS --imatrix imatrix.gguf
    python tools/llamacpp_ppl.py --table docs/llamacpp_rows.json --src F32.gguf --imatrix imatrix.gguf
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "python"))

# llama.cpp ftypes whose default mixes hold tensor types that refuse to quantize without an importance
# matrix (src/llama-quant.cpp tensor_requires_imatrix: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS")
TABLE_TYPES = ("F32", "Q4_0", "Q2_K", "IQ2_XXS", "IQ2_XS", "IQ1_M", "IQ1_S")  # F32: the --src file itself


class LlamaCppError(ValueError):
    """Bad input for llama.cpp: a missing or mismatched importance matrix, a failed quantization."""


# --- perplexity -----------------------------------------------------------------------------------

def llamacpp_perplexity(model_path: str, text: str, ctx: int | None = None, windows: int | None = 40,
                        threads: int = 2, protocol: str = "llamacpp") -> dict:
    import llama_cpp
    from bitbasis.perplexity import PROTOCOLS, score_window, summarize_nll, windows as window_starts
    if protocol not in PROTOCOLS:
        raise LlamaCppError(f"protocol {protocol!r}: must be one of {', '.join(PROTOCOLS)}")
    if not Path(model_path).is_file():
        raise LlamaCppError(f"{model_path}: no such file")
    ctx = ctx or PROTOCOLS[protocol]
    first = ctx // 2 if protocol == "llamacpp" else 0
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=ctx, n_batch=ctx, n_ubatch=min(ctx, 512),
                          logits_all=True, n_threads=threads, n_threads_batch=threads, verbose=False)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    tokens = np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False), np.int64)
    starts = window_starts(len(tokens), ctx, windows)
    nlls = []
    t0 = time.time()
    for s in starts:
        w = tokens[s:s + ctx].copy()
        if add_bos and protocol == "llamacpp":
            w[0] = llm.token_bos()
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[:ctx], np.float32)
        nlls.append(score_window(logits, w, first))
    nll = np.concatenate(nlls)
    ppl, se = summarize_nll(nll)
    return {"ppl": ppl, "stderr": se, "protocol": protocol, "ctx": ctx, "windows": len(starts),
            "tokens": int(len(tokens)), "tokens_scored": int(len(nll)), "seconds": time.time() - t0,
            "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"}


# --- importance matrix ----------------------------------------------------------------------------

def compute_imatrix(model_dir, chunks: int = 128, chunk_size: int = 512, seed: int = 0, text: str | None = None,
                    threads: int = 2, progress: bool = True) -> dict:
    """Σx² per input column and the token count, for every linear of every block, keyed by llama.cpp
    tensor name, over `chunks` random windows of the calibration text (the project's calibration
    sampling). The output head is left out, as llama-imatrix does without --process-output; the q/k row
    permutation of the GGUF does not touch input columns, so no entry needs reordering."""
    import torch
    from tqdm import tqdm
    from bitbasis import arch as A, hf
    from bitbasis.calibrate import calibration_tokens, sample_windows
    model_dir = hf.resolve_model_dir(str(model_dir))
    model = hf.load_torch_model(model_dir)
    tok = hf.load_tokenizer(model_dir)
    ids = sample_windows(calibration_tokens(tok, text), chunks, chunk_size, seed)
    n_layers = model.config.num_hidden_layers
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.model.layers.named_modules(prefix="model.layers"):
        if not isinstance(mod, torch.nn.Linear):
            continue
        gname = hf.gguf_name(name + ".weight", n_layers, A.for_config(model.config.to_dict()))
        sums[gname] = torch.zeros(mod.in_features, dtype=torch.float64)
        counts[gname] = 0

        def hook(_mod, args, _out, gname=gname):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[gname] += x.square().sum(0)
            counts[gname] += x.shape[0]
        hooks.append(mod.register_forward_hook(hook))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for row in tqdm(ids, desc="imatrix", unit="chunk", disable=not progress):
                model.model(torch.as_tensor(row)[None])  # the base model: the head's logits are not needed
    finally:
        torch.set_num_threads(old_threads)
        for h in hooks:
            h.remove()
    return {"sums": {k: v.numpy() for k, v in sums.items()}, "counts": counts,
            "chunk_count": len(ids), "chunk_size": chunk_size,
            "dataset": text or f"bitbasis calib plays, {len(ids)} x {chunk_size} tokens, seed {seed}"}


def save_imatrix(path, im: dict) -> None:
    """llama-imatrix's GGUF layout (imatrix.cpp save_imatrix): general.type = imatrix, the datasets,
    chunk count and size; per tensor `<name>.in_sum2` [cols, 1] and `<name>.counts` [1, 1], F32."""
    import gguf
    from bitbasis.gguf_io import atomic_output
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, arch="imatrix")
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [im["dataset"]])
        w.add_uint32("imatrix.chunk_count", int(im["chunk_count"]))
        w.add_uint32("imatrix.chunk_size", int(im["chunk_size"]))
        for name in sorted(im["sums"]):
            w.add_tensor(f"{name}.in_sum2", np.asarray(im["sums"][name], np.float32)[None, :])
            w.add_tensor(f"{name}.counts", np.array([[im["counts"][name]]], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def load_imatrix(path) -> dict[str, np.ndarray]:
    """{tensor name: mean of x² per input column (per expert, concatenated)}, as quantize.cpp's
    load_imatrix gives llama_model_quantize: in_sum2 / counts, and 1 where an expert saw no token."""
    import gguf
    if not Path(path).is_file():
        raise LlamaCppError(f"imatrix {path}: no such file")
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LlamaCppError(f"imatrix {path}: not a GGUF file ({e})") from None
    f = r.fields.get("general.type")
    if f is None or f.contents() != "imatrix":
        raise LlamaCppError(f"imatrix {path}: general.type is not 'imatrix' (the legacy .dat format is not read)")
    tensors = {t.name: t for t in r.tensors}
    out = {}
    for tname, t in tensors.items():
        if not tname.endswith(".in_sum2"):
            continue
        name = tname[:-len(".in_sum2")]
        c = tensors.get(f"{name}.counts")
        if c is None:
            raise LlamaCppError(f"imatrix {path}: {name} has in_sum2 but no counts")
        sums = np.asarray(t.data, np.float32).reshape(-1)
        cnt = np.asarray(c.data, np.float32).reshape(-1)
        if len(cnt) == 0 or len(sums) % len(cnt):
            raise LlamaCppError(f"imatrix {path}: {name} has {len(sums)} sums for {len(cnt)} counts")
        per = sums.reshape(len(cnt), -1)
        mean = np.where(cnt[:, None] > 0, per / np.maximum(cnt[:, None], 1), 1.0).reshape(-1)
        if not np.isfinite(mean).all():
            raise LlamaCppError(f"imatrix {path}: {name} holds NaN or Inf values")
        out[name] = mean.astype(np.float32)
    if not out:
        raise LlamaCppError(f"imatrix {path}: no <tensor>.in_sum2 entries")
    return out


def quantizable_columns(model_path) -> dict[str, int]:
    """Input columns (ne[0]) × experts of every block weight llama.cpp quantizes and llama-imatrix
    covers: 2-D or 3-D `blk.*.weight` tensors other than norms (llama-quant.cpp
    tensor_allows_quantization; imatrix.cpp collects only `blk.` weights)."""
    import gguf
    r = gguf.GGUFReader(str(model_path))
    out = {}
    for t in r.tensors:
        dims = [int(x) for x in t.shape]  # ggml order: ne[0] = columns
        if (t.name.startswith("blk.") and t.name.endswith("weight") and "_norm" not in t.name
                and len(dims) >= 2 and "ffn_gate_inp" not in t.name):
            out[t.name] = dims[0] * (dims[2] if len(dims) > 2 else 1)
    return out


def check_imatrix(imatrix: dict[str, np.ndarray], columns: dict[str, int]) -> None:
    """Every block weight has an entry of exactly its column count: llama.cpp itself only logs a
    missing entry (and quantizes that tensor blind unless its type refuses), so check up front."""
    for name, cols in columns.items():
        v = imatrix.get(name)
        if v is None:
            raise LlamaCppError(f"imatrix has no entry for tensor {name}")
        if v.size != cols:
            raise LlamaCppError(f"imatrix entry {name} has {v.size} values, the tensor has {cols} columns")


def imatrix_array(imatrix: dict[str, np.ndarray]):
    """The null-terminated llama_model_imatrix_data array; returns (array, keep-alive list)."""
    import ctypes
    import llama_cpp
    n = len(imatrix)
    arr = (llama_cpp.llama_model_imatrix_data * (n + 1))()
    keep = []
    for i, (name, v) in enumerate(sorted(imatrix.items())):
        data = np.ascontiguousarray(v, np.float32)
        bname = name.encode()
        keep += [data, bname]
        arr[i].name = bname
        arr[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = data.size
    arr[n].name = None  # terminator: llama-quant.cpp reads until name == nullptr
    arr[n].data = None
    arr[n].size = 0
    return arr, keep


def llamacpp_quantize(src: str, dst: str, qtype: str, threads: int = 2,
                      imatrix: dict[str, np.ndarray] | str | None = None) -> None:
    import ctypes
    import llama_cpp
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise LlamaCppError(f"unknown llama.cpp type {qtype!r}")
    if not Path(src).is_file():
        raise LlamaCppError(f"{src}: no such file")
    if isinstance(imatrix, (str, os.PathLike)):
        imatrix = load_imatrix(imatrix)
    if imatrix is None and qtype in NEEDS_IMATRIX:
        raise LlamaCppError(f"{qtype} needs an importance matrix (--imatrix FILE; make one with --make-imatrix)")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    keep = None
    if imatrix is not None:
        check_imatrix(imatrix, quantizable_columns(src))
        arr, keep = imatrix_array(imatrix)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    del keep
    if rc != 0:
        raise LlamaCppError(f"llama_model_quantize {qtype} failed (rc {rc}; llama.cpp's log above says why)")


# --- sizes ----------------------------------------------------------------------------------------

def gguf_sizes(path, n_params: int | None = None) -> dict:
    """File bytes and bpw over all parameters; block bpw over the block linears (`blk.*` weights of 2+
    dims, as bitbasis's block_bpw); the tensor types of those linears."""
    import gguf
    r = gguf.GGUFReader(str(path))
    params = sum(int(t.n_elements) for t in r.tensors)
    n_params = n_params or params
    blk_bytes = blk_n = 0
    types: dict[str, int] = {}
    for t in r.tensors:
        if t.name.startswith("blk.") and len(t.shape) >= 2 and "_norm" not in t.name:
            blk_bytes += int(t.n_bytes)
            blk_n += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
    size = os.path.getsize(path)
    return {"bytes": size, "params": n_params, "bpw": 8.0 * size / n_params,
            "block_bpw": 8.0 * blk_bytes / blk_n if blk_n else None, "block_types": types,
            "token_embd_type": emb.tensor_type.name if emb is not None else None}


# --- the comparison table -------------------------------------------------------------------------

def make_table(out: str, src: str, imatrix_path: str, types, windows: int, papers_windows: int | None,
               threads: int, keep: str, protocols=("llamacpp", "papers")) -> list[dict]:
    """Quantize `src` to each type (the default llama-quantize mix; the imatrix for the types that need
    it and for "TYPE+imatrix"), measure size, bpw and perplexity, and rewrite `out` after every row."""
    from bitbasis import data
    text = data.read_text("eval")
    im = None
    base = gguf_sizes(src)
    rows = json.loads(Path(out).read_text()) if Path(out).exists() else []
    done = {(r["type"], r.get("imatrix") is not None) for r in rows}
    me = os.path.relpath(__file__)
    for spec in types:
        qtype = spec.removesuffix("+imatrix")  # "Q4_0+imatrix": a type that takes an optional imatrix
        use_im = qtype in NEEDS_IMATRIX or spec.endswith("+imatrix")
        if (qtype, use_im) in done:
            continue
        if qtype == "F32":
            path, cmd, qsec = src, f"bitbasis convert smollm2 -o {src} --method f32", None
        else:
            path = str(Path(keep) / f"smol-{qtype}{'-imat' if use_im else ''}.gguf")
            cmd = f"python {me} --quantize {src} {path} {qtype}" + (f" --imatrix {imatrix_path}" if use_im else "")
            qsec = None  # a file made earlier is reused, its time unknown
            if not Path(path).exists():
                if use_im and im is None:
                    if not imatrix_path:
                        raise LlamaCppError(f"{qtype} needs an importance matrix: --table ... --imatrix FILE")
                    im = load_imatrix(imatrix_path)
                t0 = time.time()
                llamacpp_quantize(src, path, qtype, threads, im if use_im else None)
                qsec = time.time() - t0
        row = {"method": f"llama.cpp {qtype}" + (" imatrix" if use_im else ""), "type": qtype,
               "mix": "llama-quantize default",
               "imatrix": imatrix_path if use_im else None, "file": path, "quant_seconds": qsec,
               "command": cmd, **gguf_sizes(path, base["params"])}
        for proto in protocols:
            w = windows if proto == "llamacpp" else papers_windows
            res = llamacpp_perplexity(path, text, None, w, threads, proto)
            row[f"ppl_{proto}"] = res["ppl"]
            row[f"se_{proto}"] = res["stderr"]
            row[f"windows_{proto}"] = res["windows"]
            row[f"seconds_{proto}"] = res["seconds"]
            row[f"command_{proto}"] = (f"python {me} {path} --protocol {proto} --windows {w if w else 0} "
                                       f"-t {threads}")
            row["engine"] = res["engine"]
        rows.append(row)
        with open(out + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(out + ".tmp", out)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    from bitbasis import data
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--text", default="eval")
    p.add_argument("--protocol", default="llamacpp", choices=["llamacpp", "papers"])
    p.add_argument("--ctx", type=int, default=None, help="default: 512 (llamacpp), 2048 (papers)")
    p.add_argument("--windows", type=int, default=40, help="0 = all windows")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    p.add_argument("--imatrix", help="importance matrix GGUF (llama-imatrix's format)")
    p.add_argument("--make-imatrix", metavar="OUT", help="compute the importance matrix from the calibration plays")
    p.add_argument("--model-dir", default="smollm2", help="HF directory of the float model (--make-imatrix)")
    p.add_argument("--chunks", type=int, default=128, help="calibration chunks for --make-imatrix")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-text", default=None, help="calibration text file (default: the calibration plays)")
    p.add_argument("--table", metavar="OUT.json", help="quantize --src to every type and measure (needs --imatrix)")
    p.add_argument("--src", help="f32 GGUF for --table")
    p.add_argument("--types", nargs="*", default=list(TABLE_TYPES), help="F32 = the --src file itself")
    p.add_argument("--papers-windows", type=int, default=0, help="papers-protocol windows for --table, 0 = all")
    p.add_argument("--protocols", nargs="+", default=["llamacpp", "papers"], choices=["llamacpp", "papers"],
                   help="the protocols --table measures")
    p.add_argument("--keep", default=".", help="where --table writes the quantized files")
    a = p.parse_args()
    try:
        if a.make_imatrix:
            t0 = time.time()
            im = compute_imatrix(a.model_dir, a.chunks, a.chunk_size, a.seed, a.calib_text, a.threads)
            save_imatrix(a.make_imatrix, im)
            print(f"wrote {a.make_imatrix}: {len(im['sums'])} tensors, {im['chunk_count']} x {im['chunk_size']} "
                  f"tokens, {time.time() - t0:.0f} s")
            return 0
        if a.quantize:
            llamacpp_quantize(*a.quantize, threads=a.threads, imatrix=a.imatrix)
            src_params = gguf_sizes(a.quantize[0])["params"]
            print(json.dumps({"wrote": a.quantize[1], **gguf_sizes(a.quantize[1], src_params)}))
            return 0
        if a.table:
            if not a.src:
                p.error("--table needs --src (the f32 GGUF)")
            make_table(a.table, a.src, a.imatrix, a.types, a.windows or None, a.papers_windows or None,
                       a.threads, a.keep, tuple(a.protocols))
            return 0
        if not a.model:
            p.error("give a MODEL.gguf, --quantize, --make-imatrix or --table")
        res = llamacpp_perplexity(a.model, data.read_text(a.text), a.ctx, a.windows or None, a.threads, a.protocol)
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""llama.cpp's perplexity, through the PyPI `llama-cpp-python` build of llama.cpp, with the logic of
`llama-perplexity` (tools/perplexity/perplexity.cpp): the text tokenized by llama.cpp itself, windows of
n_ctx tokens, the first token replaced by BOS when the vocab adds one, only the second half of each
window scored, ppl ± the standard error of the mean NLL. Also quantizes a GGUF to llama.cpp's types.

    python tools/llamacpp_ppl.py MODEL.gguf --text eval --ctx 512 --windows 40 -t 2
    python tools/llamacpp_ppl.py --quantize F32.gguf OUT.gguf Q4_0
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "python"))


def llamacpp_perplexity(model_path: str, text: str, ctx: int = 512, windows: int | None = 40,
                        threads: int = 2) -> dict:
    import llama_cpp
    from bitbasis.perplexity import score_window, summarize_nll, windows as window_starts
    llm = llama_cpp.Llama(model_path=model_path, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)) \
        if hasattr(llama_cpp, "llama_vocab_get_add_bos") else False
    tokens = np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=bool(add_bos), special=False), np.int64)
    starts = window_starts(len(tokens), ctx, windows)
    nlls = []
    t0 = time.time()
    for s in starts:
        w = tokens[s:s + ctx].copy()
        if add_bos:
            w[0] = llm.token_bos()
        llm.reset()
        llm.eval(w.tolist())
        logits = np.asarray(llm.scores[:ctx], np.float32)
        nlls.append(score_window(logits, w, ctx // 2))
    ppl, se = summarize_nll(np.concatenate(nlls))
    return {"ppl": ppl, "stderr": se, "ctx": ctx, "windows": len(starts), "tokens": int(len(tokens)),
            "seconds": time.time() - t0, "engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"}


def llamacpp_quantize(src: str, dst: str, qtype: str, threads: int = 2) -> None:
    import ctypes
    import llama_cpp
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize {qtype} failed ({rc})")


def main() -> int:
    from bitbasis import data
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?")
    p.add_argument("--text", default="eval")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    a = p.parse_args()
    if a.quantize:
        llamacpp_quantize(*a.quantize, threads=a.threads)
        print(f"wrote {a.quantize[1]}")
        return 0
    res = llamacpp_perplexity(a.model, data.read_text(a.text), a.ctx, a.windows, a.threads)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

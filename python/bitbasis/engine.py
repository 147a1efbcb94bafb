"""The C++ engine from Python: `Model(path, threads)` loads a bitbasis (or plain F32/F16/Q8_0)
llama GGUF and gives logits, streamed generation, perplexity and chat. The tokenizer is rebuilt
from the GGUF metadata by transformers (bitbasis.reference.tokenizer_from_gguf)."""
from __future__ import annotations

import os
import time
from typing import Iterator, Sequence

import numpy as np

from ._native import lib


class EngineError(ValueError):
    """The engine refused a file or a call; the message is the engine's reason."""


def _err(ffi, L) -> str:
    return ffi.string(L.bb_last_error()).decode("utf-8", "replace") or "unknown error"


class Model:
    def __init__(self, path: str | os.PathLike, threads: int = 2, n_ctx: int = 0):
        self.path = str(path)
        self._ffi, self._lib = lib()
        self._m = None
        if not os.path.isfile(self.path):
            raise EngineError(f"{self.path}: no such file")
        m = self._lib.bb_model_open(self.path.encode(), int(threads), int(n_ctx))
        if m == self._ffi.NULL:
            raise EngineError(_err(self._ffi, self._lib))
        self._m = m
        self.n_vocab = int(self._lib.bb_n_vocab(m))
        self.n_ctx = int(self._lib.bb_n_ctx(m))
        self.threads = int(self._lib.bb_n_threads(m))
        self.kernel = self._ffi.string(self._lib.bb_kernel_name(m)).decode()
        self.precise_acts = bool(self._lib.bb_precise_acts(m))   # BITBASIS_PRECISE_ACTS=1 at open
        self._tok = None
        self.tokens: list[int] = []   # what the KV cache holds, in order
        self.last_stats: dict = {}

    def close(self) -> None:
        if self._m is not None:
            self._lib.bb_model_close(self._m)
            self._m = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- metadata and tokenizer -----------------------------------------------------------------

    def meta_string(self, key: str) -> str | None:
        p = self._lib.bb_meta_string(self._m, key.encode())
        return None if p == self._ffi.NULL else self._ffi.string(p).decode("utf-8", "replace")

    def meta_int(self, key: str) -> int | None:
        out = self._ffi.new("long long *")
        return int(out[0]) if self._lib.bb_meta_int(self._m, key.encode(), out) == 0 else None

    @property
    def tokenizer(self):
        if self._tok is None:
            from .reference import tokenizer_from_gguf
            self._tok = tokenizer_from_gguf(self.path)
        return self._tok

    @property
    def chat_template(self) -> str | None:
        return self.meta_string("tokenizer.chat_template")

    @property
    def eos_ids(self) -> set[int]:
        ids = set()
        e = self.meta_int("tokenizer.ggml.eos_token_id")
        if e is not None:
            ids.add(e)
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    # --- evaluation -----------------------------------------------------------------------------

    def reset(self) -> None:
        self._lib.bb_reset(self._m)
        self.tokens = []

    def rewind(self, n: int) -> None:
        """Keep the first n tokens of the KV cache."""
        if self._lib.bb_set_n_past(self._m, int(n)) != 0:
            raise EngineError(_err(self._ffi, self._lib))
        del self.tokens[n:]

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context; logits [n, vocab] (all_logits) or [vocab] of the last."""
        toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
        if toks.ndim != 1 or toks.size == 0:
            raise EngineError("eval needs a non-empty 1-D token sequence")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            bad = int(toks[(toks < 0) | (toks >= self.n_vocab)][0])
            raise EngineError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        t32 = toks.astype(np.int32)
        n = int(t32.size)
        out = np.empty((n, self.n_vocab) if all_logits else (self.n_vocab,), np.float32)
        rc = self._lib.bb_eval(self._m, self._ffi.cast("int *", t32.ctypes.data), n,
                               self._ffi.cast("float *", out.ctypes.data), int(all_logits))
        if rc != 0:
            raise EngineError(_err(self._ffi, self._lib))
        self.tokens.extend(int(t) for t in toks)
        return out

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [n, vocab] of every position, in a fresh context."""
        self.reset()
        return self.eval(tokens, all_logits=True)

    def perplexity(self, text: str, protocol: str = "llamacpp", ctx: int | None = None,
                   max_windows: int | None = None, progress: bool = False) -> dict:
        from .perplexity import perplexity
        tokens = np.asarray(self.tokenize(text), np.int64)
        return perplexity(self.logits, tokens, protocol, ctx, max_windows, progress)

    # --- generation -----------------------------------------------------------------------------

    @staticmethod
    def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        lg = logits.astype(np.float64) / temperature
        if 0 < top_k < lg.size:
            kth = np.partition(lg, -top_k)[-top_k]
            lg = np.where(lg < kth, -np.inf, lg)
        p = np.exp(lg - lg.max())
        p /= p.sum()
        if 0 < top_p < 1:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(rng.choice(p.size, p=p))

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the KV cache hold exactly `tokens`, reusing its longest common prefix; returns the
        logits of the last token."""
        tokens = list(tokens)
        if not tokens:
            raise EngineError("empty prompt")
        keep = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)   # re-run at least one token to get its logits
        self.rewind(keep)
        self.prefilled = len(tokens) - keep
        return self.eval(tokens[keep:])

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, seed: int | None = None, stop_at_eos: bool = True,
                 reuse_cache: bool = False) -> Iterator[str]:
        """Yield the text of the continuation piece by piece. Text is decoded from all the tokens
        generated so far, so a multi-byte character split across tokens comes out whole.
        `self.last_stats` holds token counts and timings; `self.last_tokens` the generated ids."""
        toks = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not toks:
            bos = self.meta_int("tokenizer.ggml.bos_token_id")
            toks = [bos if bos is not None else 0]
        if len(toks) >= self.n_ctx:
            raise EngineError(f"prompt of {len(toks)} tokens does not fit the context of {self.n_ctx}")
        rng = np.random.default_rng(seed)
        self.tokenizer  # loaded before any timing starts
        eos = self.eos_ids if stop_at_eos else set()
        if not reuse_cache:
            self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(toks)
        t_prompt = time.perf_counter() - t0
        n_prompt = self.prefilled
        out: list[int] = []
        self.last_tokens = out
        printed = ""
        t1 = time.perf_counter()
        self.last_stats = {"prompt_tokens": n_prompt, "prompt_s": t_prompt, "gen_tokens": 0, "gen_s": 0.0,
                           "gen_evals": 0, "gen_eval_s": 0.0}
        stats = self.last_stats
        try:
            for _ in range(max_tokens):
                tok = self.sample(logits, temperature, top_k, top_p, rng)
                if tok in eos:
                    break
                out.append(tok)
                text = self.detokenize(out)
                if not text.endswith("\ufffd") and len(text) > len(printed):
                    piece, printed = text[len(printed):], text
                    yield piece
                if len(out) >= max_tokens or len(self.tokens) >= self.n_ctx:
                    break
                te = time.perf_counter()
                logits = self.eval([tok])
                stats["gen_eval_s"] += time.perf_counter() - te
                stats["gen_evals"] += 1
        finally:
            self.last_stats.update(gen_tokens=len(out), gen_s=time.perf_counter() - t1)
        text = self.detokenize(out)
        if len(text) > len(printed):
            yield text[len(printed):]


def engine_available() -> bool:
    try:
        lib()
        return True
    except (ImportError, OSError):
        return False


__all__ = ["EngineError", "Model", "engine_available"]

"""The C++ engine from Python: `Model(path, threads)` loads a bitbasis (or plain F32/F16/Q8_0)
llama GGUF and gives logits, streamed generation, perplexity and chat. The tokenizer is rebuilt
from the GGUF metadata by transformers (bitbasis.reference.tokenizer_from_gguf)."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ._native import lib


class EngineError(ValueError):
    """The engine refused a file or a call; the message is the engine's reason."""


def _err(ffi, L) -> str:
    return ffi.string(L.bb_last_error()).decode("utf-8", "replace") or "unknown error"


class ContextFull(EngineError):
    """The tokens do not fit what is left of the context (the engine's -2)."""


def _check(ffi, L, rc: int) -> None:
    if rc == -2:
        raise ContextFull(_err(ffi, L))
    if rc != 0:
        raise EngineError(_err(ffi, L))


def _tokens32(tokens, n_vocab: int) -> np.ndarray:
    toks = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    if toks.ndim != 1 or toks.size == 0:
        raise EngineError("eval needs a non-empty 1-D token sequence")
    if toks.min() < 0 or toks.max() >= n_vocab:
        bad = int(toks[(toks < 0) | (toks >= n_vocab)][0])
        raise EngineError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")
    return toks.astype(np.int32)


@dataclass
class Sampling:
    """How the next token is picked. temperature 0 = greedy. repeat_penalty (llama.cpp's: logits of
    the last repeat_last_n tokens divided by it when positive, multiplied when negative),
    frequency/presence penalties (OpenAI's: minus f * count, minus p if present), then top-k,
    then top-p."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        if self.repeat_penalty == 1.0 and not self.frequency_penalty and not self.presence_penalty:
            return logits
        lg = logits.astype(np.float32, copy=True)
        if self.repeat_penalty != 1.0 and self.repeat_last_n != 0 and len(history):
            last = history[-self.repeat_last_n:] if self.repeat_last_n > 0 else history
            ids = np.unique(np.asarray(last, np.int64))
            v = lg[ids]
            lg[ids] = np.where(v > 0, v / self.repeat_penalty, v * self.repeat_penalty)
        if (self.frequency_penalty or self.presence_penalty) and len(history):
            ids, counts = np.unique(np.asarray(history, np.int64), return_counts=True)
            lg[ids] -= self.frequency_penalty * counts + self.presence_penalty
        return lg


class Generation:
    """One reply, a step at a time: `step(logits)` samples the next token and returns the text it
    adds (possibly ""); `done` / `finish_reason` ("stop": end of text or a stop string, "length":
    max_tokens or the context) say when it ended; `next_token` is what to evaluate next otherwise.
    Text is decoded over a window of the tokens (as vLLM does), so a multi-byte character split
    across tokens comes out whole, and a piece that could begin a stop string is held back until
    it cannot. Context.generate and the server's batched scheduler both drive this, so a reply is
    the same token for token whichever ran it."""

    def __init__(self, model: "Model", prompt: Sequence[int], n_ctx: int, max_tokens: int | None = 128,
                 sampling: Sampling | None = None, stop: Sequence[str] = (), stop_at_eos: bool = True,
                 sample_fn=None):
        self.model, self.prompt, self.n_ctx = model, list(prompt), n_ctx
        self.max_tokens = None if max_tokens is None or max_tokens < 0 else int(max_tokens)
        self.sampling = sampling or Sampling()
        self.stop = [s for s in stop if s]
        self.eos = model.eos_ids if stop_at_eos else set()
        self.sample_fn = sample_fn or model.sample
        self.rng = np.random.default_rng(self.sampling.seed)
        self.tokens: list[int] = []
        self.text = ""          # decoded so far (may run ahead of what was emitted)
        self.emitted = 0        # characters of text handed out
        self.done = self.max_tokens == 0
        self.finish_reason: str | None = "length" if self.done else None
        self.next_token: int | None = None
        self._pre = self._read = 0

    def _decode_more(self) -> None:
        d = self.model.detokenize
        prefix = d(self.tokens[self._pre:self._read])
        new = d(self.tokens[self._pre:])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self.text += new[len(prefix):]
            self._pre, self._read = self._read, len(self.tokens)

    def _finish(self, reason: str) -> None:
        self.done, self.finish_reason, self.next_token = True, reason, None

    def step(self, logits: np.ndarray) -> str:
        if self.done:
            return ""
        s = self.sampling
        lg = s.penalize(logits, self.prompt + self.tokens)
        tok = int(self.sample_fn(lg, s.temperature, s.top_k, s.top_p, self.rng))
        if tok in self.eos:
            self._finish("stop")
            return self._flush()
        self.tokens.append(tok)
        self._decode_more()
        for st in self.stop:
            i = self.text.find(st, max(0, self.emitted - len(st)))
            if i >= 0:
                self.text = self.text[:i]
                self._finish("stop")
                return self._emit(len(self.text))
        if self.max_tokens is not None and len(self.tokens) >= self.max_tokens:
            self._finish("length")
            return self._flush()
        if len(self.prompt) + len(self.tokens) > self.n_ctx:   # no room to evaluate it
            self._finish("length")
            return self._flush()
        self.next_token = tok
        hold = 0   # a tail that may be the start of a stop string waits
        for st in self.stop:
            for k in range(min(len(st) - 1, len(self.text)), 0, -1):
                if self.text.endswith(st[:k]):
                    hold = max(hold, k)
                    break
        return self._emit(len(self.text) - hold)

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece

    def _flush(self) -> str:
        """At the end: whatever the tokens decode to, a last partial character included."""
        if len(self.tokens) > self._read:
            d = self.model.detokenize
            self.text += d(self.tokens[self._pre:])[len(d(self.tokens[self._pre:self._read])):]
            self._read = len(self.tokens)
        return self._emit(len(self.text))


class Context:
    """One sequence over a Model's weights: its own KV cache and position (as llama.cpp's
    llama_context). Made by `Model.context(n_ctx)`; `tokens` is what its cache holds, in order."""

    def __init__(self, model: "Model", n_ctx: int = 0, _default: bool = False):
        self.model = model
        self._ffi, self._lib = model._ffi, model._lib
        self._c = None
        if _default:            # the model's own context: the single-sequence C calls
            self.n_ctx = int(self._lib.bb_n_ctx(model._m))
        else:
            c = self._lib.bb_context_new(model._m, int(n_ctx))
            if c == self._ffi.NULL:
                raise EngineError(_err(self._ffi, self._lib))
            self._c = c
            self.n_ctx = int(self._lib.bb_context_n_ctx(c))
        self.tokens: list[int] = []
        self.last_stats: dict = {}
        self.last_tokens: list[int] = []
        self.prefilled = 0

    def close(self) -> None:
        if self._c is not None and self.model._m is not None:
            self._lib.bb_context_free(self._c)
        self._c = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"<bitbasis.Context {len(self.tokens)}/{self.n_ctx} tokens of {os.path.basename(self.model.path)}>"

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.rewind(0)

    def rewind(self, n: int) -> None:
        """Keep the first n tokens of the KV cache."""
        if self._c is None:
            rc = self._lib.bb_set_n_past(self.model._m, int(n))
        else:
            rc = self._lib.bb_context_set_n_past(self._c, int(n))
        _check(self._ffi, self._lib, rc)
        del self.tokens[n:]

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context; logits [n, vocab] (all_logits) or [vocab] of the last."""
        m = self.model
        t32 = _tokens32(tokens, m.n_vocab)
        n = int(t32.size)
        out = np.empty((n, m.n_vocab) if all_logits else (m.n_vocab,), np.float32)
        tp = self._ffi.cast("int *", t32.ctypes.data)
        lp = self._ffi.cast("float *", out.ctypes.data)
        if self._c is None:
            rc = self._lib.bb_eval(m._m, tp, n, lp, int(all_logits))
        else:
            rc = self._lib.bb_context_eval(m._m, self._c, tp, n, lp, int(all_logits))
        _check(self._ffi, self._lib, rc)
        self.tokens.extend(int(t) for t in t32)
        return out

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [n, vocab] of every position, in a fresh context."""
        self.reset()
        return self.eval(tokens, all_logits=True)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Make the KV cache hold exactly `tokens`, reusing its longest common prefix; returns the
        logits of the last token."""
        tokens = list(tokens)
        if not tokens:
            raise EngineError("empty prompt")
        keep = common_prefix(self.tokens, tokens)
        keep = min(keep, len(tokens) - 1)   # re-run at least one token to get its logits
        self.rewind(keep)
        self.prefilled = len(tokens) - keep
        return self.eval(tokens[keep:])

    def prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        m = self.model
        toks = m.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        bos = m.bos_first
        if isinstance(prompt, str) and bos is not None and toks[:1] != [bos]:
            toks = [bos] + toks      # as llama.cpp tokenizes with add_bos (a chat template may write it)
        if not toks:
            bos = m.meta_int("tokenizer.ggml.bos_token_id")
            toks = [bos if bos is not None else 0]
        if len(toks) >= self.n_ctx:
            raise EngineError(f"prompt of {len(toks)} tokens does not fit the context of {self.n_ctx}")
        return toks

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 128, temperature: float = 0.8,
                 top_k: int = 40, top_p: float = 0.95, seed: int | None = None, stop_at_eos: bool = True,
                 reuse_cache: bool = False, stop: Sequence[str] = (), repeat_penalty: float = 1.0,
                 sampling: Sampling | None = None) -> Iterator[str]:
        """Yield the text of the continuation piece by piece (max_tokens None or -1: until the end
        of text or of the context). `last_stats` holds token counts and timings, `last_tokens` the
        generated ids, `last_finish` "stop" or "length"."""
        m = self.model
        toks = self.prompt_tokens(prompt)
        sampling = sampling or Sampling(temperature, top_k, top_p, seed, repeat_penalty)
        m.tokenizer  # loaded before any timing starts
        g = Generation(m, toks, self.n_ctx, max_tokens, sampling, stop, stop_at_eos, sample_fn=m.sample)
        self.last_tokens = g.tokens
        self.last_finish = None
        if not reuse_cache:
            self.reset()
        t0 = time.perf_counter()
        logits = self.prefill(toks)
        t_prompt = time.perf_counter() - t0
        stats = self.last_stats = {"prompt_tokens": self.prefilled, "prompt_s": t_prompt, "gen_tokens": 0,
                                   "gen_s": 0.0, "gen_evals": 0, "gen_eval_s": 0.0}
        t1 = time.perf_counter()
        try:
            while not g.done:
                piece = g.step(logits)
                if piece:
                    yield piece
                if g.done:
                    break
                te = time.perf_counter()
                logits = self.eval([g.next_token])
                stats["gen_eval_s"] += time.perf_counter() - te
                stats["gen_evals"] += 1
        finally:
            stats.update(gen_tokens=len(g.tokens), gen_s=time.perf_counter() - t1)
            self.last_finish = g.finish_reason


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def default_threads() -> int:
    """The engine's default thread count: the physical cores this process may run on (its CPU affinity:
    taskset, a container's cpuset), SMT siblings counted once as llama.cpp counts them — two threads on one
    core share its vector units, so the second only adds hand-offs. The thread pool gives a piece of work
    to whichever thread is free (cpp/src/threadpool.h), so all the cores are the right default even on a
    machine shared with other processes: a descheduled thread's share is taken by the others."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):   # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(c))
    return max(1, len(cores))


class Model:
    """The weights of a GGUF file, loaded (mmap'd) once, and a default context for the
    single-sequence calls (eval, generate, chat, ...); `context()` makes more sequences over the
    same weights and `decode()` runs a step of several of them as one batch."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, n_ctx: int = 0):
        self.path = str(path)
        threads = default_threads() if threads is None else threads
        self._ffi, self._lib = lib()
        self._m = None
        if not os.path.isfile(self.path):
            raise EngineError(f"{self.path}: no such file")
        m = self._lib.bb_model_open(self.path.encode(), int(threads), int(n_ctx))
        if m == self._ffi.NULL:
            raise EngineError(_err(self._ffi, self._lib))
        self._m = m
        self.n_vocab = int(self._lib.bb_n_vocab(m))
        self.n_ctx_train = int(self._lib.bb_n_ctx_train(m))
        self.threads = int(self._lib.bb_n_threads(m))
        self.kernel = self._ffi.string(self._lib.bb_kernel_name(m)).decode()
        self.precise_acts = bool(self._lib.bb_precise_acts(m))   # BITBASIS_PRECISE_ACTS=1 at open
        self._tok = None
        self._tok_lock = threading.RLock()   # one tokenizer call at a time (the server uses several threads)
        self._ctx = Context(self, _default=True)
        self.n_ctx = self._ctx.n_ctx

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

    def __repr__(self) -> str:
        name = self.meta_string("general.name") if self._m is not None else None
        state = "closed" if self._m is None else f"kernel {self.kernel}, {self.threads} threads"
        return (f"<bitbasis.Model {os.path.basename(self.path)!r}{f' ({name})' if name else ''}: vocab {self.n_vocab}, "
                f"context {self.n_ctx}/{self.n_ctx_train}, {state}>")

    # --- metadata and tokenizer -----------------------------------------------------------------

    def meta_string(self, key: str) -> str | None:
        p = self._lib.bb_meta_string(self._m, key.encode())
        return None if p == self._ffi.NULL else self._ffi.string(p).decode("utf-8", "replace")

    def meta_int(self, key: str) -> int | None:
        out = self._ffi.new("long long *")
        return int(out[0]) if self._lib.bb_meta_int(self._m, key.encode(), out) == 0 else None

    @property
    def bos_first(self) -> int | None:
        """The BOS id when the file's tokenizer puts BOS first (tokenizer.ggml.add_bos_token; Gemma)."""
        bos = self.meta_int("tokenizer.ggml.bos_token_id")
        return bos if self.meta_int("tokenizer.ggml.add_bos_token") and bos is not None else None

    @property
    def tokenizer(self):
        if self._tok is None:
            with self._tok_lock:
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
        # the architecture's end-of-turn token ends a reply as EOS does (as llama.cpp's end-of-generation
        # set): a chat model closes its turn with it and only then, if ever, writes EOS
        from .arch import ARCHS
        a = ARCHS.get(self.meta_string("general.architecture") or "")
        eot = a.end_of_turn if a else None
        if eot is not None and (i := self.tokenizer.backend_tokenizer.token_to_id(eot)) is not None:
            ids.add(int(i))
        return ids

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        tok = self.tokenizer
        with self._tok_lock:
            return list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        tok = self.tokenizer
        with self._tok_lock:
            return tok.decode(list(tokens), skip_special_tokens=True)

    # --- contexts -------------------------------------------------------------------------------

    def context(self, n_ctx: int = 0) -> Context:
        """A new sequence over these weights with its own KV cache (n_ctx 0: the file's length)."""
        return Context(self, n_ctx)

    def decode(self, batch: Sequence[tuple[Context, Sequence[int]]]) -> np.ndarray:
        """One forward pass over several contexts at once: each (context, tokens) appends its tokens;
        returns the logits [n_seq, vocab] of each sequence's last token. ContextFull (nothing ran)
        when a sequence does not fit."""
        if not batch:
            raise EngineError("decode: empty batch")
        ctxs, counts, toks = [], [], []
        for c, t in batch:
            if c.model is not self or c._c is None:
                raise EngineError("decode: contexts must come from this model's context()")
            t32 = _tokens32(t, self.n_vocab)
            ctxs.append(c._c)
            counts.append(t32.size)
            toks.append(t32)
        flat = np.ascontiguousarray(np.concatenate(toks))
        out = np.empty((len(batch), self.n_vocab), np.float32)
        rc = self._lib.bb_decode(self._m, len(batch), self._ffi.new("bb_context *[]", ctxs),
                                 self._ffi.new("int[]", counts), self._ffi.cast("int *", flat.ctypes.data),
                                 self._ffi.cast("float *", out.ctypes.data))
        _check(self._ffi, self._lib, rc)
        for (c, _), t in zip(batch, toks):
            c.tokens.extend(int(x) for x in t)
        return out

    # --- the default context --------------------------------------------------------------------

    tokens = property(lambda self: self._ctx.tokens)
    last_stats = property(lambda self: self._ctx.last_stats)
    last_tokens = property(lambda self: self._ctx.last_tokens)
    prefilled = property(lambda self: self._ctx.prefilled)

    def reset(self) -> None:
        self._ctx.reset()

    def rewind(self, n: int) -> None:
        """Keep the first n tokens of the KV cache."""
        self._ctx.rewind(n)

    def eval(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append tokens to the context; logits [n, vocab] (all_logits) or [vocab] of the last."""
        return self._ctx.eval(tokens, all_logits)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits [n, vocab] of every position, in a fresh context."""
        return self._ctx.logits(tokens)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        return self._ctx.prefill(tokens)

    def perplexity(self, text: str, protocol: str = "llamacpp", ctx: int | None = None,
                   max_windows: int | None = None, progress: bool = False) -> dict:
        from .perplexity import perplexity
        tokens = np.asarray(self.tokenize(text), np.int64)
        return perplexity(self.logits, tokens, protocol, ctx, max_windows, progress, self.bos_first)

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

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = 128, **kw) -> Iterator[str]:
        """Context.generate on the default context: a stream of text pieces."""
        return self._ctx.generate(prompt, max_tokens, **kw)

    def chat_prompt(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the file's chat template, else its architecture's turn format
        (sandboxed, with limits on size and time: bitbasis.chat_template)."""
        from .chat_template import render_chat, template_for
        return render_chat(self, messages, add_generation_prompt=add_generation_prompt, template=template_for(self)[0])

    def chat(self, messages: Sequence[dict], max_tokens: int | None = 512, **kw) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}, ...])."""
        return self.generate(self.tokenize(self.chat_prompt(messages)), max_tokens, **kw)


def engine_available() -> bool:
    try:
        lib()
        return True
    except (ImportError, OSError):
        return False


__all__ = ["Context", "ContextFull", "EngineError", "Generation", "Model", "Sampling", "engine_available"]

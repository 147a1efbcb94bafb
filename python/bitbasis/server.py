"""`bitbasis serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one set of weights.

Requests become jobs for one scheduler thread that owns the engine: up to `parallel` jobs hold a
slot (an engine Context, its own KV cache) and every step runs one batched forward pass over all of
them (Model.decode: prompt chunks of the new ones and the next token of the others, continuous
batching). Jobs beyond the slots wait in a bounded queue; past it a request gets 503. Sampling and
detokenization are engine.Generation's, as in `bitbasis generate`, so a reply is the same for the
same seed. Every error is OpenAI's JSON error object with its HTTP status.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .chat_template import ChatTemplateError, check_messages, render_chat, template_for
from .engine import EngineError, Generation, Model, Sampling, common_prefix

PAGE = Path(__file__).with_name("server_page.html")
MAX_BODY = 2 << 20   # bytes of a request body: ~500k tokens of text, more than any context here


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --- the scheduler --------------------------------------------------------------------------------

@dataclass
class Job:
    prompt: list[int]
    max_tokens: int | None
    sampling: Sampling
    stop: list[str]
    stop_at_eos: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False
    gen: Generation | None = None
    todo: list[int] = field(default_factory=list)   # prompt tokens not yet in the cache
    t_submit: float = field(default_factory=time.monotonic)
    t_first: float | None = None
    cached: int = 0                                  # prompt tokens reused from the slot's cache

    def emit(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:   # the event loop has closed (shutdown): nobody is listening
            pass


class QueueFull(Exception):
    pass


class Scheduler:
    """Owns the Model and its slots; `submit` from any thread, the work happens in `run`."""

    def __init__(self, model: Model, parallel: int, n_ctx: int, queue_size: int, chunk: int = 256):
        self.model, self.queue_size, self.chunk = model, queue_size, chunk
        self.slots = [model.context(n_ctx) for _ in range(parallel)]
        self.jobs: list[Job | None] = [None] * parallel
        self.pending: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.stats = collections.Counter()
        self.recent: collections.deque[tuple[float, int]] = collections.deque()   # (time, tokens) of the last 10 s
        self.thread = threading.Thread(target=self.run, name="bitbasis-scheduler", daemon=True)

    @property
    def n_ctx(self) -> int:
        return self.slots[0].n_ctx

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self.cv:
            busy = sum(j is not None for j in self.jobs)
            if busy + len(self.pending) >= len(self.slots) + self.queue_size:
                raise QueueFull
            self.pending.append(job)
            self.cv.notify_all()

    def queue_depth(self) -> int:
        with self.cv:
            return len(self.pending)

    def busy(self) -> int:
        with self.cv:
            return sum(j is not None for j in self.jobs)

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self.cv:
            while self.recent and now - self.recent[0][0] > 10:
                self.recent.popleft()
            if not self.recent:
                return 0.0
            return sum(n for _, n in self.recent) / max(1e-3, min(10.0, now - self.recent[0][0]) or 1e-3)

    def _admit(self) -> None:
        """Free slots take waiting jobs; a job goes to the free slot whose cache shares the longest
        prefix with its prompt (a conversation's next turn reuses its KV cache)."""
        while self.pending and None in self.jobs:
            job = self.pending.popleft()
            if job.cancelled:
                continue
            free = [i for i, j in enumerate(self.jobs) if j is None]
            best = max(free, key=lambda i: common_prefix(self.slots[i].tokens, job.prompt))
            ctx = self.slots[best]
            keep = min(common_prefix(ctx.tokens, job.prompt), len(job.prompt) - 1)
            ctx.rewind(keep)
            job.cached, job.todo = keep, job.prompt[keep:]
            job.gen = Generation(self.model, job.prompt, ctx.n_ctx, job.max_tokens, job.sampling, job.stop,
                                 job.stop_at_eos)
            self.jobs[best] = job

    def _finish(self, i: int, reason: str | None = None, error: ApiError | None = None) -> None:
        job = self.jobs[i]
        self.jobs[i] = None
        if job is None:
            return
        self.stats["cancelled" if job.cancelled else "finished"] += 1
        if error is not None:
            job.emit("error", error)
        elif not job.cancelled:
            job.emit("done", reason or job.gen.finish_reason)
        self.stats["completion_tokens"] += len(job.gen.tokens) if job.gen else 0

    def step(self) -> bool:
        """One batched forward pass over every busy slot; False when there was nothing to do."""
        with self.cv:
            self._admit()
            for i, j in enumerate(self.jobs):
                if j is not None and j.cancelled:
                    self._finish(i)
            active = [i for i, j in enumerate(self.jobs) if j is not None]
        if not active:
            return False
        budget = max(self.chunk, len(active))
        batch, feeds = [], []
        for i in active:                              # the next token of each generating sequence first
            job = self.jobs[i]
            if not job.todo:
                batch.append((self.slots[i], [job.gen.next_token]))
                feeds.append(i)
                budget -= 1
        for i in active:                              # then prompt chunks, in the budget left
            job = self.jobs[i]
            if job.todo and budget > 0:
                take = job.todo[:budget]
                batch.append((self.slots[i], take))
                feeds.append(i)
                budget -= len(take)
        try:
            logits = self.model.decode(batch)
        except EngineError as e:                      # should not happen (lengths are checked at admission)
            with self.cv:
                for i in feeds:
                    self._finish(i, error=ApiError(500, f"engine: {e}", "server_error"))
            return True
        n_new = 0
        with self.cv:
            for k, i in enumerate(feeds):
                job = self.jobs[i]
                if job.todo:
                    job.todo = job.todo[len(batch[k][1]):]
                    self.stats["prompt_tokens"] += len(batch[k][1])
                    if job.todo:
                        continue                      # still reading its prompt
                piece = job.gen.step(logits[k])
                n_new += 1
                if job.t_first is None:
                    job.t_first = time.monotonic()
                if piece and not job.cancelled:
                    job.emit("piece", piece)
                if job.gen.done:
                    self._finish(i)
            self.stats["steps"] += 1
            self.stats["batch_sequences"] += len(batch)
            self.recent.append((time.monotonic(), n_new))
        return True

    def run(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.pending and all(j is None for j in self.jobs):
                    self.cv.wait()
                if self.stopping:
                    for i in range(len(self.jobs)):
                        self._finish(i, error=ApiError(503, "server shutting down", "server_error"))
                    for job in self.pending:
                        job.emit("error", ApiError(503, "server shutting down", "server_error"))
                    self.pending.clear()
                    return
            try:
                self.step()
            except Exception as e:   # never let the scheduler die: fail what was running, go on
                with self.cv:
                    for i in range(len(self.jobs)):
                        self._finish(i, error=ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


# --- request parsing ------------------------------------------------------------------------------

def _num(body: dict, key: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be {'an integer' if integer else 'a number'}", param=key)
    if not (lo <= v <= hi):
        raise ApiError(400, f"'{key}' must be between {lo} and {hi} (got {v})", param=key)
    return v


class Server:
    def __init__(self, model: Model, model_id: str, parallel: int = 4, n_ctx: int = 0, queue_size: int = 64,
                 api_key: str | None = None, defaults: Sampling | None = None, chat_template: str | None = None,
                 default_stop: list[str] | None = None):
        self.model, self.model_id, self.api_key = model, model_id, api_key
        self.default_stop = list(default_stop or [])
        self.defaults = defaults or Sampling()
        self.chat_template = chat_template
        self.sched = Scheduler(model, parallel, n_ctx, queue_size)
        self.started = int(time.time())
        self.requests = collections.Counter()     # (path, status) -> count
        self.lat = collections.Counter()

    # parameters shared by both completion endpoints
    def _common(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", param="model")
        if model and model not in (self.model_id, Path(self.model.path).name):
            raise ApiError(404, f"The model '{model}' does not exist (this server has '{self.model_id}')",
                           param="model", code="model_not_found")
        if _num(body, "n", 1, 1, 1, integer=True) != 1:
            raise ApiError(400, "only n = 1 is supported", param="n")
        for unsupported in ("logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
            v = body.get(unsupported)
            if v not in (None, False, {}, []):
                raise ApiError(400, f"'{unsupported}' is not supported by this server", param=unsupported)
        stop = body.get("stop")
        if stop is None:
            stop = self.default_stop
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "'stop' must be a string or an array of at most 4 strings", param="stop")
        d = self.defaults
        seed = _num(body, "seed", -2**63, 2**64 - 1, None, integer=True)
        sampling = Sampling(
            temperature=_num(body, "temperature", 0, 2, d.temperature),
            top_p=_num(body, "top_p", 0, 1, d.top_p),
            top_k=_num(body, "top_k", 0, 1 << 20, d.top_k, integer=True),
            seed=None if seed is None else seed % 2**64,
            repeat_penalty=_num(body, "repeat_penalty", 0.01, 100, d.repeat_penalty),
            repeat_last_n=_num(body, "repeat_last_n", -1, 1 << 20, d.repeat_last_n, integer=True),
            frequency_penalty=_num(body, "frequency_penalty", -2, 2, 0.0),
            presence_penalty=_num(body, "presence_penalty", -2, 2, 0.0))
        mt = body.get("max_completion_tokens", body.get("max_tokens"))
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ApiError(400, "'max_tokens' must be a positive integer", param="max_tokens")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be a boolean", param="stream")
        ignore_eos = body.get("ignore_eos", False)   # llama-server's extension
        if not isinstance(ignore_eos, bool):
            raise ApiError(400, "'ignore_eos' must be a boolean", param="ignore_eos")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        return {"stop": stop, "sampling": sampling, "max_tokens": mt, "stream": stream,
                "include_usage": bool(so.get("include_usage")), "ignore_eos": ignore_eos}

    def _fit(self, prompt: list[int], max_tokens: int | None, param: str) -> int | None:
        n_ctx = self.sched.n_ctx
        if len(prompt) >= n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens, but the prompt has "
                                f"{len(prompt)} tokens", param=param, code="context_length_exceeded")
        if max_tokens is not None and len(prompt) + max_tokens > n_ctx:
            raise ApiError(400, f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                                f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} in "
                                f"the completion)", param="max_tokens", code="context_length_exceeded")
        return max_tokens   # None: until the end of text or of the context

    def chat_prompt(self, body: dict) -> list[int]:
        try:
            messages = check_messages(body.get("messages"))
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        try:
            text = render_chat(self.model, messages, template=self.chat_template)
        except ChatTemplateError as e:
            # raise_exception: the template refused these messages (the caller's fault); anything else
            # (a syntax error, an escape attempt, a size or time limit) is the model file's
            if e.raised:
                raise ApiError(400, str(e), param="messages", code="chat_template_error") from None
            raise ApiError(500, str(e), "server_error", code="chat_template_error") from None
        return self.model.tokenize(text)

    def completion_prompt(self, body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            toks = self.model.tokenize(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= self.model.n_vocab:
                raise ApiError(400, f"token ids must be in [0, {self.model.n_vocab})", param="prompt")
            toks = list(p)
        else:
            raise ApiError(400, "'prompt' must be a string, or an array of token ids", param="prompt")
        if not toks:
            bos = self.model.meta_int("tokenizer.ggml.bos_token_id")
            toks = [bos if bos is not None else 0]
        return toks

    def metrics(self) -> str:
        s = self.sched.stats
        lines = [
            "# HELP bitbasis_requests_total HTTP requests by endpoint and status.",
            "# TYPE bitbasis_requests_total counter",
        ]
        for (path, status), n in sorted(self.requests.items()):
            lines.append(f'bitbasis_requests_total{{path="{path}",status="{status}"}} {n}')
        for name, key, help_ in (("prompt_tokens_total", "prompt_tokens", "prompt tokens evaluated"),
                                 ("completion_tokens_total", "completion_tokens", "tokens generated"),
                                 ("decode_steps_total", "steps", "batched forward passes"),
                                 ("batch_sequences_total", "batch_sequences", "sequences summed over the passes"),
                                 ("requests_cancelled_total", "cancelled", "requests whose client left")):
            lines += [f"# HELP bitbasis_{name} {help_}.", f"# TYPE bitbasis_{name} counter", f"bitbasis_{name} {s[key]}"]
        for name, v, help_ in (("tokens_per_second", f"{self.sched.tokens_per_second():.3f}",
                                "tokens generated per second over the last 10 s"),
                               ("queue_depth", self.sched.queue_depth(), "requests waiting for a slot"),
                               ("slots_busy", self.sched.busy(), "slots generating"),
                               ("slots_total", len(self.sched.slots), "slots (--parallel)")):
            lines += [f"# HELP bitbasis_{name} {help_}.", f"# TYPE bitbasis_{name} gauge", f"bitbasis_{name} {v}"]
        return "\n".join(lines) + "\n"


def build_app(server: Server):
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def body_of(request: Request) -> Any:
        raw = bytearray()
        async for part in request.stream():   # read no further than the limit (Content-Length may lie)
            raw += part
            if len(raw) > MAX_BODY:
                raise ApiError(413, f"the request body is over the limit of {MAX_BODY:,} bytes",
                               code="request_too_large")
        try:
            body = json.loads(raw)
        except RecursionError:
            raise ApiError(400, "the request body is not valid JSON: nested too deeply") from None
        except (ValueError, UnicodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        try:   # a lone surrogate ("\ud800") parses but is no text: the tokenizer cannot take it
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body has a lone UTF-16 surrogate escape (\\ud800-\\udfff): "
                                "not text") from None
        return body

    async def run_job(request: Request, prompt: list[int], p: dict, kind: str):
        max_tokens = server._fit(prompt, p["max_tokens"], "messages" if kind == "chat" else "prompt")
        loop = asyncio.get_running_loop()
        job = Job(prompt, max_tokens, p["sampling"], p["stop"], not p["ignore_eos"], loop, asyncio.Queue())
        try:
            server.sched.submit(job)
        except QueueFull:
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full; retry later",
                           "server_error", code="queue_full") from None
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())

        def usage():
            n = len(job.gen.tokens) if job.gen else 0
            return {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                    "prompt_tokens_details": {"cached_tokens": job.cached}}

        def chunk(delta: dict | None, text: str | None, finish: str | None) -> dict:
            if kind == "chat":
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": server.model_id,
                        "system_fingerprint": None, "choices": [choice]}
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": server.model_id,
                    "choices": [choice]}

        async def watch():
            """The client leaving (http.disconnect) cancels the job: its slot frees at the next step."""
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    job.cancelled = True
                    job.emit("left")
                    return

        if p["stream"]:
            async def events():
                watcher = asyncio.create_task(watch())
                try:
                    if kind == "chat":
                        yield f"data: {json.dumps(chunk({'role': 'assistant', 'content': ''}, None, None))}\n\n"
                    while True:
                        ev = await job.events.get()
                        if ev[0] == "piece":
                            c = chunk({"content": ev[1]}, ev[1], None)
                        elif ev[0] == "done":
                            c = chunk({}, "", ev[1])
                        elif ev[0] == "left":
                            return
                        else:
                            yield f"data: {json.dumps(ev[1].body())}\n\n"
                            break
                        yield f"data: {json.dumps(c, ensure_ascii=False)}\n\n"
                        if ev[0] == "done":
                            if p["include_usage"]:
                                u = chunk(None, None, None)
                                u["choices"], u["usage"] = [], usage()
                                yield f"data: {json.dumps(u)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:
                    job.cancelled = True    # a client that left frees its slot at the next step
                    watcher.cancel()
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        text = []
        watcher = asyncio.create_task(watch())
        try:
            while True:
                ev = await job.events.get()
                if ev[0] == "left":
                    return Response(status_code=499)
                if ev[0] == "piece":
                    text.append(ev[1])
                elif ev[0] == "error":
                    raise ev[1]
                else:
                    finish = ev[1]
                    break
        finally:
            job.cancelled = True
            watcher.cancel()
        out = "".join(text)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": out, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": server.model_id,
                             "system_fingerprint": None, "choices": [choice], "usage": usage()})

    async def chat_completions(request: Request):
        body = await body_of(request)
        p = server._common(body)
        prompt = await run_in_threadpool(server.chat_prompt, body)
        return await run_job(request, prompt, p, "chat")

    async def completions(request: Request):
        body = await body_of(request)
        p = server._common(body)
        prompt = await run_in_threadpool(server.completion_prompt, body)
        return await run_job(request, prompt, p, "text")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": server.model_id, "object": "model", "created": server.started, "owned_by": "bitbasis",
             "meta": {"n_ctx": server.sched.n_ctx, "n_vocab": server.model.n_vocab, "kernel": server.model.kernel,
                      "parallel": len(server.sched.slots)}}]})

    async def health(request: Request):
        return JSONResponse({"status": "ok", "slots_busy": server.sched.busy(), "queue_depth": server.sched.queue_depth()})

    async def metrics(request: Request):
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    async def page(request: Request):
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def api_error(request: Request, exc: ApiError):
        return error(exc)

    async def http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code))

    async def any_error(request: Request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error"))

    class Guard:
        """API key check (all but /health and the page) and request counting, as pure ASGI
        middleware so streaming responses pass through untouched."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            path = scope["path"]
            status = {"code": 500}

            async def send_counted(msg):
                if msg["type"] == "http.response.start":
                    status["code"] = msg["status"]
                await send(msg)

            try:
                if server.api_key and path not in ("/health", "/"):
                    auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
                    if not hmac.compare_digest(auth.encode(), f"Bearer {server.api_key}".encode()):
                        e = ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'",
                                     code="invalid_api_key")
                        return await error(e)(scope, receive, send_counted)
                return await self.app(scope, receive, send_counted)
            finally:
                known = path if path in ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                         "/v1/completions") else "other"
                server.requests[(known, status["code"])] += 1

    from contextlib import asynccontextmanager
    from starlette.middleware import Middleware

    @asynccontextmanager
    async def lifespan(app):
        server.sched.start()
        try:
            yield
        finally:
            server.sched.stop()

    app = Starlette(routes=[
        Route("/", page), Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: any_error},
        middleware=[Middleware(Guard)], lifespan=lifespan)
    return app


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, parallel: int = 4, n_ctx: int = 0,
          threads: int | None = None, api_key: str | None = None, queue_size: int = 64, defaults: Sampling | None = None,
          chat_template: str | None = None, log_level: str = "info", default_stop: list[str] | None = None) -> None:
    import sys
    import uvicorn
    model = Model(model_path, threads=threads, n_ctx=8)   # the default context is not used: slots are
    model.tokenizer                                       # loaded before the port opens: /health = ready
    chat_template, notice = template_for(model, chat_template)
    if chat_template is None:
        print(f"bitbasis serve: warning: {model_path} has no chat template; /v1/chat/completions will fail",
              file=sys.stderr)
    elif notice:
        print(f"bitbasis serve: {notice}", file=sys.stderr)
    model_id = Path(model_path).stem
    server = Server(model, model_id, parallel, n_ctx, queue_size, api_key, defaults, chat_template, default_stop)
    print(f"bitbasis serve: {model_path} as '{model_id}' on http://{host}:{port} ({parallel} slots of "
          f"{server.sched.n_ctx} tokens, queue {queue_size}, {model.kernel}, {model.threads} threads"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(build_app(server), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)

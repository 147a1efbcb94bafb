"""A bounded load test of `bitbasis serve` on localhost (issue 18), or of llama-cpp-python's server
(`--engine llamacpp`, the `[bench]` extra: llama.cpp's own engine behind an OpenAI-style API) on the same
GGUF file with the same threads, for a side-by-side comparison.

Starts the server (or uses --url), then
  1. --clients concurrent streaming chat clients, each asking for --tokens tokens (ignore_eos, so
     every reply has exactly that many): aggregate tokens/s, time to first token and request
     latency p50/p99; every request must succeed;
  2. --burst requests at once (beyond --parallel + --queue): counts 200 / 503 / other; only 503
     past the queue is allowed, and no request may be lost.
Prints a JSON summary and a markdown row for docs/results.md. Traffic goes to 127.0.0.1 only.

llama-cpp-python's server decodes one request at a time (no slots; the others wait, unbounded, as
`--interrupt_requests False` makes them instead of cancelling the running one) and has no
`ignore_eos`; its replies are held to exactly --tokens tokens by a logit bias of -100 on the file's
end-of-generation tokens instead, and its token counts are the streamed chunks (one per token). Compare
it with `--parallel 1`.

  python tools/serve_load.py -m smol.gguf --parallel 4 --queue 16 --clients 16 --tokens 64 --burst 64
  python tools/serve_load.py -m smol-f32.gguf --engine llamacpp -t 1 --clients 16 --tokens 64 --burst 64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def no_eos(bias):
    """Request fields that make a reply run to max_tokens: bitbasis' (and llama-server's) ignore_eos,
    or a logit bias against the end-of-generation token ids `bias` (llama-cpp-python)."""
    return {"logit_bias": {str(t): -100 for t in bias}} if bias else {"ignore_eos": True}


def eog_ids(path) -> list[int]:
    """The end-of-generation tokens llama.cpp stops at: eos/eot/eom ids and the usual end-of-text texts."""
    import gguf
    r = gguf.GGUFReader(path, "r")
    ids = {int(r.fields[k].contents()) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                                   "tokenizer.ggml.eom_token_id") if k in r.fields}
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    ids |= {i for i, t in enumerate(toks) if t in ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<|end|>",
                                                   "<end_of_turn>")}
    return sorted(ids)


async def stream_one(client, i, tokens, bias):
    body = {"messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            "max_tokens": tokens, "stream": True, "temperature": 0.8, "seed": i, **no_eos(bias)}
    t0 = time.perf_counter()
    first, n, status = None, 0, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("choices") and d["choices"][0]["delta"].get("content"):
                n += 1
                if first is None:
                    first = time.perf_counter() - t0
    return status, first, time.perf_counter() - t0, n


async def burst_one(client, i, bias):
    r = await client.post("/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": 8, **no_eos(bias)})
    return r.status_code


async def run(url, key, clients, tokens, burst, bias):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=max(clients, burst) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(c, i, tokens, bias) for i in range(clients)))
        wall = time.perf_counter() - t0
        pieces = sum(r[3] for r in res)
        if bias:   # llama-cpp-python: one chunk per token, no /metrics
            gen = pieces
        else:
            m = (await c.get("/metrics")).text
            gen = next(float(ln.split()[1]) for ln in m.splitlines()
                       if ln.startswith("bitbasis_completion_tokens_total "))
        t1 = time.perf_counter()
        codes = await asyncio.gather(*(burst_one(c, i, bias) for i in range(burst)))
        burst_wall = time.perf_counter() - t1
        alive = (await c.get("/v1/models" if bias else "/health")).status_code
    ok = [r for r in res if r[0] == 200]
    return {
        "clients": clients, "tokens": tokens, "stream_ok": len(ok), "stream_failed": clients - len(ok),
        "wall_s": wall, "completion_tokens": gen, "stream_pieces": pieces, "tok_s": gen / wall,
        "ttft_p50_s": pct([r[1] for r in ok if r[1] is not None], 50),
        "ttft_p99_s": pct([r[1] for r in ok if r[1] is not None], 99),
        "latency_p50_s": pct([r[2] for r in ok], 50), "latency_p99_s": pct([r[2] for r in ok], 99),
        "burst": burst, "burst_200": codes.count(200), "burst_503": codes.count(503),
        "burst_other": len(codes) - codes.count(200) - codes.count(503), "burst_wall_s": burst_wall,
        "health_after": alive,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", help="GGUF to serve (starts the server on a free localhost port)")
    p.add_argument("--engine", choices=["bitbasis", "llamacpp"], default="bitbasis",
                   help="bitbasis serve, or llama-cpp-python's server (llama_cpp.server) on the same file")
    p.add_argument("--url", help="an already running server instead (localhost only)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--queue", type=int, default=16)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--burst", type=int, default=64)
    a = p.parse_args(argv)
    proc = None
    url = a.url
    if a.engine == "llamacpp" and not a.model:
        p.error("--engine llamacpp needs -m MODEL (the file it serves: its end-of-generation tokens)")
    if url and not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("--url must be a localhost address")
    if not url:
        if not a.model:
            p.error("give -m MODEL or --url")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        if a.engine == "llamacpp":
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--host", "127.0.0.1", "--port",
                   str(port), "--n_ctx", str(a.ctx), "--n_threads", str(a.threads), "--n_threads_batch",
                   str(a.threads), "--verbose", "False",
                   "--interrupt_requests", "False"]   # queue requests, as bitbasis does, instead of cancelling
            if a.api_key:
                cmd += ["--api_key", a.api_key]
        else:
            cmd = [sys.executable, "-m", "bitbasis.cli", "serve", "-m", a.model, "--port", str(port), "--parallel",
                   str(a.parallel), "--queue", str(a.queue), "--ctx", str(a.ctx), "-t", str(a.threads)]
            if a.api_key:
                cmd += ["--api-key", a.api_key]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        ready = "/v1/models" if a.engine == "llamacpp" else "/health"
        headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
        while True:
            try:
                if httpx.get(url + ready, headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.5)
    try:
        bias = eog_ids(a.model) if a.engine == "llamacpp" else None
        r = asyncio.run(run(url, a.api_key, a.clients, a.tokens, a.burst, bias))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    r.update(engine=a.engine, parallel=a.parallel, queue=a.queue, threads=a.threads, load1=os.getloadavg()[0])
    print(json.dumps(r, indent=1))
    print(f"| {a.engine} | {a.threads} | {a.parallel} | {a.queue} | {a.clients} x {a.tokens} | {r['stream_ok']}/{a.clients} | {r['tok_s']:.1f} | "
          f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | "
          f"{a.burst}: {r['burst_200']} ok, {r['burst_503']} 503, {r['burst_other']} other |")
    lost = r["stream_failed"] + r["burst_other"]
    short = a.engine == "llamacpp" and r["stream_pieces"] != a.clients * a.tokens   # the bias did not hold
    return 1 if lost or short or r["health_after"] != 200 or r["burst_200"] < min(a.burst, a.parallel + a.queue) else 0


if __name__ == "__main__":
    sys.exit(main())

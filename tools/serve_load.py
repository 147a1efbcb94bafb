"""A bounded load test of `bitbasis serve` on localhost (issue 18).

Starts the server (or uses --url), then
  1. --clients concurrent streaming chat clients, each asking for --tokens tokens (ignore_eos, so
     every reply has exactly that many): aggregate tokens/s, time to first token and request
     latency p50/p99; every request must succeed;
  2. --burst requests at once (beyond --parallel + --queue): counts 200 / 503 / other; only 503
     past the queue is allowed, and no request may be lost.
Prints a JSON summary and a markdown row for docs/results.md. Traffic goes to 127.0.0.1 only.

  python tools/serve_load.py -m smol.gguf --parallel 4 --queue 16 --clients 16 --tokens 64 --burst 64
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


async def stream_one(client, i, tokens):
    body = {"messages": [{"role": "user", "content": f"Tell me a story about the number {i}."}],
            "max_tokens": tokens, "stream": True, "ignore_eos": True, "temperature": 0.8, "seed": i}
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


async def burst_one(client, i):
    r = await client.post("/v1/completions", json={"prompt": f"Item {i}:", "max_tokens": 8, "ignore_eos": True})
    return r.status_code


async def run(url, key, clients, tokens, burst):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=max(clients, burst) + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900, limits=limits) as c:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(c, i, tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
        pieces = sum(r[3] for r in res)
        m = (await c.get("/metrics")).text
        gen = next(float(ln.split()[1]) for ln in m.splitlines() if ln.startswith("bitbasis_completion_tokens_total "))
        t1 = time.perf_counter()
        codes = await asyncio.gather(*(burst_one(c, i) for i in range(burst)))
        burst_wall = time.perf_counter() - t1
        alive = (await c.get("/health")).status_code
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
    p.add_argument("-m", "--model", help="GGUF to serve (starts `bitbasis serve` on a free localhost port)")
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
    if url and not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        p.error("--url must be a localhost address")
    if not url:
        if not a.model:
            p.error("give -m MODEL or --url")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "bitbasis.cli", "serve", "-m", a.model, "--port", str(port), "--parallel",
               str(a.parallel), "--queue", str(a.queue), "--ctx", str(a.ctx), "-t", str(a.threads)]
        if a.api_key:
            cmd += ["--api-key", a.api_key]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start")
            time.sleep(0.5)
    try:
        r = asyncio.run(run(url, a.api_key, a.clients, a.tokens, a.burst))
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)
    r.update(parallel=a.parallel, queue=a.queue, threads=a.threads, load1=os.getloadavg()[0])
    print(json.dumps(r, indent=1))
    print(f"| {a.parallel} | {a.queue} | {a.clients} x {a.tokens} | {r['stream_ok']}/{a.clients} | {r['tok_s']:.1f} | "
          f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | "
          f"{a.burst}: {r['burst_200']} ok, {r['burst_503']} 503, {r['burst_other']} other |")
    lost = r["stream_failed"] + r["burst_other"]
    return 1 if lost or r["health_after"] != 200 or r["burst_200"] < min(a.burst, a.parallel + a.queue) else 0


if __name__ == "__main__":
    sys.exit(main())

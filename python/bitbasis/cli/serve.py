"""`bitbasis serve`: the OpenAI-compatible local server (bitbasis.server)."""
from __future__ import annotations

import os

from ._common import add_sampling, check_threads, sampling_of

DESCRIPTION = """\
An OpenAI-compatible HTTP server over one set of weights: POST /v1/chat/completions (the file's
chat template; stream: true for server-sent events), POST /v1/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus), and a chat page at /. --parallel conversations run as
one batch; requests beyond them wait in a queue of --queue, past which they get 503.
The sampling options below are the defaults of requests that do not set them.

  bitbasis serve -m smol.gguf
  curl -s localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi"}]}'
"""


def run(a) -> int:
    from ..server import serve
    check_threads(a.threads)
    if a.parallel < 1 or a.queue < 0:
        raise ValueError("--parallel must be at least 1 and --queue at least 0")
    if not (0 < a.port < 65536):
        raise ValueError(f"--port {a.port} is not a TCP port")
    if not os.path.isfile(a.model):
        raise ValueError(f"{a.model}: no such file")
    template = None
    if a.chat_template_file:
        with open(a.chat_template_file, encoding="utf-8") as f:
            template = f.read()
    key = a.api_key or os.environ.get("BITBASIS_API_KEY") or None
    serve(a.model, host=a.host, port=a.port, parallel=a.parallel, n_ctx=a.ctx, threads=a.threads, api_key=key,
          queue_size=a.queue, defaults=sampling_of(a), chat_template=template, log_level=a.log_level,
          default_stop=a.stop)
    return 0


def add_parser(sub) -> None:
    import argparse
    s = sub.add_parser("serve", help="OpenAI-compatible local server with a chat page (many conversations, one model)",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("-m", "--model", required=True, help="GGUF file")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    s.add_argument("--parallel", "-np", type=int, default=4,
                   help="conversations decoded together, each with its own KV cache of --ctx tokens (default 4)")
    s.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot; past it, 503 (default 64)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                        "(default: $BITBASIS_API_KEY, else none)")
    s.add_argument("--chat-template-file", default=None, metavar="FILE",
                   help="a Jinja chat template to use instead of the file's")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default warning)")
    add_sampling(s, 0.8)
    s.set_defaults(func=run)

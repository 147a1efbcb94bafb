"""`bitbasis generate`: continue a prompt with the C++ engine, streaming the text."""
from __future__ import annotations

import sys

from ._common import add_sampling, check_threads, n_predict, sampling_of


def _rate(n: int, s: float) -> str:
    return f"{n / s:.2f} tok/s" if s > 0 and n else "n/a"


def run(a) -> int:
    from ..engine import Model
    check_threads(a.threads)
    n = n_predict(a.n_predict)
    m = Model(a.model, threads=a.threads, n_ctx=a.ctx)
    for piece in m.generate(a.prompt, max_tokens=n, stop_at_eos=not a.ignore_eos, stop=a.stop, sampling=sampling_of(a)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = m.last_stats
    print(f"prompt  {s['prompt_tokens']} tokens in {s['prompt_s']:.3f} s, {_rate(s['prompt_tokens'], s['prompt_s'])}\n"
          f"decode  {s['gen_tokens']} tokens in {s['gen_s']:.3f} s, {_rate(s['gen_tokens'], s['gen_s'])} "
          f"(engine only: {_rate(s['gen_evals'], s['gen_eval_s'])})\n"
          f"kernel  {m.kernel}, {m.threads} threads", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with the C++ engine (streams the text)",
                       description="Continue PROMPT with the C++ engine, streaming the text; speed on stderr.")
    g.add_argument("-m", "--model", required=True, help="GGUF file")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--n-predict", type=int, default=128,
                   help="tokens to generate (default 128; -1 = until the end of text or of the context)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    add_sampling(g, 0.8)
    g.set_defaults(func=run)

"""`bitbasis generate` and `bitbasis chat`: the C++ engine on the command line."""
from __future__ import annotations

import sys


def _add_sampling(p, temp: float) -> None:
    p.add_argument("-t", "--threads", type=int, default=2, help="engine threads (default 2)")
    p.add_argument("--temp", type=float, default=temp, help=f"temperature, 0 = greedy (default {temp})")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens, 0 = all (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--ctx", type=int, default=0, help="context length (default: the model's)")


def _rate(n: int, s: float) -> str:
    return f"{n / s:.2f} tok/s" if s > 0 and n else "n/a"


def cmd_generate(a) -> int:
    from .engine import Model
    m = Model(a.model, threads=a.threads, n_ctx=a.ctx)
    for piece in m.generate(a.prompt, max_tokens=a.n_predict, temperature=a.temp, top_k=a.top_k,
                            top_p=a.top_p, seed=a.seed, stop_at_eos=not a.ignore_eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    s = m.last_stats
    print(f"prompt  {s['prompt_tokens']} tokens in {s['prompt_s']:.3f} s, {_rate(s['prompt_tokens'], s['prompt_s'])}\n"
          f"decode  {s['gen_tokens']} tokens in {s['gen_s']:.3f} s, {_rate(s['gen_tokens'], s['gen_s'])} "
          f"(engine only: {_rate(s['gen_evals'], s['gen_eval_s'])})\n"
          f"kernel  {m.kernel}, {m.threads} threads", file=sys.stderr)
    return 0


def _chat_tokens(m, history: list[dict], reply_budget: int) -> list[int]:
    """The conversation as prompt tokens; drops the oldest turns (keeping a system message) until
    the prompt plus the reply budget fits the context."""
    tok = m.tokenizer
    while True:
        text = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        ids = m.tokenize(text)
        if len(ids) + reply_budget <= m.n_ctx:
            return ids
        first = 1 if history and history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            raise ValueError(f"message of {len(ids)} tokens does not fit the context of {m.n_ctx} "
                             f"with {reply_budget} tokens left for the reply")
        # drop the oldest exchange: a user message and the assistant reply that follows it
        del history[first]
        if len(history) > first + 1 and history[first]["role"] == "assistant":
            del history[first]


def cmd_chat(a) -> int:
    import signal
    from .engine import Model
    # Ctrl-C must stop a reply even when the parent started us with SIGINT ignored or blocked (both
    # are inherited through exec; Python then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    m = Model(a.model, threads=a.threads, n_ctx=a.ctx)
    if not m.tokenizer.chat_template:
        if not m.chat_template:
            raise ValueError(f"{a.model}: no chat template in the file (tokenizer.chat_template)")
        m.tokenizer.chat_template = m.chat_template
    budget = min(a.n_predict, m.n_ctx // 2)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    print(f"bitbasis chat: {a.model} ({m.kernel}, {m.threads} threads, context {m.n_ctx}). "
          f"/exit or Ctrl-D quits; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            try:
                ids = _chat_tokens(m, history, budget)
            except ValueError as e:
                history.pop()
                print(f"bitbasis: {e}", file=sys.stderr)
                continue
            for piece in m.generate(ids, max_tokens=budget, temperature=a.temp, top_k=a.top_k, top_p=a.top_p,
                                    seed=a.seed, reuse_cache=True, stop_at_eos=not a.ignore_eos):
                reply += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            # the cache may hold a token the bookkeeping missed: start the next turn from scratch
            m.reset()
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": reply})
    return 0


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt with the C++ engine (streams the text)")
    g.add_argument("-m", "--model", required=True, help="GGUF file")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    _add_sampling(g, 0.8)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive chat with the C++ engine (uses the file's chat template)")
    c.add_argument("-m", "--model", required=True, help="GGUF file")
    c.add_argument("-n", "--n-predict", type=int, default=512, help="most tokens per reply (default 512)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--ignore-eos", action="store_true",
                   help="replies run to -n tokens past the end-of-text token (testing Ctrl-C, benchmarks)")
    _add_sampling(c, 0.7)
    c.set_defaults(func=cmd_chat)

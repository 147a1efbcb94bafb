"""`bitbasis chat`: an interactive conversation with the C++ engine, in the file's chat template."""
from __future__ import annotations

import sys

from ._common import add_sampling, check_threads, n_predict, sampling_of

HELP = """commands:
  /help            this help
  /reset, /clear   forget the conversation (the system message stays)
  /exit, /quit     leave (Ctrl-D too)
multi-line input: end a line with \\ to continue it, or put the text between two lines of \"\"\"
Ctrl-C stops a reply."""


def chat_tokens(m, history: list[dict], reply_budget: int, render) -> list[int]:
    """The conversation as prompt tokens; drops the oldest turns (keeping a system message) until
    the prompt plus the reply budget fits the context."""
    while True:
        ids = m.tokenize(render(history))
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


def read_message(prompt: str = "> ") -> str:
    """One message: a line; lines ending in a backslash continue it; \"\"\" opens a block that the
    next \"\"\" line closes (as ollama). EOFError at the end of input."""
    line = input(prompt)
    if line.strip().startswith('"""'):
        first = line.strip()[3:]
        if first.endswith('"""'):
            return first[:-3]
        lines = [first] if first else []
        while True:
            nxt = input(". ")
            if nxt.rstrip().endswith('"""'):
                lines.append(nxt.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(nxt)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(". ")
    lines.append(line)
    return "\n".join(lines)


def run(a) -> int:
    import signal
    from ..chat_template import ChatTemplateError, render_chat, template_for
    from ..engine import Model
    # Ctrl-C must stop a reply even when the parent started us with SIGINT ignored or blocked (both
    # are inherited through exec; Python then never raises KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    check_threads(a.threads)
    template = None
    if a.chat_template_file:
        try:
            template = open(a.chat_template_file, encoding="utf-8").read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template-file {a.chat_template_file}: {e.strerror or e}") from None
    m = Model(a.model, threads=a.threads, n_ctx=a.ctx)
    template, notice = template_for(m, template)   # (llama.cpp's GGUFs of base models often carry none)
    if template is None:
        raise ValueError(f"{a.model}: no chat template in the file (tokenizer.chat_template); "
                         f"give one with --chat-template-file")
    if notice:
        print(f"bitbasis chat: {notice}", file=sys.stderr)
    n = n_predict(a.n_predict)
    budget = min(n if n is not None else m.n_ctx, m.n_ctx // 2)
    system = [{"role": "system", "content": a.system}] if a.system else []
    history: list[dict] = list(system)
    sampling = sampling_of(a)
    print(f"bitbasis chat: {a.model} ({m.kernel}, {m.threads} threads, context {m.n_ctx}). "
          f"/help for commands, /exit or Ctrl-D quits; Ctrl-C stops a reply.", file=sys.stderr)
    while True:
        try:
            text = read_message()
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        cmd = text.strip()
        if cmd.startswith("/") and "\n" not in cmd:
            word = cmd.split()[0].lower()
            if word in ("/exit", "/quit", "/bye"):
                break
            if word == "/help":
                print(HELP, file=sys.stderr)
            elif word in ("/reset", "/clear"):
                history = list(system)
                m.reset()
                print("(conversation cleared)", file=sys.stderr)
            else:
                print(f"unknown command {word}; /help lists the commands", file=sys.stderr)
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": text})
        reply = ""
        try:
            try:
                ids = chat_tokens(m, history, budget, lambda h: render_chat(m, h, template=template))
            except (ValueError, ChatTemplateError) as e:
                history.pop()
                print(f"bitbasis: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            for piece in m.generate(ids, max_tokens=budget, reuse_cache=True, stop_at_eos=not a.ignore_eos,
                                    stop=a.stop, sampling=sampling):
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


def add_parser(sub) -> None:
    c = sub.add_parser("chat", help="interactive chat with the C++ engine (uses the file's chat template)",
                       description="Chat with a GGUF file in its chat template.\n\n" + HELP,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    c.add_argument("-m", "--model", required=True, help="GGUF file")
    c.add_argument("-n", "--n-predict", type=int, default=512,
                   help="most tokens per reply (default 512; -1 = up to half the context)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--chat-template-file", metavar="FILE",
                   help="Jinja chat template to use instead of the file's (needed when the file has none "
                        "and its architecture has no built-in turn format)")
    c.add_argument("--ignore-eos", action="store_true",
                   help="replies run to -n tokens past the end-of-text token (testing Ctrl-C, benchmarks)")
    add_sampling(c, 0.7)
    c.set_defaults(func=run)

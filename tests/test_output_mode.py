"""Output files honour the umask (as any file open() creates), not mkstemp's 0600."""
from __future__ import annotations

import os
import stat

import pytest

from bitbasis.gguf_io import atomic_output


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_output_honours_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        out = tmp_path / f"x{mask:o}.gguf"
        with atomic_output(out) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == mode
    assert out.read_bytes() == b"data"

"""cffi (ABI mode) binding of the C library built from cpp/ (header: cpp/include/bitbasis.h)."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from cffi import FFI

_HERE = Path(__file__).resolve().parent


def _header_text(name: str = "bitbasis.h") -> str:
    for p in (_HERE / name, _HERE.parents[1] / "cpp" / "include" / name):
        if p.exists():
            return p.read_text()
    raise ImportError(f"{name} not found next to the package or in cpp/include")


def _cdef_from_header(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    keep = [ln for ln in text.splitlines()
            if not ln.strip().startswith("#") and 'extern "C"' not in ln and ln.strip() != "}"]
    return "\n".join(keep)


def _library_path() -> Path:
    env = os.environ.get("BITBASIS_LIB")
    if env:
        return Path(env)
    for p in (_HERE / "libbitbasis.so", _HERE / "libbitbasis.dylib"):
        if p.exists():
            return p
    # an editable install keeps the library in the build tree
    hits = sorted((_HERE.parents[1] / "build").glob("**/libbitbasis.so"), key=lambda q: q.stat().st_mtime)
    if hits:
        return hits[-1]
    raise ImportError("libbitbasis not found: run `pip install .` (or set BITBASIS_LIB)")


@lru_cache(maxsize=1)
def lib():
    ffi = FFI()
    ffi.cdef(_cdef_from_header(_header_text()))
    return ffi, ffi.dlopen(str(_library_path()))

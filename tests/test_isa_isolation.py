"""No instruction beyond the x86-64 baseline outside the per-ISA kernel code, checked on the library
users get (host-independent: a disassembly, not a run).

The engine once shipped AVX-512 code in `std::vector<int>::_M_fill_assign`: kernels_avx512.cpp was
compiled with -mavx512*, and the linker kept that file's copy of the shared template for the whole
library, so model.cpp crashed with SIGILL on every AVX2-only CPU. Since then no file gets ISA flags;
wide code lives in BB_ISA_BEGIN regions inside namespaces bb::avx2 / bb::avx512 ("ISA isolation" in
cpp/src/kernels.h). This test disassembles libbitbasis.so and fails on any VEX/EVEX instruction, ymm/zmm
or mask register, or post-SSE2 instruction in any other function; a second test shows the check
catches exactly the old leak."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                                reason="x86-64 host with binutils' objdump needed")

ALLOWED = ("bb::avx2::", "bb::avx512::")

# Beyond the x86-64 baseline (SSE2) without a 'v' prefix: SSE3/SSSE3/SSE4.x, POPCNT/LZCNT, BMI1/2,
# MOVBE, CRC32. (tzcnt is left out: it decodes as bsf on older CPUs, and GCC emits it for ctz.)
_LATER = set("""
popcnt lzcnt andn bextr blsi blsmsk blsr bzhi mulx pdep pext rorx sarx shlx shrx movbe crc32
addsubps addsubpd haddps haddpd hsubps hsubpd movshdup movsldup movddup lddqu fisttp
pshufb pmaddubsw palignr phaddw phaddd phaddsw phsubw phsubd phsubsw pabsb pabsw pabsd psignb psignw
psignd pmulhrsw
ptest pmulld pminsb pminsd pminuw pminud pmaxsb pmaxsd pmaxuw pmaxud pblendw pblendvb blendps blendpd
blendvps blendvpd pextrb pextrd pextrq pinsrb pinsrd pinsrq extractps insertps roundps roundpd roundss
roundsd dpps dppd packusdw pcmpeqq pcmpgtq movntdqa mpsadbw phminposuw pcmpestri pcmpestrm pcmpistri
pcmpistrm
""".split())
_WIDE_REG = re.compile(r"%(ymm|zmm)\d+|%k[0-7]\b")
_FUNC = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSN = re.compile(r"^\s+[0-9a-f]+:\s+(?:(?:rep|repz|repnz|lock|notrack|bnd|data16|cs|ds)\s+)*([a-z0-9.]+)\s*(.*)$")


def beyond_baseline(mnemonic: str, operands: str) -> bool:
    return (mnemonic.startswith("v") and mnemonic not in ("verr", "verw")) or mnemonic in _LATER \
        or mnemonic.startswith(("pmovsx", "pmovzx")) or bool(_WIDE_REG.search(operands))


def wide_functions(lib: Path) -> dict[str, str]:
    """{demangled function: its first instruction beyond the baseline} over the whole .text."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    found: dict[str, str] = {}
    func = "?"
    for line in out.splitlines():
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        m = _INSN.match(line)
        if m and func not in found and beyond_baseline(m.group(1), m.group(2)):
            found[func] = line.strip()
    return found


def _has_symbols(lib: Path) -> bool:
    r = subprocess.run(["objdump", "-t", str(lib)], capture_output=True, text=True)
    return "no symbols" not in r.stdout and " .text\t" in r.stdout


def test_no_wide_instruction_outside_the_per_isa_code():
    from bitbasis import _native
    lib = _native._library_path()
    assert _has_symbols(lib), f"{lib} is stripped: the check needs its symbol table (pyproject: install.strip = false)"
    wide = wide_functions(lib)
    leaks = {f: insn for f, insn in wide.items() if not any(a in f for a in ALLOWED)}
    assert not leaks, "wide instructions outside bb::avx2:: / bb::avx512:: (reachable without the CPU check):\n" + \
        "\n".join(f"  {f}: {insn}" for f, insn in sorted(leaks.items())[:20])
    # not vacuous: the per-ISA code is there, and uses its ISA
    assert any("bb::avx512::" in f and "zmm" in i for f, i in wide.items()), "no AVX-512 kernel code found"
    assert any("bb::avx2::" in f and "ymm" in i for f, i in wide.items()), "no AVX2 kernel code found"


def test_the_check_catches_the_old_leak(tmp_path):
    """A file compiled with -mavx512f that instantiates std::vector<int>::assign — the bug the check exists
    for — is caught in the standard library's template code, although the only function that uses it
    is in bb::avx512."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "leak.cpp"
    src.write_text("#include <vector>\n"
                   "namespace bb::avx512 { void fill(std::vector<int> &v, int n) { v.assign(n, 7); } }\n")
    lib = tmp_path / "libleak.so"
    # -fno-inline keeps the template's code in its own (shared, out-of-line) functions, as in the engine
    subprocess.run([cxx, "-O3", "-fno-inline", "-mavx512f", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    leaks = [f for f in wide_functions(lib) if not any(a in f for a in ALLOWED)]
    assert any("std::" in f for f in leaks), leaks

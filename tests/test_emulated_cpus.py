"""The engine on CPUs this machine is not (tools/emulate.sh, tools/emulate.py): x86 under qemu-x86_64
as a Haswell (AVX2, FMA, F16C, no AVX-512) and a Nehalem (SSE4.2, no AVX), aarch64 under
qemu-aarch64 as -cpu max (NEON + dotprod) and -cpu cortex-a53 (no dotprod). On each: every C++ test
program; on x86 real SmolLM2 files through bitbasis.Model with every kernel selection the dispatcher
offers; on both the forward pass of tiny models (cpp/tools/forward_logits.cpp); logits equal to the
native run's within 1e-3 (max|a - b| / max|b|), and the emulated CPU reports what it should (so a
detector falling back to scalar cannot pass). A wide instruction leaking out of its kernel is a
SIGILL here even when every machine running the suite has the feature. The table of runs is printed
in the test output; skipped only when qemu or the cross compiler are missing (tools/setup.sh test
installs them)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("qemu-x86_64", "qemu-aarch64", "aarch64-linux-gnu-g++", "cmake")
CPUS = ("x86 Haswell", "x86 Nehalem", "aarch64 max", "aarch64 cortex-a53")


@pytest.fixture(scope="module")
def emulated(model_files, tmp_path_factory, request) -> tuple[subprocess.CompletedProcess, list[str]]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install qemu-user g++-aarch64-linux-gnu cmake)")
    if not Path("/usr/aarch64-linux-gnu").is_dir():
        pytest.skip("no aarch64 sysroot at /usr/aarch64-linux-gnu (apt-get install g++-aarch64-linux-gnu)")
    smol = [model_files("residual", 1), model_files("residual", 2)]   # shared with test_engine.py
    env = dict(os.environ, EMULATE_SMOL=" ".join(map(str, smol)), PYTHON=sys.executable)
    # the native build is the one tests/test_kernels.py and tests/test_vectors.py use
    r = subprocess.run(["sh", str(ROOT / "tools" / "emulate.sh"), str(ROOT / ".kernel-test-build"),
                        str(tmp_path_factory.mktemp("emulate"))], env=env, capture_output=True, text=True,
                       timeout=1800)
    lines = [x for x in r.stdout.splitlines() if x.startswith(("PASS", "FAIL", "=="))]
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:   # the table in the CI log, passing or not
        with capture.global_and_fixture_disabled():
            print("\n" + "\n".join(lines), flush=True)
    return r, lines


def _runs(lines: list[str], cpu: str) -> list[str]:
    return [x for x in lines if x.startswith(("PASS", "FAIL")) and " ".join(x.split()[1:3]) == cpu]


def test_emulate_sh_passes(emulated):
    r, lines = emulated
    assert r.returncode == 0, "\n".join(x for x in lines if x.startswith("FAIL")) or (r.stdout + r.stderr)[-6000:]
    assert not _runs(lines, "x86 native"), "the native reference runs failed"


@pytest.mark.parametrize("cpu", CPUS)
def test_emulated_cpu(emulated, cpu):
    _, lines = emulated
    runs = _runs(lines, cpu)
    fails = [x for x in runs if x.startswith("FAIL")]
    assert runs and not fails, "\n".join(fails) or f"no runs on {cpu}"
    # what must have run (and passed) on this CPU
    wanted = [f"{p.stem} --quick" for p in sorted((ROOT / "cpp" / "tests").glob("*.cpp"))]
    wanted += ["forward_logits: cpu features, kernels", "(default)"]
    if cpu.startswith("x86"):
        wanted += ["python: cpu features, kernels", "python default ", "python BITBASIS_ISA=avx512 ",
                   "forward_logits BITBASIS_ISA=avx512 "]
    absent = [w for w in wanted if not any(w in x for x in runs)]
    assert not absent, f"{cpu}: no run of {absent}"

"""Fuzzing, in CI: a short libFuzzer run of the C++ reader/validator/loader (tools/fuzz.sh, ASan +
UBSan; the crash files in tests/regressions are part of its corpus, so they are replayed under the
sanitizers first), and every crash file replayed through the Python API (engine and read_model):
each must end as tests/regressions/expected.json says, a clean EngineError / GGUFFileError, or for
a file that is a valid model (NaN weights, ...) a load and evaluation, never as a crash.

A new crash: tools/fuzz.sh stops, leaves the input in build/fuzz/crashes/; fix the bug, copy the
file to tests/regressions/<what-it-was>.bin and describe it in expected.json."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = sorted((ROOT / "tests" / "regressions").glob("*.bin"))
FUZZ_SECONDS = int(os.environ.get("BITBASIS_FUZZ_SECONDS", "60"))


def test_fuzz_run_finds_nothing():
    r = subprocess.run(["bash", str(ROOT / "tools" / "fuzz.sh"), str(FUZZ_SECONDS)], cwd=ROOT,
                       capture_output=True, text=True, timeout=FUZZ_SECONDS + 900)
    out = r.stdout + r.stderr
    if r.returncode == 77:
        pytest.skip(out.strip().splitlines()[-1])
    stats = [ln for ln in out.splitlines() if ln.startswith(("stat::", "Done", "#"))][-8:]
    assert r.returncode == 0, f"fuzz.sh exit {r.returncode} (crash files: build/fuzz/crashes/):\n{out[-6000:]}"
    assert "stat::number_of_executed_units" in out, out[-3000:]
    executed = int(next(ln.split()[-1] for ln in out.splitlines() if ln.startswith("stat::number_of_executed_units")))
    assert executed > len(REGRESSIONS), "\n".join(stats)


_REPLAY = textwrap.dedent("""
    import json, sys
    from bitbasis.engine import EngineError, Model
    from bitbasis.gguf_io import GGUFFileError, read_model
    out = {}
    for p in json.loads(sys.argv[1]):
        print(p, flush=True)              # the last path printed is the culprit of a crash
        try:
            m = Model(p, threads=2, n_ctx=8)
            m.eval([0, m.n_vocab - 1], all_logits=True)
            m.eval([0])
            eng = "loaded"
        except EngineError as e:
            eng = "EngineError"
        try:
            read_model(p)
            py = "read"
        except GGUFFileError:
            py = "GGUFFileError"
        out[p] = [eng, py]
    print(json.dumps(out))
""")


@pytest.mark.skipif(not REGRESSIONS, reason="no regression files")
def test_regressions_fail_cleanly():
    from bitbasis.engine import engine_available
    if not engine_available():
        pytest.skip("libbitbasis not built")
    r = subprocess.run([sys.executable, "-c", _REPLAY, json.dumps([str(p) for p in REGRESSIONS])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"crash or unexpected exception (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    got = json.loads(r.stdout.strip().splitlines()[-1])
    expected = json.loads((ROOT / "tests" / "regressions" / "expected.json").read_text())
    for p in REGRESSIONS:
        assert p.name in expected, f"{p.name}: describe it in tests/regressions/expected.json"
        want = [expected[p.name]["engine"], expected[p.name]["python"]]
        assert got[str(p)] == want, f"{p.name}: engine/read_model gave {got[str(p)]}, expected {want}"

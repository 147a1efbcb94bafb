"""`bitbasis bench kernels` on aarch64: the benchmark driver (cpp/bench/bench_kernels.cpp) cross-compiled
with the NEON kernels and run under qemu in smoke mode (tools/neon_test.sh --bench). Checks that it
runs and that its output is labelled emulated; the timings themselves mean nothing here."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bitbasis import bench

ROOT = Path(__file__).resolve().parents[1]


def test_bench_kernels_under_qemu(tmp_path):
    missing = [t for t in ("aarch64-linux-gnu-g++", "qemu-aarch64") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (bash tools/setup.sh test, or apt-get install "
                    "g++-aarch64-linux-gnu qemu-user)")
    if not Path("/usr/aarch64-linux-gnu").is_dir():
        pytest.skip("no aarch64 sysroot at /usr/aarch64-linux-gnu")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("BENCH_ARGS", None)
    r = subprocess.run(["sh", str(ROOT / "tools" / "neon_test.sh"), "--bench", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count(bench.EMULATED_NOTE) >= 2    # before and after the rows
    res = json.loads((tmp_path / "bench_kernels_aarch64.json").read_text())
    meta = res["meta"]
    assert meta["emulated"] == "qemu" and meta["timing_note"] == bench.EMULATED_NOTE
    assert meta["machine"] == "aarch64" and "neon" in meta["cpu_features"].split()
    assert "dotprod" in meta["cpu_features"].split() and meta["default_kernel"] == "neon-dotprod"   # -cpu max
    assert {"neon-dotprod", "neon-bytemask", "scalar"} <= {c["kernel"] for c in res["cases"]}
    assert {c["op"] for c in res["cases"]} == {"gemv", "gemm"}
    assert all(c["time_s"] > 0 and c["median_s"] >= c["time_s"] for c in res["cases"])
    for line in r.stdout.splitlines():   # every printed case row is one of the JSON's
        if line.startswith(("gemv ", "gemm ")):
            assert line.split()[1] in meta["kernel_isa"]
    with pytest.raises(ValueError, match="not comparable"):   # emulated timings never enter a comparison
        bench.load_result(str(tmp_path / "bench_kernels_aarch64.json"))

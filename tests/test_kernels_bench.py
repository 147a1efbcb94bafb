"""`bitbasis bench kernels --smoke`: output format only (speed lives in the benchmark, not in tests)."""
from __future__ import annotations

import json
import subprocess

from bitbasis import cli
from test_kernels import kbuild, klib  # noqa: F401  (session fixtures: the cmake build)


def test_bench_kernels_smoke(klib, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    assert cli.main(["bench", "kernels", "--smoke", "--json", str(out), "--lib", klib, "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "bitbasis-bench-kernels" and res["version"] == 2 and res["meta"]["complete"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    meta = res["meta"]
    for key in ("cpu_model", "cpu_features", "compiler", "git_commit", "threads", "default_kernel"):
        assert key in meta
    assert set(res["bandwidth_gbs"]) == {"1"} and res["bandwidth_gbs"]["1"] > 0
    kernels = {c["kernel"] for c in res["cases"]}
    assert "scalar" in kernels and meta["default_kernel"] in kernels
    assert {c["op"] for c in res["cases"]} == {"gemv", "gemm"}
    for c in res["cases"]:
        assert c["time_s"] > 0 and c["median_s"] >= c["time_s"]
        # smoke cycles through 1 MiB of copies: the copy count follows the tensor size
        assert c["copies"] == -(-(1 << 20) // int(c["weight_bytes"])) and c["copies"] > 1
        assert abs(c["gops"] - 2 * c["shape"][0] * c["shape"][1] * c["tokens"] / c["time_s"] / 1e9) < 1e-6 * c["gops"]
        assert abs(c["pct_bandwidth"] - 100 * c["weight_gbs"] / res["bandwidth_gbs"]["1"]) < 1e-6 * c["pct_bandwidth"]
    printed = capsys.readouterr().out
    assert "GB/s" in printed and "%bw" in printed and "gemv" in printed


def test_bench_kernels_unknown_kernel(klib, capsys):  # noqa: F811
    assert cli.main(["bench", "kernels", "--smoke", "--kernels", "nope", "--lib", klib]) == 1
    assert "unknown kernel" in capsys.readouterr().err


def test_bench_kernels_footprint(klib):  # noqa: F811
    """Cold timing cycles through enough copies to exceed the footprint; 0 times one cache-hot copy."""
    from bitbasis import bench
    be = bench._Native(klib)
    _, _, wbytes, copies = be.bench("scalar", 64, 256, 2, 128, 1, 1, 1, 0.0, 8 << 20)
    assert copies == -(-(8 << 20) // int(wbytes)) and copies * wbytes >= 8 << 20
    assert be.bench("scalar", 64, 256, 2, 128, 1, 1, 1, 0.0, 0)[3] == 1
    auto = be.bench("scalar", 64, 256, 2, 128, 1, 1, 1, 0.0, -1)[3]
    foot = be.auto_footprint()
    # glibc's getconf reads the same sysconf(_SC_LEVEL3_CACHE_SIZE) as the C side (Python's os.sysconf lacks it)
    got = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
    l3 = int(got) if got.isdigit() else 0
    assert foot == (min(4 * l3, 512 << 20) if l3 > 0 else 512 << 20) and foot >= 16 << 20
    assert auto == min(4096, -(-foot // int(wbytes)))
    import pytest
    with pytest.raises(bench.KernelError, match="bad shape"):
        be.bench("scalar", 64, 256, 9, 128, 1, 1, 1, 0.0, 0)

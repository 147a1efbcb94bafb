"""`bitbasis bench compare` and the benchmark plots, on small hand-made result files (no timing), and
the `--runner` line protocol through a fake driver program."""
from __future__ import annotations

import json
import os
import stat
import struct
import sys
import zlib

import pytest

from bitbasis import bench, cli

SHAPES = [(576, 576), (1536, 576)]


def _case(op, kernel, shape, n, g, th, t, tokens=None, bw=10.0):
    tokens = tokens or (1 if op == "gemv" else 8)
    wbytes = shape[0] * shape[1] * n / 8 * 1.25
    c = {"op": op, "kernel": kernel, "shape": list(shape), "model": "smollm2", "planes": n, "group": g, "threads": th,
         "tokens": tokens, "time_s": t, "median_s": t * 1.1, "weight_bytes": wbytes, "weight_gbs": wbytes / t / 1e9,
         "gops": 2.0 * shape[0] * shape[1] * tokens / t / 1e9}
    c["pct_bandwidth"] = 100 * c["weight_gbs"] / bw
    return c


def _kernels_result(cpu, features, kernels, speed=1.0, bw=10.0, old_format=False, planes=(1, 2)):
    """A `bench kernels` result: time = base / speed, the first kernel twice as fast as the others."""
    cases = []
    for shape in SHAPES:
        for i, k in enumerate(kernels):
            for n in planes:
                for op in ("gemv", "gemm"):
                    t = 1e-9 * shape[0] * shape[1] * n * (1 if i == 0 else 2) * (1 if op == "gemv" else 4) / speed
                    cases.append(_case(op, k, shape, n, 128, 1, t, bw=bw))
    res = {"meta": {"cpu_model": cpu, "cpu_features": features, "machine": "x", "threads": [1], "compiler": "gcc 12",
                    "git_commit": "abc1234", "date": "2026-11-23T08:00:00+00:00", "default_kernel": kernels[0]},
           "bandwidth_gbs": {"1": bw}, "cases": cases}
    if not old_format:   # files written before kind/version existed must still load
        res = {"kind": bench.KIND_KERNELS, "version": bench.VERSION, **res}
        res["meta"]["footprint_bytes"] = -1   # cold: weights cycled beyond the cache
    return res


def _e2e_result(cpu, decode, prompt):
    summary = [{"engine": "bitbasis", "model": "/x/bb1.gguf", "label": "bitbasis:bb1.gguf", "threads": 2, "runs": 3,
                "file_bytes": 1, "prompt_tok_s": prompt, "decode_tok_s": decode, "peak_rss_bytes": 2,
                "base_rss_bytes": 1}]
    return {"meta": {"cpu_model": cpu, "cpu_flags": "avx2", "threads": [2], "git_commit": "abc"}, "runs": [],
            "summary": summary}


def _write(tmp_path, name, obj) -> str:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def _png_size(path) -> tuple[int, int]:
    """Width, height of a PNG after checking its signature and the IHDR chunk's CRC."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, ctype = struct.unpack(">I4s", data[8:16])
    assert ctype == b"IHDR" and length == 13
    body = data[16:16 + length]
    assert struct.unpack(">I", data[16 + length:20 + length])[0] == zlib.crc32(ctype + body)
    assert data.rstrip(b"\0").endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", body[:8])


def test_compare_kernels_table(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _kernels_result("CPU-A", "avx2 avx512f", ["avx512-vnni", "avx2-bytemask"],
                                                   old_format=True))
    b = _write(tmp_path, "b.json", _kernels_result("CPU-B", "neon dotprod", ["neon-dotprod", "neon-bytemask"],
                                                   speed=2.0, bw=20.0, planes=(1,)))
    assert cli.main(["bench", "compare", a, b, "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    # one column per machine, described by CPU model, ISA and threads
    # A is an old (version 1) file: its timings were cache-hot, and the table says so
    assert "M1 (cache-hot timing: one tensor copy): CPU-A | ISA avx2 avx512f | threads 1" in out
    assert "M2: CPU-B | ISA neon dotprod | threads 1" in out
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [m["cpu_model"] for m in merged["machines"]] == ["CPU-A", "CPU-B"]
    rows = {r["case"]: r for r in merged["rows"]}
    # cases: 2 shapes x N=1,2 x gemv/gemm; machine B ran N=1 only
    assert len(rows) == 8
    r = rows["gemv smollm2 576x576 N1 G128 t1"]
    assert r["kernels"] == ["avx512-vnni", "neon-dotprod"]   # the fastest kernel of each machine
    assert r["values"][0] == pytest.approx(2 * 576 * 576 / (1e-9 * 576 * 576) / 1e9)
    assert r["values"][1] == pytest.approx(2 * r["values"][0])
    line = next(ln for ln in out.splitlines() if ln.startswith("gemv smollm2 576x576 N1 G128 t1"))
    assert line.split()[-1] == "2.00"                       # B is twice as fast as A
    r2 = rows["gemm8 smollm2 1536x576 N2 G128 t1"]
    assert r2["values"][1] is None                          # not measured on B: a dash, no ratio
    line = next(ln for ln in out.splitlines() if ln.startswith("gemm8 smollm2 1536x576 N2 G128 t1"))
    assert line.split()[-2:] == ["-", "-"]


def test_compare_metrics_and_per_kernel(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _kernels_result("CPU-A", "avx2", ["k1", "k2"], bw=10.0))
    b = _write(tmp_path, "b.json", _kernels_result("CPU-B", "avx2", ["k1", "k2"], speed=2.0, bw=40.0))
    text, merged = bench.compare([a, b], metric="pct", per_kernel=True)
    assert len(merged["rows"]) == 2 * 2 * 2 * 2   # shapes x kernels x N x ops
    r = next(r for r in merged["rows"] if r["case"] == "gemv smollm2 576x576 N1 G128 t1 k2")
    # % of each machine's own bandwidth: twice the speed on four times the bandwidth is half the share
    assert r["values"][1] == pytest.approx(r["values"][0] / 2)
    assert "% of read bandwidth" in text
    with pytest.raises(ValueError, match="metric 'decode'"):
        bench.compare([a, b], metric="decode")
    assert cli.main(["bench", "compare", a, b, "--metric", "us"]) == 0
    assert "time (us)" in capsys.readouterr().out


def test_compare_e2e(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _e2e_result("CPU-A", decode=10.0, prompt=100.0))
    b = _write(tmp_path, "b.json", _e2e_result("CPU-B", decode=25.0, prompt=50.0))
    png = tmp_path / "e2e.png"
    assert cli.main(["bench", "compare", a, b, "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("bitbasis:bb1.gguf t2"))
    assert line.split()[-3:] == ["10.0", "25.0", "2.50"]
    text, _ = bench.compare([a, b], metric="prompt")
    assert next(ln for ln in text.splitlines() if ln.startswith("bitbasis:bb1.gguf")).split()[-1] == "0.50"
    w, h = _png_size(png)
    assert w > 200 and h > 200


def test_compare_bad_input(tmp_path, capsys):
    good = _write(tmp_path, "good.json", _kernels_result("CPU-A", "avx2", ["k1"]))
    cases = {
        "mixed result kinds": _write(tmp_path, "e2e.json", _e2e_result("CPU-B", 1.0, 1.0)),
        f"version {bench.VERSION + 1}": _write(tmp_path, "vnext.json",
                                                {**_kernels_result("C", "f", ["k"]), "version": bench.VERSION + 1}),
        "unknown result kind": _write(tmp_path, "kind.json", {**_kernels_result("C", "f", ["k"]), "kind": "other"}),
        "not JSON": _write(tmp_path, "text.json", "cpu: hello"),
        "not a bitbasis bench result": _write(tmp_path, "list.json", {"meta": {}, "rows": []}),
        "no meta": _write(tmp_path, "arr.json", [1, 2]),
        "No such file": str(tmp_path / "missing.json"),
    }
    emu = _kernels_result("C", "neon", ["neon-dotprod"])
    emu["meta"].update(emulated="qemu", timing_note=bench.EMULATED_NOTE)
    cases["not comparable"] = _write(tmp_path, "emu.json", emu)
    for msg, path in cases.items():
        assert cli.main(["bench", "compare", good, path]) == 1, msg
        err = capsys.readouterr().err
        assert err.startswith("bitbasis: error:") and msg in err and len(err.strip().splitlines()) == 1, (msg, err)


def test_plot_kernels_values_and_png(tmp_path):
    res = _kernels_result("CPU-A", "avx2", ["fast", "slow"], bw=10.0)
    png = tmp_path / "k.png"
    drawn = bench.plot_kernels(res, str(png))
    assert set(drawn) == {("smollm2", "gemv", 1, 1), ("smollm2", "gemm", 8, 1)}
    # each point totals the set's shapes: GEMV as % of bandwidth, GEMM as GOP/s
    gemv = [c for c in res["cases"] if c["op"] == "gemv" and c["kernel"] == "slow" and c["planes"] == 2]
    want = 100 * sum(c["weight_bytes"] for c in gemv) / sum(c["time_s"] for c in gemv) / 1e9 / 10.0
    assert drawn[("smollm2", "gemv", 1, 1)]["slow"][2] == pytest.approx(want)
    gemm = [c for c in res["cases"] if c["op"] == "gemm" and c["kernel"] == "fast" and c["planes"] == 1]
    want = sum(2 * c["shape"][0] * c["shape"][1] * 8 for c in gemm) / sum(c["time_s"] for c in gemm) / 1e9
    assert drawn[("smollm2", "gemm", 8, 1)]["fast"][1] == pytest.approx(want)
    w, h = _png_size(png)
    assert w > 300 and h > 200


def test_plot_compare_png(tmp_path, capsys):
    a = _write(tmp_path, "a.json", _kernels_result("CPU-A", "avx2", ["k1", "k2"]))
    b = _write(tmp_path, "b.json", _kernels_result("CPU-B", "neon", ["n1"], speed=3.0))
    png = tmp_path / "c.png"
    assert cli.main(["bench", "compare", a, b, "--plot", str(png)]) == 0
    _png_size(png)
    drawn = bench.plot_kernels_compare([("A", json.loads(open(a).read())), ("B", json.loads(open(b).read()))],
                                       str(png))
    s = drawn[("smollm2", "gemv", 1, 1)]
    assert set(s) == {"A", "B"} and s["B"][1] == pytest.approx(3 * s["A"][1])


FAKE_RUNNER = r'''#!PYTHON
# speaks the bench_kernels protocol with fixed answers: 1 us per call, 1000 weight bytes
import sys
for line in sys.stdin:
    w = line.split()
    if not w:
        continue
    ans = {"kernels": "fake-k fake 1;other fake 0;", "default": "fake-k", "features": "fakeisa",
           "compiler": "fakecc", "machine": "fakearch", "bandwidth": "2.0"}.get(w[0])
    if w[0] == "bench":
        ans = "1e-06 2e-06 1000 3" if w[1] == "fake-k" else None
    print(("ok\t" + ans) if ans else ("err\tno " + w[0] + " " + (w[1] if len(w) > 1 else "")), flush=True)
'''


def test_runner_protocol(tmp_path, capsys):
    """--runner drives another program; a qemu-* command labels the run emulated."""
    for name in ("fake-native", "qemu-fake"):
        prog = tmp_path / name
        prog.write_text(FAKE_RUNNER.replace("PYTHON", sys.executable))
        prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
        out = tmp_path / f"{name}.json"
        assert cli.main(["bench", "kernels", "--smoke", "--runner", str(prog), "--json", str(out)]) == 0
        res = json.loads(out.read_text())
        printed = capsys.readouterr().out
        assert res["kind"] == bench.KIND_KERNELS and res["version"] == bench.VERSION
        assert res["meta"]["machine"] == "fakearch" and res["meta"]["cpu_features"] == "fakeisa"
        assert res["bandwidth_gbs"] == {"1": 2.0} and {c["kernel"] for c in res["cases"]} == {"fake-k"}
        c = res["cases"][0]
        assert c["copies"] == 3 and res["meta"]["footprint_bytes"] == 1 << 20
        assert c["time_s"] == 1e-6 and c["weight_gbs"] == pytest.approx(1.0) and c["pct_bandwidth"] == pytest.approx(50.0)
        if name.startswith("qemu"):
            assert res["meta"]["emulated"] == "qemu" and bench.EMULATED_NOTE in printed
            assert res["meta"]["cpu_model"].startswith("fakearch under qemu-fake")
            assert cli.main(["bench", "compare", str(out)]) == 1
            assert "not comparable" in capsys.readouterr().err
        else:
            assert res["meta"]["emulated"] is None and "emulated" not in printed
        assert cli.main(["bench", "kernels", "--smoke", "--runner", str(prog), "--kernels", "other"]) == 1
        assert "not supported" in capsys.readouterr().err
    assert cli.main(["bench", "kernels", "--smoke", "--runner", str(tmp_path / "missing")]) == 1
    assert "--runner" in capsys.readouterr().err
    assert cli.main(["bench", "kernels", "--smoke", "--runner", "cat"]) == 1
    assert "not a bench_kernels program" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "qemu-fake.json")


def test_runner_grid(tmp_path):
    """The grid: --groups-n1 applies to N = 1 only, --ops picks the ops, <k>-rows GEMV is <k>'s (timed once)."""
    prog = tmp_path / "fake"
    prog.write_text(FAKE_RUNNER.replace("PYTHON", sys.executable).replace('"fake-k fake 1;other fake 0;"',
                                                                          '"fake-k fake 1;fake-k-rows fake 1;"')
                    .replace('w[1] == "fake-k"', 'w[1].startswith("fake-k")'))
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    res = bench.run(runner=str(prog), planes=(1, 2), groups=(128,), groups_n1=(64, 128), shapes=("8x64",),
                    threads=(1, 2), tokens=3, min_time=0.0, log=lambda *_: None)
    got = sorted((c["kernel"], c["op"], c["planes"], c["group"], c["threads"]) for c in res["cases"])
    want = sorted([(k, op, n, g, th) for k in ("fake-k", "fake-k-rows") for op in ("gemv", "gemm")
                   for n, g in ((1, 64), (1, 128), (2, 128)) for th in (1, 2)
                   if not (k == "fake-k-rows" and op == "gemv")])
    assert got == want
    assert all(c["tokens"] == (1 if c["op"] == "gemv" else 3) for c in res["cases"])
    assert any("-rows" in n for n in res["meta"]["notes"])
    only = bench.run(runner=str(prog), planes=(1,), groups=(128,), shapes=("8x64",), threads=(1,), ops=("gemm",),
                     min_time=0.0, log=lambda *_: None)
    assert {c["op"] for c in only["cases"]} == {"gemm"}
    with pytest.raises(ValueError, match="expected gemv and/or gemm"):
        bench.run(runner=str(prog), ops=("gemx",), log=lambda *_: None)


def test_checkpoint_and_plot_command(tmp_path, capsys):
    """--json is rewritten after every case (an interrupted run keeps its cases); `bench plot` redraws it."""
    prog = tmp_path / "qemu-fake"
    prog.write_text(FAKE_RUNNER.replace("PYTHON", sys.executable))
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    seen = []
    res = bench.run(runner=str(prog), planes=(1, 2), groups=(128,), shapes=("8x64",), threads=(1,), tokens=2,
                    min_time=0.0, log=lambda *_: None,
                    checkpoint=lambda r: seen.append((len(r["cases"]), r["meta"]["complete"])))
    assert seen == [(i + 1, False) for i in range(4)] and res["meta"]["complete"] is True
    partial = json.loads(json.dumps(res))
    partial["meta"]["complete"] = False
    del partial["cases"][2:]
    p = _write(tmp_path, "partial.json", partial)
    png = tmp_path / "p.png"
    assert cli.main(["bench", "plot", p, str(png)]) == 0   # emulated results can be drawn, not compared
    _png_size(png)
    partial["meta"]["emulated"] = None
    p2 = _write(tmp_path, "partial2.json", partial)
    capsys.readouterr()
    assert cli.main(["bench", "compare", p2]) == 0 and "M1 (INCOMPLETE run)" in capsys.readouterr().out
    e2e = _write(tmp_path, "e2e.json", _e2e_result("C", 1.0, 1.0))
    assert cli.main(["bench", "plot", e2e, str(png)]) == 1
    assert "e2e result" in capsys.readouterr().err

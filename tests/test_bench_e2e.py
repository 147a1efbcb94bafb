"""`bitbasis bench e2e` smoke test: the output format on a tiny random model, never the speed."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("cffi")
from bitbasis import bench_e2e, cli  # noqa: E402
from bitbasis.engine import engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")

ROOT = Path(__file__).resolve().parents[1]


def _make_7b():
    spec = importlib.util.spec_from_file_location("make_7b", ROOT / "tools" / "make_7b.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_7b", mod)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, smol_dir):
    """A 2-layer model of make_7b's layout: binary-basis N=1 and plain F16 (which llama.cpp loads)."""
    mk = _make_7b()
    d = tmp_path_factory.mktemp("e2e")
    cfg = mk.config(layers=2, hidden=128, ffn=256, heads=4)
    bb, f16 = d / "bb1.gguf", d / "f16.gguf"
    mk.write_bitbasis(bb, cfg, smol_dir, n_planes=1, group=128, log=lambda *_: None)
    mk.write_f16(f16, cfg, smol_dir)
    return bb, f16


def test_make_7b_layout(tiny_files):
    # the engine validates every binary-basis header against its tensors on load (read_model would
    # too, but parsing SmolLM2's 49152-token vocabulary in Python takes half a minute)
    from bitbasis.engine import Model
    m = Model(tiny_files[0], threads=1, n_ctx=16)
    assert m.n_vocab == 49152 and m.meta_int("llama.block_count") == 2
    assert json.loads(m.meta_string("bitbasis.settings"))["bases"] == 1
    assert m.meta_string("bitbasis.method") == "residual"


def test_e2e_cli_output(tiny_files, tmp_path, capsys):
    bb, f16 = tiny_files
    out = tmp_path / "e2e.json"
    argv = ["bench", "e2e", str(bb), "-t", "1", "--prompt", "4", "--decode", "2", "--reps", "2", "--quiet",
            "--json", str(out)]
    with_llama = bench_e2e.llamacpp_available()
    if with_llama:
        argv[3:3] = ["--llamacpp", str(f16)]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["kind"] == "bitbasis-bench-e2e" and res["version"] == 1
    assert {"cpu_model", "cpu_flags", "git_commit", "threads", "omp_wait_policy"} <= set(res["meta"])
    engines = {"bitbasis"} | ({"llama.cpp"} if with_llama else set())
    assert {r["engine"] for r in res["runs"]} == engines
    assert len(res["runs"]) == 2 * len(engines)
    for r in res["summary"]:
        assert r["runs"] == 2 and r["threads"] == 1
        assert r["prompt_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_bytes"] > r["base_rss_bytes"] > 0
        assert r["prompt_min"] <= r["prompt_tok_s"] <= r["prompt_max"]
        assert r["label"] in text
    assert "prompt t/s" in text and "decode t/s" in text
    if with_llama:   # the llama.cpp row is the baseline: its ratio is exactly 1
        assert res["meta"]["baseline"] == f"llama.cpp:{f16.name}"
        row = next(ln for ln in text.splitlines() if ln.startswith(f"llama.cpp:{f16.name}"))
        assert row.split().count("1.00") == 2   # prompt and decode ratios


def test_e2e_bad_input(tmp_path):
    with pytest.raises(bench_e2e.BenchError, match="no such file"):
        bench_e2e.run([("bitbasis", str(tmp_path / "missing.gguf"))], threads=(1,), reps=1, log=lambda *_: None)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(bench_e2e.BenchError, match="bad.gguf"):
        bench_e2e.run([("bitbasis", str(bad))], threads=(1,), prompt=4, decode=1, reps=1, log=lambda *_: None)
    with pytest.raises(bench_e2e.BenchError, match="fit n_ctx"):
        bench_e2e.measure("bitbasis", str(bad), 1, prompt=600, decode=1, n_ctx=512)

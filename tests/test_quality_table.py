"""tools/quality_table.py resumes: finished rows are one JSON line each, a half-written last line is
ignored, and a row already measured at the same window count is not measured again. No model runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import quality_table as Q  # noqa: E402


def _row(method, file, windows=40, ppl=50.0):
    return {"method": method, "file": file, "bytes": 2 ** 20, "block_bpw": 3.4, "edge": {},
            "ppl_llamacpp": ppl, "se_llamacpp": 1.0, "windows_llamacpp": windows}


def test_rows_append_and_a_torn_line_is_ignored(tmp_path):
    out = str(tmp_path / "t.jsonl")
    Q.append_row(out, _row("bitbasis a", "a.gguf"))
    Q.append_row(out, _row("bitbasis b", "b.gguf"))
    with open(out, "a") as f:
        f.write('{"method": "bitbasis c", "fi')          # killed mid-write
    assert [r["method"] for r in Q.load_rows(out)] == ["bitbasis a", "bitbasis b"]


def test_resume_measures_only_what_is_missing(tmp_path, monkeypatch):
    out = str(tmp_path / "t.jsonl")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    Q.append_row(out, _row("bitbasis a", str(a)))
    Q.append_row(out, _row("bitbasis b", str(b), windows=8))    # another window count: measured again
    measured = []
    monkeypatch.setattr(Q, "bitbasis_row", lambda name, path, windows, threads:
                        measured.append(name) or _row(f"bitbasis {name}", path, windows))
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "-o", out, "--windows", "40", "--md",
                                      "--bitbasis", f"a={a}", f"b={b}"])
    assert Q.main() == 0
    assert measured == ["b"]
    rows = Q.load_rows(out)
    assert [(r["method"], r["windows_llamacpp"]) for r in rows] == [
        ("bitbasis a", 40), ("bitbasis b", 8), ("bitbasis b", 40)]
    assert Q.main() == 0 and measured == ["b"]               # a second run measures nothing


def test_bad_spec_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "-o", str(tmp_path / "t.jsonl"),
                                      "--bitbasis", f"x={tmp_path / 'missing.gguf'}"])
    with pytest.raises(SystemExit):
        Q.main()
    assert "no such file" in capsys.readouterr().err


def test_convert_makes_a_missing_file_and_the_row_keeps_its_cost(tmp_path, monkeypatch, tiny_dir):
    """--convert runs `bitbasis convert` for a missing file before its row (a real convert of the tiny
    model, dense f16 so it takes seconds) and the row carries the convert's command and measured times; a
    resumed run reports the same convert from FILE.convert.json without converting again."""
    out, f = str(tmp_path / "t.jsonl"), str(tmp_path / "m.gguf")
    measured = []
    monkeypatch.setattr(Q, "bitbasis_row", lambda name, path, windows, threads:
                        measured.append(name) or _row(f"bitbasis {name}", path, windows))
    argv = ["quality_table.py", "-o", out, "--bitbasis", f"m N=2={f}",
            "--convert", f"{f}={tiny_dir} --method f16 --no-check -q"]
    monkeypatch.setattr(sys, "argv", argv)
    assert Q.main() == 0
    assert Path(f).is_file() and "wrote" in Path(f + ".log").read_text()
    (row,) = Q.load_rows(out)
    c = row["convert"]
    assert c["command"] == f"bitbasis convert {tiny_dir} --method f16 --no-check -q -o {f}"
    assert c["wall_seconds"] > 0 and c["user_seconds"] > 0
    Path(out).unlink()                                   # measure again: the file is there, no convert
    mtime = Path(f).stat().st_mtime_ns
    assert Q.main() == 0 and measured == ["m N=2", "m N=2"]
    assert Path(f).stat().st_mtime_ns == mtime and Q.load_rows(out)[0]["convert"] == c


def test_convert_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_dir):
    f = str(tmp_path / "m.gguf")
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "-o", str(tmp_path / "t.jsonl"),
                                      "--convert", f"{f}=smollm2"])
    with pytest.raises(SystemExit):
        Q.main()
    assert "not a --bitbasis file" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["quality_table.py", "-o", str(tmp_path / "t.jsonl"), "--bitbasis", f"m={f}",
                                      "--convert", f"{f}={tiny_dir} --method nosuch"])
    with pytest.raises(SystemExit) as e:
        Q.main()
    assert "exited 1: bitbasis: error: unknown method 'nosuch'" in str(e.value) and not Path(f).exists()

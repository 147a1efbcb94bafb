"""One model, many contexts: each context its own KV cache and position; a batch of several
contexts in one forward pass gives what each gives alone; a full context is reported, not run."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cffi")
from bitbasis.engine import ContextFull, EngineError, Model, engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")

PROMPTS = [[1, 17, 300, 4000, 12], [9000, 42, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def tiny_model(tiny_dir, tmp_path_factory):
    from bitbasis.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp("ctx") / "tiny-res2.gguf"
    convert(tiny_dir, out, ConvertOptions(method="residual", bases=2, group=64), progress=False)
    return out


def _close(a, b):
    return np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max()))


def _alone(m: Model, prompt, steps):
    """Greedy continuation in one context, one token per eval: (logits per step, tokens)."""
    c = m.context()
    lg, toks, out = c.eval(prompt), [], []
    for _ in range(steps):
        out.append(lg)
        toks.append(int(np.argmax(lg)))
        lg = c.eval([toks[-1]])
    return out, toks


def test_batched_decode_equals_each_sequence_alone(tiny_model):
    m = Model(tiny_model, threads=2)
    ref = [_alone(m, p, 6) for p in PROMPTS]
    ctxs = [m.context() for _ in PROMPTS]
    lg = m.decode(list(zip(ctxs, PROMPTS)))              # prompts of three sequences in one batch
    toks = [[] for _ in PROMPTS]
    for step in range(6):
        for i in range(len(PROMPTS)):
            assert _close(lg[i], ref[i][0][step]), (step, i)
            toks[i].append(int(np.argmax(lg[i])))
        lg = m.decode([(c, [t[-1]]) for c, t in zip(ctxs, toks)])   # one token of each: GEMM over sequences
    assert toks == [r[1] for r in ref]
    assert [c.n_past for c in ctxs] == [len(p) + 6 for p in PROMPTS]


def test_mixed_prefill_and_decode_batch(tiny_model):
    """A sequence still reading its prompt shares the batch with ones already generating."""
    m = Model(tiny_model, threads=2)
    ref_a, _ = _alone(m, PROMPTS[0], 2)
    ref_b, _ = _alone(m, PROMPTS[2], 1)
    a, b = m.context(), m.context()
    la = a.eval(PROMPTS[0])
    lg = m.decode([(a, [int(np.argmax(la))]), (b, PROMPTS[2])])
    assert _close(lg[0], ref_a[1]) and _close(lg[1], ref_b[0])


def test_contexts_are_independent_and_rewind(tiny_model):
    m = Model(tiny_model, threads=1)
    a, b = m.context(64), m.context(32)
    assert (a.n_ctx, b.n_ctx) == (64, 32)
    full_a = a.logits(PROMPTS[0])
    b.eval(PROMPTS[1])
    again = a.logits(PROMPTS[0])          # b's tokens do not leak into a
    assert np.array_equal(full_a, again)
    a.rewind(2)
    assert a.tokens == PROMPTS[0][:2]
    assert _close(a.eval(PROMPTS[0][2:], all_logits=True), full_a[2:])
    # the model's own context (the old single-sequence calls) is one more, separate
    assert _close(m.logits(PROMPTS[0]), full_a)
    assert b.tokens == PROMPTS[1]


def test_full_context_is_reported_and_nothing_runs(tiny_model):
    m = Model(tiny_model, threads=1)
    a, b = m.context(8), m.context(8)
    a.eval([1, 2, 3, 4, 5, 6, 7])
    b.eval([1, 2])
    with pytest.raises(ContextFull, match="context full.*sequence 0"):
        m.decode([(a, [8, 9]), (b, [3])])
    assert (a.n_past, b.n_past) == (7, 2)
    assert m._lib.bb_context_n_past(a._c) == 7 and m._lib.bb_context_n_past(b._c) == 2
    m.decode([(a, [8]), (b, [3])])       # exactly fills a
    with pytest.raises(ContextFull):
        a.eval([1])
    with pytest.raises(ContextFull):     # the default context reports the same way (bb_eval's -2)
        Model(tiny_model, threads=1, n_ctx=4).eval([1, 2, 3, 4, 5])


def test_bad_batches_are_errors(tiny_model):
    m, other = Model(tiny_model, threads=1), Model(tiny_model, threads=1)
    a = m.context()
    with pytest.raises(EngineError, match="share a context"):
        m.decode([(a, [1]), (a, [2])])
    with pytest.raises(EngineError, match="this model"):
        m.decode([(other.context(), [1])])
    with pytest.raises(EngineError, match="outside the vocabulary"):
        m.decode([(a, [m.n_vocab])])
    with pytest.raises(EngineError, match="empty batch"):
        m.decode([])
    assert a.n_past == 0
    assert "tiny-res2.gguf" in repr(m) and "context" in repr(m) and "0/" in repr(a)

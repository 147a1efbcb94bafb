"""The C++ engine against transformers (f32 export) and against the PyTorch reference forward of
the same bitbasis file (binary-basis exports)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cffi")
from bitbasis.engine import EngineError, Model, engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")


@pytest.fixture(scope="module")
def hf_model(smol_dir):
    from bitbasis import hf
    return hf.load_torch_model(smol_dir)


@pytest.fixture(scope="module")
def f32_model(model_files):
    return Model(model_files("f32"), threads=2)


@pytest.fixture(scope="module")
def prompt_ids(smol_dir, eval_text):
    from bitbasis import hf
    tok = hf.load_tokenizer(smol_dir)
    return tok(eval_text[:4000], add_special_tokens=False)["input_ids"]


def _torch_logits(model, ids):
    import torch
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def test_f32_logits_match_transformers(f32_model, hf_model, prompt_ids):
    ids = prompt_ids[:64]
    lg = f32_model.logits(ids)
    ref = _torch_logits(hf_model, ids)
    assert lg.shape == ref.shape == (64, f32_model.n_vocab)
    diff = float(np.abs(lg - ref).max())
    assert diff <= 1e-3, f"max |engine - transformers| = {diff}"


def test_f32_greedy_matches_transformers(f32_model, hf_model, prompt_ids):
    """64 greedy tokens from the engine (batched prompt, then one token per step with the KV cache)
    are exactly the tokens transformers' greedy decoding picks: each one is the argmax of
    transformers' logits given the prompt and the tokens before it."""
    prompt = prompt_ids[:16]
    text = "".join(f32_model.generate(prompt, max_tokens=64, temperature=0, stop_at_eos=False))
    gen = list(f32_model.last_tokens)
    assert len(gen) == 64 and text
    ref = _torch_logits(hf_model, prompt + gen)
    hf_greedy = ref[len(prompt) - 1:-1].argmax(-1).tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(gen, hf_greedy)) if a != b), None)
    assert gen == hf_greedy, f"first mismatch at generated token {first_diff}"


def test_incremental_equals_batched(f32_model, prompt_ids):
    """Prefill + single-token steps (gemv, growing KV cache) give the batched (gemm) logits."""
    ids = prompt_ids[:24]
    full = f32_model.logits(ids)
    f32_model.reset()
    part = [f32_model.eval(ids[:10], all_logits=True)]
    part += [f32_model.eval([t], all_logits=True) for t in ids[10:]]
    assert np.abs(np.concatenate(part) - full).max() < 1e-3
    f32_model.rewind(5)
    again = f32_model.eval(ids[5:9], all_logits=True)
    assert np.abs(again - full[5:9]).max() < 1e-3


ACT_BLOCK = 32   # kernels.h QK


def _int8_act_hooks(model, block: int = ACT_BLOCK) -> None:
    """Make the reference quantize the input of every block linear, and of the output head (a Q8_0
    tensor in binary-basis files, which the engine multiplies by int8 activations as llama.cpp does), as
    the kernels do (kernels.h QActs: per block of QK = 32 columns, d = max|x|/127, q = round(x/d); the
    zero padding to a multiple of G changes nothing)."""
    import torch

    def hook(mod, args):
        x = args[0]
        c = x.shape[-1]
        nb = -(-c // block)
        xp = torch.nn.functional.pad(x, (0, nb * block - c)).reshape(*x.shape[:-1], nb, block)
        amax = xp.abs().amax(-1, keepdim=True)
        q = torch.round(xp * torch.where(amax > 0, 127 / amax, 0)).clamp(-127, 127)
        return ((q * amax / 127).reshape(*x.shape[:-1], nb * block)[..., :c],)

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".layers." in f".{name}" or name == "lm_head"):
            mod.register_forward_pre_hook(hook)


def _engine_and_reference(tiny_dir, path, opts):
    """Convert the tiny model with opts; the engine's batched logits over 40 ids and the PyTorch reference's
    over the same file with the kernels' int8 activation hooks (model and engine returned for further checks)."""
    from bitbasis.convert import convert
    from bitbasis.reference import torch_model_from_gguf
    convert(tiny_dir, path, opts, progress=False)
    m = Model(path, threads=2)
    ids = list(range(300, 340))
    lg = m.logits(ids)
    ref_model, _ = torch_model_from_gguf(path)
    _int8_act_hooks(ref_model)
    return m, ids, lg, ref_model, _torch_logits(ref_model, ids)


@pytest.mark.parametrize("bases,group", [(1, 64), (2, 128), (3, 192)])
def test_binary_basis_matches_reference_exactly(tiny_dir, tmp_path, bases, group, monkeypatch):
    """On the tiny 2-layer model, the engine equals the PyTorch reference run with the kernels'
    int8 activation quantization (so only float summation order differs): this pin the
    binary-basis path (acts, gemv, gemm, padding: ffn_down has 320 columns) tightly. With the f32
    KV cache, as the reference holds it (the f16 cache's rounding: test_kv_cache_f16)."""
    import torch
    monkeypatch.setenv("BITBASIS_KV", "f32")
    from bitbasis.convert import ConvertOptions
    m, ids, lg, ref_model, ref = _engine_and_reference(
        tiny_dir, tmp_path / "tiny.gguf", ConvertOptions(method="residual", bases=bases, group=group))
    m.reset()
    steps = np.stack([m.eval([t]) for t in ids])          # the gemv path
    scale = float(np.abs(ref).max())
    # an activation sitting on a rounding boundary may round the other way after a different
    # float summation order: rare, so the mean is tight and the max is looser
    for ours in (lg, steps):
        d = np.abs(ours - ref)
        assert d.mean() <= 1e-4 * scale and d.max() <= 1e-2 * scale, (d.mean(), d.max(), scale)


@pytest.mark.parametrize("method,extra", [("residual", {}), ("pbllm", {"salient": 0.1})])
def test_precise_acts_reach_the_float_reference(tiny_dir, tmp_path, monkeypatch, method, extra):
    """BITBASIS_PRECISE_ACTS=1 (model.h): a second int8 pass over each activation's rounding residual.
    Against the float reference (no emulated rounding) the engine's error must shrink ~100x, in the
    GEMM (prompt) and GEMV (decode) paths, with and without the sparse 8-bit values of PB-LLM."""
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.reference import torch_model_from_gguf
    path = tmp_path / f"tiny-{method}.gguf"
    convert(tiny_dir, path, ConvertOptions(method=method, bases=3 if method == "residual" else 1, group=192,
                                           extra=extra or None, calib={"samples": 4, "seqlen": 64}),
            progress=False)
    ids = list(range(300, 340))
    ref = _torch_logits(torch_model_from_gguf(path)[0], ids)
    scale = float(np.abs(ref).max())
    err = {}
    for precise in ("0", "1"):
        monkeypatch.setenv("BITBASIS_PRECISE_ACTS", precise)
        m = Model(path, threads=2)
        assert m.precise_acts == (precise == "1")
        lg = m.logits(ids)
        m.reset()
        steps = np.stack([m.eval([t]) for t in ids])
        err[precise] = [float(np.abs(x - ref).mean()) for x in (lg, steps)]
    print(method, "mean |engine - float reference| / max|logit|, int8 vs precise:",
          [e / scale for e in err["0"]], [e / scale for e in err["1"]])
    for e0, e1 in zip(err["0"], err["1"]):
        assert e1 <= 0.05 * e0 and e1 <= 1e-5 * scale, (e0, e1, scale)
    # a list of GGUF name parts: those linears alone; naming every one (and the tied head) is "1"
    every = "attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down,token_embd,output"
    for names in (every, "ffn_down"):
        monkeypatch.setenv("BITBASIS_PRECISE_ACTS", names)
        m = Model(path, threads=2)
        assert not m.precise_acts
        lg = m.logits(ids)
        m.reset()
        steps = np.stack([m.eval([t]) for t in ids])
        err[names] = [float(np.abs(x - ref).mean()) for x in (lg, steps)]
    assert err[every] == err["1"]
    for e0, e1, ed in zip(err["0"], err["1"], err["ffn_down"]):
        assert e1 < ed < e0, (e0, e1, ed)


def _engine_and_reference_ppl(path, eval_text, ctx: int, windows: int) -> tuple[float, float, str]:
    import torch
    from bitbasis.perplexity import perplexity, torch_logits_fn
    from bitbasis.reference import torch_model_from_gguf
    m = Model(path, threads=2)
    tokens = np.asarray(m.tokenize(eval_text[:40000]), np.int64)
    kw = dict(protocol="llamacpp", ctx=ctx, max_windows=windows, progress=False)
    ours = perplexity(m.logits, tokens, **kw)["ppl"]
    ref_model, _ = torch_model_from_gguf(path)
    torch.set_num_threads(2)
    ref = perplexity(torch_logits_fn(ref_model), tokens, **kw)["ppl"]
    return ours, ref, m.kernel


@pytest.mark.slow
def test_binary_basis_perplexity_within_half_percent(model_files, eval_text):
    """Issue 3: engine perplexity within 0.5% of the float PyTorch reference over the same file, on
    the healthy binary-basis file (QBB N = 4, the demo setting; 6 windows of 512). The engine
    quantizes activations to int8 per block of 32 (kernels.h), the reference does not; that rounding
    is the whole difference (a GPTQ 4-bit file is +0.67%, which the reference with the same rounding
    emulated reproduces, +0.63%). 6 windows, not 3: which int8 level an activation rounds to flips
    with the last bit of the float sums before it, so the same kernel math in another float order
    (results.md §48: 2α and μ as f16 in the lookup layout) moved this figure from +0.42% to +0.82%
    on 3 windows, +0.04% to +0.30% on 6, +0.26% to +0.31% on 12."""
    path = model_files("qbb", 4, 128, rounds=0, iters=0)
    ours, ref, kernel = _engine_and_reference_ppl(path, eval_text, 512, 6)
    print(f"qbb N=4: engine ppl {ours:.4f}, reference {ref:.4f}, ratio {ours / ref - 1:+.4%}")
    assert abs(ours / ref - 1) <= 0.005, f"engine ppl {ours:.4f} vs reference {ref:.4f} (kernel {kernel})"


@pytest.mark.slow
@pytest.mark.parametrize("bases", [1, 2, 3])
def test_binary_basis_perplexity_vs_reference(model_files, eval_text, bases):
    """The residual N = 1, 2, 3 files against the float reference: a coarse guard only. These
    data-free files are collapsed (perplexity ~1e5-1e6, above the vocabulary size), so the network
    is chaotic and int8 activation rounding alone moves the perplexity by percents either way
    (measured on 5 windows of 512, float reference vs engine: N = 1 +0.8% with one scale per group,
    -3.3% with one per 32 — finer rounding, yet further off). The bound is 0.2 nats of mean NLL."""
    path = model_files("residual", bases)
    ours, ref, kernel = _engine_and_reference_ppl(path, eval_text, 128, 3)
    print(f"residual N={bases}: engine ppl {ours:.4f}, reference {ref:.4f}, ratio {ours / ref - 1:+.4%}")
    assert abs(np.log(ours / ref)) <= 0.2, f"engine ppl {ours:.4f} vs reference {ref:.4f} (kernel {kernel})"


def test_streaming_keeps_multibyte_characters(f32_model, monkeypatch):
    """Tokens that split a UTF-8 character come out as whole characters."""
    text = "naïve café — 世界 🎉 ok"
    ids = f32_model.tokenize(text)
    it = iter(ids)
    monkeypatch.setattr(f32_model, "sample", lambda *a, **k: next(it))
    pieces = list(f32_model.generate("Hi", max_tokens=len(ids), temperature=0, stop_at_eos=False))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_context_limit_and_errors(model_files):
    m = Model(model_files("residual", 2), threads=1, n_ctx=8)
    assert m.n_ctx == 8
    m.eval([1, 2, 3, 4, 5, 6])
    with pytest.raises(EngineError, match="context full"):
        m.eval([1, 2, 3])
    with pytest.raises(EngineError, match="cache position"):
        m.rewind(7)
    m.rewind(2)
    assert m.eval([1, 2]).shape == (m.n_vocab,)
    with pytest.raises(EngineError, match="no such file"):
        Model("/nonexistent/x.gguf")


def test_kv_cache_f16(model_files, prompt_ids, monkeypatch):
    """The KV cache: f32 for a dense file (the float reference), f16 for a binary-basis file where the
    kernel set converts f16 in hardware (model.h kv_f16), BITBASIS_KV=f16|f32 overriding it. Forced on
    the f32 file, the f16 cache moves the logits by its rounding only (on a sane model: the residual
    files collapse, and their chaotic logits amplify any rounding)."""
    kv_f16 = lambda m: bool(m._lib.bb_kv_f16(m._m))   # noqa: E731
    path, bb_path = model_files("f32"), model_files("residual", 2)
    ref = Model(path, threads=1)
    assert not kv_f16(ref)
    a = ref.logits(prompt_ids[:64])
    monkeypatch.setenv("BITBASIS_KV", "f16")
    try:
        m = Model(path, threads=1)
    except EngineError as e:   # a kernel set without hardware f16 (the scalar one): an f32 cache everywhere
        assert "has no f16 attention" in str(e)
        monkeypatch.delenv("BITBASIS_KV")
        assert not kv_f16(Model(bb_path, threads=1))
        return
    assert kv_f16(m)
    d = np.abs(m.logits(prompt_ids[:64]) - a).max()
    assert 0 < d <= 2e-3 * float(np.abs(a).max()), d
    monkeypatch.delenv("BITBASIS_KV")
    assert kv_f16(Model(bb_path, threads=1))
    monkeypatch.setenv("BITBASIS_KV", "f32")
    assert not kv_f16(Model(bb_path, threads=1))
    monkeypatch.setenv("BITBASIS_KV", "f8")
    with pytest.raises(EngineError, match="BITBASIS_KV must be f16 or f32"):
        Model(bb_path, threads=1)


def test_threads_agree(model_files, prompt_ids):
    path = model_files("residual", 1)
    a = Model(path, threads=1).logits(prompt_ids[:8])
    b = Model(path, threads=3).logits(prompt_ids[:8])
    assert np.abs(a - b).max() < 1e-4 * max(1.0, float(np.abs(a).max()))


def test_online_rotation_matches_reference(tiny_dir, tmp_path, monkeypatch):
    """A quantized tiny file with the online rotation before ffn_down (H folded into W_down, then binarized; H·x
    at run time): the engine equals the PyTorch reference over the same file, int8 activations quantized after
    the rotation as the engine does, to the tolerance of test_binary_basis_matches_reference_exactly; and the
    rotation is really applied (without it in the reference the logits move far more)."""
    monkeypatch.setenv("BITBASIS_KV", "f32")
    from bitbasis.convert import ConvertOptions
    m, ids, lg, ref_model, ref = _engine_and_reference(
        tiny_dir, tmp_path / "tiny-online.gguf",
        ConvertOptions(method="residual", bases=2, group=128, online=("ffn_down",)))
    d, scale = np.abs(lg - ref), float(np.abs(ref).max())
    assert d.mean() <= 1e-4 * scale and d.max() <= 1e-2 * scale, (d.mean(), d.max(), scale)
    for layer in ref_model.model.layers:        # the online hook first, the int8 one second: drop the first
        hooks = layer.mlp.down_proj._forward_pre_hooks
        hooks.pop(next(iter(hooks)))
    assert np.abs(_torch_logits(ref_model, ids) - ref).mean() > 100 * d.mean()


@pytest.mark.parametrize("old,new,match", [
    (b"ffn_down.block", b"ffn_gate.block", "unknown metadata key bitbasis.online_rotation.ffn_gate.block"),
    (b"ffn_down.seed", b"ffn_down.sxxd", "unknown metadata key bitbasis.online_rotation.ffn_down.sxxd"),
    ("block", 3, "block = 3 is not a power of two"),
    ("block", 1024, "block = 1024 is not a power of two"),
])
def test_online_rotation_bad_metadata_is_named(tiny_dir, tmp_path, old, new, match):
    """A file whose online-rotation keys are unknown or invalid is refused with one line naming the key, by the
    engine and by the Python reader (the reference)."""
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.gguf_io import GGUFFileError
    from bitbasis.reference import torch_model_from_gguf
    good = tmp_path / "good.gguf"
    convert(tiny_dir, good, ConvertOptions(method="f16", online=("ffn_down",)), progress=False)
    raw = bytearray(good.read_bytes())
    key = b"bitbasis.online_rotation.ffn_down.block"
    if isinstance(old, bytes):                               # rename a key (same length: offsets stay)
        at = raw.index(b"bitbasis.online_rotation." + old)
        raw[at + 25:at + 25 + len(new)] = new
    else:                                                    # the key, its u32 type tag, then the value
        at = raw.index(key) + len(key)
        assert int.from_bytes(raw[at:at + 4], "little") == 4 and int.from_bytes(raw[at + 4:at + 8], "little") == 64
        raw[at + 4:at + 8] = new.to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match=match.replace(".", r"\.")):
        Model(bad, threads=1)
    with pytest.raises(GGUFFileError, match="online rotation|unknown metadata key"):
        torch_model_from_gguf(bad)

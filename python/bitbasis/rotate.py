"""Rotations folded into the weights (QuaRot, arXiv 2404.00456; SpinQuant, arXiv 2405.16406).

An orthogonal Q on the residual stream changes no f32 output: with the RMSNorm scales γ folded into the
linears that read the normalised stream (W ← W·diag(γ), γ ← 1), RMSNorm(x·Q) = RMSNorm(x)·Q because
‖x·Q‖ = ‖x‖ (QuaRot sec. 4, "computational invariance"). Then, in row-vector form y = x·Wᵀ:

    token embedding   E ← E·Q                       (the stream starts rotated)
    readers           W ← W·Q       q, k, v, gate, up, head
    writers           W ← Qᵀ·W      o, down          (they add into the rotated stream)

and, per attention head, V's rows and O's columns by one more orthogonal R of the head width
(v_h ← v_h·R, o_proj's input ← ·R: attention mixes whole v vectors, so R passes through it).
A random orthogonal Q spreads every outlier channel over all of them, so the weights to binarize
have flatter rows (QuaRot fig. 1). Q is a randomized Hadamard matrix for the power-of-two factor of the
width times a random orthogonal matrix for the odd rest (576 = 64·9, 1536 = 512·3, 640 = 128·5),
as QuaRot's hadamard_utils does with its stored odd Hadamard matrices.

A tied embedding stops being tied: the head holds (E·diag(γ_final))·Q, the embedding E·Q, so the
rotated checkpoint stores lm_head on its own (the plan can quantize it: convert --head-bases).
Nothing changes at run time: the rotated checkpoint is an ordinary Llama checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import arch as A
from . import hf

ROTATED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "tokenizer.model")


class RotationError(ValueError):
    pass


def hadamard(n: int) -> np.ndarray:
    """Sylvester's Hadamard matrix of order n (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise RotationError(f"hadamard: {n} is not a power of two")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal matrix: QR of a Gaussian with the signs of R's diagonal fixed (Mezzadri 2007)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def rotation(n: int, seed: int) -> np.ndarray:
    """Orthogonal n×n (float64): (H_p·D / √p) ⊗ R_m with n = p·m, p the largest power of two dividing n,
    D random ±1 (the randomized Hadamard) and R_m Haar-random orthogonal (identity when m = 1)."""
    if n < 1:
        raise RotationError(f"rotation of width {n}")
    p = n & -n
    m = n // p
    rng = np.random.default_rng(seed)
    hp = hadamard(p) * rng.choice([-1.0, 1.0], size=p)[None, :] / np.sqrt(p)
    rm = random_orthogonal(m, rng) if m > 1 else np.ones((1, 1))
    return np.kron(hp, rm)


ROTATABLE = ("llama", "qwen2", "qwen3")


def rotate_state_dict(sd: dict[str, np.ndarray], cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """The rotated weights ({HF name: float32}); the input is not modified. Norm weights come out as ones
    and lm_head is always present (untied)."""
    arch = A.for_config(cfg)
    # Only the plain pre-norm blocks fold a rotation exactly. Gemma 3 adds γ ⊙ RMSNorm(o) to the stream
    # (post-norms): rotated, that must be (γ ⊙ RMSNorm(o))·Q, and Qᵀ·diag(γ)·Q is dense, so Q can go
    # neither into o/down (it would come before γ) nor into γ: it needs an online rotation after each
    # post-norm at run time (README, "Architectures"). Phi-3's fused linears have other names.
    if arch.name not in ROTATABLE:
        raise RotationError(f"rotate: architecture {arch.name} is not supported (supported: {', '.join(ROTATABLE)})")
    d = int(cfg["hidden_size"])
    n_layers = int(cfg["num_hidden_layers"])
    hd = A.head_dim(cfg)
    Q = rotation(d, seed)
    R = rotation(hd, seed + 1)
    f64 = {k: v.astype(np.float64) for k, v in sd.items()}
    out: dict[str, np.ndarray] = {}

    def need(k):
        if k not in f64:
            raise RotationError(f"rotate: the checkpoint has no {k}")
        return f64[k]

    emb = need("model.embed_tokens.weight")
    head = f64.get("lm_head.weight", emb)                       # tied: the head starts as the embedding
    out["model.embed_tokens.weight"] = emb @ Q
    out["lm_head.weight"] = (head * need("model.norm.weight")[None, :]) @ Q
    out["model.norm.weight"] = np.ones(d)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        g1, g2 = need(p + "input_layernorm.weight"), need(p + "post_attention_layernorm.weight")
        for name, g in (("self_attn.q_proj", g1), ("self_attn.k_proj", g1), ("self_attn.v_proj", g1),
                        ("mlp.gate_proj", g2), ("mlp.up_proj", g2)):
            out[p + name + ".weight"] = (need(p + name + ".weight") * g[None, :]) @ Q
        wv = out[p + "self_attn.v_proj.weight"]
        out[p + "self_attn.v_proj.weight"] = (R.T @ wv.reshape(-1, hd, d)).reshape(wv.shape)
        if p + "self_attn.v_proj.bias" in f64:
            out[p + "self_attn.v_proj.bias"] = (f64[p + "self_attn.v_proj.bias"].reshape(-1, hd) @ R).reshape(-1)
        wo = need(p + "self_attn.o_proj.weight")
        wo = (wo.reshape(d, -1, hd) @ R).reshape(wo.shape)
        out[p + "self_attn.o_proj.weight"] = Q.T @ wo
        out[p + "mlp.down_proj.weight"] = Q.T @ need(p + "mlp.down_proj.weight")
        for b in ("self_attn.o_proj.bias", "mlp.down_proj.bias"):
            if p + b in f64:
                out[p + b] = f64[p + b] @ Q
        out[p + "input_layernorm.weight"] = np.ones(d)
        out[p + "post_attention_layernorm.weight"] = np.ones(d)
    for k, v in f64.items():                                     # biases of readers, rotary buffers, ...
        out.setdefault(k, v)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def rotated_checkpoint(model_dir: Path, seed: int = 0, root: Path | None = None, progress=print) -> Path:
    """An HF checkpoint directory holding the rotated model, made once and cached (keyed by the source
    weights and the seed). Every later step (calibration, planning, writing) reads it as any checkpoint."""
    from safetensors.numpy import save_file
    model_dir = Path(model_dir)
    cfg = hf.load_config(model_dir)
    h = hashlib.sha256()
    src = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".json"))
    h.update(json.dumps([str(model_dir.resolve()), seed, [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
                                                          for p in src]]).encode())
    out = (root or hf.cache_dir() / "rotated") / f"{model_dir.name}-rot{seed}-{h.hexdigest()[:12]}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if progress:
        progress(f"rotating {model_dir.name} (seed {seed}) into {out}")
    sd = rotate_state_dict(hf.load_state_dict(model_dir), cfg, seed)
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(cfg, tie_word_embeddings=False, bitbasis_rotation={"seed": seed, "source": model_dir.name})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ROTATED_FILES:
        if (model_dir / f).is_file():
            (tmp / f).write_bytes((model_dir / f).read_bytes())
    if out.exists():                                             # a half-made one from an interrupted run
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)                                              # the directory appears complete or not at all
    return out

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

The online rotation (QuaRot's R4, sec. 4 "1½ Hadamards per layer") acts on ffn_down's input, the SwiGLU output
silu(gate)·up, which no weight can absorb (the nonlinearity sits between): W_down ← W_down·Hᵀ at convert time
and x ← H·x at run time, so W_down·x is unchanged in exact arithmetic while both the int8 activations the engine
quantizes per block of 32 and the columns GPTQ quantizes lose their outliers. H = blockdiag(H_b/√b)·diag(s):
Sylvester blocks of b, the largest power of two dividing the width up to 512 (1536 = 3·512, 576 = 9·64,
640 = 5·128), so the engine runs it as a fast Walsh–Hadamard transform in O(n log b); s are random signs
from a seed by splitmix64, which the engine reproduces bit for bit (ops.cpp). It acts on the FFN's inner
width, so it is independent of the residual rotation above (either, both or none).
"""
from __future__ import annotations

import numpy as np

from . import arch as A


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


ONLINE_SITES = ("ffn_down",)       # where an online rotation may sit (GGUF bitbasis.online_rotation.<site>.*)
ONLINE_MAX_BLOCK = 512             # covers SmolLM2's 1536 = 3·512; bounds the transform at log2(b) = 9 passes


def online_block(n: int) -> int:
    """The Hadamard block for width n: the largest power of two dividing n, at most ONLINE_MAX_BLOCK."""
    if n < 1:
        raise RotationError(f"online rotation of width {n}")
    return min(n & -n, ONLINE_MAX_BLOCK)


def online_signs(n: int, seed: int) -> np.ndarray:
    """s_i = ±1 (float64), i < n: the top bit of splitmix64's i-th output from `seed` (Steele et al. 2014),
    a generator the engine reproduces exactly (ops::online_signs)."""
    if not 0 <= seed < 2 ** 32:
        raise RotationError(f"online rotation seed {seed} is not in [0, 2^32)")
    z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)   # wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.where(z >> np.uint64(63), -1.0, 1.0)


def online_transform(x, block: int, seed: int):
    """H·x along the last axis of x (numpy array or torch tensor), H = blockdiag(H_b/√b)·diag(s) (module
    docstring). Applied to the rows of W it gives W·Hᵀ (row i of W·Hᵀ is H·w_i): the fold of the inverse."""
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise RotationError(f"online rotation block {block} is not a power of two dividing the width {n}")
    s, hb = online_signs(n, seed), hadamard(block) / np.sqrt(block)      # H_b is symmetric
    if not isinstance(x, np.ndarray):                                    # a torch tensor: its dtype and device
        import torch
        s, hb = (torch.as_tensor(a, dtype=x.dtype, device=x.device) for a in (s, hb))
    y = (x * s).reshape(*x.shape[:-1], n // block, block) @ hb
    return y.reshape(x.shape)


def online_spec(spec: dict, n_ff: int, where: str = "") -> dict:
    """{site: {"block": b, "seed": s}} checked against the FFN width (one line naming the problem)."""
    if not isinstance(spec, dict):
        raise RotationError(f"{where}online rotation: expected {{site: {{block, seed}}}}, got {spec!r}")
    out = {}
    for site, v in spec.items():
        if site not in ONLINE_SITES:
            raise RotationError(f"{where}online rotation at {site!r} is not supported (supported: "
                                f"{', '.join(ONLINE_SITES)})")
        if not isinstance(v, dict) or set(v) != {"block", "seed"} or not all(
                isinstance(v[k], (int, np.integer)) and not isinstance(v[k], bool) for k in v):
            raise RotationError(f"{where}online rotation {site}: expected integers block and seed, got {v!r}")
        b, sd = int(v["block"]), int(v["seed"])
        if b < 1 or b & (b - 1) or n_ff % b or b > ONLINE_MAX_BLOCK:
            raise RotationError(f"{where}online rotation {site}: block {b} is not a power of two <= "
                                f"{ONLINE_MAX_BLOCK} dividing the FFN width {n_ff}")
        if not 0 <= sd < 2 ** 32:
            raise RotationError(f"{where}online rotation {site}: seed {sd} is not in [0, 2^32)")
        out[site] = {"block": b, "seed": sd}
    return out


ONLINE_KV = "bitbasis.online_rotation."


def online_kv(spec: dict) -> list[tuple[str, int]]:
    """The GGUF keys of a checked spec: bitbasis.online_rotation.<site>.block / .seed (uint32)."""
    return [(f"{ONLINE_KV}{site}.{k}", int(v[k])) for site, v in sorted(spec.items()) for k in ("block", "seed")]


def online_spec_from_kv(kv: dict, n_ff: int, where: str = "") -> dict:
    """The spec a file's metadata holds ({} when none): the inverse of online_kv, unknown keys refused."""
    spec: dict = {}
    for key, v in kv.items():
        if not key.startswith(ONLINE_KV):
            continue
        site, _, field = key[len(ONLINE_KV):].rpartition(".")
        if field not in ("block", "seed") or not site:
            raise RotationError(f"{where}unknown metadata key {key} (expected {ONLINE_KV}<site>.block / .seed)")
        spec.setdefault(site, {})[field] = v
    return online_spec(spec, n_ff, where)


def install_online(model, spec: dict) -> None:
    """Forward pre-hooks that rotate each mlp.down_proj's input (x ← H·x) of a transformers model whose
    down_proj weights hold W·Hᵀ: what the engine computes, for calibration, planning and the reference."""
    if not spec:
        return
    site = spec["ffn_down"]
    b, seed = site["block"], site["seed"]
    for layer in model.model.layers:
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, args: (online_transform(args[0], b, seed), *args[1:]))


def fold_online(sd: dict[str, np.ndarray], cfg: dict, spec: dict) -> dict[str, np.ndarray]:
    """The weights with W_down ← W_down·Hᵀ in every layer (the input is not modified)."""
    out = dict(sd)
    site = spec["ffn_down"]
    for i in range(int(cfg["num_hidden_layers"])):
        k = f"model.layers.{i}.mlp.down_proj.weight"
        if k not in sd:
            raise RotationError(f"online rotation: the checkpoint has no {k}")
        w = online_transform(sd[k].astype(np.float64), site["block"], site["seed"])
        out[k] = np.ascontiguousarray(w, np.float32)
    return out

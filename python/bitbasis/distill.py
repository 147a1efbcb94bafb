"""QBB step 3: data-free distillation of the scales (QBB, NeurIPS 2024, sec. 3.2).

The full-precision model writes its own training text: each sequence starts from a random token,
continues greedily for a few tokens, then by sampling. The student is the same model whose block
linears are W = Σ α_i B_i + μ (`BasisLinear`); only α and μ train, the signs stay frozen. The loss is
KL(teacher ‖ student) over the next-token distributions plus the MSE of the logits. Teacher blocks are
swapped for student blocks progressively (first block first) over the first half of the steps, then
every block is the student's. Small models diverge easily (an outside reproduction on TinyLlama did),
so the scales train as relative corrections α = α₀·(1 + a), μ = μ₀ + |α₀|·m with a small learning
rate and clipped gradients. A checkpoint (.pt) is written every few steps; a rerun with the same
settings resumes from it.

Beyond the paper, `train="signs"` trains the signs too (quantization-aware distillation): each linear
keeps a latent real weight V (starting at the quantized weight, so step 0 is the file), the forward
pass puts every latent on its nearest level Σ ±α_i + μ of the current scales (quant.qbb.nearest_signs,
LQ-Net's quantizer) and the backward pass is straight-through to V (BinaryConnect); latents are clipped
one unit past the extreme levels so that none drifts where no gradient brings it back, and the
learning rates follow a cosine decay so that late steps stop flipping signs back and forth. Same
teacher data, loss and block swap; the file format and its bits are the same.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from .format import BinaryBasis, full_scales
from .quant.base import groups_view
from .quant.qbb import level_codes, nearest_signs, reconstruct

GREEDY_TOKENS = 4        # greedy continuation after the random first token, then sampling
CKPT_EVERY = 10          # steps between checkpoints
CKPT_EVERY_SIGNS = 250   # ... when the latent weights train too (a checkpoint holds them and their Adam state)
LR_FLOOR = 0.05          # train="signs": cosine decay of the learning rates down to this fraction
CLIP_LATENT_EVERY = 8    # train="signs": steps between latent clips (each clip is a dozen kernels per linear)
MSE_WEIGHT = 1.0         # loss = KL + MSE_WEIGHT · MSE(logits)
CLIP = 1.0               # gradient-norm clip


class DistillError(ValueError):
    pass


class BasisLinear(torch.nn.Module):
    """y = x Wᵀ with W = Σ_i α_i ⊙ B_i + μ per row and group. train_signs=False: signs frozen, scales
    trainable (the paper). train_signs=True: B = nearest-level signs of a trainable latent weight,
    straight-through (module docstring)."""

    def __init__(self, bb: BinaryBasis, train_signs: bool = False):
        super().__init__()
        if bb.n_classes != 1 or bb.sparse_mask is not None or bb.colscale is not None:
            raise DistillError("distillation handles plain planes + scales (+ offset) only")
        n, rows, cols = bb.signs.shape
        self.cols, self.group = cols, bb.group
        s = torch.from_numpy(np.where(bb.signs, 1, -1).astype(np.int8)).reshape(n * rows, cols)
        self.register_buffer("signs", groups_view(s, bb.group)[0].reshape(n, rows, -1, bb.group))  # int8 ±1, 0 pad
        alpha0 = torch.from_numpy(full_scales(bb)[:, :, 0, :].copy())                  # [rows, ng, N]
        self.register_buffer("alpha0", alpha0)
        self.a = torch.nn.Parameter(torch.zeros_like(alpha0))
        self.has_mu = bb.offsets is not None
        if self.has_mu:
            self.register_buffer("mu0", torch.from_numpy(np.asarray(bb.offsets, np.float32)[:, :, 0].copy()))
            self.register_buffer("mu_unit", alpha0.abs().mean(-1))
            self.m = torch.nn.Parameter(torch.zeros_like(self.mu0))
        self.train_signs = bool(train_signs)
        if self.train_signs:                    # latent V = u · unit, u in units of the group's mean |α|
            self.register_buffer("valid", (self.signs[0] != 0).float())
            self.register_buffer("unit", alpha0.abs().mean(-1).clamp(min=1e-12))
            self.register_buffer("combos", level_codes(n))
            self.u = torch.nn.Parameter(reconstruct(self.signs.float(), *self.scales()) / self.unit[..., None])

    def scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        alpha = self.alpha0 * (1 + self.a)
        mu = self.mu0 + self.mu_unit * self.m if self.has_mu else None
        return alpha, mu

    def current_signs(self) -> torch.Tensor:
        """±1 [N, rows, ng, G] (0 in the padding): frozen, or the latents' nearest levels."""
        if not self.train_signs:
            return self.signs.float()
        alpha, mu = self.scales()
        with torch.no_grad():
            return nearest_signs(self.u * self.unit[..., None], alpha, mu, self.valid, self.combos)

    def weight(self) -> torch.Tensor:
        alpha, mu = self.scales()
        w = reconstruct(self.current_signs(), alpha, mu)
        if self.train_signs:                    # straight-through: the value of w, the gradient of V too
            lat = self.u * self.unit[..., None]
            w = w + (lat - lat.detach())
        return w.reshape(w.shape[0], -1)[:, :self.cols]

    @torch.no_grad()
    def clip_latent(self) -> None:
        """Keep V within one unit past the extreme levels μ ± Σ|α_i|."""
        if self.train_signs:
            alpha, mu = self.scales()
            reach = alpha.abs().sum(-1) / self.unit + 1
            centre = torch.zeros_like(reach) if mu is None else mu / self.unit
            self.u.copy_(torch.maximum(torch.minimum(self.u, (centre + reach)[..., None]), (centre - reach)[..., None]))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight())

    def export(self, bb: BinaryBasis) -> BinaryBasis:
        alpha, mu = self.scales()
        signs = bb.signs
        if self.train_signs:
            s = self.current_signs()
            signs = (s > 0).reshape(s.shape[0], s.shape[1], -1)[:, :, :self.cols].cpu().numpy()
        return BinaryBasis(signs=signs, scales=alpha.detach().cpu().numpy()[:, :, None, :].astype(np.float32),
                           group=bb.group,
                           offsets=None if mu is None else mu.detach().cpu().numpy()[:, :, None].astype(np.float32))


def generate_data(teacher, n_seqs: int, length: int, batch: int, seed: int, device, progress=True) -> torch.Tensor:
    """[n_seqs, length] token ids written by the teacher from random first tokens."""
    from tqdm import tqdm
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    # sampling where the logits are: torch.multinomial on the CPU costs ~1 ms per row of a 49k vocabulary,
    # which made a 512-sequence batch on a GPU take a second per token (the CPU path is unchanged)
    g_dev = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    vocab = teacher.config.vocab_size
    out = []
    bar = tqdm(range(0, n_seqs, batch), desc="distill: teacher writes data", disable=not progress, unit="batch")
    for b0 in bar:
        nb = min(batch, n_seqs - b0)
        ids = torch.randint(0, vocab, (nb, 1), generator=g).to(device)
        cache = None
        pos = ids
        for t in range(length - 1):
            with torch.no_grad():
                o = teacher(pos, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            logits = o.logits[:, -1].float()
            if t < GREEDY_TOKENS:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                p = torch.softmax(logits, -1)
                nxt = torch.multinomial(p, 1, generator=g_dev)
            ids = torch.cat([ids, nxt], 1)
            pos = nxt
        out.append(ids.cpu())
    return torch.cat(out)


def _loss(t_logits: torch.Tensor, s_logits: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """KL(teacher ‖ student) per token + MSE_WEIGHT · MSE of the logits."""
    t_logp = torch.log_softmax(t_logits.float(), -1)
    s_logp = torch.log_softmax(s_logits.float(), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    mse = ((t_logits - s_logits) ** 2).mean()
    return kl + MSE_WEIGHT * mse, float(kl.detach()), float(mse.detach())


def _linear_parent(model, hf_name: str):
    """'model.layers.3.self_attn.q_proj.weight' -> (module holding q_proj, 'q_proj', block index)."""
    parts = hf_name.split(".")[:-1]
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p) if not p.isdigit() else mod[int(p)]
    return mod, parts[-1], int(parts[2])


def _settings_key(model_dir: Path, quantized: dict[str, BinaryBasis], q) -> str:
    h = hashlib.sha256()
    h.update(str(Path(model_dir).resolve()).encode())
    h.update(json.dumps({k: v for k, v in q.settings().items() if k != "distill_ckpt"}, sort_keys=True,
                        default=str).encode())
    for k in sorted(quantized)[:4]:                      # the starting point too (cheap digest)
        h.update(np.ascontiguousarray(quantized[k].scales, np.float32).tobytes()[:4096])
    return h.hexdigest()[:16]


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(model_dir, quantized: dict[str, BinaryBasis], q, progress: bool = True) -> dict[str, BinaryBasis]:
    """Train the scales of `quantized` (hf_name -> BinaryBasis) against the FP model; return the
    updated bases. q: the QBB quantizer (distill_* options, seed, device)."""
    from tqdm import tqdm
    from . import hf
    model_dir = Path(model_dir)
    steps = int(q.distill_steps)
    if steps <= 0 or not quantized:
        return quantized
    dev = q.torch_device()
    key = _settings_key(model_dir, quantized, q)
    ckpt = Path(q.distill_ckpt) if q.distill_ckpt else hf.cache_dir() / f"qbb-distill-{key}.pt"
    torch.manual_seed(q.seed)

    teacher = hf.load_torch_model(model_dir).to(dev)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)                    # frozen too: only the scales (+ latents) below train
    train = q.distill_train                             # "scales" | "signs", checked by QBB.check
    modules: dict[str, BasisLinear] = {}
    for name, bb in quantized.items():
        parent, attr, _ = _linear_parent(student, name)
        modules[name] = BasisLinear(bb, train_signs=train == "signs").to(dev)
        setattr(parent, attr, modules[name])
    n_blocks = len(student.model.layers)
    fp_layers = list(teacher.model.layers)
    q_layers = list(student.model.layers)
    scale_params = [p for m in modules.values() for k, p in m.named_parameters() if k in ("a", "m")]
    groups = [{"params": scale_params, "lr": q.distill_lr}]
    if train == "signs":
        groups.append({"params": [m.u for m in modules.values()], "lr": q.distill_sign_lr})
    params = [p for g_ in groups for p in g_["params"]]
    opt = torch.optim.Adam(groups)
    if train == "signs":                                # cosine from 1 to LR_FLOOR over the steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    else:
        sched = None
    kept = (".a", ".m", ".u") if train == "signs" else (".a", ".m")
    every = CKPT_EVERY_SIGNS if train == "signs" else CKPT_EVERY

    state = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if state is not None and state.get("key") != key:
        raise DistillError(f"{ckpt}: checkpoint of other settings; remove it or set distill_ckpt")
    if state is None:
        data = generate_data(teacher, q.distill_seqs, q.distill_len, q.distill_gen_batch or max(q.distill_batch, 8),
                             q.seed, dev, progress)
        state = {"key": key, "step": 0, "data": data, "history": []}
        _save(ckpt, state)
    else:
        student.load_state_dict(state["student"], strict=False)
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
    data = state["data"]
    g = torch.Generator().manual_seed(q.seed + 1)          # batch order: one permutation per epoch
    epochs = -(-steps * q.distill_batch // len(data))
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(epochs)])

    swap_steps = max(1, steps // 2)
    bar = tqdm(range(state["step"], steps), desc=f"distill {train} ({n_blocks} blocks swapped in over {swap_steps} steps)",
               disable=not progress, unit="step", initial=state["step"], total=steps)
    for t in bar:
        n_student = min(n_blocks, math.ceil(n_blocks * (t + 1) / swap_steps))   # progressive swap
        student.model.layers = torch.nn.ModuleList(q_layers[:n_student] + fp_layers[n_student:])
        idx = order[t * q.distill_batch:(t + 1) * q.distill_batch]
        ids = data[idx].to(dev)
        with torch.no_grad():
            t_logits = teacher(ids).logits
        s_logits = student(ids).logits
        loss, kl, mse = _loss(t_logits, s_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        if sched is not None:
            sched.step()
            if (t + 1) % CLIP_LATENT_EVERY == 0 or t + 1 == steps:
                for m in modules.values():
                    m.clip_latent()
        state["history"].append((kl, mse))
        if progress:
            bar.set_postfix(blocks=n_student, kl=f"{kl:.4f}", mse=f"{mse:.3f}")
        if (t + 1) % every == 0 or t + 1 == steps:
            state.update(step=t + 1, opt=opt.state_dict(), sched=None if sched is None else sched.state_dict(),
                         student={k: v for k, v in student.state_dict().items() if k.endswith(kept)})
            _save(ckpt, state)
    student.model.layers = torch.nn.ModuleList(q_layers)
    return {name: modules[name].export(bb) for name, bb in quantized.items()}

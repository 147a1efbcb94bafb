"""Distillation of a binary-basis model from its full-precision teacher: QBB's step 3 (NeurIPS 2024,
sec. 3.2) and, growing out of it, quantization-aware distillation (QAT).

Teacher data. The full-precision model writes its own training text (QBB's data-free recipe, LLM-QAT's
generator): each sequence starts from a random token, continues greedily for a few tokens, then by
sampling. Optionally a fraction of the sequences are windows of the calibration text instead.

Student. The same model whose block linears are W = Σ α_i B_i + μ (`BasisLinear`; basis.py is the
algebra). What trains (`DistillConfig.train`):
  scales  only α and μ, as relative corrections α = α₀·(1 + a), μ = μ₀ + |α₀|·m (the paper; small
          models diverge easily when the scales move freely);
  signs   quantization-aware: each linear keeps a latent real weight V; the forward pass puts it on
          its nearest level Σ ±α_i + μ of the current scales (basis.nearest_signs, the stored grid) and
          the backward pass is straight-through to V (BinaryConnect); α and μ learn as above. Latents
          are clipped one unit past the extreme levels so none drifts where no gradient brings it back.
The latents start at the file's weights (step 0 is the file) or at the teacher's weights, and the grid
at the file's scales or at ParetoQ's per-bit-width initialisation (basis.paretoq_grid).

Loss, on the next-token distributions of every position: forward KL(p_t ‖ p_s) (LLM-QAT, QBB), optionally
+ the MSE of the logits (QBB), or BitDistiller's confidence-aware KL
    CAKLD = γ·KL(p_s ‖ p_t) + (1 − γ)·KL(p_t ‖ p_s),  γ = the teacher's mean top-1 probability on the data.
QBB's progressive block swap (teacher blocks replaced by student blocks, first block first, over a
fraction of the steps) is an option. AdamW, cosine decay to LR_FLOOR, gradient-norm clipping, bf16
autocast on CUDA. A checkpoint holds the teacher data, the trainable tensors, the optimizer and the
schedule, so a run cut anywhere and started again with the same settings ends exactly where an
uninterrupted one does.

Data parallel. Started by torchrun (WORLD_SIZE > 1), the same call is one rank of a data-parallel job:
each rank writes the teacher sequences of its own seed range, all ranks gather them (every rank holds
the same global data, no sequence is written twice), each step's global batch is split across ranks,
and the gradients are averaged with one all-reduce before clipping, as DDP does, so the result equals
the single-process run on the same global batch. Only rank 0 writes checkpoints and files.

Sharded (`fsdp`, under torchrun): for a teacher and student that do not fit one device, both are
sharded with torch FSDP2 (`fully_shard`, one unit per transformer block plus the root): every
parameter, the trainable α corrections and latents included, lives as 1/world of its rows on each
rank, with their AdamW moments; a block's weights are gathered only for its forward and backward, and
FSDP's reduce-scatter averages the gradients. The steps are the same computation, so the result equals
the single-process and the data-parallel runs to float tolerance. Checkpoints hold full tensors in the
single-process layout (gathered, rank 0 writes), so a sharded run resumes from any of the three and
any of them from it. Not sharded: the frozen signs and scale buffers of the student's linears (the
latents, the larger part, are), and the progressive block swap (fsdp needs swap 0).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from .basis import (BasisError, groups_view, level_codes, nearest_level, nearest_signs, pack, paretoq_grid,
                    reconstruct, unpack)
from .format import BinaryBasis

GREEDY_TOKENS = 4        # greedy continuation after the random first token, then sampling
LR_FLOOR = 0.05          # cosine decay of the learning rates down to this fraction
CLIP_LATENT_EVERY = 8    # train="signs": steps between latent clips (a dozen kernels per linear each)
GAMMA_SEQS = 32          # CAKLD: teacher sequences whose mean top-1 probability gives γ
TRAINS = ("scales", "signs")
LOSSES = ("kl", "kl+mse", "cakld")
LATENTS = ("file", "teacher")
GRIDS = ("file", "paretoq")


class DistillError(ValueError):
    pass


class CheckpointError(DistillError):
    """A checkpoint that cannot be read, or one written by a run of other settings."""


@dataclasses.dataclass
class DistillConfig:
    steps: int = 30
    seqs: int = 64            # teacher-written sequences (+ calibration windows, see calib_frac)
    length: int = 128         # tokens per sequence
    batch: int = 4            # sequences per step, over all ranks
    lr: float = 1e-4          # AdamW learning rate of the relative scale corrections
    train: str = "scales"     # scales | signs
    sign_lr: float = 0.01     # train=signs: learning rate of the latents, in units of the group's mean |α|
    loss: str = "kl+mse"      # kl | kl+mse | cakld
    mse_weight: float = 1.0   # loss kl+mse: KL + mse_weight · MSE(logits)
    swap: float = 0.5         # fraction of the steps over which student blocks replace teacher blocks (0: all at once)
    latent: str = "file"      # train=signs: latents start at the file's weights or the teacher's
    grid: str = "file"        # the file's scales, or ParetoQ's initialisation from the teacher's weights
    calib_frac: float = 0.0   # fraction of the sequences taken from the calibration text instead
    weight_decay: float = 0.0
    clip: float = 1.0         # gradient-norm clip
    gen_batch: int = 0        # sequences the teacher writes at once (0: max(batch, 8)); fixes the data's seeds
    seed: int = 0
    device: str = ""          # cpu | cuda (default: cuda when present)
    ckpt: str = ""            # checkpoint file (default: under BITBASIS_CACHE, keyed by the settings)
    ckpt_every: int = 50      # steps between checkpoints
    eval_every: int = 0       # steps between held-out perplexities of the student (torch; 0: none)
    eval_windows: int = 8     # llama.cpp-protocol windows of the held-out text per evaluation
    eval_log: str = ""        # JSON lines {step, tokens, ppl} (rank 0); the curve's data
    stop_at: int = 0          # checkpoint and stop after this step (0: run to the end); a rerun continues
    time_limit: float = 0     # checkpoint and stop after this many seconds of training (0: none)
    fsdp: bool = False        # under torchrun: shard teacher and student with FSDP2 instead of replicating them
    embed_bases: str = ""     # "N:G": the token embedding as N bases of group G, trained like the linears
    head_bases: str = ""      # "N:G": the output head likewise (a tied model: one tensor, see outer_bases)
    keep_pow2: bool = False   # a POW2 tensor (GPTQ's α_i = α_0·2^i) trains one correction per group: the file keeps its bits

    # settings that do not change the trajectory: a checkpoint of a run that differs only in these resumes
    NOT_IN_KEY = ("device", "ckpt", "ckpt_every", "eval_every", "eval_windows", "eval_log", "stop_at", "time_limit",
                  "fsdp")

    def check(self) -> "DistillConfig":
        if self.steps < 0:
            raise DistillError("distill: steps must be >= 0")
        if self.seqs < 1 or self.length < 8 or self.batch < 1:
            raise DistillError("distill: seqs >= 1, length >= 8, batch >= 1")
        for name, val, allowed in (("train", self.train, TRAINS), ("loss", self.loss, LOSSES),
                                   ("latent", self.latent, LATENTS), ("grid", self.grid, GRIDS)):
            if val not in allowed:
                raise DistillError(f"distill: {name}={val}: must be one of {', '.join(allowed)}")
        if not (self.lr > 0 and self.sign_lr > 0 and self.clip > 0):
            raise DistillError("distill: lr, sign_lr and clip must be > 0")
        if not (0 <= self.swap <= 1 and 0 <= self.calib_frac <= 1 and self.weight_decay >= 0 and self.mse_weight >= 0):
            raise DistillError("distill: swap and calib_frac in [0, 1], weight_decay and mse_weight >= 0")
        if self.gen_batch < 0 or self.ckpt_every < 1 or self.eval_every < 0 or self.eval_windows < 1:
            raise DistillError("distill: gen_batch >= 0, ckpt_every >= 1, eval_every >= 0, eval_windows >= 1")
        if self.stop_at < 0 or self.time_limit < 0:
            raise DistillError("distill: stop_at and time_limit must be >= 0")
        for flag, spec in (("--embed-bases", self.embed_bases), ("--head-bases", self.head_bases)):
            if spec and not re.fullmatch(r"[1-8]:[1-9]\d*", spec):
                raise DistillError(f"distill: {flag} {spec!r}: expected N:G with N in 1..8 (e.g. 4:64)")
        if self.fsdp and self.swap:
            raise DistillError("distill: --fsdp shards whole blocks; the progressive block swap needs --swap 0")
        if self.fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            raise DistillError("distill: --fsdp shards over processes: start it with torchrun --nproc-per-node N (N > 1)")
        return self

    def settings(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.NOT_IN_KEY}

    def torch_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class BasisLinear(torch.nn.Module):
    """y = x Wᵀ with W = Σ_i α_i ⊙ B_i + μ per row and group. train_signs=False: signs frozen, scales
    trainable (the paper). train_signs=True: B = nearest-level signs of a trainable latent weight,
    straight-through (module docstring). latent: the starting latent weight [rows, cols] (default:
    the file's weights); grid: (α, μ) to start from instead of the file's."""

    def __init__(self, bb: BinaryBasis, train_signs: bool = False, latent: torch.Tensor | None = None,
                 grid: tuple | None = None, keep_pow2: bool = False):
        super().__init__()
        try:
            signs, alpha0, mu0 = unpack(bb)
        except BasisError as e:
            raise DistillError(f"distillation handles plain planes + scales (+ offset) only: {e}") from None
        if grid is not None:
            alpha0, mu0 = grid[0].float().cpu(), None if grid[1] is None else grid[1].float().cpu()
        self.cols, self.group = bb.shape[1], bb.group
        self.embed_scale = None                 # a scaled embedding's factor (Gemma's √hidden), set by the caller
        self.register_buffer("signs", signs.to(torch.int8))                  # ±1, 0 in the padding
        self.register_buffer("alpha0", alpha0)
        # keep_pow2: α_i = α_0·2^i·(1 + a) with one a per group stays POW2, stored as one scale (GPTQ's bits)
        self.pow2 = bool(keep_pow2 and bb.pow2 and grid is None)
        self.a = torch.nn.Parameter(torch.zeros_like(alpha0[..., :1] if self.pow2 else alpha0))
        self.has_mu = mu0 is not None
        if self.has_mu:
            self.register_buffer("mu0", mu0)
            self.register_buffer("mu_unit", alpha0.abs().mean(-1))
            self.m = torch.nn.Parameter(torch.zeros_like(mu0))
        self.train_signs = bool(train_signs)
        self.register_buffer("valid", (signs[0] != 0).float())
        if grid is not None or self.train_signs:
            self.register_buffer("combos", level_codes(bb.n_planes))
        if self.train_signs:                    # latent V = u · unit, u in units of the group's mean |α|
            self.register_buffer("unit", alpha0.abs().mean(-1).clamp(min=1e-12))
            if latent is None:
                start = reconstruct(signs.float(), *self.scales())
            else:
                start = groups_view(latent.float().cpu(), bb.group)[0]
            self.u = torch.nn.Parameter(start / self.unit[..., None])
        elif grid is not None:                  # frozen signs: those of the file's weights on the new grid
            w = reconstruct(signs.float(), *unpack(bb)[1:])
            self.signs.copy_(nearest_signs(w, alpha0, mu0, self.valid, self.combos).to(torch.int8))

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
        if self.train_signs:
            w = _ste_weight(self.u, self.unit, alpha, mu, self.combos)
        else:
            w = reconstruct(self.signs.float(), alpha, mu)
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
        w = self.__dict__.get("banked")         # this step's weight, when a _WeightBank made it
        w = self.weight() if w is None else w
        if not x.is_floating_point():           # token ids: the module stands for the token embedding
            y = torch.nn.functional.embedding(x, w)
            return y if self.embed_scale is None else y * self.embed_scale
        return torch.nn.functional.linear(x, w)

    def export(self, bb: BinaryBasis) -> BinaryBasis:
        alpha, mu = self.scales()
        out = pack(self.current_signs(), alpha, mu, bb.group, self.cols)
        if self.pow2:
            out.scales, out.pow2 = out.scales[..., :1], True
        if not self.train_signs and not hasattr(self, "combos"):
            out.signs = bb.signs                # untouched planes stay the caller's array
        return out


def _ste_weight(u, unit, alpha, mu, combos) -> torch.Tensor:
    """train=signs, grouped [..., G]: the latents V = u·unit on their nearest levels, straight-through
    (the value of the level, the gradient of V too; α and μ get the level's own gradient)."""
    lat = u * unit[..., None]
    return nearest_level(lat, alpha, mu, combos) + (lat - lat.detach())


class _WeightBank:
    """train=signs: the weights of all BasisLinears of one kind (N, G, offset) in one expression per
    step, over their groups concatenated, instead of ~25 small kernels per linear and per direction: on
    a GPU the ~7k launches for SmolLM2's 210 linears, not the arithmetic, bounded a step (results.md §31).
    The same ops as BasisLinear.weight, so the same values and gradients. The frozen buffers are
    concatenated once (they never change); the trainable tensors once per step (a cat, whose backward
    hands each parameter a view). assign() before the student's forward, clear() after the backward."""

    def __init__(self, modules):
        kinds: dict[tuple, list[BasisLinear]] = {}
        for m in modules:
            kinds.setdefault((m.alpha0.shape[-1], m.group, m.has_mu), []).append(m)
        self.kinds = []
        for ms in kinds.values():
            def flat(name, ms=ms):
                return torch.cat([getattr(m, name).flatten(0, 1) for m in ms])
            frozen = {k: flat(k) for k in ("unit", "alpha0") + (("mu0", "mu_unit") if ms[0].has_mu else ())}
            self.kinds.append((ms, frozen, [m.u.shape[0] * m.u.shape[1] for m in ms]))

    def assign(self) -> None:
        for ms, f, sizes in self.kinds:
            cat = lambda name: torch.cat([getattr(m, name).flatten(0, 1) for m in ms])   # noqa: E731
            alpha = f["alpha0"] * (1 + cat("a"))                       # BasisLinear.scales, all at once
            mu = f["mu0"] + f["mu_unit"] * cat("m") if "mu0" in f else None
            w = _ste_weight(cat("u"), f["unit"], alpha, mu, ms[0].combos)
            for m, piece in zip(ms, w.split(sizes)):
                m.banked = piece.reshape(m.u.shape[0], -1)[:, :m.cols]

    def clear(self) -> None:
        for ms, _, _ in self.kinds:
            for m in ms:
                m.__dict__.pop("banked", None)


# --- distributed ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(dev: torch.device) -> Dist:
    """A data-parallel rank when started by torchrun (WORLD_SIZE > 1): gloo on the CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def close_distributed(d: Dist) -> None:
    """End a rank's part: wait for every rank, then tear the process group down explicitly. Left to the
    interpreter's exit, gloo's threads could be destroyed mid-flight on one rank (std::terminate, SIGABRT)
    while another was still finishing (seen under load in the torchrun test)."""
    if d.world <= 1:
        return
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce_mean(tensors: list[torch.Tensor], d: Dist) -> None:
    """Average tensors over the ranks in place (one flat all-reduce, DDP's bucket)."""
    if d.world == 1 or not tensors:
        return
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= d.world
    i = 0
    for t in tensors:
        t.copy_(flat[i:i + t.numel()].view_as(t))
        i += t.numel()


def _shard(model, dev: torch.device, world: int) -> None:
    """FSDP2: one unit per transformer block, the root holding the embeddings, final norm and head.
    fully_shard moves each unit to the device as it shards it, so the whole model never sits there."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(dev.type, (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole on every rank (a collective), else t itself."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A whole tensor (from a checkpoint) split the way ref, a parameter, is; ref unsharded: full."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements)


@contextlib.contextmanager
def _gathered(m: torch.nn.Module, writeback: bool = False):
    """Inside: m's sharded parameters replaced by their whole values (export, latent clipping); with
    writeback, the whole values are split back into the shards after. No-op when m is not sharded."""
    from torch.distributed.tensor import DTensor
    saved = {n: p for n, p in m._parameters.items() if isinstance(p, DTensor)}
    for n, p in saved.items():
        m._parameters[n] = torch.nn.Parameter(p.full_tensor().detach(), requires_grad=False)
    try:
        yield m
    finally:
        for n, p in saved.items():
            if writeback:
                with torch.no_grad():
                    p.to_local().copy_(_shard_like(m._parameters[n].data, p).to_local())
            m._parameters[n] = p


# --- teacher data --------------------------------------------------------------------------------

def generate_data(teacher, n_seqs: int, length: int, batch: int, seed: int, device, progress=True,
                  dist_: Dist = Dist(), lockstep: bool = False) -> torch.Tensor:
    """[n_seqs, length] token ids written by the teacher from random first tokens. Chunk k (batch
    sequences) draws from seed range (seed, k), so the data do not depend on how the chunks are shared
    out: rank r writes chunks r, r + world, ... and all ranks gather the whole. lockstep (a sharded
    teacher, whose every forward is a collective): a rank with one chunk fewer writes a throwaway chunk
    (seed range 0 again, dropped), so all ranks run the same forwards."""
    from tqdm import tqdm
    if n_seqs == 0:                                      # calib_frac 1: all calibration text
        return torch.zeros(0, length, dtype=torch.int32)
    device = torch.device(device)
    vocab = teacher.config.vocab_size
    chunks = list(range(0, n_seqs, batch))
    mine = {}
    todo = chunks[dist_.rank::dist_.world]
    if lockstep and len(todo) < -(-len(chunks) // dist_.world):
        todo.append(None)
    bar = tqdm(todo, desc="distill: teacher writes data", disable=not (progress and dist_.main), unit="batch")
    for b0 in bar:
        if b0 is None:                                   # lockstep filler, dropped
            generate_data(teacher, batch, length, batch, seed, device, False)
            continue
        k = b0 // batch
        g = torch.Generator().manual_seed(seed * 1_000_003 + k)
        # sampling where the logits are: torch.multinomial on the CPU costs ~1 ms per row of a 49k vocabulary
        g_dev = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed * 1_000_003 + k)
        nb = min(batch, n_seqs - b0)
        ids = torch.randint(0, vocab, (nb, 1), generator=g).to(device)
        cache, pos = None, ids
        for t in range(length - 1):
            with torch.no_grad(), _autocast(device):      # bf16 on CUDA: ~10x the fp32 tokens per second
                o = teacher(pos, past_key_values=cache, use_cache=True)
            cache = o.past_key_values
            logits = o.logits[:, -1].float()
            if t < GREEDY_TOKENS:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=g_dev)
            ids = torch.cat([ids, nxt], 1)
            pos = nxt
        mine[k] = ids.to(torch.int32).cpu()           # int32: half the checkpoint's data
    if dist_.world > 1:
        import torch.distributed as dist
        parts = [None] * dist_.world
        dist.all_gather_object(parts, mine)
        for p in parts:
            mine.update(p)
    return torch.cat([mine[k] for k in range(len(chunks))])


def calib_windows(model_dir: Path, n: int, length: int, seed: int) -> torch.Tensor:
    """[n, length] windows of the calibration text at seeded random offsets."""
    from . import data, hf
    if n == 0:
        return torch.zeros(0, length, dtype=torch.int32)
    tok = hf.load_tokenizer(model_dir)
    ids = torch.tensor(tok(data.read_text("calib"), add_special_tokens=False)["input_ids"], dtype=torch.int64)
    if len(ids) < length + 1:
        raise DistillError(f"calibration text has {len(ids)} tokens, fewer than one window of {length}")
    g = torch.Generator().manual_seed(seed + 7)
    starts = torch.randint(0, len(ids) - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()]).to(torch.int32)


def teacher_data(teacher, model_dir: Path, cfg: DistillConfig, dev, progress: bool, d: Dist) -> torch.Tensor:
    """The training sequences: teacher-written, then calibration windows. Kept in the cache keyed by
    what determines them, so runs that differ only in the training settings share them."""
    from . import hf
    n_calib = round(cfg.seqs * cfg.calib_frac)
    gen_batch = cfg.gen_batch or max(cfg.batch, 8)
    h = hashlib.sha256(_config_bytes(model_dir))
    h.update(json.dumps([cfg.seqs, n_calib, cfg.length, gen_batch, cfg.seed, GREEDY_TOKENS]).encode())
    path = hf.cache_dir() / f"distill-data-{h.hexdigest()[:16]}.pt"
    if path.exists():
        try:
            data = torch.load(path, weights_only=True)
            if tuple(data.shape) == (cfg.seqs, cfg.length):
                return data
        except Exception:                                    # unreadable: write it again
            pass
    data = generate_data(teacher, cfg.seqs - n_calib, cfg.length, gen_batch, cfg.seed, dev, progress, d, cfg.fsdp)
    if dev.type == "cuda":                                   # the generation's KV caches, for the other legs
        torch.cuda.empty_cache()
    data = torch.cat([data, calib_windows(model_dir, n_calib, cfg.length, cfg.seed)])
    if d.main:
        _save(path, data)
    return data


def _config_bytes(model_dir: Path) -> bytes:
    f = Path(model_dir) / "config.json"
    return f.read_bytes() if f.exists() else str(Path(model_dir).resolve()).encode()


# --- loss ----------------------------------------------------------------------------------------

LOSS_CHUNK = 1 << 26     # logits per chunk of the loss (256 MB in fp32); its temporaries live one chunk at a time


class _LogitLoss(torch.autograd.Function):
    """loss_fn's losses over chunks of positions, in fp32, with the gradient in closed form: autograd
    through log-softmax keeps ~6 fp32 [positions, vocabulary] tensors for the backward pass (1.6 GB each
    at 32 x 256 tokens and SmolLM2's 49k vocabulary) and reads them all again; this keeps one gradient
    in the logits' dtype. With d = log p_s − log p_t per position, z_s the student's logits:
        KL(p_t ‖ p_s) = −Σ p_t d                  ∂/∂z_s = p_s − p_t
        KL(p_s ‖ p_t) = Σ p_s d =: r              ∂/∂z_s = p_s ⊙ (d − r)
        MSE           = Σ (z_s − z_t)² / V        ∂/∂z_s = 2 (z_s − z_t) / V
    each averaged over the positions. Returns (loss, forward KL); the second carries no gradient."""

    @staticmethod
    def forward(ctx, t_logits, s_logits, mode: str, gamma: float, mse_weight: float):
        v = s_logits.shape[-1]
        t2, s2 = t_logits.detach().reshape(-1, v), s_logits.detach().reshape(-1, v)
        n = len(s2)
        grad = torch.empty_like(s2)
        loss = torch.zeros((), device=s2.device)
        kl = torch.zeros((), device=s2.device)
        rows = max(1, LOSS_CHUNK // v)
        for i in range(0, n, rows):
            zt, zs = t2[i:i + rows].float(), s2[i:i + rows].float()
            lt, ls = torch.log_softmax(zt, -1), torch.log_softmax(zs, -1)
            d = ls - lt
            ps, pt = ls.exp(), lt.exp()
            kl_r = (pt * d).sum(-1).neg_()
            kl += kl_r.sum()
            g = ps - pt
            if mode == "kl":
                loss += kl_r.sum()
            elif mode == "kl+mse":
                diff = zs - zt
                loss += kl_r.sum() + mse_weight / v * (diff * diff).sum()
                g += (2 * mse_weight / v) * diff
            else:                                          # CAKLD = γ·KL(p_s ‖ p_t) + (1 − γ)·KL(p_t ‖ p_s)
                r = (ps * d).sum(-1)
                loss += gamma * r.sum() + (1 - gamma) * kl_r.sum()
                g = (1 - gamma) * g + gamma * ps * (d - r[:, None])
            grad[i:i + rows] = g / n
        ctx.save_for_backward(grad)
        ctx.shape = s_logits.shape
        kl = kl / n
        ctx.mark_non_differentiable(kl)
        return loss / n, kl

    @staticmethod
    def backward(ctx, g_loss, g_kl):
        grad, = ctx.saved_tensors
        return None, (grad * g_loss.to(grad.dtype)).reshape(ctx.shape), None, None, None


def loss_fn(cfg: DistillConfig, t_logits: torch.Tensor, s_logits: torch.Tensor, gamma: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, forward KL) averaged over the positions: KL(p_t ‖ p_s), + mse_weight · the logits' MSE
    (kl+mse), or CAKLD (module docstring)."""
    return _LogitLoss.apply(t_logits, s_logits, cfg.loss, gamma, cfg.mse_weight)


EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def outer_bases(teacher, quantized: dict[str, BinaryBasis], cfg: DistillConfig, tied: bool
                ) -> dict[str, BinaryBasis]:
    """--embed-bases / --head-bases N:G: the token embedding / output head as N bases of group G, to be
    trained with the same straight-through signs as the block linears (issue 19 item 4: ~60 MB of Q8_0
    embedding + untied head would otherwise be most of an N = 2 file). Start: ParetoQ's grid of the
    teacher's weights with an offset (N = 4: LSQ's 16 uniform levels, basis.paretoq_grid), signs on their
    nearest levels. A tied model has one tensor for both: either flag quantizes it (as the embedding)."""
    specs = {EMBED: cfg.embed_bases, HEAD: cfg.head_bases}
    if tied:
        given = {v for v in specs.values() if v}
        if len(given) > 1:
            raise DistillError(f"distill: the model ties its head to its embedding (one tensor): "
                               f"--embed-bases {cfg.embed_bases} and --head-bases {cfg.head_bases} differ")
        specs = {EMBED: given.pop() if given else ""}
    out = {}
    for name, spec in specs.items():
        if not spec:
            continue
        if name in quantized:
            raise DistillError(f"distill: {name} is already binary bases in the file; drop the option")
        n, g = (int(x) for x in spec.split(":"))
        w = (teacher.model.embed_tokens if name == EMBED else teacher.lm_head).weight.detach().float().cpu()
        alpha, mu = paretoq_grid(w, n, g, offset=True)
        wg, valid = groups_view(w, g)
        out[name] = pack(nearest_signs(wg, alpha, mu, valid.float(), level_codes(n)), alpha, mu, g, w.shape[1])
    return out


def _linear_parent(model, hf_name: str):
    """'model.layers.3.self_attn.q_proj.weight' -> (module holding q_proj, 'q_proj')."""
    parts = hf_name.split(".")[:-1]
    mod = model
    for p in parts[:-1]:
        mod = getattr(mod, p) if not p.isdigit() else mod[int(p)]
    return mod, parts[-1]


def _settings_key(model_dir: Path, quantized: dict[str, BinaryBasis], cfg: DistillConfig) -> str:
    """The trajectory's identity: the teacher's config, the settings, the starting point (a digest)."""
    h = hashlib.sha256()
    h.update(_config_bytes(model_dir))
    h.update(json.dumps(cfg.settings(), sort_keys=True, default=str).encode())
    for k in sorted(quantized):
        bb = quantized[k]
        h.update(k.encode())
        h.update(np.ascontiguousarray(bb.scales, np.float32).tobytes()[:4096])
        h.update(np.packbits(np.asarray(bb.signs, bool).ravel()[:65536]).tobytes())
    return h.hexdigest()[:16]


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load(path: Path, key: str) -> dict:
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:                                  # truncated, not a torch file, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}); remove it") from None
    if not isinstance(state, dict) or not {"key", "step", "data"} <= state.keys():
        raise CheckpointError(f"{path}: not a distillation checkpoint; remove it")
    if state["key"] != key:
        raise CheckpointError(f"{path}: checkpoint of other settings or another start; remove it or choose another --ckpt")
    return state


@torch.no_grad()
def eval_perplexity(model, tokens: torch.Tensor, windows: int, dev, ctx: int = 512) -> float:
    """llama.cpp's protocol (perplexity.py) on the first `windows` windows, in torch."""
    from .perplexity import score_window
    nll = []
    for s in range(0, min(windows * ctx, len(tokens) - ctx + 1), ctx):
        w = tokens[s:s + ctx]
        with _autocast(dev):
            logits = model(w[None].to(dev)).logits[0].float().cpu().numpy()
        nll.append(score_window(logits, w.numpy(), ctx // 2))
    return float(math.exp(np.concatenate(nll).mean()))


def _autocast(dev: torch.device):
    import contextlib
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def distill(model_dir, quantized: dict[str, BinaryBasis], cfg: DistillConfig, progress: bool = True
            ) -> dict[str, BinaryBasis] | None:
    """Train `quantized` (hf_name -> BinaryBasis) against the FP model in model_dir; return the updated
    bases (on every rank), or None when the run stopped early (stop_at, time_limit) at a checkpoint."""
    import time
    from tqdm import tqdm
    from . import hf
    cfg.check()
    model_dir = Path(model_dir)
    steps = cfg.steps
    if steps == 0 or not quantized:
        return quantized
    dev = cfg.torch_device()
    d = init_distributed(dev)
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", d.rank)))
        torch.cuda.set_device(dev)
    if cfg.batch % d.world:
        raise DistillError(f"distill: batch {cfg.batch} is not a multiple of the world size {d.world}")
    fsdp = cfg.fsdp
    local = cfg.batch // d.world
    key = _settings_key(model_dir, quantized, cfg)
    ckpt = Path(cfg.ckpt) if cfg.ckpt else hf.cache_dir() / f"distill-{key}.pt"
    state = _load(ckpt, key) if ckpt.exists() else None
    torch.manual_seed(cfg.seed)

    home = torch.device("cpu") if fsdp else dev        # sharded models go to the device unit by unit
    teacher = hf.load_torch_model(model_dir).to(home)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = copy.deepcopy(teacher)                    # frozen too: only the scales (+ latents) below train
    signs = cfg.train == "signs"
    tied = student.lm_head.weight is student.model.embed_tokens.weight
    quantized = dict(quantized, **outer_bases(teacher, quantized, cfg, tied))
    modules: dict[str, BasisLinear] = {}
    for name, bb in quantized.items():
        parent, attr = _linear_parent(student, name)
        old = getattr(parent, attr)
        w_fp = old.weight.detach()
        if tuple(w_fp.shape) != bb.shape:
            raise DistillError(f"{name}: the file's shape {list(bb.shape)} is not the teacher's {list(w_fp.shape)}")
        grid = paretoq_grid(w_fp.cpu(), bb.n_planes, bb.group, bb.offsets is not None) if cfg.grid == "paretoq" else None
        latent = w_fp if cfg.latent == "teacher" else None
        modules[name] = BasisLinear(bb, train_signs=signs, latent=latent, grid=grid, keep_pow2=cfg.keep_pow2).to(home)
        if isinstance(old, torch.nn.Embedding) and getattr(old, "embed_scale", None) is not None:
            modules[name].embed_scale = float(old.embed_scale)
        for hook in old._forward_pre_hooks.values():    # e.g. the online rotation of down_proj's input (rotate.py)
            modules[name].register_forward_pre_hook(hook)
        setattr(parent, attr, modules[name])
    if tied and EMBED in modules:                       # one tensor: the head is the quantized embedding too
        student.lm_head = modules[EMBED]
    if fsdp:
        _shard(teacher, dev, d.world)
        _shard(student, dev, d.world)
    if d.world > 1 and d.main:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        mode = ""                                       # data parallel: a whole copy per rank
        if fsdp:                                        # what this rank holds of the two models' parameters
            ps = list(teacher.parameters()) + list(student.parameters())
            held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in ps)
            mode = f"FSDP (fully_shard per block; rank 0 holds {held / sum(p.numel() for p in ps):.1%} of the parameters), "
        print(f"distributed: world size {d.world}, backend {backend}, {mode}{local} sequences per rank per step",
              file=sys.stderr, flush=True)
    n_blocks = len(student.model.layers)
    fp_layers, q_layers = list(teacher.model.layers), list(student.model.layers)
    scale_params = [p for m in modules.values() for k, p in m.named_parameters() if k in ("a", "m")]
    groups = [{"params": scale_params, "lr": cfg.lr}]
    if signs:
        groups.append({"params": [m.u for m in modules.values()], "lr": cfg.sign_lr})
    params = [p for g_ in groups for p in g_["params"]]
    # fused: one kernel for all tensors on CUDA (foreach needs a few per tensor); not for FSDP's DTensors
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=dev.type == "cuda" and not fsdp)
    sched = torch.optim.lr_scheduler.LambdaLR(       # cosine from 1 to LR_FLOOR over the steps
        opt, lambda t: LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    kept = (".a", ".m", ".u")

    if state is None:
        data = teacher_data(teacher, model_dir, cfg, dev, progress, d)
        gamma = 0.0
        if cfg.loss == "cakld":                         # the teacher's mean top-1 probability on its data
            with torch.no_grad(), _autocast(dev):
                top = [torch.softmax(teacher(data[i:i + 8].to(dev).long()).logits.float(), -1).amax(-1).mean()
                       for i in range(0, min(len(data), GAMMA_SEQS), 8)]
            gamma = float(torch.stack(top).mean())
        state = {"key": key, "step": 0, "data": data, "gamma": gamma, "history": [], "evals": []}
        if d.main:
            _save(ckpt, state)
    else:
        own = student.state_dict()
        student.load_state_dict({k: _shard_like(v, own[k]) for k, v in state["student"].items()}, strict=False)
        osd = state["opt"]
        if fsdp:                                        # the moments as their parameters are split
            osd = dict(osd, state={i: {k: _shard_like(v, params[i]) if k.startswith("exp_avg") else v
                                       for k, v in st.items()} for i, st in osd["state"].items()})
        opt.load_state_dict(osd)
        sched.load_state_dict(state["sched"])
    data, gamma = state["data"], state["gamma"]
    g = torch.Generator().manual_seed(cfg.seed + 1)     # batch order: one permutation per epoch
    epochs = -(-steps * cfg.batch // len(data))
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(epochs)])
    eval_tokens = None
    if cfg.eval_every and (d.main or fsdp):            # sharded: every forward is a collective
        from . import data as bdata
        tok = hf.load_tokenizer(model_dir)
        eval_tokens = torch.tensor(tok(bdata.read_text("eval"), add_special_tokens=False)["input_ids"])

    def evaluate(step):
        student.model.layers = torch.nn.ModuleList(q_layers)
        ppl = eval_perplexity(student, eval_tokens, cfg.eval_windows, dev)
        if not d.main:
            return
        rec = {"step": step, "tokens": step * cfg.batch * cfg.length, "ppl": ppl}
        state["evals"].append(rec)
        if cfg.eval_log:
            with open(cfg.eval_log, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"eval step {step} tokens {rec['tokens']} ppl {ppl:.2f}", file=sys.stderr, flush=True)

    if eval_tokens is not None and state["step"] == 0:
        evaluate(0)
    swap_steps = max(1, round(steps * cfg.swap))
    bar = tqdm(range(state["step"], steps), desc=f"distill {cfg.train}", disable=not (progress and d.main),
               unit="step", initial=state["step"], total=steps)
    # the progressive swap leaves some linears out of a step (no gradient, not a zero one): per linear then
    bank = _WeightBank(modules.values()) if signs and not fsdp and not cfg.swap else None
    t_start = time.time()
    pending = []                                       # this stretch's forward KLs, still on the device
    for t in bar:
        n_student = min(n_blocks, math.ceil(n_blocks * (t + 1) / swap_steps)) if cfg.swap else n_blocks
        student.model.layers = torch.nn.ModuleList(q_layers[:n_student] + fp_layers[n_student:])
        idx = order[t * cfg.batch:(t + 1) * cfg.batch][d.rank * local:(d.rank + 1) * local]
        ids = data[idx].to(dev, non_blocking=True).long()
        with _autocast(dev):
            with torch.no_grad():
                t_logits = teacher(ids).logits
            if bank:
                bank.assign()
            s_logits = student(ids).logits
        loss, kl = loss_fn(cfg, t_logits, s_logits, gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if bank:
            bank.clear()
        kl = kl.detach().reshape(1).clone()                # for the bar: the mean over the ranks
        grads = [] if fsdp else [p.grad for p in params if p.grad is not None]   # FSDP reduce-scatters its own
        _all_reduce_mean(grads + [kl], d)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        if signs and ((t + 1) % CLIP_LATENT_EVERY == 0 or t + 1 == steps):
            for m in modules.values():
                with _gathered(m, writeback=True):
                    m.clip_latent()
        pending.append(kl)                                 # read at checkpoints: a float() per step syncs the host
        if progress and d.main:
            bar.set_postfix(blocks=n_student, kl=f"{float(kl):.4f}")
        if eval_tokens is not None and ((t + 1) % cfg.eval_every == 0 or t + 1 == steps):
            evaluate(t + 1)
        stop = (cfg.stop_at and t + 1 >= cfg.stop_at) or (cfg.time_limit and time.time() - t_start > cfg.time_limit)
        if d.world > 1 and cfg.time_limit:                 # the clocks differ: rank 0 decides for all
            import torch.distributed as dist
            flag = torch.tensor([float(bool(stop))], device=dev)     # nccl broadcasts device tensors only
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        if (t + 1) % cfg.ckpt_every == 0 or t + 1 == steps or stop:
            state["history"] += torch.cat(pending).tolist()
            pending = []
            osd = opt.state_dict()                     # whole tensors: the single-process layout
            osd = dict(osd, state={i: {k: _full(v) for k, v in st.items()} for i, st in sorted(osd["state"].items())})
            state.update(step=t + 1, opt=osd, sched=sched.state_dict(),
                         student={k: _full(v) for k, v in student.state_dict().items() if k.endswith(kept)})
            if d.main:
                _save(ckpt, state)
        if stop and t + 1 < steps:
            bar.close()
            if d.main:
                print(f"distill: stopped at step {t + 1} of {steps}; checkpoint {ckpt}: run the same command "
                      "again to continue", file=sys.stderr, flush=True)
            return None
    student.model.layers = torch.nn.ModuleList(q_layers)
    out = {}
    for name, bb in quantized.items():
        with _gathered(modules[name]) as m:
            out[name] = m.export(bb)
    return out

"""Per-tensor bit plans: how many bases (N) and which group (G) each quantized tensor gets.

The plan is data, as llama.cpp's llama-quant.cpp does it: every tensor has a category (CATEGORIES,
matched on its GGUF name), the user's `--tensor-type REGEX=N[:G]` rules pin tensors, and a budget
(`--target-bpw`) is spent where a measured sensitivity says it buys the most:

  sensitivity  the diagonal empirical Fisher F = E[(∂L/∂W)²] of the f32 model on calibration text
               (per-sequence gradients of the next-token loss), so the loss increase of quantizing a
               tensor is ΔL ≈ ½ Σ F ⊙ (W − Ŵ)² (the second-order estimate of HAWQ-V2 / Optimal Brain
               Damage with the Fisher for the Hessian); Ŵ is the min-max N-bit grid per group of G
               columns (GPTQ's grid before error feedback) for every candidate (N, G).
  allocation   start every free tensor at its cheapest option, then take upgrades in order of ΔL saved
               per bit (greedy on each tensor's lower convex hull, the Lagrangian solution), and fill
               what is left of the budget with the best single change that still fits; the result is
               at or under the target, within 0.01 bpw of it for any real model.

Bits are counted exactly as the file will hold them (planes, fp16 scales and offsets, padded groups),
so the block bpw `bitbasis info` reports is the plan's.
"""
from __future__ import annotations

import dataclasses
import heapq
import re
import time
from pathlib import Path

import numpy as np

from . import arch as A
from . import hf

# category of a tensor by its GGUF name (llama.cpp's tensor categories); the first match wins
CATEGORIES = [(c, re.compile(p)) for c, p in (
    ("attn_q", r"\.attn_q\.weight$"), ("attn_k", r"\.attn_k\.weight$"), ("attn_v", r"\.attn_v\.weight$"),
    ("attn_output", r"\.attn_output\.weight$"), ("ffn_gate", r"\.ffn_gate\.weight$"),
    ("ffn_up", r"\.ffn_up\.weight$"), ("ffn_down", r"\.ffn_down\.weight$"), ("output", r"^output\.weight$"),
    ("token_embd", r"^token_embd\.weight$"))]
# the tensors outside the blocks a plan may quantize: only when a rule names them (--head-bases,
# --embed-bases, --tensor-type), never from the block budget
EDGE = {"lm_head.weight": "output.weight", "model.embed_tokens.weight": "token_embd.weight"}

# methods whose stored layout is plain planes + per-group scales, so a plan can price them exactly:
# scales stored per group (1 with POW2, else N) and an fp16 offset per group or not
LAYOUTS = {"gptq": dict(scales_per_group=lambda n: 1, offset=True, max_bases=4),
           "residual": dict(scales_per_group=lambda n: n, offset=False, max_bases=8)}
GROUPS = (64, 128, 192, 256)          # candidate groups of the search
FISHER_SAMPLES, FISHER_SEQLEN = 8, 256


class PlanError(ValueError):
    pass


def category(gguf_name: str) -> str | None:
    for c, p in CATEGORIES:
        if p.search(gguf_name):
            return c
    return None


def tensor_bits(method: str, rows: int, cols: int, bases: int, group: int) -> int:
    """Bits the file holds for one tensor (format.pack's arrays: planes, fp16 scales, fp16 offsets)."""
    lay = LAYOUTS[method]
    ng = -(-cols // group)
    per_group = bases * group + 16 * lay["scales_per_group"](bases) + (16 if lay["offset"] else 0)
    return rows * ng * per_group


def parse_tensor_types(specs) -> list[tuple[str, int, int | None]]:
    """--tensor-type REGEX=N[:G] rules, in order (the first matching rule wins, as in llama.cpp)."""
    rules = []
    for spec in specs or []:
        pat, eq, val = spec.rpartition("=")
        m = re.fullmatch(r"(\d+)(?::(\d+))?", val)
        if not eq or not pat or not m:
            raise PlanError(f"--tensor-type {spec!r}: expected REGEX=N or REGEX=N:G (e.g. ffn_down=4, 'blk\\.0\\..*=3:64')")
        try:
            re.compile(pat)
        except re.error as e:
            raise PlanError(f"--tensor-type {spec!r}: bad regular expression ({e})") from None
        rules.append((pat, int(m[1]), int(m[2]) if m[2] else None))
    return rules


@dataclasses.dataclass
class Plan:
    """{GGUF name: (N, G)} for every tensor the method quantizes, and how it was chosen."""
    method: str
    tensors: dict[str, tuple[int, int]]
    numel: dict[str, int]
    target_bpw: float | None = None
    rules: list = dataclasses.field(default_factory=list)
    sensitivity: str = ""
    shape: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def bits(self, names=None) -> int:
        names = self.tensors if names is None else names
        return sum(tensor_bits(self.method, *self.shape[n], *self.tensors[n]) for n in names)

    def bpw(self, block_only: bool = True) -> float:
        names = [n for n in self.tensors if n.startswith("blk.") or not block_only]
        return self.bits(names) / max(1, sum(self.numel[n] for n in names))

    def to_settings(self) -> dict:
        return {"target_bpw": self.target_bpw, "block_bpw": round(self.bpw(), 4),
                "rules": [f"{p}={n}" + (f":{g}" if g else "") for p, n, g in self.rules],
                "sensitivity": self.sensitivity,
                "tensors": {n: f"{b}:{g}" for n, (b, g) in self.tensors.items()}}


def describe(settings_plan: dict) -> list[str]:
    """Lines for `bitbasis info`: the plan's target, rules and the N:G mix of each category."""
    lines = [f"plan        target {settings_plan.get('target_bpw') or 'none (uniform + rules)'}, "
             f"block bpw {settings_plan.get('block_bpw')}, sensitivity {settings_plan.get('sensitivity') or '-'}"]
    if settings_plan.get("rules"):
        lines.append("plan rules  " + " ".join(settings_plan["rules"]))
    mix: dict[str, dict[str, int]] = {}
    for name, ng in (settings_plan.get("tensors") or {}).items():
        c = mix.setdefault(category(name) or name, {})
        c[ng] = c.get(ng, 0) + 1
    for c, counts in mix.items():
        lines.append(f"  {c:12s} " + ", ".join(f"{n}x N:G={k}" for k, n in sorted(counts.items())))
    return lines


def _rtn_error(w, F, bases: int, group: int) -> float:
    """Σ F ⊙ (W − Ŵ)² for Ŵ the asymmetric min-max grid of 2^bases levels per row and group (with 0
    in range, as GPTQ's find_params). w, F: torch float32 [rows, cols]."""
    import torch
    rows, cols = w.shape
    ng = -(-cols // group)
    pad = ng * group - cols
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(rows, ng, group)
    fg = torch.nn.functional.pad(F, (0, pad)).reshape(rows, ng, group)   # padded columns weigh 0
    lo = wg.amin(-1, keepdim=True).clamp(max=0)
    hi = wg.amax(-1, keepdim=True).clamp(min=0)
    maxq = 2 ** bases - 1
    d = ((hi - lo) / maxq).clamp(min=1e-12)
    q = torch.clamp(torch.round((wg - lo) / d), 0, maxq)
    return float((fg * (q * d + lo - wg) ** 2).sum())


def fisher_sensitivity(model_dir: Path, names: dict[str, str], options: dict[str, list[tuple[int, int]]],
                       calib_opts: dict, progress: bool = True) -> dict[str, dict[tuple[int, int], float]]:
    """{GGUF name: {(N, G): ½ Σ F ⊙ (W − Ŵ)²}} for the tensors `names` ({HF name: GGUF name}) over their
    candidate options; F from FISHER_SAMPLES sequences of FISHER_SEQLEN calibration tokens."""
    import torch
    from .calibrate import _one_thread, calibration_tokens, sample_windows
    t0 = time.time()
    model = hf.load_torch_model(Path(model_dir))
    params = dict(model.named_parameters())
    if "lm_head.weight" in names and "lm_head.weight" not in params:     # tied: the head is the embedding
        names = {("model.embed_tokens.weight" if k == "lm_head.weight" else k): v for k, v in names.items()}
    for p in model.parameters():
        p.requires_grad_(False)
    for k in names:
        params[k].requires_grad_(True)
    tok = hf.load_tokenizer(Path(model_dir))
    seqlen = min(FISHER_SEQLEN, int(calib_opts.get("seqlen") or FISHER_SEQLEN))
    # other windows than the calibration's own (seed + 1): the plan is not fitted to the same text
    ids = sample_windows(calibration_tokens(tok, calib_opts.get("text")), FISHER_SAMPLES, seqlen,
                         int(calib_opts.get("seed") or 0) + 1)
    fisher = {k: torch.zeros_like(params[k]) for k in names}
    with torch.enable_grad():                 # restores the caller's grad mode on the way out
        for seq in ids:                       # per-sequence gradients: the empirical Fisher, not (Σg)²
            x = torch.as_tensor(seq[None])
            loss = model(x, labels=x, use_cache=False).loss
            grads = torch.autograd.grad(loss, [params[k] for k in names])
            for k, g in zip(names, grads):
                fisher[k].addcmul_(g, g)
    out = {}
    with _one_thread():
        for k, gname in names.items():
            w = params[k].detach()
            F = fisher.pop(k) / len(ids)
            out[gname] = {o: 0.5 * _rtn_error(w, F, *o) for o in options[gname]}
    if progress:
        print(f"plan: Fisher sensitivity of {len(names)} tensors from {len(ids)} x {seqlen} tokens "
              f"in {time.time() - t0:.1f} s")
    return out


def allocate(items: dict[str, list[tuple[int, float, tuple[int, int]]]], budget: int) -> dict[str, tuple[int, int]]:
    """Minimise Σ err subject to Σ bits ≤ budget, one option per tensor. items: {name: [(bits, err,
    choice)]}. Greedy over each tensor's lower convex hull by err saved per bit, then a fill pass."""
    hulls, pos = {}, {}
    for name, opts in items.items():
        opts = sorted(opts, key=lambda o: (o[0], o[1]))
        hull = []
        for o in opts:
            if hull and o[1] >= hull[-1][1]:
                continue                         # costs more and is no better: never chosen
            while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
                hull.pop()                       # hull[-1] lies above the chord: not on the lower hull
            hull.append(o)
        hulls[name], pos[name] = hull, 0
    used = sum(h[0][0] for h in hulls.values())
    if used > budget:
        raise PlanError(f"the budget is below the cheapest plan ({used} bits over {budget})")
    heap = [(-_slope(h[0], h[1]), name) for name, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], pos[name]
        if used - h[i][0] + h[i + 1][0] > budget:
            continue                             # this upgrade does not fit; smaller ones may
        used += h[i + 1][0] - h[i][0]
        pos[name] = i = i + 1
        if i + 1 < len(h):
            heapq.heappush(heap, (-_slope(h[i], h[i + 1]), name))
    chosen = {name: hulls[name][pos[name]] for name in items}
    while True:                                  # fill: the best single change that still fits
        best = None
        for name, opts in items.items():
            cur = chosen[name]
            for o in opts:
                if o[1] < cur[1] and used - cur[0] + o[0] <= budget:
                    gain = cur[1] - o[1]
                    if best is None or gain > best[0]:
                        best = (gain, name, o)
        if best is None:
            break
        _, name, o = best
        used += o[0] - chosen[name][0]
        chosen[name] = o
    return {name: o[2] for name, o in chosen.items()}


def _slope(a, b) -> float:
    return (a[1] - b[1]) / max(1, b[0] - a[0])


def make_plan(model_dir: Path, method: str, bases: int, group: int, target_bpw: float | None = None,
              rules=(), head: tuple[int, int] | None = None, calib_opts: dict | None = None,
              progress: bool = True, embed: tuple[int, int] | None = None) -> Plan:
    """The plan for every block linear of `model_dir` (and the head / token embedding when `head` /
    `embed` or a rule names them): pinned by the first matching rule, else chosen for the target, else
    the uniform (bases, group)."""
    if method not in LAYOUTS:
        raise PlanError(f"--method {method}: bit plans (--target-bpw, --tensor-type, --head-bases) work with "
                        f"{', '.join(LAYOUTS)}, whose layout they can price")
    if target_bpw is not None and not 0 < target_bpw <= 16:
        raise PlanError(f"--target-bpw {target_bpw}: must be in (0, 16]")
    lay = LAYOUTS[method]
    cfg = hf.load_config(Path(model_dir))
    n_layers, arch = int(cfg["num_hidden_layers"]), A.for_config(cfg)
    from safetensors import safe_open
    shapes = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "np") as sf:
            for k in sf.keys():
                shapes[k] = tuple(sf.get_slice(k).get_shape())
    if "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    rules = list(rules)
    if embed is not None:
        rules.insert(0, (r"^token_embd\.weight$", embed[0], embed[1]))
    if head is not None:
        rules.insert(0, (r"^output\.weight$", head[0], head[1]))
    names = {}                                  # {HF name: GGUF name} of the tensors the plan covers
    for k, shp in shapes.items():
        if k.endswith("rotary_emb.inv_freq") or len(shp) != 2:
            continue
        g = EDGE.get(k) or hf.gguf_name(k, n_layers, arch)
        if g.startswith("blk.") and category(g) or (k in EDGE and any(re.search(r[0], g) for r in rules)):
            names[k] = g
    plan = Plan(method=method, tensors={}, numel={}, target_bpw=target_bpw, rules=rules,
                shape={g: shapes[k] for k, g in names.items()})
    free = {}
    for k, g in names.items():
        plan.numel[g] = shapes[k][0] * shapes[k][1]
        rule = next(((n, gg) for p, n, gg in rules if re.search(p, g)), None)
        if rule is not None:
            n, gg = rule[0], rule[1] or group
            if not 1 <= n <= lay["max_bases"] or gg < 64 or gg % 64:
                raise PlanError(f"--tensor-type {g}={n}:{gg}: N must be 1..{lay['max_bases']} for {method}, "
                                f"G a multiple of 64")
            plan.tensors[g] = (n, gg)
        elif target_bpw is None:
            plan.tensors[g] = (bases, group)
        else:
            free[k] = g
    if free:
        options = {g: [(n, gg) for n in range(1, lay["max_bases"] + 1) for gg in GROUPS] for g in free.values()}
        sens = fisher_sensitivity(Path(model_dir), free, options, calib_opts or {}, progress)
        items = {g: [(tensor_bits(method, *plan.shape[g], *o), e, o) for o, e in sens[g].items()]
                 for g in free.values()}
        block = [g for g in names.values() if g.startswith("blk.")]
        fixed = sum(tensor_bits(method, *plan.shape[g], *plan.tensors[g]) for g in block if g in plan.tensors)
        budget = int(target_bpw * sum(plan.numel[g] for g in block)) - fixed
        try:
            plan.tensors.update(allocate(items, budget))
        except PlanError as e:
            raise PlanError(f"--target-bpw {target_bpw}: {e}; raise the target or loosen the --tensor-type rules") \
                from None
        plan.sensitivity = f"fisher {FISHER_SAMPLES}x{min(FISHER_SEQLEN, int((calib_opts or {}).get('seqlen') or FISHER_SEQLEN))}"
    return plan


class PlannedQuantizer:
    """A method with a plan: each tensor's quantizer is the method at that tensor's (N, G)."""

    def __init__(self, plan: Plan, extra: dict | None, cfg: dict):
        from .quant import get_quantizer
        self.plan, self.extra = plan, dict(extra or {})
        self.n_layers, self.arch = int(cfg["num_hidden_layers"]), A.for_config(cfg)
        self._get = get_quantizer
        self._cache = {}
        self.base = get_quantizer(plan.method, **self.extra)
        self.name, self.needs_hessian = self.base.name, self.base.needs_hessian

    def for_tensor(self, hf_name: str):
        g = EDGE.get(hf_name) or hf.gguf_name(hf_name, self.n_layers, self.arch)
        if g not in self.plan.tensors:
            raise PlanError(f"{hf_name} ({g}) is not in the plan")
        ng = self.plan.tensors[g]
        if ng not in self._cache:
            self._cache[ng] = self._get(self.plan.method, bases=ng[0], group=ng[1], **self.extra)
        return self._cache[ng]

    def covers(self, hf_name: str) -> bool:
        """Whether the plan quantizes the head or the token embedding (`hf_name`) too."""
        return EDGE.get(hf_name) in self.plan.tensors

    def quantize(self, w, hessian=None):
        raise PlanError("a planned quantizer quantizes through for_tensor(name)")

    def settings(self) -> dict:
        return dict(self.base.settings(), bases=None, group=None, plan=self.plan.to_settings())

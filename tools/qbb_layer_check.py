"""Does QBB's Hessian-weighted step 2 generalise beyond its calibration tokens? (issue 5, results §14)

For one linear of SmolLM2: inputs of 32 random 512-token windows of the calibration plays; H_cal from
the first 16, H_val from the other 16. Prints tr(ΔW H ΔWᵀ) per weight of the GPTQ N-bit start
(init=gptq) and after step 2, under both Hessians.

    python tools/qbb_layer_check.py 5 mlp.down_proj --bases 2 --group 192 --iters 100 --compensate 2
"""
import argparse

import torch

from bitbasis import data, hf
from bitbasis.quant import get_quantizer
from bitbasis.quant.qbb import groups_view, layer_loss, reconstruct


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("layer", type=int)
    ap.add_argument("name", help="e.g. self_attn.q_proj, mlp.down_proj")
    ap.add_argument("--bases", type=int, default=2)
    ap.add_argument("--group", type=int, default=192)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--compensate", type=int, default=2)
    ap.add_argument("--windows", type=int, default=32)
    a = ap.parse_args()
    d = hf.default_model_dir()
    model = hf.load_torch_model(d).eval()
    ids = hf.load_tokenizer(d)(data.read_text("calib"), return_tensors="pt").input_ids[0]
    starts = torch.randint(0, len(ids) - 512, (a.windows,), generator=torch.Generator().manual_seed(0))
    lin = dict(model.named_modules()).get(f"model.layers.{a.layer}.{a.name}")
    if lin is None:
        raise SystemExit(f"no linear model.layers.{a.layer}.{a.name}")
    xs = []
    hook = lin.register_forward_hook(lambda m, i, o: xs.append(i[0].reshape(-1, i[0].shape[-1]).double()))
    with torch.no_grad():
        for s in starts:
            model(ids[s:s + 512][None])
    hook.remove()
    x = torch.cat(xs)
    n = len(x) // 2
    h_cal, h_val = ((2 / n * x[k].T @ x[k]).float() for k in (slice(0, n), slice(n, 2 * n)))
    w = lin.weight.detach().float()
    wg, valid = groups_view(w, a.group)
    valid = valid.float()
    q = get_quantizer("qbb", bases=a.bases, group=a.group, init="gptq", rounds=0, iters=a.iters,
                      compensate=a.compensate)
    st = q.stages(w, h_cal)
    loss = {k: [float(layer_loss(wg, reconstruct(*st[i][1:]), valid, h)) for i in (0, -1)]
            for k, h in (("cal", h_cal), ("val", h_val))}
    print(f"L{a.layer} {a.name} N={a.bases} G={a.group} iters={a.iters} compensate={a.compensate}: "
          + "   ".join(f"{k} {b:.4g} -> {e:.4g} ({100 * (e / b - 1):+.1f}%)" for k, (b, e) in loss.items()))


if __name__ == "__main__":
    main()

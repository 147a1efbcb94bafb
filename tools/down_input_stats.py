"""What the online rotation does to ffn_down's input (docs/results.md §42): per layer of the f32 SmolLM2, on
4 x 512 calibration tokens, the peak-to-rms ratio max|x|/rms(x) per token (mean over tokens) and the engine's
int8 activation error ||q(x) - x|| / ||x|| (per block of 32, d = max|x|/127, kernels.h QActs), before and after
x <- H.x (rotate.online_transform, the block convert --online-rotation down picks, seed 0).

    PYTHONPATH=python python tools/down_input_stats.py
"""
import numpy as np
import torch

from bitbasis import hf, rotate
from bitbasis.calibrate import calibration_tokens, sample_windows


def int8_error(x: torch.Tensor) -> float:
    b = x.reshape(x.shape[0], -1, 32)
    a = b.abs().amax(-1, keepdim=True)
    q = torch.round(b * torch.where(a > 0, 127 / a, 0)).clamp(-127, 127) * a / 127
    return float((q - b).norm() / b.norm())


def peak(x: torch.Tensor) -> float:
    return float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())


def main() -> None:
    d = hf.default_model_dir()
    m = hf.load_torch_model(d)
    ids = sample_windows(calibration_tokens(hf.load_tokenizer(d), None), 4, 512, 0)
    xs = {}
    for i, layer in enumerate(m.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda mod, a, i=i: xs.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        m(torch.as_tensor(ids))
    block = rotate.online_block(m.config.intermediate_size)
    rows = []
    print(f"layer  max|x|/rms before after  int8 error before after  (block {block})")
    for i, x in sorted(xs.items()):
        y = rotate.online_transform(x.double(), block, 0).float()
        rows.append((peak(x), peak(y), int8_error(x), int8_error(y)))
        print(f"{i:5d}  {rows[-1][0]:8.2f} {rows[-1][1]:8.2f}  {rows[-1][2]:10.4f} {rows[-1][3]:8.4f}")
    r = np.array(rows)
    print("mean   " + " ".join(f"{v:.4f}" for v in r.mean(0)) + "   max " + " ".join(f"{v:.4f}" for v in r.max(0)))


if __name__ == "__main__":
    main()

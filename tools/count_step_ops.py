"""ATen ops dispatched per QAT training step (forward, backward, optimizer), the host-side work that bounds
a small model's step on a GPU (docs/results.md §31). Runs `distill` on the CPU for 2 and for 6 steps
(no evaluations, no checkpoint in between, the teacher data written before) under a counting
TorchDispatchMode and prints the difference / 4.
  PYTHONPATH=python python tools/count_step_ops.py MODEL_DIR START.gguf
MODEL_DIR: the file's teacher (for a rotated file, its rotated checkpoint)."""
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bitbasis.convert import quantized_from_file
from bitbasis.distill import DistillConfig, distill

VIEWS = {"aten.view", "aten._unsafe_view", "aten.t", "aten.expand", "aten.slice", "aten.select", "aten.unsqueeze",
         "aten.alias", "aten.detach", "aten.as_strided", "aten.transpose", "aten.split", "aten.permute",
         "aten.squeeze", "aten.reshape", "aten.split_with_sizes"}        # no kernel on a GPU


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    md, f = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["BITBASIS_CACHE"] = tmp                    # the teacher data written once, uncounted
        distill(md, quantized_from_file(f, md)[0], DistillConfig(steps=1, seqs=8, length=16, batch=2, gen_batch=8,
                train="signs", loss="cakld", swap=0, device="cpu", ckpt=f"{tmp}/1.pt"), progress=False)
        for steps in (2, 6):
            q, _ = quantized_from_file(f, md)
            cfg = DistillConfig(steps=steps, seqs=8, length=16, batch=2, gen_batch=8, train="signs", loss="cakld",
                                swap=0, device="cpu", ckpt=f"{tmp}/{steps}.pt", ckpt_every=1000)
            with Count() as c:
                distill(md, q, cfg, progress=False)
            res[steps] = c.n
    d = {k: (res[6][k] - res[2][k]) / 4 for k in res[6]}
    print(json.dumps({"per_step_ops": sum(d.values()), "per_step_non_view_ops": sum(v for k, v in d.items() if k not in VIEWS),
                      "top": sorted(((round(v, 1), k) for k, v in d.items() if k not in VIEWS), reverse=True)[:15]}))


if __name__ == "__main__":
    main()

"""What the token embedding and output head as N:G binary bases cost before any training: held-out
perplexity (torch, llama.cpp protocol) of the full-precision model, rotated as convert's default
rotation does, with only the embedding, only the head, or both replaced by distill's starting point for
`--embed-bases` / `--head-bases` (distill.outer_bases: ParetoQ's grid of the weights, nearest levels).
QAT starts from there and trains them with the linears (issue 19 item 4).
usage: python tools/embed_head_cost.py [--model smollm2] [--bases 4:64] [--windows 40]"""
from __future__ import annotations

import argparse
import json

import torch

from bitbasis import data, distill as D, format as bbf, hf
from bitbasis.hf import rotated_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--bases", default="4:64", help="N:G of embedding and head (default 4:64)")
    p.add_argument("--windows", type=int, default=40)
    a = p.parse_args()
    model_dir = rotated_checkpoint(hf.resolve_model_dir(a.model), 0, progress=None)
    tok = hf.load_tokenizer(model_dir)
    tokens = torch.tensor(tok(data.read_text("eval"), add_special_tokens=False)["input_ids"])
    model = hf.load_torch_model(model_dir).eval()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    start = D.outer_bases(model, {}, D.DistillConfig(embed_bases=a.bases, head_bases=a.bases), tied)
    fp = {k: (model.model.embed_tokens if k == D.EMBED else model.lm_head).weight.detach().clone() for k in start}
    q = {k: torch.from_numpy(bbf.dequantize(bb)) for k, bb in start.items()}
    dev = torch.device("cpu")
    rows = []
    for label, which in (("f32", ()), ("embedding", (D.EMBED,)), ("head", (D.HEAD,)), ("both", tuple(start))):
        for k in start:
            mod = model.model.embed_tokens if k == D.EMBED else model.lm_head
            mod.weight.data.copy_(q[k] if k in which else fp[k])
        if label != "f32" and not set(which) <= set(start):
            continue                                           # a tied model has one tensor
        ppl = D.eval_perplexity(model, tokens, a.windows, dev)
        rows.append({"quantized": label, "bases": a.bases, "tied": tied, "windows": a.windows, "ppl": round(ppl, 3)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

"""Where the main model's gradient comes from under the MTP-D objective.

For a checkpoint (and the same architecture freshly initialised), split the gradient on the main model's
parameters (embeddings, blocks, output projection: everything the heads share with the main head) into the
objective's three terms, on the same training windows:

    main CE                 CE(z0, t+1)
    heads' CE               sum_k alpha_k CE(zk, t+k+1)
    heads' KL               sum_k beta KL_k           (stop-gradient on the teacher: it reaches the main
                                                       model only through what the heads share with it)

and print each term's norm and its cosine with the main CE's gradient. A KL gradient as large as the main
CE's, and not aligned with it, is a pull on the main model away from its own objective.

    python benchmarks/gradient_shares.py --ckpt RUN [--batches 8] [--beta 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from mtpd.checkpoint import load_checkpoint
from mtpd.config import LossConfig
from mtpd.data import validation_windows
from mtpd.losses import mtp_d_loss
from mtpd.model import MTPModel
from mtpd.run import tokenized_corpus

TERMS = ("main CE", "heads' CE", "heads' KL")


def term_gradients(model: MTPModel, windows: torch.Tensor, loss_cfg: LossConfig, top_n: int | None) -> dict:
    """Each term's gradient on the main model's parameters, flattened and summed over `windows`."""
    params = list(model.main.parameters())
    totals = {term: torch.zeros(sum(p.numel() for p in params)) for term in TERMS}
    K = model.num_heads
    alpha, beta = loss_cfg.alpha_lambda / K, loss_cfg.resolved_beta(K)
    for window in windows.split(8):
        main_logits, head_logits = model(window[:, :-1])
        terms = mtp_d_loss(window, main_logits, head_logits, loss_cfg, top_n)
        losses = {"main CE": terms.main_ce, "heads' CE": alpha * sum(terms.head_ce),
                  "heads' KL": beta * sum(terms.head_kl)}
        for term, loss in losses.items():
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            totals[term] += torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                       for g, p in zip(grads, params)])
    return totals


def shares(totals: dict) -> dict:
    main = totals["main CE"].double()
    return {term: {"norm": float(g.norm()), "cosine_with_main_ce": float(torch.nn.functional.cosine_similarity(
        g.double(), main, dim=0))} for term, g in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run directory or checkpoint of a built-in model")
    parser.add_argument("--batches", type=int, default=8, help="batches of 8 validation windows (default: 8)")
    parser.add_argument("--beta", type=float, default=None, help="KL weight (default: the checkpoint's)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.ckpt)
    loss_cfg = LossConfig(**checkpoint.config["loss"])
    if args.beta is not None:
        loss_cfg = dataclasses.replace(loss_cfg, beta=args.beta)
    data = tokenized_corpus(checkpoint.config.get("data", {}).get("path"), tokenizer=checkpoint.tokenizer,
                            splits=("val",))
    seq_len = checkpoint.config.get("train", {}).get("seq_len") or checkpoint.model.cfg.max_seq_len
    windows = validation_windows(data.val, seq_len, 8 * args.batches).long()
    top_n = checkpoint.config["state"].get("top_n")
    torch.manual_seed(0)
    fresh = MTPModel(checkpoint.model.cfg)
    report = {"checkpoint": str(checkpoint.path), "beta": loss_cfg.resolved_beta(checkpoint.model.num_heads),
              "alpha_lambda": loss_cfg.alpha_lambda, "top_n": top_n, "windows": len(windows), "seq_len": seq_len}
    for name, model in (("trained", checkpoint.model), ("initialised", fresh)):
        report[name] = shares(term_gradients(model.train(), windows, loss_cfg, top_n))
        print(f"{name} model: gradient on the main model's parameters (beta {report['beta']})")
        for term, figures in report[name].items():
            print(f"  {term:10s} norm {figures['norm']:9.4f}   cosine with main CE {figures['cosine_with_main_ce']:+.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

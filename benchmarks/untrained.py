"""The model a cost benchmark times: a built-in preset or a Hugging Face backbone, with untrained heads (their
weights do not change what a pass costs). Shared by decode_costs.py and compiled_decoding.py."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from mtpd.config import preset
from mtpd.model import MTPModel


def add_model_source(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="small", help="a built-in preset (default: small)")
    source.add_argument("--hf", help="a Llama-family model mtpd's decoder runs: directory, .gguf file or `smollm2`")


def untrained_heads_model(args: argparse.Namespace, heads: int, max_seq_len: int, draft_vocab: int = 0) -> MTPModel:
    """`heads` freshly initialised heads (seed 0) on --preset or --hf, in eval mode; `draft_vocab` > 0 gives the
    heads an output layer over that many tokens."""
    torch.manual_seed(0)
    if args.hf:
        from mtpd.model.backbone import load_backbone

        backbone = load_backbone(args.hf, max_seq_len=max_seq_len)
        cfg = backbone.head_config(heads)
    else:
        backbone, cfg = None, preset(args.preset, mtp_heads=heads)
    if draft_vocab:
        cfg = dataclasses.replace(cfg, draft_vocab=draft_vocab)
    return MTPModel(cfg, backbone).eval()

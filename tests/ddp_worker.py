"""Trains a micro model a few steps in every training mode and records what each rank ends with.

Launched by tests/test_distributed.py as

    torchrun --nproc-per-node 2 tests/ddp_worker.py OUT_DIR PER_RANK_BATCH

(both strategies, DDP and FSDP2, in one launch), and imported there for the single-process reference with
the same global batch. Every rank writes OUT_DIR/<strategy>-<mode>/rank<r>.pt: its parameters (DDP only:
FSDP2 ranks hold shards) and the global loss of the last step; rank 0's checkpoint holds the whole model.
"""

import sys
from pathlib import Path

import torch

from conftest import SAMPLE_TEXT
from mtpd import distributed
from mtpd.config import LossConfig, preset
from mtpd.data import train_tokenizer
from mtpd.model import MTPModel
from mtpd.train import Trainer, TrainConfig

STEPS = 10  # the trainer logs the global training loss every 10 steps
MODES = {"joint": {}, "head_only": {"freeze_main": True}, "looped": {"freeze_main": True, "frozen_heads": 1}}


def train_modes(out_dir: Path, batch_size: int, fsdp: bool = False) -> None:
    tokenizer = train_tokenizer([SAMPLE_TEXT], 300)
    stream = torch.tensor(tokenizer.encode(SAMPLE_TEXT).ids, dtype=torch.int32).repeat(20)
    for mode, overrides in MODES.items():
        run_dir = Path(out_dir) / f"{'fsdp' if fsdp else 'ddp'}-{mode}"
        cfg = TrainConfig(batch_size=batch_size, seq_len=32, lr=3e-3, warmup_steps=3, max_steps=STEPS,
                          eval_every=STEPS // 2, save_every=STEPS // 2, eval_windows=8, **overrides)
        torch.manual_seed(0)
        model = MTPModel(preset("micro", mtp_heads=2, vocab_size=tokenizer.get_vocab_size()))
        trainer = Trainer(model, tokenizer, stream, stream, cfg, LossConfig(), run_dir, show_progress=False,
                          fsdp=fsdp)
        trainer.fit()
        params = {} if fsdp else {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        torch.save({"params": params, "step": trainer.step, "tokens_seen": trainer.tokens_seen,
                    "val_loss": trainer.last_eval["val_loss"]}, run_dir / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, per_rank_batch = Path(sys.argv[1]), int(sys.argv[2])
    with distributed.process_group(torch.device("cpu")):
        train_modes(out, per_rank_batch, fsdp=False)
        train_modes(out, per_rank_batch, fsdp=True)

"""What a head-only training step costs on a real model, and where the time goes (README, "Head-only
training on a real model"; docs/design.md §3.2).

One optimizer step (forward, loss, backward, clipping, AdamW) of K heads on a frozen Hugging Face model, in
one process, the variants interleaved and repeated on the same windows, medians of CPU seconds (process
time: on a shared machine the wall clock also counts other jobs) and wall seconds:

    before, fp32                the step as it was: the main head over the whole vocabulary [B, T, V], its CE,
                                the KL's teacher gathered from it (losses.mtp_d_loss)
    before, bf16 autocast       the same under `--dtype bf16` (the frozen model's fp32 weights autocast)
    after, fp32                 Trainer's head-only step: the teacher scores the draft vocabulary only, no main CE
    after, bf16                 the same with the frozen model held in bf16 (what `--dtype auto` picks on a CPU
                                with native bf16), heads in fp32 under autocast
    after, bf16, teacher cache  the same reading h0 from the teacher cache (--teacher-cache, a later run)

then the phases of one `after, bf16` step.

    python benchmarks/head_training_speed.py --hf smollm2 --threads 1 --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtpd.config import LossConfig
from mtpd.losses import heads_loss, mtp_d_loss
from mtpd.model import MTPModel
from mtpd.model.backbone import load_backbone
from mtpd.model.draft_vocab import draft_index_map, most_frequent_tokens
from mtpd.model.source import load_tokenizer, resolve_source
from mtpd.run import tokenized_corpus
from mtpd.train import Trainer, TrainConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", default="smollm2")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    source = resolve_source(args.hf)
    data = tokenized_corpus(None, tokenizer=load_tokenizer(source))
    tokens = data.train[: 200 * args.seq_len]
    loss_cfg = LossConfig()

    def trainer(dtype: str, cache: bool, out: Path) -> Trainer:
        backbone = load_backbone(source)
        cfg = dataclasses.replace(backbone.head_config(args.heads), draft_vocab=args.draft_vocab)
        torch.manual_seed(0)
        model = MTPModel(cfg, backbone)
        model.draft_vocab.assign(most_frequent_tokens(data.train, cfg.vocab_size, args.draft_vocab)[0])
        train = TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, max_steps=10**6, dtype=dtype,
                            freeze_main=True, teacher_cache=cache, warmup_steps=1)
        t = Trainer(model, data.tokenizer, tokens, data.val[: 8 * args.seq_len], train, loss_cfg, out,
                    show_progress=False)
        if cache:
            t.teacher_cache.directory = out / "teacher"
        return t

    def before(t: Trainer):
        """The former head-only step: the whole main head, then the reference objective."""
        def step():
            window = t.batches.next_batch()
            with torch.autocast("cpu", dtype=t.autocast, enabled=t.autocast is not None):
                main_logits, head_logits = t.model(window[:, :-1])
                terms = mtp_d_loss(window, main_logits, head_logits, t.objective, t.top_n, t.model.draft_ids)
            terms.total.backward()
            torch.nn.utils.clip_grad_norm_(t.params, 1.0)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        return step

    with tempfile.TemporaryDirectory() as tmp:
        fp32, bf16_autocast = trainer("fp32", False, Path(tmp) / "a"), trainer("bf16", False, Path(tmp) / "b")
        bf16_autocast.model.main.float()  # the former --dtype bf16: fp32 weights, autocast at every matmul
        bf16, cached = trainer("auto", False, Path(tmp) / "c"), trainer("auto", True, Path(tmp) / "d")
        for t in (fp32, bf16_autocast, bf16, cached):
            t.top_n = None  # what the mass rule gives SmolLM2 over its draft vocabulary: the whole of it
        variants = {"before, fp32": before(fp32), "before, bf16 autocast": before(bf16_autocast),
                    "after, fp32": fp32.train_step, "after, bf16": bf16.train_step,
                    "after, bf16, teacher cache": cached.train_step}
        for step in variants.values():  # warm-up; fills the cache with the windows of the first rounds
            step()
        for _ in range(args.reps):
            cached.train_step()
        cached.batches.epoch = cached.batches.position = 0
        cached.train_step()
        times = {name: [] for name in variants}
        for _ in range(args.reps):
            for name, step in variants.items():
                cpu, wall = time.process_time(), time.perf_counter()
                step()
                times[name].append((time.process_time() - cpu, time.perf_counter() - wall))
        n = args.batch_size * args.seq_len
        print(f"{args.hf}, {args.heads} heads, batch {args.batch_size} x {args.seq_len}, draft vocabulary "
              f"{args.draft_vocab}, {args.threads} thread(s), medians of {args.reps}; teacher cache hits "
              f"{cached.teacher_cache.hits}, misses {cached.teacher_cache.misses}")
        print(f"{'variant':28s} {'CPU s':>7s} {'tokens/CPU-s':>13s} {'wall s':>7s} {'tokens/s':>9s}")
        for name, values in times.items():
            cpu, wall = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
            print(f"{name:28s} {cpu:7.2f} {n / cpu:13.0f} {wall:7.2f} {n / wall:9.0f}")
        print_phases(bf16, args.reps)


def print_phases(t: Trainer, reps: int) -> None:
    """CPU seconds of each phase of the default head-only step (medians)."""
    model, phases = t.model, {}

    def tick(name: str, started: float) -> float:
        now = time.process_time()
        phases.setdefault(name, []).append(now - started)
        return now

    for _ in range(reps):
        window = t.batches.next_batch()
        inputs = window[:, :-1]
        at = time.process_time()
        with torch.autocast("cpu", dtype=t.autocast, enabled=t.autocast is not None):
            with torch.no_grad():
                h0 = model.main(inputs)
                at = tick("teacher: main model -> h0", at)
                teacher = model.draft_vocab.logits(model.main.final_norm(h0), model.main)
                at = tick("teacher: logits over V'", at)
            _, head_logits = model(inputs, main_scores="none", h0=h0)
            at = tick("heads forward (blocks + output layers)", at)
            index = draft_index_map(model.draft_ids, model.cfg.vocab_size)
            terms = heads_loss(window, teacher, head_logits, t.objective, t.top_n, index)
            at = tick("loss: top-N, softmaxes, KL, CE", at)
        terms.total.backward()
        at = tick("backward", at)
        torch.nn.utils.clip_grad_norm_(t.params, 1.0)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        tick("clip + AdamW", at)
    total = sum(statistics.median(v) for v in phases.values())
    print(f"\nphases of 'after, bf16' (CPU s, medians; {total:.2f} s in all)")
    for name, values in phases.items():
        print(f"  {name:42s} {statistics.median(values):6.2f}  {statistics.median(values) / total:5.1%}")


if __name__ == "__main__":
    main()

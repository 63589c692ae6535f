"""`mtpd demo`: the whole method on the built-in default, end to end, in under ten minutes on 2 CPU cores.

Train the `demo` preset (config.py: tiny's size, deeper) with 4 MTP-D heads on the Python standard library,
evaluate it teacher-forced, then benchmark speculative decoding against KV-cached autoregressive decoding on
validation prompts, drafting with the number of heads and the draft threshold calibrated on other validation
prompts (`mtpd bench --heads auto --draft-threshold auto`), and write the bench report (docs/design.md §6
fields) to the run directory as bench.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from mtpd.atomic import write_json
from mtpd.bench import BenchConfig, bench_table, run_benchmark
from mtpd.checkpoint import load_checkpoint
from mtpd.config import LossConfig, preset
from mtpd.report import eval_table
from mtpd.run import benchmark_prompts, pretrain, resolve_device
from mtpd.train import TrainConfig

PRESET = "demo"
PROMPTS = 16  # benchmark prompts: a greedy continuation's predictability varies a lot from prompt to prompt


def run_demo(out_dir: str = "runs/demo", time_budget: float = 360, device: str = "auto") -> int:
    started = time.perf_counter()
    print(f"== mtpd demo: `{PRESET}` preset + 4 MTP-D heads on the Python standard library, "
          f"{time_budget:.0f}s of training")
    model_cfg = preset(PRESET, mtp_heads=4)
    train_cfg = TrainConfig(batch_size=8, seq_len=128, lr=3e-3, warmup_steps=30, time_budget=time_budget,
                            eval_every=100, save_every=100)
    metrics, path = pretrain(model_cfg, train_cfg, LossConfig(), out_dir, resume=True, device=device)
    print("\n== evaluation on the validation split (teacher-forced)")
    print(eval_table(metrics))

    print(f"\n== speculative decoding vs KV-cached autoregressive decoding: {PROMPTS} validation prompts, 128 new "
          f"tokens, greedy;\n   heads and draft threshold calibrated on 16 other validation prompts")
    checkpoint = load_checkpoint(path, resolve_device(device))
    # The no-cache baseline (the paper's setting) is left to `mtpd bench`: the demo shows the honest one.
    cfg = BenchConfig(max_new_tokens=128, rounds=2, no_cache_baseline=False, auto_heads=True, auto_threshold=True)
    prompts = benchmark_prompts(checkpoint, num_prompts=PROMPTS, prompt_tokens=64)
    calibration = benchmark_prompts(checkpoint, num_prompts=cfg.calibration_prompts, prompt_tokens=64, offset=0.5)
    report = run_benchmark(checkpoint, prompts, cfg, calibration_prompts=calibration.prompts)
    print(bench_table(report))
    bench_json = Path(out_dir) / "bench.json"
    write_json(bench_json, report)
    print(f"\nbench report: {bench_json}\ncheckpoint: {path}\ntotal wall time: {time.perf_counter() - started:.0f}s")
    return 0

"""The `mtpd` command line. Thin: it parses flags, builds configs and calls library functions.

Every command also runs as `python -m mtpd ...`. User-fixable problems print one line, `error: ...`,
and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from pathlib import Path

from mtpd.atomic import write_json
from mtpd.config import (DRAFT_THRESHOLD, DRAFT_THRESHOLDS, HEAD_INIT_ON_PRETRAINED, LOOKUP_TOKENS, PRESETS,
                         TEACHER_CACHE_MIN_FREE_BYTES, LossConfig, preset)
from mtpd.errors import MtpdError

EPILOG_TRAIN = """examples:
  mtpd train --preset tiny --heads 4 --time-budget 300 --out runs/tiny      # MTP-D on the stdlib corpus
  mtpd train --preset tiny --heads 4 --beta 0 --max-tokens 500000           # the plain MTP baseline
  mtpd train --preset small --data my_corpus/ --max-tokens 3000000 --out runs/small
  mtpd train --out runs/tiny --resume                                       # continue an interrupted run
  mtpd train --out runs/tiny --resume --max-steps 4000                      # continue it to a larger budget
  mtpd train --hf ~/models/my-llama --heads 4 --data my_corpus/ --time-budget 600   # heads on your own model
  mtpd train --hf smollm2 --heads 4 --time-budget 5100 --out runs/smollm2   # a chat model: 40% of the time
                                                      # makes its own conversations (distill-data), then trains
  torchrun --nproc-per-node 2 -m mtpd train --preset tiny --max-steps 1000  # 2 processes: DDP, batch 2 x 16
"""


EPILOG_EXTEND = """examples:
  mtpd extend --ckpt runs/small-k4 --to 8 --out runs/small-k8             # 20% of the base run's tokens
  mtpd extend --ckpt runs/small-k8 --to 16 --out runs/small-k16 --max-tokens 1000000
  mtpd extend --ckpt runs/small-k4 --to 8 --out runs/small-k8 --resume    # continue an interrupted one
"""


EPILOG_EXPERIMENT = """examples:
  mtpd experiment --suite paper --scale quick --out runs/exp-quick
  mtpd experiment --suite looped --scale full --out runs/exp-looped
  mtpd experiment --suite mtp-vs-mtpd --preset tiny --tokens 1000000 --data my_corpus/
"""


EPILOG_DISTILL = """examples:
  mtpd distill-data --hf smollm2 --out data/smollm2-chat.jsonl --time-budget 1200     # 20 minutes of it
  mtpd distill-data --hf smollm2 --out data/smollm2-chat.jsonl --samples 2000 --resume
  mtpd train --hf smollm2 --heads 4 --data data/smollm2-chat.jsonl --time-budget 3600 --out runs/smollm2-chat
"""


FSDP_HELP = ("under torchrun: shard parameters, gradients and optimizer state over the processes (FSDP2) instead of "
             "replicating the model on each (DDP, the default)")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model (preset values unless overridden)")
    m.add_argument("--hf", metavar="PATH", help="train heads only, on this local Hugging Face causal LM (frozen, "
                                                "the teacher; its tokenizer is used); the shape flags do not apply")
    m.add_argument("--preset", default="tiny", help=f"named model shape: {', '.join(PRESETS)} (default: tiny)")
    m.add_argument("--heads", type=int, default=4, help="number K of cascaded MTP heads (default: 4)")
    m.add_argument("--vocab-size", type=int, help="vocabulary of the BPE tokenizer trained on the corpus (a small "
                                                  "corpus may give fewer tokens; ignored with --tokenizer)")
    m.add_argument("--d-model", type=int, help="hidden size")
    m.add_argument("--n-layers", type=int, help="transformer blocks of the main model")
    m.add_argument("--attn-heads", type=int, help="attention heads")
    m.add_argument("--kv-heads", type=int, help="key/value heads (< --attn-heads: grouped-query attention)")
    m.add_argument("--ffn-dim", type=int, help="SwiGLU hidden size")
    m.add_argument("--max-seq-len", type=int, help="context length (with --hf: a cap on the model's, default 4096)")
    m.add_argument("--draft-vocab", type=int, metavar="N",
                   help="the heads score only the N most frequent tokens of the training data (decoding stays "
                        "lossless; the id map is saved with the heads). Default: 8192 for vocabularies above 16,384 "
                        "tokens, else the full vocabulary. On SmolLM2 (49,152 tokens) the top 8,192 stdlib tokens "
                        "cover 97.9%% of held-out stdlib tokens and 83%% of English license text, and a bf16 head "
                        "output layer + softmax over them costs 1.4 ms instead of 8.8 (16,384: 99.8%%, 94%%, 3.0 ms)")
    m.add_argument("--independent-heads", action="store_true",
                   help="the baseline: independent (parallel, Meta-style) heads, each reading only the main model's "
                        "hidden state, instead of the cascaded MTP-D heads (the default; docs/design.md §1.2)")
    m.add_argument("--head-init", choices=["random", "last-block"],
                   help="how heads on a pretrained model (--hf) start: last-block copies the main model's last block "
                        f"into every head; random as in joint pretraining (the only choice without --hf). Default "
                        f"with --hf: {HEAD_INIT_ON_PRETRAINED} (README, Head-only training)")

    d = p.add_argument_group("data")
    d.add_argument("--data", help="text file, directory (recursive) or .jsonl with a 'text' field (default: the "
                                  "Python standard library's source code; with --hf on a chat model and "
                                  "--time-budget, the model's own conversations, made first into OUT/chat.jsonl by "
                                  "`mtpd distill-data` in 40%% of the budget)")
    d.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a byte-level BPE on the corpus)")

    b = p.add_argument_group("budget (the first one reached stops training; totals for the run, so with --resume "
                             "they extend it)")
    _add_budget_flags(b)

    o = p.add_argument_group("optimization")
    o.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch (default: 16)")
    o.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    o.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    o.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (default: 50)")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices (default: 0.1)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default: 1.0)")
    o.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on CUDA, and with --hf also on a CPU that computes bf16 natively (the "
                        "frozen model is then held in bf16, the heads keep fp32 weights); else fp32")
    o.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction,
                   help="with --hf (the default there): keep the frozen model's hidden states of every training "
                        "window on disk ($MTPD_CACHE, else ~/.cache/mtpd; SmolLM2 in bf16: 1.2 GB per million "
                        "tokens) and read them when a window comes again (a later epoch, another run on the same "
                        "data), which then skips the model, about half of a step; nothing is stored while its disk has "
                        f"less than {TEACHER_CACHE_MIN_FREE_BYTES >> 30} GiB free")
    o.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order (default: 0)")

    l = p.add_argument_group("MTP-D objective (docs/design.md §2)")
    l.add_argument("--beta", type=float, help="KL weight per head (default: the paper's, 1.0 with one head and 0.5 "
                                              "with more; 0 = plain MTP; on small models 0.05-0.1 kept most of the "
                                              "acceptance gain at no or ~1%% main-head loss, see README)")
    l.add_argument("--alpha-lambda", type=float, default=0.3, help="head CE weight lambda; alpha_k = lambda/K (default: 0.3)")
    l.add_argument("--top-n", type=int, help="KL over the teacher's top-N logits; >= vocab = full KL "
                                             "(default: smallest N covering --top-mass)")
    l.add_argument("--top-mass", type=float, default=0.995, help="teacher mass the default top-N covers (default: 0.995)")
    l.add_argument("--kl", default="forward", choices=["forward", "reverse"], help="forward: KL(teacher || head); reverse: KL(head || teacher) (default: forward)")
    l.add_argument("--kl-temperature", type=float, default=1.0, help="softmax temperature of the KL term (default: 1.0)")
    l.add_argument("--no-stop-grad", action="store_true",
                   help="ablation: let the KL term's gradient reach the main head")

    r = p.add_argument_group("run")
    r.add_argument("--out", help="run directory (default: runs/<preset>-k<heads>)")
    r.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint, with its saved configuration; only "
                        "budget flags given now replace the saved budget, and other settings flags must match the "
                        "run's (a fresh run if --out has no checkpoint)")
    r.add_argument("--eval-every", type=int, default=100, help="steps between evaluations (default: 100)")
    r.add_argument("--eval-windows", type=int, default=32, help="validation sequences per evaluation (default: 32)")
    r.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (default: 200)")
    r.add_argument("--keep-checkpoints", type=int, default=2, help="checkpoints kept in the run (default: 2)")
    _add_device_flag(r)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--fsdp", action="store_true", help=FSDP_HELP)


def _loss_config(args) -> LossConfig:
    return LossConfig(alpha_lambda=args.alpha_lambda, beta=args.beta, top_n=args.top_n, top_mass=args.top_mass,
                      kl_direction=args.kl, temperature=args.kl_temperature, stop_grad=not args.no_stop_grad).validate()


def _train_config(args):
    from mtpd.train import TrainConfig

    return TrainConfig(batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       max_steps=args.max_steps, max_tokens=args.max_tokens, time_budget=args.time_budget,
                       eval_every=args.eval_every, eval_windows=args.eval_windows, save_every=args.save_every,
                       keep_checkpoints=args.keep_checkpoints, seed=args.seed, dtype=args.dtype,
                       head_init=args.head_init or (HEAD_INIT_ON_PRETRAINED if args.hf else "random"),
                       teacher_cache=bool(args.hf) if args.teacher_cache is None else args.teacher_cache).validate()


def cmd_train(args) -> int:
    from mtpd.distill import own_conversations
    from mtpd.run import pretrain, train_heads

    if args.heads < 1:
        raise MtpdError(f"--heads must be >= 1 (got {args.heads})")
    if args.hf:
        _check_no_shape_flags(args)
    elif args.head_init not in (None, "random") or args.teacher_cache:
        raise MtpdError(f"{'--teacher-cache' if args.teacher_cache else '--head-init ' + args.head_init} applies to "
                        f"heads on a frozen pretrained model: add --hf MODEL, or drop it for joint pretraining")
    else:
        model_cfg = preset(args.preset, mtp_heads=args.heads, vocab_size=args.vocab_size, d_model=args.d_model,
                           n_layers=args.n_layers, n_heads=args.attn_heads, n_kv_heads=args.kv_heads,
                           ffn_dim=args.ffn_dim, max_seq_len=args.max_seq_len,
                           independent_heads=args.independent_heads or None)
        model_cfg = dataclasses.replace(model_cfg, draft_vocab=_draft_vocab(args, model_cfg.vocab_size))
    if args.draft_vocab is not None and args.draft_vocab < 1:  # with --hf the vocabulary is known once it loads
        raise MtpdError(f"--draft-vocab must be >= 1 (got {args.draft_vocab}): the heads score the N most frequent "
                        f"tokens")
    train_cfg, loss_cfg = _train_config(args), _loss_config(args)  # every flag is checked before any work
    if not args.resume and not any(v is not None for v in train_cfg.budget.values()):
        raise MtpdError("no training budget: pass --max-steps N, --max-tokens N or --time-budget SECONDS")
    out = args.out or (f"runs/hf-{Path(args.hf).resolve().name}-k{args.heads}" if args.hf else
                       f"runs/{args.preset}-k{args.heads}")
    if args.resume:
        def asked(saved: dict) -> dict:
            from mtpd.checkpoint import is_head_only

            model = {"mtp_heads": args.heads} if args.hf or is_head_only(saved) else dataclasses.asdict(model_cfg)
            model["independent_heads"] = args.independent_heads
            model["draft_vocab"] = _draft_vocab(args, saved["model"]["vocab_size"])  # the run's vocabulary
            settings = {**model, **dataclasses.asdict(loss_cfg), **dataclasses.asdict(train_cfg)}
            return {k: v for k, v in settings.items() if k not in {*train_cfg.budget, *NOT_SET_BY_FLAGS}}

        _refuse_settings_on_resume(args, Path(out), asked)
    data = args.data
    if data is None and (args.hf or args.resume) and not args.fsdp:  # (FSDP with --hf: refused in train_heads)
        data, train_cfg = own_conversations(args.hf, out, train_cfg, args.device, not args.quiet)
    if args.hf:
        metrics, path = train_heads(args.hf, args.heads, train_cfg, loss_cfg, out, data, resume=args.resume,
                                    device=args.device, max_seq_len=args.max_seq_len, show_progress=not args.quiet,
                                    fsdp=args.fsdp, draft_vocab=args.draft_vocab,
                                    independent_heads=args.independent_heads)
    else:
        metrics, path = pretrain(model_cfg, train_cfg, loss_cfg, out, data, args.tokenizer, resume=args.resume,
                                 device=args.device, show_progress=not args.quiet, fsdp=args.fsdp)
    _print_training_result(metrics, path)
    return 0


# Flags that keep their meaning with --resume: where things are now, how to run, and the budget (which extends
# the run). Any other flag given must describe the saved run, or it is refused (_refuse_settings_on_resume).
RESUME_FLAGS = frozenset({"out", "resume", "ckpt", "to", "data", "hf", "device", "quiet", "fsdp",
                          "max_steps", "max_tokens", "time_budget"})
# Saved settings that no flag sets: the kind of run decides them (frozen parts), or the tokenizer (vocab_size).
def _draft_vocab(args, vocab_size: int) -> int:
    """ModelConfig.draft_vocab for --draft-vocab and this vocabulary (0: the full one)."""
    from mtpd.model.draft_vocab import resolve_draft_vocab

    return resolve_draft_vocab(args.draft_vocab, vocab_size)


NOT_SET_BY_FLAGS = frozenset({"freeze_main", "frozen_heads", "main_weight", "vocab_size"})


def _refuse_settings_on_resume(args, out: Path, asked) -> None:
    """A resumed run keeps its saved settings, so a settings flag given with --resume would be ignored: refuse
    it, unless the settings this command asks for, `asked(saved config)` (defaults included), are the saved
    ones, as with the same command plus --resume (what the interrupt message suggests)."""
    from mtpd.checkpoint import list_checkpoints, read_config

    flags = sorted(args.flags_given - RESUME_FLAGS)
    checkpoints = list_checkpoints(out)
    if not flags or not checkpoints:  # nothing to check, or a new run starts in --out with these flags
        return
    config = read_config(checkpoints[-1][1])
    saved = {**config.get("model", {}), **config.get("loss", {}), **config.get("train", {})}
    differ = [f"{name} {value}, saved {saved.get(name)}" for name, value in asked(config).items()
              if value != saved.get(name)]
    if differ:
        given = " ".join(f"--{dest.replace('_', '-')}" + ("" if isinstance(getattr(args, dest), bool) else
                                                          f" {getattr(args, dest)}") for dest in flags)
        raise MtpdError(f"{given} {'does' if len(flags) == 1 else 'do'} not apply with --resume: a resumed run keeps "
                        f"its saved settings, and this command (defaults included) asks for others "
                        f"({'; '.join(differ)}); only budget flags (--max-steps, --max-tokens, --time-budget) extend "
                        f"a run: drop the others, or start a new run with another --out to change them")


def _check_no_shape_flags(args) -> None:
    given = [f"--{name.replace('_', '-')}" for name in ("vocab_size", "d_model", "n_layers", "attn_heads", "kv_heads",
                                                        "ffn_dim", "tokenizer") if getattr(args, name) is not None]
    if given:
        raise MtpdError(f"{', '.join(given)} cannot be combined with --hf: the model and its tokenizer come from the "
                        f"--hf directory")


def _print_training_result(metrics: dict, path) -> None:
    from mtpd.distributed import is_main_process
    from mtpd.report import eval_table

    if is_main_process():  # under torchrun: one report, not one per process
        print(eval_table(metrics))
        print(f"checkpoint: {path}")


def cmd_eval(args) -> int:
    from mtpd.report import eval_table
    from mtpd.run import evaluate_checkpoint

    _check_json_path(args.json)
    metrics, _ = evaluate_checkpoint(args.ckpt, args.data, args.seq_len, args.windows, args.device, args.hf,
                                     args.dtype)
    print(f"{metrics['checkpoint']}  on {metrics['data']} validation ({metrics['val_tokens']:,} tokens), "
          f"{metrics['dtype']} ({metrics['dtype_reason']})")
    print(eval_table(metrics))
    if args.json:
        _write_json(args.json, metrics)
    return 0


def cmd_extend(args) -> int:
    from mtpd.run import extend, fraction_budget

    if args.to < 2:
        raise MtpdError(f"--to must be >= 2 (got {args.to})")
    budget = {"max_steps": args.max_steps, "max_tokens": args.max_tokens, "time_budget": args.time_budget}
    if args.resume and not any(v is not None for v in budget.values()):  # else --fraction means nothing anyway
        _refuse_settings_on_resume(args, Path(args.out), lambda saved: fraction_budget(saved.get("history"),
                                                                                       args.fraction) or budget)
    metrics, path = extend(args.ckpt, args.to, args.out, budget, args.fraction, args.data, args.resume, args.device,
                           show_progress=not args.quiet, fsdp=args.fsdp)
    _print_training_result(metrics, path)
    return 0


def cmd_generate(args) -> int:
    from mtpd.run import generate_text, load_for_decoding

    checkpoint, _ = load_for_decoding(args.ckpt, args.device, args.hf, args.dtype)
    emit = lambda text: print(text, end="", flush=True)  # noqa: E731
    stats = generate_text(checkpoint, args.prompt, args.max_new_tokens, args.heads, not args.no_spec,
                          args.temperature, args.top_k, args.top_p, args.seed, args.draft_threshold,
                          args.tree_shape, emit, chat=args.chat, compile=args.compile,
                          lookup_tokens=args.lookup_tokens if _generate_looks_up(args) else None)
    tau = f", {stats['mean_accepted_tokens']:.2f} tokens per main-model pass" if "mean_accepted_tokens" in stats else ""
    compiled = ""
    if args.compile:
        more = stats["graphs_compiled_while_timed"]
        compiled = (f"; compiled: warm-up {stats['compile_seconds']:.1f}s, {stats['compiled_graphs']} graphs"
                    + (f", {more} more while decoding" if more else ""))
    print(f"\n[{stats['new_tokens']} tokens in {stats['seconds']:.2f}s: {stats['tokens_per_s']:.1f} tokens/s{tau}; "
          f"{stats['dtype']}{compiled}]", file=sys.stderr)
    return 0


def _generate_looks_up(args) -> bool:
    """generate's --lookup: as given, else on unless a tree drafts (an explicit --lookup with one is an error)."""
    return args.lookup if args.lookup is not None else args.tree_shape is None


def _or_auto(convert, what: str):
    """An argparse type: the word 'auto' (calibrate it), or a value `convert` parses."""
    def parse(value: str):
        if value == "auto":
            return value
        try:
            return convert(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'auto', got '{value}'") from None
    return parse


def cmd_bench(args) -> int:
    from mtpd.bench import BenchConfig, bench_table, check_tree, run_benchmark
    from mtpd.run import benchmark_prompts, load_for_decoding

    auto_heads, auto_threshold = args.heads == "auto", args.draft_threshold == "auto"
    cfg = BenchConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                      num_heads=None if auto_heads else args.heads, auto_heads=auto_heads,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, rounds=args.rounds,
                      no_cache_baseline=not args.skip_no_cache, peers=not args.skip_peers, seed=args.seed,
                      draft_threshold=DRAFT_THRESHOLD if auto_threshold else args.draft_threshold,
                      auto_threshold=auto_threshold, tree=args.tree or args.tree_dynamic or args.tree_shape is not None,
                      tree_shape=args.tree_shape, tree_nodes=args.tree_nodes,
                      tree_dynamic=args.tree_dynamic, second_turns=not args.first_turn_only,
                      compile=args.compile, lookup=args.lookup, lookup_tokens=args.lookup_tokens).validate()
    _check_json_path(args.json)
    checkpoint, dtype_reason = load_for_decoding(args.ckpt, args.device, args.hf, args.dtype)
    check_tree(checkpoint, cfg)  # a backbone without tree attention, a tree deeper than the heads: before any work
    prompts = benchmark_prompts(checkpoint, args.prompts, args.num_prompts, args.prompt_tokens, data_path=args.data,
                                chat_template=not args.no_chat_template)
    calibration = (benchmark_prompts(checkpoint, None, cfg.calibration_prompts, args.prompt_tokens, offset=0.5,
                                     data_path=args.data).prompts if cfg.calibrates else None)
    report = run_benchmark(checkpoint, prompts, cfg, progress=lambda line: print(line, file=sys.stderr),
                           calibration_prompts=calibration, dtype_reason=dtype_reason)
    print(bench_table(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def cmd_experiment(args) -> int:
    from mtpd.experiment import SCALES, run_suite
    from mtpd.report import write_experiment_report

    scale = SCALES[args.scale]
    overrides = {"preset": args.preset, "tokens": args.tokens}
    if args.tokens is not None and args.tokens < 1:
        raise MtpdError(f"--tokens must be >= 1 (got {args.tokens})")
    if args.preset is not None:
        preset(args.preset)  # unknown preset: one line, before any work
    scale = dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    summary = run_suite(args.suite, scale, args.out, args.data, args.device, show_progress=not args.quiet)
    for path in write_experiment_report(summary, args.out):
        print(f"wrote {path}")
    return 0


def cmd_distill_data(args) -> int:
    from mtpd.distill import DistillConfig, distill_data

    cfg = DistillConfig(samples=args.samples, time_budget=args.time_budget, max_new_tokens=args.max_new_tokens,
                        question_tokens=args.question_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, question_temperature=args.question_temperature,
                        question_top_p=args.question_top_p, openings=_question_openings(args.question_openings),
                        seed=args.seed).validate()
    summary = distill_data(args.hf, args.out, cfg, resume=args.resume, device=args.device, dtype=args.dtype,
                           show_progress=not args.quiet)
    rate = f" in {summary['seconds']:.0f}s ({summary['tokens_per_s']:.1f} tokens/s)" if summary["written"] else ""
    print(f"wrote {summary['written']} conversations to {summary['out']} ({summary['lines']} in all; "
          f"{summary['tokens']:,} tokens generated{rate})")
    return 0


def _question_openings(spec: str) -> tuple[str, ...]:
    """--question-openings: `tasks` (distill.TASK_OPENINGS), `none` or a text file of one opening per line."""
    from mtpd.distill import TASK_OPENINGS

    if spec == "none":
        return ()
    if spec == "tasks":
        return TASK_OPENINGS
    try:
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MtpdError(f"cannot read --question-openings {spec} ({getattr(exc, 'strerror', None) or exc}): pass a "
                        f"UTF-8 text file of one opening per line, `tasks` or `none`") from None
    openings = tuple(line.strip() for line in lines if line.strip())
    if not openings:
        raise MtpdError(f"--question-openings {spec} holds no opening: write one per line, or pass `tasks` or `none`")
    return openings


def cmd_export_hf(args) -> int:
    from mtpd.export import export_hf

    print(f"wrote {export_hf(args.ckpt, args.out)}")
    return 0


def cmd_demo(args) -> int:
    from mtpd.demo import run_demo

    return run_demo(args.out, args.time_budget, args.device)


def _check_json_path(path: str | None) -> None:
    """Refuse a --json path that cannot be written before the work whose report it would hold."""
    if path is None:
        return
    target = Path(path)
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if target.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
        raise MtpdError(f"cannot write --json {path}: it is a directory, or {parent} is not a writable directory; "
                        f"choose another --json path")


def _write_json(path: str, payload: dict) -> None:
    try:
        write_json(Path(path), payload)
    except OSError as exc:
        raise MtpdError(f"cannot write {path} ({exc.strerror}): choose another --json path") from None
    print(f"wrote {path}")


def _add_checkpoint_flags(p, hf: bool = False) -> None:
    p.add_argument("--ckpt", required=True, help="run directory (latest checkpoint) or checkpoint directory")
    if hf:
        p.add_argument("--hf", metavar="PATH", help="heads trained on a Hugging Face model: where that model is now, "
                                                    "if it moved (default: the path recorded at training)")


def _add_decoding_dtype_flag(p) -> None:
    # The names of precision.DTYPE_NAMES, written out so that parsing flags does not import torch.
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="the dtype the model runs in: auto (default) takes bf16 where the device computes it "
                        "natively (CUDA; a CPU with avx512_bf16 or AMX), else fp32. Greedy speculative output "
                        "equals autoregressive decoding token for token in fp32, and in bf16 up to near-ties of "
                        "the main model's top two logits (a k-token verification rounds differently from a "
                        "1-token pass; `mtpd bench` reports where outputs part)")


def _add_compile_flag(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode with the model's transformer blocks compiled (torch.compile, after a warm-up that "
                        "compiles them, timed apart; on a CPU it needs a C++ compiler): the autoregressive "
                        "baseline and speculative decoding alike. Models on mtpd's own decoder only (built-in, "
                        "and Llama-family models given to --hf); the Hugging Face adapter decodes eagerly")


def _add_device_flag(p) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")


def _add_budget_flags(p) -> None:
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--max-tokens", type=int, help="training tokens")
    p.add_argument("--time-budget", type=float, help="seconds of training (evaluation and checkpoints not counted)")


def _add_draft_flags(p: argparse.ArgumentParser, auto: bool = False) -> None:
    grid = ", ".join(f"{t:g}" for t in DRAFT_THRESHOLDS)
    calibrated = (f" 'auto': the threshold (of {grid}) that gives the most expected tokens per ms, calibrated on "
                  "held-out validation prompts like --heads auto (briefly trained heads are under-confident: on "
                  "the tiny preset after 5 minutes, 0 beat 0.05 by 0.9 accepted tokens a step)." if auto else "")
    p.add_argument("--draft-threshold", type=_or_auto(float, "a probability") if auto else float,
                   default=DRAFT_THRESHOLD,
                   help="dynamic draft length: stop drafting after a draft its head gave less than this probability "
                        f"(0 = always draft with every head; default: {DRAFT_THRESHOLD}, measured best on the reference "
                        f"model with 4, 8 and 16 heads).{calibrated}")


def _add_lookup_flags(p: argparse.ArgumentParser, bench: bool = False) -> None:
    if bench:
        p.add_argument("--lookup", action="store_true",
                       help="also benchmark prompt lookup: drafts copied from the context where its last 2-3 tokens "
                            "occurred before, the heads' chain where they did not (report: lookup; what `mtpd "
                            "generate` drafts with by default), and prompt lookup alone, without heads (lookup_only)")
    else:
        p.add_argument("--lookup", action=argparse.BooleanOptionalAction,
                       help="draft from the context where its last 2-3 tokens occurred before (prompt lookup: "
                            "repeated names, code, lists, loops), with the heads' chain where they did not; lossless "
                            "like every drafter. On by default (faster than the chain alone in every setting "
                            "measured: README, 'Prompt lookup behind the heads'), except with --tree-shape; "
                            "--no-lookup drafts with the heads only")
    p.add_argument("--lookup-tokens", type=int, default=LOOKUP_TOKENS,
                   help=f"drafts copied per lookup match (default: {LOOKUP_TOKENS})")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples, and "
                                                                  "speculative sampling keeps the distribution exact")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens holding this probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line like every other mtpd error (`error: ...: see `mtpd train
    --help``, exit status 2) instead of the usage block; `--help` is unchanged."""

    def error(self, message: str):
        raise MtpdError(f"{message}: see `{self.prog} --help`")


class CommandParser(Parser):
    """The parser of one command (`mtpd train`, ...). It reports an unknown flag itself, with the closest
    one it knows (the top-level parser would only see leftovers), and records the flags given on the
    command line as `flags_given` (destinations), which --resume needs to tell a flag typed from a default."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._closest_flags(extras)}")
        # argparse fills in a default only where the namespace holds nothing yet: parsed again into one that
        # holds None everywhere, only the flags given get values.
        given, _ = super().parse_known_args(args, argparse.Namespace(**dict.fromkeys(vars(parsed))))
        parsed.flags_given = frozenset(dest for dest, value in vars(given).items() if value is not None)
        return parsed, extras

    def _closest_flags(self, extras: list[str]) -> str:
        known = list(self._option_string_actions)  # argparse keeps no public list of a parser's flags
        guesses = [match for flag in extras if flag.startswith("--")
                   for match in difflib.get_close_matches(flag.split("=")[0], known, n=1, cutoff=0.75)]
        return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mtpd", description="Multi-token prediction heads trained by self-distillation (MTP-D), and lossless "
                                 "self-speculative decoding with them.",
        epilog="Run `mtpd demo` to see the whole method on a tiny model in under ten minutes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    p = sub.add_parser("train", help="train a model with MTP-D heads from scratch, or heads on a frozen HF model",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Joint pretraining of a built-in decoder and K cascaded MTP heads with the\n"
                                   "MTP-D objective: the main head's CE + alpha_k * each head's CE + beta * top-N KL\n"
                                   "from the main head (the teacher, under stop-gradient) to each head. With --hf:\n"
                                   "the heads alone, on a local Hugging Face causal LM kept frozen.")
    _add_train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="validation loss and offline acceptance per head of a checkpoint",
                       description="Teacher-forced evaluation: main-head loss/perplexity, per-head CE, and offline "
                                   "acceptance (how often head k's top-1 equals the main head's top-1 for the "
                                   "same target).")
    _add_checkpoint_flags(p, hf=True)
    p.add_argument("--data", help="corpus whose validation split to evaluate on (default: the checkpoint's "
                                  "training corpus)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--seq-len", type=int, help="window length (default: the training --seq-len)")
    p.add_argument("--windows", type=int, default=64, help="validation windows (default: 64)")
    _add_decoding_dtype_flag(p)
    _add_device_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("extend", help="looped extension: grow trained heads m -> 2m, training only the new ones",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_EXTEND,
                       description="Looped extension (MTP-D paper): heads m+1..2m start as copies of the trained heads "
                                   "1..m;\nthe main model and heads 1..m are frozen (bit-identical afterwards) and only "
                                   "the new heads\ntrain, with the checkpoint's objective and optimiser settings. "
                                   "Repeat to grow 1 -> 2 -> 4 -> 8 -> 16.")
    _add_checkpoint_flags(p)
    p.add_argument("--to", type=int, required=True, help="number of heads afterwards: a multiple of the current m, "
                                                         "usually 2m")
    p.add_argument("--out", required=True, help="run directory of the extension")
    p.add_argument("--data", help="corpus (default: the checkpoint's training corpus)")
    _add_budget_flags(p)
    p.add_argument("--fraction", type=float, default=0.2, help="without a budget flag: train on this fraction of the "
                                                               "tokens the main model was pretrained on (default: 0.2, "
                                                               "the paper's 70B of 350B)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted extension in --out")
    _add_device_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--fsdp", action="store_true", help=FSDP_HELP)
    p.set_defaults(func=cmd_extend)

    p = sub.add_parser("generate", help="continue a prompt with speculative decoding (streams the text)",
                       description="Continue --prompt with the checkpoint's model. By default prompt lookup and the "
                                   "MTP heads draft (--lookup) and the main model verifies, so the text is exactly "
                                   "what the main model alone would write (greedy: token for token in fp32, up to "
                                   "near-ties in bf16, see --dtype; sampling: the same distribution), only faster. "
                                   "Statistics go to stderr.")
    _add_checkpoint_flags(p, hf=True)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="ask --prompt as one user turn through the model's chat "
                                                       "template (heads trained with --hf record it) and stop at the "
                                                       "end of the answer")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most (default: 200)")
    p.add_argument("--heads", type=int, help="draft with the first K heads only (default: all)")
    p.add_argument("--no-spec", action="store_true", help="plain KV-cached autoregressive decoding (the baseline)")
    p.add_argument("--tree-shape", help="draft a tree of candidates instead of one chain, as rank paths, e.g. "
                                        "'0 1 0.0 0.1 0.0.0' (the one `mtpd bench --tree` calibrated is in its "
                                        "report: tree.drafter.shape); built-in models only")
    _add_draft_flags(p)
    _add_lookup_flags(p)
    _add_sampling_flags(p)
    _add_decoding_dtype_flag(p)
    _add_compile_flag(p)
    _add_device_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="speculative decoding vs autoregressive baselines: speed and acceptance",
                       description="Decode the same prompts with KV-cached autoregressive decoding (the honest "
                                   "baseline), no-cache autoregressive decoding (the paper's setting) and speculative "
                                   "decoding, in one run after warm-up, timed in interleaved rounds. Reports tokens/s, "
                                   "speedups, per-head acceptance and cumulative acceptance, mean accepted tokens, "
                                   "and whether greedy output was identical (in bf16: the fraction of identical "
                                   "rows and the main model's top-2 logit gap at each first divergence).")
    _add_checkpoint_flags(p, hf=True)
    p.add_argument("--prompts", help="text file, one prompt per line, or a Spec-Bench / MT-Bench question file "
                                     "(.jsonl: question_id, category, turns): its questions through the model's chat "
                                     "template, both turns where there are two, with figures per category (default: "
                                     "slices of the checkpoint's validation split)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="a question file's turns as plain text, not through the chat template")
    p.add_argument("--first-turn-only", action="store_true",
                   help="a question file's first turns only (the second turns need the model's own first answers "
                        "and as much time again)")
    p.add_argument("--data", help="the corpus whose validation split gives the prompts and calibration prompts "
                                  "(default: the one the checkpoint was trained on)")
    p.add_argument("--num-prompts", type=int, default=8, help="validation prompts (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens per validation prompt (default: 64)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts decoded together (default: 1)")
    p.add_argument("--heads", type=_or_auto(int, "a number of heads"), help="draft with the first K heads only (default: all); 'auto': "
                                                         "as many as give the most expected tokens per ms, "
                                                         "calibrated on held-out validation prompts (greedy "
                                                         "acceptance, timed chain steps)")
    _add_draft_flags(p, auto=True)
    _add_sampling_flags(p)
    t = p.add_argument_group("tree drafting: decode with a tree of candidates as well, side by side with the "
                             "chain. Greedy and sampling are both lossless; tree attention needs the built-in "
                             "decoder (a Hugging Face backbone drafts chains only)")
    t.add_argument("--tree", action="store_true",
                   help="also draft a static tree: the one with the most expected tokens per second, from acceptance "
                        "statistics on validation prompts held out from the benchmark's and timed steps")
    t.add_argument("--tree-shape", help="use this static tree instead (implies --tree): rank paths, e.g. "
                                        "'0 1 0.0 0.1 0.0.0' (node 0.1 = head 2's second choice after head 1's first)")
    t.add_argument("--tree-nodes", type=int, default=16,
                   help="the largest tree calibration tries, root included (default: 16)")
    t.add_argument("--tree-dynamic", action="store_true",
                   help="also draft a dynamic tree (EAGLE-2: expand the most probable nodes per depth) verifying as "
                        "many nodes as the static tree; implies --tree")
    _add_lookup_flags(p, bench=True)
    p.add_argument("--rounds", type=int, default=2, help="timed repetitions of every method (default: 2)")
    p.add_argument("--skip-no-cache", action="store_true", help="leave out the slow no-cache baseline")
    p.add_argument("--skip-peers", action="store_true",
                   help="heads on a Hugging Face model: leave out transformers' generate and prompt lookup (they "
                        "do not depend on the heads: when comparing heads, time them once)")
    p.add_argument("--json", help="write the report (docs/design.md §6 fields) to this JSON file")
    _add_decoding_dtype_flag(p)
    _add_compile_flag(p)
    _add_device_flag(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("experiment", help="reproduce the paper's findings at small scale: variants, tables, plots",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_EXPERIMENT,
                       description="Train a suite of variants with identical data order, tokens and seed, evaluate "
                                   "each\n(main-head loss, offline acceptance per head) and benchmark it online "
                                   "(acceptance, mean accepted\ntokens, speedup vs KV-cached AR); write results.json, "
                                   "report.md and plots. Finished variants are\nskipped, so an interrupted run resumes.\n\n"
                                   "suites:\n"
                                   "  paper        MTP vs MTP-D (1 and 4 heads), stop-gradient off, top-N 10/100/full,\n"
                                   "               beta 1.0/1.5, reverse KL, looped 8 and 16 heads, 8 heads jointly\n"
                                   "  looped       MTP 1 and 4 heads, MTP-D 4 heads, looped 8 and 16, 8 heads jointly\n"
                                   "  mtp-vs-mtpd  MTP and MTP-D with 1 and 4 heads\n"
                                   "scales:\n"
                                   "  quick        `tiny`, 150k tokens a variant: the paper suite in ~30 min on 2 CPU cores\n"
                                   "  full         `small`, 1M tokens a variant: hours")
    p.add_argument("--suite", default="paper", choices=["paper", "looped", "mtp-vs-mtpd"], help="default: paper")
    p.add_argument("--scale", default="quick", choices=["quick", "full"], help="default: quick")
    p.add_argument("--out", default="runs/experiment", help="output directory (default: runs/experiment)")
    p.add_argument("--data", help="corpus (default: the Python standard library)")
    p.add_argument("--preset", help="override the scale's model preset")
    p.add_argument("--tokens", type=int, help="override the scale's pretraining tokens per variant")
    _add_device_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("distill-data", help="training data for heads on a chat model: its own answers to "
                                            "questions it writes itself",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_DISTILL,
                       description="Self-distillation data (Magpie-style): the model samples user messages from its "
                                   "chat template's\nprefix up to the user turn, then answers each through the "
                                   "template, greedily by default,\nbatched in mtpd's decoder (bf16 where native). "
                                   "Each JSONL line holds the whole rendered\nconversation in \"text\", what "
                                   "`mtpd train --hf MODEL --data FILE.jsonl` reads. Nothing is\ndownloaded and no "
                                   "benchmark question is used.")
    p.add_argument("--hf", required=True, metavar="MODEL", help="the chat model: a Hugging Face directory, a .gguf "
                                                                "file or `smollm2` (needs a chat template)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="the JSONL file to write")
    b = p.add_argument_group("budget (the first one reached stops)")
    b.add_argument("--samples", type=int, help="conversations the file holds when done (with --resume: in all)")
    b.add_argument("--time-budget", type=float, help="seconds of generation in this run: no conversation starts that "
                   "the longest so far says would end later (the first --batch-size always run)")
    p.add_argument("--resume", action="store_true", help="append to an existing --out (an interrupted run keeps every "
                                                         "conversation it finished); with the model and flags it was "
                                                         "made with, which each line records")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens of an answer at most (default: 256, as "
                                                                   "MT-Bench runs)")
    p.add_argument("--question-tokens", type=int, default=96, help="tokens of a sampled question at most; questions "
                                                                   "that run longer are dropped (default: 96)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together; a row whose question or answer ends takes the next at once (default: 16)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="of the answers: 0 = greedy (default), the main model's own greedy continuations, which a "
                        "greedy benchmark's drafts are checked against")
    p.add_argument("--question-temperature", type=float, default=1.0, help="of the sampled questions (default: 1.0)")
    p.add_argument("--question-top-p", type=float, default=0.95, help="nucleus of the sampled questions (default: 0.95)")
    p.add_argument("--question-openings", metavar="tasks|none|FILE", default="tasks",
                   help="start each question with the next of these first words, in turn, and let the model write "
                        "the rest (more kinds of question than the ones a small model asks itself): `tasks`, a "
                        "built-in list of kinds of request (write, explain, solve, code, summarize, role-play ...; "
                        "the default: on SmolLM2 it raised MT-Bench tau 1.43 -> 1.49 at equal tokens), a text file "
                        "of one opening per line, or `none` (the model writes the whole question)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    _add_decoding_dtype_flag(p)
    _add_device_flag(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill_data)

    p = sub.add_parser("export-hf", help="write a checkpoint's main model as a Hugging Face Llama directory",
                       description="Export the main model of a built-in checkpoint as a LlamaForCausalLM directory "
                                   "(config.json, model.safetensors, tokenizer files) that transformers loads with "
                                   "AutoModelForCausalLM / AutoTokenizer, and that `mtpd train --hf` can train heads "
                                   "on. The MTP heads are not exported.")
    _add_checkpoint_flags(p)
    p.add_argument("--out", required=True, help="directory to create (must not exist or be empty)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("demo", help="train a tiny MTP-D model on the standard library, evaluate and benchmark it",
                       description="The whole method on a built-in model: trains the `demo` preset (2.8M parameters, "
                                   "10 blocks of d 144) with 4 MTP-D heads on the Python standard library's source, "
                                   "evaluates it (validation loss, offline acceptance per head), then benchmarks "
                                   "speculative decoding against KV-cached autoregressive decoding, drafting with "
                                   "the heads and draft threshold calibrated on held-out prompts, and writes the "
                                   "report to OUT/bench.json. Under ten minutes on 2 CPU cores; re-running resumes "
                                   "or reuses the run.")
    p.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--time-budget", type=float, default=360, help="seconds of training (default: 360)")
    _add_device_flag(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        return args.func(args)
    except MtpdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Checkpoints are written atomically, so an interrupted run can always be continued from the last one.
        hint = {"train": ": checkpoints are intact; continue with the same command plus --resume (before the first "
                         "checkpoint nothing was saved: run the command again)",
                "extend": ": checkpoints are intact; continue with the same command plus --resume",
                "experiment": ": finished variants are kept; run the same command again to continue",
                "demo": ": run it again to continue"}.get(command, "")
        print(f"interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

"""Plain-text tables for the terminal (plots come with the experiment reports)."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width table; floats get 4 significant decimals."""
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join([line, rule, *body])


def eval_table(metrics: dict) -> str:
    """Per-head table of an evaluation: head 0 is the main head."""
    rows = [("main", metrics["val_loss"], metrics["val_ppl"], "-")]
    for k, (ce, acc) in enumerate(zip(metrics["head_ce"], metrics["offline_acceptance"]), start=1):
        rows.append((f"head {k}", ce, "-", acc))
    return format_table(["head", "val CE", "ppl", "offline accept"], rows)


# ---------------------------------------------------------------------------------------- experiment report

def _baseline_for(result: dict, by_name: dict) -> dict | None:
    """The plain-MTP run a variant's main-head quality is compared with: same head count, else 4 heads."""
    return by_name.get(f"mtp-k{result['heads']}") or by_name.get("mtp-k4")


def _cars(result: dict, n: int, threshold: str = "0") -> list[str]:
    car = result["online"][threshold]["cumulative_acceptance"]
    return [f"{car[k]:.3f}" if k < len(car) else "" for k in range(n)]


def _markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def experiment_report(summary: dict) -> str:
    """report.md for a suite run: what was run, the tables, and the plots written beside it."""
    results = summary["variants"]
    by_name = {r["name"]: r for r in results}
    scale = summary["scale"]
    lines = [f"# mtpd experiment: suite `{summary['suite']}`", "",
             f"Preset `{scale['preset']}`, {scale['tokens']:,} pretraining tokens per variant (looped extensions: "
             f"{scale['extend_fraction']:.0%} of that each), batch {scale['batch_size']} x {scale['seq_len']}, seed 0, "
             f"corpus: {summary['data']}. Every variant sees the same batches in the same order. Online figures: "
             f"greedy, batch 1, {scale['bench_prompts']} validation prompts of {scale['bench_prompt_tokens']} tokens, "
             f"{scale['bench_new_tokens']} new tokens, speedup vs KV-cached autoregressive decoding of the same "
             f"model in the same run; machine {summary['machine']}, {summary['threads']} threads, torch "
             f"{summary['torch_version']}, no torch.compile.", ""]
    rows = []
    for r in results:
        base = _baseline_for(r, by_name)
        delta = (r["val_loss"] - base["val_loss"]) / base["val_loss"] * 100 if base else None
        offline = r["offline_acceptance"]
        online = r["online"]["0"]
        tokens = f"{r['total_tokens']:,}" if not r["extend_from"] else f"{r['total_tokens'] - r['tokens']:,} + {r['tokens']:,}"
        rows.append((r["name"], r["heads"], tokens, r["val_loss"],
                     "" if delta is None else f"{delta:+.2f}%",
                     " ".join(f"{a:.2f}" for a in offline[:4]), *_cars(r, 4),
                     f"{online['mean_accepted_tokens']:.2f}", f"{online['speedup']:.2f}x",
                     "yes" if online["identical_to_baseline"] else "NO"))
    lines += ["## All variants", "", "`loss vs MTP`: change of the main head's validation loss against plain MTP with "
              "the same number of heads. `offline`: teacher-forced acceptance of heads 1-4. `CAR@k`: online "
              "cumulative acceptance at head k. `tau`: tokens per main-model pass.", "",
              _markdown_table(["variant", "heads", "tokens", "val loss", "loss vs MTP", "offline 1-4",
                               "CAR@1", "CAR@2", "CAR@3", "CAR@4", "tau", "speedup", "lossless"], rows), ""]
    if "mtp-k4" in by_name and "mtpd-k4" in by_name:
        mtp, mtpd = by_name["mtp-k4"], by_name["mtpd-k4"]
        gain = [(b - a) * 100 for a, b in zip(mtp["online"]["0"]["cumulative_acceptance"],
                                              mtpd["online"]["0"]["cumulative_acceptance"])]
        offline_gain = [(b - a) * 100 for a, b in zip(mtp["offline_acceptance"], mtpd["offline_acceptance"])]
        loss_change = (mtpd["val_loss"] - mtp["val_loss"]) / mtp["val_loss"] * 100
        lines += ["## MTP-D vs MTP, 4 heads", "",
                  f"- cumulative acceptance gain (points, online) per head: {', '.join(f'{g:+.1f}' for g in gain)}",
                  f"- offline acceptance gain (points) per head: {', '.join(f'{g:+.1f}' for g in offline_gain)}",
                  f"- main-head validation loss: {mtp['val_loss']:.4f} (MTP) vs {mtpd['val_loss']:.4f} (MTP-D), "
                  f"{loss_change:+.2f}%", ""]
    cost = summary.get("training_cost")
    if cost:
        lines += ["## Training cost", "",
                  f"Interleaved training steps on the same batches, `{cost['preset']}` with {cost['heads']} heads: "
                  f"MTP {cost['mtp_tokens_per_s']:.0f} tokens/s, MTP-D {cost['mtpd_tokens_per_s']:.0f} tokens/s "
                  f"(MTP-D / MTP = {cost['mtpd_vs_mtp']:.3f}). Per-variant speeds from the training logs are in "
                  f"results.json (`train_tokens_per_s`) and training_cost.png; they are noisy on a shared machine.", ""]
    dynamic = [r for r in results if len(r["online"]) > 1]
    if dynamic:
        threshold = next(k for k in dynamic[0]["online"] if k != "0")
        rows = [(r["name"], r["heads"], f"{r['online']['0']['speedup']:.2f}x", f"{r['online'][threshold]['speedup']:.2f}x",
                 f"{r['online'][threshold]['mean_draft_length']:.2f}", f"{r['online'][threshold]['mean_accepted_tokens']:.2f}")
                for r in dynamic]
        lines += [f"## Dynamic draft length (threshold {threshold})", "",
                  _markdown_table(["variant", "heads", "speedup, all heads", "speedup, dynamic", "mean drafts",
                                   "tau, dynamic"], rows), ""]
    lines += ["## Plots", "", "![cumulative acceptance per head](car_per_head.png)", "",
              "![main-head loss and acceptance vs beta](beta.png)", "", "![speedup vs heads](speedup_vs_heads.png)", "",
              "![training cost](training_cost.png)", ""]
    return "\n".join(lines)


def experiment_plots(summary: dict, out_dir) -> list:
    """PNG plots of a suite run; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out_dir = Path(out_dir)
    results = summary["variants"]
    by_name = {r["name"]: r for r in results}
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    fig, ax = plt.subplots(figsize=(9, 5))
    ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)
    for r in results:
        car = r["online"]["0"]["cumulative_acceptance"]
        ax.plot(range(1, len(car) + 1), car, marker="o", markersize=3, label=r["name"],
                linestyle="--" if r["name"].startswith("mtp-") else "-")
    ax.set(title="Online cumulative acceptance per head (greedy, batch 1)", xlabel="head k",
           ylabel="cumulative acceptance CAR_k", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    save(fig, "car_per_head.png")

    betas = [(0.0, "mtp-k4"), (0.5, "mtpd-k4"), (1.0, "mtpd-k4-beta1.0"), (1.5, "mtpd-k4-beta1.5")]
    points = [(beta, by_name[name]) for beta, name in betas if name in by_name]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    if points:
        left.plot([b for b, _ in points], [r["val_loss"] for _, r in points], marker="o")
        right.plot([b for b, _ in points], [r["online"]["0"]["cumulative_acceptance"][3] for _, r in points],
                   marker="o", label="online")
        right.plot([b for b, _ in points], [r["offline_acceptance"][3] for _, r in points], marker="s",
                   linestyle="--", label="offline (head 4 = main top-1)")
        right.legend(fontsize=8)
    left.set(title="Main-head validation loss vs beta (4 heads)", xlabel="beta (0 = plain MTP)", ylabel="val loss")
    right.set(title="Head 4 acceptance vs beta", xlabel="beta", ylabel="acceptance at head 4")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save(fig, "beta.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    family = [by_name[n] for n in ("mtpd-k1", "mtpd-k4", "mtpd-k8-looped", "mtpd-k16-looped") if n in by_name]
    thresholds = sorted({t for r in family for t in r["online"]})
    for threshold in thresholds:
        label = "MTP-D, all heads draft" if threshold == "0" else f"MTP-D, dynamic draft length ({threshold})"
        ax.plot([r["heads"] for r in family], [r["online"][threshold]["speedup"] for r in family], marker="o", label=label)
    for name in ("mtp-k1", "mtp-k4", "mtpd-k8-joint"):
        if name in by_name:
            ax.scatter([by_name[name]["heads"]], [by_name[name]["online"]["0"]["speedup"]], marker="x", s=60, label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(title="Speedup vs KV-cached autoregressive decoding", xlabel="number of heads", ylabel="speedup",
           xscale="log", xticks=[1, 2, 4, 8, 16])
    ax.set_xticklabels(["1", "2", "4", "8", "16"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "speedup_vs_heads.png")

    fig, ax = plt.subplots(figsize=(9, 4))
    named = [(r["name"], r["train_tokens_per_s"] or 0.0) for r in results]
    ax.bar(range(len(named)), [s for _, s in named], color=["tab:orange" if n.startswith("mtp-") else "tab:blue"
                                                            for n, _ in named])
    ax.set_xticks(range(len(named)))
    ax.set_xticklabels([n for n, _ in named], rotation=60, ha="right", fontsize=7)
    cost = summary.get("training_cost")
    title = "Training speed per variant (from the logs; looped runs train only the new heads)"
    if cost:
        title += f"\ninterleaved probe: MTP-D / MTP = {cost['mtpd_vs_mtp']:.2f}"
    ax.set(title=title, ylabel="tokens/s")
    ax.grid(alpha=0.3, axis="y")
    save(fig, "training_cost.png")
    return written


def write_experiment_report(summary: dict, out_dir) -> list:
    """report.md and the plots beside results.json; returns the paths written."""
    from pathlib import Path

    paths = experiment_plots(summary, out_dir)
    report = Path(out_dir) / "report.md"
    report.write_text(experiment_report(summary))
    return [report, *paths]

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

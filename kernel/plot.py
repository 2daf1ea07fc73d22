"""``swiftk plot``: loss, eval loss and learning rate over steps, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from swiftk.contracts import events
from swiftk.kernel.errors import SwiftkError


def plot(run_dir: str, out: str | None = None) -> Path:
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise SwiftkError(f"{metrics} does not exist; is {run_dir} a swiftk run directory?")
    try:
        records = events.read(metrics)
    except events.EventError as exc:
        raise SwiftkError(f"cannot plot {run_dir}: {exc}") from None
    steps = events.steps(records)
    evals = [e for e in events.of_kind(records, events.EvalEvent) if "eval_loss" in e.metrics]
    if not steps:
        raise SwiftkError(f"{metrics} has no step records yet; nothing to plot.")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([r.step for r in steps], [r.loss for r in steps], label="train loss", lw=1)
    if evals:
        ax_loss.plot([e.step for e in evals], [e.metrics["eval_loss"] for e in evals], "o-", label="eval loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r.step for r in steps], [r.lr for r in steps], color="tab:green", lw=1)
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    target = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target

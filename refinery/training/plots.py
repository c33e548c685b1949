"""PNG charts of the training stage, drawn with matplotlib's file-only backend (no display)."""

from __future__ import annotations

from pathlib import Path


def loss_curve(path: Path, train: list[list[float]], val: list[list[float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", linewidth=1)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version stamp: same curve, same bytes
    plt.close(fig)


def score_bars(path: Path, comparison: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [*comparison["metrics"], "average"]
    base = [comparison["metrics"][m]["base"] or 0 for m in comparison["metrics"]] + [comparison["average"]["base"] or 0]
    tuned = [comparison["metrics"][m]["adapter"] or 0 for m in comparison["metrics"]] + \
        [comparison["average"]["adapter"] or 0]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], base, width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], tuned, width=0.4, label="adapter")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean score")
    ax.set_title(f"{comparison['adapter_id']}: base vs adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def reward_curve(path: Path, rewards: list[dict], title: str) -> None:
    """DPO's reward margin (left axis) and reward accuracy (right axis) by step, on the measured
    training pairs and, when there are any, the validation pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    acc = ax.twinx()
    for split, style in (("train", "-"), ("valid", "--")):
        points = [(r["step"], r[split]) for r in rewards if r.get(split)]
        if points:
            steps = [s for s, _ in points]
            ax.plot(steps, [v["margin"] for _, v in points], "o" + style, color="tab:blue",
                    label=f"{split} reward margin")
            acc.plot(steps, [v["accuracy"] for _, v in points], "s" + style, color="tab:orange",
                     label=f"{split} reward accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("reward margin (β · log-ratio)")
    acc.set_ylabel("reward accuracy")
    acc.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)

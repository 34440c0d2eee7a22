"""Loss-curve PNGs (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def save_run_curve(history: Mapping, path: str | Path, title: str,
                   best_step: int | None = None) -> Path:
    """Training (averaged per logging interval) and validation loss against steps; a dotted
    line at the best checkpoint's step."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    train, val = history.get("train", {}), history.get("val", {})
    if train.get("step"):
        ax.plot(train["step"], train["nats"], lw=1, alpha=0.8, label="train")
    if val.get("step"):
        ax.plot(val["step"], val["nats"], "o-", ms=3, label="validation")
    if best_step is not None:
        ax.axvline(best_step, ls=":", color="gray", label=f"best (step {best_step})")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per char")
    _bits_axis(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_comparison(curves: Sequence[tuple[str, Sequence[float], Sequence[float]]],
                    path: str | Path, title: str) -> Path:
    """Validation loss against training minutes, one line per (label, times_s, nats)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, times_s, nats in curves:
        ax.plot([t / 60 for t in times_s], nats, "o-", ms=3, label=label)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("validation nats per char")
    _bits_axis(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def save_hello_curve(losses: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, values in losses.items():
        ax.plot(range(1, len(values) + 1), values, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title('hello -> ohlol')
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _bits_axis(ax) -> None:
    ax.secondary_yaxis("right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2))
                       ).set_ylabel("bits per char")


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_panels(panels: Sequence[tuple[str, Sequence[tuple[str, Sequence[float],
                                                            Sequence[float]]]]],
                path: str | Path) -> Path:
    """Several save_comparison plots side by side: (title, [(label, times_s, nats)]) each."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110,
                             squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels, strict=True):
        for label, times_s, nats in curves:
            ax.plot([t / 60 for t in times_s], nats, "o-", ms=2.5, label=label)
        ax.set_xlabel("training minutes")
        ax.set_ylabel("validation nats per char")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)

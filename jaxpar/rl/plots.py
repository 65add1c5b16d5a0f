"""Learning curves from metrics.jsonl: mean per-agent episode return vs env steps and vs wall-clock."""

from __future__ import annotations

import os

import numpy as np

from jaxpar.train.metrics import read_metrics


def curve(records: list[dict]) -> dict[str, np.ndarray]:
    """Arrays over logged updates: env_steps, wall_s, per-seed returns [n, S] (NaN where none ended)."""
    rows = [r for r in records if r.get("return_per_seed") is not None]
    per_seed = np.array(
        [[np.nan if x is None else x for x in r["return_per_seed"]] for r in rows], np.float64
    )
    return {
        "env_steps": np.array([r["env_steps"] for r in rows], np.float64),
        "wall_s": np.array([r.get("wall_s", np.nan) for r in rows], np.float64),
        "per_seed": per_seed.reshape(len(rows), -1),
    }


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points, ignoring NaNs."""
    out = np.full_like(y, np.nan)
    for i in range(len(y)):
        chunk = y[max(0, i - window + 1) : i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def plot_curves(axes, label: str, c: dict, colour=None, window: int = 10):
    """Seed mean (line) and min-max over seeds (band) on axes = (vs env steps, vs wall-clock)."""
    per_seed = np.stack([smooth(c["per_seed"][:, s], window) for s in range(c["per_seed"].shape[1])], axis=1)
    mean = np.nanmean(per_seed, axis=1)
    for ax, x in zip(axes, (c["env_steps"], c["wall_s"])):
        (line,) = ax.plot(x, mean, label=label, color=colour)
        if per_seed.shape[1] > 1:
            ax.fill_between(
                x, np.nanmin(per_seed, axis=1), np.nanmax(per_seed, axis=1), alpha=0.2, color=line.get_color()
            )


def new_figure(title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xlabel in zip(axes, ("env steps (per seed)", "wall-clock (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("episode return per agent")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(workdir: str, out_name: str = "learning_curve.png") -> str | None:
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    c = curve(records)
    if not len(c["env_steps"]):
        return None
    fig, axes = new_figure(os.path.basename(os.path.abspath(workdir)))
    plot_curves(axes, f"mean of {c['per_seed'].shape[1]} seed(s) (band: min-max)", c)
    return save(fig, os.path.join(workdir, out_name))

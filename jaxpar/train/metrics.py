"""Run metrics: one JSON object per logged step in metrics.jsonl, TensorBoard events beside it, a loss
curve PNG at the end. Model-free: the RL loop and launch/collect.py use it too."""

from __future__ import annotations

import json
import math
import os
import sys

import jax

from jaxpar.config import to_dict


def _import_summary_writer():
    """tensorboardX's writer imports torch at import time when torch is installed (only so that it can
    accept torch tensors), which costs a run seconds at every start. jaxpar logs Python floats, so the writer
    is imported with torch hidden unless something has imported torch already."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


SummaryWriter = _import_summary_writer()


def save_config(run, workdir: str, mesh_sizes: dict[str, int]) -> None:
    """workdir/config.json (process 0): the run config as plain dicts, plus the resolved mesh."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({**to_dict(run), "resolved_mesh": dict(mesh_sizes)}, f, indent=2)


class MetricsWriter:
    """Writes on process 0 only, so a multi-process run logs once."""

    def __init__(self, workdir: str, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._drop_after(resume_step)
        self.file = open(self.path, "a")
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _drop_after(self, step: int) -> None:
        """Lines past the checkpoint we resume from are recomputed, identically, by the resumed run."""
        if not os.path.exists(self.path):
            return
        kept = [line for line in read_metrics(self.path) if line["step"] <= step]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _jsonable(value):
    value = float(value) if hasattr(value, "item") or isinstance(value, float) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (the run was killed mid-write) is dropped, so a
    resumed run can still read its file; an unreadable line anywhere else is an error."""
    with open(path) as f:
        lines = f.read().splitlines(keepends=True)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                break
            raise
    return records


def plot_losses(workdir: str, out_name: str = "loss.png") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o--")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(os.path.basename(os.path.abspath(workdir)))
    ax.grid(alpha=0.3)
    ax.legend()
    path = os.path.join(workdir, out_name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Run metrics: one JSON object per logged step in metrics.jsonl, TensorBoard events beside it, a loss
curve PNG at the end; plus the FLOP convention behind MFU."""

from __future__ import annotations

import json
import math
import os

import jax
from tensorboardX import SummaryWriter

from jaxpar.config import ModelConfig, to_dict

# Dense bf16 peak FLOP/s per chip by `device_kind` substring (vendor data sheets). CPU: none, MFU is null.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * N (forward + backward matmuls) with N the parameters that take part in matmuls (everything but
    the input embedding lookup and norms; the output projection counts even when tied), plus attention
    scores and values: 12 * layers * heads * head_dim * seq_len, halved because causal masking skips
    half of the score matrix. A linear-attention layer sees half a chunk within its chunk, and a
    head_dim x head_dim state (read and written once per token) instead of the rest of the sequence."""
    D, L = cfg.d_model, cfg.n_layers
    matmul_params = L * (D * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * D * cfg.d_ff)
    matmul_params += D * cfg.vocab_size
    linear_keys = 0.5 * min(cfg.linear_chunk, seq_len) + cfg.head_dim
    keys_per_token = (L - cfg.linear_layers) * 0.5 * seq_len + cfg.linear_layers * linear_keys
    attention = 12 * cfg.n_heads * cfg.head_dim * keys_per_token
    return 6 * matmul_params + attention


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

"""Gathers a sweep (or any folder of runs) into one table and one plot, keeping failed and unfinished runs
in view: a run that died is a row that says so, never a missing row.

A run is a directory with any of metrics.jsonl, launch.json, status.json, config.json. Its status:

  completed     the last logged step reached the configured total (train.steps)
  failed        the launcher or the sbatch script recorded a non-zero exit (exit code shown)
  running / requeued / stopped (SIGTERM: preempted or cancelled, checkpointed) / unfinished (exited early
                or no status recorded) / not started (nothing logged yet)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any

from jaxpar.launch.job import LAUNCH_FILE, REPO_ROOT, STATUS_FILE, read_json
from jaxpar.launch.sweep import read_manifest
from jaxpar.train.metrics import read_metrics

METRICS = "metrics.jsonl"
# Candidate curve keys in order of preference, and whether lower is better.
CURVE_KEYS = (("loss", True), ("return", False), ("episode_return", False), ("mean_return", False))
THROUGHPUT_KEYS = ("tokens_per_sec", "env_steps_per_sec", "steps_per_sec")


@dataclasses.dataclass
class Run:
    name: str
    workdir: str
    overrides: dict[str, Any]
    status: str
    detail: str = ""
    last_step: int | None = None
    total_steps: int | None = None
    metric: str | None = None
    final: float | None = None
    best: float | None = None
    final_eval: float | None = None
    throughput: float | None = None
    throughput_key: str | None = None
    curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)


def read_records(path: str) -> list[dict]:
    """The records of a run's metrics.jsonl ([] when the run has none yet, or its file is damaged beyond a
    torn last line: the run then shows no metrics instead of stopping the whole table)."""
    try:
        records = read_metrics(path)
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]


def _total_steps(workdir: str, launch: dict | None) -> int | None:
    train = (read_json(os.path.join(workdir, "config.json")) or {}).get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    if steps is None and launch:
        steps = launch.get("total_steps")
    return steps


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarize(
    workdir: str, name: str | None = None, overrides: dict | None = None, metric: str | None = None
) -> Run:
    launch = read_json(os.path.join(workdir, LAUNCH_FILE))
    status = read_json(os.path.join(workdir, STATUS_FILE)) or {}
    records = read_records(os.path.join(workdir, METRICS))
    overrides = overrides if overrides is not None else (launch or {}).get("overrides", {})
    run = Run(
        name=name or os.path.basename(os.path.normpath(workdir)),
        workdir=workdir,
        overrides=overrides,
        status="not started",
        total_steps=_total_steps(workdir, launch),
    )
    keys = [(metric, True)] if metric else CURVE_KEYS
    for key, lower_is_better in keys:
        curve = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
        if curve:
            run.metric, run.curve = key, curve
            values = [v for _, v in curve]
            run.final = values[-1]
            run.best = min(values) if lower_is_better else max(values)
            break
    evals = [r["eval_loss"] for r in records if _finite(r.get("eval_loss"))]
    run.final_eval = evals[-1] if evals else None
    for key in THROUGHPUT_KEYS:
        # the first logged step includes compilation; leave it out when there is more than one
        values = [r[key] for r in records if _finite(r.get(key))]
        if values:
            values = values[1:] if len(values) > 1 else values
            run.throughput, run.throughput_key = sum(values) / len(values), key
            break
    run.last_step = max((r["step"] for r in records), default=None)
    run.status, run.detail = _status(run, status)
    return run


def _status(run: Run, status: dict) -> tuple[str, str]:
    state = status.get("state")
    at = (
        ""
        if run.last_step is None
        else f"at step {run.last_step}" + (f"/{run.total_steps}" if run.total_steps else "")
    )
    if run.total_steps and run.last_step is not None and run.last_step >= run.total_steps:
        return "completed", ""
    if state == "failed":
        codes = status.get("exit_code", status.get("exit_codes"))
        return "failed", " ".join(x for x in (f"exit {codes}" if codes is not None else "", at) if x)
    if state in ("running", "requeued"):
        if status.get("job_id") and _slurm_job_gone(str(status["job_id"])):
            return "unfinished", f"Slurm job {status['job_id']} ended without a final status {at}".strip()
        return state, at
    if state == "stopped":
        return "stopped", f"SIGTERM {at}".strip()
    if run.last_step is None:
        return "not started", ""
    if run.total_steps is None and state == "exited":
        return "completed", "(no total step count known)"
    return "unfinished", at


def _slurm_job_gone(job_id: str) -> bool:
    """True only when squeue answers and no longer lists the job (a job killed hard, e.g. by SIGKILL after
    the time limit, cannot write its own status)."""
    import shutil
    import subprocess

    if not shutil.which("squeue"):
        return False
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    if result.returncode != 0:
        return "Invalid job id" in result.stderr
    return not result.stdout.strip()


def find_runs(sweep_dir: str) -> list[tuple[str, str, dict | None]]:
    """[(name, workdir, overrides)] from the manifest when there is one, else every subdirectory that looks
    like a run (or sweep_dir itself)."""
    manifest = read_manifest(sweep_dir)
    if manifest and manifest.get("points"):
        return [(p["name"], p["workdir"], p.get("overrides", {})) for p in manifest["points"]]
    markers = (METRICS, LAUNCH_FILE, STATUS_FILE, "config.json")
    runs = [
        (entry, os.path.join(sweep_dir, entry), None)
        for entry in sorted(os.listdir(sweep_dir))
        if os.path.isdir(os.path.join(sweep_dir, entry))
        and any(os.path.exists(os.path.join(sweep_dir, entry, m)) for m in markers)
    ]
    if not runs and any(os.path.exists(os.path.join(sweep_dir, m)) for m in markers):
        runs = [(os.path.basename(os.path.normpath(sweep_dir)), sweep_dir, None)]
    return runs


COLUMNS = (
    "run",
    "status",
    "detail",
    "last_step",
    "metric",
    "final",
    "best",
    "final_eval_loss",
    "throughput",
    "throughput_unit",
    "overrides",
)


def rows(runs: list[Run]) -> list[dict[str, Any]]:
    return [
        {
            "run": r.name,
            "status": r.status,
            "detail": r.detail,
            "last_step": r.last_step,
            "metric": r.metric,
            "final": r.final,
            "best": r.best,
            "final_eval_loss": r.final_eval,
            "throughput": r.throughput,
            "throughput_unit": r.throughput_key,
            "overrides": json.dumps(r.overrides, sort_keys=True),
        }
        for r in runs
    ]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown(runs: list[Run], title: str) -> str:
    table = rows(runs)
    header = [c for c in COLUMNS if c not in ("overrides", "throughput_unit")]
    lines = [
        f"# {title}",
        "",
        f"{len(runs)} runs: "
        + ", ".join(f"{sum(r.status == s for r in runs)} {s}" for s in dict.fromkeys(r.status for r in runs)),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row, run in zip(table, runs):
        cells = [_cell(row[c]) for c in header]
        if run.status != "completed":
            cells[1] = f"**{cells[1]}**"
        if run.throughput_key:
            cells[header.index("throughput")] += f" {run.throughput_key.replace('_per_sec', '/s')}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(runs: list[Run], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows(runs))


def plot(runs: list[Run], path: str, title: str) -> str | None:
    """Every run's curve; runs that did not complete are dashed, end in an 'x' and say why in the legend."""
    if not any(r.curve for r in runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        if not run.curve:
            continue
        steps, values = zip(*run.curve)
        done = run.status == "completed"
        label = run.name if done else f"{run.name} ({run.status})"
        (line,) = ax.plot(steps, values, "-" if done else "--", label=label)
        if not done:
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), markersize=9)
    metrics = sorted({r.metric for r in runs if r.metric})
    silent = [f"{r.name} ({r.status})" for r in runs if not r.curve]
    if silent:
        fig.text(0.01, 0.01, "no curve: " + ", ".join(silent), fontsize=7, color="gray")
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(metrics))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def collect(sweep_dir: str, metric: str | None = None) -> tuple[list[Run], dict[str, str]]:
    """Summarises every run; writes results.md, results.csv and curves.png into sweep_dir."""
    found = find_runs(sweep_dir)
    runs = [summarize(workdir, name, overrides, metric) for name, workdir, overrides in found]
    manifest = read_manifest(sweep_dir) or {}
    config = manifest.get("config", "")
    if config.startswith(REPO_ROOT + os.sep):
        config = os.path.relpath(config, REPO_ROOT)
    title = (
        f"{config} sweep {manifest.get('sweep', '')}".strip()
        if manifest
        else os.path.basename(os.path.normpath(sweep_dir))
    )
    outputs = {
        "markdown": os.path.join(sweep_dir, "results.md"),
        "csv": os.path.join(sweep_dir, "results.csv"),
    }
    with open(outputs["markdown"], "w") as f:
        f.write(markdown(runs, title))
    write_csv(runs, outputs["csv"])
    png = plot(runs, os.path.join(sweep_dir, "curves.png"), title)
    if png:
        outputs["plot"] = png
    return runs, outputs

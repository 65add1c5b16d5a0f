"""Learning benchmarks of the game presets (Overcooked, Hanabi): the committed report of runs made with
experiments/train_marl.py (results.json with per-seed curves, README.md with a table, a learning-curve
PNG), drawn with jaxpar.rl.plots.

Each run's workdir holds metrics.jsonl (one record per update: the mean episode return per agent of the
episodes that ended in it, per seed). Curves are binned by env steps (the mean of the episodes-ending
updates in each bin, per seed); "final" is a seed's mean over the last `FINAL_FRACTION` of its env steps.
A hand-written "## Notes" section of an existing README is kept when the README is regenerated.
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import numpy as np

from jaxpar.bench import common
from jaxpar.machine import describe
from jaxpar.rl import plots
from jaxpar.rl.config import REPO_ROOT
from jaxpar.train.metrics import read_metrics

CONFIG_FILE = os.path.join(REPO_ROOT, "configs", "marl.py")
BINS = 100
FINAL_FRACTION = 0.05
NOTES = "## Notes"

# What each game's curves measure, in units of the logged per-agent episode return.
GAMES = {
    "overcooked": {
        "presets": ("ippo_overcooked", "pqn_vdn_overcooked"),
        "title": "Overcooked cramped_room (overcooked-ai 1.1.0 dynamics), 400-step episodes",
        "ylabel": "return per episode (20 per soup)",
        "unit": "soups",
        "scale": 1 / 20,  # the logged return is the sparse reward alone: 20 per soup delivered
        "target": (200.0, "target: ~200 (JaxMARL's published IPPO cramped_room curve)"),
    },
    "hanabi": {
        "presets": ("ippo_hanabi",),
        "title": "Hanabi, 2 players (hanabi-learning-environment rules)",
        "ylabel": "score per game (0-25)",
        "unit": "score",
        "scale": 1.0,
        "target": None,
    },
}


def binned_curve(records: list[dict], bins: int = BINS) -> dict:
    """(bin ends in env steps, per-seed means [bins][S] with None where no episode ended in a bin)."""
    c = plots.curve(records)
    steps, per_seed = c["env_steps"], c["per_seed"]
    edges = np.linspace(0, steps[-1], bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = per_seed[(steps > lo) & (steps <= hi)]
        finite = np.isfinite(inside).any(axis=0) if len(inside) else np.zeros(per_seed.shape[1], bool)
        with np.errstate(all="ignore"):
            mean = np.nanmean(inside, axis=0) if len(inside) else np.full(per_seed.shape[1], np.nan)
        rows.append([round(float(m), 3) if f else None for m, f in zip(mean, finite)])
    return {"env_steps": [int(x) for x in edges[1:]], "return_per_seed": rows}


def final_per_seed(records: list[dict]) -> np.ndarray:
    """Each seed's mean logged return over the last FINAL_FRACTION of its env steps."""
    c = plots.curve(records)
    last = c["env_steps"] > c["env_steps"][-1] * (1 - FINAL_FRACTION)
    with np.errstate(all="ignore"):
        return np.nanmean(c["per_seed"][last], axis=0)


def load_during(load_log: str | None, start: float, end: float) -> dict | None:
    """1-minute load averages sampled (`<unix time> <1 min> <5 min> <15 min>` lines) while a run ran."""
    if not load_log or not os.path.exists(load_log):
        return None
    samples = []
    for line in open(load_log):
        parts = line.split()
        if len(parts) >= 2 and start <= float(parts[0]) <= end:
            samples.append(float(parts[1]))
    if not samples:
        return None
    return {"samples": len(samples), "min": min(samples), "mean": round(float(np.mean(samples)), 2),
            "max": max(samples)}  # fmt: skip


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def overrides(preset: str, config: dict) -> list[str]:
    """The `--config.KEY=VALUE` flags that turn configs/marl.py:`preset` into the run's saved config."""
    preset_config = common.load_config_dict(f"{CONFIG_FILE}:{preset}").to_dict()
    want, have = _flatten(preset_config), _flatten({k: v for k, v in config.items() if k != "resolved_mesh"})
    return [f"--config.{k}={json.dumps(v)}" for k, v in have.items() if want.get(k) != v]


def summarize(workdir: str, game: dict, command: str, load_log: str | None) -> dict:
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    last = records[-1]
    final = final_per_seed(records)
    end = os.path.getmtime(os.path.join(workdir, "metrics.jsonl"))
    return {
        "command": command,
        "config": config,
        "env_steps_per_seed": int(last["env_steps"]),
        "num_seeds": len(final),
        "final_window": f"last {FINAL_FRACTION:.0%} of env steps",
        "final_return_per_seed": [round(float(x), 3) for x in final],
        "final_return_mean": round(float(np.mean(final)), 3),
        "final_return_std": round(float(np.std(final)), 3),
        f"final_{game['unit']}_mean": round(float(np.mean(final) * game["scale"]), 3),
        "train_wall_s": round(float(last["wall_s"]), 1),
        "train_cpu_s": round(float(last.get("cpu_s", float("nan"))), 1),
        "compile_s": round(float(last["compile_s"]), 1),
        "env_steps_per_s_all_seeds": round(float(last["env_steps_per_s"])),
        "load_average_1min_during": load_during(load_log, end - float(last["wall_s"]), end),
        "curve": binned_curve(records),
    }


def versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax")}


def report(name: str, workroot: str, out: str, load_log: str | None = None) -> dict:
    """results.json, README.md and <name>.png in `out` from the runs of GAMES[name]'s presets found as
    `workroot`/<preset> (each trained with experiments/train_marl.py; the command is in the README)."""
    game = GAMES[name]
    runs = {}
    for preset in game["presets"]:
        workdir = os.path.join(workroot, preset)
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            with open(os.path.join(workdir, "config.json")) as f:
                flags = overrides(preset, json.load(f))
            command = " ".join(
                ["python experiments/train_marl.py", f"--config=configs/marl.py:{preset}", *flags]
                + [f"--workdir={workdir}"]
            )
            runs[preset] = {**summarize(workdir, game, command, load_log), "overrides": flags}
    results = {"game": game["title"], "machine": describe(), "versions": versions(), "runs": runs}
    common.write_results(out, results)
    figure = _figure(name, game, workroot, runs, os.path.join(out, f"{name}.png"))
    common.write_readme(out, _readme(name, game, results, os.path.basename(figure), out, load_log))
    return results


def _figure(name, game, workroot, runs, path) -> str:
    fig, axes = plots.new_figure(f"{game['title']}; {describe()['cpu']} ({describe()['cores']} cores)")
    for preset, run in runs.items():
        records = read_metrics(os.path.join(workroot, preset, "metrics.jsonl"))
        # The budget is in the label; other changed keys (tuning) by name, their values in the README.
        shown = [o.removeprefix("--config.").split("=")[0] for o in run["overrides"]]
        shown = [k for k in shown if not k.startswith("train.")]
        label = f"{preset}, {run['num_seeds']} seed(s) x {run['env_steps_per_seed'] / 1e6:.1f}M steps"
        label += f" (changed: {', '.join(shown)})" if shown else ""
        c = plots.curve(records)
        plots.plot_curves(axes, label, c, window=max(3, len(c["env_steps"]) // 50))
    for ax in axes:
        ax.set_ylabel(game["ylabel"])
        if game["target"]:
            ax.axhline(game["target"][0], color="grey", ls="--", lw=1, label=game["target"][1])
    return plots.save(fig, path)


def _readme(name, game, results, figure, out, load_log) -> str:
    unit = game["unit"]
    lines = [
        f"# {game['title']}: learning curves",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores shared with other work, "
        f"1 JAX CPU device; " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ". "
        "Numbers in results.json (curves per seed, binned by env steps); seeds vmapped in one program.",
        "",
        f"| preset | seeds | env steps / seed | final return per agent (mean +- std) | final {unit} | "
        "per seed | train wall s (compile s) | load avg (1 min) during |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, r in results["runs"].items():
        load = r["load_average_1min_during"]
        load_text = "n/a" if not load else f"{load['mean']} ({load['min']}-{load['max']})"
        label = f"`{preset}`" + (
            " with " + " ".join(f"`{o}`" for o in r["overrides"]) if r["overrides"] else ""
        )
        lines.append(
            f"| {label} | {r['num_seeds']} | {r['env_steps_per_seed']:,} | "
            f"{r['final_return_mean']:.2f} +- {r['final_return_std']:.2f} | {r[f'final_{unit}_mean']:.2f} | "
            f"{', '.join(f'{x:.1f}' for x in r['final_return_per_seed'])} | {r['train_wall_s']:.0f} "
            f"({r['compile_s']:.0f}) | {load_text} |"
        )
    lines += [
        "",
        f'"final": each seed\'s mean over the {FINAL_FRACTION:.0%} last env steps of training (the logged '
        "return of the episodes that ended there, the policy sampling as it trains).",
        "",
        f"![learning curves]({figure})",
        "",
        "Reproduce (the runs as made, then this report; RUNS: any folder):",
        "",
    ]
    for r in results["runs"].values():
        lines.append(
            f"    {r['command'].replace(os.path.dirname(r['command'].split('--workdir=')[1]), 'RUNS')}"
        )
    lines += [
        f"    python experiments/bench_marl_games.py --game={name} --workroot=RUNS --out={out}"
        + (" --load_log=LOADLOG" if load_log else ""),
        "",
    ]
    readme = os.path.join(out, common.README)
    if os.path.exists(readme):
        text = open(readme).read()
        if NOTES in text:
            lines.append(text[text.index(NOTES) :].rstrip() + "\n")
    return "\n".join(lines)

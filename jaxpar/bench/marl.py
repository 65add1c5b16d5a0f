"""MARL benchmarks (the work behind experiments/bench_marl.py): learning runs of configs/marl.py presets,
throughput on 1 vs N simulated devices, and the committed report (results.json, README.md, PNG curves).
"""

import dataclasses
import json
import os
import time

import jax
import numpy as np

from jaxpar.bench import common
from jaxpar.config import MeshConfig
from jaxpar.machine import describe
from jaxpar.rl import plots
from jaxpar.rl.config import from_config_dict
from jaxpar.rl.loop import build, train
from jaxpar.train.metrics import read_metrics

# JaxMARL 0.2.0 IPPO-FF on MPE simple_spread, its default config, measured on this kind of 2-core CPU
# (shared/FIELD_NOTES.md). Its logged return is reward x num_agents summed over 26-step episodes.
_JAXMARL_LOGGED = {"1000000": -70.3, "2000000": -64.7, "5000000": -61.4, "10000000": -60.0}
JAXMARL_REFERENCE = {
    "source": "JaxMARL 0.2.0 ippo_ff_mpe (default config), 3 seeds, 2-core CPU; shared/FIELD_NOTES.md",
    "logged_return": _JAXMARL_LOGGED,
    "seconds_3_seeds_10M": 737,
    "per_agent_25_step": {k: round(v / 3 * 25 / 26, 2) for k, v in _JAXMARL_LOGGED.items()},
}


def _config(config_file: str, preset: str, overrides: list[str]):
    """`preset` of `config_file` (configs/marl.py) with dotted key=value `overrides`."""
    config = common.load_config_dict(f"{config_file}:{preset}")
    with config.unlocked():
        for item in overrides:
            key, value = item.split("=", 1)
            node = config
            *parents, leaf = key.split(".")
            for name in parents:
                node = node[name]
            node[leaf] = type(node[leaf])(json.loads(value)) if not isinstance(node[leaf], str) else value
    return config


def summarize(workdir: str, window: int = 50) -> dict:
    """Final returns (mean of the last `window` logged updates, per seed), timings and a thinned curve."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    c = plots.curve(records)
    last = records[-1]
    final_per_seed = np.nanmean(c["per_seed"][-window:], axis=0)
    keep = np.unique(np.linspace(0, len(c["env_steps"]) - 1, 200).astype(int))
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return {
        "config": config,
        "env_steps_per_seed": int(last["env_steps"]),
        "num_seeds": len(final_per_seed),
        "final_return_per_agent_per_seed": [round(float(x), 3) for x in final_per_seed],
        "final_return_per_agent_mean": round(float(np.mean(final_per_seed)), 3),
        "initial_return_per_agent_mean": round(float(np.nanmean(c["per_seed"][:10])), 3),
        "final_return_per_agent_std": round(float(np.std(final_per_seed)), 3),
        "final_return_by_agent": [
            round(float(np.nanmean([r[k] for r in records[-window:] if r[k] is not None])), 3)
            for k in sorted(
                (k for k in last if k.startswith("return_agent_")), key=lambda k: int(k.rsplit("_", 1)[1])
            )
        ],
        "final_window_updates": window,
        "train_wall_s": round(float(last["wall_s"]), 1),
        "train_cpu_s": round(float(last.get("cpu_s", float("nan"))), 1),
        "compile_s": round(float(last["compile_s"]), 1),
        "curve": {
            "env_steps": c["env_steps"][keep].tolist(),
            "wall_s": c["wall_s"][keep].round(2).tolist(),
            "return_mean": np.nanmean(c["per_seed"][keep], axis=1).round(3).tolist(),
        },
    }


def _finished(workdir: str, num_updates: int) -> bool:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    records = read_metrics(path)
    return bool(records) and records[-1]["step"] >= num_updates


def learn(config_file: str, presets: list[str], overrides: list[str], workroot: str, out: str) -> None:
    """Trains each of the `presets` of `config_file` into `workroot`/<preset> (resuming if it is there) and
    records the run's summary in `out`/results.json."""
    for preset in presets:
        run = from_config_dict(_config(config_file, preset, overrides))
        workdir = os.path.join(workroot, preset)
        load = [round(x, 1) for x in os.getloadavg()]
        done_before = _finished(workdir, run.num_updates)
        train(run, workdir)  # resumes; a finished workdir is only summarised
        results = common.read_results(out, missing_ok=True)
        previous = results.get("runs", {}).get(preset, {})
        results.setdefault("runs", {})[preset] = {
            **summarize(workdir),
            "machine": describe(),
            "overrides": overrides,
            "load_average_at_start": previous.get("load_average_at_start") if done_before else load,
            "load_average_at_end": previous.get("load_average_at_end")
            if done_before
            else [round(x, 1) for x in os.getloadavg()],
        }
        common.write_results(out, results)
        print(preset, {k: v for k, v in results["runs"][preset].items() if k not in ("curve", "config")})


def time_training(config_file: str, preset: str, updates: int, repeats: int) -> dict:
    """Env-steps/s of the whole training loop of `preset` on this process's devices, best of `repeats` calls
    of `updates` updates each, after compilation: the child side of `throughput`."""
    run = from_config_dict(_config(config_file, preset, []))
    run = dataclasses.replace(run, mesh=MeshConfig(data=jax.device_count()))
    ppo = build(run)
    states = ppo.init_states()
    step = ppo.run_updates(updates)
    states, metrics = step(states)  # warm-up
    jax.block_until_ready(metrics)
    best = None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        states, metrics = step(states)
        jax.block_until_ready(metrics)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu)
    env_steps = updates * run.steps_per_update * run.train.num_seeds
    return {
        "devices": jax.device_count(),
        "preset": preset,
        "updates_per_call": updates,
        "env_steps_per_call": env_steps,
        "best_wall_s": round(best[0], 3),
        "cpu_s": round(best[1], 3),
        "env_steps_per_s": round(env_steps / best[0]),
        "compile_s": round(ppo.compile_s[updates], 1),
        "load_average": [round(x, 1) for x in os.getloadavg()],
    }


def throughput(
    config_file: str, preset: str, devices: list[int], updates: int, repeats: int, out: str
) -> None:
    """`time_training` in a fresh process per simulated CPU device count (fixed when jax starts), into
    `out`/results.json."""
    rows = {}
    for n in devices:
        rows[str(n)] = common.run_in_child(__name__, [config_file, preset, updates, repeats], n)
        print(rows[str(n)])
    results = common.read_results(out, missing_ok=True)
    results["throughput"] = {
        "machine": describe(),
        "rows": rows,
        "note": "whole training loop (rollout, GAE, PPO epochs) of all seeds per "
        "second, after compile; best of the timed calls; CPU shared with other "
        "work",
    }
    common.write_results(out, results)


def report(workroot: str, out: str) -> None:
    """results.json re-summarised from the runs' workdirs under `workroot` (where they are), README.md and
    the learning-curve PNGs into `out`."""
    results = common.read_results(out, missing_ok=True)
    results["jaxmarl_reference"] = JAXMARL_REFERENCE
    runs = results.get("runs", {})
    for preset, r in runs.items():  # re-summarise with this version of the script, keeping the run facts
        workdir = os.path.join(workroot, preset)
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            keep = {
                k: r[k] for k in r if k in ("machine", "overrides", "note") or k.startswith("load_average")
            }
            runs[preset] = {**summarize(workdir), **keep}
    common.write_results(out, results)
    figures = {}
    for preset in runs:
        workdir = os.path.join(workroot, preset)
        if os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            fig, axes = plots.new_figure(
                f"{preset}: per-agent episode return, {runs[preset]['num_seeds']} "
                f"seeds (mean, min-max band); {runs[preset]['machine']['cpu']}"
            )
            plots.plot_curves(axes, preset, plots.curve(_records(workdir)))
            if preset.startswith("ippo_spread"):
                ref = JAXMARL_REFERENCE["per_agent_25_step"]
                axes[0].plot(
                    [int(k) for k in ref], list(ref.values()), "k*--", label="JaxMARL IPPO-FF (x25/26)"
                )
                axes[1].axvline(
                    JAXMARL_REFERENCE["seconds_3_seeds_10M"],
                    color="k",
                    ls=":",
                    label="JaxMARL 10M x 3 seeds: 737 s",
                )
            figures[preset] = plots.save(fig, os.path.join(out, f"{preset}.png"))
    _write_readme(results, out, figures)


def _records(workdir):
    return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _first(load):
    return "n/a" if not load else load[0]


def _write_readme(results: dict, out: str, figures: dict) -> None:
    lines = [
        "# MARL benchmarks (IPPO / MAPPO on jaxpar.envs MPE)",
        "",
        "Generated by `python experiments/bench_marl.py --mode=report`; numbers in results.json; what "
        "they mean, how they were taken and what was not reached: FINDINGS.md.",
        "",
    ]
    runs = results.get("runs", {})
    if runs:
        lines += [
            "## Learning runs",
            "",
            "| preset | env | algo | seeds | env steps / seed | first 10 updates "
            "| final return / agent (mean +- std over seeds) "
            "| by agent | train wall s | train CPU s | compile s | load avg (start, end) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for preset, r in runs.items():
            cfg = r["config"]
            by_agent = ", ".join(f"{x:.1f}" for x in r.get("final_return_by_agent", []))
            lines.append(
                f"| {preset} | {cfg['env']['id']} | {cfg['algo']['name']}-{cfg['network']['kind']} "
                f"| {r['num_seeds']} | {r['env_steps_per_seed']:,} "
                f"| {r['initial_return_per_agent_mean']:.2f} | "
                f"{r['final_return_per_agent_mean']:.2f} "
                f"+- {r['final_return_per_agent_std']:.2f} | "
                f"{by_agent} | {r['train_wall_s']:.0f} | "
                f"{r['train_cpu_s']:.0f} | {r['compile_s']:.0f} | "
                f"{_first(r['load_average_at_start'])}, {_first(r['load_average_at_end'])} |"
            )
        lines += [
            "",
            "Final return: mean per-agent episode return over the last "
            f"{next(iter(runs.values()))['final_window_updates']} updates of each seed (25-step "
            "episodes).",
            "",
        ]
    ref = results.get("jaxmarl_reference")
    if ref:
        lines += [
            "## Reference",
            "",
            f"{ref['source']}: logged {ref['logged_return']} (reward x 3 agents, "
            f"26-step episodes) = per agent per 25-step episode {ref['per_agent_25_step']}; "
            f"{ref['seconds_3_seeds_10M']} s for 3 seeds x 10M.",
            "",
        ]
    tp = results.get("throughput")
    if tp:
        rows = tp["rows"]
        base = rows.get("1", next(iter(rows.values())))["env_steps_per_s"]
        lines += [
            "## Throughput",
            "",
            f"{tp['note']}. Preset {next(iter(rows.values()))['preset']}.",
            "",
            "| devices | env-steps/s | vs 1 device | CPU s per call | wall s per call | compile s "
            "| load avg |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for n, row in rows.items():
            lines.append(
                f"| {n} | {row['env_steps_per_s']:,} | {row['env_steps_per_s'] / base:.2f}x | "
                f"{row['cpu_s']} | {row['best_wall_s']} | {row['compile_s']} "
                f"| {row['load_average'][0]} |"
            )
        machine = tp["machine"]
        lines += [
            "",
            f"Machine: {machine['cpu']}, {machine['cores']} cores; jax {machine['jax']}, flax "
            f"{machine['flax']}; {machine['date']}.",
            "",
        ]
    notes = [(preset, r["note"]) for preset, r in runs.items() if r.get("note")]
    if notes:
        lines += ["Notes: " + " ".join(f"**{preset}**: {note}." for preset, note in notes), ""]
    if os.path.exists(os.path.join(out, "ippo_spread_eval.gif")):
        lines += [
            "Greedy episode of the 10M-step ippo_spread policy (seed 0, `train_marl.py --mode=eval`):",
            "",
            "![episode](ippo_spread_eval.gif)",
            "",
        ]
    for preset, path in figures.items():
        lines += [f"![{preset}]({os.path.basename(path)})", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":  # throughput's child process: run_in_child's arguments in, results out
    common.child_main(time_training)

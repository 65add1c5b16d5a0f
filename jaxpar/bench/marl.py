"""MARL benchmarks (the work behind experiments/bench_marl.py): learning runs of configs/marl.py presets,
throughput on 1 vs N simulated devices, and the committed report (results.json, README.md, PNG curves).
"""

import dataclasses
import functools
import importlib.metadata
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.bench import common, jaxmarl_ippo
from jaxpar.config import MeshConfig
from jaxpar.machine import describe
from jaxpar.rl import plots
from jaxpar.rl.config import from_config_dict
from jaxpar.rl.loop import build, restore_params, train
from jaxpar.train.metrics import read_metrics


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
    results.pop("jaxmarl_reference", None)  # a JaxMARL number from another time: see compare/ instead
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
    lines += [
        "## Against JaxMARL",
        "",
        "Same-process, same-hyperparameter comparisons with JaxMARL 0.2.0 are in "
        "[compare/](compare/README.md) (`--mode=compare`). The learning runs above were taken at other "
        "times under other loads; their wall "
        "clocks are not comparable with each other or with any JaxMARL figure.",
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
    if any(preset not in figures for preset in runs):
        lines += [
            "Figures not redrawn by this report are the committed PNGs of the runs. Those of ippo_spread and "
            "ippo_spread_jaxmarl drawn before 2026-12-03 also show a dashed JaxMARL curve and a '737 s' line "
            "taken from another run at another time (shared/FIELD_NOTES.md): not a comparison; see "
            "compare/ for one.",
            "",
        ]
    for preset in runs:  # drawn now where the workdir is here, else the committed PNG of the run
        path = figures.get(preset, os.path.join(out, f"{preset}.png"))
        if os.path.exists(path):
            lines += [f"![{preset}]({os.path.basename(path)})", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


# --- same-process comparison with JaxMARL ---------------------------------------------------------------

MPE2_KWARGS = {"N": 3, "local_ratio": 0.5, "max_cycles": 25, "continuous_actions": False}
REPLAY_SEED = 10_000  # mpe2 episode i of every replay resets with seed REPLAY_SEED + i
JAXMARL = "jaxmarl_baseline"
CONTENDERS = {
    "jaxpar_jaxmarl_settings": "jaxpar, preset ippo_spread_jaxmarl (JaxMARL's ippo_ff_mpe.yaml settings, "
    "time limit as termination)",
    JAXMARL: jaxmarl_ippo.LABEL,
    "jaxpar_tuned": "jaxpar, preset ippo_spread (tuned: 2 epochs x 8 minibatches, lr 5e-4, time-limit "
    "bootstrapping); other hyperparameters than JaxMARL's, a separate row",
}
_PRESETS = {"jaxpar_jaxmarl_settings": "ippo_spread_jaxmarl", "jaxpar_tuned": "ippo_spread"}


def replay_mpe2(policy, episodes: int, greedy: bool, seed: int = 0) -> np.ndarray:
    """Returns [episodes, agents] of `policy` (observations [E, A, D] -> logits [E, A, n]) acting in mpe2
    1.1.1's simple_spread_v3 (3 agents, 25 steps): every step of all `episodes` episodes in one policy
    call, argmax actions where `greedy`, else sampled (a numpy Generator seeded by `seed`). Episode i
    resets with seed REPLAY_SEED + i, the same for every policy."""
    from mpe2 import simple_spread_v3

    if episodes < 1:
        raise ValueError(f"episodes={episodes}; replay at least 1.")
    rng = np.random.default_rng(seed)
    envs = [simple_spread_v3.parallel_env(**MPE2_KWARGS) for _ in range(episodes)]
    names = envs[0].possible_agents
    obs = [env.reset(seed=REPLAY_SEED + i)[0] for i, env in enumerate(envs)]
    returns = np.zeros((episodes, len(names)))
    for _ in range(MPE2_KWARGS["max_cycles"]):
        live = [i for i, env in enumerate(envs) if env.agents]
        if not live:
            break
        batch = np.stack([[obs[i][n] for n in names] for i in live]).astype(np.float32)
        logits = np.asarray(policy(batch), np.float64)
        if not greedy:
            logits = logits + rng.gumbel(size=logits.shape)  # Gumbel-max: a sample of softmax(logits)
        actions = logits.argmax(-1)
        for row, i in enumerate(live):
            obs[i], reward, *_ = envs[i].step({n: int(actions[row, a]) for a, n in enumerate(names)})
            returns[i] += [reward[n] for n in names]
    return returns


def jaxpar_policy(ppo, params):
    """One seed's params of a jaxpar PPO learner as replay_mpe2's policy (feed-forward networks)."""

    @jax.jit
    def logits(obs):
        carry = jax.tree.map(
            lambda s: jnp.zeros((obs.shape[0], *s.shape[2:]), s.dtype), ppo.abstract_state.rollout.carry
        )
        return ppo.policy_step(params, carry, obs, jnp.zeros(obs.shape[:1], bool))[1]

    return logits


def _final(per_seed: np.ndarray, window: int) -> np.ndarray:
    """[U, S] per-update returns -> [S] means of the last `window` updates."""
    return np.nanmean(per_seed[-window:], axis=0)


def _train_contender(name: str, config_file: str, steps: int, seeds: int, workroot: str):
    """Trains one contender from nothing: (curve env_steps [U], per-seed returns [U, S] per agent per
    25-step episode, a replay policy per seed, extra facts, (wall s, process CPU s) from building the env
    to the trained parameters: compile included, for jaxpar its checkpoints and curve plot too)."""
    t0, c0 = time.perf_counter(), time.process_time()
    if name == JAXMARL:
        hyper = jaxmarl_ippo.Hyper(total_env_steps=steps)
        keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
        params, metrics = jax.jit(jax.vmap(jaxmarl_ippo.make_train(hyper)))(keys)
        params, metrics = jax.device_get((params, metrics))
        clock = (time.perf_counter() - t0, time.process_time() - c0)
        policies = [
            jax.jit(functools.partial(jaxmarl_ippo.policy_logits, jax.tree.map(lambda x, s=s: x[s], params)))
            for s in range(seeds)
        ]
        logged = np.asarray(metrics["logged_return"]).T  # [U, S]
        extra = {
            "hyperparameters": hyper._asdict(),
            "jaxmarl_logged_final_mean": round(float(np.nanmean(logged[-50:])), 3),
        }
        return np.asarray(metrics["env_steps"][0]), np.asarray(metrics["return_25"]).T, policies, extra, clock
    preset = _PRESETS[name]
    overrides = [f"train.total_env_steps={steps}", f"train.num_seeds={seeds}"]
    run = dataclasses.replace(
        from_config_dict(_config(config_file, preset, overrides)), mesh=MeshConfig(data=1)
    )
    workdir = os.path.join(workroot, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh run: compile and start-up included, no resume
    devices = jax.devices()[:1]
    train(run, workdir, devices)
    clock = (time.perf_counter() - t0, time.process_time() - c0)
    ppo = build(run, devices)
    params, _ = restore_params(run, workdir, ppo)
    policies = [jaxpar_policy(ppo, jax.tree.map(lambda x, s=s: x[s], params)) for s in range(seeds)]
    c = plots.curve(_records(workdir))
    with open(os.path.join(workdir, "config.json")) as f:
        extra = {"preset": preset, "config": json.load(f)}
    return c["env_steps"], c["per_seed"], policies, extra, clock


def compare(
    config_file: str, steps: int, seeds: int, episodes: int, workroot: str, out: str, window: int = 50
) -> dict:
    """The contenders of CONTENDERS, one after another in this process, each trained from nothing on
    `seeds` seeds x `steps` env steps (seeds vmapped in one program, as both codebases run them), timed
    wall-clock and process-CPU from building the env to the trained parameters (compile included), then
    every seed's final policy replayed in mpe2 (greedy and sampled, `episodes` episodes). Writes
    `out`/results.json, README.md and learning_curves.png."""
    versions = {"jaxmarl": importlib.metadata.version("jaxmarl"), "mpe2": importlib.metadata.version("mpe2")}
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows, curves = {}, {}
    for name in CONTENDERS:
        load0 = [round(x, 2) for x in os.getloadavg()]
        env_steps, per_seed, policies, extra, (wall, cpu) = _train_contender(
            name, config_file, steps, seeds, workroot
        )
        final = _final(per_seed, window)
        replay = {}
        for mode in ("greedy", "sampled"):
            per = [replay_mpe2(p, episodes, mode == "greedy", seed=s).mean() for s, p in enumerate(policies)]
            replay[mode] = {
                "per_seed": [round(float(x), 3) for x in per],
                "mean": round(float(np.mean(per)), 3),
            }
            replay[mode]["std"] = round(float(np.std(per)), 3)
        total = int(env_steps[-1]) * seeds
        rows[name] = {
            "label": CONTENDERS[name],
            "env_steps_per_seed": int(env_steps[-1]),
            "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1),
            "env_steps_per_wall_s": round(total / wall),
            "env_steps_per_cpu_s": round(total / cpu),
            "final_return_per_seed": [round(float(x), 3) for x in final],
            "final_return_mean": round(float(np.mean(final)), 3),
            "final_return_std": round(float(np.std(final)), 3),
            "mpe2_replay": replay,
            "load_average_before": load0,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            **extra,
        }
        curves[name] = (env_steps, per_seed)
        print(name, {k: v for k, v in rows[name].items() if k not in ("config", "hyperparameters", "label")})
        _write_compare(rows, curves, steps, seeds, episodes, window, versions, load_before, out)
    return common.read_results(out)


def _write_compare(rows, curves, steps, seeds, episodes, window, versions, load_before, out) -> None:
    """results.json, README.md and learning_curves.png of the contenders done so far (a run cut short
    keeps what it measured)."""
    base = rows.get(JAXMARL)
    for row in rows.values():
        if base:
            row["speed_vs_jaxmarl_wall"] = round(base["wall_s"] / row["wall_s"], 3)
            row["speed_vs_jaxmarl_cpu"] = round(base["cpu_s"] / row["cpu_s"], 3)
    results = {
        "what": "jaxpar against JaxMARL 0.2.0 on MPE simple_spread_v3 (3 agents), in one process",
        "return_unit": jaxmarl_ippo.RETURN_UNIT,
        "steps_per_seed": steps,
        "seeds": seeds,
        "final_window_updates": window,
        "replay_episodes_per_seed": episodes,
        "machine": describe(),
        "versions": versions,
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "contenders": rows,
    }
    common.write_results(out, results)
    _compare_figure(curves, rows, results, os.path.join(out, "learning_curves.png"))
    common.write_readme(out, _compare_readme(results))


def _compare_figure(curves: dict, rows: dict, results: dict, path: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (env_steps, per_seed) in curves.items():
        smoothed = np.stack([plots.smooth(per_seed[:, s], 10) for s in range(per_seed.shape[1])], axis=1)
        mean, std = np.nanmean(smoothed, axis=1), np.nanstd(smoothed, axis=1)
        line = ax.plot(env_steps, mean, label=f"{name} ({rows[name]['wall_s']:.0f} s wall incl. compile)")[0]
        ax.fill_between(env_steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("env steps per seed")
    ax.set_ylabel("return per agent per 25-step episode")
    ax.set_title(
        f"simple_spread_v3, {results['seeds']} seeds (mean +- std, 10-update smoothing), one process\n"
        f"{results['machine']['cpu']}, {results['machine']['cores']} cores, {results['machine']['date']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    common.save_figure(fig, path, dpi=110)


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "n/a"


def _compare_readme(results: dict) -> str:
    rows = results["contenders"]
    m = results["machine"]
    lines = [
        "# jaxpar against JaxMARL 0.2.0, same process (IPPO-FF, MPE simple_spread_v3)",
        "",
        "Generated by `python experiments/bench_marl.py --mode=compare`; numbers in results.json. Every row "
        "below was measured in the same process, one contender after another, from building the env to "
        f"the trained parameters (compile included): {results['seeds']} seeds x "
        f"{results['steps_per_seed']:,} env steps each, seeds vmapped in one program (as both codebases run "
        "them), on one CPU device. Each contender ran once, in the order listed, while other jobs shared the "
        "machine and their load drifted (see the load column): the ratios are of one run each, not a "
        "distribution; the CPU-second ratio depends less on the load than the wall-clock one. Process "
        "start-up and the Python imports both share are not timed; JaxMARL's import is (it happens in "
        "the timed part).",
        "",
        "Contenders:",
        "",
    ]
    lines += [f"- **{name}**: {row['label']}." for name, row in rows.items()]
    lines += [
        "",
        f"Return unit: {results['return_unit']}. jaxpar's MPE episodes are mpe2's 25 transitions. JaxMARL's "
        "MPE episodes run 26 transitions (its `done` is computed before its step counter increments) and "
        "its log wrapper sums reward x num_agents: the re-implementation sums each agent's reward over the "
        "first 25 transitions of each of its episodes instead, the same quantity as jaxpar's. 'Final' is "
        f"the mean over the last {results['final_window_updates']} updates of each seed, then mean +- std "
        f"over seeds. mpe2 replay: every seed's final policy, {results['replay_episodes_per_seed']} episodes "
        "in mpe2 1.1.1 (the same reset seeds for every contender), argmax or sampled actions.",
        "",
        "| contender | final return (training) | mpe2 greedy | mpe2 sampled | wall s (incl. compile) "
        "| process CPU s | env steps / wall s | env steps / CPU s | speed vs JaxMARL (wall) "
        "| speed vs JaxMARL (CPU) | load avg before, after |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        g, s = r["mpe2_replay"]["greedy"], r["mpe2_replay"]["sampled"]
        lines.append(
            f"| {name} | {r['final_return_mean']:.2f} +- {r['final_return_std']:.2f} "
            f"| {g['mean']:.2f} +- {g['std']:.2f} | {s['mean']:.2f} +- {s['std']:.2f} | {r['wall_s']:.0f} "
            f"| {r['cpu_s']:.0f} | {r['env_steps_per_wall_s']:,} | {r['env_steps_per_cpu_s']:,} "
            f"| {_ratio(r, 'speed_vs_jaxmarl_wall')} | {_ratio(r, 'speed_vs_jaxmarl_cpu')} "
            f"| {r['load_average_before'][0]}, {r['load_average_after'][0]} |"
        )
    base = rows.get(JAXMARL, {"jaxmarl_logged_final_mean": float("nan")})
    lines += [
        "",
        f"Speed vs JaxMARL = JaxMARL's seconds / the contender's seconds in this run (above 1: faster). "
        f"JaxMARL's own logged metric at the end (mean of the last 50 updates, reward x 3 agents over 26 "
        f"transitions): {base['jaxmarl_logged_final_mean']:.2f}, "
        f"i.e. {jaxmarl_ippo.per_agent_25(base['jaxmarl_logged_final_mean'], 3):.2f} by the /3 x 25/26 "
        "estimate, against the measured 25-step return above.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared with other jobs (load average "
        f"{results['load_average_before']} before, {results['load_average_after']} after; the wall "
        "clock depends on that load, the CPU seconds less so); jax "
        f"{m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, JaxMARL {results['versions']['jaxmarl']}, "
        f"mpe2 {results['versions']['mpe2']}; {m['date']}.",
        "",
        "![learning curves](learning_curves.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # throughput's child process: run_in_child's arguments in, results out
    common.child_main(time_training)

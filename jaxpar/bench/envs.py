"""Environment throughput, measured the same way for jaxpar, JaxMARL's ports and mpe2 (the work behind
experiments/bench_envs.py, which only parses flags).

JAX implementations run B envs as one jitted `scan` over T steps of a vmapped step with autoreset;
random actions are drawn inside the scan by the SAME sampler for both libraries (so the ratio is the
envs'), and every observation and reward feeds a checksum so nothing is dead code. Compile time is
measured apart (lower + compile); runs are timed after a warm-up, repetitions interleaved between
libraries so a busy machine slows them alike, and the median is reported. mpe2 is its parallel API in a
Python loop that resets when the agents are done.

Scaling over simulated devices runs in a child process started with the device count forced (it is
fixed when jax starts): the batch is placed with `EnvRuntime` on meshes of 1, 2, 4, 8 of those devices.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import jaxpar.envs as E
from jaxpar import machine as machine_lib
from jaxpar.bench import common
from jaxpar.envs.wrappers import VecEnv

JAXMARL_IDS = {
    "simple_spread_v3": "MPE_simple_spread_v3",
    "simple_tag_v3": "MPE_simple_tag_v3",
    "simple_reference_v3": "MPE_simple_reference_v3",
}


def sample_actions(key: jax.Array, nvec: np.ndarray, num_envs: int) -> jax.Array:
    """[B, A] uniform discrete actions, agent i in [0, nvec[i]): the one sampler both libraries get."""
    return jax.random.randint(key, (num_envs, len(nvec)), 0, jnp.asarray(nvec, jnp.int32))


def scan_rollout(reset: Callable, step: Callable, nvec, num_envs: int, num_steps: int) -> Callable:
    """jit(key -> checksum): reset B envs, then `num_steps` steps of random actions in one scan.
    `step(key, state, actions [B, A]) -> (obs tree, state, reward tree)`."""

    def run(key):
        k_reset, k_steps = jax.random.split(key)
        state = reset(k_reset)

        def body(carry, k):
            state, checksum = carry
            k_act, k_env = jax.random.split(k)
            obs, state, reward = step(k_env, state, sample_actions(k_act, nvec, num_envs))
            total = sum(jnp.sum(x) for x in jax.tree.leaves((obs, reward)))
            return (state, checksum + total), None

        (_, checksum), _ = jax.lax.scan(body, (state, jnp.float32(0)), jax.random.split(k_steps, num_steps))
        return checksum

    return jax.jit(run)


def jaxpar_rollout(env_id: str, num_envs: int, num_steps: int, lazy_reset: bool = True) -> Callable:
    env = E.make(env_id)
    vec = VecEnv(env, num_envs, autoreset=True, lazy_reset=lazy_reset)

    def step(key, state, actions):
        obs, state, reward, *_ = vec.step(key, state, actions)
        return obs, state, reward

    return scan_rollout(lambda k: vec.reset(k)[1], step, env.action_space.n, num_envs, num_steps)


def jaxmarl_rollout(env_id: str, num_envs: int, num_steps: int) -> Callable:
    """JaxMARL's port, vmapped the way its own examples do (one key per env per step, its step autoresets)."""
    import jaxmarl

    env = jaxmarl.make(JAXMARL_IDS[env_id])
    nvec = np.array([env.action_space(a).n for a in env.agents])

    def step(key, state, actions):
        acts = {a: actions[:, i] for i, a in enumerate(env.agents)}
        obs, state, reward, _, _ = jax.vmap(env.step)(jax.random.split(key, num_envs), state, acts)
        return obs, state, reward

    return scan_rollout(
        lambda k: jax.vmap(env.reset)(jax.random.split(k, num_envs))[1], step, nvec, num_envs, num_steps
    )


def compile_seconds(fn: Callable) -> tuple[Callable, float]:
    start = time.perf_counter()
    compiled = fn.lower(jax.random.key(0)).compile()
    return compiled, time.perf_counter() - start


def time_interleaved(programs: dict[str, Callable], reps: int) -> dict[str, list[float]]:
    """Seconds per run of each compiled program, repetitions interleaved, after one warm-up run each."""
    for fn in programs.values():
        jax.block_until_ready(fn(jax.random.key(0)))
    times = {name: [] for name in programs}
    for r in range(reps):
        for name, fn in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(jax.random.key(r + 1)))
            times[name].append(time.perf_counter() - start)
    return times


def mpe2_steps_per_second(env_id: str, num_steps: int, seed: int = 0) -> float:
    """mpe2's parallel API in a Python loop with random actions, resetting whenever the agents are done."""
    env = importlib.import_module(f"mpe2.{env_id}").parallel_env()
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    nvec = np.array([env.action_space(a).n for a in env.possible_agents])
    start = time.perf_counter()
    for _ in range(num_steps):
        if not env.agents:
            env.reset()
        actions = rng.integers(0, nvec)
        env.step({a: int(x) for a, x in zip(env.possible_agents, actions)})
    return num_steps / (time.perf_counter() - start)


def throughput(
    env_ids,
    batch_sizes,
    steps_for: Callable[[int], int],
    reps: int,
    mpe2_steps: int,
    with_jaxmarl: bool,
    log=print,
) -> list[dict]:
    rows = []
    for env_id in env_ids:
        num_agents = E.make(env_id).num_agents
        mpe2_runs = [mpe2_steps_per_second(env_id, mpe2_steps, seed) for seed in range(reps)]
        mpe2_rate = statistics.median(mpe2_runs)
        log(f"{env_id}: mpe2 parallel API {mpe2_rate:,.0f} env-steps/s")
        for num_envs in batch_sizes:
            T = steps_for(num_envs)
            builders = {
                "jaxpar": lambda: jaxpar_rollout(env_id, num_envs, T),
                "jaxpar_reset_every_step": lambda: jaxpar_rollout(env_id, num_envs, T, lazy_reset=False),
            }
            if with_jaxmarl:
                builders["jaxmarl"] = lambda: jaxmarl_rollout(env_id, num_envs, T)
            compiled, compile_s = {}, {}
            for name, build in builders.items():
                compiled[name], compile_s[name] = compile_seconds(build())
            times = time_interleaved(compiled, reps)
            row = {
                "env": env_id,
                "num_envs": num_envs,
                "num_agents": num_agents,
                "scan_steps": T,
                "reps": reps,
                "mpe2_env_steps_per_s": mpe2_rate,
                "mpe2_runs_env_steps_per_s": mpe2_runs,
            }
            for name in compiled:
                rates = [num_envs * T / t for t in times[name]]
                row[f"{name}_env_steps_per_s"] = statistics.median(rates)
                row[f"{name}_agent_steps_per_s"] = statistics.median(rates) * num_agents
                row[f"{name}_runs_env_steps_per_s"] = rates
                row[f"{name}_compile_s"] = compile_s[name]
            if with_jaxmarl:
                row["speedup_vs_jaxmarl"] = row["jaxpar_env_steps_per_s"] / row["jaxmarl_env_steps_per_s"]
            row["speedup_vs_mpe2"] = row["jaxpar_env_steps_per_s"] / mpe2_rate
            rows.append(row)
            log(
                f"{env_id} B={num_envs}: jaxpar {row['jaxpar_env_steps_per_s']:,.0f} env-steps/s"
                + (
                    f", JaxMARL {row['jaxmarl_env_steps_per_s']:,.0f} (x{row['speedup_vs_jaxmarl']:.2f})"
                    if with_jaxmarl
                    else ""
                )
                + f", x{row['speedup_vs_mpe2']:.0f} mpe2"
            )
    return rows


# --- scaling over simulated devices (child process) -------------------------------------------------------


def scaling_here(env_id: str, num_envs: int, num_steps: int, device_counts, reps: int) -> list[dict]:
    """In this process: env-steps/s of the EnvRuntime rollout on meshes of the first k devices."""
    from jaxpar.envs.runtime import EnvRuntime
    from jaxpar.parallel.mesh import make_mesh

    programs, compile_s = {}, {}
    for k in device_counts:
        runtime = EnvRuntime(E.make(env_id), num_envs, make_mesh({"data": k}, devices=jax.devices()[:k]))
        rollout = runtime.rollout_fn(num_steps)
        obs, state = runtime.reset(jax.random.key(0))
        start = time.perf_counter()
        compiled = rollout.lower(jax.random.key(0), obs, state).compile()
        compile_s[k] = time.perf_counter() - start
        programs[k] = (lambda c, o, s: lambda key: c(key, o, s))(compiled, obs, state)
    times = time_interleaved(programs, reps)
    return [
        {
            "env": env_id,
            "num_envs": num_envs,
            "devices": k,
            "scan_steps": num_steps,
            "compile_s": compile_s[k],
            "env_steps_per_s": statistics.median(num_envs * num_steps / t for t in times[k]),
            "runs_env_steps_per_s": [num_envs * num_steps / t for t in times[k]],
        }
        for k in device_counts
    ]


def scaling(env_id: str, num_envs: int, num_steps: int, device_counts, reps: int) -> list[dict]:
    """`scaling_here` in a child process that simulates max(device_counts) CPU devices."""
    args = [env_id, num_envs, num_steps, list(device_counts), reps]
    return common.run_in_child(__name__, args, max(device_counts))


# --- where and with what it ran ---------------------------------------------------------------------------


def machine() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "numpy", "mpe2", "pettingzoo", "jaxmarl"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu_model": machine_lib.cpu_model(),
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": os.getloadavg(),
        "versions": versions,
    }


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def write(results: dict, out: pathlib.Path) -> None:
    """results.json, README.md (tables) and throughput.png into `out`."""
    common.write_results(out, results)
    write_report(results, out)


def write_report(results: dict, out: pathlib.Path) -> None:
    """README.md and throughput.png."""
    common.write_readme(out, readme(results))
    plot(results, out / "throughput.png")


def readme(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    rows = results["throughput"]
    has_jaxmarl = any("jaxmarl_env_steps_per_s" in r for r in rows)
    lines = [
        "# Environment throughput",
        "",
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['backend']} backend; load "
        f"average {m['load_average_at_start'][0]:.1f} at the start and "
        f"{results.get('load_average_at_end', [float('nan')])[0]:.1f} at the end: the machine is shared, so "
        "absolute numbers are low and noisy, ratios less so). "
        f"Python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, numpy {v['numpy']}, "
        f"mpe2 {v['mpe2']}, pettingzoo {v['pettingzoo']}, JaxMARL {v['jaxmarl'] or 'not installed'}.",
        "",
        "Produced by `python experiments/bench_envs.py` (see `jaxpar/bench/envs.py`). env-steps/s = envs x "
        "scan steps / seconds; agent-steps/s = env-steps/s x agents. Each JAX cell is one jitted `scan` of a "
        "vmapped step with autoreset and random actions drawn inside the scan by the same sampler for both "
        f"libraries; median of {rows[0]['reps']} repetitions, interleaved between libraries, compile time "
        'apart. "reset every step" is jaxpar computing the reset of every env at every step as JaxMARL does, '
        "instead of only on steps where an episode ended. mpe2 is its parallel API in a Python loop with "
        "random actions, resetting when done (one env). All ratios are against numbers measured in this "
        "same run.",
        "",
        "| env | envs | jaxpar env-steps/s | jaxpar agent-steps/s | jaxpar, reset every step | "
        + ("JaxMARL | jaxpar / JaxMARL | " if has_jaxmarl else "")
        + "mpe2 | jaxpar / mpe2 | compile s (jaxpar"
        + (" / JaxMARL" if has_jaxmarl else "")
        + ") |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if has_jaxmarl else "") + "---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            r["env"],
            str(r["num_envs"]),
            _fmt(r["jaxpar_env_steps_per_s"]),
            _fmt(r["jaxpar_agent_steps_per_s"]),
            _fmt(r["jaxpar_reset_every_step_env_steps_per_s"]),
        ]
        compile_s = f"{r['jaxpar_compile_s']:.1f}"
        if has_jaxmarl:
            cells += [_fmt(r["jaxmarl_env_steps_per_s"]), f"{r['speedup_vs_jaxmarl']:.2f}x"]
            compile_s += f" / {r['jaxmarl_compile_s']:.1f}"
        cells += [_fmt(r["mpe2_env_steps_per_s"]), f"{r['speedup_vs_mpe2']:,.0f}x", compile_s]
        lines.append("| " + " | ".join(cells) + " |")
    if not has_jaxmarl:
        lines += [
            "",
            "JaxMARL was not measured in this run. For reference only (NOT measured in this run): "
            "FIELD_NOTES records JaxMARL simple_spread at 69k (1 env), 205k (64), 276k (1024), 347k (8192) "
            "env-steps/s on a 2-core CPU.",
        ]
    scale = results.get("scaling") or []
    if scale:
        base = scale[0]["env_steps_per_s"]
        lines += [
            "",
            f"## Scaling over simulated CPU devices ({scale[0]['env']}, {scale[0]['num_envs']} envs)",
            "",
            "The batch placed on meshes of 1, 2, 4, 8 devices simulated by XLA on the same "
            f"{m['cpu_cores']} cores (`--xla_force_host_platform_device_count`), so this shows the runtime's "
            "overhead and how well the host's cores are used, not more hardware.",
            "",
            "| devices | env-steps/s | vs 1 device | compile s |",
            "|---:|---:|---:|---:|",
        ]
        for r in scale:
            lines.append(
                f"| {r['devices']} | {_fmt(r['env_steps_per_s'])} | {r['env_steps_per_s'] / base:.2f}x | "
                f"{r['compile_s']:.1f} |"
            )
    lines += ["", "![throughput](throughput.png)", ""]
    return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
    rows, scale = results["throughput"], results.get("scaling") or []
    envs = list(dict.fromkeys(r["env"] for r in rows))
    panels = len(envs) + bool(scale)
    fig, axes = common.pyplot().subplots(1, panels, figsize=(4.2 * panels, 3.8))
    series = [
        ("jaxpar", "jaxpar"),
        ("jaxpar_reset_every_step", "jaxpar, reset every step"),
        ("jaxmarl", "JaxMARL"),
    ]
    for ax, env_id in zip(axes, envs):
        sub = [r for r in rows if r["env"] == env_id]
        xs = [r["num_envs"] for r in sub]
        for key, label in series:
            if f"{key}_env_steps_per_s" in sub[0]:
                ax.plot(xs, [r[f"{key}_env_steps_per_s"] for r in sub], marker="o", label=label)
        ax.axhline(sub[0]["mpe2_env_steps_per_s"], color="grey", linestyle="--", label="mpe2 (1 env, Python)")
        ax.set(xscale="log", yscale="log", xlabel="envs", ylabel="env-steps/s", title=env_id)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if scale:
        ax = axes[-1]
        ax.plot([r["devices"] for r in scale], [r["env_steps_per_s"] for r in scale], marker="o")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set(
            xlabel="simulated CPU devices",
            ylabel="env-steps/s",
            title=f"{scale[0]['env']}, {scale[0]['num_envs']} envs",
        )
        ax.set_xticks([r["devices"] for r in scale], [str(r["devices"]) for r in scale])
        ax.grid(True, alpha=0.3)
    m = results["machine"]
    fig.suptitle(
        f"{m['cpu_model']}, {m['cpu_cores']} cores; jax {m['versions']['jax']}; {m['date'][:10]}; "
        "ratios vs JaxMARL / mpe2 measured in the same run",
        fontsize=9,
    )
    common.save_figure(fig, path, dpi=110)


def run(
    out: str,
    env_ids: list[str],
    batch_sizes: list[int],
    scan_steps: list[int],
    reps: int,
    mpe2_steps: int,
    with_jaxmarl: bool,
    scaling_devices: list[int],
    scaling_num_envs: int,
    scaling_steps: int,
) -> None:
    """Throughput of `env_ids` at each of `batch_sizes` (a scan of the `scan_steps` at the same position),
    then, unless `scaling_devices` is empty, scaling of the first env over those device counts;
    results.json, README.md and throughput.png into `out`."""
    steps = dict(zip(batch_sizes, scan_steps))
    results = {"machine": machine()}
    results["throughput"] = throughput(
        env_ids, list(steps), steps.__getitem__, reps, mpe2_steps, with_jaxmarl
    )
    if scaling_devices:
        results["scaling"] = scaling(env_ids[0], scaling_num_envs, scaling_steps, scaling_devices, reps)
    results["load_average_at_end"] = os.getloadavg()
    write(results, pathlib.Path(out))
    print(f"wrote {out}/README.md")


def render(out: str) -> None:
    """README.md and throughput.png again from `out`/results.json; nothing measured."""
    write_report(common.read_results(out), pathlib.Path(out))


if __name__ == "__main__":  # the scaling child: run_in_child's arguments in, results out
    common.child_main(scaling_here)

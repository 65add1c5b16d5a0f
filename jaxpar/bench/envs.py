"""Environment throughput, measured the same way for jaxpar, JaxMARL's ports and the original Python
packages (the work behind experiments/bench_envs.py, which only parses flags).

Cases: the MPE scenarios (original: mpe2's parallel API), Overcooked layouts (original: overcooked-ai's
`OvercookedGridworld`, the mdp that jaxpar's port is exact to) and Hanabi (original: DeepMind's
hanabi-learning-environment `rl_env`). JaxMARL is imported only when it is measured, and the original
packages only when their case is measured.

JAX implementations run B envs as one jitted `scan` over T steps of a vmapped step with autoreset;
actions are drawn inside the scan by the SAME sampler for both libraries (uniform per agent, or, for
Hanabi, uniform among each library's own legal-move mask), so the ratio is the envs'; every observation
and reward feeds a checksum so nothing is dead code. Compile time is measured apart (lower + compile).
Within a cell (case x batch size) the contenders, the original's Python loop included, are timed in
interleaved repetitions after a warm-up each, so a busy machine slows them alike; medians are reported,
of wall-clock and of this process's CPU time (all threads), the latter for per-CPU-second ratios.

Scaling over simulated devices runs in a child process started with the device count forced (it is
fixed when jax starts): the batch is placed with `EnvRuntime` on meshes of 1, 2, 4, 8 of those devices.
"""

from __future__ import annotations

import dataclasses
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

CONTENDERS = ("jaxpar", "jaxpar_reset_every_step", "jaxmarl", "original")


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked environment: jaxpar's `env_id(**kwargs)`, JaxMARL's version of it, the original."""

    name: str  # the row label and the --envs name
    family: str  # "mpe", "overcooked" or "hanabi"
    env_id: str
    kwargs: dict = dataclasses.field(default_factory=dict)
    masked: bool = False  # sample among legal moves (each library's own mask)
    scan_scale: float = 1.0  # scan steps = the batch size's scan steps x this (slow steps, shorter scans)
    original_steps: int = 2000  # steps per timed repetition of the original's Python loop
    max_num_envs: int | None = None  # larger batch sizes are skipped for this case


CASES = {
    c.name: c
    for c in (
        Case("simple_spread_v3", "mpe", "simple_spread_v3"),
        Case("simple_tag_v3", "mpe", "simple_tag_v3"),
        Case("simple_reference_v3", "mpe", "simple_reference_v3"),
        Case(
            "overcooked_cramped_room", "overcooked", "overcooked", {"layout": "cramped_room"}, scan_scale=0.5
        ),
        Case(
            "overcooked_counter_circuit",
            "overcooked",
            "overcooked",
            {"layout": "counter_circuit"},
            scan_scale=0.5,
            max_num_envs=1024,
        ),
        *(
            Case(f"hanabi_{p}p", "hanabi", "hanabi", {"num_players": p}, True, 0.2, 500, max_num_envs=1024)
            for p in (2, 4)
        ),
    )
}
JAXMARL_MPE = {
    "simple_spread_v3": "MPE_simple_spread_v3",
    "simple_tag_v3": "MPE_simple_tag_v3",
    "simple_reference_v3": "MPE_simple_reference_v3",
}
ORIGINALS = {
    "mpe": "mpe2's parallel API",
    "overcooked": "overcooked-ai's OvercookedGridworld (transition + lossless encoding of both players)",
    "hanabi": "hanabi-learning-environment's rl_env.HanabiEnv",
}


# --- the samplers and the scan both libraries run -----------------------------------------------------


def sample_actions(key: jax.Array, nvec: np.ndarray, num_envs: int) -> jax.Array:
    """[B, A] uniform discrete actions, agent i in [0, nvec[i])."""
    return jax.random.randint(key, (num_envs, len(nvec)), 0, jnp.asarray(nvec, jnp.int32))


def sample_legal(key: jax.Array, legal: jax.Array) -> jax.Array:
    """[B, A] actions uniform among the legal ones of `legal` [B, A, M] (bool)."""
    return jax.random.categorical(key, jnp.where(legal, 0.0, -jnp.inf)).astype(jnp.int32)


def scan_rollout(reset: Callable, step: Callable, sample: Callable, num_steps: int) -> Callable:
    """jit(key -> checksum): reset B envs, then `num_steps` steps of sampled actions in one scan.
    `reset(key) -> state`, `sample(key, state) -> actions [B, A]`,
    `step(key, state, actions) -> (obs tree, state, reward tree)`."""

    def run(key):
        k_reset, k_steps = jax.random.split(key)
        state = reset(k_reset)

        def body(carry, k):
            state, checksum = carry
            k_act, k_env = jax.random.split(k)
            obs, state, reward = step(k_env, state, sample(k_act, state))
            total = sum(jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves((obs, reward)))
            return (state, checksum + total), None

        (_, checksum), _ = jax.lax.scan(body, (state, jnp.float32(0)), jax.random.split(k_steps, num_steps))
        return checksum

    return jax.jit(run)


def jaxpar_rollout(case: Case, num_envs: int, num_steps: int, lazy_reset: bool = True) -> Callable:
    env = E.make(case.env_id, **case.kwargs)
    vec = VecEnv(env, num_envs, autoreset=True, lazy_reset=lazy_reset)

    def step(key, state, actions):
        obs, state, reward, *_ = vec.step(key, state, actions)
        return obs, state, reward

    if case.masked:
        sample = lambda k, state: sample_legal(k, vec.legal_actions(state))  # noqa: E731
    else:
        sample = lambda k, state: sample_actions(k, env.action_space.n, num_envs)  # noqa: E731
    return scan_rollout(lambda k: vec.reset(k)[1], step, sample, num_steps)


def jaxmarl_env(case: Case):
    import jaxmarl

    if case.family == "mpe":
        return jaxmarl.make(JAXMARL_MPE[case.env_id])
    if case.family == "overcooked":
        from jaxmarl.environments.overcooked import overcooked_layouts

        return jaxmarl.make("overcooked", layout=overcooked_layouts[case.kwargs["layout"]])
    if case.family == "hanabi":
        return jaxmarl.make("hanabi", num_agents=case.kwargs["num_players"])
    raise ValueError(f"no JaxMARL version of {case.name}")


def jaxmarl_rollout(case: Case, num_envs: int, num_steps: int) -> Callable:
    """JaxMARL's port, vmapped the way its own examples do (one key per env per step, its step autoresets)."""
    env = jaxmarl_env(case)
    nvec = np.array([env.action_space(a).n for a in env.agents])

    def step(key, state, actions):
        acts = {a: actions[:, i] for i, a in enumerate(env.agents)}
        obs, state, reward, _, _ = jax.vmap(env.step)(jax.random.split(key, num_envs), state, acts)
        return obs, state, reward

    if case.masked:

        def sample(k, state):
            legal = jax.vmap(env.get_legal_moves)(state)
            return sample_legal(k, jnp.stack([legal[a] for a in env.agents], axis=1) > 0)

    else:
        sample = lambda k, state: sample_actions(k, nvec, num_envs)  # noqa: E731
    return scan_rollout(
        lambda k: jax.vmap(env.reset)(jax.random.split(k, num_envs))[1], step, sample, num_steps
    )


# --- the original packages, one env in a Python loop ------------------------------------------------------


class MPE2Loop:
    """mpe2's parallel API with random actions, resetting whenever the agents are done."""

    def __init__(self, case: Case, seed: int):
        self.env = importlib.import_module(f"mpe2.{case.env_id}").parallel_env()
        self.rng = np.random.default_rng(seed)
        self.env.reset(seed=seed)
        self.nvec = np.array([self.env.action_space(a).n for a in self.env.possible_agents])

    def run(self, num_steps: int) -> None:
        env = self.env
        for _ in range(num_steps):
            if not env.agents:
                env.reset()
            actions = self.rng.integers(0, self.nvec)
            env.step({a: int(x) for a, x in zip(env.possible_agents, actions)})


class OvercookedLoop:
    """overcooked-ai's mdp (the overcooked_env module does not import under numpy 2): uniform random joint
    actions, the transition, and both players' lossless state encoding (what jaxpar returns as the
    observation); back to the standard start state after `horizon` steps, as jaxpar's time limit does."""

    def __init__(self, case: Case, seed: int, horizon: int = 400):
        from overcooked_ai_py.mdp.actions import Action
        from overcooked_ai_py.mdp.overcooked_mdp import OvercookedGridworld

        self.actions = Action.INDEX_TO_ACTION
        self.mdp = OvercookedGridworld.from_layout_name(case.kwargs["layout"])
        self.horizon = horizon
        self.rng = np.random.default_rng(seed)
        self.state, self.t = self.mdp.get_standard_start_state(), 0

    def run(self, num_steps: int) -> None:
        mdp = self.mdp
        for _ in range(num_steps):
            if self.t == self.horizon:
                self.state, self.t = mdp.get_standard_start_state(), 0
            joint = self.rng.integers(0, len(self.actions), 2)
            self.state, _ = mdp.get_state_transition(self.state, [self.actions[a] for a in joint])
            mdp.lossless_state_encoding(self.state, horizon=self.horizon)
            self.t += 1


class HanabiLoop:
    """rl_env's Hanabi-Full: a uniform move from the current player's legal list each step (rl_env computes
    every player's observation, vectorized encoding included), reset when the game ends."""

    def __init__(self, case: Case, seed: int):
        from hanabi_learning_environment import rl_env

        self.env = rl_env.make("Hanabi-Full", num_players=case.kwargs["num_players"])
        self.rng = np.random.default_rng(seed)
        self.obs = self.env.reset()

    def run(self, num_steps: int) -> None:
        for _ in range(num_steps):
            players = self.obs["player_observations"]
            legal = players[self.obs["current_player"]]["legal_moves_as_int"]
            self.obs, _, done, _ = self.env.step(int(legal[self.rng.integers(len(legal))]))
            if done:
                self.obs = self.env.reset()


ORIGINAL_LOOPS = {"mpe": MPE2Loop, "overcooked": OvercookedLoop, "hanabi": HanabiLoop}


# --- timing -----------------------------------------------------------------------------------------------


def compile_seconds(fn: Callable) -> tuple[Callable, float]:
    start = time.perf_counter()
    compiled = fn.lower(jax.random.key(0)).compile()
    return compiled, time.perf_counter() - start


def jax_program(compiled: Callable) -> Callable[[int], None]:
    """rep -> None: one run of a compiled rollout with that repetition's key, waited for."""
    return lambda r: jax.block_until_ready(compiled(jax.random.key(r + 1)))


def time_interleaved(programs: dict[str, Callable[[int], None]], reps: int) -> dict[str, dict[str, list]]:
    """Wall and CPU seconds (this process, all threads) per run of each program (called with the
    repetition index), repetitions interleaved, after one warm-up run each."""
    for fn in programs.values():
        fn(-1)
    times = {name: {"wall": [], "cpu": []} for name in programs}
    for r in range(reps):
        for name, fn in programs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn(r)
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def _rates(steps: int, seconds: list[float]) -> list[float]:
    return [steps / t for t in seconds]


def throughput(
    case_names,
    batch_sizes,
    steps_for: Callable[[int], int],
    reps: int,
    original_scale: float,
    with_jaxmarl: bool,
    log=print,
) -> list[dict]:
    rows = []
    for case_name in case_names:
        case = CASES[case_name]
        num_agents = E.make(case.env_id, **case.kwargs).num_agents
        original = ORIGINAL_LOOPS[case.family](case, seed=0)
        original_steps = max(1, round(case.original_steps * original_scale))
        for num_envs in batch_sizes:
            if case.max_num_envs is not None and num_envs > case.max_num_envs:
                continue
            T = max(1, round(steps_for(num_envs) * case.scan_scale))
            builders = {
                "jaxpar": lambda: jaxpar_rollout(case, num_envs, T),
                "jaxpar_reset_every_step": lambda: jaxpar_rollout(case, num_envs, T, lazy_reset=False),
            }
            if with_jaxmarl:
                builders["jaxmarl"] = lambda: jaxmarl_rollout(case, num_envs, T)
            programs, compile_s = {}, {}
            for name, build in builders.items():
                compiled, compile_s[name] = compile_seconds(build())
                programs[name] = jax_program(compiled)
            programs["original"] = lambda r: original.run(original_steps)
            times = time_interleaved(programs, reps)
            row = {
                "env": case.name,
                "family": case.family,
                "env_kwargs": case.kwargs,
                "num_envs": num_envs,
                "num_agents": num_agents,
                "scan_steps": T,
                "reps": reps,
                "original": ORIGINALS[case.family],
                "original_steps": original_steps,
            }
            for name in programs:
                steps = original_steps if name == "original" else num_envs * T
                rates = _rates(steps, times[name]["wall"])
                row[f"{name}_env_steps_per_s"] = statistics.median(rates)
                row[f"{name}_runs_env_steps_per_s"] = rates
                row[f"{name}_env_steps_per_cpu_s"] = statistics.median(_rates(steps, times[name]["cpu"]))
                if name != "original":
                    row[f"{name}_agent_steps_per_s"] = statistics.median(rates) * num_agents
                    row[f"{name}_compile_s"] = compile_s[name]
            for base in ("jaxmarl", "original") if with_jaxmarl else ("original",):
                row[f"speedup_vs_{base}"] = row["jaxpar_env_steps_per_s"] / row[f"{base}_env_steps_per_s"]
                row[f"speedup_vs_{base}_per_cpu_s"] = (
                    row["jaxpar_env_steps_per_cpu_s"] / row[f"{base}_env_steps_per_cpu_s"]
                )
            row["load_average"] = os.getloadavg()
            rows.append(row)
            log(
                f"{case.name} B={num_envs}: jaxpar {row['jaxpar_env_steps_per_s']:,.0f} env-steps/s"
                + (
                    f", JaxMARL {row['jaxmarl_env_steps_per_s']:,.0f} (x{row['speedup_vs_jaxmarl']:.2f})"
                    if with_jaxmarl
                    else ""
                )
                + f", original {row['original_env_steps_per_s']:,.0f} (x{row['speedup_vs_original']:.0f}, "
                f"x{row['speedup_vs_original_per_cpu_s']:.0f} per CPU-s)",
                flush=True,
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
        programs[k] = (lambda c, o, s: lambda r: jax.block_until_ready(c(jax.random.key(r + 1), o, s)))(
            compiled, obs, state
        )
    times = time_interleaved(programs, reps)
    return [
        {
            "env": env_id,
            "num_envs": num_envs,
            "devices": k,
            "scan_steps": num_steps,
            "compile_s": compile_s[k],
            "env_steps_per_s": statistics.median(_rates(num_envs * num_steps, times[k]["wall"])),
            "runs_env_steps_per_s": _rates(num_envs * num_steps, times[k]["wall"]),
        }
        for k in device_counts
    ]


def scaling(env_id: str, num_envs: int, num_steps: int, device_counts, reps: int) -> list[dict]:
    """`scaling_here` in a child process that simulates max(device_counts) CPU devices."""
    args = [env_id, num_envs, num_steps, list(device_counts), reps]
    return common.run_in_child(__name__, args, max(device_counts))


# --- where and with what it ran ---------------------------------------------------------------------------

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "numpy",
    "mpe2",
    "pettingzoo",
    "overcooked-ai",
    "hanabi-learning-environment",
    "jaxmarl",
)


def machine() -> dict:
    versions = {"python": platform.python_version()}
    for pkg in PACKAGES:
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


def _ratio(x: float) -> str:
    return f"{x:,.0f}x" if x >= 10 else f"{x:.1f}x"


def _span(rows: list[dict], key: str) -> str:
    """'lo-hi' of a ratio over rows ('reset_every_step_vs_lazy' is derived from the two jaxpar rates)."""

    def value(r):
        if key == "reset_every_step_vs_lazy":
            return r["jaxpar_reset_every_step_env_steps_per_s"] / r["jaxpar_env_steps_per_s"]
        return r[key]

    values = [value(r) for r in rows]
    fmt = _ratio if max(values) >= 10 else (lambda x: f"{x:.2f}x")
    return f"{fmt(min(values))}-{fmt(max(values))}"


def write(results: dict, out: pathlib.Path) -> None:
    """results.json, README.md (tables) and throughput.png into `out`."""
    common.write_results(out, results)
    write_report(results, out)


def write_report(results: dict, out: pathlib.Path) -> None:
    """README.md and throughput.png."""
    common.write_readme(out, readme(results))
    plot(results, out / "throughput.png")


COMPARED = {
    "mpe": (
        "**MPE.** Both libraries sample every agent's action uniformly. JaxMARL's ports run the same physics "
        "(episodes of 26 transitions instead of 25, see FIELD_NOTES). The original is mpe2's parallel API "
        "with uniform actions, resetting when the agents are done."
    ),
    "overcooked": (
        "**Overcooked.** Both libraries sample each cook's action uniformly from 6. jaxpar's port is exact "
        "to overcooked-ai 1.1.0 (dynamics, sparse and shaped rewards, and as observation the "
        "original's lossless state encoding, [W, H, 26] per player, computed at every step). JaxMARL's is "
        "its own reimplementation, not exact to overcooked-ai: its own dynamics and its own 26-channel "
        "observation per agent, 400-step episodes as here. The original is overcooked-ai's "
        "`OvercookedGridworld`: per step `get_state_transition` of a uniform random joint action and "
        "`lossless_state_encoding` for both players (what jaxpar returns), back to the start state after "
        "400 steps; its `overcooked_env` module does not import under numpy 2, so the mdp is driven "
        "directly, as jaxpar's parity test does."
    ),
    "hanabi": (
        "**Hanabi.** Both libraries sample uniformly among their own legal-move mask (the current "
        "player's legal moves; the others' one placeholder move), computed from the state at every step. "
        "jaxpar's port is exact to hanabi-learning-environment 0.0.4 (Hanabi-Full: moves in its uid order, "
        "20 for 2 players and 38 for 4, its canonical observation, 658 / 1041 entries, for every player). "
        "JaxMARL's has one more move (a no-op for the players not on turn: 21 / 39) and an observation of "
        'the same size (658 / 1041). The original is `rl_env.make("Hanabi-Full")` stepped with a uniform '
        "move from the current player's `legal_moves_as_int`, reset when the game ends; each of its steps "
        "builds every player's observation dict with the vectorized encoding. One agent acts per step, so "
        "agent-steps/s overstates Hanabi's work; env-steps (moves) are the unit to compare."
    ),
}


def readme(results: dict) -> str:
    m = results["machine"]
    v = m["versions"]
    rows = results["throughput"]
    has_jaxmarl = any("jaxmarl_env_steps_per_s" in r for r in rows)
    families = list(dict.fromkeys(r.get("family", "mpe") for r in rows))
    load_end = results.get("load_average_at_end", [float("nan")])[0]
    cell_loads = [r["load_average"][0] for r in rows if "load_average" in r]
    load_note = results.get("load_note")
    lines = [
        "# Environment throughput",
        "",
        f"Measured {m['date']} on {m['cpu_model']} ({m['cpu_cores']} cores, {m['backend']} backend). "
        f"Load: 1-minute load average {m['load_average_at_start'][0]:.1f} at the start, {load_end:.1f} at "
        "the end"
        + (f", {min(cell_loads):.1f}-{max(cell_loads):.1f} across the cells" if cell_loads else "")
        + (f"; {load_note}" if load_note else "")
        + ". The machine is shared, so absolute numbers are low and noisy; the ratios, between contenders "
        "interleaved in one process, less so, and the per-CPU-second ratios least. "
        f"Python {v['python']}, jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, numpy {v['numpy']}, "
        f"mpe2 {v['mpe2']}, pettingzoo {v['pettingzoo']}, overcooked-ai {v.get('overcooked-ai')}, "
        f"hanabi-learning-environment {v.get('hanabi-learning-environment')}, "
        f"JaxMARL {v['jaxmarl'] or 'not installed'}.",
        "",
        "Produced by `python experiments/bench_envs.py` (see `jaxpar/bench/envs.py`); every row below comes "
        "from that one run. env-steps/s = envs x scan steps / seconds; agent-steps/s = env-steps/s x agents. "
        "Each JAX cell is one jitted `scan` of a vmapped step with autoreset and actions drawn inside the "
        "scan by the same sampler for both libraries; compile time (lower + compile) apart. "
        '"reset every step" is jaxpar computing the reset of every env at every step as JaxMARL does, '
        "instead of only on steps where some episode ended (MPE and Overcooked episodes end in lockstep, "
        "Hanabi games do not, so with many envs some game ends at nearly every step). The original is "
        "the reference Python package, one env in a Python loop. In each cell the contenders (jaxpar, "
        "jaxpar resetting every step, JaxMARL, the original) are timed in interleaved repetitions after "
        f"one warm-up each; medians of {rows[0]['reps']} repetitions. Per CPU-second: env-steps per second "
        "of this process's CPU time (all threads), which discounts other work on the machine and charges "
        "XLA for the second core it uses; the original runs on one thread.",
        "",
        "What each contender computes and samples:",
        "",
    ]
    lines += [f"- {COMPARED[f]}" for f in families]
    lines += [
        "",
        "| env | envs | jaxpar env-steps/s | jaxpar agent-steps/s | jaxpar, reset every step | "
        + ("JaxMARL | jaxpar / JaxMARL | jaxpar / JaxMARL per CPU-s | " if has_jaxmarl else "")
        + "original | jaxpar / original | jaxpar / original per CPU-s | compile s (jaxpar"
        + (" / JaxMARL" if has_jaxmarl else "")
        + ") |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if has_jaxmarl else "") + "---:|---:|---:|---:|",
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
            cells += [
                _fmt(r["jaxmarl_env_steps_per_s"]),
                f"{r['speedup_vs_jaxmarl']:.2f}x",
                f"{r['speedup_vs_jaxmarl_per_cpu_s']:.2f}x",
            ]
            compile_s += f" / {r['jaxmarl_compile_s']:.1f}"
        cells += [
            _fmt(r["original_env_steps_per_s"]),
            _ratio(r["speedup_vs_original"]),
            _ratio(r["speedup_vs_original_per_cpu_s"]),
            compile_s,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Originals: " + "; ".join(f"{f}: {ORIGINALS[f]}" for f in families) + "."]
    lines += ["", "Ranges over batch sizes, this run (computed from the table):", ""]
    for env_id in dict.fromkeys(r["env"] for r in rows):
        sub = [r for r in rows if r["env"] == env_id]
        parts = [f"{_span(sub, 'speedup_vs_jaxmarl')} JaxMARL"] if has_jaxmarl else []
        parts += [
            f"{_span(sub, 'speedup_vs_original_per_cpu_s')} the original per CPU-second",
            f"reset every step / lazy reset {_span(sub, 'reset_every_step_vs_lazy')}",
        ]
        lines.append(f"- {env_id}: jaxpar " + ", ".join(parts) + ".")
    if not has_jaxmarl:
        lines += ["", "JaxMARL was not measured in this run."]
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
    ncols = min(panels, 4)
    nrows = -(-panels // ncols)
    fig, axes = common.pyplot().subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    axes = list(axes.flat)
    for ax in axes[panels:]:
        ax.set_axis_off()
    series = [
        ("jaxpar", "jaxpar"),
        ("jaxpar_reset_every_step", "jaxpar, reset every step"),
        ("jaxmarl", "JaxMARL"),
        ("original", "original (1 env, Python; timed beside each cell)"),
    ]
    for ax, env_id in zip(axes, envs):
        sub = [r for r in rows if r["env"] == env_id]
        xs = [r["num_envs"] for r in sub]
        for key, label in series:
            if f"{key}_env_steps_per_s" in sub[0]:
                style = {"color": "grey", "linestyle": "--"} if key == "original" else {}
                ax.plot(xs, [r[f"{key}_env_steps_per_s"] for r in sub], marker="o", label=label, **style)
        ax.set(xscale="log", yscale="log", xlabel="envs", ylabel="env-steps/s", title=env_id)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if scale:
        ax = axes[panels - 1]
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
        "contenders interleaved in one run (the original: one env, its Python package)",
        fontsize=9,
    )
    common.save_figure(fig, path, dpi=110)


def run(
    out: str,
    env_ids: list[str],
    batch_sizes: list[int],
    scan_steps: list[int],
    reps: int,
    original_scale: float,
    with_jaxmarl: bool,
    scaling_devices: list[int],
    scaling_num_envs: int,
    scaling_steps: int,
    load_note: str = "",
) -> None:
    """Throughput of the cases `env_ids` (names in CASES) at each of `batch_sizes` (a scan of the
    `scan_steps` at the same position, times the case's scale), then, unless `scaling_devices` is empty,
    scaling of the first env over those device counts; results.json, README.md and throughput.png into
    `out`. `load_note` (what else ran on the machine) goes into the README."""
    unknown = [e for e in env_ids if e not in CASES]
    if unknown:
        raise ValueError(f"unknown envs {unknown}; known: {list(CASES)}")
    steps = dict(zip(batch_sizes, scan_steps))
    results = {"machine": machine(), "load_note": load_note}
    results["throughput"] = throughput(
        env_ids, list(steps), steps.__getitem__, reps, original_scale, with_jaxmarl
    )
    if scaling_devices:
        case = CASES[env_ids[0]]
        if case.kwargs:
            raise ValueError(f"scaling runs the first env by id alone; {case.name} needs {case.kwargs}")
        results["scaling"] = scaling(case.env_id, scaling_num_envs, scaling_steps, scaling_devices, reps)
    results["load_average_at_end"] = os.getloadavg()
    write(results, pathlib.Path(out))
    print(f"wrote {out}/README.md")


def render(out: str) -> None:
    """README.md and throughput.png again from `out`/results.json; nothing measured."""
    write_report(common.read_results(out), pathlib.Path(out))


if __name__ == "__main__":  # the scaling child: run_in_child's arguments in, results out
    common.child_main(scaling_here)

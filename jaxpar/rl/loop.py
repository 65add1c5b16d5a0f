"""The MARL host loop: validate, build (or resume) the sharded runner states, run updates in jitted
chunks, log, checkpoint, plot; and the evaluation mode that rolls out every seed's checkpointed policy.

Each call runs `train.updates_per_call` updates of every seed on device (one program, purejaxrl style);
between calls the host writes metrics.jsonl/TensorBoard, advances the progress bar and saves orbax
checkpoints. The program is compiled once, announced on stderr before the compiles start, its compile
time printed and logged as compile_s; a last chunk shorter than updates_per_call runs in the same
program with a smaller update count. An update is a pure function of the runner state, so a resumed run
continues exactly where the checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxpar.envs as envs
from jaxpar.config import ConfigError, MeshConfig
from jaxpar.envs.wrappers import episode_done
from jaxpar.parallel.mesh import describe, make_mesh
from jaxpar.rl import plots
from jaxpar.rl.batching import masked_logits
from jaxpar.rl.config import VALUE_BASED, MARLRunConfig, validate_run
from jaxpar.rl.ppo import PPO
from jaxpar.rl.pqn import PQN
from jaxpar.train import workdir as workdir_lib
from jaxpar.train.checkpoint import Checkpointer
from jaxpar.train.metrics import MetricsWriter, save_config

SCALARS = (
    "episode_return",
    "episode_length",
    "policy_loss",
    "value_loss",
    "entropy",
    "approx_kl",
    "clip_fraction",
    "q_mean",
    "epsilon",
    "shaping_coef",
    "lr",
)  # those a learner reports: PPO's losses, or the Q-learners' value_loss (TD), q_mean and epsilon


def build(run: MARLRunConfig, devices=None) -> PPO:
    """The run's learner on its mesh: PPO (IPPO, MAPPO) or its value-based subclass PQN (pqn_*)."""
    env = envs.make(run.env.id, **run.env.kwargs)
    devices = jax.devices() if devices is None else devices
    sizes = validate_run(run, len(devices), env)
    learner = PQN if run.algo.name in VALUE_BASED else PPO
    return learner(run, env, make_mesh(sizes, devices))


def _record(metrics: dict, i: int) -> dict:
    """Update i of a chunk's metrics [n, S, ...] -> one metrics.jsonl record (seed means and per-seed)."""
    m = {k: np.asarray(v[i]) for k, v in metrics.items()}
    record = {k: _mean(m[k]) for k in SCALARS if k in m}
    per_agent = np.asarray(m["return_per_agent"], np.float64)  # [S, A]
    for a in range(per_agent.shape[1]):
        record[f"return_agent_{a}"] = _mean(per_agent[:, a])
    record["return_per_seed"] = [_finite(x) for x in m["episode_return"]]
    record["env_steps"] = int(m["env_steps"][0])
    return record


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return None if np.all(np.isnan(x)) else float(np.nanmean(x))


def _finite(x) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def train(run: MARLRunConfig, workdir: str, devices=None) -> dict:
    """Trains (or resumes) to `run.num_updates` updates of every seed; returns the last record. Holds the
    workdir's lock (jaxpar.train.workdir) throughout: a second run on the same workdir refuses to start."""
    with workdir_lib.exclusive(workdir, enabled=jax.process_index() == 0):
        return _train(run, workdir, devices)


def _train(run: MARLRunConfig, workdir: str, devices) -> dict:
    ppo = build(run, devices)
    os.makedirs(workdir, exist_ok=True)
    tcfg = run.train
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
    try:
        restored = checkpointer.restore_latest(ppo.abstract_state, run.checkpoint.on_corrupt)
        start = 0 if restored is None else restored[0]
        chunk = min(tcfg.updates_per_call, run.num_updates - start)
        if chunk > 0:  # before the compiles (the bar would sit at 0% through them)
            _say(
                f"compiling {run.algo.name} {run.env.id} on [{describe(ppo.mesh)}]: "
                + ("the initial state, then " if restored is None else "")
                + f"{chunk} updates x {tcfg.num_seeds} seed(s) as one XLA program; this may take a few "
                "minutes on a CPU ..."
            )
        t0 = time.perf_counter()
        if restored is None:
            states, clock = ppo.init_states(), {"wall_s": 0.0, "cpu_s": 0.0}
            jax.block_until_ready(states)
        else:
            _, states, clock = restored
        init_s = time.perf_counter() - t0
        save_config(run, workdir, ppo.mesh.shape)
        step_fn = None
        if chunk > 0:
            step_fn = ppo.run_updates(chunk)
            program_s = ppo.compile_s[chunk]
            first = f"initial state {init_s:.1f} s, " if restored is None else f"resumed at update {start}, "
            _say(
                f"compiled in {init_s + program_s:.1f} s ({first}update program {program_s:.1f} s); "
                f"{run.num_updates - start} updates to go"
            )
        return _run_updates(run, ppo, workdir, states, start, clock, checkpointer, step_fn, chunk)
    finally:
        checkpointer.close()


def _say(message: str) -> None:
    """A line for the person at the terminal (process 0), on stderr beside the progress bar."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _run_updates(run, ppo: PPO, workdir, states, start, clock, checkpointer, step_fn, chunk) -> dict:
    """Host loop over calls of `step_fn` (ppo.run_updates(chunk), already compiled): a short last chunk
    passes a smaller update count to the same program. wall_s / cpu_s (process CPU time, all threads)
    count the update calls only, compile excluded (logged as compile_s), carried over a resume."""
    wall_s, cpu_s = clock["wall_s"], clock.get("cpu_s", 0.0)
    tcfg = run.train
    total = run.num_updates
    compile_s = ppo.compile_s.get(chunk, 0.0)
    writer = MetricsWriter(workdir, resume_step=start)
    env_steps_per_update = run.steps_per_update * tcfg.num_seeds
    bar = tqdm(
        total=total * run.steps_per_update,
        initial=start * run.steps_per_update,
        unit="step",
        unit_scale=True,
        desc=f"{run.algo.name} {run.env.id} [{describe(ppo.mesh)}]",
        disable=jax.process_index() != 0,
        mininterval=1.0,
    )
    last: dict = {}
    update = start
    while update < total:
        n = min(chunk, total - update)
        t0, c0 = time.perf_counter(), time.process_time()
        states, metrics = step_fn(states, n)
        metrics = jax.device_get(metrics)  # waits for the chunk: the timing below is the device's
        elapsed = time.perf_counter() - t0
        wall_s += elapsed
        cpu_s += time.process_time() - c0
        rate = n * env_steps_per_update / elapsed
        for i in range(n):
            step = update + i + 1
            if step % tcfg.log_every and step != total:
                continue
            record = _record(metrics, i)
            record.update(
                env_steps_per_s=rate,
                wall_s=wall_s - elapsed * (n - 1 - i) / n,
                compile_s=compile_s,
                cpu_s=cpu_s,
            )
            writer.write(step, record)
            last = {"step": step, **record}
        update += n
        bar.update(n * run.steps_per_update)
        if last:
            bar.set_postfix(ret=f"{last['episode_return'] or float('nan'):.2f}", sps=f"{rate:,.0f}")
        due = tcfg.checkpoint_every and (update // tcfg.checkpoint_every) > (
            (update - n) // tcfg.checkpoint_every
        )
        if due or update == total:
            checkpointer.save(update, states, {"wall_s": wall_s, "cpu_s": cpu_s})
    bar.close()
    writer.close()
    if jax.process_index() == 0:
        plots.learning_curves(workdir)
    return last


# --- evaluation --------------------------------------------------------------------------------------


def restore_params(run: MARLRunConfig, workdir: str, ppo: PPO):
    """The latest checkpoint's parameters of every seed ([S, ...] leaves) and the update it was saved at."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.train.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first with "
                f"the same --workdir."
            )
        step, states, _ = checkpointer.restore_latest(ppo.abstract_state, run.checkpoint.on_corrupt)
    finally:
        checkpointer.close()
    return states.train.params, step


def episode_length_cap(env) -> int:
    unwrapped = env.unwrapped
    return int(getattr(unwrapped, "max_cycles", None) or getattr(unwrapped, "max_steps", None) or 200)


def rollout_episode(ppo: PPO, params, key, greedy):
    """One episode of one env with the policy, acting by argmax where `greedy` (a bool, or a traced one so
    that one program evaluates both) and by sampling otherwise (the Q-learners: epsilon-greedy at
    algo.eps_finish), among the legal actions of environments that have rules: (per-step env states,
    rewards [T, A], alive [T])."""
    env = ppo.env
    k_reset, k_run = jax.random.split(key)
    obs, env_state = env.reset(k_reset)
    # Zeros shaped like one env of the learner's rollout carry (() for feed-forward networks).
    carry = jax.tree.map(lambda s: jnp.zeros((1, *s.shape[2:]), s.dtype), ppo.abstract_state.rollout.carry)

    def body(c, k):
        obs, env_state, carry, reset, alive = c
        k_act, k_env = jax.random.split(k)
        carry, logits, _ = ppo.policy_step(params, carry, obs[None], reset[None])
        logits = logits[0]
        if ppo.legal_actions is not None:
            logits = masked_logits(logits, env.legal_actions(env_state))
        actions = jnp.where(greedy, jnp.argmax(logits, -1), ppo.sample(k_act, logits))
        obs, next_state, reward, terminated, truncated, _ = env.step(
            k_env, env_state, actions.astype(jnp.int32)
        )
        done = episode_done(terminated, truncated)
        out = (env_state, jnp.where(alive, reward, 0.0), alive)
        return (obs, next_state, carry, jnp.asarray(False), alive & ~done), out

    steps = episode_length_cap(env)
    init = (obs, env_state, carry, jnp.asarray(True), jnp.asarray(True))
    (_, final_state, *_), (states, rewards, alive) = jax.lax.scan(body, init, jax.random.split(k_run, steps))
    states = jax.tree.map(lambda s, f: jnp.concatenate([s, f[None]]), states, final_state)
    return states, rewards, alive


EVAL_MODES = ("sampled", "greedy")


def evaluate(run: MARLRunConfig, workdir: str, devices=None) -> dict:
    """Rolls out the checkpointed policy of every seed for eval.episodes episodes each, sampling actions and
    acting greedily (one program, both modes vmapped); writes eval.json and an animation (eval.gif) of the
    first episode of seed eval.seed_index in the eval.greedy mode where the environment can be drawn.

    Returns are per agent per episode (each agent's summed rewards, averaged over agents), the unit of
    training's episode_return: `{mode}_return_mean` / `_std` are over seeds (each seed's mean over its
    episodes), `{mode}_return_per_seed` and `{mode}_return_per_agent` (mean over seeds and episodes)."""
    from jaxpar.rl import render

    if run.eval.seed_index >= run.train.num_seeds:
        raise ConfigError(
            f"eval.seed_index={run.eval.seed_index} (the seed animated) but the run has train.num_seeds="
            f"{run.train.num_seeds}; use 0 to {run.train.num_seeds - 1}."
        )
    devices = jax.devices()[:1] if devices is None else devices
    ppo = build(dataclasses.replace(run, mesh=MeshConfig(data=len(devices))), devices)
    params, step = restore_params(run, workdir, ppo)
    # The same episode keys for every seed and both modes: differences come from the policies.
    keys = jax.vmap(jax.random.key)(10_000 + jnp.arange(run.eval.episodes))
    greedy = jnp.array([mode == "greedy" for mode in EVAL_MODES])
    episode = lambda p, k, g: rollout_episode(ppo, p, k, g)
    over_episodes = jax.vmap(episode, in_axes=(None, 0, None))
    over_seeds = jax.vmap(over_episodes, in_axes=(0, None, None))
    over_modes = jax.jit(jax.vmap(over_seeds, in_axes=(None, None, 0)))
    states, rewards, alive = jax.device_get(over_modes(params, keys, greedy))
    returns = np.asarray(rewards, np.float64).sum(axis=3)  # [modes, S, episodes, A]
    result = {
        "checkpoint_update": step,
        "seeds": run.train.num_seeds,
        "episodes_per_seed": run.eval.episodes,
    }
    for m, mode in enumerate(EVAL_MODES):
        per_seed = returns[m].mean(axis=(1, 2))
        result[f"{mode}_return_mean"] = float(per_seed.mean())
        result[f"{mode}_return_std"] = float(per_seed.std())
        result[f"{mode}_return_per_seed"] = per_seed.tolist()
        result[f"{mode}_return_per_agent"] = returns[m].mean(axis=(0, 1)).tolist()
    m, s = EVAL_MODES.index("greedy" if run.eval.greedy else "sampled"), run.eval.seed_index
    length = int(np.asarray(alive[m, s, 0]).sum())
    result["gif"] = render.animate(
        ppo.env,
        jax.tree.map(lambda x: x[m, s, 0], states),
        length + 1,
        os.path.join(workdir, "eval.gif"),
        run.eval.fps,
        title=f"{run.algo.name} {run.env.id}, update {step}, seed {s}, {EVAL_MODES[m]}",
    )
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def eval_summary(result: dict) -> str:
    """One line of evaluate()'s result: mean +- std over seeds of both modes."""
    modes = ", ".join(
        f"{mode} {result[f'{mode}_return_mean']:.2f} +- {result[f'{mode}_return_std']:.2f}"
        for mode in EVAL_MODES
    )
    return (
        f"eval of update {result['checkpoint_update']}, {result['seeds']} seed(s) x "
        f"{result['episodes_per_seed']} episode(s), return per agent per episode (mean +- std over seeds): "
        f"{modes}"
    )

"""The MARL host loop: validate, build (or resume) the sharded runner states, run updates in jitted
chunks, log, checkpoint, plot; and the evaluation mode that rolls out a checkpointed policy.

Each call runs `train.updates_per_call` updates of every seed on device (one program, purejaxrl style);
between calls the host writes metrics.jsonl/TensorBoard, advances the progress bar and saves orbax
checkpoints. An update is a pure function of the runner state, so a resumed run continues exactly
where the checkpoint left off.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxpar.envs as envs
from jaxpar.config import MeshConfig
from jaxpar.envs.wrappers import episode_done
from jaxpar.parallel.mesh import describe, make_mesh
from jaxpar.rl import plots
from jaxpar.rl.config import MARLRunConfig, validate_run
from jaxpar.rl.ppo import PPO
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
    "lr",
)


def build(run: MARLRunConfig, devices=None) -> PPO:
    env = envs.make(run.env.id, **run.env.kwargs)
    devices = jax.devices() if devices is None else devices
    sizes = validate_run(run, len(devices), env)
    return PPO(run, env, make_mesh(sizes, devices))


def _record(metrics: dict, i: int) -> dict:
    """Update i of a chunk's metrics [n, S, ...] -> one metrics.jsonl record (seed means and per-seed)."""
    m = {k: np.asarray(v[i]) for k, v in metrics.items()}
    record = {k: _mean(m[k]) for k in SCALARS}
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
        if restored is None:
            start, states, clock = 0, ppo.init_states(), {"wall_s": 0.0, "cpu_s": 0.0}
        else:
            start, states, clock = restored
        save_config(run, workdir, ppo.mesh.shape)
        return _run_updates(run, ppo, workdir, states, start, clock, checkpointer)
    finally:
        checkpointer.close()


def _run_updates(run, ppo: PPO, workdir, states, start, clock, checkpointer) -> dict:
    """Host loop. wall_s / cpu_s (process CPU time, all threads) count the update calls only, compile
    excluded, carried over a resume."""
    wall_s, cpu_s = clock["wall_s"], clock.get("cpu_s", 0.0)
    tcfg = run.train
    total = run.num_updates
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
    for n in {min(tcfg.updates_per_call, total - start), (total - start) % tcfg.updates_per_call} - {0}:
        ppo.run_updates(n)  # compile before the clock starts; compile time is logged apart
    compile_s = sum(ppo.compile_s.values())
    while update < total:
        n = min(tcfg.updates_per_call, total - update)
        t0, c0 = time.perf_counter(), time.process_time()
        states, metrics = ppo.run_updates(n)(states)
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
    """The latest checkpoint's parameters of seed `eval.seed_index` (and the update it was saved at)."""
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.train.keep_checkpoints)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {os.path.join(workdir, 'checkpoints')}; train first with "
                f"the same --workdir."
            )
        if run.eval.seed_index >= run.train.num_seeds:
            raise ValueError(
                f"eval.seed_index={run.eval.seed_index} but the run has train.num_seeds="
                f"{run.train.num_seeds}."
            )
        step, states, _ = checkpointer.restore_latest(ppo.abstract_state, run.checkpoint.on_corrupt)
    finally:
        checkpointer.close()
    return jax.tree.map(lambda x: x[run.eval.seed_index], states.train.params), step


def episode_length_cap(env) -> int:
    unwrapped = env.unwrapped
    return int(getattr(unwrapped, "max_cycles", None) or getattr(unwrapped, "max_steps", None) or 200)


def rollout_episode(ppo: PPO, params, key, greedy: bool):
    """One episode of one env with the policy: (per-step env states, rewards [T, A], done [T])."""
    from jaxpar.rl.networks import initial_carry

    env = ppo.env
    k_reset, k_run = jax.random.split(key)
    obs, env_state = env.reset(k_reset)
    carry = initial_carry(ppo.run.network, (1, env.num_agents))

    def body(c, k):
        obs, env_state, carry, reset, alive = c
        k_act, k_env = jax.random.split(k)
        carry, logits, _ = ppo.policy_step(params, carry, obs[None], reset[None])
        actions = jnp.argmax(logits[0], -1) if greedy else jax.random.categorical(k_act, logits[0])
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


def evaluate(run: MARLRunConfig, workdir: str, devices=None) -> dict:
    """Rolls out the checkpointed policy for eval.episodes episodes; writes eval.json and an animation
    of the first episode (eval.gif) where the environment can be drawn."""
    from jaxpar.rl import render

    devices = jax.devices()[:1] if devices is None else devices
    ppo = build(dataclasses.replace(run, mesh=MeshConfig(data=len(devices))), devices)
    params, step = restore_params(run, workdir, ppo)
    run_episode = jax.jit(lambda p, k: rollout_episode(ppo, p, k, run.eval.greedy))
    returns, gif = [], None
    for episode in range(run.eval.episodes):
        states, rewards, alive = jax.device_get(run_episode(params, jax.random.key(10_000 + episode)))
        returns.append(np.asarray(rewards).sum(axis=0))
        if episode == 0:
            length = int(np.asarray(alive).sum())
            gif = render.animate(
                ppo.env,
                states,
                length + 1,
                os.path.join(workdir, "eval.gif"),
                run.eval.fps,
                title=f"{run.algo.name} {run.env.id}, update {step}",
            )
    returns = np.stack(returns)
    result = {
        "checkpoint_update": step,
        "episodes": run.eval.episodes,
        "greedy": run.eval.greedy,
        "return_per_agent": returns.mean(axis=0).tolist(),
        "mean_return": float(returns.mean()),
        "gif": gif,
    }
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result

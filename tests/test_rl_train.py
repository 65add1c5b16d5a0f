"""IPPO / MAPPO end to end on the shared runtime: learning, device-count independence, resume, eval,
recurrent consistency, sharding and config errors."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import marl
from jaxpar.config import ConfigError, MeshConfig
from jaxpar.rl import loop, networks
from jaxpar.rl.config import from_config_dict
from jaxpar.rl.losses import categorical_log_prob
from jaxpar.rl.rollout import collect
from jaxpar.train.metrics import read_metrics

TIMING_KEYS = ("env_steps_per_s", "wall_s", "compile_s", "cpu_s")


def smoke(**sections):
    """configs/marl.py:smoke with some keys of some sections replaced."""
    raw = marl.get_config("smoke").to_dict()
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return from_config_dict(raw)


def test_short_training_beats_random(tmp_path):
    run = smoke(train=dict(checkpoint_every=0))
    loop.train(run, str(tmp_path))
    returns = [r["episode_return"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))]
    # The first update acts with the initial, near-uniform policy: a random baseline (80 episodes).
    first, final = returns[0], float(np.mean(returns[-5:]))
    assert final > first + 3.0, (first, final, returns)
    assert (tmp_path / "learning_curve.png").exists()


def _metrics_and_params(run, devices, updates=3):
    ppo = loop.build(run, devices)
    states, metrics = ppo.run_updates(updates)(ppo.init_states())
    return ppo, jax.device_get(metrics), jax.device_get(states.train.params)


def test_same_metrics_on_1_and_8_devices():
    """A fixed seed gives the same run on one device as on 8 (data=4 x fsdp=2: env batch split 8 ways,
    policy weights sharded over fsdp), up to float reduction order."""
    run = smoke(train=dict(num_seeds=2, total_env_steps=64 * 25 * 3))
    _, one, params_one = _metrics_and_params(run, jax.devices()[:1])
    ppo8, eight, params_eight = _metrics_and_params(
        dataclasses.replace(run, mesh=MeshConfig(data=4, fsdp=2)), jax.devices()
    )
    assert set(one) == set(eight)
    for key in one:
        np.testing.assert_allclose(one[key], eight[key], rtol=2e-4, atol=2e-5, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5), params_one, params_eight
    )
    assert not np.allclose(one["episode_return"][0], one["episode_return"][0][::-1])  # seeds differ

    # Placement: env batch over the batch axes, weights by the logical rules (seed axis unsharded).
    shardings = ppo8.state_shardings
    assert shardings.rollout.obs.spec == P(None, ("data", "fsdp", "expert"))
    flat = jax.tree_util.tree_flatten_with_path(shardings.train.params)[0]
    kernels = {
        jax.tree_util.keystr(path): s.spec for path, s in flat if "kernel" in jax.tree_util.keystr(path)
    }
    first_layer = next(spec for path, spec in kernels.items() if "actor" in path and "layers" in path)
    assert first_layer == P(None, None, "fsdp"), kernels


def test_whole_run_program_equals_chunked_calls():
    """The purejaxrl form (init + every update of every seed in one jitted program) is the same run as
    the host loop's chunks of updates, bit for bit, also when the last chunk is shorter: 5 updates in
    calls of 2, 2 and 1 of ONE compiled program (its update count is an argument)."""
    run = smoke(train=dict(num_seeds=2, total_env_steps=64 * 25 * 5))
    ppo = loop.build(run)
    final, whole = ppo.make_train()(ppo.seed_keys())
    step, states, chunks = ppo.run_updates(2), ppo.init_states(), []
    for count in (2, 2, 1):
        states, metrics = step(states, count)
        chunks.append(jax.tree.map(lambda x: np.asarray(x)[:count], metrics))
    assert list(ppo.compile_s) == [2]
    for key in whole:
        np.testing.assert_array_equal(whole[key], np.concatenate([c[key] for c in chunks]), err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, final.train.params, states.train.params)
    with pytest.raises(ValueError, match="count=3 .* 1 to 2"):
        step(states, 3)


def test_resume_continues_identically_and_eval_writes_a_gif(tmp_path):
    run = smoke(train=dict(total_env_steps=64 * 25 * 8, updates_per_call=2, checkpoint_every=4))
    loop.train(run, str(tmp_path))
    uninterrupted = read_metrics(str(tmp_path / "metrics.jsonl"))
    # Lose the last checkpoint, as a run killed between update 4 and 8 would; rerun resumes from 4.
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    loop.train(run, str(tmp_path))
    resumed = read_metrics(str(tmp_path / "metrics.jsonl"))
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
    assert [r["step"] for r in resumed] == list(range(1, 9))
    assert strip(resumed) == strip(uninterrupted)  # bitwise: every float written identically

    result = loop.evaluate(run, str(tmp_path))
    assert result["checkpoint_update"] == 8 and len(result["greedy_return_per_agent"]) == 3
    assert os.path.getsize(tmp_path / "eval.gif") > 1000
    assert json.loads((tmp_path / "eval.json").read_text())["greedy_return_mean"] == pytest.approx(
        result["greedy_return_mean"]
    )


def test_recurrent_mappo_recomputes_the_rollout_exactly():
    """The recurrent learner unrolls minibatch sequences from their starting carry with the rollout's
    episode resets: at the rollout's parameters it must reproduce the rollout's log-probs and values,
    across an episode boundary (num_steps 30 > 25-step episodes). MAPPO's critic sees the global state."""
    run = smoke(
        algo=dict(name="mappo", num_steps=30, num_minibatches=2),
        network=dict(kind="rnn", hidden=32, agent_id=True),
        train=dict(total_env_steps=64 * 30 * 2),
    )
    ppo = loop.build(run, jax.devices()[:1])
    state = jax.tree.map(lambda x: x[0], ppo.init_states())
    params = state.train.params

    @jax.jit
    def check(state):
        sample = lambda k, logits: jax.random.categorical(k, logits).astype(jnp.int32)
        _, traj = collect(ppo.vec, ppo.policy_step, params, state.rollout, jax.random.key(3), 30, sample)

        def step(carry, obs, reset):
            carry, logits, values = ppo.policy_step(params, carry, obs, reset)
            return carry, (logits, values)

        logits, values = networks.unroll(step, state.rollout.carry, traj.obs, traj.reset)
        return traj, categorical_log_prob(logits, traj.actions)[0], values

    traj, log_probs, values = check(state)
    assert bool(traj.reset[25].all()) and not bool(traj.reset[1:25].any())
    np.testing.assert_allclose(log_probs, traj.log_probs, atol=1e-5)
    np.testing.assert_allclose(values, traj.values, atol=1e-5)
    _, metrics = ppo.run_updates(2)(ppo.init_states())
    assert np.all(np.isfinite(metrics["value_loss"]))


@pytest.mark.parametrize(
    "sections, message",
    [
        (dict(algo=dict(nmae="ippo")), r"unknown config key\(s\) \['algo.nmae'\]"),
        (dict(algo=dict(name="qmix")), "algo.name='qmix' is not supported"),
        (dict(env=dict(num_envs=12)), "env.num_envs=12 is not divisible by .*=8"),
        (dict(env=dict(kwargs=dict(continuous_actions=True))), "continuous actions"),
        (dict(network=dict(kind="rnn"), algo=dict(num_minibatches=16)), "multiple of num_minibatches"),
        (dict(train=dict(total_env_steps=10)), "less than one update"),
    ],
)
def test_bad_config_fails_before_compiling(sections, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        loop.build(smoke(**sections))


@pytest.mark.parametrize("preset", sorted(marl.PRESETS))
def test_presets_validate(preset):
    run = from_config_dict(marl.get_config(preset))
    assert run.num_updates >= 1

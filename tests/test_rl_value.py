"""The value-based learners (jaxpar.rl.pqn: PQN-style IQL, VDN, QMIX): Q(lambda) targets against a plain
numpy loop, the TD loss gradient against a hand computation and a re-implemented forward pass, the
epsilon-greedy policy, a short VDN run that learns beyond random and resumes bit for bit, its greedy
evaluation, and the recurrent QMIX learner's unroll against its own rollout."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import marl
from jaxpar.config import ConfigError, MeshConfig
from jaxpar.rl import loop, networks, pqn
from jaxpar.rl.config import from_config_dict
from jaxpar.rl.rollout import collect
from jaxpar.train.metrics import read_metrics

TIMING_KEYS = ("env_steps_per_s", "wall_s", "compile_s", "cpu_s")


def value_run(name="pqn_vdn", **sections):
    """configs/marl.py:pqn_iql_spread with algo.name=`name` shrunk to 60 updates of 1 seed (a horizon of
    about 10 steps, gamma 0.9, learns in that budget; 0.99 needs many more updates), then some keys of
    some sections replaced."""
    raw = marl.get_config("pqn_iql_spread").to_dict()
    raw["algo"].update(name=name, gamma=0.9, gae_lambda=0.9, eps_decay=0.5)
    raw["train"].update(num_seeds=1, total_env_steps=64 * 25 * 60, updates_per_call=30, checkpoint_every=30)
    raw["eval"]["episodes"] = 32
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return from_config_dict(raw)


# --- Q(lambda) targets --------------------------------------------------------------------------------


def reference_q_lambda(rewards, values, final_values, terminated, truncated, last_value, gamma, lam):
    """G_t = r_t + gamma [(1 - lam) V(s_t+1) + lam G_t+1], stopped at a termination (G_t = r_t) and at a
    truncation (G_t = r_t + gamma V(final obs_t)), the last step bootstrapping from last_value."""
    T = len(rewards)
    out = np.zeros_like(rewards)
    next_return, next_value = last_value.copy(), last_value.copy()
    for t in reversed(range(T)):
        for i in np.ndindex(rewards.shape[1:]):
            if terminated[(t, *i)]:
                out[(t, *i)] = rewards[(t, *i)]
            elif truncated[(t, *i)]:
                out[(t, *i)] = rewards[(t, *i)] + gamma * final_values[(t, *i)]
            else:
                mixed = (1 - lam) * next_value[i] + lam * next_return[i]
                out[(t, *i)] = rewards[(t, *i)] + gamma * mixed
        next_return, next_value = out[t], values[t]
    return out


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_q_lambda_targets_match_a_numpy_loop(lam):
    rng = np.random.default_rng(0)
    T, E, A = 12, 3, 2
    rewards, values, final_values = (rng.normal(size=(T, E, A)) for _ in range(3))
    terminated = rng.random((T, E, A)) < 0.15
    truncated = rng.random((T, E, A)) < 0.15  # some steps both: termination wins
    last_value = rng.normal(size=(E, A))
    got = pqn.q_lambda_targets(rewards, values, final_values, terminated, truncated, last_value, 0.9, lam)
    want = reference_q_lambda(rewards, values, final_values, terminated, truncated, last_value, 0.9, lam)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    if lam == 0.0:  # one-step Q-learning targets
        next_v = np.concatenate([values[1:], last_value[None]])
        one_step = rewards + 0.9 * np.where(truncated, final_values, next_v)
        np.testing.assert_allclose(want, np.where(terminated, rewards, one_step), rtol=1e-6)


# --- the TD loss and its gradient --------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A one-layer, width-8 Q-network learner on simple_spread (1 device) and a random minibatch of 6 env
    steps x 3 agents."""
    run = value_run(network=dict(hidden=8, layers=1))
    learner = loop.build(run, jax.devices()[:1])
    params = jax.tree.map(lambda x: x[0], learner.init_states().train.params)
    rng = np.random.default_rng(1)
    N, A, D = 6, learner.num_agents, learner.env.observation_space.shape[-1]
    minibatch = {
        "obs": jnp.asarray(rng.normal(size=(N, A, D)), jnp.float32),
        "actions": jnp.asarray(rng.integers(0, learner.num_actions, size=(N, A)), jnp.int32),
    }
    return run, params, minibatch, rng


def reference_q(p: dict, obs):
    """The Q-network's forward pass from its raw weights: agent id, Dense, LayerNorm, relu, head."""
    x = jnp.concatenate([obs, jnp.broadcast_to(jnp.eye(obs.shape[-2]), (*obs.shape[:-1], obs.shape[-2]))], -1)
    layer, norm, head = p["q"]["layers"][0], p["q"]["norms"][0], p["q"]["head"]
    h = x @ layer["kernel"] + layer["bias"]
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)
    h = jax.nn.relu(h * norm["scale"] + norm["bias"])
    return h @ head["kernel"] + head["bias"]


@pytest.mark.parametrize("name", ["pqn_iql", "pqn_vdn"])
def test_td_loss_gradient(tiny, name):
    """IQL regresses each agent's Q(o_a, u_a) on its own target; VDN regresses their sum on one team
    target, so every agent's chosen Q gets the same gradient, the team error. Checked two ways: the head
    bias gradient by hand (dQ_a(u_a)/db_k = [u_a = k]), and the whole gradient against jax.grad of the
    loss written from a re-implemented forward pass."""
    run, params, minibatch, rng = tiny
    learner = loop.build(value_run(name, network=dict(hidden=8, layers=1)), jax.devices()[:1])
    N, A = minibatch["actions"].shape
    team = name == "pqn_vdn"
    targets = jnp.asarray(rng.normal(size=(N,) if team else (N, A)) * 3, jnp.float32)
    batch = {**minibatch, "targets": targets}
    (loss, metrics), grads = jax.jit(jax.value_and_grad(learner.loss, has_aux=True))(params, batch, ())
    grads = nnx.to_pure_dict(grads)

    pure = nnx.to_pure_dict(params)
    q_taken = np.take_along_axis(
        np.asarray(reference_q(pure, batch["obs"])), np.asarray(batch["actions"])[..., None], -1
    )[..., 0]
    error = (q_taken.sum(-1) if team else q_taken) - np.asarray(targets)  # [N] or [N, A]
    per_agent_error = np.broadcast_to(error[:, None], (N, A)) if team else error
    onehot = np.eye(learner.num_actions)[np.asarray(batch["actions"])]  # [N, A, n]
    hand_bias_grad = np.einsum("na,nak->k", per_agent_error, onehot) / error.size
    np.testing.assert_allclose(np.asarray(grads["q"]["head"]["bias"]), hand_bias_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(loss), 0.5 * np.mean(error**2), rtol=1e-5)

    def reference_loss(p):
        q = jnp.take_along_axis(reference_q(p, batch["obs"]), batch["actions"][..., None], -1)[..., 0]
        predicted = q.sum(-1) if team else q
        return 0.5 * jnp.mean(jnp.square(predicted - targets))

    want = jax.jit(jax.grad(reference_loss))(pure)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6), grads, want)
    assert metrics["q_mean"] == pytest.approx(float(np.mean(q_taken.sum(-1) if team else q_taken)), rel=1e-5)


def test_epsilon_greedy_policy():
    """Greedy with probability 1 - epsilon, else uniform over the unmasked actions (masked values are
    -1e9, as batching.masked_logits and the rollout's legal-action mask leave them); 20000 draws."""
    q = jnp.array([1.0, 3.0, 2.0, 0.0])
    keys = jax.random.split(jax.random.key(0), 20_000)
    draw = jax.jit(jax.vmap(pqn.epsilon_greedy, in_axes=(0, None, None)))
    freq = lambda actions: np.bincount(np.asarray(actions), minlength=4) / len(actions)
    np.testing.assert_allclose(freq(draw(keys, q, 0.2)), [0.05, 0.85, 0.05, 0.05], atol=0.01)
    masked = jnp.where(jnp.array([True, False, True, False]), q, -1e9)
    np.testing.assert_allclose(freq(draw(keys, masked, 0.5)), [0.25, 0.0, 0.75, 0.0], atol=0.01)
    assert np.all(np.asarray(draw(keys[:100], masked, 0.0)) == 2)
    assert float(pqn.greedy_value(masked)) == 2.0
    assert float(pqn.greedy_value(q, np.array([True, False, False, True]))) == 1.0


# --- learning, resume and evaluation through the shared loop ----------------------------------------


@pytest.fixture(scope="module")
def trained_vdn(tmp_path_factory):
    """VDN on simple_spread for 60 updates (64 envs x 25 steps each) in calls of 30, checkpoints at 30, 60,
    on one device (a mesh of 8 simulated devices compiles the update program twice as slowly)."""
    workdir = tmp_path_factory.mktemp("pqn_vdn")
    run = value_run("pqn_vdn")
    loop.train(run, str(workdir), jax.devices()[:1])
    return run, workdir, read_metrics(str(workdir / "metrics.jsonl"))


def test_vdn_learns_beyond_random(trained_vdn):
    _, workdir, records = trained_vdn
    returns = [r["episode_return"] for r in records]
    # The first update acts with epsilon 1: uniformly random actions (64 episodes).
    first, final = returns[0], float(np.mean(returns[-5:]))
    assert final > first + 3.0, (first, final, returns)
    assert records[0]["epsilon"] == pytest.approx(1.0) and records[-1]["epsilon"] == pytest.approx(0.05)
    assert all(np.isfinite(r["value_loss"]) for r in records)
    assert (workdir / "learning_curve.png").exists()


def test_vdn_resumes_bitwise_and_evaluates_greedily(trained_vdn):
    run, workdir, uninterrupted = trained_vdn
    # Lose the last checkpoint, as a run killed between update 30 and 60 would; rerun resumes from 30.
    shutil.rmtree(workdir / "checkpoints" / "60")
    loop.train(run, str(workdir), jax.devices()[:1])
    resumed = read_metrics(str(workdir / "metrics.jsonl"))
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
    assert [r["step"] for r in resumed] == list(range(1, 61))
    assert strip(resumed) == strip(uninterrupted)  # bitwise: every float written identically

    result = loop.evaluate(run, str(workdir))
    assert result["checkpoint_update"] == 60 and len(result["greedy_return_per_agent"]) == 3
    # Greedy acting on the learned Q-values beats the initial random policy by a wide margin.
    assert result["greedy_return_mean"] > uninterrupted[0]["episode_return"] + 3.0, result


# --- recurrent QMIX ---------------------------------------------------------------------------------


def test_recurrent_qmix_unroll_reproduces_the_rollout():
    """The recurrent learner unrolls minibatch sequences from their starting carry with the rollout's
    episode resets: at the rollout's parameters it must reproduce the Q-values seen while acting,
    across an episode boundary (30 steps > 25-step episodes); then two QMIX updates run with finite loss."""
    run = value_run(
        "pqn_qmix",
        env=dict(num_envs=16),
        algo=dict(num_steps=30, update_epochs=1, num_minibatches=2),
        network=dict(kind="rnn", hidden=16),
        train=dict(total_env_steps=16 * 30 * 2),
    )
    learner = loop.build(run, jax.devices()[:1])
    state = jax.tree.map(lambda x: x[0], learner.init_states())
    params = state.train.params

    @jax.jit
    def check(state):
        _, traj = collect(
            learner.vec, learner.policy_step, params, state.rollout, jax.random.key(3), 30, learner.sample
        )
        q = networks.unroll(
            lambda c, o, r: learner.q_values(params, c, o, r), state.rollout.carry, traj.obs, traj.reset
        )
        return traj, q

    traj, q = check(state)
    assert bool(traj.reset[25].all()) and not bool(traj.reset[1:25].any())
    assert traj.values.shape == q.shape == (30, 16, 3, 5)
    np.testing.assert_allclose(q, traj.values, atol=1e-5)
    _, metrics = jax.jit(learner.update)(state)
    assert np.all(np.isfinite(metrics["value_loss"])) and np.all(np.isfinite(metrics["q_mean"]))


@pytest.mark.parametrize(
    "sections, message",
    [
        (dict(algo=dict(eps_start=0.1, eps_finish=0.5)), r"algo.eps_finish=0.5 is above algo.eps_start=0.1"),
        (dict(algo=dict(eps_decay=0.0)), r"algo.eps_decay=0.0 must be a finite number in \(0, 1\]"),
        (dict(algo=dict(mixer_embed=0)), r"algo.mixer_embed=0 must be a positive int"),
    ],
)
def test_bad_value_based_config(sections, message):
    with pytest.raises(ConfigError, match=message):
        value_run(**sections)


def test_qmix_mixer_width_must_split_over_sharded_weights():
    run = value_run("pqn_qmix", algo=dict(mixer_embed=31))
    with pytest.raises(
        ConfigError, match=r"algo.mixer_embed=31 is not divisible by mesh.fsdp\*mesh.tensor=2"
    ):
        loop.build(dataclasses.replace(run, mesh=MeshConfig(data=4, fsdp=2)))

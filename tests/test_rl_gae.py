"""GAE with terminations and truncations against a plain-numpy reference, and the PPO pieces' shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpar.rl import batching, networks
from jaxpar.rl.gae import gae


def gae_reference(rewards, values, final_values, terminated, truncated, last_value, gamma, lam):
    """Textbook GAE, one (env, agent) column at a time, written with explicit episode boundaries."""
    T = rewards.shape[0]
    adv = np.zeros_like(rewards, dtype=np.float64)
    flat = [x.reshape(T, -1) for x in (rewards, values, final_values, terminated, truncated)]
    last = last_value.reshape(-1)
    out = adv.reshape(T, -1)
    for col in range(out.shape[1]):
        r, v, fv, term, trunc = (x[:, col] for x in flat)
        running = 0.0
        for t in reversed(range(T)):
            if term[t]:
                target, running = r[t], 0.0  # no future after a termination
            elif trunc[t]:
                target, running = r[t] + gamma * fv[t], 0.0  # time limit: bootstrap from the final obs
            else:
                target = r[t] + gamma * (v[t + 1] if t + 1 < T else last[col])
            running = (target - v[t]) + gamma * lam * running
            out[t, col] = running
    return adv, adv + values


def test_gae_matches_numpy_with_terminations_and_truncations():
    rng = np.random.default_rng(0)
    T, E, A = 12, 3, 2
    rewards = rng.normal(size=(T, E, A)).astype(np.float32)
    values = rng.normal(size=(T, E, A)).astype(np.float32)
    final_values = rng.normal(size=(T, E, A)).astype(np.float32)
    last_value = rng.normal(size=(E, A)).astype(np.float32)
    terminated = np.zeros((T, E, A), bool)
    truncated = np.zeros((T, E, A), bool)
    terminated[3, 0, :] = True  # env 0: an episode terminates at t=3 ...
    truncated[8, 0, :] = True  # ... and the next one is cut by a time limit at t=8
    truncated[5, 1, :] = True  # env 1: truncated, then terminated at the very last step
    terminated[T - 1, 1, :] = True
    terminated[6, 2, 1] = True  # env 2: only agent 1 terminates (agent 0 plays on)
    truncated[T - 1, 2, :] = True  # and the rollout ends exactly on a truncation
    args = (rewards, values, final_values, terminated, truncated, last_value)
    got_adv, got_ret = jax.jit(gae, static_argnums=(6, 7))(*map(jnp.asarray, args), 0.97, 0.9)
    want_adv, want_ret = gae_reference(*args, 0.97, 0.9)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-5)


def test_truncation_bootstraps_and_termination_does_not():
    """One step, reward 1, V(final obs) = 10: the target is 1 + gamma*10 if truncated, 1 if terminated; the
    next buffer entry (a new episode's value, 100) never leaks in."""
    ones = jnp.ones((2, 1))
    values = jnp.array([[0.0], [100.0]])
    final = jnp.array([[10.0], [0.0]])
    flag = jnp.array([[True], [False]])
    none = jnp.zeros((2, 1), bool)
    _, ret_trunc = gae(ones, values, final, none, flag, jnp.zeros((1,)), 0.9, 0.95)
    _, ret_term = gae(ones, values, final, flag, none, jnp.zeros((1,)), 0.9, 0.95)
    assert float(ret_trunc[0, 0]) == pytest.approx(1 + 0.9 * 10)
    assert float(ret_term[0, 0]) == pytest.approx(1.0)


def test_agent_batching():
    obs = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)  # [E, A, D]
    with_id = batching.with_agent_id(obs)
    assert with_id.shape == (2, 3, 7)
    np.testing.assert_array_equal(with_id[1, 2, 4:], [0, 0, 1])
    state = batching.global_state(obs)
    assert state.shape == (2, 3, 12)
    np.testing.assert_array_equal(state[1, 0], obs[1].reshape(-1))
    np.testing.assert_array_equal(state[1, 0], state[1, 2])
    x = jnp.arange(5 * 4).reshape(5, 4)  # [T, E] -> env-major samples
    np.testing.assert_array_equal(batching.env_major(x)[:5], x[:, 0])


@pytest.mark.parametrize("shape", [(18, 64), (64, 64), (64, 5), (64, 192)])
def test_orthogonal_init(shape):
    """The LAPACK-free orthogonal initializer: orthonormal rows or columns, scaled, vmappable."""
    q = jax.vmap(lambda k: networks.orthogonal(k, shape, 2.0))(jax.random.split(jax.random.key(0), 2))
    assert q.shape == (2, *shape)
    gram = q[0].T @ q[0] if shape[0] >= shape[1] else q[0] @ q[0].T
    np.testing.assert_allclose(gram, 4.0 * np.eye(min(shape)), atol=1e-4)
    assert not np.allclose(q[0], q[1])

"""Reward shaping (algo.reward_shaping): the reward both learners (PPO and PQN) train on is the env's
reward + coef(t) * info[key] with the schedule's coefficient at each rollout step's env-step count, while
the logged episode return stays the env's own; a key the env does not report is a config error."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxpar.envs as envs
from configs import marl
from jaxpar.config import ConfigError
from jaxpar.envs.core import Wrapper
from jaxpar.parallel.mesh import make_mesh
from jaxpar.rl import loop, ppo, pqn, rollout
from jaxpar.rl.config import from_config_dict, validate_run

START, END, ANNEAL = 2.0, 0.5, 600  # env steps; an update is 8 envs x 10 steps = 80 of them


class Bonus(Wrapper):
    """simple_spread with info["bonus"] = each agent's x position (observation feature 2) after the step,
    so a test can recompute the bonus from the transitions' final_obs."""

    def step(self, key, state, actions):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, actions)
        return obs, state, reward, terminated, truncated, {**info, "bonus": obs[:, 2]}


def shaped_run(name: str, **algo):
    raw = marl.get_config("pqn_iql_spread" if name.startswith("pqn") else "smoke").to_dict()
    raw["env"] = {"id": "simple_spread_v3", "kwargs": {"max_cycles": 6}, "num_envs": 8}
    raw["algo"].update(name=name, num_steps=10, num_minibatches=2, update_epochs=1, **algo)
    raw["algo"]["reward_shaping"] = {
        "info_key": "bonus",
        "start_coef": START,
        "end_coef": END,
        "anneal_env_steps": ANNEAL,
    }
    raw["train"].update(num_seeds=1, total_env_steps=8 * 10 * 20)
    return from_config_dict(raw)


def schedule(update: int) -> np.ndarray:
    """The coefficient at each of update `update`'s 10 rollout steps, from the definition."""
    env_steps = update * 80 + np.arange(10) * 8
    return START + (END - START) * np.minimum(env_steps / ANNEAL, 1.0)


@pytest.mark.parametrize("name", ["ippo", "pqn_vdn"])
def test_learner_trains_on_env_reward_plus_annealed_info(monkeypatch, name):
    run = shaped_run(name)
    env = Bonus(envs.make("simple_spread_v3", max_cycles=6))
    mesh = make_mesh(validate_run(run, 1, env), jax.devices()[:1])
    learner = (pqn.PQN if name.startswith("pqn") else ppo.PPO)(run, env, mesh)

    seen = []  # the shaping argument, the shaped transitions, the same rollout without shaping

    def spy(*args):
        out = rollout.collect(*args)
        seen.append((args[-1][1], out[1], rollout.collect(*args[:-1], None)[1]))
        return out

    def update(state):
        seen.clear()
        _, metrics = learner.update(state)
        assert len(seen) == 1 and learner.run.algo.reward_shaping.info_key == "bonus"
        return metrics, seen[0]

    monkeypatch.setattr(pqn if name.startswith("pqn") else ppo, "collect", spy)
    with jax.set_mesh(mesh):
        update = jax.jit(update)
        state = learner.init(jax.random.key(0))
        for step in (6, 8):  # mid-anneal (env steps 480-552), then past it (640-712: end_coef)
            metrics, (coefs, shaped, plain) = update(state.replace(train=state.train.replace(step=step)))
            np.testing.assert_allclose(coefs, schedule(step), rtol=1e-6)
            assert float(metrics["shaping_coef"]) == pytest.approx(schedule(step)[0])
            bonus = np.asarray(plain.final_obs[..., 2])  # [T, E, A]
            assert np.mean(np.abs(bonus) > 1e-2) > 0.9  # a bonus almost everywhere
            want = np.asarray(plain.rewards) + schedule(step)[:, None, None] * bonus
            np.testing.assert_allclose(shaped.rewards, want, rtol=1e-5, atol=1e-5)
            # Same actions and episodes; the logged return is the env's reward alone.
            np.testing.assert_array_equal(shaped.actions, plain.actions)
            assert np.asarray(plain.episode_done).any()
            np.testing.assert_array_equal(shaped.episode_return, plain.episode_return)


def test_unknown_info_key_is_a_config_error():
    raw = marl.get_config("smoke").to_dict()
    raw["algo"]["reward_shaping"] = {"info_key": "shaped_reward_by_agent"}
    with pytest.raises(ConfigError, match="not in env 'simple_spread_v3'"):
        loop.build(from_config_dict(raw))


def test_overcooked_presets_log_the_sparse_return():
    for preset in ("ippo_overcooked", "pqn_vdn_overcooked"):
        run = from_config_dict(marl.get_config(preset))
        assert run.env.kwargs["shaped_reward_coef"] == 0.0
        assert run.algo.reward_shaping.info_key == "shaped_reward_by_agent"

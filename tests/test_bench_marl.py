"""The parts of jaxpar/bench's MARL comparison that need no JaxMARL: the return-unit accounting of the
re-implemented JaxMARL baseline (jaxmarl_ippo) and the mpe2 replay of a jaxpar policy (marl.replay_mpe2),
checked against jaxpar's MPE env started from each mpe2 episode's initial world."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar.envs as E
from jaxpar.bench import common, jaxmarl_ippo, marl
from jaxpar.config import MeshConfig
from jaxpar.envs.mpe import MPEState
from jaxpar.rl.config import from_config_dict
from jaxpar.rl.loop import build

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "marl.py")


def test_log_step_counts_jaxmarl_and_25_step_returns():
    """Two envs: env 0 runs a 26-transition JaxMARL episode, then starts the next one; env 1 never ends."""
    rng = np.random.default_rng(0)
    rewards = rng.uniform(-2.0, 0.0, size=(30, 2, 3)).astype(np.float32)  # [T, E, A]
    log = jaxmarl_ippo.init_log(2, 3)
    finished = []
    for t in range(30):
        done = jnp.array([t == 25, False])  # JaxMARL's done arrives on the 26th transition
        log, f = jaxmarl_ippo.log_step(log, jnp.asarray(rewards[t]), done)
        finished.append(np.asarray(f))
    finished = np.array(finished)
    # The finished episode's 25-step return per agent, averaged over agents: the first 25 transitions.
    np.testing.assert_allclose(finished[25, 0], rewards[:25, 0].sum(0).mean(), rtol=1e-5)
    assert np.count_nonzero(finished) == 1
    # JaxMARL's logged value: reward x 3 agents over all 26 transitions, kept until the next episode ends.
    np.testing.assert_allclose(np.asarray(log.returned[0]), 3 * rewards[:26, 0].sum(0), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(log.returned[1]), 0.0)
    # The new episode's running sums restart after the done.
    np.testing.assert_allclose(np.asarray(log.ret25[0]), rewards[26:, 0].sum(0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(log.running[0]), 3 * rewards[26:, 0].sum(0), rtol=1e-5)
    assert int(log.t[0]) == 4 and int(log.t[1]) == 30
    # After 30 transitions env 1's 25-step sum holds only its first 25.
    np.testing.assert_allclose(np.asarray(log.ret25[1]), rewards[:25, 1].sum(0), rtol=1e-5)


def test_per_agent_25_estimate():
    # A constant reward c per transition: JaxMARL logs 3 x 26c; per agent per 25 steps it is 25c.
    assert jaxmarl_ippo.per_agent_25(3 * 26 * -0.8, 3) == pytest.approx(25 * -0.8)
    with pytest.raises(ValueError, match="num_agents=0"):
        jaxmarl_ippo.per_agent_25(-60.0, 0)


@pytest.fixture(scope="module")
def jaxpar_policy():
    run = from_config_dict(common.load_config_dict(f"{CONFIG}:smoke"))
    run = dataclasses.replace(run, mesh=MeshConfig(data=1))
    ppo = build(run, jax.devices()[:1])
    params = jax.tree.map(lambda x: x[0], ppo.init_states().train.params)
    return marl.jaxpar_policy(ppo, params)


def _jaxpar_episode(policy, seed: int) -> np.ndarray:
    """Per-agent return of the greedy policy in jaxpar's env from mpe2's initial world of `seed`."""
    from mpe2 import simple_spread_v3

    ref = simple_spread_v3.parallel_env(**marl.MPE2_KWARGS)
    ref.reset(seed=seed)
    world = ref.unwrapped.world
    state = MPEState(
        agent_pos=np.array([a.state.p_pos for a in world.agents], np.float32),
        agent_vel=np.array([a.state.p_vel for a in world.agents], np.float32),
        landmark_pos=np.array([lm.state.p_pos for lm in world.landmarks], np.float32),
        comm=np.array([a.state.c for a in world.agents], np.float32),
        goal=np.zeros((0,), np.int32),
        t=np.int32(0),
    )
    env = E.make("simple_spread_v3")
    step = jax.jit(env.step)
    obs, total = env.observations(state), np.zeros(3)
    for _ in range(marl.MPE2_KWARGS["max_cycles"]):
        actions = np.asarray(policy(obs[None]))[0].argmax(-1).astype(np.int32)
        obs, state, reward, *_ = step(jax.random.key(0), state, jnp.asarray(actions))
        total += np.asarray(reward)
    return total


def test_mpe2_greedy_replay_matches_jaxpar_env(jaxpar_policy):
    returns = marl.replay_mpe2(jaxpar_policy, episodes=2, greedy=True)
    assert returns.shape == (2, 3)
    for i in range(2):
        np.testing.assert_allclose(
            returns[i], _jaxpar_episode(jaxpar_policy, marl.REPLAY_SEED + i), atol=2e-3
        )


def test_mpe2_sampled_replay_is_seeded(jaxpar_policy):
    a = marl.replay_mpe2(jaxpar_policy, episodes=2, greedy=False, seed=3)
    b = marl.replay_mpe2(jaxpar_policy, episodes=2, greedy=False, seed=3)
    c = marl.replay_mpe2(jaxpar_policy, episodes=2, greedy=False, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError, match="episodes=0"):
        marl.replay_mpe2(jaxpar_policy, episodes=0, greedy=True)

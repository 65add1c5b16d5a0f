"""The functional env API: registry, spaces, wrappers, the dict view, and a random-action smoke test of
every registered id under jit + vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxpar.envs as E
from jaxpar.envs import spaces
from jaxpar.envs.wrappers import AgentDict, AutoReset, EpisodeStats, VecEnv

MPE_IDS = (
    "simple_v3",
    "simple_adversary_v3",
    "simple_crypto_v3",
    "simple_push_v3",
    "simple_reference_v3",
    "simple_speaker_listener_v4",
    "simple_spread_v3",
    "simple_tag_v3",
    "simple_world_comm_v3",
)
SMOKE = [(i, {}) for i in E.registered_ids()] + [(i, {"continuous_actions": True}) for i in MPE_IDS]


def test_registry_holds_every_id():
    assert set(MPE_IDS) | {"switch_riddle", "coin_game", "overcooked", "hanabi"} == set(E.registered_ids())
    with pytest.raises(KeyError, match="simple_spread_v3"):
        E.make("simple_sprad_v3")
    with pytest.raises(ValueError, match="registered twice"):
        E.register("simple_v3")(object)


def test_bad_constructor_arguments_name_the_value():
    with pytest.raises(ValueError, match="local_ratio=1.5"):
        E.make("simple_spread_v3", local_ratio=1.5)
    with pytest.raises(ValueError, match="num_agent_neighbors=0"):
        E.make("simple_tag_v3", num_agent_neighbors=0)
    with pytest.raises(ValueError, match="max_cycles=0"):
        E.make("simple_v3", max_cycles=0)
    with pytest.raises(ValueError, match="curriculum_stage=3"):
        E.make("simple_tag_v3", curriculum=True, curriculum_stage=3)


@pytest.mark.parametrize("env_id,kwargs", SMOKE, ids=[f"{i}{'-continuous' if k else ''}" for i, k in SMOKE])
def test_random_actions_under_jit_and_vmap(env_id, kwargs):
    """Every id: 4 envs stepped with random actions past an episode end; shapes, dtypes, spaces, flags,
    autoreset and episode statistics hold."""
    env = E.make(env_id, **kwargs)
    vec = EpisodeStats(VecEnv(env, 4))
    A, (_, D) = env.num_agents, env.observation_space.shape
    horizon = getattr(env, "max_cycles", None) or env.max_steps

    @jax.jit
    def rollout(key):
        obs, state = vec.reset(key)

        def body(state, key):
            actions = vec.action_space.sample(key)
            obs, state, reward, terminated, truncated, info = vec.step(key, state, actions)
            checks = (vec.action_space.contains(actions), vec.observation_space.contains(obs))
            return state, (obs, reward, terminated, truncated, info, checks)

        return obs, jax.lax.scan(body, state, jax.random.split(key, horizon + 2))[1]

    obs0, (obs, reward, terminated, truncated, info, checks) = jax.device_get(rollout(jax.random.key(0)))
    assert obs0.shape == (4, A, D) and obs.dtype == obs0.dtype == np.float32 and reward.dtype == np.float32
    assert reward.shape == terminated.shape == truncated.shape == (horizon + 2, 4, A)
    assert np.all(checks[0]) and np.all(checks[1]), "actions or observations outside their spaces"
    assert np.all(np.isfinite(reward)) and not np.any(terminated & truncated)
    np.testing.assert_array_equal(obs * ~env.observation_mask, 0)  # padding stays zero
    done = info["returned_episode"]  # [T, 4]
    assert done.any(axis=0).all(), "every env should finish an episode within its time limit"
    for e in range(4):
        end = int(np.argmax(done[:, e]))
        np.testing.assert_allclose(
            info["returned_episode_return"][end, e], reward[: end + 1, e].sum(axis=0), rtol=1e-5, atol=1e-5
        )
        assert info["returned_episode_length"][end, e] == end + 1 <= horizon


def test_vec_env_autoreset_equals_vmapped_autoreset():
    """The batch-level autoreset (resets only on steps where some env ended) is the per-env one."""
    env = E.make("coin_game", max_steps=5)  # stochastic steps: keys must line up too
    vec, single = VecEnv(env, 3), AutoReset(env)

    def by_vmap(key, state, actions):
        keys = E.wrappers.env_keys(key, 3)
        return jax.vmap(single.step)(keys, state, actions)

    @jax.jit
    def both(key, state):
        actions = vec.action_space.sample(key)
        return vec.step(key, state, actions), by_vmap(key, state, actions)

    obs, state = jax.jit(vec.reset)(jax.random.key(0))
    for t in range(12):
        a, b = both(jax.random.key(100 + t), state)
        jax.tree.map(np.testing.assert_array_equal, a, b)
        state = a[1]


def test_autoreset_keeps_final_obs_and_separates_truncation():
    env = AutoReset(E.make("simple_spread_v3", max_cycles=3))
    _, state = env.reset(jax.random.key(0))
    step = jax.jit(env.step)
    actions = jnp.zeros(env.action_space.shape, jnp.int32)
    for t in range(1, 4):
        new_obs, new_state, _, terminated, truncated, info = step(jax.random.key(t), state, actions)
        assert not terminated.any() and bool(truncated.all()) == (t == 3)
        if t < 3:
            np.testing.assert_array_equal(new_obs, info["final_obs"])
        else:  # a fresh episode: counter back to 0, final_obs still the one the last step reached
            assert int(new_state.t) == 0 and not np.array_equal(new_obs, info["final_obs"])
            np.testing.assert_allclose(
                info["final_obs"][:, 2:4], state.agent_pos + state.agent_vel * 0.1, atol=1e-6
            )
        state = new_state


def test_agent_dict_view_round_trips():
    for kwargs in ({}, {"continuous_actions": True}):
        env = E.make("simple_speaker_listener_v4", **kwargs)
        view = AgentDict(env)

        @jax.jit
        def both(key):
            obs, state = view.reset(key)
            actions = {
                n: view.agent_action_space(n).sample(jax.random.fold_in(key, i))
                for i, n in enumerate(view.agents)
            }
            return obs, state, view.step(key, state, actions), env.step(key, state, view._actions(actions))

        obs, state, (_, new_state, reward, terminated, truncated, _), (_, expected, *_) = both(
            jax.random.key(0)
        )
        assert {k: v.shape for k, v in obs.items()} == {"speaker_0": (3,), "listener_0": (11,)}
        jax.tree.map(np.testing.assert_array_equal, new_state, expected)
        assert set(reward) == set(terminated) == set(truncated) == set(env.agents)
        actions = {"speaker_0": view.agent_action_space("speaker_0").sample(jax.random.key(1))}
    with pytest.raises(KeyError, match="listener_0"):
        view.step(None, state, actions)


def test_spaces_sample_and_contains():
    discrete = spaces.Discrete([3, 5])
    x = jax.vmap(discrete.sample)(jax.random.split(jax.random.key(0), 1000))
    assert x.shape == (1000, 2) and x[:, 0].max() == 2 and x[:, 1].max() == 4 and x.min() == 0
    assert discrete.contains(jnp.array([2, 4])) and not discrete.contains(jnp.array([3, 0]))
    assert not discrete.contains(jnp.array([0.0, 0.0])) and not discrete.contains(jnp.array([0]))
    box = spaces.stack([spaces.Box(0.0, 1.0, (3,)), spaces.Box(0.0, 1.0, (5,))])
    y = box.sample(jax.random.key(1))
    assert y.shape == (2, 5) and np.all(np.asarray(y[0, 3:]) == 0) and box.contains(y)
    assert box.contains(y.at[0, 4].set(7.0))  # padding is ignored
    assert not box.contains(y.at[1, 4].set(7.0))
    assert spaces.unstack(box, 0).shape == (3,)
    unbounded = spaces.Box(-np.inf, np.inf, (4,))
    assert unbounded.contains(unbounded.sample(jax.random.key(2)))
    assert jax.jit(box.contains)(y)

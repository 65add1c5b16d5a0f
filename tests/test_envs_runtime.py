"""The shared runtime: a batch of envs on the mesh's data axes gives the same trajectories on 1 and on 8
(simulated) devices, because env i's keys depend on i alone."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxpar.envs as E
from jaxpar.config import MeshConfig
from jaxpar.envs.runtime import EnvRuntime
from jaxpar.envs.wrappers import env_keys
from jaxpar.parallel.rules import logical_to_spec
from lm_testing import config_mesh

NUM_ENVS = 16
BATCH_AXES = logical_to_spec(("batch",))[0]


def per_env_random_policy(runtime):
    """Env i's action drawn with fold_in(key, i): independent of how the batch is split."""
    space = runtime.env.action_space
    return lambda key, obs: jax.vmap(space.sample)(env_keys(key, runtime.num_envs))


def trajectories(env, mesh, steps):
    runtime = EnvRuntime(env, NUM_ENVS, mesh)
    obs, state = runtime.reset(jax.random.key(0))
    assert obs.sharding.spec[0] == BATCH_AXES
    assert len(obs.sharding.device_set) == mesh.size

    def collect(obs, reward, terminated, truncated, info):
        return obs, reward, terminated, truncated, info["final_obs"]

    run = runtime.rollout_fn(steps, per_env_random_policy(runtime), collect)
    (obs, state), out = run(jax.random.key(1), obs, state)
    return jax.device_get((out, state))


@pytest.mark.parametrize(
    "env_id,kwargs,steps",
    [
        ("simple_tag_v3", {"num_good": 2, "max_cycles": 10}, 25),  # contacts; resets inside the rollout
        ("coin_game", {"max_steps": 8}, 20),  # the step itself draws random numbers
    ],
)
def test_same_trajectories_on_1_and_8_devices(env_id, kwargs, steps):
    env = E.make(env_id, **kwargs)
    one = trajectories(env, config_mesh(MeshConfig(), devices=jax.devices()[:1]), steps)
    eight = trajectories(env, config_mesh(MeshConfig(data=4, fsdp=2)), steps)
    jax.tree.map(np.testing.assert_array_equal, one, eight)
    truncated = one[0][3]
    assert truncated.any(), "the rollout should cross an episode boundary"


def test_batch_must_divide_the_batch_shards():
    with pytest.raises(ValueError, match="num_envs=12 .* multiple of 8"):
        EnvRuntime(E.make("simple_v3"), 12, config_mesh(MeshConfig()))


def test_step_places_outputs_on_the_batch_shards():
    mesh = config_mesh(MeshConfig())
    runtime = EnvRuntime(E.make("simple_spread_v3"), NUM_ENVS, mesh)
    obs, state = runtime.reset(jax.random.key(0))
    actions = runtime.place(np.zeros((NUM_ENVS, 3), np.int32))
    obs, state, reward, terminated, truncated, info = runtime.step(jax.random.key(1), state, actions)
    for x in (obs, state.agent_pos, reward, truncated, info["final_obs"]):
        assert x.sharding.spec[0] == BATCH_AXES and x.addressable_shards[0].data.shape[0] == NUM_ENVS // 8

"""simple_v3: one agent, one landmark, reward -squared distance (mpe2 `simple/simple.py`)."""

from __future__ import annotations

import jax.numpy as jnp

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, rows
from jaxpar.envs.registry import register


@register("simple_v3")
class Simple(MPEEnv):
    def __init__(self, max_cycles: int = 25, continuous_actions: bool = False):
        world = World(
            [AgentSpec("agent_0", collide=False, silent=True)],
            [LandmarkSpec("landmark 0", collide=False)],
            dim_c=0,
        )
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def observation_blocks(self, s):
        return [rows(1, s.agent_vel, s.landmark_pos - s.agent_pos)]

    def agent_rewards(self, s):
        return -jnp.sum(jnp.square(s.agent_pos - s.landmark_pos[0]), axis=-1)

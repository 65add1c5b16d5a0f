"""simple_reference_v3: each agent knows the landmark the OTHER should reach and must say it
(mpe2 `simple_reference/simple_reference.py`). Agents move and speak (10 words).

goal[i] is agent i's goal landmark for the other agent. Observation: [vel, landmarks - pos, colour of
goal[i], the other's utterance]. Reward of agent i: -dist(other agent, landmark goal[i]); global reward their
mean, mixed by local_ratio.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, norm, relative, rows
from jaxpar.envs.registry import register

LANDMARK_COLOURS = np.array([[0.75, 0.25, 0.25], [0.25, 0.75, 0.25], [0.25, 0.25, 0.75]], np.float32)


@register("simple_reference_v3")
class SimpleReference(MPEEnv):
    goal_sizes = (3, 3)

    def __init__(self, local_ratio: float = 0.5, max_cycles: int = 25, continuous_actions: bool = False):
        agents = [AgentSpec(f"agent_{i}", collide=False) for i in range(2)]
        world = World(agents, [LandmarkSpec(f"landmark {i}", collide=False) for i in range(3)], dim_c=10)
        super().__init__(
            world, max_cycles=max_cycles, continuous_actions=continuous_actions, local_ratio=local_ratio
        )

    def observation_blocks(self, s):
        other_says = s.comm[::-1]
        return [
            rows(
                2,
                s.agent_vel,
                relative(s.agent_pos, s.landmark_pos),
                jnp.asarray(LANDMARK_COLOURS)[s.goal],
                other_says,
            )
        ]

    def agent_rewards(self, s):
        return -norm(s.agent_pos[::-1] - s.landmark_pos[s.goal])

    def global_reward(self, s):
        return jnp.mean(self.agent_rewards(s))

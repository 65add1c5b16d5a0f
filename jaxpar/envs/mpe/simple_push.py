"""simple_push_v3: a good agent goes to the goal landmark, an adversary pushes it away
(mpe2 `simple_push/simple_push.py`).

Observation: good agent [vel, goal - pos, own colour, landmarks - pos, landmark colours, other - pos],
adversary [vel, landmarks - pos, other - pos]. The good agent's colour marks the goal. Rewards: good
-dist(good, goal); adversary min over good agents of dist to goal - dist(adversary, goal).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, norm, off_diagonal, relative, rows
from jaxpar.envs.registry import register

# mpe2: landmark i is 0.1 grey with +0.8 on channel i + 1; the good agent 0.25 grey with +0.5 on goal + 1.
LANDMARK_COLOURS = np.array([[0.1, 0.9, 0.1], [0.1, 0.1, 0.9]], np.float32)
AGENT_COLOURS = np.array([[0.25, 0.75, 0.25], [0.25, 0.25, 0.75]], np.float32)


@register("simple_push_v3")
class SimplePush(MPEEnv):
    goal_sizes = (2,)

    def __init__(self, max_cycles: int = 25, continuous_actions: bool = False):
        agents = [AgentSpec("adversary_0", silent=True), AgentSpec("agent_0", silent=True)]
        world = World(agents, [LandmarkSpec(f"landmark {i}", collide=False) for i in range(2)], dim_c=2)
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def observation_blocks(self, s):
        landmarks = relative(s.agent_pos, s.landmark_pos)
        other = off_diagonal(relative(s.agent_pos, s.agent_pos))
        goal = s.landmark_pos[s.goal[0]]
        adversary = rows(1, s.agent_vel[:1], landmarks[:1], other[:1])
        good = rows(
            1,
            s.agent_vel[1:],
            goal[None] - s.agent_pos[1:],
            jnp.asarray(AGENT_COLOURS)[s.goal[0]],
            landmarks[1:],
            LANDMARK_COLOURS,
            other[1:],
        )
        return [adversary, good]

    def agent_rewards(self, s):
        dist = norm(s.agent_pos - s.landmark_pos[s.goal[0]][None])  # [adversary, good]
        return jnp.stack([dist[1] - dist[0], -dist[1]])

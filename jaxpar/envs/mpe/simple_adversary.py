"""simple_adversary_v3: N good agents know the goal landmark, one adversary must guess it
(mpe2 `simple_adversary/simple_adversary.py`).

Observation: good agents [goal - pos, landmarks - pos, others - pos]; the adversary the same without the
goal. Rewards: adversary -dist(adversary, goal); good agents -min over good agents of dist to goal + dist of
the adversary to goal.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpar.envs.mpe.env import MPEEnv, check_neighbors
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, nearest, norm, off_diagonal, relative, rows
from jaxpar.envs.registry import register


@register("simple_adversary_v3")
class SimpleAdversary(MPEEnv):
    def __init__(
        self,
        N: int = 2,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        num_agent_neighbors: int | None = None,
        num_landmark_neighbors: int | None = None,
    ):
        if N < 1:
            raise ValueError(f"N={N!r} must be at least 1 (good agents and landmarks).")
        check_neighbors(
            num_agent_neighbors=num_agent_neighbors, num_landmark_neighbors=num_landmark_neighbors
        )
        self.num_agent_neighbors = num_agent_neighbors
        self.num_landmark_neighbors = num_landmark_neighbors
        self.goal_sizes = (N,)
        agents = [AgentSpec("adversary_0", size=0.15, collide=False, silent=True)]
        agents += [AgentSpec(f"agent_{i}", size=0.15, collide=False, silent=True) for i in range(N)]
        world = World(
            agents, [LandmarkSpec(f"landmark {i}", size=0.08, collide=False) for i in range(N)], dim_c=2
        )
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def _goal_pos(self, s):
        return s.landmark_pos[s.goal[0]]

    def observation_blocks(self, s):
        A = self.world.num_agents
        (landmarks,) = nearest(relative(s.agent_pos, s.landmark_pos), self.num_landmark_neighbors)
        (others,) = nearest(off_diagonal(relative(s.agent_pos, s.agent_pos)), self.num_agent_neighbors)
        goal = self._goal_pos(s)[None] - s.agent_pos[1:]
        return [rows(1, landmarks[:1], others[:1]), rows(A - 1, goal, landmarks[1:], others[1:])]

    def agent_rewards(self, s):
        dist = norm(s.agent_pos - self._goal_pos(s)[None])  # [A]; agent 0 is the adversary
        good = -jnp.min(dist[1:]) + dist[0]
        return jnp.concatenate([-dist[:1], jnp.broadcast_to(good, (self.world.num_agents - 1,))])

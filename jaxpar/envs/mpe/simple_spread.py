"""simple_spread_v3: N agents cover N landmarks (mpe2 `simple_spread/simple_spread.py`).

Shared reward: -(sum over landmarks of the nearest agent's distance); local reward: -1 per other agent in
contact (suppressed in curriculum stage 0); mixed by local_ratio. Observation of agent i: [vel, pos,
landmarks - pos, others - pos, others' utterances], the last three optionally restricted to the nearest
num_landmark_neighbors / num_agent_neighbors (zero-padded), as mpe2's partial observability.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxpar.envs.mpe.env import MPEEnv, check_neighbors, check_stage
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, nearest, norm, off_diagonal, relative, rows
from jaxpar.envs.registry import register

CAPTURE_RADIUS = 0.1
NUM_CURRICULUM_STAGES = 2  # stage 0: no collision penalty; stage 1: full task


@register("simple_spread_v3")
class SimpleSpread(MPEEnv):
    def __init__(
        self,
        N: int = 3,
        local_ratio: float = 0.5,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        curriculum: bool = False,
        curriculum_stage: int = 0,
        terminate_on_success: bool = False,
        num_agent_neighbors: int | None = None,
        num_landmark_neighbors: int | None = None,
    ):
        if N < 1:
            raise ValueError(f"N={N!r} must be at least 1 (agents and landmarks).")
        check_neighbors(
            num_agent_neighbors=num_agent_neighbors, num_landmark_neighbors=num_landmark_neighbors
        )
        check_stage(curriculum_stage, NUM_CURRICULUM_STAGES)
        self.collision_penalty = (not curriculum) or curriculum_stage >= 1
        self.terminate_on_success = terminate_on_success
        self.num_agent_neighbors = num_agent_neighbors
        self.num_landmark_neighbors = num_landmark_neighbors
        world = World(
            [AgentSpec(f"agent_{i}", size=0.15, silent=True) for i in range(N)],
            [LandmarkSpec(f"landmark {i}", collide=False) for i in range(N)],
            dim_c=2,
        )
        super().__init__(
            world, max_cycles=max_cycles, continuous_actions=continuous_actions, local_ratio=local_ratio
        )

    def observation_blocks(self, s):
        A = self.world.num_agents
        (landmarks,) = nearest(relative(s.agent_pos, s.landmark_pos), self.num_landmark_neighbors)
        comm = jnp.broadcast_to(s.comm[None], (A, A, self.world.dim_c))
        others, others_comm = nearest(
            off_diagonal(relative(s.agent_pos, s.agent_pos)), self.num_agent_neighbors, off_diagonal(comm)
        )
        return [rows(A, s.agent_vel, s.agent_pos, landmarks, others, others_comm)]

    def _landmark_distances(self, s):
        return norm(relative(s.landmark_pos, s.agent_pos))  # [L, A]

    def agent_rewards(self, s):
        if not self.collision_penalty:
            return jnp.zeros(self.world.num_agents, jnp.float32)
        dist = norm(off_diagonal(relative(s.agent_pos, s.agent_pos)))
        return -jnp.sum(dist < 2 * self.world.agent_size[0], axis=1).astype(jnp.float32)

    def global_reward(self, s):
        return -jnp.sum(jnp.min(self._landmark_distances(s), axis=1))

    def is_terminal(self, s):
        if not self.terminate_on_success:
            return jnp.asarray(False)
        return jnp.all(jnp.min(self._landmark_distances(s), axis=1) < CAPTURE_RADIUS)

"""simple_tag_v3: slower adversaries chase faster good agents among obstacles
(mpe2 `simple_tag/simple_tag.py`).

Observation: [vel, pos, obstacles - pos, others - pos, good others' velocities]; a good agent sees
num_good - 1 velocities and an adversary num_good, so the two roles' rows differ in length (padded, see
observation_mask). With num_agent_neighbors the last two are the nearest agents' positions and
velocities (zeros for adversaries), both zero-padded. Obstacles start in U(-0.9, 0.9).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpar.envs.mpe.env import MPEEnv, check_neighbors, check_stage
from jaxpar.envs.mpe.world import (
    AgentSpec,
    LandmarkSpec,
    World,
    boundary_penalty,
    in_contact,
    nearest,
    off_diagonal,
    relative,
    rows,
)
from jaxpar.envs.registry import register

PREY_SPEED_FACTORS = (0.5, 0.75, 1.0)  # curriculum stages: prey max speed and accel scaled by these
PREY_MAX_SPEED, PREY_ACCEL = 1.3, 4.0


def pursuit_agents(num_good: int, num_adversaries: int, good_size: float, speed_factor: float = 1.0):
    """Adversaries first (size 0.075, accel 3, max speed 1), then good agents, as mpe2's tag worlds."""
    adversaries = [
        AgentSpec(f"adversary_{i}", size=0.075, accel=3.0, max_speed=1.0, silent=True)
        for i in range(num_adversaries)
    ]
    good = [
        AgentSpec(
            f"agent_{i}",
            size=good_size,
            accel=PREY_ACCEL * speed_factor,
            max_speed=PREY_MAX_SPEED * speed_factor,
            silent=True,
        )
        for i in range(num_good)
    ]
    return adversaries + good


@register("simple_tag_v3")
class SimpleTag(MPEEnv):
    def __init__(
        self,
        num_good: int = 1,
        num_adversaries: int = 3,
        num_obstacles: int = 2,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        curriculum: bool = False,
        curriculum_stage: int = 0,
        terminate_on_success: bool = False,
        num_agent_neighbors: int | None = None,
        num_landmark_neighbors: int | None = None,
    ):
        if num_good < 0 or num_adversaries < 0 or num_good + num_adversaries < 1 or num_obstacles < 0:
            raise ValueError(
                f"num_good={num_good}, num_adversaries={num_adversaries}, num_obstacles={num_obstacles}: "
                "counts must be >= 0 with at least one agent."
            )
        check_neighbors(
            num_agent_neighbors=num_agent_neighbors, num_landmark_neighbors=num_landmark_neighbors
        )
        check_stage(curriculum_stage, len(PREY_SPEED_FACTORS))
        self.num_good, self.num_adversaries = num_good, num_adversaries
        self.terminate_on_success = terminate_on_success
        self.num_agent_neighbors = num_agent_neighbors
        self.num_landmark_neighbors = num_landmark_neighbors
        factor = PREY_SPEED_FACTORS[curriculum_stage] if curriculum else 1.0
        world = World(
            pursuit_agents(num_good, num_adversaries, 0.05, factor),
            [LandmarkSpec(f"landmark {i}", size=0.2, init_range=0.9) for i in range(num_obstacles)],
            dim_c=2,
        )
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def observation_blocks(self, s):
        A, n_adv = self.world.num_agents, self.num_adversaries
        (obstacles,) = nearest(relative(s.agent_pos, s.landmark_pos), self.num_landmark_neighbors)
        others = off_diagonal(relative(s.agent_pos, s.agent_pos))
        if self.num_agent_neighbors is None:
            good_vel = s.agent_vel[n_adv:]
            adv_vel = jnp.broadcast_to(good_vel[None], (n_adv, *good_vel.shape))
            good_others_vel = off_diagonal(jnp.broadcast_to(good_vel[None], (self.num_good, *good_vel.shape)))
        else:
            vel = jnp.where((np.arange(A) >= n_adv)[:, None], s.agent_vel, 0.0)
            others, others_vel = nearest(
                others, self.num_agent_neighbors, off_diagonal(jnp.broadcast_to(vel[None], (A, A, 2)))
            )
            adv_vel, good_others_vel = others_vel[:n_adv], others_vel[n_adv:]
        common = (s.agent_vel, s.agent_pos, obstacles, others)
        blocks = []
        if n_adv:
            blocks.append(rows(n_adv, *(x[:n_adv] for x in common), adv_vel))
        if self.num_good:
            blocks.append(rows(self.num_good, *(x[n_adv:] for x in common), good_others_vel))
        return blocks

    def _caught(self, s):
        """[G, N_adv] bool: good agent g is in contact with adversary a."""
        n_adv, size = self.num_adversaries, self.world.agent_size
        return in_contact(s.agent_pos[n_adv:], size[n_adv:], s.agent_pos[:n_adv], size[:n_adv])

    def agent_rewards(self, s):
        n_adv = self.num_adversaries
        hits = self._caught(s)
        adversary = jnp.full((n_adv,), 10.0 * jnp.sum(hits), jnp.float32)
        good = -10.0 * jnp.sum(hits, axis=1) - boundary_penalty(s.agent_pos[n_adv:])
        return jnp.concatenate([adversary, good.astype(jnp.float32)])

    def is_terminal(self, s):
        if not self.terminate_on_success:
            return jnp.asarray(False)
        return jnp.all(jnp.any(self._caught(s), axis=1))

"""simple_world_comm_v3: simple_tag with food, forests that hide agents, and a leader adversary that sees
everything and speaks to the others (mpe2 `simple_world_comm/simple_world_comm.py`).

Landmarks are obstacles, then food, then forests, all starting in U(-0.9, 0.9). Agent i sees agent j's
position (and velocity, for good j) when both are in a common forest, or neither is in any forest, or i
is the leader; otherwise zeros. Adversary rows: [vel, pos, landmarks - pos, others - pos, good others'
velocities, in_forest (+1/-1 per forest), leader's utterance]; good rows: [vel, pos, landmarks - pos,
others - pos, in_forest, good others' velocities].
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.simple_tag import pursuit_agents
from jaxpar.envs.mpe.world import (
    AgentSpec,
    LandmarkSpec,
    World,
    boundary_penalty,
    in_contact,
    norm,
    off_diagonal,
    relative,
    rows,
)
from jaxpar.envs.registry import register


@register("simple_world_comm_v3")
class SimpleWorldComm(MPEEnv):
    def __init__(
        self,
        num_good: int = 2,
        num_adversaries: int = 4,
        num_obstacles: int = 1,
        num_food: int = 2,
        max_cycles: int = 25,
        num_forests: int = 2,
        continuous_actions: bool = False,
    ):
        if num_good < 1 or num_adversaries < 1 or num_food < 1 or num_obstacles < 0 or num_forests < 0:
            raise ValueError(
                f"num_good={num_good}, num_adversaries={num_adversaries}, num_food={num_food} must be "
                f">= 1 (the leader is an adversary; rewards take minima over good agents and food); "
                f"num_obstacles={num_obstacles}, num_forests={num_forests} must be >= 0."
            )
        self.num_good, self.num_adversaries = num_good, num_adversaries
        # The leader (it speaks), then the silent adversaries and good agents of simple_tag's world.
        agents = [AgentSpec("leadadversary_0", size=0.075, accel=3.0, max_speed=1.0)]
        agents += pursuit_agents(num_good, num_adversaries - 1, good_size=0.045)
        landmarks = [LandmarkSpec(f"landmark {i}", size=0.2, init_range=0.9) for i in range(num_obstacles)]
        landmarks += [
            LandmarkSpec(f"food {i}", size=0.03, collide=False, init_range=0.9) for i in range(num_food)
        ]
        landmarks += [
            LandmarkSpec(f"forest {i}", size=0.3, collide=False, init_range=0.9) for i in range(num_forests)
        ]
        world = World(agents, landmarks, dim_c=4)
        self.food = np.arange(num_obstacles, num_obstacles + num_food)
        self.forests = np.arange(num_obstacles + num_food, len(landmarks))
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def _contacts(self, s, landmarks):
        return in_contact(
            s.agent_pos, self.world.agent_size, s.landmark_pos[landmarks], self.world.landmark_size[landmarks]
        )

    def observation_blocks(self, s):
        A, n_adv, G = self.world.num_agents, self.num_adversaries, self.num_good
        inside = self._contacts(s, self.forests)  # [A, F]
        in_any = jnp.any(inside, axis=1)
        same_forest = jnp.any(inside[:, None, :] & inside[None, :, :], axis=-1)
        leader = np.arange(A) == 0
        visible = same_forest | (~in_any[:, None] & ~in_any[None, :]) | leader[:, None]  # [A, A]
        others = off_diagonal(relative(s.agent_pos, s.agent_pos) * visible[..., None])
        good_vel = visible[:, n_adv:, None] * s.agent_vel[None, n_adv:]  # [A, G, 2]
        adv_sees_vel, good_sees_vel = good_vel[:n_adv], off_diagonal(good_vel[n_adv:])
        in_forest = jnp.where(inside, 1.0, -1.0)
        landmarks = relative(s.agent_pos, s.landmark_pos)
        leader_says = jnp.broadcast_to(s.comm[0], (n_adv, self.world.dim_c))
        common = (s.agent_vel, s.agent_pos, landmarks, others)
        return [
            rows(n_adv, *(x[:n_adv] for x in common), adv_sees_vel, in_forest[:n_adv], leader_says),
            rows(G, *(x[n_adv:] for x in common), in_forest[n_adv:], good_sees_vel),
        ]

    def agent_rewards(self, s):
        n_adv, size = self.num_adversaries, self.world.agent_size
        good_pos = s.agent_pos[n_adv:]
        hits = in_contact(good_pos, size[n_adv:], s.agent_pos[:n_adv], size[:n_adv])  # [G, N_adv]
        eaten = self._contacts(s, self.food)[n_adv:]
        food_dist = norm(relative(good_pos, s.landmark_pos[self.food]))
        good = (
            -5.0 * jnp.sum(hits, axis=1)
            - 2 * boundary_penalty(good_pos)
            + 2.0 * jnp.sum(eaten, axis=1)
            - 0.05 * jnp.min(food_dist, axis=1)
        )
        chase = jnp.min(norm(relative(s.agent_pos[:n_adv], good_pos)), axis=1)
        adversary = -0.1 * chase + 5.0 * jnp.sum(hits)
        return jnp.concatenate([adversary, good]).astype(jnp.float32)

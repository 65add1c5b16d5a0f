"""simple_crypto_v3: Alice encodes the goal with a key shared with Bob; Eve listens
(mpe2 `simple_crypto/simple_crypto.py`). Agents are immovable; only utterances (dim 4) matter.

Agents in order eve_0, bob_0, alice_0. goal = [goal landmark, key landmark]; a landmark's colour is the
one-hot of its index in 4 dims. Observations: alice [goal colour, key], bob [key, alice's utterance],
eve [alice's utterance]. Rewards: with d(x) = |x - goal colour|^2 and an utterance counting only when it is
not all zeros, eve -d(eve), alice and bob d(eve) - d(bob).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.envs.mpe.env import MPEEnv
from jaxpar.envs.mpe.world import AgentSpec, LandmarkSpec, World, rows
from jaxpar.envs.registry import register

DIM_C = 4
EVE, BOB, ALICE = 0, 1, 2


@register("simple_crypto_v3")
class SimpleCrypto(MPEEnv):
    goal_sizes = (2, 2)  # goal landmark, then the landmark whose colour is the key

    def __init__(self, max_cycles: int = 25, continuous_actions: bool = False):
        agents = [AgentSpec(name, movable=False, collide=False) for name in ("eve_0", "bob_0", "alice_0")]
        world = World(agents, [LandmarkSpec(f"landmark {i}", collide=False) for i in range(2)], dim_c=DIM_C)
        super().__init__(world, max_cycles=max_cycles, continuous_actions=continuous_actions)

    def observation_blocks(self, s):
        goal_colour, key = jax.nn.one_hot(s.goal, DIM_C, dtype=jnp.float32)
        alice_says = s.comm[ALICE]
        return [rows(1, alice_says), rows(1, key, alice_says), rows(1, goal_colour, key)]

    def agent_rewards(self, s):
        goal_colour = jax.nn.one_hot(s.goal[0], DIM_C, dtype=jnp.float32)
        spoke = jnp.any(s.comm != 0, axis=-1)
        err = jnp.where(spoke, jnp.sum(jnp.square(s.comm - goal_colour), axis=-1), 0.0)
        good = err[EVE] - err[BOB]
        return jnp.stack([-err[EVE], good, good])

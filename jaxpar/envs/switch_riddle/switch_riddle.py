"""The switch riddle of Foerster et al. 2016 ("Learning to communicate with deep multi-agent RL").

Each day one of n prisoners, chosen uniformly at random, is taken to a room with a light bulb. The
prisoner in the room sees the bulb and either sets it (off or on) for whoever comes next, or tells the
warden that every prisoner has been in the room. Telling ends the episode with +1 for everyone if that
is true and -1 if not; after `max_steps` days (4n - 6 by default, as in the paper) it is truncated with 0.

Observation [n, 2]: (in the room today, bulb is on and I can see it). Actions: 0 = bulb off, 1 = bulb on,
2 = tell; only the prisoner in the room acts. The bulb starts off. The whole visiting schedule is drawn
at reset (as in the paper's implementation), so a step is a deterministic function of (state, actions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.registry import register

BULB_OFF, BULB_ON, TELL = 0, 1, 2


@struct.dataclass
class SwitchRiddleState:
    schedule: jax.Array  # [max_steps] int32: who is in the room on each day
    has_been: jax.Array  # [n] bool: has been in the room on some day up to today
    bulb: jax.Array  # bool
    t: jax.Array  # int32: today (days elapsed)


@register("switch_riddle")
class SwitchRiddle(MultiAgentEnv):
    def __init__(self, num_agents: int = 3, max_steps: int | None = None):
        if num_agents < 2:
            raise ValueError(f"num_agents={num_agents} must be >= 2 for the riddle to need communication.")
        max_steps = 4 * num_agents - 6 if max_steps is None else max_steps
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.max_steps = int(max_steps)
        self.agents = tuple(f"agent_{i}" for i in range(num_agents))
        self.observation_space = spaces.Box(0.0, 1.0, (num_agents, 2))
        self.action_space = spaces.Discrete(3, shape=(num_agents,))

    def _obs(self, state: SwitchRiddleState) -> jax.Array:
        in_room = jnp.arange(self.num_agents) == state.schedule[jnp.minimum(state.t, self.max_steps - 1)]
        return jnp.stack([in_room, in_room & state.bulb], axis=-1).astype(jnp.float32)

    def reset(self, key):
        schedule = spaces.Discrete(self.num_agents, shape=(self.max_steps,)).sample(key)
        state = SwitchRiddleState(
            schedule=schedule,
            has_been=jnp.arange(self.num_agents) == schedule[0],
            bulb=jnp.asarray(False),
            t=jnp.int32(0),
        )
        return self._obs(state), state

    def step(self, key, state: SwitchRiddleState, actions):
        del key
        action = actions[state.schedule[state.t]]
        tell = action == TELL
        reward = jnp.where(tell, jnp.where(jnp.all(state.has_been), 1.0, -1.0), 0.0)
        t = state.t + 1
        tomorrow = state.schedule[jnp.minimum(t, self.max_steps - 1)]
        state = SwitchRiddleState(
            schedule=state.schedule,
            has_been=state.has_been | (jnp.arange(self.num_agents) == tomorrow),
            bulb=jnp.where(tell, state.bulb, action == BULB_ON),
            t=t,
        )
        truncated = ~tell & (t >= self.max_steps)
        n = self.num_agents
        return (
            self._obs(state),
            state,
            jnp.full((n,), reward, jnp.float32),
            jnp.broadcast_to(tell, (n,)),
            jnp.broadcast_to(truncated, (n,)),
            {},
        )

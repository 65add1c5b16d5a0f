"""The functional multi-agent environment API.

    obs, state = env.reset(key)
    obs, state, reward, terminated, truncated, info = env.step(key, state, actions)

Every per-agent array has the agent axis first: `obs` [num_agents, obs_dim] (zero-padded where agents'
observations differ in length; `env.observation_space.mask` marks the real entries), `actions`
[num_agents] (discrete) or [num_agents, act_dim] (continuous, padded the same way), `reward`,
`terminated`, `truncated` [num_agents]. The state is a `flax.struct` dataclass, so it is a pytree that jit,
vmap, scan and shardings handle. Time limits are `truncated`, never `terminated`.

Users who want a dict keyed by agent name (PettingZoo / JaxMARL style) take `wrappers.AgentDict(env)`.

Legal actions: `env.legal_actions(state)` -> bool [num_agents, num_actions] says which discrete actions
each agent may take in `state` (the state the next `step` starts from); a policy masks the others out
(jaxpar.rl's PPO does, when an environment overrides this method). The default allows every action within
each agent's count of the `Discrete` action space. Environments with rules (turn-based games such as
Hanabi) override it; an override must leave at least one action legal for every agent.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.envs import spaces

StepOut = tuple[jax.Array, Any, jax.Array, jax.Array, jax.Array, dict]


class MultiAgentEnv(abc.ABC):
    """Subclasses set `agents` (names, in axis order), `observation_space` and `action_space` (spaces over
    the agent axis) in `__init__`, and implement `reset` and `step` as pure functions of their inputs."""

    agents: tuple[str, ...]
    observation_space: spaces.Box
    action_space: spaces.Space

    @property
    def num_agents(self) -> int:
        return len(self.agents)

    @property
    def observation_mask(self) -> np.ndarray:
        """[num_agents, obs_dim] bool: True where an observation entry is real, False where it is padding."""
        return self.observation_space.mask

    @property
    def unwrapped(self) -> MultiAgentEnv:
        return self

    def agent_index(self, agent: str) -> int:
        try:
            return self.agents.index(agent)
        except ValueError:
            raise KeyError(f"no agent {agent!r}; this environment's agents are {list(self.agents)}") from None

    def agent_observation_space(self, agent: str) -> spaces.Box:
        """The unpadded observation space of one agent (the PettingZoo view)."""
        return spaces.unstack(self.observation_space, self.agent_index(agent))

    def agent_action_space(self, agent: str) -> spaces.Space:
        """The unpadded action space of one agent (the PettingZoo view)."""
        return spaces.unstack(self.action_space, self.agent_index(agent))

    def legal_actions(self, state) -> jax.Array:
        """[num_agents, num_actions] bool: the actions each agent may take in `state`. The default: every
        action of a `Discrete` space (within each agent's count, where counts differ)."""
        del state
        space = self.action_space
        if not isinstance(space, spaces.Discrete) or space.n.ndim != 1:
            raise TypeError(
                f"{type(self).__name__} has no legal-action set: its action space {space} is not Discrete "
                "over the agent axis; only discrete environments (or overrides of legal_actions) have one."
            )
        n = np.asarray(space.n)
        return jnp.asarray(np.arange(n.max())[None, :] < n[:, None])

    @abc.abstractmethod
    def reset(self, key: jax.Array) -> tuple[jax.Array, Any]:
        """(obs [num_agents, obs_dim], state) of a new episode drawn with `key`."""

    @abc.abstractmethod
    def step(self, key: jax.Array, state, actions: jax.Array) -> StepOut:
        """One transition for all agents at once: (obs, state, reward, terminated, truncated, info)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(agents={list(self.agents)})"


class Wrapper(MultiAgentEnv):
    """A wrapper changes reset/step and forwards everything else (spaces, agents, scenario attributes)."""

    def __init__(self, env: MultiAgentEnv):
        self.env = env

    def __getattr__(self, name):
        # Only reached for attributes the wrapper lacks; guard `env` itself against recursion in copies.
        if name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    @property
    def agents(self):
        return self.env.agents

    @property
    def observation_space(self):
        return self.env.observation_space

    @property
    def action_space(self):
        return self.env.action_space

    @property
    def unwrapped(self) -> MultiAgentEnv:
        return self.env.unwrapped

    def reset(self, key):
        return self.env.reset(key)

    def step(self, key, state, actions):
        return self.env.step(key, state, actions)

    def legal_actions(self, state):
        """Forwarded with the state unchanged: a wrapper whose state differs from its env's (a batch, extra
        statistics) must override this to pass its env's state."""
        return self.env.legal_actions(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env!r})"

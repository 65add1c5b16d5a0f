"""Wrappers with the same functional API: autoreset, episode statistics, a batch of environments over a
leading axis, and the dict-of-agents view.

Stack them as `EpisodeStats(VecEnv(env, num_envs))` (or `EpisodeStats(AutoReset(env))` for one env):
statistics outermost, so an autoreset does not wipe the returns it is about to report.

An episode ends when every agent is terminated or truncated. Time limits are `truncated`, never
`terminated`; both are passed through unchanged, so a learner can bootstrap from `info["final_obs"]` on
truncation and not on termination.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv, Wrapper


def episode_done(terminated: jax.Array, truncated: jax.Array) -> jax.Array:
    """[...] bool from per-agent flags [..., A]: the episode is over for every agent."""
    return jnp.all(terminated | truncated, axis=-1)


def select(done: jax.Array, if_done, otherwise):
    """Tree-wise where(done, if_done, otherwise), `done` broadcast over each leaf's trailing axes."""

    def pick(a, b):
        return jnp.where(jnp.reshape(done, done.shape + (1,) * (a.ndim - done.ndim)), a, b)

    return jax.tree.map(pick, if_done, otherwise)


def env_keys(key: jax.Array, num_envs: int, offset: int = 0) -> jax.Array:
    """[num_envs] keys, env i's being fold_in(key, offset + i): a function of the GLOBAL env index only,
    so env i draws the same numbers however the batch is split over devices."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
        key, jnp.arange(num_envs, dtype=jnp.uint32) + offset
    )


class AutoReset(Wrapper):
    """When an episode ends, the returned obs and state are those of a new episode (drawn with the second
    half of the step key); `info["final_obs"]` is the observation the step reached, and reward,
    terminated and truncated are the step's own."""

    def step(self, key, state, actions):
        k_step, k_reset = jax.random.split(key)
        obs, state, reward, terminated, truncated, info = self.env.step(k_step, state, actions)
        done = episode_done(terminated, truncated)
        next_obs, next_state = select(done, self.env.reset(k_reset), (obs, state))
        return next_obs, next_state, reward, terminated, truncated, {**info, "final_obs": obs}


class VecEnv(Wrapper):
    """num_envs copies of `env` on a leading axis, stepped by one vmapped program; every array gains a
    leading [num_envs] axis (keys excepted: one key per call, env i using fold_in(key, offset + i)).

    With autoreset=True each env behaves exactly as `AutoReset(env)` would under that key. With
    lazy_reset=True (default) the resets are computed only on steps where some env finished (a `lax.cond`
    around the vmapped reset): MPE episodes end in lockstep, so a batch pays for resets once per episode
    instead of every step. The results are the same either way."""

    def __init__(
        self,
        env: MultiAgentEnv,
        num_envs: int,
        autoreset: bool = True,
        offset: int = 0,
        lazy_reset: bool = True,
    ):
        if num_envs < 1:
            raise ValueError(f"num_envs={num_envs} must be >= 1")
        super().__init__(env)
        self.num_envs = num_envs
        self.autoreset = autoreset
        self.offset = offset
        self.lazy_reset = lazy_reset

    @property
    def observation_space(self):
        return spaces.batch(self.env.observation_space, self.num_envs)

    @property
    def action_space(self):
        return spaces.batch(self.env.action_space, self.num_envs)

    def agent_observation_space(self, agent):
        return spaces.batch(self.env.agent_observation_space(agent), self.num_envs)

    def agent_action_space(self, agent):
        return spaces.batch(self.env.agent_action_space(agent), self.num_envs)

    def keys(self, key):
        return env_keys(key, self.num_envs, self.offset)

    def reset(self, key):
        return jax.vmap(self.env.reset)(self.keys(key))

    def legal_actions(self, state):
        """[num_envs, num_agents, num_actions] bool."""
        return jax.vmap(self.env.legal_actions)(state)

    def step(self, key, state, actions):
        if not self.autoreset:
            return jax.vmap(self.env.step)(self.keys(key), state, actions)

        def autoreset_keys():  # [B, 2]: AutoReset's (step key, reset key) for each env
            return jax.vmap(jax.random.split)(self.keys(key))

        step_out = jax.vmap(self.env.step)(autoreset_keys()[:, 0], state, actions)
        obs, state, reward, terminated, truncated, info = step_out
        done = episode_done(terminated, truncated)

        # The reset keys are derived inside the branch: computed outside, they would be an operand of the
        # cond and hashed every step (for envs whose step ignores its key, nothing else needs them).
        def with_resets(obs_state):
            return select(done, jax.vmap(self.env.reset)(autoreset_keys()[:, 1]), obs_state)

        if self.lazy_reset:
            next_obs, next_state = jax.lax.cond(jnp.any(done), with_resets, lambda x: x, (obs, state))
        else:
            next_obs, next_state = with_resets((obs, state))
        return next_obs, next_state, reward, terminated, truncated, {**info, "final_obs": obs}


@struct.dataclass
class EpisodeStatsState:
    env_state: object
    episode_return: jax.Array  # [..., A] running return of the current episode
    episode_length: jax.Array  # [...] transitions so far in the current episode
    returned_episode_return: jax.Array  # [..., A] return of the last finished episode
    returned_episode_length: jax.Array  # [...]


class EpisodeStats(Wrapper):
    """Per-agent return and length of each episode. info gains `returned_episode_return` [..., A],
    `returned_episode_length` and `returned_episode` (True on the step that ended an episode); the
    returned values hold the last finished episode's until the next one ends. Works over any leading
    batch axes (wrap a VecEnv)."""

    def reset(self, key):
        obs, state = self.env.reset(key)
        batch_agents = obs.shape[:-1]
        zeros = jnp.zeros(batch_agents, jnp.float32)
        length = jnp.zeros(batch_agents[:-1], jnp.int32)
        return obs, EpisodeStatsState(state, zeros, length, zeros, length)

    def legal_actions(self, state: EpisodeStatsState):
        return self.env.legal_actions(state.env_state)

    def step(self, key, state: EpisodeStatsState, actions):
        obs, env_state, reward, terminated, truncated, info = self.env.step(key, state.env_state, actions)
        done = episode_done(terminated, truncated)
        ret = state.episode_return + reward
        length = state.episode_length + 1
        state = EpisodeStatsState(
            env_state=env_state,
            episode_return=jnp.where(done[..., None], 0.0, ret),
            episode_length=jnp.where(done, 0, length),
            returned_episode_return=jnp.where(done[..., None], ret, state.returned_episode_return),
            returned_episode_length=jnp.where(done, length, state.returned_episode_length),
        )
        info = {
            **info,
            "returned_episode_return": state.returned_episode_return,
            "returned_episode_length": state.returned_episode_length,
            "returned_episode": done,
        }
        return obs, state, reward, terminated, truncated, info


class AgentDict(Wrapper):
    """The PettingZoo / JaxMARL view at the edge: observations, rewards and flags as dicts keyed by agent
    name (each observation unpadded), actions taken as such a dict. Leading batch axes pass through."""

    def _split(self, x: jax.Array, trailing: int) -> dict[str, jax.Array]:
        axis = x.ndim - 1 - trailing
        return {name: jnp.take(x, i, axis=axis) for i, name in enumerate(self.agents)}

    def _obs(self, obs):
        width = np.asarray(self.unwrapped.observation_space.mask).sum(axis=-1)
        return {name: obs[..., i, : int(width[i])] for i, name in enumerate(self.agents)}

    def _actions(self, actions: dict) -> jax.Array:
        missing = set(self.agents) - set(actions)
        if missing:
            raise KeyError(f"actions are missing agents {sorted(missing)}; expected {list(self.agents)}")
        space = self.unwrapped.action_space
        if isinstance(space, spaces.Discrete):
            return jnp.stack([jnp.asarray(actions[name]) for name in self.agents], axis=-1)
        width = space.shape[-1]
        padded = [
            jnp.pad(
                jnp.asarray(actions[n], jnp.float32),
                [(0, 0)] * (jnp.ndim(actions[n]) - 1) + [(0, width - jnp.shape(actions[n])[-1])],
            )
            for n in self.agents
        ]
        return jnp.stack(padded, axis=-2)

    def reset(self, key):
        obs, state = self.env.reset(key)
        return self._obs(obs), state

    def step(self, key, state, actions: dict):
        obs, state, reward, terminated, truncated, info = self.env.step(key, state, self._actions(actions))
        if "final_obs" in info:
            info = {**info, "final_obs": self._obs(info["final_obs"])}
        return (
            self._obs(obs),
            state,
            self._split(reward, 0),
            self._split(terminated, 0),
            self._split(truncated, 0),
            info,
        )

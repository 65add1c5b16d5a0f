"""The MPE environment: reset, step and spaces shared by every scenario.

A scenario subclass builds a `World` and implements `observation_blocks` and `agent_rewards` (and, where
mpe2 has them, `global_reward` and `is_terminal`); reset draws and the step order live here once.

Step order, as mpe2's parallel API: actions -> forces and utterances, physics, utterances replace the old
ones, rewards (mixed as global*(1-local_ratio) + local*local_ratio where the scenario has a local_ratio),
step counter +1, then truncated = t >= max_cycles, else terminated = is_terminal. So an episode has
exactly max_cycles transitions.
"""

from __future__ import annotations

import abc

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.mpe.world import DIM_P, MPEState, World, decode_actions, integrate


class MPEEnv(MultiAgentEnv):
    # Random choices drawn at reset besides positions: goal[g] ~ uniform{0, ..., goal_sizes[g] - 1}.
    goal_sizes: tuple[int, ...] = ()

    def __init__(
        self,
        world: World,
        *,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        local_ratio: float | None = None,
    ):
        if int(max_cycles) != max_cycles or max_cycles < 1:
            raise ValueError(
                f"max_cycles={max_cycles!r} must be a positive integer (transitions per episode)."
            )
        if local_ratio is not None and not 0.0 <= local_ratio <= 1.0:
            raise ValueError(f"local_ratio={local_ratio!r} is a proportion; it must be between 0 and 1.")
        self.world = world
        self.agents = world.agent_names
        self.max_cycles = int(max_cycles)
        self.continuous_actions = bool(continuous_actions)
        self.local_ratio = local_ratio
        if continuous_actions:
            self.action_space = spaces.stack(
                [spaces.Box(0.0, 1.0, (int(d),)) for d in world.continuous_action_sizes()]
            )
        else:
            self.action_space = spaces.Discrete(world.discrete_action_sizes())
        blocks = jax.eval_shape(self.observation_blocks, self._abstract_state())
        dims = [b.shape[1] for b in blocks for _ in range(b.shape[0])]
        if len(dims) != world.num_agents:
            raise AssertionError(
                f"{type(self).__name__}.observation_blocks gave {len(dims)} rows for "
                f"{world.num_agents} agents"
            )
        self.obs_dims = tuple(dims)
        self.observation_space = spaces.stack([spaces.Box(-np.inf, np.inf, (d,)) for d in dims])

    # --- scenario hooks -------------------------------------------------------------------------------

    @abc.abstractmethod
    def observation_blocks(self, state: MPEState) -> list[jax.Array]:
        """Observations as [n_i, d_i] blocks of consecutive agents sharing a layout, in agent order."""

    @abc.abstractmethod
    def agent_rewards(self, state: MPEState) -> jax.Array:
        """[A] the scenario's `reward(agent)` for every agent."""

    def global_reward(self, state: MPEState) -> jax.Array:
        return jnp.float32(0.0)

    def is_terminal(self, state: MPEState) -> jax.Array:
        return jnp.asarray(False)

    # --- the functional API ----------------------------------------------------------------------------

    def observations(self, state: MPEState) -> jax.Array:
        width = self.observation_space.shape[1]
        blocks = self.observation_blocks(state)
        return jnp.concatenate([jnp.pad(b, ((0, 0), (0, width - b.shape[1]))) for b in blocks], axis=0)

    def rewards(self, state: MPEState) -> jax.Array:
        local = self.agent_rewards(state).astype(jnp.float32)
        if self.local_ratio is None:
            return local
        return self.global_reward(state) * (1 - self.local_ratio) + local * self.local_ratio

    def reset(self, key: jax.Array):
        w = self.world
        A, L, G = w.num_agents, w.num_landmarks, len(self.goal_sizes)
        # One draw for everything: each random-number call is a separately unrolled hash in the program, so
        # fewer calls compile and run faster. U(-r, r) = r * (2u - 1); a choice among n = floor(n * u).
        u = jax.random.uniform(key, (2 * A + 2 * L + G,), jnp.float32)
        sizes = np.asarray(self.goal_sizes, np.int32)
        goal = jnp.minimum(jnp.floor(u[2 * A + 2 * L :] * sizes).astype(jnp.int32), sizes - 1)
        state = MPEState(
            agent_pos=(2 * u[: 2 * A] - 1).reshape(A, DIM_P),
            agent_vel=jnp.zeros((A, DIM_P), jnp.float32),
            landmark_pos=(2 * u[2 * A : 2 * A + 2 * L] - 1).reshape(L, DIM_P)
            * w.landmark_init_range[:, None],
            comm=jnp.zeros((A, w.dim_c), jnp.float32),
            goal=goal,
            t=jnp.int32(0),
        )
        return self.observations(state), state

    def step(self, key: jax.Array, state: MPEState, actions: jax.Array):
        del key  # mpe2's scenarios have no motor or communication noise: transitions are deterministic
        force, comm = decode_actions(self.world, actions, self.continuous_actions)
        pos, vel = integrate(self.world, state, force)
        state = state.replace(agent_pos=pos, agent_vel=vel, comm=comm, t=state.t + 1)
        reward = self.rewards(state)
        truncated = state.t >= self.max_cycles
        terminated = ~truncated & self.is_terminal(state)
        A = self.world.num_agents
        return (
            self.observations(state),
            state,
            reward,
            jnp.broadcast_to(terminated, (A,)),
            jnp.broadcast_to(truncated, (A,)),
            {},
        )

    def _abstract_state(self) -> MPEState:
        w = self.world
        f32 = jnp.float32
        return MPEState(
            agent_pos=jax.ShapeDtypeStruct((w.num_agents, DIM_P), f32),
            agent_vel=jax.ShapeDtypeStruct((w.num_agents, DIM_P), f32),
            landmark_pos=jax.ShapeDtypeStruct((w.num_landmarks, DIM_P), f32),
            comm=jax.ShapeDtypeStruct((w.num_agents, w.dim_c), f32),
            goal=jax.ShapeDtypeStruct((len(self.goal_sizes),), jnp.int32),
            t=jax.ShapeDtypeStruct((), jnp.int32),
        )


def check_neighbors(**counts):
    for name, n in counts.items():
        if n is not None and (int(n) != n or n < 1):
            raise ValueError(f"{name}={n!r} must be a positive integer or None (full observability).")


def check_stage(curriculum_stage: int, num_stages: int):
    if int(curriculum_stage) != curriculum_stage or not 0 <= curriculum_stage < num_stages:
        raise ValueError(
            f"curriculum_stage={curriculum_stage!r} must be an integer in [0, {num_stages - 1}]; "
            "a new stage is a new environment (mpe2's set_curriculum_stage, functionally)."
        )

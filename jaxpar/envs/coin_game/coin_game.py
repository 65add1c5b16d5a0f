"""The coin game of Lerer & Peysakhovich 2017 (used by Foerster et al.'s LOLA): two agents, red (0) and
blue (1), on a grid x grid torus with one coin that has one of their colours.

Both move at once (0 right, 1 left, 2 down, 3 up). Every agent that lands on the coin picks it up: +1 for
the picker, and -2 for the coin's owner if the picker is the other agent (both can pick it up on the same
step). A picked coin respawns with a uniformly random colour on a uniformly random cell that no agent
occupies. Episodes are truncated after `max_steps`.

Observation [2, 4 * grid * grid], egocentric so one policy can play either side: one-hot grids of (me,
the other agent, coins of my colour, coins of the other's colour). info: `own_coin` and `other_coin`
[2], the coins of each kind each agent picked this step.

Randomness goes through `reset_draws` / `step_draws` (uniforms mapped to cells by `free_cell`), so a
reference implementation fed the same uniforms must give the same trajectory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.registry import register

MOVES = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]], np.int32)  # (row, col) steps: right, left, down, up


@struct.dataclass
class CoinGameState:
    pos: jax.Array  # [2, 2] int32 (row, col) of red, blue
    coin_pos: jax.Array  # [2] int32
    coin_owner: jax.Array  # int32: 0 red coin, 1 blue coin
    t: jax.Array  # int32


def free_cell(u: jax.Array, occupied: jax.Array) -> jax.Array:
    """The floor(u * #free)-th free cell (row-major) given an [n_cells] occupied mask, u in [0, 1)."""
    free = ~occupied
    k = jnp.minimum(jnp.floor(u * jnp.sum(free)).astype(jnp.int32), jnp.sum(free) - 1)
    return jnp.argmax(free & (jnp.cumsum(free) == k + 1)).astype(jnp.int32)


def reset_draws(key: jax.Array) -> jax.Array:
    """[4] uniforms: red's cell, blue's free cell, the coin's free cell, the coin's colour."""
    return jax.random.uniform(key, (4,))


def step_draws(key: jax.Array) -> jax.Array:
    """[2] uniforms: a respawned coin's free cell and colour."""
    return jax.random.uniform(key, (2,))


@register("coin_game")
class CoinGame(MultiAgentEnv):
    def __init__(self, grid_size: int = 3, max_steps: int = 50):
        if grid_size < 2:
            raise ValueError(f"grid_size={grid_size} must be >= 2 (three distinct cells at reset)")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        self.grid_size, self.max_steps = int(grid_size), int(max_steps)
        self.agents = ("red", "blue")
        self.observation_space = spaces.Box(0.0, 1.0, (2, 4 * grid_size * grid_size))
        self.action_space = spaces.Discrete(4, shape=(2,))

    def _cells(self, pos: jax.Array) -> jax.Array:
        return pos[..., 0] * self.grid_size + pos[..., 1]

    def _unflatten(self, cell: jax.Array) -> jax.Array:
        return jnp.stack([cell // self.grid_size, cell % self.grid_size], axis=-1)

    def _occupied(self, pos: jax.Array) -> jax.Array:
        return jnp.any(jnp.arange(self.grid_size**2)[None, :] == self._cells(pos)[:, None], axis=0)

    def _obs(self, state: CoinGameState) -> jax.Array:
        n = self.grid_size**2
        agent = jax.nn.one_hot(self._cells(state.pos), n)  # [2, n]
        coin = jax.nn.one_hot(self._cells(state.coin_pos), n)
        mine = (state.coin_owner == jnp.arange(2))[:, None] * coin[None]  # [2, n]: coin is my colour
        return jnp.concatenate([agent, agent[::-1], mine, coin[None] - mine], axis=-1).astype(jnp.float32)

    def reset(self, key):
        u = reset_draws(key)
        n = self.grid_size**2
        red = jnp.minimum(jnp.floor(u[0] * n).astype(jnp.int32), n - 1)
        cells = jnp.arange(n)
        blue = free_cell(u[1], cells == red)
        coin = free_cell(u[2], (cells == red) | (cells == blue))
        state = CoinGameState(
            pos=self._unflatten(jnp.stack([red, blue])),
            coin_pos=self._unflatten(coin),
            coin_owner=(u[3] >= 0.5).astype(jnp.int32),
            t=jnp.int32(0),
        )
        return self._obs(state), state

    def step(self, key, state: CoinGameState, actions):
        u = step_draws(key)
        pos = (state.pos + jnp.asarray(MOVES)[actions]) % self.grid_size
        on_coin = jnp.all(pos == state.coin_pos[None], axis=-1)  # [2]
        own = on_coin & (state.coin_owner == jnp.arange(2))
        other = on_coin & ~own
        # The owner loses 2 when the OTHER agent picks its coin: other[::-1] is "my coin taken by you".
        reward = on_coin.astype(jnp.float32) - 2.0 * other[::-1]
        picked = jnp.any(on_coin)
        new_coin = self._unflatten(free_cell(u[0], self._occupied(pos)))
        state = CoinGameState(
            pos=pos,
            coin_pos=jnp.where(picked, new_coin, state.coin_pos),
            coin_owner=jnp.where(picked, (u[1] >= 0.5).astype(jnp.int32), state.coin_owner),
            t=state.t + 1,
        )
        truncated = jnp.broadcast_to(state.t >= self.max_steps, (2,))
        info = {"own_coin": own.astype(jnp.int32), "other_coin": other.astype(jnp.int32)}
        return self._obs(state), state, reward, jnp.zeros((2,), bool), truncated, info

"""Overcooked (Carroll et al. 2019) with the dynamics, rewards and observations of overcooked-ai 1.1.0.

Two cooks share a kitchen. Per step, in the original's order: INTERACTs resolve (player 0 first, then
player 1 on the state player 0 left), then movement (a move into a non-floor cell only turns the player;
two players moving onto one cell or through each other both stay put, turned), then every cooking soup
ticks. Interactions, by the cell faced:

- counter: put the held object down, or pick up what lies there;
- onion / tomato / dish dispenser, empty-handed: take one;
- pot: with an ingredient, add it (if the pot is empty or idle with under 3 ingredients); empty-handed,
  start cooking an idle pot with at least one ingredient; with a dish, take the soup once it is ready;
- serving window, holding a soup: deliver it for the recipe's value (0 outside the layout's orders, twice
  the value for a bonus order).

Actions (the original's `Action.ALL_ACTIONS` order): 0 north (y - 1), 1 south, 2 east (x + 1), 3 west,
4 stay, 5 interact. `reward` is the team's sparse reward (both deliveries summed, the same for both
agents) plus `shaped_reward_coef` times each agent's own shaped reward (default 0, the sparse reward
alone). info: `sparse_reward_by_agent`, `shaped_reward_by_agent` (placement in pot 3, useful dish pickup
3, soup pickup 5 by default; the original's `rew_shaping_params`) and `soups_delivered`, all [2].

Observation [2, width * height * 26]: the original's `lossless_state_encoding` for each player (its
[width, height, 26] grid flattened in that order: `obs.reshape(2, *env.grid_obs_shape)` gives it back),
with `horizon = max_steps` for the urgency layer. Episodes start in the layout's standard start state
(players on their cells facing north, nothing anywhere) and are truncated after `max_steps` steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxpar.envs import spaces
from jaxpar.envs.core import MultiAgentEnv
from jaxpar.envs.overcooked.layouts import LAYOUTS, MAX_INGREDIENTS, Layout
from jaxpar.envs.registry import register

# Held / placed object kinds.
NOTHING, ONION, TOMATO, DISH, SOUP = 0, 1, 2, 3, 4
# Terrain codes.
FLOOR, COUNTER, POT, ONION_DISPENSER, TOMATO_DISPENSER, DISH_DISPENSER, SERVE = range(7)
TERRAIN_CODES = {" ": FLOOR, "X": COUNTER, "P": POT, "O": ONION_DISPENSER, "T": TOMATO_DISPENSER}
TERRAIN_CODES |= {"D": DISH_DISPENSER, "S": SERVE}
# (dx, dy) of north, south, east, west: the original's Direction.ALL_DIRECTIONS.
DIRECTIONS = np.array([[0, -1], [0, 1], [1, 0], [-1, 0]], np.int32)
STAY, INTERACT = 4, 5
NUM_CHANNELS = 26
DEFAULT_SHAPING = {"PLACEMENT_IN_POT_REW": 3, "DISH_PICKUP_REWARD": 3, "SOUP_PICKUP_REWARD": 5}
# The original's other shaping keys exist but nothing in 1.1.0 reads them.
UNUSED_SHAPING = ("DISH_DISP_DISTANCE_REW", "POT_DISTANCE_REW", "SOUP_DISTANCE_REW")


@struct.dataclass
class OvercookedState:
    pos: jax.Array  # [2, 2] int32 (x, y) of each player
    ori: jax.Array  # [2] int32 direction index (0 N, 1 S, 2 E, 3 W)
    held: jax.Array  # [2] int32 object kind held (NOTHING, ONION, TOMATO, DISH, SOUP)
    held_soup: jax.Array  # [2, 2] int32 (onions, tomatoes) of a held soup, else 0
    obj: jax.Array  # [width, height] int32 object kind lying on each counter / in each pot
    soup: jax.Array  # [width, height, 2] int32 (onions, tomatoes) of the soup there, else 0
    tick: jax.Array  # [width, height] int32 cooking tick of the soup there, -1 when idle or none
    t: jax.Array  # int32 steps taken


@register("overcooked")
class Overcooked(MultiAgentEnv):
    """`make("overcooked", layout="cramped_room")`; layouts: see `jaxpar.envs.overcooked.LAYOUTS`."""

    def __init__(
        self,
        layout: str = "cramped_room",
        max_steps: int = 400,
        shaped_reward_coef: float = 0.0,
        rew_shaping_params: dict | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is not one of the Overcooked layouts {sorted(LAYOUTS)}")
        if max_steps < 1:
            raise ValueError(f"max_steps={max_steps} must be >= 1")
        shaping = dict(DEFAULT_SHAPING)
        for k, v in (rew_shaping_params or {}).items():
            if k not in DEFAULT_SHAPING and k not in UNUSED_SHAPING:
                raise ValueError(
                    f"rew_shaping_params has unknown key {k!r}; known keys: {sorted(DEFAULT_SHAPING)}"
                )
            if k in DEFAULT_SHAPING:
                shaping[k] = float(v)
        self.layout: Layout = LAYOUTS[layout]
        self.max_steps = int(max_steps)
        self.shaped_reward_coef = float(shaped_reward_coef)
        self.shaping = shaping
        self.agents = ("agent_0", "agent_1")

        terrain = self.layout.terrain()
        self.width, self.height = terrain.shape
        self.terrain = np.vectorize(TERRAIN_CODES.__getitem__)(terrain).astype(np.int32)  # [W, H]
        self.start_pos = self.layout.start_positions()
        value, time = self.layout.tables()
        self.recipe_value, self.cook_time = value, time  # [4, 4] by (onions, tomatoes)
        self.grid_obs_shape = (self.width, self.height, NUM_CHANNELS)
        # Per-channel upper bounds: ingredient counts <= 3, remaining cook time <= the longest recipe.
        high = np.ones(NUM_CHANNELS)
        high[16:20] = MAX_INGREDIENTS
        high[20] = time.max()
        high = np.broadcast_to(high, self.grid_obs_shape).reshape(-1)
        self.observation_space = spaces.Box(0.0, np.broadcast_to(high, (2, high.size)))
        self.action_space = spaces.Discrete(6, shape=(2,))

    # ------------------------------------------------------------------------------------------------
    def reset(self, key):
        del key  # the standard start state is deterministic
        w, h = self.width, self.height
        state = OvercookedState(
            pos=jnp.asarray(self.start_pos),
            ori=jnp.zeros((2,), jnp.int32),
            held=jnp.zeros((2,), jnp.int32),
            held_soup=jnp.zeros((2, 2), jnp.int32),
            obj=jnp.zeros((w, h), jnp.int32),
            soup=jnp.zeros((w, h, 2), jnp.int32),
            tick=jnp.full((w, h), -1, jnp.int32),
            t=jnp.int32(0),
        )
        return self.observe(state), state

    def step(self, key, state: OvercookedState, actions):
        del key  # the dynamics are deterministic
        actions = jnp.asarray(actions, jnp.int32)
        # The original classifies pots once, before any interaction, for the dish-pickup shaping.
        in_pot = jnp.asarray(self.terrain == POT)
        soup_here = state.obj == SOUP
        started = soup_here & (state.tick >= 0)
        n_here = state.soup.sum(-1)
        partial = soup_here & (state.tick < 0) & (n_here >= 1) & (n_here < MAX_INGREDIENTS)
        busy_pots = jnp.sum(in_pot & (started | partial))  # ready, cooking, or partly filled and idle

        # Player 0's interaction, then player 1's on the state it left (a loop: one body to compile).
        def interact(p, carry):
            state, sparse, shaped, delivered = carry
            state, r_sparse, r_shaped, d = self._interact(state, p, actions[p] == INTERACT, busy_pots)
            return state, sparse.at[p].set(r_sparse), shaped.at[p].set(r_shaped), delivered.at[p].set(d)

        zeros = jnp.zeros((2,), jnp.float32)
        carry = (state, zeros, zeros, jnp.zeros((2,), jnp.int32))
        state, sparse, shaped, delivered = jax.lax.fori_loop(0, 2, interact, carry)

        state = self._move(state, actions)

        time_here = self._cook_time(state.soup)
        cooking = (state.obj == SOUP) & (state.tick >= 0) & (state.tick < time_here)
        state = state.replace(tick=state.tick + cooking.astype(jnp.int32), t=state.t + 1)

        reward = jnp.sum(sparse) + self.shaped_reward_coef * shaped
        truncated = jnp.broadcast_to(state.t >= self.max_steps, (2,))
        info = {
            "sparse_reward_by_agent": sparse,
            "shaped_reward_by_agent": shaped,
            "soups_delivered": delivered,
        }
        return self.observe(state), state, reward, jnp.zeros((2,), bool), truncated, info

    def _cook_time(self, ingredients):
        """Cook time of soups with [..., 2] (onions, tomatoes): arithmetic, not a table lookup, because XLA
        on CPU unrolls a gather over the grid into one slice per cell (slow to compile)."""
        layout = self.layout
        if layout.onion_time and layout.tomato_time:
            return layout.onion_time * ingredients[..., 0] + layout.tomato_time * ingredients[..., 1]
        return jnp.full(ingredients.shape[:-1], layout.recipe_time(0, 0), jnp.int32)

    # ------------------------------------------------------------------------------------------------
    def _interact(self, s: OvercookedState, p, acting, busy_pots):
        """Player p's INTERACT (p traced; a no-op unless `acting`): (state, sparse, shaped, delivered)."""
        terrain = jnp.asarray(self.terrain)
        x, y = s.pos[p] + jnp.asarray(DIRECTIONS)[s.ori[p]]
        ter = terrain[x, y]
        held, held_soup = s.held[p], s.held_soup[p]
        has = held != NOTHING
        kind, ing, tick = s.obj[x, y], s.soup[x, y], s.tick[x, y]
        n_ing = ing.sum()
        is_soup = kind == SOUP
        idle = is_soup & (tick < 0)
        ready = is_soup & (tick >= 0) & (tick >= self._cook_time(ing))

        drop = acting & (ter == COUNTER) & has & (kind == NOTHING)
        pick = acting & (ter == COUNTER) & ~has & (kind != NOTHING)
        take_onion = acting & (ter == ONION_DISPENSER) & ~has
        take_tomato = acting & (ter == TOMATO_DISPENSER) & ~has
        take_dish = acting & (ter == DISH_DISPENSER) & ~has
        at_pot = acting & (ter == POT)
        start_cooking = at_pot & ~has & idle & (n_ing > 0)
        take_soup = at_pot & (held == DISH) & ready
        add = at_pot & ((held == ONION) | (held == TOMATO)) & ((kind == NOTHING) | (idle & (n_ing < 3)))
        deliver = acting & (ter == SERVE) & (held == SOUP)

        # Useful dish pickup: no dish on a counter and fewer dishes in hands than busy pots.
        dishes_in_hands = jnp.sum(s.held == DISH)
        useful_dish = (jnp.sum(s.obj == DISH) == 0) & (dishes_in_hands < busy_pots)

        new_held = jnp.select(
            [drop | add | deliver, pick, take_onion, take_tomato, take_dish, take_soup],
            [NOTHING, kind, ONION, TOMATO, DISH, SOUP],
            held,
        )
        new_held_soup = jnp.where(pick | take_soup, ing, jnp.where(drop | add | deliver, 0, held_soup))
        added = jnp.stack([held == ONION, held == TOMATO]).astype(jnp.int32)
        cleared = pick | take_soup
        cell_kind = jnp.select([drop, cleared, add], [held, NOTHING, SOUP], kind)
        cell_ing = jnp.where(drop, held_soup, jnp.where(cleared, 0, jnp.where(add, ing + added, ing)))
        dropped_tick = jnp.where(held == SOUP, self._cook_time(held_soup), -1)
        cell_tick = jnp.select([drop, cleared, start_cooking], [dropped_tick, -1, 0], tick)

        s = s.replace(
            held=s.held.at[p].set(new_held),
            held_soup=s.held_soup.at[p].set(new_held_soup),
            obj=s.obj.at[x, y].set(cell_kind),
            soup=s.soup.at[x, y].set(cell_ing),
            tick=s.tick.at[x, y].set(cell_tick),
        )
        value = jnp.asarray(self.recipe_value.reshape(-1))[
            held_soup[0] * (MAX_INGREDIENTS + 1) + held_soup[1]
        ]
        sparse = jnp.where(deliver, value, 0)
        sh = self.shaping
        shaped = (
            add * sh["PLACEMENT_IN_POT_REW"]
            + (take_dish & useful_dish) * sh["DISH_PICKUP_REWARD"]
            + take_soup * sh["SOUP_PICKUP_REWARD"]
        )
        return s, sparse, shaped, deliver

    def _move(self, s: OvercookedState, actions) -> OvercookedState:
        moving = actions < STAY
        step = jnp.asarray(DIRECTIONS)[jnp.minimum(actions, 3)]
        target = s.pos + step
        free = jnp.asarray(self.terrain == FLOOR)[target[:, 0], target[:, 1]]
        pos = jnp.where((moving & free)[:, None], target, s.pos)
        same_cell = jnp.all(pos[0] == pos[1])
        swapped = jnp.all(pos[0] == s.pos[1]) & jnp.all(pos[1] == s.pos[0])
        pos = jnp.where(same_cell | swapped, s.pos, pos)
        return s.replace(pos=pos, ori=jnp.where(moving, actions, s.ori))

    # ------------------------------------------------------------------------------------------------
    def observe(self, s: OvercookedState) -> jax.Array:
        """[2, width * height * 26] float32: each player's lossless state encoding, flattened."""
        w, h = self.width, self.height
        f32 = jnp.float32
        at_player = jax.nn.one_hot(s.pos[:, 0] * h + s.pos[:, 1], w * h).reshape(2, w, h)
        orient = at_player[..., None] * jax.nn.one_hot(s.ori, 4)[:, None, None, :]  # [2, W, H, 4]

        def on_players(value_P):  # [W, H]: each player's value at its cell
            # Two products added, not a sum over the player axis: XLA:CPU reduces that small non-minor axis
            # several times slower under vmap (the encoding ran at a tenth of the step's speed).
            value_P = value_P.astype(f32)
            return at_player[0] * value_P[0] + at_player[1] * value_P[1]

        in_pot = jnp.asarray(self.terrain == POT)
        soup_here = s.obj == SOUP
        onions, tomatoes = s.soup[..., 0].astype(f32), s.soup[..., 1].astype(f32)
        time_here = self._cook_time(s.soup)
        pot_idle = (soup_here & in_pot & (s.tick < 0)).astype(f32)
        pot_started = soup_here & in_pot & (s.tick >= 0)
        elsewhere = soup_here & ~in_pot  # soups on counters and in hands count as done
        done = (pot_started | elsewhere).astype(f32)
        holds_soup = s.held == SOUP
        variable = jnp.stack(
            [
                pot_idle * onions,
                pot_idle * tomatoes,
                done * onions + on_players(holds_soup * s.held_soup[:, 0]),
                done * tomatoes + on_players(holds_soup * s.held_soup[:, 1]),
                jnp.where(pot_started, time_here - s.tick, 0).astype(f32),
                ((pot_started & (s.tick >= time_here)) | elsewhere).astype(f32) + on_players(holds_soup),
                (s.obj == DISH).astype(f32) + on_players(s.held == DISH),
                (s.obj == ONION).astype(f32) + on_players(s.held == ONION),
                (s.obj == TOMATO).astype(f32) + on_players(s.held == TOMATO),
                jnp.broadcast_to((self.max_steps - s.t < 40).astype(f32), (w, h)),
            ],
            axis=-1,
        )  # [W, H, 10]
        static = np.stack(
            [
                self.terrain == c
                for c in (POT, COUNTER, ONION_DISPENSER, TOMATO_DISPENSER, DISH_DISPENSER, SERVE)
            ],
            axis=-1,
        ).astype(np.float32)  # [W, H, 6]
        shared = jnp.concatenate([jnp.asarray(static), variable], axis=-1)  # [W, H, 16]
        me_first = jnp.concatenate([at_player[..., None], orient], axis=-1)  # [2, W, H, 5]
        mine, theirs = me_first, me_first[::-1]
        obs = jnp.concatenate(
            [
                mine[..., :1],
                theirs[..., :1],
                mine[..., 1:],
                theirs[..., 1:],
                jnp.broadcast_to(shared, (2, w, h, 16)),
            ],
            axis=-1,
        )  # [2, W, H, 26]
        return obs.reshape(2, -1)

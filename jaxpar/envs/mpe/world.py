"""MPE physics with agents on an array axis, and the geometry helpers the scenarios share.

Semantics are mpe2 1.1.1's (`mpe2/_mpe_utils/core.py`, `simple_env.py`): actions become forces
(x accel, 5 by default), soft contact forces act between colliding entities, and one Euler step updates
position with the OLD velocity, then damps the velocity, adds force/mass*dt and clips the speed. In mpe2
every landmark is immovable, so landmarks have positions only and agents alone integrate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DIM_P = 2
DT = 0.1
DAMPING = 0.25
CONTACT_FORCE = 1e2
CONTACT_MARGIN = 1e-3
MASS = 1.0  # every mpe2 entity has initial_mass 1
DEFAULT_ACCEL = 5.0  # mpe2's "sensitivity" for agents whose accel is None
MOVE_DIM = 2 * DIM_P + 1  # no-op, -x, +x, -y, +y


@dataclasses.dataclass(frozen=True)
class AgentSpec:
    name: str
    size: float = 0.05
    movable: bool = True
    silent: bool = False
    collide: bool = True
    accel: float | None = None
    max_speed: float | None = None


@dataclasses.dataclass(frozen=True)
class LandmarkSpec:
    name: str
    size: float = 0.05
    collide: bool = True
    init_range: float = 1.0  # initial position ~ U(-init_range, init_range) per coordinate


class World:
    """Static description of a scenario's entities as numpy arrays over the agent / landmark axes.
    Everything here is a compile-time constant of the jitted step."""

    def __init__(self, agents: Sequence[AgentSpec], landmarks: Sequence[LandmarkSpec], dim_c: int):
        if not agents:
            raise ValueError("an MPE world needs at least one agent")
        self.dim_c = dim_c
        self.num_agents = len(agents)
        self.num_landmarks = len(landmarks)
        self.agent_names = tuple(a.name for a in agents)
        self.agent_size = np.array([a.size for a in agents], np.float32)
        self.landmark_size = np.array([lm.size for lm in landmarks], np.float32)
        self.movable = np.array([a.movable for a in agents])
        self.silent = np.array([a.silent for a in agents])
        self.accel = np.array([DEFAULT_ACCEL if a.accel is None else a.accel for a in agents], np.float32)
        self.max_speed = np.array(
            [np.inf if a.max_speed is None else a.max_speed for a in agents], np.float32
        )
        self.landmark_init_range = np.array([lm.init_range for lm in landmarks], np.float32)
        # Contacts: rows are the movable colliding agents (only they feel a force that matters), columns
        # every colliding entity, agents first.
        self.contact_rows = np.flatnonzero([a.collide and a.movable for a in agents])
        self.contact_agent_cols = np.flatnonzero([a.collide for a in agents])
        self.contact_landmark_cols = np.flatnonzero([lm.collide for lm in landmarks])
        col_sizes = np.concatenate(
            [self.agent_size[self.contact_agent_cols], self.landmark_size[self.contact_landmark_cols]]
        )
        self.contact_dist_min = self.agent_size[self.contact_rows][:, None] + col_sizes[None, :]
        col_ids = np.concatenate([self.contact_agent_cols, -1 - self.contact_landmark_cols])
        self.contact_pairs = self.contact_rows[:, None] != col_ids[None, :]
        self.has_contacts = bool(self.contact_pairs.any())

    def discrete_action_sizes(self) -> np.ndarray:
        """mpe2: movement (5) x message (dim_c) combined into one integer, movement = a % 5."""
        move = np.where(self.movable, MOVE_DIM, 1)
        return move * np.where(self.silent, 1, self.dim_c)

    def continuous_action_sizes(self) -> np.ndarray:
        """mpe2: [no-op, -x, +x, -y, +y] (movable) followed by the message (not silent)."""
        return np.where(self.movable, MOVE_DIM, 0) + np.where(self.silent, 0, self.dim_c)


@struct.dataclass
class MPEState:
    agent_pos: jax.Array  # [A, 2]
    agent_vel: jax.Array  # [A, 2]
    landmark_pos: jax.Array  # [L, 2]
    comm: jax.Array  # [A, dim_c]: each agent's current utterance (zeros for silent agents)
    goal: jax.Array  # [G] int32: the scenario's random choices (goal landmark, key, ...)
    t: jax.Array  # int32 scalar: transitions taken this episode


def take(x: jax.Array, idx: np.ndarray, axis: int = 0) -> jax.Array:
    """x[idx] along `axis` for a static index; a plain slice when idx is a contiguous range (XLA fuses
    slices into their consumers, gathers it often does not)."""
    idx = np.asarray(idx)
    if idx.size == 0:
        return jax.lax.slice_in_dim(x, 0, 0, axis=axis)
    if np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return jax.lax.slice_in_dim(x, int(idx[0]), int(idx[0]) + idx.size, axis=axis)
    return jnp.take(x, idx, axis=axis)


def decode_actions(world: World, actions: jax.Array, continuous: bool) -> tuple[jax.Array, jax.Array]:
    """Actions -> (force [A, 2] already x accel, utterance [A, dim_c]), as mpe2's `_set_action`.

    Discrete: one integer per agent, movement = a % 5 and word = a // 5 for movable agents, word = a for
    immovable ones. Continuous: [no-op, -x, +x, -y, +y] then the message for movable agents, the message
    alone for immovable ones; the force is (+x - -x, +y - -y)."""
    A, dim_c = world.num_agents, world.dim_c
    speaks = dim_c > 0 and not world.silent.all()
    move_dim = np.where(world.movable, MOVE_DIM, 1)
    if continuous:
        # mpe2's ClipOutOfBoundsWrapper clips to the Box [0, 1] before the env sees the action.
        a = jnp.clip(actions, 0.0, 1.0)
        u = jnp.stack([a[:, 2] - a[:, 1], a[:, 4] - a[:, 3]], axis=-1)
        offset = np.where(world.movable, MOVE_DIM, 0)
        if speaks and np.all(offset == offset[0]):
            c = a[:, offset[0] : offset[0] + dim_c]
        elif speaks:
            c = jnp.take_along_axis(a, jnp.asarray(offset[:, None] + np.arange(dim_c)), axis=1)
    else:
        a = actions.astype(jnp.int32)
        # A Python int divisor when all agents share it: XLA strength-reduces % and // by a constant.
        divisor = MOVE_DIM if world.movable.all() else jnp.asarray(move_dim)
        move = a % divisor
        u = jnp.stack(
            [(move == 2).astype(jnp.float32) - (move == 1), (move == 4).astype(jnp.float32) - (move == 3)],
            axis=-1,
        )
        if speaks:
            c = jax.nn.one_hot(a // divisor, dim_c, dtype=jnp.float32)
    # Immovable agents' forces are never integrated (see `integrate`), so their u needs no masking.
    force = u * world.accel[:, None]
    if not speaks:
        c = jnp.zeros((A, dim_c), jnp.float32)
    elif world.silent.any():
        c = jnp.where(world.silent[:, None], 0.0, c)
    return force, c


def contact_forces(world: World, agent_pos: jax.Array, landmark_pos: jax.Array) -> jax.Array:
    """[R, 2] summed soft contact force on each movable colliding agent (rows = world.contact_rows).

    mpe2: penetration = logaddexp(0, -(dist - dist_min) / margin) * margin, force = contact_force *
    delta / dist * penetration, equal and opposite for each pair; summing row-wise gives the same total."""
    cols = jnp.concatenate(
        [take(agent_pos, world.contact_agent_cols), take(landmark_pos, world.contact_landmark_cols)]
    )
    delta = take(agent_pos, world.contact_rows)[:, None, :] - cols[None, :, :]  # [R, C, 2]
    dist = jnp.sqrt(jnp.sum(delta * delta, axis=-1))
    k = CONTACT_MARGIN
    penetration = jax.nn.softplus(-(dist - world.contact_dist_min) / k) * k
    scale = jnp.where(
        world.contact_pairs, CONTACT_FORCE * penetration / jnp.where(world.contact_pairs, dist, 1.0), 0.0
    )
    return jnp.sum(delta * scale[..., None], axis=1)


def integrate(world: World, state: MPEState, force: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(agent_pos, agent_vel) after one step under the action forces `force` [A, 2]."""
    if not world.movable.any():
        return state.agent_pos, state.agent_vel
    if world.has_contacts:
        f_contact = contact_forces(world, state.agent_pos, state.landmark_pos)
        if np.array_equal(world.contact_rows, np.arange(world.num_agents)):
            force = force + f_contact
        else:
            force = force.at[world.contact_rows].add(f_contact)
    pos = state.agent_pos + state.agent_vel * DT
    vel = state.agent_vel * (1 - DAMPING) + (force / MASS) * DT
    if np.isfinite(world.max_speed).any():
        speed = jnp.sqrt(vel[:, 0] * vel[:, 0] + vel[:, 1] * vel[:, 1])
        over = speed > world.max_speed
        vel = jnp.where(
            over[:, None], vel / jnp.where(over, speed, 1.0)[:, None] * world.max_speed[:, None], vel
        )
    if not world.movable.all():
        pos = jnp.where(world.movable[:, None], pos, state.agent_pos)
        vel = jnp.where(world.movable[:, None], vel, state.agent_vel)
    return pos, vel


# --- geometry shared by the scenarios' observations and rewards -------------------------------------------


def relative(src: jax.Array, dst: jax.Array) -> jax.Array:
    """[N, M, 2]: dst[m] - src[n], the position of each dst entity in each src agent's frame."""
    return dst[None, :, :] - src[:, None, :]


def norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def off_diagonal(x: jax.Array) -> jax.Array:
    """[A, A, ...] -> [A, A-1, ...]: row i keeps columns j != i in order ("the others" of agent i).
    Flattening and reshaping drops the diagonal without a gather."""
    A = x.shape[0]
    if A == 1:
        return x[:, :0]
    rest = x.shape[2:]
    flat = x.reshape(A * A, *rest)[1:]
    return flat.reshape(A - 1, A + 1, *rest)[:, :-1].reshape(A, A - 1, *rest)


def nearest(rel: jax.Array, n: int | None, *payloads: jax.Array) -> list[jax.Array]:
    """mpe2's partial observability: per row, the n entities nearest to the agent (closest first),
    zero-padded to n slots; `payloads` ([N, M, k] each) are reordered the same way. n=None keeps all."""
    arrays = [rel, *payloads]
    if n is None:
        return arrays
    M = rel.shape[1]
    if M:
        order = jnp.argsort(norm(rel), axis=1)[:, : min(n, M)]
        arrays = [jnp.take_along_axis(a, order[:, :, None], axis=1) for a in arrays]
    if M < n:
        arrays = [jnp.pad(a, ((0, 0), (0, n - M), (0, 0))) for a in arrays]
    return arrays


def in_contact(pos_a: jax.Array, size_a: np.ndarray, pos_b: jax.Array, size_b: np.ndarray) -> jax.Array:
    """[Na, Nb] bool: mpe2's `is_collision` (centre distance below the sum of radii) for every pair."""
    return norm(relative(pos_a, pos_b)) < (np.asarray(size_a)[:, None] + np.asarray(size_b)[None, :])


def boundary_penalty(pos: jax.Array) -> jax.Array:
    """[N] sum over coordinates of mpe2's `bound(|x|)`: 0 below 0.9, linear to 1, then exp(2x - 2) <= 10."""
    x = jnp.abs(pos)
    pen = jnp.where(x < 0.9, 0.0, jnp.where(x < 1.0, (x - 0.9) * 10, jnp.minimum(jnp.exp(2 * x - 2), 10.0)))
    return jnp.sum(pen, axis=-1)


def rows(n: int, *pieces: jax.Array) -> jax.Array:
    """Observation rows [n, d] from pieces with a leading axis n (each flattened per row)."""
    return jnp.concatenate([jnp.reshape(p, (n, -1)).astype(jnp.float32) for p in pieces], axis=-1)

"""Observation and agent batching: what the actor and the critic see, and the shapes samples travel in.

Arrays keep the env's layout, agents on an axis: observations [..., A, D]. One network serves all agents
(parameter sharing), applied over the leading axes; the agent id, the global state and the action mask
are built here once for every algorithm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.envs import spaces
from jaxpar.parallel.rules import constrain


def with_agent_id(x: jax.Array) -> jax.Array:
    """[..., A, D] -> [..., A, D + A]: each agent's row gains its one-hot index."""
    num_agents = x.shape[-2]
    eye = jnp.broadcast_to(jnp.eye(num_agents, dtype=x.dtype), (*x.shape[:-2], num_agents, num_agents))
    return jnp.concatenate([x, eye], axis=-1)


def global_state(obs: jax.Array) -> jax.Array:
    """[..., A, D] -> [..., A, A*D]: every agent's observation concatenated (the MPE "world state" of
    MAPPO), repeated for each agent so the centralised critic is applied per agent like the actor."""
    num_agents = obs.shape[-2]
    flat = obs.reshape(*obs.shape[:-2], num_agents * obs.shape[-1])
    return jnp.broadcast_to(flat[..., None, :], (*obs.shape[:-2], num_agents, flat.shape[-1]))


def action_mask(space: spaces.Discrete) -> np.ndarray | None:
    """[A, max_n] bool marking each agent's valid actions, or None when every agent has the same count."""
    n = np.asarray(space.n)
    if np.all(n == n.max()):
        return None
    return np.arange(n.max())[None, :] < n[:, None]


def num_logits(space: spaces.Discrete) -> int:
    return int(np.asarray(space.n).max())


def masked_logits(logits: jax.Array, mask: np.ndarray | None) -> jax.Array:
    """Invalid actions get a large negative logit (finite, so entropy terms stay 0 * finite = 0)."""
    if mask is None:
        return logits
    return jnp.where(mask, logits, -1e9)


def env_major(x: jax.Array) -> jax.Array:
    """[T, E, ...] -> [E*T, ...]: samples are env steps (agents stay together). The env axis, the one
    sharded over the mesh, goes first so the flat axis is split over the same devices in contiguous
    blocks and nothing moves."""
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape(-1, *x.shape[2:])


def minibatches(batch: dict, carry0, key, num_minibatches: int, recurrent: bool):
    """A shuffled split of a rollout `batch` ([T, E, ...] leaves) into `num_minibatches` on a leading axis,
    each kept on the mesh's batch axes: whole env sequences [M, T, E/M, ...] with their starting carries
    [M, E/M, ...] when `recurrent`, else env steps [M, E*T/M, ...] (all agents of a step together; the
    carries are then unused zeros [M])."""
    M = num_minibatches
    if recurrent:
        E = batch["obs"].shape[1]
        perm = jax.random.permutation(key, E)

        def split_env(x):
            x = jnp.take(x, perm, axis=1)
            x = x.reshape(x.shape[0], M, E // M, *x.shape[2:])
            return constrain(jnp.swapaxes(x, 0, 1), (None, None, "batch") + (None,) * (x.ndim - 3))

        def split_carry(x):
            x = jnp.take(x, perm, axis=0).reshape(M, E // M, *x.shape[1:])
            return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

        return jax.tree.map(split_env, batch), jax.tree.map(split_carry, carry0)
    flat = {k: env_major(v) for k, v in batch.items() if k != "reset"}
    N = flat["obs"].shape[0]
    perm = jax.random.permutation(key, N)

    def split(x):
        x = jnp.take(x, perm, axis=0).reshape(M, N // M, *x.shape[1:])
        return constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, flat), jnp.zeros((M,))

"""Generalised advantage estimation with terminations and truncations kept apart.

A terminated transition has no future: its target is the reward alone. A truncated one (a time limit)
does: its target bootstraps from the value of the observation it reached (`final_obs`, kept by the env's
autoreset), not from the next observation in the buffer, which belongs to the new episode. Either way
the advantage trace stops there, so nothing leaks across the episode boundary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gae(rewards, values, final_values, terminated, truncated, last_value, gamma: float, lam: float):
    """(advantages, returns), each [T, ...].

    rewards, values, terminated, truncated: [T, ...]; values[t] is V(obs_t).
    final_values: [T, ...], V of the observation step t reached (used only where truncated[t]).
    last_value: [...], V of the observation after the last step (bootstraps the unfinished episode).
    """
    terminated = terminated.astype(jnp.float32)
    truncated = truncated.astype(bool)
    next_values = jnp.concatenate([values[1:], last_value[None]], axis=0)
    next_values = jnp.where(truncated, final_values, next_values)
    deltas = rewards + gamma * (1.0 - terminated) * next_values - values
    continues = 1.0 - jnp.maximum(terminated, truncated.astype(jnp.float32))

    def body(advantage, xs):
        delta, cont = xs
        advantage = delta + gamma * lam * cont * advantage
        return advantage, advantage

    _, advantages = jax.lax.scan(body, jnp.zeros_like(last_value), (deltas, continues), reverse=True)
    return advantages, advantages + values

"""Spaces over whole arrays, so one space describes every agent at once ([num_agents, ...]).

Agents whose spaces differ share one padded array: `Discrete` takes a per-element count, and `Box` a
`mask` that marks the padding. `sample` and `contains` work under jit and vmap; `contains` returns a
scalar bool array (shape and dtype are checked in Python, where they are static)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class Discrete:
    """Integers in [0, n) per element; `n` has the space's shape (a count per agent, possibly unequal)."""

    n: np.ndarray
    dtype: np.dtype = np.dtype(np.int32)

    def __init__(self, n, shape: tuple[int, ...] | None = None, dtype=np.int32):
        n = np.asarray(n, dtype=np.int64)
        if shape is not None:
            n = np.broadcast_to(n, shape)
        if np.any(n < 1):
            raise ValueError(f"Discrete needs every count n >= 1, got {n}.")
        object.__setattr__(self, "n", np.array(n))
        object.__setattr__(self, "dtype", np.dtype(dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.n.shape

    def sample(self, key: jax.Array) -> jax.Array:
        # floor(n * u): one hash per element, where randint spends two (bias below 1e-6 for n < 2**8).
        u = jax.random.uniform(key, self.shape, jnp.float32)
        n = self.n.astype(np.float32)
        return jnp.minimum(jnp.floor(u * n), n - 1).astype(self.dtype)

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        if x.shape != self.shape or not jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(False)
        return jnp.all((x >= 0) & (x < self.n))

    def __repr__(self) -> str:
        n = self.n.item() if self.n.ndim == 0 else self.n.tolist()
        return f"Discrete({n})"


@dataclasses.dataclass(frozen=True, eq=False)
class Box:
    """Reals in [low, high] per element. Where `mask` is False the element is padding: `sample` gives 0
    there and `contains` ignores it. Unbounded elements (observations) sample a standard normal."""

    low: np.ndarray
    high: np.ndarray
    mask: np.ndarray
    dtype: np.dtype = np.dtype(np.float32)

    def __init__(self, low, high, shape: tuple[int, ...] | None = None, dtype=np.float32, mask=None):
        shape = np.broadcast_shapes(np.shape(low), np.shape(high)) if shape is None else tuple(shape)
        low = np.broadcast_to(np.asarray(low, np.float64), shape)
        high = np.broadcast_to(np.asarray(high, np.float64), shape)
        mask = np.ones(shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), shape)
        if np.any(low > high):
            raise ValueError(f"Box needs low <= high everywhere, got low={low} high={high}.")
        object.__setattr__(self, "low", np.array(low))
        object.__setattr__(self, "high", np.array(high))
        object.__setattr__(self, "mask", np.array(mask))
        object.__setattr__(self, "dtype", np.dtype(dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.low.shape

    def sample(self, key: jax.Array) -> jax.Array:
        bounded = np.isfinite(self.low) & np.isfinite(self.high)
        low = np.where(bounded, self.low, 0.0).astype(self.dtype)
        high = np.where(bounded, self.high, 1.0).astype(self.dtype)
        if bounded.all():
            x = jax.random.uniform(key, self.shape, self.dtype, low, high)
        else:
            k_uniform, k_normal = jax.random.split(key)
            x = jnp.where(
                bounded,
                jax.random.uniform(k_uniform, self.shape, self.dtype, low, high),
                jax.random.normal(k_normal, self.shape, self.dtype),
            )
        return jnp.where(self.mask, x, 0).astype(self.dtype) if not self.mask.all() else x

    def contains(self, x) -> jax.Array:
        x = jnp.asarray(x)
        if x.shape != self.shape or not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(False)
        inside = (x >= self.low) & (x <= self.high)
        return jnp.all(inside | ~self.mask)

    def __repr__(self) -> str:
        return f"Box(shape={self.shape}, low={self.low.min()}, high={self.high.max()})"


Space = Discrete | Box


def stack(spaces: list[Space]) -> Space:
    """One space over a leading axis from same-kind spaces whose trailing sizes may differ (an agent
    axis): Discrete counts are stacked, Boxes are zero-padded to the largest size with a mask."""
    if all(isinstance(s, Discrete) for s in spaces):
        if any(s.shape != spaces[0].shape for s in spaces):
            raise ValueError(f"cannot stack Discrete spaces of different shapes: {spaces}")
        return Discrete(np.stack([s.n for s in spaces]))
    if all(isinstance(s, Box) and len(s.shape) == 1 for s in spaces):
        width = max(s.shape[0] for s in spaces)
        low = np.zeros((len(spaces), width))
        high = np.zeros((len(spaces), width))
        mask = np.zeros((len(spaces), width), bool)
        for i, s in enumerate(spaces):
            d = s.shape[0]
            low[i, :d], high[i, :d], mask[i, :d] = s.low, s.high, s.mask
        return Box(low, high, dtype=spaces[0].dtype, mask=mask)
    raise ValueError(f"cannot stack spaces {spaces}: all Discrete of one shape, or all 1-d Box.")


def unstack(space: Space, i: int) -> Space:
    """Row i of a stacked space, padding removed (the inverse of `stack`)."""
    if isinstance(space, Discrete):
        return Discrete(space.n[i])
    width = int(space.mask[i].sum())
    return Box(space.low[i, :width], space.high[i, :width], dtype=space.dtype)


def batch(space: Space, n: int) -> Space:
    """The space of n independent copies along a new leading axis (a batch of environments)."""
    if isinstance(space, Discrete):
        return Discrete(np.broadcast_to(space.n, (n, *space.shape)), dtype=space.dtype)
    shape = (n, *space.shape)
    return Box(
        np.broadcast_to(space.low, shape),
        np.broadcast_to(space.high, shape),
        dtype=space.dtype,
        mask=np.broadcast_to(space.mask, shape),
    )

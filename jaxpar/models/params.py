"""Parameter creation with logical axis names (the only sharding a model states)."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, names, std, dtype) -> nnx.Param:
    """Normal(0, std) initialised in float32, stored in `dtype`, named by logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=names)

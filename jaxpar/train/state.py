"""The train state of any model (LM or RL policy) and its shardings: model-free."""

from __future__ import annotations

import jax
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(mesh: Mesh, abstract_state: TrainState, param_shardings) -> TrainState:
    """Optimizer moments follow the parameter they belong to (matched by path suffix and shape), which
    is what makes FSDP ZeRO-3: parameters, gradients and optimizer state all sharded alike. Everything
    else (step, counts) is replicated."""
    by_path = {
        _keys(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_state.params)[0], jax.tree.leaves(param_shardings)
        )
    }
    replicated = NamedSharding(mesh, P())

    def match(path, leaf):
        keys = _keys(path)
        for start in range(len(keys)):
            shape_and_sharding = by_path.get(keys[start:])
            if shape_and_sharding and shape_and_sharding[0] == leaf.shape:
                return shape_and_sharding[1]
        return replicated

    return jax.tree.map_with_path(match, abstract_state)


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs that carry their shardings: what restores and ahead-of-time compiles take."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

"""The train state of any model (LM or RL policy) and its shardings: model-free."""

from __future__ import annotations

import math

import jax
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpar.parallel import rules


@struct.dataclass
class Logical:
    """An optimizer-state array whose shape is not a parameter's (a low-rank moment, a preconditioner),
    carrying the logical axis names it is sharded by, like a parameter's."""

    value: jax.Array
    names: tuple = struct.field(pytree_node=False)


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


def _keys(path) -> tuple:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_sharding(mesh: Mesh, names, shape) -> NamedSharding:
    """The sharding of logical `names` by the rules table; a dimension the mesh axes do not divide stays
    whole (an optimizer state may have any shape, so this never refuses)."""
    spec = []
    for dim, axes in zip(shape, rules.logical_to_spec(tuple(names))):
        group = (axes,) if isinstance(axes, str) else tuple(axes or ())
        spec.append(axes if group and dim % math.prod(mesh.shape[a] for a in group) == 0 else None)
    return NamedSharding(mesh, P(*spec))


def state_shardings(mesh: Mesh, abstract_state: TrainState, param_shardings) -> TrainState:
    """Optimizer moments follow the parameter they belong to (matched by path suffix and shape), which
    is what makes FSDP ZeRO-3: parameters, gradients and optimizer state all sharded alike. A state array
    of another shape says its logical names (`Logical`) and is sharded by them. Everything else (step,
    counts) is replicated."""
    by_path = {
        _keys(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_state.params)[0], jax.tree.leaves(param_shardings)
        )
    }
    replicated = NamedSharding(mesh, P())

    def match(path, leaf):
        if isinstance(leaf, Logical):
            return leaf.replace(value=logical_sharding(mesh, leaf.names, leaf.value.shape))
        keys = _keys(path)
        for start in range(len(keys)):
            shape_and_sharding = by_path.get(keys[start:])
            if shape_and_sharding and shape_and_sharding[0] == leaf.shape:
                return shape_and_sharding[1]
        return replicated

    return jax.tree.map_with_path(match, abstract_state, is_leaf=lambda x: isinstance(x, Logical))


def with_shardings(shapes, shardings):
    """ShapeDtypeStructs that carry their shardings: what restores and ahead-of-time compiles take."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

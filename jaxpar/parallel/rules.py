"""The one table from logical axis names to mesh axes, and the helpers that apply it.

Model code names logical axes only ("embed", "heads", ...); this file alone knows the mesh. A logical
name maps to one mesh axis, a tuple of mesh axes, or None (replicated).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalNames = Sequence[str | None]

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters. FSDP (ZeRO-3) shards the model dimension of every weight; Megatron tensor parallelism
    # splits heads, MLP hidden units and the vocabulary.
    # Pipeline stages own contiguous slices of the stacked layers. (The pipelined step also splits the
    # vocabulary work across stages; storing the vocabulary over "pipeline" as well aborted XLA:CPU's
    # compiler with fsdp x tensor x remat, so the tables stay split over "tensor" only.)
    ("layers", "pipeline"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("expert", "expert"),
    # Activations. "length_sp" is the residual stream between tensor-parallel regions: Megatron sequence
    # parallelism keeps it split over the tensor axis so norms run on sequence shards.
    # Expert parallelism borrows its devices from data parallelism outside the MoE layers.
    ("batch", ("data", "fsdp", "expert")),
    ("length", "sequence"),
    ("length_sp", ("sequence", "tensor")),
    ("act_embed", None),
)

_RULES = dict(RULES)
assert len(_RULES) == len(RULES), "duplicate logical name in RULES"


def logical_to_spec(names: LogicalNames) -> P:
    """PartitionSpec for a tuple of logical names (None stays replicated)."""
    axes = []
    for name in names:
        if name is None:
            axes.append(None)
            continue
        if name not in _RULES:
            raise KeyError(f"logical axis {name!r} is not in jaxpar.parallel.rules.RULES; add it there.")
        axes.append(_RULES[name])
    return P(*axes)


def mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes one logical name maps to, as a tuple (() when replicated)."""
    axes = logical_to_spec((name,))[0]
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def usable_axes(mesh) -> dict[str, int]:
    """{axis: size} of the axes of `mesh` (concrete or abstract) a new shard_map can split over: larger
    than 1 and not already manual (inside an enclosing shard_map)."""
    return {
        name: size
        for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
        if size > 1 and kind != jax.sharding.AxisType.Manual
    }


def divisible_axes(candidates: Sequence[str], usable: Mapping[str, int], dims: Sequence[int]):
    """The candidate axes (in order) found in `usable` whose running product keeps every dim divisible;
    None when there are none."""
    chosen = []
    for axis in candidates:
        if axis in usable:
            ways = math.prod(usable[a] for a in chosen) * usable[axis]
            if all(d % ways == 0 for d in dims):
                chosen.append(axis)
    return tuple(chosen) or None


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def _check_divisible(spec: P, shape: tuple[int, ...], mesh: Mesh, where: str) -> None:
    for dim, axes in zip(shape, spec):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        if dim % size:
            raise ValueError(
                f"{where}: dimension {dim} of shape {shape} cannot be split {size} ways over mesh axes "
                f"{names} "
                f"(spec {spec}); change the model size or the mesh so that {size} divides {dim}."
            )


def param_specs(abstract_tree) -> object:
    """Tree of PartitionSpecs from the logical names stored on nnx Variables (out_sharding metadata)."""
    logical = nnx.get_partition_spec(abstract_tree)
    return jax.tree.map(
        lambda spec: logical_to_spec(tuple(spec)) if isinstance(spec, P) else P(),
        logical,
        is_leaf=lambda x: isinstance(x, P),
    )


def tree_shardings(mesh: Mesh, abstract_tree, specs) -> object:
    """NamedShardings for a tree of abstract arrays; every sharded dimension must divide evenly."""

    def one(path, leaf, spec):
        _check_divisible(spec, leaf.shape, mesh, jax.tree_util.keystr(path))
        return NamedSharding(mesh, spec)

    return jax.tree.map_with_path(one, abstract_tree, specs)


def replicated_fraction(abstract_tree, shardings) -> float:
    """Share of bytes that every device holds in full."""
    total = replicated = 0
    for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        total += nbytes
        if sharding.is_fully_replicated:
            replicated += nbytes
    return replicated / max(total, 1)


def check_sharded(mesh: Mesh, abstract_params, shardings, max_replicated: float = 0.5) -> None:
    """Fail if a mesh that shards parameters (fsdp or tensor > 1) leaves most parameter bytes replicated:
    that is a rules table out of step with the model, not a choice anyone makes on purpose."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return
    fraction = replicated_fraction(abstract_params, shardings)
    if fraction > max_replicated:
        raise ValueError(
            f"{fraction:.0%} of parameter bytes would be replicated on mesh {dict(mesh.shape)}; "
            "check the logical names on the model's parameters against jaxpar.parallel.rules.RULES."
        )

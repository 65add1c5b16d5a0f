"""Run a per-device function (a kernel, a hand-written collective) on every device's shard of global
arrays: one `jax.shard_map` over the current mesh, with the dimensions named by logical names.

Attention kernels that GSPMD cannot partition (Pallas, cuDNN) run through it over batch and head shards;
sequence parallelism (ring, Ulysses, LASP-2) runs through it over the sequence axis as well.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import AxisType, PartitionSpec as P

from jaxpar.parallel import rules


def heads_ways(*heads: int) -> int:
    """How many ways `per_device` splits heads on the current mesh (the "heads" mesh axes that divide every
    count in `heads`)."""
    usable = rules.usable_axes(jax.sharding.get_abstract_mesh())
    return math.prod(usable[a] for a in rules.divisible_axes(rules.mesh_axes("heads"), usable, heads) or ())


def per_device(
    local_fn,
    arrays: Mapping[str, jax.Array | None],
    logical: Mapping[str, tuple],
    out_logical,
    *,
    batch: int,
    heads: tuple[int, ...],
    length_axis: str | None = None,
    check_vma: bool = False,
):
    """local_fn(**arrays) on every device's shard, inside `jax.shard_map` over the current mesh.

    `logical[name]` names each array's dimensions with "batch", "length", "heads" or None; `out_logical`
    does the same for the output (a tuple of names, or a tuple of such tuples). Batch goes over the mesh
    axes of the logical "batch" axis that divide `batch`, heads over those of "heads" that divide every
    count in `heads`, length over `length_axis` (None: every device sees the whole length). Mesh axes
    already manual (an enclosing shard_map) stay so. With nothing to split, local_fn runs on the global
    arrays as they are.
    check_vma=False by default: on jax 0.10.2, interpret-mode Pallas kernels inside shard_map fail the
    varying-manual-axes check (even a kernel computing x * 2 does).
    """
    mesh = jax.sharding.get_abstract_mesh()
    present = {k: v for k, v in arrays.items() if v is not None}

    def body(present):
        return local_fn(**{k: present.get(k) for k in arrays})

    if mesh.empty:
        return body(present)
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    if length_axis is not None and kinds.get(length_axis) == AxisType.Manual:
        raise ValueError(
            f"mesh axis {length_axis!r} is already manual (inside another shard_map); sequence "
            "parallelism wraps its own shard_map over it."
        )
    usable = rules.usable_axes(mesh)
    mapping = {
        "batch": rules.divisible_axes(rules.mesh_axes("batch"), usable, (batch,)),
        "length": length_axis,
        "heads": rules.divisible_axes(rules.mesh_axes("heads"), usable, heads),
        None: None,
    }
    # Manual over the axes the specs use only; the rest stay with GSPMD, so no collective is emitted over
    # axes of size 1 or over axes nothing here is split on.
    used = {a for names in (mapping["batch"], mapping["heads"]) for a in (names or ())}
    used |= {length_axis} if length_axis is not None else set()
    if not used:
        return body(present)

    def spec(names):
        return P(*(mapping[n] for n in names))

    def is_names(x):
        return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)

    in_specs = ({k: spec(logical[k]) for k in present},)
    out_specs = jax.tree.map(spec, out_logical, is_leaf=is_names)
    if any(kinds[a] == AxisType.Explicit for a in mesh.axis_names if kinds[a] != AxisType.Manual):
        # Explicit axes: shard_map wants its inputs laid out as its in_specs say.
        present = {k: jax.sharding.reshard(v, in_specs[0][k]) for k, v in present.items()}
    # Under jit also when called eagerly: eager partial-manual shard_map rejects these out_specs.
    return jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=used, check_vma=check_vma
        )
    )(present)

"""Which parameters are matrices, read from their LOGICAL axis names, and the matrix view of each.

Muon, GaLore and SOAP act on weight matrices; everything else (embeddings and the output layer, which
carry "vocab"; norm scales; biases; the MoE router, whose expert axis has no name) gets AdamW. The
decision reads the names the model put on its parameters (`nnx.Param(..., out_sharding=names)`), never a
parameter path.

A matrix parameter is: leading stack axes ("layers", "expert", or unnamed: a hybrid model's group axis),
then at least two axes that are all hidden dimensions (MATRIX_AXES), with "embed" first (fan-in is the
model dimension: wq, w_gate) or last (fan-out is: wo, w_down). Its matrix view keeps the stack axes and
merges the rest into [rows = fan-in, cols = fan-out]: wq [L, D, N, H] -> [L, D, N*H].
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpar.parallel import rules

STACK_AXES = ("layers", "expert", None)
MATRIX_AXES = ("embed", "heads", "kv_heads", "head_dim", "mlp")
MATRIX, OTHER = "matrix", "adamw"


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one matrix parameter (`shape`, logical `names`) is viewed as stacked [..., m, n] matrices."""

    shape: tuple[int, ...]
    names: tuple[str | None, ...]
    stack: int  # leading stack axes
    rows: int  # the fan-in axes follow the stack axes; the fan-out axes are the rest

    @property
    def view_shape(self) -> tuple[int, ...]:
        s, r = self.stack, self.stack + self.rows
        return (*self.shape[:s], math.prod(self.shape[s:r]), math.prod(self.shape[r:]))

    @property
    def view_names(self) -> tuple[str | None, ...]:
        """Logical names of the view: a merged group is named by its major axis (a split of the major
        axis is a split of the merged one)."""
        s, r = self.stack, self.stack + self.rows
        return (*self.names[:s], self.names[s], self.names[r])

    @property
    def m(self) -> int:
        return self.view_shape[-2]

    @property
    def n(self) -> int:
        return self.view_shape[-1]

    def to_view(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.view_shape)

    def from_view(self, x: jax.Array) -> jax.Array:
        return x.reshape(self.shape)


def layout_of(names, shape) -> Layout | None:
    """The matrix layout of a parameter with these logical names, or None (an AdamW parameter)."""
    if names is None or len(names) != len(shape):
        return None
    names = tuple(names)
    stack = 0
    while stack < len(names) and names[stack] in STACK_AXES:
        stack += 1
    rest = names[stack:]
    if len(rest) < 2 or not all(name in MATRIX_AXES for name in rest):
        return None
    if rest[0] == "embed":
        rows = 1
    elif rest[-1] == "embed":
        rows = len(rest) - 1
    else:
        return None
    return Layout(tuple(shape), names, stack, rows)


def _names(variable) -> tuple | None:
    metadata = variable.get_metadata() if isinstance(variable, nnx.Variable) else {}
    names = metadata.get("out_sharding", metadata.get("sharding_names"))
    return tuple(names) if names is not None else None


def leaf_layouts(tree) -> list[Layout | None]:
    """One entry per leaf of `tree` (in `jax.tree.leaves` order): the Layout of a matrix parameter, None
    for any other. Reads the logical names of the nnx Variables holding the leaves (a tree of params,
    grads or updates: all keep the Variables' metadata); masked-out leaves (optax.MaskedNode) hold no
    leaf and get no entry."""
    out: list[Layout | None] = []

    def visit(node):
        if isinstance(node, nnx.Variable):
            names = _names(node)
            out.extend(layout_of(names, leaf.shape) for leaf in jax.tree.leaves(node))
        elif isinstance(node, optax.MaskedNode) or node is None:
            pass
        else:  # a bare array: no names, so not a matrix
            out.append(None)
        return node

    jax.tree.map(visit, tree, is_leaf=lambda x: isinstance(x, (nnx.Variable, optax.MaskedNode)))
    return out


def labels(tree):
    """MATRIX or OTHER for every leaf of `tree`, as a tree of its structure (for optax.partition)."""
    treedef = jax.tree.structure(tree)
    return jax.tree.unflatten(treedef, [MATRIX if lay else OTHER for lay in leaf_layouts(tree)])


def gathered_spec(layout: Layout) -> P:
    """Whole matrices on every device: the stack axes keep their split (pipeline stages, experts), the
    matrix axes are gathered."""
    stack = rules.logical_to_spec(layout.names[: layout.stack])
    return P(*stack, None, None)


def on_whole_matrices(fn, x: jax.Array, layout: Layout):
    """fn on whole matrices: `x` (a [..., m, n] view, or any array with the view's stack axes) is
    gathered to `gathered_spec` and every device runs `fn` on its local stack slice inside a shard_map,
    so the compiler cannot partition the matrix work (it did: sharding propagation split the
    Newton-Schulz matmuls over the data axis, with collectives in every iteration). Without a mesh (one
    device, outside jit) fn runs as is. fn's outputs keep the stack axes in front and end in two
    matrix axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(x)
    spec = gathered_spec(layout)
    return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(x)


def constrain_view(x: jax.Array, spec: P | None) -> jax.Array:
    """A sharding constraint when a mesh is set (inside the jitted step); a no-op without one."""
    if spec is None or jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def view_spec(layout: Layout) -> P:
    return rules.logical_to_spec(layout.view_names)


def matrices_of(tree) -> tuple[list[jax.Array], list[Layout], jax.tree_util.PyTreeDef]:
    """(leaves, their layouts, treedef) of a tree the matrix optimizers were given: each leaf must be a
    matrix parameter (optax.partition hands them only those)."""
    leaves, treedef = jax.tree.flatten(tree)
    layouts = leaf_layouts(tree)
    assert len(layouts) == len(leaves)
    for layout, leaf in zip(layouts, leaves):
        if layout is None:
            raise ValueError(
                f"a leaf of shape {leaf.shape} has no matrix layout; the matrix optimizers take only "
                "parameters whose logical axis names make them matrices (jaxpar.train.optimizers.matrices)"
            )
    return leaves, layouts, treedef


def per_matrix(fn, *xs):
    """fn (one [m, n] matrix -> a pytree of arrays) over the leading stack axes of each x, one matrix at
    a time (`lax.map`). A batched LAPACK call (jnp.linalg.svd / eigh on [B, m, n]) deadlocks jaxlib
    0.10.2's CPU runtime in multi-device programs: every device's thread waits on batch tasks queued to
    the thread pool they occupy. Unbatched calls run inline."""
    stack = xs[0].shape[:-2]
    flat = [x.reshape(-1, *x.shape[-2:]) for x in xs]
    out = jax.lax.map(lambda args: fn(*args), tuple(flat))
    return jax.tree.map(lambda y: y.reshape(*stack, *y.shape[1:]), out)

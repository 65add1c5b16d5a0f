"""GaLore (Zhao et al. 2024): Adam on gradients projected to rank r, the update projected back.

Each matrix gradient G [m, n] (its matrix view) is projected on its smaller side: P^T G [r, n] with P the
top-r left singular vectors when m <= n, else G Q [m, r] with Q the top-r right ones. Adam's moments live
in that low-rank space; the Adam direction is projected back (P N or N Q^T) and scaled by `scale`. The
projection is refreshed from the current gradient (top eigenvectors of its smaller Gram matrix) every
`update_every` steps (step 0 first);
the moments carry over a refresh, as in the paper.

State per matrix: the projection (m*r or n*r) and two moments of r*max(m, n), instead of Adam's 2*m*n.
Every state array carries logical names (state.Logical): the moments [r, n] as the parameter's view
[m, n] (the rank axis named for the side it replaced), the projection [m, r] as its side and the other.
The decomposition runs on whole matrices (matrices.on_whole_matrices).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpar.train.optimizers import matrices
from jaxpar.train.state import Logical


class GaLoreMatrix(NamedTuple):
    proj: Logical  # [..., m, r] (left) or [..., n, r] (right)
    mu: Logical  # [..., r, n] or [..., m, r]
    nu: Logical


class GaLoreState(NamedTuple):
    count: jax.Array
    matrices: object  # a tree of GaLoreMatrix, one per matrix parameter


def _rank(layout: matrices.Layout, rank: int) -> int:
    return min(rank, layout.m, layout.n)


def _left(layout: matrices.Layout) -> bool:
    return layout.m <= layout.n


def _names(layout: matrices.Layout):
    """(projection names, moment names) in the view's logical names. The rank axis takes the name of the
    side it replaced, so that low-rank states are split over as many devices as the parameter."""
    *stack, rows, cols = layout.view_names
    if _left(layout):
        return (*stack, rows, cols), (*stack, rows, cols)
    return (*stack, cols, rows), (*stack, rows, cols)


def _init_matrix(layout: matrices.Layout, rank: int, dtype) -> GaLoreMatrix:
    *stack, m, n = layout.view_shape
    r = _rank(layout, rank)
    proj_shape = (*stack, m, r) if _left(layout) else (*stack, n, r)
    moment_shape = (*stack, r, n) if _left(layout) else (*stack, m, r)
    proj_names, moment_names = _names(layout)
    zeros = lambda shape: jnp.zeros(shape, dtype)
    return GaLoreMatrix(
        proj=Logical(zeros(proj_shape), proj_names),
        mu=Logical(zeros(moment_shape), moment_names),
        nu=Logical(zeros(moment_shape), moment_names),
    )


def projection(g_view: jax.Array, layout: matrices.Layout, rank: int) -> jax.Array:
    """Top-r singular vectors of each gradient matrix on its smaller side ([..., side, r]): the top
    eigenvectors of the Gram matrix of that side (G G^T or G^T G). On CPU an eigh of the smaller Gram
    matrix took 3.5 ms where the SVD of a 128 x 384 matrix took 25 ms, and every device holding a
    matrix repeats the work."""
    r = _rank(layout, rank)

    def top(g):
        gram = g @ jnp.swapaxes(g, -1, -2) if _left(layout) else jnp.swapaxes(g, -1, -2) @ g
        vectors = matrices.per_matrix(lambda one: jnp.linalg.eigh(one)[1], gram)[..., ::-1][..., :r]
        # Each vector's sign is arbitrary; the moments carried over a refresh are not sign-free, so fix
        # it (largest entry positive) and every mesh and implementation agrees.
        largest = jnp.take_along_axis(vectors, jnp.argmax(jnp.abs(vectors), axis=-2)[..., None, :], axis=-2)
        return vectors * jnp.sign(largest)

    return matrices.on_whole_matrices(top, g_view, layout)


def scale_by_galore(
    rank: int, update_every: int, scale: float, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    def init(params):
        leaves, layouts, treedef = matrices.matrices_of(params)
        states = [_init_matrix(lay, rank, x.dtype) for x, lay in zip(leaves, layouts)]
        return GaLoreState(count=jnp.zeros([], jnp.int32), matrices=jax.tree.unflatten(treedef, states))

    def update(updates, state, params=None):
        del params
        leaves, layouts, treedef = matrices.matrices_of(updates)
        states = treedef.flatten_up_to(state.matrices)
        count = optax.safe_increment(state.count)
        refresh = state.count % update_every == 0
        out, new_states = [], []
        for g, lay, st in zip(leaves, layouts, states):
            g_view = lay.to_view(g)
            proj = jax.lax.cond(
                refresh, lambda g=g_view, lay=lay: projection(g, lay, rank), lambda st=st: st.proj.value
            )
            low = jnp.swapaxes(proj, -1, -2) @ g_view if _left(lay) else g_view @ proj
            mu = b1 * st.mu.value + (1 - b1) * low
            nu = b2 * st.nu.value + (1 - b2) * low * low
            mu_hat = mu / (1 - b1**count)
            nu_hat = nu / (1 - b2**count)
            direction = mu_hat / (jnp.sqrt(nu_hat) + eps)
            back = proj @ direction if _left(lay) else direction @ jnp.swapaxes(proj, -1, -2)
            back = matrices.constrain_view(scale * back, matrices.view_spec(lay))
            out.append(lay.from_view(back).astype(g.dtype))
            new_states.append(
                GaLoreMatrix(
                    proj=st.proj.replace(value=proj), mu=st.mu.replace(value=mu), nu=st.nu.replace(value=nu)
                )
            )
        return jax.tree.unflatten(treedef, out), GaLoreState(count, jax.tree.unflatten(treedef, new_states))

    return optax.GradientTransformation(init, update)


def galore_adamw(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The matrix update of config.optimizer.name = "galore_adamw" (cfg: an OptimizerConfig)."""
    return optax.chain(
        scale_by_galore(cfg.galore_rank, cfg.galore_update_every, cfg.galore_scale, cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )

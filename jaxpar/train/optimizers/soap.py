"""SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's preconditioners.

Per matrix view G [m, n]: Shampoo's factors L = EMA(G G^T) [m, m] and R = EMA(G^T G) [n, n]; their
eigenvectors QL, QR (refreshed by a full `eigh` every `precondition_every` steps, step 0 first, after
the factors took the current gradient); Adam's first moment in the parameter's space, its second moment
in the rotated one:

    G' = QL^T G QR,  M' = QL^T M QR,  V = b2 V + (1 - b2) G'^2,  update = QL (M'^ / (sqrt(V^) + eps)) QR^T

The paper refreshes with one power-iteration + QR step and re-sorts V; a full eigh per refresh is exact
and simpler at these sizes, and V carries over a refresh unchanged. Eigenvector signs cancel in the
update, so shards that round differently still agree.

Sharding: M and V are parameter-shaped (sharded like the parameter); L, R, QL, QR carry logical names
(state.Logical) and are split along their first axis by the parameter axis of that side; eigh runs on
gathered factors.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxpar.train.optimizers import matrices
from jaxpar.train.state import Logical


class SoapMatrix(NamedTuple):
    mu: Logical  # [..., m, n], parameter space
    nu: Logical  # [..., m, n], rotated space
    left: Logical  # L [..., m, m]
    right: Logical  # R [..., n, n]
    q_left: Logical
    q_right: Logical


class SoapState(NamedTuple):
    count: jax.Array
    matrices: object  # a tree of SoapMatrix, one per matrix parameter


def _init_matrix(layout: matrices.Layout, dtype) -> SoapMatrix:
    *stack, m, n = layout.view_shape
    *stack_names, rows, cols = layout.view_names
    view = lambda: Logical(jnp.zeros(layout.view_shape, dtype), layout.view_names)
    square = lambda k, name: Logical(jnp.zeros((*stack, k, k), dtype), (*stack_names, name, None))
    return SoapMatrix(view(), view(), square(m, rows), square(n, cols), square(m, rows), square(n, cols))


def _eigenvectors(factor: jax.Array, layout: matrices.Layout) -> jax.Array:
    eigh = lambda f: matrices.per_matrix(lambda one: jnp.linalg.eigh(one)[1], f)
    return matrices.on_whole_matrices(eigh, factor, layout)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def scale_by_soap(
    precondition_every: int, shampoo_beta: float, b1: float, b2: float, eps: float
) -> optax.GradientTransformation:
    def init(params):
        leaves, layouts, treedef = matrices.matrices_of(params)
        states = [_init_matrix(lay, x.dtype) for x, lay in zip(leaves, layouts)]
        return SoapState(count=jnp.zeros([], jnp.int32), matrices=jax.tree.unflatten(treedef, states))

    def update(updates, state, params=None):
        del params
        leaves, layouts, treedef = matrices.matrices_of(updates)
        states = treedef.flatten_up_to(state.matrices)
        count = optax.safe_increment(state.count)
        refresh = state.count % precondition_every == 0
        out, new_states = [], []
        for g, lay, st in zip(leaves, layouts, states):
            g_view = lay.to_view(g)
            left = shampoo_beta * st.left.value + (1 - shampoo_beta) * (g_view @ _t(g_view))
            right = shampoo_beta * st.right.value + (1 - shampoo_beta) * (_t(g_view) @ g_view)
            q_left, q_right = jax.lax.cond(
                refresh,
                lambda left=left, right=right, lay=lay: (_eigenvectors(left, lay), _eigenvectors(right, lay)),
                lambda st=st: (st.q_left.value, st.q_right.value),
            )
            mu = b1 * st.mu.value + (1 - b1) * g_view
            g_rot = _t(q_left) @ g_view @ q_right
            mu_rot = _t(q_left) @ mu @ q_right
            nu = b2 * st.nu.value + (1 - b2) * g_rot * g_rot
            direction = (mu_rot / (1 - b1**count)) / (jnp.sqrt(nu / (1 - b2**count)) + eps)
            back = matrices.constrain_view(q_left @ direction @ _t(q_right), matrices.view_spec(lay))
            out.append(lay.from_view(back).astype(g.dtype))
            new_states.append(
                SoapMatrix(
                    mu=st.mu.replace(value=mu),
                    nu=st.nu.replace(value=nu),
                    left=st.left.replace(value=left),
                    right=st.right.replace(value=right),
                    q_left=st.q_left.replace(value=q_left),
                    q_right=st.q_right.replace(value=q_right),
                )
            )
        return jax.tree.unflatten(treedef, out), SoapState(count, jax.tree.unflatten(treedef, new_states))

    return optax.GradientTransformation(init, update)


def soap(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The matrix update of config.optimizer.name = "soap" (cfg: an OptimizerConfig)."""
    return optax.chain(
        scale_by_soap(cfg.soap_precondition_every, cfg.soap_shampoo_beta, cfg.b1, cfg.b2, cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )

"""Muon: Nesterov momentum whose matrix is replaced by the nearest semi-orthogonal one (Newton-Schulz).

The momentum is kept in the parameter's own sharding (ZeRO, like Adam's moments). Newton-Schulz acts on
whole matrices, so the layout decides the communication:

- "gathered": each matrix is gathered over the mesh axes that split its rows and columns (stack axes,
  "layers" on pipeline stages and "expert" on the expert axis, stay split), every device runs the
  iteration on it (inside a shard_map, so that the compiler cannot split it again), and the result is
  sliced back to the parameter's shards (a local slice, no communication). One all-gather of the
  momentum per step: (1 - 1/s) of each matrix's bytes sent per device, s = its number of shards;
  the iteration's FLOPs are repeated on every device that holds the same matrix.
- "sharded": no constraint; the compiler partitions the iteration's matmuls over the shards, which
  costs collectives in every one of the 3 * ns_steps matmuls.

The iteration itself is optax.contrib's: `scale_by_muon` with beta = 0 and no Nesterov is a pure
orthogonaliser of what it is given (its momentum state is a throwaway zero), so the momentum is kept
here and the gather can come between the two (optax's own momentum would orthogonalise on whatever
layout the compiler picked).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from jaxpar.train.optimizers import matrices

# Keller Jordan's quintic coefficients (optax's default).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Moonlight's scale: an update with the RMS of AdamW's, so Muon shares AdamW's learning rate.
MATCHED_RMS = 0.2


class MuonState(NamedTuple):
    count: jax.Array
    mu: optax.Updates


def orthogonalise(x: jax.Array, layout: matrices.Layout, ns_steps: int, gather: bool) -> jax.Array:
    """The Newton-Schulz orthogonalisation of each matrix of `x` (a parameter-shaped array), scaled to
    AdamW's update RMS, returned in the parameter's sharding."""
    view = layout.to_view(x)
    dims = contrib.MuonDimensionNumbers(reduction_axis=view.ndim - 2, output_axis=view.ndim - 1)
    newton_schulz = contrib.scale_by_muon(
        NS_COEFFS, ns_steps, beta=0.0, nesterov=False, weight_dimension_numbers=dims
    )
    orthogonal = lambda v: newton_schulz.update(v, newton_schulz.init(v))[0]
    out = matrices.on_whole_matrices(orthogonal, view, layout) if gather else orthogonal(view)
    out = out * (MATCHED_RMS * max(layout.m, layout.n) ** 0.5)
    return layout.from_view(matrices.constrain_view(out, matrices.view_spec(layout)))


def scale_by_muon(beta: float, ns_steps: int, layout: str = "gathered") -> optax.GradientTransformation:
    """Nesterov momentum (optax's bias-corrected form), orthogonalised per matrix."""

    def init(params):
        return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        mu_hat = jax.tree.map(
            lambda m, g: beta * m + (1 - beta) * g,
            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
            optax.tree.bias_correction(updates, beta, count),
        )
        leaves, layouts, treedef = matrices.matrices_of(mu_hat)
        out = [orthogonalise(x, lay, ns_steps, layout == "gathered") for x, lay in zip(leaves, layouts)]
        return jax.tree.unflatten(treedef, out), MuonState(count=count, mu=mu)

    return optax.GradientTransformation(init, update)


def muon(cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The matrix update of config.optimizer.name = "muon" (cfg: an OptimizerConfig)."""
    return optax.chain(
        scale_by_muon(cfg.muon_momentum, cfg.muon_ns_steps, cfg.muon_layout),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )

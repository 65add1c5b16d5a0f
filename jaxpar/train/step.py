"""Pure train and eval steps. The parallel strategy lives entirely in the shardings they are jitted
with; the math here is the single-device math."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxpar.models.llama import cross_entropy
from jaxpar.parallel.rules import constrain, logical_to_spec
from jaxpar.train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def loss_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(summed cross-entropy, number of target tokens); padding (segment 0) is not counted."""
    with nnx.use_eager_sharding(False):
        model = nnx.merge(graphdef, params)
    logits_BTV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return cross_entropy(logits_BTV, batch["targets"], batch["segment_ids"] != 0)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, T] -> [n, B/n, T], microbatch j taking rows j, j+n, ...: every microbatch is spread over all
    batch shards instead of living on a few devices."""

    def split(x_BT):
        x_bnT = x_BT.reshape(x_BT.shape[0] // n, n, *x_BT.shape[1:])
        return constrain(jnp.swapaxes(x_bnT, 0, 1), (None, "batch", None))

    return jax.tree.map(split, batch)


def loss_and_grads(params, graphdef, batch: Batch, grad_accum_steps: int = 1, grad_shardings=None):
    """Mean token loss and its gradient over the whole batch. Sums are accumulated across microbatches
    and divided once, so accumulation is exact (not a mean of per-microbatch means).

    `grad_shardings` (the parameters' shardings) pins each gradient to its parameter's layout: under FSDP
    that makes the gradient reduction a reduce-scatter, and accumulation happens on shards."""
    value_and_grad = jax.value_and_grad(loss_sums, has_aux=True)

    def grad_fn(params, graphdef, batch):
        (loss_sum, count), grads = value_and_grad(params, graphdef, batch)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return (loss_sum, count), grads

    if grad_accum_steps == 1:
        (loss_sum, count), grads = grad_fn(params, graphdef, batch)
    else:
        def accumulate(carry, microbatch):
            (loss_sum, count), grads = grad_fn(params, graphdef, microbatch)
            return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

        zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
        (loss_sum, count, grads), _ = jax.lax.scan(
            accumulate, zeros, _split_microbatches(batch, grad_accum_steps))
    count = jnp.maximum(count, 1.0)
    return loss_sum / count, jax.tree.map(lambda g: (g / count).astype(g.dtype), grads), count


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum_steps: int = 1, param_shardings=None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    def train_step(state: TrainState, batch: Batch):
        loss, grads, tokens = loss_and_grads(state.params, graphdef, batch, grad_accum_steps, param_shardings)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": tokens,
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    def eval_step(params, batch: Batch):
        return loss_sums(params, graphdef, batch)

    return eval_step


def jit_train_step(train_step, mesh: Mesh, state_shardings):
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, logical_to_spec(()))),
        donate_argnums=0,
    )


def jit_eval_step(eval_step, mesh: Mesh, state_shardings):
    return jax.jit(eval_step, in_shardings=(state_shardings.params, batch_sharding(mesh)))

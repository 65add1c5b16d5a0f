"""Pure train and eval steps. The parallel strategy lives entirely in the shardings they are jitted
with; the math here is the single-device math."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxpar.models import medusa
from jaxpar.models.llama import cross_entropy
from jaxpar.parallel.rules import constrain, logical_to_spec
from jaxpar.train import offload
from jaxpar.train.state import TrainState

Batch = dict[str, jax.Array]
BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", None)))


def loss_sums(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch):
    """(objective summed over tokens, (summed cross-entropy, number of target tokens, router stats)).

    Padding (segment 0) is not counted. The objective adds the MoE auxiliary losses (per-token means,
    weighted by the token count so that sums over microbatches stay exact)."""
    with nnx.use_eager_sharding(False):
        model = nnx.merge(graphdef, params)
    if model.medusa is not None:  # Medusa-1: the heads' loss on the frozen base
        return medusa.loss_sums(model, batch)
    logits_BTV, stats = model.forward_with_stats(batch["inputs"], batch["positions"], batch["segment_ids"])
    ce_sum, count = cross_entropy(logits_BTV, batch["targets"], batch["segment_ids"] != 0)
    objective = ce_sum
    if stats:
        moe = model.cfg.moe
        aux = moe.aux_loss_coef * jnp.sum(stats["aux_loss"]) + moe.z_loss_coef * jnp.sum(stats["z_loss"])
        objective = objective + count * aux
    return objective, (ce_sum, count, stats)


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...], microbatch j taking rows j, j+n, ...: every microbatch is spread over
    all batch shards instead of living on a few devices. (Gradient accumulation and the pipeline.)"""

    def split(x):
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        return constrain(jnp.swapaxes(x, 0, 1), (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def loss_and_grads(params, graphdef, batch: Batch, grad_accum_steps: int = 1, grad_shardings=None):
    """Mean token loss and its gradient over the whole batch. Sums are accumulated across microbatches
    and divided once, so accumulation is exact (not a mean of per-microbatch means).

    `grad_shardings` (the parameters' shardings) pins each gradient to its parameter's layout: under FSDP
    that makes the gradient reduction a reduce-scatter, and accumulation happens on shards."""
    value_and_grad = jax.value_and_grad(loss_sums, has_aux=True)

    def grad_fn(params, batch):
        (_, (ce_sum, count, stats)), grads = value_and_grad(params, graphdef, batch)
        if grad_shardings is not None:
            grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        return (ce_sum, count, stats), grads

    if grad_accum_steps == 1:
        (ce_sum, count, stats), grads = grad_fn(params, batch)
    else:

        def accumulate(carry, microbatch):
            return jax.tree.map(jnp.add, carry, grad_fn(params, microbatch)), None

        microbatches = split_microbatches(batch, grad_accum_steps)
        zeros = jax.tree.map(
            jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], microbatches))
        )
        ((ce_sum, count, stats), grads), _ = jax.lax.scan(accumulate, zeros, microbatches)
        stats = {k: v if k == "tokens_per_expert" else v / grad_accum_steps for k, v in stats.items()}
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
    return ce_sum / count, grads, count, stats


def rebalance_router_bias(params, tokens_per_expert_LE, rate: float):
    """Auxiliary-loss-free balancing (DeepSeek-V3): raise the selection bias of under-loaded experts and
    lower it for over-loaded ones by a fixed step."""
    step_LE = rate * jnp.sign(jnp.mean(tokens_per_expert_LE, axis=-1, keepdims=True) - tokens_per_expert_LE)
    return jax.tree.map_with_path(
        lambda path, x: x + step_LE if "router_bias" in jax.tree_util.keystr(path) else x, params
    )


def moe_metrics(stats) -> dict:
    """Router statistics for metrics.jsonl: means over layers, loads summed over layers."""
    if not stats:
        return {}
    load_E = jnp.sum(stats["tokens_per_expert"], axis=0)
    return {
        "moe_aux_loss": jnp.mean(stats["aux_loss"]),
        "moe_z_loss": jnp.mean(stats["z_loss"]),
        "moe_dropped_fraction": jnp.mean(stats["dropped_fraction"]),
        "moe_max_load_over_mean": jnp.max(load_E) / jnp.maximum(jnp.mean(load_E), 1.0),
        "moe_tokens_per_expert": load_E,
    }


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum_steps: int = 1,
    param_shardings=None,
    router_bias_rate: float = 0.0,
    loss_and_grads_fn=None,
    offloaded_opt_state=None,
    host_params: offload.HostParams | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`loss_and_grads_fn` replaces `loss_and_grads` with another schedule of the same math (the
    pipelined one: jaxpar.train.pipeline.make_pipelined_loss_and_grads). `offloaded_opt_state`: the
    optimizer state's device shardings when it is stored in host memory (jaxpar.train.offload); it is
    copied onto the device for the update. `host_params`: set when the parameters are stored in host
    memory (`param_shardings` are then their device shardings, which the gradients take)."""
    loss_and_grads_fn = loss_and_grads_fn or loss_and_grads

    def train_step(state: TrainState, batch: Batch):
        params = state.params if host_params is None else host_params.for_forward(state.params)
        loss, grads, tokens, stats = loss_and_grads_fn(
            params, graphdef, batch, grad_accum_steps, param_shardings
        )
        opt_state = state.opt_state
        if offloaded_opt_state is not None:
            opt_state = offload.to_device(opt_state, offloaded_opt_state)
        params = state.params
        if host_params is not None:
            params, grads = host_params.for_update(params, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if router_bias_rate:
            params = rebalance_router_bias(params, stats["tokens_per_expert"], router_bias_rate)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "tokens": tokens,
            **moe_metrics(stats),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(
    graphdef, host_params: offload.HostParams | None = None
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array]]:
    def eval_step(params, batch: Batch):
        if host_params is not None:
            params = host_params.for_forward(params)
        _, (ce_sum, count, _) = loss_sums(params, graphdef, batch)
        return ce_sum, count

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

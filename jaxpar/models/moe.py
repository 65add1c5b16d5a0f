"""Mixture-of-experts MLP: top-k router (softmax or sigmoid), SwiGLU experts, optional shared experts,
Switch/GShard load-balancing loss, router z-loss, or DeepSeek-V3 auxiliary-loss-free bias balancing.

Expert weights carry the logical "expert" axis. Under a mesh the layer runs inside `jax.shard_map`
(tokens split over the batch axes, experts over "expert", expert hidden units over "tensor") and the
hand-written dispatch in jaxpar/parallel/moe.py moves tokens with all-to-all.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxpar.config import ModelConfig, MoEConfig
from jaxpar.models.params import param, residual_out_std
from jaxpar.parallel import moe as dispatch
from jaxpar.parallel.rules import constrain, logical_to_spec, mesh_axes


class RouterBias(nnx.Variable):
    """Selection bias of auxiliary-loss-free balancing: moved by load statistics, not by gradients."""


def route(logits_NE, bias_E, cfg: MoEConfig):
    """(expert_NK, weight_NK, scores_NE). The bias only changes which experts are picked, never the
    weights (DeepSeek-V3)."""
    scores_NE = jax.nn.softmax(logits_NE, axis=-1) if cfg.router == "softmax" else jax.nn.sigmoid(logits_NE)
    _, expert_NK = jax.lax.top_k(scores_NE + bias_E, cfg.top_k)
    weight_NK = jnp.take_along_axis(scores_NE, expert_NK, axis=-1)
    if cfg.router == "sigmoid" or (cfg.top_k > 1 and cfg.normalize_weights):
        weight_NK = weight_NK / jnp.sum(weight_NK, axis=-1, keepdims=True)
    return expert_NK, weight_NK, scores_NE


def load_balancing_loss(tokens_per_expert_E, mean_scores_E):
    """Switch Transformer / GShard: E * sum_e f_e * P_e, with f_e the fraction of (token, choice)
    assignments sent to expert e and P_e the mean router score of e; 1 for a perfectly uniform router."""
    E = tokens_per_expert_E.shape[0]
    fraction_E = tokens_per_expert_E / jnp.maximum(jnp.sum(tokens_per_expert_E), 1.0)
    return E * jnp.sum(fraction_E * mean_scores_E)


def router_z_loss(logits_NE):
    """ST-MoE: mean squared log-partition, keeping router logits small."""
    return jnp.mean(jax.nn.logsumexp(logits_NE, axis=-1) ** 2)


def capacity(cfg: MoEConfig, tokens: int) -> int:
    return max(1, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.experts))


def _swiglu_grouped(x_GD, group_sizes, w_gate_EDF, w_up_EDF, w_down_EFD, tensor_axis):
    gate = jax.lax.ragged_dot(x_GD, w_gate_EDF, group_sizes)
    up = jax.lax.ragged_dot(x_GD, w_up_EDF, group_sizes)
    y_GD = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down_EFD, group_sizes)
    return y_GD if tensor_axis is None else jax.lax.psum(y_GD, tensor_axis)


def _swiglu_batched(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD, tensor_axis):
    gate = jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)
    up = jnp.einsum("ecd,edf->ecf", x_ECD, w_up_EDF)
    y_ECD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w_down_EFD)
    return y_ECD if tensor_axis is None else jax.lax.psum(y_ECD, tensor_axis)


def moe_local(
    x_ND,
    router_DE,
    bias_E,
    w_gate_EDF,
    w_up_EDF,
    w_down_EFD,
    *,
    cfg: MoEConfig,
    expert_axis=None,
    tensor_axis=None,
    token_axes=(),
):
    """The layer on one device's tokens. Statistics are reduced over `token_axes`, so the auxiliary
    losses are those of the whole batch whatever the sharding."""
    N = x_ND.shape[0]
    logits_NE = x_ND.astype(jnp.float32) @ router_DE.astype(jnp.float32)
    expert_NK, weight_NK, scores_NE = route(logits_NE, bias_E, cfg)
    total = partial(jax.lax.psum, axis_name=token_axes) if token_axes else (lambda v: v)

    weights = (w_gate_EDF, w_up_EDF, w_down_EFD)
    if cfg.capacity_factor == 0:
        y_AD = dispatch.dispatch_dropless(
            jnp.repeat(x_ND, cfg.top_k, axis=0),
            expert_NK.reshape(-1),
            cfg.experts,
            partial(
                _swiglu_grouped,
                w_gate_EDF=weights[0],
                w_up_EDF=weights[1],
                w_down_EFD=weights[2],
                tensor_axis=tensor_axis,
            ),
            expert_axis,
        )
        y_NKD = y_AD.reshape(N, cfg.top_k, -1)
        kept_NK = jnp.ones(expert_NK.shape, bool)
    else:
        y_NKD, kept_NK = dispatch.dispatch_capacity(
            x_ND,
            expert_NK,
            capacity(cfg, N),
            cfg.experts,
            partial(
                _swiglu_batched,
                w_gate_EDF=weights[0],
                w_up_EDF=weights[1],
                w_down_EFD=weights[2],
                tensor_axis=tensor_axis,
            ),
            expert_axis,
        )
    y_ND = jnp.einsum("nkd,nk->nd", y_NKD, (weight_NK * kept_NK).astype(y_NKD.dtype))

    tokens_per_expert_E = total(jnp.sum(jax.nn.one_hot(expert_NK, cfg.experts), axis=(0, 1)))
    all_tokens = total(jnp.asarray(N, jnp.float32))
    stats = {
        "aux_loss": load_balancing_loss(tokens_per_expert_E, total(jnp.sum(scores_NE, 0)) / all_tokens),
        "z_loss": total(router_z_loss(logits_NE) * N) / all_tokens,
        "tokens_per_expert": tokens_per_expert_E,
        "dropped_fraction": 1.0 - total(jnp.sum(kept_NK)) / (all_tokens * cfg.top_k),
    }
    return y_ND, stats


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        m = cfg.moe
        self.cfg = m
        D, E, F = cfg.d_model, m.experts, m.d_ff
        out_std = residual_out_std(cfg)
        self.router = param(rngs, (D, E), ("embed", None), cfg.init_std, "float32")
        self.router_bias = RouterBias(jnp.zeros((E,), jnp.float32), out_sharding=(None,))
        self.w_gate = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), out_std, cfg.param_dtype)

    def __call__(self, x_BTD):
        B, T, D = x_BTD.shape
        dtype = x_BTD.dtype
        args = (
            self.router[...],
            self.router_bias[...],
            *(w[...].astype(dtype) for w in (self.w_gate, self.w_up, self.w_down)),
        )
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            y_ND, stats = moe_local(x_BTD.reshape(B * T, D), *args, cfg=self.cfg)
            return y_ND.reshape(B, T, D), stats

        x_BTD = constrain(x_BTD, ("batch", "length", "act_embed"))
        x_spec = logical_to_spec(("batch", "length", None))
        token_axes = mesh_axes("batch") + mesh_axes("length")

        def local(x_BTD, *args):
            b, t, _ = x_BTD.shape
            y_ND, stats = moe_local(
                x_BTD.reshape(b * t, D),
                *args,
                cfg=self.cfg,
                expert_axis="expert",
                tensor_axis="tensor",
                token_axes=token_axes,
            )
            return y_ND.reshape(b, t, D), stats

        weight_spec = logical_to_spec(("expert", None, "mlp"))
        down_spec = logical_to_spec(("expert", "mlp", None))
        return jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(x_spec, P(), P(), weight_spec, weight_spec, down_spec),
            out_specs=(x_spec, P()),
        )(x_BTD, *args)

"""The optimizer and its learning-rate schedule, from an OptimizerConfig."""

from __future__ import annotations

import jax
import optax

from jaxpar.config import OptimizerConfig

# Parameters whose path contains one of these are not weight-decayed: norm scales and the MoE router's
# selection bias are not weights.
NO_DECAY = ("scale", "router_bias")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=max(total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def _decay_mask(params):
    return jax.tree.map_with_path(
        lambda path, _: not any(name in jax.tree_util.keystr(path) for name in NO_DECAY), params
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=_decay_mask,
        ),
    )

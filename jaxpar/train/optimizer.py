"""The optimizer and its learning-rate schedule, from an OptimizerConfig.

`name` = "adamw" is AdamW on every parameter. "muon", "galore_adamw" and "soap" update the weight
matrices (chosen by logical axis names: jaxpar.train.optimizers.matrices) with their own rule and keep
AdamW for the rest, under one schedule and one global-norm clip.

`train_only` names a top-level parameter subtree ("medusa": a Medusa-1 run, jaxpar.models.medusa): only
it is updated, every other parameter gets a zero update (optax.set_to_zero, through optax.multi_transform
by parameter path) and keeps no optimizer state, so a frozen base stays bitwise as loaded and costs no
moments. `for_run` decides it from the run config; everything that builds a run's optimizer (training,
restoring its checkpoints) goes through it so the state's structure always matches."""

from __future__ import annotations

import jax
import optax

from jaxpar.config import OptimizerConfig, RunConfig
from jaxpar.models import medusa
from jaxpar.train.optimizers import galore, matrices, muon, soap

# Parameters whose path contains one of these are not weight-decayed: norm scales and the MoE router's
# selection bias are not weights.
NO_DECAY = ("scale", "router_bias")

# config.optimizer.name -> the update of the matrix parameters, (cfg, schedule) -> GradientTransformation.
MATRIX_UPDATES = {"muon": muon.muon, "galore_adamw": galore.galore_adamw, "soap": soap.soap}


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


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int, train_only: str | None = None
) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask
    )
    if cfg.name == "adamw":
        update = adamw
    else:
        update = optax.partition(
            {matrices.MATRIX: MATRIX_UPDATES[cfg.name](cfg, schedule), matrices.OTHER: adamw},
            matrices.labels,
        )
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), update)
    if train_only is None:
        return tx

    def labels(params):
        return jax.tree.map_with_path(
            lambda path, _: "train" if getattr(path[0], "key", None) == train_only else "frozen", params
        )

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def for_run(run: RunConfig) -> optax.GradientTransformation:
    """The optimizer of a training run: with model.medusa_heads, the heads only (the base frozen)."""
    heads_only = medusa.PARAM_NAME if run.model.medusa_heads else None
    return make_optimizer(run.optimizer, run.train.steps, heads_only)

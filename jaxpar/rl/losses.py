"""PPO's clipped objective, clipped value loss and entropy bonus over a minibatch of samples."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxpar.rl.config import AlgoConfig


def categorical_log_prob(logits, actions):
    logp_all = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp_all, actions[..., None].astype(jnp.int32), axis=-1)[..., 0], logp_all


def ppo_loss(logits, values, batch: dict, cfg: AlgoConfig):
    """(total loss, metrics). `batch` holds the rollout's actions, log_probs, values, advantages and
    returns, shaped like `values`; means are over every element (every agent of every sample)."""
    log_prob, logp_all = categorical_log_prob(logits, batch["actions"])
    advantages = batch["advantages"]
    if cfg.normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    log_ratio = log_prob - batch["log_probs"]
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    policy_loss = -jnp.mean(jnp.minimum(ratio * advantages, clipped_ratio * advantages))

    value_error = jnp.square(values - batch["returns"])
    if cfg.clip_value:
        clipped = batch["values"] + jnp.clip(values - batch["values"], -cfg.clip_eps, cfg.clip_eps)
        value_error = jnp.maximum(value_error, jnp.square(clipped - batch["returns"]))
    value_loss = 0.5 * jnp.mean(value_error)

    entropy = jnp.mean(-jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1))
    total = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
    metrics = {
        "policy_loss": policy_loss,
        "value_loss": value_loss,
        "entropy": entropy,
        "approx_kl": jnp.mean((ratio - 1.0) - log_ratio),
        "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > cfg.clip_eps).astype(jnp.float32)),
    }
    return total, metrics

"""Parameter creation with logical axis names (the only sharding a model states)."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, names, std, dtype) -> nnx.Param:
    """Normal(0, std) initialised in float32, stored in `dtype`, named by logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=names)


def residual_out_std(cfg) -> float:
    """Init std of a projection back into the residual stream: smaller with depth (std / sqrt(2 * layers)),
    as GPT-2 does."""
    return cfg.init_std / (2 * cfg.n_layers) ** 0.5


def rms_norm(x, scale, eps: float):
    """x / rms(x) * scale over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def attention_projections(cfg, rngs: nnx.Rngs) -> tuple[nnx.Param, ...]:
    """(wq [D, N, H], wk and wv [D, K, H], wo [N, H, D]) of an attention-like token mixer."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out_std = residual_out_std(cfg)
    return (
        param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg.init_std, cfg.param_dtype),
        param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype),
        param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype),
        param(rngs, (N, H, D), ("heads", "head_dim", "embed"), out_std, cfg.param_dtype),
    )

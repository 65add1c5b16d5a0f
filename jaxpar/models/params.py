"""Parameter creation with logical axis names (the only sharding a model states)."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, names, std, dtype) -> nnx.Param:
    """Normal(0, std) initialised in float32, stored in `dtype`, named by logical axes."""
    value = std * jax.random.normal(rngs.params(), shape, dtype=jnp.float32)
    return nnx.Param(value.astype(dtype), out_sharding=names)


def attention_projections(cfg, rngs: nnx.Rngs) -> tuple[nnx.Param, ...]:
    """(wq [D, N, H], wk and wv [D, K, H], wo [N, H, D]) of an attention-like token mixer; the output
    projection starts smaller with depth (std / sqrt(2 * layers)), as GPT-2 does for residual outputs."""
    D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    return (param(rngs, (D, N, H), ("embed", "heads", "head_dim"), cfg.init_std, cfg.param_dtype),
            param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype),
            param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.init_std, cfg.param_dtype),
            param(rngs, (N, H, D), ("heads", "head_dim", "embed"), out_std, cfg.param_dtype))

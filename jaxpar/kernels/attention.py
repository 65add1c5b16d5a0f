"""The one attention API. Implementations are chosen by name; `xla` is the pure-jnp reference that
runs everywhere (the Pallas kernels plug in beside it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, scale=None):
    """Grouped-query attention in plain jnp: N query heads share K = N / G key/value heads.

    Segment ids keep packed documents apart. Softmax runs in float32 whatever the input dtype. A row
    whose keys are all masked cannot occur: every token may attend to itself (padding has segment 0,
    which matches itself).
    """
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if N % K:
        raise ValueError(f"query heads {N} are not a multiple of key/value heads {K}")
    scale = H**-0.5 if scale is None else scale
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
    logits_BKGTS = logits_BKGTS * scale
    S = k_BSKH.shape[1]
    mask_BTS = jnp.ones((B, T, S), dtype=bool)
    if causal:
        mask_BTS &= jnp.arange(T)[:, None] >= jnp.arange(S)[None, :]
    if segment_ids_BT is not None:
        mask_BTS &= segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


def attention(q_BTNH, k_BSKH, v_BSKH, *, segment_ids_BT=None, causal=True, implementation="xla"):
    if implementation == "xla":
        return xla_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT=segment_ids_BT, causal=causal)
    raise ValueError(f"attention implementation {implementation!r} is unknown; choose one of {IMPLEMENTATIONS}.")

"""Medusa-1 decoding heads (Cai et al. 2024) on a frozen base model's final hidden state.

Head k (k = 1..K) reads the final normed hidden state h_t of position t and predicts token t + k + 1 (the
base model's own unembedding predicts t + 1):

    logits_k = unembed(h_t + SiLU(h_t W_k + b_k))

one residual SiLU block per head, then the BASE model's unembedding, shared and frozen (the paper gives
each head its own copy of the vocabulary projection; sharing it keeps a head at D x D + D parameters
instead of D x (D + V), and the zero-initialised block makes every head start out predicting exactly what
the base predicts for t + 1, the paper's starting point).

The heads live on the Transformer as `model.medusa` (config.model.medusa_heads = K), so a Medusa run's
parameter tree is the base's plus one "medusa" subtree: a base checkpoint restores into it by path
(train.init_from) and jaxpar.train.optimizer freezes everything outside it. `loss_sums` is the training
objective (jaxpar.train.step uses it for such models); jaxpar.infer.medusa decodes with the heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.config import ModelConfig

# The parameter subtree holding the heads: the only parameters a Medusa run trains.
PARAM_NAME = "medusa"


class MedusaHeads(nnx.Module):
    def __init__(self, cfg: ModelConfig):
        K, D = cfg.medusa_heads, cfg.d_model
        # Zero-initialised: every head starts as the identity on the hidden state (Medusa's init).
        self.w = nnx.Param(jnp.zeros((K, D, D), cfg.param_dtype), out_sharding=(None, "embed", None))
        self.b = nnx.Param(jnp.zeros((K, D), cfg.param_dtype), out_sharding=(None, "norm"))

    def __call__(self, h_BTD):
        """The heads' hidden states [K, B, T, D] (before the shared unembedding)."""
        dtype = h_BTD.dtype
        y_KBTD = jnp.einsum("btd,kde->kbte", h_BTD, self.w[...].astype(dtype))
        return h_BTD[None] + jax.nn.silu(y_KBTD + self.b[...].astype(dtype)[:, None, None])


def head_logits(model, h_BTD):
    """Logits of every head [K, B, T, V] (float32) from the base's final normed hidden state."""
    heads_KBTD = model.medusa(h_BTD)
    K, B, T, D = heads_KBTD.shape
    return model.logits(heads_KBTD.reshape(K * B, T, D)).reshape(K, B, T, -1)


def shifted_targets(targets_BT, segment_ids_BT, shift: int):
    """(targets, mask) of a head predicting `shift` tokens past the base's target: position t takes the
    base's target at t + shift, counted where t is real and t + shift lies in the same document."""
    T = targets_BT.shape[1]
    pad = jnp.zeros_like(targets_BT[:, :shift])
    later_BT = jnp.concatenate([targets_BT[:, shift:], pad], axis=1)
    later_segment_BT = jnp.concatenate([segment_ids_BT[:, shift:], pad], axis=1)
    mask_BT = (segment_ids_BT != 0) & (later_segment_BT == segment_ids_BT) & (jnp.arange(T) < T - shift)
    return later_BT, mask_BT


def loss_sums(model, batch):
    """The heads' objective in jaxpar.train.step's form: (summed loss, (summed loss, base target count,
    {})). The summed loss adds every head's token cross-entropy (head k at offset k + 1); dividing by the
    base's target count (as the train step does) makes it the sum over heads of each head's mean, up to
    the few positions a head has no target for. The base's hidden state is a constant (stop_gradient):
    its parameters get zero gradients and the backward pass stops at the heads."""
    from jaxpar.models.llama import cross_entropy  # llama imports this module

    h_BTD, _, _ = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], None)
    logits_KBTV = head_logits(model, jax.lax.stop_gradient(h_BTD))
    total = 0.0
    for k in range(logits_KBTV.shape[0]):
        targets_BT, mask_BT = shifted_targets(batch["targets"], batch["segment_ids"], k + 1)
        total = total + cross_entropy(logits_KBTV[k], targets_BT, mask_BT)[0]
    count = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
    return total, (total, count, {})

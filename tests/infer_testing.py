"""Shared pieces for inference tests: small random models of every mixer, and the no-cache reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpar.config import ModelConfig, MoEConfig
from jaxpar.infer import model as model_lib
from jaxpar.models.llama import Transformer

BASE = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
MODELS = {
    "dense": ModelConfig(n_layers=2, **BASE),
    "sliding_window": ModelConfig(n_layers=2, sliding_window=5, **BASE),
    "moe": ModelConfig(n_layers=2, moe=MoEConfig(experts=4, top_k=2, d_ff=32, capacity_factor=1.0), **BASE),
    "moe_mixed": ModelConfig(  # a dense layer, then groups of (dense, MoE with a gated shared expert)
        n_layers=3,
        moe=MoEConfig(
            experts=4, top_k=2, d_ff=32, first_dense=1, every=2, shared_experts=1, shared_gate=True
        ),
        **BASE,
    ),
    "linear": ModelConfig(n_layers=2, mixer="linear", linear_chunk=8, **BASE),
    "hybrid": ModelConfig(n_layers=4, mixer="hybrid", softmax_every=2, linear_chunk=8, **BASE),
}


def random_params(cfg: ModelConfig, seed: int = 0):
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, rngs=nnx.Rngs(seed))
    return nnx.state(model)


def loaded(cfg: ModelConfig, mesh=None, tokenizer=None, seed: int = 0) -> model_lib.LoadedModel:
    mesh = model_lib.inference_mesh() if mesh is None else mesh
    return model_lib.from_params(cfg, random_params(cfg, seed), mesh, tokenizer)


@functools.cache
def _forward(graphdef):
    def forward(params, tokens_BT):
        B, T = tokens_BT.shape
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        return nnx.merge(graphdef, params)(tokens_BT, positions, jnp.zeros_like(tokens_BT))

    return jax.jit(forward)


def full_logits(model: model_lib.LoadedModel, tokens_BT) -> np.ndarray:
    """Logits of a plain forward over whole sequences (no cache), float32 numpy."""
    with jax.set_mesh(model.mesh):
        return np.asarray(_forward(model.graphdef)(model.params, jnp.asarray(tokens_BT, jnp.int32)))


def greedy_reference(model: model_lib.LoadedModel, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a full forward of everything so far (no cache; the row is padded past its
    final length, which causal attention never looks at, so one program serves every step: lengths are
    rounded up to a multiple of 32, so one program also serves most prompts of a model)."""
    width = max(min(-(-(len(prompt) + n) // 32) * 32, model.cfg.max_seq_len), len(prompt) + n)
    ids = np.zeros((1, width), np.int32)
    ids[0, : len(prompt)] = prompt
    for t in range(len(prompt), len(prompt) + n):
        ids[0, t] = int(np.argmax(full_logits(model, ids)[0, t - 1]))
    return ids[0, len(prompt) : len(prompt) + n].tolist()

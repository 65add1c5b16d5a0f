"""Decoder-only LM, Llama style: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameters and activations carry logical axis names only (see jaxpar/parallel/rules.py). The layers
are stacked on a leading "layers" axis and run by `jax.lax.scan`, so compile time does not grow with
depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxpar.config import ModelConfig
from jaxpar.models.linear_attention import LinearAttention
from jaxpar.models.medusa import MedusaHeads
from jaxpar.models.moe import MoE
from jaxpar.models.params import attention_projections, param as _param, residual_out_std, rms_norm
from jaxpar.parallel.memory import to_device
from jaxpar.parallel.rules import constrain
from jaxpar.parallel.sequence import sequence_attention

RESIDUAL = ("batch", "length_sp", "act_embed")
FULL_LENGTH = ("batch", "length", "act_embed")


def remat_policy(cfg: ModelConfig):
    """The jax.checkpoint policy of config.model.remat (not "none"). The names-based ones act on the
    activations a block tags with `checkpoint_name` (jaxpar.config.REMAT_NAMES)."""
    names = cfg.remat_name_list
    return {
        "full": lambda: jax.checkpoint_policies.nothing_saveable,
        "save_dots": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        # save_dots' residuals kept in pinned host memory instead of the device's
        "offload": lambda: jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
        # model.remat_names kept on the device, everything else recomputed
        "save_names": lambda: jax.checkpoint_policies.save_only_these_names(*names),
        # model.remat_names kept in pinned host memory, everything else recomputed
        "offload_names": lambda: jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(),
            names_which_can_be_offloaded=names,
            offload_src="device",
            offload_dst="pinned_host",
        ),
    }[cfg.remat]()


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x_BTD):
        return rms_norm(x_BTD, self.scale[...], self.eps)


def rope_frequencies(cfg: ModelConfig):
    """The rotary angular frequencies [head_dim // 2], float32: theta^(-i / half), and with
    rope_scaling="llama3" Llama 3.1's stretch: waves longer than original_max_len / low_freq_factor slowed
    by rope_factor, shorter than original_max_len / high_freq_factor kept, a linear blend between."""
    half = cfg.head_dim // 2
    freqs_F = cfg.rope_theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if cfg.rope_scaling == "none":
        return freqs_F
    wavelength_F = 2 * jnp.pi / freqs_F
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    blend_F = (cfg.rope_original_max_len / wavelength_F - low) / (high - low)
    blended_F = (1 - blend_F) * freqs_F / cfg.rope_factor + blend_F * freqs_F
    long_waves_F = wavelength_F > cfg.rope_original_max_len / low
    short_waves_F = wavelength_F < cfg.rope_original_max_len / high
    return jnp.where(long_waves_F, freqs_F / cfg.rope_factor, jnp.where(short_waves_F, freqs_F, blended_F))


def rope(x_BTNH, positions_BT, freqs_F):
    """Rotary embedding on the two halves of the head dimension (Llama layout)."""
    angles_BTF = positions_BT[..., None].astype(jnp.float32) * freqs_F
    sin, cos = jnp.sin(angles_BTF)[:, :, None], jnp.cos(angles_BTF)[:, :, None]
    x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


class Attention(nnx.Module):
    """Grouped-query softmax attention; optional q/k/v biases (Qwen2) and q/k RMSNorm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wq, self.wk, self.wv, self.wo = attention_projections(cfg, rngs)
        N, K, H, zeros = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, jnp.zeros
        if cfg.attention_bias:
            self.bq = nnx.Param(zeros((N, H), cfg.param_dtype), out_sharding=("heads", "head_dim"))
            self.bk = nnx.Param(zeros((K, H), cfg.param_dtype), out_sharding=("kv_heads", "head_dim"))
            self.bv = nnx.Param(zeros((K, H), cfg.param_dtype), out_sharding=("kv_heads", "head_dim"))
        if cfg.qk_norm:
            self.q_norm = RMSNorm(H, cfg.norm_eps, cfg.param_dtype)
            self.k_norm = RMSNorm(H, cfg.norm_eps, cfg.param_dtype)

    def _project(self, x_BTD, which: str, positions_BT, heads: str):
        """`which` of "q", "k", "v" as [B, T, heads, H]: the projection, its bias, then for q and k the
        norm and RoPE."""
        cfg = self.cfg
        w = getattr(self, f"w{which}")
        y_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, w[...].astype(x_BTD.dtype))
        if cfg.attention_bias:
            y_BTNH = y_BTNH + getattr(self, f"b{which}")[...].astype(x_BTD.dtype)
        if which != "v":
            if cfg.qk_norm:
                y_BTNH = getattr(self, f"{which}_norm")(y_BTNH)
            y_BTNH = rope(y_BTNH, positions_BT, rope_frequencies(cfg))
        return checkpoint_name(constrain(y_BTNH, ("batch", "length", heads, "head_dim")), "qkv")

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        """The attention output [B, T, D]. With a `cache` (a KV cache of this layer, e.g.
        jaxpar.infer.cache.KVCache, holding the keys and values of earlier tokens), the new tokens' keys and
        values are written into it at positions_BT, the queries attend over it, and the result is
        (output, updated cache)."""
        cfg, dtype = self.cfg, x_BTD.dtype
        q_BTNH = self._project(x_BTD, "q", positions_BT, "heads")
        k_BTKH = self._project(x_BTD, "k", positions_BT, "kv_heads")
        v_BTKH = self._project(x_BTD, "v", positions_BT, "kv_heads")
        window = cfg.sliding_window or None
        if cache is not None:
            out_BTNH, cache = cache.attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, window=window)
            return self._project_out(out_BTNH, dtype), cache
        # Plain `attention` unless the mesh splits the sequence; then the configured variant.
        out_BTNH = sequence_attention(
            q_BTNH,
            k_BTKH,
            v_BTKH,
            segment_ids=segment_ids_BT,
            causal=True,
            window=window,
            implementation=cfg.attention_impl,
            variant=cfg.sequence_parallel,
            ulysses_degree=cfg.ulysses_degree,
        )
        return self._project_out(out_BTNH, dtype)

    def _project_out(self, out_BTNH, dtype):
        out_BTNH = checkpoint_name(constrain(out_BTNH, ("batch", "length", "heads", "head_dim")), "attention")
        out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, self.wo[...].astype(dtype))
        return constrain(out_BTD, RESIDUAL)


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, d_ff: int | None = None):
        D, F = cfg.d_model, d_ff or cfg.d_ff
        out_std = residual_out_std(cfg)
        self.w_gate = _param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_up = _param(rngs, (D, F), ("embed", "mlp"), cfg.init_std, cfg.param_dtype)
        self.w_down = _param(rngs, (F, D), ("mlp", "embed"), out_std, cfg.param_dtype)

    def __call__(self, x_BTD):
        dtype = x_BTD.dtype
        gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_gate[...].astype(dtype))
        up_BTF = jnp.einsum("btd,df->btf", x_BTD, self.w_up[...].astype(dtype))
        h_BTF = checkpoint_name(
            constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "mlp")), "mlp_hidden"
        )
        out_BTD = jnp.einsum("btf,fd->btd", h_BTF, self.w_down[...].astype(dtype))
        return constrain(out_BTD, RESIDUAL)


def token_mixer(cfg: ModelConfig, rngs: nnx.Rngs, mixer: str) -> nnx.Module:
    """The attention of a block: softmax attention, or linear attention for mixer="linear"."""
    return LinearAttention(cfg, rngs=rngs) if mixer == "linear" else Attention(cfg, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm attention and MLP sublayers around the residual stream.

    Norm outputs are constrained to the full sequence: under Megatron sequence parallelism that makes
    the activation (not the column-parallel weight) the thing that is all-gathered into each tensor-
    parallel region.

    `forward(x, positions, segment_ids, cache=None) -> (x, statistics, cache)` is the one path; calling
    the block (training) returns x alone, an MoE block (x, statistics)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, mixer: str = "softmax"):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self.attn = token_mixer(cfg, rngs, mixer)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype)
        self._init_mlp(cfg, rngs)

    def _init_mlp(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def forward(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        h_BTD = constrain(self.attn_norm(x_BTD), FULL_LENGTH)
        if cache is None:
            out_BTD = self.attn(h_BTD, positions_BT, segment_ids_BT)
        else:
            out_BTD, cache = self.attn(h_BTD, positions_BT, segment_ids_BT, cache)
        x_BTD = constrain(x_BTD + out_BTD, RESIDUAL)
        h_BTD = constrain(self.mlp_norm(x_BTD), FULL_LENGTH)
        y_BTD, stats = self.feed_forward(h_BTD)
        return constrain(x_BTD + y_BTD, RESIDUAL), stats, cache

    def feed_forward(self, h_BTD):
        return self.mlp(h_BTD), {}

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return self.forward(x_BTD, positions_BT, segment_ids_BT)[0]


class MoEBlock(Block):
    """A block whose MLP is a mixture of experts (plus optional always-on shared experts); returns the
    router statistics beside the activations."""

    def _init_mlp(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.moe = MoE(cfg, rngs=rngs)
        shared_ff = cfg.moe.shared_experts * cfg.moe.d_ff
        self.shared = SwiGLU(cfg, rngs=rngs, d_ff=shared_ff) if shared_ff else None
        self.shared_gate = (  # Qwen2-MoE: sigmoid(h . w) scales the shared experts' output per token
            _param(rngs, (cfg.d_model, 1), ("embed", None), cfg.init_std, cfg.param_dtype)
            if cfg.moe.shared_gate
            else None
        )

    def feed_forward(self, h_BTD):
        y_BTD, stats = self.moe(h_BTD)
        if self.shared is not None:
            shared_BTD = self.shared(h_BTD)
            if self.shared_gate is not None:
                gate_BT1 = jnp.einsum("btd,dg->btg", h_BTD, self.shared_gate[...].astype(h_BTD.dtype))
                shared_BTD = jax.nn.sigmoid(gate_BT1) * shared_BTD
            y_BTD = y_BTD + shared_BTD
        return y_BTD, stats

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return self.forward(x_BTD, positions_BT, segment_ids_BT)[:2]


def _scan_layers(layers: nnx.Module, x_BTD, positions_BT, segment_ids_BT, cache, wrap=None):
    """Runs stacked layers (a vmapped module) over x with lax.scan: (x, statistics stacked over layers,
    the per-layer caches stacked likewise, or None). `wrap` transforms the per-layer function (remat)."""
    graphdef, stacked = nnx.split(layers)

    def layer(x_BTD, params_and_cache):
        params, layer_cache = params_and_cache
        params = to_device(params)  # one layer's parameters in, when they live on the host (config.offload)
        x_BTD, stats, layer_cache = nnx.merge(graphdef, params).forward(
            x_BTD, positions_BT, segment_ids_BT, layer_cache
        )
        return x_BTD, (stats, layer_cache)

    x_BTD, (stats, cache) = jax.lax.scan(wrap(layer) if wrap else layer, x_BTD, (stacked, cache))
    return x_BTD, stats, cache


def _block_type(cfg: ModelConfig) -> type[Block]:
    return MoEBlock if cfg.moe.experts else Block


def _stack(make, n: int, rngs: nnx.Rngs, partition: str | None = "layers"):
    """n modules made by make(rngs), stacked on a leading axis named `partition` (for the rules table)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: partition})
    def stacked(rngs):
        return make(rngs)

    return stacked(rngs)


class InterleavedGroup(nnx.Module):
    """model.moe.every - 1 dense blocks (scanned), then one MoE block: the repeating unit of a model whose
    MoE layers alternate with dense ones. Statistics are the MoE block's (one row per group)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # The group's own stack axis is not split ("layers", the outer one, may be: two would collide).
        self.inner = _stack(lambda r: Block(cfg, rngs=r), cfg.moe.every - 1, rngs, partition=None)
        self.last = MoEBlock(cfg, rngs=rngs)

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return self.forward(x_BTD, positions_BT, segment_ids_BT)[:2]

    def forward(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        """cache: None, or {"inner": the dense blocks' caches stacked, "last": the MoE block's}."""
        inner_cache, last_cache = (None, None) if cache is None else (cache["inner"], cache["last"])
        x_BTD, _, inner_cache = _scan_layers(self.inner, x_BTD, positions_BT, segment_ids_BT, inner_cache)
        x_BTD, stats, last_cache = self.last.forward(x_BTD, positions_BT, segment_ids_BT, last_cache)
        return x_BTD, stats, None if cache is None else {"inner": inner_cache, "last": last_cache}


class HybridGroup(nnx.Module):
    """softmax_every - 1 linear-attention blocks (scanned), then one softmax-attention block. The model
    scans over these groups; statistics come back one row per layer, in layer order."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        block_type = _block_type(cfg)
        # The group's own stack axis is not split ("layers", the outer one, may be: two would collide).
        self.linear = _stack(
            lambda r: block_type(cfg, rngs=r, mixer="linear"), cfg.softmax_every - 1, rngs, None
        )
        self.softmax = block_type(cfg, rngs=rngs, mixer="softmax")

    def __call__(self, x_BTD, positions_BT, segment_ids_BT):
        return self.forward(x_BTD, positions_BT, segment_ids_BT)[:2]

    def forward(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        """cache: None, or {"linear": the linear layers' caches stacked, "softmax": the last layer's}."""
        linear_cache, softmax_cache = (None, None) if cache is None else (cache["linear"], cache["softmax"])
        x_BTD, linear_stats, linear_cache = _scan_layers(
            self.linear, x_BTD, positions_BT, segment_ids_BT, linear_cache
        )
        x_BTD, stats, softmax_cache = self.softmax.forward(x_BTD, positions_BT, segment_ids_BT, softmax_cache)
        stats = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), linear_stats, stats)
        return x_BTD, stats, None if cache is None else {"linear": linear_cache, "softmax": softmax_cache}


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.d_model
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), cfg.init_std, cfg.param_dtype)

        moe = cfg.moe
        if cfg.mixer == "hybrid":
            self.blocks = _stack(lambda r: HybridGroup(cfg, rngs=r), cfg.n_layers // cfg.softmax_every, rngs)
        elif moe.experts and moe.mixed:  # model.moe.first_dense dense layers, then groups of model.moe.every
            groups = (cfg.n_layers - moe.first_dense) // moe.every
            make = (
                (lambda r: InterleavedGroup(cfg, rngs=r))
                if moe.every > 1
                else (lambda r: MoEBlock(cfg, rngs=r))
            )
            self.blocks = _stack(make, groups, rngs)
        else:
            block_type = _block_type(cfg)
            self.blocks = _stack(lambda r: block_type(cfg, rngs=r, mixer=cfg.mixer), cfg.n_layers, rngs)
        self.first = (  # the dense layers before the first MoE layer (model.moe.first_dense), run first
            _stack(lambda r: Block(cfg, rngs=r), moe.first_dense, rngs)
            if moe.experts and moe.first_dense
            else None
        )
        self.final_norm = RMSNorm(D, cfg.norm_eps, cfg.param_dtype)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else _param(rngs, (D, V), ("embed", "vocab"), cfg.init_std, cfg.param_dtype)
        )
        self.medusa = MedusaHeads(cfg) if cfg.medusa_heads else None  # Medusa-1 heads (jaxpar.models.medusa)

    def __call__(self, tokens_BT, positions_BT, segment_ids_BT):
        """Logits in float32, split over the vocabulary on the tensor axis (never whole on one device)."""
        return self.forward_with_stats(tokens_BT, positions_BT, segment_ids_BT)[0]

    def forward_with_stats(self, tokens_BT, positions_BT, segment_ids_BT):
        """(logits_BTV, per-layer statistics stacked over layers: the MoE router's, empty when dense)."""
        return self._forward(tokens_BT, positions_BT, segment_ids_BT, None)[:2]

    def forward_cached(self, tokens_BT, positions_BT, segment_ids_BT, cache):
        """Inference (jaxpar.infer): (logits_BTV of the new tokens, the cache with them added). `cache`
        holds every layer's cache stacked like the layers (the structure jaxpar.infer.cache builds);
        positions_BT are the new tokens' positions; segment_ids_BT is 1 for a real token, 0 for padding
        (linear attention keeps padding out of its recurrent state; softmax attention needs no mask, as
        padding only ever sits after a row's real tokens and is overwritten by the next ones)."""
        logits_BTV, _, cache = self._forward(tokens_BT, positions_BT, segment_ids_BT, cache)
        return logits_BTV, cache

    def _forward(self, tokens_BT, positions_BT, segment_ids_BT, cache):
        x_BTD, stats, cache = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache)
        return self.logits(x_BTD), stats, cache

    def hidden_states(self, tokens_BT, positions_BT, segment_ids_BT, cache=None):
        """(the final normed hidden state [B, T, D], per-layer statistics, cache): what `logits` maps to
        the vocabulary, and what Medusa heads (jaxpar.models.medusa) read."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x_BTD = constrain(jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype), RESIDUAL)
        remat = None
        if cfg.remat != "none" and cache is None:
            remat = functools.partial(jax.checkpoint, policy=remat_policy(cfg), prevent_cse=False)
        if self.first is not None:  # cache: {"first": the dense layers', "rest": the other layers'}
            first_cache, cache = (None, None) if cache is None else (cache["first"], cache["rest"])
            x_BTD, _, first_cache = _scan_layers(
                self.first, x_BTD, positions_BT, segment_ids_BT, first_cache, remat
            )
        x_BTD, stats, cache = _scan_layers(self.blocks, x_BTD, positions_BT, segment_ids_BT, cache, remat)
        if self.first is not None and cache is not None:
            cache = {"first": first_cache, "rest": cache}
        if cfg.mixer == "hybrid":  # [groups, softmax_every, ...] -> [layers, ...]
            stats = jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stats)

        return constrain(self.final_norm(x_BTD), FULL_LENGTH), stats, cache

    def logits(self, x_BTD):
        """Float32 logits [B, T, V] of final normed hidden states, split over the vocabulary."""
        cfg, dtype = self.cfg, x_BTD.dtype
        if cfg.tie_embeddings:
            logits_BTV = jnp.einsum(
                "btd,vd->btv", x_BTD, self.embed[...].astype(dtype), preferred_element_type=jnp.float32
            )
        else:
            logits_BTV = jnp.einsum(
                "btd,dv->btv", x_BTD, self.unembed[...].astype(dtype), preferred_element_type=jnp.float32
            )
        return constrain(logits_BTV, ("batch", "length", "vocab"))


def cross_entropy(logits_BTV, targets_BT, mask_BT, *, axis_name: str | None = None, with_lse: bool = False):
    """Summed token cross-entropy and token count (with_lse: and the per-token log-sum-exp, for a
    hand-written backward). Vocab-parallel: the log-sum-exp and the target logit are reductions over
    the (tensor-sharded) vocabulary, so no device gathers the full logits.

    Inside a shard_map, `axis_name` names a manual mesh axis over which the vocabulary is split in
    contiguous shards (device i holds logits of ids i*V..(i+1)*V-1, V = logits_BTV.shape[-1]); the
    reductions then end in a collective over it."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    vocab = logits_BTV.shape[-1]
    if axis_name is not None:  # ids outside this device's shard get an all-zero one-hot row
        targets_BT = targets_BT - jax.lax.axis_index(axis_name) * vocab

    def over_vocab(reduce, collective, x_BTV):
        x_BT = reduce(x_BTV, axis=-1)
        return x_BT if axis_name is None else collective(x_BT, axis_name)

    # jax.nn.logsumexp's ops in its order, abs included, with the reductions taken over all shards: the
    # program without axis_name compiles to exactly the one jax.nn.logsumexp gave.
    max_BT = over_vocab(functools.partial(jnp.max, initial=-jnp.inf), jax.lax.pmax, logits_BTV)
    max_BT = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_BT), max_BT, 0.0))
    sum_exp_BT = over_vocab(jnp.sum, jax.lax.psum, jnp.exp(logits_BTV - max_BT[..., None]))
    lse_BT = jnp.log(jnp.abs(sum_exp_BT)) + max_BT
    onehot_BTV = jax.nn.one_hot(targets_BT, vocab, dtype=logits_BTV.dtype)
    target_logit_BT = over_vocab(jnp.sum, jax.lax.psum, logits_BTV * onehot_BTV)
    mask_BT = mask_BT.astype(jnp.float32)
    loss_sum = jnp.sum((lse_BT - target_logit_BT) * mask_BT)
    return (loss_sum, jnp.sum(mask_BT), lse_BT) if with_lse else (loss_sum, jnp.sum(mask_BT))

"""Per-layer inference caches, stacked like the model's layers, and where they live on the mesh.

Softmax attention keeps every earlier key and value (`KVCache`, [slots, capacity, kv heads, head dim] per
layer); linear attention keeps its recurrent state (`LinearCache`, [slots, kv heads, head dim, head dim],
float32: O(1) memory and work per token). The model calls `cache.attend(...)` from its mixers
(jaxpar.models.llama.Attention, jaxpar.models.linear_attention.LinearAttention); `init_cache` builds the
tree the model's `forward_cached` scans over, one leading "layers" axis as the parameters have (hybrid
models: per group, the linear layers' caches and the softmax layer's).

Placement follows the rules table: slots over the batch axes, KV heads over "tensor", layers over
"pipeline" (jaxpar.parallel.rules).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding

from jaxpar.config import ModelConfig
from jaxpar.kernels import attention as attention_lib
from jaxpar.kernels.decode_attention import decode_attention
from jaxpar.models.linear_attention import chunked_linear_attention
from jaxpar.parallel import rules
from jaxpar.parallel.per_device import per_device

# With implementation "pallas", the decode kernel serves up to this many new tokens per row (plain
# decoding: 1; speculative verification: a few); longer chunks (prefill) run the flash kernel with a
# position mask.
DECODE_KERNEL_MAX_TOKENS = 16
KV_NAMES = ("layers", "batch", None, "kv_heads", "head_dim")
STATE_NAMES = ("layers", "batch", "kv_heads", None, None)


@struct.dataclass
class KVCache:
    """Keys and values of one softmax-attention layer (a leading layers axis when stacked). Entry j of a
    row holds the token at position j; a row's entries at and after its length are stale or padding and
    never seen, because a query at position p attends to entries j <= p only."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    implementation: str = struct.field(pytree_node=False, default="xla")
    # Tree verification (jaxpar.infer.medusa): which new tokens each new token sees, [B, T, T] (a leading
    # layers axis when stacked); None: the new tokens are a sequence (causal by position).
    new_mask_BTT: jax.Array | None = None

    def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, *, window=None):
        """Writes the new keys and values at positions_BT (contiguous per row; writes past the capacity
        are dropped), then attends the queries over the cache: (out [B, T, N, H], updated cache).
        With `new_mask_BTT` set: see `attend_tree`."""
        if self.new_mask_BTT is not None:
            return self.attend_tree(q_BTNH, k_BTKH, v_BTKH, positions_BT, window=window)
        B, T = positions_BT.shape
        S = self.k_BSKH.shape[1]
        rows_B1 = jnp.arange(B)[:, None]
        k_BSKH = self.k_BSKH.at[rows_B1, positions_BT].set(k_BTKH.astype(self.k_BSKH.dtype), mode="drop")
        v_BSKH = self.v_BSKH.at[rows_B1, positions_BT].set(v_BTKH.astype(self.v_BSKH.dtype), mode="drop")
        k_read, v_read = k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype)
        kv_positions_BS = jnp.broadcast_to(jnp.arange(S, dtype=positions_BT.dtype), (B, S))
        if self.implementation == "xla":  # partitioned by GSPMD
            out_BTNH = attention_lib.attention(
                q_BTNH,
                k_read,
                v_read,
                positions=(positions_BT, kv_positions_BS),
                causal=True,
                window=window,
                implementation="xla",
            )
            return out_BTNH, self.replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)

        def kernel(q, k, v, q_pos, kv_pos):  # per device: Pallas calls are not partitioned by GSPMD
            if T <= DECODE_KERNEL_MAX_TOKENS:  # queries sit at q_pos[:, -1] + 1 - T .. q_pos[:, -1]
                return decode_attention(q, k, v, q_pos[:, -1] + 1, window=window)
            return attention_lib.attention(
                q, k, v, positions=(q_pos, kv_pos), causal=True, window=window, implementation="pallas"
            )

        qkv, rows = ("batch", None, "heads", None), ("batch", None)
        out_BTNH = per_device(
            kernel,
            dict(q=q_BTNH, k=k_read, v=v_read, q_pos=positions_BT, kv_pos=kv_positions_BS),
            dict(q=qkv, k=qkv, v=qkv, q_pos=rows, kv_pos=rows),
            qkv,
            batch=B,
            heads=(q_BTNH.shape[2], k_BTKH.shape[2]),
        )
        return out_BTNH, self.replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)

    def attend_tree(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, *, window=None):
        """Attention of T new tokens that form a tree (candidates of jaxpar.infer.medusa): token t of row
        b sees the cached entries before start_b = positions_BT[b, 0] and the new tokens u with
        new_mask_BTT[b, t, u]; positions_BT (RoPE positions, a token's depth past start_b) may repeat
        between siblings, so the new keys and values are written at consecutive entries start_b ..
        start_b + T - 1, not at their positions (the caller moves the accepted ones into place after).
        Dense, in plain jnp, partitioned by GSPMD on either implementation: the Pallas kernels mask by
        position and segment only, which cannot say "ancestors only"."""
        B, T = positions_BT.shape
        S = self.k_BSKH.shape[1]
        start_B = positions_BT[:, 0]
        rows_B1 = jnp.arange(B)[:, None]
        entries_BT = start_B[:, None] + jnp.arange(T, dtype=start_B.dtype)
        k_BSKH = self.k_BSKH.at[rows_B1, entries_BT].set(k_BTKH.astype(self.k_BSKH.dtype), mode="drop")
        v_BSKH = self.v_BSKH.at[rows_B1, entries_BT].set(v_BTKH.astype(self.v_BSKH.dtype), mode="drop")
        mask_BTS = tree_visibility(self.new_mask_BTT, positions_BT, S, window)
        out_BTNH = masked_attention(
            q_BTNH, k_BSKH.astype(q_BTNH.dtype), v_BSKH.astype(q_BTNH.dtype), mask_BTS
        )
        return out_BTNH, self.replace(k_BSKH=k_BSKH, v_BSKH=v_BSKH)


def tree_visibility(new_mask_BTT, positions_BT, capacity: int, window=None):
    """[B, T, capacity] bool: what each of T tree tokens sees (see KVCache.attend_tree): the cached
    prefix before positions_BT[:, 0], and the new tokens its row of new_mask_BTT allows, which sit at
    entries positions_BT[:, 0] + u; with a sliding window, only keys fewer than `window` positions back."""
    T = positions_BT.shape[1]
    start_B = positions_BT[:, 0]
    offset_BS = jnp.arange(capacity, dtype=start_B.dtype)[None] - start_B[:, None]
    new_BS = (offset_BS >= 0) & (offset_BS < T)
    index_BS = jnp.clip(offset_BS, 0, T - 1)
    allowed_BTS = jnp.take_along_axis(
        new_mask_BTT, jnp.broadcast_to(index_BS[:, None], (*positions_BT.shape, capacity)), axis=2
    )
    mask_BTS = (offset_BS < 0)[:, None] | (new_BS[:, None] & allowed_BTS)
    if window:
        kv_pos_BS = jnp.where(
            new_BS, jnp.take_along_axis(positions_BT, index_BS, axis=1), offset_BS + start_B[:, None]
        )
        mask_BTS &= positions_BT[:, :, None] - kv_pos_BS[:, None] < window
    return mask_BTS


def masked_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """Dense grouped-query attention under an explicit [B, T, S] mask (every row must see something);
    softmax in float32."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    logits = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * H**-0.5
    logits = jnp.where(mask_BTS[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(
        "bkgts,bskh->btkgh", probs.astype(v_BSKH.dtype), v_BSKH, preferred_element_type=jnp.float32
    )
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


@struct.dataclass
class LinearCache:
    """The recurrent state of one linear-attention layer, float32 [B, K, H, H]."""

    state_BKHH: jax.Array

    def attend(self, q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT, *, chunk: int):
        """Continues every row's recurrence over the new tokens; padding (segment id 0) gets a zero key
        and no decay, so it leaves the state as it was. (out [B, T, N, H], updated cache)."""
        real_BT = segment_ids_BT != 0
        k_BTKH = jnp.where(real_BT[..., None, None], k_BTKH, 0)
        log_decay_BTK = jnp.where(real_BT[..., None], log_decay_BTK, 0.0)
        B = q_BTNH.shape[0]
        out_BTNH, state = chunked_linear_attention(
            q_BTNH,
            k_BTKH,
            v_BTKH,
            log_decay_BTK,
            chunk=chunk,
            initial_state=self.state_BKHH,
            initial_tag=jnp.zeros((B,), jnp.int32),
            return_state=True,
        )
        return out_BTNH, self.replace(state_BKHH=state)


def restart(cache, fresh):
    """The cache with every linear state zeroed where `fresh` (a new sequence starts in the slot). Stale
    KV entries need no clearing: a query never sees entries past its own position."""
    return jax.tree.map(
        lambda c: (
            c.replace(state_BKHH=jnp.where(fresh, 0.0, c.state_BKHH)) if isinstance(c, LinearCache) else c
        ),
        cache,
        is_leaf=lambda c: isinstance(c, (KVCache, LinearCache)),
    )


def _kv(cfg: ModelConfig, lead: tuple[int, ...], slots: int, capacity: int, dtype, implementation):
    shape = (*lead, slots, capacity, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), implementation)


def _linear(cfg: ModelConfig, lead: tuple[int, ...], slots: int):
    return LinearCache(jnp.zeros((*lead, slots, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim), jnp.float32))


def init_cache(cfg: ModelConfig, slots: int, capacity: int, dtype="bfloat16", implementation=None):
    """Empty caches for `slots` sequences of up to `capacity` tokens, stacked like cfg's layers.
    implementation: "xla" or "pallas" (Pallas kernels: the decode kernel for decode steps, flash for
    prefill); None follows model.attention_impl, where "auto" and "cudnn" mean pallas on GPU, else xla."""
    implementation = implementation or cfg.attention_impl
    if implementation in ("auto", "cudnn"):
        implementation = "pallas" if jax.default_backend() == "gpu" else "xla"
    if implementation not in ("xla", "pallas"):
        raise ValueError(f"cache attention implementation {implementation!r}: choose 'xla' or 'pallas'")
    dtype = jnp.dtype(dtype)
    L, moe = cfg.n_layers, cfg.moe
    if cfg.mixer == "softmax" and moe.experts and moe.mixed:  # structured like the model's layer stacks
        groups = (L - moe.first_dense) // moe.every
        rest = _kv(cfg, (groups,), slots, capacity, dtype, implementation)
        if moe.every > 1:
            inner = _kv(cfg, (groups, moe.every - 1), slots, capacity, dtype, implementation)
            rest = {"inner": inner, "last": rest}
        if not moe.first_dense:
            return rest
        return {"first": _kv(cfg, (moe.first_dense,), slots, capacity, dtype, implementation), "rest": rest}
    if cfg.mixer == "softmax":
        return _kv(cfg, (L,), slots, capacity, dtype, implementation)
    if cfg.mixer == "linear":
        return _linear(cfg, (L,), slots)
    groups, every = L // cfg.softmax_every, cfg.softmax_every
    return {
        "linear": _linear(cfg, (groups, every - 1), slots),
        "softmax": _kv(cfg, (groups,), slots, capacity, dtype, implementation),
    }


def logical_names(leaf_path) -> tuple:
    """Logical names of a cache leaf: KV arrays or linear states, behind one or two layer axes."""
    is_kv = any(getattr(k, "name", None) in ("k_BSKH", "v_BSKH") for k in leaf_path)
    nested = any(getattr(k, "key", None) in ("linear", "inner") for k in leaf_path)
    names = KV_NAMES if is_kv else STATE_NAMES
    return (names[0], None, *names[1:]) if nested else names


def cache_shardings(mesh, cache):
    """NamedShardings for a cache tree (concrete or abstract) by the rules table. Dimensions the mesh
    cannot divide (few KV heads, few slots) stay whole rather than fail: the cache is built for the
    model, not the other way round."""

    def one(path, leaf):
        spec = list(rules.logical_to_spec(logical_names(path)))
        for i, axes in enumerate(spec):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if leaf.shape[i] % math.prod(mesh.shape[a] for a in names):
                spec[i] = None
        return NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    return jax.tree.map_with_path(one, cache)


def cache_bytes_per_token(cfg: ModelConfig, dtype="bfloat16") -> int:
    """Analytic KV bytes one token adds to a sequence: 2 (K and V) x KV heads x head dim x bytes, over the
    softmax layers. Linear layers add none (their state is fixed: `state_bytes_per_slot`)."""
    softmax_layers = {"softmax": cfg.n_layers, "linear": 0}.get(cfg.mixer, cfg.n_layers // cfg.softmax_every)
    return 2 * softmax_layers * cfg.n_kv_heads * cfg.head_dim * np.dtype(dtype).itemsize


def state_bytes_per_slot(cfg: ModelConfig) -> int:
    """Bytes of the linear layers' recurrent states per sequence (float32)."""
    linear_layers = {"softmax": 0, "linear": cfg.n_layers}.get(
        cfg.mixer, cfg.n_layers - cfg.n_layers // cfg.softmax_every
    )
    return linear_layers * cfg.n_kv_heads * cfg.head_dim * cfg.head_dim * 4

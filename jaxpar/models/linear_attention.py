"""Causal linear attention (plain or with a gated per-head decay), chunked, and its sequence-parallel form
LASP-2; the `LinearAttention` mixer that replaces softmax attention in a block.

Definition (the reference below): with a per-token, per-KV-head log decay g_t <= 0 (0 for plain linear
attention),
    out_t = sum_{s <= t, seg_s == seg_t} exp(g_{s+1} + ... + g_t) (q_t . k_s) v_s,
i.e. the recurrence S_t = exp(g_t) S_{t-1} + k_t v_t^T, out_t = q_t S_t, restarted at every document of a
packed row (segment ids must come in contiguous runs, as packing makes them).

Chunked form (GLA / lightning attention): within a chunk the quadratic form with a decay mask; across
chunks a [K, H, H] state per sequence carried by `lax.scan`. Sequence parallel (LASP-2): each device
computes the state its pieces would hand on from zero, one all-gather shares them, each device combines
those before its pieces (jaxpar.parallel.sequence.lasp2_incoming_states) and runs the chunked form from
that state. The layout may be zigzag (two pieces per device) so a hybrid model can share the softmax
layers' layout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpar.models.params import attention_projections, param as _param, rms_norm
from jaxpar.parallel import sequence as sequence_lib
from jaxpar.parallel.per_device import per_device
from jaxpar.parallel.rules import constrain

# GLA's normaliser: log decay = log_sigmoid(x w + b) / 16 keeps decays near 1 at initialisation.
GATE_LOGIT_NORMALIZER = 16.0
NO_SEGMENT = jnp.iinfo(jnp.int32).min


def reference_linear_attention(q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT=None):
    """Quadratic form of the definition (the tests' reference; computes in the inputs' dtype, float64
    when given float64)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    cum = jnp.cumsum(log_decay_BTK, axis=1)  # [B, T, K]
    diff = cum[:, :, None, :] - cum[:, None, :, :]  # [B, t, s, K]
    visible = (jnp.arange(T)[:, None] >= jnp.arange(T)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
    decay = jnp.where(visible[..., None], jnp.exp(jnp.where(visible[..., None], diff, 0.0)), 0.0)
    q = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->btskg", q, k_BTKH) * decay[..., None]
    return jnp.einsum("btskg,bskh->btkgh", scores, v_BTKH).reshape(B, T, N, H)


def piece_state(k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT):
    """What a piece of the sequence hands on, computed from a zero state: (state [B, K, H, H] float32 at
    its last token, restricted to the last token's segment; summed log decay [B, K]; last segment [B])."""
    cum = jnp.cumsum(log_decay_BTK.astype(jnp.float32), axis=1)
    last = segment_ids_BT[:, -1]
    same = (segment_ids_BT == last[:, None])[..., None]
    w = jnp.where(same, jnp.exp(jnp.minimum(cum[:, -1:] - cum, 0.0)), 0.0)  # [B, T, K]
    state = jnp.einsum(
        "btkh,btke->bkhe", k_BTKH.astype(jnp.float32) * w[..., None], v_BTKH.astype(jnp.float32)
    )
    return state, cum[:, -1], last


def chunked_linear_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    log_decay_BTK,
    segment_ids_BT=None,
    *,
    chunk: int = 64,
    initial_state=None,
    initial_tag=None,
    return_state: bool = False,
):
    """The definition in chunks of `chunk` tokens (T is padded up to a multiple with zero keys and decays
    in the last token's segment, which changes no output and no state). initial_state [B, K, H, H]
    (float32) enters before the first token and is seen by the tokens whose segment is initial_tag [B].
    Returns out [B, T, N, H] in q's dtype (return_state: and the state after the last token, float32,
    restricted to its segment: what a recurrent decoder carries on)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    C = min(chunk, T)
    pad = -T % C
    seg = jnp.zeros((B, T), jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    if initial_state is None:
        initial_state = jnp.zeros((B, K, H, H), jnp.float32)
        initial_tag = jnp.full((B,), NO_SEGMENT, jnp.int32)
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        q_BTNH, k_BTKH, v_BTKH, log_decay_BTK = (
            jnp.pad(x, widths(x)) for x in (q_BTNH, k_BTKH, v_BTKH, log_decay_BTK)
        )
        seg = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge")
    n_chunks = (T + pad) // C

    def chunks(x):  # [B, T, ...] -> [n_chunks, B, C, ...]
        return jnp.moveaxis(x.reshape(B, n_chunks, C, *x.shape[2:]), 1, 0)

    f32 = jnp.float32
    xs = (
        chunks(q_BTNH.reshape(B, T + pad, K, G, H)),
        chunks(k_BTKH),
        chunks(v_BTKH),
        chunks(log_decay_BTK.astype(f32)),
        chunks(seg),
    )
    causal_CC = jnp.arange(C)[:, None] >= jnp.arange(C)[None, :]

    def step(carry, x):
        state, tag = carry
        q, k, v, g, s = x  # q [B, C, K, G, H], k/v [B, C, K, H], g [B, C, K], s [B, C]
        cum = jnp.cumsum(g, axis=1)
        # From the incoming state: tokens of the state's segment, decayed through themselves.
        from_state = jnp.where((s == tag[:, None])[..., None], jnp.exp(cum), 0.0)  # [B, C, K]
        inter = jnp.einsum("bckgh,bkhe->bckge", q.astype(f32), state) * from_state[..., None, None]
        # Within the chunk: the quadratic form with the decay mask.
        visible = causal_CC[None] & (s[:, :, None] == s[:, None, :])  # [B, t, s]
        diff = cum[:, :, None, :] - cum[:, None, :, :]  # [B, t, s, K]
        decay = jnp.where(visible[..., None], jnp.exp(jnp.where(visible[..., None], diff, 0.0)), 0.0)
        scores = jnp.einsum("btkgh,bskh->btskg", q.astype(f32), k.astype(f32)) * decay[..., None]
        intra = jnp.einsum("btskg,bskh->btkgh", scores, v.astype(f32))
        # Hand on: the state continues only if the chunk ends in its segment.
        chunk_state, chunk_log_decay, last = piece_state(k, v, g, s)
        keep = (last == tag)[:, None]
        carried = jnp.where(keep, jnp.exp(chunk_log_decay), 0.0)[..., None, None] * state
        return (carried + chunk_state, last), (inter + intra)

    # Rematerialised: the backward recomputes a chunk's [C, C] decay and score tiles instead of saving
    # them for every chunk (halves the train step's memory; benchmarks/sequence).
    (state, _), out = jax.lax.scan(
        jax.checkpoint(step), (initial_state.astype(f32), initial_tag.astype(jnp.int32)), xs
    )
    out = jnp.moveaxis(out, 0, 1).reshape(B, T + pad, N, H)[:, :T].astype(q_BTNH.dtype)
    return (out, state) if return_state else out


def lasp2_linear_attention(
    q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT, *, axis_name: str, zigzag: int, chunk: int
):
    """This device's output of linear attention over a sequence split over `axis_name` (call inside
    shard_map). Pieces: the whole shard (contiguous layout), or its two halves (zigzag over `zigzag`
    ranks; see jaxpar.parallel.sequence.piece_order)."""
    pieces = 2 if zigzag > 1 else 1
    T = q_BTNH.shape[1]
    if T % pieces:
        raise ValueError(f"a zigzag shard holds two equal halves; local length {T} is odd")
    seg = (
        jnp.zeros(q_BTNH.shape[:2], jnp.int32) if segment_ids_BT is None else segment_ids_BT.astype(jnp.int32)
    )
    L = T // pieces
    split = lambda x: [x[:, p * L : (p + 1) * L] for p in range(pieces)]
    qs, ks, vs, gs, ss = (split(x) for x in (q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, seg))
    own = [piece_state(k, v, g, s) for k, v, g, s in zip(ks, vs, gs, ss)]
    states, tags = sequence_lib.lasp2_incoming_states(
        jnp.stack([o[0] for o in own]),
        jnp.stack([o[1] for o in own]),
        jnp.stack([o[2] for o in own]),
        axis_name=axis_name,
        zigzag=zigzag,
    )
    outs = [
        chunked_linear_attention(q, k, v, g, s, chunk=chunk, initial_state=states[p], initial_tag=tags[p])
        for p, (q, k, v, g, s) in enumerate(zip(qs, ks, vs, gs, ss))
    ]
    return jnp.concatenate(outs, axis=1)


def linear_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    log_decay_BTK,
    segment_ids_BT=None,
    *,
    chunk: int = 64,
    zigzag: int = 1,
    axis: str = sequence_lib.SEQUENCE_AXIS,
):
    """Causal (gated) linear attention of global arrays; with the mesh's sequence axis > 1, LASP-2 over
    it. `zigzag`: the n of the run's layout (1: contiguous; see ModelConfig.zigzag_factor)."""
    n = sequence_lib.sequence_size(axis)
    if n == 1:
        return chunked_linear_attention(q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT, chunk=chunk)
    B, T, N, _ = q_BTNH.shape
    K = k_BTKH.shape[2]
    pieces = 2 if zigzag > 1 else 1
    if zigzag > 1 and n % zigzag:
        raise ValueError(f"a zigzag layout over {zigzag} ranks cannot be spread over {n} sequence shards")
    if T % (pieces * n):
        raise ValueError(
            f"sequence length {T} cannot be split into {pieces * n} equal pieces over {n} "
            f"sequence shards; use a length divisible by {pieces * n}."
        )

    def local(q, k, v, g, segment_ids):
        return lasp2_linear_attention(q, k, v, g, segment_ids, axis_name=axis, zigzag=zigzag, chunk=chunk)

    qkv, rows = ("batch", "length", "heads", None), ("batch", "length")
    return per_device(
        local,
        dict(q=q_BTNH, k=k_BTKH, v=v_BTKH, g=log_decay_BTK, segment_ids=segment_ids_BT),
        dict(q=qkv, k=qkv, v=qkv, g=("batch", "length", "heads"), segment_ids=rows),
        qkv,
        batch=B,
        heads=(N, K),
        length_axis=axis,
        check_vma=True,
    )


class LinearAttention(nnx.Module):
    """Drop-in for llama.Attention (same projections and call signature; positions unused: no RoPE).

    Config fields read: linear_gate ("none": plain linear attention, "scalar": a data-dependent decay
    per KV head, as GLA's scalar variant), linear_chunk, and for the layout: mixer, sequence_parallel,
    ulysses_degree. The per-head output is RMS-normalised (linear attention has no softmax denominator)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, K, H = cfg.d_model, cfg.n_kv_heads, cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = attention_projections(cfg, rngs)
        if cfg.linear_gate == "scalar":
            self.w_gate = _param(rngs, (D, K), ("embed", "kv_heads"), cfg.init_std, cfg.param_dtype)
            # log_sigmoid(4) / 16 ~ -1e-3: decays start near 1 (long memory).
            self.gate_bias = nnx.Param(jnp.full((K,), 4.0, cfg.param_dtype), out_sharding=("kv_heads",))
        self.out_scale = nnx.Param(jnp.ones((H,), cfg.param_dtype), out_sharding=("norm",))

    def __call__(self, x_BTD, positions_BT, segment_ids_BT, cache=None):
        """As llama.Attention, `cache` (e.g. jaxpar.infer.cache.LinearCache: the recurrent state of
        earlier tokens) makes the result (output, updated cache): O(1) work per new token."""
        del positions_BT  # linear attention is position-free
        cfg, dtype = self.cfg, x_BTD.dtype
        H = cfg.head_dim
        q_BTNH = jnp.einsum("btd,dnh->btnh", x_BTD, self.wq[...].astype(dtype)) * H**-0.5
        k_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.wk[...].astype(dtype))
        v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, self.wv[...].astype(dtype))
        names = ("batch", "length", "heads", "head_dim")
        q_BTNH, k_BTKH, v_BTKH = (constrain(x, names) for x in (q_BTNH, k_BTKH, v_BTKH))
        if cfg.linear_gate == "scalar":
            logits_BTK = jnp.einsum(
                "btd,dk->btk", x_BTD.astype(jnp.float32), self.w_gate[...].astype(jnp.float32)
            )
            log_decay_BTK = jax.nn.log_sigmoid(logits_BTK + self.gate_bias[...].astype(jnp.float32))
            log_decay_BTK = log_decay_BTK / GATE_LOGIT_NORMALIZER
        else:
            log_decay_BTK = jnp.zeros(k_BTKH.shape[:3], jnp.float32)
        log_decay_BTK = constrain(log_decay_BTK, ("batch", "length", "heads"))
        if cache is not None:
            out_BTNH, cache = cache.attend(
                q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT, chunk=cfg.linear_chunk
            )
            return self._project_out(out_BTNH, dtype), cache
        zigzag = cfg.zigzag_factor(sequence_lib.current_mesh_sizes())
        out_BTNH = linear_attention(
            q_BTNH, k_BTKH, v_BTKH, log_decay_BTK, segment_ids_BT, chunk=cfg.linear_chunk, zigzag=zigzag
        )
        return self._project_out(out_BTNH, dtype)

    def _project_out(self, out_BTNH, dtype):
        names = ("batch", "length", "heads", "head_dim")
        out_BTNH = constrain(rms_norm(out_BTNH, self.out_scale[...], self.cfg.norm_eps), names)
        out_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, self.wo[...].astype(dtype))
        return constrain(out_BTD, ("batch", "length_sp", "act_embed"))

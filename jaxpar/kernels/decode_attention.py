"""Decode attention in Pallas: a few new query tokens per sequence against a long KV cache.

Inference only (no gradient). q_BTNH holds the T newest tokens of each sequence (T = 1 for plain
decoding, a few for speculative decoding); k/v_BSKH is the cache of capacity S, whose first lengths[b]
entries are valid for sequence b and already include the new tokens. Query t of sequence b therefore
sits at position lengths[b] - T + t and sees cache entries j with j < lengths[b], j <= its position
(causal among the new tokens) and, with a window W, position - j < W. A query that sees nothing (only
possible with lengths[b] < T) gets 0.

Kernel design (split-K / "flash decoding"): one query token gives too little work per program to fill a
GPU, so the cache is cut into `num_splits` slices and one program runs per (slice, batch, kv head). It
stacks the G query heads of the group and the T tokens into G*T rows (padded to 16 rows, Triton's
smallest dot tile) so each kv tile is read once for the whole group, loops over the valid blocks of its
slice only (the trip count follows lengths[b], so short sequences cost little), and writes an
unnormalised partial result with its log-sum-exp. A small XLA merge combines the slices.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxpar.kernels.flash_attention import MASKED, MAX_HEAD_DIM, SUPPORTED_DTYPES, default_interpret


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """UNMEASURED defaults (no GPU was available when this was written): 64-key tiles and 16 slices,
    which fills an H100's 132 SMs once batch * kv heads >= 8. Tune with a profiler."""

    block_k: int = 64
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2


def _decode_kernel(
    lengths_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    block_k: int,
    num_tokens: int,
    scale: float,
    softcap: float | None,
    window: int | None,
):
    split, b = pl.program_id(0), pl.program_id(1)
    split_len = k_ref.shape[0]
    rows, head_dim = q_ref.shape
    length = lengths_ref[b]
    start = split * split_len
    q = q_ref[...]
    # Row r holds token r % T of query head r // T; its position in the sequence:
    q_pos = length - num_tokens + lax.rem(jnp.arange(rows, dtype=jnp.int32), num_tokens)

    # Only the blocks of this slice that hold valid keys (and, with a window, recent enough ones).
    valid_in_split = jnp.clip(length - start, 0, split_len)
    hi = lax.div(valid_in_split + block_k - 1, block_k)
    lo = jnp.int32(0)
    if window is not None:
        oldest = length - num_tokens - window + 1 - start  # oldest key the first token may see
        lo = jnp.clip(lax.div(jnp.maximum(oldest, 0), block_k), 0, hi)

    def visit(j, carry):
        acc, m, l = carry
        kv_slice = pl.ds(j * block_k, block_k)
        k, v = k_ref[kv_slice, :], v_ref[kv_slice, :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        kv_pos = start + j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        mask = (kv_pos[None, :] < length) & (kv_pos[None, :] <= q_pos[:, None])
        if window is not None:
            mask = mask & (q_pos[:, None] - kv_pos[None, :] < window)
        s = jnp.where(mask, s, MASKED)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return alpha[:, None] * acc + pv, m_new, alpha * l + jnp.sum(p, axis=-1)

    init = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, visit, init)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _check(q_BTNH, k_BSKH, v_BSKH, lengths_B, softcap, window):
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or k_BSKH.shape != v_BSKH.shape:
        raise ValueError(
            f"decode attention wants q [B, T, N, H] and k, v [B, S, K, H] of one shape; got "
            f"q{q_BTNH.shape}, k{k_BSKH.shape}, v{v_BSKH.shape}"
        )
    B, T, N, H = q_BTNH.shape
    if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
        raise ValueError(f"q{q_BTNH.shape} and the cache k{k_BSKH.shape} disagree on batch or head dim")
    if N % k_BSKH.shape[2]:
        raise ValueError(f"query heads {N} are not a multiple of kv heads {k_BSKH.shape[2]}")
    if T > k_BSKH.shape[1]:
        raise ValueError(f"{T} query tokens do not fit a cache of {k_BSKH.shape[1]} entries")
    if lengths_B.shape != (B,) or not jnp.issubdtype(lengths_B.dtype, jnp.integer):
        raise ValueError(
            f"lengths must be an integer array of shape ({B},); got {lengths_B.dtype}{lengths_B.shape}"
        )
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window={window} must be a positive integer")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap={softcap} must be positive")


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "window", "block_sizes", "interpret"))
def decode_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    lengths_B,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool | None = None,
):
    """Attention output [B, T, N, H] in q's dtype for the T newest tokens of each sequence."""
    _check(q_BTNH, k_BSKH, v_BSKH, lengths_B, softcap, window)
    if q_BTNH.dtype not in SUPPORTED_DTYPES or q_BTNH.dtype != k_BSKH.dtype or k_BSKH.dtype != v_BSKH.dtype:
        raise ValueError(
            f"decode attention supports one dtype of {[str(d) for d in SUPPORTED_DTYPES]} for q, k "
            f"and v; got {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}"
        )
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if H > MAX_HEAD_DIM:
        raise ValueError(f"decode attention supports head dims up to {MAX_HEAD_DIM}; got {H}")
    G = N // K
    interpret = default_interpret() if interpret is None else interpret
    blocks = DecodeBlockSizes() if block_sizes is None else block_sizes
    if blocks.block_k & (blocks.block_k - 1) or blocks.block_k < (1 if interpret else 16):
        raise ValueError(f"DecodeBlockSizes.block_k={blocks.block_k} must be a power of two (>= 16 on GPU)")
    if blocks.num_splits < 1:
        raise ValueError(f"DecodeBlockSizes.num_splits={blocks.num_splits} must be positive")
    scale = H**-0.5 if scale is None else float(scale)

    block_k = min(blocks.block_k, max(1 if interpret else 16, pl.next_power_of_2(S)))
    num_splits = min(blocks.num_splits, -(-S // block_k))
    split_len = -(-S // (num_splits * block_k)) * block_k
    S_pad, H_pad = split_len * num_splits, max(16, pl.next_power_of_2(H))
    rows, R_pad = G * T, max(16, pl.next_power_of_2(G * T))

    # [B, T, K*G, H] -> [B, K, G*T, H]: the rows one program serves (row = g * T + t).
    q_BKRH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, rows, H)
    q_BKRH = jnp.pad(q_BKRH, ((0, 0), (0, 0), (0, R_pad - rows), (0, H_pad - H)))
    kv_pad = ((0, 0), (0, S_pad - S), (0, 0), (0, H_pad - H))
    k, v = jnp.pad(k_BSKH, kv_pad), jnp.pad(v_BSKH, kv_pad)

    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu

        compiler_params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    kv_spec = pl.BlockSpec((None, split_len, None, H_pad), lambda s, b, kh: (b, s, kh, 0))
    o_part, lse_part = pl.pallas_call(
        functools.partial(
            _decode_kernel, block_k=block_k, num_tokens=T, scale=scale, softcap=softcap, window=window
        ),
        grid=(num_splits, B, K),
        in_specs=[
            pl.BlockSpec((B,), lambda s, b, kh: (0,)),
            pl.BlockSpec((None, None, R_pad, H_pad), lambda s, b, kh: (b, kh, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R_pad, H_pad), lambda s, b, kh: (b, kh, s, 0, 0)),
            pl.BlockSpec((None, None, None, R_pad), lambda s, b, kh: (b, kh, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, num_splits, R_pad, H_pad), jnp.float32),
            jax.ShapeDtypeStruct((B, K, num_splits, R_pad), jnp.float32),
        ],
        compiler_params=compiler_params,
        interpret=interpret,
        name="jaxpar_decode_attention",
    )(lengths_B.astype(jnp.int32), q_BKRH, k, v)

    # Merge the slices: weights exp(lse_s - lse), 0 for empty slices; rows that saw nothing stay 0.
    lse = jax.nn.logsumexp(lse_part, axis=2, keepdims=True)
    weights = jnp.where(
        jnp.isfinite(lse_part), jnp.exp(lse_part - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0
    )
    o_BKRH = jnp.sum(weights[..., None] * o_part, axis=2)[:, :, :rows, :H]
    return o_BKRH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def decode_attention_reference(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    lengths_B,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
):
    """Dense jnp definition of decode_attention (float32 math, float64 for float64 inputs)."""
    _check(q_BTNH, k_BSKH, v_BSKH, lengths_B, softcap, window)
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    acc = jnp.promote_types(q_BTNH.dtype, jnp.float32)
    scale = H**-0.5 if scale is None else scale
    q = q_BTNH.reshape(B, T, K, N // K, H).astype(acc)
    s = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH.astype(acc)) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    q_pos = lengths_B[:, None] - T + jnp.arange(T)[None]  # [B, T]
    kv_pos = jnp.arange(S)
    mask = (kv_pos[None, None] < lengths_B[:, None, None]) & (kv_pos[None, None] <= q_pos[..., None])
    if window is not None:
        mask &= q_pos[..., None] - kv_pos[None, None] < window
    mask = mask[:, None, None]  # [B, 1, 1, T, S]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->btkgh", p / jnp.where(l > 0, l, 1.0), v_BSKH.astype(acc))
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)

"""Blockwise attention in plain jnp: the `xla` implementation for long sequences.

The same online-softmax algorithm as the Pallas kernel, written with `lax.scan` over chunks, so it runs
on every backend and never materialises a [Tq, Tk] array: the forward keeps one [B, N, cq, ck] tile at a
time, and a custom VJP recomputes tiles in the backward instead of letting autodiff save every tile of
the scan (which would bring the T x T memory back). Masking rules, the soft-cap and the lse output are
those of jaxpar.kernels.flash_attention (imported from there, so the two cannot drift apart).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxpar.kernels.flash_attention import (
    MASKED,
    MaskSpec,
    attention_vjp,
    block_may_attend,
    capped,
    check_inputs,
    finite_lse,
    maybe_skip,
    round_up,
    softcap_grad,
    visible,
)

DEFAULT_CHUNK = 512


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: MaskSpec
    chunk_q: int
    chunk_k: int


def _chunks(x, size):
    """[B, T, ...] -> [T // size, B, size, ...] (T already a multiple of size)."""
    B, T = x.shape[:2]
    return jnp.moveaxis(x.reshape(B, T // size, size, *x.shape[2:]), 1, 0)


def _unchunk(x):
    n, B, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(B, n * size, *x.shape[3:])


def _tile_mask(spec, q_pos, kv_pos, q_seg, kv_seg, kv_index):
    mask = visible(q_pos, kv_pos, q_seg, kv_seg, spec, kv_index)
    return None if mask is None else mask[:, None, None]  # [B, 1, 1, cq, ck] against [B, K, G, cq, ck]


def _tie_mask_inputs(q, q_pos, kv_pos, q_seg, kv_seg):
    """Make the mask inputs depend on q. Inside a differentiated `lax.scan` (the model's layers) the
    positions and segment ids are loop invariants, and JAX's scan partial evaluation hoists everything
    computed from invariants alone out of the loop: here that is every [chunk, chunk] mask tile of the
    causal skip's lax.cond, stacked for all q x k chunk pairs (quadratic memory; measured 789 MiB vs
    57 MiB at T=4096). The barrier keeps the masks inside the loop, one tile at a time."""
    return lax.optimization_barrier((q, q_pos, kv_pos, q_seg, kv_seg))


def _forward(static: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    spec = static.spec
    q, q_pos, kv_pos, q_seg, kv_seg = _tie_mask_inputs(q, q_pos, kv_pos, q_seg, kv_seg)
    B, Tq, K, G, H = q.shape
    ck = static.chunk_k
    k_c, v_c, kv_pos_c = _chunks(k, ck), _chunks(v, ck), _chunks(kv_pos, ck)
    kv_seg_c = None if kv_seg is None else _chunks(kv_seg, ck)
    kv_index_c = jnp.arange(k.shape[1]).reshape(-1, ck)

    def one_q_chunk(xs):
        qc, qp, qs = xs

        def visit(carry, kv):
            kc, vc, kp, ks, ki = kv

            def update(carry):
                acc, m, l = carry
                s = capped(jnp.einsum("bqkgh,bskh->bkgqs", qc, kc, preferred_element_type=jnp.float32), spec)
                mask = _tile_mask(spec, qp, kp, qs, ks, ki)
                if mask is not None:
                    s = jnp.where(mask, s, MASKED)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.exp(s - m_new[..., None])
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                alpha = jnp.exp(m - m_new)
                acc = alpha[..., None] * acc + jnp.einsum(
                    "bkgqs,bskh->bkgqh", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32
                )
                return acc, m_new, alpha * l + jnp.sum(p, axis=-1)

            pred = block_may_attend(qp, kp, qs, ks, spec)
            return maybe_skip(pred, update, carry), None

        cq = qc.shape[1]
        init = (
            jnp.zeros((B, K, G, cq, H), jnp.float32),
            jnp.full((B, K, G, cq), MASKED, jnp.float32),
            jnp.zeros((B, K, G, cq), jnp.float32),
        )
        (acc, m, l), _ = lax.scan(visit, init, (k_c, v_c, kv_pos_c, kv_seg_c, kv_index_c))
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o = jnp.einsum("bkgqh->bqkgh", acc / l_safe[..., None]).astype(q.dtype)
        return o, jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)

    cq = static.chunk_q
    o_c, lse_c = lax.map(
        one_q_chunk, (_chunks(q, cq), _chunks(q_pos, cq), None if q_seg is None else _chunks(q_seg, cq))
    )
    # lse_c: [nq, B, K, G, cq] -> [B, K, G, Tq]
    lse = jnp.moveaxis(lse_c, 0, 3).reshape(B, K, G, Tq)
    return _unchunk(o_c), lse


def _backward(static: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do, dlse):
    spec = static.spec
    q, q_pos, kv_pos, q_seg, kv_seg = _tie_mask_inputs(q, q_pos, kv_pos, q_seg, kv_seg)
    B, Tq, K, G, H = q.shape
    cq, ck = static.chunk_q, static.chunk_k
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", do.astype(jnp.float32), o.astype(jnp.float32)) - dlse
    lse = finite_lse(lse)
    nq = Tq // cq
    q_xs = (
        _chunks(q, cq),
        _chunks(do, cq),
        jnp.moveaxis(lse.reshape(B, K, G, nq, cq), 3, 0),
        jnp.moveaxis(delta.reshape(B, K, G, nq, cq), 3, 0),
        _chunks(q_pos, cq),
        None if q_seg is None else _chunks(q_seg, cq),
    )

    def one_kv_chunk(dq_all, kv):
        kc, vc, kp, ks, ki = kv

        def visit(carry, xs):
            qc, doc, lsec, deltac, qp, qs = xs

            def update(carry):
                dk, dv = carry
                s = capped(jnp.einsum("bqkgh,bskh->bkgqs", qc, kc, preferred_element_type=jnp.float32), spec)
                p = jnp.exp(s - lsec[..., None])
                mask = _tile_mask(spec, qp, kp, qs, ks, ki)
                if mask is not None:
                    p = jnp.where(mask, p, 0.0)
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgh->bskh", p.astype(doc.dtype), doc, preferred_element_type=jnp.float32
                )
                dp = jnp.einsum("bqkgh,bskh->bkgqs", doc, vc, preferred_element_type=jnp.float32)
                ds = p * (dp - deltac[..., None])
                if spec.softcap is not None:
                    ds = ds * softcap_grad(s, spec)
                ds = ds.astype(qc.dtype)
                dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, qc, preferred_element_type=jnp.float32)
                dq = jnp.einsum("bkgqs,bskh->bqkgh", ds, kc, preferred_element_type=jnp.float32)
                return (dk, dv), dq

            def skip(carry):
                return carry, jnp.zeros(qc.shape, jnp.float32)

            pred = block_may_attend(qp, kp, qs, ks, spec)
            return update(carry) if pred is None else lax.cond(pred, update, skip, carry)

        zeros = jnp.zeros(kc.shape, jnp.float32)
        (dk, dv), dq_parts = lax.scan(visit, (zeros, zeros), q_xs)
        return dq_all + dq_parts, (dk, dv)

    kv_xs = (
        _chunks(k, ck),
        _chunks(v, ck),
        _chunks(kv_pos, ck),
        None if kv_seg is None else _chunks(kv_seg, ck),
        jnp.arange(k.shape[1]).reshape(-1, ck),
    )
    dq_c, (dk_c, dv_c) = lax.scan(one_kv_chunk, jnp.zeros((nq, B, cq, K, G, H), jnp.float32), kv_xs)
    dq = _unchunk(dq_c) * spec.scale
    return (dq.astype(q.dtype), (_unchunk(dk_c) * spec.scale).astype(k.dtype), _unchunk(dv_c).astype(v.dtype))


_chunked = attention_vjp(_forward, _backward)


@functools.partial(jax.jit, static_argnames=("causal", "window", "softcap", "scale", "chunk_size"))
def chunked_attention(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    *,
    q_segment_ids_BT=None,
    kv_segment_ids_BS=None,
    q_positions_BT=None,
    kv_positions_BS=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
):
    """(out_BTNH, lse_BTN float32), both differentiable; same contract as flash_attention, memory
    O(B * N * chunk^2) for the tiles plus O(B * T * N * H) for inputs and accumulators."""
    check_inputs(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        q_segment_ids_BT,
        kv_segment_ids_BS,
        q_positions_BT,
        kv_positions_BS,
        window,
        softcap,
    )
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    B, Tq, N, H = q_BTNH.shape
    Tk, K = k_BSKH.shape[1], k_BSKH.shape[2]
    cq, ck = min(chunk_size, Tq), min(chunk_size, Tk)
    Tq_pad, Tk_pad = round_up(Tq, cq), round_up(Tk, ck)
    spec = MaskSpec(
        causal=bool(causal),
        window=window,
        softcap=softcap,
        scale=H**-0.5 if scale is None else float(scale),
        kv_len=Tk if Tk_pad != Tk else None,
    )

    def pad(x, length, edge=False):
        if x.shape[1] == length:
            return x
        widths = [(0, 0)] * x.ndim
        widths[1] = (0, length - x.shape[1])
        return jnp.pad(x, widths, mode="edge" if edge else "constant")

    def ids(x, length, pad_to):
        x = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length)) if x is None else x
        return pad(x.astype(jnp.int32), pad_to, edge=True)

    q_seg = None if q_segment_ids_BT is None else ids(q_segment_ids_BT, Tq, Tq_pad)
    kv_seg = None if kv_segment_ids_BS is None else ids(kv_segment_ids_BS, Tk, Tk_pad)
    q = pad(q_BTNH, Tq_pad).reshape(B, Tq_pad, K, N // K, H)
    o, lse_BKGT = _chunked(
        _Static(spec, cq, ck),
        q,
        pad(k_BSKH, Tk_pad),
        pad(v_BSKH, Tk_pad),
        ids(q_positions_BT, Tq, Tq_pad),
        ids(kv_positions_BS, Tk, Tk_pad),
        q_seg,
        kv_seg,
    )
    lse_BTN = jnp.moveaxis(lse_BKGT.reshape(B, N, Tq_pad), 1, 2)
    return o.reshape(B, Tq_pad, N, H)[:, :Tq], lse_BTN[:, :Tq]

"""Ring attention and the K/V all-gather baseline, called INSIDE the caller's `jax.shard_map` with the
sequence split over `axis_name`.

Ring (Liu et al. 2023, with the zigzag load balance of Brandon et al. / ring-flash-attention): every
device keeps its queries; K/V blocks travel around the ring with `ppermute`, one hop per step, so after
R-1 hops every query block has met every key block. Each step computes one block with the attention
kernel (`jaxpar.kernels.attention.attention`, which returns a differentiable log-sum-exp) and merges it
into the running output by log-sum-exp. The backward pass is a second ring (custom_vjp): K/V rotate
again, and the dK/dV accumulators travel with them and arrive home after R hops, so no device ever
stores more than its own block plus the one in flight.

Which part of a block is computed is decided by `schedule` from the layout alone (positions derived
from it), never from data:
  contiguous  device r holds chunk r. Step 0 is the diagonal (masked), blocks from earlier devices are
              full, blocks from later devices are skipped: device R-1 works R times as much as device 0.
  zigzag      device r holds chunks r and 2R-1-r of 2R. Step 0 is the diagonal; a block from an earlier
              device is needed only against its first chunk, one from a later device only by our second
              chunk: every device computes half a block at every step, the same work everywhere.
Masking inside a block is always exact (the kernel gets the true token positions), so the schedule only
decides what is skipped. With caller-given positions nothing is skipped (every block is computed
masked), since nothing is known about their order.

Cost note: the backward recomputes each block's forward (via `jax.vjp` of the kernel) to obtain the
block's own output and log-sum-exp, because the attention API exposes no backward that takes the global
output and log-sum-exp directly. That is one extra block forward per step in the backward pass.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.kernels.attention import attention

# Work modes of one ring step on one device (codes index `_MODES`).
SKIP, FULL, KV_FIRST_HALF, Q_SECOND_HALF = "skip", "full", "kv_first_half", "q_second_half"
_MODES = (SKIP, FULL, KV_FIRST_HALF, Q_SECOND_HALF)

# block_fn(q, k, v, q_seg, kv_seg, q_pos, kv_pos) -> (out [b, tq, n, h], lse [b, tq, n] float32).
BlockFn = Callable[..., tuple[jax.Array, jax.Array]]


# --------------------------------------------------------------------------------------------------
# Layouts and the static schedule.


def zigzag_indices(length: int, n: int) -> np.ndarray:
    """Token index held at each layout slot when `length` tokens are laid out zigzag over n devices:
    chunks of length / (2n); device r's contiguous shard holds chunks r and 2n-1-r. n <= 1: identity."""
    if n <= 1:
        return np.arange(length)
    if length % (2 * n):
        raise ValueError(
            f"a zigzag layout over {n} devices splits the sequence into {2 * n} equal chunks; "
            f"length {length} is not divisible by {2 * n}"
        )
    chunks = np.arange(length).reshape(2 * n, length // (2 * n))
    return chunks[[c for r in range(n) for c in (r, 2 * n - 1 - r)]].reshape(-1)


def local_indices(rank, n: int, local_len: int, zigzag: bool) -> jax.Array:
    """True token indices [local_len] of the shard of device `rank` (a traced int) of n."""
    if zigzag and n > 1:
        half = local_len // 2
        first = rank * half + jnp.arange(half)
        second = (2 * n - 1 - rank) * half + jnp.arange(half)
        return jnp.concatenate([first, second]).astype(jnp.int32)
    return (rank * local_len + jnp.arange(local_len)).astype(jnp.int32)


def schedule(n: int, zigzag: bool, causal: bool, derived_positions: bool = True) -> np.ndarray:
    """[steps, ranks] array of work modes (strings from _MODES): at step s device r holds the K/V block
    of device (r - s) mod n."""
    table = np.full((n, n), FULL, dtype=object)
    if not (causal and derived_positions):
        return table
    for s in range(1, n):
        for r in range(n):
            src = (r - s) % n
            if zigzag:
                table[s, r] = KV_FIRST_HALF if src < r else Q_SECOND_HALF
            else:
                table[s, r] = FULL if src < r else SKIP
    return table


def schedule_work(n: int, zigzag: bool, causal: bool) -> np.ndarray:
    """[ranks] query-key token pairs each device computes per unit (local length)^2, from `schedule`:
    full = 1, half blocks = 1/2, skip = 0."""
    cost = {SKIP: 0.0, FULL: 1.0, KV_FIRST_HALF: 0.5, Q_SECOND_HALF: 0.5}
    return np.array([[cost[m] for m in row] for row in schedule(n, zigzag, causal)]).sum(axis=0)


# --------------------------------------------------------------------------------------------------
# Ring attention.


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Static configuration (hashable: a nondiff argument of the custom_vjp)."""

    axis_name: str
    stride: int
    zigzag: bool
    causal: bool
    window: int | None
    softcap: float | None
    scale: float | None
    implementation: str | None
    interpret: bool | None
    block_fn: BlockFn | None


def _rank_and_size(ring: _Ring):
    size = jax.lax.axis_size(ring.axis_name)
    if size % ring.stride:
        raise ValueError(
            f"ring stride {ring.stride} does not divide the size {size} of axis {ring.axis_name!r}"
        )
    return jax.lax.axis_index(ring.axis_name) // ring.stride, size // ring.stride, size


def _rotate(tree, ring: _Ring, size: int):
    """Send to the next device of the ring (axis index + stride), receive from the previous one."""
    perm = [(d, (d + ring.stride) % size) for d in range(size)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis_name, perm), tree)


def _default_block(ring: _Ring) -> BlockFn:
    def block(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
        return attention(
            q,
            k,
            v,
            segment_ids=None if q_seg is None else (q_seg, kv_seg),
            positions=(q_pos, kv_pos),
            causal=ring.causal,
            window=ring.window,
            softcap=ring.softcap,
            scale=ring.scale,
            implementation=ring.implementation,
            return_lse=True,
            interpret=ring.interpret,
        )

    return block


def _mode_fns(ring: _Ring):
    """{mode: f(q, k, v, q_seg, kv_seg, q_pos, kv_pos) -> (out f32, lse)} with full-size outputs."""
    block = ring.block_fn or _default_block(ring)

    def half(x, which):
        if x is None:
            return None
        h = x.shape[1] // 2
        return x[:, :h] if which == 0 else x[:, h:]

    def full(q, k, v, qs, ks, qp, kp):
        out, lse = block(q, k, v, qs, ks, qp, kp)
        return out.astype(jnp.float32), lse

    def kv_first_half(q, k, v, qs, ks, qp, kp):
        out, lse = block(q, half(k, 0), half(v, 0), qs, half(ks, 0), qp, half(kp, 0))
        return out.astype(jnp.float32), lse

    def q_second_half(q, k, v, qs, ks, qp, kp):
        out, lse = block(half(q, 1), k, v, half(qs, 1), ks, half(qp, 1), kp)
        pad_o = jnp.zeros((out.shape[0], q.shape[1] - out.shape[1], *out.shape[2:]), jnp.float32)
        pad_l = jnp.full((lse.shape[0], q.shape[1] - lse.shape[1], lse.shape[2]), -jnp.inf, jnp.float32)
        return jnp.concatenate([pad_o, out.astype(jnp.float32)], 1), jnp.concatenate([pad_l, lse], 1)

    def skip(q, k, v, qs, ks, qp, kp):
        return (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))

    return {SKIP: skip, FULL: full, KV_FIRST_HALF: kv_first_half, Q_SECOND_HALF: q_second_half}


def _switch(table: np.ndarray, first: int, s, rank, fns: dict, *operands):
    """Run mode table[s, rank] (both may be traced), s in [first, first + len(table)) of the full
    schedule; `table` is the slice of steps this call site can reach, so only their modes are compiled."""
    present = [m for m in _MODES if m in set(table.ravel())]
    if len(present) == 1:
        return fns[present[0]](*operands)
    codes = np.vectorize(present.index)(table).astype(np.int32)
    return jax.lax.switch(jnp.asarray(codes)[s - first, rank], [fns[m] for m in present], *operands)


def _safe(lse):
    return jnp.where(jnp.isfinite(lse), lse, 0.0)


def _merge(o, lse, o_s, lse_s):
    """Combine two partial softmax results by their log-sum-exps (rows that saw nothing stay 0/-inf)."""
    new = jnp.logaddexp(lse, lse_s)
    safe = _safe(new)
    o = o * jnp.exp(lse - safe)[..., None] + o_s * jnp.exp(lse_s - safe)[..., None]
    return o, new


def _positions(ring: _Ring, rank, n, local_len, batch, explicit):
    if explicit is not None:
        return explicit
    return jnp.broadcast_to(local_indices(rank, n, local_len, ring.zigzag), (batch, local_len))


def _ring_forward(ring: _Ring, q, k, v, seg, pos):
    rank, n, size = _rank_and_size(ring)
    b, t = q.shape[:2]
    table = schedule(n, ring.zigzag, ring.causal, derived_positions=pos is None)
    fns = _mode_fns(ring)
    q_pos = _positions(ring, rank, n, t, b, pos)

    def compute(s, first, last, kv, acc):
        k_s, v_s, seg_s, pos_s = kv
        kv_pos = _positions(ring, (rank - s) % n, n, t, b, pos_s)
        o_s, lse_s = _switch(table[first:last], first, s, rank, fns, q, k_s, v_s, seg, seg_s, q_pos, kv_pos)
        return _merge(*acc, o_s, lse_s)

    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full(q.shape[:3], -jnp.inf, jnp.float32))
    own = (k, v, seg, pos)
    if n == 1:
        o, lse = compute(0, 0, 1, own, acc)
        return o.astype(q.dtype), lse

    # Step s computes block s while block s+1 is in flight: n-1 hops for n blocks.
    def body(s, carry):
        cur, acc = carry
        return _rotate(cur, ring, size), compute(s, 1, n - 1, cur, acc)

    nxt = _rotate(own, ring, size)
    acc = compute(0, 0, 1, own, acc)  # the diagonal block
    if n > 2:
        nxt, acc = jax.lax.fori_loop(1, n - 1, body, (nxt, acc))
    o, lse = compute(n - 1, n - 1, n, nxt, acc)
    return o.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, seg, pos):
    return _ring_forward(ring, q, k, v, seg, pos)


def _ring_fwd(ring, q, k, v, seg, pos):
    o, lse = _ring_forward(ring, q, k, v, seg, pos)
    return (o, lse), (q, k, v, seg, pos, o, lse)


def _ring_bwd(ring: _Ring, residuals, cotangents):
    q, k, v, seg, pos, o, lse = residuals
    do, dlse = cotangents
    rank, n, size = _rank_and_size(ring)
    b, t = q.shape[:2]
    table = schedule(n, ring.zigzag, ring.causal, derived_positions=pos is None)
    fns = _mode_fns(ring)
    q_pos = _positions(ring, rank, n, t, b, pos)
    do = do.astype(jnp.float32)
    dlse = dlse.astype(jnp.float32)
    lse_safe = _safe(lse)

    def grads(mode_fn, q, k_s, v_s, qs, ks, qp, kp):
        """This block's share of dq, dk, dv: the block's VJP with cotangents scaled by its softmax weight
        w = exp(lse_block - lse), so that ds = exp(logits - lse) (do.v - do.o + dlse) as in one kernel."""
        (o_s, lse_s), vjp = jax.vjp(lambda q, k, v: mode_fn(q, k, v, qs, ks, qp, kp), q, k_s, v_s)
        w = jnp.where(jnp.isfinite(lse_s) & jnp.isfinite(lse), jnp.exp(lse_s - lse_safe), 0.0)
        do_s = w[..., None] * do
        dlse_s = w * (jnp.sum(do * (o_s - o.astype(jnp.float32)), -1) + dlse)
        return vjp((do_s, dlse_s))

    def skip_grads(q, k_s, v_s, qs, ks, qp, kp):
        return jnp.zeros_like(q), jnp.zeros_like(k_s), jnp.zeros_like(v_s)

    grad_fns = {m: (skip_grads if m == SKIP else functools.partial(grads, f)) for m, f in fns.items()}

    def step(s, first, last, cur, dkv, dq):
        k_s, v_s, seg_s, pos_s = cur
        kv_pos = _positions(ring, (rank - s) % n, n, t, b, pos_s)
        dq_s, dk_s, dv_s = _switch(
            table[first:last], first, s, rank, grad_fns, q, k_s, v_s, seg, seg_s, q_pos, kv_pos
        )
        dkv = (dkv[0] + dk_s.astype(jnp.float32), dkv[1] + dv_s.astype(jnp.float32))
        # The accumulators follow their block; after n hops they are back on the block's owner.
        return _rotate(dkv, ring, size) if n > 1 else dkv, dq + dq_s.astype(jnp.float32)

    zeros_kv = jnp.zeros(k.shape, jnp.float32)
    own = (k, v, seg, pos)
    dq = jnp.zeros(q.shape, jnp.float32)
    if n == 1:
        (dk, dv), dq = step(0, 0, 1, own, (zeros_kv, zeros_kv), dq)
    else:

        def body(s, carry):
            cur, dkv, dq = carry
            return (_rotate(cur, ring, size), *step(s, 1, n - 1, cur, dkv, dq))

        nxt = _rotate(own, ring, size)  # in flight while the diagonal's gradients are computed
        dkv, dq = step(0, 0, 1, own, (zeros_kv, zeros_kv), dq)
        if n > 2:
            nxt, dkv, dq = jax.lax.fori_loop(1, n - 1, body, (nxt, dkv, dq))
        (dk, dv), dq = step(n - 1, n - 1, n, nxt, dkv, dq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    axis_name: str,
    segment_ids=None,
    positions=None,
    zigzag: bool = True,
    stride: int = 1,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
    return_lse: bool = False,
    block_fn: BlockFn | None = None,
):
    """Self-attention of this device's sequence shard against the whole sequence, K/V passed around a
    ring on `axis_name`. Call inside `jax.shard_map`; all arguments are this device's shards.

    q [b, t, n, h], k and v [b, t, kh, h]; segment_ids, positions: [b, t] (positions: the mask positions,
    as in `attention`; None means the true token index of the layout, which also enables skipping).
    zigzag: the shards are laid out zigzag (see `zigzag_indices`); False: contiguous.
    stride: the ring is devices r, r+stride, r+2*stride, ... of the axis (USP: stride = Ulysses size).
    block_fn: replaces the per-block attention (tests and benchmarks count work with it).
    Returns out [b, t, n, h] (and lse [b, t, n] float32 with return_lse).
    """
    t = q_BTNH.shape[1]
    if zigzag and t % 2:
        raise ValueError(f"a zigzag shard holds two equal chunks; local length {t} is odd")
    ring = _Ring(
        axis_name=axis_name,
        stride=stride,
        zigzag=zigzag,
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        implementation=implementation,
        interpret=interpret,
        block_fn=block_fn,
    )
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    pos = None if positions is None else positions.astype(jnp.int32)
    out, lse = _ring_attention(ring, q_BTNH, k_BTKH, v_BTKH, seg, pos)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------------
# The simple baseline: gather K/V.


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_sum_grads_f32(x_BTKH, axis_name: str):
    """All-gather along the sequence; the gradient is reduce-scattered in float32 (as the ring's dK/dV
    travel), then cast back to x's dtype."""
    return jax.lax.all_gather(x_BTKH, axis_name, axis=1, tiled=True)


def _gather_fwd(x_BTKH, axis_name):
    return _gather_sum_grads_f32(x_BTKH, axis_name), None


def _gather_bwd(axis_name, _, grad):
    # float32 also sidesteps an XLA:CPU compiler abort on bfloat16 reduce-scatters inside the layer loop.
    summed = jax.lax.psum_scatter(grad.astype(jnp.float32), axis_name, scatter_dimension=1, tiled=True)
    return (summed.astype(grad.dtype),)


_gather_sum_grads_f32.defvjp(_gather_fwd, _gather_bwd)


def allgather_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    axis_name: str,
    segment_ids=None,
    positions=None,
    zigzag: bool = True,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
):
    """Every device all-gathers K/V (and their segment ids) over `axis_name` and attends its local
    queries to the whole sequence. Backward: reduce-scatters of dK/dV (in float32).
    Memory per device grows with the full sequence length (the K/V of everything); the ring does not."""
    n = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
    b, t = q_BTNH.shape[:2]
    k_full, v_full = _gather_sum_grads_f32(k_BTKH, axis_name), _gather_sum_grads_f32(v_BTKH, axis_name)
    kv_seg = None if segment_ids is None else jax.lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    if positions is None:
        q_pos = jnp.broadcast_to(local_indices(rank, n, t, zigzag), (b, t))
        if zigzag and n > 1:
            # Put the gathered K/V back in token order: the kernel skips key blocks past the last query.
            order = np.argsort(zigzag_indices(n * t, n))
            k_full, v_full = k_full[:, order], v_full[:, order]
            kv_seg = None if kv_seg is None else kv_seg[:, order]
        kv_pos = jnp.broadcast_to(jnp.arange(n * t, dtype=jnp.int32), (b, n * t))
    else:
        q_pos, kv_pos = positions, jax.lax.all_gather(positions, axis_name, axis=1, tiled=True)
    return attention(
        q_BTNH,
        k_full,
        v_full,
        segment_ids=None if segment_ids is None else (segment_ids, kv_seg),
        positions=(q_pos, kv_pos),
        causal=causal,
        window=window,
        softcap=softcap,
        scale=scale,
        implementation=implementation,
        interpret=interpret,
    )

"""Sequence (context) parallelism: the token layouts, and the entry points that run attention or linear
attention with every sequence split over the mesh's "sequence" axis.

Call these from model code under the outer `jax.jit` with the mesh set (`jax.set_mesh`); each wraps its
per-device function in `jax.shard_map` over the current mesh: batch over the mesh axes of the logical
"batch" axis (data, fsdp, expert), the sequence over "sequence", heads over "tensor" (each only where it
divides). With no mesh, or a sequence axis of size 1, they are the single-device computation.

Variants (`model.sequence_parallel`):
  ring       K/V blocks rotate by ppermute, merged by log-sum-exp (jaxpar.parallel.ring); zigzag layout.
  ulysses    all-to-all from sequence shards to head shards and back (jaxpar.parallel.ulysses);
             contiguous layout; heads and KV heads must divide by the sequence size.
  usp        Ulysses inside groups of `ulysses_degree` devices, ring across groups; zigzag over groups.
  allgather  all-gather K/V (the baseline); zigzag layout.
Linear attention (jaxpar.models.linear_attention) is sequence-parallel by LASP-2 whatever the variant:
`lasp2_incoming_states` below is its one collective (an all-gather of memory states per layer).

Layout: a causal ring gives device r of n the K/V of every device but computes only what its queries can
see; with contiguous shards the last device sees everything and the first almost nothing. The zigzag
layout gives device r chunks r and 2n-1-r of 2n, so every device does the same work. It is a
permutation of the tokens of every row, applied once to the whole batch (inputs, targets, segment ids,
positions) by the data pipeline (`zigzag_batch`); the positions keep the true token positions (RoPE is
unchanged), and the loss, a sum over tokens, is unchanged by a permutation. Attention recovers each
token's true index from the layout, so masking is exact.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxpar.kernels import attention as attention_lib
from jaxpar.parallel import ring as ring_lib, ulysses as ulysses_lib
from jaxpar.parallel.per_device import heads_ways, per_device

SEQUENCE_AXIS = "sequence"
# How attention crosses sequence shards, and the token layouts it can use.
VARIANTS = ("ring", "ulysses", "usp", "allgather")
LAYOUTS = ("zigzag", "contiguous")


# --------------------------------------------------------------------------------------------------
# Layouts: which device holds which tokens. jaxpar.config validates a run with these same functions.


def default_ulysses_degree(sequence: int, heads: int, kv_heads: int) -> int:
    """USP's Ulysses group size when none is given: the largest divisor of `sequence`, short of `sequence`
    itself (so the ring has at least two groups), that divides the per-device query and KV head counts."""
    return max(
        u for u in range(1, max(sequence, 2)) if sequence % u == 0 and heads % u == 0 and kv_heads % u == 0
    )


def resolve_ulysses_degree(ulysses_degree: int, sequence: int, heads: int, kv_heads: int) -> int:
    """USP's Ulysses size: the given one, or `default_ulysses_degree` for 0."""
    return ulysses_degree or default_ulysses_degree(sequence, heads, kv_heads)


def zigzag_factor(
    variant: str, sequence: int, ulysses_degree: int = 1, mixer: str = "softmax", layout: str = "zigzag"
) -> int:
    """The n of the zigzag layout a run uses (1: contiguous). ring and allgather balance over all
    `sequence` devices, usp over its ring of sequence / ulysses_degree groups, ulysses needs none (every
    device attends to the whole sequence for its heads), and neither does a model of linear attention
    only (LASP-2's work is the same on every shard). The data pipeline and every layer must agree."""
    if variant not in VARIANTS:
        raise ValueError(f"sequence_parallel={variant!r} is not supported; choose one of {list(VARIANTS)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {list(LAYOUTS)}")
    if sequence <= 1 or layout == "contiguous" or variant == "ulysses" or mixer == "linear":
        return 1
    if variant == "usp":
        if ulysses_degree < 1 or sequence % ulysses_degree:
            raise ValueError(
                f"usp ulysses_degree={ulysses_degree} must be a divisor of the sequence axis size {sequence}."
            )
        return sequence // ulysses_degree
    return sequence


def model_zigzag_factor(
    variant: str, mixer: str, sequence: int, heads: int, kv_heads: int, ulysses_degree: int = 0
) -> int:
    """`zigzag_factor` of a model on a sequence axis of size `sequence`; heads and kv_heads per device
    after tensor parallelism, ulysses_degree as configured (0: the default)."""
    if variant == "usp" and sequence > 1:
        ulysses_degree = resolve_ulysses_degree(ulysses_degree, sequence, heads, kv_heads)
    return zigzag_factor(variant, sequence, ulysses_degree or 1, mixer=mixer)


def to_zigzag(x, n: int, axis: int = 1):
    """Permute `axis` (the sequence) into the zigzag layout over n devices (numpy or jax arrays)."""
    if n <= 1:
        return x
    perm = ring_lib.zigzag_indices(x.shape[axis], n)
    return np.take(x, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, perm, axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    if n <= 1:
        return x
    inverse = np.argsort(ring_lib.zigzag_indices(x.shape[axis], n))
    return np.take(x, inverse, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inverse, axis=axis)


def zigzag_batch(batch: Mapping, n: int) -> dict:
    """Every [B, T] array of a batch (inputs, targets, segment_ids, positions) in the zigzag layout."""
    return {key: to_zigzag(value, n) for key, value in batch.items()}


def check_split(
    variant: str,
    sequence: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    ulysses_degree: int = 0,
    zigzag: int = 1,
) -> None:
    """ValueError naming the problem when `variant` cannot split this attention `sequence` ways.
    heads, kv_heads: per device after tensor parallelism. zigzag: the layout's n (1: contiguous)."""
    if variant not in VARIANTS:
        raise ValueError(f"sequence_parallel={variant!r} is not supported; choose one of {list(VARIANTS)}")
    if seq_len % sequence:
        raise ValueError(
            f"sequence length {seq_len} cannot be split over {sequence} sequence shards; "
            f"use a length divisible by {sequence}."
        )
    if zigzag > 1 and seq_len % (2 * zigzag):
        raise ValueError(
            f"the zigzag layout over {zigzag} ring ranks cuts the sequence into {2 * zigzag} "
            f"equal chunks; sequence length {seq_len} is not divisible by {2 * zigzag}."
        )
    if variant == "ulysses":
        ulysses_lib.check_heads(heads, kv_heads, sequence)
    if variant == "usp":
        if ulysses_degree < 1 or sequence % ulysses_degree:
            raise ValueError(
                f"usp ulysses_degree={ulysses_degree} must be a divisor of the sequence axis size {sequence}."
            )
        ulysses_lib.check_heads(heads, kv_heads, ulysses_degree, what="USP's Ulysses part")


# --------------------------------------------------------------------------------------------------
# Attention under a mesh.


def current_mesh_sizes() -> dict[str, int]:
    """Axis sizes of the current (abstract) mesh; {} with none."""
    return dict(jax.sharding.get_abstract_mesh().shape)


def sequence_size(axis: str = SEQUENCE_AXIS) -> int:
    """Size of the sequence axis of the current mesh (1 with no mesh)."""
    return current_mesh_sizes().get(axis, 1)


_QKV = ("batch", "length", "heads", None)
_ROWS = ("batch", "length")


def sequence_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    segment_ids=None,
    positions=None,
    variant: str = "ring",
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    ulysses_degree: int = 0,
    layout: str = "zigzag",
    interpret: bool | None = None,
    return_lse: bool = False,
    axis: str = SEQUENCE_AXIS,
):
    """Self-attention of global q [B, T, N, H], k and v [B, T, K, H] under the current mesh: the result
    of `jaxpar.kernels.attention.attention` on the tokens in their true order, with T split over the
    mesh's sequence axis by `variant`.

    The inputs are in the run's layout (`zigzag_factor(variant, ...)`; "contiguous" turns the zigzag off).
    segment_ids [B, T]: packed documents. positions [B, T]: the MASK positions (as in `attention`); leave
    None for the usual causal mask by token index, which the layout supplies (and which lets the ring skip
    blocks). RoPE positions are the model's business and never enter here.
    ulysses_degree: usp's Ulysses group size (0: `default_ulysses_degree`).
    With a sequence axis of size 1 this is `attention(...)`: kernels GSPMD cannot partition (pallas,
    cudnn) then run per device over batch and head shards; xla is left to GSPMD.
    return_lse: also return the log-sum-exp [B, T, N] (sequence axis of size 1 only).
    """
    n = sequence_size(axis)
    mask = dict(causal=causal, window=window, softcap=softcap, scale=scale, interpret=interpret)
    B, T, N, _ = q_BTNH.shape
    K = k_BTKH.shape[2]
    arrays = dict(q=q_BTNH, k=k_BTKH, v=v_BTKH, segment_ids=segment_ids, positions=positions)
    logical = dict(q=_QKV, k=_QKV, v=_QKV, segment_ids=_ROWS, positions=_ROWS)
    if n == 1:
        name = attention_lib.resolve_implementation(
            implementation,
            attention_lib.case_of(
                q_BTNH,
                k_BTKH,
                segment_ids=segment_ids,
                positions=positions,
                causal=causal,
                window=window,
                softcap=softcap,
                return_lse=return_lse,
            ),
        )

        def local(q, k, v, segment_ids, positions):
            return attention_lib.attention(
                q,
                k,
                v,
                segment_ids=segment_ids,
                positions=positions,
                implementation=name,
                return_lse=return_lse,
                **mask,
            )

        if name == "xla":
            return local(**arrays)
        return per_device(
            local,
            arrays,
            logical,
            (_QKV, ("batch", "length", "heads")) if return_lse else _QKV,
            batch=B,
            heads=(N, K),
        )
    if return_lse:
        raise ValueError("return_lse is supported without sequence parallelism only")

    tp = heads_ways(N, K)
    if variant == "usp":
        ulysses_degree = resolve_ulysses_degree(ulysses_degree, n, N // tp, K // tp)
    zz = zigzag_factor(variant, n, ulysses_degree, layout=layout)
    check_split(variant, n, T, N // tp, K // tp, ulysses_degree, zz)
    zigzag = zz > 1

    def local(q, k, v, segment_ids, positions):
        common = dict(
            axis_name=axis,
            segment_ids=segment_ids,
            positions=positions,
            implementation=implementation,
            **mask,
        )
        if variant == "ring":
            return ring_lib.ring_attention(q, k, v, zigzag=zigzag, **common)
        if variant == "allgather":
            return ring_lib.allgather_attention(q, k, v, zigzag=zigzag, **common)
        if variant == "ulysses":
            return ulysses_lib.ulysses_attention(q, k, v, **common)
        return ulysses_lib.usp_attention(q, k, v, ulysses_size=ulysses_degree, zigzag=zigzag, **common)

    return per_device(local, arrays, logical, _QKV, batch=B, heads=(N, K), length_axis=axis)


# --------------------------------------------------------------------------------------------------
# LASP-2: the one collective of sequence-parallel linear attention.


def piece_order(n: int, zigzag: int) -> np.ndarray:
    """[n, pieces] position in sequence order of each device's local pieces. Contiguous layout: one piece
    per device. Zigzag over `zigzag` ranks (which divides n): each shard's two halves, each of which lies
    inside one zigzag chunk (also under USP, where a ring rank's two chunks are split over n / zigzag
    devices)."""
    if zigzag <= 1:
        return np.arange(n)[:, None]
    if n % zigzag:
        raise ValueError(f"a zigzag over {zigzag} ranks does not divide {n} sequence shards")
    return ring_lib.zigzag_indices(2 * n, zigzag).reshape(n, 2)


def lasp2_incoming_states(state_PbKHH, log_decay_PbK, tag_Pb, *, axis_name: str, zigzag: int):
    """LASP-2 (Sun et al. 2025): all-gather every device's memory states once, then each device combines
    the ones before its pieces locally. Call inside shard_map.

    zigzag: the layout's n (1: contiguous; see `piece_order`).
    Per local piece p (in the order the device holds them): state [b, K, H, H] = the piece's own
    contribution to the recurrent state at its last token (from zero), log_decay [b, K] = the sum of the
    log decays over the piece, tag [b] = the segment id of its last token.
    Returns (incoming state [P, b, K, H, H] float32, incoming tag [P, b]): the state entering each local
    piece and the segment it belongs to (tokens of another segment ignore it). A state survives into a
    later piece only while the segment of its last token continues; with segments in contiguous runs
    (packing), that is the tag of the state == the tag of the piece just before.
    """
    n = jax.lax.axis_size(axis_name)
    rank = jax.lax.axis_index(axis_name)
    pieces = state_PbKHH.shape[0]
    order = piece_order(n, zigzag)
    if order.shape[1] != pieces:
        raise ValueError(f"{pieces} local pieces, but the layout has {order.shape[1]} per device")
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True)
    # [n * pieces, ...] in device-major order -> global sequence order.
    to_global = np.argsort(order.reshape(-1))
    states = gather(state_PbKHH.astype(jnp.float32))[to_global]
    log_decay = gather(log_decay_PbK.astype(jnp.float32))[to_global]
    tags = gather(tag_Pb)[to_global]
    cum = jnp.cumsum(log_decay, axis=0)  # [G, b, K]: decay from the start through piece g

    def incoming(g):
        """State entering global piece g: sum over earlier pieces g' of M_g' decayed over the pieces in
        between, if its segment reaches the end of piece g-1."""
        prev = jnp.maximum(g - 1, 0)
        G = states.shape[0]
        earlier = (jnp.arange(G) < g)[:, None]  # [G, 1]
        same = tags == tags[prev][None]  # [G, b]
        log_w = cum[prev][None] - cum  # [G, b, K], <= 0 for g' <= g-1
        w = jnp.where((earlier & same)[..., None], jnp.exp(jnp.minimum(log_w, 0.0)), 0.0)
        state = jnp.einsum("gbk,gbkij->bkij", w, states)
        tag = jnp.where(g > 0, tags[prev], jnp.iinfo(jnp.int32).min)
        return state, tag

    ids = jnp.asarray(order)[rank]  # [pieces]
    return jax.vmap(incoming)(ids)

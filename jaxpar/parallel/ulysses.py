"""DeepSpeed-Ulysses and unified sequence parallelism (USP), called INSIDE the caller's `jax.shard_map`
with the sequence split over `axis_name`.

Ulysses (Jacobs et al. 2023): an all-to-all turns sequence shards into head shards, each device runs
ordinary attention over the whole sequence for 1/U of the heads, and a second all-to-all turns the
output back into sequence shards. Four all-to-alls per forward (q, k, v, out), four in the backward
(their transposes), each moving (U-1)/U of one activation. It needs the (local) query AND key/value
head counts to be divisible by U: under grouped-query attention the few KV heads are usually the limit.

USP (Fang & Zhao 2024): the sequence axis of N devices is split N = R x U; Ulysses runs inside groups
of U consecutive devices (the fast links) and ring attention across the R groups, so head counts only
need to be divisible by U, and the ring is R long instead of N.
"""

from __future__ import annotations

import functools

import jax

from jaxpar.kernels.attention import attention
from jaxpar.parallel import ring as ring_lib


def check_heads(heads: int, kv_heads: int, ways: int, what: str = "Ulysses") -> None:
    """ValueError unless both head counts (per device, after tensor parallelism) split `ways` ways."""
    if heads % ways or kv_heads % ways:
        which = "key/value heads (grouped-query attention)" if heads % ways == 0 else "query heads"
        raise ValueError(
            f"{what} splits attention heads {ways} ways across the sequence axis, but this device has "
            f"{heads} query heads and {kv_heads} key/value heads: the {which} do not divide by {ways}. "
            "Use fewer sequence shards for Ulysses, sequence_parallel='usp' with a smaller ulysses "
            "degree, or 'ring' (no head constraint)."
        )


def groups(axis_size: int, ulysses_size: int) -> list[list[int]]:
    """Ulysses groups of `ulysses_size` consecutive devices of the axis (the ring runs across them)."""
    return [list(range(g * ulysses_size, (g + 1) * ulysses_size)) for g in range(axis_size // ulysses_size)]


def _seq_to_heads(x, axis_name, axis_index_groups):
    return jax.lax.all_to_all(x, axis_name, 2, 1, axis_index_groups=axis_index_groups, tiled=True)


def _heads_to_seq(x, axis_name, axis_index_groups):
    return jax.lax.all_to_all(x, axis_name, 1, 2, axis_index_groups=axis_index_groups, tiled=True)


def ulysses_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    axis_name: str,
    segment_ids=None,
    positions=None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
    ulysses_size: int | None = None,
    inner=None,
):
    """Attention of this device's sequence shard, heads exchanged by all-to-all over `axis_name`.

    q [b, t, n, h], k and v [b, t, kh, h], segment_ids and positions [b, t]: this device's shards of a
    sequence laid out contiguously over the axis (or, with `ulysses_size` < axis size, over each group).
    positions None: the token index (the gathered shards are in sequence order).
    ulysses_size: group size U (default: the whole axis); groups are consecutive devices.
    inner(q, k, v, segment_ids, positions) -> out replaces the attention over the gathered sequence
    (USP passes a ring over the groups).
    """
    size = jax.lax.axis_size(axis_name)
    ways = size if ulysses_size is None else ulysses_size
    if size % ways:
        raise ValueError(f"Ulysses size {ways} does not divide the size {size} of axis {axis_name!r}")
    check_heads(q_BTNH.shape[2], k_BTKH.shape[2], ways)
    grouping = None if ways == size else groups(size, ways)
    to_heads = functools.partial(_seq_to_heads, axis_name=axis_name, axis_index_groups=grouping)
    gather = functools.partial(
        jax.lax.all_gather, axis_name=axis_name, axis=1, tiled=True, axis_index_groups=grouping
    )
    q, k, v = to_heads(q_BTNH), to_heads(k_BTKH), to_heads(v_BTKH)
    seg = None if segment_ids is None else gather(segment_ids)
    pos = None if positions is None else gather(positions)
    if inner is not None:
        out = inner(q, k, v, seg, pos)
    else:
        out = attention(
            q,
            k,
            v,
            segment_ids=seg,
            positions=pos,
            causal=causal,
            window=window,
            softcap=softcap,
            scale=scale,
            implementation=implementation,
            interpret=interpret,
        )
    return _heads_to_seq(out, axis_name, grouping)


def usp_attention(
    q_BTNH,
    k_BTKH,
    v_BTKH,
    *,
    axis_name: str,
    ulysses_size: int,
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
    """Ulysses inside groups of `ulysses_size` consecutive devices, ring attention across the groups.

    Layout: the sequence is laid out zigzag over the R = size / ulysses_size groups (when `zigzag`), and
    each group's two chunks are split contiguously over its devices; see
    `jaxpar.parallel.sequence.zigzag_factor`."""
    size = jax.lax.axis_size(axis_name)
    if ulysses_size < 1 or size % ulysses_size:
        raise ValueError(f"USP ulysses_size={ulysses_size} must divide the size {size} of axis {axis_name!r}")

    def ring_over_groups(q, k, v, seg, pos):
        return ring_lib.ring_attention(
            q,
            k,
            v,
            axis_name=axis_name,
            segment_ids=seg,
            positions=pos,
            zigzag=zigzag,
            stride=ulysses_size,
            causal=causal,
            window=window,
            softcap=softcap,
            scale=scale,
            implementation=implementation,
            interpret=interpret,
        )

    return ulysses_attention(
        q_BTNH,
        k_BTKH,
        v_BTKH,
        axis_name=axis_name,
        segment_ids=segment_ids,
        positions=positions,
        ulysses_size=ulysses_size,
        inner=ring_over_groups,
    )

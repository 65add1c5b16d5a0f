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

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

from jaxpar.config import (SEQUENCE_LAYOUTS as LAYOUTS, SEQUENCE_PARALLEL as VARIANTS,  # noqa: F401
                           resolve_ulysses_degree, run_zigzag_factor, zigzag_factor)
from jaxpar.kernels.attention import attention
from jaxpar.parallel import ring as ring_lib, rules, ulysses as ulysses_lib

SEQUENCE_AXIS = "sequence"

zigzag_indices = ring_lib.zigzag_indices


# --------------------------------------------------------------------------------------------------
# Layouts.


def to_zigzag(x, n: int, axis: int = 1):
    """Permute `axis` (the sequence) into the zigzag layout over n devices (numpy or jax arrays)."""
    if n <= 1:
        return x
    perm = zigzag_indices(x.shape[axis], n)
    return np.take(x, perm, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, perm, axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
    """Inverse of `to_zigzag`."""
    if n <= 1:
        return x
    inverse = np.argsort(zigzag_indices(x.shape[axis], n))
    return np.take(x, inverse, axis=axis) if isinstance(x, np.ndarray) else jnp.take(x, inverse, axis=axis)


def zigzag_batch(batch: Mapping, n: int) -> dict:
    """Every [B, T] array of a batch (inputs, targets, segment_ids, positions) in the zigzag layout."""
    return {key: to_zigzag(value, n) for key, value in batch.items()}


# --------------------------------------------------------------------------------------------------
# Checks (the same rules jaxpar.config.validate_run applies to a run, here for direct callers).


def check_split(variant: str, sequence: int, seq_len: int, heads: int, kv_heads: int,
                ulysses_degree: int = 0, zigzag: int = 1) -> None:
    """ValueError naming the problem when `variant` cannot split this attention `sequence` ways.
    heads, kv_heads: per device after tensor parallelism. zigzag: the layout's n (1: contiguous)."""
    if variant not in VARIANTS:
        raise ValueError(f"sequence_parallel={variant!r} is not supported; choose one of {list(VARIANTS)}")
    if seq_len % sequence:
        raise ValueError(f"sequence length {seq_len} cannot be split over {sequence} sequence shards; "
                         f"use a length divisible by {sequence}.")
    if zigzag > 1 and seq_len % (2 * zigzag):
        raise ValueError(f"the zigzag layout over {zigzag} ring ranks cuts the sequence into {2 * zigzag} "
                         f"equal chunks; sequence length {seq_len} is not divisible by {2 * zigzag}.")
    if variant == "ulysses":
        ulysses_lib.check_heads(heads, kv_heads, sequence)
    if variant == "usp":
        if ulysses_degree < 1 or sequence % ulysses_degree:
            raise ValueError(f"usp ulysses_degree={ulysses_degree} must be a divisor of the sequence axis "
                             f"size {sequence}.")
        ulysses_lib.check_heads(heads, kv_heads, ulysses_degree, what="USP's Ulysses part")


# --------------------------------------------------------------------------------------------------
# shard_map over the current mesh.


def current_mesh_sizes() -> dict[str, int]:
    """Axis sizes of the current (abstract) mesh; {} with none."""
    return dict(jax.sharding.get_abstract_mesh().shape)


def sequence_size(axis: str = SEQUENCE_AXIS) -> int:
    """Size of the sequence axis of the current mesh (1 with no mesh)."""
    return current_mesh_sizes().get(axis, 1)


def shard_over_sequence(local_fn, arrays: Mapping[str, jax.Array | None], logical: Mapping[str, tuple],
                        out_logical, *, batch: int, heads: tuple[int, ...], axis: str = SEQUENCE_AXIS,
                        check_vma: bool = False):
    """Run local_fn(**arrays) on every device's shard, inside `jax.shard_map` over the current mesh.

    `logical[name]` names each array's dimensions with "batch", "length", "heads" or None; `out_logical`
    does the same for the output (a tuple of names, or a tuple of such tuples). Batch goes over the
    mesh axes of the logical "batch" axis that divide `batch`, length over `axis`, heads over "tensor"
    when it divides every count in `heads`. Mesh axes already manual (an outer shard_map) stay so.
    check_vma=False by default: interpret-mode Pallas kernels fail the varying-axes check (FIELD_NOTES).
    """
    mesh = jax.sharding.get_abstract_mesh()
    kinds = dict(zip(mesh.axis_names, mesh.axis_types))
    if kinds.get(axis) == AxisType.Manual:
        raise ValueError(f"mesh axis {axis!r} is already manual (inside another shard_map); sequence "
                         "parallelism wraps its own shard_map over it.")
    free = {a for a in mesh.axis_names if kinds[a] != AxisType.Manual}
    usable = rules.usable_axes(mesh)
    mapping = {"batch": rules.divisible_axes(rules.mesh_axes("batch"), usable, (batch,)), "length": axis,
               "heads": rules.divisible_axes(rules.mesh_axes("heads"), usable, heads), None: None}

    def spec(names):
        return P(*(mapping[n] for n in names))

    def is_names(x):
        return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)

    present = {k: v for k, v in arrays.items() if v is not None}
    in_specs = ({k: spec(logical[k]) for k in present},)
    out_specs = jax.tree.map(spec, out_logical, is_leaf=is_names)
    if any(kinds[a] == AxisType.Explicit for a in free):
        present = {k: jax.sharding.reshard(v, in_specs[0][k]) for k, v in present.items()}

    def body(present):
        return local_fn(**{k: present.get(k) for k in arrays})

    # Manual over the axes the specs use (and the sequence axis) only; the rest stay with GSPMD, so no
    # collective is emitted over axes of size 1 or over axes nothing here is split on.
    used = {axis} | {a for names in (mapping["batch"], mapping["heads"]) for a in (names or ())}
    # Under jit also when called eagerly: eager partial-manual shard_map rejects these out_specs.
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=used,
                                 check_vma=check_vma))(present)


# --------------------------------------------------------------------------------------------------
# Attention.


def sequence_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids=None, positions=None, variant: str = "ring",
                       causal: bool = True, window: int | None = None, softcap: float | None = None,
                       scale: float | None = None, implementation: str | None = None,
                       ulysses_degree: int = 0, layout: str = "zigzag", interpret: bool | None = None,
                       axis: str = SEQUENCE_AXIS):
    """Self-attention of global q [B, T, N, H], k and v [B, T, K, H] with T split over the mesh's
    sequence axis by `variant`; the same result as `jaxpar.kernels.attention.attention` on the tokens in
    their true order.

    The inputs are in the run's layout (`zigzag_factor(variant, ...)`; "contiguous" turns the zigzag off).
    segment_ids [B, T]: packed documents. positions [B, T]: the MASK positions (as in `attention`); leave
    None for the usual causal mask by token index, which the layout supplies (and which lets the ring skip
    blocks). RoPE positions are the model's business and never enter here.
    ulysses_degree: usp's Ulysses group size (0: `default_ulysses_degree`).
    With no mesh or a sequence axis of size 1 this is `attention(...)`.
    """
    n = sequence_size(axis)
    mask = dict(causal=causal, window=window, softcap=softcap, scale=scale, implementation=implementation,
                interpret=interpret)
    if n == 1:
        return attention(q_BTNH, k_BTKH, v_BTKH, segment_ids=segment_ids, positions=positions, **mask)

    B, T, N, _ = q_BTNH.shape
    K = k_BTKH.shape[2]
    tp = _heads_ways(N, K)
    if variant == "usp":
        ulysses_degree = resolve_ulysses_degree(ulysses_degree, n, N // tp, K // tp)
    zz = zigzag_factor(variant, n, ulysses_degree, layout=layout)
    check_split(variant, n, T, N // tp, K // tp, ulysses_degree, zz)
    zigzag = zz > 1

    def local(q, k, v, segment_ids, positions):
        common = dict(axis_name=axis, segment_ids=segment_ids, positions=positions, **mask)
        if variant == "ring":
            return ring_lib.ring_attention(q, k, v, zigzag=zigzag, **common)
        if variant == "allgather":
            return ring_lib.allgather_attention(q, k, v, zigzag=zigzag, **common)
        if variant == "ulysses":
            return ulysses_lib.ulysses_attention(q, k, v, **common)
        return ulysses_lib.usp_attention(q, k, v, ulysses_size=ulysses_degree, zigzag=zigzag, **common)

    qkv = ("batch", "length", "heads", None)
    rows = ("batch", "length")
    return shard_over_sequence(
        local, dict(q=q_BTNH, k=k_BTKH, v=v_BTKH, segment_ids=segment_ids, positions=positions),
        dict(q=qkv, k=qkv, v=qkv, segment_ids=rows, positions=rows), qkv, batch=B, heads=(N, K), axis=axis)


def _heads_ways(*heads: int) -> int:
    """How many ways shard_over_sequence splits heads (the tensor axes that divide every count)."""
    usable = rules.usable_axes(jax.sharding.get_abstract_mesh())
    return math.prod(usable[a] for a in rules.divisible_axes(rules.mesh_axes("heads"), usable, heads) or ())


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
    return zigzag_indices(2 * n, zigzag).reshape(n, 2)


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
    gather = lambda x: jax.lax.all_gather(x, axis_name, axis=0, tiled=True)  # noqa: E731
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


# --------------------------------------------------------------------------------------------------
# Analytic communication per layer (checked against compiled programs by experiments/bench_sequence.py).


def expected_terms(variant: str, *, batch: int, seq_len: int, sequence: int, heads: int, kv_heads: int,
                   head_dim: int, act_bytes: int = 4, segment_ids: bool = True, ulysses_degree: int = 1,
                   zigzag: int = 1) -> list[tuple[str, str, int]]:
    """(what, collective kind, bytes) per device for one layer's forward + backward, in the convention of
    jaxpar.parallel.analysis (all-gather: result bytes; reduce-scatter, all-to-all, collective-permute:
    operand bytes). batch: rows per device; heads, kv_heads: per device after tensor parallelism.
    variant: one of VARIANTS, or "lasp2" (linear attention; `zigzag` > 1 gives two pieces per device).
    Ring and all-gather K/V gradients travel as float32; segment ids as int32."""
    n, t = sequence, seq_len // sequence
    kv = batch * t * kv_heads * head_dim * act_bytes  # this device's K (or V) shard
    kv32 = batch * t * kv_heads * head_dim * 4
    seg = batch * t * 4 if segment_ids else 0
    qo = batch * t * heads * head_dim * act_bytes
    if variant == "ring":
        return [("forward: K, V passed n-1 times", "collective-permute", (n - 1) * 2 * kv),
                ("forward: kv segment ids passed n-1 times", "collective-permute", (n - 1) * seg),
                ("backward: K, V passed n-1 times again", "collective-permute", (n - 1) * 2 * kv),
                ("backward: kv segment ids again", "collective-permute", (n - 1) * seg),
                ("backward: dK, dV (float32) passed n times, home", "collective-permute",
                 n * 2 * kv32 if n > 1 else 0)]
    if variant == "ulysses":
        return [("forward: all-to-all q, k, v, out", "all-to-all", 2 * qo + 2 * kv),
                ("backward: all-to-all d out, dq, dk, dv", "all-to-all", 2 * qo + 2 * kv),
                ("forward: all-gather segment ids", "all-gather", n * seg)]
    if variant == "usp":
        u, r = ulysses_degree, n // ulysses_degree
        ring_kv = batch * (u * t) * (kv_heads // u) * head_dim  # a ring block: group's tokens, 1/u heads
        ring_seg = batch * u * t * 4 if segment_ids else 0
        return [("forward: all-to-all q, k, v, out inside groups", "all-to-all", 2 * qo + 2 * kv),
                ("backward: all-to-all inside groups", "all-to-all", 2 * qo + 2 * kv),
                ("forward: all-gather segment ids inside groups", "all-gather", u * seg),
                ("ring across groups: K, V passed r-1 times, forward and backward", "collective-permute",
                 (r - 1) * 4 * ring_kv * act_bytes),
                ("ring: segment ids passed r-1 times, forward and backward", "collective-permute",
                 (r - 1) * 2 * ring_seg),
                ("ring: dK, dV (float32) passed r times", "collective-permute",
                 r * 2 * ring_kv * 4 if r > 1 else 0)]
    if variant == "allgather":
        return [("forward: all-gather K, V", "all-gather", 2 * n * kv),
                ("forward: all-gather kv segment ids", "all-gather", n * seg),
                ("backward: reduce-scatter dK, dV (float32)", "reduce-scatter", 2 * n * kv32)]
    if variant == "lasp2":
        pieces = 2 if zigzag > 1 else 1
        states = n * pieces * batch * kv_heads * (head_dim * head_dim + 1) * 4  # + summed log decays
        return [("forward: all-gather memory states and decays", "all-gather", states),
                ("forward: all-gather segment tags", "all-gather", n * pieces * batch * 4),
                ("backward: reduce-scatter their gradients", "reduce-scatter", states)]
    raise ValueError(f"unknown variant {variant!r}")

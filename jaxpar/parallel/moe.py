"""Expert-parallel token dispatch, called INSIDE the caller's `jax.shard_map` (or with no mesh at all).

Tokens on each device are routed to experts that live on other devices of the expert axis: rows are
packed per destination device, exchanged with one all-to-all, run through the local experts, and
returned by the inverse all-to-all. Two packings:

- dropless: each device sends every assignment (token, choice) to its expert's device in a buffer sized
  for the worst case (all of its assignments to one device), the owner sorts them by local expert and
  runs a grouped matmul (`jax.lax.ragged_dot`). No token is ever dropped. This is the portable fallback
  for `ragged_all_to_all` (which would send only the filled rows); it costs expert-axis-size times the
  dispatch memory.
- capacity: each expert takes at most `capacity` assignments per device (GShard/Switch). Priority is
  choice-major (all first choices before any second choice), then token order; the rest are dropped and
  contribute nothing (the residual stream carries them).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

# expert_fn(x_GD, group_sizes_E) -> y_GD for the dropless path (rows sorted by local expert), or
# expert_fn(x_ECD) -> y_ECD for the capacity path (one slot array per local expert).
ExpertFn = Callable[..., jax.Array]


def _axis_size(axis: str | None) -> int:
    return 1 if axis is None else jax.lax.axis_size(axis)


def dispatch_dropless(x_AD, expert_A, num_experts: int, expert_fn: ExpertFn, expert_axis: str | None):
    """y_AD[a] = expert_{expert_A[a]}(x_AD[a]) for every assignment a."""
    A = x_AD.shape[0]
    ep = _axis_size(expert_axis)
    local_experts = num_experts // ep
    order_A = jnp.argsort(expert_A, stable=True)
    x_sorted_AD, expert_sorted_A = x_AD[order_A], expert_A[order_A]

    if ep == 1:
        y_sorted_AD = expert_fn(x_sorted_AD, jnp.bincount(expert_A, length=num_experts))
    else:
        # Destinations are contiguous after the sort; a row's slot is its rank among rows for that device.
        dest_A = expert_sorted_A // local_experts
        count_P = jnp.bincount(dest_A, length=ep)
        slot_A = jnp.arange(A) - (jnp.cumsum(count_P) - count_P)[dest_A]
        send_PAD = jnp.zeros((ep, A, x_AD.shape[1]), x_AD.dtype).at[dest_A, slot_A].set(x_sorted_AD)
        # local_experts marks an empty slot: it sorts last and belongs to no group.
        send_ids_PA = (
            jnp.full((ep, A), local_experts, jnp.int32)
            .at[dest_A, slot_A]
            .set(expert_sorted_A % local_experts)
        )
        recv_PAD = jax.lax.all_to_all(send_PAD, expert_axis, 0, 0)
        recv_ids_R = jax.lax.all_to_all(send_ids_PA, expert_axis, 0, 0).reshape(-1)
        recv_RD = recv_PAD.reshape(ep * A, -1)

        order_R = jnp.argsort(recv_ids_R, stable=True)
        group_sizes = jnp.bincount(recv_ids_R, length=local_experts + 1)[:local_experts]
        y_grouped_RD = expert_fn(recv_RD[order_R], group_sizes)
        filled_R = jnp.arange(ep * A) < jnp.sum(group_sizes)
        y_grouped_RD = jnp.where(filled_R[:, None], y_grouped_RD, 0)
        y_RD = jnp.zeros_like(y_grouped_RD).at[order_R].set(y_grouped_RD)
        back_PAD = jax.lax.all_to_all(y_RD.reshape(ep, A, -1), expert_axis, 0, 0)
        y_sorted_AD = back_PAD[dest_A, slot_A]
    return jnp.zeros_like(y_sorted_AD).at[order_A].set(y_sorted_AD)


def capacity_positions(expert_NK, num_experts: int):
    """Slot of each assignment in its expert's buffer, choice-major priority: [N, K] int32."""
    N, K = expert_NK.shape
    onehot_KNE = jax.nn.one_hot(expert_NK.T, num_experts, dtype=jnp.int32)
    position_KNE = jnp.cumsum(onehot_KNE.reshape(K * N, num_experts), axis=0).reshape(K, N, num_experts) - 1
    return jnp.take_along_axis(position_KNE, expert_NK.T[..., None], axis=-1)[..., 0].T


def dispatch_capacity(
    x_ND, expert_NK, capacity: int, num_experts: int, expert_fn: ExpertFn, expert_axis: str | None
):
    """(y_NKD, kept_NK): per-assignment expert outputs (zero where dropped) and which were kept."""
    N, K = expert_NK.shape
    D = x_ND.shape[1]
    ep = _axis_size(expert_axis)
    position_NK = capacity_positions(expert_NK, num_experts)
    kept_NK = position_NK < capacity
    tokens_NK = jnp.broadcast_to(jnp.arange(N)[:, None], (N, K))
    # Dropped assignments scatter out of bounds, which mode="drop" discards.
    slot_NK = jnp.where(kept_NK, position_NK, capacity)
    buffer_ECD = (
        jnp.zeros((num_experts, capacity, D), x_ND.dtype)
        .at[expert_NK, slot_NK]
        .set(x_ND[tokens_NK], mode="drop")
    )
    if ep > 1:
        local = num_experts // ep
        recv_PLCD = jax.lax.all_to_all(buffer_ECD.reshape(ep, local, capacity, D), expert_axis, 0, 0)
        out_LPCD = expert_fn(jnp.swapaxes(recv_PLCD, 0, 1).reshape(local, ep * capacity, D))
        out_PLCD = jnp.swapaxes(out_LPCD.reshape(local, ep, capacity, D), 0, 1)
        buffer_ECD = jax.lax.all_to_all(out_PLCD, expert_axis, 0, 0).reshape(num_experts, capacity, D)
    else:
        buffer_ECD = expert_fn(buffer_ECD)
    y_NKD = buffer_ECD.at[expert_NK, slot_NK].get(mode="fill", fill_value=0)
    return y_NKD, kept_NK
